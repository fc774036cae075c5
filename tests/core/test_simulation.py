"""The simulator protocol and the generic driver, on a use case other than the fraud demo (a
scaffolded one): scenario options typed from its ScenarioConfig, faults built from its
declaration, batches landed per dataset, and a declaration that gets the protocol wrong named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from core import simulation
from core.usecase import DECLARATION, UseCaseError, load
from orchestration.cli_init import scaffold


@pytest.fixture(scope="module")
def uc(tmp_path_factory):
    return load(scaffold("simcase", tmp_path_factory.mktemp("uc")))


@pytest.fixture(scope="module")
def frame(uc) -> pl.DataFrame:
    sim = simulation.simulator_module(uc).Simulator(_config(uc))
    return sim.events(3)[uc.request.dataset]


def _config(uc, **fields):
    fields = {
        "seed": 2,
        "start": datetime(2026, 11, 2, tzinfo=UTC),
        "rows_per_batch": 300,
        **fields,
    }
    return simulation.scenario(uc, **fields)


def test_scenario_options_are_typed_from_the_use_cases_scenario(uc):
    assert simulation.scenario_options(["n_accounts=50", "risky-share=0.1"], uc) == {
        "n_accounts": 50,
        "risky_share": 0.1,
    }
    with pytest.raises(ValueError, match=r"'n_cards': expected one of \['n_accounts'"):
        simulation.scenario_options(["n_cards=5"], uc)
    with pytest.raises(ValueError, match="n_accounts='many'"):
        simulation.scenario_options(["n_accounts=many"], uc)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        simulation.scenario_options(["n_accounts"], uc)
    with pytest.raises(ValueError, match="'seed': expected one of"):  # the CLI sets these
        simulation.scenario_options(["seed=3"], uc)
    with pytest.raises(ValueError, match="unknown scenario option"):
        simulation.scenario(uc, n_cards=5)


def test_faults_break_the_declared_columns_of_any_use_case(uc, frame):
    key = uc.request_dataset.key
    renamed = simulation.apply_fault(frame, "renamed_column", seed=1, usecase=uc)
    [old] = set(frame.columns) - set(renamed.columns)
    [new] = set(renamed.columns) - set(frame.columns)
    assert old != key and new == simulation._renamed(old) and new != old
    text = simulation.apply_fault(frame, "wrong_dtype", seed=1, usecase=uc)
    assert text.schema["value"] == pl.String and text["value"].str.contains(",").any()
    nulls = simulation.apply_fault(frame, "null_keys", seed=1, usecase=uc)
    assert 0 < nulls[key].null_count() < frame.height
    bad = simulation.apply_fault(frame, "out_of_range", seed=1, usecase=uc)
    value = uc.request.fields["value"]
    assert (bad["value"] < value.min).any() and (bad["value"] > value.max).any()
    assert not set(bad["kind"]) <= set(uc.vocabularies["kind"])
    assert bad.height == frame.height


def test_run_lands_reference_data_once_then_each_dataset_per_window_with_its_fault(uc, tmp_path):
    landed = simulation.run(
        _config(uc), tmp_path, batches=3, fault="missing_column", fault_batch=1, usecase=uc
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "accounts-seed2.parquet" in names
    assert simulation.reference_landed(tmp_path, uc)
    events = [b for b in landed if b.dataset == "events"]
    assert [b.batch_index for b in events] == [0, 1, 2]
    assert [b.fault for b in events] == [None, "missing_column", None]
    broken = pl.read_parquet(events[1].path)
    assert len(broken.columns) == len(uc.request_dataset.columns) - 1
    again = simulation.run(_config(uc), tmp_path, batches=1, start_batch=3, usecase=uc)
    assert all(b.dataset != "accounts" for b in again)  # reference data is there already


def test_a_use_case_without_a_simulator_or_with_a_partial_one_is_named(uc, tmp_path):
    root = Path(uc.root)
    declaration = yaml.safe_load((root / DECLARATION).read_text())
    declaration.pop("simulator")
    plain = tmp_path / "plain"
    plain.mkdir()
    for item in root.iterdir():
        (plain / item.name).symlink_to(item)
    (plain / DECLARATION).unlink()
    (plain / DECLARATION).write_text(yaml.safe_dump(declaration))
    with pytest.raises(UseCaseError, match="declares no simulator: land your own files"):
        simulation.simulator_module(load(plain))

    (plain / "half.py").write_text("DRIFTS = ('none',)\n")
    declaration["simulator"] = "half"
    (plain / DECLARATION).write_text(yaml.safe_dump(declaration))
    with pytest.raises(UseCaseError, match="lacks ScenarioConfig, Simulator") as caught:
        simulation.simulator_module(load(plain))
    assert caught.value.field == "simulator"


def test_the_wall_clock_bounds_what_run_lands(uc, tmp_path):
    now = datetime.now(UTC)
    config = _config(uc, start=now - timedelta(hours=7))  # window 1 is under way
    landed = simulation.run(config, tmp_path, batches=2, usecase=uc)
    last = max(b.window_end for b in landed if b.batch_index >= 0)
    assert last <= datetime.now(UTC)
