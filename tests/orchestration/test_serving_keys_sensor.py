"""The key sensor ticks quietly when no TorchServe runs (the e2e module renews real keys)."""

import dagster as dg

from orchestration.resources import LooplineStorage
from orchestration.serving_assets import TorchServeResource, torchserve_keys_sensor


def test_the_key_sensor_skips_when_torchserve_is_not_running(tmp_path):
    resources = {
        "storage": LooplineStorage(home=str(tmp_path)),
        "torchserve": TorchServeResource(home=str(tmp_path)),
    }
    with dg.build_sensor_context(resources=resources) as context:
        result = torchserve_keys_sensor(context)
    assert result.skip_message == "TorchServe is not running"
    assert torchserve_keys_sensor.minimum_interval_seconds == 30
    assert torchserve_keys_sensor.default_status == dg.DefaultSensorStatus.RUNNING
