import sqlite3
import threading

import pytest

from quality.ledger import BatchLedger


def test_batch_moves_through_statuses_and_keeps_reason(store_at, tmp_path):
    ledger = BatchLedger(store_at("ledger.sqlite"))
    assert ledger.receive("b1", "transactions", tmp_path / "transactions-a.parquet")
    ledger.mark("b1", "stored", rows=10)
    ledger.mark("b1", "quarantined", reason="missing column 'amount'")
    rec = ledger.get("b1")
    assert (rec.status, rec.rows, rec.reason) == ("quarantined", 10, "missing column 'amount'")
    assert [e["event"] for e in ledger.events("b1")] == ["received", "stored", "quarantined"]


def test_same_batch_id_is_received_once_and_logged_as_duplicate(store_at, tmp_path):
    ledger = BatchLedger(store_at("ledger.sqlite"))
    assert ledger.receive("b1", "labels", tmp_path / "labels-a.parquet")
    assert not ledger.receive("b1", "labels", tmp_path / "labels-copy.parquet")
    assert len(ledger.batches()) == 1
    assert [e["event"] for e in ledger.events("b1")] == ["received", "duplicate"]


def test_unknown_status_and_unknown_batch_are_errors(store_at, tmp_path):
    ledger = BatchLedger(store_at("ledger.sqlite"))
    ledger.receive("b1", "cards", tmp_path / "cards-a.parquet")
    with pytest.raises(ValueError, match="unknown batch status"):
        ledger.mark("b1", "done")
    with pytest.raises(KeyError):
        ledger.mark("nope", "validated")


def test_summary_reconciles_rows_per_status(store_at, tmp_path):
    ledger = BatchLedger(store_at("ledger.sqlite"))
    for i, (status, rows) in enumerate([("validated", 5), ("validated", 7), ("quarantined", 3)]):
        ledger.receive(f"b{i}", "transactions", tmp_path / f"t{i}.parquet")
        ledger.mark(f"b{i}", status, rows=rows)
    s = ledger.summary()["transactions"]
    assert s["validated_rows"] == 12 and s["quarantined_rows"] == 3
    assert s["validated_batches"] == 2


def test_concurrent_writers_lose_nothing(store_at, tmp_path):
    """Four writers at once (the sensor, run workers, the CLI), on either backend."""
    where = store_at("ledger.sqlite")
    BatchLedger(where)
    errors: list[Exception] = []

    def writer(k: int) -> None:
        ledger = BatchLedger(where)
        try:
            for i in range(50):
                ledger.receive(f"w{k}-{i}", "transactions", tmp_path / f"{k}-{i}")
                ledger.mark(f"w{k}-{i}", "validated", rows=1)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(BatchLedger(where).batches(status="validated")) == 200


def test_a_local_ledger_is_sqlite_in_wal_mode(tmp_path):
    path = tmp_path / "ledger.sqlite"
    BatchLedger(path)
    mode = sqlite3.connect(path).execute("pragma journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_landed_file_settles_once_unchanged_for_the_settle_time(store_at, tmp_path):
    from datetime import UTC, datetime, timedelta

    ledger = BatchLedger(store_at("ledger.sqlite"))
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    assert ledger.settled({"a.parquet": (10, 1)}, 5, t0) == set()  # first seen
    assert ledger.settled({"a.parquet": (20, 2)}, 5, t0 + timedelta(seconds=6)) == set()  # grew
    assert ledger.settled({"a.parquet": (20, 2)}, 5, t0 + timedelta(seconds=9)) == set()
    assert ledger.settled({"a.parquet": (20, 2)}, 5, t0 + timedelta(seconds=11)) == {"a.parquet"}
    # Gone from landing: forgotten, so a new file of that name waits again.
    assert ledger.settled({}, 5, t0 + timedelta(seconds=12)) == set()
    assert ledger.settled({"a.parquet": (20, 2)}, 5, t0 + timedelta(seconds=13)) == set()


def test_the_same_bytes_are_owned_by_the_first_batch_that_claims_them(store_at):
    ledger = BatchLedger(store_at("ledger.sqlite"))
    assert ledger.claim_content("b1", "sha-x") == "b1"
    assert ledger.claim_content("b1", "sha-x") == "b1"  # a retry of the same batch
    assert ledger.claim_content("b2", "sha-x") == "b1"
    assert ledger.claim_content("b2", "sha-y") == "b2"


def test_a_ledger_made_before_duplicates_keeps_its_batches_and_takes_the_new_status(tmp_path):
    path = tmp_path / "ledger.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        """
        create table batches (
            batch_id text primary key, dataset text not null, source_name text not null,
            source_path text not null,
            status text not null check (status in ('received','stored','validated','quarantined')),
            rows integer, reason text, received_at text not null, updated_at text not null);
        insert into batches values ('old', 'transactions', 'a', '/a', 'validated', 5, null,
                                    '2030-01-01', '2030-01-01');
        """
    )
    con.close()
    ledger = BatchLedger(path)
    assert ledger.get("old").rows == 5
    ledger.receive("copy", "transactions", tmp_path / "transactions-b.parquet")
    ledger.mark("copy", "duplicate", reason="the same bytes as batch old")
    assert ledger.get("copy").status == "duplicate"
    assert ledger.summary()["transactions"]["validated_rows"] == 5
