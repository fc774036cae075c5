"""Model registry in SQLite (WAL), or Postgres in the scale profile (``core.db``): versions with lineage, aliases, an append-only event log.

Version ids are sequential ("v0001", "v0002", ...): short enough for a CLI and for
TorchServe version names, and ordered like promotion history. The sequence number is taken
inside the registering transaction (the store's only writer), so concurrent registrations cannot
collide. Each version also stores a content hash over its artifact checksums; registering
the same artifacts again returns the existing version instead of a duplicate, which makes
a retried registration step idempotent.

Every mutation is one transaction: a crash mid-registration leaves no half entry. Version
rows and events cannot be updated or deleted (triggers enforce it); the champion history,
and so rollback, is replayed from the event log.

The champion alias is the intent of what serves: a promotion or rollback moves it and opens a
pending release in the same transaction, before TorchServe is touched; the release is closed
(``confirm_served``) once TorchServe is read back serving it (``serving.reconciler``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.db import POSTGRES, SQLITE, Connection, Database, Location, Postgres
from core.jsonutil import json_safe
from models.checksum import sha256_file

if TYPE_CHECKING:
    from core.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
EVENT_KINDS = (
    "registered",
    "rejected",
    "promoted",
    "rolled_back",
    "alias_set",
    "alias_removed",
    "deployment",
    "validated",
    "override",
)
# 2: the gate's verdict ("validated"/"rejected") and forced promotions ("override") are events.
SCHEMA_VERSION = 2

_TABLES = f"""
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    model_name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    artifact_dir TEXT NOT NULL,
    dagster_run_id TEXT,
    code_version TEXT,
    training_set_version TEXT NOT NULL,
    feature_service TEXT NOT NULL,
    training_batches TEXT NOT NULL,
    data_window TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    metrics TEXT NOT NULL,
    extra TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    version TEXT NOT NULL REFERENCES versions(version),
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    PRIMARY KEY (version, path)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    version TEXT NOT NULL REFERENCES versions(version),
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id {{id}},
    at TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(f"'{k}'" for k in EVENT_KINDS)})),
    version TEXT REFERENCES versions(version),
    reason TEXT,
    reasons TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_version ON events(version);
CREATE TABLE IF NOT EXISTS releases (
    id {{id}},
    at TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('promote', 'rollback')),
    from_version TEXT REFERENCES versions(version),
    to_version TEXT NOT NULL REFERENCES versions(version),
    reason TEXT,
    outcome TEXT CHECK (outcome IN ('served', 'superseded')),
    closed_at TEXT
);
CREATE INDEX IF NOT EXISTS open_releases ON releases(outcome) WHERE outcome IS NULL;
"""
# Versions, artifacts, the event log and closed releases are never changed: triggers refuse it.
_SQLITE_TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS versions_no_update BEFORE UPDATE ON versions
    BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS versions_no_delete BEFORE DELETE ON versions
    BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS artifacts_no_update BEFORE UPDATE ON artifacts
    BEGIN SELECT RAISE(ABORT, 'artifact records are immutable'); END;
CREATE TRIGGER IF NOT EXISTS releases_closed_are_final BEFORE UPDATE ON releases
    WHEN OLD.outcome IS NOT NULL
    BEGIN SELECT RAISE(ABORT, 'a closed release is final'); END;
CREATE TRIGGER IF NOT EXISTS releases_no_delete BEFORE DELETE ON releases
    BEGIN SELECT RAISE(ABORT, 'releases are never deleted'); END;
PRAGMA user_version={SCHEMA_VERSION};
"""
_POSTGRES_TRIGGERS = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END $$;
CREATE FUNCTION refuse_closed_release() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.outcome IS NOT NULL THEN RAISE EXCEPTION 'a closed release is final'; END IF;
        RETURN NEW;
    END $$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse('the event log is append-only');
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse('the event log is append-only');
CREATE TRIGGER versions_no_update BEFORE UPDATE ON versions
    FOR EACH ROW EXECUTE FUNCTION refuse('model versions are immutable');
