"""The delivery demo's restaurant and courier features, point in time, computed per validated
batch (``VIEWS``, the contract of ``features.views``).

Rows are event-stamped: a row of restaurant ``r`` stamped ``t`` describes it right after its
events at ``t`` (an order placed, or an order delivered), from events at or before ``t`` only;
every window is ``(t - w, t]``. Serving looks up the newest row; training joins each order as
of just before its own time, so both see the state the kitchen was in when the order came.

- ``restaurant_stats_fv``: orders in the last hour (how busy the kitchen is), and the mean
  delivery minutes of its orders delivered in the last 7 days (known at delivery: a label
  turned into a feature, counted only once delivered), with the restaurant's cuisine and zone.
- ``courier_stats_fv``: the courier's orders in the last hour and day, and the vehicle.

Incremental and correct for late data: a batch reads the history its windows need before its
earliest event and emits its entities' rows from their earliest new event on, so an event
older than rows already written is counted again in them (with a later ``created_timestamp``,
which the feature store prefers).
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from features.views import CREATED, TS, View, ViewBatch
from quality.schema import UTC_TS

RESTAURANT_VIEW = "restaurant_stats_fv"
COURIER_VIEW = "courier_stats_fv"
RESTAURANT_LOOKBACK = timedelta(days=7)
COURIER_LOOKBACK = timedelta(hours=24)
# How long after its order a delivery may land and still find the order in the history read.
DELIVERY_REACH = timedelta(days=2)

RESTAURANT_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "restaurant_id": pl.String(),
    TS: UTC_TS,
    CREATED: UTC_TS,
    "restaurant_orders_1h": pl.Int64(),
    "restaurant_deliveries_7d": pl.Int64(),
    "restaurant_minutes_mean_7d": pl.Float64(),
    "restaurant_cuisine": pl.String(),
    "restaurant_zone": pl.String(),
}
COURIER_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "courier_id": pl.String(),
    TS: UTC_TS,
    CREATED: UTC_TS,
    "courier_orders_1h": pl.Int64(),
    "courier_orders_24h": pl.Int64(),
    "courier_vehicle": pl.String(),
}


def _rolled(events: pl.DataFrame, key: str, windows: dict[str, list[pl.Expr]]) -> pl.DataFrame:
    """One row per (key, time) of ``events`` with each window's aggregations over (t - w, t]."""
    keys = [key, TS]
    events = events.sort(keys)
    out = events.select(keys).unique(maintain_order=True)
    for period, aggs in windows.items():
        rolled = (
            events.rolling(TS, period=period, closed="right", group_by=key)
            .agg(aggs)
            .unique(subset=keys, keep="first", maintain_order=True)
        )
        out = out.join(rolled, on=keys, how="left")
    return out


def restaurant_features(
    orders: pl.DataFrame, deliveries: pl.DataFrame, restaurants: pl.DataFrame
) -> pl.DataFrame:
    """Restaurant rows at each order and delivery time of ``orders`` and ``deliveries`` (which
    must hold every event of the ``RESTAURANT_LOOKBACK`` before each row, and the orders of
    those deliveries); ``created_timestamp`` is left to the caller."""
    placed = orders.select(
        "restaurant_id",
        pl.col(TS).cast(UTC_TS),
        pl.lit(1, pl.Int64).alias("placed"),
        pl.lit(0, pl.Int64).alias("delivered"),
        pl.lit(None, pl.Float64).alias("minutes"),
    )
    done = deliveries.join(orders.select("order_id", "restaurant_id"), on="order_id").select(
        "restaurant_id",
        pl.col("delivered_at").cast(UTC_TS).alias(TS),
        pl.lit(0, pl.Int64).alias("placed"),
        pl.lit(1, pl.Int64).alias("delivered"),
        pl.col("delivery_minutes").cast(pl.Float64).alias("minutes"),
    )
    windows = {
        "1h": [pl.col("placed").sum().alias("restaurant_orders_1h")],
        "7d": [
            pl.col("delivered").sum().alias("restaurant_deliveries_7d"),
            pl.col("minutes").mean().alias("restaurant_minutes_mean_7d"),
        ],
    }
    rows = _rolled(pl.concat([placed, done]), "restaurant_id", windows)
    reference = restaurants.select(
        "restaurant_id",
        pl.col("cuisine").alias("restaurant_cuisine"),
        "restaurant_zone",
    ).unique("restaurant_id", keep="last")
    return rows.join(reference, on="restaurant_id", how="left")


