"""Where data files live, and atomic writes: a crash never leaves half a file under its name.

Batch and feature files live under a *lake root*: a local folder (the default, the Loopline
home) or any fsspec URI (``s3://bucket/prefix``, ``gs://...``), as a ``pathlib.Path`` or a
``upath.UPath`` with the same methods, so the code that reads and writes them is the same.
Polars reads the URIs itself; DuckDB reads them through the fsspec filesystem registered on its
connection (``register_filesystems``), not through its ``httpfs`` extension, which it would
download at run time. Credentials and endpoints come from the usual variables of the
filesystem's library (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), read by s3fs and Polars.

Every local file of record (batches, feature files, profiles, artifacts) is written to a hidden
temporary name in the destination directory, flushed to disk, then renamed into place. On object
storage a single PUT is already atomic: the file is rendered in memory and put in one request.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import polars as pl
from upath import UPath

_HASH_CHUNK = 1 << 20
_LOCAL_PROTOCOLS = ("", "file", "local")


def data_root(location: str | os.PathLike[str]) -> Path:
    """A lake root: a resolved local ``Path`` for a plain path or ``file://`` URI, a ``UPath``
    for any other fsspec URI (``s3://bucket/prefix``)."""
    if isinstance(location, UPath) and is_remote(location):
        return location
    text = os.fspath(location)
    parts = urlsplit(text)
    if parts.scheme in ("", "file") or len(parts.scheme) == 1:  # C:\ is a path, not a scheme
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"{text}: a file:// URI must name a local path")
            text = unquote(parts.path)
        return Path(text).expanduser().resolve()
    if not parts.netloc:
        raise ValueError(f"{text}: an object-storage URI needs a bucket (s3://bucket/prefix)")
    return UPath(text.rstrip("/"))


def is_remote(path: Any) -> bool:
    """Whether ``path`` lives on an fsspec filesystem other than the local disk."""
    return isinstance(path, UPath) and path.protocol not in _LOCAL_PROTOCOLS


def uri(path: str | os.PathLike[str]) -> str:
    """The spelling Polars reads: a local path, or the object's URI."""
    return str(path) if isinstance(path, UPath) else os.fspath(path)


def duckdb_uri(path: str | os.PathLike[str]) -> str:
    """The spelling DuckDB (and Feast's DuckDB offline store) reads through fsspec.

    ``s3://`` is spelt ``s3a://`` (s3fs answers to both): given an ``s3://`` path, DuckDB and
    ibis load the ``httpfs`` extension, a download this machine cannot make, instead of asking
    the fsspec filesystem registered on the connection.
    """
    text = uri(path)
    return "s3a://" + text.removeprefix("s3://") if text.startswith("s3://") else text


def remote_paths(paths: Iterable[str]) -> list[str]:
    """The paths of ``paths`` on object storage (as ``data_root`` reads them)."""
    return [path for path in paths if is_remote(data_root(path))]


def register_filesystems(con: Any, paths: Iterable[str]) -> None:
    """Register on a DuckDB connection (or ibis's DuckDB backend) the fsspec filesystem of
    every remote path in ``paths``; local paths need none."""
    import fsspec

    raw = getattr(con, "con", con)  # ibis's backend wraps the DuckDB connection
    for path in remote_paths(paths):
        fs = fsspec.filesystem(data_root(path).protocol)
        name = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if name not in raw.list_filesystems():
            raw.register_filesystem(fs)


def _atomic(path: Path, write: Callable[[Any], None]) -> Path:
    if is_remote(path):
        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return path
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
    if is_remote(path):
        path.write_bytes(data)
        return path
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON at ``path`` via a temporary file and a rename."""
    return write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), path)


def copy_atomic(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` so that ``dest`` is either absent or complete."""
    return write_bytes_atomic(src.read_bytes() if is_remote(src) else Path(src).read_bytes(), dest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (batch ids and artifact checksums)."""
    digest = hashlib.sha256()
    with path.open("rb") if is_remote(path) else open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
