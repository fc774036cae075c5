"""The TorchServe handler without TorchServe: its initialize/handle called as a worker would."""

from __future__ import annotations

import json
import math
import signal
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from ts.context import Context, RequestProcessor

from serving import handler as handler_module
from serving.archive import archive_version, build_archive, read_manifest
from serving.batch import score_frame
from serving.config import ServingConfig
from serving.faults import Faults
from serving.handler import HOME_ENV, LooplineHandler, _body_json
from serving.prediction_log import read_records
from serving.scoring import version_info
from tests.serving.kit import ServingHome


@pytest.fixture(scope="module")
def archive(serving_home: ServingHome, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ServingConfig.for_home(serving_home.home)
    record = serving_home.registry.get("v0001")
    info = version_info(serving_home.registry, "v0001")
    return build_archive(record.artifact_dir, config, version="v0001", info=info)


@pytest.fixture
def handler(
    serving_home: ServingHome, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LooplineHandler]:
    yield from _worker(archive, tmp_path, monkeypatch, str(serving_home.home))


def _worker(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: str
) -> Iterator[LooplineHandler]:
    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(model_dir)
    monkeypatch.setenv(HOME_ENV, home)
    manifest = read_manifest(archive)["manifest"]
    sigterm = signal.getsignal(signal.SIGTERM)
    h = LooplineHandler()
    h.initialize(Context("fraud", str(model_dir), manifest, 32, None, "0.12.0"))
    yield h
    h.log.close()
    signal.signal(signal.SIGTERM, sigterm)


def run_batch(h: LooplineHandler, bodies: list, explain: list[bool] | None = None):
    explain = explain or [False] * len(bodies)
    ctx = h.context
    ctx.request_processor = [RequestProcessor({"explain": str(e)}) for e in explain]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(bodies))}
    out = h.handle([{"body": b} for b in bodies], ctx)
    statuses = [ctx.get_response_status(i)[0] for i in range(len(bodies))]
    types = [ctx.get_response_content_type(i) for i in range(len(bodies))]
    return statuses, [json.loads(o) for o in out], types


