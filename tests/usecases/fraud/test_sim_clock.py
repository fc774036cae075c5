"""The demo world's accelerated clock, and history landed in bulk before it runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from core.simulation import SimClock, land_history
from usecases.fraud.simulator import ScenarioConfig, Simulator

WALL = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
HEADROOM = timedelta(days=10)


class _Timer:
    """A monotonic timer the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _clock(speed: float = 100.0) -> tuple[SimClock, _Timer]:
    timer = _Timer()
    return SimClock(speed, HEADROOM, wall=WALL, timer=timer), timer


def test_the_clock_stands_still_at_wall_minus_headroom_until_started() -> None:
    clock, timer = _clock()
    assert clock.now() == WALL - HEADROOM
    timer.t += 3600
    assert clock.now() == WALL - HEADROOM and not clock.started


def test_once_started_it_runs_speed_times_faster_than_the_wall_clock() -> None:
    clock, timer = _clock(speed=100.0)
    timer.t += 60  # a minute standing still
    clock.start()
    start = clock.now()
    timer.t += 36
    assert clock.now() - start == timedelta(hours=1)  # 36 wall seconds at 100x
    assert clock.wall_seconds_until(start + timedelta(hours=3)) == pytest.approx(72.0)


def test_it_catches_up_with_the_wall_clock_then_keeps_pace_never_ahead() -> None:
    clock, timer = _clock(speed=100.0)
    clock.start()
    lead = HEADROOM.total_seconds()
    seen = []
    for _ in range(400):
        timer.t += lead / 99 / 200  # through the catch-up point and past it
        now, wall = clock.now(), WALL + timedelta(seconds=timer.t - 1000.0)
        assert now <= wall
        seen.append(now)
    assert seen == sorted(seen)  # monotonic
    assert seen[-1] == WALL + timedelta(seconds=timer.t - 1000.0)  # caught up: wall time
    before = clock.now()
    timer.t += 10
    assert clock.now() - before == timedelta(seconds=10)  # then 1x


def test_the_clock_refuses_a_slower_than_real_speed_or_negative_headroom() -> None:
    with pytest.raises(ValueError, match="speed"):
        SimClock(0.5, HEADROOM)
    with pytest.raises(ValueError, match="headroom"):
        SimClock(10.0, -HEADROOM)


def test_history_is_landed_as_whole_windows_in_a_few_files(tmp_path: Path) -> None:
    config = ScenarioConfig(
        seed=3,
        n_cards=100,
        n_merchants=30,
        start=WALL - timedelta(days=6),
        batch_span=timedelta(hours=12),
        rows_per_batch=200,
    )
    sim = Simulator(config)
    until = WALL - timedelta(hours=5)  # inside window 11: windows 0-10 are whole
    landed = land_history(sim, tmp_path, until=until, files=3)
    transactions = [b for b in landed if b.dataset == "transactions"]
    assert [b.path.name for b in transactions] == [
        "transactions-b000000-b000003.parquet",
        "transactions-b000004-b000007.parquet",
        "transactions-b000008-b000010.parquet",
    ]
    txn = pl.concat(pl.read_parquet(b.path) for b in transactions)
    assert txn.equals(pl.concat(sim.transactions(k) for k in range(11)))
    labels = pl.concat(pl.read_parquet(b.path) for b in landed if b.dataset == "labels")
    assert labels.equals(pl.concat(sim.labels(k) for k in range(11)))
    assert labels["label_timestamp"].max() < sim.window(11)[0]  # only labels known by then
    assert landed[-1].window_end == sim.window(10)[1]
