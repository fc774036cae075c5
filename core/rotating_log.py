"""Size-rotated logs of child processes (``dagster dev``, TorchServe) that write to an inherited fd.

A child writes its output straight into a file opened in append mode (``O_APPEND``); a watcher
thread in the supervising process (``LogRotator``) checks the file's size every few seconds and,
past ``max_bytes``, copies it to ``<name>.1`` (shifting ``.1`` to ``.2``, ..., dropping the
oldest past ``backups``) and truncates it in place: logrotate's ``copytruncate``. With
``O_APPEND`` every write lands at the new end, so the child carries on at offset 0.

Why not a pipe read by a thread: a slow or stuck reader fills the pipe and then blocks the
child's writes, stalling Dagster or TorchServe; here the child never waits on anyone. The price:
the file may overshoot ``max_bytes`` by what is written between two checks, and lines written
between the copy and the truncation (microseconds) are lost. Disk use stays within about
``(backups + 1) * max_bytes``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def backup_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate(path: Path, max_bytes: int, backups: int) -> bool:
    """Copy-truncate ``path`` if it holds more than ``max_bytes``; True when it did."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    for n in range(backups, 1, -1):
        older = backup_path(path, n - 1)
        if older.exists():
            os.replace(older, backup_path(path, n))
    first = backup_path(path, 1)
    tmp = first.with_name(f".{first.name}.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dest:
            shutil.copyfileobj(src, dest, 1 << 20)
        os.replace(tmp, first)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise  # nothing truncated: the log is whole, the next check tries again
    os.truncate(path, 0)  # right after the copy: the window for lost lines stays tiny
    return True


def open_append(path: Path) -> int:
    """An ``O_APPEND`` fd for a child's stdout/stderr: the condition for copy-truncate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


class LogRotator:
    """Rotates ``path`` every ``interval_s`` while ``alive()`` (e.g. the child is running) and
    until ``stop()``; a daemon thread, so it never holds the supervisor up at exit. A rotation
    that fails (a full disk) is counted in ``failures`` and retried at the next check: the
    child's writes go on either way."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        *,
        interval_s: float = 5.0,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        if max_bytes < 1 or backups < 1:
            raise ValueError("max_bytes and backups must be >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.interval_s = interval_s
        self.alive = alive
        self.rotations = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rotate-{path.name}", daemon=True)

    def start(self) -> LogRotator:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> bool:
        """One check (what the thread does every ``interval_s``)."""
        try:
            done = rotate(self.path, self.max_bytes, self.backups)
        except OSError as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("rotating %s failed (%d so far): %s", self.path, self.failures, exc)
            return False
        self.rotations += done
        return done

    def _run(self) -> None:
        while self.alive() and not self._stop.wait(self.interval_s):
            self.check()
        self.check()
