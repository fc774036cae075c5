"""The {{name}} use case's own tests: its declaration loads, its demo data is deterministic and
passes its contracts, and its features are point-in-time correct and incremental.

Run them with ``.venv/bin/python -m pytest <this folder>`` from the repository root.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from core.simulation import land
from core.usecase import active, load
from features.views import CREATED, TS, ViewBatch, views
from quality.contracts import run_contract
from quality.schema import schemas

ROOT = Path(__file__).resolve().parents[1]
USECASE = load(ROOT)
SIMULATOR = USECASE.module("simulator")
START = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=20)
SMALL = SIMULATOR.ScenarioConfig(seed=3, n_accounts=60, rows_per_batch=400, start=START)


def test_the_declaration_loads_and_is_the_active_use_case():
    assert active().root == ROOT
    assert set(USECASE.datasets) == set(schemas(USECASE))


def test_the_demo_data_is_deterministic_and_has_the_declared_schemas():
    one, two = SIMULATOR.Simulator(SMALL), SIMULATOR.Simulator(SMALL)
    for k in (0, 5):
        for name, frame in one.events(k).items():
            assert frame.equals(two.events(k)[name])
            assert frame.schema == pl.Schema(schemas(USECASE)[name])
    for name, frame in one.reference().items():
        assert frame.schema == pl.Schema(schemas(USECASE)[name])


def test_every_event_gets_exactly_one_outcome_within_the_label_maturity():
    sim = SIMULATOR.Simulator(SMALL)
    events = pl.concat([sim.events(k)[USECASE.request.dataset] for k in range(4)])
    later = USECASE.label_maturity // SMALL.batch_span + 1
    outcomes = pl.concat([sim.events(k)[USECASE.label.dataset] for k in range(4 + later)])
    joined = events.join(outcomes, on=USECASE.label.key, how="left")
    assert joined[USECASE.label.column].null_count() == 0
    assert outcomes[USECASE.label.key].is_unique().all()
    waited = joined[USECASE.label.time] - joined["event_timestamp"]
    assert (waited > timedelta(0)).all() and (waited <= USECASE.label_maturity).all()
    rate = joined[USECASE.label.column].mean()
    assert 0.01 < rate < 0.3, f"a positive rate of {rate:.3f} gives a model little to learn"


@pytest.mark.parametrize("dataset", ["events", "outcomes", "accounts"])
def test_the_demo_data_passes_its_contracts(tmp_path, dataset):
    sim = SIMULATOR.Simulator(SMALL)
    frame = {**sim.reference(), **sim.events(16)}[dataset]
    path = land(frame, tmp_path, dataset, "b000016")
    result = run_contract(dataset, path)
    assert result.passed, [c for c in result.checks if not c.passed]


def _view_rows(events: pl.DataFrame, history: pl.DataFrame, accounts, created) -> pl.DataFrame:
    def read(dataset, since=None, *, with_batch=False):
        if dataset == "accounts":
            return accounts
        return history if since is None else history.filter(pl.col(TS) >= since)

    view = next(iter(views(USECASE).values()))
    return view.compute(ViewBatch("events", events, created, read))


def test_features_are_point_in_time_and_incremental_batches_agree_with_one_pass():
    sim = SIMULATOR.Simulator(SMALL)
    accounts = sim.reference()["accounts"]
    first, second = (sim.events(k)["events"] for k in (0, 1))
    created = datetime(2030, 1, 1, tzinfo=UTC)
    whole = _view_rows(pl.concat([first, second]), first.clear(), accounts, created)
    step = pl.concat(
        [
            _view_rows(first, first.clear(), accounts, created),
            _view_rows(second, first, accounts, created),
        ]
    )
    keys = ["account_id", TS]
    assert step.sort(keys).equals(whole.sort(keys))
    # Brute force for a few rows: the 7-day count is the account's events in (t - 7 days, t].
    both = pl.concat([first, second])
    for row in whole.sample(20, seed=1).iter_rows(named=True):
        mine = both.filter(pl.col("account_id") == row["account_id"])
        window = mine.filter((pl.col(TS) > row[TS] - timedelta(days=7)) & (pl.col(TS) <= row[TS]))
        assert row["account_events_7d"] == window.height
        assert row[CREATED] == created


def test_a_late_event_recomputes_the_later_rows_of_its_account():
    sim = SIMULATOR.Simulator(SMALL)
    accounts = sim.reference()["accounts"]
    events = sim.events(2)["events"]
    late, rest = events.head(1), events.slice(1)
    rows = _view_rows(late, rest, accounts, datetime(2030, 1, 1, tzinfo=UTC))
    account, at = late["account_id"][0], late[TS][0]
    later = rest.filter((pl.col("account_id") == account) & (pl.col(TS) >= at))
    assert rows.height == later.select(TS).n_unique() + (0 if at in later[TS] else 1)
