"""Feature assets over two simulated batches: ingest, features, online store, training set."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from core import simulation
from features.store import feature_store, online_features
from features.training_set import TrainingSetRef
from orchestration import feature_assets
from orchestration.resources import LooplineStorage
from tests.orchestration.conftest import Platform
from usecases.fraud import simulator
from usecases.fraud.features import CARD_VIEW, MERCHANT_VIEW

SPAN = timedelta(days=4)
FEATURES = [
    *feature_assets.VIEW_ASSETS,
    feature_assets.feature_registry,
    feature_assets.online_features,
]


def _ingest(platform: Platform) -> list[str]:
    """What the landing sensor and the ingest runs it asks for do; the new batch ids."""
    result = platform.tick()
    assert all(outcome.success for outcome in platform.run_requests(result))
    return platform.batch_ids(result)


def _features(instance: dg.DagsterInstance, storage: LooplineStorage) -> dg.ExecuteInProcessResult:
    out = dg.materialize(FEATURES, instance=instance, resources={"storage": storage})
    assert out.success
    return out


def _sensor(instance: dg.DagsterInstance, storage: LooplineStorage):
    context = dg.build_sensor_context(instance=instance, resources={"storage": storage})
    return feature_assets.features_sensor(context)


def _files(home: Path, view: str) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in (home / "features" / view).glob("*.parquet")}


def _latest(home: Path, view: str, key: str) -> pl.DataFrame:
    rows = pl.read_parquet(home / "features" / view / "*.parquet")
    return rows.sort(key, "event_timestamp", "created_timestamp").unique(key, keep="last")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """Reference data, then two steps of a transactions and a labels batch, each followed by
    the feature job; snapshots in between for the tests below."""
    home = tmp_path_factory.mktemp("features") / "home"
    platform = Platform(home)
    storage, instance = platform.storage, platform.instance
    # A Monday at midnight 5-6 weeks ago: the data is recent enough for the contracts, and the
    # simulator's weekly seasonality, hence every row, is the same whenever the test runs.
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=35)
    start = day - timedelta(days=day.weekday())
    sim = simulator.Simulator(
        simulator.ScenarioConfig(
            seed=11,
            n_cards=80,
            n_merchants=25,
            start=start,
            batch_span=SPAN,
            rows_per_batch=400,
            fraud_rate=0.05,
        )
    )
    landing = storage.settings.landing
    simulation.land(sim.cards(), landing, "cards", "ref")
    simulation.land(sim.merchants(), landing, "merchants", "ref")
    _ingest(platform)
    steps = []
    for k in (0, 1):
        simulation.land(sim.transactions(k), landing, "transactions", f"b{k}")
        simulation.land(sim.labels(k), landing, "labels", f"b{k}")
        batches = _ingest(platform)
        before = _sensor(instance, storage)
        features = _features(instance, storage)
        after = _sensor(instance, storage)
        steps.append(
            {
                "batches": batches,
                "sensor_before": before,
                "sensor_after": after,
                "cards": _files(home, CARD_VIEW),
                "merchants": _files(home, MERCHANT_VIEW),
                "result": features,
                "transactions": sim.transactions(k),
                "labels": sim.labels(k),
            }
        )
    return home, storage, instance, steps


def test_each_batch_gets_its_own_feature_files_and_the_sensor_asks_for_them(run) -> None:
    _, _, _, steps = run
    for step in steps:
        tx_batch, label_batch = step["batches"]
        assert isinstance(step["sensor_before"], dg.RunRequest)
        assert isinstance(step["sensor_after"], dg.SkipReason)
        assert tx_batch in step["cards"] and label_batch not in step["cards"]
        assert {tx_batch, label_batch} <= set(step["merchants"])
    first, second = steps
    assert len(second["cards"]) == 2 and len(second["merchants"]) == 4


def test_the_second_step_writes_only_what_its_batches_touch(run) -> None:
    home, _, _, (first, second) = run
    # Files of the first step are left as they were.
    for stem, data in first["cards"].items():
        assert second["cards"][stem] == data
    for stem, data in first["merchants"].items():
        assert second["merchants"][stem] == data
    tx_batch, label_batch = second["batches"]
    card_rows = pl.read_parquet(home / "features" / CARD_VIEW / f"{tx_batch}.parquet")
    own = second["transactions"].select("card_id", "event_timestamp").unique()
    assert card_rows.select("card_id", "event_timestamp").sort(pl.all()).equals(own.sort(pl.all()))

    # The labels batch redoes merchant rows whose chargeback rate its labels change, only those.
    label_rows = pl.read_parquet(home / "features" / MERCHANT_VIEW / f"{label_batch}.parquet")
    all_tx = pl.concat([first["transactions"], second["transactions"]])
    labelled = second["labels"].join(all_tx, on="transaction_id")
    assert 0 < label_rows.height < pl.read_parquet(home / "features" / MERCHANT_VIEW).height
    assert set(label_rows["merchant_id"]) <= set(labelled["merchant_id"])
    assert label_rows["event_timestamp"].min() >= labelled["event_timestamp"].min()

    metadata = second["result"].asset_materializations_for_node("card_stats_fv")[0].metadata
    assert metadata["batches_processed"].value == 1
    assert metadata["rows_written"].value == card_rows.height


def test_online_store_serves_the_latest_rows_including_new_chargeback_rates(run) -> None:
    home, _, _, (_, second) = run
    store = feature_store(home)
    cards = _latest(home, CARD_VIEW, "card_id")
    merchants = _latest(home, MERCHANT_VIEW, "merchant_id")
    at = max(cards["event_timestamp"].max(), merchants["event_timestamp"].max())
    requests = (
        second["transactions"]
        .unique(["card_id", "merchant_id"])
        .select("card_id", "merchant_id", "amount", "country")
        .with_columns(pl.lit(at).alias("transaction_timestamp"))
    )
    served = online_features(store, requests, at=at)
    want = requests.join(cards, on="card_id").join(merchants, on="merchant_id")
    got = served.join(want.select("card_id", "merchant_id"), on=["card_id", "merchant_id"])
    got, want = got.sort("card_id", "merchant_id"), want.sort("card_id", "merchant_id")
    assert got.height == requests.height
    for column in ("card_tx_count_7d", "card_amount_mean_30d", "merchant_tx_count_7d"):
        assert got[column].to_list() == want[column].to_list(), column

    # Merchants whose newest row came from the latest labels batch serve that row's rate.
    label_batch = second["batches"][1]
    relabelled = pl.read_parquet(home / "features" / MERCHANT_VIEW / f"{label_batch}.parquet")
    newest = merchants.join(
        relabelled, on=["merchant_id", "event_timestamp", "created_timestamp"], how="semi"
    )
    assert newest.height > 0
    raw = store.get_online_features(
        features=["merchant_stats_fv:merchant_chargeback_rate_30d"],
        entity_rows=[{"merchant_id": m} for m in newest["merchant_id"]],
    ).to_dict()["merchant_chargeback_rate_30d"]
    assert raw == newest["merchant_chargeback_rate_30d"].to_list()


def test_training_set_is_split_in_time_without_leakage(run) -> None:
    home, storage, instance, (first, second) = run
    out = dg.materialize(
        [feature_assets.training_set],
        instance=instance,
        resources={"storage": storage},
        run_config=dg.RunConfig(
            {"training_set": feature_assets.TrainingSetConfig(label_maturity_days=7.0)}
        ),
    )
    assert out.success
    ref = out.output_for_node("training_set")
    assert isinstance(ref, TrainingSetRef)
    assert set(ref.batches) == set(first["batches"] + second["batches"])
    rows = pl.read_parquet(ref.path)
    assert rows.height == ref.rows > 40
    assert Path(ref.path) == home / "training_sets" / f"{ref.version}.parquet"

    windows = {
        s: rows.filter(pl.col("split") == s)["event_timestamp"]
        for s in ("train", "validation", "test")
    }
    assert all(w.len() > 0 for w in windows.values())
    assert windows["train"].max() < windows["validation"].min()
    assert windows["validation"].max() < windows["test"].min()
    labels = pl.concat([first["labels"], second["labels"]])
    assert rows["event_timestamp"].max() <= labels["label_timestamp"].max() - timedelta(days=7)
    assert rows["label"].sum() > 0

    # Each row's card features are those after the card's previous transaction, never its own.
    tx = pl.concat([first["transactions"], second["transactions"]]).sort("event_timestamp")
    previous = (
        rows.select("transaction_id", "card_id", "event_timestamp", "card_tx_count_7d")
        .sort("event_timestamp")
        .join_asof(
            tx.select("card_id", pl.col("event_timestamp").alias("prev")),
            left_on="event_timestamp",
            right_on="prev",
            by="card_id",
            allow_exact_matches=False,
            check_sortedness=False,
        )
    )
    counts = previous.join(tx.select("card_id", pl.col("event_timestamp").alias("t")), on="card_id")
    expected = (
        counts.filter(
            (pl.col("t") <= pl.col("prev")) & (pl.col("t") > pl.col("prev") - timedelta(days=7))
        )
        .group_by("transaction_id")
        .len()
    )
    check = previous.join(expected, on="transaction_id", how="left")
    assert check["card_tx_count_7d"].fill_null(0).to_list() == check["len"].fill_null(0).to_list()
    assert check["prev"].null_count() == check["card_tx_count_7d"].null_count()

    metadata = out.asset_materializations_for_node("training_set")[0].metadata
    assert metadata["version"].value == ref.version
    assert metadata["train_rows"].value == windows["train"].len()
    assert metadata["test_positive_rate"].value == pytest.approx(
        rows.filter(pl.col("split") == "test")["label"].mean()
    )


def test_an_online_store_that_lost_its_rows_is_found_and_reloaded(run) -> None:
    """Redis restarted without persistence (here: the SQLite online tables emptied) while the
    manifest says every file is loaded: the sensor's probe notices, and the run reloads all."""
    import sqlite3

    home, storage, instance, _ = run
    store = feature_store(home)
    cards = _latest(home, CARD_VIEW, "card_id")
    at = cards["event_timestamp"].max()
    requests = cards.select("card_id").with_columns(
        pl.lit("m-0").alias("merchant_id"),
        pl.lit(10.0).alias("amount"),
        pl.lit("US").alias("country"),
        pl.lit(at).alias("transaction_timestamp"),
    )
    before = online_features(store, requests, at=at)["card_tx_count_7d"].to_list()
    assert isinstance(_sensor(instance, storage), dg.SkipReason)  # healthy: nothing to do

    with sqlite3.connect(home / "feast" / "online.db") as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            con.execute(f'DELETE FROM "{table}"')
    assert (
        online_features(feature_store(home), requests, at=at)["card_tx_count_7d"].to_list()
        != before
    )

    request = _sensor(instance, storage)
    assert isinstance(request, dg.RunRequest)
    out = _features(instance, storage)
    metadata = out.asset_materializations_for_node("online_features")[0].metadata
    assert metadata["reloaded"].value is True
    assert (
        online_features(feature_store(home), requests, at=at)["card_tx_count_7d"].to_list()
        == before
    )
    context = dg.build_sensor_context(instance=instance, resources={"storage": storage})
    assert isinstance(feature_assets.features_sensor(context), dg.SkipReason)
