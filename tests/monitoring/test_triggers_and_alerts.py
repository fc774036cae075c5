"""Trigger decisions (threshold, cooldown, single in flight) and alert delivery."""

import json
import logging
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from orchestration import alerts
from orchestration.triggers import (
    TRIGGER_BATCH_TAG,
    TRIGGER_SEEN_TAG,
    Signal,
    TriggerPolicy,
    decay_signal,
    decide,
    drift_signal,
    estimated_decay_signal,
    first_seen,
    new_data_signal,
)

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
POLICY = TriggerPolicy(min_new_labelled_rows=1000, drift_psi=0.2, cooldown=timedelta(minutes=30))


def test_thresholds_decide_whether_a_signal_exists():
    assert new_data_signal(999, POLICY) is None
    assert new_data_signal(1000, POLICY).kind == "new_data"
    assert drift_signal({"amount": 0.19, "country": 0.05}, POLICY) is None
    drift = drift_signal({"amount": 0.35, "country": 0.25, "hour": 0.01}, POLICY)
    assert drift.value == pytest.approx(0.35)
    assert "amount" in drift.reason and "country" in drift.reason and "hour" not in drift.reason
    assert decay_signal(0.50, 0.60, 500, POLICY).value == pytest.approx(1 / 6)
    assert decay_signal(0.40, 0.60, 500, POLICY).kind == "decay"
    assert decay_signal(0.10, 0.60, 50, POLICY) is None  # too few labels to judge


def test_decay_below_the_allowed_drop_does_not_fire():
    assert decay_signal(0.52, 0.60, 500, POLICY) is None  # 13% drop < 15%


def test_a_drop_within_chance_is_not_decay_and_the_same_drop_measured_tightly_is():
    # Offline 0.60 on a few dozen test positives, live 0.42 (30% down) on one day's frauds:
    # both figures move by ~0.1 by chance, so the drop is not evidence of decay.
    noisy = {"live_se": 0.10, "offline_se": 0.08}
    assert decay_signal(0.42, 0.60, 5000, POLICY, positives=60, **noisy) is None
    assert (
        estimated_decay_signal(0.42, 0.60, 5000, POLICY, estimate_se=0.1, offline_se=0.08) is None
    )
    # The same drop measured on many labelled frauds is decay, and the reason says how sure.
    tight = decay_signal(0.42, 0.60, 50_000, POLICY, positives=600, live_se=0.02, offline_se=0.02)
    assert tight.kind == "decay" and "z " in tight.reason and "standard error" in tight.reason
    # A collapse (concept drift) is decay even on noisy figures.
    assert decay_signal(0.08, 0.60, 5000, POLICY, positives=60, **noisy).kind == "decay"
    # Average precision on a handful of frauds is not judged at all.
    assert decay_signal(0.08, 0.60, 5000, POLICY, positives=12, **noisy) is None
    # decay_confidence 0.5 compares the point figures (the old behaviour).
    point = TriggerPolicy(decay_confidence=0.5)
    assert decay_signal(0.42, 0.60, 5000, point, positives=60, **noisy).kind == "decay"
    with pytest.raises(ValueError, match="decay_confidence"):
        TriggerPolicy(decay_confidence=0.3)
    with pytest.raises(ValueError, match="min_positives_for_decay"):
        TriggerPolicy(min_positives_for_decay=0)


def test_a_feature_missing_in_serving_has_no_psi_and_is_not_drift():
    assert drift_signal({"merchant_category": float("nan"), "amount": 0.05}, POLICY) is None
    assert drift_signal({"merchant_category": None, "amount": 0.05}, POLICY) is None
    drift = drift_signal({"merchant_category": float("nan"), "amount": 0.3}, POLICY)
    assert "merchant_category" not in drift.reason and drift.value == pytest.approx(0.3)


