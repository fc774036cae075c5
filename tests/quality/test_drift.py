"""Drift statistics agree with SciPy and flag real distribution shifts, not resampling noise."""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial.distance import jensenshannon

from quality.drift import (
    OTHER,
    Profile,
    build_profile,
    compare,
    drift_frame,
    js_distance,
    ks_statistic,
    profile_and_compare,
    psi,
)
from quality.schema import drift_columns
from usecases.fraud.simulator import CHANNELS, COUNTRIES

NUMERIC = ["amount", "hour_of_day"]
CATEGORICAL = ["channel", "country"]


def batch(
    n: int,
    seed: int,
    *,
    amount_mu: float = 3.5,
    channel_p: tuple[float, float, float] = (0.5, 0.3, 0.2),
) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "amount": rng.lognormal(amount_mu, 1.0, n),
            "hour_of_day": rng.integers(0, 24, n),
            "channel": rng.choice(np.array(CHANNELS), n, p=list(channel_p)),
            "country": rng.choice(np.array(COUNTRIES[:5]), n),
        }
    )


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_psi_matches_the_formula_by_hand() -> None:
    expected = [0.25, 0.25, 0.25, 0.25]
    actual = [0.1, 0.2, 0.3, 0.4]
    by_hand = (
        (0.1 - 0.25) * math.log(0.1 / 0.25)
        + (0.2 - 0.25) * math.log(0.2 / 0.25)
        + (0.3 - 0.25) * math.log(0.3 / 0.25)
        + (0.4 - 0.25) * math.log(0.4 / 0.25)
    )
    assert psi(expected, actual) == pytest.approx(by_hand, rel=1e-12)


def test_psi_smooths_empty_bins_with_epsilon() -> None:
    eps = 1e-4
    by_hand = (
        (0.4 - 0.5) * math.log(0.4 / 0.5)
        + (0.4 - 0.5) * math.log(0.4 / 0.5)
        + (0.2 - eps) * math.log(0.2 / eps)
    )
    value = psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2], eps=eps)
    assert math.isfinite(value)
    assert value == pytest.approx(by_hand, rel=1e-12)


def test_psi_of_identical_distributions_is_zero() -> None:
    df = batch(20_000, seed=1)
    result = compare(build_profile(df, NUMERIC, CATEGORICAL), df)
    assert result.max_psi == pytest.approx(0.0, abs=1e-12)
    assert all(f.ks == 0.0 or f.ks is None for f in result.features)


def test_psi_of_shifted_normal_is_large_and_matches_the_analytic_value() -> None:
    rng = np.random.default_rng(7)
    reference = pl.DataFrame({"x": rng.normal(0.0, 1.0, 50_000)})
    shifted = pl.DataFrame({"x": rng.normal(1.0, 1.0, 50_000)})
    profile = build_profile(reference, ["x"], [])
    value = compare(profile, shifted).feature("x").psi

    edges = [-math.inf, *profile.numeric["x"].bin_edges, math.inf]
    expected = profile.numeric["x"].bin_fractions
    actual = [normal_cdf(hi - 1.0) - normal_cdf(lo - 1.0) for lo, hi in itertools.pairwise(edges)]
    analytic = sum((a - e) * math.log(a / e) for a, e in zip(actual, expected, strict=True))

    assert value > 0.2
    assert value == pytest.approx(analytic, rel=0.08)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (np.random.default_rng(0).normal(size=300), np.random.default_rng(1).normal(size=120)),
        (
            np.random.default_rng(2).integers(0, 6, 500),
            np.random.default_rng(3).integers(0, 8, 4_000),
        ),
        (
            np.random.default_rng(4).exponential(size=15_000).round(1),
            np.random.default_rng(5).exponential(1.2, size=25_000).round(1),
        ),
        (
            np.random.default_rng(6).uniform(size=12_000),
            np.random.default_rng(7).uniform(0.05, 1.05, size=30),
        ),
        (np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0])),
        (np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0])),
        (np.array([5.0]), np.array([5.0, 1.0, 9.0, 5.0])),
    ],
    ids=[
        "normal",
        "integer-ties",
        "large-rounded-ties",
        "large-vs-tiny",
        "constant",
        "disjoint",
        "one",
    ],
)
def test_ks_statistic_equals_scipy(a: np.ndarray, b: np.ndarray) -> None:
    expected = stats.ks_2samp(a, b).statistic
    assert ks_statistic(a, b) == expected
    assert ks_statistic(b, a) == expected


