"""Behaviour of the demo data simulator: determinism, schemas, labels, drift, faults, landing."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from core.simulation import FAULTS, LandedBatch, apply_fault, encode, land, run
from usecases.fraud.simulator import (
    AMOUNT_MAX,
    AMOUNT_MIN,
    CHANNELS,
    COUNTRIES,
    SCHEMAS,
    ScenarioConfig,
    Simulator,
)

T0 = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday, midnight UTC
SMALL = ScenarioConfig(seed=11, n_cards=400, n_merchants=60, start=T0, rows_per_batch=600)


def _sim(**overrides) -> Simulator:
    base = {"seed": 7, "n_cards": 2000, "n_merchants": 300, "start": T0, "rows_per_batch": 2000}
    return Simulator(ScenarioConfig(**(base | overrides)))


def _joined(sim: Simulator, batches: range) -> pl.DataFrame:
    """Transactions with their (ground-truth) label and the card and merchant attributes."""
    tx = pl.concat([sim.transactions(k) for k in batches])
    truth = pl.concat([sim.ground_truth(k) for k in batches]).select("transaction_id", "is_fraud")
    return (
        tx.join(truth, on="transaction_id")
        .join(sim.cards(), on="card_id")
        .join(sim.merchants().rename({"country": "merchant_country"}), on="merchant_id")
        .with_columns(foreign=pl.col("country") != pl.col("home_country"))
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- determinism and schemas ------------------------------------------------------------------


def test_same_seed_gives_byte_identical_frames_and_another_seed_differs():
    a, b, other = Simulator(SMALL), Simulator(SMALL), Simulator(replace(SMALL, seed=12))
    for k in (0, 3):
        assert encode(a.transactions(k)) == encode(b.transactions(k))
        assert encode(a.labels(k + 28)) == encode(b.labels(k + 28))
        assert not a.transactions(k).equals(other.transactions(k))
    assert encode(a.cards()) == encode(b.cards())
    assert encode(a.merchants()) == encode(b.merchants())
    assert not a.cards().equals(other.cards())


def test_batch_output_does_not_depend_on_what_was_generated_before():
    warm = Simulator(SMALL)
    for k in range(12):
        warm.transactions(k)
    cold = Simulator(SMALL)
    no_cache = Simulator(SMALL, cache_rows=1)
    assert cold.transactions(11).equals(warm.transactions(11))
    assert cold.labels(40).equals(warm.labels(40))
    assert no_cache.labels(40).equals(warm.labels(40))


def test_frames_match_the_canonical_schemas_and_vocabularies():
    sim = Simulator(SMALL)
    frames = {
        "transactions": sim.transactions(2),
        "labels": sim.labels(30),
        "cards": sim.cards(),
        "merchants": sim.merchants(),
    }
    for name, df in frames.items():
        assert list(df.schema.items()) == list(SCHEMAS[name].items()), name
        assert df.height > 0
    tx = frames["transactions"]
    start, end = sim.window(2)
    assert tx["transaction_id"].is_unique().all()
    assert tx["transaction_id"].str.contains(r"^t000002-\d{8}$").all()
    assert tx["card_id"].str.contains(r"^c\d{6}$").all()
    assert tx["merchant_id"].str.contains(r"^m\d{5}$").all()
    assert tx["amount"].min() >= AMOUNT_MIN and tx["amount"].max() <= AMOUNT_MAX
    assert set(tx["channel"]) <= set(CHANNELS) and set(tx["country"]) <= set(COUNTRIES)
    assert tx["event_timestamp"].min() >= start and tx["event_timestamp"].max() < end
    assert tx["event_timestamp"].is_sorted()
    assert set(tx["card_id"]) <= set(sim.cards()["card_id"])
    assert set(tx["merchant_id"]) <= set(sim.merchants()["merchant_id"])
    ids = pl.concat([sim.transactions(k)["transaction_id"] for k in range(6)])
    assert ids.is_unique().all()


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="drift"):
        ScenarioConfig(drift="sideways")
    with pytest.raises(ValueError, match="n_merchants"):
        ScenarioConfig(n_merchants=3)


# -- volume, fraud and labels ----------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_fraud_rate_is_near_the_configured_target(rate):
    sim = Simulator(ScenarioConfig(seed=3, start=T0, rows_per_batch=1500, fraud_rate=rate))
    df = _joined(sim, range(12))
    assert 12_000 < df.height < 24_000
    assert rate * 0.7 < df["is_fraud"].mean() < rate * 1.3


def test_labels_arrive_after_chargeback_or_settlement_delay():
    sim = Simulator(SMALL)
    tx = pl.concat([sim.transactions(k) for k in range(8)])
    labels = pl.concat([sim.labels(k) for k in range(8 + 44)])
    df = tx.join(labels, on="transaction_id", how="left")
    assert df["label_timestamp"].null_count() == 0
    delay = df["label_timestamp"] - df["event_timestamp"]
    fraud, legit = delay.filter(df["is_fraud"]), delay.filter(~df["is_fraud"])
    assert fraud.len() > 0
    assert fraud.min() >= timedelta(days=1) and fraud.max() <= timedelta(days=10)
    assert fraud.max() - fraud.min() > timedelta(days=3)  # random, not a constant delay
    assert (legit == timedelta(days=7)).all()


def test_label_batches_partition_labels_by_label_time():
    sim = Simulator(
        ScenarioConfig(seed=5, n_cards=300, n_merchants=40, start=T0, rows_per_batch=400,
                       batch_span=timedelta(days=1), fraud_rate=0.05)
    )  # fmt: skip
    early = pl.concat([sim.transactions(k) for k in range(3)])["transaction_id"]
    batches = [sim.labels(k) for k in range(14)]
    for k, lab in enumerate(batches):
        start, end = sim.window(k)
        assert lab["label_timestamp"].min() is None or lab["label_timestamp"].min() >= start
        assert lab["label_timestamp"].max() is None or lab["label_timestamp"].max() < end
    every = pl.concat(batches)
    assert every["transaction_id"].is_unique().all()
    assert set(early) <= set(every["transaction_id"])
    assert batches[0].height == 0  # nothing settles on the first day


def test_event_rate_is_lower_at_night_than_during_the_day():
    sim = Simulator(SMALL)
    hours = pl.concat([sim.transactions(k) for k in range(8)])["event_timestamp"].dt.hour()
    counts = np.bincount(hours.to_numpy(), minlength=24)
    assert counts[1:5].mean() < 0.3 * counts[10:20].mean()
    assert sim.expected_rows(0) < sim.expected_rows(2)  # 00-06h vs 12-18h
    saturday_morning = sim.batch_at(T0 + timedelta(days=5, hours=7))
    monday_morning = sim.batch_at(T0 + timedelta(hours=7))
    assert sim.expected_rows(saturday_morning) < sim.expected_rows(monday_morning)


def test_fraud_concentrates_in_the_learnable_patterns():
    sim = _sim()
    df = _joined(sim, range(16)).sort("card_id", "event_timestamp")
    base = df["is_fraud"].mean()
    foreign_high = df.filter(pl.col("foreign") & (pl.col("amount") > 500))["is_fraud"].mean()
    risky = df.filter(pl.col("merchant_id").is_in(sim.risky_merchant_ids()))["is_fraud"].mean()
    burst = df.with_columns(
        quick=(pl.col("event_timestamp").diff().over("card_id") < timedelta(minutes=3))
    ).filter(pl.col("quick") & (pl.col("channel") == "online") & (pl.col("amount") < 5))
    assert foreign_high > 8 * base
    assert risky > 5 * base
    assert burst["is_fraud"].mean() > 20 * base
    assert df["is_fraud"].mean() < 0.02  # legit stays the overwhelming majority


# -- a simple model: learnable before drift, decays after concept drift -----------------------


def _design(df: pl.DataFrame, merchant_rate: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    df = (
        df.sort("card_id", "event_timestamp")
        .with_columns(
            prev=pl.col("event_timestamp").diff().over("card_id").dt.total_seconds(),
            nxt=-pl.col("event_timestamp").diff(-1).over("card_id").dt.total_seconds(),
        )
        .join(merchant_rate, on="merchant_id", how="left")
    )
    log_amount = np.log(df["amount"].to_numpy())
    foreign = df["foreign"].to_numpy().astype(float)
    cols = [
        log_amount,
        foreign,
        foreign * log_amount,
        (df["channel"] == "online").to_numpy().astype(float),
        np.log1p(df["prev"].fill_null(1e6).to_numpy()),
        np.log1p(df["nxt"].fill_null(1e6).to_numpy()),
        np.log(df["rate"].fill_null(0.01).to_numpy()),
    ]
    cols += [(df["category"] == c).to_numpy().astype(float) for c in sorted(set(df["category"]))]
    return np.column_stack(cols), df["is_fraud"].to_numpy()


def _fit_logistic(x: np.ndarray, y: np.ndarray):
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = np.column_stack([np.ones(len(x)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    for _ in range(25):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -30, 30)))
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.eye(len(w))
        w -= np.linalg.solve(hess, z.T @ (p - y) + w)
    return lambda x: np.column_stack([np.ones(len(x)), (x - mu) / sd]) @ w


def _average_precision(y: np.ndarray, score: np.ndarray) -> float:
    hits = y[np.argsort(-score, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def _pre_and_post_drift_ap(drift: str) -> tuple[float, float, float]:
    sim = _sim(drift=drift, drift_start_batch=16)
    train = _joined(sim, range(16))
    rate = train.group_by("merchant_id").agg(
        rate=(pl.col("is_fraud").sum() + 0.1) / (pl.len() + 10)
    )
    x, y = _design(train, rate)
    score = _fit_logistic(x, y)
    xp, yp = _design(_joined(sim, range(16, 28)), rate)
    return float(y.mean()), _average_precision(y, score(x)), _average_precision(yp, score(xp))


def test_a_simple_model_learns_fraud_and_decays_only_under_concept_drift():
    base, train_ap, stable_ap = _pre_and_post_drift_ap("none")
    _, _, drifted_ap = _pre_and_post_drift_ap("concept")
    assert train_ap > 10 * base and train_ap < 0.95
    assert stable_ap > 10 * base and stable_ap < 0.95
    assert drifted_ap < 0.5 * stable_ap


# -- drift -------------------------------------------------------------------------------------


def test_covariate_drift_shifts_inputs_from_its_start_batch():
    none, cov = _sim(), _sim(drift="covariate", drift_start_batch=4)
    for k in range(4):
        assert encode(cov.transactions(k)) == encode(none.transactions(k))
    before, after = _joined(none, range(4, 12)), _joined(cov, range(4, 12))
    assert 1.3 < after["amount"].median() / before["amount"].median() < 2.0
    online = [(d["channel"] == "online").mean() for d in (before, after)]
    assert online[1] > online[0] + 0.1
    assert after["foreign"].mean() > 1.8 * before["foreign"].mean()
    assert 0.5 < after["is_fraud"].mean() / before["is_fraud"].mean() < 1.5


def test_concept_drift_keeps_inputs_and_changes_which_rows_are_fraud():
    none, concept = _sim(), _sim(drift="concept", drift_start_batch=4)
    for k in (0, 5, 11):
        assert encode(concept.transactions(k)) == encode(none.transactions(k))
    assert concept.ground_truth(2).equals(none.ground_truth(2))
    before, after = _joined(none, range(4, 16)), _joined(concept, range(4, 16))
    assert (before["is_fraud"] != after["is_fraud"]).sum() > 50

    def rate(df: pl.DataFrame, predicate: pl.Expr) -> float:
        return df.filter(predicate)["is_fraud"].mean()

    new_segment = (
        (pl.col("category") == "grocery")
        & ~pl.col("foreign")
        & pl.col("amount").is_between(40, 250)
    )
    foreign_high = pl.col("foreign") & (pl.col("amount") > 500)
    assert rate(after, new_segment) > 20 * rate(before, new_segment)
    assert rate(after, foreign_high) < 0.3 * rate(before, foreign_high)
    assert 0.7 < after["is_fraud"].mean() / before["is_fraud"].mean() < 1.3


def test_drift_strength_scales_covariate_drift_and_full_strength_is_the_default():
    none = _joined(_sim(), range(4, 12))
    full = _sim(drift="covariate", drift_start_batch=4)
    explicit = _sim(drift="covariate", drift_start_batch=4, drift_strength=1.0)
    assert encode(explicit.transactions(6)) == encode(full.transactions(6))
    small = _joined(_sim(drift="covariate", drift_start_batch=4, drift_strength=0.25), range(4, 12))
    strong = _joined(full, range(4, 12))
    median = [d["amount"].median() for d in (none, small, strong)]
    assert median[0] < median[1] < median[2]
    assert median[1] / median[0] < 1.2  # 1.6 ** 0.25 = 1.12
    online = [(d["channel"] == "online").mean() for d in (none, small, strong)]
    assert online[1] - online[0] < 0.4 * (online[2] - online[0])
    zero = _sim(drift="covariate", drift_start_batch=0, drift_strength=0.0)
    assert encode(zero.transactions(3)) == encode(_sim().transactions(3))


def test_concept_drift_strength_is_the_share_of_the_mechanism_that_turns():
    def flipped(strength: float) -> int:
        none = _joined(_sim(), range(4, 10))
        drifted = _sim(drift="concept", drift_start_batch=4, drift_strength=strength)
        return int((none["is_fraud"] != _joined(drifted, range(4, 10))["is_fraud"]).sum())

    half, full = flipped(0.5), flipped(1.0)
    assert flipped(0.0) == 0
    assert 0.35 * full < half < 0.65 * full
    with pytest.raises(ValueError, match="drift_strength"):
        ScenarioConfig(drift="concept", drift_strength=1.5)
    with pytest.raises(ValueError, match="drift_strength"):
        ScenarioConfig(drift_strength=-0.1)


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_lands_what_it_claims(tmp_path, fault, fmt):
    sim = Simulator(SMALL)
    clean = sim.transactions(1)
    canonical = list(SCHEMAS["transactions"])
    broken = apply_fault(clean, fault, seed=3, fmt=fmt)
    path = land(broken, tmp_path, "transactions", "b000001", fmt)
    if fault == "corrupt_file":
        assert isinstance(broken, bytes)
        with pytest.raises(pl.exceptions.PolarsError):
            pl.read_parquet(path) if fmt == "parquet" else pl.read_csv(path)
        return
    got = pl.read_parquet(path) if fmt == "parquet" else pl.read_csv(path, try_parse_dates=True)
    if fault == "missing_column":
        missing = set(canonical) - set(got.columns)
        assert len(missing) == 1 and "transaction_id" not in missing
        assert set(got.columns) < set(canonical)
    elif fault == "extra_column":
        assert got.columns[:7] == canonical and len(got.columns) == 8
    elif fault == "renamed_column":
        assert len(set(canonical) - set(got.columns)) == 1
        assert len(set(got.columns) - set(canonical)) == 1 and got.width == 7
    elif fault == "wrong_dtype":
        assert got.schema["amount"] == pl.String
        with pytest.raises(pl.exceptions.InvalidOperationError):
            got["amount"].cast(pl.Float64)
    elif fault == "null_keys":
        assert 0 < got["transaction_id"].null_count() < got.height
        assert got.drop("transaction_id").null_count().sum_horizontal().item() == 0
    elif fault == "out_of_range":
        assert (got["amount"] < 0).any() and (got["amount"] > AMOUNT_MAX).any()
        assert not set(got["channel"]) <= set(CHANNELS)
        assert got.height == clean.height
    elif fault == "empty_file":
        assert got.height == 0 and got.columns == canonical
        if fmt == "parquet":
            assert list(got.schema.items()) == list(SCHEMAS["transactions"].items())
    elif fault == "duplicate":
        assert encode(broken, fmt) == encode(clean, fmt)


def test_faults_are_deterministic_for_a_seed():
    df = Simulator(SMALL).transactions(1)
    assert apply_fault(df, "null_keys", 4).equals(apply_fault(df, "null_keys", 4))
    with pytest.raises(ValueError, match="unknown fault"):
        apply_fault(df, "gremlins", 0)
    with pytest.raises(ValueError, match="at least 3 rows"):
        apply_fault(df.head(2), "out_of_range", 0)


# -- landing ---------------------------------------------------------------------------------


def test_land_is_atomic_and_byte_stable(tmp_path):
    df = Simulator(SMALL).transactions(0)
    first = land(df, tmp_path, "transactions", "b000000")
    again = land(Simulator(SMALL).transactions(0), tmp_path / "other", "transactions", "b000000")
    assert first.name == "transactions-b000000.parquet"
    assert _sha(first) == _sha(again)
    assert pl.read_parquet(first).equals(df)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "transactions-blocked.parquet").mkdir()  # the rename must fail
    with pytest.raises(OSError):
        land(df, tmp_path, "transactions", "blocked")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_csv_round_trip_keeps_values_and_writes_iso_timestamps(tmp_path):
    sim = Simulator(SMALL)
    for name, df in (("transactions", sim.transactions(0)), ("labels", sim.labels(30))):
        path = land(df, tmp_path, name, "b000000", fmt="csv")
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", path.read_text())
        assert pl.read_csv(path, schema=SCHEMAS[name]).equals(df)


# -- driver ----------------------------------------------------------------------------------


def test_run_lands_reference_then_batches_and_never_the_future(tmp_path):
    week = T0 + timedelta(days=7)  # labels of the first day settle from here on
    now = week + timedelta(hours=20)
    seen: list[LandedBatch] = []
    landed = run(
        SMALL, tmp_path, batches=4, start_batch=28, clock=lambda: now, on_batch=seen.append
    )
    assert seen == landed
    names = [b.path.name for b in landed]
    assert names == [
        "cards-seed11.parquet",
        "merchants-seed11.parquet",
        "transactions-b000028.parquet",
        "labels-b000028.parquet",
        "transactions-b000029.parquet",
        "labels-b000029.parquet",
        "transactions-b000030.parquet",
        "labels-b000030.parquet",
        "transactions-b000031-00000-07200.parquet",  # window 31 clipped at "now" (18h + 2h)
        "labels-b000031-00000-07200.parquet",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    sim = Simulator(SMALL)
    for item in landed[2:]:
        df = pl.read_parquet(item.path)
        assert df.height == item.rows > 0 and item.window_end <= now
        col = "event_timestamp" if item.dataset == "transactions" else "label_timestamp"
        assert df[col].max() < now and df[col].min() >= item.window_start
    assert pl.read_parquet(landed[2].path).equals(sim.transactions(28))
    assert pl.read_parquet(landed[3].path).equals(sim.labels(28))

    later = now + timedelta(hours=3)
    resumed = run(SMALL, tmp_path, batches=1, clock=lambda: later, resume_at=landed[-1].window_end)
    assert [b.path.name for b in resumed] == [
        "transactions-b000031-07200-18000.parquet",
        "labels-b000031-07200-18000.parquet",
    ]
    parts = pl.concat([pl.read_parquet(landed[-2].path), pl.read_parquet(resumed[0].path)])
    assert parts.equals(sim.transactions(31, until=later))


def test_run_does_not_land_empty_label_batches(tmp_path):
    landed = run(SMALL, tmp_path, batches=3, clock=lambda: T0 + timedelta(days=2))
    assert [b.dataset for b in landed] == ["cards", "merchants"] + ["transactions"] * 3


def test_run_applies_a_fault_to_one_batch_and_redelivers_duplicates(tmp_path):
    landed = run(SMALL, tmp_path, batches=3, fault="renamed_column", fault_batch=1,
                 clock=lambda: T0 + timedelta(days=2))  # fmt: skip
    faulted = [b for b in landed if b.fault]
    assert [(b.dataset, b.batch_index) for b in faulted] == [("transactions", 1)]
    assert pl.read_parquet(faulted[0].path).width == 7
    assert set(SCHEMAS["transactions"]) - set(pl.read_parquet(faulted[0].path).columns)
    clean = tmp_path / "transactions-b000002.parquet"
    assert pl.read_parquet(clean).columns == list(SCHEMAS["transactions"])

    dup_dir = tmp_path / "dup"
    landed = run(SMALL, dup_dir, batches=2, fault="duplicate", fault_batch=1, fmt="csv",
                 clock=lambda: T0 + timedelta(days=2))  # fmt: skip
    copy = next(b for b in landed if b.fault == "duplicate")
    assert copy.path.name == "transactions-b000001-redelivered.csv"
    assert _sha(copy.path) == _sha(dup_dir / "transactions-b000001.csv")


def test_continuous_run_stops_on_event_and_skips_landed_reference(tmp_path):
    run(SMALL, tmp_path, batches=1, clock=lambda: T0 + timedelta(days=3))
    stop = threading.Event()

    def on_batch(item: LandedBatch) -> None:
        if item.batch_index >= 3:
            stop.set()

    landed = run(SMALL, tmp_path, batches=None, interval_s=0.0, stop=stop, start_batch=1,
                 on_batch=on_batch, clock=lambda: T0 + timedelta(days=3))  # fmt: skip
    assert [(b.dataset, b.batch_index) for b in landed] == [("transactions", k) for k in (1, 2, 3)]


@pytest.mark.real_clock
def test_run_with_the_default_start_emits_nothing_in_the_future(tmp_path):
    config = ScenarioConfig(seed=2, n_cards=200, n_merchants=30, rows_per_batch=200)
    landed = run(config, tmp_path, batches=2)
    assert [b.dataset for b in landed] == ["cards", "merchants", "transactions", "transactions"]
    now = datetime.now(UTC)
    tx = pl.concat([pl.read_parquet(b.path) for b in landed if b.dataset == "transactions"])
    assert tx.height > 0 and tx["event_timestamp"].max() < now
    assert tx["event_timestamp"].min() >= now - timedelta(days=22)
