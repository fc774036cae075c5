"""A serving home with TorchServe on free loopback ports, driven through the Dagster assets."""

import socket
from contextlib import ExitStack

import dagster as dg

from core.storage import write_parquet_atomic
from orchestration.resources import LooplineStorage
from orchestration.serving_assets import TorchServeResource, deployment, model_archive
from tests.serving.kit import build_serving_home


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def deploy(
    version: str, storage: LooplineStorage, torchserve: TorchServeResource, run_config: dict
) -> dict:
    """A registered ``version`` through the model_archive and deployment assets, as the
    training job hands it over; the delivery report."""

    @dg.asset(name="registered_model")
    def registered() -> str:
        return version

    result = dg.materialize(
        [registered, model_archive, deployment],
        resources={"storage": storage, "torchserve": torchserve},
        run_config=run_config,
    )
    if not result.success:
        raise RuntimeError(f"the deployment run of {version} failed")
    return result.output_for_node("deployment")


class Loop:
    def __init__(self, root):
        self.home = build_serving_home(root / "home", seed=5)
        self.versions = [self.home.register(seed=s) for s in (1, 2, 3)]
        # Replay falls back to recent validated transactions while nothing is logged yet.
        write_parquet_atomic(
            self.home.transactions.tail(300),
            self.home.home / "validated" / "transactions" / "recent.parquet",
        )
        inference, management, metrics = free_ports(3)
        self.storage = LooplineStorage(home=str(self.home.home))
        self.torchserve = TorchServeResource(
            home=str(self.home.home),
            inference_port=inference,
            management_port=management,
            metrics_port=metrics,
        )

    def deploy(self, version: str, **policy) -> dict:
        """``version`` through model_archive and deployment, as the gate had just passed it
        against the champion serving now."""
        if self.home.registry.get_alias("champion") != version:
            self.home.rejudge(version)
        config = {"watch_seconds": 2.0, "replay_requests": 64, **policy}
        return deploy(
            version,
            self.storage,
            self.torchserve,
            {"ops": {"deployment": {"config": config}}},
        )

    @property
    def client(self):
        return self.torchserve.process(self.storage).client()

    def stop(self):
        self.torchserve.process(self.storage).stop()
