"""Helpers for orchestration tests: a temp Loopline home, the sensor, and its runs in-process."""

import builtins
import io
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import dagster as dg
import polars as pl
import pytest

from core import simulation
from core.settings import Settings
from orchestration import ingest_assets
from orchestration.resources import LooplineStorage
from usecases.fraud import simulator


class Platform:
    """A Loopline home with a Dagster instance; runs what the landing sensor asks.

    The instance is ephemeral (in-memory SQLite) unless ``on_disk``: the in-memory one is one
    shared connection, so a sensor tick on one thread while a run writes on another fails with
    "database table is locked" -- a test artefact the daemon, whose runs are other processes on
    a file-backed instance, never meets.
    """

    def __init__(self, home: Path, *, on_disk: bool = False) -> None:
        self.settings = Settings(home).ensure()
        self.storage = LooplineStorage(home=str(home))
        self.instance = (
            dg.DagsterInstance.local_temp(str(home / "dagster"))
            if on_disk
            else dg.DagsterInstance.ephemeral()
        )
        self.resources = {"storage": self.storage}

    def land(self, config: simulator.ScenarioConfig, **kwargs) -> list[simulation.LandedBatch]:
        return simulation.run(config, self.settings.landing, **kwargs)

    def tick(self) -> dg.SensorResult:
        """One landing-sensor evaluation, its dynamic partitions added as the daemon would.

        One ingest run takes the batches waiting at a tick (decision 38)."""
        context = dg.build_sensor_context(instance=self.instance, resources=self.resources)
        with files_opened() as opened:
            result = ingest_assets.landing_sensor(context)
        s = self.settings
        data = [str(d) for d in (s.landing, s.archive, s.quarantine, s.raw, s.validated)]
        read = [f for f in map(str, opened) if f.startswith(tuple(data))]
        assert not read, f"the landing sensor read file bodies: {read}"
        for request in result.dynamic_partitions_requests:
            self.instance.add_dynamic_partitions(
                request.partitions_def_name, list(request.partition_keys)
            )
        return result

    @staticmethod
    def batch_ids(result: dg.SensorResult) -> list[str]:
        """The landed batches the tick's ingest runs were asked to store and validate."""
        return [
            b
            for r in result.run_requests
            if r.job_name == ingest_assets.ingest_job.name
            for op in r.run_config["ops"].values()
            for b in op["config"]["batch_ids"]
        ]

    def run_requests(self, result: dg.SensorResult) -> list[dg.ExecuteInProcessResult]:
        """Execute each run request in-process, as the daemon would launch it."""
        outcomes = []
        for request in result.run_requests:
            job = request.job_name
            if job == ingest_assets.reference_profile_job.name:
                assets = [ingest_assets.reference_profile]
                outcomes.append(
                    dg.materialize(
                        assets,
                        instance=self.instance,
                        resources=self.resources,
                        raise_on_error=False,
                    )
                )
                continue
            outcomes.append(
                ingest_assets.ingest_job.execute_in_process(
                    run_config=request.run_config,
                    instance=self.instance,
                    resources=self.resources,
                    raise_on_error=False,
                    tags=request.tags,
                )
            )
        return outcomes

    def ingest_all(self) -> list[dg.ExecuteInProcessResult]:
        """Tick and run until the landing folder is drained."""
        outcomes: list[dg.ExecuteInProcessResult] = []
        for _ in range(5):
            result = self.tick()
            if not result.run_requests:
                break
            outcomes += self.run_requests(result)
        return outcomes


@contextmanager
def files_opened() -> Iterator[list]:
    """The files this thread opens for reading meanwhile, through Python or Polars (others
    are not seen: a run on another thread may read what it likes)."""
    opened: list = []
    me = threading.get_ident()

    def spy(real):
        def opening(file, *args, **kwargs):
            mode = args[0] if args else kwargs.get("mode", "r")
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            if threading.get_ident() == me and not writes:
                opened.append(file)
            return real(file, *args, **kwargs)

        return opening

    with ExitStack() as stack:
        for owner, name in [
            (builtins, "open"),
            (io, "open"),
            *((pl, n) for n in ("read_parquet", "read_csv", "scan_parquet", "scan_csv")),
        ]:
            stack.enter_context(mock.patch.object(owner, name, spy(getattr(owner, name))))
        yield opened


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    return Platform(tmp_path / "home")


@pytest.fixture
def small_scenario() -> simulator.ScenarioConfig:
    return simulator.ScenarioConfig(seed=3, n_cards=200, n_merchants=40, rows_per_batch=300)
