"""Simulated batches -> ingest -> features -> training_set -> model -> evaluation -> gate ->
registry, through the real assets in a temp Loopline home; then a worse challenger and the CLI.
"""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import torch
from click.testing import CliRunner

from features.training_set import TrainingSetRef
from models.registry import CHAMPION, Registry
from models.release import CARD, EVALUATION
from orchestration import feature_assets, training_assets
from orchestration.cli import main
from tests.orchestration.conftest import Platform
from usecases.fraud import simulator

SERVICE = "fraud_model_v1"
FEATURES = [
    *feature_assets.VIEW_ASSETS,
    feature_assets.feature_registry,
    feature_assets.online_features,
]
TRAINING = [
    training_assets.candidate_model,
    training_assets.baseline_model,
    training_assets.evaluation_report,
    training_assets.registered_model,
]
# About 19k labelled rows, enough for the network to beat logistic regression; one torch
# thread and a generous latency budget on the shared test machine.
SCENARIO = {
    "seed": 5,
    "n_cards": 150,
    "n_merchants": 30,
    "batch_span": timedelta(days=2),
    "rows_per_batch": 1500,
    "fraud_rate": 0.05,
}
GOOD = {"batch_size": 512, "hidden": [128, 64]}
WORSE = {"epochs": 1, "batch_size": 4096, "lr": 1e-6, "hidden": [4], "patience": 0, "seed": 5}
GATE = {"max_latency_ms_batch1": 500.0, "max_latency_ms_batch64": 1000.0, "latency_repeats": 5}


