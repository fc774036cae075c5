"""Monitoring and continuous training: the prediction log, drift, live performance, and the
triggers that start the next round on their own.

prediction_log -> drift_report (+ serving_drift, WARN) -> live_performance, run by
``monitoring_sensor`` whenever the serving log or the labels have something new.
``retrain_sensor`` gathers every trigger (new labelled data, serving drift, the batch value-skew
check, live decay, a person asking) and starts ``continuous_training`` through the debounced
decision in ``orchestration.triggers``; ``nightly_retrain`` is the schedule.
"""

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from features.engineering import read_validated
from features.storage import uri, write_json_atomic, write_parquet_atomic
from models.registry import CHAMPION, Registry
from models.spec import DEFAULT_SLICES
from orchestration import alerts
from orchestration.ingest import _md_table, reference_profile
from orchestration.resources import IN_FLIGHT, LooplineStorage, run_in_flight
from orchestration.serving import TorchServeResource, deployment, model_archive
from orchestration.settings import Settings
from orchestration.training import GROUP as TRAINING_GROUP
from orchestration.triggers import (
    Signal,
    TriggerPolicy,
    decay_signal,
    decide,
    drift_signal,
    new_data_signal,
)
from serving.client import TorchServeError
from serving.monitoring import (
    SCORE,
    compact,
    join_labels,
    live_metrics,
    read_compacted,
    schema_skew,
    serving_drift,
)
from serving.prediction_log import closed_files

GROUP = "monitoring"
LOOP_JOB = "continuous_training"


def _monitoring_dir(settings: Settings) -> Path:
    return settings.home / "monitoring"


def _joined_path(settings: Settings) -> Path:
    return _monitoring_dir(settings) / "joined.parquet"


def _log_dir(settings: Settings, torchserve: TorchServeResource, storage: LooplineStorage) -> Path:
    return torchserve.serving_config(storage).prediction_log_dir


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def prediction_log(
    context: dg.AssetExecutionContext, storage: LooplineStorage, torchserve: TorchServeResource
) -> dg.MaterializeResult:
    """The serving log compacted into parquet, with labels joined as they arrive."""
    settings = storage.settings
    done = compact(_log_dir(settings, torchserve, storage), _monitoring_dir(settings) / "log")
    predictions = read_compacted(_monitoring_dir(settings) / "log")
    joined = join_labels(predictions, read_validated(settings.lake, "labels"))
    write_parquet_atomic(joined, _joined_path(settings))
    labelled = joined.filter(pl.col("label").is_not_null()).height
    context.log.info(f"compacted {done.files} log files ({done.rows} records)")
    return dg.MaterializeResult(
        metadata={
            "new_log_files": done.files,
            "new_records": done.rows,
            "new_errors": done.errors,
            "predictions": joined.height,
            "labelled": labelled,
            "label_coverage": labelled / joined.height if joined.height else 0.0,
            "refused_requests": predictions.filter(pl.col("status") != 200).height,
            "path": dg.MetadataValue.path(str(_joined_path(settings))),
        }
    )


class MonitoringConfig(dg.Config):
    """Serving window and thresholds for drift and decay."""

    window_hours: float = 24.0
    min_rows: int = 100
    psi_threshold: float = 0.2
    reference_rows: int = 50_000


def _champion(storage: LooplineStorage):
    registry = Registry(storage.settings.registry_path)
    version = registry.get_alias(CHAMPION)
    return registry, (registry.get(version) if version else None)


def _serving_window(settings: Settings, version: str, hours: float) -> pl.DataFrame:
    path = _joined_path(settings)
    if not path.exists():
        return pl.DataFrame()
    since = datetime.now(UTC) - timedelta(hours=hours)
    return pl.read_parquet(path).filter(
        (pl.col("model_version") == version) & (pl.col("logged_at") >= since)
    )


