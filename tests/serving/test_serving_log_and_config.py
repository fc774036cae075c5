"""The prediction log stays bounded and complete; config.properties locks TorchServe down."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.jsonutil import json_safe
from serving.config import ServingConfig, allowed_urls_pattern, render_properties
from serving.prediction_log import PredictionLog, closed_files, json_line, read_records
from tests.serving.jsonvalues import typed


def test_log_rotates_by_size_and_keeps_the_directory_bounded(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, max_file_bytes=2_000, max_total_bytes=6_000).start()
    for i in range(400):
        assert log.log({"i": i, "pad": "x" * 40})
    log.close()
    files = closed_files(tmp_path)
    assert len(files) >= 3
    assert sum(f.stat().st_size for f in files) <= 6_000
    kept = [r["i"] for r in read_records(tmp_path)]
    assert kept == list(range(kept[0], 400))  # the oldest went, the newest are all there
    assert not list(tmp_path.glob(".*.open"))  # nothing left half-written


def test_a_full_queue_drops_records_instead_of_blocking(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, queue_size=5)  # writer not started: nothing drains
    started = time.perf_counter()
    accepted = sum(log.log({"i": i}) for i in range(50))
    assert time.perf_counter() - started < 0.5
    assert accepted == 5 and log.dropped == 45


def test_batches_are_bounded_in_records_and_written_in_order(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, queue_size=10)
    assert log.log_many([{"i": i} for i in range(4)]) == 4
    assert log.log_many([{"i": i} for i in range(4, 12)]) == 6  # room for 6 of 8
    assert not log.log({"i": 99}) and log.dropped == 3
    log.start().close()
    assert [r["i"] for r in read_records(tmp_path)] == list(range(10))
    log = PredictionLog(tmp_path / "again", queue_size=10).start()
    for k in range(30):  # the writer frees room as it writes
        log.log_many([{"i": 4 * k + i} for i in range(4)])
        time.sleep(0.002)
    log.close()
    written = [r["i"] for r in read_records(tmp_path / "again")]
    assert written == sorted(written) and len(written) + log.dropped == 120


@pytest.mark.parametrize(
    "record",
    [
        {"a": 1, "b": [1.5, None, "x"], "c": {"d": True, "e": "ü"}},
        {"nan": float("nan"), "inf": [float("-inf")], "nested": {"x": float("inf")}},
        {"np": np.float32(0.1), "i": np.int64(3), "f": np.float64(2.5), "b": np.bool_(True)},
        {"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "t": (1, 2)},
        {"features": {"amount": 12.0, "country": None, "ratio": float("nan")}},
    ],
)
def test_log_lines_are_what_json_safe_makes(record: dict) -> None:
    _assert_same_values(json_line(record), record)


def _assert_same_values(line: bytes, record: dict) -> None:
    reference = json.dumps(json_safe(dict(record)), separators=(",", ":"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one record, one line
    assert typed(json.loads(line)) == typed(json.loads(reference))


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities included
    | st.text(max_size=12)  # surrogates included
    | st.sampled_from([np.float32(0.1), np.float64(5.2e-05), np.int64(-3), np.bool_(False)])
    | st.datetimes(timezones=st.just(UTC))
)
_RECORDS = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        _SCALARS,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids),
        max_leaves=12,
    ),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(_RECORDS)
def test_log_lines_read_back_as_json_safe_values_whatever_the_record(record: dict) -> None:
    _assert_same_values(json_line(record), record)


def test_handler_records_take_orjson_and_non_ascii_is_counted_in_bytes(tmp_path: Path) -> None:
    record = {"features": {"ratio": 5.2e-05, "n": 3, "f": 1.0}, "note": "Zürich €"}
    assert json_line(record) == orjson.dumps(record) + b"\n"
    with PredictionLog(tmp_path, max_file_bytes=200, max_total_bytes=10_000) as log:
        for _ in range(6):
            log.log(record)
    assert all(f.stat().st_size <= 200 + len(json_line(record)) for f in closed_files(tmp_path))
    assert [r["note"] for r in read_records(tmp_path)] == ["Zürich €"] * 6


def test_a_file_left_open_by_a_dead_worker_is_published_by_the_next(tmp_path: Path) -> None:
    script = (
        "import os, time\n"
        "from serving.prediction_log import PredictionLog\n"
        f"log = PredictionLog({str(tmp_path)!r}, max_file_age_s=3600).start()\n"
        "log.log({'from': 'dead'}); time.sleep(1.5); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert not closed_files(tmp_path) and list(tmp_path.glob(".*.open"))
    with PredictionLog(tmp_path) as log:
        log.log({"from": "alive"})
    assert sorted(r["from"] for r in read_records(tmp_path)) == ["alive", "dead"]


@pytest.fixture
def config(tmp_path: Path) -> ServingConfig:
    return ServingConfig.for_home(
        tmp_path / "home", inference_port=9180, management_port=9181, metrics_port=9182
    )


def _props(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k: v.replace("\\\\", "\\") for k, v in pairs}


def test_properties_bind_loopback_keep_tokens_and_load_the_champion(config: ServingConfig) -> None:
    props = _props(render_properties(config, champion="v0003"))
    assert props["inference_address"] == "http://127.0.0.1:9180"
    assert props["management_address"] == "http://127.0.0.1:9181"
    assert props["metrics_address"] == "http://127.0.0.1:9182"
    assert props["disable_token_authorization"] == "false"
    # gRPC is unused; fixed ports (TorchServe's 7070/7071) would stop a second instance.
    assert props["grpc_inference_port"] == props["grpc_management_port"] == "0"
    assert props["enable_model_api"] == "true" and props["metrics_mode"] == "prometheus"
    assert props["load_models"] == "fraud-v0003.mar"
    assert (
        '"v0003":{"marName":"fraud-v0003.mar","batchSize":32,"maxBatchDelay":5' in props["models"]
    )
    assert "load_models" not in _props(render_properties(config))


def test_allowed_urls_admit_only_archives_in_the_model_store(config: ServingConfig) -> None:
    pattern = re.compile(allowed_urls_pattern(config.model_store))
    store = config.model_store.resolve()
    assert pattern.fullmatch(f"file://{store}/fraud-v0001.mar")
    assert not pattern.fullmatch(f"file://{store}/sub/fraud.mar")
    assert not pattern.fullmatch(f"file://{store}x/fraud.mar")
    assert not pattern.fullmatch("http://example.com/fraud.mar")
    assert not pattern.fullmatch(f"file://{store}/../evil.mar")


def test_invalid_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ports must differ"):
        ServingConfig.for_home(tmp_path, inference_port=9000, management_port=9000)
    with pytest.raises(ValueError, match="gRPC ports must differ"):
        ServingConfig.for_home(tmp_path, grpc_inference_port=8080)
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServingConfig.for_home(tmp_path, max_request_size=1000, max_body_bytes=2000)
    assert os.fspath(ServingConfig.for_home(tmp_path).key_file).endswith("serving/key_file.json")


def test_a_batch_logged_as_columns_reads_back_as_its_records(tmp_path: Path) -> None:
    """One line per scored batch (``log_rows``), one record per row on reading: the records
    the same batch gives through ``log_many``, NaN, NumPy values and datetimes included."""
    at = datetime(2026, 11, 24, 3, 0, 0, 123, tzinfo=UTC)
    txs = [
        {"transaction_id": f"t{i}", "card_id": f"c{i}", "amount": 10.0 + i, "timestamp": at}
        for i in range(3)
    ]
    shared = {"logged_at": at.isoformat(), "status": 200, "model_version": "v1"}
    rows = {
        "transaction_id": [t["transaction_id"] for t in txs],
        "request": txs,
        "features": {"ratio": [0.5, float("nan"), None], "country": ["US", None, "DE"]},
        "missing_features": [[], ["ratio"], ["ratio", "country"]],
        "fraud_probability": np.array([0.25, 0.5, float("inf")]),
    }
    per_row = [
        {
            **shared,
            "transaction_id": t["transaction_id"],
            "request": {**t, "timestamp": at.isoformat()},
            "features": {
                "ratio": rows["features"]["ratio"][i],
                "country": rows["features"]["country"][i],
            },
            "missing_features": rows["missing_features"][i],
            "fraud_probability": float(rows["fraud_probability"][i]),
        }
        for i, t in enumerate(txs)
    ]
    with PredictionLog(tmp_path / "rows") as log:
        assert log.log_rows(shared, rows, 3)
    with PredictionLog(tmp_path / "records") as log:
        assert log.log_many(per_row) == 3
    assert log.written == 3
    got = list(read_records(tmp_path / "rows"))
    assert got == list(read_records(tmp_path / "records"))
    assert got[1]["features"] == {"ratio": None, "country": None}  # NaN written as null
    assert got[2]["fraud_probability"] is None and got[0]["request"]["timestamp"] == at.isoformat()
    [line] = closed_files(tmp_path / "rows")[0].read_bytes().splitlines()
    assert json.loads(line)["rows"]["transaction_id"] == ["t0", "t1", "t2"]  # one line


def test_a_batch_line_orjson_refuses_takes_the_json_path(tmp_path: Path) -> None:
    from serving.prediction_log import batch_line, records_of

    rows = {"big": [2**70, 1], "x": np.array([np.nan, 1.5]), "f": {"v": [np.float32(0.5), None]}}
    records = list(records_of(json.loads(batch_line({"s": "ü"}, rows))))
    assert records == [
        {"s": "ü", "big": 2**70, "x": None, "f": {"v": 0.5}},
        {"s": "ü", "big": 1, "x": 1.5, "f": {"v": None}},
    ]


def test_batches_of_columns_are_logged_whole_or_dropped_whole(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, queue_size=10)  # writer not started: nothing drains
    assert log.log_rows({}, {"i": list(range(8))}, 8)
    assert not log.log_rows({}, {"i": [8, 9, 10]}, 3)  # room for 2 of 3: none taken
    assert log.log_rows({}, {"i": [8, 9]}, 2) and log.dropped == 3
    log.start().close()
    assert [r["i"] for r in read_records(tmp_path)] == list(range(10))
