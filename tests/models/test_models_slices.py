"""Slice checks on rare positives: a slice regresses only when the regression is significant,
and a slice whose rows cannot tell is "not enough support", never passed (issue 19)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from models.evaluate import EvaluationReport, evaluate_scores
from models.gate import GatePolicy, validate_challenger
from tests.models.test_models_gate import GOOD_INFRA

COUNTRIES, SHARES = ["DE", "FR", "US", "GB"], [0.3, 0.3, 0.3, 0.1]
# Only the slices are under test: the challenger need not beat the champion overall.
POLICY = GatePolicy(min_gain_over_champion=-1.0, min_test_positives=10)
ALPHA = 0.05  # GatePolicy's default slice_alpha: the stated family-wise error rate


def _world(seed: int, n: int = 6000, rate: float = 0.03):
    """Rows at a 3% positive rate in four countries, and a family of scorers: each seed's model
    sees the same signal and the same hard rows, plus errors of its own, so any two seeds are
    equally good on every slice of the population (a sound retrain)."""
    rng = np.random.default_rng(seed)
    frame = pl.DataFrame({"country": rng.choice(COUNTRIES, n, p=SHARES)})
    y = (rng.random(n) < rate).astype(float)
    shared = rng.normal(0, 1, n)

    def model(model_seed: int, signal: float = 2.5) -> np.ndarray:
        own = np.random.default_rng([seed, model_seed]).normal(0, 1, n)
        return 1 / (1 + np.exp(-(signal * y + shared + 0.3 * own - 3)))

    return frame, y, model


def _judge(frame, y, challenger, champion, policy=POLICY):
    weak = np.linspace(0.0, 1.0, y.size)  # a baseline with no signal: beaten overall
    reports = [
        evaluate_scores(name, y, p, 0.5, frame, slice_columns=("country",))
        for name, p in (("challenger", challenger), ("champion", champion), ("baseline", weak))
    ]
    return reports, validate_challenger(*reports[:1], reports[2], reports[1], GOOD_INFRA, policy)


def _slices(decision) -> dict[str, dict]:
    return {c["check"]: c for c in decision.checks if c["check"].startswith("slice:")}


def test_a_real_slice_regression_with_support_is_flagged_significant():
    frame, y, model = _world(0)
    fr = (frame["country"] == "FR").to_numpy()
    challenger = np.where(fr, model(1, signal=0.8), model(1))  # much weaker on FR alone
    _, decision = _judge(frame, y, challenger, model(0))
    slices = _slices(decision)
    assert slices["slice:country=FR"]["outcome"] == "regressed"
    assert slices["slice:country=FR"]["upper_bound"] < -POLICY.slice_tolerance
    assert not decision.passed and decision.verdict == "rejected"
    [reason] = [r for r in decision.reasons if r.startswith("slice")]
    assert "country=FR" in reason and "regresses by" in reason and "significantly" in reason
    assert all(c["outcome"] == "passed" for n, c in slices.items() if n != "slice:country=FR")


def test_a_noise_level_slice_difference_is_not_a_regression():
    # A sound retrain (another seed of the same model) that, by chance, scores more than the
    # tolerance lower on one well-populated slice: the old gate rejected it for that.
    frame, y, model = _world(20)
    (challenger, champion, _), decision = _judge(frame, y, model(1), model(0))
    drops = {
        s.value: champion.slice(s.column, s.value).metrics["pr_auc"] - s.metrics["pr_auc"]
        for s in challenger.slices
        if s.support >= 500 and s.positives >= 20
    }
    noisy = max(drops, key=drops.get)
    assert drops[noisy] > POLICY.slice_tolerance  # the point estimate alone would reject
    check = _slices(decision)[f"slice:country={noisy}"]
    assert check["passed"] is True and check["outcome"] == "passed", check["detail"]
    assert "no significant regression" in check["detail"]
    assert not any(c["passed"] is False for c in _slices(decision).values())
    assert not any(r.startswith("slice") for r in decision.reasons)


def test_a_slice_with_three_positives_is_not_enough_support_never_passed():
    frame, y, model = _world(0)
    # 300 rows of a new country, three of them positive, where the challenger is much worse.
    rows = np.r_[np.flatnonzero(y == 1)[:3], np.flatnonzero(y == 0)[:297]]
    country = frame["country"].to_numpy().copy()
    country[rows] = "MT"
    frame = pl.DataFrame({"country": country})
    challenger = model(1, signal=3.0)  # better overall...
    challenger[rows] = model(1, signal=0.0)[rows]  # ...and blind on the three
    _, decision = _judge(frame, y, challenger, model(0))
    check = _slices(decision).get("slice:country=MT")
    assert check is not None, "the slice is reported, not skipped"
    assert check["outcome"] == "not enough support" and check["passed"] is not True
    assert "3 positives" in check["detail"]
    assert "| slice:country=MT | NOT ENOUGH SUPPORT |" in decision.to_markdown()
    # The other slices were compared, so the verdict stands, and says what was not verified.
    assert decision.passed and decision.verdict == "passed"
    assert any("country=MT" in w for w in decision.warnings)
    assert decision.slice_outcomes() == {"passed": 4, "regressed": 0, "not enough support": 1}


def test_slices_are_not_compared_without_both_models_scores_on_the_same_rows():
    frame, y, model = _world(0)
    (challenger, champion, baseline), _ = _judge(frame, y, model(1, signal=3.0), model(0))
    read_back = EvaluationReport.from_dict(champion.to_dict())
    decision = validate_challenger(challenger, baseline, read_back, GOOD_INFRA, POLICY)
    assert not decision.passed and decision.verdict == "rejected"
    assert any("slices not compared" in r for r in decision.reasons)


@pytest.mark.parametrize("setting", ["block", "warn"])
def test_a_verdict_where_no_slice_has_support_is_not_a_pass(setting):
    frame, y, model = _world(1, n=2000, rate=0.01)  # ~20 positives over four countries
    assert y.sum() >= POLICY.min_test_positives
    policy = POLICY if setting == "block" else replace(POLICY, slices_unsupported=setting)
    _, decision = _judge(frame, y, model(1, signal=3.0), model(0), policy)
    assert "PASSED" not in decision.to_markdown()
    recorded = decision.to_dict()
    assert recorded.get("verdict") == decision.verdict == "not enough support"
    assert {c["outcome"] for c in _slices(decision).values()} == {"not enough support"}
    if setting == "block":
        assert not decision.passed
        assert any("not enough support" in r and "--force" in r for r in decision.reasons)
        assert "NOT ENOUGH SUPPORT (blocked)" in decision.to_markdown()
    else:
        assert decision.passed and decision.reasons == []
        assert any("slice regressions are unverified" in w for w in recorded["warnings"])
        assert "NOT ENOUGH SUPPORT (promotable, unverified)" in decision.to_markdown()


def test_a_first_model_is_not_blocked_for_want_of_slice_support():
    # With nothing in production, blocking leaves nothing serving until labels pile up (the
    # fraud demo's first model, +0.11 PR-AUC over the baseline, waited for more batches): the
    # verdict still says "not enough support", never passed, and nothing regressed is waved on.
    frame, y, model = _world(1, n=2000, rate=0.01)
    weak = np.linspace(0.0, 1.0, y.size)
    challenger, baseline = (
        evaluate_scores(name, y, p, 0.5, frame, slice_columns=("country",))
        for name, p in (("challenger", model(1, signal=3.0)), ("baseline", weak))
    )
    assert POLICY.slices_unsupported == "block"
    decision = validate_challenger(challenger, baseline, None, GOOD_INFRA, POLICY)
    assert decision.passed and decision.verdict == "not enough support"
    assert "NOT ENOUGH SUPPORT (promotable, unverified)" in decision.to_markdown()
    assert any("slice regressions are unverified" in w for w in decision.warnings)
    # A champion in production keeps the declared block.
    _, blocked = _judge(frame, y, model(1, signal=3.0), model(0))
    assert not blocked.passed and blocked.verdict == "not enough support"


@pytest.mark.slow
def test_sound_challengers_are_flagged_on_some_slice_at_most_alpha_of_the_time():
    """100 seeded sound retrains, each on its own test rows: the share wrongly rejected for a
    slice stays at or below slice_alpha (family-wise over the slices), while most slices are
    still compared rather than waved through as "not enough support"."""
    trials, flagged, outcomes = 100, 0, []
    for seed in range(trials):
        frame, y, model = _world(seed)
        _, decision = _judge(frame, y, model(1), model(0))
        slices = _slices(decision).values()
        flagged += any(c["passed"] is False for c in slices)
        outcomes += [c.get("outcome") for c in slices]
    assert flagged <= ALPHA * trials, flagged
    assert outcomes.count("passed") >= 0.6 * len(outcomes), outcomes
    assert POLICY.slice_alpha == ALPHA