@pytest.mark.filterwarnings("ignore:ks_2samp. Exact calculation unsuccessful")
@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(-20, 20), min_size=1, max_size=60),
    st.lists(st.integers(-20, 20), min_size=1, max_size=60),
)
def test_ks_statistic_equals_scipy_on_arbitrary_tied_samples(a: list[int], b: list[int]) -> None:
    assert ks_statistic(a, b) == stats.ks_2samp(a, b).statistic


def test_ks_statistic_rejects_empty_samples() -> None:
    with pytest.raises(ValueError):
        ks_statistic([], [1.0])


@pytest.mark.parametrize(
    ("p", "q"),
    [
        ([0.1, 0.4, 0.5, 0.0], [0.3, 0.3, 0.2, 0.2]),
        ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
        ([5, 3, 2, 9], [5, 3, 2, 9]),
        ([120, 30, 1, 0, 7], [100, 60, 0, 4, 7]),
    ],
)
def test_js_distance_equals_scipy(p: list[float], q: list[float]) -> None:
    assert js_distance(p, q) == jensenshannon(p, q, base=2)


def test_js_distance_equals_scipy_on_random_vectors() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        k = int(rng.integers(2, 25))
        p = rng.random(k) * (rng.random(k) > 0.2)
        p[0] += 0.01
        q = rng.random(k)
        assert js_distance(p, q) == jensenshannon(p, q, base=2)


def test_compare_flags_a_covariate_shift() -> None:
    reference = build_profile(batch(30_000, seed=0), NUMERIC, CATEGORICAL)
    shifted = batch(20_000, seed=1, amount_mu=4.2, channel_p=(0.2, 0.3, 0.5))
    result = compare(reference, shifted)

    assert set(result.drifted()) == {"amount", "channel"}
    assert result.feature("amount").psi > 0.2
    assert result.feature("amount").ks > 0.2
    assert result.feature("channel").js > 0.1
    assert result.feature("hour_of_day").psi < 0.05
    assert result.max_psi == max(f.psi for f in result.features)


def test_compare_does_not_flag_a_resample_of_the_same_distribution() -> None:
    reference = build_profile(batch(30_000, seed=0), NUMERIC, CATEGORICAL)
    result = compare(reference, batch(20_000, seed=1))

    assert result.drifted() == []
    assert result.max_psi < 0.02
    assert all(f.ks is None or f.ks < 0.03 for f in result.features)
    assert all(f.new_categories == [] for f in result.features)


def test_drifted_accepts_per_feature_thresholds() -> None:
    reference = build_profile(batch(30_000, seed=0), NUMERIC, CATEGORICAL)
    result = compare(reference, batch(20_000, seed=1, amount_mu=4.2))
    assert result.drifted({"amount": 100.0, "channel": 0.2}) == []
    assert result.drifted({"hour_of_day": 0.0}) == ["hour_of_day"]


def test_compare_ks_is_against_the_profile_sample() -> None:
    reference_frame = batch(50_000, seed=0)
    profile = build_profile(reference_frame, ["amount"], [], sample_size=2_000, seed=3)
    current = batch(15_000, seed=9, amount_mu=3.6)
    expected = stats.ks_2samp(profile.numeric["amount"].sample, current["amount"]).statistic
    assert compare(profile, current).feature("amount").ks == expected


def test_unseen_categories_are_reported_and_raise_psi() -> None:
    reference = build_profile(batch(10_000, seed=0), [], ["channel"])
    current = batch(10_000, seed=1).with_columns(
        pl.when(pl.int_range(pl.len()) % 4 == 0)
        .then(pl.lit("atm"))
        .otherwise(pl.col("channel"))
        .alias("channel")
    )
    drift = compare(reference, current).feature("channel")

    assert drift.new_categories == ["atm"]
    assert drift.psi > 0.2
    assert drift.js > 0.1


