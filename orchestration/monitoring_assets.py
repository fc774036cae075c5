"""Monitoring: the prediction log, feature availability, drift and live performance.

prediction_log -> serving_availability (+ feature_availability, WARN), drift_report (+
serving_drift, WARN), live_performance, run by ``monitoring_sensor`` whenever the serving log
or the labels have something new. Availability (unknown entities, missing features, stale
online rows) and drift (the distribution of the values present) are separate signals with
separate alerts. ``live_performance`` appends the live metric over time, realised and
estimated without labels, to ``monitoring/live_quality.parquet``.
Each run costs what its windows hold, not what all history holds: compaction reads only the
log files closed since the last run (its manifest is the watermark), and the windows read only
the compacted and label files whose event-time span reaches them (``serving.time_spans``).
What served traffic monitoring cannot see is alerted once: torn log lines compaction skipped
(``prediction_log_damaged``), log writers that failed or dropped records
(``prediction_log_dropping``).
What monitoring measures is read by the retrain sensor (``orchestration.retraining``).
"""

import json
import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import dagster as dg
import polars as pl

from core.settings import Settings
from core.storage import uri, write_json_atomic
from core.usecase import active
from features.views import read_validated
from models.registry import CHAMPION, Registry
from models.spec import Slicing
from models.tasks import metric_label
from models.tasks import of as task_of
from orchestration import alerts
from orchestration.ingest_assets import _md_table
from orchestration.resources import LooplineStorage, lane, run_in_flight
from orchestration.serving_assets import TorchServeResource
from orchestration.triggers import (
    TriggerPolicy,
)
from serving import time_spans
from serving.client import TorchServeError
from serving.monitoring import (
    Availability,
    Compaction,
    LiveQuality,
    answered_count,
    answered_once,
    append_live_quality,
    availability,
    availability_findings,
    compact,
    compacted_spans,
    feature_columns,
    join_labels,
    judged_since,
    live_metrics,
    live_quality,
    live_quality_row,
    log_columns,
    merge_small,
    quality_cohort,
    read_live_quality,
    schema_skew,
    served_window,
    serving_drift,
    writer_news,
)
from serving.prediction_log import closed_files, writer_health
from serving.time_spans import Span

if TYPE_CHECKING:
    from models.evaluate import EvaluationReport
    from quality.drift import FeatureDrift

GROUP = "monitoring"


def _monitoring_dir(settings: Settings) -> Path:
    return settings.home / "monitoring"


def _log_store(settings: Settings) -> Path:
    """The compacted prediction log."""
    return _monitoring_dir(settings) / "log"


def _label_spans(settings: Settings) -> list[Span]:
    """The event-time span of every validated label file (indexed under ``monitoring/``)."""
    declared = active().label
    return time_spans.spans(
        settings.validated / declared.dataset,
        "*.parquet",
        declared.time,
        _monitoring_dir(settings) / "label_spans.json",
    )


def _labels_since(settings: Settings, spans: list[Span], start: datetime | None) -> pl.DataFrame:
    """The labels a prediction at or after ``start`` can have: a label is known no earlier
    than its request was made, so only files whose span reaches ``start`` are read."""
    needed = {s.path.name for s in time_spans.since(spans, start)}
    skipped = [s.path.stem for s in spans if s.path.name not in needed]
    return read_validated(settings.lake, active().label.dataset, exclude_batches=skipped)


