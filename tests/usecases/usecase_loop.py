"""The loop of one use case (a scaffolded one, the delivery demo), run in its own process (``LOOPLINE_USECASE`` chooses it, as it
does for the platform): demo data and a user's own files landed, ingested and validated,
features built, a model trained, gated against its baseline, registered, deployed to a real
TorchServe and asked for predictions, a good request and a malformed one. Writes a JSON
summary for ``test_init`` to judge.

    LOOPLINE_USECASE=<folder> python -m tests.usecases.usecase_loop <home> <summary.json>
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import torch

from core import simulation
from core.usecase import active
from models.registry import CHAMPION, Registry
from models.tasks import of as task_of
from orchestration import feature_assets, training_assets
from orchestration.monitoring_assets import live_performance, prediction_log
from orchestration.serving_assets import TorchServeResource, deployment, model_archive
from quality.ledger import BatchLedger
from serving.batch import score_version
from serving.client import TorchServeError
from serving.requests import request_bodies
from tests.e2e.kit import free_ports
from tests.orchestration.conftest import Platform

FAST = {"epochs": 8, "batch_size": 512, "device": "cpu", "patience": 2}
TRAFFIC = 27  # the window whose requests are sent as customer traffic
GATE = {"max_latency_ms_batch1": 500.0, "max_latency_ms_batch64": 1000.0, "latency_repeats": 5}


def _land_users_files(platform: Platform, sim, k: int) -> tuple[str, str]:
    """A good and a broken CSV of the request dataset, as a user would export them."""
    uc = active()
    dataset = uc.request.dataset
    frame = sim.events(k)[dataset]
    good = platform.settings.landing / f"{dataset}-my-export.csv"
    frame.write_csv(good, datetime_format=simulation.CSV_DATETIME_FORMAT)
    bad = platform.settings.landing / f"{dataset}-my-broken-export.csv"
    frame.drop(uc.request_dataset.key).write_csv(
        bad, datetime_format=simulation.CSV_DATETIME_FORMAT
    )
    return good.name, bad.name


def main(home: Path) -> dict:
    uc = active()
    torch.set_num_threads(1)
    platform = Platform(home)
    start = (datetime.now(UTC) - timedelta(days=40)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    config = simulation.scenario(
        seed=5, start=start, batch_span=timedelta(days=1), rows_per_batch=1500
    )
    platform.land(config, batches=24)
    sim = simulation.simulator_module().Simulator(config)
    users_good, users_bad = _land_users_files(platform, sim, 26)
    ingested = platform.ingest_all()
    ledger = {
        b.source_name: (b.status, b.reason)
        for b in BatchLedger(platform.settings.ledger_path).batches()
    }

    features = dg.materialize(
        [
            *feature_assets.VIEW_ASSETS,
            feature_assets.feature_registry,
            feature_assets.online_features,
        ],
        instance=platform.instance,
        resources=platform.resources,
    )
    trained = dg.materialize(
        [
            feature_assets.training_set,
            training_assets.candidate_model,
            training_assets.baseline_model,
            training_assets.evaluation_report,
            training_assets.registered_model,
        ],
        instance=platform.instance,
        resources=platform.resources,
        run_config={
            "ops": {
                "candidate_model": {"config": FAST},
                "baseline_model": {"config": FAST},
                "evaluation_report": {"config": GATE},
            }
        },
        raise_on_error=False,
    )
    [gate] = [
        e for e in trained.get_asset_check_evaluations() if e.check_name == "model_validation"
    ]
    metric = task_of(uc.task.type).primary_metric
    summary_guarantees = {"asof_equals_feast": _asof_equals_feast(platform, sim)}
    registry = Registry(platform.settings.registry_path)
    registered = registry.list_versions()
    version = registered[-1].version if registered else None
    candidate = registry.get(version) if version else None
    summary = {
        "usecase": uc.name,
        "ingest_runs": len(ingested),
        "failed_ingest_runs": sum(not o.success for o in ingested),  # quarantines stop runs
        "ledger": ledger,
        "users_good": users_good,
        "users_bad": users_bad,
        "features_ok": features.success,
        "trained_ok": trained.success,
        "gate_passed": gate.passed,
        "gate": gate.description,
        **summary_guarantees,
        "registered": version,
        "metric": metric,
        "value": candidate.metrics[metric] if candidate else None,
        "baseline_value": candidate.extra["compared"]["baseline"][metric] if candidate else None,
    }
    if candidate is None:
        return summary

    inference, management, metrics = free_ports(3)
    torchserve = TorchServeResource(
        home=str(home), inference_port=inference, management_port=management, metrics_port=metrics
    )

    @dg.asset(name="registered_model")
    def registered() -> str:
        return candidate.version

    try:
        deployed = dg.materialize(
            [registered, model_archive, deployment],
            resources={"storage": platform.storage, "torchserve": torchserve},
            run_config={"ops": {"deployment": {"config": {"watch_seconds": 2.0}}}},
        )
        client = torchserve.process(platform.storage).client()
        newest = sim.events(27)[uc.request.dataset].head(3)
        summary["deployed_ok"] = deployed.success
        summary["champion"] = registry.get_alias(CHAMPION)  # the deployment promotes
        summary["predictions"] = client.predict(request_bodies(newest))
        batch = score_version(registry, candidate.version, home, newest)
        summary["batch_scores"] = batch[uc.task.score].to_list()
        try:
            client.predict([{uc.request.id: "x"}])
            summary["malformed"] = {"status": 200}
        except TorchServeError as exc:
            summary["malformed"] = {"status": exc.status, "body": exc.body}
        summary["still_serving"] = client.ping()
        # Customer traffic: a window of requests, scored online.
        bodies = request_bodies(sim.events(TRAFFIC)[uc.request.dataset])
        for i in range(0, len(bodies), 50):
            client.predict(bodies[i : i + 50])
        summary["traffic"] = len(bodies)
    finally:
        torchserve.process(platform.storage).stop()  # closes the workers' log files
    summary["live"] = _monitor(platform, sim, torchserve)
    return summary


def _asof_equals_feast(platform: Platform, sim) -> bool:
    """The training path's point-in-time join equals Feast's get_historical_features, row for
    row, on requests of a window whose entities have history (and some that do not)."""
    import pandas as pd

    from features.store import feature_store, historical_features
    from features.views import training_entities

    uc = active()
    requests = sim.events(20)[uc.request.dataset].head(300)
    entities = training_entities(requests).with_row_index("row_id")
    store = feature_store(platform.settings.home)
    ours = historical_features(store, entities, uc.features.service)
    theirs = store.get_historical_features(
        entity_df=entities.to_pandas(), features=store.get_feature_service(uc.features.service)
    ).to_df()
    if list(ours.columns) != list(theirs.columns) or ours.height != len(theirs):
        return False
    try:
        pd.testing.assert_frame_equal(
            ours.to_pandas().sort_values("row_id").reset_index(drop=True),
            theirs.sort_values("row_id").reset_index(drop=True),
            check_exact=True,
        )
    except AssertionError:
        return False
    return True


def _monitor(platform: Platform, sim, torchserve: TorchServeResource) -> dict:
    """The traffic's truth lands; monitoring measures the served model on it."""
    uc = active()
    simulation.land(sim.truth(TRAFFIC), platform.settings.landing, uc.label.dataset, "truth")
    platform.ingest_all()
    monitored = dg.materialize(
        [prediction_log, live_performance],
        instance=platform.instance,
        resources={"storage": platform.storage, "torchserve": torchserve},
        # The truth is complete for this window: no maturity to wait for.
        run_config={"ops": {"live_performance": {"config": {"label_maturity_days": 0.0}}}},
    )
    [meta] = monitored.asset_materializations_for_node("live_performance")
    return {k: getattr(v, "value", v) for k, v in meta.metadata.items() if k != "plot"}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(main(Path(sys.argv[1])), default=str))
