"""Batch scoring: the offline (point-in-time) source agrees with the online one on fresh rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from models.artifact import save_training_result
from models.train import train_model
from serving.batch import score_version
from serving.requests import RequestError, validate_request
from serving.scoring import Scorer, version_info
from tests.serving.kit import FAST, ServingHome


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
    transactions = [validate_request(b, now=now) for b in bodies]
    columns = scorer.online_columns(transactions, at=now)
    frame = scorer.online_features(transactions, at=now)
    assert list(columns) == frame.columns
    assert pl.DataFrame(columns, schema=frame.schema).equals(frame)
    fast, reference = scorer.score(columns), scorer.score(frame)
    assert np.array_equal(fast.predictions, reference.predictions)
    assert fast.decisions == reference.decisions
    assert fast.missing_features == reference.missing_features
    assert fast.unknown_entities == reference.unknown_entities
    assert json.dumps(fast.inputs) == json.dumps(reference.inputs)  # NaN-aware, typed
    assert "card" in fast.unknown_entities[0] and "merchant" in fast.unknown_entities[-1]


def test_entity_features_the_model_does_not_take_still_flag_unknown_entities(
    serving_home: ServingHome, tmp_path: Path
) -> None:
    """Missing-feature flags come from the model's own inputs; an entity feature outside them
    is scanned apart, so an unknown entity is still named on both paths."""
    spec = serving_home.spec
    dropped = "card_home_country"
    assert dropped in spec.categorical
    reduced = type(spec)(
        numeric=spec.numeric, categorical=tuple(c for c in spec.categorical if c != dropped)
    )
    saved = save_training_result(
        train_model(serving_home.training_frame, reduced, FAST), tmp_path / "reduced"
    )
    info = version_info(serving_home.registry, "v0001")
    scorer = Scorer.load(saved.path, serving_home.home, info)
    assert dropped in scorer._others and dropped not in scorer.columns
    now = datetime.now(UTC)
    bodies = serving_home.requests(6, offset=70)
    bodies[2] = {**bodies[2], "card_id": "new-card"}
    transactions = [validate_request(b, now=now) for b in bodies]
    fast = scorer.score(scorer.online_columns(transactions, at=now))
    reference = scorer.score(scorer.online_features(transactions, at=now))
    assert fast.unknown_entities == reference.unknown_entities
    assert fast.missing_features == reference.missing_features
    assert fast.unknown_entities[2] == ["card"] and "card" not in fast.unknown_entities[0]
    assert dropped not in fast.missing_features[2]  # not a model input, so not "missing"


def test_a_transactions_frame_becomes_request_bodies_the_endpoint_accepts() -> None:
    from serving.requests import parse_request, request_bodies, request_schema
    from usecases.fraud.simulator import ScenarioConfig, Simulator

    sim = Simulator(
        ScenarioConfig(seed=5, rows_per_batch=50, start=datetime(2026, 1, 5, tzinfo=UTC))
    )
    frame = sim.transactions(0)  # the dataset's columns: event_timestamp, no timestamp
    bodies = request_bodies(frame)
    assert len(bodies) == frame.height and list(bodies[0]) == list(request_schema().fields)
    body = json.dumps(bodies).encode()
    parsed, single = parse_request(body, max_bytes=len(body), max_items=len(bodies))
    assert not single
    assert [t["transaction_id"] for t in parsed] == frame["transaction_id"].to_list()
    assert [t["timestamp"] for t in parsed] == frame["event_timestamp"].to_list()
    assert [t["amount"] for t in parsed] == frame["amount"].to_list()
    with pytest.raises(RequestError, match="lacks column"):
        request_bodies(frame.drop("country"))
