"""Health at a glance: `loopline status` shows disk use per store, TorchServe's key expiry and
each sensor's last tick; the platform_health check fails, and alerts once, when a sensor stops
ticking."""

import json
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from click.testing import CliRunner
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteInstigatorOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.scheduler.instigation import (
    InstigatorState,
    InstigatorStatus,
    SensorInstigatorData,
    TickData,
    TickStatus,
)

from core.settings import Settings
from orchestration import cli_loop, health
from orchestration.cli import main
from orchestration.definitions import defs
from orchestration.platform import write_instance_config
from orchestration.resources import LooplineStorage

NOW = datetime.now(UTC)


@pytest.fixture(autouse=True)
def _now():
    """Each test's "now" is when it starts: the suite may run it minutes after collection."""
    global NOW
    NOW = datetime.now(UTC)


def _ticked(instance: dg.DagsterInstance, name: str, interval: int, ago: timedelta) -> None:
    """A running sensor whose last tick was ``ago``, recorded as the daemon records it."""
    origin = RemoteInstigatorOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("loopline"), "__repository__"), name
    )
    state = InstigatorState(
        origin,
        InstigatorType.SENSOR,
        InstigatorStatus.DECLARED_IN_CODE,
        SensorInstigatorData(min_interval=interval),
    )
    if instance.get_instigator_state(state.instigator_origin_id, state.selector_id) is None:
        instance.add_instigator_state(state)
    instance.create_tick(
        TickData(
            instigator_origin_id=state.instigator_origin_id,
            instigator_name=name,
            instigator_type=InstigatorType.SENSOR,
            status=TickStatus.SKIPPED,
            timestamp=(NOW - ago).timestamp(),
            selector_id=state.selector_id,
        )
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home that ran: files in two stores, TorchServe's key file, an instance where the
    landing sensor ticked 3 s ago and the monitoring sensor 2 hours ago."""
    home = tmp_path / "home"
    monkeypatch.setenv("LOOPLINE_HOME", str(home))
    settings = Settings.from_env().ensure()
    (settings.landing / "a.csv").write_bytes(b"x" * 1000)
    (settings.archive / "transactions").mkdir(parents=True)
    (settings.archive / "transactions" / "0123abcd__b.csv").write_bytes(b"y" * 2500)
    settings.serving_dir.mkdir(parents=True)
    expires = (NOW + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")
    keys = {kind: {"key": "k", "expiration time": expires} for kind in ("inference", "management")}
    (settings.serving_dir / "key_file.json").write_text(json.dumps(keys | {"API": {"key": "a"}}))
    config = write_instance_config(settings)
    started = time.time() - 600  # `loopline run` started 10 minutes ago
    os.utime(config, (started, started))
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    _ticked(instance, "landing_sensor", 5, timedelta(seconds=3))
    _ticked(instance, "monitoring_sensor", 30, timedelta(hours=2))
    yield settings, instance
    instance.dispose()


def test_status_json_shows_disk_keys_and_sensor_ages(home):
    result = CliRunner().invoke(main, ["status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["health"]
    assert report["disk_bytes"]["landing"] == 1000
    assert report["disk_bytes"]["archive"] == 2500
    assert 3 * 86400 - 120 < report["keys"]["expires_in_s"] <= 3 * 86400
    ticks = {t["name"]: t for t in report["sensors"]}
    assert ticks["landing_sensor"]["age_s"] < 120 and not ticks["landing_sensor"]["stale"]
    assert ticks["monitoring_sensor"]["age_s"] > 7000 and ticks["monitoring_sensor"]["stale"]
    # Declared in the code but never ticked in 10 minutes: stalled as well.
    assert ticks["retrain_sensor"]["last_tick_at"] is None and ticks["retrain_sensor"]["stale"]
    assert "monitoring_sensor" in report["stale_sensors"]
    assert "landing_sensor" not in report["stale_sensors"]
    assert report["ok"] is False

    text = CliRunner().invoke(main, ["status"], catch_exceptions=False).output
    assert "monitoring_sensor" in text and "STALE" in text and "key expiry" in text


def _evaluator(settings: Settings, instance: dg.DagsterInstance):
    """One tick of platform_health_sensor from a cursor."""

    def evaluate(cursor: str | None = None) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            repository_def=defs.get_repository_def(),
            sensor_name="platform_health_sensor",
            resources={"storage": LooplineStorage(home=str(settings.home))},
        )
        return health.platform_health_sensor(context)

    return evaluate


def test_the_health_check_fails_and_alerts_once_when_a_sensor_stops(home, caplog):
    settings, instance = home
    repository = defs.get_repository_def()
    evaluate = _evaluator(settings, instance)

    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        first = evaluate()
        again = evaluate(first.cursor)
    [materialization, check] = first.asset_events
    assert check.check_name == "sensors_ticking" and check.passed is False
    assert "monitoring_sensor" in check.description
    assert materialization.metadata["disk_bytes/landing"].value == 1000
    alerts = [r for r in caplog.records if '"sensor_stalled"' in r.getMessage()]
    assert len(alerts) == 1, "one alert per stall, not one per evaluation"
    assert again.asset_events == []  # evaluated, unchanged: not recorded again within the hour

    # Every declared sensor ticks again: the check passes.
    for sensor in repository.sensor_defs:
        _ticked(instance, sensor.name, 30, timedelta(seconds=1))
    assert evaluate(again.cursor).asset_events[1].passed is True


def test_a_fresh_start_is_not_a_stall(tmp_path):
    """Sensors that have not ticked yet a minute after start are not called stalled."""
    settings = Settings(tmp_path / "home").ensure()
    write_instance_config(settings)
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        report = health.health_report(
            settings, instance, declared=health.declared_sensors(defs.get_repository_def())
        )
    finally:
        instance.dispose()
    assert report["sensors"] and report["stale_sensors"] == [] and report["ok"]
    assert report["keys"] is None  # no TorchServe ran


def _promoted(settings: Settings) -> str:
    """A champion promoted now that TorchServe was never seen serving (a pending release)."""
    from models.registry import ModelRecord, Registry, Verdict

    registry = Registry(settings.registry_path)
    record = ModelRecord(
        model_name="fraud",
        artifact_dir=str(settings.home / "model0"),
        artifacts={"model.pt": "0" * 64},
        training_set_version="ts",
        feature_service="fraud_model_v1",
        training_batches=[],
        hyperparameters={},
        metrics={"pr_auc": 0.3, "threshold": 0.5},
        data_window={},
    )
    version = registry.register(record, Verdict(True, None), verify_files=False)
    registry.promote(version, "test")
    return version


def test_status_shows_pending_releases_and_a_stuck_one_marks_the_platform_not_ok(tmp_path):
    settings = Settings(tmp_path / "home").ensure()
    version = _promoted(settings)

    fresh = health.health_report(settings, None)
    [release] = fresh["pending_releases"]
    assert release["kind"] == "promote" and release["to_version"] == version
    assert not release["stuck"] and fresh["ok"]  # the reconciler has minutes to confirm it

    later = health.health_report(settings, None, now=NOW + timedelta(minutes=10))
    assert later["pending_releases"][0]["stuck"] and later["stuck_releases"] == [version]
    assert later["ok"] is False
    lines = dict(cli_loop._health_lines(later))
    assert f"promote to {version} pending 10 min, STUCK" in lines["release"]

    from models.registry import Registry

    Registry(settings.registry_path).confirm_served(version)  # TorchServe was seen serving it
    done = health.health_report(settings, None, now=NOW + timedelta(minutes=10))
    assert done["pending_releases"] == [] and done["ok"]


def test_status_json_lists_pending_releases(home):
    settings, _ = home
    version = _promoted(settings)
    result = CliRunner().invoke(main, ["status", "--json"], catch_exceptions=False)
    [release] = json.loads(result.output)["health"]["pending_releases"]
    assert release["to_version"] == version and release["stuck"] is False


def test_health_is_recorded_when_it_changes_and_hourly_not_at_every_tick(home):
    """Each record is an event-log entry no retention removes (it belongs to no run)."""
    settings, instance = home
    evaluate = _evaluator(settings, instance)
    first = evaluate()
    assert len(first.asset_events) == 2
    assert evaluate(first.cursor).asset_events == []
    recorded = health.Recorded.parse(first.cursor)
    an_hour_ago = health.Recorded(recorded.alerted, NOW - timedelta(minutes=61), recorded.state)
    assert len(evaluate(an_hour_ago.to_cursor()).asset_events) == 2
    (settings.landing / "b.csv").write_bytes(b"z" * 10)  # disk use alone: not a change
    assert evaluate(first.cursor).asset_events == []

    # A day of 5-minute ticks with nothing changing: 24 records, not 288.
    last, records = health.Recorded(), 0
    for tick in range(288):
        now = NOW + timedelta(minutes=5 * tick)
        if health.due(last, recorded.state, now):
            last, records = health.Recorded((), now, recorded.state), records + 1
    assert records == 24


def test_a_stuck_release_is_recorded_at_once_and_alerts_once(home, caplog):
    settings, instance = home
    evaluate = _evaluator(settings, instance)
    first = evaluate()
    version = _promoted(settings)
    ten_minutes_ago = (NOW - timedelta(minutes=10)).isoformat()
    with sqlite3.connect(settings.registry_path) as con:  # promoted 10 minutes ago
        con.execute("UPDATE releases SET at = ?", (ten_minutes_ago,))
    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        stuck = evaluate(first.cursor)
        again = evaluate(stuck.cursor)
    [materialization, _] = stuck.asset_events  # a change: recorded within the hour
    assert materialization.metadata["stuck_releases"].value == version
    assert again.asset_events == []
    sent = [json.loads(r.getMessage()) for r in caplog.records]
    [alert] = [a for a in sent if a["alert"] == "release_stuck"]
    assert version in alert["summary"] and "STUCK" in alert["summary"]


def test_an_override_is_recorded_at_once_shown_in_the_ui_and_alerts_once(home, caplog):
    from dataclasses import replace

    from models.registry import Registry

    settings, instance = home
    evaluate = _evaluator(settings, instance)
    _promoted(settings)
    registry = Registry(settings.registry_path)
    [champion] = registry.list_versions()
    record = replace(_record_of(champion), artifacts={"model.pt": "1" * 64})
    ungated = registry.register(record, None, verify_files=False)
    registry.confirm_served(champion.version)
    first = evaluate()
    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        registry.promote(ungated, "hotfix INC-42", force=True)
        registry.confirm_served(ungated)
        recorded = evaluate(first.cursor)
        again = evaluate(recorded.cursor)
    [materialization, _] = recorded.asset_events  # a change: recorded within the hour
    assert "hotfix INC-42" in materialization.metadata["overrides"].value
    assert again.asset_events == []
    sent = [json.loads(r.getMessage()) for r in caplog.records]
    [alert] = [a for a in sent if a["alert"] == "override"]
    assert ungated in alert["summary"] and "no gate verdict" in alert["summary"]


def _record_of(version):
    from models.registry import ModelRecord

    return ModelRecord(
        model_name=version.model_name,
        artifact_dir=version.artifact_dir,
        artifacts={},
        training_set_version=version.training_set_version,
        feature_service=version.feature_service,
        training_batches=version.training_batches,
        hyperparameters=version.hyperparameters,
        metrics=version.metrics,
        data_window=version.data_window,
    )
