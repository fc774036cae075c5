"""Ingest under faults: a failing write, the same batch twice, a batch landing while its
predecessor's run is still going. Through the real landing sensor and ingest assets."""

from __future__ import annotations

import errno
import os
import threading

import polars as pl
import pytest

from core import simulation
from quality.ingest import batch_id_of
from quality.ledger import BatchLedger
from tests.orchestration.conftest import Platform
from tests.reliability.kit import leftover_temporaries
from usecases.fraud import simulator

CONFIG = simulator.ScenarioConfig(seed=7, n_cards=80, n_merchants=20, rows_per_batch=200)


@pytest.fixture
def platform(tmp_path) -> Platform:
    return Platform(tmp_path / "home")


def _land(platform: Platform, k: int, name: str | None = None) -> tuple[str, pl.DataFrame]:
    frame = simulator.Simulator(CONFIG).transactions(k)
    path = simulation.land(frame, platform.settings.landing, "transactions", name or f"b{k:06d}")
    return batch_id_of(path), frame


def _disk_full_after(nbytes: int):
    """A parquet writer that writes part of the file, then fails as a full disk does."""

    def write_parquet(self, file, *args, **kwargs):
        with open(file, "wb") as fh:
            fh.write(b"PAR1" + b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write_parquet


def _assert_no_half_files(platform: Platform) -> None:
    home = platform.settings.home
    assert leftover_temporaries(home) == []
    hidden = [p for p in home.rglob(".*.tmp")]
    assert hidden == []  # the atomic writer removed its temporary file when the write failed
    for folder in (platform.settings.raw, platform.settings.validated):
        for path in folder.rglob("*.parquet"):
            pl.read_parquet(path)  # every file under a final name is whole


def test_a_failed_write_is_retried_and_a_persistent_one_quarantines_never_half_written(
    platform, monkeypatch
):
    transient, transient_rows = _land(platform, 0)
    persistent, persistent_rows = _land(platform, 1)
    ledger = BatchLedger(platform.settings.ledger_path)

    with monkeypatch.context() as m:
        m.setattr(pl.DataFrame, "write_parquet", _disk_full_after(4096))
        outcomes = platform.run_requests(platform.tick())
    assert [o.success for o in outcomes] == [False]  # one run for both (decision 38)
    for batch in (transient, persistent):
        assert ledger.get(batch).status == "received"  # not lost: still landed, still known
        assert not platform.settings.raw_file("transactions", batch).exists()
    _assert_no_half_files(platform)

    # The disk has room again for one batch: its retry (a new run key) stores and validates it.
    retry = platform.tick()
    keys = sorted(r.run_key for r in retry.run_requests)
    assert keys == [f"transactions-{b}-attempt2" for b in sorted((transient, persistent))]
    original = pl.DataFrame.write_parquet

    def full_for_one(self, file, *args, **kwargs):
        if persistent in str(file):
            return _disk_full_after(100)(self, file, *args, **kwargs)
        return original(self, file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pl.DataFrame, "write_parquet", full_for_one)
        for _ in range(3):
            platform.run_requests(platform.tick())
    assert ledger.get(transient).status == "validated"
    stored = pl.read_parquet(platform.settings.validated_file("transactions", transient))
    assert stored.height == transient_rows.height

    # The other kept failing: after three runs it is quarantined with the disk's error.
    bad = ledger.get(persistent)
    assert bad.status == "quarantined"
    assert "ingest failed in 3 runs" in bad.reason and "No space left" in bad.reason
    kept = platform.settings.quarantine / "transactions" / persistent
    assert pl.read_parquet(next(kept.glob("*.parquet"))).height == persistent_rows.height
    assert not list(platform.settings.landing.glob("*.parquet"))
    assert platform.tick().run_requests == []
    _assert_no_half_files(platform)
    summary = ledger.summary()["transactions"]
    assert summary["validated_rows"] + summary["quarantined_rows"] == (
        transient_rows.height + persistent_rows.height
    )


def test_a_write_failing_in_the_validation_step_is_retried_after_the_file_left_landing(
    platform, monkeypatch
):
    batch, frame = _land(platform, 2)
    ledger = BatchLedger(platform.settings.ledger_path)
    original = pl.DataFrame.write_parquet
    validated_dir = str(platform.settings.validated)

    def fail_validated(self, file, *args, **kwargs):
        if str(file).startswith(validated_dir):
            return _disk_full_after(10)(self, file, *args, **kwargs)
        return original(self, file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pl.DataFrame, "write_parquet", fail_validated)
        [outcome] = platform.run_requests(platform.tick())
    assert not outcome.success
    assert ledger.get(batch).status == "stored"
    assert not list(platform.settings.landing.glob("*.parquet"))  # archived by the raw step
    _assert_no_half_files(platform)

    [retry] = platform.tick().run_requests
    assert retry.run_key == f"transactions-{batch}-attempt2"
    platform.run_requests(platform.tick())
    assert ledger.get(batch).status == "validated"
    assert pl.read_parquet(platform.settings.validated_file("transactions", batch)).height == (
        frame.height
    )


def test_the_same_batch_landed_twice_is_ingested_once(platform):
    first, frame = _land(platform, 3)
    copy = platform.settings.landing / "transactions-b000003-again.parquet"
    copy.write_bytes((platform.settings.landing / "transactions-b000003.parquet").read_bytes())
    later = copy.stat().st_mtime_ns + 10**9
    os.utime(copy, ns=(later, later))  # landed after the original, whatever the clock's grain
    outcomes = platform.ingest_all()
    assert [o.success for o in outcomes] == [True]  # a copy is no failure
    # Landed a third time after it was stored: its run recognises the bytes again.
    simulation.land(frame, platform.settings.landing, "transactions", "b000003-late")
    assert [o.success for o in platform.ingest_all()] == [True]

    ledger = BatchLedger(platform.settings.ledger_path)
    [record] = ledger.batches(dataset="transactions", status="validated")
    assert record.batch_id == first
    copies = ledger.batches(dataset="transactions", status="duplicate")
    assert len(copies) == 2 and all(first in c.reason for c in copies)
    events = [e["event"] for e in ledger.events(first)]
    assert events == ["received", "stored", "validated", "duplicate", "duplicate"]
    assert len(list((platform.settings.archive / "duplicates").iterdir())) == 2
    assert pl.read_parquet(platform.settings.validated / "transactions").height == frame.height
    assert ledger.summary()["transactions"]["validated_rows"] == frame.height


def test_a_batch_landing_while_its_predecessor_runs_is_ingested_once_in_order(tmp_path):
    platform = Platform(tmp_path / "home", on_disk=True)  # a tick and a run on two threads
    first, first_frame = _land(platform, 4)
    tick = platform.tick()
    [request] = tick.run_requests
    running = threading.Thread(target=platform.run_requests, args=(tick,))
    running.start()
    second, second_frame = _land(platform, 5)
    overlap = platform.tick()  # while the first batch's run may still be going
    running.join(120)
    keys = [r.run_key for r in overlap.run_requests]
    # The first batch is never asked under a new key while its run is in flight or done.
    assert keys.count(request.run_key) <= 1
    assert all(first not in k or k == request.run_key for k in keys)
    assert f"transactions-{second}" in keys
    platform.run_requests(overlap)  # the daemon would skip the known key; running it is a no-op
    platform.ingest_all()

    ledger = BatchLedger(platform.settings.ledger_path)
    records = sorted(ledger.batches(dataset="transactions"), key=lambda r: r.received_at)
    assert [r.batch_id for r in records] == [first, second]
    assert all(r.status == "validated" for r in records)
    for batch in (first, second):
        events = [e["event"] for e in ledger.events(batch)]
        assert events[0] == "received" and events[-1] == "validated"
        assert "quarantined" not in events
    validated = pl.read_parquet(platform.settings.validated / "transactions")
    assert validated.height == first_frame.height + second_frame.height
    assert validated["transaction_id"].n_unique() == validated.height
