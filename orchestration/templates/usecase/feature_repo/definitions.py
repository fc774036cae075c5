"""Feast declarations of the {{name}} use case: the account entity, its feature view over the
per-batch files the platform writes, the request-time view, and the FeatureService the model
trains and serves on.

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
from feast.types import Float64, Int64, String, UnixTimestamp
from feast.value_type import ValueType

from features.declarations import NUMPY_UDF_TAG, feast_cli_objects, feature_glob

TAGS = {"owner": "loopline", "domain": "{{name}}"}
# A row older than this is not served (the account counts as unknown): twice the longest window.
ACCOUNT_TTL = timedelta(days=14)

ACCOUNT_FIELDS = [
    Field(name="account_id", dtype=String),
    Field(name="account_events_24h", dtype=Int64),
    Field(name="account_events_7d", dtype=Int64),
    Field(name="account_value_mean_7d", dtype=Float64),
    Field(name="account_value_max_7d", dtype=Float64),
    Field(name="account_segment", dtype=String),
]
REQUEST_FIELDS = [
    Field(name="value", dtype=Float64),
    Field(name="event_request_timestamp", dtype=UnixTimestamp),
]
EVENT_FIELDS = [
    Field(name="value_to_account_mean_7d", dtype=Float64),
    Field(name="hour_of_day", dtype=Int64),
]


class Definitions(NamedTuple):
    """Every Feast object of the repo, in the order ``FeatureStore.apply`` accepts them."""

    account: Entity
    account_stats_source: FileSource
    event_request: RequestSource
    account_stats_fv: FeatureView
    event_request_fv: OnDemandFeatureView
    service: FeatureService


def event_request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """Request-time features, one definition for training (a pandas frame) and serving (a dict
    of NumPy columns, which skips pandas for a few rows: ``NUMPY_UDF_TAG``). Imports are
    inside because Feast stores the function by its source."""
    import numpy as np
    import pandas as pd

    frame = isinstance(inputs, pd.DataFrame)
    stamps = inputs["event_request_timestamp"]
    if frame:
        stamps = pd.to_datetime(stamps, utc=True).dt.tz_convert(None)
    stamps = np.asarray(stamps)
    mean = np.asarray(inputs["account_value_mean_7d"], dtype="float64")
    value = np.asarray(inputs["value"], dtype="float64")
    out = {
        "value_to_account_mean_7d": value / np.where(mean > 0, mean, np.nan),
        "hour_of_day": stamps.astype("datetime64[h]").astype("int64") % 24,
    }
    return pd.DataFrame(out, index=inputs.index) if frame else out


# As Feast's @on_demand_feature_view does: keep the source text, and store the function by value.
_UDF_SOURCE = inspect.getsource(event_request_features)
event_request_features.__module__ = "__main__"


def build_definitions(lake: Path) -> Definitions:
    """All declarations for one Loopline lake (sources read its feature files)."""
    account = Entity(
        name="account",
        join_keys=["account_id"],
        value_type=ValueType.STRING,
        description="An account whose events are scored.",
        tags=TAGS,
    )
    account_stats_source = FileSource(
        name="account_stats_source",
        path=feature_glob(lake, "account_stats_fv"),
        file_format=ParquetFormat(),
        timestamp_field="event_timestamp",
        created_timestamp_column="created_timestamp",
        description="Account feature rows, one per account and event time.",
        tags=TAGS,
    )
    event_request = RequestSource(
        name="event_request",
        schema=REQUEST_FIELDS,
        description="The event being scored, as the request carries it.",
        tags=TAGS,
    )
    account_stats_fv = FeatureView(
        name="account_stats_fv",
        entities=[account],
        ttl=ACCOUNT_TTL,
        schema=ACCOUNT_FIELDS,
        online=True,
        source=account_stats_source,
        description="Account activity over 24 hours and 7 days, and its segment.",
        tags={**TAGS, "entity": "account"},
    )
    event_request_fv = OnDemandFeatureView(
        name="event_request_fv",
        sources=[account_stats_fv[["account_value_mean_7d"]], event_request],
        schema=EVENT_FIELDS,
        mode="pandas",
        udf=event_request_features,
        udf_string=_UDF_SOURCE,
        description="The event's value against the account's 7-day mean, and its hour (UTC).",
        tags={**TAGS, "entity": "event", NUMPY_UDF_TAG: "true"},
    )
    service = FeatureService(
        name="{{name}}_model_v1",
        features=[account_stats_fv, event_request_fv],
        description="Features of the {{name}} model, version 1: training and serving both use it.",
        tags={**TAGS, "version": "1"},
    )
    return Definitions(
        account, account_stats_source, event_request, account_stats_fv, event_request_fv, service
    )


# What `feast apply` run in this folder applies (see feature_store.yaml).
(
    account,
    account_stats_source,
    event_request,
    account_stats_fv,
    event_request_fv,
    service,
) = feast_cli_objects(build_definitions, __file__)