CREATE TRIGGER versions_no_delete BEFORE DELETE ON versions
    FOR EACH ROW EXECUTE FUNCTION refuse('model versions are immutable');
CREATE TRIGGER artifacts_no_update BEFORE UPDATE ON artifacts
    FOR EACH ROW EXECUTE FUNCTION refuse('artifact records are immutable');
CREATE TRIGGER releases_closed_are_final BEFORE UPDATE ON releases
    FOR EACH ROW EXECUTE FUNCTION refuse_closed_release();
CREATE TRIGGER releases_no_delete BEFORE DELETE ON releases
    FOR EACH ROW EXECUTE FUNCTION refuse('releases are never deleted');
"""
# What differs between the dialects: the id column, the triggers, reading a JSON field.
_SCHEMA = {
    SQLITE: _TABLES.format(id="INTEGER PRIMARY KEY AUTOINCREMENT") + _SQLITE_TRIGGERS,
    POSTGRES: _TABLES.format(id="BIGSERIAL PRIMARY KEY") + _POSTGRES_TRIGGERS,
}
_DETAIL_TO = {SQLITE: "json_extract(detail, '$.to')", POSTGRES: "(detail::json ->> 'to')"}


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, no rollback target...)."""


@dataclass(frozen=True)
class ModelRecord:
    """What the caller knows about a trained model when registering it: its full lineage."""

    model_name: str
    artifact_dir: str
    artifacts: Mapping[str, str]
    training_set_version: str
    feature_service: str
    training_batches: Sequence[str]
    hyperparameters: Mapping[str, Any]
    metrics: Mapping[str, Any]
    data_window: Mapping[str, Any]
    dagster_run_id: str | None = None
    code_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        lines = "".join(f"{sha}  {path}\n" for path, sha in sorted(self.artifacts.items()))
        return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """A registered version as read back: lineage, artifacts, aliases and derived status."""

    version: str
    seq: int
    model_name: str
    created_at: str
    content_hash: str
    artifact_dir: str
    dagster_run_id: str | None
    code_version: str | None
    training_set_version: str
    feature_service: str
    training_batches: list[str]
    data_window: dict[str, Any]
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    extra: dict[str, Any]
    artifacts: dict[str, dict[str, Any]]
    aliases: list[str]
    status: str

    def lineage(self) -> dict[str, Any]:
        """The chain back to data and code: run, code, training set, batches, features, window."""
        return {
            "version": self.version,
            "dagster_run_id": self.dagster_run_id,
            "code_version": self.code_version,
            "training_set_version": self.training_set_version,
            "training_batches": list(self.training_batches),
            "feature_service": self.feature_service,
            "data_window": dict(self.data_window),
            "artifact_dir": self.artifact_dir,
            "artifacts": {p: a["sha256"] for p, a in self.artifacts.items()},
        }

    def artifact_path(self, name: str) -> Path:
        return Path(self.artifact_dir) / name

    def trained_until(self) -> dt.datetime | None:
        """The event time of the newest row the model learned from: its train split's end
        (its validation and test rows, newer, were only evaluated on). None when unrecorded."""
        end = (self.data_window.get("splits") or {}).get("train", {}).get("end")
        return dt.datetime.fromisoformat(end) if end else None


@dataclass(frozen=True)
class Release:
    """A move of the champion (promote or rollback) and whether TorchServe was seen serving it.

    ``outcome`` is None while pending, "served" once TorchServe's default was read back as
    ``to_version``, "superseded" when a later release moved the champion first."""

    id: int
    at: str
    kind: str
    from_version: str | None
    to_version: str
    reason: str | None
    outcome: str | None
    closed_at: str | None


