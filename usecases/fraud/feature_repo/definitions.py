"""Feast declarations: entities, sources, feature views, the request-time view, the service.

Feast's DuckDB offline store reads a FileSource path exactly as written (a relative path would
resolve against the process's working directory), so every source is an absolute glob (or an
object-storage URI) over the per-batch feature files under a Loopline lake: the home, unless
``LOOPLINE_LAKE`` names another root. ``build_definitions(lake)`` is the one place that
constructs the objects; the library calls it with the lake it was given. ``feast apply`` and the
other CLI commands import this module from this directory, so for them the module-level objects
below are built for ``$LOOPLINE_LAKE`` or else ``$LOOPLINE_HOME`` (the variable
``feature_store.yaml`` substitutes).
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, RequestSource
from feast.data_format import ParquetFormat
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.types import Bool, Float64, Int64, String, UnixTimestamp
from feast.value_type import ValueType

from features.declarations import NUMPY_UDF_TAG, feast_cli_objects, feature_glob

TAGS = {"owner": "loopline", "domain": "fraud"}
CARD_TTL = timedelta(days=30)
MERCHANT_TTL = timedelta(days=7)

CARD_FIELDS = [
    Field(name="card_id", dtype=String),
    Field(name="card_tx_count_1h", dtype=Int64),
    Field(name="card_tx_count_24h", dtype=Int64),
    Field(name="card_tx_count_7d", dtype=Int64),
    Field(name="card_amount_mean_7d", dtype=Float64),
    Field(name="card_amount_std_7d", dtype=Float64),
    Field(name="card_amount_max_7d", dtype=Float64),
    Field(name="card_amount_mean_30d", dtype=Float64),
    Field(name="card_amount_std_30d", dtype=Float64),
    Field(name="card_amount_max_30d", dtype=Float64),
    Field(name="card_distinct_merchants_24h", dtype=Int64),
    Field(name="card_distinct_countries_7d", dtype=Int64),
    Field(name="card_seconds_since_prev_tx", dtype=Float64),
    Field(name="card_home_country", dtype=String),
    Field(name="card_spending_profile", dtype=String),
]

MERCHANT_FIELDS = [
    Field(name="merchant_id", dtype=String),
    Field(name="merchant_tx_count_24h", dtype=Int64),
    Field(name="merchant_tx_count_7d", dtype=Int64),
    Field(name="merchant_amount_sum_24h", dtype=Float64),
    Field(name="merchant_amount_sum_7d", dtype=Float64),
    Field(name="merchant_labelled_count_30d", dtype=Int64),
    Field(name="merchant_fraud_count_30d", dtype=Int64),
    Field(name="merchant_chargeback_rate_30d", dtype=Float64),
    Field(name="merchant_category", dtype=String),
    Field(name="merchant_country", dtype=String),
]

REQUEST_FIELDS = [
    Field(name="amount", dtype=Float64),
    Field(name="country", dtype=String),
    Field(name="transaction_timestamp", dtype=UnixTimestamp),
]

TRANSACTION_FIELDS = [
    Field(name="tx_amount_to_card_mean_30d", dtype=Float64),
    Field(name="tx_is_foreign", dtype=Bool),
    Field(name="tx_hour_of_day", dtype=Int64),
]


class Definitions(NamedTuple):
    """Every Feast object of the repo, in the order ``FeatureStore.apply`` accepts them."""

    card: Entity
    merchant: Entity
    card_stats_source: FileSource
    merchant_stats_source: FileSource
    transaction_request: RequestSource
    card_stats_fv: FeatureView
    merchant_stats_fv: FeatureView
    transaction_request_fv: OnDemandFeatureView
    fraud_model_v1: FeatureService


def transaction_request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """Request-time features; one definition for training (offline) and serving (online).

    Feast calls it with a pandas frame and gets a frame back (training, the SDK path). Serving
    calls the registered function with a dict of NumPy columns (Arrow's ``to_numpy``: nulls as
    NaN or None, timestamps as UTC ``datetime64``) and gets a dict of NumPy columns back,
    skipping pandas, which costs more than the arithmetic for a few rows; the view's
    ``NUMPY_UDF_TAG`` says it may. Both run the same NumPy lines. Imports are inside because
    Feast stores the function by its source."""
    import numpy as np
    import pandas as pd

    frame = isinstance(inputs, pd.DataFrame)
    stamps = inputs["transaction_timestamp"]
    if frame:
        stamps = pd.to_datetime(stamps, utc=True).dt.tz_convert(None)
    stamps = np.asarray(stamps)
    if np.isnat(stamps).any():
        raise ValueError("transaction_timestamp has nulls")
    mean = np.asarray(inputs["card_amount_mean_30d"], dtype="float64")
    amount = np.asarray(inputs["amount"], dtype="float64")
    home = np.asarray(inputs["card_home_country"], dtype=object)
    foreign = pd.notna(home) & (np.asarray(inputs["country"], dtype=object) != home)
    out = {
        "tx_amount_to_card_mean_30d": amount / np.where(mean > 0, mean, np.nan),
        "tx_is_foreign": foreign.astype("bool"),
        "tx_hour_of_day": stamps.astype("datetime64[h]").astype("int64") % 24,
    }
    return pd.DataFrame(out, index=inputs.index) if frame else out


# What Feast's @on_demand_feature_view does: keep the source text (the registry stores it and
# serving may rebuild the function from it) and mark the function __main__ so dill stores it by
# value. Done once here rather than per build, because the source lookup needs the real module.
_UDF_SOURCE = inspect.getsource(transaction_request_features)
transaction_request_features.__module__ = "__main__"


def build_definitions(lake: Path) -> Definitions:
    """All declarations for one Loopline lake (sources point at its feature files)."""
    card = Entity(
        name="card",
        join_keys=["card_id"],
        value_type=ValueType.STRING,
        description="A payment card.",
        tags=TAGS,
    )
    merchant = Entity(
        name="merchant",
        join_keys=["merchant_id"],
        value_type=ValueType.STRING,
        description="A merchant accepting card payments.",
        tags=TAGS,
    )
    card_stats_source = FileSource(
        name="card_stats_source",
        path=feature_glob(lake, "card_stats_fv"),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description="Card feature rows, one per card and transaction time.",
        tags=TAGS,
    )
    merchant_stats_source = FileSource(
        name="merchant_stats_source",
        path=feature_glob(lake, "merchant_stats_fv"),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description="Merchant feature rows, one per merchant and transaction time.",
        tags=TAGS,
    )
    transaction_request = RequestSource(
        name="transaction_request",
        schema=REQUEST_FIELDS,
        description="The transaction being scored, as the request carries it.",
        tags=TAGS,
    )
    card_stats_fv = FeatureView(
        name="card_stats_fv",
        entities=[card],
        ttl=CARD_TTL,
        schema=CARD_FIELDS,
        online=True,
        source=card_stats_source,
        description="Card activity windows (1h-30d) and card reference attributes.",
        tags={**TAGS, "entity": "card"},
    )
    merchant_stats_fv = FeatureView(
        name="merchant_stats_fv",
        entities=[merchant],
        ttl=MERCHANT_TTL,
        schema=MERCHANT_FIELDS,
        online=True,
        source=merchant_stats_source,
        description="Merchant volume, chargeback rate from labels known at the time, category.",
        tags={**TAGS, "entity": "merchant"},
    )
    transaction_request_fv = OnDemandFeatureView(
        name="transaction_request_fv",
        sources=[card_stats_fv[["card_amount_mean_30d", "card_home_country"]], transaction_request],
        schema=TRANSACTION_FIELDS,
        mode="pandas",
        udf=transaction_request_features,
        udf_string=_UDF_SOURCE,
        description="Amount relative to the card's 30-day mean, foreign flag, hour of day (UTC).",
        tags={**TAGS, "entity": "transaction", NUMPY_UDF_TAG: "true"},
    )
    fraud_model_v1 = FeatureService(
        name="fraud_model_v1",
        features=[card_stats_fv, merchant_stats_fv, transaction_request_fv],
        description="Features of the fraud model, version 1: training and serving both use it.",
        tags={**TAGS, "version": "1"},
    )
    return Definitions(
        card=card,
        merchant=merchant,
        card_stats_source=card_stats_source,
        merchant_stats_source=merchant_stats_source,
        transaction_request=transaction_request,
        card_stats_fv=card_stats_fv,
        merchant_stats_fv=merchant_stats_fv,
        transaction_request_fv=transaction_request_fv,
        fraud_model_v1=fraud_model_v1,
    )


# What `feast apply` run in this folder applies (see feature_store.yaml).
(
    card,
    merchant,
    card_stats_source,
    merchant_stats_source,
    transaction_request,
    card_stats_fv,
    merchant_stats_fv,
    transaction_request_fv,
    fraud_model_v1,
) = feast_cli_objects(build_definitions, __file__)
