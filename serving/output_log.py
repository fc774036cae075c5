"""A process's output copied from a pipe into a size-rotated file: ``torchserve.out``.

TorchServe's stdout and stderr (the Java frontend's console log, the launcher's messages) would
grow one file forever. ``serving.process`` points them at a pipe read by this small process
instead (``python -m serving.output_log <file> <max_bytes> <backups>``): it appends what it
reads and, past ``max_bytes``, renames the file to ``<file>.1`` (``.1`` to ``.2`` and so on,
the oldest beyond ``backups`` deleted) and starts a new one. So the output never takes more than
about ``(backups + 1) * max_bytes``. It runs in its own session, untouched by signals meant for
TorchServe or a terminal, and exits when every writer has closed the pipe (TorchServe ended).

Standard library only: it starts with every TorchServe and should cost nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

_CHUNK = 64 << 10


def copy_rotating(fd: int, path: Path, max_bytes: int, backups: int) -> None:
    """Copies ``fd`` until end of file into ``path``, rotating past ``max_bytes``; each read
    is written whole, so a file holds at most ``max_bytes`` plus one read (64 KiB). While the
    disk fails, what is read is dropped (TorchServe must never block on its output) and the
    file is opened again with the next read."""
    out: BinaryIO | None = None
    while chunk := os.read(fd, _CHUNK):
        try:
            out = out or open(path, "ab")  # noqa: SIM115 (reopened at each rotation)
            out.write(chunk)
            out.flush()
            if out.tell() >= max_bytes:
                out = _closed(out)
                rotate(path, backups)
                out = open(path, "ab")  # noqa: SIM115
        except OSError:
            out = _closed(out)
    _closed(out)


def _closed(out: BinaryIO | None) -> None:
    if out is not None:
        with contextlib.suppress(OSError):  # the disk already failed: nothing left to keep
            out.close()


def rotate(path: Path, backups: int) -> None:
    """``path`` becomes ``path.1``, each ``path.N`` becomes ``path.N+1``; what would be
    beyond ``backups`` is deleted (with 0 backups the file itself is)."""
    if backups < 1:
        path.unlink(missing_ok=True)
        return
    Path(f"{path}.{backups}").unlink(missing_ok=True)
    for n in range(backups - 1, 0, -1):
        older = Path(f"{path}.{n}")
        if older.exists():
            os.replace(older, f"{path}.{n + 1}")
    os.replace(path, f"{path}.1")


def start_copier(path: Path, max_bytes: int, backups: int) -> tuple[subprocess.Popen[bytes], int]:
    """Starts the copier for ``path``; returns it and the pipe's write end, which the caller
    hands to the process whose output it is and then closes."""
    read_end, write_end = os.pipe()
    try:
        copier = subprocess.Popen(
            [sys.executable, "-m", __name__, str(path), str(max_bytes), str(backups)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return copier, write_end


def bytes_on_disk(path: Path) -> int:
    """The bytes the output takes, backups included."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())


if __name__ == "__main__":
    target, limit, kept = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    copy_rotating(sys.stdin.fileno(), target, limit, kept)
