"""Every benchmark at its smoke size (issue 20): it runs, writes one results file, and the file
reports the figures the full run publishes, with their anchors' ratios.

Speed is never asserted (the machine is shared and small): a figure must be measured and, where
it has an anchor, its ratio taken. Correctness checks a benchmark makes (Loopline's drift
statistics equal SciPy's, training is deterministic) must hold at any size. A peer that
``make test`` does not install (Evidently's venv, the serving peer's) must be reported skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import results

ROOT = Path(__file__).resolve().parents[2]
SERVING_PEER = ROOT / "benchmarks" / ".venv-peer" / "bin" / "python"
DRIFT_PEER = ROOT / "benchmarks" / ".venv-drift-peer" / "bin" / "python"

# benchmark: figures that must carry a ratio, correctness checks that must be met, and what the
# smoke must report skipped (None: nothing).
SMOKES = {
    "bench_validation": (["validate + profile a batch (loopline total)"], [], None),
    "bench_drift": (
        ["drift statistics, CPU time"] if DRIFT_PEER.exists() else [],
        ["largest |Loopline - SciPy| (KS, JS)"],
        None if DRIFT_PEER.exists() else "Evidently",
    ),
    "bench_training": (
        ["training throughput (loopline fit)"],
        ["same seed twice: largest weight difference"],
        None,
    ),
    "bench_features": (
        [
            "training set (loopline historical_features)",
            "online lookup p50, 1 request (online_features)",
            "online lookup p50, 32 requests (online_features)",
        ],
        [],
        None,
    ),
    "bench_backtest": (
        ["backtest speed, simulated s per wall s", "post-drift mean pr_auc, triggers"],
        [],
        None,
    ),
    "bench_serving": (
        [
            "serving p50, 1 client(s)",
            "serving p50, 32 client(s)",
            "serving throughput, 32 clients",
            "serving throughput, dynamic batching (32, 5 ms), 32 clients",
        ],
        [],
        None if SERVING_PEER.exists() else "peer",
    ),
    "bench_scale": (
        [
            "online lookup, Redis: online_features, p50, 1 entity",
            "serving throughput, 2 TorchServe workers, 32 clients, batch 32",
        ],
        [],
        None,
    ),
    "bench_ingest": (["ingestion throughput, one run per tick"], [], None),
    "bench_first_model": (["first champion answering (fraud): fraud"], [], None),
    "bench_loop": ([], [], "loopline demo"),
}
# Options beside --smoke: the serving smoke takes the path of the key space no cache holds (a
# simulated home, request bodies spread over every card), at a few thousand cards.
EXTRA = {
    "bench_serving": ["--scenario", "n_cards=5000", "--requests", "12000", "--bodies", "2000"],
}
# Under ~20 s on 2 cores; the others start servers or a platform (a minute or a few).
FAST = {"bench_validation", "bench_drift"}


def _param(name: str):
    marks = [] if name in FAST else [pytest.mark.slow]
    return pytest.param(name, marks=marks, id=name)


def run_smoke(name: str, out: Path) -> results.BenchResult:
    """``python -m benchmarks.<name> --smoke`` into ``out``; its one results file, read."""
    command = [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--results-dir", str(out)]
    command += EXTRA.get(name, [])
    if name == "bench_serving" and SERVING_PEER.exists():
        command += ["--peer-python", str(SERVING_PEER)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LOOPLINE_USECASE", None)
    log = out.parent / f"{name}.log"
    with open(log, "w") as sink:
        done = subprocess.run(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=1500
        )
    assert done.returncode == 0, f"{name} --smoke failed:\n{log.read_text()[-5000:]}"
    files = list(out.glob("*.json"))
    assert len(files) == 1, f"{name} wrote {files}"
    assert files[0].name.endswith("-smoke.json")
    return results.read(files[0])


@pytest.mark.parametrize("name", [_param(n) for n in SMOKES])
def test_smoke_writes_its_results(name: str, tmp_path: Path) -> None:
    ratios, checks, skipped = SMOKES[name]
    result = run_smoke(name, tmp_path / "results")

    assert (result.benchmark, result.smoke) == (name, True)
    assert f" -m benchmarks.{name} --smoke --results-dir " in result.command
    assert result.machine.cores >= 1 and result.machine.python
    assert result.figures and all(f.value is not None for f in result.figures), result.figures
    by_name = {f.name: f for f in result.figures}
    for figure in ratios:
        assert figure in by_name, f"{figure!r} not in {sorted(by_name)}"
        assert by_name[figure].ratio is not None and by_name[figure].ratio > 0
    for figure in checks:
        assert by_name[figure].met is True, by_name[figure]
    if name == "bench_serving":  # bodies over thousands of cards, not the 120 the kit's home has
        assert by_name["key space: distinct card_id in the requests"].value > 2000
    if skipped is None:
        assert result.skipped == []
    else:
        assert any(skipped in s for s in result.skipped), result.skipped
