"""Retention on a schedule: each store of the home and lake kept within its limits.

The decisions are ``serving.stores.retain``'s (what stays and why) and ``core.retention``'s
(what goes, oldest first); this module tells it which validated batches still wait for their
feature files and which feature files the online store has not loaded, and reports. Dagster's
own runs (and their event logs and captured output) are a store as well: finished runs older
than ``LOOPLINE_RETAIN_DAGSTER_RUNS`` go, except the run of each asset's latest materialization
(the retrain triggers read those).
"""

import time
from datetime import UTC, datetime, timedelta

import dagster as dg

from core.retention import Item, Plan, format_size, plan
from core.usecase import active
from orchestration.feature_assets import validated_batches
from orchestration.resources import LooplineStorage, lane, run_in_flight

GROUP = "operations"
FINISHED = [
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
]
# Runs deleted per pass at most: a first pass over a long history stays short.
RUNS_PER_PASS = 2000


def _feature_state(storage: LooplineStorage):
    """(why a validated item must wait for features, the feature files not loaded online)."""
    from features import incremental
    from features.views import views

    settings = storage.settings
    batches = validated_batches(storage)
    waiting = {
        b.batch_id for view in views() for b in incremental.pending(settings.lake, view, batches)
    }
    unloaded = frozenset(
        name.removeprefix("features/")
        for name in incremental.unloaded_files(settings.home, settings.lake)
    )
    return (
        lambda item: "feature files not written yet" if item.batch_id in waiting else None,
        unloaded,
    )


def retain_runs(instance: dg.DagsterInstance, settings) -> Plan:
    """Delete finished runs past the age limit (oldest first, ``RUNS_PER_PASS`` at most)
    with their event logs and captured output, except each asset's latest materialization."""
    limits = settings.retention["dagster_runs"]
    if limits.max_age is None:
        return plan("dagster_runs", [], limits)
    now = datetime.now(UTC)
    before = now - max(limits.max_age, timedelta(minutes=settings.retention_grace_min))
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=FINISHED, created_before=before),
        limit=RUNS_PER_PASS,
        ascending=True,
    )
    latest = {
        event.run_id
        for event in instance.get_latest_materialization_events(instance.get_asset_keys()).values()
        if event is not None
    }
    items = [
        Item(
            r.dagster_run.run_id,
            (),
            0,
            r.create_timestamp,
            age=now - r.create_timestamp,
            protected="an asset's latest materialization"
            if r.dagster_run.run_id in latest
            else None,
        )
        for r in records
    ]
    decided = plan("dagster_runs", items, limits)
    for item in decided.delete:
        instance.delete_run(item.name)
        instance.compute_log_manager.delete_logs(prefix=[item.name])
    return decided


def _table(summary: dict[str, dict]) -> str:
    lines = [
        "| store | removed | removed bytes | kept | kept bytes | oldest kept | over limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for store, s in summary.items():
        lines.append(
            f"| {store} | {s['removed_items']} | {format_size(s['removed_bytes'])} | "
            f"{s['kept_items']} | {format_size(s['kept_bytes'])} | {s['oldest_kept'] or '-'} | "
            f"{'; '.join(s['over_limit']) or '-'} |"
        )
    return "\n".join(lines)


@dg.asset(group_name=GROUP, kinds={"python"})
def retention(context: dg.AssetExecutionContext, storage: LooplineStorage) -> dg.MaterializeResult:
    """Old batch files, models, archives and logs deleted within each store's limits, keeping
    what the champion's lineage, rollback, the training window and unfinished work need."""
    from serving.stores import disk_usage, retain

    settings = storage.settings
    pending, unloaded = _feature_state(storage)
    report = retain(
        settings,
        storage.ledger,
        window_days=active().training_set.get("window_days"),
        pending_features=pending,
        unloaded_features=unloaded,
    )
    summary = {
        **report.summary(),
        "dagster_runs": retain_runs(context.instance, settings).summary(),
    }
    for store, s in summary.items():
        if s["removed_items"] or s["over_limit"]:
            context.log.info(f"retention {store}: {s}")
    after = disk_usage(settings)
    return dg.MaterializeResult(
        metadata={
            "removed_bytes": report.removed_bytes,
            "removed_files": sum(s["removed_files"] for s in summary.values()),
            "stores": dg.MetadataValue.md(_table(summary)),
            "detail": dg.MetadataValue.json(summary),
            **{f"bytes_after/{store}": u["bytes"] for store, u in after.items()},
        }
    )


retention_job = dg.define_asset_job(
    "retention_job",
    selection=dg.AssetSelection.assets(retention),
    executor_def=dg.in_process_executor,
    tags=lane("monitoring"),
    description="Delete what each store no longer needs, within its limits.",
)


@dg.sensor(
    job=retention_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Runs retention every LOOPLINE_RETENTION_INTERVAL_MINUTES (15): an accelerated "
    "demo's data ages fast, a soak's faster.",
)
def retention_sensor(context: dg.SensorEvaluationContext, storage: LooplineStorage):
    interval_s = storage.settings.retention_interval_min * 60
    last = float(context.cursor) if context.cursor else 0.0
    now = time.time()
    if now - last < interval_s:
        return dg.SkipReason(f"next retention in {interval_s - (now - last):.0f} s")
    if run_in_flight(context.instance, retention_job.name):
        return dg.SkipReason("a retention run is in flight")
    context.update_cursor(str(now))
    return dg.RunRequest(run_key=f"retention-{int(now)}")


defs = dg.Definitions(assets=[retention], jobs=[retention_job], sensors=[retention_sensor])
