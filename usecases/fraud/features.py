"""The fraud demo's card and merchant features, with point-in-time semantics, computed
incrementally per batch (``VIEWS``, the contract of ``features.views``).

Feature rows are event-stamped: the row of card ``c`` stamped ``t`` describes the card right after
its transactions at ``t`` (they are included), built only from transactions at or before ``t``
and, for the chargeback rate, only from labels whose ``label_timestamp`` is at or before ``t``.
Every window is the half-open interval ``(t - w, t]``. There is one row per entity and
transaction time; transactions of one card at the same instant share it.

Serving looks up the latest row (the state after the card's last known transaction), so a
training row for a transaction at ``t`` must be joined as of just before ``t``:
``features.views.training_entities`` stamps each transaction ``t - 1 µs``. Its own amount, country and time reach
the model through the on-demand view ``transaction_request_fv``, in training and serving alike.

Incremental: a batch only needs the transactions of the ``LOOKBACK`` (30 days, the longest
window) before its earliest event, and emits only the rows it changes. Late events (older than
rows already written) and late labels also change already-written rows of the same entity within
the following 30 days; those rows are emitted again with a later ``created_timestamp``, which
both Feast and ``features.store.historical_features`` prefer over the older version.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from features.views import CREATED, TS, View, ViewBatch
from quality.schema import UTC_TS, schema

LOOKBACK = timedelta(days=30)
CARD_VIEW = "card_stats_fv"
MERCHANT_VIEW = "merchant_stats_fv"

CARD_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "card_id": pl.String(),
    TS: UTC_TS,
    CREATED: UTC_TS,
    "card_tx_count_1h": pl.Int64(),
    "card_tx_count_24h": pl.Int64(),
    "card_tx_count_7d": pl.Int64(),
    "card_amount_mean_7d": pl.Float64(),
    "card_amount_std_7d": pl.Float64(),
    "card_amount_max_7d": pl.Float64(),
    "card_amount_mean_30d": pl.Float64(),
    "card_amount_std_30d": pl.Float64(),
    "card_amount_max_30d": pl.Float64(),
    "card_distinct_merchants_24h": pl.Int64(),
    "card_distinct_countries_7d": pl.Int64(),
    "card_seconds_since_prev_tx": pl.Float64(),
    "card_home_country": pl.String(),
    "card_spending_profile": pl.String(),
}

MERCHANT_FEATURE_SCHEMA: dict[str, pl.DataType] = {
    "merchant_id": pl.String(),
    TS: UTC_TS,
    CREATED: UTC_TS,
    "merchant_tx_count_24h": pl.Int64(),
    "merchant_tx_count_7d": pl.Int64(),
    "merchant_amount_sum_24h": pl.Float64(),
    "merchant_amount_sum_7d": pl.Float64(),
    "merchant_labelled_count_30d": pl.Int64(),
    "merchant_fraud_count_30d": pl.Int64(),
    "merchant_chargeback_rate_30d": pl.Float64(),
    "merchant_category": pl.String(),
    "merchant_country": pl.String(),
}

FEATURE_SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    CARD_VIEW: CARD_FEATURE_SCHEMA,
    MERCHANT_VIEW: MERCHANT_FEATURE_SCHEMA,
}

_ANCHOR = {"event_timestamp": UTC_TS}


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return ts


def _seconds(d: pl.Expr) -> pl.Expr:
    return d.dt.total_microseconds().cast(pl.Float64) / 1e6


def _anchors_of(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return frame.select(pl.col(key), pl.col(TS).cast(UTC_TS)).unique()


def _later_rows_of_same_entity(
    late: pl.DataFrame, existing: pl.DataFrame, key: str, start: str, end: str
) -> pl.DataFrame:
    """Existing (entity, time) rows with start <= time < end for some interval in ``late``.

    Per entity, the furthest end among intervals starting at or before a row decides: an
    as-of join on the running maximum, so no entity's rows are paired with all its intervals.
    """
    if late.is_empty() or existing.is_empty():
        return pl.DataFrame(schema={key: pl.String(), **_ANCHOR})
    reach = (
        late.group_by(key, pl.col(start).alias("_from"))
        .agg(pl.col(end).max().alias("_until"))
        .sort(key, "_from")
        .with_columns(pl.col("_until").cum_max().over(key))
        .sort("_from")
    )
    return (
        _anchors_of(existing, key)
        .sort(TS)
        .join_asof(
            reach,
            left_on=TS,
            right_on="_from",
            by=key,
            strategy="backward",
            check_sortedness=False,
        )
        .filter(pl.col(TS) < pl.col("_until"))
        .select(key, TS)
    )


def history_start(
    new_transactions: pl.DataFrame, new_labels: pl.DataFrame | None = None
) -> datetime | None:
    """Earliest event time the history for a batch must reach back to (None for an empty batch).

    A batch can change rows at or after its earliest event (or label time), and such a row's
    windows reach back ``LOOKBACK``.
    """
    starts = [new_transactions[TS].min()] if not new_transactions.is_empty() else []
    if new_labels is not None and not new_labels.is_empty():
        starts.append(new_labels["label_timestamp"].min())
    return min(starts) - LOOKBACK if starts else None


def card_anchors(new_transactions: pl.DataFrame, history: pl.DataFrame) -> pl.DataFrame:
    """The (card_id, event_timestamp) rows a batch changes: its own, plus later rows of its cards
    within ``LOOKBACK`` of one of its events (only non-empty when events arrive late)."""
    own = _anchors_of(new_transactions, "card_id")
    late = new_transactions.select(
        "card_id", pl.col(TS).alias("_start"), (pl.col(TS) + LOOKBACK).alias("_end")
    )
    touched = _later_rows_of_same_entity(late, history, "card_id", "_start", "_end")
    return pl.concat([own, touched]).unique().sort("card_id", TS)


def merchant_anchors(
    new_transactions: pl.DataFrame,
    history: pl.DataFrame,
    new_labels: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The (merchant_id, event_timestamp) rows a batch of transactions and/or labels changes.

    A label for a transaction at ``e`` known at ``L`` enters the chargeback rate of the
    merchant's rows in ``[max(e, L), e + LOOKBACK)``; rows there that already exist are redone.
    """
    own = _anchors_of(new_transactions, "merchant_id")
    late = new_transactions.select(
        "merchant_id", pl.col(TS).alias("_start"), (pl.col(TS) + LOOKBACK).alias("_end")
    )
    parts = [own, _later_rows_of_same_entity(late, history, "merchant_id", "_start", "_end")]
    if new_labels is not None and not new_labels.is_empty():
        known = pl.concat([history, new_transactions], how="diagonal_relaxed")
        labelled = new_labels.join(
            known.select("transaction_id", "merchant_id", TS), on="transaction_id"
        ).select(
            "merchant_id",
            pl.max_horizontal(TS, "label_timestamp").alias("_start"),
            (pl.col(TS) + LOOKBACK).alias("_end"),
        )
        parts.append(_later_rows_of_same_entity(labelled, known, "merchant_id", "_start", "_end"))
    return pl.concat(parts).unique().sort("merchant_id", TS)


