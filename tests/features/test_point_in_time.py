"""The ASOF training path equals Feast's get_historical_features; online equals offline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from feast import FeatureStore

from features.store import (
    apply_definitions,
    feature_store,
    historical_features,
    materialize,
    online_features,
)
from features.views import training_entities, write_feature_file
from quality.schema import UTC_TS
from usecases.fraud.features import (
    CARD_FEATURE_SCHEMA,
    CARD_VIEW,
    MERCHANT_FEATURE_SCHEMA,
    MERCHANT_VIEW,
    card_features,
    merchant_features,
)
from usecases.fraud.simulator import SCHEMAS

T0 = datetime(2024, 1, 1, tzinfo=UTC)
C1 = datetime(2024, 6, 1, tzinfo=UTC)
C2 = C1 + timedelta(hours=1)
EDGE = T0 + timedelta(days=20)
US = timedelta(microseconds=1)
CARD_TTL, MERCHANT_TTL = timedelta(days=30), timedelta(days=7)


def _random_rows(
    rng: np.random.Generator, schema: dict, key: str, keys: list[str], n: int, created: datetime
) -> pl.DataFrame:
    """Rows on an hourly grid over 60 days, so feature and entity timestamps tie often."""
    columns: dict[str, pl.Series] = {}
    for name, dtype in schema.items():
        if name == key:
            values = list(rng.choice(keys, n))
        elif name == "event_timestamp":
            values = [T0 + timedelta(hours=int(h)) for h in rng.integers(0, 60 * 24, n)]
        elif name == "created_timestamp":
            values = [created] * n
        elif dtype == pl.Int64():
            values = [int(v) for v in rng.integers(0, 40, n)]
        elif dtype == pl.Float64():
            values = [float(v) for v in rng.normal(50.0, 20.0, n)]
        else:
            values = list(rng.choice(["US", "GB", "FR"], n))
        if name not in (key, "event_timestamp", "created_timestamp"):
            values = [None if rng.random() < 0.1 else v for v in values]
        columns[name] = pl.Series(name, values, dtype=dtype)
    return pl.DataFrame(columns).unique([key, "event_timestamp"], keep="first")


def _edge_row(schema: dict, key: str, entity: str, at: datetime, created: datetime, v: float):
    row = {
        name: (1 if dtype == pl.Int64() else v if dtype == pl.Float64() else "GB")
        for name, dtype in schema.items()
    }
    row.update({key: entity, "event_timestamp": at, "created_timestamp": created})
    return pl.DataFrame([row], schema=schema)


def _entities(rng: np.random.Generator, n: int) -> pl.DataFrame:
    hours = rng.integers(0, 62 * 24, n)
    jitter = np.where(rng.random(n) < 0.3, rng.integers(1, 3_600_000_000, n), 0)
    stamps = [
        T0 + timedelta(hours=int(h), microseconds=int(j))
        for h, j in zip(hours, jitter, strict=True)
    ]
    random_rows = pl.DataFrame(
        {
            "card_id": rng.choice([f"c{i}" for i in range(44)], n),  # c40..c43 have no rows
            "merchant_id": rng.choice([f"m{i}" for i in range(12)], n),  # m10, m11 neither
            "event_timestamp": pl.Series(stamps, dtype=UTC_TS),
        }
    )
    edges = pl.DataFrame(
        {
            "card_id": ["edge", "edge", "edge", "edge", "tie", "c0"],
            "merchant_id": ["edge", "edge", "edge", "edge", "m0", "m0"],
            "event_timestamp": pl.Series(
                [EDGE - US, EDGE, EDGE + CARD_TTL, EDGE + CARD_TTL + US, EDGE, T0 - US],
                dtype=UTC_TS,
            ),
        }
    )
    rows = pl.concat([random_rows, edges, random_rows.head(10)])  # duplicated entity rows too
    return rows.with_columns(
        pl.Series("row_id", np.arange(rows.height), dtype=pl.Int64),
        pl.Series("amount", rng.gamma(2.0, 30.0, rows.height)),
        pl.Series("country", rng.choice(["US", "GB"], rows.height)),
        pl.col("event_timestamp").alias("transaction_timestamp"),
    )


def _build_home(home: Path, seed: int) -> tuple[FeatureStore, pl.DataFrame]:
    """Two batch files per view; the second redoes some rows of the first (same entity and
    time, later created_timestamp), plus edge entities for ties and TTL boundaries."""
    rng = np.random.default_rng(seed)
    cards = [f"c{i}" for i in range(40)]
    merchants = [f"m{i}" for i in range(10)]
    c1 = _random_rows(rng, CARD_FEATURE_SCHEMA, "card_id", cards, 1500, C1)
    c2 = _random_rows(rng, CARD_FEATURE_SCHEMA, "card_id", cards, 600, C2)
    redone = c1.sample(200, seed=seed).with_columns(
        pl.lit(C2).cast(UTC_TS).alias("created_timestamp"),
        (pl.col("card_amount_mean_30d") + 1000.0).alias("card_amount_mean_30d"),
    )
    c2 = pl.concat([c2.join(redone, on=["card_id", "event_timestamp"], how="anti"), redone])
    c1 = pl.concat(
        [
            c1,
            _edge_row(CARD_FEATURE_SCHEMA, "card_id", "edge", EDGE, C1, 7.0),
            _edge_row(CARD_FEATURE_SCHEMA, "card_id", "tie", EDGE, C1, 1.0),
        ]
    )
    c2 = pl.concat([c2, _edge_row(CARD_FEATURE_SCHEMA, "card_id", "tie", EDGE, C2, 2.0)])
    m1 = _random_rows(rng, MERCHANT_FEATURE_SCHEMA, "merchant_id", merchants, 700, C1)
    m1 = pl.concat([m1, _edge_row(MERCHANT_FEATURE_SCHEMA, "merchant_id", "edge", EDGE, C1, 3.0)])
    m2 = _random_rows(rng, MERCHANT_FEATURE_SCHEMA, "merchant_id", merchants, 300, C2)
    write_feature_file(home, CARD_VIEW, "b1", c1)
    write_feature_file(home, CARD_VIEW, "b2", c2)
    write_feature_file(home, MERCHANT_VIEW, "b1", m1)
    write_feature_file(home, MERCHANT_VIEW, "b2", m2)
    store = feature_store(home)
    apply_definitions(store)
    return store, _entities(rng, 300)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, pl.DataFrame]:
    return _build_home(tmp_path_factory.mktemp("pit") / "home", seed=5)


def _feast(store: FeatureStore, entities: pl.DataFrame):
    return store.get_historical_features(
        entity_df=entities.to_pandas(), features=store.get_feature_service("fraud_model_v1")
    )


def test_asof_path_equals_feast_get_historical_features_row_for_row(built) -> None:
    store, entities = built
    ours = historical_features(store, entities)
    job = _feast(store, entities)
    theirs = job.to_df()

    assert ours.height == entities.height
    assert ours["row_id"].to_list() == entities["row_id"].to_list()  # entity order kept
    assert list(ours.columns) == list(theirs.columns)
    assert ours.schema == pl.from_arrow(job.to_arrow()).schema
    pd.testing.assert_frame_equal(
        ours.to_pandas().sort_values("row_id").reset_index(drop=True),
        theirs.sort_values("row_id").reset_index(drop=True),
        check_exact=True,
    )
    # The comparison covered the cases that matter, not only easy rows.
    assert ours["card_tx_count_1h"].null_count() > 10  # unknown cards, before first row, TTL
    assert ours["merchant_category"].null_count() > 10
    assert ours["card_amount_mean_30d"].drop_nulls().gt(500).sum() > 0  # redone rows won
    joined = ours.join(
        pl.concat(
            pl.read_parquet(p) for p in (store.config.repo_path / "features" / CARD_VIEW).iterdir()
        ).select("card_id", "event_timestamp"),
        on=["card_id", "event_timestamp"],
        how="semi",
    )
    assert joined.height > 10  # entity times equal to feature times


def test_point_in_time_edges_ties_and_ttl(built) -> None:
    store, entities = built
    out = historical_features(store, entities).filter(
        pl.col("card_id").is_in(["edge", "tie"]) | (pl.col("event_timestamp") < T0)
    )
    by_time = {(r["card_id"], r["event_timestamp"]): r for r in out.to_dicts()}
    assert by_time[("edge", EDGE - US)]["card_amount_mean_30d"] is None  # before the row
    assert by_time[("edge", EDGE)]["card_amount_mean_30d"] == 7.0  # at the row's own time
    assert by_time[("edge", EDGE + CARD_TTL)]["card_amount_mean_30d"] == 7.0  # TTL inclusive
    assert by_time[("edge", EDGE + CARD_TTL + US)]["card_amount_mean_30d"] is None  # expired
    assert by_time[("edge", EDGE)]["merchant_amount_sum_7d"] == 3.0
    assert by_time[("edge", EDGE + CARD_TTL)]["merchant_amount_sum_7d"] is None  # 7-day TTL
    assert by_time[("tie", EDGE)]["card_amount_mean_30d"] == 2.0  # later created_timestamp
    assert by_time[("c0", T0 - US)]["card_tx_count_7d"] is None
    amount = by_time[("edge", EDGE)]["amount"]
    assert by_time[("edge", EDGE)]["tx_amount_to_card_mean_30d"] == pytest.approx(amount / 7.0)
    assert by_time[("edge", EDGE)]["tx_hour_of_day"] == EDGE.hour


def test_training_rows_see_the_state_before_their_transaction(tmp_path: Path) -> None:
    stamps = [T0, T0 + timedelta(minutes=20), T0 + timedelta(hours=5, minutes=20)]
    tx = pl.DataFrame(
        {
            "transaction_id": ["1", "2", "3"],
            "card_id": ["c", "c", "c"],
            "merchant_id": ["m", "m", "m"],
            "amount": [10.0, 30.0, 60.0],
            "channel": "pos",
            "country": ["US", "FR", "US"],
            "event_timestamp": stamps,
        }
    ).select([pl.col(c).cast(t) for c, t in SCHEMAS["transactions"].items()])
    cards = pl.DataFrame({"card_id": ["c"], "home_country": ["US"], "spending_profile": ["low"]})
    merchants = pl.DataFrame({"merchant_id": ["m"], "category": ["fuel"], "country": ["US"]})
    labels = pl.DataFrame(schema=SCHEMAS["labels"])
    home = tmp_path / "home"
    write_feature_file(home, CARD_VIEW, "b1", card_features(tx, cards, created_at=C1))
    write_feature_file(
        home, MERCHANT_VIEW, "b1", merchant_features(tx, labels, merchants, created_at=C1)
    )
    store = feature_store(home)
    apply_definitions(store)

    rows = historical_features(store, training_entities(tx)).sort("transaction_timestamp")
    # Each row holds the card as of its previous transaction: never the one being scored.
    assert rows["card_tx_count_1h"].to_list() == [None, 1, 2]
    assert rows["card_tx_count_24h"].to_list() == [None, 1, 2]
    assert rows["merchant_tx_count_24h"].to_list() == [None, 1, 2]
    assert rows["tx_amount_to_card_mean_30d"].to_list()[1:] == [3.0, 3.0]  # 30/10, 60/20
    assert rows["tx_is_foreign"].to_list() == [False, True, False]
    assert rows["tx_hour_of_day"].to_list() == [0, 0, 5]


def test_online_features_after_materialization_equal_training_features(tmp_path: Path) -> None:
    store, entities = _build_home(tmp_path / "home", seed=9)
    end = T0 + timedelta(days=62)
    materialize(store, end)
    sample = pl.concat(
        [
            entities.unique(["card_id", "merchant_id"]).sort("row_id").head(60),
            entities.filter(pl.col("card_id") == "edge").head(1),  # its rows are past their TTLs
        ]
    )
    at_end = sample.with_columns(pl.lit(end).cast(UTC_TS).alias("event_timestamp"))

    offline = historical_features(store, at_end).drop("event_timestamp")
    online = online_features(store, sample.drop("event_timestamp"), at=end)

    assert online.columns == offline.columns
    assert online.equals(offline)
    alive = offline.filter(pl.col("card_tx_count_1h").is_not_null())
    assert alive.height > 40 and offline["merchant_tx_count_7d"].drop_nulls().len() > 20
    assert offline.filter(pl.col("card_id") == "edge")["card_amount_mean_30d"].to_list() == [None]
    raw = store.get_online_features(
        features=["card_stats_fv:card_amount_mean_30d"],
        entity_rows=[{"card_id": c} for c in [*alive["card_id"], "edge"]],
    ).to_dict()["card_amount_mean_30d"]
    # The online store itself keeps expired rows; online_features applies the TTL as training does.
    assert raw == [*alive["card_amount_mean_30d"], 7.0]


def test_materialize_reloads_rows_recomputed_before_the_last_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    card = _edge_row(CARD_FEATURE_SCHEMA, "card_id", "late", EDGE, C1, 5.0)
    merchant = _edge_row(MERCHANT_FEATURE_SCHEMA, "merchant_id", "m", EDGE, C1, 1.0)
    write_feature_file(home, CARD_VIEW, "b1", card)
    write_feature_file(home, MERCHANT_VIEW, "b1", merchant)
    store = feature_store(home)
    apply_definitions(store)
    request = pl.DataFrame(
        {"card_id": ["late"], "merchant_id": ["m"], "amount": [1.0], "country": ["GB"]}
    ).with_columns(pl.lit(EDGE).cast(UTC_TS).alias("transaction_timestamp"))

    first_end = EDGE + timedelta(days=1)
    materialize(store, first_end)
    assert online_features(store, request, at=first_end)["card_amount_mean_30d"][0] == 5.0

    redone = card.with_columns(
        pl.lit(C2).cast(UTC_TS).alias("created_timestamp"),
        pl.lit(9.0).alias("card_amount_mean_30d"),
    )
    write_feature_file(home, CARD_VIEW, "b2", redone)
    second_end = EDGE + timedelta(days=2)
    materialize(store, second_end)  # incremental: starts after the redone row's time
    assert online_features(store, request, at=second_end)["card_amount_mean_30d"][0] == 5.0
    materialize(store, second_end, changed_since=EDGE)
    assert online_features(store, request, at=second_end)["card_amount_mean_30d"][0] == 9.0
