"""Feature store assets: per-batch feature files, Feast registry, online store, training set.

The per-batch feature assets are not partitioned: each run brings every validated batch that
has no features yet up to date, in arrival order, and ``features_sensor`` starts such a run
whenever validated batches wait (docs/decisions.md, "Features follow validated batches").
"""

import fcntl
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from core.usecase import UseCaseError, active
from features.views import View, views
from orchestration.ingest_assets import _md_table
from orchestration.resources import LooplineStorage, lane, run_in_flight

if TYPE_CHECKING:
    from features.training_set import SplitPolicy

GROUP = "features"


def validated_batches(storage: LooplineStorage) -> list:
    """Validated batches of the datasets that change a feature view (``incremental.Batch``),
    in arrival order; not those retention has expired (their files are gone)."""
    from features import incremental

    changing = {d for view in VIEWS.values() for d in view.datasets}
    ledger = storage.ledger
    expired = ledger.expired_batches("validated")
    records = [
        r
        for r in ledger.batches(status="validated")
        if r.dataset in changing and r.batch_id not in expired
    ]
    records.sort(key=lambda r: (r.received_at, r.batch_id))
    return [incremental.Batch(r.dataset, r.batch_id) for r in records]


def _update(
    context: dg.AssetExecutionContext, storage: LooplineStorage, view: str
) -> dg.MaterializeResult:
    from features import incremental

    lake = storage.settings.lake
    todo = incremental.pending(lake, view, validated_batches(storage))
    written = []
    for i, batch in enumerate(todo):
        not_yet = [b.batch_id for b in todo[i + 1 :]]
        path, rows = incremental.update_view(lake, view, batch, not_yet=not_yet)
        written.append({"batch": batch.batch_id, "dataset": batch.dataset, "rows": rows})
        context.log.info(f"{view}: {batch.dataset} batch {batch.batch_id}: {rows} rows")
    folder = incremental.feature_dir(lake, view)
    version = incremental.view_version(lake, view)
    return dg.MaterializeResult(
        metadata={
            "batches_processed": len(written),
            "rows_written": sum(w["rows"] for w in written),
            "batches": dg.MetadataValue.md(_md_table(written)),
            "files": len(list(folder.glob("*.parquet"))),
            "path": dg.MetadataValue.path(str(folder)),
            "version": version,
        },
        data_version=dg.DataVersion(version),
    )


def _view_asset(view: View) -> dg.AssetsDefinition:
    """The asset of one feature view of the use case: its per-batch feature files."""

    @dg.asset(
        name=view.name,
        group_name=GROUP,
        kinds={"polars", "parquet"},
        deps=[f"validated_{d}" for d in (*view.datasets, *view.reads)],
        description=view.description
        or f"{view.name}: one parquet file per validated {' or '.join(view.datasets)} batch.",
    )
    def _asset(context: dg.AssetExecutionContext, storage: LooplineStorage) -> dg.MaterializeResult:
        return _update(context, storage, view.name)

    return _asset


# The use case's feature views (decision 31: the process's use case), one asset each.
VIEWS = views()
VIEW_ASSETS = [_view_asset(v) for v in VIEWS.values()]


@contextmanager
def _feast_lock(home: Path) -> Iterator[None]:
    """One Feast writer or reader per home at a time, across run processes: ``feast apply``
    rewrites the registry file in place, and a run reading it meanwhile finds no entities."""
    path = Path(home) / "feast" / ".registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dg.asset(group_name=GROUP, kinds={"feast"})
def feature_registry(storage: LooplineStorage) -> dg.MaterializeResult:
    """Feast registry with the repo's declarations; re-applied only when they change."""
    from features.declarations import HASH_TAG
    from features.store import SERVICE, apply_definitions

    settings = storage.settings
    with _feast_lock(settings.home):
        store = storage.feature_store()
        applied = apply_definitions(store, settings.lake)
        service = store.registry.get_feature_service(SERVICE, store.project, allow_cache=False)
    fingerprint = service.tags[HASH_TAG]
    return dg.MaterializeResult(
        metadata={
            "applied": applied,
            "feature_service": SERVICE,
            "features": sum(len(p.features) for p in service.feature_view_projections),
            "registry": dg.MetadataValue.path(str(store.config.registry.path)),
            "declarations_sha256": fingerprint,
        },
        data_version=dg.DataVersion(fingerprint[:16]),
    )


