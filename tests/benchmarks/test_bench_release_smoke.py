"""``benchmarks/bench_release.py --smoke`` for each use case, in its own process as ``make
bench-release`` runs it: two sound retrains and two A/A releases through the deployment asset
against a real TorchServe, every delivery's figures in the table and the JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import results
from core.usecase import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTCOMES = {"promoted", "rejected", "rolled_back", "deferred"}
SHADOW = ("ks", "ks_bound", "champion_p95_ms", "challenger_p95_ms", "errors", "requests")


# The classifier only in make test (~2 min): the regressor's delivery path against a real
# TorchServe is the release drill's (tests/e2e/test_release_integrity_e2e.py), and
# `make bench-release-delivery` runs this benchmark for it.
@pytest.mark.parametrize("usecase", ["fraud"])
def test_the_smoke_run_delivers_each_retrain_and_reports_its_figures(usecase, tmp_path):
    env = {**os.environ, "LOOPLINE_USECASE": usecase}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_release", "--smoke", "--out", str(tmp_path),
         "--results-dir", str(tmp_path / "results")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    [path] = tmp_path.glob(f"release-*-{usecase}.json")
    result = json.loads(path.read_text())
    first, *rounds = result["rounds"]
    assert first["outcome"] == "promoted" and first["watch"]["requests"] > 0
    assert [(r["kind"], r["index"]) for r in rounds] == [
        ("retrain", 1), ("A/A", 1), ("retrain", 2), ("A/A", 2),
    ]  # fmt: skip
    for r in rounds:
        assert r["outcome"] in OUTCOMES, r
        assert r["champion"] and r["champion"] != r["version"]
        assert all(r["shadow"][k] is not None for k in SHADOW), r["shadow"]
        change = ("champion_rate", "challenger_rate") if usecase == "fraud" else ("shift",)
        assert all(r["shadow"][k] is not None for k in change), r["shadow"]
        assert r["outcome"] == "promoted" or r["reasons"], r  # every withdrawal says why
    for aa in (r for r in rounds if r["kind"] == "A/A"):
        # The champion's own weights and threshold: the same scores, the same decisions.
        assert aa["shadow"]["ks"] == 0.0
        if usecase == "fraud":
            assert aa["shadow"]["champion_rate"] == aa["shadow"]["challenger_rate"]
        else:
            assert aa["shadow"]["shift"] == 0.0
    retrains = [r for r in rounds if r["kind"] == "retrain"]
    rejected = sum(r["outcome"] in ("rejected", "rolled_back") for r in retrains)
    assert result["retrains"]["delivered"] == 2 and result["retrains"]["rejected"] == rejected
    assert f"false rejections: {rejected} of 2" in done.stdout
    assert result["policy"]["min_score_ks"] > 0 and result["headline"] in done.stdout
    # The common results file (issue 20) carries the headline beside its A/A anchor.
    [common] = (tmp_path / "results").glob("bench_release*-smoke.json")
    summary = results.read(common)
    [headline] = [f for f in summary.figures if f.headline]
    assert headline.value == result["retrains"]["rejected"] and headline.anchor.value == 0
    assert headline.goal is not None and summary.smoke
