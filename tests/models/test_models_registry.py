from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from models.artifact import load_model, save_training_result
from models.checksum import file_checksums
from models.registry import ModelRecord, Registry, RegistryError, Verdict
from models.train import train_model
from tests.models.testkit import FAST, SPEC


def _record(tmp_path: Path, name: str, **overrides) -> ModelRecord:
    root = tmp_path / "artifacts" / name
    root.mkdir(parents=True)
    (root / "model.pt").write_bytes(f"weights of {name}".encode())
    (root / "model.json").write_text(json.dumps({"name": name}))
    fields = {
        "model_name": "fraud",
        "artifact_dir": str(root),
        "artifacts": file_checksums(root),
        "training_set_version": f"ts-{name}",
        "feature_service": "fraud_model_v1",
        "training_batches": [f"{name}-b1", f"{name}-b2"],
        "hyperparameters": {"lr": 0.003},
        "metrics": {"pr_auc": 0.5},
        "data_window": {"start": "2026-10-01T00:00:00+00:00", "end": "2026-10-31T00:00:00+00:00"},
        "dagster_run_id": f"run-{name}",
        "code_version": "abc123",
    }
    fields.update(overrides)
    return ModelRecord(**fields)


FIRST = Verdict(passed=True, champion=None, words="passed")  # the gate's pass, no champion yet


def _passed(registry: Registry, name: str, tmp_path: Path) -> str:
    """A version the gate passed against the champion serving now."""
    return registry.register(_record(tmp_path, name), Verdict(True, registry.get_alias("champion")))


@pytest.fixture
def registry(store_at) -> Registry:
    return Registry(store_at("registry.db"))


