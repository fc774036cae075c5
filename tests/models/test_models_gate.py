from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from models.artifact import WEIGHTS, save_training_result
from models.evaluate import evaluate_model, evaluate_scores
from models.gate import GatePolicy, InfraReport, infra_validate, validate_challenger
from models.train import train_baseline, train_model
from tests.models.testkit import FAST, SLICING, SPEC, WEAK_BASELINE

SMALL_DATA = GatePolicy(slice_min_support=50, slice_min_positives=5, latency_repeats=10)
GOOD_INFRA = InfraReport(
    True, True, 0.0, 40_000, {"1": {"p50": 0.8, "p95": 1.0}, "64": {"p50": 1.5, "p95": 2.0}}
)


def _failed(decision) -> list[str]:
    return [c["check"] for c in decision.checks if not c["passed"]]


@pytest.fixture(scope="module")
def trained(training_set):
    return {
        "champion": train_model(training_set, SPEC, FAST),
        "baseline": train_baseline(training_set, SPEC, WEAK_BASELINE),
    }


def test_a_deliberately_worse_model_is_rejected(trained, training_set, tmp_path):
    shuffled = training_set.with_columns(pl.col("label").shuffle(seed=1))
    worse = train_model(shuffled, SPEC, replace(FAST, seed=3))
    saved = save_training_result(worse, tmp_path / "worse", golden_rows=training_set.head(64))
    infra = infra_validate(saved.path, training_set.head(64), SMALL_DATA)
    evals = {
        name: evaluate_model(r.model, r.preprocessor, training_set, name=name)
        for name, r in {**trained, "challenger": worse}.items()
    }
    decision = validate_challenger(
        evals["challenger"], evals["baseline"], evals["champion"], infra, SMALL_DATA
    )
    assert not decision.passed
    assert {"beats_baseline", "beats_champion"} <= set(_failed(decision))
    assert any("does not beat champion" in r for r in decision.reasons)
    assert "REJECTED" in decision.to_markdown()


def test_a_better_model_passes_when_there_is_no_champion(trained, training_set, tmp_path):
    net, base = trained["champion"], trained["baseline"]
    saved = save_training_result(net, tmp_path / "good", golden_rows=training_set.head(64))
    infra = infra_validate(saved.path, training_set.head(64), SMALL_DATA)
    assert infra.reloaded and infra.identical_outputs and infra.max_abs_diff == 0.0
    assert set(infra.latency_ms) == {"1", "64"} and infra.latency_ms["64"]["p95"] > 0
    challenger = evaluate_model(
        net.model, net.preprocessor, training_set, name="challenger", slicing=SLICING
    )
    baseline = evaluate_model(
        base.model, base.preprocessor, training_set, name="baseline", slicing=SLICING
    )
    # Slices of ~100 rows and ~10 positives are noisy: a wider tolerance for this small set.
    policy = replace(
        SMALL_DATA, slice_min_support=100, slice_min_positives=10, slice_tolerance=0.15
    )
    decision = validate_challenger(challenger, baseline, None, infra, policy)
    assert decision.passed, decision.reasons
    assert any(c["check"].startswith("slice:") for c in decision.checks)
    assert decision.reasons == []


def _scored_slices(seed: int = 0, n: int = 8000):
    rng = np.random.default_rng(seed)
    countries = rng.choice(["DE", "FR", "US", "GB"], n, p=[0.3, 0.3, 0.3, 0.1])
    frame = pl.DataFrame({"country": countries})
    y = (rng.random(n) < 0.1).astype(float)
    noise = rng.normal(0, 1, n)

    def scores(signal: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(signal * y + noise - 2)))

    return frame, y, scores, rng


def test_a_model_that_regresses_one_slice_is_rejected():
    frame, y, scores, _ = _scored_slices()
    champion_p = scores(np.full(y.size, 2.0))
    baseline_p = scores(np.full(y.size, 1.0))
    fr = (frame["country"] == "FR").to_numpy()
    challenger_p = scores(np.where(fr, 0.5, 4.0))  # sharper everywhere but much weaker on FR
    kwargs = {"slice_frame": frame, "slice_columns": ("country",)}
    reports = {
        name: evaluate_scores(name, y, p, 0.5, **kwargs)
        for name, p in (
            ("challenger", challenger_p),
            ("champion", champion_p),
            ("baseline", baseline_p),
        )
    }
    assert reports["challenger"].metrics["pr_auc"] > reports["champion"].metrics["pr_auc"] + 0.01
    policy = GatePolicy(slice_min_support=500, slice_min_positives=20, slice_tolerance=0.05)
    decision = validate_challenger(
        reports["challenger"], reports["baseline"], reports["champion"], GOOD_INFRA, policy
    )
    assert not decision.passed
    assert _failed(decision) == ["slice:country=FR"]
    assert len(decision.reasons) == 1 and "country=FR" in decision.reasons[0]
    assert "regresses by" in decision.reasons[0]
    # The same regression on a slice too small to trust is not a reason to reject.
    lenient = replace(policy, slice_min_support=fr.sum() + 1)
    assert validate_challenger(
        reports["challenger"], reports["baseline"], reports["champion"], GOOD_INFRA, lenient
    ).passed


