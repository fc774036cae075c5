"""Evaluation on the held-out split: headline metrics, calibration, and the same per slice, as
the model's task reads them (models.tasks): a classifier's PR-AUC, threshold and reliability
curve, a regressor's MAE and binned predicted-against-actual curve."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from core.jsonutil import json_safe
from models.loop import predict_logits
from models.metrics import (
    CalibrationCurve,
    average_precision_se,
    best_f1_threshold,
    binary_metrics,
    calibration_curve,
    precision_recall_curve,
)
from models.preprocess import Preprocessor, TabularBatch, label_array
from models.spec import NO_SLICES, Bucket, Slicing
from models.tasks import BINARY, error_curve, regression_metrics
from models.tasks import of as task_of

NULL_SLICE = "(null)"


def bucket_expr(bucket: Bucket) -> pl.Expr:
    """The bucket's label per row (left-closed bins); nulls stay null."""
    col = pl.col(bucket.column)
    expr = pl.when(col.is_null()).then(pl.lit(None, dtype=pl.String))
    for edge, label in zip(bucket.edges, bucket.labels, strict=False):
        expr = expr.when(col < edge).then(pl.lit(label))
    return expr.otherwise(pl.lit(bucket.labels[-1])).alias(bucket.name)


def with_buckets(frame: pl.DataFrame, buckets: Sequence[Bucket]) -> pl.DataFrame:
    """``frame`` with each bucket whose column it has as a slice column."""
    derived = [bucket_expr(b) for b in buckets if b.column in frame.columns]
    return frame.with_columns(derived) if derived else frame


def predict(
    module: nn.Module,
    preprocessor: Preprocessor,
    data: pl.DataFrame | Sequence[Mapping[str, Any]],
    batch_size: int = 65536,
) -> np.ndarray:
    """The model's predictions on CPU, float64, one per row: a classifier's probabilities, a
    regressor's values (the task is the preprocessor's ``spec.task``)."""
    batch: TabularBatch = preprocessor.transform(data)
    logits = predict_logits(module.cpu(), batch.numeric, batch.categorical, batch_size)
    return task_of(preprocessor.spec.task).output(logits.double()).numpy()


@torch.inference_mode()
def batch_predict(
    module: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: TabularBatch,
    task: str = BINARY,
) -> np.ndarray:
    """``predict`` of a built batch, for a module already on the CPU in eval mode or its
    ``FrozenNet`` (equal outputs): the serving path, which sets the model up once per load
    rather than walking it per call (the walk costs more than a small batch's forward pass).
    One forward over the whole batch."""
    raw = module(batch.numeric, batch.categorical).float()
    return task_of(task).output(raw.double()).numpy()


@dataclass(frozen=True)
class SliceResult:
    """Metrics on the rows of one slice value, e.g. country == "DE"."""

    column: str
    value: str
    metrics: dict[str, float]

    @property
    def support(self) -> int:
        return int(self.metrics["support"])

    @property
    def positives(self) -> int:
        """A classifier's positives among the slice's rows (0 for a regressor)."""
        return int(self.metrics.get("positives", 0))


@dataclass(frozen=True)
class RowScores:
    """The labels and predictions a report was computed from, and the rows of each slice
    (``(column, value)`` -> row indices): what comparing two models on the same rows of a slice
    needs (models.slice_compare). Held in memory only, never in ``to_dict``."""

    y: np.ndarray
    predictions: np.ndarray
    slice_rows: dict[tuple[str, str], np.ndarray]


