"""What the retrain sensor reads from Dagster and the environment to debounce drift."""

from datetime import timedelta

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.utils import make_new_run_id

from orchestration.retraining import LOOP_JOB, RetrainPolicy, _last_started


def _add_run(instance: dg.DagsterInstance, trigger: str, status: DagsterRunStatus) -> None:
    instance.add_run(
        DagsterRun(
            job_name=LOOP_JOB,
            run_id=make_new_run_id(),
            tags={"loopline/trigger": trigger},
            status=status,
        )
    )


def test_the_last_drift_retraining_is_found_among_newer_runs_of_other_triggers():
    instance = dg.DagsterInstance.ephemeral()
    assert _last_started(instance, "drift") == (False, None)
    _add_run(instance, "drift", DagsterRunStatus.SUCCESS)
    _, drift_started = _last_started(instance, "drift")
    _add_run(instance, "new_data", DagsterRunStatus.STARTED)
    in_flight, last = _last_started(instance)
    assert in_flight and last >= drift_started
    assert _last_started(instance, "drift") == (False, drift_started)
    assert _last_started(instance, "decay") == (False, None)


def test_drift_rearm_comes_from_the_resource_or_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LOOPLINE_RETRAIN_DRIFT_REARM_MINUTES", raising=False)
    assert RetrainPolicy().policy().drift_rearm == timedelta(days=7)
    monkeypatch.setenv("LOOPLINE_RETRAIN_DRIFT_REARM_MINUTES", "4.2")
    assert RetrainPolicy().policy().drift_rearm == timedelta(minutes=4.2)
    assert RetrainPolicy(drift_rearm_minutes=60).policy().drift_rearm == timedelta(hours=1)
