"""Landing -> raw -> validated through the real sensor and assets, in a temp Loopline home."""

import json
from datetime import timedelta

import dagster as dg
import polars as pl
import pytest

from core import simulation
from quality.ledger import BatchLedger
from usecases.fraud import simulator


def _landed_rows(landed: list[simulation.LandedBatch], dataset: str) -> int:
    """Rows in the files landed for ``dataset`` (an empty file holds none; a copy adds none)."""
    return sum(
        b.rows
        for b in landed
        if b.dataset == dataset and b.fault not in ("duplicate", "empty_file")
    )


def test_good_batches_are_validated_and_a_bad_one_is_quarantined_with_its_reason(
    platform, small_scenario
):
    landed = platform.land(small_scenario, batches=4, fault="renamed_column", fault_batch=2)
    outcomes = platform.ingest_all()

    ledger = BatchLedger(platform.settings.ledger_path)
    txns = {b.source_name: b for b in ledger.batches(dataset="transactions")}
    assert len(txns) == 4
    bad = txns["transactions-b000002.parquet"]
    assert bad.status == "quarantined"
    assert "missing column" in bad.reason and "unexpected column" in bad.reason
    assert all(b.status == "validated" for n, b in txns.items() if n != bad.source_name)

    # The run holding the quarantined batch is red and names it; the others are green, and
    # the good batches beside it kept flowing (above). One run per tick (decision 38).
    def batches(o):
        ops = o.dagster_run.run_config["ops"]
        return ops.get("ingest_transactions_batches", {}).get("config", {}).get("batch_ids", [])

    [red] = [o for o in outcomes if bad.batch_id in batches(o)]
    assert not red.success and len(batches(red)) == 4
    [failure] = red.get_step_failure_events()
    assert f"batch {bad.batch_id} quarantined: " in failure.step_failure_data.error.to_string()
    assert sum(o.success for o in outcomes) == len(outcomes) - 1

    # The file and its reason are kept in quarantine; nothing is left in the landing folder.
    reason = json.loads(
        (platform.settings.quarantine / "transactions" / bad.batch_id / "reason.json").read_text()
    )
    assert any("missing column" in r for r in reason["reasons"])
    assert not list(platform.settings.landing.glob("*.parquet"))

    # Validated files hold exactly the good rows.
    good_rows = pl.read_parquet(platform.settings.validated / "transactions" / "*.parquet").height
    assert good_rows == _landed_rows(landed, "transactions") - bad.rows


