"""Where Loopline keeps its state. The one place that reads the environment.

No dagster import here: the CLI uses it for commands that never touch Dagster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    """All paths under ``LOOPLINE_HOME`` (default ``.loopline/`` in the repository)."""

    home: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(Path(env.get("LOOPLINE_HOME") or REPO_ROOT / ".loopline").resolve())

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def raw(self) -> Path:
        return self.home / "raw"

    @property
    def validated(self) -> Path:
        return self.home / "validated"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def archive(self) -> Path:
        return self.home / "archive"

    @property
    def profiles(self) -> Path:
        return self.home / "profiles"

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.sqlite"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def registry_path(self) -> Path:
        return self.home / "registry" / "registry.sqlite"

    @property
    def serving_dir(self) -> Path:
        """TorchServe's working directory: config.properties, key_file.json, logs."""
        return self.home / "serving"

    @property
    def model_store(self) -> Path:
        return self.serving_dir / "model-store"

    @property
    def predictions(self) -> Path:
        """The prediction log, one folder per served model (serving/prediction_log.py)."""
        return self.home / "predictions"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def raw_file(self, dataset: str, batch_id: str) -> Path:
        return self.raw / dataset / f"{batch_id}.parquet"

    def validated_file(self, dataset: str, batch_id: str) -> Path:
        return self.validated / dataset / f"{batch_id}.parquet"

    def reference_profile_path(self, dataset: str = "transactions") -> Path:
        return self.profiles / f"reference_{dataset}.json"

    def ensure(self) -> Settings:
        """Create the top-level directories (called by commands, never at import)."""
        for p in (self.landing, self.raw, self.validated, self.quarantine, self.archive):
            p.mkdir(parents=True, exist_ok=True)
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        return self
