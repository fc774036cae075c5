"""Several use cases in one platform: where each lives, what they share, which ones a command
runs (decision 35). The platform itself, run end to end, is tests/e2e/test_platform_e2e.py."""

from __future__ import annotations

import json
from dataclasses import replace

import click
import pytest

from core.settings import Settings, default_home
from core.usecase import available
from orchestration.cli_platform import Layout, selected
from serving.config import ServingConfig
from serving.process import STATE_FILE, TorchServeProcess


def test_under_a_root_each_use_case_has_its_own_home_and_they_share_one_torchserve(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LOOPLINE_HOME", str(tmp_path))
    layout = Layout.of(["fraud", "delivery"])
    fraud, delivery = layout.settings("fraud"), layout.settings("delivery")
    assert fraud.home == tmp_path / "fraud" and delivery.home == tmp_path / "delivery"
    assert fraud.serving_dir == delivery.serving_dir == tmp_path / "serving"
    # Nothing else is shared: ledger, registry, lake, Dagster instance.
    for path in ("ledger_path", "registry_path", "lake", "dagster_home", "predictions"):
        assert getattr(fraud, path) != getattr(delivery, path), path
    env = layout.env("delivery", base={})
    assert env == {
        "LOOPLINE_USECASE": "delivery",
        "LOOPLINE_HOME": str(tmp_path / "delivery"),
        "LOOPLINE_SERVING_DIR": str(tmp_path / "serving"),
    }


def test_by_default_each_use_case_keeps_its_default_home(monkeypatch):
    monkeypatch.delenv("LOOPLINE_HOME", raising=False)
    monkeypatch.delenv("LOOPLINE_SERVING_DIR", raising=False)
    layout = Layout.of(["fraud", "delivery"])
    assert layout.homes == {"fraud": default_home("fraud"), "delivery": default_home("delivery")}
    assert layout.serving_dir == default_home("fraud") / "serving"


def test_an_unknown_use_case_is_refused_with_the_known_ones():
    with pytest.raises(click.UsageError, match="known use cases.*delivery.*fraud"):
        Layout.of(["fraud", "nosuch"])


def test_which_use_cases_a_command_runs(monkeypatch):
    for var in ("LOOPLINE_USECASE", "LOOPLINE_HOME"):
        monkeypatch.delenv(var, raising=False)
    everything = selected(())
    assert everything[0] == "fraud" and "delivery" in everything  # make run: side by side
    assert everything == available(with_simulator=True)
    assert selected(("delivery", "fraud", "delivery")) == ["delivery", "fraud"]
    monkeypatch.setenv("LOOPLINE_HOME", "/tmp/one-home")
    assert selected(()) == ["fraud"]  # a home is one use case's
    monkeypatch.setenv("LOOPLINE_USECASE", "delivery")
    assert selected(()) == ["delivery"]
    assert selected(("fraud",)) == ["fraud"]


def test_joining_a_running_torchserve_keeps_the_use_cases_own_model_and_home(tmp_path):
    """The platform's TorchServe may have been started for another use case: a use case that
    attaches to it takes its ports, never its model name or home."""
    serving = tmp_path / "serving"
    started = ServingConfig.for_home(tmp_path / "fraud", serving, model_name="fraud")
    started = replace(started, inference_port=18080, management_port=18081, metrics_port=18082)
    serving.mkdir()
    (serving / STATE_FILE).write_text(json.dumps({"pid": 1, "config": started.to_dict()}))
    mine = ServingConfig.for_home(tmp_path / "delivery", serving, model_name="delivery")
    joined = TorchServeProcess.attach(mine, tmp_path / "delivery" / "registry.sqlite").config
    assert (joined.model_name, joined.home) == ("delivery", (tmp_path / "delivery").resolve())
    assert (joined.inference_port, joined.management_port) == (18080, 18081)
    assert joined.prediction_log_dir == (tmp_path / "delivery" / "predictions" / "delivery")
    assert joined.model_store == started.model_store


def test_settings_read_the_shared_serving_folder(tmp_path):
    settings = Settings.from_env(
        {"LOOPLINE_HOME": str(tmp_path / "a"), "LOOPLINE_SERVING_DIR": str(tmp_path / "s")}
    )
    assert settings.serving_dir == tmp_path / "s" and settings.model_store.parent == tmp_path / "s"
    assert Settings.from_env({"LOOPLINE_HOME": str(tmp_path / "a")}).serving_dir == (
        tmp_path / "a" / "serving"
    )
