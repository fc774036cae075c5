"""A real TorchServe left alone: its keys expire and are renewed, its logs stay bounded.

Keys live 15 s here (TorchServe takes fractions of a minute) so several lifetimes pass in well
under a minute; the platform's default is a week, renewed by the same code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import dagster as dg
import pytest
import requests

from orchestration.resources import LooplineStorage
from orchestration.serving_assets import TorchServeResource, torchserve_keys_sensor
from serving.client import Keys, TorchServeClient
from serving.config import LOGS, ServingConfig
from serving.keys import key_expiry
from serving.output_log import bytes_on_disk
from serving.process import OUTPUT_LOG, TorchServeProcess
from tests.e2e.kit import free_ports
from tests.serving.kit import ServingHome, build_serving_home

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY_MINUTES = 0.25
LOG_MAX_BYTES, LOG_BACKUPS = 16 << 10, 2


@dataclass
class Served:
    home: ServingHome
    config: ServingConfig
    storage: LooplineStorage
    torchserve: TorchServeResource

    def sensor_tick(self) -> str:
        """One tick of the orchestration's key sensor, as the Dagster daemon runs it."""
        resources = {"storage": self.storage, "torchserve": self.torchserve}
        with dg.build_sensor_context(resources=resources) as context:
            return torchserve_keys_sensor(context).skip_message


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = build_serving_home(tmp_path_factory.mktemp("unattended") / "home", seed=5)
    home.register(seed=1, champion=True)
    inference, management, metrics = free_ports(3)
    storage = LooplineStorage(home=str(home.home))
    torchserve = TorchServeResource(
        home=str(home.home),
        inference_port=inference,
        management_port=management,
        metrics_port=metrics,
    )
    config = replace(
        torchserve.serving_config(storage),
        token_expiration_min=KEY_MINUTES,
        log_max_bytes=LOG_MAX_BYTES,
        log_backups=LOG_BACKUPS,
    )
    process = TorchServeProcess(config, home.registry.path)
    try:
        process.start(timeout=180)
        yield Served(home, config, storage, torchserve)
    finally:
        process.stop()


def _raw(served: Served, method: str, base: str, path: str, key: str) -> requests.Response:
    """A call as any other client makes it: the key read from key_file.json."""
    headers = {"Authorization": f"Bearer {key}"}
    return requests.request(method, base + path, headers=headers, timeout=30)


def test_without_renewal_every_call_is_refused_once_the_keys_expire(served: Served) -> None:
    expiry = key_expiry(served.config)  # what `loopline status` shows
    assert set(expiry) == {"inference", "management"}
    wait = max(expiry.values()) - datetime.now(UTC)
    assert 0 < wait.total_seconds() <= KEY_MINUTES * 60
    time.sleep(wait.total_seconds() + 1.0)

    keys = Keys.read(served.config.key_file)
    ping = _raw(served, "GET", served.config.inference_url, "/ping", keys.inference)
    models = _raw(served, "GET", served.config.management_url, "/models", keys.management)
    assert ping.status_code == 400 and ping.json()["type"] == "InvalidKeyException"
    assert models.status_code == 400 and models.json()["type"] == "InvalidKeyException"
    assert not TorchServeClient(served.config).ping()

    # One tick of the sensor renews both expired keys: serving works again.
    assert "renewed inference and management key" in served.sensor_tick()
    assert TorchServeClient(served.config).ping()


def test_renewal_keeps_every_client_working_across_many_key_lifetimes(served: Served) -> None:
    long_lived = TorchServeClient(served.config)  # keeps the keys it read first
    assert long_lived.ping()
    bodies = served.home.requests(8)
    first = key_expiry(served.config)
    stop, ticks = threading.Event(), []

    def sensor() -> None:
        while not stop.wait(1.0):
            ticks.append(served.sensor_tick())

    renewer = threading.Thread(target=sensor, daemon=True)
    renewer.start()
    failures: list[str] = []
    calls = 0
    try:
        deadline = time.monotonic() + 2.5 * KEY_MINUTES * 60
        while time.monotonic() < deadline:
            try:
                assert long_lived.ping(), "ping refused"
                assert len(long_lived.predict(bodies)) == len(bodies)
                assert long_lived.versions() == {"v0001": True}
            except Exception as exc:  # noqa: BLE001 (every failure is reported below)
                failures.append(f"{time.monotonic():.1f}: {exc}")
            calls += 1
            time.sleep(0.2)
    finally:
        stop.set()
        renewer.join(10)
    assert failures == [] and calls > 20
    renewed = key_expiry(served.config)
    assert all(renewed[api] > first[api] for api in first)  # each key was renewed
    assert sum("renewed" in t for t in ticks) >= 3  # a renewal every half lifetime
    keys = Keys.read(served.config.key_file)  # a client reading the key file now gets in
    assert _raw(served, "GET", served.config.management_url, "/models", keys.management).ok


def test_torchserve_logs_stay_within_their_bound(served: Served) -> None:
    client = TorchServeClient(served.config)
    log_dir = served.config.log_dir
    bodies = served.home.requests(4)
    for _ in range(400):  # about 1 MB of TorchServe's own log lines
        client.predict(bodies)
        if bytes_on_disk(log_dir / OUTPUT_LOG) > 2 * LOG_MAX_BYTES and any(
            log_dir.glob("ts_log.*.log.gz")
        ):
            break
    client.ping()  # a last line after the loop, through the output copier
    time.sleep(1.0)
    largest = LOG_MAX_BYTES + (64 << 10)  # one write past the bound before a file rolls
    for family in [OUTPUT_LOG, *(f"{name}." for name in LOGS)]:
        files = [p for p in log_dir.glob(f"{family}*") if p.is_file()]
        assert len(files) <= LOG_BACKUPS + 1, sorted(p.name for p in files)
        assert all(p.stat().st_size <= largest for p in files), family
    assert (log_dir / f"{OUTPUT_LOG}.1").exists()  # it did roll: the bound was reached
    assert any(log_dir.glob("ts_log.*.log.gz"))
