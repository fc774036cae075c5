"""Canonical schemas and vocabularies of the datasets that land in Loopline.

The simulator writes these, ingestion normalises to them, the contracts in
``quality/contracts/`` check them. One place, so the three cannot disagree.
"""

from __future__ import annotations

import polars as pl

UTC_TS = pl.Datetime("us", "UTC")

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "transactions": {
        "transaction_id": pl.String(),
        "card_id": pl.String(),
        "merchant_id": pl.String(),
        "amount": pl.Float64(),
        "channel": pl.String(),
        "country": pl.String(),
        "event_timestamp": UTC_TS,
    },
    "labels": {
        "transaction_id": pl.String(),
        "is_fraud": pl.Boolean(),
        "label_timestamp": UTC_TS,
    },
    "cards": {
        "card_id": pl.String(),
        "home_country": pl.String(),
        "spending_profile": pl.String(),
    },
    "merchants": {
        "merchant_id": pl.String(),
        "category": pl.String(),
        "country": pl.String(),
    },
}

DATASETS: tuple[str, ...] = tuple(SCHEMAS)

# Primary keys: never null, unique within a batch.
KEYS: dict[str, str] = {
    "transactions": "transaction_id",
    "labels": "transaction_id",
    "cards": "card_id",
    "merchants": "merchant_id",
}

# Event-time column per dataset (None for reference data).
TIME_COLUMNS: dict[str, str | None] = {
    "transactions": "event_timestamp",
    "labels": "label_timestamp",
    "cards": None,
    "merchants": None,
}

CHANNELS: tuple[str, ...] = ("pos", "contactless", "online")
COUNTRIES: tuple[str, ...] = (
    "US", "GB", "DE", "FR", "NL", "ES", "IT", "SE", "PL", "IE",
    "CA", "MX", "BR", "JP", "SG", "AU", "IN", "AE", "NG", "ZA",
)  # fmt: skip
MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery", "restaurants", "fuel", "travel", "electronics",
    "fashion", "digital_goods", "gambling", "pharmacy", "utilities",
)  # fmt: skip
SPENDING_PROFILES: tuple[str, ...] = ("low", "medium", "high")

AMOUNT_MIN = 0.01
AMOUNT_MAX = 50_000.0

# Columns whose distribution is profiled and compared per batch (distribution skew).
DRIFT_NUMERIC: dict[str, tuple[str, ...]] = {"transactions": ("amount", "hour_of_day")}
DRIFT_CATEGORICAL: dict[str, tuple[str, ...]] = {"transactions": ("channel", "country")}


def dataset_of(filename: str) -> str | None:
    """The dataset a landed file belongs to, from its name prefix (``transactions-*.parquet``)."""
    stem = filename.split("-", 1)[0].split(".", 1)[0].lower()
    return stem if stem in SCHEMAS else None
