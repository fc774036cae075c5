"""Feature functions on hand-built examples, leakage, and incremental == full recomputation."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from core.storage import write_parquet_atomic
from features.views import read_validated, training_entities, write_feature_file
from usecases.fraud.features import (
    CARD_FEATURE_SCHEMA,
    CARD_VIEW,
    MERCHANT_FEATURE_SCHEMA,
    MERCHANT_VIEW,
    card_features,
    compute_card_features,
    compute_merchant_features,
    history_start,
    merchant_features,
)
from usecases.fraud.simulator import SCHEMAS

T0 = datetime(2024, 3, 1, 12, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
CREATED = datetime(2024, 6, 1, tzinfo=UTC)


def _tx(rows: list[tuple]) -> pl.DataFrame:
    """(transaction_id, card_id, merchant_id, amount, country, event_timestamp) tuples."""
    frame = pl.DataFrame(
        rows,
        schema=["transaction_id", "card_id", "merchant_id", "amount", "country", "event_timestamp"],
        orient="row",
    )
    return frame.with_columns(channel=pl.lit("pos")).select(
        [pl.col(c).cast(t) for c, t in SCHEMAS["transactions"].items()]
    )


def _labels(rows: list[tuple]) -> pl.DataFrame:
    frame = pl.DataFrame(
        rows, schema=["transaction_id", "is_fraud", "label_timestamp"], orient="row"
    )
    return frame.select([pl.col(c).cast(t) for c, t in SCHEMAS["labels"].items()])


CARDS = pl.DataFrame(
    {"card_id": ["c", "z"], "home_country": ["US", "GB"], "spending_profile": ["low", "high"]}
)
MERCHANTS = pl.DataFrame(
    {"merchant_id": ["m", "n"], "category": ["fuel", "travel"], "country": ["FR", "US"]}
)


def _row(frame: pl.DataFrame, key: str, entity: str, at: datetime) -> dict:
    rows = frame.filter((pl.col(key) == entity) & (pl.col("event_timestamp") == at)).to_dicts()
    assert len(rows) == 1, rows
    return rows[0]


def test_card_windows_counts_moments_and_distincts() -> None:
    tx = _tx(
        [
            ("a", "c", "m9", 100.0, "DE", T0 - 8 * D),
            ("b", "c", "m1", 10.0, "US", T0 - 2 * D),
            ("c", "c", "m2", 20.0, "FR", T0 - H),
            ("d", "c", "m2", 30.0, "US", T0 - H / 2),
            ("e", "c", "m3", 40.0, "US", T0),
            ("f", "c", "m1", 50.0, "GB", T0),
        ]
    )
    out = card_features(tx, CARDS, created_at=CREATED)

    assert out.schema == pl.Schema(CARD_FEATURE_SCHEMA)
    assert out.height == 5  # the two transactions at T0 share one row
    now = _row(out, "card_id", "c", T0)
    assert now["card_tx_count_1h"] == 3  # the one exactly 1h before is outside (t-1h, t]
    assert now["card_tx_count_24h"] == 4
    assert now["card_tx_count_7d"] == 5  # the one 8 days before is outside
    assert now["card_amount_mean_7d"] == pytest.approx(30.0, abs=1e-12)
    assert now["card_amount_std_7d"] == pytest.approx(math.sqrt(250.0), abs=1e-12)
    assert now["card_amount_max_7d"] == 50.0
    assert now["card_amount_mean_30d"] == pytest.approx(250.0 / 6, abs=1e-12)
    assert now["card_amount_std_30d"] == pytest.approx(
        statistics.stdev([100.0, 10.0, 20.0, 30.0, 40.0, 50.0]), abs=1e-12
    )
    assert now["card_amount_max_30d"] == 100.0
    assert now["card_distinct_merchants_24h"] == 3  # m2, m3, m1
    assert now["card_distinct_countries_7d"] == 3  # US, FR, GB
    assert now["card_seconds_since_prev_tx"] == 0.0  # two transactions at the same instant
    assert now["card_home_country"] == "US"
    assert now["card_spending_profile"] == "low"
    assert now["created_timestamp"] == CREATED

    half_hour_before = _row(out, "card_id", "c", T0 - H / 2)
    assert half_hour_before["card_tx_count_1h"] == 2
    assert half_hour_before["card_seconds_since_prev_tx"] == 1800.0
    two_days_before = _row(out, "card_id", "c", T0 - 2 * D)
    assert two_days_before["card_seconds_since_prev_tx"] == 6 * 86400.0
    assert two_days_before["card_tx_count_7d"] == 2  # 8 days back is 6 days before it
    first = _row(out, "card_id", "c", T0 - 8 * D)
    assert first["card_seconds_since_prev_tx"] is None
    assert first["card_amount_std_7d"] is None  # one transaction has no sample deviation


def test_seconds_since_previous_looks_back_30_days_only() -> None:
    tx = _tx(
        [
            ("1", "z", "m", 1.0, "GB", T0),
            ("2", "z", "m", 1.0, "GB", T0 + 29 * D),
            ("3", "z", "m", 1.0, "GB", T0 + 59 * D),
            ("4", "y", "m", 1.0, "GB", T0),
        ]
    )
    out = card_features(tx, CARDS, created_at=CREATED)
    assert _row(out, "card_id", "z", T0 + 29 * D)["card_seconds_since_prev_tx"] == 29 * 86400.0
    assert _row(out, "card_id", "z", T0 + 59 * D)["card_seconds_since_prev_tx"] is None
    unknown_card = _row(out, "card_id", "y", T0)
    assert unknown_card["card_home_country"] is None
    assert unknown_card["card_tx_count_1h"] == 1


def _merchant_case() -> tuple[pl.DataFrame, pl.DataFrame]:
    tx = _tx(
        [
            ("x1", "c", "m", 5.0, "US", T0 - 40 * D),
            ("x2", "c", "m", 10.0, "US", T0 - 10 * D),
            ("x6", "c", "m", 1.0, "US", T0 - 5 * D),
            ("x3", "c", "m", 20.0, "US", T0 - 2 * D),
            ("x4", "c", "m", 30.0, "US", T0 - 12 * H),
            ("x5", "c", "m", 40.0, "US", T0),
        ]
    )
    labels = _labels(
        [
            ("x1", True, T0 - 39 * D),
            ("x2", False, T0 - 9 * D),
            ("x2", True, T0 - 3 * D),  # corrected: fraud from then on
            ("x3", False, T0 - 6 * H),
            ("x4", True, T0 + H),  # known only after T0
        ]
    )
    return tx, labels


def test_merchant_volume_and_chargeback_rate_from_labels_known_at_t() -> None:
    tx, labels = _merchant_case()
    out = merchant_features(tx, labels, MERCHANTS, created_at=CREATED)

    assert out.schema == pl.Schema(MERCHANT_FEATURE_SCHEMA)
    now = _row(out, "merchant_id", "m", T0)
    assert (now["merchant_tx_count_24h"], now["merchant_amount_sum_24h"]) == (2, 70.0)
    assert (now["merchant_tx_count_7d"], now["merchant_amount_sum_7d"]) == (4, 91.0)
    # x1 is older than 30 days, x4's label arrives after T0: x2 (fraud) and x3 (not) count.
    assert (now["merchant_labelled_count_30d"], now["merchant_fraud_count_30d"]) == (2, 1)
    assert now["merchant_chargeback_rate_30d"] == 0.5
    assert (now["merchant_category"], now["merchant_country"]) == ("fuel", "FR")

    rates = {
        T0 - 40 * D: None,  # its own label comes a day later
        T0 - 10 * D: None,  # x1 sits exactly 30 days back: outside (t - 30d, t]
        T0 - 5 * D: 0.0,  # x2 known as not fraud
        T0 - 2 * D: 1.0,  # x2 corrected to fraud at T0 - 3d
        T0 - 12 * H: 1.0,  # x3's label is 6 hours away
    }
    for at, rate in rates.items():
        assert _row(out, "merchant_id", "m", at)["merchant_chargeback_rate_30d"] == rate, at


def test_no_leakage_events_and_labels_after_t_never_change_rows_at_t() -> None:
    tx, labels = _random_data(seed=3, n=800, days=40)
    full_cards = card_features(tx, CARDS, created_at=CREATED)
    full_merchants = merchant_features(tx, labels, MERCHANTS, created_at=CREATED)
    for cutoff in (T0 + 5 * D, T0 + 17 * D + 3 * H, T0 + 33 * D):
        past_tx = tx.filter(pl.col("event_timestamp") <= cutoff)
        past_labels = labels.filter(pl.col("label_timestamp") <= cutoff)
        seen = pl.col("event_timestamp") <= cutoff
        cards_then = card_features(past_tx, CARDS, created_at=CREATED)
        merchants_then = merchant_features(past_tx, past_labels, MERCHANTS, created_at=CREATED)
        assert cards_then.height > 0 and merchants_then.height > 0
        assert _sorted(full_cards.filter(seen), "card_id").equals(_sorted(cards_then, "card_id"))
        assert _sorted(full_merchants.filter(seen), "merchant_id").equals(
            _sorted(merchants_then, "merchant_id")
        )


def _sorted(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return frame.sort(key, "event_timestamp")


def _random_data(seed: int, n: int, days: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    minutes = rng.integers(0, days * 24 * 60, n)
    tx = pl.DataFrame(
        {
            "transaction_id": [f"t{i:05d}" for i in range(n)],
            "card_id": rng.choice(["c", "z", "y", "w"], n),
            "merchant_id": rng.choice(["m", "n"], n),
            "amount": rng.gamma(2.0, 30.0, n).round(2),
            "channel": "pos",
            "country": rng.choice(["US", "GB", "FR"], n),
            "event_timestamp": [T0 + timedelta(minutes=int(m)) for m in minutes],
        }
    ).select([pl.col(c).cast(t) for c, t in SCHEMAS["transactions"].items()])
    delays = [timedelta(hours=int(h)) for h in rng.integers(1, 24 * 20, n)]
    labels = tx.select(
        "transaction_id",
        pl.Series("is_fraud", rng.random(n) < 0.2),
        (pl.col("event_timestamp") + pl.Series(delays)).alias("label_timestamp"),
    ).filter(pl.Series(rng.random(n) < 0.8))
    return tx, labels


def _latest(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return (
        frame.sort("created_timestamp")
        .unique([key, "event_timestamp"], keep="last")
        .drop("created_timestamp")
        .sort(key, "event_timestamp")
    )


def test_incremental_batches_equal_full_recomputation(tmp_path: Path) -> None:
    """Batches in order, a batch of late events and late label batches, each reading only its
    history from validated files, end in the same rows as one recomputation over everything."""
    tx, labels = _random_data(seed=11, n=1200, days=70)  # ends > 30 days after the late ones
    ts = pl.col("event_timestamp")
    tx_batches = [
        ("tx1", tx.filter(ts < T0 + 15 * D)),
        ("tx2", tx.filter((ts >= T0 + 15 * D) & (ts < T0 + 30 * D))),
        ("tx3", tx.filter(ts >= T0 + 30 * D)),
    ]
    late = tx_batches[1][1].sample(fraction=0.2, seed=1)
    tx_batches[1] = ("tx2", tx_batches[1][1].join(late, on="transaction_id", how="anti"))
    label_ts = pl.col("label_timestamp")
    steps = [
        ("transactions", *tx_batches[0]),
        ("labels", "l1", labels.filter(label_ts < T0 + 20 * D)),
        ("transactions", *tx_batches[1]),
        ("transactions", *tx_batches[2]),
        ("transactions", "late", late),
        ("labels", "l2", labels.filter(label_ts >= T0 + 20 * D)),
    ]
    home = tmp_path / "home"
    for i, (dataset, batch_id, batch) in enumerate(steps):
        write_parquet_atomic(batch, home / "validated" / dataset / f"{batch_id}.parquet")
        created = CREATED + timedelta(seconds=i)
        new_tx = batch if dataset == "transactions" else tx.clear()
        new_labels = batch if dataset == "labels" else None
        since = history_start(new_tx, new_labels)
        history = read_validated(home, "transactions", since=since, exclude_batches=[batch_id])
        known_labels = read_validated(home, "labels", since=since)
        merchant_rows = compute_merchant_features(
            new_tx, history, known_labels, MERCHANTS, created, new_labels=new_labels
        )
        write_feature_file(home, MERCHANT_VIEW, batch_id, merchant_rows)
        if dataset == "transactions":
            card_rows = compute_card_features(new_tx, history, CARDS, created)
            write_feature_file(home, CARD_VIEW, batch_id, card_rows)
            if batch_id in ("tx2", "tx3"):
                # In order: only the batch's own (card, time) rows, not its history's.
                assert card_rows.height == new_tx.select("card_id", "event_timestamp").n_unique()
            if batch_id == "late":
                assert card_rows.height > late.select("card_id", "event_timestamp").n_unique()

    stored_cards = pl.read_parquet(home / "features" / CARD_VIEW / "*.parquet")
    stored_merchants = pl.read_parquet(home / "features" / MERCHANT_VIEW / "*.parquet")
    full_cards = card_features(tx, CARDS, created_at=CREATED)
    full_merchants = merchant_features(tx, labels, MERCHANTS, created_at=CREATED)

    _assert_same_rows(_latest(stored_cards, "card_id"), _latest(full_cards, "card_id"))
    want = _latest(full_merchants, "merchant_id")
    _assert_same_rows(_latest(stored_merchants, "merchant_id"), want)
    assert want["merchant_chargeback_rate_30d"].drop_nulls().n_unique() > 3


def _assert_same_rows(got: pl.DataFrame, want: pl.DataFrame) -> None:
    """Equal keys, counts, strings and nulls; floats to 1e-12 (sliding-window sums depend, in
    the last bits, on where the history they slide over starts)."""
    assert got.select(pl.exclude(pl.Float64)).equals(want.select(pl.exclude(pl.Float64)))
    for column in got.select(pl.col(pl.Float64)).columns:
        assert got[column].is_null().equals(want[column].is_null()), column
        np.testing.assert_allclose(
            got[column].drop_nulls().to_numpy(), want[column].drop_nulls().to_numpy(), rtol=1e-12
        )


def test_read_validated_skips_older_rows_and_excluded_batches(tmp_path: Path) -> None:
    tx = _tx([("1", "c", "m", 1.0, "US", T0), ("2", "c", "m", 2.0, "US", T0 + 40 * D)])
    write_parquet_atomic(tx.head(1), tmp_path / "validated" / "transactions" / "a.parquet")
    write_parquet_atomic(tx.tail(1), tmp_path / "validated" / "transactions" / "b.parquet")
    assert read_validated(tmp_path, "transactions")["transaction_id"].sort().to_list() == ["1", "2"]
    recent = read_validated(tmp_path, "transactions", since=T0 + D)
    assert recent["transaction_id"].to_list() == ["2"]
    assert read_validated(tmp_path, "transactions", exclude_batches=["b"]).height == 1
    assert read_validated(tmp_path, "labels").schema == pl.Schema(SCHEMAS["labels"])


def test_write_feature_file_rejects_rows_off_the_declared_schema(tmp_path: Path) -> None:
    rows = card_features(_tx([("1", "c", "m", 1.0, "US", T0)]), CARDS, created_at=CREATED)
    path = write_feature_file(tmp_path, CARD_VIEW, "b1", rows)
    assert path == tmp_path / "features" / CARD_VIEW / "b1.parquet"
    assert pl.read_parquet(path).equals(rows)
    with pytest.raises(ValueError, match="schema"):
        write_feature_file(tmp_path, CARD_VIEW, "b2", rows.drop("card_tx_count_1h"))


def test_training_entities_join_just_before_the_transaction() -> None:
    tx = _tx([("1", "c", "m", 12.5, "FR", T0)])
    entities = training_entities(tx).to_dicts()[0]
    assert entities["event_timestamp"] == T0 - timedelta(microseconds=1)
    assert entities["transaction_timestamp"] == T0
    assert (entities["card_id"], entities["merchant_id"], entities["amount"]) == ("c", "m", 12.5)
    assert (entities["country"], entities["channel"]) == ("FR", "pos")
