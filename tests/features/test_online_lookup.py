"""The serving lookup (``online_features``) answers exactly as the Feast SDK path does."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import compute_table_id
from feast.infra.online_stores.sqlite import SqliteOnlineStore
from feast.protos.feast.serving.ServingService_pb2 import FieldStatus
from feast.value_type import ValueType

import features.store
from features.declarations import NUMPY_UDF_TAG
from features.store import (
    _READERS,
    SERVICE,
    _numpy_values,
    _python_values,
    _reader,
    _resolve,
    _StoreReader,
    ensure_read_indexes,
    feature_store,
    historical_features,
    materialize,
    online_columns,
    online_features,
    online_features_sdk,
)
from quality.schema import UTC_TS
from tests.features.test_point_in_time import CARD_TTL, EDGE, MERCHANT_TTL, T0, _build_home
from usecases.fraud.feature_repo.definitions import transaction_request_features

END = T0 + timedelta(days=62)
# Lookup times: all alive, merchants past their TTL, everything past, before any row.
TIMES = [END, END + MERCHANT_TTL + timedelta(days=1), END + CARD_TTL + timedelta(days=1), T0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureStore, pl.DataFrame]:
    store, entities = _build_home(tmp_path_factory.mktemp("online") / "home", seed=13)
    materialize(store, END)
    rows = entities.drop("event_timestamp", "row_id")
    rng = np.random.default_rng(3)
    rows = rows.with_columns(  # request fields that exercise the on-demand view's branches
        pl.Series("amount", np.where(rng.random(rows.height) < 0.1, 0.0, rows["amount"])),
        pl.Series("country", rng.choice(["US", "GB", "FR"], rows.height)),
    )
    return store, rows


def _assert_same(fast: pl.DataFrame, sdk: pl.DataFrame) -> None:
    assert fast.columns == sdk.columns
    assert fast.schema == sdk.schema
    assert fast.equals(sdk)  # nulls and NaNs in the same places, values bit for bit


@pytest.mark.parametrize("at", TIMES)
def test_online_features_equal_the_feast_sdk_path(served, at) -> None:
    store, rows = served
    fast, sdk = online_features(store, rows, at=at), online_features_sdk(store, rows, at=at)
    _assert_same(fast, sdk)
    assert fast.height == rows.height  # duplicated keys in the rows are answered per row


def test_lookups_read_the_covering_index_materialize_keeps(served) -> None:
    """At a million cards a lookup's time was its table seeks, one per (card, feature) row:
    materialize keeps a covering index per view table, and the lookup's query reads it alone
    (decision 53). The equality tests above hold with it."""
    store, _ = served
    assert ensure_read_indexes(store) == []  # materialize made them
    path = SqliteOnlineStore._get_db_path(store.config)
    with closing(sqlite3.connect(path)) as con:
        for view in store.list_feature_views():
            table = compute_table_id(store.project, view, False)
            plan = con.execute(
                f'EXPLAIN QUERY PLAN SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
                "WHERE entity_key IN (?, ?) ORDER BY entity_key",
                (b"a", b"b"),
            ).fetchall()
            assert f"USING COVERING INDEX {table}_loopline_read" in plan[0][-1], plan
        con.execute(f'DROP INDEX "{table}_loopline_read"')  # a home from before the index
        con.commit()
    assert ensure_read_indexes(store) == [f"{table}_loopline_read"]


def test_the_on_demand_view_runs_on_numpy_columns_and_its_pandas_path_answers_the_same(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparisons above run the registered UDF on NumPy columns (the view's tag); with the
    tag ignored the same UDF runs on a pandas frame, and both equal Feast's output."""
    store, rows = served
    service = _resolve(store, SERVICE)
    monkeypatch.setattr(features.store, "_resolve", lambda *_: service)  # no re-resolution
    plan = service.online_plan(store)
    assert [(s.odfv.name, s.numpy) for s in plan.odfvs] == [("transaction_request_fv", True)]
    numpy_answer = online_features(store, rows, at=END)
    monkeypatch.setattr(plan, "odfvs", [s._replace(numpy=False) for s in plan.odfvs])
    pandas_answer = online_features(store, rows, at=END)
    _assert_same(numpy_answer, pandas_answer)
    _assert_same(pandas_answer, online_features_sdk(store, rows, at=END))


