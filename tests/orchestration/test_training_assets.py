"""Training set -> model -> evaluation -> gate -> registry through the real training assets.

The training set comes from a stand-in ``training_set`` asset that writes a small synthetic
frame with every feature of the ``fraud_model_v1`` FeatureService, so these runs take seconds.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from features.training_set import TrainingSetRef
from models.registry import CHAMPION, Registry
from models.release import CARD, EVALUATION
from orchestration import training
from orchestration.cli import main
from orchestration.resources import LooplineStorage
from orchestration.settings import Settings
from tests.models.testkit import make_training_set

SERVICE = "fraud_model_v1"
TRAINING_SET_VERSION = "ts-standin-0001"
BATCHES = ("b-transactions-0001", "b-labels-0001")
ASSETS = [
    training.candidate_model,
    training.baseline_model,
    training.evaluation_report,
    training.registered_model,
]
# Small data, few epochs; slices of a 900-row test split are too small to compare, and the
# shared test machine gets generous latency budgets.
GOOD = {"epochs": 8, "batch_size": 256, "lr": 0.005, "hidden": [32, 16], "patience": 3}
WORSE = {"epochs": 1, "batch_size": 4096, "lr": 1e-6, "hidden": [4], "patience": 0, "seed": 5}
GATE = {"max_latency_ms_batch1": 500.0, "max_latency_ms_batch64": 1000.0, "latency_repeats": 5}


def service_frame(home: Path, n: int = 6000, seed: int = 0) -> pl.DataFrame:
    """testkit's learnable frame under the service's feature names, the rest filled with noise."""
    spec = training.feature_spec(home, SERVICE)
    frame = make_training_set(n, seed).rename(
        {
            "card_txn_count_24h": "card_tx_count_24h",
            "amount_to_card_mean_ratio": "tx_amount_to_card_mean_30d",
        }
    )
    frame = frame.with_columns(
        (pl.col("card_home_country") != pl.col("country")).alias("tx_is_foreign")
    )
    rng = np.random.default_rng(seed + 1)
    filler = {}
    for name in spec.numeric:
        if name not in frame.columns:
            filler[name] = rng.gamma(2.0, 3.0, n)
    for name in spec.categorical:
        if name not in frame.columns:
            filler[name] = rng.choice(["a", "b", "c"], n)
    return frame.with_columns(**{k: pl.Series(k, v) for k, v in filler.items()})


@dg.asset(name="training_set", group_name="training")
def standin_training_set(storage: LooplineStorage) -> TrainingSetRef:
    """Stand-in for the feature store's training set: a synthetic frame written to parquet."""
    home = storage.settings.home
    frame = service_frame(home)
    path = home / "training_sets" / f"{TRAINING_SET_VERSION}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        frame.write_parquet(path)
    return TrainingSetRef(str(path), TRAINING_SET_VERSION, SERVICE, BATCHES, frame.height)


def _materialize(home: Path, instance: dg.DagsterInstance, candidate: dict):
    """One run of the training chain; one torch thread keeps it fast and repeatable here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(home, instance, candidate)
    finally:
        torch.set_num_threads(threads)


def _run(home: Path, instance: dg.DagsterInstance, candidate: dict):
    return dg.materialize(
        [standin_training_set, *ASSETS],
        instance=instance,
        resources={"storage": LooplineStorage(home=str(home))},
        run_config={
            "ops": {
                "candidate_model": {"config": {**candidate, "device": "cpu"}},
                "baseline_model": {"config": {"epochs": 8, "batch_size": 256, "device": "cpu"}},
                "evaluation_report": {"config": GATE},
            }
        },
        raise_on_error=False,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training") / "home"


@pytest.fixture(scope="module")
def instance() -> dg.DagsterInstance:
    return dg.DagsterInstance.ephemeral()


@pytest.fixture(scope="module")
def first_run(home, instance):
    return _materialize(home, instance, GOOD)


@pytest.fixture(scope="module")
def second_run(home, instance, first_run):
    assert first_run.success
    return _materialize(home, instance, WORSE)


def _check(result, name="model_validation"):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_training_set_to_champion_in_one_materialize(home, first_run):
    assert first_run.success
    assert _check(first_run).passed

    registry = Registry(Settings(home).registry_path)
    [mv] = registry.list_versions()
    assert mv.version == "v0001" and mv.status == CHAMPION
    assert registry.get_alias(CHAMPION) == "v0001"
    assert [e.kind for e in registry.events("v0001")] == ["registered", "promoted"]

    # Lineage leads back to the training set, its batches, the run and the code.
    lineage = registry.lineage("v0001")
    assert lineage["training_set_version"] == TRAINING_SET_VERSION
    assert lineage["training_batches"] == list(BATCHES)
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
    assert TRAINING_SET_VERSION in card and "PASSED" in card
    assert Path(mv.artifact_dir).is_relative_to(Settings(home).models)

    # The UI shows loss curves, plots and the evaluation beside the baseline.
    [trained] = first_run.asset_materializations_for_node("candidate_model")
    assert "loss_curves" in trained.metadata
    [report] = first_run.asset_materializations_for_node("evaluation_report")
    assert {"report", "calibration", "pr_curve", "model_card"} <= set(report.metadata)
    assert report.metadata["champion"].value == "none"
    assert first_run.output_for_node("registered_model") == "v0001"


def test_a_worse_challenger_is_blocked_and_its_reasons_recorded(home, second_run):
    assert not second_run.success
    check = _check(second_run)
    assert not check.passed
    assert "does not beat champion" in check.description
    # Blocked: registered_model did not run, the champion did not move.
    assert not second_run.asset_materializations_for_node("registered_model")

    registry = Registry(Settings(home).registry_path)
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


def test_cli_lists_shows_promotes_and_rolls_back(home, second_run):
    runner = CliRunner()
    env = {"LOOPLINE_HOME": str(home), "COLUMNS": "200"}

    listed = runner.invoke(main, ["models", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "v0001" in listed.output and "champion" in listed.output
    assert "v0002" in listed.output and "rejected" in listed.output

    shown = runner.invoke(main, ["models", "show", "v0002"], env=env)
    assert shown.exit_code == 0, shown.output
    assert TRAINING_SET_VERSION in shown.output and "does not beat champion" in shown.output
    assert "rejected" in shown.output and "pr_auc" in shown.output

    refused = runner.invoke(main, ["models", "promote", "v0002"], env=env)
    assert refused.exit_code != 0 and "rejected by the gate" in refused.output

    forced = runner.invoke(main, ["models", "promote", "v0002", "--force"], env=env)
    assert forced.exit_code == 0, forced.output
    registry = Registry(Settings(home).registry_path)
    assert registry.get_alias(CHAMPION) == "v0002"

    rolled = runner.invoke(main, ["models", "rollback", "--reason", "canary alarms"], env=env)
    assert rolled.exit_code == 0, rolled.output
    assert registry.get_alias(CHAMPION) == "v0001"
    assert registry.events()[-1].kind == "rolled_back"
    assert registry.events()[-1].reason == "canary alarms"

    unknown = runner.invoke(main, ["models", "show", "v0099"], env=env)
    assert unknown.exit_code != 0 and "v0099" in unknown.output