@dataclass(frozen=True)
class Event:
    id: int
    at: str
    kind: str
    version: str | None
    reason: str | None
    reasons: list[str]
    detail: dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of a version, written in the transaction that registers it.

    ``champion``: the champion it was judged against (None: there was none). A passed verdict
    makes the version promotable while that champion serves; a failed one never (without an
    override). ``words``: the gate's own verdict ("passed", "not enough support",
    "rejected")."""

    passed: bool
    champion: str | None
    reasons: Sequence[str] = ()
    words: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, event: Event) -> Verdict:
        """The verdict an event of kind "validated" or "rejected" (at the gate) records."""
        return cls(
            passed=event.kind == "validated",
            champion=event.detail.get("champion"),
            reasons=tuple(event.reasons),
            words=event.detail.get("verdict", ""),
            detail=event.detail,
        )

    def event_detail(self) -> dict[str, Any]:
        return {
            **dict(self.detail),
            "stage": "gate",
            "champion": self.champion,
            "verdict": self.words or ("passed" if self.passed else "rejected"),
        }


class Registry:
    """The model registry of one model (one SQLite file, or one Postgres schema). Safe across
    processes."""

    def __init__(self, where: Location | str, busy_timeout_ms: int = 10_000) -> None:
        """``where``: the SQLite file (a path), or a Postgres schema (``core.db.Postgres``)."""
        self.location = where if isinstance(where, Postgres) else Path(where)
        self.db = Database(
            self.location,
            timeout_s=busy_timeout_ms / 1000,
            pragmas=("foreign_keys=ON", "synchronous=FULL"),
        )
        _migrate(self.db)
        self.db.initialize(_SCHEMA[self.db.dialect])

    @classmethod
    def for_settings(cls, settings: Settings) -> Registry:
        """The registry of the settings' home: its SQLite file, or Postgres in the scale
        profile."""
        return cls(settings.registry_location)

    @property
    def path(self) -> Location:
        """Where the registry is (a file path, or a Postgres schema): for messages."""
        return self.location

    def _transaction(self) -> AbstractContextManager[Connection]:
        return self.db.transaction()

    def _read(self) -> AbstractContextManager[Connection]:
        return self.db.connect()

    # --- writing -------------------------------------------------------------------------

    def register(
        self, record: ModelRecord, verdict: Verdict | None, *, verify_files: bool = True
    ) -> str:
        """Adds a version with its lineage and the gate's verdict in one transaction; returns
        its id. A passed verdict makes it the challenger; a failed one records the rejection
        with every reason; None (a model made outside the gate) leaves it promotable only by
        an override.

        Artifact files are re-hashed first and must match `record.artifacts`, so the registry
        never points at a file it has not seen intact. The same artifacts registered twice
        return the first version, with the new verdict appended when it differs (judged again,
        against another champion).
        """
        if not record.artifacts:
            raise ValueError("a model version needs at least one artifact file")
        sizes = self._check_files(record) if verify_files else dict.fromkeys(record.artifacts, 0)
        with self._transaction() as con:
            existing = con.execute(
                "SELECT version FROM versions WHERE content_hash = ?", (record.content_hash,)
            ).fetchone()
            if existing:
                version = str(existing["version"])
                last = _last_verdict(con, version)
                if verdict is not None and (
                    last is None
                    or (last.passed, last.champion) != (verdict.passed, verdict.champion)
                ):
                    _judge(con, version, verdict)
                return version
            seq = con.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions").fetchone()[0]
            version = f"v{seq:04d}"
            con.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    version,
                    seq,
                    record.model_name,
                    _now(),
                    record.content_hash,
                    str(record.artifact_dir),
                    record.dagster_run_id,
                    record.code_version,
                    record.training_set_version,
                    record.feature_service,
                    _dumps(list(record.training_batches)),
                    _dumps(record.data_window),
                    _dumps(record.hyperparameters),
                    _dumps(record.metrics),
                    _dumps(record.extra),
                ),
            )
            self._insert_artifacts(con, version, record, sizes)
            _event(con, "registered", version, detail={"seq": seq})
            if verdict is not None:
                _judge(con, version, verdict)
        return version

    def judge(self, version: str, verdict: Verdict) -> None:
        """Records a new gate verdict for a registered version: judged again, as against a new
        champion. Its newest verdict is the one promotion reads."""
        with self._transaction() as con:
            _require_version(con, version)
            if _get_alias(con, CHAMPION) == version:
                raise RegistryError(
                    f"{version} is the champion: there is nothing to judge it against"
                )
            _judge(con, version, verdict)

    def _insert_artifacts(
        self, con: Connection, version: str, record: ModelRecord, sizes: Mapping[str, int]
    ) -> None:
        con.executemany(
            "INSERT INTO artifacts VALUES (?,?,?,?)",
            [(version, p, sha, sizes[p]) for p, sha in sorted(record.artifacts.items())],
        )

    def _check_files(self, record: ModelRecord) -> dict[str, int]:
        root = Path(record.artifact_dir)
        sizes = {}
        for rel, expected in record.artifacts.items():
            path = root / rel
            if not path.is_file():
                raise RegistryError(f"artifact {path} does not exist")
            if sha256_file(path) != expected:
                raise RegistryError(f"artifact {path} does not match its recorded sha256")
            sizes[rel] = path.stat().st_size
        return sizes

    def set_alias(self, alias: str, version: str, reason: str | None = None) -> None:
        """Points an alias at a version; the champion moves only through promote/rollback."""
        if alias == CHAMPION:
            raise RegistryError("the champion alias moves only through promote() or rollback()")
        with self._transaction() as con:
            _require_version(con, version)
            previous = _get_alias(con, alias)
            _set_alias(con, alias, version)
            _event(con, "alias_set", version, reason, detail={"alias": alias, "from": previous})

    def remove_alias(self, alias: str, reason: str | None = None) -> None:
        if alias == CHAMPION:
            raise RegistryError("the champion alias moves only through promote() or rollback()")
        with self._transaction() as con:
            previous = _get_alias(con, alias)
            if previous is None:
                return
            con.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
            _event(con, "alias_removed", previous, reason, detail={"alias": alias})

    def reject(self, version: str, reasons: Sequence[str]) -> None:
        """Records a rejection after the gate (delivery, a person) with every reason; a rejected
        version stops being challenger and is promotable only by an override. The gate's own
        verdict is written with the version (``register``)."""
        if not reasons:
            raise ValueError("a rejection needs at least one reason")
        with self._transaction() as con:
            _require_version(con, version)
            if _get_alias(con, CHAMPION) == version:
                raise RegistryError(f"{version} is the champion; roll back before rejecting it")
            cleared = _clear_challenger(con, version)
            _event(
                con,
                "rejected",
                version,
                reasons=list(reasons),
                detail={"stage": "delivery", "challenger_alias_cleared": cleared},
            )

    def record_deployment(
        self, version: str, step: str, passed: bool, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Appends one step of a version's progressive delivery (smoke, shadow, watch...)."""
        with self._transaction() as con:
            _require_version(con, version)
            _event(
                con,
                "deployment",
                version,
                f"{step}: {'passed' if passed else 'failed'}",
                detail={"step": step, "passed": passed, **dict(detail or {})},
            )

    def promotion_refusal(self, version: str) -> str | None:
        """Why promoting ``version`` now needs an override (None: it may be promoted, or it is
        the champion already and only TorchServe has to follow)."""
        with self._read() as con:
            _require_version(con, version)
            champion = _get_alias(con, CHAMPION)
            return None if champion == version else _refusal(con, version, champion)

    def verdict(self, version: str) -> Verdict | None:
        """The gate's latest verdict on ``version`` (None: never judged)."""
        with self._read() as con:
            return _last_verdict(con, version)

    def promote(self, version: str, reason: str, *, force: bool = False) -> str | None:
        """Makes `version` the champion; returns the previous champion (None for the first).

        Only a version the gate passed against the current champion, and that no deployment
        step rejected or rolled back since, is promoted. Anything else is refused unless
        `force=True`, which needs a reason and is recorded as an "override" event naming what
        was overridden.
        """
        if force and not (reason or "").strip():
            raise RegistryError("an override needs a reason")
        with self._transaction() as con:
            _require_version(con, version)
            previous = _get_alias(con, CHAMPION)
            if previous == version:
                raise RegistryError(f"{version} is already the champion")
            refusal = _refusal(con, version, previous)
            if refusal and not force:
                raise RegistryError(f"{refusal}; an override needs --force and a reason")
            if refusal:
                _event(
                    con,
                    "override",
                    version,
                    reason,
                    reasons=[refusal],
                    detail={"action": "promote", "from": previous, "to": version},
                )
            _set_alias(con, CHAMPION, version)
            _clear_challenger(con, version)
            _open_release(con, "promote", previous, version, reason)
            _event(
                con,
                "promoted",
                version,
                reason,
                detail={"from": previous, "to": version, "forced": bool(refusal)},
            )
            return previous

    def overrides(self) -> list[Event]:
        """Every forced promotion, oldest first: what skipped the gate, when and why."""
        with self._read() as con:
            rows = con.execute("SELECT * FROM events WHERE kind = 'override' ORDER BY id")
            return [_to_event(r) for r in rows.fetchall()]

    def rollback(self, reason: str) -> str:
        """Restores the champion before the current one (per the event log); returns it."""
        with self._transaction() as con:
            current = _get_alias(con, CHAMPION)
            if current is None:
                raise RegistryError("there is no champion to roll back")
            stack = _champion_stack(con)
            if len(stack) < 2 or stack[-1] != current:
                raise RegistryError(f"no previous champion to roll back to from {current}")
            restored = stack[-2]
            _set_alias(con, CHAMPION, restored)
            _open_release(con, "rollback", current, restored, reason)
            _event(con, "rolled_back", current, reason, detail={"from": current, "to": restored})
            return restored

    def confirm_served(self, version: str) -> list[Release] | None:
        """Records that TorchServe was read back serving ``version``: closes every pending
        release, the newest (the champion's) as "served", older ones as "superseded". None
        (nothing closed) when the champion is no longer ``version``: a newer release is to be
        applied first."""
        with self._transaction() as con:
            if _get_alias(con, CHAMPION) != version:
                return None
            now = _now()
            pending = [_to_release(r) for r in con.execute(_PENDING).fetchall()]
            closed = [
                replace(r, outcome="served" if r is pending[-1] else "superseded", closed_at=now)
                for r in pending
            ]
            con.executemany(
                "UPDATE releases SET outcome = ?, closed_at = ? WHERE id = ?",
                [(r.outcome, r.closed_at, r.id) for r in closed],
            )
        return closed

    # --- reading -------------------------------------------------------------------------

    def releases(self, *, pending: bool = False) -> list[Release]:
        """Champion moves, oldest first; with ``pending``, those TorchServe was not yet seen
        serving."""
        with self._read() as con:
            query = _PENDING if pending else "SELECT * FROM releases ORDER BY id"
            return [_to_release(r) for r in con.execute(query).fetchall()]

    def get_alias(self, alias: str) -> str | None:
        with self._read() as con:
            return _get_alias(con, alias)

    def champion_stack(self) -> list[str]:
        """Champions in promotion order, current last: what rollback walks back through."""
        with self._read() as con:
            return _champion_stack(con)

    def aliases(self) -> dict[str, str]:
        with self._read() as con:
            return {
                r["alias"]: r["version"] for r in con.execute("SELECT alias, version FROM aliases")
            }

    def get(self, version: str) -> ModelVersion:
        with self._read() as con:
            row = con.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise KeyError(f"unknown model version {version!r}")
            return self._version(con, row)

    def list_versions(self) -> list[ModelVersion]:
        with self._read() as con:
            rows = con.execute("SELECT * FROM versions ORDER BY seq").fetchall()
            return [self._version(con, r) for r in rows]

    def events(self, version: str | None = None) -> list[Event]:
        """The event log, oldest first; with a version, the events about it."""
        with self._read() as con:
            if version is None:
                rows = con.execute("SELECT * FROM events ORDER BY id").fetchall()
            else:
                rows = con.execute(
                    f"SELECT * FROM events WHERE version = ? OR {_DETAIL_TO[self.db.dialect]} = ? "
                    "ORDER BY id",
                    (version, version),
                ).fetchall()
            return [_to_event(r) for r in rows]

    def lineage(self, version: str) -> dict[str, Any]:
        return self.get(version).lineage()

    def verify(self, version: str) -> list[str]:
        """Re-hashes a version's files; the problems found (empty when intact)."""
        mv = self.get(version)
        problems = []
        for rel, art in mv.artifacts.items():
            path = mv.artifact_path(rel)
            if not path.is_file():
                problems.append(f"{rel} is missing")
            elif sha256_file(path) != art["sha256"]:
                problems.append(f"{rel} does not match its recorded sha256")
        return problems

    def _version(self, con: Connection, row: Any) -> ModelVersion:
        version = row["version"]
        artifacts = {
            a["path"]: {"sha256": a["sha256"], "size_bytes": a["size_bytes"]}
            for a in con.execute(
                "SELECT path, sha256, size_bytes FROM artifacts WHERE version = ? ORDER BY path",
                (version,),
            )
        }
        aliases = [
            a["alias"]
            for a in con.execute(
                "SELECT alias FROM aliases WHERE version = ? ORDER BY alias", (version,)
            )
        ]
        return ModelVersion(
            version=version,
            seq=row["seq"],
            model_name=row["model_name"],
            created_at=row["created_at"],
            content_hash=row["content_hash"],
            artifact_dir=row["artifact_dir"],
            dagster_run_id=row["dagster_run_id"],
            code_version=row["code_version"],
            training_set_version=row["training_set_version"],
            feature_service=row["feature_service"],
            training_batches=json.loads(row["training_batches"]),
            data_window=json.loads(row["data_window"]),
            hyperparameters=json.loads(row["hyperparameters"]),
            metrics=json.loads(row["metrics"]),
            extra=json.loads(row["extra"]),
            artifacts=artifacts,
            aliases=aliases,
            status=_status(con, version, aliases),
        )


