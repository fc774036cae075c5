"""The batch ledger: every landed batch, what happened to it, and why.

SQLite in WAL mode so the sensor, run workers and the CLI can read and write it at once.
Status moves forward only: received -> stored -> validated | quarantined. Retention deleting a
batch's files leaves its row and status as they were and adds a tombstone per store
(``expired_files``: what went, how many bytes, when), so every landed row stays accounted for.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

STATUSES = ("received", "stored", "validated", "quarantined")
FINAL = ("validated", "quarantined")

_SCHEMA = """
create table if not exists batches (
    batch_id     text primary key,
    dataset      text not null,
    source_name  text not null,
    source_path  text not null,
    status       text not null check (status in ('received','stored','validated','quarantined')),
    rows         integer,
    reason       text,
    received_at  text not null,
    updated_at   text not null
);
create index if not exists batches_dataset on batches(dataset, received_at);
create table if not exists batch_events (
    id        integer primary key autoincrement,
    batch_id  text not null,
    at        text not null,
    event     text not null,
    detail    text
);
create table if not exists batch_requests (
    batch_id  text primary key,
    run_key   text not null,
    attempt   integer not null
);
create index if not exists batch_requests_key on batch_requests(run_key);
create table if not exists expired_files (
    store       text not null,
    name        text not null,
    batch_id    text,
    bytes       integer not null,
    expired_at  text not null,
    primary key (store, name)
);
create index if not exists expired_files_batch on expired_files(batch_id);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    dataset: str
    source_name: str
    source_path: str
    status: str
    rows: int | None
    reason: str | None
    received_at: str
    updated_at: str


class BatchLedger:
    """Record of every batch that landed; the single source of truth for `loopline batches`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            con.execute("pragma journal_mode=wal")
            con.execute("pragma synchronous=normal")
            con.execute("pragma busy_timeout=30000")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    def receive(self, batch_id: str, dataset: str, source_path: Path) -> bool:
        """Record a newly landed batch; False (and a `duplicate` event) if its id is known."""
        now = _now()
        with self._connect() as con:
            cur = con.execute(
                "insert or ignore into batches values (?,?,?,?,'received',null,null,?,?)",
                (batch_id, dataset, Path(source_path).name, str(source_path), now, now),
            )
            inserted = cur.rowcount == 1
            con.execute(
                "insert into batch_events(batch_id, at, event, detail) values (?,?,?,?)",
                (batch_id, now, "received" if inserted else "duplicate", str(source_path)),
            )
        return inserted

    def mark(
        self, batch_id: str, status: str, *, rows: int | None = None, reason: str | None = None
    ) -> None:
        """Move a batch to ``status``, keeping the row count and reason."""
        if status not in STATUSES:
            raise ValueError(f"unknown batch status {status!r}; expected one of {STATUSES}")
        now = _now()
        with self._connect() as con:
            cur = con.execute(
                "update batches set status=?, rows=coalesce(?, rows), reason=?, updated_at=? "
                "where batch_id=?",
                (status, rows, reason, now, batch_id),
            )
            if cur.rowcount != 1:
                raise KeyError(f"batch {batch_id!r} is not in the ledger")
            con.execute(
                "insert into batch_events(batch_id, at, event, detail) values (?,?,?,?)",
                (batch_id, now, status, reason),
            )

    def requested(self, batch_ids: list[str], run_key: str, attempt: int) -> None:
        """Record the ingest run each batch was asked of (its ``attempt``-th, one run key for
        all of them): the next tick asks again under that key until the run exists."""
        with self._connect() as con:
            con.executemany(
                "insert or replace into batch_requests values (?,?,?)",
                [(b, run_key, attempt) for b in batch_ids],
            )

    def request_of(self, batch_id: str) -> tuple[str, int] | None:
        """(run key, attempt) of the batch's latest ingest request, None if never asked."""
        with self._connect() as con:
            row = con.execute(
                "select run_key, attempt from batch_requests where batch_id=?", (batch_id,)
            ).fetchone()
        return (row["run_key"], row["attempt"]) if row else None

    def get(self, batch_id: str) -> BatchRecord | None:
        with self._connect() as con:
            row = con.execute("select * from batches where batch_id=?", (batch_id,)).fetchone()
        return BatchRecord(**dict(row)) if row else None

    def batches(
        self, *, dataset: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[BatchRecord]:
        """Batches newest first, optionally filtered."""
        sql, args = "select * from batches where 1=1", []
        if dataset:
            sql += " and dataset=?"
            args.append(dataset)
        if status:
            sql += " and status=?"
            args.append(status)
        sql += " order by received_at desc, batch_id"
        if limit:
            sql += " limit ?"
            args.append(limit)
        with self._connect() as con:
            return [BatchRecord(**dict(r)) for r in con.execute(sql, args)]

    def events(self, batch_id: str | None = None) -> list[dict]:
        sql, args = "select * from batch_events", []
        if batch_id:
            sql += " where batch_id=?"
            args.append(batch_id)
        with self._connect() as con:
            return [dict(r) for r in con.execute(sql + " order by id", args)]

    def expire(self, store: str, name: str, *, batch_id: str | None, size: int) -> None:
        """Record that retention deletes ``name`` of ``store`` (written before the delete: a
        crash between the two leaves a tombstone whose file the next pass removes)."""
        now = _now()
        with self._connect() as con:
            con.execute(
                "insert or ignore into expired_files values (?,?,?,?,?)",
                (store, name, batch_id, size, now),
            )
            if batch_id is not None:
                con.execute(
                    "insert into batch_events(batch_id, at, event, detail) values (?,?,?,?)",
                    (batch_id, now, "expired", f"{store}: {name}"),
                )

    def expired(self, store: str | None = None) -> list[dict]:
        """Retention's tombstones, oldest first (``store``: of that store only)."""
        sql, args = "select * from expired_files", []
        if store:
            sql += " where store=?"
            args.append(store)
        with self._connect() as con:
            return [dict(r) for r in con.execute(sql + " order by expired_at, name", args)]

    def expired_batches(self, store: str) -> set[str]:
        """Ids of the batches whose ``store`` file retention deleted."""
        with self._connect() as con:
            rows = con.execute(
                "select batch_id from expired_files where store=? and batch_id is not null",
                (store,),
            )
            return {r["batch_id"] for r in rows}

    def summary(self) -> dict[str, dict[str, int]]:
        """Per dataset and status: batch count and row count (the reconciliation view)."""
        out: dict[str, dict[str, int]] = {}
        with self._connect() as con:
            for r in con.execute(
                "select dataset, status, count(*) n, coalesce(sum(rows),0) r "
                "from batches group by dataset, status"
            ):
                out.setdefault(r["dataset"], {})[f"{r['status']}_batches"] = r["n"]
                out[r["dataset"]][f"{r['status']}_rows"] = r["r"]
        return out
