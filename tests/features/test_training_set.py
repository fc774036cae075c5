"""Training sets: labelled entity rows, point-in-time features, time splits, content version."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from core.usecase import load
from features.store import apply_definitions, feature_store
from features.training_set import (
    LABEL,
    SplitFractions,
    SplitPolicy,
    apply_warm_up,
    assign_splits,
    build_training_set,
    drift_reference,
    labelled_requests,
    split_cuts,
    split_summary,
    write_training_set,
)
from features.views import TS, write_feature_file
from quality.schema import UTC_TS
from usecases.fraud.features import CARD_VIEW, MERCHANT_VIEW, card_features, merchant_features
from usecases.fraud.simulator import SCHEMAS

T0 = datetime(2024, 3, 1, tzinfo=UTC)
CREATED = datetime(2024, 6, 1, tzinfo=UTC)
D = timedelta(days=1)


def _tx(n: int, seed: int = 3) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    minutes = np.sort(rng.integers(0, 30 * 24 * 60, n))
    return pl.DataFrame(
        {
            "transaction_id": [f"t{i:04d}" for i in range(n)],
            "card_id": rng.choice(["c1", "c2", "c3", "c4"], n),
            "merchant_id": rng.choice(["m1", "m2", "m3"], n),
            "amount": rng.gamma(2.0, 30.0, n).round(2),
            "channel": rng.choice(["pos", "online"], n),
            "country": rng.choice(["US", "GB"], n),
            "event_timestamp": [T0 + timedelta(minutes=int(m)) for m in minutes],
        }
    ).select([pl.col(c).cast(t) for c, t in SCHEMAS["transactions"].items()])


def _labels(tx: pl.DataFrame, seed: int = 4) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return tx.select(
        "transaction_id",
        pl.Series("is_fraud", rng.random(tx.height) < 0.2),
        (pl.col("event_timestamp") + 2 * D).alias("label_timestamp"),
    )


CARDS = pl.DataFrame(
    {"card_id": ["c1", "c2", "c3", "c4"], "home_country": "US", "spending_profile": "low"}
)
MERCHANTS = pl.DataFrame(
    {"merchant_id": ["m1", "m2", "m3"], "category": ["fuel", "travel", "grocery"], "country": "US"}
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tx = _tx(400)
    labels = _labels(tx)
    home = tmp_path_factory.mktemp("ts") / "home"
    write_feature_file(home, CARD_VIEW, "b1", card_features(tx, CARDS, created_at=CREATED))
    write_feature_file(
        home,
        MERCHANT_VIEW,
        "b1",
        merchant_features(tx, labels, MERCHANTS, created_at=CREATED),
    )
    store = feature_store(home)
    apply_definitions(store)
    return home, store, tx, labels


def test_labelled_requests_keep_the_latest_label_and_only_mature_rows() -> None:
    tx = _tx(6).with_columns(
        pl.Series("event_timestamp", [T0 + i * D for i in range(6)], dtype=UTC_TS)
    )
    newest = T0 + 8 * D
    labels = pl.DataFrame(
        {
            "transaction_id": ["t0000", "t0000", "t0001", "t0005", "t0003"],
            "is_fraud": [False, True, False, True, True],  # t0000 corrected to fraud
            "label_timestamp": [T0 + D, T0 + 3 * D, T0 + 2 * D, newest, newest],
        },
        schema=SCHEMAS["labels"],
    )
    rows = labelled_requests(tx, labels, label_maturity=timedelta(days=5))
    # t0002 and t0004 have no label; t0005 (day 5) is younger than newest label - 5 days.
    assert dict(zip(rows["transaction_id"], rows["label"], strict=True)) == {
        "t0000": 1,
        "t0001": 0,
        "t0003": 1,
    }
    assert rows["label"].dtype == pl.Int8
    everything = labelled_requests(tx, labels, label_maturity=timedelta(0))
    assert set(everything["transaction_id"]) == {"t0000", "t0001", "t0003", "t0005"}


def test_a_regressors_labels_keep_their_values() -> None:
    # Delivery minutes are the target itself: not 0/1, not cut to whole minutes.
    delivery = load("delivery")
    orders = pl.DataFrame(
        {"order_id": ["o1", "o2"], "event_timestamp": [T0, T0 + D]},
        schema={"order_id": pl.String, "event_timestamp": UTC_TS},
    )
    deliveries = pl.DataFrame(
        {
            "order_id": ["o1", "o2"],
            "delivery_minutes": [31.75, 140.5],
            "delivered_at": [T0 + timedelta(minutes=32), T0 + D + timedelta(minutes=141)],
        },
        schema={"order_id": pl.String, "delivery_minutes": pl.Float64, "delivered_at": UTC_TS},
    )
    rows = labelled_requests(orders, deliveries, label_maturity=timedelta(0), uc=delivery)
    assert rows["label"].dtype == pl.Float64 and rows["label"].to_list() == [31.75, 140.5]


def test_presumed_negatives_bring_young_fraud_labels_with_their_legit_neighbours() -> None:
    # Ten daily transactions, the newest label on day 10. Maturity 5 days keeps days 0-5;
    # presuming negatives after 2 days adds days 6-8: legit until a fraud label arrives.
    tx = _tx(10).with_columns(
        pl.Series("event_timestamp", [T0 + i * D for i in range(10)], dtype=UTC_TS)
    )
    newest = T0 + 10 * D
    labels = pl.DataFrame(
        {
            "transaction_id": ["t0001", "t0002", "t0007", "t0009"],
            "is_fraud": [False, True, True, True],
            "label_timestamp": [T0 + 8 * D, T0 + 4 * D, T0 + 9 * D, newest],
        },
        schema=SCHEMAS["labels"],
    )
    maturity = timedelta(days=5)
    matured = labelled_requests(tx, labels, label_maturity=maturity)
    assert dict(zip(matured["transaction_id"], matured["label"], strict=True)) == {
        "t0001": 0,
        "t0002": 1,
    }
    presumed = labelled_requests(
        tx, labels, label_maturity=maturity, presume_negative_after=timedelta(days=2)
    )
    # Matured rows still need a label (t0000, t0003-t0005 have none); t0009 is too young.
    assert dict(zip(presumed["transaction_id"], presumed["label"], strict=True)) == {
        "t0001": 0,
        "t0002": 1,
        "t0006": 0,
        "t0007": 1,
        "t0008": 0,
    }
    assert presumed["event_timestamp"].is_sorted()
    with pytest.raises(ValueError, match="presume_negative_after"):
        labelled_requests(
            tx, labels, label_maturity=maturity, presume_negative_after=timedelta(days=6)
        )


def test_splits_are_consecutive_time_ranges_with_the_requested_shares() -> None:
    stamps = [T0 + timedelta(hours=h // 2) for h in range(200)]  # every timestamp twice
    frame = pl.DataFrame({"event_timestamp": pl.Series(stamps, dtype=UTC_TS), "label": 0})

    out = assign_splits(frame)
    counts = out.group_by("split").len().sort("split")
    assert dict(counts.iter_rows()) == {"train": 140, "validation": 30, "test": 30}
    windows = out.group_by("split").agg(
        pl.col("event_timestamp").min().alias("lo"), pl.col("event_timestamp").max().alias("hi")
    )
    w = {r["split"]: (r["lo"], r["hi"]) for r in windows.to_dicts()}
    assert w["train"][1] < w["validation"][0] and w["validation"][1] < w["test"][0]

    odd = assign_splits(frame.head(101), SplitFractions(0.8, 0.2, 0.0))
    assert set(odd["split"]) == {"train", "validation"}
    ties = odd.group_by("event_timestamp").agg(pl.col("split").n_unique())
    assert ties["split"].max() == 1  # a timestamp never straddles a cut
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(0.7, 0.2, 0.2)
    with pytest.raises(ValueError):
        SplitFractions(0.0, 0.5, 0.5)


def _daily(days: int, fraud_every: int) -> pl.DataFrame:
    """Ten rows a day for ``days`` days; every ``fraud_every``-th row a positive."""
    n = days * 10
    return pl.DataFrame(
        {
            "event_timestamp": pl.Series(
                [T0 + timedelta(hours=2.4 * i) for i in range(n)], dtype=UTC_TS
            ),
            "label": pl.Series([int(i % fraud_every == 0) for i in range(n)], dtype=pl.Int8),
        }
    )


def _windows(out: pl.DataFrame) -> dict[str, tuple[datetime, datetime]]:
    w = out.group_by("split").agg(
        pl.col("event_timestamp").min().alias("lo"), pl.col("event_timestamp").max().alias("hi")
    )
    return {r["split"]: (r["lo"], r["hi"]) for r in w.to_dicts()}


def test_held_out_positives_put_the_newest_rows_in_train_up_to_a_few_held_out_positives() -> None:
    frame = _daily(80, fraud_every=10)  # 800 rows, 80 positives, one a day
    out = assign_splits(frame, SplitPolicy(held_out_positives=5))

    positives = out.filter(pl.col("label") == 1).group_by("split").len()
    assert dict(positives.iter_rows()) == {"train": 70, "validation": 5, "test": 5}
    w = _windows(out)
    assert w["train"][1] < w["validation"][0] and w["validation"][1] < w["test"][0]
    # 70/15/15 keeps the newest 240 rows (24 days) out of training; this keeps 100 out.
    by_fractions = assign_splits(frame)
    assert (by_fractions["split"] == "train").sum() == 560
    assert (out["split"] == "train").sum() == 700
    assert w["train"][1] == _windows(by_fractions)["train"][1] + timedelta(days=14)


def test_held_out_cuts_fall_on_timestamps_so_tied_rows_share_a_split() -> None:
    stamps = [T0 + timedelta(hours=i // 4) for i in range(400)]  # four rows per timestamp
    frame = pl.DataFrame(
        {
            "event_timestamp": pl.Series(stamps, dtype=UTC_TS),
            "label": pl.Series([int(i % 7 == 0) for i in range(400)], dtype=pl.Int8),
        }
    )
    out = assign_splits(frame, SplitPolicy(held_out_positives=5))
    assert out.group_by("event_timestamp").agg(pl.col("split").n_unique())["split"].max() == 1
    held = out.filter(pl.col("label") == 1).group_by("split").len()
    assert all(n >= 5 for s, n in held.iter_rows() if s != "train")
    w = _windows(out)
    assert w["train"][1] < w["validation"][0] and w["validation"][1] < w["test"][0]


def test_window_keeps_only_the_newest_labelled_rows_before_splitting() -> None:
    frame = _daily(80, fraud_every=10)
    newest = frame["event_timestamp"].max()
    out = assign_splits(frame, SplitPolicy(window=timedelta(days=30)))
    assert out["event_timestamp"].min() >= newest - timedelta(days=30)
    assert out.height == 301  # 30 days of 10 rows, both ends included
    counts = dict(out.group_by("split").len().iter_rows())
    assert counts == {"train": 211, "validation": 45, "test": 45}  # shares of the window


def test_too_few_positives_for_held_out_splits_falls_back_to_fractions_and_says_so(
    world,
) -> None:
    frame = _daily(20, fraud_every=40)  # 5 positives
    policy = SplitPolicy(held_out_positives=3)
    assert assign_splits(frame, policy)["split"].equals(assign_splits(frame)["split"])

    _, store, tx, labels = world
    built = build_training_set(
        store, tx, labels, label_maturity=timedelta(0), split=SplitPolicy(held_out_positives=500)
    )
    assert built.summary["split_method"] == "fractions"
    assert "too few" in built.summary["split_note"]
    assert built.summary["split_policy"]["held_out_positives"] == 500
    assert built.frame["split"].equals(
        build_training_set(store, tx, labels, label_maturity=timedelta(0)).frame["split"]
    )


def test_split_policy_is_validated_recorded_and_changes_the_version(world) -> None:
    with pytest.raises(ValueError, match="held_out_positives"):
        SplitPolicy(held_out_positives=0)
    with pytest.raises(ValueError, match="window"):
        SplitPolicy(window=timedelta(0))
    _, store, tx, labels = world
    with pytest.raises(ValueError, match="not both"):
        build_training_set(
            store,
            tx,
            labels,
            split=SplitPolicy(held_out_positives=5),
            fractions=SplitFractions(0.8, 0.1, 0.1),
        )
    policy = SplitPolicy(held_out_positives=10, window=timedelta(days=20))
    built = build_training_set(store, tx, labels, label_maturity=timedelta(0), split=policy)
    summary = built.summary
    assert summary["split_method"] == "held_out_positives" and summary["split_note"] is None
    assert summary["split_policy"] == {
        "fractions": {"train": 0.7, "validation": 0.15, "test": 0.15},
        "held_out_positives": 10,
        "window_days": 20.0,
        "warm_up_days": None,
    }
    assert summary["splits"]["test"]["positives"] >= 10
    assert summary["splits"]["validation"]["positives"] >= 10
    span = built.frame["event_timestamp"].max() - built.frame["event_timestamp"].min()
    assert span <= timedelta(days=20)
    plain = build_training_set(store, tx, labels, label_maturity=timedelta(0))
    assert built.version != plain.version and built.frame.height < plain.frame.height


def test_training_set_has_labels_point_in_time_features_and_time_splits(world) -> None:
    _, store, tx, labels = world
    built = build_training_set(store, tx, labels, label_maturity=timedelta(0))
    rows = built.frame

    required = ["transaction_id", "card_id", "merchant_id", "event_timestamp", "amount"]
    required += ["country", "channel", "merchant_category", "label", "split"]
    assert set(required) <= set(rows.columns)
    features = built.summary["features"]["numeric"] + built.summary["features"]["categorical"]
    assert "card_tx_count_24h" in features and "tx_amount_to_card_mean_30d" in features
    assert "merchant_category" in built.summary["features"]["categorical"]
    assert rows.height == tx.height and rows["label"].sum() == labels["is_fraud"].sum()
    assert rows["event_timestamp"].to_list() == sorted(tx["event_timestamp"].to_list())

    # Features are as of just before each transaction: never count the transaction itself.
    first = rows.sort("event_timestamp").unique("card_id", keep="first")
    assert first["card_tx_count_24h"].null_count() == first.height
    mine = tx.filter(pl.col("card_id") == "c1").sort("event_timestamp")
    row = rows.filter(pl.col("transaction_id") == mine["transaction_id"][10]).row(0, named=True)
    t = row["event_timestamp"]
    before = mine.filter(pl.col("event_timestamp") < t, pl.col("event_timestamp") > t - 7 * D)
    assert row["card_tx_count_7d"] == before.height
    assert row["card_amount_max_7d"] == before["amount"].max()
    assert row["merchant_category"] in {"fuel", "travel", "grocery"}

    splits = built.summary["splits"]
    assert [splits[s]["rows"] for s in ("train", "validation", "test")] == [280, 60, 60]
    assert splits["train"]["end"] < splits["validation"]["start"]
    assert splits["validation"]["end"] < splits["test"]["start"]
    test_part = rows.filter(pl.col("split") == "test")
    assert splits["test"]["positive_rate"] == pytest.approx(test_part["label"].mean())


def test_version_is_a_content_hash_and_the_file_is_written_once(world) -> None:
    home, store, tx, labels = world
    built = build_training_set(store, tx, labels, label_maturity=timedelta(0))
    shuffled = build_training_set(
        store,
        tx.sample(fraction=1.0, shuffle=True, seed=1),
        labels.reverse(),
        label_maturity=timedelta(0),
    )
    assert shuffled.version == built.version  # input order does not matter
    flipped = labels.with_columns(
        pl.when(pl.col("transaction_id") == "t0100")
        .then(~pl.col("is_fraud"))
        .otherwise(pl.col("is_fraud"))
        .alias("is_fraud")
    )
    assert build_training_set(store, tx, flipped, label_maturity=timedelta(0)).version != (
        built.version
    )
    other_split = build_training_set(
        store, tx, labels, label_maturity=timedelta(0), fractions=SplitFractions(0.8, 0.1, 0.1)
    )
    assert other_split.version != built.version

    ref = write_training_set(home, built, ("b1",))
    path = Path(ref.path)
    assert path == home / "training_sets" / f"{built.version}.parquet"
    assert ref.rows == built.frame.height and ref.feature_service == "fraud_model_v1"
    assert pl.read_parquet(path).equals(built.frame)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["version"] == built.version and meta["splits"]["train"]["rows"] == 280
    mtime = path.stat().st_mtime_ns
    write_training_set(home, shuffled, ("b1",))
    assert path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob(".*.tmp"))


def test_no_labelled_rows_is_an_error_not_an_empty_set(world) -> None:
    _, store, tx, labels = world
    with pytest.raises(ValueError, match="no labelled requests"):
        build_training_set(store, tx, labels, label_maturity=timedelta(days=365))


def test_warm_up_leaves_out_the_history_start_while_rolling_features_fill(world) -> None:
    frame = _daily(80, fraud_every=10)
    start = frame["event_timestamp"].min()
    kept, applied = apply_warm_up(frame, start, timedelta(days=30))
    assert applied == timedelta(days=30)
    assert kept["event_timestamp"].min() >= start + timedelta(days=30)
    assert kept.height == frame.filter(pl.col("event_timestamp") >= start + 30 * D).height
    # A history too short to spare the whole warm-up keeps half its rows, and says how much
    # warm-up it applied.
    short, applied = apply_warm_up(frame, start, timedelta(days=70))
    assert short.height >= frame.height / 2 and short.height < 0.55 * frame.height
    assert timedelta(days=35) <= applied < timedelta(days=41)
    assert apply_warm_up(frame, start, None) == (frame, None)
    with pytest.raises(ValueError, match="warm_up"):
        SplitPolicy(warm_up=timedelta(days=-1))

    # Through the training set: the first days of the history (here 30 days of transactions)
    # are left out and the summary records the warm-up.
    _, store, tx, labels = world
    policy = SplitPolicy(warm_up=timedelta(days=10))
    built = build_training_set(store, tx, labels, label_maturity=timedelta(0), split=policy)
    assert built.frame["event_timestamp"].min() >= tx["event_timestamp"].min() + 10 * D
    assert built.summary["warm_up_days"] == pytest.approx(10.0)
    assert built.summary["split_policy"]["warm_up_days"] == 10.0
    plain = build_training_set(store, tx, labels, label_maturity=timedelta(0))
    assert plain.summary["warm_up_days"] == 0.0 and plain.frame.height > built.frame.height


def test_drift_reference_is_the_train_split_past_its_warm_up() -> None:
    frame = assign_splits(_daily(80, fraud_every=10))
    train = frame.filter(pl.col("split") == "train")
    oldest = train["event_timestamp"].min()
    reference = drift_reference(frame, 10_000, warm_up=timedelta(days=20))
    assert set(reference["split"]) == {"train"}
    assert reference["event_timestamp"].min() >= oldest + timedelta(days=20)
    assert reference.height == train.filter(pl.col("event_timestamp") >= oldest + 20 * D).height
    assert drift_reference(frame, 10_000).height == train.height
    sampled = drift_reference(frame, 100)
    assert sampled.height == 100 and sampled.equals(drift_reference(frame, 100))


def test_a_regressors_held_out_splits_count_rows_and_its_summary_gives_the_mean_label():
    """A regressor has no positives: ``held_out_positives`` holds out that many rows each for
    test and validation, and the split summary reports the mean label instead of positives."""
    start = datetime(2026, 11, 2, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            TS: [start + timedelta(minutes=i) for i in range(400)],
            LABEL: [20.0 + (i % 7) for i in range(400)],
        }
    )
    policy = SplitPolicy(held_out_positives=50)
    cuts = split_cuts(frame, policy)
    assert cuts.method == "held_out_rows" and cuts.note is None
    out = assign_splits(frame, policy)
    counts = dict(out.group_by("split").len().iter_rows())
    assert counts == {"train": 300, "validation": 50, "test": 50}
    assert (
        out.filter(pl.col("split") == "test")[TS].min()
        > out.filter(pl.col("split") == "validation")[TS].max()
    )
    summary = split_summary(out)
    assert summary["test"]["positives"] is None and summary["test"]["positive_rate"] is None
    assert summary["test"]["mean_label"] == pytest.approx(
        out.filter(pl.col("split") == "test")[LABEL].mean()
    )
    too_few = split_cuts(frame.head(120), policy)
    assert too_few.method == "fractions" and "too few to hold out 50 twice" in too_few.note
