"""The scheduled retention asset in a temp home: with a registered champion, its files and the
training window survive, old batches and retired models go, and the metadata says what went."""

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg

from core.retention import Limits
from core.settings import Settings
from orchestration.definitions import defs
from orchestration.feature_assets import features_backlog
from orchestration.resources import LooplineStorage
from orchestration.retention_assets import retain_runs, retention, retention_sensor
from quality.ledger import BatchLedger
from tests.serving import lakekit
from tests.serving.lakekit import DAY

NEWEST = datetime(2026, 3, 1, tzinfo=UTC)
VIEWS = ("card_stats_fv", "merchant_stats_fv")


def test_retention_asset_keeps_the_champion_and_removes_the_old(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LOOPLINE_RETAIN_GRACE_MINUTES", "0")
    monkeypatch.setenv("LOOPLINE_RETAIN_ROLLBACK_DEPTH", "1")
    monkeypatch.setenv("LOOPLINE_RETAIN_VALIDATED", "days=3")
    monkeypatch.setenv("LOOPLINE_RETAIN_RAW", "days=3")
    monkeypatch.setenv("LOOPLINE_RETAIN_MODELS", "count=0")
    monkeypatch.setenv("LOOPLINE_RETAIN_MAR", "count=0")
    settings = Settings(home).ensure()
    ledger = BatchLedger(settings.ledger_path)
    for k in range(8):
        lakekit.land(settings, ledger, f"b{k:02d}", NEWEST - (7 - k) * DAY, views=VIEWS)
    old = lakekit.register(settings, "run0")
    champion = lakekit.register(settings, "run1")

    result = dg.materialize([retention], resources={"storage": LooplineStorage(home=str(home))})

    assert result.success
    assert sorted(p.stem for p in (settings.validated / "transactions").iterdir()) == [
        "b04",
        "b05",
        "b06",
        "b07",
    ]
    assert not settings.raw_file("transactions", "b00").exists()
    assert lakekit.mar(settings, champion).exists() and (settings.models / "run1").exists()
    assert not lakekit.mar(settings, old).exists() and not (settings.models / "run0").exists()
    # The online store never loaded these feature files: they stay until it has.
    assert (settings.lake / "features" / VIEWS[0] / "b00.parquet").exists()
    [event] = result.get_asset_materialization_events()
    meta = event.materialization.metadata
    assert meta["removed_files"].value == 4 + 4 + 1 + 1
    assert meta["bytes_after/mar"].value == 300
    detail = meta["detail"].data
    assert detail["validated"]["oldest_kept"] == "transactions/b04.parquet"
    assert detail["features"]["protected"] == {"not loaded online yet": 16}
    assert ledger.summary()["transactions"]["validated_batches"] == 8


def test_retention_runs_every_interval_the_settings_give(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPLINE_RETENTION_INTERVAL_MINUTES", "0.5")
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("retention_sensor")
    assert sensor.job_name == "retention_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    storage = LooplineStorage(home=str(tmp_path / "home"))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        assert isinstance(retention_sensor(context), dg.RunRequest)
        assert isinstance(retention_sensor(context), dg.SkipReason)  # 30 s not passed yet
        context.update_cursor(str(time.time() - 31))
        assert isinstance(retention_sensor(context), dg.RunRequest)


def test_expired_batches_are_no_feature_backlog(tmp_path, monkeypatch):
    """A batch whose validated and feature files retention removed is not computed again (the
    features job would fail reading a file that is gone, on every tick)."""
    home = tmp_path / "home"
    monkeypatch.setenv("LOOPLINE_RETAIN_GRACE_MINUTES", "0")
    for store in ("VALIDATED", "FEATURES"):
        monkeypatch.setenv(f"LOOPLINE_RETAIN_{store}", "days=3")
    settings = Settings(home).ensure()
    ledger = BatchLedger(settings.ledger_path)
    for k in range(6):
        lakekit.land(settings, ledger, f"b{k:02d}", NEWEST - (5 - k) * DAY, views=VIEWS)
    loaded = {
        f"features/{p.parent.name}/{p.name}": [p.stat().st_size, p.stat().st_mtime_ns]
        for p in (settings.lake / "features").rglob("*.parquet")
    }
    (home / "feast").mkdir()
    (home / "feast" / "online_manifest.json").write_text(json.dumps(loaded))
    storage = LooplineStorage(home=str(home))

    assert dg.materialize([retention], resources={"storage": storage}).success

    assert not (settings.lake / "features" / VIEWS[0] / "b00.parquet").exists()
    assert sorted(p.stem for p in (settings.lake / "features" / VIEWS[0]).iterdir()) == [
        "b02",
        "b03",
        "b04",
        "b05",
    ]
    assert features_backlog(storage) == []


def test_old_dagster_runs_go_but_each_asset_keeps_its_latest_materialization(tmp_path):
    @dg.asset
    def thing() -> int:
        return 1

    @dg.op
    def noop() -> None:
        pass

    @dg.job
    def chores():
        noop()

    settings = replace(
        Settings(tmp_path / "home"),
        retention={"dagster_runs": Limits(max_age=timedelta(0))},
        retention_grace_min=0.0,
    )
    with dg.instance_for_test() as instance:
        runs = [dg.materialize([thing], instance=instance).run_id for _ in range(3)]
        runs.append(chores.execute_in_process(instance=instance).run_id)
        decided = retain_runs(instance, settings)
        left = {r.run_id for r in instance.get_runs()}
        latest = instance.get_latest_materialization_event(dg.AssetKey("thing"))
    assert left == {runs[2]} and latest is not None and latest.run_id == runs[2]
    assert {i.name for i in decided.delete} == {runs[0], runs[1], runs[3]}
    assert decided.summary()["protected"] == {"an asset's latest materialization": 1}
