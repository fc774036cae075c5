"""A flood of small landed files under the real Dagster daemon (decision 38): the landing sensor
asks one run per dataset for the files waiting at a tick, every batch still gets its own ledger
entry and verdict, and a training requested meanwhile starts within one run's length: ingest
runs take one slot at most and training goes first in the queue."""

from __future__ import annotations

import sqlite3
import time

import polars as pl
import pytest
import requests

from core import simulation
from core.settings import Settings
from orchestration.cli_loop import free_port
from orchestration.platform import start_dagster, stop
from quality.ledger import BatchLedger
from usecases.fraud import simulator

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FILES = 200


def _runs(settings: Settings) -> list[dict]:
    db = settings.dagster_home / "history" / "runs.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        rows = con.execute(
            "select run_id, pipeline_name job, status, start_time, end_time, "
            "strftime('%s', create_timestamp) created from runs"
        )
        return [dict(r) for r in rows]


def _wait(probe, timeout_s: float, what: str, log):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def test_a_flood_of_small_files_is_ingested_in_few_runs_and_never_holds_back_training(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LOOPLINE_USECASE", "fraud")
    monkeypatch.setenv("LOOPLINE_HOME", str(tmp_path / "home"))
    settings = Settings.from_env().ensure()
    port = free_port()
    sim = simulator.Simulator(
        simulator.ScenarioConfig(seed=3, n_cards=200, n_merchants=40, rows_per_batch=4 * FILES)
    )
    simulation.land(sim.cards(), settings.landing, "cards", "ref")
    simulation.land(sim.merchants(), settings.landing, "merchants", "ref")
    rows = pl.concat([sim.transactions(k) for k in range(4)]).head(FILES * 2)
    assert rows.height == FILES * 2 and rows["transaction_id"].n_unique() == rows.height
    proc = start_dagster(settings, port=port)
    log = settings.home / "dagster.log"
    try:
        from dagster_graphql import DagsterGraphQLClient

        graphql = DagsterGraphQLClient("127.0.0.1", port_number=port)

        def _up():
            try:
                return requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).ok
            except requests.RequestException:
                return False

        _wait(_up, 180, "the Dagster UI", log)
        _wait(
            lambda: len(BatchLedger(settings.ledger_path).batches(status="validated")) >= 2,
            180,
            "the reference data",
            log,
        )
        landed_at = time.time()
        for i in range(FILES):  # two rows apiece, as a chatty producer sends them
            simulation.land(rows[2 * i : 2 * i + 2], settings.landing, "transactions", f"f{i:04d}")
        _wait(
            lambda: any(
                r["job"] == "ingest" and float(r["created"]) >= int(landed_at)
                for r in _runs(settings)
            ),
            120,
            "the first ingest run",
            log,
        )
        # A person asks for a training while the flood is being ingested.
        asked = graphql.submit_job_execution(
            "training_job", run_config={"ops": {"candidate_model": {"config": {"epochs": 0}}}}
        )
        ledger = BatchLedger(settings.ledger_path)

        def _drained():
            txns = ledger.batches(dataset="transactions")
            return len(txns) == FILES and all(b.status == "validated" for b in txns)

        _wait(_drained, 600, f"{FILES} validated batches", log)
        drained_at = time.time()
        _wait(
            lambda: next(r for r in _runs(settings) if r["run_id"] == asked)["start_time"],
            300,
            "the training to start",
            log,
        )
        runs = _runs(settings)
        training = next(r for r in runs if r["run_id"] == asked)
    finally:
        stop(proc)

    ingest = [r for r in runs if r["job"] == "ingest" and float(r["created"]) >= int(landed_at)]
    lengths = [r["end_time"] - r["start_time"] for r in runs if r["end_time"] and r["start_time"]]
    # Every batch its own ledger entry and verdict, in a handful of runs, not one per file.
    assert len(ingest) <= 10, len(ingest)
    assert all(r["status"] == "SUCCESS" for r in ingest), ingest
    waited = training["start_time"] - float(training["created"])
    longest = max(lengths)
    # Queued behind at most one run (plus the daemon's polling), not behind the flood.
    assert waited <= longest + 15, (waited, longest, runs)
    rate = FILES / ((drained_at - landed_at) / 60)
    print(
        f"\n{FILES} files in {len(ingest)} runs: {rate:.0f} files/min; training waited "
        f"{waited:.1f} s (longest run {longest:.1f} s)"
    )
