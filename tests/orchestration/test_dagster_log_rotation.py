"""dagster.log stays within its bound while `dagster dev` writes on, never blocked, and the
newest lines are always in the live file (or the first backup); the instance purges old ticks."""

import subprocess
import sys
import time
from dataclasses import replace

from core.rotating_log import backup_path, open_append
from core.settings import Settings
from orchestration import platform
from orchestration.platform import rotate_while_running, write_instance_config

# Writes numbered 100-byte lines as fast as it can for ``seconds``, then prints "done".
CHILD = """
import sys, time
end = time.monotonic() + float(sys.argv[1]); n = 0
while time.monotonic() < end:
    sys.stdout.write(f"{n:09d} " + "x" * 89 + "\\n"); n += 1
    if n % 200 == 0: sys.stdout.flush(); time.sleep(0.001)
sys.stdout.write("done\\n"); sys.stdout.flush()
"""


def test_dagster_log_stays_bounded_while_the_child_writes(tmp_path):
    settings = replace(Settings(tmp_path / "home"), log_max_bytes=64 << 10, log_backups=2)
    settings.home.mkdir(parents=True)
    fd = open_append(settings.dagster_log)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "3"], stdout=fd)
    rotator = rotate_while_running(proc, settings, interval_s=0.05)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.3)
    rotator.stop()

    assert rotator.rotations >= 2 and rotator.failures == 0
    files = [settings.dagster_log, *(backup_path(settings.dagster_log, n) for n in (1, 2, 3))]
    assert not files[3].exists()
    # The last check after the child exited leaves the live file within the bound; the child
    # wrote at the new start after each truncation (O_APPEND), not into a hole of NUL bytes.
    assert settings.dagster_log.stat().st_size <= settings.log_max_bytes
    for path in files[:3]:
        assert b"\0" not in path.read_bytes()
    newest = (files[0].read_bytes() or files[1].read_bytes()).splitlines()
    assert newest[-1] == b"done"


def test_the_instance_purges_old_sensor_and_schedule_ticks(tmp_path):
    import dagster as dg
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import TickStatus

    settings = Settings(tmp_path / "home")
    write_instance_config(settings)
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        sensor = instance.get_tick_retention_settings(InstigatorType.SENSOR)
        schedule = instance.get_tick_retention_settings(InstigatorType.SCHEDULE)
    finally:
        instance.dispose()
    assert sensor[TickStatus.SKIPPED] == 1 and sensor[TickStatus.SUCCESS] == 30
    assert schedule[TickStatus.SUCCESS] == 30  # Dagster's default: forever (-1)


def test_start_dagster_writes_its_output_to_the_rotated_log(tmp_path, monkeypatch):
    """The wiring: `dagster dev`'s output (here a stand-in child) lands in dagster.log, which
    a rotator watches for as long as the child runs."""
    real_popen = subprocess.Popen

    def stand_in(cmd, **kwargs):
        return real_popen([sys.executable, "-c", "print('dagster says hi')"], **kwargs)

    monkeypatch.setattr(platform.subprocess, "Popen", stand_in)
    settings = Settings(tmp_path / "home").ensure()
    proc = platform.start_dagster(settings)
    assert proc.wait(timeout=60) == 0
    proc.log_rotator.stop()
    assert settings.dagster_log.read_text() == "dagster says hi\n"
    assert proc.log_rotator.path == settings.dagster_log
