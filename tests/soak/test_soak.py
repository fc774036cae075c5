"""The month-long soak's few-minute variant (``make soak-month`` runs the month): the same
driver, faults and checks on three simulated days, so none of it rots. Disk and monitoring
flatness need a month past the retention window; here retention must at least have removed the
2 GB of junk it quarantined."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.settings import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_three_unattended_days_lose_nothing_and_meet_every_fault(tmp_path):
    out = tmp_path / "soak"
    env = {**os.environ, "LOOPLINE_USECASE": "delivery"}
    env.pop("LOOPLINE_HOME", None)
    # The soak writes a file in place in landing: the platform's own settle time applies, not
    # the test session's 0 (tests/conftest.py), which let a half-written file be taken.
    env.pop("LOOPLINE_LANDING_SETTLE_SECONDS", None)
    command = [sys.executable, "-m", "tests.soak.driver", "--days", "3", "--speed", "1440"]
    command += ["--retain-days", "1", "--short", "--out", str(out)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())

    assert report["requests"]["lists"] > 60  # a list of 16 valid requests a second, throughout
    assert report["failed_outside_restarts"] == []
    assert len(report["restart_windows"]) == 1
    assert report["unaccounted"] == [] and report["landed_files"] > 10
    outcomes = report["fault_outcomes"]
    assert {s for s, _ in outcomes["junk_quarantined"].values()} == {"quarantined"}
    assert outcomes["in_place"][0] == "validated" and outcomes["in_place"][1] > 0
    assert outcomes["writer_errors_seen"] >= 1 and outcomes["online_reloads"] >= 1
    quarantine = [s["bytes"]["quarantine"] for s in report["samples"] if "bytes" in s]
    assert max(quarantine) >= 4 << 30 > quarantine[-1]  # retention removed the junk
    assert (out / "soak.png").stat().st_size > 10_000