def test_online_columns_are_the_columns_of_online_features(served) -> None:
    store, rows = served
    frame = online_features(store, rows, at=END)
    found = online_columns(store, rows.to_arrow(), at=END)
    assert list(found.values) == frame.columns[rows.width :]
    rebuilt = pl.from_arrow(
        pa.table({n: pa.array(v, type=found.types[n]) for n, v in found.values.items()})
    )
    _assert_same(rebuilt, frame.drop(rows.columns))


@pytest.mark.parametrize("at", TIMES[:2])
def test_online_columns_of_python_values_equal_those_of_an_arrow_table(served, at) -> None:
    """The handler passes its request as lists with a schema: the same answer as the table."""
    store, rows = served
    table = rows.to_arrow()
    lists = {name: rows[name].to_list() for name in rows.columns}
    by_table = online_columns(store, table, at=at)
    by_lists = online_columns(store, lists, schema=table.schema, at=at)
    assert by_lists.types == by_table.types
    assert by_lists.values.keys() == by_table.values.keys()
    for name, column in by_table.values.items():
        assert pa.array(by_lists.values[name], by_table.types[name]).equals(
            pa.array(column, by_table.types[name])
        ), name


INPUTS = [
    ([1.5, None, -0.0, float("nan"), float("inf"), 3], pa.float64()),
    ([], pa.float64()),
    ([None, None], pa.float64()),
    (["US", None, "", "ü"], pa.string()),
    ([None], pa.string()),
    ([1, None, 2], pa.int64()),
    ([True, None], pa.bool_()),
]


@pytest.mark.parametrize(("values", "kind"), INPUTS)
def test_on_demand_inputs_skip_arrow_with_the_arrays_arrow_gives(values, kind) -> None:
    """A numpy UDF's float64 and string inputs are built from the Python values directly:
    the dtype and values ``to_numpy`` of their Arrow array gives; other types go to Arrow."""
    got = _numpy_values(values, kind)
    want = pa.array(values, type=kind).to_numpy(zero_copy_only=False)
    if kind not in (pa.float64(), pa.string()):
        assert got is None
        return
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    assert repr(got.tolist()) == repr(want.tolist())  # NaN, -0.0 and None as they are


OUTPUTS = [
    np.array([0.5, np.nan, -0.0, np.inf, -np.inf, 1e-300]),
    np.array([], dtype=np.float64),
    np.array([3, -1, 2**40], dtype=np.int64),
    np.array([True, False]),
    np.array([1.5, 2.5], dtype=np.float32),
    np.array(["a", None], dtype=object),
    pd.Series([1.0, None]),
]


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: str(o.dtype))
def test_on_demand_outputs_skip_arrow_with_the_values_arrow_gives(output) -> None:
    """float64, int64 and bool outputs go to Python values directly: what
    ``pa.array(output, from_pandas=True)`` reads back (NaN as None), with its type."""
    values, kind = _python_values(output)
    want = pa.array(output, from_pandas=True)
    assert kind == want.type
    assert repr(values) == repr(want.to_pylist())


def test_the_comparison_covers_known_unknown_and_expired_entities(served) -> None:
    store, rows = served
    alive = online_features(store, rows, at=END)
    known = alive.filter(pl.col("card_id").str.contains(r"^c\d+$"))
    assert known["card_tx_count_7d"].null_count() < known.height  # known cards have values
    unknown = alive.filter(pl.col("card_id").is_in(["c40", "c41", "c42", "c43"]))
    assert unknown.height > 0 and unknown["card_amount_mean_30d"].null_count() == unknown.height
    assert alive.filter(pl.col("card_id") == "edge")["card_amount_mean_30d"].is_null().all()
    later = online_features(store, rows, at=TIMES[1])
    assert later["merchant_category"].null_count() == later.height  # merchants expired
    assert later["card_home_country"].null_count() < later.height  # cards not yet
    assert alive["tx_amount_to_card_mean_30d"].is_null().sum() > 0  # zero means, unknown cards
    assert alive["tx_is_foreign"].sum() > 0