def _materialize(platform: Platform, candidate: dict, *, with_training_set: bool):
    """One run of the training chain; one torch thread keeps it fast and repeatable here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dg.materialize(
            [feature_assets.training_set, *TRAINING],
            selection=None if with_training_set else TRAINING,
            instance=platform.instance,
            resources=platform.resources,
            run_config={
                "ops": {
                    "candidate_model": {"config": {**candidate, "device": "cpu"}},
                    "baseline_model": {"config": {"batch_size": 512, "device": "cpu"}},
                    "evaluation_report": {"config": GATE},
                }
            },
            raise_on_error=False,
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Platform:
    """A home with 16 simulated two-day batches ingested and their features built."""
    platform = Platform(tmp_path_factory.mktemp("training") / "home")
    # A Monday midnight: the same simulated week (and so the same data) whenever the test runs.
    start = (datetime.now(UTC) - timedelta(days=40)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    start -= timedelta(days=start.weekday())
    platform.land(simulator.ScenarioConfig(start=start, **SCENARIO), batches=16)
    assert all(o.success for o in platform.ingest_all())
    built = dg.materialize(FEATURES, instance=platform.instance, resources=platform.resources)
    assert built.success
    return platform


# What the training run alone left in the registry, before the fixture deploys it.
AFTER_TRAINING: dict[str, dict] = {}


@pytest.fixture(scope="module")
def first_run(platform):
    """The first model trained, then promoted as the deployment step would (its own tests are
    in tests/serving and tests/e2e): training alone only names a challenger."""
    run = _materialize(platform, GOOD, with_training_set=True)
    registry = Registry(platform.settings.registry_path)
    AFTER_TRAINING["aliases"] = registry.aliases()
    if run.success:
        registry.promote("v0001", "deployed (the test's stand-in for the deployment step)")
    return run


@pytest.fixture(scope="module")
def second_run(platform, first_run):
    """The same training set, a deliberately worse challenger."""
    assert first_run.success
    return _materialize(platform, WORSE, with_training_set=False)


def _check(result, name="model_validation"):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_training_set_to_champion_in_one_materialize(platform, first_run):
    assert first_run.success, _check(first_run).description
    assert _check(first_run).passed
    ref: TrainingSetRef = first_run.output_for_node("training_set")

    registry = Registry(platform.settings.registry_path)
    [mv] = registry.list_versions()
    assert mv.version == "v0001" and mv.status == CHAMPION
    # Training named a challenger, with the gate's verdict written with it; it promoted nothing.
    assert AFTER_TRAINING["aliases"] == {"challenger": "v0001"}
    assert [e.kind for e in registry.events("v0001")] == ["registered", "validated", "promoted"]
    assert registry.verdict("v0001").passed and registry.verdict("v0001").champion is None

    # Lineage leads back to the training set, its batches, the run and the code.
    lineage = registry.lineage("v0001")
    assert lineage["training_set_version"] == ref.version
    assert lineage["training_batches"] == list(ref.batches) and ref.batches
    assert lineage["feature_service"] == SERVICE
    assert lineage["dagster_run_id"] == first_run.run_id
    assert lineage["code_version"]  # the repository is a git checkout
    assert lineage["data_window"]["splits"]["test"]["rows"] > 0
    assert mv.hyperparameters["hidden"] == GOOD["hidden"]
    assert mv.metrics["pr_auc"] > mv.extra["compared"]["baseline"]["pr_auc"]

    # The model, its card and its evaluation are stored with the version, checksummed.
    assert {"model.pt", "model.json", "golden.json", "SHA256SUMS", CARD, EVALUATION} <= set(
        mv.artifacts
    )
    assert registry.verify("v0001") == []
    card = (Path(mv.artifact_dir) / CARD).read_text()
    assert ref.version in card and "PASSED" in card
    assert Path(mv.artifact_dir).is_relative_to(platform.settings.models)

    # The UI shows loss curves, plots and the evaluation beside the baseline.
    [trained] = first_run.asset_materializations_for_node("candidate_model")
    assert "loss_curves" in trained.metadata
    [report] = first_run.asset_materializations_for_node("evaluation_report")
    assert {"report", "calibration", "pr_curve", "model_card"} <= set(report.metadata)
    assert report.metadata["champion"].value == "none"
    assert first_run.output_for_node("registered_model") == "v0001"


def test_a_worse_challenger_is_blocked_and_its_reasons_recorded(platform, second_run):
    assert not second_run.success
    check = _check(second_run)
    assert not check.passed
    assert "does not beat champion" in check.description
    # Blocked: registered_model did not run, the champion did not move.
    assert not second_run.asset_materializations_for_node("registered_model")

    registry = Registry(platform.settings.registry_path)
    assert registry.get_alias(CHAMPION) == "v0001"
    rejected = registry.get("v0002")
    assert rejected.status == "rejected" and rejected.aliases == []
    [event] = [e for e in registry.events("v0002") if e.kind == "rejected"]
    assert any("does not beat champion" in r for r in event.reasons)
    assert any("does not beat baseline" in r for r in event.reasons)
    assert check.metadata["rejected_version"].value == "v0002"
    # The champion was evaluated on the same split beside the challenger.
    assert rejected.extra["champion_at_evaluation"] == "v0001"
    assert "champion" in rejected.extra["compared"]

    # Materializing registered_model on its own (no check runs then) still refuses it.
    alone = dg.materialize(
        [feature_assets.training_set, *TRAINING],
        selection=[training_assets.registered_model],
        instance=platform.instance,
        resources=platform.resources,
        raise_on_error=False,
    )
    assert not alone.success
    failure = alone.failure_data_for_node("registered_model")
    assert "the gate rejected this candidate" in failure.error.message
    assert registry.get_alias(CHAMPION) == "v0001" and len(registry.list_versions()) == 2


def test_cli_lists_shows_promotes_and_rolls_back(platform, second_run):
    runner = CliRunner()
    env = {"LOOPLINE_HOME": str(platform.settings.home), "COLUMNS": "200"}

    listed = runner.invoke(main, ["models", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "v0001" in listed.output and "champion" in listed.output
    assert "v0002" in listed.output and "rejected" in listed.output

    shown = runner.invoke(main, ["models", "show", "v0002"], env=env)
    assert shown.exit_code == 0, shown.output
    version = Registry(platform.settings.registry_path).get("v0002").training_set_version
    assert version[:16] in shown.output and "does not beat champion" in shown.output
    assert "rejected" in shown.output and "pr_auc" in shown.output

    refused = runner.invoke(main, ["models", "promote", "v0002"], env=env)
    assert refused.exit_code != 0 and "rejected by the gate" in refused.output

    forced = runner.invoke(
        main, ["models", "promote", "v0002", "--force", "--reason", "the test says so"], env=env
    )
    assert forced.exit_code == 0, forced.output
    registry = Registry(platform.settings.registry_path)
    assert registry.get_alias(CHAMPION) == "v0002"

    rolled = runner.invoke(main, ["models", "rollback", "--reason", "canary alarms"], env=env)
    assert rolled.exit_code == 0, rolled.output
    assert "TorchServe is not running" in rolled.output  # it serves the champion when it starts
    assert registry.get_alias(CHAMPION) == "v0001"
    assert registry.events()[-1].kind == "rolled_back"
    assert registry.events()[-1].reason == "canary alarms"

    unknown = runner.invoke(main, ["models", "show", "v0099"], env=env)
    assert unknown.exit_code != 0 and "v0099" in unknown.output


def test_run_config_chooses_the_split_policy_and_recency_weighting(platform, first_run, second_run):
    """Held-out positives and a window from run config reach the training set and its UI."""
    run = dg.materialize(
        [feature_assets.training_set],
        instance=platform.instance,
        resources=platform.resources,
        run_config={
            "ops": {"training_set": {"config": {"held_out_positives": 40, "window_days": 20.0}}}
        },
    )
    ref: TrainingSetRef = run.output_for_node("training_set")
    [shown] = run.asset_materializations_for_node("training_set")
    assert shown.metadata["split_method"].value == "held_out_positives"
    assert shown.metadata["split_policy"].value["held_out_positives"] == 40
    assert shown.metadata["split_policy"].value["window_days"] == 20.0
    summary = json.loads(Path(ref.path).with_suffix(".json").read_text())
    assert summary["split_policy"]["held_out_positives"] == 40
    splits = summary["splits"]
    assert 40 <= splits["test"]["positives"] < 60 and 40 <= splits["validation"]["positives"] < 60
    assert splits["train"]["end"] < splits["validation"]["start"] < splits["test"]["start"]
    assert ref.rows < first_run.output_for_node("training_set").rows  # 20 of 32 days kept

    # Presumed negatives: transactions 2 days old count as legit until a fraud label arrives,
    # so the same lake gives more rows, the newest younger than the 7-day maturity.
    def build(config: dict) -> TrainingSetRef:
        return dg.materialize(
            [feature_assets.training_set],
            instance=platform.instance,
            resources=platform.resources,
            run_config={"ops": {"training_set": {"config": config}}},
        ).output_for_node("training_set")

    default, presumed = build({}), build({"presume_negative_after_days": 2.0})
    presumed_summary = json.loads(Path(presumed.path).with_suffix(".json").read_text())
    default_summary = json.loads(Path(default.path).with_suffix(".json").read_text())
    assert presumed_summary["presume_negative_after_s"] == 2 * 86400
    assert default_summary["presume_negative_after_s"] is None
    assert presumed.rows > default.rows
    assert presumed_summary["splits"]["test"]["end"] > default_summary["splits"]["test"]["end"]

    candidate = training_assets.CandidateConfig(recency_half_life_days=7.0).train_config()
    baseline = training_assets.BaselineConfig(recency_half_life_days=7.0).train_config()
    assert candidate.recency_half_life_days == baseline.recency_half_life_days == 7.0
    assert training_assets.CandidateConfig().train_config().recency_half_life_days is None