def test_a_local_registry_uses_wal(tmp_path):
    registry = Registry(tmp_path / "registry.db")
    con = sqlite3.connect(registry.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_lineage_of_a_registered_model_leads_back_to_its_data(registry, training_set, tmp_path):
    result = train_model(training_set, SPEC, FAST)
    saved = save_training_result(result, tmp_path / "m", golden_rows=training_set.head(8))
    version = registry.register(
        ModelRecord(
            model_name="fraud",
            artifact_dir=str(saved.path),
            artifacts=saved.checksums,
            training_set_version="training_set@2026-11-20T10:00",
            feature_service="fraud_model_v1",
            training_batches=["batch-0001", "batch-0002"],
            hyperparameters=result.config.to_dict(),
            metrics={"pr_auc": 0.81},
            data_window=result.data_window,
            dagster_run_id="run-42",
            code_version="git:1a2b3c",
        ),
        FIRST,
    )
    assert version == "v0001"
    lineage = registry.lineage(version)
    assert lineage["training_set_version"] == "training_set@2026-11-20T10:00"
    assert lineage["training_batches"] == ["batch-0001", "batch-0002"]
    assert lineage["dagster_run_id"] == "run-42" and lineage["code_version"] == "git:1a2b3c"
    assert lineage["feature_service"] == "fraud_model_v1"
    assert (
        lineage["data_window"]["splits"]["test"]["rows"]
        == result.data_window["splits"]["test"]["rows"]
    )
    assert lineage["artifacts"] == saved.checksums
    mv = registry.get(version)
    assert mv.hyperparameters["seed"] == FAST.seed and mv.status == "challenger"
    assert registry.verify(version) == []
    module, _ = load_model(mv.artifact_dir)
    assert module.architecture == result.model.architecture
    assert [e.kind for e in registry.events(version)] == ["registered", "validated"]
    assert registry.verdict(version) == Verdict(
        True, None, (), "passed", {"stage": "gate", "champion": None, "verdict": "passed"}
    )


def test_registering_the_same_artifacts_twice_returns_the_first_version(registry, tmp_path):
    record = _record(tmp_path, "a")
    assert registry.register(record, FIRST) == registry.register(record, FIRST) == "v0001"
    assert [e.kind for e in registry.events()] == ["registered", "validated"]


def test_artifacts_that_do_not_match_their_checksums_are_refused(registry, tmp_path):
    record = _record(tmp_path, "a")
    (Path(record.artifact_dir) / "model.pt").write_bytes(b"changed after hashing")
    with pytest.raises(RegistryError, match="does not match"):
        registry.register(record, FIRST)
    assert registry.list_versions() == [] and registry.events() == []


def test_promote_then_rollback_restores_the_previous_champion(registry, tmp_path):
    v1 = _passed(registry, "a", tmp_path)
    assert registry.get_alias("challenger") == v1
    assert registry.promote(v1, "first model") is None
    v2 = _passed(registry, "b", tmp_path)
    assert registry.get_alias("challenger") == v2
    assert registry.promote(v2, "gate passed") == v1
    assert registry.get_alias("champion") == v2 and registry.get_alias("challenger") is None
    restored = registry.rollback("live precision dropped")
    assert restored == v1 and registry.get_alias("champion") == v1
    event = registry.events()[-1]
    assert (event.kind, event.version, event.reason) == (
        "rolled_back",
        v2,
        "live precision dropped",
    )
    assert event.detail == {"from": v2, "to": v1}
    assert registry.get(v2).status == "retired" and registry.get(v1).status == "champion"
    assert "rolled_back" in [e.kind for e in registry.events(v1)]
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback("again")


def test_rollbacks_walk_back_through_champion_history(registry, tmp_path):
    versions = []
    for n in "abc":
        versions.append(_passed(registry, n, tmp_path))
        registry.promote(versions[-1], "promote")
    assert registry.rollback("r1") == versions[1]
    assert registry.rollback("r2") == versions[0]
    with pytest.raises(RegistryError, match="rolled back"):  # rolled back from: not again
        registry.promote(versions[2], "re-promote")
    registry.promote(versions[2], "re-promote: the breach was the network", force=True)
    assert registry.rollback("r3") == versions[0]


def test_a_gate_rejection_is_written_with_the_version_and_only_an_override_promotes_it(
    registry, tmp_path
):
    reasons = ["does not beat baseline", "slice country=FR regresses by 0.12"]
    v1 = registry.register(_record(tmp_path, "a"), Verdict(False, None, reasons, "rejected"))
    assert [e.kind for e in registry.events(v1)] == ["registered", "rejected"]
    assert registry.events(v1)[-1].reasons == reasons
    assert registry.get(v1).status == "rejected" and registry.get_alias("challenger") is None
    with pytest.raises(RegistryError, match="rejected by the gate: does not beat baseline"):
        registry.promote(v1, "try anyway")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.promote(v1, " ", force=True)
    registry.promote(v1, "manual override: the baseline was mislabelled", force=True)
    assert registry.get_alias("champion") == v1
    override, promoted = registry.events()[-2:]
    assert (override.kind, override.reason) == (
        "override",
        "manual override: the baseline was mislabelled",
    )
    assert override.reasons == [f"{v1} was rejected by the gate: {'; '.join(reasons)}"]
    assert promoted.kind == "promoted" and promoted.detail["forced"] is True
    assert registry.overrides() == [override]


def test_a_champion_move_opens_a_pending_release_in_its_own_transaction(registry, tmp_path):
    v1 = _passed(registry, "a", tmp_path)
    registry.promote(v1, "first")
    v2 = _passed(registry, "b", tmp_path)
    registry.promote(v2, "better")
    registry.rollback("worse live")
    pending = registry.releases(pending=True)
    assert [(r.kind, r.from_version, r.to_version, r.reason) for r in pending] == [
        ("promote", None, v1, "first"),
        ("promote", v1, v2, "better"),
        ("rollback", v2, v1, "worse live"),
    ]
    assert registry.confirm_served(v2) is None  # no longer the champion: nothing closed
    assert len(registry.releases(pending=True)) == 3
    closed = registry.confirm_served(v1)
    assert [r.outcome for r in closed] == ["superseded", "superseded", "served"]
    assert registry.releases(pending=True) == [] and registry.confirm_served(v1) == []
    with registry.db.connect() as con:
        for sql in ("UPDATE releases SET outcome = NULL", "DELETE FROM releases"):
            with pytest.raises(registry.db.errors, match="final|never deleted"):
                con.execute(sql)


def test_a_refused_promotion_opens_no_release(registry, tmp_path):
    v1 = registry.register(
        _record(tmp_path, "a"), Verdict(False, None, ["worse than the baseline"])
    )
    with pytest.raises(RegistryError):
        registry.promote(v1, "try anyway")
    assert registry.releases() == []


def test_event_log_and_versions_are_append_only(registry, tmp_path):
    registry.register(_record(tmp_path, "a"), FIRST)
    with registry.db.connect() as con:
        for sql in (
            "UPDATE events SET kind = 'promoted'",
            "DELETE FROM events",
            "UPDATE versions SET training_set_version = 'other'",
            "DELETE FROM versions",
        ):
            with pytest.raises(registry.db.errors, match="append-only|immutable"):
                con.execute(sql)


def test_champion_alias_moves_only_by_promotion(registry, tmp_path):
    v1 = registry.register(_record(tmp_path, "a"), FIRST)
    with pytest.raises(RegistryError, match="promote"):
        registry.set_alias("champion", v1)
    registry.set_alias("shadow", v1, reason="replay traffic")
    assert registry.aliases() == {"challenger": v1, "shadow": v1}
    with pytest.raises(KeyError):
        registry.set_alias("shadow", "v0099")


def _register_and_crash(
    registry: Registry, record: ModelRecord, patched: str, verdict: str
) -> None:
    """Registers ``record`` in another process that dies (exit 7) where ``patched`` (a name in
    models.registry) is called."""
    where = registry.location
    at = (
        repr(str(where))
        if isinstance(where, Path)
        else f"Postgres({where.url!r}, {where.schema!r})"
    )
    script = textwrap.dedent(
        f"""
        import os
        import models.registry as r
        from core.db import Postgres
        def crash(*args, **kwargs):
            os._exit(7)
        r.{patched} = crash
        r.Registry({at}).register(r.ModelRecord(**{record.__dict__!r}), {verdict})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr


def test_a_crash_mid_registration_leaves_no_half_entry(registry, tmp_path):
    record = _record(tmp_path, "a")
    # The process dies after the version row, before its artifacts and event.
    _register_and_crash(registry, record, "Registry._insert_artifacts", "None")
    assert registry.list_versions() == [] and registry.events() == [] and registry.aliases() == {}
    assert registry.register(record, None) == "v0001"


def test_concurrent_registrations_get_distinct_versions(registry, tmp_path):
    records = [_record(tmp_path, f"m{i}") for i in range(6)]
    got: list[str] = []
    threads = [
        threading.Thread(target=lambda r=r: got.append(registry.register(r, FIRST)))
        for r in records
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"v{i:04d}" for i in range(1, 7)]


def test_a_version_never_gated_is_promoted_only_by_an_override(registry, tmp_path):
    v1 = registry.register(_record(tmp_path, "a"), None)  # made outside the gate
    assert registry.verdict(v1) is None and registry.get_alias("challenger") is None
    assert registry.promotion_refusal(v1) == f"{v1} has no gate verdict"
    with pytest.raises(RegistryError, match="no gate verdict; an override needs --force"):
        registry.promote(v1, "looks fine to me")
    assert registry.get_alias("champion") is None and registry.releases() == []
    registry.promote(v1, "imported from the old platform", force=True)
    assert [o.version for o in registry.overrides()] == [v1]


def test_a_pass_against_a_champion_that_no_longer_serves_is_not_enough(registry, tmp_path):
    v1 = _passed(registry, "a", tmp_path)
    v2 = _passed(registry, "b", tmp_path)  # judged against no champion, like v1
    registry.promote(v1, "first")
    with pytest.raises(RegistryError, match=f"judged against no champion.*now {v1}"):
        registry.promote(v2, "also passed")
    registry.judge(v2, Verdict(True, v1))  # evaluated again, against v1
    assert registry.promotion_refusal(v2) is None
    assert registry.promote(v2, "beat v1") == v1
    with pytest.raises(RegistryError, match="is the champion"):
        registry.judge(v2, Verdict(True, v1))


def test_a_rejection_in_delivery_or_a_rollback_voids_the_gate_pass(registry, tmp_path):
    v1 = _passed(registry, "a", tmp_path)
    registry.promote(v1, "first")
    v2 = _passed(registry, "b", tmp_path)
    registry.reject(v2, ["shadow p95 latency 5.1x the champion's"])
    assert registry.promotion_refusal(v2) == (
        f"{v2} was rejected by delivery: shadow p95 latency 5.1x the champion's"
    )
    v3 = _passed(registry, "c", tmp_path)
    registry.promote(v3, "passed shadow")
    registry.rollback("post-promotion watch: error rate 9%")
    with pytest.raises(RegistryError, match=f"{v3} was rolled back \\(post-promotion watch"):
        registry.promote(v3, "again")
    assert registry.get_alias("champion") == v1


def test_a_crash_while_writing_the_verdict_leaves_no_version(registry, tmp_path):
    """Version and verdict are one transaction: a gate-failed version is never left without
    its rejection, promotable."""
    # The process dies after the version row and its artifacts, before the verdict.
    _register_and_crash(
        registry, _record(tmp_path, "a"), "_judge", "r.Verdict(False, None, ['worse'])"
    )
    assert registry.list_versions() == [] and registry.events() == []


def test_a_registry_made_before_verdicts_is_migrated_with_its_history(tmp_path):
    path = tmp_path / "registry.db"
    old = Registry(path)
    v1 = old.register(_record(tmp_path, "a"), None)
    old.promote(v1, "first", force=True)
    with sqlite3.connect(path) as con:  # the schema-1 CHECK: no 'validated', no 'override'
        sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        legacy = sql.replace(", 'validated', 'override'", "")
        con.executescript(
            "PRAGMA foreign_keys=OFF; ALTER TABLE events RENAME TO e0; "
            f"{legacy}; INSERT INTO events SELECT * FROM e0 WHERE kind != 'override'; "
            "DROP TABLE e0; PRAGMA user_version=1;"
        )
        with pytest.raises(sqlite3.IntegrityError):
            con.execute(
                "INSERT INTO events (at, kind, reasons, detail) VALUES ('t', 'override', '[]', '{}')"
            )
        before = con.execute("SELECT id, kind FROM events ORDER BY id").fetchall()
    registry = Registry(path)
    assert [(e.id, e.kind) for e in registry.events()] == before
    v2 = registry.register(_record(tmp_path, "b"), Verdict(True, v1))
    registry.promote(v2, "beat v1")
    assert registry.get_alias("champion") == v2 and registry.rollback("worse") == v1
    with registry.db.connect() as con, pytest.raises(registry.db.errors, match="append-only"):
        con.execute("DELETE FROM events")


def test_the_champion_itself_needs_no_new_verdict_to_be_served_again(registry, tmp_path):
    v1 = _passed(registry, "a", tmp_path)
    registry.promote(v1, "first")
    _passed(registry, "b", tmp_path)
    assert registry.promotion_refusal(v1) is None  # delivering it again only syncs TorchServe
