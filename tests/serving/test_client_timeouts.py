"""The TorchServe client's waits: a registration waits for a worker's start, other calls for an
answer (a fake session records each call's timeout; no TorchServe)."""

from pathlib import Path

from serving.client import Keys, TorchServeClient
from serving.config import ServingConfig


class _Answer:
    ok, status_code = True, 200

    def json(self) -> dict:
        return {"status": "ok"}


class _Session:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def request(self, method: str, url: str, **kwargs) -> _Answer:
        self.timeouts.append(kwargs["timeout"])
        return _Answer()


def test_registering_waits_for_the_workers_start_not_for_one_request(tmp_path: Path) -> None:
    """Loading a version's worker took 22 s on a busy 2-core host: a 30 s request timeout
    failed deployments whose worker would have answered."""
    config = ServingConfig.for_home(tmp_path, startup_timeout_s=120)
    session = _Session()
    client = TorchServeClient(config, keys=Keys("i", "m"), timeout=30.0, session=session)
    client.register("v0002")
    client.set_default("v0002")
    client.predict({"transaction_id": "t"})
    assert session.timeouts == [120, 30.0, 30.0]
