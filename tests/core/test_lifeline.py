"""A server tied to its owner stops when the owner is SIGKILLed; a command stops once, whatever
signals arrive while it stops."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from core.lifeline import group_members

# An owner that starts a tied "server" (a process with a grandchild, as TorchServe's launcher
# and its Java frontend are), prints the server's group, then waits to be killed.
OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    from core.lifeline import tied
    server = [sys.executable, "-c",
              "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"]
    proc = subprocess.Popen(tied(server), start_new_session=True)
    print(proc.pid, flush=True)
    time.sleep(300)
    """
)

# A command that stops slowly: it must finish its stop however many signals come meanwhile.
STOPPER = textwrap.dedent(
    """
    import sys, time
    from core.lifeline import StopSignals
    signals = StopSignals(note=lambda s: print("ignored", s, flush=True)).install()
    def stop():
        print("stopping", flush=True)
        time.sleep(3)
        print("stopped", flush=True)
    try:
        print("ready", flush=True)
        time.sleep(300)
    except KeyboardInterrupt:
        pass
    finally:
        signals.stopping(stop)
    """
)


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_a_tied_server_and_its_children_stop_when_the_owner_is_sigkilled():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    group = int(owner.stdout.readline())
    try:
        assert _wait_until(lambda: len(group_members(group)) >= 3, 30)  # guard, server, sleep
        owner.kill()
        owner.wait()
        assert _wait_until(lambda: not group_members(group), 30), group_members(group)
    finally:
        if group_members(group):
            os.killpg(group, signal.SIGKILL)


def test_signals_during_a_stop_are_ignored_and_the_stop_completes():
    proc = subprocess.Popen([sys.executable, "-c", STOPPER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "stopping"
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out.splitlines()[-1] == "stopped"
    assert "ignored" in out  # two signals of one kind sent back to back may arrive as one
