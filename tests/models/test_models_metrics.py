from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from models.metrics import (
    average_precision,
    average_precision_se,
    average_ranks,
    best_f1_threshold,
    binary_metrics,
    brier_score,
    calibration_curve,
    expected_average_precision,
    expected_average_precision_se,
    log_loss,
    precision_recall_curve,
    roc_auc,
    threshold_metrics,
)

Y = np.array([0, 0, 1, 1])
S = np.array([0.1, 0.4, 0.35, 0.8])


def test_hand_computed_example():
    # Ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision 1 at recall .5, 2/3 at recall 1.
    assert average_precision(Y, S) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))
    # 3 of the 4 positive/negative pairs are ordered correctly.
    assert roc_auc(Y, S) == pytest.approx(0.75)
    expected_ll = -(np.log(0.9) + np.log(0.6) + np.log(0.35) + np.log(0.8)) / 4
    assert log_loss(Y, S) == pytest.approx(expected_ll)
    assert brier_score(Y, S) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)


def test_ties_count_half_in_roc_and_as_one_step_in_pr():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.5, 0.5, 0.9, 0.1])
    # pairs (pos, neg): (0.5,0.5) tie=0.5, (0.5,0.1)=1, (0.9,0.5)=1, (0.9,0.1)=1 -> 3.5/4
    assert roc_auc(y, s) == pytest.approx(3.5 / 4)
    # thresholds 0.9: P=1, R=.5 ; 0.5 (tied pair together): P=2/3, R=1
    assert average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))


def _brute_force_ap(y: np.ndarray, s: np.ndarray) -> float:
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        flagged = s >= t
        tp = float(np.sum(flagged & (y == 1)))
        recall = tp / y.sum()
        total += (recall - prev_recall) * tp / flagged.sum()
        prev_recall = recall
    return total


def test_random_data_matches_independent_references():
    rng = np.random.default_rng(3)
    y = (rng.random(600) < 0.2).astype(int)
    s = np.round(rng.random(600) * 0.5 + 0.4 * y, 2)  # rounding creates ties
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert roc_auc(y, s) == pytest.approx(u / (y.sum() * (y.size - y.sum())))
    assert average_precision(y, s) == pytest.approx(_brute_force_ap(y, s))
    np.testing.assert_allclose(average_ranks(s), stats.rankdata(s, method="average"))
    p = np.clip(s, 0.01, 0.99)
    assert log_loss(y, p) == pytest.approx(-np.mean(stats.bernoulli.logpmf(y, p)))


def test_perfect_and_inverted_rankings():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert average_precision(y, s) == 1.0
    assert roc_auc(y, s) == 1.0
    assert roc_auc(y, -s) == 0.0


def test_undefined_metrics_are_nan_not_zero():
    y = np.zeros(5)
    s = np.linspace(0, 1, 5)
    assert math.isnan(average_precision(y, s))
    assert math.isnan(roc_auc(y, s))
    assert math.isnan(threshold_metrics(y, s, 2.0)["precision"])


def test_log_loss_is_finite_for_confident_mistakes():
    assert math.isfinite(log_loss(np.array([1, 0]), np.array([0.0, 1.0])))


def test_precision_recall_curve_thresholds_descend():
    precision, recall, thresholds = precision_recall_curve(Y, S)
    assert list(thresholds) == [0.8, 0.4, 0.35, 0.1]
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5])


def test_calibration_curve_bins_and_ece():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55, 0.45])
    curve = calibration_curve(y, p, n_bins=2)
    assert curve.counts == (3, 3)
    assert curve.prob_pred == pytest.approx((0.65 / 3, 2.35 / 3))
    assert curve.prob_true == pytest.approx((0.0, 1.0))
    assert curve.ece == pytest.approx(0.5 * (0.65 / 3) + 0.5 * (1 - 2.35 / 3))


def test_best_f1_threshold_and_threshold_metrics():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.7, 0.8, 0.75, 0.9])
    # Flagging >= 0.7 catches all 3 positives with one false positive: F1 = 6/7, the best.
    threshold = best_f1_threshold(y, s)
    assert threshold == 0.7
    m = threshold_metrics(y, s, threshold)
    assert (m["precision"], m["recall"], m["tp"], m["fp"]) == (0.75, 1.0, 3.0, 1.0)
    assert m["f1"] == pytest.approx(6 / 7)
    full = binary_metrics(y, s, threshold)
    assert full["support"] == 6 and full["positives"] == 3


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc(np.array([0, 1]), np.array([0.5]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([0, 1]), np.array([0.5, np.nan]))


def _fraud_like(n: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.float64)
    return y, y * rng.normal(1.5, 1.0, n) + rng.normal(0.0, 1.0, n)


def test_pr_auc_standard_error_matches_resampling_and_shrinks_with_positives():
    y, s = _fraud_like(8000, 0.01, seed=5)
    rng = np.random.default_rng(9)
    resampled = []
    for _ in range(300):
        i = rng.integers(0, y.size, y.size)
        resampled.append(average_precision(y[i], s[i]))
    naive = float(np.nanstd(resampled, ddof=1))
    se = average_precision_se(y, s)
    assert 0.8 * naive < se < 1.25 * naive
    y_big, s_big = _fraud_like(80_000, 0.01, seed=5)
    assert average_precision_se(y_big, s_big) < 0.5 * se  # ten times the positives
    assert average_precision_se(y, s) == se  # seeded: reproducible
    assert math.isnan(average_precision_se(np.zeros(10), np.arange(10.0)))


def test_estimate_standard_error_is_the_spread_of_pr_auc_under_bernoulli_labels():
    _, s = _fraud_like(6000, 0.01, seed=6)
    p = 1.0 / (1.0 + np.exp(-(2.0 * s - 7.0)))
    rng = np.random.default_rng(2)
    realised = [average_precision((rng.random(p.size) < p).astype(float), p) for _ in range(400)]
    assert np.mean(realised) == pytest.approx(expected_average_precision(p), abs=0.02)
    assert expected_average_precision_se(p) == pytest.approx(np.std(realised), rel=0.2)
    assert math.isnan(expected_average_precision_se(np.zeros(5)))