@dg.asset(
    group_name=GROUP,
    kinds={"feast", "sqlite"},
    deps=[*VIEW_ASSETS, feature_registry],
)
def online_features(
    context: dg.AssetExecutionContext, storage: LooplineStorage
) -> dg.MaterializeResult:
    """Online store (SQLite, Redis in the scale profile) loaded with every new feature row;
    reloaded whole when it lost rows it was given."""
    from features import incremental

    settings = storage.settings
    with _feast_lock(settings.home):
        store = storage.feature_store()
        gaps = incremental.online_gaps(store, settings.home, settings.lake)
        if not gaps.healthy:
            context.log.warning(f"online store lost rows ({gaps.describe()}): reloading all")
        sync = incremental.sync_online(
            store, settings.home, lake=settings.lake, reload=not gaps.healthy
        )
    intervals = [
        {"view": v, "start": a.isoformat(), "end": b.isoformat()}
        for v, (a, b) in sync.loaded.items()
    ]
    return dg.MaterializeResult(
        metadata={
            "files_loaded": sync.files,
            "rows_read": sync.rows,
            "changed_since": sync.changed_since.isoformat() if sync.changed_since else "",
            "intervals": dg.MetadataValue.md(_md_table(intervals)),
            "online_store": store.config.online_store.type,
            "reloaded": not gaps.healthy,
            "probe": gaps.describe() or "nothing loaded yet",
        }
    )


# The use case's `training_set` block: its defaults for the fields below.
_SET = active().training_set


class TrainingSetConfig(dg.Config):
    """How the labelled rows are split in time, how much history is kept, and how old a
    transaction must be to count as labelled (see features.training_set.SplitPolicy).

    ``held_out_positives``: test and validation are the newest rows holding that many positives
    each, train everything before (the fractions apply when unset or when positives are too
    few). ``window_days``: keep only labelled rows that recent, before splitting.
    ``warm_up_days``: leave out the history's first days, while rolling features fill (for
    the fraud features: their longest window, 30 days, plus the latest a label arrives, 10).
    Shortened on a short history (SplitPolicy). Off by default: on the demo's 64-day history
    the rows it removes cost the first model its gate (decision 26).
    """

    train_fraction: float = _SET.get("train_fraction", 0.70)
    validation_fraction: float = _SET.get("validation_fraction", 0.15)
    test_fraction: float = _SET.get("test_fraction", 0.15)
    held_out_positives: int | None = _SET.get("held_out_positives")
    window_days: float | None = _SET.get("window_days")
    warm_up_days: float | None = _SET.get("warm_up_days")
    label_maturity_days: float = active().label.maturity_days
    presume_negative_after_days: float | None = _SET.get("presume_negative_after_days")

    def split_policy(self) -> "SplitPolicy":
        from features.training_set import SplitFractions, SplitPolicy

        return SplitPolicy(
            fractions=SplitFractions(
                self.train_fraction, self.validation_fraction, self.test_fraction
            ),
            held_out_positives=self.held_out_positives,
            window=timedelta(days=self.window_days) if self.window_days is not None else None,
            warm_up=timedelta(days=self.warm_up_days) if self.warm_up_days else None,
        )


def _check_declared_split() -> None:
    """A `training_set` field the config lacks, or a value it refuses, names the field."""
    uc = active()
    settable = sorted(set(TrainingSetConfig.model_fields) - {"label_maturity_days"})
    for key in _SET:
        if key not in settable:
            raise UseCaseError(
                uc.file, f"training_set.{key}", f"unknown; expected one of {settable}"
            )
    try:
        TrainingSetConfig().split_policy()
    except (TypeError, ValueError) as exc:
        raise UseCaseError(uc.file, "training_set", str(exc)) from None


