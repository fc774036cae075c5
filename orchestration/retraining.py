"""Continuous training: the job that retrains, validates, registers and deploys, and the
triggers that start it on their own.

``retrain_sensor`` gathers every trigger (new labelled data, serving drift, the batch value-skew
check, live decay, a person asking) and starts ``continuous_training`` through the debounced
decision in ``orchestration.triggers``; ``nightly_retrain`` is the schedule.
"""

import dataclasses
import json
import math
from datetime import UTC, datetime

import dagster as dg

from core.settings import Settings
from core.usecase import active
from models.tasks import of as task_of
from orchestration import alerts
from orchestration.ingest_assets import reference_profile
from orchestration.monitoring_assets import champion_of
from orchestration.resources import IN_FLIGHT, LooplineStorage, lane
from orchestration.serving_assets import deployment, model_archive
from orchestration.training_assets import GROUP as TRAINING_GROUP
from orchestration.triggers import (
    Signal,
    TriggerPolicy,
    decay_signal,
    decide,
    drift_signal,
    estimated_decay_signal,
    first_seen,
    new_data_signal,
)

LOOP_JOB = "continuous_training"

continuous_training_job = dg.define_asset_job(
    LOOP_JOB,
    selection=(
        dg.AssetSelection.assets("training_set")
        | dg.AssetSelection.groups(TRAINING_GROUP)
        | dg.AssetSelection.assets(model_archive, deployment, reference_profile)
    ),
    tags=lane("training"),
    # Steps in one process: a process per step cost ~10-30 s of imports each on 2 busy cores,
    # a minute or two per retraining, for a parallelism two cores do not have (decision 36).
    executor_def=dg.in_process_executor,
    description="Train on fresh data, validate, register, deploy progressively, refresh references.",
)


class RetrainPolicy(dg.ConfigurableResource):
    """Trigger thresholds and debouncing (orchestration.triggers.TriggerPolicy). A field left
    unset takes LOOPLINE_RETRAIN_* from the environment (Settings), else the policy default."""

    min_new_labelled_rows: int | None = None
    drift_psi: float | None = None
    decay_drop: float | None = None
    min_labelled_for_decay: int | None = None
    min_positives_for_decay: int | None = None
    cooldown_minutes: float | None = None
    drift_rearm_minutes: float | None = None
    decay_on_estimate: bool | None = None
    decay_confidence: float | None = None

    def policy(self) -> TriggerPolicy:
        """The policy default, then the use case's ``retrain:`` declaration, then the
        environment, then this resource's configuration."""
        fields = {**Settings.from_env().retrain}
        fields.update({k: v for k, v in self.model_dump().items() if v is not None})
        if "min_new_labelled_rows" in fields:
            fields["min_new_labelled_rows"] = int(fields["min_new_labelled_rows"])
        return active().declared("retrain", TriggerPolicy, **fields)


def _latest_metadata(instance: dg.DagsterInstance, key: str) -> tuple[dict, float] | None:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        return None
    meta = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    return meta, event.timestamp


def gather_signals(
    instance: dg.DagsterInstance,
    storage: LooplineStorage,
    policy: TriggerPolicy,
    since: float,
    counted: list | None = None,
) -> list[Signal | None]:
    """Every trigger's signal now; drift and decay only when measured after ``since``.
    ``counted``: ``labels_since(storage, since)``, when the caller has read it already."""
    settings = storage.settings
    registry, champion = champion_of(storage)
    signals: list[Signal | None] = []
    request = settings.retrain_request
    if request.exists():
        reason = json.loads(request.read_text()).get("reason", "asked on demand")
        signals.append(Signal("manual", reason))
    # New since the last retraining started (accepted or not): a rejected candidate must not
    # be retried on the same data at every cooldown.
    counted = labels_since(storage, since) if counted is None else counted
    fresh = new_data_signal(sum(b.rows or 0 for b in counted), policy)
    if fresh is not None:  # the batch that brought the count over the threshold: the newest
        newest = max(counted, key=lambda b: b.updated_at)
        fresh = dataclasses.replace(fresh, batch=newest.batch_id)
    signals.append(fresh)
    if champion is None:
        return signals
    drift = _latest_metadata(instance, "drift_report")
    if drift and drift[1] > since and drift[0].get("champion") == champion.version:
        signals.append(drift_signal(drift[0].get("psi") or {}, policy))
    skew = _latest_metadata(instance, f"validated_{active().request.dataset}")
    if skew and skew[1] > since and skew[0].get("psi"):
        batch_signal = drift_signal(skew[0]["psi"], policy)
        if batch_signal is not None:
            reason = f"batch value skew: {batch_signal.reason}"
            signals.append(Signal("drift", reason, batch_signal.value, batch=skew[0].get("batch")))
    live = _latest_metadata(instance, "live_performance")
    if live and live[1] > since and live[0].get("champion") == champion.version:
        meta = live[0]
        task = task_of(active().task.type)
        m = task.primary_metric
        decayed = decay_signal(
            meta.get(f"live_{m}"),
            meta.get(f"offline_{m}"),
            int(meta.get("labelled") or 0),
            policy,
            positives=int(meta["positives"]) if meta.get("positives") is not None else None,
            live_se=_finite(meta.get(f"live_{m}_se")),
            offline_se=_finite(meta.get(f"offline_{m}_se")),
            metric=m,
        )
        # Measured on the labels batch live_performance joined (the estimate, on predictions).
        label_batch = meta.get("label_batch")
        signals.append(decayed and dataclasses.replace(decayed, batch=label_batch))
        signals.append(
            estimated_decay_signal(
                _finite(meta.get(f"estimated_{m}_unlabelled")),
                meta.get(f"offline_{m}"),
                int(meta.get("recent") or 0),
                policy,
                estimate_se=_finite(meta.get(f"estimated_{m}_unlabelled_se")),
                offline_se=_finite(meta.get(f"offline_{m}_se")),
                metric=m,
            )
        )
    return signals


