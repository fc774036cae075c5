"""The batch ledger: every landed batch, what happened to it, and why.

SQLite in WAL mode (Postgres in the scale profile, ``core.db``) so the sensor, run workers and
the CLI can read and write it at once.
Status moves forward only: received -> stored -> validated | quarantined, or received ->
duplicate (the same bytes as a batch already taken, recognised by the ingest run).
It also remembers what the landing sensor saw of each file still in the landing folder (size
and modification time, and since when), so a file is taken only once it has settled.
Retention deleting a batch's files leaves its row and status as they were and adds a
tombstone per store (``expired_files``: what went, how many bytes, when), so every landed
row stays accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from core.db import SQLITE, Connection, Database, Location, Postgres

if TYPE_CHECKING:
    from core.settings import Settings

STATUSES = ("received", "stored", "validated", "quarantined", "duplicate")
FINAL = ("validated", "quarantined", "duplicate")

_BATCHES = """
create table if not exists batches (
    batch_id     text primary key,
    dataset      text not null,
    source_name  text not null,
    source_path  text not null,
    status       text not null
                 check (status in ('received','stored','validated','quarantined','duplicate')),
    rows         bigint,
    reason       text,
    received_at  text not null,
    updated_at   text not null
)"""
_SCHEMA = (
    _BATCHES
    + """;
