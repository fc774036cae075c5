"""Feature files per validated batch, and the online store kept in step with them.

Each validated batch gets one file per feature view it can change, ``features/<view>/<batch>.parquet``
(a view declares the datasets that change it: ``features.views.View``). A file holds only the
rows the batch adds or changes (the view's ``compute``), and its presence
is the record that the batch is done, so a failed or interrupted run is simply resumed. The
online store loads the rows of files it has not loaded yet; a manifest of loaded files tells
which, so late rows (recomputed with event times before the last load) are not skipped.

The manifest can be wrong about the store: Redis restarted without persistence, a SQLite file
restored from an old copy. ``online_gaps`` checks a sample of the entities the newest loaded
files hold against the store; when some are missing, ``sync_online(reload=True)`` loads every
file again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from feast import FeatureStore

from core.storage import data_root, uri, write_json_atomic
from features.store import materialize, online_missing
from features.views import TS, ViewBatch, read_validated, views, write_feature_file
from quality.schema import schema

MANIFEST = Path("feast") / "online_manifest.json"


@dataclass(frozen=True)
class Batch:
    """A validated batch: its dataset and id (the one the ledger knows it by)."""

    dataset: str
    batch_id: str


@dataclass(frozen=True)
class OnlineSync:
    """What one online load did: files and rows read, interval loaded per view."""

    files: int
    rows: int
    loaded: dict[str, tuple[datetime, datetime]]
    changed_since: datetime | None


def feature_dir(lake: Path, view: str) -> Path:
    """``<lake>/features/<view>``; the lake is the home unless ``LOOPLINE_LAKE`` names another
    root (a folder or an object-storage URI)."""
    return data_root(lake) / "features" / view


def pending(lake: Path, view: str, batches: Sequence[Batch]) -> list[Batch]:
    """The batches, in the given (arrival) order, that change ``view`` and have no file yet."""
    folder = feature_dir(lake, view)
    changes = views()[view].datasets
    return [
        b
        for b in batches
        if b.dataset in changes and not (folder / f"{b.batch_id}.parquet").exists()
    ]


def _validated(lake: Path, batch: Batch) -> pl.DataFrame:
    path = data_root(lake) / "validated" / batch.dataset / f"{batch.batch_id}.parquet"
    columns = schema(batch.dataset)
    return pl.read_parquet(uri(path)).select([pl.col(c).cast(t) for c, t in columns.items()])


def batch_rows(
    lake: Path,
    view: str,
    batch: Batch,
    *,
    created_at: datetime,
    not_yet: Sequence[str] = (),
) -> pl.DataFrame:
    """The rows of ``view`` that ``batch`` adds or changes, from the history it needs only.

    ``not_yet``: validated batches still waiting for this view; they are left out of the
    history, so each batch is computed as if it were the newest (their turn comes next).
    """
    declared = views()[view]
    if batch.dataset not in declared.datasets:
        raise ValueError(f"{batch.dataset} batches do not change {view}")
    excluded = list(not_yet)

    def read(dataset: str, since: datetime | None = None, *, with_batch: bool = False):
        leave_out = excluded if with_batch else [batch.batch_id, *excluded]
        return read_validated(lake, dataset, since=since, exclude_batches=leave_out)

    return declared.compute(ViewBatch(batch.dataset, _validated(lake, batch), created_at, read))


def update_view(
    lake: Path, view: str, batch: Batch, *, not_yet: Sequence[str] = ()
) -> tuple[Path, int]:
    """Compute and write ``batch``'s file of ``view`` (empty when the batch changes nothing);
    return the file and its row count."""
    rows = batch_rows(lake, view, batch, created_at=datetime.now(UTC), not_yet=not_yet)
    return write_feature_file(lake, view, batch.batch_id, rows), rows.height


def _files(lake: Path) -> dict[str, tuple[int, int]]:
    """Every feature file, by its name under the lake (``features/<view>/<batch>.parquet``):
    size and modification time (whole seconds on object storage)."""
    out = {}
    for view in views():
        for path in sorted(feature_dir(lake, view).glob("*.parquet")):
            stat = path.stat()
            out[f"features/{view}/{path.name}"] = (stat.st_size, stat.st_mtime_ns)
    return out


def view_version(lake: Path, view: str) -> str:
    """A fingerprint of a view's files (names, sizes, modification times)."""
    digest = hashlib.sha256()
    prefix = f"features/{view}/"
    for name, stat in _files(lake).items():
        if name.startswith(prefix):
            digest.update(f"{name}|{stat[0]}|{stat[1]}\n".encode())
    return digest.hexdigest()[:16]


