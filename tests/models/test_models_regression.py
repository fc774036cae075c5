"""A regressor through the same code path as the classifier: the network learns a target with
interactions a linear baseline cannot, outputs it in the target's units, is judged on MAE per
slice, passes or fails the gate on MAE, survives a save and reload, and gets its own card."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from models.artifact import load_model, save_training_result
from models.card import model_card
from models.evaluate import (
    EvaluationReport,
    evaluate_model,
    evaluate_scores,
    evaluation_markdown,
    predict,
)
from models.gate import validate_challenger
from models.spec import FeatureSpec, GatePolicy, Slicing
from models.tasks import REGRESSION, regression_metrics
from models.train import train_baseline, train_model
from tests.models.test_models_gate import GOOD_INFRA
from tests.models.testkit import FAST

SPEC = FeatureSpec(
    numeric=("distance_km", "restaurant_prep_min"),
    categorical=("zone", "weather"),
    task=REGRESSION,
)
SLICING = Slicing(columns=("zone", "weather"))


def make_deliveries(n: int = 6000, seed: int = 0) -> pl.DataFrame:
    """Delivery minutes: prep time, distance, and rain that slows the far zone most (an
    interaction no linear model of these inputs can draw), with noise and missing values."""
    rng = np.random.default_rng(seed)
    zone = rng.choice(["centre", "north", "far"], n, p=[0.5, 0.3, 0.2])
    weather = rng.choice(["dry", "rain"], n, p=[0.7, 0.3])
    distance = rng.gamma(2.0, 1.5, n)
    prep = rng.gamma(4.0, 3.0, n)
    slow = np.where((weather == "rain") & (zone == "far"), 2.5, 1.0)
    minutes = 8 + prep + 4 * distance * slow + 6 * (distance > 5) + rng.normal(0, 2, n)
    split = np.where(
        np.arange(n) < int(0.7 * n),
        "train",
        np.where(np.arange(n) < int(0.85 * n), "validation", "test"),
    )
    start = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "order_id": [f"o{i:07d}" for i in range(n)],
            "event_timestamp": [start + dt.timedelta(minutes=int(i)) for i in range(n)],
            "label": minutes,
            "split": split,
            "distance_km": np.where(rng.random(n) < 0.05, np.nan, distance),
            "restaurant_prep_min": prep,
            "zone": zone,
            "weather": weather,
        }
    )


@pytest.fixture(scope="module")
def deliveries() -> pl.DataFrame:
    return make_deliveries()


@pytest.fixture(scope="module")
def fitted(deliveries):
    config = replace(FAST, epochs=40, patience=5, hidden=(32, 16))
    return train_model(deliveries, SPEC, config), train_baseline(deliveries, SPEC, config)


def test_the_network_beats_the_linear_baseline_in_the_targets_units(fitted, deliveries):
    network, baseline = fitted
    test = deliveries.filter(pl.col("split") == "test")
    y = test["label"].to_numpy()
    mine = regression_metrics(y, predict(network.model, network.preprocessor, test))
    theirs = regression_metrics(y, predict(baseline.model, baseline.preprocessor, test))
    # Minutes, not z-scores: the mean prediction is the mean delivery time, within a minute.
    assert abs(mine["mean_prediction"] - mine["mean_label"]) < 1.0
    assert mine["mae"] < 0.8 * theirs["mae"], (mine, theirs)
    assert mine["mae"] < 2.5 and mine["r2"] > 0.9  # the noise alone costs ~1.6 minutes
    assert network.calibration["method"] == "standardised"
    assert network.data_window["mean_label"] > 0 and "positives" not in network.data_window


def test_evaluation_and_gate_judge_a_regressor_on_mae(fitted, deliveries):
    network, baseline = fitted
    reports = {
        name: evaluate_model(r.model, r.preprocessor, deliveries, name=name, slicing=SLICING)
        for name, r in (("challenger", network), ("baseline", baseline))
    }
    challenger = reports["challenger"]
    assert challenger.task == REGRESSION and np.isnan(challenger.threshold)
    assert {"mae", "rmse", "r2", "bias"} <= set(challenger.metrics)
    rain = challenger.slice("weather", "rain")
    assert rain is not None and rain.support > 200 and "mae" in rain.metrics
    assert EvaluationReport.from_dict(challenger.to_dict()).metrics == pytest.approx(
        challenger.metrics, nan_ok=True
    )
    markdown = evaluation_markdown(reports)
    assert "| model | mae | rmse | r2 | bias | median_ae |" in markdown
    assert "positives" not in markdown and "threshold" not in markdown

    policy = GatePolicy(min_test_rows=100, slice_min_support=100, slice_tolerance=1.0)
    passed = validate_challenger(challenger, reports["baseline"], None, GOOD_INFRA, policy)
    assert passed.passed, passed.reasons
    [beats] = [c for c in passed.checks if c["check"] == "beats_baseline"]
    assert "challenger mae" in beats["detail"] and beats["gain"] > 0
    # The baseline judged as a challenger against the network: a higher MAE fails, per slice too.
    swapped = replace(reports["baseline"], model="challenger")
    failed = validate_challenger(swapped, challenger, None, GOOD_INFRA, policy)
    assert not failed.passed
    assert any("does not beat baseline" in r for r in failed.reasons)
    too_few = validate_challenger(
        challenger, reports["baseline"], None, GOOD_INFRA, replace(policy, min_test_rows=10**6)
    )
    assert any("rows in test, fewer than" in r for r in too_few.reasons)


def test_a_saved_regressor_reloads_to_the_same_predictions_and_gets_its_card(
    fitted, deliveries, tmp_path
):
    network, _ = fitted
    saved = save_training_result(network, tmp_path / "model")
    module, preprocessor = load_model(saved.path)
    assert preprocessor.spec.task == REGRESSION
    rows = deliveries.head(50)
    assert np.array_equal(
        predict(module, preprocessor, rows), predict(network.model, network.preprocessor, rows)
    )
    report = evaluate_model(network.model, network.preprocessor, deliveries, name="challenger")
    card = model_card(
        name="delivery", version="v0001", spec=SPEC, training=network.summary(),
        reports={"challenger": report},
    )  # fmt: skip
    assert "mean label" in card and "Huber" in card and "no decision is taken" in card
    assert "decision threshold" not in card and "positives" not in card


def test_a_constant_or_missing_target_is_refused(deliveries):
    constant = deliveries.with_columns(label=pl.lit(30.0))
    with pytest.raises(ValueError, match="constant"):
        train_model(constant, SPEC, FAST)
    holes = deliveries.with_columns(
        label=pl.when(pl.col("zone") == "far").then(None).otherwise(pl.col("label"))
    )
    with pytest.raises(ValueError, match="null"):
        train_model(holes, SPEC, FAST)


def test_a_regressor_regresses_on_a_slice_only_when_its_mae_is_significantly_worse():
    rng = np.random.default_rng(4)
    n = 3000
    zone = rng.choice(["centre", "north", "far"], n, p=[0.5, 0.3, 0.2])
    y = 20 + rng.gamma(2.0, 5.0, n)
    shared = rng.normal(0, 3, n)

    def model(seed: int) -> np.ndarray:
        return y + shared + np.random.default_rng(seed).normal(0, 1, n)

    far = zone == "far"
    late_on_far = model(1) + np.where(far, 4.0, 0.0)  # four minutes late in one zone
    frame = pl.DataFrame({"zone": zone})
    policy = GatePolicy(min_gain_over_champion=-10.0, min_test_rows=100, slice_tolerance=1.0)

    def slices(challenger: np.ndarray) -> dict[str, dict]:
        reports = [
            evaluate_scores(name, y, p, math.nan, frame, slice_columns=("zone",), task=REGRESSION)
            for name, p in (
                ("challenger", challenger),
                ("champion", model(0)),
                ("b", rng.normal(y.mean(), 1.0, n)),
            )
        ]
        decision = validate_challenger(reports[0], reports[2], reports[1], GOOD_INFRA, policy)
        return {c["check"]: c for c in decision.checks if c["check"].startswith("slice:")}

    flagged = slices(late_on_far)
    assert flagged["slice:zone=far"]["outcome"] == "regressed"
    assert "mae" in flagged["slice:zone=far"]["detail"]
    assert {flagged[f"slice:zone={z}"]["outcome"] for z in ("centre", "north")} == {"passed"}
    assert {c["outcome"] for c in slices(model(1)).values()} == {"passed"}