def test_decay_can_be_read_from_the_label_free_estimate():
    signal = estimated_decay_signal(0.30, 0.60, 500, POLICY)
    assert signal.kind == "decay" and signal.value == pytest.approx(0.5)
    assert signal.reason.startswith("estimated live PR-AUC 0.300 (label-free, CBPE) is 50%")
    assert estimated_decay_signal(0.55, 0.60, 500, POLICY) is None  # 8% drop < 15%
    assert estimated_decay_signal(0.30, 0.60, 50, POLICY) is None  # too few predictions
    assert estimated_decay_signal(None, 0.60, 500, POLICY) is None
    # An offline PR-AUC the champion never recorded (NaN) gives no drop to judge.
    assert estimated_decay_signal(0.30, float("nan"), 500, POLICY) is None
    assert decay_signal(0.30, float("nan"), 500, POLICY) is None
    off = TriggerPolicy(decay_on_estimate=False)
    assert estimated_decay_signal(0.30, 0.60, 500, off) is None


def test_availability_is_an_alert_kind_of_its_own(caplog):
    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        assert alerts.send(alerts.Alert("availability", "unknown entities in 96% of requests"))
    assert json.loads(caplog.records[-1].getMessage())["alert"] == "availability"


def test_nothing_fires_while_a_retraining_is_in_flight():
    signal = drift_signal({"amount": 0.9}, POLICY)
    decision = decide([signal], in_flight=True, last_started=None, now=NOW, policy=POLICY)
    assert not decision.fire
    assert "in flight" in decision.why
    manual = Signal("manual", "asked from the UI")
    assert not decide([manual], in_flight=True, last_started=None, now=NOW, policy=POLICY).fire


def test_cooldown_suppresses_automatic_triggers_but_not_a_person():
    recent = NOW - timedelta(minutes=10)
    drift = drift_signal({"amount": 0.9}, POLICY)
    held = decide([drift], in_flight=False, last_started=recent, now=NOW, policy=POLICY)
    assert not held.fire and "cooling down for 1200 s" in held.why
    manual = Signal("manual", "loopline retrain")
    asked = decide([drift, manual], in_flight=False, last_started=recent, now=NOW, policy=POLICY)
    assert asked.fire and asked.signal.kind == "manual"
    later = decide(
        [drift], in_flight=False, last_started=NOW - timedelta(minutes=31), now=NOW, policy=POLICY
    )
    assert later.fire and later.signal.kind == "drift"


def test_drift_already_answered_waits_a_label_maturity_period_other_triggers_do_not():
    # A retraining within the label maturity of the last drift retraining trains on the same
    # labelled rows: drift alone does not fire again until it re-arms (7 days by default).
    assert TriggerPolicy().drift_rearm == timedelta(days=7)
    drift = drift_signal({"amount": 0.9}, POLICY)
    decay = decay_signal(0.2, 0.6, 1000, POLICY)
    answered = NOW - timedelta(days=2)
    last = NOW - timedelta(hours=1)
    held = decide(
        [drift], in_flight=False, last_started=last, now=NOW, policy=POLICY, last_drift=answered
    )
    assert not held.fire and "drift already answered: it re-arms in 5.0 days" in held.why
    assert [s.kind for s in held.suppressed] == ["drift"]
    both = decide(
        [drift, decay],
        in_flight=False,
        last_started=last,
        now=NOW,
        policy=POLICY,
        last_drift=answered,
    )
    assert both.fire and both.signal.kind == "decay"
    rearmed = decide(
        [drift],
        in_flight=False,
        last_started=last,
        now=NOW,
        policy=POLICY,
        last_drift=NOW - timedelta(days=7, seconds=1),
    )
    assert rearmed.fire and rearmed.signal.kind == "drift"
    # Inside the cooldown the cooldown is what the reason names.
    cooling = decide(
        [drift],
        in_flight=False,
        last_started=NOW - timedelta(minutes=5),
        now=NOW,
        policy=POLICY,
        last_drift=answered,
    )
    assert not cooling.fire and "cooling down" in cooling.why