def _status(con: Connection, version: str, aliases: list[str]) -> str:
    if CHAMPION in aliases:
        return CHAMPION
    last = con.execute(
        "SELECT kind FROM events WHERE version = ? AND kind IN ('rejected', 'promoted', 'rolled_back') "
        "ORDER BY id DESC LIMIT 1",
        (version,),
    ).fetchone()
    if last is not None:
        return "rejected" if last["kind"] == "rejected" else "retired"
    return CHALLENGER if CHALLENGER in aliases else "registered"


def _clear_challenger(con: Connection, version: str) -> bool:
    """Drops the challenger alias if it names ``version``; whether it did."""
    if _get_alias(con, CHALLENGER) != version:
        return False
    con.execute("DELETE FROM aliases WHERE alias = ?", (CHALLENGER,))
    return True


def _judge(con: Connection, version: str, verdict: Verdict) -> None:
    """Records the gate's verdict; a rejected version stops being the challenger."""
    if verdict.passed:
        _set_alias(con, CHALLENGER, version)
        _event(con, "validated", version, detail=verdict.event_detail())
        return
    if not verdict.reasons:
        raise ValueError("a rejection needs at least one reason")
    _clear_challenger(con, version)
    _event(con, "rejected", version, reasons=list(verdict.reasons), detail=verdict.event_detail())