def _log_dir(settings: Settings, torchserve: TorchServeResource, storage: LooplineStorage) -> Path:
    return torchserve.serving_config(storage).prediction_log_dir


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def prediction_log(
    context: dg.AssetExecutionContext, storage: LooplineStorage, torchserve: TorchServeResource
) -> dg.MaterializeResult:
    """The serving log's newly closed files compacted into parquet, small files merged,
    each file's event-time span indexed."""
    settings = storage.settings
    store = _log_store(settings)
    log_dir = _log_dir(settings, torchserve, storage)
    done = compact(log_dir, store)
    writers, news = writer_news(log_dir, store)
    _alert_log_damage(done, news, log_dir)
    new = [s for s in compacted_spans(store) if s.path == done.path]
    predictions = answered_once(judged_since(new, None)[0])
    merged = merge_small(store)
    spans = compacted_spans(store)
    start = predictions[log_columns().time].min() if predictions.height else None
    labelled = 0
    if start is not None:  # the labels these new predictions have already
        joined = join_labels(predictions, _labels_since(settings, _label_spans(settings), start))
        labelled = joined.filter(pl.col("label").is_not_null()).height
    context.log.info(f"compacted {done.files} log files ({done.rows} records)")
    return dg.MaterializeResult(
        metadata={
            "new_log_files": done.files,
            "new_records": done.rows,
            "new_errors": done.errors,
            "predictions": predictions.height,
            "labelled": labelled,
            "merged_files": merged,
            "compacted_files": len(spans),
            "compacted_rows": sum(s.rows for s in spans),
            "torn_lines": done.torn_lines,
            "torn_files": ", ".join(done.torn_files) or "none",
            "writers_unhealthy": sum(not w.get("healthy", True) for w in writers),
            "writer_dropped": sum(w.get("dropped", 0) for w in writers),
            "writers": dg.MetadataValue.json(writers),
            "path": dg.MetadataValue.path(str(store)),
        }
    )


def _alert_log_damage(done: Compaction, news: list[dict], log_dir: Path) -> None:
    """Torn lines compaction skipped, and log writers that failed or dropped records since the
    last run: what was served but is missing from monitoring's view."""
    if done.torn_lines:
        alerts.send(
            alerts.Alert(
                "prediction_log_damaged",
                f"{done.torn_lines} torn prediction-log lines skipped in "
                f"{len(done.torn_files)} files",
                {
                    "torn_lines": done.torn_lines,
                    "files": list(done.torn_files),
                    "log": str(log_dir),
                },
            )
        )
    if news:
        alerts.send(
            alerts.Alert(
                "prediction_log_dropping",
                "prediction-log writers failing or dropping records: "
                + "; ".join(
                    f"{w.get('prefix')}-{w.get('pid')} "
                    f"{'unhealthy' if not w.get('healthy', True) else 'healthy'}, "
                    f"{w.get('dropped', 0)} dropped, {w.get('errors', 0)} errors"
                    + (f" ({w['last_error']})" if w.get("last_error") else "")
                    for w in news
                ),
                {"writers": news, "log": str(log_dir)},
                severity="error",
            )
        )


class MonitoringConfig(dg.Config):
    """Which served predictions monitoring judges, and the thresholds it judges them by.

    Window (drift and availability): the champion's answered predictions of the last
    ``window_hours`` of event time (the transaction's timestamp, never the log's wall-clock
    ``logged_at``) before its newest one. Event time, because the demo's simulated clock runs
    thousands of times faster than the wall clock: a wall-clock day would hold weeks of simulated
    traffic, an event-time day holds one day in the demo and in a deployment alike. A day, so
    the window spans a whole daily cycle (``hour_of_day`` is skewed in part of a day). When
    that day holds fewer than ``window_min_rows`` predictions (a quiet deployment, the demo's
    sampled traffic), the window reaches back to the newest ``window_min_rows``; when it holds
    more than ``window_max_rows`` (a busy one), a seeded uniform sample of them is judged.
    Below ``min_rows`` nothing is judged. A feature's PSI needs ``min_present`` values present
    in the window: fewer say nothing about a distribution (PSI's noise floor is about
    (bins - 1) / rows).

    Availability alerts: unknown entities in more than ``max_unknown_entity_rate`` of requests,
    any feature missing in more than ``max_missing_rate``, or a feature view's p95 online-row
    age above ``max_staleness_hours`` (half each view's TTL: card 30 days, merchant 7 days; a
    row older than its TTL is not served at all and counts as missing).

    Live quality: the cohort is the predictions at least ``label_maturity_days`` older than the
    newest label, within a trailing ``quality_window_days`` (``serving.monitoring.live_quality``).
    """

    window_hours: float = 24.0
    window_min_rows: int = 6_000  # PSI's noise floor, (bins - 1) / rows, well under 0.01
    window_max_rows: int = 20_000
    min_rows: int = 100
    min_present: int = 200
    # The drift check and alert fire where the drift trigger does (TriggerPolicy.drift_psi).
    psi_threshold: float = active().declared("retrain", TriggerPolicy).drift_psi
    reference_rows: int = 50_000
    # Serving is compared with the champion's train split less its first weeks, while the
    # rolling features filled (the fraud features' 30-day windows plus 10 days of label delay;
    # shortened on a short history, decision 26).
    reference_warm_up_days: float | None = 40.0
    max_unknown_entity_rate: float = 0.01
    max_missing_rate: float = 0.05
    # Per feature view; a view not named here gets half its TTL (no limit without a TTL).
    max_staleness_hours: dict[str, float] = {}
    label_maturity_days: float = active().label.maturity_days
    quality_window_days: float = 7.0