@dg.asset(
    group_name=GROUP,
    kinds={"polars"},
    deps=[prediction_log],
    check_specs=[
        dg.AssetCheckSpec(
            "serving_drift",
            asset="drift_report",
            blocking=False,
            description="No feature or score drifted past the PSI threshold (WARN).",
        )
    ],
)
def drift_report(
    context: dg.AssetExecutionContext, config: MonitoringConfig, storage: LooplineStorage
):
    """Serving features and scores against the champion's training data: PSI, KS, JS, skew."""
    from models.artifact import load_model
    from models.evaluate import predict_proba
    from models.plots import drift_png, png_markdown

    settings = storage.settings
    _, champion = _champion(storage)
    if champion is None:
        yield dg.MaterializeResult(metadata={"compared": False, "why": "no champion yet"})
        yield dg.AssetCheckResult(
            check_name="serving_drift", passed=True, metadata={"compared": False}
        )
        return
    serving = _serving_window(settings, champion.version, config.window_hours)
    serving = serving.filter(pl.col("status") == 200) if serving.height else serving
    if serving.height < config.min_rows:
        why = f"{serving.height} predictions of {champion.version} in the window (< {config.min_rows})"
        yield dg.MaterializeResult(
            metadata={"compared": False, "why": why, "champion": champion.version}
        )
        yield dg.AssetCheckResult(
            check_name="serving_drift", passed=True, metadata={"compared": False, "why": why}
        )
        return
    module, preprocessor = load_model(champion.artifact_dir)
    spec = preprocessor.spec
    training = pl.read_parquet(
        uri(settings.training_sets / f"{champion.training_set_version}.parquet")
    )
    reference = training.filter(pl.col("split") == "train")
    if reference.height > config.reference_rows:
        reference = reference.sample(config.reference_rows, seed=0)
    held_out = training.filter(pl.col("split") == "test")
    reference_scores = predict_proba(module, preprocessor, held_out)
    result = serving_drift(
        reference.select(spec.columns),
        serving,
        list(spec.numeric),
        list(spec.categorical),
    )
    score = serving_drift(
        pl.DataFrame({SCORE: reference_scores}), serving.select(SCORE), [SCORE], []
    )
    psi = {f.feature: round(f.psi, 4) for f in [*result.features, *score.features]}
    drifted = sorted(f for f, v in psi.items() if v >= config.psi_threshold)
    skew = schema_skew(result)
    table = [
        {
            "feature": f.feature,
            "psi": round(f.psi, 4),
            "ks": "" if f.ks is None else round(f.ks, 4),
            "js": "" if f.js is None else round(f.js, 4),
            "null_rate_train": round(f.null_rate_reference, 3),
            "null_rate_serving": round(f.null_rate_current, 3),
        }
        for f in sorted([*result.features, *score.features], key=lambda f: -f.psi)
    ]
    report = {
        "champion": champion.version,
        "rows": serving.height,
        "psi": psi,
        "drifted": drifted,
        "schema_skew": skew,
        "at": datetime.now(UTC).isoformat(),
    }
    write_json_atomic(report, _monitoring_dir(settings) / "drift.json")
    if drifted:
        alerts.send(alerts.Alert("drift", f"drift on {', '.join(drifted)}", report))
    yield dg.MaterializeResult(
        metadata={
            "compared": True,
            "champion": champion.version,
            "rows": serving.height,
            "max_psi": max(psi.values()),
            "score_psi": psi[SCORE],
            "drifted": ", ".join(drifted) or "none",
            "psi": dg.MetadataValue.json(psi),
            "schema_skew": "\n".join(skew) or "none",
            "features": dg.MetadataValue.md(_md_table(table)),
            "plot": dg.MetadataValue.md(
                png_markdown(drift_png(psi, config.psi_threshold), "drift")
            ),
        }
    )
    yield dg.AssetCheckResult(
        check_name="serving_drift",
        passed=not drifted,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "drifted": ", ".join(drifted) or "none",
            "schema_skew": "\n".join(skew) or "none",
        },
    )