def _last_verdict(con: Connection, version: str) -> Verdict | None:
    rows = con.execute(
        "SELECT * FROM events WHERE version = ? AND kind IN ('validated', 'rejected') "
        "ORDER BY id DESC",
        (version,),
    ).fetchall()
    for row in rows:
        event = _to_event(row)
        if event.kind == "validated" or event.detail.get("stage") == "gate":
            return Verdict.of(event)
    return None


def _refusal(con: Connection, version: str, champion: str | None) -> str | None:
    """Why ``version`` may not replace ``champion`` without an override (None: it may).

    Its newest judgement must be the gate's pass against that very champion; a deployment
    rejection or a rollback away from it after that pass voids it."""
    rows = con.execute(
        "SELECT * FROM events WHERE version = ? AND kind IN ('validated', 'rejected', "
        "'rolled_back') ORDER BY id DESC LIMIT 1",
        (version,),
    ).fetchall()
    if not rows:
        return f"{version} has no gate verdict"
    last = _to_event(rows[0])
    if last.kind == "rolled_back":
        return f"{version} was rolled back ({last.reason})"
    if last.kind == "rejected":
        stage = "the gate" if last.detail.get("stage") == "gate" else "delivery"
        return f"{version} was rejected by {stage}: {'; '.join(last.reasons)}"
    judged = last.detail.get("champion")
    if judged != champion:
        return (
            f"{version} was judged against {judged or 'no champion'}, and the champion is now "
            f"{champion or 'none'}: evaluate it again"
        )
    return None


