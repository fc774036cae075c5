"""What monitoring reads from serving: the compacted prediction log, joined to late labels.

``compact`` turns closed JSON-lines log files into parquet, once each: the output name is a hash
of the inputs, and a manifest written after it records which files are done, so a crash between
the two only rewrites the same file. Synthetic traffic (smoke, shadow and watch requests sent by
the deployment step) is left out. ``serving_drift`` compares what serving saw with what the
champion was trained on; ``live_metrics`` scores predictions whose labels have arrived.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from features.storage import write_json_atomic, write_parquet_atomic
from quality import drift
from quality.schema import UTC_TS
from serving.delivery import SYNTHETIC_PREFIXES
from serving.prediction_log import closed_files, file_records

if TYPE_CHECKING:
    from models.evaluate import EvaluationReport

MANIFEST = "_compacted.json"
REQUEST_COLUMNS = ("card_id", "merchant_id", "amount", "channel", "country", "timestamp")
SCORE = "fraud_probability"
BASE_SCHEMA: dict[str, pl.DataType] = {
    "logged_at": UTC_TS,
    "status": pl.Int64(),
    "model_version": pl.String(),
    "transaction_id": pl.String(),
    SCORE: pl.Float64(),
    "decision": pl.String(),
    "latency_ms": pl.Float64(),
    "n_missing_features": pl.Int64(),
    "unknown_entity": pl.Boolean(),
}


@dataclass(frozen=True)
class Compaction:
    path: Path | None
    files: int
    rows: int
    errors: int


def _flatten(record: dict[str, Any]) -> dict[str, Any] | None:
    tid = record.get("transaction_id")
    if isinstance(tid, str) and tid.startswith(SYNTHETIC_PREFIXES):
        return None
    request = record.get("request") or {}
    row: dict[str, Any] = {
        "logged_at": record.get("logged_at"),
        "status": record.get("status"),
        "model_version": record.get("model_version"),
        "transaction_id": tid,
        SCORE: record.get(SCORE),
        "decision": record.get("decision"),
        "latency_ms": record.get("latency_ms"),
        "n_missing_features": len(record.get("missing_features") or []),
        "unknown_entity": bool(record.get("unknown_entities")),
    }
    for column in REQUEST_COLUMNS:
        row[column] = request.get(column)
    for name, value in (record.get("features") or {}).items():
        row.setdefault(name, value)
    return row


def compact(log_dir: str | Path, out_dir: str | Path) -> Compaction:
    """Compact the closed log files not compacted yet into one parquet file."""
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    done = set(json.loads(manifest_path.read_text())) if manifest_path.exists() else set()
    present = closed_files(log_dir)
    todo = [p for p in present if p.name not in done]
    if not todo:
        return Compaction(None, 0, 0, 0)
    rows = []
    for path in todo:
        for record in file_records(path):
            if (row := _flatten(record)) is not None:
                rows.append(row)
    digest = hashlib.sha256("\n".join(p.name for p in todo).encode()).hexdigest()[:16]
    target = out / f"predictions-{digest}.parquet"
    frame = _typed(pl.from_dicts(rows, infer_schema_length=None)) if rows else None
    if frame is not None and frame.height:
        write_parquet_atomic(frame, target)
    # Files the log's size bound deleted drop out of the manifest, so it stays bounded too.
    write_json_atomic(sorted({p.name for p in present}), manifest_path)
    errors = 0 if frame is None else frame.filter(pl.col("status") != 200).height
    return Compaction(target if frame is not None else None, len(todo), len(rows), errors)


def _typed(frame: pl.DataFrame) -> pl.DataFrame:
    casts = [
        pl.col(c).str.to_datetime(time_zone="UTC", strict=False).cast(t)
        if t == UTC_TS
        else pl.col(c).cast(t, strict=False)
        for c, t in BASE_SCHEMA.items()
        if c in frame.columns
    ]
    frame = frame.with_columns(casts)
    if "timestamp" in frame.columns and frame.schema["timestamp"] == pl.String:
        frame = frame.with_columns(
            pl.col("timestamp").str.to_datetime(time_zone="UTC", strict=False).cast(UTC_TS)
        )
    return frame


def read_compacted(out_dir: str | Path, since: datetime | None = None) -> pl.DataFrame:
    """Every compacted prediction (logged at or after ``since``), errors included."""
    files = sorted(Path(out_dir).glob("predictions-*.parquet"))
    if not files:
        return pl.DataFrame(schema=BASE_SCHEMA)
    frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    if since is not None:
        frame = frame.filter(pl.col("logged_at") >= since)
    return frame


def join_labels(predictions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Answered predictions with the label of their transaction where it has arrived.

    A transaction scored twice (a client retry) counts once: its first answer.
    """
    answered = (
        predictions.filter(pl.col("status") == 200)
        .sort("logged_at")
        .unique("transaction_id", keep="first", maintain_order=True)
    )
    known = labels.select(
        "transaction_id", pl.col("is_fraud").cast(pl.Int8).alias("label"), "label_timestamp"
    ).unique("transaction_id", keep="last")
    return answered.join(known, on="transaction_id", how="left")


def serving_drift(
    reference: pl.DataFrame,
    serving: pl.DataFrame,
    numeric: list[str],
    categorical: list[str],
) -> drift.DriftResult:
    """Per-feature drift (PSI; KS numeric; Jensen-Shannon categorical) of serving vs training.

    The score is compared like a feature when both frames carry ``fraud_probability``. Null
    rates and categories the reference never saw are part of each feature's result: that is
    the schema skew of what serving received.
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
    return drift.compare(profile, serving)


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
    joined: pl.DataFrame, threshold: float, slice_columns: tuple[str, ...]
) -> EvaluationReport | None:
    """PR-AUC, precision, recall... on labelled predictions, overall and per slice."""
    from models.evaluate import evaluate_scores, with_amount_bucket

    labelled = joined.filter(pl.col("label").is_not_null())
    if labelled.height == 0 or labelled["label"].n_unique() < 2:
        return None
    if "amount" in labelled.columns:
        labelled = with_amount_bucket(labelled)
    present = tuple(c for c in slice_columns if c in labelled.columns)
    return evaluate_scores(
        "live",
        labelled["label"].to_numpy().astype(np.float64),
        labelled[SCORE].to_numpy().astype(np.float64),
        threshold,
        labelled,
        slice_columns=present,
        split="live",
        threshold_split="serving",
    )