def test_rare_categories_fold_into_other() -> None:
    df = pl.DataFrame({"c": ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5})
    profile = build_profile(df, [], ["c"], top_k=2)
    assert profile.categorical["c"].frequencies == {"a": 0.5, "b": 0.3, OTHER: 0.2}

    current = pl.DataFrame({"c": ["a"] * 50 + ["b"] * 30 + ["z"] * 20})
    drift = compare(profile, current).feature("c")
    assert drift.psi == pytest.approx(0.0, abs=1e-12)
    assert drift.new_categories == []


def test_null_rates_are_measured_on_both_sides() -> None:
    reference = batch(10_000, seed=0)
    profile = build_profile(reference, NUMERIC, CATEGORICAL)
    current = batch(10_000, seed=1).with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0)
        .then(None)
        .otherwise(pl.col("amount"))
        .alias("amount"),
        pl.when(pl.int_range(pl.len()) % 4 == 0)
        .then(None)
        .otherwise(pl.col("country"))
        .alias("country"),
    )
    result = compare(profile, current)

    assert profile.numeric["amount"].null_rate == 0.0
    assert result.feature("amount").null_rate_current == pytest.approx(0.1)
    assert result.feature("amount").count == 9_000
    assert result.feature("country").null_rate_current == pytest.approx(0.25)
    assert result.feature("amount").psi < 0.05


def test_nan_counts_as_missing_like_null() -> None:
    values = np.random.default_rng(4).normal(size=2_000)
    with_gaps = values.copy()
    with_gaps[::10] = np.nan
    df = pl.DataFrame({"amount": with_gaps}).with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 5).then(None).otherwise("amount").alias("amount")
    )
    present = df["amount"].fill_nan(None).drop_nulls().to_numpy()
    profile = build_profile(df, ["amount"], [], sample_size=500)
    result = compare(profile, df)

    amount = profile.numeric["amount"]
    assert amount.count == present.size == 1_600
    assert amount.null_rate == pytest.approx(0.2)
    assert (amount.min, amount.max) == (present.min(), present.max())
    assert amount.quantiles[50] == pytest.approx(np.quantile(present, 0.5), rel=1e-12)
    assert result.feature("amount").ks == stats.ks_2samp(amount.sample, present).statistic


def test_profile_holds_the_documented_statistics() -> None:
    df = batch(30_000, seed=2).with_columns(
        pl.when(pl.int_range(pl.len()) < 300).then(None).otherwise(pl.col("amount")).alias("amount")
    )
    profile = build_profile(df, NUMERIC, CATEGORICAL, bins=10, sample_size=5_000, seed=1)
    amount = profile.numeric["amount"]
    values = df["amount"].drop_nulls().to_numpy()

    assert amount.count == values.size
    assert amount.null_rate == pytest.approx(0.01)
    assert amount.mean == pytest.approx(values.mean())
    assert amount.std == pytest.approx(values.std(ddof=1))
    assert (amount.min, amount.max) == (values.min(), values.max())
    assert len(amount.quantiles) == 101
    assert amount.quantiles[0] == amount.min and amount.quantiles[100] == amount.max
    assert amount.quantiles[50] == pytest.approx(np.quantile(values, 0.5))
    assert len(amount.bin_edges) == 9
    assert sum(amount.bin_fractions) == pytest.approx(1.0)
    assert all(f == pytest.approx(0.1, abs=1e-3) for f in amount.bin_fractions)
    assert len(amount.sample) == 5_000
    assert amount.sample == sorted(amount.sample)
    assert set(amount.sample) <= set(values.tolist())
    assert sum(profile.categorical["channel"].frequencies.values()) == pytest.approx(1.0)


def test_profile_sample_is_reproducible_from_its_seed() -> None:
    df = batch(30_000, seed=2)
    first = build_profile(df, ["amount"], [], sample_size=1_000, seed=5)
    again = build_profile(df, ["amount"], [], sample_size=1_000, seed=5)
    other = build_profile(df, ["amount"], [], sample_size=1_000, seed=6)
    assert first == again
    assert first.numeric["amount"].sample != other.numeric["amount"].sample