def _migrate(db: Database) -> None:
    """Brings a registry made by an older Loopline to the current schema (the event kinds'
    CHECK constraint, the only change so far), in one transaction."""
    kinds = ", ".join(f"'{k}'" for k in EVENT_KINDS)
    if db.dialect == SQLITE:
        if not (isinstance(db.location, Path) and db.location.exists()):
            return
        with db.transaction() as con:
            row = con.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
            if row is None or "'override'" in row[0]:
                return
            con.execute("ALTER TABLE events RENAME TO events_v1")
            table = _TABLES.split("CREATE TABLE IF NOT EXISTS events")[1].split(";")[0]
            con.execute(
                "CREATE TABLE events" + table.format(id="INTEGER PRIMARY KEY AUTOINCREMENT")
            )
            con.execute("INSERT INTO events SELECT * FROM events_v1")
            con.execute("DROP TABLE events_v1")  # its index and triggers go with it
        return
    if not db.exists():
        return
    with db.transaction() as con:
        row = con.execute(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE c.conname = 'events_kind_check' AND n.nspname = ?",
            (db.location.schema,),
        ).fetchone()
        if row is None or "'override'" in row[0]:
            return
        con.execute(
            "ALTER TABLE events DROP CONSTRAINT events_kind_check, "
            f"ADD CONSTRAINT events_kind_check CHECK (kind IN ({kinds}))"
        )


