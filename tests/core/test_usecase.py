"""A use case's declaration is typed and checked when loaded: a mistake is one error naming the
file and the field, before anything runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.usecase import DECLARATION, USECASES_DIR, UseCaseError, active, load

FRAUD = USECASES_DIR / "fraud"


def _broken(tmp_path: Path, edit) -> Path:
    """A copy of the fraud use case with ``edit`` applied to its parsed declaration."""
    root = tmp_path / "mine"
    shutil.copytree(FRAUD, root, ignore=shutil.ignore_patterns("__pycache__"))
    declaration = yaml.safe_load((root / DECLARATION).read_text())
    edit(declaration)
    (root / DECLARATION).write_text(yaml.safe_dump(declaration))
    return root


def _refusal(root: Path) -> UseCaseError:
    with pytest.raises(UseCaseError) as caught:
        load(root)
    assert caught.value.file == str(root / DECLARATION)
    assert str(root / DECLARATION) in str(caught.value)
    return caught.value


def test_the_fraud_demo_loads_and_is_the_default():
    uc = active()
    assert uc.name == "fraud"
    assert uc.root == FRAUD
    assert uc.request.dataset == "transactions"
    assert uc.timestamp_field == "timestamp"
    assert uc.contract_path("labels").is_file()
    assert load("fraud") == load(FRAUD)


def test_a_column_without_a_known_type_is_refused(tmp_path: Path):
    def edit(d):
        d["datasets"]["transactions"]["columns"]["amount"] = "flaot"

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "datasets.transactions.columns.amount"
    assert "'string', 'float', 'int', 'bool' or 'timestamp'" in error.problem


def test_a_column_with_no_type_is_refused(tmp_path: Path):
    def edit(d):
        d["datasets"]["labels"]["columns"]["is_fraud"] = None

    assert _refusal(_broken(tmp_path, edit)).field == "datasets.labels.columns.is_fraud"


def test_a_misspelt_key_is_refused_not_ignored(tmp_path: Path):
    def edit(d):
        d["datasets"]["cards"]["evnet_time"] = d["datasets"]["cards"].pop("key")

    error = _refusal(_broken(tmp_path, edit))
    assert error.field in ("datasets.cards.key", "datasets.cards.evnet_time")


def test_a_key_that_is_not_a_column_is_refused(tmp_path: Path):
    def edit(d):
        d["datasets"]["merchants"]["key"] = "merchant"

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "datasets.merchants.key"
    assert "'merchant' is not one of its columns" in error.problem


def test_an_event_time_that_is_not_a_timestamp_is_refused(tmp_path: Path):
    def edit(d):
        d["datasets"]["labels"]["event_time"] = "is_fraud"

    error = _refusal(_broken(tmp_path, edit))
    assert (error.field, error.problem) == (
        "datasets.labels.event_time",
        "'is_fraud' is bool, not timestamp",
    )


def test_a_missing_contract_file_is_refused(tmp_path: Path):
    root = _broken(tmp_path, lambda d: None)
    (root / "contracts" / "labels.yml").unlink()
    error = _refusal(root)
    assert error.field == "datasets.labels.contract"


def test_a_drift_column_no_dataset_has_is_refused(tmp_path: Path):
    def edit(d):
        d["datasets"]["transactions"]["drift"]["numeric"].append("amount_usd")

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "datasets.transactions.drift.numeric"
    assert "'amount_usd'" in error.problem


def test_a_request_field_the_model_never_uses_is_refused(tmp_path: Path):
    def edit(d):
        d["request"]["model_inputs"].remove("channel")

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "request.fields.channel"
    assert "the model never uses this field" in error.problem


def test_a_request_field_naming_an_unknown_column_is_refused(tmp_path: Path):
    def edit(d):
        d["request"]["fields"]["timestamp"]["column"] = "event_time"

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "request.fields.timestamp"
    assert "column 'event_time' is not in dataset 'transactions'" in error.problem


def test_the_request_time_must_be_the_request_datasets_event_time(tmp_path: Path):
    def edit(d):
        d["datasets"]["transactions"]["columns"]["settled_at"] = "timestamp"
        d["request"]["fields"]["timestamp"]["column"] = "settled_at"

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "request.fields.timestamp"
    assert "the event time of 'transactions' is 'event_timestamp'" in error.problem


def test_a_category_field_needs_a_declared_vocabulary(tmp_path: Path):
    def edit(d):
        d["request"]["fields"]["channel"]["vocabulary"] = "channels"

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "request.fields.channel.vocabulary"
    assert "no vocabulary 'channels' declared" in error.problem


def test_a_number_field_needs_its_range(tmp_path: Path):
    def edit(d):
        del d["request"]["fields"]["amount"]["max"]

    assert _refusal(_broken(tmp_path, edit)).field == "request.fields.amount"


def test_a_model_input_that_is_not_a_field_is_refused(tmp_path: Path):
    def edit(d):
        d["request"]["model_inputs"].append("amount_usd")

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "request.model_inputs"


def test_every_mistake_is_counted_in_the_one_error(tmp_path: Path):
    def edit(d):
        d["datasets"]["merchants"]["key"] = "merchant"
        d["datasets"]["cards"]["key"] = "card"

    assert "(and 1 more)" in str(_refusal(_broken(tmp_path, edit)))


def test_invalid_yaml_and_unknown_use_cases_are_named(tmp_path: Path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / DECLARATION).write_text("name: [unclosed\n")
    assert "not valid YAML" in str(_refusal(root))
    with pytest.raises(
        UseCaseError, match=r"no use case declared here \(known use cases: .*'fraud'"
    ):
        load("no_such_use_case")


def test_a_simulator_module_that_is_not_there_is_refused(tmp_path: Path):
    def edit(d):
        d["simulator"] = "simulatr"

    error = _refusal(_broken(tmp_path, edit))
    assert error.field == "simulator"
    assert "no module 'simulatr'" in error.problem


def test_declared_policies_override_the_platform_defaults_and_name_their_mistakes(tmp_path):
    from models.spec import GatePolicy, TrainConfig
    from orchestration.triggers import TriggerPolicy

    def edit(d):
        d["training"] = {"hidden": [64, 16], "epochs": 12}
        d["retrain"] = {"cooldown_minutes": 90, "drift_psi": 0.2}

    uc = load(_broken(tmp_path, edit))
    train = uc.declared("training", TrainConfig)
    assert (train.hidden, train.epochs, train.lr) == ((64, 16), 12, TrainConfig().lr)
    retrain = uc.declared("retrain", TriggerPolicy, drift_psi=0.4)  # run config wins
    assert retrain.cooldown.total_seconds() == 90 * 60 and retrain.drift_psi == 0.4
    assert uc.declared("gate", GatePolicy) == GatePolicy(primary_metric="pr_auc")  # as declared

    def typo(d):
        d["gate"] = {"min_gain_over_champoin": 0.01}

    with pytest.raises(UseCaseError) as caught:
        load(_broken(tmp_path / "typo", typo)).declared("gate", GatePolicy)
    assert caught.value.field == "gate.min_gain_over_champoin"
    assert "min_gain_over_champion" in caught.value.problem  # the fields it could have meant

    def refused(d):
        d["training"] = {"epochs": 0}

    with pytest.raises(UseCaseError) as caught:
        load(_broken(tmp_path / "refused", refused)).declared("training", TrainConfig)
    assert caught.value.field == "training" and "epochs" in caught.value.problem


def _training_set_defaults(usecase: str | Path) -> subprocess.CompletedProcess:
    code = (
        "from orchestration.feature_assets import TrainingSetConfig\n"
        "print(TrainingSetConfig().split_policy().window)"
    )
    env = {**os.environ, "LOOPLINE_USECASE": str(usecase)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_declared_training_set_block_sets_the_split_and_names_its_mistakes(tmp_path):
    # The delivery demo trains on its last 5 days (decision 35); fraud keeps every row.
    assert _training_set_defaults("delivery").stdout.strip() == "5 days, 0:00:00"
    assert _training_set_defaults("fraud").stdout.strip() == "None"

    def typo(d):
        d["training_set"] = {"windo_days": 3}

    done = _training_set_defaults(_broken(tmp_path / "typo", typo))
    assert done.returncode != 0
    assert "training_set.windo_days: unknown; expected one of" in done.stderr
    assert "window_days" in done.stderr

    def refused(d):
        d["training_set"] = {"window_days": -2}

    done = _training_set_defaults(_broken(tmp_path / "refused", refused))
    assert done.returncode != 0 and "training_set: window must be a positive" in done.stderr
