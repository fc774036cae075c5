"""Event-time spans of immutable parquet files: a window of event time reads only the files
that overlap it, so monitoring costs what its windows hold, not what all history holds.

Monitoring judges windows of event time (the newest day of traffic, a label-mature week) over
files that pile up in the order they were written. Each file's span (its first and last event
time, its rows, and what ``describe`` adds) is computed once, from the columns it needs, and
kept in a JSON index (rewritten atomically). A file is known by its name and size: one
rewritten under its name is described again, one deleted (by retention, or merged) drops out
of the index. Rows without an event time belong to no window; a file holding only
such rows has no span (``start``/``end`` None).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from core.storage import uri, write_json_atomic
from quality.schema import UTC_TS


@dataclass(frozen=True)
class Span:
    """One file's event-time span (``start``, ``end``: None when no row has a time)."""

    path: Path
    size: int
    rows: int
    start: datetime | None
    end: datetime | None
    facts: dict[str, Any] = field(default_factory=dict)


def spans(
    folder: Path,
    pattern: str,
    time_column: str,
    index_path: Path,
    describe: Callable[[pl.LazyFrame], dict[str, Any]] | None = None,
) -> list[Span]:
    """The span of every file of ``folder`` matching ``pattern``, in name order; a file not in
    the index yet (or changed) is read once, ``time_column`` only (and what ``describe``
    selects from its lazy frame), and the index is rewritten."""
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    known: dict[str, Any] = {}
    out = []
    for path in sorted(folder.glob(pattern), key=lambda p: p.name):
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # deleted since the listing (retention): not there
            continue
        entry = index.get(path.name)
        if entry is None or entry["size"] != size:
            entry = {"size": size, **_describe(path, time_column, describe)}
        known[path.name] = entry
        out.append(
            Span(
                path,
                size,
                entry["rows"],
                _time(entry["start"]),
                _time(entry["end"]),
                entry["facts"],
            )
        )
    if known != index:
        write_json_atomic(known, index_path)
    return out


def _describe(
    path: Path, time_column: str, describe: Callable[[pl.LazyFrame], dict[str, Any]] | None
) -> dict[str, Any]:
    frame = pl.scan_parquet(uri(path))
    if time_column in frame.collect_schema().names():
        t = pl.col(time_column).cast(UTC_TS)  # naive times read as UTC, as the lake's readers do
        bounds = frame.select(t.min().alias("start"), t.max().alias("end"), pl.len().alias("rows"))
    else:
        bounds = frame.select(
            pl.lit(None).alias("start"), pl.lit(None).alias("end"), pl.len().alias("rows")
        )
    row = bounds.collect().row(0, named=True)
    return {
        "rows": int(row["rows"]),
        "start": _iso(row["start"]),
        "end": _iso(row["end"]),
        "facts": describe(frame) if describe else {},
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None


def since(all_spans: Iterable[Span], start: datetime | None) -> list[Span]:
    """The files that may hold a row with event time at or after ``start`` (all if None)."""
    if start is None:
        return list(all_spans)
    return [s for s in all_spans if s.end is not None and s.end >= start]


def newest_first(all_spans: Iterable[Span]) -> list[Span]:
    """The files with a span, latest ``end`` first: the order to read the newest rows in."""
    return sorted((s for s in all_spans if s.end is not None), key=lambda s: s.end, reverse=True)


def in_name_order(chosen: Sequence[Span]) -> list[Span]:
    """``chosen`` in the order a full read of the folder meets them (file name order)."""
    return sorted(chosen, key=lambda s: s.path.name)
