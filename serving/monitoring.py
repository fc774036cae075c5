"""What monitoring reads from serving: the compacted prediction log, joined to late labels.

``compact`` turns closed JSON-lines log files into parquet, once each: the output name is a hash
of the inputs, and a manifest written after it records which files are done (the watermark: a
run reads only the log files closed since), so a crash between the two only rewrites the same
file; small compacted files are merged (``merge_small``). Torn log lines are skipped and
counted (``Compaction.torn_lines``); ``writer_news`` tells which log writers failed or dropped
records since the last run. Each compacted file's event-time span
is indexed (``compacted_spans``), so the windows monitoring judges (``served_window``,
``judged_since``) read only the files that reach them, and give what a read of the whole log
would. Synthetic traffic (smoke, shadow and watch requests sent by the deployment step) is
left out. Each row keeps its request, the model's inputs, the names of the features it was
scored without (``missing_features``), its unknown entities and, per feature view, the age of
the online row used (``feature_age_s__<view>``; absent in logs older than it).

Availability and drift are separate signals: ``availability`` measures how often features were
missing and how old the online rows were; ``serving_drift`` compares the values that were
present with what the champion was trained on, so a feature missing in most requests reads as
missing, not as drift. ``live_metrics`` scores predictions whose labels have arrived;
``live_quality`` is one point of the live metric over time (realised on a label-mature cohort,
estimated without labels by CBPE), appended to ``live_quality.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from core.storage import uri, write_json_atomic, write_parquet_atomic
from core.usecase import UseCase, active
from models.tasks import BINARY, ErrorCurve, expected_mae, task_of_metric
from models.tasks import of as task_of
from quality import drift
from quality.schema import UTC_TS
from serving import time_spans
from serving.delivery import SYNTHETIC_PREFIXES
from serving.prediction_log import ReadStats, closed_files, file_records, writer_health
from serving.time_spans import Span

if TYPE_CHECKING:
    from models.evaluate import EvaluationReport
    from models.spec import Slicing

MANIFEST = "_compacted.json"
SPANS = "_spans.json"
MERGING = "_merging.json"
WRITERS = "_writers.json"
LIVE_QUALITY_FILE = "live_quality.parquet"
AGE_PREFIX = "feature_age_s__"


@dataclass(frozen=True)
class LogColumns:
    """The use case's names in the prediction log: the request's id, the score, the request's
    time and its other fields, and the label's time once joined (``join_labels``)."""

    id: str
    score: str
    time: str
    request: tuple[str, ...]
    label_time: str

    @classmethod
    def of(cls, uc: UseCase | None = None) -> LogColumns:
        uc = uc or active()
        return cls(
            id=uc.request.id,
            score=uc.task.score,
            time=uc.timestamp_field,
            request=tuple(f for f in uc.request.fields if f != uc.request.id),
            label_time=uc.label.time,
        )

    @property
    def base_schema(self) -> dict[str, pl.DataType]:
        """The compacted log's columns besides the request fields and features."""
        return {
            "logged_at": UTC_TS,
            "status": pl.Int64(),
            "model_version": pl.String(),
            self.id: pl.String(),
            self.score: pl.Float64(),
            "decision": pl.String(),
            "latency_ms": pl.Float64(),
            "n_missing_features": pl.Int64(),
            "unknown_entity": pl.Boolean(),
            "missing_features": pl.List(pl.String()),
            "unknown_entities": pl.List(pl.String()),
        }


def log_columns() -> LogColumns:
    """``LogColumns`` of the active use case."""
    return LogColumns.of()


@dataclass(frozen=True)
class Compaction:
    """One compaction: its output, the log files and rows it took, the refused requests among
    them, and the torn lines it skipped (``torn_files``: the files that held them)."""

    path: Path | None
    files: int
    rows: int
    errors: int
    torn_lines: int = 0
    torn_files: tuple[str, ...] = ()


def _flatten(record: dict[str, Any], cols: LogColumns) -> dict[str, Any] | None:
    tid = record.get(cols.id)
    if isinstance(tid, str) and tid.startswith(SYNTHETIC_PREFIXES):
        return None
    request = record.get("request") or {}
    row: dict[str, Any] = {
        "logged_at": record.get("logged_at"),
        "status": record.get("status"),
        "model_version": record.get("model_version"),
        cols.id: tid,
        cols.score: record.get(cols.score),
        "decision": record.get("decision"),
        "latency_ms": record.get("latency_ms"),
        "n_missing_features": len(record.get("missing_features") or []),
        "unknown_entity": bool(record.get("unknown_entities")),
    }
    if record.get("status") == 200:
        row["missing_features"] = list(record.get("missing_features") or [])
        row["unknown_entities"] = list(record.get("unknown_entities") or [])
    for view, age in (record.get("feature_age_s") or {}).items():
        row[f"{AGE_PREFIX}{view}"] = age
    for column in cols.request:
        row[column] = request.get(column)
    for name, value in (record.get("features") or {}).items():
        row.setdefault(name, value)
    return row