def _champion_stack(con: Connection) -> list[str]:
    """Replays promotions (push) and rollbacks (pop) to get the champion history."""
    stack: list[str] = []
    for row in con.execute(
        "SELECT kind, detail FROM events WHERE kind IN ('promoted', 'rolled_back') ORDER BY id"
    ):
        if row["kind"] == "promoted":
            stack.append(json.loads(row["detail"])["to"])
        elif stack:
            stack.pop()
    return stack


def _require_version(con: Connection, version: str) -> None:
    if con.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone() is None:
        raise KeyError(f"unknown model version {version!r}")


def _get_alias(con: Connection, alias: str) -> str | None:
    row = con.execute("SELECT version FROM aliases WHERE alias = ?", (alias,)).fetchone()
    return None if row is None else str(row["version"])


def _set_alias(con: Connection, alias: str, version: str) -> None:
    con.execute(
        "INSERT INTO aliases VALUES (?,?,?) "
        "ON CONFLICT(alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
        (alias, version, _now()),
    )


_PENDING = "SELECT * FROM releases WHERE outcome IS NULL ORDER BY id"


def _open_release(
    con: Connection, kind: str, source: str | None, target: str, reason: str | None
) -> None:
    con.execute(
        "INSERT INTO releases (at, kind, from_version, to_version, reason) VALUES (?,?,?,?,?)",
        (_now(), kind, source, target, reason),
    )


def _to_release(row: Any) -> Release:
    return Release(**{k: row[k] for k in row.keys()})  # noqa: SIM118 (a database row)


def _event(
    con: Connection,
    kind: str,
    version: str | None,
    reason: str | None = None,
    *,
    reasons: Sequence[str] = (),
    detail: Mapping[str, Any] | None = None,
) -> None:
    con.execute(
        "INSERT INTO events (at, kind, version, reason, reasons, detail) VALUES (?,?,?,?,?,?)",
        (_now(), kind, version, reason, _dumps(list(reasons)), _dumps(dict(detail or {}))),
    )


def _to_event(row: Any) -> Event:
    return Event(
        id=row["id"],
        at=row["at"],
        kind=row["kind"],
        version=row["version"],
        reason=row["reason"],
        reasons=json.loads(row["reasons"]),
        detail=json.loads(row["detail"]),
    )


def _dumps(value: Any) -> str:
    return json.dumps(json_safe(value), sort_keys=True)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
