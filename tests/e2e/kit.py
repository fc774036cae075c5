"""A serving home with TorchServe on free loopback ports, driven through the Dagster assets."""

import socket
from contextlib import ExitStack

import dagster as dg

from benchmarks.serving_home import UseCaseHome
from core.storage import write_parquet_atomic
from core.usecase import active
from orchestration.resources import LooplineStorage
from orchestration.serving_assets import TorchServeResource, deployment, model_archive
from tests.serving.kit import ServingHome, build_serving_home


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
    def __init__(
        self,
        root,
        home: ServingHome | UseCaseHome | None = None,
        seeds: tuple[int, ...] = (1, 2, 3),
    ):
        """TorchServe for ``home`` (the fraud kit's by default; any use case's from
        ``benchmarks.serving_home``), with models of ``seeds`` registered."""
        self.home = home or build_serving_home(root / "home", seed=5)
        self.versions = [self.home.register(seed=s) for s in seeds]
        # Replay falls back to recent validated requests while nothing is logged yet.
        write_parquet_atomic(
            self.home.request_rows.tail(300),
            self.home.home / "validated" / active().request.dataset / "recent.parquet",
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
        # These tests are about the release mechanics (traffic through a promotion, rollback,
        # reconcile): the kit's FAST 4-epoch models of other seeds differ by KS up to ~0.55 on
        # 64 scores, as a sound retrain of ~30 validation positives does. The shadow's
        # judgement has its own drill (test_release_integrity_e2e) and benchmark (bench_release).
        config = {"watch_seconds": 2.0, "replay_requests": 64, "min_score_ks": 0.8, **policy}
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