def _loaded(home: Path) -> dict[str, tuple[int, int]]:
    path = Path(home) / MANIFEST
    if not path.exists():
        return {}
    return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}


def unloaded_files(home: Path, lake: Path | None = None) -> list[str]:
    """Feature files (relative to the lake) written or rewritten since the last online load."""
    loaded = _loaded(home)
    return [name for name, stat in _files(lake or home).items() if loaded.get(name) != stat]


@dataclass(frozen=True)
class OnlineGaps:
    """Entities probed per view and how many of them the online store lacks."""

    probed: dict[str, int]
    missing: dict[str, int]

    @property
    def healthy(self) -> bool:
        return not any(self.missing.values())

    def describe(self) -> str:
        return ", ".join(f"{v}: {self.missing[v]}/{n} missing" for v, n in self.probed.items())


def probe_keys(
    home: Path, lake: Path | None = None, *, per_view: int = 32, newest_files: int = 8
) -> dict[str, list]:
    """Entity keys the online store must hold: up to ``per_view`` keys of each view's newest
    loaded feature files (the manifest's), which the last loads wrote."""
    loaded, root = _loaded(home), data_root(lake or home)
    out: dict[str, list] = {}
    for name, view in views().items():
        prefix = f"features/{name}/"
        files = sorted((n for n in loaded if n.startswith(prefix)), key=lambda n: -loaded[n][1])
        keys: list = []
        for file in files[:newest_files]:
            if not (root / file).exists():
                continue
            column = pl.read_parquet(uri(root / file), columns=[view.key])[view.key]
            keys += [k for k in column.unique(maintain_order=True).to_list() if k not in keys]
            if len(keys) >= per_view:
                break
        if keys:
            out[name] = keys[:per_view]
    return out


def online_gaps(store: FeatureStore, home: Path, lake: Path | None = None) -> OnlineGaps:
    """Whether the online store holds the entities the manifest says were loaded. Nothing is
    probed once the last load is older than the store's key TTL: those keys expired."""
    manifest = Path(home) / MANIFEST
    key_ttl = getattr(store.config.online_store, "key_ttl_seconds", None)
    if key_ttl and manifest.exists() and time.time() - manifest.stat().st_mtime > key_ttl:
        return OnlineGaps(probed={}, missing={})
    keys = probe_keys(home, lake)
    if not keys:
        return OnlineGaps(probed={}, missing={})
    return OnlineGaps(
        probed={v: len(k) for v, k in keys.items()}, missing=online_missing(store, keys)
    )


def sync_online(
    store: FeatureStore,
    home: Path,
    *,
    lake: Path | None = None,
    end: datetime | None = None,
    reload: bool = False,
) -> OnlineSync:
    """Load every feature row not yet in the online store, then record the files as loaded.

    The feature files are under ``lake`` (default: the home), the manifest of loaded files in
    the home, beside the online store it describes. ``end`` defaults to now, or just after the
    newest row if that is later; rows of the new files older than a view's last load are
    reloaded from the oldest of them (``changed_since``). ``reload``: load every file again
    (the store lost rows the manifest says it has).
    """
    home = Path(home)
    root = data_root(lake or home)
    files = _files(root)
    loaded = {} if reload else _loaded(home)
    new = [root / name for name, stat in files.items() if loaded.get(name) != stat]
    if not new:
        return OnlineSync(files=0, rows=0, loaded={}, changed_since=None)
    by_view: dict[str, list[Path]] = {}
    for path in new:
        by_view.setdefault(path.parent.name, []).append(path)
    rows, lo, hi = (
        pl.concat(
            pl.scan_parquet([uri(p) for p in paths]).select(
                pl.len().alias("rows"), pl.col(TS).min().alias("lo"), pl.col(TS).max().alias("hi")
            )
            for paths in by_view.values()
        )
        .select(pl.col("rows").sum(), pl.col("lo").min(), pl.col("hi").max())
        .collect()
        .row(0)
    )
    now = datetime.now(UTC)
    end = end or (now if hi is None or hi < now else hi + timedelta(microseconds=1))
    intervals = materialize(store, end, changed_since=lo) if rows else {}
    write_json_atomic({k: list(v) for k, v in files.items()}, home / MANIFEST)
    return OnlineSync(files=len(new), rows=rows, loaded=intervals, changed_since=lo)