def test_profile_round_trips_through_json() -> None:
    df = batch(8_000, seed=3)
    profile = build_profile(df, NUMERIC, CATEGORICAL, sample_size=1_000)
    restored = Profile.from_dict(json.loads(json.dumps(profile.to_dict())))

    assert restored == profile
    current = batch(5_000, seed=4, amount_mu=3.8)
    assert compare(restored, current).to_dict() == compare(profile, current).to_dict()
    json.dumps(compare(restored, current).to_dict())


def test_profile_saves_and_loads_from_disk(tmp_path: Path) -> None:
    profile = build_profile(batch(5_000, seed=3), NUMERIC, CATEGORICAL, sample_size=500)
    path = profile.save(tmp_path / "profiles" / "transactions.json")
    assert path.exists()
    assert Profile.load(path) == profile
    assert [p.name for p in path.parent.iterdir()] == ["transactions.json"]


def test_profile_metadata_can_leave_out_the_ks_samples() -> None:
    profile = build_profile(batch(5_000, seed=3), NUMERIC, CATEGORICAL, sample_size=500)
    light = profile.to_dict(include_sample=False)
    assert all("sample" not in p for p in light["numeric"].values())
    assert light["numeric"]["amount"]["quantiles"] == profile.numeric["amount"].quantiles
    assert len(json.dumps(light)) < len(json.dumps(profile.to_dict())) / 3


def test_profile_and_compare_equals_the_two_steps() -> None:
    reference = build_profile(batch(10_000, seed=0), NUMERIC, CATEGORICAL)
    current = batch(10_000, seed=1, amount_mu=3.9)
    profile, drift = profile_and_compare(reference, current)
    assert profile == build_profile(current, NUMERIC, CATEGORICAL)
    assert drift == compare(reference, current)


def test_profiling_a_column_without_values_fails_loudly() -> None:
    df = pl.DataFrame({"x": [None, None]}, schema={"x": pl.Float64})
    with pytest.raises(ValueError, match="no non-null values"):
        build_profile(df, ["x"], [])


def test_drift_frame_derives_hour_of_day_in_utc() -> None:
    start = datetime(2026, 11, 1, 22, 30, tzinfo=UTC)
    times = [start + timedelta(minutes=47 * i) for i in range(40)]
    df = pl.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(40)],
            "amount": [float(i) for i in range(40)],
            "channel": ["pos"] * 40,
            "country": ["US"] * 40,
            "event_timestamp": times,
        }
    )
    frame = drift_frame("transactions", df)

    numeric, categorical = drift_columns("transactions")
    assert frame.columns == [*numeric, *categorical]
    assert frame["hour_of_day"].to_list() == [t.hour for t in times]


def test_drift_frame_rejects_datasets_without_drift_columns() -> None:
    with pytest.raises(ValueError, match="no drift columns"):
        drift_frame("cards", pl.DataFrame({"card_id": ["c1"]}))


def test_a_feature_with_no_value_present_has_no_psi_only_its_missing_rate() -> None:
    profile = build_profile(batch(5_000, seed=0), NUMERIC, CATEGORICAL)
    current = batch(2_000, seed=1).with_columns(
        pl.lit(None, dtype=pl.Float64).alias("amount"),
        pl.lit(None, dtype=pl.String).alias("country"),
    )
    result = compare(profile, current)
    for name in ("amount", "country"):
        missing = result.feature(name)
        # Clipped empty bins made this PSI 5-9, read as severe drift of a feature that was
        # simply not there.
        assert math.isnan(missing.psi)
        assert missing.null_rate_current == 1.0 and missing.count == 0
    assert set(result.drifted(0.2)) <= {"hour_of_day", "channel"}
    assert "amount" not in result.drifted(0.0) and math.isfinite(result.max_psi)
    assert result.to_dict()["features"][0]["psi"] is None  # JSON-safe
