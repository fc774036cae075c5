"""Where the stores updated in place (batch ledger, model registry) keep their rows: a SQLite
file in WAL mode locally, a schema of the scale profile's Postgres database otherwise (SQLite's
WAL needs shared memory, which a network file system does not give, and the scale profile's
home is on one).

The stores write their SQL once, with ``?`` placeholders and what both dialects share
(``insert ... on conflict``); the few differences (the id column, triggers, JSON) each store
keeps beside its schema. Writers of one store are serialized: ``BEGIN IMMEDIATE`` in SQLite, a
transaction-scoped advisory lock keyed on the schema in Postgres, so "read the largest number,
insert the next" is as safe on either. Each use case's store has its own schema, so use cases
that share a Postgres database never see each other's rows.
"""

from __future__ import annotations

import re
import sqlite3
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

SQLITE, POSTGRES = "sqlite", "postgres"


@dataclass(frozen=True)
class Postgres:
    """A schema of a Postgres database; ``url`` as LOOPLINE_POSTGRES_URL spells it (it carries
    the password: kept out of ``repr`` and ``str``)."""

    url: str = field(repr=False)
    schema: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.schema):
            raise ValueError(
                f"{self.schema!r}: a store's Postgres schema is at most 63 lower-case letters, "
                "digits and underscores (a shorter use case name makes one)"
            )

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        return f"postgresql://{parts.hostname}:{parts.port or 5432}{parts.path} ({self.schema})"

    @property
    def dsn(self) -> str:
        """What psycopg2 takes: SQLAlchemy's driver suffix dropped."""
        return re.sub(r"^postgresql\+\w+://", "postgresql://", self.url)


Location = Path | Postgres


def schema_name(*parts: str) -> str:
    """A schema name from free-form parts (a use case's name, a store's); never cut short, so
    two stores of one use case never share one."""
    return re.sub(r"[^a-z0-9_]", "_", "_".join(parts).lower())


def exists(where: Location) -> bool:
    """Whether the store at ``where`` was ever made (read-only commands do not make one)."""
    return Database(where).exists()


class Connection(Protocol):
    """What the stores call on a connection: sqlite3's own three methods."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...

    def executescript(self, sql: str) -> Any: ...


class _PostgresConnection:
    """A psycopg2 connection answering sqlite3's calls: ``?`` placeholders, rows by name."""

    def __init__(self, raw: Any) -> None:
        from psycopg2.extras import DictCursor

        self.raw, self._cursor = raw, DictCursor

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cur = self.raw.cursor(cursor_factory=self._cursor)
        cur.execute(self._sql(sql), tuple(params))
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self.raw.cursor(cursor_factory=self._cursor)
        cur.executemany(self._sql(sql), [tuple(r) for r in rows])
        return cur

    def executescript(self, sql: str) -> Any:
        cur = self.raw.cursor()
        cur.execute(sql)  # no parameters: '%' and '?' are taken as written
        return cur


@dataclass(frozen=True)
class Database:
    """How one store opens its connections. ``pragmas`` and the timeout are the store's own
    (the registry syncs every commit, the ledger trades that for speed)."""

    location: Location
    timeout_s: float = 30.0
    pragmas: tuple[str, ...] = ()

    @property
    def dialect(self) -> str:
        return POSTGRES if isinstance(self.location, Postgres) else SQLITE

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What the database raises when it refuses a statement (a trigger, a constraint)."""
        if self.dialect == SQLITE:
            return (sqlite3.DatabaseError,)
        import psycopg2

        return (psycopg2.Error,)

    def exists(self) -> bool:
        """Whether the store was ever made (read-only commands do not make an empty one)."""
        if isinstance(self.location, Path):
            return self.location.exists()
        with self.connect() as con:
            return self._has_schema(con)

    def _has_schema(self, con: Connection) -> bool:
        assert isinstance(self.location, Postgres)
        row = con.execute(
            "select 1 from information_schema.schemata where schema_name = ?",
            (self.location.schema,),
        ).fetchone()
        return row is not None

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection in autocommit mode: each statement its own transaction."""
        con = self._open()
        try:
            yield con
        finally:
            (con.raw if isinstance(con, _PostgresConnection) else con).close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction, the store's only writer until it ends; rolled back on any error."""
        with self.connect() as con:
            if isinstance(con, _PostgresConnection):
                con.execute("begin")
                con.execute("select pg_advisory_xact_lock(?)", (self._lock_key,))
            else:
                con.execute("begin immediate")
            try:
                yield con
                con.execute("commit")
            except BaseException:
                if not isinstance(con, sqlite3.Connection) or con.in_transaction:
                    con.execute("rollback")
                raise

    def initialize(self, script: str) -> None:
        """Makes the store's tables. Postgres: schema and tables in one serialized
        transaction, once (DDL is transactional there, so no half-made schema is ever seen)."""
        if isinstance(self.location, Path):
            self.location.parent.mkdir(parents=True, exist_ok=True)
            with self.connect() as con:
                con.executescript(script)
            return
        if self.exists():
            return
        with self.transaction() as con:
            if not self._has_schema(con):  # another process may have made it meanwhile
                con.executescript(f'create schema "{self.location.schema}"; {script}')

    @property
    def _lock_key(self) -> int:
        assert isinstance(self.location, Postgres)
        return zlib.crc32(f"loopline:{self.location.schema}".encode())

    def _open(self) -> Connection:
        if isinstance(self.location, Postgres):
            import psycopg2

            raw = psycopg2.connect(
                self.location.dsn,
                connect_timeout=max(1, int(self.timeout_s)),
                options=f"-c search_path={self.location.schema} "
                f"-c lock_timeout={int(self.timeout_s * 1000)}",
            )
            raw.autocommit = True
            return _PostgresConnection(raw)
        con = sqlite3.connect(self.location, timeout=self.timeout_s, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("pragma journal_mode=wal")
            con.execute(f"pragma busy_timeout={int(self.timeout_s * 1000)}")
            for pragma in self.pragmas:
                con.execute(f"pragma {pragma}")
        except BaseException:
            con.close()
            raise
        return con
