"""The whole loop with a real Dagster daemon and a real TorchServe, no manual step.

``loopline demo`` starts ``dagster dev`` (webserver + daemon), TorchServe and the live
simulator with its traffic; a first champion is trained and deployed by the sensors; a batch
with a renamed column is landed (it must be quarantined, start no retraining, and leave the
champion serving); then concept drift is injected and the loop must, on its own, retrain,
validate and promote a new champion that TorchServe serves.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_concept_drift_leads_to_a_new_champion_and_a_skewed_batch_changes_nothing(tmp_path):
    env = {**os.environ, "LOOPLINE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "demo", "--json", "--timeout", "1800"],
        env=env,
        capture_output=True,
        text=True,
        timeout=2100,
    )
    start = done.stdout.find("{\n")
    assert start >= 0, f"no summary printed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(done.stdout[start:])
    assert done.returncode == 0, summary["outcome"]

    # The schema-skewed batch: quarantined with its reason, no retraining, champion untouched.
    skew = summary["schema_skew_check"]
    assert skew["status"] == "quarantined" and "missing column" in skew["reason"]
    assert skew["retrainings_started"] == 0
    assert skew["champion_serving"] is True

    # Drift -> a retraining started by a sensor (never by hand) -> a new champion serving.
    first, new = summary["promotions"][0]["version"], summary["champion"]
    assert new != first and summary["outcome"].startswith(f"{first} replaced by {new}")
    triggers = {r["trigger"] for r in summary["retrainings"]}
    assert triggers and triggers <= {"new_data", "drift", "decay", "schedule"}
    assert summary["serving"]["by_version"].get(new, 0) > 0  # customer traffic reached it
    assert summary["traffic"]["failed"] == 0
    # The demo stopped the platform only once the promoting run had finished, cleanly (a later
    # retraining the sensors start meanwhile may be cut short by the bounded demo's end).
    # Loop latency is reported by stage, each after the one before.
    latency = summary["loop_latency"]
    [promoting] = [r for r in summary["retrainings"] if r["run_id"] == latency["run_id"]]
    assert promoting["status"] == "SUCCESS"
    stages = [latency[k] for k in ("run_started_s", "registered_s", "promoted_s", "answering_s")]
    assert 0 <= stages[0] <= stages[1] <= stages[2] <= stages[3]
    assert latency["trigger"] in triggers
