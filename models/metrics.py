"""Binary-classification metrics in NumPy (scikit-learn is not a dependency).

Definitions follow scikit-learn's so figures compare: average precision is the step-wise
sum over distinct thresholds (no interpolation), ROC-AUC is the Mann-Whitney statistic with
ties counted half. A metric that is undefined for the data (one class only) is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-15


def _as_arrays(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y, s


def _distinct_threshold_counts(
    y: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct score, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    return tps, fps, s_sorted[last_of_run]


def precision_recall_curve(
    y_true: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall when flagging `score >= threshold`, thresholds descending."""
    y, s = _as_arrays(y_true, scores)
    if y.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    tps, fps, thresholds = _distinct_threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return precision, recall, thresholds


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    y, s = _as_arrays(y_true, scores)
    if y.sum() == 0:
        return math.nan
    precision, recall, _ = precision_recall_curve(y, s)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], sorted_vals.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    y, s = _as_arrays(y_true, scores)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y_true: np.ndarray, probs: np.ndarray, eps: float = EPS) -> float:
    """Mean negative log-likelihood with probabilities clipped to [eps, 1 - eps]."""
    y, p = _as_arrays(y_true, probs)
    if y.size == 0:
        return math.nan
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared error of the probabilities."""
    y, p = _as_arrays(y_true, probs)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


@dataclass(frozen=True)
class CalibrationCurve:
    """Per non-empty bin: mean predicted probability, observed positive rate, row count."""

    prob_pred: tuple[float, ...]
    prob_true: tuple[float, ...]
    counts: tuple[int, ...]
    ece: float

    def to_dict(self) -> dict[str, object]:
        return {
            "prob_pred": list(self.prob_pred),
            "prob_true": list(self.prob_true),
            "counts": list(self.counts),
            "ece": self.ece,
        }


def calibration_curve(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10, strategy: str = "uniform"
) -> CalibrationCurve:
    """Reliability diagram data and expected calibration error (count-weighted |gap|)."""
    y, p = _as_arrays(y_true, probs)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = (
            np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))) if p.size else np.zeros(2)
        )
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    bins = np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, len(edges) - 2)
    counts = np.bincount(bins, minlength=len(edges) - 1)
    sum_p = np.bincount(bins, weights=p, minlength=len(edges) - 1)
    sum_y = np.bincount(bins, weights=y, minlength=len(edges) - 1)
    nonempty = counts > 0
    prob_pred = sum_p[nonempty] / counts[nonempty]
    prob_true = sum_y[nonempty] / counts[nonempty]
    weights = counts[nonempty] / max(p.size, 1)
    ece = float(np.sum(weights * np.abs(prob_true - prob_pred))) if p.size else math.nan
    return CalibrationCurve(
        tuple(float(v) for v in prob_pred),
        tuple(float(v) for v in prob_true),
        tuple(int(v) for v in counts[nonempty]),
        ece,
    )


def best_f1_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising F1 (flag `score >= threshold`); chosen on validation."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    if thresholds.size == 0 or np.isnan(recall).all():
        return 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(thresholds[int(np.argmax(f1))])


def threshold_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and flag rate when flagging `score >= threshold`."""
    y, s = _as_arrays(y_true, scores)
    flagged = s >= threshold
    tp = float(np.sum(flagged & (y == 1)))
    fp = float(np.sum(flagged & (y == 0)))
    fn = float(np.sum(~flagged & (y == 1)))
    precision = tp / (tp + fp) if tp + fp > 0 else math.nan
    recall = tp / (tp + fn) if tp + fn > 0 else math.nan
    f1 = (
        2 * precision * recall / (precision + recall)
        if tp > 0 and not math.isnan(precision + recall)
        else (0.0 if tp + fp + fn > 0 else math.nan)
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "flag_rate": float(flagged.mean()) if y.size else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def binary_metrics(y_true: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Every headline metric for one set of predictions."""
    y, p = _as_arrays(y_true, probs)
    out = {
        "support": float(y.size),
        "positives": float(y.sum()),
        "base_rate": float(y.mean()) if y.size else math.nan,
        "pr_auc": average_precision(y, p),
        "roc_auc": roc_auc(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier_score(y, p),
    }
    out.update(threshold_metrics(y, p, threshold))
    return out


def _group_ends(s_sorted: np.ndarray) -> np.ndarray:
    """Index of the last row of each row's tie group in a descending-sorted score array."""
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    group = np.r_[0, np.cumsum(np.diff(s_sorted) != 0)]
    return last_of_run[group]


def expected_average_precision(probabilities: np.ndarray) -> float:
    """Average precision expected if each label were drawn as Bernoulli(p) (CBPE, label-free).

    Confidence-based performance estimation (NannyML's CBPE): with calibrated probabilities a
    prediction of p is a positive with chance p, so the expected true positives above any rank
    are a cumulative sum of p. `average_precision` sums, over each positive, the precision at its
    threshold divided by the number of positives; the estimate takes that expectation per row,
    conditioned on the row being positive (it then counts itself, and the others count by
    their p), so row k contributes p_k * (1 + C_k - p_k) / (n_k * (1 + S - p_k)), where C_k and
    n_k are the cumulative p and row count at the end of k's tie group (ties step together as in
    `average_precision`) and S the total p. Dropping the conditioning (precision = C_k / n_k,
    weight p_k / S) underestimates AP when positives are rare: at the top ranks a positive's own
    label is most of the precision. It is a ratio of expectations, so exact only in the limit;
    on a few thousand calibrated rows it lands within about 0.01 of the mean realised AP.

    Blind spot: it sees only the scores. If the relation between features and labels changes
    (concept drift) while the scores' distribution does not, the estimate does not move.
    NaN when there are no rows or no row can be positive.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or inf")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must lie in [0, 1]")
    total = float(p.sum())
    if p.size == 0 or total <= 0.0:
        return math.nan
    p_sorted = p[np.argsort(-p, kind="mergesort")]
    ends = _group_ends(p_sorted)
    cum_p_at_end = np.cumsum(p_sorted)[ends]
    rows_at_end = ends + 1.0
    precision_if_positive = (1.0 + cum_p_at_end - p_sorted) / rows_at_end
    share_if_positive = p_sorted / (1.0 + total - p_sorted)
    return float(np.sum(share_if_positive * precision_if_positive))


def expected_threshold_metrics(probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Expected precision, recall, F1 and counts when flagging `p >= threshold` (CBPE).

    A flagged row is a true positive with chance p and a false positive with chance 1 - p; an
    unflagged row is a false negative with chance p. The keys match `threshold_metrics`.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or inf")
    flagged = p >= threshold
    tp = float(p[flagged].sum())
    fp = float((1.0 - p[flagged]).sum())
    fn = float(p[~flagged].sum())
    precision = tp / (tp + fp) if tp + fp > 0 else math.nan
    recall = tp / (tp + fn) if tp + fn > 0 else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else math.nan
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "flag_rate": float(flagged.mean()) if p.size else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


# -- how much a PR-AUC moves by chance ------------------------------------------------------
#
# With ~1% positives a PR-AUC rests on a few dozen to a few hundred positives, and it moves by
# 0.05-0.15 from one sample to the next. A retraining trigger that compares two such numbers
# without their noise fires on chance (decision 26). Both errors below are Monte Carlo, fully
# vectorised over draws, with a fixed seed so a figure is reproducible; they ignore score ties
# (each row its own threshold), which changes them by far less than their own precision.

SE_DRAWS = 200
_SE_CELLS = 4_000_000  # draws x rows held in memory at once


def weighted_average_precision(w_pos: np.ndarray, w_all: np.ndarray) -> np.ndarray:
    """AP per row of (draws, rows) weights on rank-ordered rows: positive weight and weight."""
    hits = np.cumsum(w_pos, axis=1)
    seen = np.cumsum(w_all, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = hits[:, -1]
        return np.sum(w_pos * np.where(seen > 0, hits / seen, 0.0), axis=1) / total


def draw_chunks(rows: int, draws: int) -> list[int]:
    """Draws per chunk, so a chunk's (draws, rows) weights stay within ``_SE_CELLS``."""
    size = max(1, min(draws, _SE_CELLS // max(rows, 1)))
    return [min(size, draws - start) for start in range(0, draws, size)]


def average_precision_se(
    y_true: np.ndarray, scores: np.ndarray, *, draws: int = SE_DRAWS, seed: int = 0
) -> float:
    """Standard error of `average_precision` over resamples of the rows (Poisson bootstrap:
    each row weighted by a Poisson(1) count, one sort for all draws). NaN without positives."""
    y, s = _as_arrays(y_true, scores)
    if y.sum() == 0 or y.sum() == y.size:
        return math.nan
    y_ranked = y[np.argsort(-s, kind="mergesort")]
    rng = np.random.default_rng(seed)
    values = []
    for chunk in draw_chunks(y.size, draws):
        w = rng.poisson(1.0, size=(chunk, y.size)).astype(np.float64)
        values.append(weighted_average_precision(w * y_ranked, w))
    ap = np.concatenate(values)
    return float(np.nanstd(ap, ddof=1))


def expected_average_precision_se(
    probabilities: np.ndarray, *, draws: int = SE_DRAWS, seed: int = 0
) -> float:
    """Standard error of the PR-AUC that these predictions would realise if each label were
    Bernoulli(p): how far the realised figure may fall from `expected_average_precision` by
    chance alone, before any miscalibration. NaN when no row can be positive."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if p.size == 0 or float(p.sum()) <= 0.0:
        return math.nan
    p_ranked = -np.sort(-p, kind="mergesort")
    rng = np.random.default_rng(seed)
    values = []
    for chunk in draw_chunks(p.size, draws):
        labels = (rng.random((chunk, p.size)) < p_ranked).astype(np.float64)
        values.append(weighted_average_precision(labels, np.ones_like(labels)))
    ap = np.concatenate(values)
    ap = ap[np.isfinite(ap)]
    return float(np.std(ap, ddof=1)) if ap.size > 1 else math.nan
