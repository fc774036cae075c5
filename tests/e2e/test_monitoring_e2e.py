"""Served traffic -> prediction log -> drift and live performance -> the retrain sensor fires."""

import json
from datetime import UTC, datetime

import dagster as dg
import polars as pl
import pytest

from core.storage import write_parquet_atomic
from orchestration.monitoring_assets import (
    drift_report,
    live_performance,
    prediction_log,
    serving_availability,
)
from orchestration.retraining import RetrainPolicy, retrain_sensor
from tests.e2e.kit import Loop

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    loop = Loop(tmp_path_factory.mktemp("monitor"))
    home = loop.home
    # The champion's training set, the reference drift is measured against.
    write_parquet_atomic(home.training_frame, home.home / "training_sets" / "test.parquet")
    try:
        loop.deploy(loop.versions[0])
        yield loop
    finally:
        loop.stop()


def _send(loop, requests, chunk=25):
    client = loop.client
    for i in range(0, len(requests), chunk):
        client.predict(requests[i : i + chunk])


def _materialize(loop, instance):
    # The requests are stamped now and labelled just after: no label maturity to wait for.
    return dg.materialize(
        [prediction_log, serving_availability, drift_report, live_performance],
        instance=instance,
        resources={"storage": loop.storage, "torchserve": loop.torchserve},
        run_config={
            "ops": {
                "drift_report": {"config": {"min_rows": 100, "min_present": 100}},
                "live_performance": {"config": {"label_maturity_days": 0.0}},
            }
        },
    )


def test_drifted_traffic_and_late_labels_reach_monitoring_and_trigger_retraining(served):
    loop, home = served, served.home
    normal = home.requests(200)
    drifted = [
        {
            **r,
            "transaction_id": f"d-{i}",
            "amount": round(min(float(r["amount"]) * 20 + 300, 40_000.0), 2),
        }
        for i, r in enumerate(home.requests(200, offset=200))
    ]
    _send(loop, normal + drifted)
    loop.stop()  # closes the workers' log files (they are also closed every 30 s)

    # Labels arrive later for the normal requests' transactions.
    rows = home.transactions.slice(0, 200).with_row_index("i")
    truth = home.training_frame.select("transaction_id", "label")
    labelled = rows.join(truth, on="transaction_id").select(
        pl.format("req-{}", "i").alias("transaction_id"),
        pl.col("label").cast(pl.Boolean).alias("is_fraud"),
        pl.lit(datetime.now(UTC)).cast(pl.Datetime("us", "UTC")).alias("label_timestamp"),
    )
    write_parquet_atomic(labelled, home.home / "validated" / "labels" / "late.parquet")

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(loop, instance)
    assert result.success
    log_meta = result.asset_materializations_for_node("prediction_log")[0].metadata
    assert log_meta["predictions"].value == 400  # smoke/shadow requests are not customer traffic
    assert log_meta["labelled"].value == labelled.height

    drift_meta = result.asset_materializations_for_node("drift_report")[0].metadata
    assert drift_meta["compared"].value is True
    assert "amount" in drift_meta["drifted"].value
    assert drift_meta["psi"].value["amount"] > 0.2
    assert drift_meta["plot"].value.startswith("![drift](data:image/png;base64,")
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    check = checks["serving_drift"]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN

    live_meta = result.asset_materializations_for_node("live_performance")[0].metadata
    assert live_meta["evaluated"].value is True
    assert live_meta["labelled"].value == labelled.height
    assert 0.0 <= live_meta["live_pr_auc"].value <= 1.0
    assert 0.0 <= live_meta["estimated_pr_auc"].value <= 1.0
    assert live_meta["latency_p99_ms"].value > 0

    available = result.asset_materializations_for_node("serving_availability")[0].metadata
    assert available["measured"].value is True and available["requests"].value == 400

    # The sensor reads what monitoring measured: drift fires a retraining, tagged with why.
    policy = RetrainPolicy(min_new_labelled_rows=10**9, cooldown_minutes=30)
    context = dg.build_sensor_context(
        instance=instance, resources={"storage": loop.storage, "retrain_policy": policy}
    )
    request = retrain_sensor(context)
    assert isinstance(request, dg.RunRequest)
    assert request.tags["loopline/trigger"] == "drift"
    assert "amount" in request.tags["loopline/reason"]


def test_a_person_asking_wins_and_the_request_is_consumed(served):
    instance = dg.DagsterInstance.ephemeral()
    path = served.storage.settings.retrain_request
    path.write_text(json.dumps({"reason": "new merchant onboarding"}))
    policy = RetrainPolicy(min_new_labelled_rows=10**9)
    context = dg.build_sensor_context(
        instance=instance, resources={"storage": served.storage, "retrain_policy": policy}
    )
    request = retrain_sensor(context)
    assert request.tags["loopline/trigger"] == "manual"
    assert request.tags["loopline/reason"] == "new merchant onboarding"
    assert not path.exists()
    again = retrain_sensor(
        dg.build_sensor_context(
            instance=instance, resources={"storage": served.storage, "retrain_policy": policy}
        )
    )
    assert isinstance(again, dg.SkipReason)


def test_loopline_status_summarises_champion_serving_and_drift(served):
    from click.testing import CliRunner

    from orchestration.cli_loop import status

    env = {"LOOPLINE_HOME": str(served.home.home)}
    result = CliRunner().invoke(status, ["--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["champion"] == served.versions[0]
    assert data["promotions"][0]["version"] == served.versions[0]
    assert data["serving"]["requests"] >= 400
    assert data["serving"]["by_version"][served.versions[0]] >= 400
    assert "amount" in data["drift"]["drifted"]
    assert data["drift"]["psi"]["amount"] > 0.2
    assert data["availability"]["requests"] >= 400
    assert data["live_quality"][-1]["champion"] == served.versions[0]
