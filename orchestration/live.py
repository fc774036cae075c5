"""The live demo loop: the use case's simulator, whose scenario can be switched while it runs,
and customer traffic that sends each landed request-dataset batch to the served model.

Plain Python (no Dagster): ``loopline run`` and ``loopline demo`` drive it beside the Dagster
daemon and TorchServe. ``loopline simulate --drift concept`` while it runs writes the control
file; the running simulator switches from its next whole window on, keeping the same seed and
clock. With a ``SimClock`` the history (whole windows up to the clock's start) is landed first,
in a few large files, and is not traffic; the live steps then follow the accelerated clock, so
a customer request carries a time near simulated now and is scored with fresh features.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from core import simulation
from core.storage import write_json_atomic
from core.usecase import active
from serving.client import TorchServeClient, TorchServeError
from serving.requests import RequestError, request_bodies

logger = logging.getLogger(__name__)
CONTROL_FILE = "simulator.json"
# What the running simulator switched to, and from which window (simulated time): written by it.
DRIFT_STATE_FILE = "simulator_drift.json"


def control_path(home: Path) -> Path:
    return Path(home) / CONTROL_FILE


def request_drift(home: Path, drift: str, strength: float | None = None) -> Path:
    """Ask the running simulator of ``home`` to switch to ``drift`` from its next batch, at
    ``strength`` (the scenario's ``drift_strength``; None keeps the running one)."""
    drifts = simulation.simulator_module().DRIFTS
    if drift not in drifts:
        raise ValueError(f"drift must be one of {drifts}")
    return write_json_atomic({"drift": drift, "strength": strength}, control_path(home))


def live_simulator_running(home: Path) -> bool:
    """Whether a ``loopline run``/``demo`` simulator is watching this home's control file."""
    try:
        state = json.loads((Path(home) / "simulator.pid").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


class LiveSimulator:
    """Lands one step at a time, re-reading the control file between steps."""

    def __init__(
        self,
        config: Any,
        landing: Path,
        home: Path,
        *,
        interval_s: float,
        fault: str | None = None,
        fault_batch: int | None = None,
        fmt: str = "parquet",
        on_batch: Callable[[simulation.LandedBatch], None] | None = None,
        hold_at_batch: int | None = None,
        clock: simulation.SimClock | None = None,
        history_files: int = 4,
    ) -> None:
        sim = simulation.simulator_module().Simulator(config)
        self.config = replace(config, start=sim.start)  # one clock across scenario switches
        self.sim = sim
        self.landing = Path(landing)
        self.home = Path(home)
        self.interval_s = interval_s
        self.fault, self.fault_batch = fault, fault_batch
        self.fmt = fmt
        self.on_batch = on_batch
        self.resume_at = None
        self.next_batch = 0
        self.drift = config.drift
        self.landed: list[simulation.LandedBatch] = []
        self.paused = threading.Event()
        self.hold_at_batch = hold_at_batch  # pause by itself before landing this batch
        self.retried: str | None = None  # the rejected run more data was released for
        self.clock = clock
        self.history_files = history_files
        self.live = clock is None  # False while history is landed: it is not traffic

    def _switch_if_asked(self) -> None:
        try:
            asked = json.loads(control_path(self.home).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        wanted = asked.get("drift", self.drift)
        strength = asked.get("strength") or self.config.drift_strength
        if wanted == self.drift and strength == self.config.drift_strength:
            return
        self.drift = wanted
        # Windows are generated whole: one partly landed keeps its scenario to its end.
        whole = self.resume_at is None or self.resume_at == self.sim.window(self.next_batch)[0]
        start = self.next_batch if whole else self.next_batch + 1
        try:
            config = replace(
                self.config, drift=wanted, drift_start_batch=start, drift_strength=strength
            )
        except ValueError as exc:  # a strength the scenario refuses: keep the one running
            logger.error("simulator: %s drift at strength %s refused: %s", wanted, strength, exc)
            return
        self.config = config
        self.sim = simulation.simulator_module().Simulator(self.config)
        logger.warning(
            "simulator: %s drift (strength %s) from batch %d on", wanted, strength, start
        )
        write_json_atomic(
            {
                "drift": wanted,
                "strength": strength,
                "from_batch": start,
                "from": self.sim.window(start)[0].isoformat(),
            },
            Path(self.home) / DRIFT_STATE_FILE,
        )

    def step(self, stop: threading.Event | None = None) -> list[simulation.LandedBatch]:
        self._switch_if_asked()
        fault = self.fault if self.fault_batch == self.next_batch else None
        kwargs = (
            {"resume_at": self.resume_at} if self.resume_at else {"start_batch": self.next_batch}
        )
        landed = simulation.run(
            self.config,
            self.landing,
            batches=1,
            fault=fault,
            fault_batch=self.next_batch if fault else None,
            fmt=self.fmt,
            on_batch=self.on_batch,
            stop=stop,
            land_reference=not self.landed,
            simulator=self.sim,
            clock=self.clock.now if self.clock is not None else None,
            **kwargs,
        )
        steps = [b for b in landed if b.batch_index >= 0]
        if steps:
            last = steps[-1]
            self.resume_at = last.window_end
            self.next_batch = self.sim.batch_at(last.window_end)
        self.landed += landed
        return landed

    def land_history(self) -> list[simulation.LandedBatch]:
        """Reference data, then every whole window before the clock's (still) time in
        ``history_files`` files per dataset; the live steps resume after them."""
        until = self.clock.now()
        landed = simulation.land_reference_data(self.sim, self.landing, self.fmt, self.on_batch)
        landed += simulation.land_history(
            self.sim,
            self.landing,
            until=until,
            files=self.history_files,
            fmt=self.fmt,
            on_batch=self.on_batch,
        )
        self.next_batch = max(0, self.sim.batch_at(until))
        self.resume_at = self.sim.window(self.next_batch)[0]
        self.landed += landed
        self.live = True
        return landed

    def run(self, stop: threading.Event) -> None:
        pid_file = self.home / "simulator.pid"
        write_json_atomic({"pid": os.getpid()}, pid_file)
        try:
            if self.clock is not None and not self.clock.started:
                self.land_history()
            while not stop.is_set():
                if self.hold_at_batch is not None and self.next_batch >= self.hold_at_batch:
                    self.hold_at_batch = None
                    self.paused.set()
                if not self.paused.is_set():
                    if self.clock is not None:
                        self.clock.start()  # the live phase begins with the first live step
                    self.step(stop)
                stop.wait(self.interval_s)
        finally:
            pid_file.unlink(missing_ok=True)


class Traffic:
    """Customer traffic: a sample of each landed request-dataset batch, scored online.

    ``submit`` reads the batch at once (the landing sensor moves the file soon after) and
    queues its requests; a background thread sends them, so landing never waits on serving.
    """

    def __init__(self, client: TorchServeClient, *, per_batch: int = 200, chunk: int = 32) -> None:
        self.client = client
        self.per_batch = per_batch
        self.chunk = chunk
        self.sent = 0
        self.failed = 0
        self.unserved = 0
        self._rng = random.Random(0)
        self._lock = threading.Lock()  # send() runs on the traffic thread and the caller's
        self._queue: queue.Queue[list[dict] | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def requests_of(self, path: Path) -> list[dict]:
        try:
            frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
        except Exception:  # a faulty batch is the pipeline's problem, not the customers'
            return []
        return self.requests_of_frame(frame)

    def requests_of_frame(self, frame: pl.DataFrame) -> list[dict]:
        """A sample of ``per_batch`` rows as scoring requests (none if columns miss)."""
        if frame.height > self.per_batch:
            frame = frame.sample(self.per_batch, seed=self._rng.randrange(1 << 30))
        try:
            return request_bodies(frame)
        except RequestError:  # a renamed column: the batch is the pipeline's problem
            return []

    def submit(self, batch: simulation.LandedBatch) -> None:
        """Queue a landed request-dataset batch's sample (dropped when the queue is full)."""
        if batch.dataset != active().request.dataset or batch.fault is not None:
            return
        requests = self.requests_of(batch.path)
        if requests:
            try:
                self._queue.put_nowait(requests)
            except queue.Full:
                self.unserved += len(requests)

    def send(self, requests: list[dict]) -> int:
        """Score requests in lists of ``chunk``; stops quietly while no model is served."""
        sent = 0
        for i in range(0, len(requests), self.chunk):
            part = requests[i : i + self.chunk]
            try:
                self.client.predict(part)
                sent += len(part)
            except TorchServeError as exc:
                if exc.status in (404, None) or "not found" in str(exc).lower():
                    with self._lock:
                        self.unserved += len(requests) - sent
                        self.sent += sent
                    return sent
                with self._lock:
                    self.failed += len(part)
                logger.warning("traffic: %s", exc)
        with self._lock:
            self.sent += sent
        return sent

    def _run(self) -> None:
        while (requests := self._queue.get()) is not None:
            self.send(requests)