@dataclass(frozen=True)
class EvaluationReport:
    """One model on one split; slices and calibration included. JSON round-trips via to_dict."""

    model: str
    split: str
    threshold: float
    threshold_split: str
    metrics: dict[str, float]
    calibration: CalibrationCurve
    pr_curve: dict[str, list[float]]
    slices: tuple[SliceResult, ...]
    task: str = BINARY
    # A regressor's |error| by decile of its predictions (models.tasks.ErrorCurve): the
    # reference of the label-free MAE estimate in monitoring.
    error_curve: dict[str, list] = field(default_factory=dict)
    # None for a report read back from JSON: it cannot be compared slice by slice.
    rows: RowScores | None = field(default=None, compare=False, repr=False)

    @property
    def support(self) -> int:
        return int(self.metrics["support"])

    def slice(self, column: str, value: str) -> SliceResult | None:
        for s in self.slices:
            if s.column == column and s.value == value:
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "model": self.model,
                "task": self.task,
                "split": self.split,
                "threshold": self.threshold,
                "threshold_split": self.threshold_split,
                "metrics": self.metrics,
                "calibration": self.calibration.to_dict(),
                "pr_curve": self.pr_curve,
                "error_curve": self.error_curve,
                "slices": [
                    {"column": s.column, "value": s.value, "metrics": s.metrics}
                    for s in self.slices
                ],
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        cal = data["calibration"]
        return cls(
            model=data["model"],
            split=data["split"],
            threshold=_float(data["threshold"]),
            threshold_split=data["threshold_split"],
            metrics=_floats(data["metrics"]),
            calibration=CalibrationCurve(
                tuple(cal["prob_pred"]),
                tuple(cal["prob_true"]),
                tuple(cal["counts"]),
                _float(cal["ece"]),
            ),
            pr_curve={k: list(v) for k, v in data["pr_curve"].items()},
            slices=tuple(
                SliceResult(s["column"], s["value"], _floats(s["metrics"])) for s in data["slices"]
            ),
            task=data.get("task", BINARY),
            error_curve=dict(data.get("error_curve") or {}),
        )


