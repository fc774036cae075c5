"""A TorchServe that dies under `loopline run` comes back on its own, serving the champion."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from orchestration.supervise import KeepServing, read_restarts
from serving.config import ServingConfig
from serving.process import TorchServeProcess
from tests.e2e.kit import free_ports
from tests.serving.kit import build_serving_home

pytestmark = pytest.mark.e2e


def test_a_killed_torchserve_is_restarted_with_the_champion_and_alerts(tmp_path, caplog) -> None:
    home = build_serving_home(tmp_path / "home", seed=5)
    home.register(seed=1, champion=True)
    inference, management, metrics = free_ports(3)
    config = ServingConfig.for_home(
        home.home, inference_port=inference, management_port=management, metrics_port=metrics
    )
    process = TorchServeProcess(config, home.registry.path)
    keeper = KeepServing(process, every_s=0.5)
    caplog.set_level(logging.WARNING, logger="loopline.alerts")
    try:
        process.start(timeout=180)
        body, client = home.requests(1)[0], process.client()
        assert client.predict(body)["model_version"] == "v0001"
        keeper.start()
        pid = process.status().pid
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the OOM killer, a stray kill -9

        deadline = time.monotonic() + 240
        while not (keeper.restarts and process.status().healthy):
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(1)
        assert process.status().pid != pid
        # A client made before the restart re-reads the new keys once it is refused.
        assert client.predict(body)["model_version"] == "v0001"
        [window] = read_restarts(config.serving_dir)
        assert window["champion"] == "v0001" and window["down_at"] <= window["up_at"]
        assert any('"serving_restarted"' in r.getMessage() for r in caplog.records)
    finally:
        keeper.stop()
        process.stop()
    assert not process.status().running
    # Stopping it on purpose is not a death: nothing restarted it after keeper.stop().
    assert len(read_restarts(config.serving_dir)) == 1