create index if not exists batches_dataset on batches(dataset, received_at);
create table if not exists batch_events (
    id        {id},
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
    bytes       bigint not null,
    expired_at  text not null,
    primary key (store, name)
);
create index if not exists expired_files_batch on expired_files(batch_id);
create table if not exists batch_contents (
    sha256    text primary key,
    batch_id  text not null
);
create table if not exists landing_files (
    name      text primary key,
    size      bigint not null,
    mtime_ns  bigint not null,
    seen_at   text not null
);
"""
)
# The one difference between the dialects' schemas: the autoincrementing id.
_IDS = {SQLITE: "integer primary key autoincrement", "postgres": "bigserial primary key"}
# A ledger made before the `duplicate` status: its table's check constraint refuses it.
_BEFORE_DUPLICATES = "'quarantined'))"


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

    def __init__(self, where: Location | str) -> None:
        """``where``: the SQLite file (a path), or a Postgres schema (``core.db.Postgres``)."""
        self.location = where if isinstance(where, Postgres) else Path(where)
        self.db = Database(self.location, timeout_s=30.0, pragmas=("synchronous=normal",))
        if self.db.dialect == SQLITE:
            self.location.parent.mkdir(parents=True, exist_ok=True)
            with self.db.connect() as con:
                self._migrate(con)
        self.db.initialize(_SCHEMA.replace("{id}", _IDS[self.db.dialect]))

    @classmethod
    def for_settings(cls, settings: Settings) -> BatchLedger:
        """The ledger of the settings' home: its SQLite file, or Postgres in the scale profile."""
        return cls(settings.ledger_location)

    @staticmethod
    def _migrate(con: Connection) -> None:
        """Let a ledger made before the ``duplicate`` status take it (one transaction)."""

        def old() -> bool:
            row = con.execute("select sql from sqlite_master where name='batches'").fetchone()
            return row is not None and _BEFORE_DUPLICATES in row["sql"].replace(" ", "")

        if not old():
            return
        con.execute("begin immediate")
        try:
            if old():  # another process may have migrated it meanwhile
                con.execute("alter table batches rename to batches_before_duplicates")
                con.execute(_BATCHES)
                con.execute("insert into batches select * from batches_before_duplicates")
                con.execute("drop table batches_before_duplicates")
            con.execute("commit")
        except BaseException:
            con.execute("rollback")
            raise

    def receive(self, batch_id: str, dataset: str, source_path: Path) -> bool:
        """Record a newly landed batch; False (and a `duplicate` event) if its id is known."""
        now = _now()
        with self.db.connect() as con:
            cur = con.execute(
                "insert into batches values (?,?,?,?,'received',null,null,?,?) on conflict do nothing",
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
        with self.db.connect() as con:
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

    def note(self, batch_id: str, event: str, detail: str | None = None) -> None:
        """Record an event of a batch that changes no status (a re-landed copy, a sensor error)."""
        with self.db.connect() as con:
            con.execute(
                "insert into batch_events(batch_id, at, event, detail) values (?,?,?,?)",
                (batch_id, _now(), event, detail),
            )

    def count(self, batch_id: str, rows: int) -> None:
        """Keep a batch's row count as soon as it is read, so that a batch given up on later
        still reconciles without anyone reading it again."""
        with self.db.connect() as con:
            con.execute("update batches set rows=? where batch_id=?", (rows, batch_id))

    def claim_content(self, batch_id: str, sha256: str) -> str:
        """The batch that owns these bytes: ``batch_id`` if none did, else the first that
        claimed them (the same bytes landed again are that batch's duplicate)."""
        with self.db.connect() as con:
            con.execute(
                "insert into batch_contents(sha256, batch_id) values (?,?) "
                "on conflict(sha256) do nothing",
                (sha256, batch_id),
            )
            row = con.execute(
                "select batch_id from batch_contents where sha256=?", (sha256,)
            ).fetchone()
        return row["batch_id"]

    def settled(
        self, files: dict[str, tuple[int, int]], settle_s: float, now: datetime
    ) -> set[str]:
        """The names of ``files`` (name -> (size, mtime_ns)) seen unchanged for ``settle_s``
        seconds or more; a new or changed file starts its wait ``now``. Files no longer in
        ``files`` (taken, or removed by their producer) are forgotten."""
        with self.db.connect() as con:
            seen = {r["name"]: r for r in con.execute("select * from landing_files")}
            ready, changed = set(), []
            for name, (size, mtime_ns) in files.items():
                row = seen.get(name)
                if row is None or (row["size"], row["mtime_ns"]) != (size, mtime_ns):
                    changed.append((name, size, mtime_ns, now.isoformat()))
                elif (now - datetime.fromisoformat(row["seen_at"])).total_seconds() >= settle_s:
                    ready.add(name)
            gone = [(name,) for name in seen if name not in files]
        if not changed and not gone:
            return ready
        with self.db.transaction() as con:
            con.executemany(
                "insert into landing_files(name, size, mtime_ns, seen_at) values (?,?,?,?) "
                "on conflict(name) do update set size=excluded.size, "
                "mtime_ns=excluded.mtime_ns, seen_at=excluded.seen_at",
                changed,
            )
            con.executemany("delete from landing_files where name=?", gone)
        return ready

    def requested(self, batch_ids: list[str], run_key: str, attempt: int) -> None:
        """Record the ingest run each batch was asked of (its ``attempt``-th, one run key for
        all of them): the next tick asks again under that key until the run exists."""
        with self.db.connect() as con:
            con.executemany(
                "insert into batch_requests values (?,?,?) on conflict(batch_id) do update "
                "set run_key=excluded.run_key, attempt=excluded.attempt",
                [(b, run_key, attempt) for b in batch_ids],
            )

    def request_of(self, batch_id: str) -> tuple[str, int] | None:
        """(run key, attempt) of the batch's latest ingest request, None if never asked."""
        with self.db.connect() as con:
            row = con.execute(
                "select run_key, attempt from batch_requests where batch_id=?", (batch_id,)
            ).fetchone()
        return (row["run_key"], row["attempt"]) if row else None

    def get(self, batch_id: str) -> BatchRecord | None:
        with self.db.connect() as con:
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
        with self.db.connect() as con:
            return [BatchRecord(**dict(r)) for r in con.execute(sql, args)]

    def events(self, batch_id: str | None = None) -> list[dict]:
        sql, args = "select * from batch_events", []
        if batch_id:
            sql += " where batch_id=?"
            args.append(batch_id)
        with self.db.connect() as con:
            return [dict(r) for r in con.execute(sql + " order by id", args)]

    def expire(self, store: str, name: str, *, batch_id: str | None, size: int) -> None:
        """Record that retention deletes ``name`` of ``store`` (written before the delete: a
        crash between the two leaves a tombstone whose file the next pass removes)."""
        now = _now()
        with self.db.connect() as con:
            con.execute(
                "insert into expired_files values (?,?,?,?,?) on conflict do nothing",
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
        with self.db.connect() as con:
            return [dict(r) for r in con.execute(sql + " order by expired_at, name", args)]

    def expired_batches(self, store: str) -> set[str]:
        """Ids of the batches whose ``store`` file retention deleted."""
        with self.db.connect() as con:
            rows = con.execute(
                "select batch_id from expired_files where store=? and batch_id is not null",
                (store,),
            )
            return {r["batch_id"] for r in rows}

    def summary(self) -> dict[str, dict[str, int]]:
        """Per dataset and status: batch count and row count (the reconciliation view)."""
        out: dict[str, dict[str, int]] = {}
        with self.db.connect() as con:
            for r in con.execute(
                "select dataset, status, count(*) n, coalesce(sum(rows),0) r "
                "from batches group by dataset, status"
            ):
                out.setdefault(r["dataset"], {})[f"{r['status']}_batches"] = int(r["n"])
                out[r["dataset"]][f"{r['status']}_rows"] = int(r["r"])  # Postgres: a Decimal
        return out
