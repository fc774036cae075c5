"""The Feast repo: declarations, apply-on-change, and the Feast CLI (apply, materialize, serve)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from feast import FeatureView, Field, FileSource
from feast.types import Float64, Int64, String

from features.declarations import HASH_TAG
from features.declarations import build_definitions as tagged_definitions
from features.store import REPO_DIR, apply_definitions, feature_store, online_features
from features.views import write_feature_file
from quality.schema import UTC_TS
from usecases.fraud.feature_repo.definitions import build_definitions
from usecases.fraud.features import (
    CARD_FEATURE_SCHEMA,
    CARD_VIEW,
    MERCHANT_FEATURE_SCHEMA,
    MERCHANT_VIEW,
)

FEAST = Path(sys.executable).parent / "feast"
POLARS_OF = {String: pl.String(), Int64: pl.Int64(), Float64: pl.Float64()}


def _declared(view: FeatureView) -> dict[str, pl.DataType]:
    entity_columns = {c.name: POLARS_OF[c.dtype] for c in view.entity_columns}
    return {**entity_columns, **{f.name: POLARS_OF[f.dtype] for f in view.features}}


def test_declarations_match_the_feature_files_they_read(tmp_path: Path) -> None:
    d = build_definitions(tmp_path)
    for view, schema in (
        (d.card_stats_fv, CARD_FEATURE_SCHEMA),
        (d.merchant_stats_fv, MERCHANT_FEATURE_SCHEMA),
    ):
        files = {
            k: v for k, v in schema.items() if k not in ("event_timestamp", "created_timestamp")
        }
        assert _declared(view) == files
        source = view.batch_source
        assert isinstance(source, FileSource)
        assert source.path == str(tmp_path.resolve() / "features" / view.name / "*.parquet")
        assert (source.timestamp_field, source.created_timestamp_column) == (
            "event_timestamp",
            "created_timestamp",
        )
        assert view.tags["owner"] == "loopline"
    assert (d.card.join_key, d.merchant.join_key) == ("card_id", "merchant_id")
    assert (d.card_stats_fv.ttl, d.merchant_stats_fv.ttl) == (timedelta(days=30), timedelta(days=7))
    names = [f.name for v in (d.card_stats_fv, d.merchant_stats_fv) for f in v.features]
    names += [f.name for f in d.transaction_request_fv.features]
    assert len(names) == len(set(names))  # unique across views: no prefixes needed in training
    assert set(d.transaction_request_fv.get_request_data_schema()) == {
        "amount",
        "country",
        "transaction_timestamp",
    }
    service = d.fraud_model_v1
    assert service.name == "fraud_model_v1" and service.tags["version"] == "1"
    assert [p.name for p in service.feature_view_projections] == [
        "card_stats_fv",
        "merchant_stats_fv",
        "transaction_request_fv",
    ]
    assert (REPO_DIR / ".feastignore").is_file()


def test_apply_definitions_applies_only_when_declarations_change(tmp_path: Path) -> None:
    store = feature_store(tmp_path / "home")
    assert apply_definitions(store) is True
    assert apply_definitions(store) is False
    assert {v.name for v in store.list_feature_views()} == {CARD_VIEW, MERCHANT_VIEW}
    assert store.get_feature_view(CARD_VIEW).ttl == timedelta(days=30)

    # An older declaration set: another view, and a service stamped with another hash.
    d = build_definitions(tmp_path / "home")
    old_view = FeatureView(
        name="old_fv",
        entities=[d.card],
        ttl=timedelta(days=1),
        schema=[Field(name="old_feature", dtype=Float64)],
        source=d.card_stats_source,
    )
    d.fraud_model_v1.tags[HASH_TAG] = "older"
    store.apply([old_view, d.fraud_model_v1])
    assert "old_fv" in {v.name for v in store.list_feature_views()}

    assert apply_definitions(store) is True
    assert {v.name for v in store.list_feature_views()} == {CARD_VIEW, MERCHANT_VIEW}
    applied = store.get_feature_service("fraud_model_v1")
    [service] = [o for o in tagged_definitions(tmp_path / "home") if o.name == "fraud_model_v1"]
    assert applied.tags[HASH_TAG] == service.tags[HASH_TAG]


def _recent_rows(now: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
    def row(schema: dict, key: str, entity: str, value: float) -> pl.DataFrame:
        values = {
            name: (3 if dtype == pl.Int64() else value if dtype == pl.Float64() else "GB")
            for name, dtype in schema.items()
        }
        values.update({key: entity, "event_timestamp": now - timedelta(hours=1)})
        values["created_timestamp"] = now - timedelta(minutes=30)
        return pl.DataFrame([values], schema=schema)

    return (
        row(CARD_FEATURE_SCHEMA, "card_id", "c1", 20.0),
        row(MERCHANT_FEATURE_SCHEMA, "merchant_id", "m1", 4.0),
    )


def _feast_cli(home: Path, *args: str) -> str:
    done = subprocess.run(
        [str(FEAST), *args],
        cwd=REPO_DIR,
        env={**os.environ, "LOOPLINE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_feast_cli_apply_and_materialize_incremental_on_the_repo(tmp_path: Path) -> None:
    home = (tmp_path / "home").resolve()
    now = datetime.now(UTC).replace(microsecond=0)
    cards, merchants = _recent_rows(now)
    write_feature_file(home, CARD_VIEW, "b1", cards)
    write_feature_file(home, MERCHANT_VIEW, "b1", merchants)

    applied = _feast_cli(home, "apply")
    assert "fraud_model_v1" in applied
    _feast_cli(home, "materialize-incremental", now.strftime("%Y-%m-%dT%H:%M:%S"))

    store = feature_store(home)
    assert apply_definitions(store) is False  # the CLI applied exactly what the library declares
    request = pl.DataFrame(
        {"card_id": ["c1"], "merchant_id": ["m1"], "amount": [50.0], "country": ["US"]}
    ).with_columns(pl.lit(now).cast(UTC_TS).alias("transaction_timestamp"))
    row = online_features(store, request, at=now).to_dicts()[0]
    assert row["card_amount_mean_30d"] == 20.0
    assert row["merchant_amount_sum_7d"] == 4.0
    assert row["tx_amount_to_card_mean_30d"] == 2.5
    assert row["tx_is_foreign"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_feast_serve_answers_with_the_feature_service(tmp_path: Path) -> None:
    home = (tmp_path / "home").resolve()
    now = datetime.now(UTC).replace(microsecond=0)
    cards, merchants = _recent_rows(now)
    write_feature_file(home, CARD_VIEW, "b1", cards)
    write_feature_file(home, MERCHANT_VIEW, "b1", merchants)
    store = feature_store(home)
    apply_definitions(store)
    store.materialize_incremental(end_date=now)

    port = _free_port()
    server = subprocess.Popen(
        [str(FEAST), "serve", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_DIR,
        env={**os.environ, "LOOPLINE_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the server and its workers stop together
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("feast serve did not come up")
                time.sleep(0.5)
        body = {
            "feature_service": "fraud_model_v1",
            "entities": {
                "card_id": ["c1"],
                "merchant_id": ["m1"],
                "amount": [10.0],
                "country": ["GB"],
                "transaction_timestamp": [now.isoformat()],
            },
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/get-online-features",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    values = dict(
        zip(
            answer["metadata"]["feature_names"],
            (r["values"][0] for r in answer["results"]),
            strict=True,
        )
    )
    assert values["card_amount_mean_30d"] == 20.0
    assert values["merchant_amount_sum_7d"] == 4.0
    assert values["tx_amount_to_card_mean_30d"] == 0.5
    assert values["tx_is_foreign"] is False
    assert values["tx_hour_of_day"] == now.hour
