"""The live simulator switches scenario mid-run on request; traffic turns batches into requests."""

import threading
from datetime import UTC, datetime, timedelta

import polars as pl

from core import simulation
from orchestration.live import LiveSimulator, Traffic, live_simulator_running, request_drift
from serving.requests import validate_request
from usecases.fraud import simulator

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


def test_a_drift_asked_at_a_strength_lands_that_strength_and_a_refused_one_changes_nothing(
    tmp_path,
):
    home, landing = tmp_path / "home", tmp_path / "home" / "landing"
    live = LiveSimulator(_config(), landing, home, interval_s=0)
    live.step()
    request_drift(home, "concept", strength=2.0)  # concept strength is a share: <= 1
    live.step()
    assert live.config.drift == "none"
    request_drift(home, "covariate", strength=2.0)
    live.step()
    assert (live.config.drift, live.config.drift_strength) == ("covariate", 2.0)
    strong = simulator.Simulator(
        _config(drift="covariate", drift_start_batch=2, drift_strength=2.0)
    )
    assert pl.read_parquet(landing / "transactions-b000002.parquet").equals(strong.transactions(2))


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
    landed = simulation.run(_config(), tmp_path, batches=2, fault="renamed_column", fault_batch=1)
    client = _Client()
    traffic = Traffic(client, per_batch=20, chunk=8)
    good = next(b for b in landed if b.dataset == "transactions" and b.fault is None)
    bad = next(b for b in landed if b.fault == "renamed_column")
    requests = traffic.requests_of(good.path)
    assert len(requests) == 20
    for r in requests:
        validate_request(r, index=0, now=datetime.now(UTC))
    assert traffic.send(requests) == 20
    assert [len(c) for c in client.calls] == [8, 8, 4]
    traffic.start()
    traffic.submit(bad)  # a faulty batch is not customer traffic
    traffic.stop()
    assert traffic.sent == 20 and len(client.calls) == 3


class _Timer:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


WALL = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _clocked(tmp_path, timer, **kw):
    """A LiveSimulator on an accelerated clock (a simulated hour per wall second), with 10
    days of 12-hour windows of history before the clock's start."""
    clock = simulation.SimClock(3600.0, timedelta(days=20), wall=WALL, timer=timer)
    config = simulator.ScenarioConfig(
        seed=4,
        n_cards=150,
        n_merchants=30,
        rows_per_batch=300,
        batch_span=timedelta(hours=12),
        start=WALL - timedelta(days=30),
    )
    seen = []
    home = tmp_path / "home"
    live = LiveSimulator(
        config,
        home / "landing",
        home,
        interval_s=0,
        clock=clock,
        history_files=2,
        on_batch=lambda b: seen.append((b, live.live)),
        **kw,
    )
    return live, clock, seen, home


def test_history_lands_first_in_bulk_and_is_not_traffic_then_steps_follow_the_clock(tmp_path):
    timer = _Timer()
    live, clock, seen, _ = _clocked(tmp_path, timer)
    live.land_history()
    history = [b for b, is_live in seen if b.dataset == "transactions"]
    assert [b.path.name for b in history] == [
        "transactions-b000000-b000009.parquet",
        "transactions-b000010-b000019.parquet",
    ]
    assert not any(is_live for _, is_live in seen)  # history: no customer traffic
    assert history[-1].window_end == clock.now() == WALL - timedelta(days=20)

    clock.start()
    for _ in range(3):
        timer.t += 7.5  # 7.5 simulated hours a step
        live.step()
    steps = [b for b, is_live in seen if b.dataset == "transactions" and is_live]
    assert len(steps) == 3
    assert steps[-1].window_end == clock.now()  # traffic near simulated now
    times = pl.concat(pl.read_parquet(b.path) for b in steps)["event_timestamp"]
    assert times.min() >= history[-1].window_end and times.max() < clock.now()
    assert clock.now() - history[-1].window_end == timedelta(hours=22.5)
    now = clock.now()
    for r in Traffic(_Client(), per_batch=5).requests_of(steps[-1].path):
        t = validate_request(r, index=0, now=WALL)["timestamp"]
        assert steps[-1].window_start <= t < now  # requests carry simulated now


def test_drift_asked_mid_window_starts_at_the_next_whole_window(tmp_path):
    timer = _Timer()
    live, clock, _, home = _clocked(tmp_path, timer)
    live.land_history()
    clock.start()
    timer.t += 5  # 5 hours into window 20
    live.step()
    request_drift(home, "concept")
    timer.t += 10  # through the rest of window 20 and into 21
    live.step()
    live.step()
    assert live.config.drift == "concept" and live.config.drift_start_batch == 21
    plain = simulator.Simulator(live.config.__class__(**{**live.config.__dict__, "drift": "none"}))
    landed = pl.concat(
        pl.read_parquet(p) for p in sorted((home / "landing").glob("transactions-b000020-*"))
    )
    assert landed.equals(plain.transactions(20))  # the window begun before the switch: whole
    labels = pl.concat(pl.read_parquet(p) for p in (home / "landing").glob("labels-b00002*"))
    truth = pl.concat([plain.ground_truth(k) for k in range(15, 21)])
    joined = labels.join(truth, on="transaction_id")
    assert joined.height and (joined["is_fraud"] == joined["is_fraud_right"]).all()
