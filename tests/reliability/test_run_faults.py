"""Run processes SIGKILLed mid-training and mid-registration, and two runs at once on one home.

The work runs in a real subprocess (tests/reliability/worker.py); the kill is real timing:
the test waits for the process to report it has started, then kills it at a moment of its own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from models.artifact import CHECKSUMS, verify_checksums
from models.registry import Registry
from orchestration import feature_assets
from quality.ledger import BatchLedger
from tests.orchestration.conftest import Platform
from tests.reliability.kit import leftover_temporaries
from tests.serving.kit import build_serving_home
from usecases.fraud import simulator

REPO = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SODA_CORE_TELEMETRY_ENABLED": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.worker", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_started(proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()  # blocks until the worker says "started" (or exits)
    assert line.strip() == "started", (line, proc.stderr.read() if proc.poll() else "")
    assert time.monotonic() < deadline


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _assert_registry_consistent(registry: Registry, models: Path) -> list[str]:
    """No half entry: every version whole (files, artifacts, one registered event), the
    sequence unbroken, SQLite intact; every model directory under a final name complete."""
    with sqlite3.connect(registry.path) as con:
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert con.execute("pragma foreign_key_check").fetchall() == []
    versions = registry.list_versions()
    assert [v.seq for v in versions] == list(range(1, len(versions) + 1))
    registered = [e.version for e in registry.events() if e.kind == "registered"]
    assert registered == [v.version for v in versions]
    for v in versions:
        assert v.artifacts, v.version
        assert registry.verify(v.version) == [], v.version
    for folder in models.rglob("*"):
        hidden = any(part.startswith(".") for part in folder.relative_to(models).parts)
        if folder.is_dir() and not hidden and any(f.is_file() for f in folder.iterdir()):
            assert verify_checksums(folder) == [], folder  # final name: whole model or none
    assert leftover_temporaries(models.parent) == []
    return [v.version for v in versions]


@pytest.fixture(scope="module")
def serving_home(tmp_path_factory):
    home = build_serving_home(tmp_path_factory.mktemp("kill") / "home", seed=13)
    frame = home.home / "frame.parquet"
    home.training_frame.write_parquet(frame)
    spec = home.home / "spec.json"
    spec.write_text(json.dumps(home.spec.to_dict()))
    return home, frame, spec


def test_a_run_killed_mid_training_leaves_no_trace_and_the_rerun_registers(serving_home):
    home, frame, spec = serving_home
    models = home.home / "models"
    before = _assert_registry_consistent(home.registry, models)
    out = models / "killed-run" / "candidate"
    proc = _spawn("train", str(home.home), str(frame), str(spec), str(out), "100000")
    _wait_started(proc)
    time.sleep(random.uniform(1.0, 3.0))  # inside the training loop
    _kill(proc)
    assert not out.exists()
    assert _assert_registry_consistent(home.registry, models) == before

    rerun = models / "rerun" / "candidate"
    _finish(_spawn("train", str(home.home), str(frame), str(spec), str(rerun), "2"))
    after = _assert_registry_consistent(home.registry, models)
    assert len(after) == len(before) + 1
    assert home.registry.get(after[-1]).artifact_dir == str(rerun)


def test_registrations_killed_at_random_moments_leave_no_half_entry(serving_home):
    home, _, _ = serving_home
    models = home.home / "models"
    home.register(seed=21)
    source = models / "seed-21"
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        count = len(home.registry.list_versions())
        proc = _spawn("register-loop", str(home.home), str(source), "100000")
        _wait_started(proc)
        deadline = time.monotonic() + 60
        while len(home.registry.list_versions()) < count + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere in save -> hash -> transaction
        _kill(proc)
        kills += 1
        _assert_registry_consistent(home.registry, models)
    # A model saved but never registered (killed in between) registers on the retry, and
    # one registered already is not registered twice.
    last = max(int(p.name.split("-")[1]) for p in models.glob("loop-*"))
    proc = _spawn("register-loop", str(home.home), str(source), str(last + 1))
    _finish(proc)
    versions = _assert_registry_consistent(home.registry, models)
    complete = [p for p in models.glob("loop-*") if (p / CHECKSUMS).exists()]
    registered_dirs = {home.registry.get(v).artifact_dir for v in versions}
    assert {str(p) for p in complete} <= registered_dirs
    assert len(versions) == len(registered_dirs)  # one version per model directory
    assert kills == 3


# --- two runs at once -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Platform:
    platform = Platform(tmp_path_factory.mktemp("concurrent") / "home")
    config = simulator.ScenarioConfig(seed=4, n_cards=100, n_merchants=20, rows_per_batch=400)
    platform.land(config, batches=4)
    assert all(o.success for o in platform.ingest_all())
    return platform


def test_two_feature_runs_started_together_both_succeed_without_lock_errors(ingested):
    home = str(ingested.settings.home)
    procs = [_spawn("features", home) for _ in range(2)]
    outputs = [_finish(p) for p in procs]
    for out in outputs:  # Feast prints its progress between the two
        lines = out.split()
        assert lines[0] == "started" and lines[-1] == "done", out[-500:]
    # The files they both wrote are whole and the store answers like one run's would.
    files = sorted((ingested.settings.home / "features").rglob("*.parquet"))
    assert files and all(pl.read_parquet(f).height > 0 for f in files)
    assert leftover_temporaries(ingested.settings.home) == []
    again = dg.materialize(
        feature_assets.VIEW_ASSETS,
        resources=ingested.resources,
        instance=ingested.instance,
    )
    assert again.success
    assert sorted((ingested.settings.home / "features").rglob("*.parquet")) == files


def test_two_ledger_and_registry_writers_at_once_never_hit_a_lock(tmp_path):
    home = tmp_path / "home"
    BatchLedger(home / "ledger.sqlite")
    Registry(home / "registry" / "registry.sqlite")
    procs = [_spawn("write", str(home), tag, "150") for tag in ("a", "b")]
    for p in procs:
        out = _finish(p, timeout=300)
        assert out.split() == ["started", "done"]
    ledger = BatchLedger(home / "ledger.sqlite")
    assert ledger.summary()["transactions"]["validated_batches"] == 300
    registry = Registry(home / "registry" / "registry.sqlite")
    versions = registry.list_versions()
    assert [v.seq for v in versions] == list(range(1, 301))
    kinds = [e.kind for e in registry.events()]
    assert kinds.count("registered") == 300 and kinds.count("deployment") == 300
