"""The live simulator switches scenario mid-run on request; traffic turns batches into requests."""

import threading
from datetime import UTC, datetime, timedelta

import polars as pl

from features import simulator
from orchestration.live import LiveSimulator, Traffic, live_simulator_running, request_drift
from serving.requests import validate_transaction

START = datetime(2026, 10, 5, tzinfo=UTC)  # a Monday, well in the past


def _config(**kw) -> simulator.ScenarioConfig:
    return simulator.ScenarioConfig(
        seed=4, n_cards=150, n_merchants=30, rows_per_batch=300, start=START, **kw
    )


def test_drift_requested_while_running_starts_at_the_next_batch(tmp_path):
    home, landing = tmp_path / "home", tmp_path / "home" / "landing"
    live = LiveSimulator(_config(), landing, home, interval_s=0)
    live.step()
    live.step()
    request_drift(home, "covariate")
    live.step()
    assert live.config.drift == "covariate" and live.config.drift_start_batch == 2
    names = sorted(p.name for p in landing.glob("transactions-*"))
    assert names == [f"transactions-b00000{k}.parquet" for k in range(3)]

    # Same clock and seed: the batches before the switch equal a plain run's; the one after
    # equals a run that drifted from batch 2 all along.
    plain = simulator.Simulator(_config())
    drifted = simulator.Simulator(_config(drift="covariate", drift_start_batch=2))
    for k, sim in ((0, plain), (1, plain), (2, drifted)):
        landed = pl.read_parquet(landing / f"transactions-b00000{k}.parquet")
        assert landed.equals(sim.transactions(k))
    assert not pl.read_parquet(landing / "transactions-b000002.parquet").equals(
        plain.transactions(2)
    )


def test_run_marks_the_home_as_having_a_live_simulator_while_it_runs(tmp_path):
    home = tmp_path / "home"
    live = LiveSimulator(_config(), home / "landing", home, interval_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=live.run, args=(stop,))
    thread.start()
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while len(live.landed) < 3 and datetime.now(UTC) < deadline:
            stop.wait(0.01)
        assert live_simulator_running(home)
    finally:
        stop.set()
        thread.join(10)
    assert not live_simulator_running(home)
    assert len(live.landed) >= 3  # reference files, then steps


class _Client:
    def __init__(self):
        self.calls = []

    def predict(self, payload, version=None, model=None):
        self.calls.append(payload)
        return [{"fraud_probability": 0.1} for _ in payload]


def test_traffic_sends_valid_requests_for_good_batches_only(tmp_path):
    landed = simulator.run(_config(), tmp_path, batches=2, fault="renamed_column", fault_batch=1)
    client = _Client()
    traffic = Traffic(client, per_batch=20, chunk=8)
    good = next(b for b in landed if b.dataset == "transactions" and b.fault is None)
    bad = next(b for b in landed if b.fault == "renamed_column")
    requests = traffic.requests_of(good.path)
    assert len(requests) == 20
    for r in requests:
        validate_transaction(r, index=0, now=datetime.now(UTC))
    assert traffic.send(requests) == 20
    assert [len(c) for c in client.calls] == [8, 8, 4]
    traffic.start()
    traffic.submit(bad)  # a faulty batch is not customer traffic
    traffic.stop()
    assert traffic.sent == 20 and len(client.calls) == 3
