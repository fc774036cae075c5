"""Where Loopline keeps its state. The one place that reads the environment.

No dagster import here: the CLI uses it for commands that never touch Dagster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from core.db import Location, Postgres, schema_name
from core.retention import Limits, limits_from_env, parse_size
from core.storage import data_root, is_remote
from core.usecase import DEFAULT_USECASE

REPO_ROOT = Path(__file__).resolve().parents[1]

LOCAL = "local"
SCALE = "scale"
PROFILES = (LOCAL, SCALE)
# Every variable Loopline reads (the Kubernetes files are tested against this list).
ENV_VARS = (
    "LOOPLINE_USECASE",
    "LOOPLINE_HOME",
    "LOOPLINE_SERVING_DIR",
    "LOOPLINE_LAKE",
    "LOOPLINE_PROFILE",
    "LOOPLINE_POSTGRES_URL",
    "LOOPLINE_REDIS_URL",
    "LOOPLINE_SERVING_WORKERS",
    "LOOPLINE_SERVING_PORTS",
    "LOOPLINE_HEALTH_STALE_INTERVALS",
    "LOOPLINE_SERVING_KEY_MINUTES",
    "LOOPLINE_MAX_CONCURRENT_RUNS",
    "LOOPLINE_RETRAIN_MIN_ROWS",
    "LOOPLINE_RETRAIN_COOLDOWN_MINUTES",
    "LOOPLINE_RETRAIN_DRIFT_REARM_MINUTES",
    "LOOPLINE_MAX_LANDING_BYTES",
    "LOOPLINE_LANDING_SETTLE_SECONDS",
)
# Retention (core/retention.py, serving/stores.py): per store, LOOPLINE_RETAIN_<STORE> holds
# its limits as ``days=N,count=N,bytes=SIZE`` (any of them; ``off``: none). ``days`` counts in
# the data's event time for batch files (raw, validated, features, archive), so an accelerated
# simulation expires data as fast as it makes it. Defaults keep a running demo's disk flat:
# batch stores hold 90 days of data, the rest a count or a size. What a champion, a rollback
# target, the training window or unfinished work needs is kept whatever the limit.
RETENTION_DEFAULTS = {
    "archive": Limits(max_age=timedelta(days=90), max_bytes=parse_size("2G")),
    "raw": Limits(max_age=timedelta(days=90), max_bytes=parse_size("4G")),
    "validated": Limits(max_age=timedelta(days=90)),
    "features": Limits(max_age=timedelta(days=90)),
    "quarantine": Limits(max_count=200, max_bytes=parse_size("1G")),
    "models": Limits(max_count=20),
    "mar": Limits(max_count=10),
    "training_sets": Limits(max_count=10),
    "batch_predictions": Limits(max_count=100, max_bytes=parse_size("1G")),
    "compacted_log": Limits(max_age=timedelta(days=90), max_bytes=parse_size("1G")),
    "prediction_log": Limits(max_bytes=parse_size("512M")),
    # Finished Dagster runs and their event logs, by wall-clock age (orchestration's store).
    "dagster_runs": Limits(max_age=timedelta(days=14)),
}
RETAIN_PREFIX = "LOOPLINE_RETAIN_"
ENV_VARS += (
    *(f"{RETAIN_PREFIX}{store.upper()}" for store in RETENTION_DEFAULTS),
    "LOOPLINE_RETAIN_GRACE_MINUTES",
    "LOOPLINE_RETENTION_INTERVAL_MINUTES",
    "LOOPLINE_RETAIN_ROLLBACK_DEPTH",
    "LOOPLINE_LOG_MAX_BYTES",
    "LOOPLINE_LOG_BACKUPS",
)
# Retraining trigger overrides: environment variable -> TriggerPolicy field.
RETRAIN_ENV = {
    "LOOPLINE_RETRAIN_MIN_ROWS": "min_new_labelled_rows",
    "LOOPLINE_RETRAIN_COOLDOWN_MINUTES": "cooldown_minutes",
    "LOOPLINE_RETRAIN_DRIFT_REARM_MINUTES": "drift_rearm_minutes",
}
# Dagster reads LOOPLINE_POSTGRES_URL itself (dagster.yaml), through SQLAlchemy.
POSTGRES_SCHEME = "postgresql+psycopg2"
# Per profile: TorchServe workers per model version, Dagster runs in flight at once.
_DEFAULTS = {LOCAL: {"workers": 1, "runs": 2}, SCALE: {"workers": 2, "runs": 8}}


def default_home(usecase: str | None = None) -> Path:
    """The home when ``LOOPLINE_HOME`` is unset: ``.loopline/`` in the repository for the
    default use case, ``.loopline-<name>/`` for another (``usecase`` as ``LOOPLINE_USECASE``
    spells it: a name or a folder), so two use cases never share a ledger or a registry."""
    name = Path(usecase).name if usecase else DEFAULT_USECASE
    suffix = "" if name == DEFAULT_USECASE else f"-{name}"
    return (REPO_ROOT / f".loopline{suffix}").resolve()


def local_path(location: str) -> Path:
    """A local path from a plain path or a ``file://`` URI (fsspec's spelling of the same).

    Other schemes (``s3://``, ``gs://``) are refused with the reason: the home keeps files that
    need a file system (Feast's registry, locally the ledger and model registry) and
    TorchServe's working folder; batch and feature files go to object storage through
    ``LOOPLINE_LAKE`` instead.
    """
    root = data_root(location)
    if not is_remote(root):
        return root
    raise ValueError(
        f"{location}: LOOPLINE_HOME must be a local path or a file:// URI (it keeps files that "
        "need a file system); put batch and feature files on object storage with LOOPLINE_LAKE"
    )


def _ports(value: str | None) -> dict[str, tuple[int, ...]]:
    if not value:
        return {}
    try:
        return {"serving_ports": tuple(int(p) for p in value.split(","))}
    except ValueError:
        raise ValueError(
            f"LOOPLINE_SERVING_PORTS={value!r}: expected inference,management,metrics ports"
        ) from None


@dataclass(frozen=True)
class Settings:
    """All paths under ``LOOPLINE_HOME`` (default ``.loopline/`` in the repository, see
    ``default_home``), and the
    profile: ``local`` (SQLite everywhere, no network) or ``scale`` (Dagster, the batch ledger
    and the model registry on Postgres, Feast online store on Redis, several TorchServe
    workers). Connection URLs carry secrets: they
    come from the environment only and are kept out of ``repr``.

    Batch and feature files (``raw/``, ``validated/``, ``features/``, ``training_sets/``) live
    under the *lake*: ``LOOPLINE_LAKE``, a local path or an fsspec URI such as
    ``s3://bucket/loopline``; by default the home itself. The landing folder, the quarantine and
    the archive stay in the home, where producers drop files and people inspect them."""

    home: Path
    lake_uri: str = ""
    # TorchServe's working directory; the use cases of one platform share it (one TorchServe
    # serves them all, decision 35). Default: ``<home>/serving``.
    serving_path: Path | None = None
    profile: str = LOCAL
    postgres_url: str = field(default="", repr=False)
    redis_url: str = field(default="", repr=False)
    serving_workers: int = 0
    max_concurrent_runs: int = 0
    retrain: Mapping[str, float] = field(default_factory=dict)
    # Ingestion's micro-batch: the landing sensor (every 5 s) asks one run per dataset for the
    # batches waiting, once the oldest has waited this long, at most this many per run.
    ingest_window_s: float = 0.0
    ingest_max_batches: int = 100
    # TorchServe's inference, management and metrics ports for the instance `loopline run`
    # and the Dagster deployment start (LOOPLINE_SERVING_PORTS="8080,8081,8082").
    serving_ports: tuple[int, int, int] = (8080, 8081, 8082)
    # A sensor whose last tick is older than this many of its intervals (and 5 minutes) is
    # stale: `loopline status` and the platform_health check say so, and an alert goes out.
    health_stale_intervals: float = 10.0
    # Retention: limits per store, the grace (nothing younger is deleted: a run may be using
    # it), how many champions back rollback must find intact, and process logs' rotation.
    retention: Mapping[str, Limits] = field(default_factory=lambda: dict(RETENTION_DEFAULTS))
    retention_grace_min: float = 30.0
    retention_interval_min: float = 15.0
    rollback_depth: int = 3
    log_max_bytes: int = 16 << 20
    log_backups: int = 3
    # Landing: a larger file is refused unread; a file is taken once its size and modification
    # time have not changed for this long (a file written in place by scp or SFTP grows).
    max_landing_bytes: int = 1 << 30
    landing_settle_s: float = 5.0
    # TorchServe's key lifetime in minutes (0: its default, a week); serving.keys renews keys
    # when half of it is left.
    serving_key_minutes: float = 0.0
    # The use case's name (``LOOPLINE_USECASE``'s last part): in the scale profile its ledger
    # and registry are schemas ``loopline_<name>_ledger`` and ``loopline_<name>_registry`` of
    # the Postgres database, so use cases sharing it keep apart.
    usecase: str = DEFAULT_USECASE

    def __post_init__(self) -> None:
        self.lake  # noqa: B018 (a malformed LOOPLINE_LAKE fails here, not in the first run)
        if self.profile not in PROFILES:
            raise ValueError(f"LOOPLINE_PROFILE={self.profile!r}: expected one of {PROFILES}")
        if self.profile == SCALE:
            missing = [
                name
                for name, value in (
                    ("LOOPLINE_POSTGRES_URL", self.postgres_url),
                    ("LOOPLINE_REDIS_URL", self.redis_url),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"the scale profile needs {', '.join(missing)}")
            if not self.postgres_url.startswith(POSTGRES_SCHEME + "://"):
                raise ValueError(
                    f"LOOPLINE_POSTGRES_URL must start with {POSTGRES_SCHEME}:// (SQLAlchemy 2.1 "
                    "reads plain postgresql:// as psycopg 3; dagster-postgres uses psycopg2)"
                )
            self.registry_location  # noqa: B018 (a use case name too long for a schema fails here)
        defaults = _DEFAULTS[self.profile]
        if not self.serving_workers:
            object.__setattr__(self, "serving_workers", defaults["workers"])
        if not self.max_concurrent_runs:
            object.__setattr__(self, "max_concurrent_runs", defaults["runs"])
        if self.ingest_window_s < 0 or self.ingest_max_batches < 1:
            raise ValueError(
                "LOOPLINE_INGEST_WINDOW_SECONDS must be >= 0 and LOOPLINE_INGEST_MAX_BATCHES >= 1"
            )
        ports = self.serving_ports
        if len(ports) != 3 or len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
            raise ValueError(
                f"LOOPLINE_SERVING_PORTS={','.join(map(str, ports))}: expected three different "
                "ports, inference,management,metrics (e.g. 8080,8081,8082)"
            )
        if self.health_stale_intervals <= 0:
            raise ValueError("LOOPLINE_HEALTH_STALE_INTERVALS must be > 0")
        if self.max_landing_bytes < 1 or self.landing_settle_s < 0:
            raise ValueError(
                "LOOPLINE_MAX_LANDING_BYTES must be >= 1 and LOOPLINE_LANDING_SETTLE_SECONDS >= 0"
            )
        if self.serving_workers < 1 or self.max_concurrent_runs < 1:
            raise ValueError("serving workers and concurrent runs must be >= 1")
        if self.retention_interval_min <= 0:
            raise ValueError("LOOPLINE_RETENTION_INTERVAL_MINUTES must be > 0")
        if self.retention_grace_min < 0 or self.rollback_depth < 1:
            raise ValueError(
                "LOOPLINE_RETAIN_GRACE_MINUTES must be >= 0 and LOOPLINE_RETAIN_ROLLBACK_DEPTH >= 1"
            )
        if self.log_max_bytes < 1 or self.log_backups < 1:
            raise ValueError("LOOPLINE_LOG_MAX_BYTES and LOOPLINE_LOG_BACKUPS must be >= 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = env.get("LOOPLINE_HOME")
        return cls(
            local_path(home) if home else default_home(env.get("LOOPLINE_USECASE")),
            lake_uri=env.get("LOOPLINE_LAKE", ""),
            serving_path=local_path(env["LOOPLINE_SERVING_DIR"])
            if env.get("LOOPLINE_SERVING_DIR")
            else None,
            profile=env.get("LOOPLINE_PROFILE") or LOCAL,
            postgres_url=env.get("LOOPLINE_POSTGRES_URL", ""),
            redis_url=env.get("LOOPLINE_REDIS_URL", ""),
            serving_workers=int(env.get("LOOPLINE_SERVING_WORKERS") or 0),
            max_concurrent_runs=int(env.get("LOOPLINE_MAX_CONCURRENT_RUNS") or 0),
            retrain={name: float(env[var]) for var, name in RETRAIN_ENV.items() if env.get(var)},
            ingest_window_s=float(env.get("LOOPLINE_INGEST_WINDOW_SECONDS") or 0),
            ingest_max_batches=int(env.get("LOOPLINE_INGEST_MAX_BATCHES") or 100),
            **_ports(env.get("LOOPLINE_SERVING_PORTS")),
            health_stale_intervals=float(env.get("LOOPLINE_HEALTH_STALE_INTERVALS") or 10),
            retention=limits_from_env(env, RETENTION_DEFAULTS, RETAIN_PREFIX),
            retention_grace_min=float(env.get("LOOPLINE_RETAIN_GRACE_MINUTES") or 30),
            retention_interval_min=float(env.get("LOOPLINE_RETENTION_INTERVAL_MINUTES") or 15),
            rollback_depth=int(env.get("LOOPLINE_RETAIN_ROLLBACK_DEPTH") or 3),
            log_max_bytes=parse_size(env.get("LOOPLINE_LOG_MAX_BYTES") or "16M"),
            log_backups=int(env.get("LOOPLINE_LOG_BACKUPS") or 3),
            max_landing_bytes=int(env.get("LOOPLINE_MAX_LANDING_BYTES") or 1 << 30),
            landing_settle_s=float(env.get("LOOPLINE_LANDING_SETTLE_SECONDS") or 5.0),
            serving_key_minutes=float(env.get("LOOPLINE_SERVING_KEY_MINUTES") or 0),
            usecase=Path(env.get("LOOPLINE_USECASE") or DEFAULT_USECASE).name,
        )

    @property
    def scale(self) -> bool:
        return self.profile == SCALE

    @property
    def home_uri(self) -> str:
        """The home as an fsspec URI (``file:///...``); LOOPLINE_HOME accepts it back."""
        return self.home.as_uri()

    @cached_property
    def lake(self) -> Path:
        """Root of the batch and feature files: a ``Path``, or a ``UPath`` on object storage."""
        return data_root(self.lake_uri) if self.lake_uri else self.home

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def raw(self) -> Path:
        return self.lake / "raw"

    @property
    def validated(self) -> Path:
        return self.lake / "validated"

    @property
    def training_sets(self) -> Path:
        return self.lake / "training_sets"

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
    def ledger_location(self) -> Location:
        """The batch ledger: ``ledger_path`` locally, a Postgres schema in the scale profile
        (SQLite's WAL does not work on the network file system a scale home is on)."""
        return self._location("ledger", self.ledger_path)

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def registry_path(self) -> Path:
        return self.home / "registry" / "registry.sqlite"

    @property
    def registry_location(self) -> Location:
        """The model registry: ``registry_path`` locally, a Postgres schema in the scale
        profile."""
        return self._location("registry", self.registry_path)

    def _location(self, store: str, path: Path) -> Location:
        if self.scale:
            return Postgres(self.postgres_url, schema_name("loopline", self.usecase, store))
        return path

    @property
    def serving_dir(self) -> Path:
        """TorchServe's working directory: config.properties, key_file.json, logs; shared by the
        use cases of a platform (``LOOPLINE_SERVING_DIR``)."""
        return self.serving_path or self.home / "serving"

    @property
    def model_store(self) -> Path:
        return self.serving_dir / "model-store"

    @property
    def predictions(self) -> Path:
        """The prediction log, one folder per served model (serving/prediction_log.py)."""
        return self.home / "predictions"

    @property
    def retrain_request(self) -> Path:
        """Written by ``loopline retrain``; the retrain sensor consumes it."""
        return self.home / "retrain_request.json"

    @property
    def batch_predictions(self) -> Path:
        return self.home / "batch_predictions"

    @property
    def monitoring(self) -> Path:
        """Monitoring's outputs; ``log/`` holds the compacted prediction log."""
        return self.home / "monitoring"

    @property
    def dagster_log(self) -> Path:
        """`dagster dev`'s output, size-rotated (``log_max_bytes``, ``log_backups``)."""
        return self.home / "dagster.log"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def raw_file(self, dataset: str, batch_id: str) -> Path:
        return self.raw / dataset / f"{batch_id}.parquet"

    def validated_file(self, dataset: str, batch_id: str) -> Path:
        return self.validated / dataset / f"{batch_id}.parquet"

    def reference_profile_path(self, dataset: str) -> Path:
        return self.profiles / f"reference_{dataset}.json"

    def ensure(self) -> Settings:
        """Create the top-level directories (called by commands, never at import)."""
        for p in (self.landing, self.quarantine, self.archive):
            p.mkdir(parents=True, exist_ok=True)
        if not is_remote(self.lake):  # object storage has no folders to make
            for p in (self.raw, self.validated):
                p.mkdir(parents=True, exist_ok=True)
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        return self
