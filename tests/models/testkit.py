"""Small synthetic training sets shaped like Loopline's training_set asset."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import polars as pl

from core.usecase import load
from models.spec import FeatureSpec, Slicing, TrainConfig

# The fraud demo's slices (country, merchant category, channel, amount bucket): these frames
# are shaped like its training sets.
SLICING = Slicing.of(load("fraud"))

SPEC = FeatureSpec(
    numeric=(
        "amount",
        "card_txn_count_24h",
        "card_amount_mean_7d",
        "amount_to_card_mean_ratio",
        "merchant_chargeback_rate_30d",
    ),
    categorical=("channel", "country", "merchant_category", "card_home_country"),
)
COUNTRIES = ("DE", "FR", "US", "GB", "NL")
CATEGORIES = ("grocery", "electronics", "travel", "gaming")
CHANNELS = ("web", "pos", "app")


def make_training_set(n: int = 3000, seed: int = 0, fraud_rate: float = 0.08) -> pl.DataFrame:
    """A small fraud-like training set: time-ordered splits, nulls, a learnable signal."""
    rng = np.random.default_rng(seed)
    country = rng.choice(COUNTRIES, n)
    home = np.where(rng.random(n) < 0.85, country, rng.choice(COUNTRIES, n))
    category = rng.choice(CATEGORIES, n)
    channel = rng.choice(CHANNELS, n)
    amount = np.round(np.exp(rng.normal(3.5, 1.5, n)), 2)
    mean_7d = np.exp(rng.normal(3.5, 0.8, n))
    ratio = amount / mean_7d
    chargeback = rng.beta(1, 30, n)
    count_24h = rng.poisson(3, n).astype(float)
    score = (
        1.2 * np.log1p(ratio)
        + 25 * chargeback
        + 1.5 * (home != country)
        + 1.0 * (category == "electronics")
        - 0.5 * (channel == "pos")
    )
    score += rng.normal(0, 0.5, n)
    label = (score > np.quantile(score, 1 - fraud_rate)).astype(np.int8)
    no_history = rng.random(n) < 0.1
    start = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    seconds = np.sort(rng.integers(0, 30 * 86400, n))
    split = np.where(
        np.arange(n) < int(0.7 * n),
        "train",
        np.where(np.arange(n) < int(0.85 * n), "validation", "test"),
    )
    return pl.DataFrame(
        {
            "transaction_id": [f"t{i:07d}" for i in range(n)],
            "card_id": [f"c{i % 500:05d}" for i in range(n)],
            "merchant_id": [f"m{i % 97:04d}" for i in range(n)],
            "event_timestamp": [start + dt.timedelta(seconds=int(s)) for s in seconds],
            "label": label,
            "split": split,
            "amount": amount,
            "channel": channel,
            "country": country,
            "card_txn_count_24h": np.where(no_history, np.nan, count_24h),
            "card_amount_mean_7d": np.where(no_history, np.nan, mean_7d),
            "amount_to_card_mean_ratio": np.where(no_history, np.nan, ratio),
            "merchant_chargeback_rate_30d": chargeback,
            "merchant_category": category,
            "card_home_country": home,
        }
    ).with_columns(
        pl.col("event_timestamp").cast(pl.Datetime("us", "UTC")),
        pl.col("label").cast(pl.Int8),
        pl.col("card_txn_count_24h", "card_amount_mean_7d", "amount_to_card_mean_ratio").fill_nan(
            None
        ),
    )


FAST = TrainConfig(epochs=8, batch_size=256, lr=5e-3, hidden=(32, 16), patience=3, device="cpu")
# The signal above is linear, so a trained network can only tie a trained logistic regression
# on it: tests that need a challenger better than the baseline train the baseline one epoch.
# The network against a fully trained baseline on simulated fraud: test_models_vs_baseline.
WEAK_BASELINE = replace(FAST, epochs=1)
