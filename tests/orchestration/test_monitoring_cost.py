"""A monitoring run costs what the new data and its windows hold, not what all history holds,
and measures what a read of the whole history measures."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

import serving.monitoring
from features.views import read_validated
from orchestration.monitoring_assets import (
    live_performance,
    monitoring_costs,
    prediction_log,
    serving_availability,
)
from serving.monitoring import (
    availability,
    compact,
    event_window,
    feature_columns,
    join_labels,
    live_quality,
    live_quality_row,
    read_compacted,
    read_live_quality,
)
from serving.prediction_log import PredictionLog
from tests.orchestration.test_monitoring_assets import START, Home
from tests.serving.test_monitoring_windows import label_frame

HISTORY_DAYS, PER_DAY, MIN_ROWS = 50, 200, 1000
CONFIG = {"window_min_rows": MIN_ROWS}


class Traffic:
    """A day of served requests at a time, and the labels known at the end of each day."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.rng = np.random.default_rng(11)
        self.truth: list[tuple[str, float, bool]] = []  # id, label time (days), fraud

    def serve_day(self, day: int) -> None:
        t = np.sort(day + self.rng.random(PER_DAY))
        p = 1.0 / (1.0 + np.exp(-(-3.0 + 2.0 * self.rng.normal(size=PER_DAY))))
        fraud = self.rng.random(PER_DAY) < p
        log = PredictionLog(self.home.log_dir, max_file_age_s=3600.0).start()
        for i in range(PER_DAY):
            tid = f"d{day}-{i}"
            log.log(
                {
                    "logged_at": START.isoformat(),
                    "status": 200,
                    "model_version": self.home.champion,
                    "transaction_id": tid,
                    "request": {
                        "transaction_id": tid,
                        "card_id": "c1",
                        "timestamp": (START + timedelta(days=float(t[i]))).isoformat(),
                    },
                    "features": {"card_home_country": "US", "merchant_category": "grocery"},
                    "missing_features": [],
                    "unknown_entities": [],
                    "feature_age_s": {"card_stats_fv": 3600.0, "merchant_stats_fv": 600.0},
                    "fraud_probability": float(p[i]),
                    "decision": "approve",
                    "latency_ms": 2.0,
                }
            )
            delay = float(self.rng.uniform(1, 10)) if fraud[i] else 7.0
            self.truth.append((tid, float(t[i]) + delay, bool(fraud[i])))
        log.close()

    def land_labels(self, day: int) -> None:
        """The labels that became known during ``day``, as one validated batch."""
        known = [r for r in self.truth if day <= r[1] < day + 1]
        frame = label_frame([(i, START + timedelta(days=d), f) for i, d, f in known])
        batch = f"labels-{day:03d}"
        settings = self.home.settings
        frame.write_parquet(settings.validated / "labels" / f"{batch}.parquet")
        ledger = self.home.storage.ledger
        ledger.receive(batch, "labels", settings.landing / f"{batch}.parquet")
        ledger.mark(batch, "validated", rows=frame.height)


def _monitor(home: Home) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [prediction_log, serving_availability, live_performance],
        instance=home.instance,
        resources={"storage": home.storage, "torchserve": home.torchserve},
        run_config={
            "ops": {
                "serving_availability": {"config": CONFIG},
                "live_performance": {"config": CONFIG},
            }
        },
    )


class Reads:
    """Every parquet file and log file the run opens, by path."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        for name in ("read_parquet", "scan_parquet"):
            monkeypatch.setattr(pl, name, self._spy(getattr(pl, name)))
        records = serving.monitoring.file_records

        def log_file(path, stats=None):
            self.paths.append(str(path))
            return records(path, stats)

        monkeypatch.setattr(serving.monitoring, "file_records", log_file)

    def _spy(self, read):
        def spy(source, *args, **kwargs):
            sources = source if isinstance(source, list) else [source]
            self.paths += [str(s) for s in sources]
            return read(source, *args, **kwargs)

        return spy

    def under(self, folder: Path, suffix: str) -> set[str]:
        return {p for p in self.paths if Path(p).parent == folder and p.endswith(suffix)}


def test_a_run_reads_the_new_file_and_its_windows_not_the_history(tmp_path, monkeypatch):
    home = Home(tmp_path)
    traffic = Traffic(home)
    store = home.settings.home / "monitoring" / "log"
    (home.settings.validated / "labels").mkdir(parents=True, exist_ok=True)
    for day in range(HISTORY_DAYS):  # 50 days of history, compacted a day at a time
        traffic.serve_day(day)
        traffic.land_labels(day)
        assert compact(home.log_dir, store).files == 1
    assert _monitor(home).success  # the first run after an upgrade indexes the history once

    traffic.serve_day(HISTORY_DAYS)
    traffic.land_labels(HISTORY_DAYS)
    reads = Reads(monkeypatch)
    result = _monitor(home)
    assert result.success

    assert len(reads.under(home.log_dir, ".jsonl")) == 1  # compaction: the new log file
    compacted = reads.under(store, ".parquet")
    # The windows: availability's newest 1,000 requests (5 days), live quality's cohort (the
    # week before the newest label less 7 days of maturity) and the newer requests: 16 days.
    assert len(compacted) <= 16
    labels = reads.under(home.settings.validated / "labels", ".parquet")
    assert 0 < len(labels) <= 16
    meta = result.asset_materializations_for_node("live_performance")[0].metadata
    assert meta["log_files_read"].value <= len(compacted)
    first, second = monitoring_costs(home.instance, job_name=result.dagster_run.job_name)
    assert (first["prediction_log.compacted_rows"], second["prediction_log.compacted_rows"]) == (
        HISTORY_DAYS * PER_DAY,
        (HISTORY_DAYS + 1) * PER_DAY,
    )
    # The first run merged the 32 oldest day files into one: 19 files, then 20.
    assert first["prediction_log.compacted_files"] == HISTORY_DAYS - 32 + 1
    assert second["prediction_log.compacted_files"] == HISTORY_DAYS - 32 + 2
    assert second["live_performance.log_files_read"] == meta["log_files_read"].value
    assert second["seconds"] > 0 and first["serving_availability.log_files_read"] <= 8
    _assert_as_measured_on_the_whole_history(home, result)


def _assert_as_measured_on_the_whole_history(home: Home, result) -> None:
    """Availability and the live-quality point equal those of the whole log and all labels."""
    labels = read_validated(home.settings.lake, "labels")
    answered = join_labels(read_compacted(home.settings.home / "monitoring" / "log"), labels)
    answered = answered.filter(pl.col("model_version") == home.champion)

    window = event_window(answered, hours=24.0, min_rows=MIN_ROWS, max_rows=20_000)
    expected = json.loads(json.dumps(availability(window, feature_columns(window)).to_dict()))
    report = json.loads((home.settings.home / "monitoring" / "availability.json").read_text())
    assert {k: report[k] for k in expected} == expected
    assert report["requests"] == MIN_ROWS

    quality = live_quality(
        answered,
        labels["label_timestamp"].max(),
        label_maturity=timedelta(days=7),
        window=timedelta(days=7),
    )
    point = read_live_quality(home.settings.home).row(-1, named=True)
    assert point["label_batch"] == f"labels-{HISTORY_DAYS:03d}" and quality.labelled > 500
    row = live_quality_row(quality, at=point["at"], label_batch=point["label_batch"], champion="")
    assert {k: v for k, v in point.items() if k != "champion"} == {
        k: v for k, v in row.items() if k != "champion"
    }
