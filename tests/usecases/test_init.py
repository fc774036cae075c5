"""``loopline init``: a scaffolded use case loads, passes its own tests, and runs through the
platform in its own process (``LOOPLINE_USECASE``) to a gated model answering REST requests;
its user's own files are ingested or quarantined like the demo's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.usecase import REPO_ROOT, load
from orchestration.cli import main
from orchestration.cli_init import TEMPLATE, scaffold


def _env(root: Path, home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "LOOPLINE_USECASE": str(root)}
    if home is not None:
        env["LOOPLINE_HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    result = CliRunner().invoke(
        main, ["init", "shop", "--path", str(tmp_path_factory.mktemp("uc"))]
    )
    assert result.exit_code == 0, result.output
    root = Path(result.output.split("created ")[1].split(" (")[0])
    assert "LOOPLINE_USECASE=" in result.output and "its tests" in result.output
    return root


def test_init_writes_every_template_file_with_the_name_filled_in(shop: Path):
    template = {p.relative_to(TEMPLATE) for p in TEMPLATE.rglob("*") if p.is_file()}
    written = {p.relative_to(shop) for p in shop.rglob("*") if p.is_file()}
    assert {p for p in template if "__pycache__" not in p.parts} <= written
    for path in shop.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert "{{" not in path.read_text(), path
    uc = load(shop)
    assert (uc.name, uc.features.service, uc.simulator) == ("shop", "shop_model_v1", "simulator")


def test_init_refuses_a_bad_name_and_an_existing_folder(tmp_path: Path):
    for name in ("Shop", "9lives", "my-shop", "class", ""):
        with pytest.raises(ValueError, match="lowercase identifier"):
            scaffold(name, tmp_path)
    scaffold("mine", tmp_path)
    with pytest.raises(FileExistsError):
        scaffold("mine", tmp_path)
    refused = CliRunner().invoke(main, ["init", "fraud"])  # usecases/fraud exists
    assert refused.exit_code != 0 and "exists" in refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing half-written


def test_a_scaffolded_use_case_passes_its_own_tests(shop: Path):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(shop / "tests")],
        cwd=REPO_ROOT,
        env=_env(shop),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.slow
def test_a_scaffolded_use_case_trains_is_gated_and_serves_a_prediction(shop: Path, tmp_path: Path):
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.usecases.usecase_loop", str(tmp_path / "home"), str(out)],
        cwd=REPO_ROOT,
        env=_env(shop, tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["usecase"] == "shop"
    # Demo data and the user's own export are validated; the broken export is quarantined.
    ledger = summary["ledger"]
    assert len(ledger) > 40 and summary["failed_ingest_runs"] == 1  # the quarantined one
    assert ledger[summary["users_good"]] == ["validated", None]
    status, reason = ledger[summary["users_bad"]]
    assert status == "quarantined" and "missing column 'event_id'" in reason
    assert all(s == "validated" for f, (s, _) in ledger.items() if f != summary["users_bad"])
    # A model is trained, beats its logistic-regression baseline at the gate, and is champion.
    assert summary["features_ok"] and summary["trained_ok"], summary["gate"]
    assert summary["gate_passed"] and summary["champion"] == "v0001"
    assert summary["metric"] == "pr_auc"
    assert summary["value"] > summary["baseline_value"] + 0.02
    # Deployed to TorchServe: answers with the declared score and decision words, features
    # found for every entity, and a malformed request is a JSON 400 that leaves it serving.
    assert summary["deployed_ok"]
    predictions = summary["predictions"]
    assert len(predictions) == 3
    for p in predictions:
        assert 0.0 <= p["outcome_probability"] <= 1.0
        assert p["decision"] in ("review", "accept") and p["model_version"] == "v0001"
        assert p["unknown_entities"] == [] and p["missing_features"] == []
    # The guarantees hold for it too: the training set's join equals Feast's, and online
    # scores equal batch scores of the same requests (float32 rounding apart).
    assert summary["asof_equals_feast"]
    online = [p["outcome_probability"] for p in summary["predictions"]]
    assert online == pytest.approx(summary["batch_scores"], rel=1e-5, abs=1e-6)
    assert summary["malformed"]["status"] == 400
    assert "missing field" in summary["malformed"]["body"]["reason"]
    assert summary["still_serving"]
    # Monitoring: a day of traffic and its truth give the live PR-AUC and its CBPE estimate.
    live = summary["live"]
    assert live["evaluated"] and live["labelled"] == summary["traffic"] > 1000
    assert live["positives"] > 30 and 0.05 < live["live_pr_auc"] <= 1.0
    assert abs(live["estimate_error"]) < 0.15
