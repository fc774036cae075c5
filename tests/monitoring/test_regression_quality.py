"""Monitoring a regressor: live MAE on the label-mature cohort, the label-free expected MAE that
follows covariate shift (and, like CBPE, not concept drift), and decay read as MAE rising."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from core.usecase import load
from models.tasks import error_curve, expected_mae
from orchestration.triggers import TriggerPolicy, decay_signal, estimated_decay_signal
from serving.monitoring import LogColumns, live_quality, live_quality_row, live_quality_schema

T0 = datetime(2026, 11, 2, tzinfo=UTC)
POLICY = TriggerPolicy(min_labelled_for_decay=100)


def _world(n: int, seed: int, far_share: float, rain: float = 0.0):
    """Predictions of delivery minutes whose error grows with the prediction (far orders are
    harder); ``far_share`` moves traffic to them (covariate shift), ``rain`` makes every
    order slower than predicted (concept drift: the predictions do not change)."""
    rng = np.random.default_rng(seed)
    far = rng.random(n) < far_share
    predicted = np.where(far, rng.normal(55, 8, n), rng.normal(25, 4, n))
    noise = rng.normal(0, np.where(far, 9.0, 2.0))
    actual = predicted + noise + rain
    return predicted, actual


def test_expected_mae_follows_covariate_shift_and_is_blind_to_concept_drift():
    p_ref, y_ref = _world(20_000, 0, far_share=0.2)
    curve = error_curve(y_ref, p_ref)
    calm, se = expected_mae(curve, _world(5_000, 1, far_share=0.2)[0])
    assert calm == pytest.approx(np.mean(np.abs(p_ref - y_ref)), rel=0.05) and 0 < se < 0.2
    p_far, y_far = _world(5_000, 2, far_share=0.6)
    shifted, _ = expected_mae(curve, p_far)
    realised = float(np.mean(np.abs(p_far - y_far)))
    assert shifted > 1.5 * calm and shifted == pytest.approx(realised, rel=0.1)
    p_rain, y_rain = _world(5_000, 3, far_share=0.2, rain=12.0)
    unaware, _ = expected_mae(curve, p_rain)
    assert unaware == pytest.approx(calm, rel=0.1)  # the same predictions, the same estimate
    assert np.mean(np.abs(p_rain - y_rain)) > 2 * unaware  # ... while the truth is far worse
    assert np.isnan(expected_mae(error_curve(np.zeros(0), np.zeros(0)), p_rain)[0])


def test_live_quality_of_a_regressor_is_its_mae_on_the_mature_cohort():
    p_ref, y_ref = _world(20_000, 0, far_share=0.2)
    predicted, actual = _world(3_000, 4, far_share=0.6)
    times = [T0 + timedelta(minutes=i) for i in range(3_000)]
    newest_label = times[-1] + timedelta(hours=1)
    frame = pl.DataFrame(
        {"timestamp": times, "predicted_minutes": predicted, "label": actual}
    ).with_columns(  # labels of the last hour are not in yet
        pl.when(pl.col("timestamp") > newest_label - timedelta(hours=3))
        .then(None)
        .otherwise(pl.col("label"))
        .alias("label")
    )
    quality = live_quality(
        frame,
        newest_label,
        label_maturity=timedelta(hours=3),
        window=timedelta(days=7),
        task="regression",
        reference=error_curve(y_ref, p_ref).to_dict(),
        columns=LogColumns.of(load("delivery")),
    )
    mature = frame.filter(pl.col("timestamp") <= newest_label - timedelta(hours=3))
    assert quality.metric == "mae" and quality.positives is None
    assert quality.labelled == mature.height
    assert quality.value == pytest.approx(
        float((mature["predicted_minutes"] - mature["label"]).abs().mean())
    )
    assert quality.value_se and 0 < quality.value_se < 0.5
    assert quality.estimated == pytest.approx(quality.value, rel=0.1)
    assert quality.recent == frame.height - mature.height and quality.estimated_unlabelled
    row = live_quality_row(quality, at=newest_label, label_batch="b1", champion="v0001")
    assert list(row) == list(live_quality_schema("regression"))
    assert row["mae"] == quality.value and row["estimated_mae_unlabelled"] > 0


def test_decay_of_a_regressor_is_its_mae_rising():
    rising = decay_signal(12.0, 10.0, 500, POLICY, metric="mae")
    assert rising.kind == "decay" and rising.value == pytest.approx(0.2)
    assert rising.reason.startswith("live MAE 12.000 is 20% above offline 10.000")
    assert decay_signal(11.0, 10.0, 500, POLICY, metric="mae") is None
    assert decay_signal(8.0, 10.0, 500, POLICY, metric="mae") is None
    # Noisy figures: 20% worse, but within what chance explains.
    assert decay_signal(12.0, 10.0, 500, POLICY, live_se=2.0, offline_se=0.5, metric="mae") is None
    estimated = estimated_decay_signal(
        13.0, 10.0, 500, POLICY, estimate_se=0.2, offline_se=0.2, metric="mae"
    )
    assert estimated.reason.startswith("estimated live MAE 13.000 (label-free, DLE) is 30% above")
