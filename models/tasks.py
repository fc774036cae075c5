"""What a model predicts, and what follows from it: its labels, loss, output, metrics and which
of them are better lower, and whether it decides with a threshold.

Two task types run through one code path (``task.type`` in a use case's declaration, carried
by the model's ``FeatureSpec`` so a saved model knows its own):

- ``binary_classification``: 0/1 labels, a logit trained with (weighted) binary cross-entropy,
  Platt-scaled, read through a sigmoid as a probability; judged on PR-AUC; a decision threshold
  (best F1 on validation) turns it into the positive or negative decision word.
- ``regression``: real-valued labels, standardised for training (the network learns
  ``(y - mean) / std`` with the Huber loss, robust to the long tails of durations and amounts)
  and mapped back by the model's output affine, so the network outputs the target's units;
  judged on MAE; no threshold.

The network, preprocessing, training loop, registry, gate and serving are shared; only the
pieces below differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import polars as pl

from models.spec import TASK_TYPES as SPEC_TASK_TYPES

if TYPE_CHECKING:  # torch is imported where a model runs, not where a task is named
    import torch

BINARY = "binary_classification"
REGRESSION = "regression"
# How people read the metrics' names (status lines, plots, trigger reasons).
METRIC_LABELS = {"pr_auc": "PR-AUC", "roc_auc": "ROC-AUC", "mae": "MAE", "rmse": "RMSE"}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


@dataclass(frozen=True)
class Task:
    """The common surface; ``of(name)`` returns the task type."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    # The metrics shown side by side in the evaluation table and the model card.
    headline: ClassVar[tuple[str, ...]]
    lower_is_better: ClassVar[frozenset[str]]
    # What the gate counts before trusting a metric: positives, or rows.
    count_metric: ClassVar[str]
    has_threshold: ClassVar[bool]
    # The label as monitoring joins it, and the name of the label-free estimate of the metric.
    label_dtype: ClassVar[pl.DataType]
    estimate_name: ClassVar[str]

    def labels(self, column: pl.Series) -> np.ndarray:
        """The label column as this task learns it; nulls and other values are refused."""
        if column.null_count():
            raise ValueError(f"label column {column.name!r} has {column.null_count()} null values")
        return self._values(column)

    def _values(self, column: pl.Series) -> np.ndarray:
        raise NotImplementedError

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        """The prediction from the network's (affine-mapped) output."""
        raise NotImplementedError

    def gain(self, metric: str, challenger: float, reference: float) -> float:
        """How much better ``challenger`` is than ``reference`` on ``metric`` (> 0: better)."""
        if metric in self.lower_is_better:
            return reference - challenger
        return challenger - reference


@dataclass(frozen=True)
class BinaryClassification(Task):
    name: ClassVar[str] = BINARY
    primary_metric: ClassVar[str] = "pr_auc"
    headline: ClassVar[tuple[str, ...]] = (
        "pr_auc",
        "roc_auc",
        "log_loss",
        "brier",
        "precision",
        "recall",
        "f1",
    )
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"log_loss", "brier", "ece"})
    count_metric: ClassVar[str] = "positives"
    has_threshold: ClassVar[bool] = True
    label_dtype: ClassVar[pl.DataType] = pl.Int8()
    estimate_name: ClassVar[str] = "CBPE"

    def _values(self, column: pl.Series) -> np.ndarray:
        """0/1 as int8."""
        values = column.cast(self.label_dtype).to_numpy()
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise ValueError(
                f"label column {column.name!r} must be 0/1, found {sorted(set(values[bad]))[:5]}"
            )
        return values

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(raw)


@dataclass(frozen=True)
class Regression(Task):
    name: ClassVar[str] = REGRESSION
    primary_metric: ClassVar[str] = "mae"
    headline: ClassVar[tuple[str, ...]] = ("mae", "rmse", "r2", "bias", "median_ae")
    lower_is_better: ClassVar[frozenset[str]] = frozenset(
        {"mae", "rmse", "median_ae", "abs_bias", "ece"}
    )
    count_metric: ClassVar[str] = "support"
    has_threshold: ClassVar[bool] = False
    label_dtype: ClassVar[pl.DataType] = pl.Float64()
    estimate_name: ClassVar[str] = "DLE"

    def _values(self, column: pl.Series) -> np.ndarray:
        """Finite floats."""
        values = column.cast(self.label_dtype).to_numpy()
        if not np.isfinite(values).all():
            raise ValueError(f"label column {column.name!r} has non-finite values")
        return values

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def huber(self, prediction: torch.Tensor, y: torch.Tensor, weight=None) -> torch.Tensor:
        """The training loss on standardised targets (delta 1: one standard deviation)."""
        import torch.nn.functional as F

        if weight is None:  # one fused kernel: no per-row tensor to allocate and reduce
            return F.huber_loss(prediction, y, delta=1.0)
        return (F.huber_loss(prediction, y, reduction="none", delta=1.0) * weight).mean()