def courier_features(orders: pl.DataFrame, couriers: pl.DataFrame) -> pl.DataFrame:
    """Courier rows at each order time of ``orders`` (which must hold the
    ``COURIER_LOOKBACK`` before each row)."""
    events = orders.select("courier_id", pl.col(TS).cast(UTC_TS))
    windows = {
        "1h": [pl.len().cast(pl.Int64).alias("courier_orders_1h")],
        "24h": [pl.len().cast(pl.Int64).alias("courier_orders_24h")],
    }
    rows = _rolled(events, "courier_id", windows)
    vehicle = couriers.select("courier_id", pl.col("vehicle").alias("courier_vehicle"))
    return rows.join(vehicle.unique("courier_id", keep="last"), on="courier_id", how="left")


def _changed(rows: pl.DataFrame, touched: pl.DataFrame, key: str, batch: ViewBatch, schema):
    """The rows of ``touched`` entities from their earliest new event on, stamped now."""
    return (
        rows.join(touched, on=key)
        .filter(pl.col(TS) >= pl.col("_first"))
        .with_columns(pl.lit(batch.created_at).cast(UTC_TS).alias(CREATED))
        .select([pl.col(c).cast(t) for c, t in schema.items()])
    )


def _restaurant_rows(batch: ViewBatch) -> pl.DataFrame:
    """Rows an orders batch (new orders) or a deliveries batch (new delivery minutes) changes."""
    if batch.rows.is_empty():
        return pl.DataFrame(schema=RESTAURANT_FEATURE_SCHEMA)
    if batch.dataset == "orders":
        new_orders, new_deliveries = batch.rows, None
        first = batch.rows[TS].min()
    else:
        new_orders, new_deliveries = None, batch.rows
        first = batch.rows["delivered_at"].min()
    since = first - RESTAURANT_LOOKBACK
    orders = batch.read("orders", since - DELIVERY_REACH)
    if new_orders is not None:
        orders = pl.concat([orders, new_orders], how="diagonal_relaxed")
    orders = orders.unique("order_id", keep="last", maintain_order=True)
    deliveries = batch.read("deliveries", since)
    if new_deliveries is not None:
        deliveries = pl.concat([deliveries, new_deliveries], how="diagonal_relaxed")
        changes = new_deliveries.join(orders.select("order_id", "restaurant_id"), on="order_id")
        changes = changes.select("restaurant_id", pl.col("delivered_at").alias(TS))
    else:
        changes = new_orders.select("restaurant_id", TS)
    deliveries = deliveries.unique("order_id", keep="last", maintain_order=True)
    touched = changes.group_by("restaurant_id").agg(pl.col(TS).min().alias("_first"))
    rows = restaurant_features(
        orders.join(touched, on="restaurant_id", how="semi"), deliveries, batch.read("restaurants")
    )
    return _changed(rows, touched, "restaurant_id", batch, RESTAURANT_FEATURE_SCHEMA)


def _courier_rows(batch: ViewBatch) -> pl.DataFrame:
    """Rows an orders batch changes."""
    new = batch.rows
    if new.is_empty():
        return pl.DataFrame(schema=COURIER_FEATURE_SCHEMA)
    history = batch.read("orders", new[TS].min() - COURIER_LOOKBACK)
    touched = new.group_by("courier_id").agg(pl.col(TS).min().alias("_first"))
    orders = (
        pl.concat([history, new], how="diagonal_relaxed")
        .unique("order_id", keep="last", maintain_order=True)
        .join(touched, on="courier_id", how="semi")
    )
    rows = courier_features(orders, batch.read("couriers"))
    return _changed(rows, touched, "courier_id", batch, COURIER_FEATURE_SCHEMA)


VIEWS = (
    View(
        RESTAURANT_VIEW,
        "restaurant_id",
        RESTAURANT_FEATURE_SCHEMA,
        ("orders", "deliveries"),
        _restaurant_rows,
        reads=("restaurants",),
        description="Kitchen load (orders in the last hour), mean delivery minutes over 7 days "
        "from deliveries known at the time, cuisine and zone: a file per orders or deliveries "
        "batch.",
    ),
    View(
        COURIER_VIEW,
        "courier_id",
        COURIER_FEATURE_SCHEMA,
        ("orders",),
        _courier_rows,
        reads=("couriers",),
        description="Courier load (orders in the last hour and day) and vehicle: a file per "
        "orders batch.",
    ),
)