_check_declared_split()


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb", "parquet"},
    deps=[*VIEW_ASSETS, feature_registry, f"validated_{active().label.dataset}"],
)
def training_set(
    context: dg.AssetExecutionContext, config: TrainingSetConfig, storage: LooplineStorage
) -> dg.Output:
    """Labelled requests with the point-in-time features of the use case's FeatureService,
    split by time."""
    from features.training_set import (
        missing_feature_views,
        training_set_from_home,
        waiting_for_features,
    )

    missing = missing_feature_views(storage.settings.lake)
    if missing:
        raise dg.Failure(
            description=waiting_for_features(missing),
            metadata={"views_without_files": ", ".join(missing)},
        )
    ref, built = training_set_from_home(
        storage.settings.lake,
        storage.feature_store(),
        split=config.split_policy(),
        label_maturity=timedelta(days=config.label_maturity_days),
        presume_negative_after=(
            timedelta(days=config.presume_negative_after_days)
            if config.presume_negative_after_days is not None
            else None
        ),
    )
    splits = built.summary["splits"]
    table = [
        {
            "split": name,
            "rows": s["rows"],
            "positives": s["positives"] if s["positives"] is not None else "",
            "positive_rate": f"{s['positive_rate']:.4f}" if s["positive_rate"] is not None else "",
            **({"mean_label": f"{s['mean_label']:.3f}"} if s.get("mean_label") is not None else {}),
            "start": s["start"] or "",
            "end": s["end"] or "",
        }
        for name, s in splits.items()
    ]
    context.log.info(f"training set {ref.version}: {ref.rows} rows from {len(ref.batches)} batches")
    metadata = {
        "version": ref.version,
        "rows": ref.rows,
        "path": dg.MetadataValue.path(ref.path),
        "feature_service": ref.feature_service,
        "batches": len(ref.batches),
        "splits": dg.MetadataValue.md(_md_table(table)),
        "features": dg.MetadataValue.json(built.summary["features"]),
        "split_policy": dg.MetadataValue.json(built.summary["split_policy"]),
        "split_method": built.summary["split_method"],
    }
    if built.summary["split_note"]:
        metadata["split_note"] = built.summary["split_note"]
        context.log.warning(built.summary["split_note"])
    for name, s in splits.items():
        metadata[f"{name}_rows"] = s["rows"]
        rate = s["positive_rate"]
        metadata[f"{name}_positive_rate"] = rate if rate is not None else 0.0
        metadata[f"{name}_window"] = f"{s['start']} .. {s['end']}"
    return dg.Output(ref, metadata=metadata)


features_job = dg.define_asset_job(
    "update_features",
    selection=dg.AssetSelection.assets(*VIEW_ASSETS, feature_registry, online_features),
    # Its steps take seconds; a process each (importing Dagster, Feast, torch) took 10-30 s
    # more apiece on 2 busy cores, and the live features fell days behind (decision 36).
    executor_def=dg.in_process_executor,
    tags=lane("features"),
    description="Feature files for every validated batch without them, then the online store.",
)


def features_backlog(storage: LooplineStorage) -> list[str]:
    """Validated batches without feature files, and feature files the online store lacks."""
    from features import incremental

    settings = storage.settings
    batches = validated_batches(storage)
    waiting = {
        b.batch_id for view in VIEWS for b in incremental.pending(settings.lake, view, batches)
    }
    return sorted(waiting) + incremental.unloaded_files(settings.home, settings.lake)


@dg.sensor(
    job=features_job,
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts update_features when validated batches or feature files are waiting.",
)
def features_sensor(context: dg.SensorEvaluationContext, storage: LooplineStorage):
    backlog = features_backlog(storage) or _online_gaps_due(context, storage)
    if not backlog:
        return dg.SkipReason("every validated batch has its features in the online store")
    running = run_in_flight(context.instance, features_job.name)
    if running is not None:
        return dg.SkipReason(f"{len(backlog)} items wait for run {running.run_id}")
    key = hashlib.sha256("\n".join(backlog).encode()).hexdigest()[:16]
    return dg.RunRequest(run_key=f"features-{key}", tags={"loopline/backlog": str(len(backlog))})


# How often the sensor checks that the online store still holds what it was given.
ONLINE_PROBE_SECONDS = 60


def _online_gaps_due(context: dg.SensorEvaluationContext, storage: LooplineStorage) -> list[str]:
    """Every ``ONLINE_PROBE_SECONDS`` (the cursor keeps the last probe's time): what the
    online store lacks of the rows it was given, as backlog items; none when it holds them."""
    from features import incremental

    if context.cursor and time.time() - float(context.cursor) < ONLINE_PROBE_SECONDS:
        return []
    context.update_cursor(str(time.time()))
    settings = storage.settings
    gaps = incremental.online_gaps(storage.feature_store(), settings.home, settings.lake)
    if gaps.healthy:
        return []
    context.log.warning(f"online store lost rows ({gaps.describe()})")
    probe = context.cursor
    return [f"online-gap:{view}:{n}:{probe}" for view, n in sorted(gaps.missing.items()) if n]


defs = dg.Definitions(
    assets=[*VIEW_ASSETS, feature_registry, online_features, training_set],
    jobs=[features_job],
    sensors=[features_sensor],
)
