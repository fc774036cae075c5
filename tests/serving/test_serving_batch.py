"""Batch scoring: the offline (point-in-time) source agrees with the online one on fresh rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from serving.batch import score_version
from serving.requests import RequestError, validate_transaction
from serving.scoring import Scorer, version_info
from tests.serving.kit import ServingHome


def test_offline_and_online_sources_agree_for_transactions_after_the_last_features(
    serving_home: ServingHome,
) -> None:
    now = datetime.now(UTC)
    rows = pl.DataFrame(serving_home.requests(30, offset=100)).with_columns(
        pl.lit(now.isoformat()).alias("timestamp")
    )
    online = score_version(serving_home.registry, "v0001", serving_home.home, rows, at=now)
    offline = score_version(
        serving_home.registry, "v0001", serving_home.home, rows, source="offline"
    )
    assert online["transaction_id"].to_list() == rows["transaction_id"].to_list()
    assert offline["fraud_probability"].to_list() == pytest.approx(
        online["fraud_probability"].to_list(), abs=1e-7
    )
    assert offline["missing_features"].to_list() == online["missing_features"].to_list()


def test_history_is_scored_point_in_time_and_bad_rows_are_named(
    serving_home: ServingHome,
) -> None:
    history = serving_home.transactions.slice(0, 50)  # the dataset's own column names
    scored = score_version(
        serving_home.registry, "v0001", serving_home.home, history, source="offline"
    )
    # The first transactions of the simulation had no earlier card activity to see.
    assert "card" in scored["unknown_entities"][0]
    assert scored.height == 50 and scored["fraud_probability"].is_between(0, 1).all()
    broken = history.with_columns(
        pl.when(pl.int_range(pl.len()) == 7)
        .then(pl.lit("fax"))
        .otherwise("channel")
        .alias("channel")
    )
    with pytest.raises(RequestError) as info:
        score_version(serving_home.registry, "v0001", serving_home.home, broken)
    assert info.value.index == 7 and info.value.field == "channel"


@pytest.mark.parametrize("n", [1, 5, 32])
def test_the_handlers_columns_score_exactly_as_a_frame_does(
    serving_home: ServingHome, n: int
) -> None:
    """The handler's path (``online_columns``, Python values into ``score``) against batch
    inference's (``online_features``, a frame): the same features, inputs, flags and bits."""
    now = datetime.now(UTC)
    info = version_info(serving_home.registry, "v0001")
    scorer = Scorer.load(serving_home.registry.get("v0001").artifact_dir, serving_home.home, info)
    bodies = serving_home.requests(n, offset=60)
    bodies[0] = {**bodies[0], "card_id": "new-card"}
    bodies[-1] = {**bodies[-1], "merchant_id": "new-merchant", "channel": "pos"}
    transactions = [validate_transaction(b, now=now) for b in bodies]
    columns = scorer.online_columns(transactions, at=now)
    frame = scorer.online_features(transactions, at=now)
    assert list(columns) == frame.columns
    assert pl.DataFrame(columns, schema=frame.schema).equals(frame)
    fast, reference = scorer.score(columns), scorer.score(frame)
    assert np.array_equal(fast.probabilities, reference.probabilities)
    assert fast.decisions == reference.decisions
    assert fast.missing_features == reference.missing_features
    assert fast.unknown_entities == reference.unknown_entities
    assert json.dumps(fast.inputs) == json.dumps(reference.inputs)  # NaN-aware, typed
    assert "card" in fast.unknown_entities[0] and "merchant" in fast.unknown_entities[-1]
