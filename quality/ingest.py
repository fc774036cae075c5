"""Reading what lands: batch identity, parsing parquet/CSV, and the quarantine.

Pure functions over paths; the Dagster sensor and assets call them.
"""

from __future__ import annotations

import hashlib
import os
import re
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
    problem: str | None  # why it cannot be ingested before even reading it


def batch_id_of(path: Path) -> str:
    """Content-derived batch id: the same bytes landed twice get the same id.

    A symbolic link gets an id from its name and target, never from what it points at.
    """
    path = Path(path)
    if path.is_symlink():
        link = f"symlink:{path.name}:{os.readlink(path)}".encode()
        return hashlib.sha256(link).hexdigest()[:16]
    return sha256_file(path)[:16]


def scan_landing(landing: Path, limit: int = 100) -> list[LandedFile]:
    """Files ready in the landing folder, oldest first; hidden/temporary files are skipped.

    The simulator and well-behaved producers write to a hidden temporary name and rename, so a
    half-written file is never visible here.
    """
    if not landing.is_dir():
        return []
    entries = [
        p
        for p in landing.iterdir()
        if (p.is_file() or p.is_symlink())
        and not p.name.startswith(".")
        and not p.name.endswith(".tmp")
    ]
    entries.sort(key=lambda p: (p.lstat().st_mtime_ns, p.name))
    found = []
    for p in entries[:limit]:
        problem = None
        dataset = dataset_of(p.name)
        if p.is_symlink():  # could point anywhere: land the file itself
            problem = f"symbolic link {p.name!r} refused: land the file, not a link"
        elif not _SAFE_NAME.match(p.name):
            problem = f"unsafe file name {p.name!r}"
        elif p.suffix.lower() not in LANDING_SUFFIXES:
            problem = f"unsupported file type {p.suffix!r}: expected one of {LANDING_SUFFIXES}"
        elif dataset is None:
            problem = (
                f"unknown dataset for {p.name!r}: expected '<dataset>-<anything>.parquet' "
                f"with a dataset of the use case ({', '.join(datasets())})"
            )
        found.append(LandedFile(p, dataset, batch_id_of(p), problem))
    return found


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
    dest_dir: Path, *, batch_id: str, dataset: str | None, source: Path, reasons: list[str]
) -> Path:
    """Keep the offending file and a reason.json beside it; nothing is deleted."""
    dest_dir = Path(dest_dir) / (dataset or "unknown") / batch_id
    source = source if is_remote(source) else Path(source)
    link = None if is_remote(source) or not source.is_symlink() else os.readlink(source)
    if link is None:  # a link's target is never read or copied
        copy_atomic(source, dest_dir / source.name)
    write_json_atomic(
        {
            "batch_id": batch_id,
            "dataset": dataset,
            "source": uri(source),
            "link_target": link,
            "reasons": reasons,
            "quarantined_at": datetime.now(UTC).isoformat(),
        },
        dest_dir / "reason.json",
    )
    return dest_dir


def store_batch(df: pl.DataFrame, path: Path) -> Path:
    """Keep a batch as an immutable parquet file (temporary name, then rename)."""
    return write_parquet_atomic(df, path)