def test_ledger_reconciles_every_landed_row_across_every_fault(platform, small_scenario):
    faults = ["missing_column", "wrong_dtype", "null_keys", "out_of_range", "empty_file"]
    landed = platform.land(small_scenario, batches=1)
    for k, fault in enumerate(faults, start=1):
        landed += platform.land(
            small_scenario,
            batches=1,
            start_batch=k,
            fault=fault,
            fault_batch=k,
            land_reference=False,
        )
    platform.ingest_all()

    ledger = BatchLedger(platform.settings.ledger_path)
    summary = ledger.summary()["transactions"]
    assert summary.get("validated_batches") == 1
    assert summary.get("quarantined_batches") == len(faults)
    assert summary.get("received_batches") is None and summary.get("stored_batches") is None
    # Every input row is either validated or quarantined: none lost, none doubled.
    assert summary["validated_rows"] + summary["quarantined_rows"] == _landed_rows(
        landed, "transactions"
    )
    reasons = {b.source_name: b.reason for b in ledger.batches(status="quarantined")}
    assert "null keys" in reasons["transactions-b000003.parquet"]
    assert "invalid values" in reasons["transactions-b000004.parquet"]
    assert (
        "empty file" in reasons["transactions-b000005.parquet"]
        or "no rows" in (reasons["transactions-b000005.parquet"])
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_corrupt_file_is_quarantined_and_the_sensor_keeps_going(platform, small_scenario, fmt):
    platform.land(small_scenario, batches=2, fault="corrupt_file", fault_batch=0, fmt=fmt)
    platform.ingest_all()
    ledger = BatchLedger(platform.settings.ledger_path)
    txns = {b.source_name: b for b in ledger.batches(dataset="transactions")}
    corrupt = txns[f"transactions-b000000.{fmt}"]
    assert corrupt.status == "quarantined"
    assert "cannot read" in corrupt.reason
    assert txns[f"transactions-b000001.{fmt}"].status == "validated"
    assert (platform.settings.quarantine / "transactions" / corrupt.batch_id).is_dir()


def test_relanded_duplicate_is_recognised_and_never_counted_twice(platform, small_scenario):
    landed = platform.land(small_scenario, batches=2, fault="duplicate", fault_batch=1)
    assert sum(b.fault == "duplicate" for b in landed) == 1
    platform.ingest_all()
    # The same bytes landed again later, after the original was archived.
    original = next(b for b in landed if b.dataset == "transactions")
    again = platform.settings.landing / "transactions-late-copy.parquet"
    archived = next((platform.settings.archive / "transactions").glob(f"*{original.path.name}"))
    again.write_bytes(archived.read_bytes())
    platform.ingest_all()  # its run hashes it (the sensor reads no file): a duplicate

    ledger = BatchLedger(platform.settings.ledger_path)
    txns = ledger.batches(dataset="transactions")
    assert len([b for b in txns if b.status == "validated"]) == 2
    copies = [b for b in txns if b.status == "duplicate"]
    # The late copy, and one of the two files landed together (whichever the run took second).
    assert len(copies) == 2 and "transactions-late-copy.parquet" in {c.source_name for c in copies}
    assert all(c.reason.startswith("the same bytes as batch ") and c.rows is None for c in copies)
    originals = {b.batch_id for b in txns if b.status == "validated"}
    duplicates = [e for e in ledger.events() if e["event"] == "duplicate"]
    assert len([e for e in duplicates if e["batch_id"] in originals]) == 2
    assert not again.exists()
    assert len(list((platform.settings.archive / "duplicates").iterdir())) == 2
    validated = pl.read_parquet(platform.settings.validated / "transactions" / "*.parquet")
    assert validated.height == _landed_rows(landed, "transactions")


def test_unsafe_or_unknown_files_are_quarantined_not_crashing_the_sensor(platform, small_scenario):
    platform.land(small_scenario, batches=1)
    (platform.settings.landing / "notes.txt").write_text("hello")
    (platform.settings.landing / "payments-x.parquet").write_bytes(b"PAR1 payments")
    (platform.settings.landing / "transactions x;rm.parquet").write_bytes(b"PAR1 unsafe")
    platform.ingest_all()
    ledger = BatchLedger(platform.settings.ledger_path)
    reasons = [b.reason for b in ledger.batches(status="quarantined")]
    assert any("unsupported file type" in r for r in reasons)
    assert any("unknown dataset" in r for r in reasons)
    assert any("unsafe file name" in r for r in reasons)
    assert ledger.batches(dataset="transactions", status="validated")
    assert not [p for p in platform.settings.landing.iterdir() if not p.name.startswith(".")]


def test_reference_profile_bootstraps_and_drift_is_a_warning_not_a_stop(platform):
    config = simulator.ScenarioConfig(seed=5, n_cards=200, n_merchants=40, rows_per_batch=400)
    platform.land(config, batches=4)
    platform.ingest_all()
    assert platform.settings.reference_profile_path("transactions").exists()

    drifted = simulator.ScenarioConfig(
        seed=5, n_cards=200, n_merchants=40, rows_per_batch=400, drift="covariate"
    )
    # Batch 5 (Tuesday 06:00-12:00 of the pinned history) is a daytime batch of ~440 rows.
    platform.land(drifted, batches=1, start_batch=5, land_reference=False)
    outcomes = platform.ingest_all()
    assert outcomes and all(o.success for o in outcomes)
    checks = [
        e
        for o in outcomes
        for e in o.get_asset_check_evaluations()
        if e.check_name == "distribution_skew"
    ]
    assert len(checks) == 1
    skew = checks[0]
    assert skew.metadata["compared"].value is True, skew.metadata
    assert not skew.passed and skew.severity.value == "WARN"
    assert skew.metadata["max_psi"].value > 0.2
    # The value skew also rides on the materialization, where the retraining sensor reads it.
    [materialization] = [
        e.event_specific_data.materialization
        for o in outcomes
        for e in o.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("validated_transactions")
    ]
    assert max(materialization.metadata["psi"].value.values()) > 0.2


def test_a_batch_of_part_of_a_day_is_not_skewed_for_its_hours(platform):
    config = simulator.ScenarioConfig(seed=5, n_cards=200, n_merchants=40, rows_per_batch=400)
    platform.land(config, batches=4)
    platform.ingest_all()
    # The same scenario cut into 3-hour batches: each holds a few hours of the day only.
    partial = simulator.ScenarioConfig(
        seed=5,
        n_cards=200,
        n_merchants=40,
        rows_per_batch=1500,
        batch_span=timedelta(hours=3),
        start=simulator.Simulator(config).start + timedelta(days=1, hours=12),
    )
    platform.land(partial, batches=1, land_reference=False)
    outcomes = platform.ingest_all()
    [skew] = [
        e
        for o in outcomes
        for e in o.get_asset_check_evaluations()
        if e.check_name == "distribution_skew"
    ]
    assert skew.metadata["compared"].value is True
    features = {f["feature"] for f in skew.metadata["drift"].value["features"]}
    assert "hour_of_day" not in features and "amount" in features


def test_the_micro_batch_window_holds_files_then_one_run_takes_them_all(
    platform, small_scenario, monkeypatch
):
    monkeypatch.setenv("LOOPLINE_INGEST_WINDOW_SECONDS", "3600")
    platform.land(small_scenario, batches=3)
    held = platform.tick()
    assert held.run_requests == []  # the oldest file has not waited an hour yet
    ledger = BatchLedger(platform.settings.ledger_path)
    assert {b.status for b in ledger.batches()} == {"received"}  # known, not lost
    monkeypatch.setenv("LOOPLINE_INGEST_WINDOW_SECONDS", "0")
    [run] = platform.tick().run_requests  # every dataset's waiting files in one run
    assert sorted(
        b for op in run.run_config["ops"].values() for b in op["config"]["batch_ids"]
    ) == sorted(b.batch_id for b in ledger.batches())
    assert all(o.success for o in platform.run_requests(dg.SensorResult(run_requests=[run])))
    assert {b.status for b in ledger.batches()} == {"validated"}