def labels_since(storage: LooplineStorage, since: float) -> list:
    """The labels batches validated since ``since`` (a timestamp; 0: all of them)."""
    cutoff = datetime.fromtimestamp(since, UTC).isoformat() if since else ""
    return [
        b
        for b in storage.ledger.batches(dataset=active().label.dataset, status="validated")
        if b.updated_at > cutoff
    ]


def _finite(value: object) -> float | None:
    """A metadata number, None where it was not measured (NaN)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _last_started(
    instance: dg.DagsterInstance, trigger: str | None = None
) -> tuple[bool, datetime | None]:
    """Whether the newest retraining (of ``trigger``'s, if given) is in flight, and its start."""
    tags = {"loopline/trigger": trigger} if trigger else None
    runs = instance.get_run_records(filters=dg.RunsFilter(job_name=LOOP_JOB, tags=tags), limit=1)
    if not runs:
        return False, None
    record = runs[0]
    in_flight = record.dagster_run.status in IN_FLIGHT
    started = datetime.fromtimestamp(record.start_time or record.create_timestamp.timestamp(), UTC)
    return in_flight, started


@dg.sensor(
    job=continuous_training_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Retrains on new data, drift, value skew, live decay or on demand; debounced.",
)
def retrain_sensor(
    context: dg.SensorEvaluationContext, storage: LooplineStorage, retrain_policy: RetrainPolicy
):
    policy = retrain_policy.policy()
    in_flight, last_started = _last_started(context.instance)
    since = last_started.timestamp() if last_started else 0.0
    fresh_labels = labels_since(storage, since)
    signals = gather_signals(context.instance, storage, policy, since, fresh_labels)
    now = datetime.now(UTC)
    seen = first_seen(json.loads(context.cursor or "{}"), signals, now)
    context.update_cursor(json.dumps(seen))
    decision = decide(
        signals,
        in_flight=in_flight,
        last_started=last_started,
        now=now,
        policy=policy,
        last_drift=_last_started(context.instance, "drift")[1],
        new_labels=bool(fresh_labels),
    )
    if not decision.fire:
        return dg.SkipReason(decision.why)
    from features.training_set import missing_feature_views, waiting_for_features

    missing = missing_feature_views(storage.settings.lake)
    if missing:
        return dg.SkipReason(f"{waiting_for_features(missing)} ({decision.signal.kind} waits)")
    storage.settings.retrain_request.unlink(missing_ok=True)
    if decision.signal.kind == "decay":
        alerts.send(alerts.Alert("decay", decision.signal.reason))
    context.log.info(f"retraining: {decision.signal.kind}: {decision.why}")
    origin = seen.pop(decision.signal.kind, None)  # the next one of this kind starts afresh
    context.update_cursor(json.dumps(seen))
    return dg.RunRequest(tags=decision.signal.tags(origin))


@dg.schedule(
    job=continuous_training_job,
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly retraining, unless one is already in flight.",
)
def nightly_retrain(context: dg.ScheduleEvaluationContext):
    in_flight, _ = _last_started(context.instance)
    if in_flight:
        return dg.SkipReason("a retraining is already in flight")
    return dg.RunRequest(tags=Signal("schedule", "nightly schedule").tags())


defs = dg.Definitions(
    jobs=[continuous_training_job],
    sensors=[retrain_sensor],
    schedules=[nightly_retrain],
    resources={"retrain_policy": RetrainPolicy()},
)
