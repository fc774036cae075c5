"""A real TorchServe on loopback, serving the registry's champion through the Loopline handler."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import requests

from serving.archive import archive_version
from serving.batch import score_version
from serving.client import TorchServeClient, TorchServeError
from serving.config import ServingConfig
from serving.prediction_log import read_records
from serving.process import TorchServeProcess
from tests.e2e.kit import free_ports
from tests.serving.kit import ServingHome, build_serving_home

pytestmark = pytest.mark.e2e


@dataclass
class Server:
    home: ServingHome
    process: TorchServeProcess
    client: TorchServeClient

    @property
    def config(self) -> ServingConfig:
        return self.process.config

    def post(self, path: str, data: bytes, token: str | None = "inference") -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if token == "inference":
            headers["Authorization"] = f"Bearer {self.client.keys.inference}"
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(
            self.config.inference_url + path, data=data, headers=headers, timeout=30
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = build_serving_home(tmp_path_factory.mktemp("e2e") / "home", seed=5)
    home.register(seed=1, champion=True)
    inference, management, metrics = free_ports(3)
    config = ServingConfig.for_home(
        home.home,
        inference_port=inference,
        management_port=management,
        metrics_port=metrics,
        max_body_bytes=16 << 10,
        max_request_size=64 << 10,
    )
    process = TorchServeProcess(config, home.registry.path)
    try:
        process.start(timeout=180)
        yield Server(home, process, process.client())
    finally:
        process.stop()


def test_the_champion_is_served_and_online_scores_equal_batch_scores(server: Server) -> None:
    assert server.process.status().versions == {"v0001": True}
    bodies = server.home.requests(24)
    single = server.client.predict(bodies[0])
    listed = server.client.predict(bodies[1:8])
    with ThreadPoolExecutor(8) as pool:  # concurrent requests share dynamic batches
        concurrent = list(pool.map(server.client.predict, bodies[8:]))
    online = [single, *listed, *concurrent]
    batch = score_version(server.home.registry, "v0001", server.home.home, pl.DataFrame(bodies))

    assert [o["transaction_id"] for o in online] == batch["transaction_id"].to_list()
    # Equal to float32 rounding: the online rows were scored in dynamic batches of other sizes
    # than the file's, and the matrix multiply's summation order depends on the row count
    # (decision 19). The decisions must be the same.
    assert [o["fraud_probability"] for o in online] == pytest.approx(
        batch["fraud_probability"].to_list(), abs=1e-6
    )
    assert [o["decision"] for o in online] == batch["decision"].to_list()
    assert {o["model_version"] for o in online} == {"v0001"}


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b'{"transaction_id": "t1", "amount": ', 400, "invalid_json"),
        (json.dumps({"transaction_id": "t1"}).encode(), 400, "invalid_request"),
        ("mistyped", 400, "invalid_request"),
        ("oversize", 413, "payload_too_large"),
    ],
)
def test_bad_requests_get_4xx_with_a_json_reason(server: Server, body, status, error) -> None:
    good = server.home.requests(1)[0]
    if body == "mistyped":
        body = json.dumps({**good, "amount": "12.50"}).encode()
    elif body == "oversize":
        body = json.dumps([good] * 100).encode()  # > 16 KiB handler limit, < 64 KiB Netty limit
    response = server.post("/predictions/fraud", body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    reason = response.json()
    assert reason["error"] == error and reason["reason"]
    if body.startswith(b'{"transaction_id": "t1"}'):
        assert reason["field"] == "card_id"
    assert server.client.predict(good)["model_version"] == "v0001"  # still serving


def test_beyond_the_netty_limit_and_unknown_models_are_refused_and_the_server_lives(
    server: Server,
) -> None:
    huge = server.post("/predictions/fraud", b"[" + b" " * (128 << 10) + b"]")
    assert huge.status_code == 413  # Netty answers before any worker; it sends no body
    unknown = server.post("/predictions/no-such-model", json.dumps(server.home.requests(1)))
    assert unknown.status_code == 404
    assert unknown.json()["type"] == "ModelNotFoundException"
    missing_version = server.post("/predictions/fraud/v9999", json.dumps(server.home.requests(1)))
    assert missing_version.status_code == 404 and "message" in missing_version.json()
    assert server.client.ping()


def test_requests_without_the_right_token_are_refused(server: Server) -> None:
    body = json.dumps(server.home.requests(1)[0]).encode()
    for token in (None, "not-the-key", server.client.keys.management):
        response = server.post("/predictions/fraud", body, token=token)
        assert response.status_code in (400, 401, 403)
        assert response.json()["type"] == "InvalidKeyException"
    listing = requests.get(server.config.management_url + "/models", timeout=10)
    assert listing.status_code in (400, 401, 403)
    assert server.post("/predictions/fraud", body).status_code == 200


def test_explanations_endpoint_returns_attributions(server: Server) -> None:
    body = server.home.requests(1, offset=3)[0]
    explained = server.client.explain(body)
    attributions = explained["explanation"]["attributions"]
    assert explained["explanation"]["method"] == "integrated_gradients"
    assert set(attributions) == set(server.home.spec.columns)
    assert explained["fraud_probability"] == pytest.approx(
        server.client.predict(body)["fraud_probability"], abs=1e-9
    )


def test_a_second_version_answers_on_its_endpoint_then_set_default_switches(
    server: Server,
) -> None:
    v2 = server.home.register(seed=2)
    archive_version(server.home.registry, v2, server.config)
    server.client.register(v2)
    body = server.home.requests(1, offset=9)[0]

    assert server.client.versions() == {"v0001": True, v2: False}
    assert server.client.predict(body)["model_version"] == "v0001"
    on_v2 = server.client.predict(body, version=v2)
    assert on_v2["model_version"] == v2
    assert on_v2["fraud_probability"] != server.client.predict(body)["fraud_probability"]

    server.client.set_default(v2)
    assert server.client.predict(body)["model_version"] == v2
    assert server.client.predict(body, version="v0001")["model_version"] == "v0001"
    server.client.unregister("v0001")
    assert server.client.versions() == {v2: True}
    with pytest.raises(TorchServeError) as info:
        server.client.predict(body, version="v0001")
    assert info.value.status == 404


def test_metrics_are_scraped_and_stopping_publishes_the_prediction_log(server: Server) -> None:
    assert "ts_inference_requests_total" in server.client.metrics()
    assert server.process.stop()
    assert not server.process.status().running
    assert not server.config.key_file.exists()
    log_dir: Path = server.config.prediction_log_dir
    records = list(read_records(log_dir))
    assert not list(log_dir.glob(".*.open"))  # the worker closed its file on SIGTERM
    scored = [r for r in records if r["status"] == 200]
    assert {r["model_version"] for r in scored} >= {"v0001", "v0002"}
    assert any(r["status"] == 400 for r in records)
    with pytest.raises(TorchServeError):
        server.client.predict(server.home.requests(1)[0])
