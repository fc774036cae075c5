"""Atomic file writes: a crash never leaves half a file under its final name.

Every file of record in Loopline (batches, feature files, profiles, artifacts) is written to a
hidden temporary name in the destination directory, flushed to disk, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

_HASH_CHUNK = 1 << 20


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> Path:
    """Write ``df`` as parquet at ``path`` via a temporary file and a rename."""
    return _atomic(path, lambda tmp: df.write_parquet(tmp, compression="zstd", statistics=True))


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    """Write ``data`` at ``path`` via a temporary file and a rename."""
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON at ``path`` via a temporary file and a rename."""
    return write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), path)


def copy_atomic(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` so that ``dest`` is either absent or complete."""
    return write_bytes_atomic(Path(src).read_bytes(), dest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (batch ids and artifact checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