def champion_of(storage: LooplineStorage):
    """The home's registry and its champion's record (None before the first promotion)."""
    registry = Registry.for_settings(storage.settings)
    version = registry.get_alias(CHAMPION)
    return registry, (registry.get(version) if version else None)


def _serving_window(
    settings: Settings, version: str, config: MonitoringConfig
) -> tuple[pl.DataFrame, int]:
    """The champion's newest answered predictions by event time (see ``MonitoringConfig``),
    and how many compacted files it took to find them."""
    return served_window(
        compacted_spans(_log_store(settings)),
        version,
        hours=config.window_hours,
        min_rows=config.window_min_rows,
        max_rows=config.window_max_rows,
    )


@dg.asset(
    group_name=GROUP,
    kinds={"polars"},
    deps=[prediction_log],
    check_specs=[
        dg.AssetCheckSpec(
            "feature_availability",
            asset="serving_availability",
            blocking=False,
            description="Few unknown entities, no feature often missing, online rows fresh (WARN).",
        )
    ],
)
def serving_availability(
    context: dg.AssetExecutionContext, config: MonitoringConfig, storage: LooplineStorage
):
    """Unknown entities, missing features and online-row age in the champion's traffic."""
    settings = storage.settings
    _, champion = champion_of(storage)
    window, files_read = (
        _serving_window(settings, champion.version, config) if champion else (pl.DataFrame(), 0)
    )
    if champion is None or window.height < config.min_rows:
        why = (
            "no champion yet"
            if champion is None
            else f"{window.height} predictions (< {config.min_rows})"
        )
        yield dg.MaterializeResult(
            metadata={"measured": False, "why": why, "log_files_read": files_read}
        )
        yield dg.AssetCheckResult(
            check_name="feature_availability", passed=True, metadata={"measured": False, "why": why}
        )
        return
    measured = availability(window, feature_columns(window))
    limits = {
        view.name: view.ttl.total_seconds() / 2
        for view in storage.feature_store().list_feature_views()
        if view.ttl
    }
    limits.update({v: h * 3600.0 for v, h in config.max_staleness_hours.items()})
    findings = availability_findings(
        measured,
        max_unknown_entity_rate=config.max_unknown_entity_rate,
        max_missing_rate=config.max_missing_rate,
        max_staleness_s=limits,
    )
    report = {
        "champion": champion.version,
        "at": datetime.now(UTC).isoformat(),
        **measured.to_dict(),
        "findings": findings,
        "thresholds": {
            "max_unknown_entity_rate": config.max_unknown_entity_rate,
            "max_missing_rate": config.max_missing_rate,
            "max_staleness_s": limits,
        },
    }
    write_json_atomic(report, _monitoring_dir(settings) / "availability.json")
    if findings:
        alerts.send(alerts.Alert("availability", "; ".join(findings)[:300], report))
    worst = max(measured.missing_rate, key=measured.missing_rate.__getitem__, default=None)
    yield dg.MaterializeResult(
        metadata={
            "measured": True,
            "champion": champion.version,
            "requests": measured.requests,
            "log_files_read": files_read,
            "unknown_entity_rate": measured.unknown_entity_rate,
            "worst_missing_feature": f"{worst} {measured.missing_rate[worst]:.1%}"
            if worst
            else "none",
            "staleness_p95_s": dg.MetadataValue.json(measured.staleness_p95_s),
            "findings": "\n".join(findings) or "none",
            "features": dg.MetadataValue.md(_md_table(_availability_table(measured, limits))),
        }
    )
    yield dg.AssetCheckResult(
        check_name="feature_availability",
        passed=not findings,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"findings": "\n".join(findings) or "none"},
    )