def _restrict(rows: pl.DataFrame, anchors: pl.DataFrame | None, key: str) -> pl.DataFrame:
    if anchors is None:
        return rows
    return rows.join(anchors.select(key, pl.col(TS).cast(UTC_TS)), on=[key, TS], how="semi")


def card_features(
    transactions: pl.DataFrame,
    cards: pl.DataFrame,
    *,
    created_at: datetime,
    anchors: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One card feature row per (card_id, event_timestamp) of ``transactions`` (or of ``anchors``).

    ``transactions`` must hold every transaction of the 30 days before each row it computes.
    Counts, means, maxima and distinct counts are over ``(t - w, t]``; the standard deviation is
    the sample one (null below two transactions); seconds since the previous transaction are 0
    when two share the instant ``t`` and null when the card had none in the previous 30 days.
    """
    created_at = _utc(created_at)
    tx = transactions.select(
        "transaction_id", "card_id", "merchant_id", "country", "amount", pl.col(TS).cast(UTC_TS)
    ).sort("card_id", TS, "transaction_id")
    windows = {
        "1h": [pl.len().cast(pl.Int64).alias("card_tx_count_1h")],
        "24h": [
            pl.len().cast(pl.Int64).alias("card_tx_count_24h"),
            pl.col("merchant_id").n_unique().cast(pl.Int64).alias("card_distinct_merchants_24h"),
        ],
        "7d": [
            pl.len().cast(pl.Int64).alias("card_tx_count_7d"),
            pl.col("amount").mean().alias("card_amount_mean_7d"),
            pl.col("amount").std().alias("card_amount_std_7d"),
            pl.col("amount").max().alias("card_amount_max_7d"),
            pl.col("country").n_unique().cast(pl.Int64).alias("card_distinct_countries_7d"),
        ],
        "30d": [
            pl.col("amount").mean().alias("card_amount_mean_30d"),
            pl.col("amount").std().alias("card_amount_std_30d"),
            pl.col("amount").max().alias("card_amount_max_30d"),
        ],
    }
    keys = ["card_id", TS]
    out = (
        tx.group_by(keys, maintain_order=True)
        .agg(pl.len().alias("_n"))
        .with_columns(_prev=pl.col(TS).shift(1).over("card_id"))
        .select(
            *keys,
            pl.when(pl.col("_n") > 1)
            .then(pl.lit(0.0))
            .when(pl.col(TS) - pl.col("_prev") < LOOKBACK)
            .then(_seconds(pl.col(TS) - pl.col("_prev")))
            .otherwise(None)
            .alias("card_seconds_since_prev_tx"),
        )
    )
    for period, aggs in windows.items():
        rolled = (
            tx.rolling(TS, period=period, closed="right", group_by="card_id")
            .agg(aggs)
            .unique(subset=keys, keep="first", maintain_order=True)
        )
        out = out.join(rolled, on=keys, how="left")
    profile = cards.select(
        "card_id",
        pl.col("home_country").alias("card_home_country"),
        pl.col("spending_profile").alias("card_spending_profile"),
    ).unique("card_id", keep="last", maintain_order=True)
    out = _restrict(out, anchors, "card_id").join(profile, on="card_id", how="left")
    return out.with_columns(pl.lit(created_at).cast(UTC_TS).alias(CREATED)).select(
        [pl.col(c).cast(t) for c, t in CARD_FEATURE_SCHEMA.items()]
    )


def _label_intervals(transactions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Per label, the anchor times ``[start, end)`` at which it is the known label of its
    transaction and the transaction is inside the 30-day window."""
    return (
        labels.select("transaction_id", "is_fraud", pl.col("label_timestamp").cast(UTC_TS))
        .unique(["transaction_id", "label_timestamp"], keep="last", maintain_order=True)
        .join(transactions.select("transaction_id", "merchant_id", TS), on="transaction_id")
        .sort("transaction_id", "label_timestamp")
        .with_columns(_next=pl.col("label_timestamp").shift(-1).over("transaction_id"))
        .with_columns(
            _start=pl.max_horizontal(TS, "label_timestamp"),
            _end=pl.when(pl.col("_next").is_null())
            .then(pl.col(TS) + LOOKBACK)
            .otherwise(pl.min_horizontal(pl.col(TS) + LOOKBACK, pl.max_horizontal(TS, "_next"))),
        )
        .filter(pl.col("_start") < pl.col("_end"))
    )


def _label_counts_at(anchors: pl.DataFrame, intervals: pl.DataFrame) -> pl.DataFrame:
    """Labelled and fraud counts active at each (merchant_id, event_timestamp) anchor."""
    fraud = pl.col("is_fraud").cast(pl.Int64)
    steps = (
        pl.concat(
            [
                intervals.select(
                    "merchant_id", pl.col("_start").alias("_at"), _l=pl.lit(1), _f=fraud
                ),
                intervals.select(
                    "merchant_id", pl.col("_end").alias("_at"), _l=pl.lit(-1), _f=-fraud
                ),
            ]
        )
        .group_by("merchant_id", "_at")
        .agg(pl.col("_l").sum(), pl.col("_f").sum())
        .sort("merchant_id", "_at")
        .with_columns(
            pl.col("_l").cum_sum().over("merchant_id").alias("merchant_labelled_count_30d"),
            pl.col("_f").cum_sum().over("merchant_id").alias("merchant_fraud_count_30d"),
        )
        .select("merchant_id", "_at", "merchant_labelled_count_30d", "merchant_fraud_count_30d")
        .sort("_at")
    )
    return (
        anchors.sort(TS)
        .join_asof(
            steps,
            left_on=TS,
            right_on="_at",
            by="merchant_id",
            strategy="backward",
            check_sortedness=False,
        )
        .drop("_at")
        .with_columns(
            pl.col("merchant_labelled_count_30d", "merchant_fraud_count_30d")
            .fill_null(0)
            .cast(pl.Int64)
        )
    )


def merchant_features(
    transactions: pl.DataFrame,
    labels: pl.DataFrame,
    merchants: pl.DataFrame,
    *,
    created_at: datetime,
    anchors: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One merchant feature row per (merchant_id, event_timestamp) of ``transactions`` (or anchors).

    Volume is the count and amount sum over ``(t - w, t]``. The chargeback rate at ``t`` is, over
    the merchant's transactions with event time in ``(t - 30d, t]`` whose label was known by
    ``t`` (``label_timestamp <= t``; the latest such label if corrected), the share labelled
    fraud; null when none is labelled yet. ``labels`` may hold labels of any time: those not yet
    known at ``t`` are ignored for the row at ``t``.
    """
    created_at = _utc(created_at)
    tx = transactions.select(
        "transaction_id", "merchant_id", "amount", pl.col(TS).cast(UTC_TS)
    ).sort("merchant_id", TS, "transaction_id")
    one = pl.col("_one")
    keys = ["merchant_id", TS]
    volume = (
        tx.with_columns(_one=pl.lit(1, dtype=pl.Int64))
        .with_columns(
            one.rolling_sum_by(TS, "24h", closed="right")
            .over("merchant_id")
            .alias("merchant_tx_count_24h"),
            one.rolling_sum_by(TS, "7d", closed="right")
            .over("merchant_id")
            .alias("merchant_tx_count_7d"),
            pl.col("amount")
            .rolling_sum_by(TS, "24h", closed="right")
            .over("merchant_id")
            .alias("merchant_amount_sum_24h"),
            pl.col("amount")
            .rolling_sum_by(TS, "7d", closed="right")
            .over("merchant_id")
            .alias("merchant_amount_sum_7d"),
        )
        .unique(subset=keys, keep="last", maintain_order=True)
        .drop("transaction_id", "amount", "_one")
    )
    volume = _restrict(volume, anchors, "merchant_id")
    counts = _label_counts_at(volume.select(keys), _label_intervals(tx, labels))
    reference = merchants.select(
        "merchant_id",
        pl.col("category").alias("merchant_category"),
        pl.col("country").alias("merchant_country"),
    ).unique("merchant_id", keep="last", maintain_order=True)
    out = (
        volume.join(counts, on=keys, how="left")
        .with_columns(
            pl.when(pl.col("merchant_labelled_count_30d") > 0)
            .then(pl.col("merchant_fraud_count_30d") / pl.col("merchant_labelled_count_30d"))
            .otherwise(None)
            .alias("merchant_chargeback_rate_30d"),
            pl.lit(created_at).cast(UTC_TS).alias(CREATED),
        )
        .join(reference, on="merchant_id", how="left")
    )
    return out.select([pl.col(c).cast(t) for c, t in MERCHANT_FEATURE_SCHEMA.items()])


def compute_card_features(
    new_transactions: pl.DataFrame,
    history: pl.DataFrame,
    cards: pl.DataFrame,
    created_at: datetime,
) -> pl.DataFrame:
    """Card feature rows a new batch adds or changes.

    ``history``: already ingested transactions with ``event_timestamp >= history_start(batch)``.
    """
    both = pl.concat([history, new_transactions], how="diagonal_relaxed").unique(
        "transaction_id", keep="last", maintain_order=True
    )
    anchors = card_anchors(new_transactions, history)
    return card_features(both, cards, created_at=created_at, anchors=anchors)


def compute_merchant_features(
    new_transactions: pl.DataFrame,
    history: pl.DataFrame,
    labels: pl.DataFrame,
    merchants: pl.DataFrame,
    created_at: datetime,
    new_labels: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Merchant feature rows a new batch of transactions and/or labels adds or changes.

    ``history`` as for ``compute_card_features`` (with ``new_labels`` passed to
    ``history_start``); ``labels``: every known label (new ones included) of those transactions.
    """
    both = pl.concat([history, new_transactions], how="diagonal_relaxed").unique(
        "transaction_id", keep="last", maintain_order=True
    )
    anchors = merchant_anchors(new_transactions, history, new_labels)
    return merchant_features(both, labels, merchants, created_at=created_at, anchors=anchors)


def _card_rows(batch: ViewBatch) -> pl.DataFrame:
    new_tx = batch.rows
    history = batch.read("transactions", history_start(new_tx, None))
    return compute_card_features(new_tx, history, batch.read("cards"), batch.created_at)


def _merchant_rows(batch: ViewBatch) -> pl.DataFrame:
    is_tx = batch.dataset == "transactions"
    new_tx = batch.rows if is_tx else pl.DataFrame(schema=schema("transactions"))
    new_labels = None if is_tx else batch.rows
    since = history_start(new_tx, new_labels)
    history = batch.read("transactions", since)
    labels = batch.read("labels", since, with_batch=True)
    return compute_merchant_features(
        new_tx, history, labels, batch.read("merchants"), batch.created_at, new_labels
    )


VIEWS = (
    View(
        CARD_VIEW,
        "card_id",
        CARD_FEATURE_SCHEMA,
        ("transactions",),
        _card_rows,
        reads=("cards",),
        description="Card activity features: one parquet file per validated transactions batch.",
    ),
    View(
        MERCHANT_VIEW,
        "merchant_id",
        MERCHANT_FEATURE_SCHEMA,
        ("transactions", "labels"),
        _merchant_rows,
        reads=("merchants",),
        description="Merchant volume and chargeback-rate features: one file per transactions or "
        "labels batch.",
    ),
)
