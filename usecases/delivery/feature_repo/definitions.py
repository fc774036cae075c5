"""Feast declarations of the delivery demo: restaurant and courier entities, their feature views
over the per-batch files the platform writes, the order's request-time view, and the
FeatureService the model trains and serves on.

``build_definitions(lake)`` is the one place that constructs the objects; the platform calls it
with its lake. ``feast apply`` run in this folder gets the same objects for
``$LOOPLINE_LAKE`` or else ``$LOOPLINE_HOME`` (see feature_store.yaml).
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

TAGS = {"owner": "loopline", "domain": "delivery"}
# A row older than this is not served: twice each view's longest window.
RESTAURANT_TTL = timedelta(days=14)
COURIER_TTL = timedelta(days=2)

RESTAURANT_FIELDS = [
    Field(name="restaurant_id", dtype=String),
    Field(name="restaurant_orders_1h", dtype=Int64),
    Field(name="restaurant_deliveries_7d", dtype=Int64),
    Field(name="restaurant_minutes_mean_7d", dtype=Float64),
    Field(name="restaurant_cuisine", dtype=String),
    Field(name="restaurant_zone", dtype=String),
]
COURIER_FIELDS = [
    Field(name="courier_id", dtype=String),
    Field(name="courier_orders_1h", dtype=Int64),
    Field(name="courier_orders_24h", dtype=Int64),
    Field(name="courier_vehicle", dtype=String),
]
REQUEST_FIELDS = [Field(name="order_timestamp", dtype=UnixTimestamp)]
ORDER_FIELDS = [
    Field(name="hour_of_day", dtype=Int64),
    Field(name="rush_hour", dtype=Bool),
]


class Definitions(NamedTuple):
    """Every Feast object of the repo, in the order ``FeatureStore.apply`` accepts them."""

    restaurant: Entity
    courier: Entity
    restaurant_stats_source: FileSource
    courier_stats_source: FileSource
    order_request: RequestSource
    restaurant_stats_fv: FeatureView
    courier_stats_fv: FeatureView
    order_request_fv: OnDemandFeatureView
    delivery_model_v1: FeatureService


def order_request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """Request-time features, one definition for training (a pandas frame) and serving (a dict
    of NumPy columns: ``NUMPY_UDF_TAG``): the order's hour (UTC) and whether it falls in the
    lunch or dinner rush. Imports are inside because Feast stores the function by its source."""
    import numpy as np
    import pandas as pd

    frame = isinstance(inputs, pd.DataFrame)
    stamps = inputs["order_timestamp"]
    if frame:
        stamps = pd.to_datetime(stamps, utc=True).dt.tz_convert(None)
    hour = np.asarray(stamps).astype("datetime64[h]").astype("int64") % 24
    rush = ((hour >= 11) & (hour < 14)) | ((hour >= 18) & (hour < 21))
    out = {"hour_of_day": hour, "rush_hour": rush.astype("bool")}
    return pd.DataFrame(out, index=inputs.index) if frame else out


# As Feast's @on_demand_feature_view does: keep the source text, and store the function by value.
_UDF_SOURCE = inspect.getsource(order_request_features)
order_request_features.__module__ = "__main__"


def _source(lake: Path, view: str, what: str) -> FileSource:
    return FileSource(
        name=view.replace("_fv", "_source"),
        path=feature_glob(lake, view),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description=f"{what} feature rows, one per entity and event time.",
        tags=TAGS,
    )


def build_definitions(lake: Path) -> Definitions:
    """All declarations for one Loopline lake (sources read its feature files)."""
    restaurant = Entity(
        name="restaurant",
        join_keys=["restaurant_id"],
        value_type=ValueType.STRING,
        description="A restaurant preparing orders.",
        tags=TAGS,
    )
    courier = Entity(
        name="courier",
        join_keys=["courier_id"],
        value_type=ValueType.STRING,
        description="A courier delivering orders.",
        tags=TAGS,
    )
    restaurant_stats_source = _source(lake, "restaurant_stats_fv", "Restaurant")
    courier_stats_source = _source(lake, "courier_stats_fv", "Courier")
    order_request = RequestSource(
        name="order_request",
        schema=REQUEST_FIELDS,
        description="The order being scored, as the request carries it.",
        tags=TAGS,
    )
    restaurant_stats_fv = FeatureView(
        name="restaurant_stats_fv",
        entities=[restaurant],
        ttl=RESTAURANT_TTL,
        schema=RESTAURANT_FIELDS,
        online=True,
        source=restaurant_stats_source,
        description="Kitchen load, mean delivery minutes known over 7 days, cuisine and zone.",
        tags={**TAGS, "entity": "restaurant"},
    )
    courier_stats_fv = FeatureView(
        name="courier_stats_fv",
        entities=[courier],
        ttl=COURIER_TTL,
        schema=COURIER_FIELDS,
        online=True,
        source=courier_stats_source,
        description="Courier load over the last hour and day, and vehicle.",
        tags={**TAGS, "entity": "courier"},
    )
    order_request_fv = OnDemandFeatureView(
        name="order_request_fv",
        sources=[order_request],
        schema=ORDER_FIELDS,
        mode="pandas",
        udf=order_request_features,
        udf_string=_UDF_SOURCE,
        description="The order's hour (UTC) and whether it falls in the lunch or dinner rush.",
        tags={**TAGS, "entity": "order", NUMPY_UDF_TAG: "true"},
    )
    delivery_model_v1 = FeatureService(
        name="delivery_model_v1",
        features=[restaurant_stats_fv, courier_stats_fv, order_request_fv],
        description="Features of the delivery-time model, version 1: training and serving use it.",
        tags={**TAGS, "version": "1"},
    )
    return Definitions(
        restaurant,
        courier,
        restaurant_stats_source,
        courier_stats_source,
        order_request,
        restaurant_stats_fv,
        courier_stats_fv,
        order_request_fv,
        delivery_model_v1,
    )


# What `feast apply` run in this folder applies (see feature_store.yaml).
(
    restaurant,
    courier,
    restaurant_stats_source,
    courier_stats_source,
    order_request,
    restaurant_stats_fv,
    courier_stats_fv,
    order_request_fv,
    delivery_model_v1,
) = feast_cli_objects(build_definitions, __file__)