def test_single_rows_and_small_batches_equal_the_sdk_path(served) -> None:
    store, rows = served
    for start in range(0, 60, 7):
        for n in (1, 2, 5):
            batch = rows.slice(start, n)
            _assert_same(
                online_features(store, batch, at=END), online_features_sdk(store, batch, at=END)
            )
    dicts = rows.head(3).to_dicts()
    _assert_same(online_features(store, dicts, at=END), online_features_sdk(store, dicts, at=END))


def test_any_online_store_through_its_online_read_equals_the_sdk_path(served) -> None:
    """The reader for stores other than SQLite (Redis in the scale profile), run on SQLite."""
    store, rows = served
    generic = feature_store(Path(store.config.repo_path))
    _READERS[generic] = _StoreReader(generic)
    for at in TIMES[:2]:
        _assert_same(online_features(generic, rows, at=at), online_features_sdk(store, rows, at=at))


def test_the_lookup_sees_rows_loaded_after_its_first_call(tmp_path: Path) -> None:
    """Rows read once are kept, not read again, until a materialization changes the store."""
    store, entities = _build_home(tmp_path / "home", seed=21)
    rows = entities.drop("event_timestamp", "row_id").head(20)
    materialize(store, T0 + timedelta(days=20))
    first = online_features(store, rows, at=END)
    statements: list[str] = []
    _reader(store)._connection().set_trace_callback(statements.append)
    _assert_same(online_features(store, rows, at=END), first)
    assert not [s for s in statements if s.startswith("SELECT")]  # answered from kept rows
    materialize(store, END)
    second = online_features(store, rows, at=END)
    assert [s for s in statements if s.startswith("SELECT")]
    assert not first.equals(second)
    _assert_same(second, online_features_sdk(store, rows, at=END))


def _pandas_reference(inputs: pd.DataFrame) -> pd.DataFrame:
    """The request-time features as first written, in pandas operations."""
    out = pd.DataFrame(index=inputs.index)
    mean = inputs["card_amount_mean_30d"].astype("float64")
    out["tx_amount_to_card_mean_30d"] = inputs["amount"].astype("float64") / mean.where(mean > 0)
    home = inputs["card_home_country"]
    out["tx_is_foreign"] = (home.notna() & (inputs["country"] != home)).astype("bool")
    ts = pd.to_datetime(inputs["transaction_timestamp"], utc=True)
    out["tx_hour_of_day"] = ts.dt.hour.astype("int64")
    return out


@pytest.mark.parametrize("n", [0, 1, 3, 1000])
def test_request_time_udf_keeps_the_meaning_of_its_pandas_formulation(n: int) -> None:
    rng = np.random.default_rng(n)
    mean = rng.normal(10.0, 20.0, n)
    mean[rng.random(n) < 0.2] = 0.0
    table = pa.table(
        {
            "amount": pa.array(np.where(rng.random(n) < 0.05, np.nan, rng.gamma(2.0, 30.0, n))),
            "country": pa.array(rng.choice(["US", "GB"], n).astype(object)),
            "transaction_timestamp": pa.array(
                rng.integers(-(10**15), 3 * 10**15, n), pa.timestamp("us", "UTC")
            ),
            "card_amount_mean_30d": pa.array(mean, mask=rng.random(n) < 0.2),
            "card_home_country": pa.array(rng.choice(["US", "GB", None], n)),
        }
    )
    ours = pa.Table.from_pandas(transaction_request_features(table.to_pandas()))
    assert ours.equals(pa.Table.from_pandas(_pandas_reference(table.to_pandas())))