def test_archive_carries_model_handler_and_serving_metadata(
    archive: Path, serving_home: ServingHome
) -> None:
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    assert {"model.pt", "model.json", "golden.json", "SHA256SUMS", "serving.json"} <= names
    assert "loopline_handler.py" in names
    meta = read_manifest(archive)
    assert meta["manifest"]["model"]["modelVersion"] == "v0001"
    assert meta["manifest"]["model"]["handler"] == "loopline_handler.py"
    assert meta["serving"]["feature_service"] == "fraud_model_v1"
    assert meta["serving"]["model_version"] == "v0001" and meta["serving"]["threshold"] == 0.5
    # One TorchServe serves every use case of a platform: the worker learns its own from here.
    assert Path(meta["serving"]["usecase"]).name == "fraud"
    assert Path(meta["serving"]["home"]) == serving_home.home.resolve()
    assert not [p for p in archive.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_batch_mixing_good_and_bad_requests_answers_each_on_its_own(
    handler: LooplineHandler, serving_home: ServingHome
) -> None:
    good = serving_home.requests(3)
    unknown = {**good[2], "transaction_id": "new-card", "card_id": "never-seen"}
    bodies = [
        json.dumps(good[0]).encode(),
        json.dumps([good[1], unknown]).encode(),
        b'{"transaction_id": ',
        json.dumps({**good[2], "amount": "lots"}).encode(),
        # Its offset pushes year 9999 past the calendar: once an OverflowError failing the batch.
        json.dumps({**good[0], "timestamp": "9999-12-31T23:59:59-23:59"}).encode(),
    ]
    statuses, answers, types = run_batch(handler, bodies)

    assert statuses == [200, 200, 400, 400, 400]
    assert types == ["application/json"] * 5
    assert answers[4]["field"] == "timestamp" and "out of range" in answers[4]["reason"]
    assert answers[0]["transaction_id"] == good[0]["transaction_id"]
    assert 0.0 < answers[0]["fraud_probability"] < 1.0
    assert answers[0]["decision"] in ("approve", "decline")
    assert answers[0]["model_version"] == "v0001"
    assert [a["transaction_id"] for a in answers[1]] == [good[1]["transaction_id"], "new-card"]
    fresh = answers[1][1]
    assert fresh["unknown_entities"] == ["card"]
    assert "card_amount_mean_30d" in fresh["missing_features"]
    assert 0.0 < fresh["fraud_probability"] < 1.0  # defaults, not an error
    assert "card" not in answers[1][0]["unknown_entities"]
    assert answers[2]["error"] == "invalid_json"
    assert answers[3] == {
        "error": "invalid_request",
        "reason": "amount must be a number, got str",
        "field": "amount",
    }


def test_handler_scores_equal_batch_scores_for_the_same_rows(
    handler: LooplineHandler, serving_home: ServingHome
) -> None:
    bodies = serving_home.requests(6, offset=20)
    _, answers, _ = run_batch(handler, [json.dumps(bodies[:2]), json.dumps(bodies[2:])])
    online = answers[0] + answers[1]
    record = serving_home.registry.get("v0001")
    batch = score_frame(
        record.artifact_dir,
        serving_home.home,
        pl.DataFrame(bodies),
        info=version_info(serving_home.registry, "v0001"),
    )
    assert batch["transaction_id"].to_list() == [a["transaction_id"] for a in online]
    assert batch["fraud_probability"].to_list() == pytest.approx(
        [a["fraud_probability"] for a in online], abs=1e-7
    )
    assert batch["missing_features"].to_list() == [a["missing_features"] for a in online]


def test_explanations_attribute_the_logit_to_every_feature(
    handler: LooplineHandler, serving_home: ServingHome
) -> None:
    body = serving_home.requests(1, offset=5)[0]
    statuses, answers, _ = run_batch(handler, [json.dumps(body), json.dumps(body)], [True, False])
    assert statuses == [200, 200]
    explained, plain = answers
    assert "explanation" not in plain
    detail = explained["explanation"]
    assert set(detail["attributions"]) == set(handler.scorer.preprocessor.spec.columns)
    p = explained["fraud_probability"]
    assert detail["logit"] == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
    total = detail["baseline_logit"] + sum(detail["attributions"].values())
    assert total == pytest.approx(detail["logit"], abs=abs(detail["convergence_delta"]) + 1e-4)
    # Same score; two rows of one CPU matmul may differ in the last bit, so not bitwise.
    assert explained["fraud_probability"] == pytest.approx(plain["fraud_probability"], abs=1e-6)


def test_every_request_lands_in_the_prediction_log(
    handler: LooplineHandler, serving_home: ServingHome
) -> None:
    good = serving_home.requests(2, offset=40)
    run_batch(handler, [json.dumps(good).encode(), b"not json"])
    handler.log.close()
    records = list(read_records(serving_home.home / "predictions" / "fraud"))
    scored = [r for r in records if r.get("transaction_id") in {g["transaction_id"] for g in good}]
    assert len(scored) == 2
    first = scored[0]
    assert first["model_version"] == "v0001" and first["status"] == 200
    assert set(first["features"]) == set(handler.scorer.preprocessor.spec.columns)
    assert first["request"]["card_id"] == good[0]["card_id"]
    assert 0.0 < first["fraud_probability"] < 1.0 and first["latency_ms"] > 0
    refused = [r for r in records if r["status"] == 400 and r["request_excerpt"] == "not json"]
    assert refused and refused[0]["error"]["error"] == "invalid_json"


def test_a_file_uri_home_is_the_home_not_a_folder_named_file(
    serving_home: ServingHome, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scale profile spells LOOPLINE_HOME as an fsspec URI (file:///...)."""
    monkeypatch.chdir(tmp_path)
    worker = _worker(archive, tmp_path, monkeypatch, serving_home.home.as_uri())
    h = next(worker)
    good = serving_home.requests(2, offset=60)
    statuses, answers, _ = run_batch(h, [json.dumps(good).encode()])
    next(worker, None)  # closes the log
    assert statuses == [200]
    records = list(read_records(serving_home.home / "predictions" / "fraud"))
    scored = [r for r in records if r.get("transaction_id") in {g["transaction_id"] for g in good}]
    assert len(scored) == 2 and not any(r["unknown_entities"] for r in scored)
    assert not (tmp_path / "file:").exists()


def test_answers_hold_the_values_json_dumps_would_write(
    handler: LooplineHandler, serving_home: ServingHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prediction bodies go out through orjson (decision 19): the same values and types as the
    ``json.dumps`` body they replace, read back by ``json.loads``; explanations keep json."""
    good = serving_home.requests(4, offset=50)
    bodies = [json.dumps(good[0]), json.dumps(good[1:3]), json.dumps(good[3])]
    explain = [False, False, True]
    fast = run_batch(handler, bodies, explain)
    ctx = handler.context
    raw = handler.handle([{"body": b} for b in bodies], ctx)
    assert [type(r) for r in raw] == [bytes, bytes, str]
    monkeypatch.setattr(
        "serving.handler._body_json", lambda answer: json.dumps(answer).encode("utf-8")
    )
    slow = run_batch(handler, bodies, explain)
    assert fast[0] == slow[0] == [200, 200, 200]
    assert fast[1] == slow[1]
    assert repr(fast[1]) == repr(slow[1])  # types too: floats stay floats


@pytest.mark.parametrize(
    "answer",
    [
        {"fraud_probability": 5.2e-05, "decision": "approve", "missing_features": []},
        [{"fraud_probability": 1e-300, "model_version": "v0001"}, {"fraud_probability": 1.0}],
        {"transaction_id": "tx-\u00e9\u4e2d", "unknown_entities": ["card", "merchant"]},
    ],
)
def test_orjson_bodies_read_back_as_json_dumps_does(answer) -> None:
    body = _body_json(answer)
    assert repr(json.loads(body)) == repr(json.loads(json.dumps(answer)))


def test_a_request_that_breaks_validation_fails_alone(
    handler: LooplineHandler, serving_home: ServingHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met while validating one request answers that request 500, with a JSON reason;
    the batch's other requests are scored."""
    good = serving_home.requests(2)
    real = handler_module.parse_request

    def parse(body, **kwargs):
        if b"boom" in body:
            raise RuntimeError("a validation bug")
        return real(body, **kwargs)

    monkeypatch.setattr(handler_module, "parse_request", parse)
    bodies = [json.dumps(good[0]).encode(), json.dumps({**good[1], "card_id": "boom"}).encode()]
    statuses, answers, _ = run_batch(handler, bodies)
    assert statuses == [200, 500]
    assert answers[0]["transaction_id"] == good[0]["transaction_id"]
    assert answers[1]["error"] == "internal_error" and "validat" in answers[1]["reason"]


def test_the_log_holds_the_age_of_the_online_rows_each_transaction_was_scored_with(
    handler: LooplineHandler, serving_home: ServingHome
) -> None:
    """``feature_age_s`` per scored row and view: the request's time minus the online row's
    event time (the newest feature row of its card or merchant, in the whole seconds the
    SQLite online store keeps), null for an unknown card."""
    good = serving_home.requests(3, offset=80)
    good[1] = {**good[1], "card_id": "never-seen"}
    run_batch(handler, [json.dumps(good).encode()])
    handler.log.close()
    records = {
        r["transaction_id"]: r
        for r in read_records(serving_home.home / "predictions" / "fraud")
        if r.get("status") == 200
    }
    features = serving_home.home / "features"
    newest = {
        view: pl.read_parquet(features / view / "*.parquet")
        .group_by(key)
        .agg(pl.col("event_timestamp").max())
        for view, key in (("card_stats_fv", "card_id"), ("merchant_stats_fv", "merchant_id"))
    }
    for body in good:
        ages = records[body["transaction_id"]]["feature_age_s"]
        assert set(ages) == {"card_stats_fv", "merchant_stats_fv"}
        at = datetime.fromisoformat(body["timestamp"])
        for view, key in (("card_stats_fv", "card_id"), ("merchant_stats_fv", "merchant_id")):
            row = newest[view].filter(pl.col(key) == body[key])
            if row.height == 0:
                assert ages[view] is None
                continue
            event = row["event_timestamp"][0].replace(microsecond=0)  # SQLite keeps seconds
            want = (at - event).total_seconds()
            assert ages[view] == pytest.approx(want, abs=1e-6) and ages[view] > 0
    assert records[good[1]["transaction_id"]]["feature_age_s"]["card_stats_fv"] is None


# Release drills (serving.faults): an archive that makes its worker slow or failing.


def test_faults_fail_every_nth_request_a_worker_receives_across_batches() -> None:
    slept: list[float] = []
    faults = Faults(delay_ms=20, error_every=3)
    failing = [faults.strike(size, sleep=slept.append) for size in (1, 1, 1, 4, 2)]
    # Requests 1..9 in batches of 1, 1, 1, 4, 2: the 3rd, 6th and 9th fail.
    assert failing == [set(), set(), {0}, {2}, {1}]
    assert slept == [0.02] * 5  # once per batch
    assert not Faults() and Faults(error_every=10) and Faults(delay_ms=1)
    assert Faults().strike(5, sleep=slept.append) == set() and len(slept) == 5


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"delay_ms": 50, "error_rate": 0.1}, "unknown faults \\['error_rate'\\]"),
        ({"delay_ms": -1}, "delay_ms must be finite and >= 0"),
        ({"delay_ms": "50"}, "delay_ms must be a number"),
        ({"error_every": 2.5}, "error_every must be an integer"),
        ({"error_every": -10}, "error_every must be >= 0"),
    ],
)
def test_a_faults_block_that_would_not_drill_what_it_says_is_refused(block, message) -> None:
    with pytest.raises(ValueError, match=message):
        Faults.from_dict(block)


