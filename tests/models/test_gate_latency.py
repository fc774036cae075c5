"""The gate's latency budget holds the tail customers meet, not the median."""

import numpy as np

from models.evaluate import evaluate_scores
from models.gate import GatePolicy, InfraReport, validate_challenger


def test_a_model_fast_at_the_median_but_slow_in_its_tail_is_over_the_budget():
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.1).astype(float)
    p = 1 / (1 + np.exp(-(3.0 * y + rng.normal(0, 1, y.size) - 2)))
    good = evaluate_scores("g", y, p, 0.5, slice_columns=())
    base = evaluate_scores("b", y, 1 / (1 + np.exp(-(y + rng.normal(0, 1, y.size) - 2))), 0.5)
    # Every tenth call of a batch of one waits 40 ms (a lock, a GC pause): median 2 ms.
    tail = InfraReport(
        True, True, 0.0, 40_000, {"1": {"p50": 2.0, "p95": 40.0}, "64": {"p50": 5.0, "p95": 8.0}}
    )
    decision = validate_challenger(good, base, None, tail, GatePolicy())
    [latency] = [c for c in decision.checks if c["check"] == "latency_batch1"]
    assert not latency["passed"] and latency["latency_ms"] == 40.0
    assert any("CPU latency p95 for a batch of 1: 40.00 ms" in r for r in decision.reasons)
