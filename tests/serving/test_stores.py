"""Retention over a fake home: what the champion's lineage, rollback, the training window and
unfinished work need survives; old batches, models and logs go; the ledger keeps a tombstone
for every file it deleted, so each landed batch is still accounted for."""

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from core.retention import Limits
from core.rotating_log import backup_path
from core.settings import Settings
from models.registry import Registry
from quality.ledger import BatchLedger
from serving import stores
from serving.monitoring import log_columns
from serving.stores import disk_usage, retain
from tests.serving import lakekit
from tests.serving.lakekit import DAY

NEWEST = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def home(tmp_path):
    settings = replace(Settings(tmp_path / "home").ensure(), retention_grace_min=0.0)
    return settings, BatchLedger(settings.ledger_path)


def _limits(settings: Settings, **limits: Limits) -> Settings:
    return replace(settings, retention={**settings.retention, **limits})


def test_batches_older_than_the_data_window_go_and_leave_tombstones(home):
    settings, ledger = home
    for k in range(10):  # one batch a day, b09 the newest
        lakekit.land(settings, ledger, f"b{k:02d}", NEWEST - (9 - k) * DAY)
    settings = _limits(
        settings,
        **{s: Limits(max_age=3 * DAY) for s in ("raw", "validated", "features", "archive")},
    )
    report = retain(settings, ledger)

    kept = sorted(p.stem for p in (settings.validated / "transactions").glob("*.parquet"))
    assert kept == ["b06", "b07", "b08", "b09"]  # 0..3 days behind the newest event
    for store in ("raw", "features", "archive"):
        assert report.summary()[store]["removed_items"] == 6
    assert sorted(p.stem for p in (settings.lake / "features" / "card_stats").glob("*")) == kept
    # Every landed batch keeps its ledger row and status; what went is recorded per store.
    assert ledger.summary()["transactions"]["validated_batches"] == 10
    assert ledger.expired_batches("validated") == {f"b{k:02d}" for k in range(6)}
    assert {e["store"] for e in ledger.expired() if e["batch_id"] == "b00"} == {
        "raw",
        "validated",
        "features",
        "archive",
    }
    summary = report.summary()["validated"]
    assert summary["removed_bytes"] > 0 and summary["oldest_kept"] == "transactions/b06.parquet"


def test_training_window_unfinished_ingest_and_reference_data_survive(home):
    settings, ledger = home
    for k in range(10):
        lakekit.land(settings, ledger, f"b{k:02d}", NEWEST - (9 - k) * DAY)
    lakekit.land(settings, ledger, "in-flight", NEWEST - 30 * DAY, status="stored")
    lakekit.land(settings, ledger, "cards1", None, dataset="cards", views=())
    every = {s: Limits(max_count=0) for s in ("raw", "validated", "features", "archive")}
    report = retain(
        _limits(settings, **every),
        ledger,
        window_days=5,
        pending_features=lambda item: "waiting" if item.batch_id == "b00" else None,
    )
    kept = {p.stem for p in settings.validated.rglob("*.parquet")}
    assert kept == {"b00", "b04", "b05", "b06", "b07", "b08", "b09", "in-flight", "cards1"}
    assert settings.raw_file("transactions", "in-flight").exists()  # ingest may still need it
    assert any((settings.archive / "transactions").glob("in-flight__*"))
    protected = report.summary()["validated"]["protected"]
    assert protected == {
        "training window": 6,
        "ledger: stored": 1,
        "reference data": 1,
        "waiting": 1,
    }
    assert report.summary()["validated"]["over_limit"] == ["count 9 > 0"]


def test_champion_and_rollback_targets_keep_their_model_mar_and_training_set(home):
    settings, ledger = home
    versions = [lakekit.register(settings, f"run{k}") for k in range(5)]
    challenger = lakekit.register(settings, "run5", promote=False)
    settings = replace(
        _limits(
            settings,
            models=Limits(max_count=0),
            mar=Limits(max_count=0),
            training_sets=Limits(max_count=0),
        ),
        rollback_depth=2,
    )
    report = retain(settings, ledger)

    kept = {*versions[-2:], challenger}  # champion, its rollback target, the challenger
    for version in versions + [challenger]:
        mv = Registry(settings.registry_path).get(version)
        assert lakekit.mar(settings, version).exists() == (version in kept)
        assert (settings.models / mv.artifact_dir.split("/")[-2]).exists() == (version in kept)
        training_set = settings.training_sets / f"{mv.training_set_version}.parquet"
        assert training_set.exists() == (version in kept)
        assert training_set.with_suffix(".json").exists() == (version in kept)
    assert report.summary()["mar"]["protected"] == {
        f"champion {versions[-1]}": 1,
        f"rollback target {versions[-2]}": 1,
        f"challenger {challenger}": 1,
    }
    assert {e["name"] for e in ledger.expired("models")} == {"run0", "run1", "run2"}
    # Rollback still finds its target intact.
    assert Registry(settings.registry_path).verify(versions[-2]) == []


def test_nothing_younger_than_the_grace_period_goes(home):
    settings, ledger = home
    lakekit.register(settings, "run0")
    lakekit.register(settings, "run1")
    lakekit.register(settings, "run2")
    settings = replace(settings, rollback_depth=1, retention_grace_min=60.0)
    retain(_limits(settings, models=Limits(max_count=0)), ledger)
    assert len(list(settings.models.iterdir())) == 3