def compact(log_dir: str | Path, out_dir: str | Path) -> Compaction:
    """Compact the closed log files not compacted yet into one parquet file."""
    out = Path(out_dir)
    present = closed_files(log_dir)
    done = _compacted_names(out)
    todo = [p for p in present if p.name not in done]
    if not todo:
        return Compaction(None, 0, 0, 0)
    rows = []
    cols = log_columns()
    stats = ReadStats()
    torn_files = []
    for path in todo:
        torn_before = stats.torn_lines
        for record in file_records(path, stats):
            if (row := _flatten(record, cols)) is not None:
                rows.append(row)
        if stats.torn_lines > torn_before:
            torn_files.append(path.name)
    target = out / _compacted_name([p.name for p in todo])
    frame = _typed(pl.from_dicts(rows, infer_schema_length=None), cols) if rows else None
    if frame is not None and frame.height:
        write_parquet_atomic(frame, target)
    # Files the log's size bound deleted drop out of the manifest, so it stays bounded too.
    write_json_atomic(sorted({p.name for p in present}), out / MANIFEST)
    errors = 0 if frame is None else frame.filter(pl.col("status") != 200).height
    path = target if frame is not None else None
    return Compaction(path, len(todo), len(rows), errors, stats.torn_lines, tuple(torn_files))


def _compacted_names(out: Path) -> set[str]:
    """The log files compacted already (the manifest: the watermark)."""
    manifest_path = out / MANIFEST
    return set(json.loads(manifest_path.read_text())) if manifest_path.exists() else set()


