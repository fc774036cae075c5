import sqlite3
import threading

import pytest

from quality.ledger import BatchLedger


def test_batch_moves_through_statuses_and_keeps_reason(tmp_path):
    ledger = BatchLedger(tmp_path / "ledger.sqlite")
    assert ledger.receive("b1", "transactions", tmp_path / "transactions-a.parquet")
    ledger.mark("b1", "stored", rows=10)
    ledger.mark("b1", "quarantined", reason="missing column 'amount'")
    rec = ledger.get("b1")
    assert (rec.status, rec.rows, rec.reason) == ("quarantined", 10, "missing column 'amount'")
    assert [e["event"] for e in ledger.events("b1")] == ["received", "stored", "quarantined"]


def test_same_batch_id_is_received_once_and_logged_as_duplicate(tmp_path):
    ledger = BatchLedger(tmp_path / "ledger.sqlite")
    assert ledger.receive("b1", "labels", tmp_path / "labels-a.parquet")
    assert not ledger.receive("b1", "labels", tmp_path / "labels-copy.parquet")
    assert len(ledger.batches()) == 1
    assert [e["event"] for e in ledger.events("b1")] == ["received", "duplicate"]


def test_unknown_status_and_unknown_batch_are_errors(tmp_path):
    ledger = BatchLedger(tmp_path / "ledger.sqlite")
    ledger.receive("b1", "cards", tmp_path / "cards-a.parquet")
    with pytest.raises(ValueError, match="unknown batch status"):
        ledger.mark("b1", "done")
    with pytest.raises(KeyError):
        ledger.mark("nope", "validated")


def test_summary_reconciles_rows_per_status(tmp_path):
    ledger = BatchLedger(tmp_path / "ledger.sqlite")
    for i, (status, rows) in enumerate([("validated", 5), ("validated", 7), ("quarantined", 3)]):
        ledger.receive(f"b{i}", "transactions", tmp_path / f"t{i}.parquet")
        ledger.mark(f"b{i}", status, rows=rows)
    s = ledger.summary()["transactions"]
    assert s["validated_rows"] == 12 and s["quarantined_rows"] == 3
    assert s["validated_batches"] == 2


def test_wal_mode_allows_concurrent_writers(tmp_path):
    path = tmp_path / "ledger.sqlite"
    BatchLedger(path)
    errors: list[Exception] = []

    def writer(k: int) -> None:
        ledger = BatchLedger(path)
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
    assert len(BatchLedger(path).batches(status="validated")) == 200
    mode = sqlite3.connect(path).execute("pragma journal_mode").fetchone()[0]
    assert mode == "wal"
