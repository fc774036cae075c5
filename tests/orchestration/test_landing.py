"""Landing that never stalls and never takes half a file, through the real sensor and runs.

Every tick of the harness also asserts that the sensor opened no landed, archived or stored
file (tests/orchestration/conftest.py): it works from ``stat`` calls alone.
"""

import errno
import os
import time

import polars as pl
import pytest

from core import simulation
from quality.ingest import batch_id_of
from quality.ledger import BatchLedger
from usecases.fraud import simulator

CONFIG = simulator.ScenarioConfig(seed=11, n_cards=80, n_merchants=20, rows_per_batch=200)


def _frame(k: int) -> pl.DataFrame:
    return simulator.Simulator(CONFIG).transactions(k)


def _sparse(path, size: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)  # as long as ``size``, with no disk used


def _landing(platform) -> list[str]:
    return sorted(p.name for p in platform.settings.landing.iterdir())


def test_a_2gb_file_and_a_stray_archive_are_refused_unread_and_ingestion_goes_on(platform):
    landing = platform.settings.landing
    huge, junk = landing / "transactions-huge.parquet", landing / "backup.zip"
    _sparse(huge, 2 * 1024**3)
    _sparse(junk, 2 * 1024**3)
    inode = huge.stat().st_ino
    good = simulation.land(_frame(0), landing, "transactions", "b0")
    good_id = batch_id_of(good)
    result = platform.tick()  # the harness fails it if the sensor opened any of them
    assert platform.batch_ids(result) == [good_id]

    ledger = BatchLedger(platform.settings.ledger_path)
    refused = {b.source_name: b for b in ledger.batches(status="quarantined")}
    assert "file too large: 2147483648 bytes" in refused[huge.name].reason
    assert "LOOPLINE_MAX_LANDING_BYTES" in refused[huge.name].reason
    assert "unsupported file type '.zip'" in refused[junk.name].reason
    # Moved into quarantine (the same file, renamed), beside its reason; nothing copied.
    kept = platform.settings.quarantine / "transactions" / refused[huge.name].batch_id
    assert (kept / huge.name).stat().st_ino == inode
    assert "file too large" in (kept / "reason.json").read_text()
    assert _landing(platform) == [good.name]
    assert all(o.success for o in platform.run_requests(result))
    assert ledger.get(good_id).status == "validated"


def test_the_size_limit_is_a_setting(platform, monkeypatch):
    monkeypatch.setenv("LOOPLINE_MAX_LANDING_BYTES", "1000")
    simulation.land(_frame(0), platform.settings.landing, "transactions", "b0")
    assert platform.batch_ids(platform.tick()) == []
    [refused] = BatchLedger(platform.settings.ledger_path).batches(status="quarantined")
    assert "over the 1000-byte limit" in refused.reason


