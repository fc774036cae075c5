"""The scale profile's batch ledger and model registry live in Postgres, one schema per use
case: a scale home (on a network volume, where SQLite's WAL does not work) holds no file of
theirs, and processes on several machines write them at once."""

import os
import subprocess
import sys
import textwrap
import uuid

import psycopg2

from core.db import exists
from core.settings import REPO_ROOT, Settings
from models.registry import Registry, Verdict
from orchestration.resources import LooplineStorage
from quality.ledger import BatchLedger
from tests.models.test_models_registry import _record


def scale_env(home, postgres_url: str, usecase: str) -> dict[str, str]:
    return {
        "LOOPLINE_PROFILE": "scale",
        "LOOPLINE_HOME": home.as_uri(),
        "LOOPLINE_USECASE": usecase,
        "LOOPLINE_POSTGRES_URL": postgres_url,
        "LOOPLINE_REDIS_URL": "redis://127.0.0.1:1/0",  # the stores never touch Redis
    }


def _usecase() -> str:
    """A use case name of this test alone (the session's Postgres is shared)."""
    return f"stores{uuid.uuid4().hex[:8]}"


def test_scale_ledger_and_registry_are_postgres_schemas_not_files_in_the_home(
    tmp_path, postgres_url, monkeypatch
):
    home, first, second = tmp_path / "home", _usecase(), _usecase()
    for name, value in scale_env(home, postgres_url, first).items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert not exists(settings.ledger_location)  # `loopline batches`: "no batches yet"
    ledger = LooplineStorage().ledger  # what every asset and sensor uses
    assert ledger.receive("b1", "transactions", home / "landing" / "t.parquet")
    assert not settings.ledger_path.exists() and exists(settings.ledger_location)
    registry = Registry.for_settings(settings)
    version = registry.register(_record(tmp_path, "a"), Verdict(True, None))
    registry.promote(version, "first")
    assert not settings.registry_path.parent.exists()
    assert not [p for p in home.rglob("*") if p.is_file()]
    with psycopg2.connect(postgres_url.replace("+psycopg2", "", 1)) as con, con.cursor() as cur:
        cur.execute(f"select batch_id, status from loopline_{first}_ledger.batches")
        assert cur.fetchall() == [("b1", "received")]
        cur.execute(f"select alias, version from loopline_{first}_registry.aliases")
        assert cur.fetchall() == [("champion", version)]
    # Another use case on the same database has its own, empty, ledger and registry.
    other = Settings.from_env(scale_env(home, postgres_url, second))
    assert BatchLedger.for_settings(other).batches() == []
    assert Registry.for_settings(other).get_alias("champion") is None
    # The password never shows where the store is named (CLI titles, run metadata).
    password = postgres_url.split(":")[2].split("@")[0]
    assert password not in f"{ledger.location} {registry.location!r} {registry.path}"


WRITER = """
import sys
from pathlib import Path
from core.db import exists
from core.settings import Settings
from models.registry import Registry
from quality.ledger import BatchLedger
from tests.models.test_models_registry import _record

me, root = sys.argv[1], Path(sys.argv[2])
settings = Settings.from_env()
ledger, registry = BatchLedger.for_settings(settings), Registry.for_settings(settings)
for i in range(60):
    ledger.receive(f"{me}-{i}", "transactions", root / f"{me}-{i}.parquet")
    ledger.mark(f"{me}-{i}", "validated", rows=i)
    if i % 20 == 0:
        registry.register(_record(root, f"{me}-{i}"), None)
"""


def test_two_processes_write_the_scale_ledger_and_registry_at_once(tmp_path, postgres_url):
    """Two workers (two machines at scale) on one use case: every batch recorded, every
    registration a distinct version."""
    env = scale_env(tmp_path / "home", postgres_url, _usecase())
    script = textwrap.dedent(WRITER)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, name, str(tmp_path)],
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    for w in writers:
        assert w.wait(timeout=300) == 0, w.stderr.read()
    settings = Settings.from_env(env)
    summary = BatchLedger.for_settings(settings).summary()["transactions"]
    assert summary["validated_batches"] == 120
    assert summary["validated_rows"] == 2 * sum(range(60))
    versions = [v.version for v in Registry.for_settings(settings).list_versions()]
    assert versions == [f"v{i:04d}" for i in range(1, 7)]
