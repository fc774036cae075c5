"""Damage to the prediction log reaches the operator: torn lines and failing or dropping log
writers show in the prediction_log asset's metadata and raise one alert each, not one per run."""

from __future__ import annotations

import json
import logging
import os

import dagster as dg

from core.storage import write_json_atomic
from orchestration.monitoring_assets import monitoring_sensor, prediction_log
from serving.prediction_log import HEALTH_PREFIX, closed_files
from tests.orchestration.test_monitoring_assets import Home


def _compact(home: Home, caplog) -> tuple[dict, list[dict]]:
    """One prediction_log materialization: its metadata and the alerts it sent."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        result = dg.materialize(
            [prediction_log],
            instance=home.instance,
            resources={"storage": home.storage, "torchserve": home.torchserve},
        )
    meta = result.asset_materializations_for_node("prediction_log")[0].metadata
    sent = [json.loads(r.getMessage()) for r in caplog.records if r.name == "loopline.alerts"]
    return {k: v.value for k, v in meta.items()}, sent


def _health(home: Home, *, healthy: bool, dropped: int, errors: int) -> None:
    """A live writer's health file (this process stands in for the serving worker)."""
    write_json_atomic(
        {
            "pid": os.getpid(),
            "prefix": "predictions",
            "healthy": healthy,
            "written": 100,
            "dropped": dropped,
            "errors": errors,
            "last_error": "OSError: [Errno 28] No space left on device" if errors else None,
        },
        home.log_dir / f"{HEALTH_PREFIX}predictions-{os.getpid()}.json",
    )


def test_a_torn_line_in_a_closed_log_file_is_counted_and_alerted_once(tmp_path, caplog):
    home = Home(tmp_path)
    home.serve(20)
    [path] = closed_files(home.log_dir)
    lines = path.read_bytes().splitlines(keepends=True)
    # A kill mid-write: one record cut short, the next ones written whole after it.
    path.write_bytes(b"".join(lines[:5]) + lines[5][:17] + b"\n" + b"".join(lines[6:]))

    meta, sent = _compact(home, caplog)

    assert meta["torn_lines"] == 1 and meta["torn_files"] == path.name
    assert meta["new_records"] == 19  # the torn record only; the file's others are kept
    [alert] = sent
    assert alert["alert"] == "prediction_log_damaged" and alert["details"]["torn_lines"] == 1
    assert alert["details"]["files"] == [path.name]

    home.serve(5, seed=1)  # the next run reads new files only: no second alert
    meta, sent = _compact(home, caplog)
    assert meta["torn_lines"] == 0 and sent == []


def test_a_writer_reporting_drops_shows_in_metadata_and_alerts_once_per_outage(tmp_path, caplog):
    home = Home(tmp_path)
    home.serve(10)
    _health(home, healthy=False, dropped=7, errors=2)

    meta, sent = _compact(home, caplog)
    assert meta["writers_unhealthy"] == 1 and meta["writer_dropped"] == 7
    [writer] = meta["writers"]
    assert writer["last_error"].endswith("No space left on device")
    [alert] = sent
    assert alert["alert"] == "prediction_log_dropping" and alert["severity"] == "error"
    assert "unhealthy, 7 dropped, 2 errors" in alert["summary"]

    assert _compact(home, caplog)[1] == []  # the same outage: no new alert
    _health(home, healthy=True, dropped=9, errors=3)  # it ends: what it cost, no new alert
    meta, sent = _compact(home, caplog)
    assert meta["writers_unhealthy"] == 0 and meta["writer_dropped"] == 9 and sent == []

    _health(home, healthy=True, dropped=12, errors=3)  # dropped again while healthy: news
    [alert] = _compact(home, caplog)[1]
    assert "healthy, 12 dropped" in alert["summary"]


def test_a_failing_writer_starts_a_monitoring_run_without_new_log_files(tmp_path):
    home = Home(tmp_path)
    home.log_dir.mkdir(parents=True, exist_ok=True)

    def tick(cursor=None):
        context = dg.build_sensor_context(
            instance=home.instance,
            cursor=cursor,
            resources={"storage": home.storage, "torchserve": home.torchserve},
        )
        return monitoring_sensor(context), context.cursor

    skipped, _ = tick()
    assert isinstance(skipped, dg.SkipReason)  # nothing logged, nothing wrong
    _health(home, healthy=False, dropped=3, errors=1)
    request, cursor = tick()
    assert isinstance(request, dg.RunRequest)
    assert isinstance(tick(cursor)[0], dg.SkipReason)  # once per change of its counters