@pytest.mark.parametrize("n", [0, 1, 3, 32, 1000])
def test_the_registered_udf_on_numpy_columns_equals_feasts_on_demand_output(served, n) -> None:
    """The registry's own function (rebuilt from its source, as serving loads it) given NumPy
    columns, against Feast's ``transform_arrow`` of the same rows: nulls, zero and negative
    means, unknown home countries, timestamps before 1970 and on hour boundaries."""
    store, _ = served
    odfv = store.get_on_demand_feature_view("transaction_request_fv")
    assert odfv.tags[NUMPY_UDF_TAG] == "true"
    rng = np.random.default_rng(100 + n)
    mean = rng.normal(10.0, 20.0, n)
    mean[rng.random(n) < 0.2] = 0.0
    stamps = rng.integers(-(10**15), 3 * 10**15, n)
    on_hours = rng.random(n) < 0.2
    stamps[on_hours] = (stamps[on_hours] // 3_600_000_000) * 3_600_000_000
    table = pa.table(
        {
            "amount": pa.array(np.where(rng.random(n) < 0.05, np.nan, rng.gamma(2.0, 30.0, n))),
            "country": pa.array(rng.choice(["US", "GB", "FR"], n).astype(object)),
            "transaction_timestamp": pa.array(stamps, pa.timestamp("us", "UTC")),
            "card_amount_mean_30d": pa.array(mean, mask=rng.random(n) < 0.2),
            "card_home_country": pa.array(rng.choice(["US", "GB", "ZZ", None], n)),
        }
    )
    feast = odfv.transform_arrow(table, False).select([f.name for f in odfv.features])
    udf = odfv.feature_transformation.udf
    out = udf({c: table[c].to_numpy() for c in table.column_names})
    ours = pa.table({c: pa.array(out[c], from_pandas=True) for c in feast.column_names})
    assert ours.schema == feast.schema
    assert ours.equals(feast)


US = timedelta(microseconds=1)


def _at_own_times(rows: pl.DataFrame, times: list) -> pl.DataFrame:
    """The rows, each stamped with one of ``times`` in turn (its request time)."""
    stamps = [times[i % len(times)] for i in range(rows.height)]
    return rows.with_columns(pl.Series("transaction_timestamp", stamps, dtype=UTC_TS))


def test_ttls_apply_at_each_rows_own_time_within_one_lookup(served) -> None:
    """The same entity in one lookup: alive at one request's time, expired at a later one's,
    to the microsecond of its TTL, as the training join decides (event time >= time - TTL)."""
    store, _ = served
    edge = EDGE  # the edge card's and merchant's only row
    rows = pl.DataFrame(
        {
            "card_id": ["edge", "edge", "edge"],
            "merchant_id": ["edge", "edge", "edge"],
            "amount": [10.0, 10.0, 10.0],
            "country": ["US", "US", "US"],
            "transaction_timestamp": pl.Series(
                [edge + CARD_TTL, edge + CARD_TTL + US, edge + MERCHANT_TTL + US], dtype=UTC_TS
            ),
        }
    )
    found = online_columns(store, rows.to_arrow(), time_column="transaction_timestamp")
    assert found.values["card_amount_mean_30d"][0] is not None  # at its TTL: alive
    assert found.values["card_amount_mean_30d"][1] is None  # a microsecond later: expired
    assert found.values["merchant_category"] == [None, None, None]  # merchants' TTL is 7 days
    ages = [CARD_TTL.total_seconds(), None, (MERCHANT_TTL + US).total_seconds()]
    assert found.ages == {"card_stats_fv": ages, "merchant_stats_fv": [None, None, None]}
    frame = online_features(store, rows, time_column="transaction_timestamp")
    _assert_same(frame, online_features_sdk(store, rows, time_column="transaction_timestamp"))


@pytest.mark.parametrize("spread", [[END], TIMES[:3], [END, TIMES[1], T0, END + timedelta(days=3)]])
def test_per_row_times_equal_the_sdk_path_and_the_training_join(served, spread) -> None:
    """Serving and training agree by construction: at request times after the last feature
    row, the online lookup at each row's time equals the point-in-time join at that time."""
    store, rows = served
    timed = _at_own_times(rows, spread)
    fast = online_features(store, timed, time_column="transaction_timestamp")
    _assert_same(fast, online_features_sdk(store, timed, time_column="transaction_timestamp"))
    if min(spread) >= END:
        training = historical_features(
            store, timed.with_columns(pl.col("transaction_timestamp").alias("event_timestamp"))
        )
        assert fast.equals(training.drop("event_timestamp").select(fast.columns))
    if len(spread) > 1:  # some rows expired, others of the same entities not
        assert 0 < fast["merchant_category"].null_count() < fast.height


def test_feature_ages_are_the_seconds_since_the_online_rows_event_time(served) -> None:
    store, rows = served
    timed = _at_own_times(rows.head(60), [END, END + timedelta(days=2, seconds=7), TIMES[1]])
    found = online_columns(store, timed.to_arrow(), time_column="transaction_timestamp")
    assert set(found.ages) == {"card_stats_fv", "merchant_stats_fv"}
    for view, key, feature in (
        ("card_stats_fv", "card_id", "card_tx_count_1h"),
        ("merchant_stats_fv", "merchant_id", "merchant_category"),
    ):
        response = store.get_online_features(
            features=[f"{view}:{feature}"], entity_rows=timed.select(key).to_dicts()
        )
        stamps = response.proto.results[-1].event_timestamps
        want = []
        for stamp, status, t in zip(
            stamps,
            response.proto.results[-1].statuses,
            timed["transaction_timestamp"].to_list(),
            strict=True,
        ):
            event = datetime.fromtimestamp(stamp.seconds, UTC) + timedelta(
                microseconds=stamp.nanos // 1000
            )
            ttl = CARD_TTL if view == "card_stats_fv" else MERCHANT_TTL
            known = status == FieldStatus.PRESENT and event >= t - ttl
            want.append((t - event).total_seconds() if known else None)
        assert found.ages[view] == pytest.approx(want, abs=1e-6), view
        unused = [
            v for a, v in zip(found.ages[view], found.values[feature], strict=True) if a is None
        ]
        assert unused and all(v is None for v in unused)  # no age: the row's features are null
    assert any(a is not None and a > 86_400 for a in found.ages["card_stats_fv"])


def test_a_view_being_materialized_keeps_serving_its_last_rows(served, caplog) -> None:
    """Materialization marks a view MATERIALIZING; a server whose registry cache refreshes in
    that window must still answer from the online rows already there (it returned 503s)."""
    from feast.feature_view import FeatureViewState

    store, rows = served
    before = online_features(store, rows, at=END)
    view = store.registry.get_feature_view("card_stats_fv", store.project, allow_cache=False)
    assert view.state != FeatureViewState.MATERIALIZING
    view.state = FeatureViewState.MATERIALIZING
    store.registry.apply_feature_view(view, store.project, commit=True)
    try:
        with caplog.at_level("WARNING"):
            fresh = feature_store(Path(store.repo_path))  # a server starting now
        assert "typically has no effect" not in caplog.text
        assert fresh.registry.serve_features_while_materializing
        _assert_same(online_features(fresh, rows, at=END), before)
    finally:
        view.state = FeatureViewState.AVAILABLE_ONLINE
        store.registry.apply_feature_view(view, store.project, commit=True)


@pytest.mark.parametrize(
    ("value_type", "keys"),
    [
        (ValueType.STRING, ["c000042", "", "ü-ß", "m" * 300]),
        (ValueType.INT64, [0, -5, 2**62, -(2**63)]),
        (ValueType.INT32, [7]),  # not a plain key: Feast's own serialization
    ],
)
def test_plain_keys_are_serialized_as_feast_serializes_them(value_type, keys) -> None:
    """A lookup writes single string and int64 keys itself (decision 53): byte for byte
    Feast's ``serialize_entity_key``, or the SQLite rows would never be found."""
    read = features.store._ViewRead(None, ["card_id"], [value_type], ["card_id"], [], "t", {})
    for key in keys:
        expected = serialize_entity_key(read.entity_key(key), 3)
        assert read.serialized_key(key, 3) == expected
        assert (features.store._plain_serialized(read, key, 3) is None) == (
            value_type == ValueType.INT32
        )