def test_drift_and_decay_wait_for_labels_the_last_retraining_did_not_have():
    # A demo ran two retrainings a minute apart on the same labelled rows (decay, measured
    # again at each monitoring run, outlasts the cooldown): the same candidate, rejected twice.
    drift = drift_signal({"amount": 0.9}, POLICY)
    decay = decay_signal(0.2, 0.6, 1000, POLICY)
    last = NOW - timedelta(hours=1)
    kwargs = {"in_flight": False, "last_started": last, "now": NOW, "policy": POLICY}
    held = decide([drift, decay], new_labels=False, **kwargs)
    assert not held.fire and "drift waits for labels newer than the last retraining" in held.why
    assert [s.kind for s in held.suppressed] == ["drift", "decay"]
    assert decide([decay], new_labels=True, **kwargs).signal.kind == "decay"
    # A person, the schedule and new data are not held; nor is a first retraining.
    for kind in ("manual", "schedule"):
        assert decide([decay, Signal(kind, "asked")], new_labels=False, **kwargs).fire
    first = decide([decay], new_labels=False, **{**kwargs, "last_started": None})
    assert first.fire and first.signal.kind == "decay"
    with pytest.raises(ValueError, match="drift_rearm"):
        TriggerPolicy(drift_rearm=timedelta(days=-1))


def test_one_retraining_for_many_signals_most_important_first():
    signals = [
        new_data_signal(5000, POLICY),
        Signal("schedule", "nightly"),
        decay_signal(0.2, 0.6, 1000, POLICY),
        drift_signal({"amount": 0.5}, POLICY),
        None,
    ]
    decision = decide(signals, in_flight=False, last_started=None, now=NOW, policy=POLICY)
    assert decision.fire and decision.signal.kind == "drift"
    assert {s.kind for s in decision.suppressed} == {"new_data", "schedule", "decay"}
    tags = decision.signal.tags()
    assert tags["loopline/trigger"] == "drift" and "amount" in tags["loopline/reason"]


def test_a_held_back_trigger_still_names_the_batch_that_set_it_off():
    """Loop latency counts from the batch a trigger was measured on when the sensor first saw
    it (issue 20): a decay held back by the cooldown, seen again on later labels batches, fires
    naming the first; once gone, the next sighting starts afresh."""
    decay = replace(decay_signal(0.2, 0.6, 1000, POLICY), batch="labels-07")
    later = replace(decay, batch="labels-09")
    seen = first_seen({}, [decay, None], NOW)
    assert seen == {"decay": {"since": NOW.isoformat(), "batch": "labels-07"}}
    cooling = decide([decay], in_flight=False, last_started=NOW, now=NOW, policy=POLICY)
    assert not cooling.fire
    then = NOW + POLICY.cooldown
    seen = first_seen(json.loads(json.dumps(seen)), [later], then)  # the sensor's cursor
    decision = decide([later], in_flight=False, last_started=NOW, now=then, policy=POLICY)
    assert decision.fire
    tags = decision.signal.tags(seen[decision.signal.kind])
    assert tags[TRIGGER_BATCH_TAG] == "labels-07" and tags[TRIGGER_SEEN_TAG] == NOW.isoformat()
    assert first_seen(seen, [None], then) == {}  # gone: forgotten
    assert first_seen({}, [later], then)["decay"]["batch"] == "labels-09"
    # A signal measured on no batch (serving drift) still says when it was first seen.
    drift = first_seen({}, [drift_signal({"amount": 0.5}, POLICY)], NOW)["drift"]
    tags = drift_signal({"amount": 0.5}, POLICY).tags(drift)
    assert TRIGGER_BATCH_TAG not in tags and tags[TRIGGER_SEEN_TAG] == NOW.isoformat()


def test_no_signal_no_run():
    decision = decide([None, None], in_flight=False, last_started=None, now=NOW, policy=POLICY)
    assert not decision.fire and decision.why == "no trigger"


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alert_is_logged_and_posted_to_a_local_webhook(caplog):
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        alert = alerts.Alert("drift", "PSI 0.41 on amount", {"psi": {"amount": 0.41}})
        with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
            ok = alerts.send(alert, f"http://127.0.0.1:{server.server_port}/hook")
    finally:
        server.shutdown()
    assert ok
    [posted] = _Receiver.received
    assert posted["alert"] == "drift" and posted["details"]["psi"]["amount"] == 0.41
    assert json.loads(caplog.records[0].getMessage())["summary"] == "PSI 0.41 on amount"


def test_a_dead_webhook_never_raises(caplog):
    alert = alerts.Alert("rollback", "v0002 rolled back to v0001")
    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        assert alerts.send(alert, "http://127.0.0.1:9/unreachable", timeout_s=1) is False
    assert any("failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError):
        alerts.Alert("weather", "sunny")