def regression_metrics(y_true: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R², mean error (bias: predicted minus actual), median absolute error."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError("labels and predictions must have the same shape")
    n = y.size
    if n == 0:
        nan = math.nan
        return {
            "support": 0.0,
            "mae": nan,
            "mae_se": nan,
            "rmse": nan,
            "r2": nan,
            "bias": nan,
            "median_ae": nan,
        }
    error = p - y
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "support": float(n),
        "mean_label": float(y.mean()),
        "mean_prediction": float(p.mean()),
        "mae": float(np.mean(np.abs(error))),
        # How far this MAE may move by chance: the decay trigger weighs it.
        "mae_se": float(np.std(np.abs(error), ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "rmse": float(math.sqrt(np.mean(error**2))),
        "r2": 1.0 - float(np.sum(error**2)) / total if total > 0 else math.nan,
        "bias": float(error.mean()),
        "abs_bias": float(abs(error.mean())),
        "median_ae": float(np.median(np.abs(error))),
    }


_TASKS: dict[str, Task] = {BINARY: BinaryClassification(), REGRESSION: Regression()}
TASK_TYPES = tuple(_TASKS)
assert TASK_TYPES == SPEC_TASK_TYPES, "models.spec.TASK_TYPES must name the same task types"


def task_of_metric(metric: str) -> str:
    """The task type whose primary metric ``metric`` is."""
    for name, task in _TASKS.items():
        if task.primary_metric == metric:
            return name
    raise ValueError(f"{metric!r} is no task type's primary metric")


def lower_is_better(metric: str) -> bool:
    """Whether a lower ``metric`` is better (MAE, log loss) for the task that has it."""
    return any(metric in task.lower_is_better for task in _TASKS.values())


def of(name: str) -> Task:
    """The task type ``name`` (a use case's ``task.type``)."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task type {name!r}; expected one of {TASK_TYPES}") from None


@dataclass(frozen=True)
class ErrorCurve:
    """A regressor's absolute error by decile of its predictions, measured on a labelled split:
    the reference of the label-free MAE estimate (``expected_mae``). ``edges`` are the inner
    decile edges; per bin, the mean and the standard deviation of |error| and the row count."""

    edges: tuple[float, ...]
    mae: tuple[float, ...]
    std: tuple[float, ...]
    counts: tuple[int, ...]

    def to_dict(self) -> dict[str, list]:
        return {k: list(getattr(self, k)) for k in ("edges", "mae", "std", "counts")}

    @classmethod
    def from_dict(cls, data: dict) -> ErrorCurve:
        return cls(*(tuple(data[k]) for k in ("edges", "mae", "std", "counts")))


def error_curve(y_true: np.ndarray, predictions: np.ndarray, n_bins: int = 10) -> ErrorCurve:
    """``ErrorCurve`` of labelled predictions (empty bins merged away by unique edges)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if p.size == 0:
        return ErrorCurve((), (), (), ())
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))[1:-1])
    bins = np.searchsorted(edges, p, side="right")
    error = np.abs(p - y)
    k = edges.size + 1
    counts = np.bincount(bins, minlength=k)
    sums = np.bincount(bins, weights=error, minlength=k)
    squares = np.bincount(bins, weights=error**2, minlength=k)
    mean = np.divide(sums, counts, out=np.full(k, np.nan), where=counts > 0)
    var = np.divide(squares, counts, out=np.full(k, np.nan), where=counts > 0) - mean**2
    return ErrorCurve(
        tuple(float(e) for e in edges),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in np.sqrt(np.clip(var, 0.0, None))),
        tuple(int(c) for c in counts),
    )


def expected_mae(curve: ErrorCurve, predictions: np.ndarray) -> tuple[float, float]:
    """Label-free estimate of the MAE of ``predictions`` and its standard error: each prediction
    expects the mean |error| its decile had on the labelled reference (direct loss estimation
    on one input, the prediction itself). It follows covariate shift that moves predictions
    into deciles where the model errs more, and, like CBPE for a classifier, cannot see
    concept drift (the same inputs now meaning other targets); NaN without a reference."""
    p = np.asarray(predictions, dtype=np.float64)
    if p.size == 0 or not curve.mae:
        return math.nan, math.nan
    bins = _decile(curve, p)
    spread = np.nan_to_num(np.asarray(curve.std), nan=np.nanmean(curve.std))
    estimate = float(expected_errors(curve, p).mean())
    se = float(math.sqrt(np.sum(spread[bins] ** 2)) / p.size)
    return estimate, se


def expected_errors(curve: ErrorCurve, predictions: np.ndarray) -> np.ndarray:
    """Each prediction's expected |error|: the mean its decile had on the labelled reference
    (``expected_mae`` is their mean); NaN for every one without a reference."""
    p = np.asarray(predictions, dtype=np.float64)
    if not curve.mae:
        return np.full(p.size, math.nan)
    mae = np.asarray(curve.mae)
    return np.nan_to_num(mae, nan=np.nanmean(mae))[_decile(curve, p)]


def _decile(curve: ErrorCurve, p: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(curve.edges), p, side="right")
