"""A challenger against its reference slice by slice, on the same rows, with a confidence bound.

A slice's metric rests on few rows (at 1% fraud, a few dozen positives), so two models' figures
on it differ by chance by more than any fixed tolerance. Each slice's difference is resampled
with a paired Poisson bootstrap (the same resampled rows for both models, so what both get right
or wrong alike cancels), and the challenger regresses on a slice only when the one-sided upper
bound of its gain lies below ``-slice_tolerance``. The bound is the estimate plus z times the
bootstrap's standard error, z at ``1 - slice_alpha / m`` for the m slices compared (Bonferroni:
the chance that any sound challenger is flagged on any slice stays at or below
``slice_alpha``). A normal bound from the bootstrap's spread, rather than its percentiles, keeps
that far tail steady with a few hundred draws.

Three outcomes, none of them a default: ``passed`` (bounded, no significant regression),
``regressed`` (significant), and ``not enough support`` (too few rows or positives to resample,
or a bound further than ``slice_max_margin_tolerances`` tolerances from the estimate: the
slice could hide a regression the gate cannot see).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from models.evaluate import EvaluationReport
from models.metrics import EPS, draw_chunks, weighted_average_precision
from models.spec import GatePolicy
from models.tasks import of as task_of

PASSED = "passed"
REGRESSED = "regressed"
NOT_ENOUGH_SUPPORT = "not enough support"

# What each resampled metric averages per row (PR-AUC is resampled on ranks instead).
_ROW_LOSSES = {
    "mae": lambda y, p: np.abs(p - y),
    "rmse": lambda y, p: (p - y) ** 2,
    "brier": lambda y, p: (p - y) ** 2,
    "log_loss": lambda y, p: (
        -(y * np.log(np.clip(p, EPS, 1 - EPS)) + (1 - y) * np.log1p(-np.clip(p, EPS, 1 - EPS)))
    ),
}
BOOTSTRAPPED_METRICS = ("pr_auc", *_ROW_LOSSES)


@dataclass(frozen=True)
class SliceComparison:
    """One slice's outcome. ``gain`` is the challenger's advantage in metric units (> 0 better);
    ``upper_bound`` and ``margin`` (bound minus estimate) are NaN where no bound was computed."""

    column: str
    value: str
    outcome: str
    support: int
    positives: int | None
    challenger_value: float
    reference_value: float
    gain: float
    upper_bound: float
    margin: float
    confidence: float
    why: str = ""


def same_rows(challenger: EvaluationReport, reference: EvaluationReport) -> bool:
    """Whether both reports hold row-level scores of the same labelled rows."""
    a, b = challenger.rows, reference.rows
    return a is not None and b is not None and np.array_equal(a.y, b.y)


def compare_slices(
    challenger: EvaluationReport,
    reference: EvaluationReport,
    policy: GatePolicy,
    metric: str,
) -> list[SliceComparison]:
    """Every slice of ``challenger`` against ``reference`` on its rows (``same_rows`` first)."""
    if metric not in BOOTSTRAPPED_METRICS:
        raise ValueError(
            f"slice metric {metric!r} cannot be compared per slice; "
            f"use one of {', '.join(BOOTSTRAPPED_METRICS)}"
        )
    if not same_rows(challenger, reference):
        raise ValueError("slices are compared on the same labelled rows of both reports")
    task = task_of(challenger.task)
    binary = task.count_metric == "positives"
    mine, theirs = challenger.rows, reference.rows
    eligible, results = [], {}
    for s in challenger.slices:
        rows = mine.slice_rows[(s.column, s.value)]
        y = mine.y[rows]
        positives = int(y.sum()) if binary else None
        short = _too_few(rows.size, positives, policy)
        if short:
            results[(s.column, s.value)] = _unsupported(s, reference, metric, task, short)
        else:
            eligible.append((s, rows))
    confidence = 1.0 - policy.slice_alpha / max(len(eligible), 1)
    z = NormalDist().inv_cdf(confidence)
    for s, rows in eligible:
        se = paired_gain_se(
            metric,
            mine.y[rows],
            mine.predictions[rows],
            theirs.predictions[rows],
            lower_is_better=metric in task.lower_is_better,
            draws=policy.slice_bootstrap_draws,
            seed=(policy.slice_seed, zlib.crc32(f"{s.column}={s.value}".encode())),
        )
        results[(s.column, s.value)] = _judged(
            s, reference, metric, task, z * se, confidence, policy
        )
    return [results[(s.column, s.value)] for s in challenger.slices]


def paired_gain_se(
    metric: str,
    y: np.ndarray,
    challenger: np.ndarray,
    reference: np.ndarray,
    *,
    lower_is_better: bool,
    draws: int,
    seed: int | tuple[int, ...] = 0,
) -> float:
    """Standard error of the challenger's gain over the reference on ``metric``, both models
    scored on the same Poisson-resampled rows in each draw; NaN with fewer than two draws
    where the metric is defined. PR-AUC ignores score ties here, as ``average_precision_se``."""
    rng = np.random.default_rng(seed)
    gains = []
    for chunk in draw_chunks(y.size, draws):
        w = rng.poisson(1.0, size=(chunk, y.size)).astype(np.float64)
        a = _resampled(metric, y, challenger, w)
        b = _resampled(metric, y, reference, w)
        gains.append(b - a if lower_is_better else a - b)
    g = np.concatenate(gains)
    g = g[np.isfinite(g)]
    return float(np.std(g, ddof=1)) if g.size > 1 else math.nan


def _resampled(metric: str, y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``metric`` under each row of weights ``w`` (draws, rows)."""
    if metric == "pr_auc":
        order = np.argsort(-pred, kind="mergesort")
        ranked = w[:, order]
        return weighted_average_precision(ranked * y[order], ranked)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w @ _ROW_LOSSES[metric](y, pred)) / w.sum(axis=1)
    return np.sqrt(mean) if metric == "rmse" else mean


