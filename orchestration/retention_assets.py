"""Retention on a schedule: each store of the home and lake kept within its limits.

The decisions are ``serving.stores.retain``'s (what stays and why) and ``core.retention``'s
(what goes, oldest first); this module tells it which validated batches still wait for their
feature files and which feature files the online store has not loaded, and reports.
"""

import dagster as dg

from core.retention import format_size
from core.usecase import active
from orchestration.feature_assets import validated_batches
from orchestration.resources import LooplineStorage, lane

GROUP = "operations"


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


def _table(summary: dict[str, dict]) -> str:
    lines = [
        "| store | removed files | removed bytes | kept | kept bytes | oldest kept | over limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for store, s in summary.items():
        lines.append(
            f"| {store} | {s['removed_files']} | {format_size(s['removed_bytes'])} | "
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
    summary = report.summary()
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

retention_schedule = dg.ScheduleDefinition(
    job=retention_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Retention every 15 minutes (a demo's accelerated data ages fast).",
)

defs = dg.Definitions(assets=[retention], jobs=[retention_job], schedules=[retention_schedule])
