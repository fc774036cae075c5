"""`loopline run` stops everything it started however it is told to stop: SIGTERM to its
process group as `make run` gets it from a supervisor (make forwards it: two signals), repeated
SIGTERM, Ctrl-C then SIGTERM, and SIGKILL (nothing left to clean up but its guards). Each ends
with no process of the home left and the ports free. TorchServe runs on free ports
(LOOPLINE_SERVING_PORTS), never 8080."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from core.settings import REPO_ROOT
from tests.e2e.kit import free_ports

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


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid}: gone"
    return f"{pid}: {words[:200]}"


def _held(ports: list[int]) -> list[int]:
    """The ports some process listens on (SO_REUSEADDR: closed connections do not count)."""
    held = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                held.append(port)
    return held


def _sigterm_group_via_make(proc):
    os.killpg(proc.pid, signal.SIGTERM)


def _sigterm_three_times(proc):
    for _ in range(3):
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)


def _sigint_then_sigterm(proc):
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)


def _sigkill(proc):
    proc.kill()


@pytest.mark.parametrize(
    "stop",
    [_sigterm_group_via_make, _sigterm_three_times, _sigint_then_sigterm, _sigkill],
    ids=lambda f: f.__name__.strip("_"),
)
def test_loopline_run_leaves_nothing_running(tmp_path, stop):
    home = tmp_path / "home"
    ports = free_ports(4)
    command = [sys.executable, "-m", "orchestration.cli", "run", "--no-simulator"]
    command += ["--port", str(ports[0])]
    if stop is _sigterm_group_via_make:  # make execs a plain recipe line without a shell
        (tmp_path / "Makefile").write_text(f"run:\n\t{' '.join(command)}\n")
        command = ["make", "--no-print-directory", "-f", str(tmp_path / "Makefile"), "run"]
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "LOOPLINE_HOME": str(home),
            "LOOPLINE_SERVING_PORTS": ",".join(map(str, ports[1:])),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # printed once Dagster answers and TorchServe is healthy
            if line.startswith("Dagster UI:"):
                break
        else:
            pytest.fail(f"loopline run exited with code {proc.wait()} before it was up")
        assert [p for p in _processes_mentioning(str(home)) if p != proc.pid]
        assert _held(ports) == ports

        stop(proc)
        try:
            out = proc.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:  # say where it hung: what it printed, and what runs
            left = [_cmdline(pid) for pid in _processes_mentioning(str(home))]
            os.killpg(proc.pid, signal.SIGKILL)
            printed = proc.communicate()[0]
            pytest.fail(f"still running 180 s after the stop; processes {left}:\n{printed[-4000:]}")
        if stop is not _sigkill:
            assert "Aborted" not in out and "stopped" in out.splitlines(), out[-2000:]
        if stop in (_sigterm_three_times, _sigint_then_sigterm):
            assert proc.returncode == 0
        deadline = time.monotonic() + 90  # after a SIGKILL, the guards stop what is left
        while (_processes_mentioning(str(home)) or _held(ports)) and time.monotonic() < deadline:
            time.sleep(1)
        assert _processes_mentioning(str(home)) == []
        assert _held(ports) == []
    finally:
        for pid in _processes_mentioning(str(home)):
            os.kill(pid, signal.SIGKILL)