def test_logs_go_by_bytes_but_uncompacted_files_stay(home):
    settings, ledger = home
    folder = settings.home / "predictions" / "fraud"
    folder.mkdir(parents=True)
    names = [f"20260101T00000{k}000000Z-predictions-1-00000{k}.jsonl" for k in range(6)]
    for name in names:
        (folder / name).write_bytes(b"{}\n" * 100)
    compacted = settings.monitoring / "log"
    compacted.mkdir(parents=True)
    (compacted / "_compacted.json").write_text(__import__("json").dumps(names[:4]))
    # Compacted files go by the age of their rows, not their mtime: a merge rewrites old rows
    # into a new file (predictions-0 here: the oldest rows, the newest file on disk).
    for k in range(3):
        path = compacted / f"predictions-{k}.parquet"
        pl.DataFrame(
            {
                log_columns().time: [datetime(2026, 1, 1 + k, tzinfo=UTC)] * 50,
                "status": [200] * 50,
                "model_version": ["v1"] * 50,
            }
        ).write_parquet(path)
        os.utime(path, (1000 - k, 1000 - k))
    size = (compacted / "predictions-0.parquet").stat().st_size
    report = retain(
        _limits(settings, prediction_log=Limits(max_bytes=0), compacted_log=Limits(max_bytes=size)),
        ledger,
    )
    assert sorted(p.name for p in folder.iterdir()) == names[4:]
    assert report.summary()["prediction_log"]["protected"] == {"not compacted yet (fraud)": 2}
    assert [p.name for p in compacted.glob("predictions-*.parquet")] == ["predictions-2.parquet"]


def test_compacted_predictions_age_in_data_time(home):
    """Days of compacted predictions are counted back from the newest compacted row, so a
    month of an accelerated demo ages them as a month of real traffic would."""
    settings, ledger = home
    compacted = settings.monitoring / "log"
    compacted.mkdir(parents=True)
    for k in range(4):
        pl.DataFrame(
            {
                log_columns().time: [datetime(2026, 1, 1 + 10 * k, tzinfo=UTC)] * 5,
                "status": [200] * 5,
                "model_version": ["v1"] * 5,
            }
        ).write_parquet(compacted / f"predictions-{k}.parquet")
    retain(_limits(settings, compacted_log=Limits(max_age=timedelta(days=15))), ledger)
    kept = sorted(p.name for p in compacted.glob("predictions-*.parquet"))
    assert kept == ["predictions-2.parquet", "predictions-3.parquet"]


def test_disk_usage_per_store(home):
    settings, ledger = home
    lakekit.land(settings, ledger, "b00", NEWEST)
    lakekit.register(settings, "run0")
    usage = disk_usage(settings)
    assert usage["validated"]["items"] == 1 and usage["validated"]["bytes"] > 0
    assert usage["mar"] == {"items": 1, "bytes": 300, "oldest": usage["mar"]["oldest"]}
    assert usage["quarantine"] == {"items": 0, "bytes": 0, "oldest": None}
    assert set(usage) >= {"archive", "raw", "features", "models", "training_sets", "prediction_log"}
    settings.dagster_log.write_bytes(b"x" * 10)
    backup_path(settings.dagster_log, 1).write_bytes(b"y" * 5)
    assert disk_usage(settings)["process_logs"]["bytes"] == 15
    assert disk_usage(settings)["dagster"]["items"] == 1  # ensure() made DAGSTER_HOME


def test_a_pass_within_limits_deletes_nothing(home):
    settings, ledger = home
    for k in range(3):
        lakekit.land(settings, ledger, f"b{k:02d}", NEWEST - timedelta(days=k))
    lakekit.register(settings, "run0")
    before = disk_usage(settings)
    report = retain(settings, ledger)  # the defaults: 90 days of data, 20 models, ...
    assert report.removed_bytes == 0 and disk_usage(settings) == before
    assert ledger.expired() == []


def test_a_file_that_vanishes_while_listed_is_skipped(home, monkeypatch):
    """The prediction log's writer deletes its oldest files itself, any time."""
    settings, _ledger = home
    folder = settings.home / "predictions" / "fraud"
    folder.mkdir(parents=True)
    for k in range(2):
        (folder / f"2026010{k}-predictions-1-1.jsonl").write_bytes(b"{}\n")
    real = stores.closed_files

    def racing(directory):
        found = real(directory)
        found[0].unlink()
        return found

    monkeypatch.setattr(stores, "closed_files", racing)
    assert [i.name for i in stores.list_store(settings, "prediction_log")] == [
        "20260101-predictions-1-1.jsonl"
    ]


def test_raw_copies_outliving_their_validated_file_still_age(home):
    settings, ledger = home
    for k in range(10):
        lakekit.land(settings, ledger, f"b{k:02d}", NEWEST - (9 - k) * DAY)
    settings = _limits(settings, validated=Limits(max_age=3 * DAY), raw=Limits(max_age=5 * DAY))
    retain(settings, ledger)
    raw = settings.raw / "transactions"
    assert sorted(p.stem for p in raw.iterdir())[0] == "b04"
    lakekit.land(settings, ledger, "b10", NEWEST + DAY)  # a day later: b04 is 6 days old
    retain(settings, ledger)
    assert sorted(p.stem for p in raw.iterdir())[0] == "b05"
    assert not (settings.validated / "transactions" / "b04.parquet").exists()