def test_only_a_drill_archive_carries_faults_and_its_worker_is_slow_and_fails_every_nth(
    serving_home: ServingHome,
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    handler: LooplineHandler,
) -> None:
    assert "faults" not in read_manifest(archive)["serving"] and handler.faults is None
    config = ServingConfig.for_home(serving_home.home, serving_dir=tmp_path / "drill")
    drill = archive_version(
        serving_home.registry, "v0001", config, faults=Faults(delay_ms=40, error_every=2)
    )
    assert read_manifest(drill)["serving"]["faults"] == {"delay_ms": 40, "error_every": 2}
    worker = _worker(drill, tmp_path / "worker", monkeypatch, str(serving_home.home))
    h = next(worker)
    good = serving_home.requests(3, offset=100)
    began = time.perf_counter()
    statuses, answers, _ = run_batch(h, [json.dumps(r) for r in good])
    elapsed = time.perf_counter() - began
    next(worker, None)  # closes the log
    assert statuses == [200, 500, 200] and elapsed >= 0.04
    assert answers[0]["transaction_id"] == good[0]["transaction_id"]
    assert (
        answers[1]["error"] == "injected_fault" and "one request in 2 fails" in answers[1]["reason"]
    )
    records = read_records(serving_home.home / "predictions" / "fraud")
    failed = [r for r in records if r["status"] == 500 and r["error"]["error"] == "injected_fault"]
    assert [r["request_id"] for r in failed] == ["req-1"]
