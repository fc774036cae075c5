"""Running the platform locally: the Dagster instance config and the process supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.lifeline import tied
from core.rotating_log import LogRotator, open_append
from core.settings import REPO_ROOT, Settings

TICK_RETENTION = """\
# Sensor and schedule ticks are kept a month (skipped ones a day): Dagster keeps successful
# ticks forever by default, and the landing sensor ticks every few seconds.
retention:
  schedule:
    purge_after_days: 30
  sensor:
    purge_after_days:
      skipped: 1
      success: 30
      failure: 30
"""

DAGSTER_YAML = """\
# Written by `loopline run`; edit LOOPLINE_HOME, not this file.
telemetry:
  enabled: false
{retention}run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
concurrency:
  runs:
    max_concurrent_runs: {slots}
    tag_concurrency_limits:
      - key: loopline/lane
        value: ingest
        limit: 1
      - key: loopline/pool
        limit: {max_runs}
      - key: loopline/pool
        value:
          applyLimitPerUniqueValue: true
        limit: 1
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def environment(settings: Settings) -> dict[str, str]:
    """Environment every Loopline process runs with (no telemetry, state under LOOPLINE_HOME)."""
    env = dict(os.environ)
    env.update(
        LOOPLINE_HOME=str(settings.home),
        DAGSTER_HOME=str(settings.dagster_home),
        SODA_CORE_TELEMETRY_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    return env


# The scale profile: run, event log and schedule storage on Postgres (the URL is read from the
# environment by Dagster itself, so it is never written here), runs queued and bounded, ingest
# runs of one dataset capped so a backlog leaves room for features and training, and one run
# per pool tag (one training, one monitoring run at a time: both write the registry or serving).
SCALE_DAGSTER_YAML = """\
# Written by `loopline run` (LOOPLINE_PROFILE=scale); the Postgres URL stays in the environment.
telemetry:
  enabled: false
{retention}storage:
  postgres:
    postgres_url:
      env: LOOPLINE_POSTGRES_URL
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
concurrency:
  runs:
    max_concurrent_runs: {max_runs}
    tag_concurrency_limits:
      - key: loopline/dataset
        value:
          applyLimitPerUniqueValue: true
        limit: {per_dataset}
      - key: loopline/pool
        value:
          applyLimitPerUniqueValue: true
        limit: 1
run_monitoring:
  enabled: true
  poll_interval_seconds: 30
"""


def instance_config(settings: Settings, max_runs: int | None = None) -> str:
    """dagster.yaml text for the settings' profile (``max_runs`` overrides the profile's)."""
    runs = max_runs or settings.max_concurrent_runs
    if settings.scale:
        return SCALE_DAGSTER_YAML.format(
            max_runs=runs, per_dataset=max(1, runs // 2), retention=TICK_RETENTION
        )
    # Ingestion has a slot of its own beside them (decision 38): neither queue starves the other.
    return DAGSTER_YAML.format(max_runs=runs, slots=runs + 1, retention=TICK_RETENTION)


def write_instance_config(settings: Settings, max_runs: int | None = None) -> Path:
    """dagster.yaml for the instance: locally SQLite under DAGSTER_HOME, queued runs, bounded
    concurrency for 2 cores; in the scale profile Postgres storage (``SCALE_DAGSTER_YAML``)."""
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    path = settings.dagster_home / "dagster.yaml"
    path.write_text(instance_config(settings, max_runs))
    return path


def start_dagster(
    settings: Settings, host: str = "127.0.0.1", port: int = 3000
) -> subprocess.Popen:
    """`dagster dev` (webserver + daemon) in its own process group, so it can be stopped whole,
    tied to this process: it stops when this process is gone, even SIGKILLed (core.lifeline)."""
    write_instance_config(settings)
    exe = Path(sys.executable).with_name("dagster")
    cmd = [str(exe), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", host, "-p", str(port)]
    cmd = tied(cmd)
    log = open_append(settings.dagster_log)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        os.close(log)  # the child holds its own copy
    proc.log_rotator = rotate_while_running(proc, settings)  # type: ignore[attr-defined]
    return proc


def rotate_while_running(
    proc: subprocess.Popen, settings: Settings, interval_s: float = 5.0
) -> LogRotator:
    """Keep ``dagster.log`` within ``log_max_bytes`` (plus ``log_backups`` copies) for as long
    as ``proc`` runs: copy-truncate from this process, so a slow check never blocks the child
    (core/rotating_log.py)."""
    return LogRotator(
        settings.dagster_log,
        settings.log_max_bytes,
        settings.log_backups,
        interval_s=interval_s,
        alive=lambda: proc.poll() is None,
    ).start()


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Stop a process group politely (SIGINT), then firmly."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode
            time.sleep(0.2)
    return proc.wait()