def evaluate_scores(
    name: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    slice_frame: pl.DataFrame | None = None,
    *,
    slice_columns: Sequence[str] = (),
    split: str = "test",
    threshold_split: str = "validation",
    n_bins: int = 10,
    task: str = BINARY,
) -> EvaluationReport:
    """Builds a report from labels and predictions (slice_frame rows align with them): a
    classifier's probabilities judged at ``threshold``, or a regressor's values (``threshold``
    unused, NaN in the report)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    binary = task_of(task).name == BINARY

    def metrics_of(yy: np.ndarray, pp: np.ndarray) -> dict[str, float]:
        return binary_metrics(yy, pp, threshold) if binary else regression_metrics(yy, pp)

    metrics = metrics_of(y, p)
    pr_curve: dict[str, list[float]] = {}
    errors: dict[str, list] = {}
    if binary:
        # How far this PR-AUC may move by chance: the decay trigger weighs it (decision 26).
        metrics["pr_auc_se"] = average_precision_se(y, p)
        calibration = calibration_curve(y, p, n_bins)
        precision, recall, _ = precision_recall_curve(y, p)
        keep = _downsample(precision.size, 200)
        pr_curve = {
            "precision": [float(v) for v in precision[keep]],
            "recall": [float(v) for v in recall[keep]],
        }
    else:
        # Mean actual against mean predicted per decile of the predictions; ``ece`` is the
        # row-weighted gap in the target's units.
        calibration = calibration_curve(y, p, n_bins, strategy="quantile")
        errors = error_curve(y, p, n_bins).to_dict()
        threshold = math.nan
    metrics["ece"] = calibration.ece
    slices: list[SliceResult] = []
    slice_rows: dict[tuple[str, str], np.ndarray] = {}
    if slice_frame is not None:
        if slice_frame.height != y.size:
            raise ValueError("slice_frame must have one row per prediction")
        for column in slice_columns:
            if column not in slice_frame.columns:
                raise KeyError(f"slice column {column!r} is not in the evaluation frame")
            groups = (
                slice_frame.select(pl.col(column).cast(pl.String).fill_null(NULL_SLICE).alias("v"))
                .with_row_index("i")
                .group_by("v")
                .agg(pl.col("i"))
                .sort("v")
            )
            for value, idx in groups.iter_rows():
                rows = np.asarray(idx, dtype=np.int64)
                slice_rows[(column, value)] = rows
                slices.append(SliceResult(column, value, metrics_of(y[rows], p[rows])))
        slices.sort(key=lambda s: (slice_columns.index(s.column), -s.support, s.value))
    return EvaluationReport(
        model=name,
        split=split,
        threshold=float(threshold),
        threshold_split=threshold_split if binary else "none",
        metrics=metrics,
        calibration=calibration,
        pr_curve=pr_curve,
        slices=tuple(slices),
        task=task,
        error_curve=errors,
        rows=RowScores(y, p, slice_rows),
    )


def evaluate_model(
    module: nn.Module,
    preprocessor: Preprocessor,
    frame: pl.DataFrame,
    *,
    name: str,
    threshold: float | None = None,
    split: str = "test",
    threshold_split: str = "validation",
    slicing: Slicing = NO_SLICES,
    n_bins: int = 10,
) -> EvaluationReport:
    """Scores `split`; a classifier's decision threshold (best F1) is chosen on
    `threshold_split`, not test. Metrics are broken down by ``slicing``'s columns (its buckets
    derived first)."""
    frame = with_buckets(frame, slicing.buckets)
    spec = preprocessor.spec
    test = frame.filter(pl.col("split") == split)
    if test.height == 0:
        raise ValueError(f"the {split!r} split is empty: nothing to evaluate")
    if not task_of(spec.task).has_threshold:
        threshold = math.nan
    elif threshold is None:
        tuning = frame.filter(pl.col("split") == threshold_split)
        if tuning.height == 0:
            raise ValueError(f"the {threshold_split!r} split is empty: cannot choose a threshold")
        threshold = best_f1_threshold(
            label_array(tuning, spec.label, spec.task), predict(module, preprocessor, tuning)
        )
    else:
        threshold_split = "given"
    return evaluate_scores(
        name,
        label_array(test, spec.label, spec.task),
        predict(module, preprocessor, test),
        threshold,
        test,
        slice_columns=slicing.columns,
        split=split,
        threshold_split=threshold_split,
        n_bins=n_bins,
        task=spec.task,
    )


def evaluation_markdown(
    reports: Mapping[str, EvaluationReport],
    slice_metric: str | None = None,
    max_slice_rows: int = 25,
) -> str:
    """Side-by-side tables (challenger, baseline, champion...) for the Dagster UI and the card:
    the task's headline metrics, then ``slice_metric`` (the task's primary one by default) per
    slice, with a classifier's recall at its threshold."""
    names = list(reports)
    if not names:
        return "_no evaluation_\n"
    first = reports[names[0]]
    task = task_of(first.task)
    binary = task.name == BINARY
    slice_metric = slice_metric or task.primary_metric
    counted = f", {int(first.metrics['positives'])} positives" if binary else ""
    threshold = " threshold |" if binary else ""
    lines = [
        f"**Split:** {first.split} ({first.support} rows{counted})",
        "",
        "| model | " + " | ".join(task.headline) + " |" + threshold,
        "|---" * (len(task.headline) + 1 + binary) + "|",
    ]
    for n in names:
        r = reports[n]
        cells = " | ".join(_fmt(r.metrics.get(m)) for m in task.headline)
        tail = f" {_fmt(r.threshold)} ({r.threshold_split}) |" if binary else ""
        lines.append(f"| {n} | {cells} |{tail}")
    columns = list(dict.fromkeys(s.column for s in first.slices))
    per_slice = [slice_metric, "recall"] if binary else [slice_metric]
    for column in columns:
        note = f"{slice_metric}; recall at threshold" if binary else slice_metric
        lines += [
            "",
            f"**Slices by {column}** ({note})",
            "",
            "| value | support | "
            + ("positives | " if binary else "")
            + " | ".join(f"{n} {m}" for m in per_slice for n in names)
            + " |",
            "|---" * (2 + binary + len(per_slice) * len(names)) + "|",
        ]
        rows = [s for s in first.slices if s.column == column][:max_slice_rows]
        for s in rows:
            others = [reports[n].slice(column, s.value) for n in names]
            cells = " | ".join(
                _fmt(o.metrics.get(m) if o else None) for m in per_slice for o in others
            )
            counts = f"{s.support} | {s.positives}" if binary else f"{s.support}"
            lines.append(f"| {s.value} | {counts} | {cells} |")
    return "\n".join(lines) + "\n"


def _downsample(size: int, limit: int) -> np.ndarray:
    if size <= limit:
        return np.arange(size)
    return np.unique(np.linspace(0, size - 1, limit).round().astype(np.int64))


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _floats(data: Mapping[str, Any]) -> dict[str, float]:
    return {k: _float(v) for k, v in data.items()}