def _too_few(rows: int, positives: int | None, policy: GatePolicy) -> str:
    if rows < policy.slice_min_support:
        return f"{rows} rows, fewer than {policy.slice_min_support}"
    if positives is not None and positives < policy.slice_min_positives:
        return f"{positives} positives, fewer than {policy.slice_min_positives}"
    if positives is not None and positives == rows:
        return "no negatives"
    return ""


def _values(s, reference: EvaluationReport, metric: str, task) -> tuple[float, float, float]:
    ref = reference.slice(s.column, s.value)
    mine = s.metrics.get(metric, math.nan)
    theirs = ref.metrics.get(metric, math.nan) if ref is not None else math.nan
    return mine, theirs, task.gain(metric, mine, theirs)


def _unsupported(s, reference, metric, task, why: str) -> SliceComparison:
    mine, theirs, gain = _values(s, reference, metric, task)
    positives = s.positives if task.count_metric == "positives" else None
    nan = math.nan
    return SliceComparison(
        s.column,
        s.value,
        NOT_ENOUGH_SUPPORT,
        s.support,
        positives,
        mine,
        theirs,
        gain,
        nan,
        nan,
        nan,
        why,
    )


def _judged(s, reference, metric, task, margin, confidence, policy) -> SliceComparison:
    mine, theirs, gain = _values(s, reference, metric, task)
    upper = gain + margin
    widest = policy.slice_max_margin_tolerances * policy.slice_tolerance
    why = ""
    if upper < -policy.slice_tolerance:
        outcome = REGRESSED
    elif not math.isfinite(upper) or margin > widest:
        outcome = NOT_ENOUGH_SUPPORT
        why = (
            f"its bound lies {margin:.4f} above its estimate, more than "
            f"{policy.slice_max_margin_tolerances:g} x the tolerance ({widest:.4f})"
            if math.isfinite(upper)
            else f"{metric} is undefined on its resamples"
        )
    else:
        outcome = PASSED
    positives = s.positives if task.count_metric == "positives" else None
    return SliceComparison(
        s.column,
        s.value,
        outcome,
        s.support,
        positives,
        mine,
        theirs,
        gain,
        upper,
        margin,
        confidence,
        why,
    )