_PROM = re.compile(r"^(\w+)(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def torchserve_figures(text: str) -> dict[str, float]:
    """Sums of TorchServe's Prometheus counters that monitoring reports."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = _PROM.match(line.strip())
        if match:
            sums[match.group(1)] = sums.get(match.group(1), 0.0) + float(match.group(3))
    out = {}
    answered = sum(sums.get(k, 0.0) for k in ("Requests2XX", "Requests4XX", "Requests5XX"))
    if answered:
        out["requests"] = answered
        out["error_rate_5xx"] = sums.get("Requests5XX", 0.0) / answered
        out["refused_rate_4xx"] = sums.get("Requests4XX", 0.0) / answered
    inferences = sums.get("ts_inference_requests_total", 0.0)
    if inferences and "ts_inference_latency_microseconds" in sums:
        out["mean_inference_latency_ms"] = (
            sums["ts_inference_latency_microseconds"] / inferences / 1000
        )
    if inferences and "ts_queue_latency_microseconds" in sums:
        out["mean_queue_latency_ms"] = sums["ts_queue_latency_microseconds"] / inferences / 1000
    return out


@dg.asset(group_name=GROUP, kinds={"polars"}, deps=[prediction_log])
def live_performance(
    context: dg.AssetExecutionContext,
    config: MonitoringConfig,
    storage: LooplineStorage,
    torchserve: TorchServeResource,
) -> dg.MaterializeResult:
    """PR-AUC, precision and recall on labelled predictions, beside the offline evaluation."""
    from models.evaluate import EvaluationReport
    from models.plots import png_markdown, slice_metric_png

    settings = storage.settings
    _, champion = _champion(storage)
    if champion is None:
        return dg.MaterializeResult(metadata={"evaluated": False, "why": "no champion yet"})
    window = _serving_window(settings, champion.version, config.window_hours * 7)
    answered = window.filter(pl.col("status") == 200) if window.height else window
    threshold = float(champion.metrics.get("threshold", 0.5))
    live = live_metrics(answered, threshold, DEFAULT_SLICES) if answered.height else None
    offline = float(champion.metrics.get("pr_auc", float("nan")))
    metadata: dict = {"champion": champion.version, "offline_pr_auc": offline}
    if answered.height:
        metadata["latency_p50_ms"] = float(answered["latency_ms"].quantile(0.5))
        metadata["latency_p99_ms"] = float(answered["latency_ms"].quantile(0.99))
    if window.height:
        metadata["error_rate_logged"] = (
            window.filter(pl.col("status") >= 500).height / window.height
        )
    try:
        figures = torchserve_figures(torchserve.process(storage).client(timeout=3).metrics())
        metadata.update({f"torchserve_{k}": v for k, v in figures.items()})
    except (TorchServeError, OSError) as exc:
        metadata["torchserve_metrics"] = f"unavailable: {exc}"
    if live is None:
        metadata.update(
            evaluated=False, labelled=0, why="no labelled predictions of both classes yet"
        )
        return dg.MaterializeResult(metadata=metadata)
    metadata.update(
        evaluated=True,
        labelled=live.support,
        live_pr_auc=float(live.metrics["pr_auc"]),
        live_precision=float(live.metrics["precision"]),
        live_recall=float(live.metrics["recall"]),
        pr_auc_drop=1.0 - float(live.metrics["pr_auc"]) / offline if offline > 0 else 0.0,
        slices=dg.MetadataValue.md(
            _md_table(
                [
                    {
                        "slice": f"{s.column}={s.value}",
                        "support": s.support,
                        "pr_auc": round(s.metrics.get("pr_auc", float("nan")), 4),
                        "recall": round(s.metrics.get("recall", float("nan")), 4),
                    }
                    for s in live.slices
                ]
            )
        ),
    )
    evaluation = Path(champion.artifact_dir) / "evaluation.json"
    if evaluation.exists():
        offline_report = EvaluationReport.from_dict(
            json.loads(evaluation.read_text())["challenger"]
        )
        png = slice_metric_png({"offline": offline_report, "live": live}, "channel")
        metadata["plot"] = dg.MetadataValue.md(png_markdown(png, "PR-AUC by channel"))
    return dg.MaterializeResult(metadata=metadata)


monitoring_job = dg.define_asset_job(
    "monitoring",
    selection=dg.AssetSelection.assets(prediction_log, drift_report, live_performance),
    executor_def=dg.in_process_executor,
    tags={"loopline/pool": "monitoring"},
    description="Compact the prediction log, join labels, measure drift and live performance.",
)

continuous_training_job = dg.define_asset_job(
    LOOP_JOB,
    selection=(
        dg.AssetSelection.assets("training_set")
        | dg.AssetSelection.groups(TRAINING_GROUP)
        | dg.AssetSelection.assets(model_archive, deployment, reference_profile)
    ),
    config={"ops": {"registered_model": {"config": {"promote_on_pass": False}}}},
    tags={"loopline/pool": "training"},
    description="Train on fresh data, validate, register, deploy progressively, refresh references.",
)


@dg.sensor(
    job=monitoring_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Runs monitoring when the serving log has new closed files or labels arrived.",
)
def monitoring_sensor(
    context: dg.SensorEvaluationContext, storage: LooplineStorage, torchserve: TorchServeResource
):
    settings = storage.settings
    files = [p.name for p in closed_files(_log_dir(settings, torchserve, storage))]
    labels = storage.ledger.batches(dataset="labels", status="validated", limit=1)
    state = f"{len(files)}:{files[-1] if files else ''}:{labels[0].batch_id if labels else ''}"
    if state == context.cursor or not files:
        return dg.SkipReason("nothing new in the serving log or the labels")
    if run_in_flight(context.instance, monitoring_job.name) is not None:
        return dg.SkipReason("a monitoring run is in flight")
    context.update_cursor(state)
    return dg.RunRequest()


class RetrainPolicy(dg.ConfigurableResource):
    """Trigger thresholds and debouncing (orchestration.triggers.TriggerPolicy). A field left
    unset takes LOOPLINE_RETRAIN_* from the environment (Settings), else the policy default."""

    min_new_labelled_rows: int | None = None
    drift_psi: float | None = None
    decay_pr_auc_drop: float | None = None
    min_labelled_for_decay: int | None = None
    cooldown_minutes: float | None = None

    def policy(self) -> TriggerPolicy:
        fields = {**Settings.from_env().retrain}
        fields.update({k: v for k, v in self.model_dump().items() if v is not None})
        if "cooldown_minutes" in fields:
            fields["cooldown"] = timedelta(minutes=float(fields.pop("cooldown_minutes")))
        if "min_new_labelled_rows" in fields:
            fields["min_new_labelled_rows"] = int(fields["min_new_labelled_rows"])
        return TriggerPolicy(**fields)


def _latest_metadata(instance: dg.DagsterInstance, key: str) -> tuple[dict, float] | None:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        return None
    meta = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    return meta, event.timestamp


def gather_signals(
    instance: dg.DagsterInstance, storage: LooplineStorage, policy: TriggerPolicy, since: float
) -> list[Signal | None]:
    """Every trigger's signal now; drift and decay only when measured after ``since``."""
    settings = storage.settings
    registry, champion = _champion(storage)
    signals: list[Signal | None] = []
    request = settings.retrain_request
    if request.exists():
        reason = json.loads(request.read_text()).get("reason", "asked on demand")
        signals.append(Signal("manual", reason))
    # New since the last retraining started (accepted or not): a rejected candidate must not
    # be retried on the same data at every cooldown.
    cutoff = datetime.fromtimestamp(since, UTC).isoformat() if since else ""
    new_rows = sum(
        b.rows or 0
        for b in storage.ledger.batches(dataset="labels", status="validated")
        if b.updated_at > cutoff
    )
    signals.append(new_data_signal(new_rows, policy))
    if champion is None:
        return signals
    drift = _latest_metadata(instance, "drift_report")
    if drift and drift[1] > since and drift[0].get("champion") == champion.version:
        signals.append(drift_signal(drift[0].get("psi") or {}, policy))
    skew = _latest_metadata(instance, "validated_transactions")
    if skew and skew[1] > since and skew[0].get("psi"):
        batch_signal = drift_signal(skew[0]["psi"], policy)
        if batch_signal is not None:
            signals.append(
                Signal("drift", f"batch value skew: {batch_signal.reason}", batch_signal.value)
            )
    live = _latest_metadata(instance, "live_performance")
    if live and live[1] > since and live[0].get("champion") == champion.version:
        meta = live[0]
        signals.append(
            decay_signal(
                meta.get("live_pr_auc"),
                meta.get("offline_pr_auc"),
                int(meta.get("labelled") or 0),
                policy,
            )
        )
    return signals


def _last_started(instance: dg.DagsterInstance) -> tuple[bool, datetime | None]:
    runs = instance.get_run_records(filters=dg.RunsFilter(job_name=LOOP_JOB), limit=1)
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
    signals = gather_signals(context.instance, storage, policy, since)
    decision = decide(
        signals,
        in_flight=in_flight,
        last_started=last_started,
        now=datetime.now(UTC),
        policy=policy,
    )
    if not decision.fire:
        return dg.SkipReason(decision.why)
    storage.settings.retrain_request.unlink(missing_ok=True)
    if decision.signal.kind == "decay":
        alerts.send(alerts.Alert("decay", decision.signal.reason))
    context.log.info(f"retraining: {decision.signal.kind}: {decision.why}")
    return dg.RunRequest(tags=decision.signal.tags())


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
    assets=[prediction_log, drift_report, live_performance],
    jobs=[monitoring_job, continuous_training_job],
    sensors=[monitoring_sensor, retrain_sensor],
    schedules=[nightly_retrain],
    resources={"retrain_policy": RetrainPolicy()},
)