def _availability_table(
    measured: Availability, limits: dict[str, float]
) -> list[dict[str, object]]:
    """Missing rate per feature, worst first, then each feature view's online-row age."""
    rows: list[dict[str, object]] = [
        {"what": f, "missing": f"{r:.1%}", "p50_age_h": "", "p95_age_h": "", "limit_h": ""}
        for f, r in sorted(measured.missing_rate.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    for view, p95 in sorted(measured.staleness_p95_s.items()):
        rows.append(
            {
                "what": view,
                "missing": f"{measured.no_row_rate.get(view, 0.0):.1%} no row",
                "p50_age_h": round(measured.staleness_p50_s[view] / 3600, 2),
                "p95_age_h": round(p95 / 3600, 2),
                "limit_h": round(limits[view] / 3600, 1) if view in limits else "",
            }
        )
    return rows


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
    from models.evaluate import predict
    from models.plots import drift_png, png_markdown

    settings = storage.settings
    _, champion = champion_of(storage)
    if champion is None:
        yield dg.MaterializeResult(metadata={"compared": False, "why": "no champion yet"})
        yield dg.AssetCheckResult(
            check_name="serving_drift", passed=True, metadata={"compared": False}
        )
        return
    serving, files_read = _serving_window(settings, champion.version, config)
    if serving.height < config.min_rows:
        why = f"{serving.height} predictions of {champion.version} in the window (< {config.min_rows})"
        yield dg.MaterializeResult(
            metadata={
                "compared": False,
                "why": why,
                "champion": champion.version,
                "log_files_read": files_read,
            }
        )
        yield dg.AssetCheckResult(
            check_name="serving_drift", passed=True, metadata={"compared": False, "why": why}
        )
        return
    from features.training_set import drift_reference

    module, preprocessor = load_model(champion.artifact_dir)
    spec = preprocessor.spec
    training = pl.read_parquet(
        uri(settings.training_sets / f"{champion.training_set_version}.parquet")
    )
    warm_up = config.reference_warm_up_days
    reference = drift_reference(
        training,
        config.reference_rows,
        warm_up=timedelta(days=warm_up) if warm_up else None,
    )
    held_out = training.filter(pl.col("split") == "test")
    reference_scores = predict(module, preprocessor, held_out)
    result = serving_drift(
        reference.select(spec.columns),
        serving,
        list(spec.numeric),
        list(spec.categorical),
        min_present=config.min_present,
    )
    score_column = log_columns().score
    score = serving_drift(
        pl.DataFrame({score_column: reference_scores}),
        serving.select(score_column),
        [score_column],
        [],
    )
    features = [*result.features, *score.features]
    # PSI of the values present; a feature too rarely present has none (availability's).
    psi = {f.feature: round(f.psi, 4) for f in features if math.isfinite(f.psi)}
    missing = {f.feature: round(f.null_rate_current, 4) for f in features}
    not_measured = sorted(f.feature for f in features if not math.isfinite(f.psi))
    drifted = sorted(f for f, v in psi.items() if v >= config.psi_threshold)
    skew = schema_skew(result)
    table = _drift_table(features)
    report = {
        "champion": champion.version,
        "rows": serving.height,
        "window_start": serving["timestamp"].min().isoformat(),
        "window_end": serving["timestamp"].max().isoformat(),
        "psi": psi,
        "missing_rate": missing,
        "not_measured": not_measured,
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
            "log_files_read": files_read,
            "window_end": report["window_end"],
            "max_psi": max(psi.values(), default=0.0),
            "score_psi": psi.get(log_columns().score, float("nan")),
            "drifted": ", ".join(drifted) or "none",
            "not_measured": ", ".join(not_measured) or "none",
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


def _drift_table(features: "list[FeatureDrift]") -> list[dict[str, object]]:
    """One row per feature: drift of the values present, and how often it was missing."""

    def fmt(x: float | None) -> object:
        return "" if x is None or not math.isfinite(x) else round(x, 4)

    ranked = sorted(features, key=lambda f: -f.psi if math.isfinite(f.psi) else 1.0)
    return [
        {
            "feature": f.feature,
            "psi": fmt(f.psi) if math.isfinite(f.psi) else "not measured",
            "ks": fmt(f.ks),
            "js": fmt(f.js),
            "present": f.count,
            "missing_train": round(f.null_rate_reference, 3),
            "missing_serving": round(f.null_rate_current, 3),
        }
        for f in ranked
    ]


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
    """Live quality over time (a classifier's PR-AUC, a regressor's MAE): realised on
    label-mature predictions, estimated without labels."""

    settings = storage.settings
    registry, champion = champion_of(storage)
    if champion is None:
        return dg.MaterializeResult(metadata={"evaluated": False, "why": "no champion yet"})
    task = task_of(active().task.type)
    m = task.primary_metric
    maturity = timedelta(days=config.label_maturity_days)
    window = timedelta(days=config.quality_window_days)
    judged = _judged(storage, champion.version, maturity + window)
    answered, newest_label_at, label_batch = judged.answered, judged.newest_label_at, judged.batch
    offline = float(champion.metrics.get(m, float("nan")))
    metadata: dict = {
        "champion": champion.version,
        "label_batch": label_batch or "",  # the newest labels batch joined
        f"offline_{m}": offline,
        f"offline_{m}_se": float(champion.metrics.get(f"{m}_se", float("nan"))),
        "log_files_read": judged.files_read,
    }
    metadata.update(_serving_figures(answered, torchserve, storage))
    if not judged.served:
        metadata.update(evaluated=False, labelled=0, why="no answered predictions yet")
        return dg.MaterializeResult(metadata=metadata)
    offline_report = _offline_report(champion)
    quality = live_quality(
        answered,
        newest_label_at,
        label_maturity=maturity,
        window=window,
        reference=offline_report.error_curve if offline_report else None,
    )
    points = _record_live_quality(settings, quality, label_batch, champion.version)
    metadata.update(_quality_metadata(quality), points=points.height)
    if points.height:
        metadata["plot"] = dg.MetadataValue.md(_live_quality_plot(points, registry, offline))
    if quality.value is None:
        why = "no label-mature predictions" + (" of both classes" if task.has_threshold else "")
        metadata.update(evaluated=False, why=why + " yet")
        return dg.MaterializeResult(metadata=metadata)
    cohort, _, _, _ = quality_cohort(
        answered, newest_label_at, label_maturity=maturity, window=window
    )
    threshold = float(champion.metrics.get("threshold") or 0.5)
    live = live_metrics(cohort, threshold, Slicing.of(active()))
    change = (
        (
            quality.value / offline - 1.0
            if m in task.lower_is_better
            else 1.0 - quality.value / offline
        )
        if offline > 0
        else 0.0
    )
    metadata.update({"evaluated": True, f"live_{m}": quality.value, f"{m}_change": change})
    if live is not None:
        for name in ("precision", "recall") if task.has_threshold else ("rmse", "bias"):
            metadata[f"live_{name}"] = float(live.metrics[name])
        metadata["slices"] = dg.MetadataValue.md(_md_table(_slice_rows(live, m)))
        plot = _slice_plot(offline_report, live) if offline_report else None
        if plot is not None:
            metadata[f"plot_by_{active().evaluation.plot_slice}"] = dg.MetadataValue.md(plot)
    return dg.MaterializeResult(metadata=metadata)


def _offline_report(champion) -> "EvaluationReport | None":
    """The champion's own evaluation on its test split (``evaluation.json``), if stored."""
    from models.evaluate import EvaluationReport

    path = Path(champion.artifact_dir) / "evaluation.json"
    if not path.exists():
        return None
    return EvaluationReport.from_dict(json.loads(path.read_text())["reports"]["challenger"])


def _slice_plot(offline: "EvaluationReport", live: "EvaluationReport") -> str | None:
    """The primary metric by the use case's plot slice, offline evaluation beside live."""
    from models.plots import png_markdown, slice_metric_png

    column = active().evaluation.plot_slice
    if column is None:
        return None

    png = slice_metric_png({"offline": offline, "live": live}, column)
    return png_markdown(png, f"{metric_label(task_of(live.task).primary_metric)} by {column}")


def _serving_figures(
    answered: pl.DataFrame, torchserve: TorchServeResource, storage: LooplineStorage
) -> dict[str, object]:
    """Latency of the champion's judged answers (live quality's window) and TorchServe's
    own counters."""
    out: dict[str, object] = {}
    if answered.height:
        out["latency_p50_ms"] = float(answered["latency_ms"].quantile(0.5))
        out["latency_p99_ms"] = float(answered["latency_ms"].quantile(0.99))
    try:
        figures = torchserve_figures(torchserve.process(storage).client(timeout=3).metrics())
        out.update({f"torchserve_{k}": v for k, v in figures.items()})
    except (TorchServeError, OSError) as exc:
        out["torchserve_metrics"] = f"unavailable: {exc}"
    return out


class _Judged(NamedTuple):
    answered: pl.DataFrame
    newest_label_at: datetime | None
    batch: str | None
    files_read: int
    served: bool


def _judged(storage: LooplineStorage, version: str, reach: timedelta) -> _Judged:
    """``version``'s answered predictions, with their labels, from ``reach`` before the newest
    label on (all of them before the first label); how far labelling has got; how many
    compacted files that read; whether ``version`` answered anything at all. Live quality
    judges nothing older: its cohort starts there, and a prediction stays in it, label or
    not, until the newest label is ``label_maturity + window`` younger than it."""
    settings = storage.settings
    label_spans = _label_spans(settings)
    newest_label_at, batch = _label_state(storage, label_spans)
    start = newest_label_at - reach if newest_label_at else None
    spans = compacted_spans(_log_store(settings))
    predictions, files_read = judged_since(spans, start)
    joined = join_labels(predictions, _labels_since(settings, label_spans, start))
    answered = joined.filter(pl.col("model_version") == version)
    return _Judged(answered, newest_label_at, batch, files_read, answered_count(spans, version) > 0)


def _label_state(storage: LooplineStorage, spans: list[Span]) -> tuple[datetime | None, str | None]:
    """The newest label's time (how far labelling has got) and the newest label batch."""
    declared = active().label
    newest = max((s.end for s in spans if s.end is not None), default=None)
    batches = storage.ledger.batches(dataset=declared.dataset, status="validated", limit=1)
    return newest, (batches[0].batch_id if batches else None)


def _record_live_quality(
    settings: Settings, quality: LiveQuality, label_batch: str | None, champion: str
) -> pl.DataFrame:
    """Append this run's point unless the newest labels batch was already scored for this
    champion (then nothing new is known); the points so far, oldest first."""
    folder = _monitoring_dir(settings)
    points = read_live_quality(folder)
    if points.height:
        last = points.row(-1, named=True)
        if last["label_batch"] == label_batch and last["champion"] == champion:
            return points
    row = live_quality_row(
        quality, at=datetime.now(UTC), label_batch=label_batch, champion=champion
    )
    return append_live_quality(row, folder)


def _quality_metadata(quality: LiveQuality) -> dict[str, object]:
    def num(x: float | None) -> float:
        return float("nan") if x is None else float(x)

    m = quality.metric
    out: dict[str, object] = {
        "cohort_start": str(quality.cohort_start) if quality.cohort_start else "none",
        "cohort_end": str(quality.cohort_end) if quality.cohort_end else "none",
        "labelled": quality.labelled,
        f"estimated_{m}": num(quality.estimated),
        "estimate_error": num(quality.estimate_error),
        "recent": quality.recent,
        f"estimated_{m}_unlabelled": num(quality.estimated_unlabelled),
        f"estimated_{m}_unlabelled_se": num(quality.estimated_unlabelled_se),
        f"live_{m}_se": num(quality.value_se),
    }
    if quality.positives is not None:
        out["positives"] = quality.positives
    return out


def _live_quality_plot(points: pl.DataFrame, registry: Registry, offline: float) -> str:
    from models.plots import live_quality_png, png_markdown

    promotions = [
        (datetime.fromisoformat(e.at), e.version or "")
        for e in registry.events()
        if e.kind == "promoted"
    ]
    task = task_of(active().task.type)
    png = live_quality_png(points.to_dicts(), promotions, offline, task=task.name)
    return png_markdown(png, f"live {metric_label(task.primary_metric)} over time")


def _slice_rows(live: "EvaluationReport", metric: str) -> list[dict[str, object]]:
    second = "recall" if task_of(live.task).has_threshold else "bias"
    return [
        {
            "slice": f"{s.column}={s.value}",
            "support": s.support,
            metric: round(s.metrics.get(metric, float("nan")), 4),
            second: round(s.metrics.get(second, float("nan")), 4),
        }
        for s in live.slices
    ]


def monitoring_costs(
    instance: dg.DagsterInstance, job_name: str = "monitoring", limit: int = 1000
) -> list[dict[str, object]]:
    """Each finished monitoring run, oldest first: its wall time, the history it ran over
    (compacted files and rows) and the files each window read, so a long run can show that a
    run's cost stays flat as history grows."""
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=limit)
    out = []
    for record in reversed(records):
        if record.start_time is None or record.end_time is None:
            continue
        row: dict[str, object] = {
            "run_id": record.dagster_run.run_id,
            "started": record.start_time,
            "seconds": record.end_time - record.start_time,
        }
        events = instance.all_logs(
            record.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        )
        for event in events:
            materialization = event.asset_materialization
            asset = materialization.asset_key.to_user_string()
            for key in ("compacted_files", "compacted_rows", "log_files_read"):
                if key in materialization.metadata:
                    row[f"{asset}.{key}"] = materialization.metadata[key].value
        out.append(row)
    return out


monitoring_job = dg.define_asset_job(
    "monitoring",
    selection=dg.AssetSelection.assets(
        prediction_log, serving_availability, drift_report, live_performance
    ),
    executor_def=dg.in_process_executor,
    tags=lane("monitoring"),
    description=(
        "Compact the prediction log, join labels, measure availability, drift and live quality."
    ),
)


@dg.sensor(
    job=monitoring_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Runs monitoring when the serving log has new closed files, a log writer "
    "reports a failure or dropped records, or labels arrived.",
)
def monitoring_sensor(
    context: dg.SensorEvaluationContext, storage: LooplineStorage, torchserve: TorchServeResource
):
    settings = storage.settings
    log_dir = _log_dir(settings, torchserve, storage)
    files = [p.name for p in closed_files(log_dir)]
    labels = storage.ledger.batches(dataset=active().label.dataset, status="validated", limit=1)
    state = f"{len(files)}:{files[-1] if files else ''}:{labels[0].batch_id if labels else ''}"
    # A writer that fails may close no file at all: its health alone must start a run.
    troubled = [w for w in writer_health(log_dir) if w.get("dropped") or not w.get("healthy")]
    if troubled:
        state += ":" + ",".join(
            f"{w.get('pid')}/{w.get('dropped')}/{w.get('healthy')}" for w in troubled
        )
    if state == context.cursor or not (files or troubled):
        return dg.SkipReason("nothing new in the serving log or the labels")
    if run_in_flight(context.instance, monitoring_job.name) is not None:
        return dg.SkipReason("a monitoring run is in flight")
    context.update_cursor(state)
    return dg.RunRequest()


defs = dg.Definitions(
    assets=[prediction_log, serving_availability, drift_report, live_performance],
    jobs=[monitoring_job],
    sensors=[monitoring_sensor],
)
