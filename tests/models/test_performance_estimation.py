"""CBPE: label-free estimates of PR-AUC and threshold metrics against realised values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import (
    average_precision,
    expected_average_precision,
    expected_threshold_metrics,
    threshold_metrics,
)


def _calibrated_scores(seed: int, n: int = 3000, slope: float = 2.0) -> np.ndarray:
    """Fraud-like scores: about 1% positives, a ranking as good as `slope` makes it."""
    x = np.random.default_rng(seed).normal(size=n)
    return 1.0 / (1.0 + np.exp(-(-6.0 + slope * x)))


def _label_draws(p: np.ndarray, seed: int, draws: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    return [(rng.random(p.size) < p).astype(float) for _ in range(draws)]


def _mean_realised_ap(p: np.ndarray, seed: int, draws: int = 1000) -> float:
    aps = [average_precision(y, p) for y in _label_draws(p, seed, draws)]
    return float(np.mean([ap for ap in aps if not math.isnan(ap)]))


@pytest.mark.parametrize(("seed", "slope"), [(0, 2.0), (1, 1.5), (2, 2.5), (3, 1.0)])
def test_estimate_matches_mean_realised_ap_when_labels_follow_the_probabilities(seed, slope):
    p = _calibrated_scores(seed, slope=slope)
    assert 0.003 < p.mean() < 0.03, "about 1% positives"
    realised_ap = _mean_realised_ap(p, seed)
    # One realisation's AP spreads by 0.01-0.07 here, the mean of 1000 by about 0.002; the
    # estimate's own bias on 3000 rows is about 0.002.
    assert expected_average_precision(p) == pytest.approx(realised_ap, abs=0.01)


def test_estimate_is_far_from_realised_after_a_concept_change():
    p = _calibrated_scores(0)
    rng = np.random.default_rng(7)
    # The world changed: fraud no longer follows the score (same base rate, random ranking).
    y = (rng.random(p.size) < p.mean()).astype(float)
    realised = average_precision(y, p)
    estimated = expected_average_precision(p)
    # CBPE's blind spot: the scores look as before, so the estimate stays where it was.
    assert estimated > 0.15
    assert estimated - realised > 0.1


def test_a_constant_score_is_estimated_at_the_base_rate():
    # One tie group: AP is the precision over all rows, whose expectation is the mean p.
    assert expected_average_precision(np.full(500, 0.02)) == pytest.approx(0.02)


def test_a_score_that_cannot_be_positive_has_no_estimate():
    assert math.isnan(expected_average_precision(np.zeros(10)))
    assert math.isnan(expected_average_precision(np.zeros(0)))
    with pytest.raises(ValueError):
        expected_average_precision(np.array([0.5, 1.5]))
    with pytest.raises(ValueError):
        expected_average_precision(np.array([0.5, np.nan]))


def test_expected_threshold_metrics_match_realised_means():
    p = _calibrated_scores(5, n=4000, slope=2.5)
    realised = [threshold_metrics(y, p, 0.2) for y in _label_draws(p, 5, 300)]
    expected = expected_threshold_metrics(p, 0.2)
    assert expected["flag_rate"] > 0.005
    mean_precision = float(np.mean([m["precision"] for m in realised]))
    mean_recall = float(np.nanmean([m["recall"] for m in realised]))
    assert expected["precision"] == pytest.approx(mean_precision, abs=0.02)
    assert expected["recall"] == pytest.approx(mean_recall, abs=0.02)
    assert expected["tp"] + expected["fn"] == pytest.approx(p.sum())
    assert expected["flag_rate"] == pytest.approx(float(np.mean(p >= 0.2)))
    assert set(expected) == set(threshold_metrics(np.zeros(3), np.zeros(3), 0.5))
