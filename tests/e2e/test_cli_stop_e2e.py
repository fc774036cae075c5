"""`loopline run` stopped by SIGTERM (kill, a container stop) stops everything it started."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from orchestration.cli_loop import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(int(pid))
    return found


def test_sigterm_stops_dagster_and_torchserve(tmp_path):
    home, port = tmp_path / "home", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "run", "--no-simulator", "--port", str(port)],
        env={**os.environ, "LOOPLINE_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, "loopline run exited by itself"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the Dagster UI never answered")
        time.sleep(3)  # past start(): the run loop waits on Dagster
        started = [p for p in _processes_mentioning(str(home)) if p != proc.pid]
        assert started, "no Dagster or TorchServe process runs for the home"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(home)) and time.monotonic() < deadline:
            time.sleep(1)
        assert _processes_mentioning(str(home)) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