def test_a_file_written_in_place_is_taken_once_its_size_and_time_have_settled(
    platform, monkeypatch
):
    monkeypatch.setenv("LOOPLINE_LANDING_SETTLE_SECONDS", "1")
    frame = _frame(1)
    payload = simulation.encode(frame, "parquet")
    growing = platform.settings.landing / "transactions-scp.parquet"
    ledger = BatchLedger(platform.settings.ledger_path)
    with growing.open("wb") as fh:  # as scp or SFTP write: the final name, growing
        fh.write(payload[: len(payload) // 2])
        fh.flush()
        assert platform.tick().run_requests == []  # first seen: it may still grow
        time.sleep(1.2)
        fh.write(payload[len(payload) // 2 :])
        fh.flush()
        assert platform.tick().run_requests == []  # it grew since: its wait starts again
    assert ledger.batches() == []  # not taken, not even half
    time.sleep(1.2)
    result = platform.tick()  # unchanged for the settle time: taken whole
    assert platform.batch_ids(result) == [batch_id_of(growing)]
    assert all(o.success for o in platform.run_requests(result))
    [record] = ledger.batches()
    assert (record.status, record.rows) == ("validated", frame.height)


def test_files_of_finished_batches_left_in_landing_never_hold_up_a_new_file(platform):
    landing = platform.settings.landing
    ledger = BatchLedger(platform.settings.ledger_path)
    # 101 files whose batches are done but which are still (or again) in landing, all older
    # than the new file: the state a hundred re-sends under their own names left behind.
    for i in range(101):
        path = landing / f"transactions-old{i:03d}.parquet"
        path.write_bytes(f"already ingested {i}".encode())
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i))
        ledger.receive(batch_id_of(path), "transactions", path)
        ledger.mark(batch_id_of(path), "validated", rows=1)
    new = batch_id_of(simulation.land(_frame(2), landing, "transactions", "new"))
    platform.ingest_all()
    assert ledger.get(new).status == "validated"
    assert _landing(platform) == []  # the finished batches' files were put in the archive
    assert len(list((platform.settings.archive / "transactions").iterdir())) == 102


def test_a_file_relanded_under_its_own_name_is_taken_not_left_in_landing(platform):
    landing = platform.settings.landing
    ledger = BatchLedger(platform.settings.ledger_path)
    frame = _frame(3)
    simulation.land(frame, landing, "transactions", "b3")
    platform.ingest_all()
    simulation.land(frame, landing, "transactions", "b3")  # the same bytes, the same name
    platform.ingest_all()
    assert _landing(platform) == []
    assert [b.status for b in ledger.batches()] == ["duplicate", "validated"]
    simulation.land(_frame(4), landing, "transactions", "b3")  # new bytes, the same name
    platform.ingest_all()
    assert _landing(platform) == []
    assert sorted(b.status for b in ledger.batches()) == ["duplicate", "validated", "validated"]
    assert ledger.summary()["transactions"]["validated_rows"] == frame.height + _frame(4).height


def test_a_stored_batch_whose_archived_file_was_deleted_still_validates(platform, monkeypatch):
    good = simulation.land(_frame(5), platform.settings.landing, "transactions", "b5")
    batch = batch_id_of(good)
    original = pl.DataFrame.write_parquet
    validated_dir = str(platform.settings.validated)

    def full_disk_for_validated(self, file, *args, **kwargs):
        if str(file).startswith(validated_dir):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pl.DataFrame, "write_parquet", full_disk_for_validated)
        platform.run_requests(platform.tick())
    ledger = BatchLedger(platform.settings.ledger_path)
    assert ledger.get(batch).status == "stored"
    for archived in (platform.settings.archive / "transactions").iterdir():
        archived.unlink()  # the archive copy is gone (retention, an operator)
    platform.ingest_all()  # the retry needs only the stored batch
    assert ledger.get(batch).status == "validated"


def test_a_batch_whose_file_vanished_is_quarantined_and_the_sensor_keeps_ticking(platform):
    landing = platform.settings.landing
    lost = simulation.land(_frame(6), landing, "transactions", "b6")
    rows = _frame(6).height
    batch = batch_id_of(lost)
    first = platform.tick()
    lost.unlink()  # gone before its run, and never archived
    platform.run_requests(first)
    platform.ingest_all()  # three failed runs, then given up (no tick may raise)
    ledger = BatchLedger(platform.settings.ledger_path)
    record = ledger.get(batch)
    assert record.status == "quarantined"
    assert "ingest failed in 3 runs" in record.reason
    assert "neither in landing nor in the archive" in record.reason
    assert record.rows is None and rows  # never read: no rows to count
    reason = platform.settings.quarantine / "transactions" / batch / "reason.json"
    assert "is gone" in reason.read_text()
    later = simulation.land(_frame(7), landing, "transactions", "b7")
    later_id = batch_id_of(later)
    platform.ingest_all()
    assert ledger.get(later_id).status == "validated"
    assert platform.tick().run_requests == []


def test_one_file_the_sensor_cannot_handle_does_not_stop_the_others(platform):
    landing = platform.settings.landing
    stuck = landing / "notes.txt"
    stuck.write_text("an operator's note")
    stuck_id = batch_id_of(stuck)
    # Its quarantine folder cannot be made (a file is in the way): moving it in fails.
    blocker = platform.settings.quarantine / "unknown" / stuck_id
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    good = simulation.land(_frame(8), landing, "transactions", "b8")
    good_id = batch_id_of(good)
    result = platform.tick()
    assert platform.batch_ids(result) == [good_id]
    ledger = BatchLedger(platform.settings.ledger_path)
    errors = [e for e in ledger.events(stuck_id) if e["event"] == "sensor_error"]
    assert errors and "notes.txt" in errors[0]["detail"]
    assert stuck.exists()  # left as it was, tried again next tick
    blocker.unlink()
    platform.run_requests(result)
    platform.ingest_all()
    assert ledger.get(good_id).status == "validated"
    assert not stuck.exists()
    assert "unsupported file type" in ledger.get(stuck_id).reason
    assert "duplicate" not in [e["event"] for e in ledger.events(stuck_id)]


def test_landing_settings_have_defaults_and_refuse_nonsense():
    from core.settings import Settings

    defaults = Settings.from_env({"LOOPLINE_HOME": "/tmp/x"})
    assert defaults.max_landing_bytes == 1024**3 and defaults.landing_settle_s == 5.0
    for env in ({"LOOPLINE_MAX_LANDING_BYTES": "-1"}, {"LOOPLINE_LANDING_SETTLE_SECONDS": "-2"}):
        with pytest.raises(ValueError, match="LOOPLINE_MAX_LANDING_BYTES must be >= 1"):
            Settings.from_env({"LOOPLINE_HOME": "/tmp/x", **env})


def test_a_flood_of_files_is_taken_over_several_ticks_oldest_first(platform, monkeypatch):
    monkeypatch.setenv("LOOPLINE_INGEST_MAX_BATCHES", "2")  # 10 runs of 2: 20 files a tick
    landing = platform.settings.landing
    names = [f"transactions-f{i:02d}.parquet" for i in range(25)]
    for i, name in enumerate(names):
        (landing / name).write_bytes(f"file {i}".encode())
        os.utime(landing / name, (1_600_000_000 + i, 1_600_000_000 + i))
    ledger = BatchLedger(platform.settings.ledger_path)
    first = platform.tick()
    assert len(first.run_requests) == 10 and len(platform.batch_ids(first)) == 20
    assert sorted(b.source_name for b in ledger.batches()) == names[:20]
    second = platform.tick()  # the rest, beside the first tick's runs asked again
    assert len(platform.batch_ids(second)) == 25
    assert len(ledger.batches()) == 25
