"""The stores of a Loopline home and lake, what each holds, and what must stay in them.

Every store is listed as ``core.retention.Item``s (``list_store``); ``disk_usage`` sums them for
``loopline status``. ``retain`` adds to each item the reason it must stay, lets
``core.retention.plan`` choose what goes, writes the ledger's tombstones and deletes.

What must stay, whatever a store's limits (``Needed``):

- the lineage of the champion, of the versions rollback can reach (the top
  ``rollback_depth`` of the champion stack) and of the challenger: their model directories,
  their ``.mar`` files and the training set each names (the exact rows it was trained on:
  the batch files behind it follow the data window);
- the training window: validated batches (and their feature files) whose newest event lies
  within the use case's ``training_set.window_days`` of the newest event of their dataset;
- reference data (datasets without event time), whose latest state may be in any batch;
- anything unfinished: a batch the ledger has not validated or quarantined (its ingest may
  be retried from the archive), a validated batch whose feature files are not all written, a
  feature file the online store has not loaded, a prediction-log file not yet compacted;
- anything younger than the grace period (a run may be reading it).

Ages of batch files (raw, validated, features, archive) are in *data* time: how far a batch's
newest event lies behind the newest event of its dataset (parquet statistics, no file body is
read). So 90 days keep 90 days of data, whether it arrived over 90 days or, from an accelerated
simulator, in an hour. This module sits in ``serving``, the library layer that may read the
ledger, the registry and the feature files at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.db import exists
from core.retention import Item, Limits, Plan, delete, plan, tree_bytes
from core.settings import RETENTION_DEFAULTS, Settings
from core.storage import is_remote, write_json_atomic
from models.registry import CHALLENGER, CHAMPION, Registry
from quality.ledger import FINAL, BatchLedger, BatchRecord
from quality.schema import time_columns
from serving.config import ServingConfig
from serving.monitoring import MANIFEST, compacted_spans
from serving.prediction_log import closed_files

# Dagster's runs are a store too, kept by orchestration/retention_assets.py (Dagster's API).
STORES = tuple(s for s in RETENTION_DEFAULTS if s != "dagster_runs")
BATCH_STORES = ("raw", "validated", "features", "archive")
# Stores whose deletions leave a tombstone in the ledger (logs and batch scores do not).
RECORDED = (*BATCH_STORES, "quarantine", "models", "mar", "training_sets")
# Each batch's newest event time, read once from its validated file's footer (``data_ages``).
AGES_FILE = "retention_ages.json"


@dataclass(frozen=True)
class Needed:
    """What one retention pass must keep, by reason."""

    model_dirs: dict[Path, str] = field(default_factory=dict)
    mars: dict[str, str] = field(default_factory=dict)
    training_sets: dict[str, str] = field(default_factory=dict)
    records: dict[str, BatchRecord] = field(default_factory=dict)
    window: timedelta | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    grace: timedelta = timedelta(0)


def lineage(registry: Registry, depth: int, config: ServingConfig) -> Needed:
    """The files of the champion, of the ``depth - 1`` champions before it and of the
    challenger: model directories, ``.mar`` files and training sets."""
    aliases = registry.aliases()
    reasons: dict[str, str] = {}
    stack = registry.champion_stack()
    for version in reversed(stack[-depth:]):
        reasons.setdefault(version, "rollback target")
    for alias in (CHALLENGER, CHAMPION):
        if alias in aliases:
            reasons[aliases[alias]] = alias
    needed = Needed()
    for version, reason in reasons.items():
        mv = registry.get(version)
        needed.model_dirs[Path(mv.artifact_dir).resolve()] = f"{reason} {version}"
        needed.mars[config.mar_name(version)] = f"{reason} {version}"
        needed.training_sets[mv.training_set_version] = f"{reason} {version}"
    return needed


def needed(settings: Settings, ledger: BatchLedger, window_days: float | None) -> Needed:
    """Everything ``retain`` must keep for this home: lineage, ledger state, window, grace."""
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    found = (
        lineage(Registry.for_settings(settings), settings.rollback_depth, config)
        if exists(settings.registry_location)
        else Needed()
    )
    return replace(
        found,
        records={r.batch_id: r for r in ledger.batches()},
        window=timedelta(days=window_days) if window_days is not None else None,
        grace=timedelta(minutes=settings.retention_grace_min),
    )


# --- listing -------------------------------------------------------------------------------


def _item(path: Path, name: str, batch_id: str | None = None, *extra: Path) -> Item | None:
    """The item of ``path`` (and ``extra`` paths deleted with it); None if it just vanished
    (the prediction log's writer bounds its folder too)."""
    try:
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return None
    paths = (path, *extra)
    return Item(name, paths, sum(tree_bytes(p) for p in paths), mtime, batch_id=batch_id)


def _present(items) -> list[Item]:
    return [i for i in items if i is not None]


def _visible(folder: Path, pattern: str = "*") -> list[Path]:
    if not folder.exists():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def _batch_files(root: Path) -> list[Item]:
    """``<root>/<dataset>/<batch>.parquet`` (raw, validated) or ``<root>/<view>/...``."""
    return _present(
        _item(path, f"{folder.name}/{path.name}", path.stem)
        for folder in _visible(root)
        for path in _visible(folder, "*.parquet")
    )


def _archive(root: Path) -> list[Item]:
    """``archive/<dataset>/<batch>__<name>`` and ``archive/duplicates/<batch>__<name>``."""
    return _present(
        _item(path, f"{folder.name}/{path.name}", path.name.split("__", 1)[0])
        for folder in _visible(root)
        if folder.is_dir()
        for path in _visible(folder)
        if "__" in path.name
    )


def _quarantine(root: Path) -> list[Item]:
    return _present(
        _item(path, f"{folder.name}/{path.name}", path.name)
        for folder in _visible(root)
        if folder.is_dir()
        for path in _visible(folder)
    )


def _training_sets(root: Path) -> list[Item]:
    return _present(
        _item(path, path.stem, None, *[p for p in [path.with_suffix(".json")] if p.exists()])
        for path in _visible(root, "*.parquet")
    )


def _files(root: Path, pattern: str) -> list[Item]:
    return _present(_item(path, path.name) for path in _visible(root, pattern))


def _compacted(root: Path) -> list[Item]:
    """Compacted prediction files, by their newest event time: a merged file is new on disk
    but holds old rows (``serving.monitoring``'s merge), so its mtime would keep it longest.
    Their age is in data time, behind the newest compacted row, as a batch file's is."""
    spans = compacted_spans(root) if root.is_dir() else []
    newest = max((s.end for s in spans if s.end), default=None)
    items = []
    for span in spans:
        item = _item(span.path, span.path.name)
        if item is not None:
            age = newest - span.end if newest and span.end else None  # data time, as batches
            items.append(replace(item, time=span.end or item.time, age=age))
    return items


def _listers(settings: Settings) -> dict[str, Callable[[], list[Item]]]:
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    return {
        "archive": lambda: _archive(settings.archive),
        "raw": lambda: _batch_files(settings.raw),
        "validated": lambda: _batch_files(settings.validated),
        "features": lambda: _batch_files(settings.lake / "features"),
        "quarantine": lambda: _quarantine(settings.quarantine),
        "models": lambda: _files(settings.models, "*"),
        "mar": lambda: _files(config.model_store, f"{config.model_name}-*.mar"),
        "training_sets": lambda: _training_sets(settings.training_sets),
        "batch_predictions": lambda: _files(settings.batch_predictions, "*.parquet"),
        "compacted_log": lambda: _compacted(settings.monitoring / "log"),
        "prediction_log": lambda: _present(
            _item(p, p.name) for p in closed_files(config.prediction_log_dir)
        ),
    }


def list_store(settings: Settings, store: str) -> list[Item]:
    """The items of one store (see ``STORES``), unprotected, sorted by time."""
    if store not in STORES:
        raise ValueError(f"unknown store {store!r}; expected one of {STORES}")
    return sorted(_listers(settings)[store](), key=lambda i: (i.time, i.name))


def disk_usage(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per store: items, bytes and the oldest item's time (``loopline status``, the asset);
    besides the retained stores, ``landing`` (files not taken yet), ``process_logs`` (dagster.log and TorchServe's logs, with
    their backups) and ``dagster`` (its runs, event logs and captured output), which bound
    themselves (rotation, ``dagster_runs`` retention)."""
    out = {}
    for store in STORES:
        out[store] = _usage(list_store(settings, store))
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    logs = [*settings.home.glob(f"{settings.dagster_log.name}*"), config.log_dir]
    out["process_logs"] = _usage(_present(_item(p, p.name) for p in logs))
    out["dagster"] = _usage(_present([_item(settings.dagster_home, "dagster")]))
    out["landing"] = _usage(_files(settings.landing, "*"))  # waiting to be taken
    return out


def _usage(items: list[Item]) -> dict[str, Any]:
    oldest = min((i.time for i in items), default=None)
    return {
        "items": len(items),
        "bytes": sum(i.bytes for i in items),
        "oldest": oldest.isoformat() if oldest else None,
    }


# --- data ages -----------------------------------------------------------------------------


def newest_event(path: Path, column: str) -> datetime | None:
    """The largest value of ``column`` in a parquet file, from its footer's statistics."""
    import pyarrow.parquet as pq

    try:
        fh = path.open("rb") if is_remote(path) else open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    with fh:
        parquet = pq.ParquetFile(fh)
        index = parquet.schema_arrow.get_field_index(column)
        if index < 0:
            return None
        meta = parquet.metadata
        stats = [meta.row_group(r).column(index).statistics for r in range(meta.num_row_groups)]
    values = [s.max for s in stats if s is not None and s.has_min_max]
    return max(values) if values else None


def data_ages(
    validated: list[Item], root: Path, columns: Mapping[str, str | None], known: dict[str, list]
) -> dict[str, timedelta]:
    """Batch id -> how far its newest event lies behind its dataset's newest (event datasets
    only: reference data has no age). ``known`` (batch id -> [dataset, newest event]) is what
    earlier passes read: each footer is read once, and a batch whose validated file is gone
    keeps its age for the raw and archive copies that may outlive it. Updated in place."""
    for item in validated:
        dataset = item.name.split("/", 1)[0]
        column = columns.get(dataset)
        if column is None or item.batch_id in known:
            continue
        stamp = newest_event(root / item.name, column)
        if stamp is not None:
            known[item.batch_id] = [dataset, stamp.isoformat()]  # type: ignore[index]
    stamps = {b: (ds, datetime.fromisoformat(t)) for b, (ds, t) in known.items()}
    newest: dict[str, datetime] = {}
    for dataset, stamp in stamps.values():
        newest[dataset] = max(newest.get(dataset, stamp), stamp)
    return {b: newest[ds] - stamp for b, (ds, stamp) in stamps.items()}


# --- protection ----------------------------------------------------------------------------


def _unfinished(record: BatchRecord | None) -> str | None:
    if record is None:
        return "not in the ledger"
    return None if record.status in FINAL else f"ledger: {record.status}"


def _protect_batch(
    store: str, item: Item, needed: Needed, ages: Mapping[str, timedelta], columns
) -> str | None:
    record = needed.records.get(item.batch_id or "")
    if (reason := _unfinished(record)) is not None:
        return reason
    if store in ("validated", "features") and record is not None:
        if columns.get(record.dataset) is None:
            return "reference data"
        age = ages.get(item.batch_id or "")
        if needed.window is not None and age is not None and age <= needed.window:
            return "training window"
    return None


def protect(
    store: str,
    items: list[Item],
    needed: Needed,
    *,
    ages: Mapping[str, timedelta] | None = None,
    columns: Mapping[str, str | None] | None = None,
    extra: Callable[[Item], str | None] = lambda _item: None,
) -> list[Item]:
    """``items`` with their ages (batch stores) and the reason each must stay, if any."""
    ages = ages or {}
    columns = columns if columns is not None else time_columns()
    out = []
    for item in items:
        reason = None
        if needed.now - item.time < needed.grace:
            reason = "younger than the grace period"
        elif store in BATCH_STORES:
            reason = _protect_batch(store, item, needed, ages, columns)
        elif store == "models":
            reason = _model_dir_reason(item.paths[0], needed)
        elif store == "mar":
            reason = needed.mars.get(item.name)
        elif store == "training_sets":
            reason = needed.training_sets.get(item.name)
        reason = reason or extra(item)
        out.append(replace(item, age=ages.get(item.batch_id or "", item.age), protected=reason))
    return out


def _model_dir_reason(folder: Path, needed: Needed) -> str | None:
    root = folder.resolve()
    for artifact_dir, reason in needed.model_dirs.items():
        if artifact_dir == root or root in artifact_dir.parents:
            return reason
    return None


# --- a pass --------------------------------------------------------------------------------


@dataclass
class RetentionReport:
    """What one pass removed and kept, per store."""

    plans: dict[str, Plan]

    def summary(self) -> dict[str, dict[str, Any]]:
        return {store: p.summary() for store, p in self.plans.items()}

    @property
    def removed_bytes(self) -> int:
        return sum(i.bytes for p in self.plans.values() for i in p.delete)


def retain(
    settings: Settings,
    ledger: BatchLedger,
    *,
    window_days: float | None = None,
    pending_features: Callable[[Item], str | None] = lambda _item: None,
    unloaded_features: frozenset[str] = frozenset(),
    dry_run: bool = False,
) -> RetentionReport:
    """One retention pass over every store of ``settings``: protect, plan, record, delete.

    ``pending_features``: why a validated batch must wait for its feature files (None: it need
    not); ``unloaded_features``: feature files (``<view>/<batch>.parquet``) the online store has
    not loaded. Validated batches go first: a feature file goes only with its validated batch,
    so no batch is ever left validated without features it would then be recomputed from."""
    need = needed(settings, ledger, window_days)
    columns = time_columns()
    validated = list_store(settings, "validated")
    ages_path = settings.home / AGES_FILE
    known = json.loads(ages_path.read_text()) if ages_path.exists() else {}
    ages = data_ages(validated, settings.validated, columns, known)
    plans: dict[str, Plan] = {}
    extras = _extras(settings, pending_features, unloaded_features)
    for store in ("validated", *[s for s in STORES if s != "validated"]):
        items = validated if store == "validated" else list_store(settings, store)
        if store == "features":
            gone = ledger.expired_batches("validated") | {
                i.batch_id for i in plans["validated"].delete
            }
            extras["features"] = _feature_guard(gone, unloaded_features)
        protected = protect(
            store, items, need, ages=ages, columns=columns, extra=extras.get(store, _none)
        )
        plans[store] = plan(store, protected, settings.retention.get(store, Limits()))
        if not dry_run:
            _apply(ledger, plans[store])
    if not dry_run:  # forget the batches no store holds any more
        held = {i.batch_id for store in BATCH_STORES for i in plans[store].keep}
        write_json_atomic({b: v for b, v in known.items() if b in held}, ages_path)
    return RetentionReport(plans)


def _none(_item: Item) -> None:
    return None


def _feature_guard(gone: set, unloaded: frozenset[str]) -> Callable[[Item], str | None]:
    def guard(item: Item) -> str | None:
        if item.name in unloaded:
            return "not loaded online yet"
        return None if item.batch_id in gone else "its validated batch is kept"

    return guard


def _extras(
    settings: Settings, pending_features: Callable[[Item], str | None], unloaded: frozenset[str]
) -> dict[str, Callable[[Item], str | None]]:
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    manifest = settings.monitoring / "log" / MANIFEST
    compacted = set(json.loads(manifest.read_text())) if manifest.exists() else set()
    return {
        "validated": pending_features,
        "prediction_log": lambda item: (
            None
            if item.name in compacted
            else f"not compacted yet ({config.prediction_log_dir.name})"
        ),
    }


def _apply(ledger: BatchLedger, decided: Plan) -> None:
    """Tombstone first, then delete: a crash between leaves a record of a file still there,
    which the next pass deletes, never a file gone without a record."""
    for item in decided.delete:
        if decided.store in RECORDED:
            ledger.expire(decided.store, item.name, batch_id=item.batch_id, size=item.bytes)
        delete([item])
