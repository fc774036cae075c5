"""The {{name}} features: one view of account activity, computed per validated batch (``VIEWS``,
the contract of ``features.views``).

Rows are event-stamped: the row of account ``a`` stamped ``t`` describes the account right after
its events at ``t`` (they are included), from events at or before ``t`` only; every window is the
half-open interval ``(t - w, t]``. Serving looks up the newest row; training joins each event
as of just before its own time (``features.views.training_entities``), so both see the same
state. The event's own value and kind reach the model from the request (``model_inputs``), and
the request-time view in ``feature_repo/definitions.py`` derives more from it.

Incremental and correct for late data: a batch reads the ``LOOKBACK`` of history before its
earliest event and emits its accounts' rows from their earliest new event on. An event older
than rows already written changes those rows; they are emitted again with a later
``created_timestamp``, which the feature store prefers over the older version.

To add a feature: add its column to ``ACCOUNT_FEATURE_SCHEMA`` and its expression to
``_WINDOWS`` here, and its ``Field`` to ``ACCOUNT_FIELDS`` in ``feature_repo/definitions.py``.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from features.views import CREATED, TS, View, ViewBatch
from quality.schema import UTC_TS

LOOKBACK = timedelta(days=7)  # the longest window
ACCOUNT_VIEW = "account_stats_fv"

ACCOUNT_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "account_id": pl.String(),
    TS: UTC_TS,
    CREATED: UTC_TS,
    "account_events_24h": pl.Int64(),
    "account_events_7d": pl.Int64(),
    "account_value_mean_7d": pl.Float64(),
    "account_value_max_7d": pl.Float64(),
    "account_segment": pl.String(),
}
# Window -> aggregations over the account's events in (t - window, t].
_WINDOWS = {
    "24h": [pl.len().cast(pl.Int64).alias("account_events_24h")],
    "7d": [
        pl.len().cast(pl.Int64).alias("account_events_7d"),
        pl.col("value").mean().alias("account_value_mean_7d"),
        pl.col("value").max().alias("account_value_max_7d"),
    ],
}


def account_features(events: pl.DataFrame, accounts: pl.DataFrame) -> pl.DataFrame:
    """One row per (account_id, event time) of ``events``, which must hold every event of the
    ``LOOKBACK`` before each row; ``created_timestamp`` is left to the caller."""
    keys = ["account_id", TS]
    events = events.select("account_id", "value", pl.col(TS).cast(UTC_TS)).sort(keys)
    out = events.select(keys).unique(maintain_order=True)
    for period, aggs in _WINDOWS.items():
        rolled = (
            events.rolling(TS, period=period, closed="right", group_by="account_id")
            .agg(aggs)
            .unique(subset=keys, keep="first", maintain_order=True)
        )
        out = out.join(rolled, on=keys, how="left")
    segment = accounts.select("account_id", pl.col("segment").alias("account_segment"))
    return out.join(segment.unique("account_id", keep="last"), on="account_id", how="left")


def _account_rows(batch: ViewBatch) -> pl.DataFrame:
    """The rows one validated events batch adds or changes."""
    new = batch.rows
    if new.is_empty():
        return pl.DataFrame(schema=ACCOUNT_FEATURE_SCHEMA)
    history = batch.read("events", new[TS].min() - LOOKBACK)
    touched = new.group_by("account_id").agg(pl.col(TS).min().alias("_first"))
    both = (
        pl.concat([history, new], how="diagonal_relaxed")
        .unique("event_id", keep="last", maintain_order=True)
        .join(touched, on="account_id", how="semi")
    )
    rows = (
        account_features(both, batch.read("accounts"))
        .join(touched, on="account_id")
        .filter(pl.col(TS) >= pl.col("_first"))
        .with_columns(pl.lit(batch.created_at).cast(UTC_TS).alias(CREATED))
    )
    return rows.select([pl.col(c).cast(t) for c, t in ACCOUNT_FEATURE_SCHEMA.items()])


VIEWS = (
    View(
        ACCOUNT_VIEW,
        "account_id",
        ACCOUNT_FEATURE_SCHEMA,
        ("events",),
        _account_rows,
        reads=("accounts",),
        description="Account activity (24 h and 7 days) and segment: one file per events batch.",
    ),
)
