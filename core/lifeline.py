"""Process lifetimes: servers that die with the command that started them, and signals that
stop a command once.

``tied(command)`` wraps a server's command line in a small guard (this file, run as a script)
that starts the server in the guard's own process group and watches the process that started
it. When that process is gone (it exited, crashed or was SIGKILLed) the guard sends SIGTERM to
its group, then SIGKILL to what is left after a grace period, and exits: no server outlives
the command that owns it. Polling the parent pid (reparented to init or a subreaper when it
dies) is portable and needs no kernel feature; Linux's PR_SET_PDEATHSIG alone would reach only
the direct child (TorchServe's Java frontend is a grandchild) and fires when the starting
thread, not the process, ends.

The guard never forwards signals: the process that owns it stops it by signalling the group
(``os.killpg``), which reaches the server and the guard at once; the guard then waits for its
group to empty, so a caller waiting on the guard knows the ports are free when it exits.

``StopSignals`` makes stopping idempotent: the first SIGINT or SIGTERM interrupts the main
thread (``KeyboardInterrupt``), every later one while stopping is noted and ignored, so a
supervisor's repeated SIGTERM or a make forwarding the group's signal never cuts a stop short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import psutil

GRACE_S = 30.0
_POLL_S = 0.5
_STOP = (signal.SIGINT, signal.SIGTERM)


def tied(command: Sequence[str]) -> list[str]:
    """``command`` run under a guard that stops its process group once this process is gone.
    Start the result with ``start_new_session=True``: the guard leads the server's group."""
    return [sys.executable, os.path.abspath(__file__), str(os.getpid()), "--", *command]


def group_members(pgid: int, exclude: int | None = None) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, but ``exclude``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == exclude:
            continue
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def empty_group(pgid: int, grace_s: float, exclude: int | None = None, reap=None) -> bool:
    """Wait up to ``grace_s`` for group ``pgid`` to have no live member but ``exclude``;
    SIGKILL what is left then. ``reap`` is called while waiting (to reap a zombie child).
    True when the group emptied within the grace."""
    deadline = time.monotonic() + grace_s
    while True:
        if reap is not None:
            reap()
        left = group_members(pgid, exclude)
        if not left:
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    return False


def guard(parent: int, command: Sequence[str], grace_s: float = GRACE_S) -> int:
    """Run ``command`` until it exits or ``parent`` is gone; then empty the group. Returns the
    command's exit code (or 128 + SIGTERM when the guard stopped it)."""
    me = os.getpid()
    if os.getpgid(0) != me:  # never signal the caller's group
        os.setsid()
    for sig in _STOP:  # the group's signal reached the server too: wait for it to stop
        signal.signal(sig, lambda *_: None)
    if os.getppid() != parent:  # the owner died before the guard started
        return 128 + signal.SIGTERM
    child = subprocess.Popen(list(command))
    while child.poll() is None and os.getppid() == parent:
        time.sleep(_POLL_S)
    if child.poll() is None:
        os.killpg(os.getpgid(me), signal.SIGTERM)
    empty_group(os.getpgid(me), grace_s, exclude=me, reap=child.poll)
    return child.wait()


class StopSignals:
    """SIGINT and SIGTERM stop the command once (see the module's docstring): ``install`` (or
    ``with``) before starting anything; ``stopping(stop)`` runs the stop with later signals
    ignored. Off the main thread (where handlers cannot be set) it installs nothing."""

    def __init__(self, note: Callable[[int], None] | None = None) -> None:
        self.note = note
        self.signalled: list[int] = []
        self._absorb = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signalled.append(signum)
        if self._absorb:
            if self.note is not None:
                self.note(signum)
            return
        self._absorb = True
        raise KeyboardInterrupt

    def install(self) -> StopSignals:
        if not self._previous and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in _STOP}
        return self

    def restore(self) -> None:
        """The handlers from before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def stopping(self, stop: Callable[[], None]) -> None:
        """Run ``stop`` (idempotent) to its end: signals from now on are ignored; one that
        arrived just before, and interrupted it, makes it run again."""
        self._absorb = True
        try:
            stop()
        except KeyboardInterrupt:
            stop()


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python core/lifeline.py <parent pid> -- <command...>")
    sys.exit(guard(int(sys.argv[1]), sys.argv[3:]))
