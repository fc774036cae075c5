"""The whole loop with a real Dagster daemon and a real TorchServe, no manual step.

``loopline demo`` starts ``dagster dev`` (webserver + daemon), TorchServe and the live
simulator with its traffic; history is landed first and a first champion is trained and
deployed by the sensors; a batch with a renamed column is landed (it must be quarantined, start
no retraining, and leave the champion serving); then live traffic runs on the accelerated clock,
concept drift is injected and the loop must, on its own, retrain from drifted labels, validate
and promote a new champion that TorchServe serves. Traffic is live (features fresh, entities
known), and the served model's live metric is measured before the drift, after it, and after
recovery.

Both demos run in ``make demo-e2e`` (the fraud demo's labels mature in 7 simulated days: 25-35
minutes; the delivery demo's in 3 hours: ~15 minutes). ``make test`` runs the same loop for both
use cases at once, with rain in delivery, in tests/e2e/test_platform_e2e.py (decision 35).
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# Per-entity constants: their serving distribution is the training one whatever the drift.
STATIC = {
    "fraud": (
        "card_home_country",
        "card_spending_profile",
        "merchant_category",
        "merchant_country",
    ),
    "delivery": ("restaurant_cuisine", "courier_vehicle"),
}


def run_demo(tmp_path, usecase: str, timeout_s: int) -> dict:
    env = {**os.environ, "LOOPLINE_HOME": str(tmp_path / "home"), "LOOPLINE_USECASE": usecase}
    done = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "demo", "--json", "--timeout", str(timeout_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s + 300,
    )
    start = done.stdout.find("{\n")
    assert start >= 0, f"no summary printed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(done.stdout[start:])
    # On a failure, what the loop did: each retraining's trigger and status, the promotions.
    story = {k: summary.get(k) for k in ("outcome", "retrainings", "promotions", "champion")}
    assert done.returncode == 0, json.dumps(story, indent=1, default=str)[-6000:]
    return summary


@pytest.mark.soak
def test_fraud_concept_drift_leads_to_a_new_champion_and_a_skewed_batch_changes_nothing(tmp_path):
    summary = run_demo(tmp_path, "fraud", 2100)
    check_the_loop(summary, STATIC["fraud"])


@pytest.mark.soak
def test_delivery_rain_leads_to_a_new_champion_that_wins_back_the_lost_minutes(tmp_path):
    summary = run_demo(tmp_path, "delivery", 1500)
    check_the_loop(summary, STATIC["delivery"])
    # Rain made the old champion late on every order (2.7 -> 8.5 minutes in one run). The
    # first champion trained past the rain may have seen only a few rainy hours; two days of
    # rain later the champion then serving (retrained on a rainier 5-day window) answers with
    # a lower MAE, measured on the orders it served.
    measured = summary["live_quality_by_phase"]["measured_at_end"]
    before, drifted = measured["before_drift"]["mae"], measured["after_drift"]["mae"]
    assert drifted > 1.5 * before, measured  # the rain hurt the champion that never saw it
    final = measured.get("final_champion") or measured["after_recovery"]
    assert final["mae"] < 0.9 * drifted, measured


def check_the_loop(summary: dict, static: tuple[str, ...]) -> None:
    # The schema-skewed batch: quarantined with its reason, no retraining, champion untouched.
    skew = summary["schema_skew_check"]
    assert skew["status"] == "quarantined" and "missing column" in skew["reason"]
    assert skew["retrainings_started"] == 0
    assert skew["champion_serving"] is True

    # Drift -> a retraining started by a sensor (never by hand) -> a new champion serving.
    first, outcome = summary["promotions"][0]["version"], summary["outcome"]
    assert outcome.startswith(f"{first} replaced by "), outcome
    new = outcome.removeprefix(f"{first} replaced by ").split()[0]
    # While the demo waits for the new champion's live metric the loop goes on, and may promote
    # a better one again: the champion at the end is the new one or a later promotion.
    promoted = [p["version"] for p in summary["promotions"]]
    assert new != first and new in promoted, (new, promoted)
    assert summary["champion"] in promoted[promoted.index(new) :], (summary["champion"], promoted)
    triggers = {r["trigger"] for r in summary["retrainings"]}
    assert triggers and triggers <= {"new_data", "drift", "decay", "schedule"}
    assert summary["serving"]["by_version"].get(new, 0) > 0  # customer traffic reached it
    assert summary["traffic"]["failed"] == 0
    # The demo stopped the platform only once the promoting run had finished, cleanly (a later
    # retraining the sensors start meanwhile may be cut short by the bounded demo's end).
    # Loop latency is reported by stage, each after the one before.
    latency = summary["loop_latency"]
    [promoting] = [r for r in summary["retrainings"] if r["run_id"] == latency["run_id"]]
    assert promoting["status"] == "SUCCESS"
    stages = [latency[k] for k in ("run_started_s", "registered_s", "promoted_s", "answering_s")]
    assert 0 <= stages[0] <= stages[1] <= stages[2] <= stages[3]
    assert latency["trigger"] in triggers
    if latency["trigger"] != "schedule":  # counted from what set the retraining off
        assert latency["batch"] != "the run started", latency
        assert 0 <= latency["trigger_seen_s"] <= latency["run_started_s"], latency

    # Honest time: customer requests were scored with their features, so static per-entity
    # attributes served look as in training, and nothing is missing for lack of rows.
    availability = summary["availability"]
    assert availability["requests"] > 1000
    # Issue 14 asks for under 1% (0.12% measured; 5.4% while spurious drift retrainings kept
    # the machine busy and features runs queued behind them, decision 26; 96% with the
    # wall-clock TTL before decision 24).
    assert availability["unknown_entity_rate"] < 0.01, availability
    psi = summary["drift"]["psi"]
    for name in static:
        assert psi[name] is not None and psi[name] < 0.01, (name, psi[name])

    # The served model's live metric: before the drift, after it, and the recovered champion's.
    # The loop judges its champion of the moment as labels mature; the demo also measures every
    # label-mature prediction of each phase once it ends (a champion replaced before its
    # predictions' labels matured is judged only there).
    # (The loop's own points need a champion to serve for a label maturity; a champion that
    # is replaced sooner is judged by the end measurement below, over every served prediction.)
    phases = summary["live_quality_by_phase"]
    measured = phases["measured_at_end"]
    for name in ("before_drift", "after_drift"):
        assert phases[name] is not None or measured[name] is not None, (name, phases)
    assert "after_recovery" in measured  # reported, measured once both classes are labelled
    assert new not in measured["before_drift"]["versions"]
    # After the drift: every champion that never trained on it (a retraining on new data just
    # after the drift included), never the recovered one.
    assert new not in (measured["after_drift"] or {}).get("versions", [])
    # The new champion learned from drifted labels: its training data reaches past the drift.
    assert phases["drift_start"] is not None and new == phases["new_champion"]
