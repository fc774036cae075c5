"""Retention: which items of a store to delete so it stays within its limits, and nothing else.

A *store* is a set of items (a batch file, a model directory, an archive, a log file), each
with its bytes, a sort time (oldest is deleted first), an optional age and, when something still
needs it, the reason it is protected. ``Limits`` bound a store by age, count or bytes; ``plan``
picks the unprotected items to delete, oldest first: every item older than ``max_age``, then as
many more as it takes to bring the store's count and bytes (protected items included) within
``max_count`` and ``max_bytes``. A store whose protected items alone exceed a limit keeps them
and says so (``over_limit``): protection always wins over a limit.

Pure: the stores' contents and what protects them are worked out elsewhere (``serving/stores``);
``delete`` removes what a plan chose. No other Loopline package is imported here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """A store's bounds; None is no bound. ``max_age`` is in the store's own clock (for batch
    files the data's event time, see ``serving/stores``)."""

    max_age: timedelta | None = None
    max_count: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_count", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.max_age is not None and self.max_age < timedelta(0):
            raise ValueError(f"max_age must be >= 0, got {self.max_age}")

    @classmethod
    def parse(cls, text: str) -> Limits:
        """``days=90,count=20,bytes=2GiB`` (any of the three, comma-separated; ``off``: none).
        Sizes take k, M, G or T (powers of 1024); days may be fractional."""
        text = text.strip()
        if text.lower() in ("", "off", "none"):
            return cls()
        values: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("days", "count", "bytes") or key in values:
                raise ValueError(
                    f"retention limits {text!r}: expected days=N, count=N and/or bytes=SIZE, "
                    "comma-separated, each once (or 'off')"
                )
            values[key] = value.strip()
        try:
            return cls(
                max_age=timedelta(days=float(values["days"])) if "days" in values else None,
                max_count=int(values["count"]) if "count" in values else None,
                max_bytes=parse_size(values["bytes"]) if "bytes" in values else None,
            )
        except ValueError as exc:
            raise ValueError(f"retention limits {text!r}: {exc}") from None

    def describe(self) -> str:
        parts = []
        if self.max_age is not None:
            parts.append(f"days={self.max_age.total_seconds() / 86400:g}")
        if self.max_count is not None:
            parts.append(f"count={self.max_count}")
        if self.max_bytes is not None:
            parts.append(f"bytes={format_size(self.max_bytes)}")
        return ",".join(parts) or "off"


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``64k``, ``2GiB``, ``1.5G`` (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "k"):
        if n >= _UNITS[unit.lower()] and n % _UNITS[unit.lower()] == 0:
            return f"{n // _UNITS[unit.lower()]}{unit}"
    return str(n)


@dataclass(frozen=True)
class Item:
    """One deletable unit of a store: its paths (deleted together), bytes, the time it sorts
    by, its age where its store has a clock, the batch it belongs to (for the ledger's
    tombstone) and why it must stay (None: it may go)."""

    name: str
    paths: tuple[Path, ...]
    bytes: int
    time: datetime
    age: timedelta | None = None
    batch_id: str | None = None
    protected: str | None = None


@dataclass(frozen=True)
class Plan:
    """What ``plan`` decided for one store."""

    store: str
    limits: Limits
    delete: list[Item]
    keep: list[Item]

    @property
    def over_limit(self) -> list[str]:
        """The limits the kept items still exceed (only protected items can cause it)."""
        count, size = len(self.keep), sum(i.bytes for i in self.keep)
        over = []
        if self.limits.max_count is not None and count > self.limits.max_count:
            over.append(f"count {count} > {self.limits.max_count}")
        if self.limits.max_bytes is not None and size > self.limits.max_bytes:
            over.append(f"bytes {size} > {self.limits.max_bytes}")
        old = [i for i in self.keep if _too_old(i, self.limits)]
        if old:
            over.append(f"{len(old)} items older than {self.limits.max_age}")
        return over

    def summary(self) -> dict[str, Any]:
        """JSON-safe counts for reports: removed and kept files and bytes, the oldest kept,
        protected items by reason."""
        oldest = min(self.keep, key=lambda i: i.time, default=None)
        reasons: dict[str, int] = {}
        for item in self.keep:
            if item.protected:
                reasons[item.protected] = reasons.get(item.protected, 0) + 1
        return {
            "limits": self.limits.describe(),
            "removed_items": len(self.delete),
            "removed_files": sum(len(i.paths) for i in self.delete),
            "removed_bytes": sum(i.bytes for i in self.delete),
            "kept_items": len(self.keep),
            "kept_bytes": sum(i.bytes for i in self.keep),
            "oldest_kept": oldest.name if oldest else None,
            "oldest_kept_time": oldest.time.isoformat() if oldest else None,
            "protected": reasons,
            "over_limit": self.over_limit,
        }


def _too_old(item: Item, limits: Limits) -> bool:
    return limits.max_age is not None and item.age is not None and item.age > limits.max_age


def plan(store: str, items: Iterable[Item], limits: Limits) -> Plan:
    """The unprotected items to delete, oldest first, so that the store fits ``limits``."""
    ordered = sorted(items, key=lambda i: (i.time, i.name))
    doomed = {i.name for i in ordered if i.protected is None and _too_old(i, limits)}
    count = len(ordered) - len(doomed)
    size = sum(i.bytes for i in ordered if i.name not in doomed)
    for item in ordered:
        over_count = limits.max_count is not None and count > limits.max_count
        over_bytes = limits.max_bytes is not None and size > limits.max_bytes
        if not (over_count or over_bytes):
            break
        if item.protected is None and item.name not in doomed:
            doomed.add(item.name)
            count -= 1
            size -= item.bytes
    return Plan(
        store,
        limits,
        delete=[i for i in ordered if i.name in doomed],
        keep=[i for i in ordered if i.name not in doomed],
    )


def delete(items: Sequence[Item]) -> int:
    """Deletes every path of ``items`` (files and folders; already gone is fine); the bytes
    freed. A path that cannot be deleted raises: retention fails loudly, never half-silently."""
    freed = 0
    for item in items:
        for path in item.paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        freed += item.bytes
    return freed


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when absent)."""
    try:
        if not path.is_dir():
            return path.stat().st_size
    except FileNotFoundError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def limits_from_env(
    env: Mapping[str, str], defaults: Mapping[str, Limits], prefix: str
) -> dict[str, Limits]:
    """Each store's limits: ``<prefix><STORE>`` from ``env`` (``Limits.parse``), else its default."""
    out = {}
    for store, default in defaults.items():
        text = env.get(f"{prefix}{store.upper()}")
        out[store] = Limits.parse(text) if text is not None else default
    return out