def uncompacted(log_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """The closed log files the next compaction will take."""
    done = _compacted_names(Path(out_dir))
    return [p for p in closed_files(log_dir) if p.name not in done]


def writer_news(log_dir: str | Path, out_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """The log writers' health (``prediction_log.writer_health``) and, among them, those with
    news since the last call: a new outage (unhealthy now, healthy then), or records dropped
    while healthy then (a full queue, or an outage that began and ended in between). The
    counters seen are kept in ``WRITERS`` beside the compacted log, so an outage is news once,
    not at every run while it lasts, nor again when the writer recovers."""
    state_path = Path(out_dir) / WRITERS
    seen = json.loads(state_path.read_text()) if state_path.exists() else {}
    writers = writer_health(log_dir)
    news = []
    for health in writers:
        before = seen.get(_writer_key(health), {"healthy": True, "dropped": 0})
        outage = not health.get("healthy", True) and before["healthy"]
        dropped = health.get("dropped", 0) > before["dropped"] and before["healthy"]
        if outage or dropped:
            news.append(health)
    now = {
        _writer_key(h): {"healthy": bool(h.get("healthy", True)), "dropped": h.get("dropped", 0)}
        for h in writers
    }
    if now != seen:
        write_json_atomic(now, state_path)
    return writers, news


def _writer_key(health: Mapping[str, Any]) -> str:
    return f"{health.get('prefix')}-{health.get('pid')}"


def _compacted_name(sources: Sequence[str]) -> str:
    """A compacted file's name: a hash of what it was made from, so a retry rewrites it."""
    digest = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]
    return f"predictions-{digest}.parquet"


def _typed(frame: pl.DataFrame, cols: LogColumns) -> pl.DataFrame:
    casts = [
        pl.col(c).str.to_datetime(time_zone="UTC", strict=False).cast(t)
        if t == UTC_TS
        else pl.col(c).cast(t, strict=False)
        for c, t in cols.base_schema.items()
        if c in frame.columns
    ]
    ages = [
        pl.col(c).cast(pl.Float64, strict=False) for c in frame.columns if c.startswith(AGE_PREFIX)
    ]
    frame = frame.with_columns(casts + ages)
    if cols.time in frame.columns and frame.schema[cols.time] == pl.String:
        frame = frame.with_columns(
            pl.col(cols.time).str.to_datetime(time_zone="UTC", strict=False).cast(UTC_TS)
        )
    return frame


def read_compacted(out_dir: str | Path, since: datetime | None = None) -> pl.DataFrame:
    """Every compacted prediction (logged at or after ``since``), errors included."""
    files = sorted(Path(out_dir).glob("predictions-*.parquet"))
    if not files:
        return pl.DataFrame(schema=log_columns().base_schema)
    frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    if since is not None:
        frame = frame.filter(pl.col("logged_at") >= since)
    return frame


def answered_once(predictions: pl.DataFrame) -> pl.DataFrame:
    """Answered predictions, a request scored twice (a client retry) once: its first answer."""
    return (
        predictions.filter(pl.col("status") == 200)
        .sort("logged_at", maintain_order=True)
        .unique(log_columns().id, keep="first", maintain_order=True)
    )


def join_labels(predictions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Answered predictions (``answered_once``) with the label of their request where it has
    arrived (``label``: 0/1 for a classifier, the value for a regressor; and the label
    dataset's time column), as the use case's ``label`` declares them."""
    declared = active().label
    key = log_columns().id
    known = labels.select(
        pl.col(declared.key).alias(key),
        pl.col(declared.column).cast(task_of(active().task.type).label_dtype).alias("label"),
        declared.time,
    ).unique(key, keep="last", maintain_order=True)
    return answered_once(predictions).join(known, on=key, how="left", maintain_order="left")


def compacted_spans(out_dir: str | Path) -> list[Span]:
    """The event-time span of every compacted file, with its answered rows per model version
    (``facts["answered"]``); each new file is read once for it (``serving.time_spans``)."""
    out = Path(out_dir)
    return time_spans.spans(
        out, "predictions-*.parquet", log_columns().time, out / SPANS, _answered_by_version
    )


def _answered_by_version(frame: pl.LazyFrame) -> dict[str, Any]:
    counts = frame.filter(pl.col("status") == 200).group_by("model_version").len().collect()
    return {"answered": {str(v): int(n) for v, n in counts.iter_rows()}}


def answered_count(spans: Sequence[Span], version: str) -> int:
    """How many answers ``version`` gave in the compacted log (retries counted)."""
    return sum(s.facts.get("answered", {}).get(version, 0) for s in spans)


def served_totals(spans: Sequence[Span], *, latest_rows: int = 10_000) -> dict[str, Any] | None:
    """Requests, refusals and answers per version over the compacted log, from its span index
    alone; latency quantiles over the answers among the newest ``latest_rows`` requests (the
    newest files only). What ``loopline status`` shows: it costs the index and a few files,
    however long the history. None before anything was compacted."""
    if not spans:
        return None
    by_version: dict[str, int] = {}
    for span in spans:
        for version, n in span.facts.get("answered", {}).items():
            by_version[version] = by_version.get(version, 0) + n
    newest, taken = [], 0
    for span in time_spans.newest_first(spans):
        if taken >= latest_rows:
            break
        newest.append(span)
        taken += span.rows
    answered = read_spans(newest).filter(pl.col("status") == 200)
    latency = answered["latency_ms"] if "latency_ms" in answered.columns else pl.Series([])
    requests = sum(s.rows for s in spans)
    return {
        "requests": requests,
        "refused": requests - sum(by_version.values()),
        "latency_p50_ms": float(latency.quantile(0.5) or 0.0) if latency.len() else 0.0,
        "latency_p99_ms": float(latency.quantile(0.99) or 0.0) if latency.len() else 0.0,
        "latency_answers": answered.height,
        "by_version": dict(sorted(by_version.items())),
    }


def read_spans(chosen: Sequence[Span]) -> pl.DataFrame:
    """The rows of these compacted files, in the order a read of the whole folder meets them,
    so what is computed on them equals what the whole log gives for the rows they hold."""
    ordered = time_spans.in_name_order(chosen)
    if not ordered:
        cols = log_columns()
        return pl.DataFrame(schema={**cols.base_schema, cols.time: UTC_TS})
    return pl.concat([pl.read_parquet(uri(s.path)) for s in ordered], how="diagonal_relaxed")


def merge_small(out_dir: str | Path, *, target_bytes: int = 32 << 20, most_small: int = 32) -> int:
    """Merge the ``most_small`` oldest (by event time) compacted files under ``target_bytes``
    into one once there are more of them; returns how many were merged (0: none).

    Each monitoring run compacts what it found into a file of its own: thousands of small
    files a day, each opened by every window that reaches it. Merged files that stay small are
    merged again, so files grow towards ``target_bytes``. The merge is written as an intent
    (``MERGING``) first, then the merged file, then the parts are deleted; a crash in between
    is finished (or forgotten, if the merged file is not there) by the next call, so no row is
    ever counted twice or lost."""
    out = Path(out_dir)
    _finish_merge(out)
    small = [s for s in compacted_spans(out) if s.size < target_bytes]
    if len(small) <= most_small:
        return 0
    small.sort(key=lambda s: (s.end is not None, s.end.timestamp() if s.end else 0.0, s.path.name))
    parts = time_spans.in_name_order(small[:most_small])
    names = [s.path.name for s in parts]
    target = out / _compacted_name(names)
    write_json_atomic({"into": target.name, "parts": names}, out / MERGING)
    write_parquet_atomic(read_spans(parts), target)
    _finish_merge(out)
    return len(parts)


def _finish_merge(out: Path) -> None:
    """Complete a merge whose merged file was written; forget one whose file was not."""
    intent_path = out / MERGING
    if not intent_path.exists():
        return
    intent = json.loads(intent_path.read_text())
    if (out / intent["into"]).exists():
        for name in intent["parts"]:
            if name != intent["into"]:
                (out / name).unlink(missing_ok=True)
    intent_path.unlink()


def serving_drift(
    reference: pl.DataFrame,
    serving: pl.DataFrame,
    numeric: list[str],
    categorical: list[str],
    min_present: int = 1,
) -> drift.DriftResult:
    """Per-feature drift (PSI; KS numeric; Jensen-Shannon categorical) of serving vs training.

    Statistics are computed on the values present; each feature's missing rate stands beside
    them (``null_rate_current``). A feature present in fewer than ``min_present`` requests has
    no drift figure (PSI NaN): a few values say nothing about a distribution, and a feature
    that is mostly missing is an availability problem (``availability``), not drift.
    The score is compared like a feature when both frames carry the use case's score column.
    Categories the reference never saw are part of each feature's result.
    """
    # A feature training never saw a value of (e.g. a chargeback rate before any label) has
    # no reference distribution to compare with.
    present = {c for c in reference.columns if reference[c].null_count() < reference.height}
    numeric = [c for c in numeric if c in present]
    categorical = [c for c in categorical if c in present]
    for column in [*numeric, *categorical]:
        if column not in serving.columns:
            serving = serving.with_columns(
                pl.lit(None, dtype=reference.schema[column]).alias(column)
            )
    profile = drift.build_profile(reference, numeric, categorical)
    result = drift.compare(profile, serving)
    return drift.DriftResult(
        [
            f if f.count >= min_present else replace(f, psi=math.nan, ks=None, js=None)
            for f in result.features
        ],
        result.row_count,
    )


def schema_skew(result: drift.DriftResult, max_null_increase: float = 0.1) -> list[str]:
    """Plain-words findings: features serving lacks more often than training, new categories."""
    findings = []
    for f in result.features:
        if f.null_rate_current - f.null_rate_reference > max_null_increase:
            findings.append(
                f"{f.feature}: missing in {f.null_rate_current:.0%} of requests "
                f"(training {f.null_rate_reference:.0%})"
            )
        if f.new_categories:
            findings.append(f"{f.feature}: unexpected categories {sorted(f.new_categories)[:5]}")
    return findings


def live_metrics(
    joined: pl.DataFrame, threshold: float, slicing: Slicing, task: str | None = None
) -> EvaluationReport | None:
    """The task's metrics on labelled predictions (a classifier's PR-AUC, precision, recall at
    ``threshold``; a regressor's MAE, RMSE, bias), overall and per slice."""
    from models.evaluate import evaluate_scores, with_buckets

    task = task or active().task.type
    labelled = joined.filter(pl.col("label").is_not_null())
    needed = 2 if task == BINARY else 1  # classes, or distinct values
    if labelled.height < 2 or labelled["label"].n_unique() < needed:
        return None
    labelled = with_buckets(labelled, slicing.buckets)
    present = tuple(c for c in slicing.columns if c in labelled.columns)
    return evaluate_scores(
        "live",
        labelled["label"].to_numpy().astype(np.float64),
        labelled[log_columns().score].to_numpy().astype(np.float64),
        threshold,
        labelled,
        slice_columns=present,
        split="live",
        threshold_split="serving",
        task=task,
    )


def event_window(
    served: pl.DataFrame,
    *,
    hours: float,
    min_rows: int,
    max_rows: int,
    seed: int = 0,
) -> pl.DataFrame:
    """The newest served predictions by event time (the request's ``timestamp``).

    Those within ``hours`` of the newest one; widened to the newest ``min_rows`` when those
    hours hold fewer; a seeded uniform sample of ``max_rows`` when they hold more (a sample,
    not the newest rows, so the window still spans whole daily cycles). Event time rather than
    the log's wall-clock ``logged_at``: an accelerated simulated clock and a real one give the
    same windows. Ties in event time are ordered by request id, so the window does not depend
    on the order the rows were read in.
    """
    cols = log_columns()
    time = cols.time
    order = [time, cols.id] if cols.id in served.columns else [time]
    timed = served.filter(pl.col(time).is_not_null()).sort(order)
    if timed.height == 0:
        return timed
    since = timed[time][-1] - timedelta(hours=hours)
    recent = timed.filter(pl.col(time) > since)
    if recent.height < min_rows:
        recent = timed.tail(min_rows)
    if recent.height > max_rows:
        recent = recent.sample(max_rows, seed=seed).sort(order)
    return recent


def served_window(
    spans: Sequence[Span], version: str, *, hours: float, min_rows: int, max_rows: int
) -> tuple[pl.DataFrame, int]:
    """``event_window`` of ``version``'s answered predictions in the compacted files of
    ``spans``, and how many of those files it read.

    Files are read newest event time first, their number doubling each round, until no unread
    file can change the window: every unread row is older than the newest of ``version`` by
    more than ``hours``, and ``min_rows`` of its rows are newer than any unread one. The window
    equals the one of the whole log as long as a request id, retried, keeps its event time.
    """
    order = time_spans.newest_first(spans)
    if not order:
        return pl.DataFrame(), 0
    frames: dict[Path, pl.DataFrame] = {}
    time = pl.col(log_columns().time)
    answered = pl.DataFrame(schema=log_columns().base_schema)
    taken = 0
    while taken < len(order):
        taken = min(len(order), max(1, 2 * taken))
        for span in order[:taken]:
            if span.path not in frames:
                frames[span.path] = pl.read_parquet(uri(span.path))
        whole = pl.concat(
            [frames[s.path] for s in time_spans.in_name_order(order[:taken])],
            how="diagonal_relaxed",
        )
        answered = answered_once(whole).filter(pl.col("model_version") == version)
        bound = order[taken].end if taken < len(order) else None
        certain = answered.filter(time.is_not_null() & (time > bound)) if bound else answered
        if bound is None or (
            certain.height >= max(min_rows, 1)
            and certain[log_columns().time].max() - timedelta(hours=hours) >= bound
        ):
            break
    window = event_window(answered, hours=hours, min_rows=min_rows, max_rows=max_rows)
    return window, taken


def judged_since(spans: Sequence[Span], start: datetime | None) -> tuple[pl.DataFrame, int]:
    """Every prediction of the compacted files of ``spans`` with an event time at or after
    ``start`` (all if None), and how many files that read: only those whose span reaches it."""
    chosen = time_spans.since(spans, start)
    frame = read_spans(chosen)
    if start is not None:
        frame = frame.filter(pl.col(log_columns().time) >= start)
    return frame, len(chosen)


def feature_columns(frame: pl.DataFrame) -> list[str]:
    """The model-input columns of a compacted (or joined) log frame: not the log's own
    columns, the request's entity keys and time, nor the label."""
    uc = active()
    cols = log_columns()
    keys = set(uc.request.entity_keys) | {cols.time, cols.id}
    others = {*cols.base_schema, *keys, "label", cols.label_time}
    return [c for c in frame.columns if c not in others and not c.startswith(AGE_PREFIX)]


def _missing(frame: pl.DataFrame, feature: str) -> pl.Expr:
    """Per row: was ``feature`` scored without a value? From the row's ``missing_features``
    where logged, else from a null value (logs older than that column)."""
    by_value = pl.col(feature).is_null() if feature in frame.columns else pl.lit(True)
    if "missing_features" not in frame.columns:
        return by_value
    listed = pl.col("missing_features")
    return pl.when(listed.is_not_null()).then(listed.list.contains(feature)).otherwise(by_value)


@dataclass(frozen=True)
class Availability:
    """How much of what the model needed serving had, over a window of answered requests.

    ``missing_rate``: per feature, the share of requests scored without it (imputed).
    ``unknown_entity_rate``: the share of requests with an entity the online store did not
    know (every feature of that entity missing); per entity in ``unknown_entity_rate_by``.
    ``staleness_p50_s``/``staleness_p95_s``: per feature view, quantiles of the age of the
    online rows used (request time minus the row's event time), over rows that had one;
    ``no_row_rate``: the share of requests with no live row for the view (absent or expired).
    """

    requests: int
    unknown_entity_rate: float
    unknown_entity_rate_by: dict[str, float]
    missing_rate: dict[str, float]
    staleness_p50_s: dict[str, float]
    staleness_p95_s: dict[str, float]
    no_row_rate: dict[str, float]
    window_start: datetime | None = None
    window_end: datetime | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON (times as ISO-8601)."""
        out = asdict(self)
        for key in ("window_start", "window_end"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


def availability(frame: pl.DataFrame, features: Sequence[str] | None = None) -> Availability:
    """Availability over the answered requests of ``frame`` (a compacted log window)."""
    answered = frame.filter(pl.col("status") == 200) if "status" in frame.columns else frame
    n = answered.height
    names = list(features) if features is not None else feature_columns(answered)
    missing: dict[str, float] = {}
    unknown_by: dict[str, float] = {}
    if n:
        rates = answered.select(_missing(answered, f).mean().alias(f) for f in names)
        missing = {f: float(rates[f][0]) for f in names} if names else {}
    if n and "unknown_entities" in answered.columns:
        exploded = answered.select(pl.col("unknown_entities").explode().drop_nulls())
        counts = exploded.group_by("unknown_entities").len().iter_rows()
        unknown_by = {str(e): c / n for e, c in counts}
    unknown = (
        float(answered["unknown_entity"].fill_null(False).mean())
        if n and "unknown_entity" in answered.columns
        else 0.0
    )
    p50: dict[str, float] = {}
    p95: dict[str, float] = {}
    no_row: dict[str, float] = {}
    for column in (c for c in answered.columns if c.startswith(AGE_PREFIX)):
        view = column.removeprefix(AGE_PREFIX)
        ages = answered[column].drop_nulls()
        no_row[view] = 1.0 - ages.len() / n if n else 0.0
        if ages.len():
            p50[view] = float(ages.quantile(0.5, "linear"))
            p95[view] = float(ages.quantile(0.95, "linear"))
    time = log_columns().time
    times = answered[time].drop_nulls() if time in answered.columns else None
    return Availability(
        requests=n,
        unknown_entity_rate=unknown,
        unknown_entity_rate_by=dict(sorted(unknown_by.items())),
        missing_rate=missing,
        staleness_p50_s=p50,
        staleness_p95_s=p95,
        no_row_rate=no_row,
        window_start=times.min() if times is not None and times.len() else None,
        window_end=times.max() if times is not None and times.len() else None,
    )


def availability_findings(
    measured: Availability,
    *,
    max_unknown_entity_rate: float,
    max_missing_rate: float,
    max_staleness_s: dict[str, float],
) -> list[str]:
    """Plain-words breaches of the availability thresholds; empty when all is well."""
    findings = []
    if measured.unknown_entity_rate > max_unknown_entity_rate:
        by = ", ".join(f"{e} {r:.1%}" for e, r in measured.unknown_entity_rate_by.items())
        findings.append(
            f"unknown entities in {measured.unknown_entity_rate:.1%} of requests "
            f"(> {max_unknown_entity_rate:.1%}){f': {by}' if by else ''}"
        )
    over = {f: r for f, r in measured.missing_rate.items() if r > max_missing_rate}
    if over:
        worst = sorted(over, key=lambda f: (-over[f], f))
        shown = ", ".join(f"{f} {over[f]:.0%}" for f in worst[:5])
        more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        findings.append(
            f"{len(over)} feature{'s' if len(over) > 1 else ''} missing in more than "
            f"{max_missing_rate:.0%} of requests: "
            f"{shown}{more}"
        )
    for view, p95 in sorted(measured.staleness_p95_s.items()):
        limit = max_staleness_s.get(view)
        if limit is not None and p95 > limit:
            findings.append(
                f"{view}: online rows {p95 / 3600:.1f} h old at p95 (> {limit / 3600:.1f} h)"
            )
    return findings


_COMMON_QUALITY_COLUMNS: dict[str, pl.DataType] = {
    "at": UTC_TS,
    "label_batch": pl.String(),
    "champion": pl.String(),
    "cohort_start": UTC_TS,
    "cohort_end": UTC_TS,
    "labelled": pl.Int64(),
}


def live_quality_schema(task: str | None = None) -> dict[str, pl.DataType]:
    """The columns of ``live_quality.parquet`` for a task (the active use case's by default):
    the common ones, then the task's primary metric ``m`` realised (``m``, ``m_se``), estimated
    on the same labelled predictions (``estimated_m``, ``estimate_error``) and on the newest
    ones (``recent``, ``estimated_m_unlabelled``, ``estimated_m_unlabelled_se``); a
    classifier's cohort also counts its ``positives``."""

    kind = task_of(task or active().task.type)
    m = kind.primary_metric
    counted = {"positives": pl.Int64()} if kind.name == BINARY else {}
    return {
        **_COMMON_QUALITY_COLUMNS,
        **counted,
        m: pl.Float64(),
        f"{m}_se": pl.Float64(),
        f"estimated_{m}": pl.Float64(),
        "estimate_error": pl.Float64(),
        "recent": pl.Int64(),
        f"estimated_{m}_unlabelled": pl.Float64(),
        f"estimated_{m}_unlabelled_se": pl.Float64(),
    }


@dataclass(frozen=True)
class LiveQuality:
    """One point of the live metric (``metric``, the task's primary one: a classifier's
    PR-AUC, a regressor's MAE): realised on a label-mature cohort, estimated without labels.

    ``value`` is the metric on the cohort's labelled predictions (a classifier's needs both
    classes there); ``estimated`` is the label-free estimate on those same predictions (CBPE
    for a classifier, ``models.tasks.expected_mae`` for a regressor), so ``estimate_error``
    (estimated - realised) measures the estimate. ``recent`` predictions are those too new for
    the cohort (labels not all in); ``estimated_unlabelled`` is the estimate on them: the
    label-free view of what is served now. The ``_se`` fields are standard errors: how far each
    figure may move by chance, which the decay trigger weighs before it calls a change real.
    """

    metric: str
    cohort_start: datetime | None
    cohort_end: datetime | None
    labelled: int
    positives: int | None
    value: float | None
    estimated: float | None
    recent: int
    estimated_unlabelled: float | None
    value_se: float | None = None
    estimated_unlabelled_se: float | None = None

    @property
    def estimate_error(self) -> float | None:
        if self.value is None or self.estimated is None:
            return None
        return self.estimated - self.value


def _cbpe(scores: pl.Series) -> float | None:
    from models.metrics import expected_average_precision

    value = expected_average_precision(scores.to_numpy().astype(np.float64))
    return None if math.isnan(value) else value


def _cbpe_se(scores: pl.Series) -> float | None:
    from models.metrics import expected_average_precision_se

    value = expected_average_precision_se(scores.to_numpy().astype(np.float64))
    return None if math.isnan(value) else value


def quality_cohort(
    predictions: pl.DataFrame,
    newest_label_at: datetime | None,
    *,
    label_maturity: timedelta = timedelta(days=7),
    window: timedelta = timedelta(days=7),
    columns: LogColumns | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, datetime | None, datetime | None]:
    """Split predictions into the label-mature cohort and the recent ones (see ``live_quality``):
    ``(cohort, recent, cohort_start, cohort_end)``."""
    if newest_label_at is None:
        return predictions.clear(), predictions, None, None
    end = newest_label_at - label_maturity
    start = end - window
    t = pl.col((columns or log_columns()).time)
    return predictions.filter((t > start) & (t <= end)), predictions.filter(t > end), start, end


def live_quality(
    predictions: pl.DataFrame,
    newest_label_at: datetime | None,
    *,
    label_maturity: timedelta = timedelta(days=7),
    window: timedelta = timedelta(days=7),
    task: str | None = None,
    reference: Any = None,
    columns: LogColumns | None = None,
) -> LiveQuality:
    """The live metric of one model's answered predictions (joined to labels, ``join_labels``).

    Labels arrive late and at different delays (in the fraud demo, fraud in 1-10 days by
    chargeback, legit after the 7-day settlement), so the predictions of the last few days
    have some labels but not all: a metric over them is biased. The cohort is therefore the
    predictions whose request time lies at least ``label_maturity`` before the newest label's
    time, within a trailing ``window`` of event time:
    ``(newest_label_at - label_maturity - window, newest_label_at - label_maturity]``. Event
    time (the request's ``timestamp``), not the log's wall clock, so an accelerated demo clock
    and a real one give the same cohorts. With no labels yet, there is no cohort and every
    prediction is recent. ``task`` and ``columns`` (the log's names): the active use case's by
    default; ``reference``: a regressor's ``ErrorCurve`` (its champion's, from evaluation),
    without which it has no label-free estimate.
    """

    kind = task_of(task or active().task.type)
    columns = columns or log_columns()
    cohort, recent, start, end = quality_cohort(
        predictions, newest_label_at, label_maturity=label_maturity, window=window, columns=columns
    )
    score = columns.score
    labelled = cohort.filter(pl.col("label").is_not_null()) if cohort.height else cohort
    if kind.name == BINARY:
        return _binary_quality(kind.primary_metric, labelled, recent, score, start, end)
    return _regression_quality(kind.primary_metric, labelled, recent, score, start, end, reference)


def _binary_quality(metric, labelled, recent, score, start, end) -> LiveQuality:
    from models.metrics import average_precision, average_precision_se

    positives = int(labelled["label"].sum()) if labelled.height else 0
    realised = realised_se = None
    if 0 < positives < labelled.height:
        y = labelled["label"].to_numpy().astype(np.float64)
        scores = labelled[score].to_numpy().astype(np.float64)
        realised = average_precision(y, scores)
        realised_se = average_precision_se(y, scores)
    return LiveQuality(
        metric=metric,
        cohort_start=start,
        cohort_end=end,
        labelled=labelled.height,
        positives=positives,
        value=realised,
        estimated=_cbpe(labelled[score]) if labelled.height else None,
        recent=recent.height,
        estimated_unlabelled=_cbpe(recent[score]) if recent.height else None,
        value_se=realised_se,
        estimated_unlabelled_se=_cbpe_se(recent[score]) if recent.height else None,
    )


def _regression_quality(metric, labelled, recent, score, start, end, reference) -> LiveQuality:

    realised = realised_se = None
    if labelled.height >= 2:
        error = (labelled[score].cast(pl.Float64) - labelled["label"].cast(pl.Float64)).abs()
        realised = float(error.mean())
        realised_se = float(error.std()) / math.sqrt(labelled.height)

    def estimate(frame: pl.DataFrame) -> tuple[float | None, float | None]:
        if reference is None or frame.height == 0:
            return None, None
        curve = reference if isinstance(reference, ErrorCurve) else ErrorCurve.from_dict(reference)
        value, se = expected_mae(curve, frame[score].to_numpy().astype(np.float64))
        return (None, None) if math.isnan(value) else (value, se)

    recent_estimate, recent_se = estimate(recent)
    return LiveQuality(
        metric=metric,
        cohort_start=start,
        cohort_end=end,
        labelled=labelled.height,
        positives=None,
        value=realised,
        estimated=estimate(labelled)[0],
        recent=recent.height,
        estimated_unlabelled=recent_estimate,
        value_se=realised_se,
        estimated_unlabelled_se=recent_se,
    )


def live_quality_row(
    quality: LiveQuality, *, at: datetime, label_batch: str | None, champion: str
) -> dict[str, object]:
    """One row of ``live_quality.parquet`` (``live_quality_schema``)."""
    m = quality.metric
    row = {
        "at": at,
        "label_batch": label_batch,
        "champion": champion,
        "cohort_start": quality.cohort_start,
        "cohort_end": quality.cohort_end,
        "labelled": quality.labelled,
        "positives": quality.positives,
        m: quality.value,
        f"{m}_se": quality.value_se,
        f"estimated_{m}": quality.estimated,
        "estimate_error": quality.estimate_error,
        "recent": quality.recent,
        f"estimated_{m}_unlabelled": quality.estimated_unlabelled,
        f"estimated_{m}_unlabelled_se": quality.estimated_unlabelled_se,
    }

    return {c: row[c] for c in live_quality_schema(task_of_metric(m))}


def _live_quality_path(home_or_dir: str | Path) -> Path:
    path = Path(home_or_dir)
    if path.suffix == ".parquet":
        return path
    if path.name == "monitoring" or (path / LIVE_QUALITY_FILE).exists():
        return path / LIVE_QUALITY_FILE
    return path / "monitoring" / LIVE_QUALITY_FILE


def read_live_quality(home_or_dir: str | Path) -> pl.DataFrame:
    """The live metric over time, oldest first: from a Loopline home, its ``monitoring``
    folder, or the parquet file itself. Empty (with its columns) before the first point."""
    path = _live_quality_path(home_or_dir)
    schema = live_quality_schema()
    if not path.exists():
        return pl.DataFrame(schema=schema)
    frame = pl.read_parquet(path)
    # Files written before a column existed read with it empty.
    missing = [
        pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in frame.columns
    ]
    return frame.with_columns(missing).select(list(schema)).sort("at", maintain_order=True)


def append_live_quality(row: dict[str, object], home_or_dir: str | Path) -> pl.DataFrame:
    """Append one point to ``live_quality.parquet`` (rewritten atomically; it stays small)."""
    frame = pl.concat(
        [read_live_quality(home_or_dir), pl.DataFrame([row], schema=live_quality_schema())]
    )
    write_parquet_atomic(frame, _live_quality_path(home_or_dir))
    return frame
