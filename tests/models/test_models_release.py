from __future__ import annotations

import subprocess
from dataclasses import replace

import pytest

from models.artifact import save_training_result
from models.gate import GatePolicy
from models.registry import CHALLENGER, Registry
from models.release import (
    CARD,
    EVALUATION,
    Lineage,
    evaluate_candidate,
    git_code_version,
    register_candidate,
    score_ks_vs_champion,
)
from models.spec import feature_spec_from_fields
from models.train import train_baseline, train_model
from tests.models.testkit import FAST, SPEC, WEAK_BASELINE

POLICY = GatePolicy(slice_min_support=10_000, latency_repeats=3, max_latency_ms_batch1=500.0)
LINEAGE = Lineage(
    "ts-0001", "fraud_model_v1", ("b1", "b2"), "/data/ts-0001.parquet", "run-1", "abc"
)


def test_feature_spec_from_store_fields_and_request_columns():
    spec = feature_spec_from_fields(
        [
            ("card_tx_count_24h", "Int64"),
            ("card_home_country", "String"),
            ("tx_is_foreign", "Bool"),
            ("merchant_category", "String"),
            ("card_amount_mean_7d", "Float64"),
        ],
        request_numeric=("amount",),
        request_categorical=("country", "merchant_category"),
    )
    assert spec.numeric == ("card_tx_count_24h", "tx_is_foreign", "card_amount_mean_7d", "amount")
    assert spec.categorical == ("card_home_country", "merchant_category", "country")


@pytest.fixture(scope="module")
def saved(training_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    golden = training_set.head(16)
    return (
        save_training_result(train_model(training_set, SPEC, FAST), root / "c", golden_rows=golden),
        save_training_result(
            train_baseline(training_set, SPEC, WEAK_BASELINE), root / "b", golden_rows=golden
        ),
    )


def test_registered_candidate_carries_card_evaluation_and_lineage(saved, training_set, tmp_path):
    candidate, baseline = saved
    evaluation = evaluate_candidate(training_set, candidate, baseline, POLICY, LINEAGE)
    assert evaluation.decision.passed, evaluation.decision.reasons
    assert set(evaluation.reports) == {"challenger", "baseline"}

    registry = Registry(tmp_path / "registry.sqlite")
    version = register_candidate(registry, evaluation, model_name="fraud", dagster_run_id="run-2")
    mv = registry.get(version)
    assert mv.aliases == [CHALLENGER]
    assert mv.training_set_version == "ts-0001" and mv.training_batches == ["b1", "b2"]
    assert mv.dagster_run_id == "run-2" and mv.extra["evaluation_run_id"] == "run-1"
    assert mv.code_version == "abc"
    assert mv.hyperparameters["hidden"] == list(FAST.hidden)
    assert mv.metrics["pr_auc"] == evaluation.challenger.metrics["pr_auc"]
    assert {CARD, EVALUATION, "model.pt"} <= set(mv.artifacts)
    assert "ts-0001" in (candidate.path / CARD).read_text()

    # A later registration of the same model leaves its files alone: same version, intact.
    again = replace(evaluation, card="# a different card")
    assert (
        register_candidate(registry, again, model_name="fraud", dagster_run_id="run-3") == version
    )
    assert registry.verify(version) == []
    assert "a different card" not in (candidate.path / CARD).read_text()


def test_champion_is_evaluated_beside_the_challenger(saved, training_set):
    candidate, baseline = saved
    evaluation = evaluate_candidate(
        training_set, candidate, baseline, POLICY, LINEAGE, champion=("v0007", candidate.path)
    )
    assert evaluation.champion_version == "v0007"
    assert evaluation.reports["champion"].metrics == evaluation.challenger.metrics
    # The same model as champion gains nothing, so the gate refuses it.
    assert not evaluation.decision.passed
    assert any("does not beat champion" in r for r in evaluation.decision.reasons)
    # Its scores of the test split are the challenger's own: the shadow allows no move (KS 0).
    assert score_ks_vs_champion(evaluation) == 0.0
    other = evaluate_candidate(
        training_set, candidate, baseline, POLICY, LINEAGE, champion=("v0007", baseline.path)
    )
    assert 0.0 < score_ks_vs_champion(other) <= 1.0
    assert (
        score_ks_vs_champion(evaluate_candidate(training_set, candidate, baseline, POLICY, LINEAGE))
        is None
    )


def test_code_version_is_the_commit_and_marks_uncommitted_changes(tmp_path):
    assert git_code_version(tmp_path) is None

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = git_code_version(tmp_path)
    assert sha is not None and len(sha) == 40
    (tmp_path / "f.py").write_text("x = 2\n")
    assert git_code_version(tmp_path) == f"{sha}+dirty"