def test_champion_margin_is_configurable():
    frame, y, scores, _ = _scored_slices(seed=1)
    a = evaluate_scores(
        "a", y, scores(np.full(y.size, 2.2)), 0.5, frame, slice_columns=("country",)
    )
    b = evaluate_scores(
        "b", y, scores(np.full(y.size, 2.0)), 0.5, frame, slice_columns=("country",)
    )
    base = evaluate_scores(
        "c", y, scores(np.full(y.size, 0.5)), 0.5, frame, slice_columns=("country",)
    )
    gain = a.metrics["pr_auc"] - b.metrics["pr_auc"]
    assert gain > 0
    ok = validate_challenger(a, base, b, GOOD_INFRA, GatePolicy(min_gain_over_champion=gain / 2))
    assert ok.passed, ok.reasons
    strict = validate_challenger(
        a, base, b, GOOD_INFRA, GatePolicy(min_gain_over_champion=gain * 2)
    )
    assert _failed(strict) == ["beats_champion"]
    by_loss = validate_challenger(a, base, b, GOOD_INFRA, GatePolicy(primary_metric="log_loss"))
    assert a.metrics["log_loss"] < b.metrics["log_loss"] and by_loss.passed


def test_every_infrastructure_failure_is_a_recorded_reason(trained, training_set, tmp_path):
    frame, y, scores, _ = _scored_slices()
    good = evaluate_scores("g", y, scores(np.full(y.size, 3.0)), 0.5, frame, slice_columns=())
    base = evaluate_scores("b", y, scores(np.full(y.size, 1.0)), 0.5, frame, slice_columns=())
    slow_big = InfraReport(
        True,
        False,
        1e-3,
        10**9,
        {"1": {"p50": 70.0, "p95": 80.0}, "64": {"p50": 400.0, "p95": 500.0}},
    )
    decision = validate_challenger(good, base, None, slow_big, GatePolicy())
    assert _failed(decision) == [
        "identical_outputs",
        "model_size",
        "latency_batch1",
        "latency_batch64",
    ]
    assert len(decision.reasons) == 4
    assert any("over the budget of 25.00 ms" in r for r in decision.reasons)

    saved = save_training_result(trained["champion"], tmp_path / "m")
    (saved.path / WEIGHTS).write_bytes(b"not a model")
    broken = infra_validate(saved.path, training_set.head(8), SMALL_DATA)
    assert not broken.reloaded and "does not match its checksum" in broken.errors[0]
    rejected = validate_challenger(good, base, None, broken, GatePolicy())
    assert "reloads" in _failed(rejected)
    assert any("does not reload" in r and "checksum" in r for r in rejected.reasons)


def test_reports_on_different_data_are_not_compared():
    frame, y, scores, _ = _scored_slices()
    a = evaluate_scores("a", y, scores(np.full(y.size, 3.0)), 0.5, frame, slice_columns=())
    b = evaluate_scores("b", y[:-10], scores(np.full(y.size, 1.0))[:-10], 0.5, slice_columns=())
    decision = validate_challenger(a, b, None, GOOD_INFRA, GatePolicy())
    assert "same_data_as_baseline" in _failed(decision)


def test_too_few_test_positives_get_no_verdict():
    # 200 rows at 10% fraud: ~20 positives, where a better-looking challenger is luck.
    frame, y, scores, _ = _scored_slices(seed=2, n=200)
    a, b, base = (
        evaluate_scores(name, y, scores(np.full(y.size, s)), 0.5, frame, slice_columns=())
        for name, s in (("a", 4.0), ("b", 1.0), ("c", 0.5))
    )
    positives = int(y.sum())
    assert a.metrics["pr_auc"] > b.metrics["pr_auc"] and positives < 30
    decision = validate_challenger(a, base, b, GOOD_INFRA, GatePolicy())
    assert _failed(decision) == ["enough_positives"]
    assert f"{positives} positives" in decision.reasons[0]
    lowered = GatePolicy(min_test_positives=positives)
    assert validate_challenger(a, base, b, GOOD_INFRA, lowered).passed
