"""Reading what lands: batch identity, parsing parquet/CSV, and the quarantine.

Pure functions over paths; the Dagster sensor and assets call them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from core.storage import (
    copy_atomic,
    is_remote,
    sha256_file,
    uri,
    write_json_atomic,
    write_parquet_atomic,
)
from quality.schema import dataset_of, datasets, schema

LANDING_SUFFIXES = (".parquet", ".csv")
# Letters, digits, dot, dash, underscore: no separators, no traversal, no control characters.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class UnreadableBatch(Exception):
    """A landed file that cannot be parsed at all (corrupt, empty, wrong format)."""


@dataclass(frozen=True)
class LandedFile:
    path: Path
    dataset: str | None
    batch_id: str
    size: int
    mtime_ns: int
    problem: str | None  # why it cannot be ingested before even reading it


def batch_id_of(path: Path, st: os.stat_result | None = None) -> str:
    """A landed file's batch id, from its name and metadata only (one ``lstat``, no read).

    The same file keeps its id from tick to tick; a file written again (another inode, size or
    modification time) is a new batch. Identical bytes landed twice are recognised when the
    ingest run hashes them (``content_id``), never by the sensor, which reads no file body.
    A symbolic link gets an id from its own metadata, never from what it points at.
    """
    path = Path(path)
    st = st or path.lstat()
    key = f"{path.name}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def content_id(path: Path) -> str:
    """Hash of a landed file's bytes: identical files get the same one (read in chunks)."""
    return sha256_file(path)


def scan_landing(landing: Path, max_bytes: int | None = None) -> list[LandedFile]:
    """Every file in the landing folder, oldest first, from ``lstat`` alone; hidden and
    temporary files are skipped. A file over ``max_bytes`` is flagged, never opened.

    The simulator and well-behaved producers write to a hidden temporary name and rename; a
    file written in place (scp, SFTP) is visible while it grows, which the caller handles by
    waiting until its size and modification time settle.
    """
    if not landing.is_dir():
        return []
    found = []
    with os.scandir(landing) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(".tmp"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # taken away between listing and stat
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue
            path = Path(entry.path)
            problem = _refusal(path, st, max_bytes)
            found.append(
                LandedFile(
                    path,
                    dataset_of(path.name),
                    batch_id_of(path, st),
                    st.st_size,
                    st.st_mtime_ns,
                    problem,
                )
            )
    found.sort(key=lambda f: (f.mtime_ns, f.path.name))
    return found


def _refusal(path: Path, st: os.stat_result, max_bytes: int | None) -> str | None:
    """Why a file is refused before reading it, or None."""
    if stat.S_ISLNK(st.st_mode):  # could point anywhere: land the file itself
        return f"symbolic link {path.name!r} refused: land the file, not a link"
    if not _SAFE_NAME.match(path.name):
        return f"unsafe file name {path.name!r}"
    if path.suffix.lower() not in LANDING_SUFFIXES:
        return f"unsupported file type {path.suffix!r}: expected one of {LANDING_SUFFIXES}"
    if dataset_of(path.name) is None:
        return (
            f"unknown dataset for {path.name!r}: expected '<dataset>-<anything>.parquet' "
            f"with a dataset of the use case ({', '.join(datasets())})"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        return (
            f"file too large: {st.st_size} bytes, over the {max_bytes}-byte limit "
            "(LOOPLINE_MAX_LANDING_BYTES); split it into smaller batches"
        )
    return None


def read_batch(path: Path, dataset: str) -> pl.DataFrame:
    """Parse a landed parquet or CSV file; raises UnreadableBatch with the reason.

    CSV columns named in the dataset's schema are cast strictly to their declared type; a
    column that does not cast stays text, so the contract reports it as a type error rather
    than it silently becoming nulls.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise UnreadableBatch("empty file (0 bytes)")
    try:
        if path.suffix.lower() == ".csv":
            df = pl.read_csv(path, infer_schema=False)
            df = _cast_known(df, schema(dataset))
        else:
            df = pl.read_parquet(path)
    except UnreadableBatch:
        raise
    except Exception as exc:  # polars raises several error types for malformed files
        raise UnreadableBatch(f"cannot read {path.suffix.lstrip('.')} file: {exc}") from exc
    if df.height == 0:
        raise UnreadableBatch("no rows")
    return df


def _cast_known(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    casts = []
    for name, dtype in schema.items():
        if name not in df.columns:
            continue
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            expr = col.str.to_datetime(time_zone="UTC", strict=True)
        elif isinstance(dtype, pl.Boolean):
            expr = col.str.to_lowercase().replace_strict(
                {"true": True, "false": False, "1": True, "0": False}, return_dtype=pl.Boolean
            )
        else:
            expr = col.cast(dtype, strict=True)
        try:
            casts.append(df.select(expr.alias(name)).to_series())
        except Exception:
            continue  # leave as text: the contract's type check names the column
    return df.with_columns(casts) if casts else df


def quarantine(
    dest_dir: Path,
    *,
    batch_id: str,
    dataset: str | None,
    source: Path | None,
    reasons: list[str],
    move: bool = False,
) -> Path:
    """Keep the offending file and a reason.json beside it; nothing is deleted.

    ``move`` renames the file in (a landed file refused unread: a rename reads nothing, however
    large the file); otherwise it is copied (a stored batch, possibly on object storage). A
    symbolic link is recorded, never followed, and removed when moved. ``source`` None: the
    file is gone, and only the reasons are kept.
    """
    dest_dir = Path(dest_dir) / (dataset or "unknown") / batch_id
    source = source if source is None or is_remote(source) else Path(source)
    link = None if source is None or is_remote(source) else _link_target(source)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if link is not None and move:
        source.unlink()
    elif link is None and source is not None:
        if move:
            shutil.move(source, dest_dir / source.name)
        else:
            copy_atomic(source, dest_dir / source.name)
    write_json_atomic(
        {
            "batch_id": batch_id,
            "dataset": dataset,
            "source": None if source is None else uri(source),
            "link_target": link,
            "reasons": reasons,
            "quarantined_at": datetime.now(UTC).isoformat(),
        },
        dest_dir / "reason.json",
    )
    return dest_dir


def _link_target(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


def store_batch(df: pl.DataFrame, path: Path) -> Path:
    """Keep a batch as an immutable parquet file (temporary name, then rename)."""
    return write_parquet_atomic(df, path)
