"""Key renewal decisions and bounded TorchServe output, without TorchServe (the e2e module
tests/e2e/test_unattended_serving_e2e.py runs both against a real one)."""

from __future__ import annotations

import json
import os
import threading
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serving.client import Keys
from serving.config import LOGS, ServingConfig, render_log_config
from serving.keys import key_expiry, renew_keys_if_due
from serving.output_log import bytes_on_disk, start_copier

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _key_file(path: Path, inference: datetime, management: datetime, n: int = 0) -> None:
    def entry(at: datetime) -> dict:
        return {
            "key": f"k{n}-{at:%H%M%S}",
            "expiration time": at.isoformat().replace("+00:00", "Z"),
        }

    data = {"management": entry(management), "inference": entry(inference), "API": {"key": "a"}}
    path.write_text(json.dumps(data, indent=2))


class _TokenApi:
    """TorchServe's token API as far as renewal sees it: a new key, a lifetime from now."""

    def __init__(self, config: ServingConfig) -> None:
        self.config, self.renewed = config, []

    def renew_key(self, api: str) -> Keys:
        self.renewed.append(api)
        data = json.loads(self.config.key_file.read_text())
        later = NOW + timedelta(minutes=self.config.token_expiration_min)
        data[api] = {"key": f"new-{api}", "expiration time": later.isoformat()}
        self.config.key_file.write_text(json.dumps(data))
        return Keys.read(self.config.key_file)


@pytest.fixture
def config(tmp_path: Path) -> ServingConfig:
    config = ServingConfig.for_home(tmp_path, token_expiration_min=60)
    config.serving_dir.mkdir(parents=True)
    return config


def test_a_key_is_renewed_once_half_its_lifetime_is_gone(config: ServingConfig) -> None:
    _key_file(config.key_file, NOW + timedelta(minutes=29), NOW + timedelta(minutes=31))
    api = _TokenApi(config)

    status = renew_keys_if_due(config, now=NOW, client=api)  # type: ignore[arg-type]

    assert status.renewed == ("inference",) and api.renewed == ["inference"]
    assert status.expires["inference"] == NOW + timedelta(minutes=60)
    assert status.expires["management"] == NOW + timedelta(minutes=31)
    assert key_expiry(config) == status.expires
    again = renew_keys_if_due(config, now=NOW, client=api)  # type: ignore[arg-type]
    assert again.renewed == () and api.renewed == ["inference"]  # a tick too many: nothing
    assert "expires" in again.describe()


def test_an_expired_key_is_renewed(config: ServingConfig) -> None:
    _key_file(config.key_file, NOW - timedelta(minutes=1), NOW - timedelta(seconds=1))
    api = _TokenApi(config)
    status = renew_keys_if_due(config, now=NOW, client=api)  # type: ignore[arg-type]
    assert status.renewed == ("inference", "management")
    assert all(at > NOW for at in status.expires.values())


def test_a_key_file_caught_mid_rewrite_is_read_again(config: ServingConfig) -> None:
    """TorchServe rewrites key_file.json in place when it renews a key."""
    config.key_file.write_text('{"management": {"key": "m')

    def finish() -> None:
        time.sleep(0.2)
        _key_file(config.key_file, NOW, NOW, n=7)

    writer = threading.Thread(target=finish)
    writer.start()
    keys = Keys.read(config.key_file)
    writer.join()
    assert keys.inference.startswith("k7") and keys.inference_expires == NOW


def test_torchserve_output_is_copied_into_size_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "torchserve.out"
    path.write_bytes(b"from an earlier start\n")
    copier, write_end = start_copier(path, max_bytes=4096, backups=2)
    lines = [f"line {i:05d} {'x' * 60}\n".encode() for i in range(3000)]  # about 220 KB
    with os.fdopen(write_end, "wb") as out:
        for line in lines:
            out.write(line)
    assert copier.wait(timeout=30) == 0  # the copier ends with its writer

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["torchserve.out", "torchserve.out.1", "torchserve.out.2"]
    assert bytes_on_disk(path) <= 3 * (4096 + (64 << 10))
    newest = Path(f"{path}.1").read_bytes() + path.read_bytes()
    assert newest.endswith(lines[-1])  # the newest output is kept


def test_torchserve_log4j_files_roll_by_size_and_keep_few(tmp_path: Path) -> None:
    config = ServingConfig.for_home(tmp_path, log_max_bytes=1 << 20, log_backups=4)
    root = ET.fromstring(render_log_config(config))
    rolling = root.findall("./Appenders/RollingFile")
    assert {r.get("name") for r in rolling} == set(LOGS)
    for appender in rolling:
        assert appender.get("filePattern").endswith(".%i.log.gz")  # an index: files roll by size
        assert appender.find("SizeBasedTriggeringPolicy").get("size") == str(1 << 20)
        assert appender.find("DefaultRolloverStrategy").get("max") == "4"
        assert appender.find("TimeBasedTriggeringPolicy") is None  # no file per day
    with pytest.raises(ValueError):
        ServingConfig.for_home(tmp_path, log_backups=0)
