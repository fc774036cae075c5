"""Progressive delivery against an in-memory TorchServe stand-in: every path it can take."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np

from models.registry import CHAMPION
from serving.client import TorchServeError
from serving.delivery import (
    DeliveryPolicy,
    Probe,
    compare_shadow,
    is_synthetic,
    online_freshness_reasons,
    probe,
)
from tests.serving.fakes import REQUESTS, FakeServe, deliver_judged, promote_judged, stub_registry
from tests.serving.fakes import requests as many_requests

# A short watch: these tests time with the real clock.
FAST = DeliveryPolicy(watch_requests=20, watch_interval_s=0.001)


def _low(item):
    return 0.01 + 0.001 * (float(item["amount"]) % 10)


def test_the_first_version_is_smoke_tested_promoted_and_watched(tmp_path):
    registry = stub_registry(tmp_path, 1)
    serve = FakeServe({"v0001": _low})
    report = deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    assert report.outcome == "promoted"
    assert serve.default_version() == "v0001"
    assert registry.get_alias(CHAMPION) == "v0001"
    steps = [e.detail["step"] for e in registry.events("v0001") if e.kind == "deployment"]
    assert steps == ["registered_in_torchserve", "smoke_test", "promoted", "post_promotion_watch"]


def test_a_first_version_breaching_its_watch_keeps_serving_and_says_so(tmp_path):
    """With no previous champion there is nothing to roll back to: the breach is reported."""
    registry = stub_registry(tmp_path, 1)
    serve = FakeServe({"v0001": _low})
    serve.production["v0001"] = lambda item: TorchServeError("worker died", status=503)
    report = deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    assert report.outcome == "promoted" and registry.get_alias(CHAMPION) == "v0001"
    assert any("error rate" in r for r in report.reasons), report.reasons
    assert any("no previous champion" in r for r in report.reasons)


def test_a_sound_challenger_is_shadowed_promoted_and_watched(tmp_path):
    registry = stub_registry(tmp_path)
    serve = FakeServe({"v0001": _low, "v0002": lambda item: _low(item) * 1.1})
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    report = deliver_judged(serve, registry, "v0002", REQUESTS, FAST)
    assert report.outcome == "promoted", report.reasons
    assert serve.default_version() == "v0002" and "v0001" in serve.registered
    assert registry.get_alias(CHAMPION) == "v0002"
    steps = [e.detail["step"] for e in registry.events("v0002") if e.kind == "deployment"]
    assert steps == [
        "registered_in_torchserve",
        "smoke_test",
        "shadow_replay",
        "promoted",
        "post_promotion_watch",
    ]


def test_a_challenger_failing_its_smoke_test_is_rejected_and_unregistered(tmp_path):
    registry = stub_registry(tmp_path)
    serve = FakeServe(
        {"v0001": _low, "v0002": lambda item: TorchServeError("worker died", status=503)}
    )
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    report = deliver_judged(serve, registry, "v0002", REQUESTS, FAST)
    assert report.outcome == "rejected" and "smoke test failed" in report.reasons[0]
    assert serve.default_version() == "v0001" and "v0002" not in serve.registered
    assert registry.get_alias(CHAMPION) == "v0001"
    rejected = [e for e in registry.events("v0002") if e.kind == "rejected"]
    assert rejected and "smoke test failed" in rejected[0].reasons[0]


def test_a_challenger_whose_scores_go_wild_in_shadow_is_rejected(tmp_path):
    registry = stub_registry(tmp_path)
    serve = FakeServe({"v0001": _low, "v0002": lambda item: 0.97})
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    report = deliver_judged(serve, registry, "v0002", REQUESTS, FAST)
    assert report.outcome == "rejected"
    assert any("flag rate" in r for r in report.reasons)
    assert any("KS" in r for r in report.reasons)
    assert serve.defaults == ["v0001"]


def test_a_breach_after_promotion_rolls_back_to_the_previous_version(tmp_path):
    registry = stub_registry(tmp_path)
    serve = FakeServe({"v0001": _low, "v0002": _low})
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    serve.slow.add("v0002")
    strict = replace(FAST, watch_max_p95_latency_ms=5.0)
    report = deliver_judged(serve, registry, "v0002", REQUESTS, strict)
    assert report.outcome == "rolled_back" and "watch p95 latency" in report.reasons[0]
    assert serve.defaults == ["v0001", "v0002", "v0001"]
    assert registry.get_alias(CHAMPION) == "v0001"
    assert [e.kind for e in registry.events("v0002")][-1] == "rolled_back"


def test_shadow_comparison_and_synthetic_ids():
    fine = probe(FakeServe({"a": _low}), REQUESTS, version="a", batch=8)
    assert fine.sent == 40 and not fine.errors and len(fine.scores) == 40
    assert compare_shadow(fine, fine, DeliveryPolicy()) == []
    assert is_synthetic("shadow:3:t1") and not is_synthetic("t1") and not is_synthetic(None)


class ColdStart(FakeServe):
    """A fresh version's first call at a batch size is slow (compiles, fills caches);
    ``always_slow`` versions are slow on every call. Every call takes some (virtual) time."""

    def __init__(self, behaviours, always_slow=()):
        super().__init__(behaviours)
        self.seen: set[tuple[str, int]] = set()
        self.always_slow = set(always_slow)
        self.calls: list[str] = []

    def predict(self, payload, version=None, model=None):
        name = version or self.default_version()
        self.calls.append(name)
        size = len(payload) if isinstance(payload, list) else 1
        # 5 ms a call, as a worker takes.
        slow = name in self.always_slow or (name, size) not in self.seen
        self.latency_ms[name] = 100.0 if slow else 5.0
        self.seen.add((name, size))
        return super().predict(payload, version=version, model=model)


BATCHES_OF_8 = replace(FAST, replay_batch=8)


def test_a_challenger_slow_only_on_its_first_batch_is_promoted(tmp_path):
    # The smoke test warms batch size 1 only; a fresh worker's first batch of 8 is slow.
    registry = stub_registry(tmp_path)
    serve = ColdStart({"v0001": _low, "v0002": _low})
    serve.register("v0001", set_default=True)
    serve.seen.add(("v0001", 8))  # the champion has served such batches
    promote_judged(registry, "v0001", reason="first")
    report = deliver_judged(
        serve, registry, "v0002", REQUESTS, BATCHES_OF_8, clock=serve.clock, sleep=serve.sleep
    )
    assert report.outcome == "promoted", report.reasons
    # The shadow replay took turns: neither version got all its batches in a row.
    shadow = serve.calls[BATCHES_OF_8.smoke_requests :][: 2 + 2 * 3]
    assert shadow[2:] == ["v0001", "v0002", "v0002", "v0001", "v0001", "v0002"]


def test_a_challenger_slow_on_every_batch_is_still_rejected(tmp_path):
    registry = stub_registry(tmp_path)
    serve = ColdStart({"v0001": _low, "v0002": _low}, always_slow={"v0002"})
    serve.register("v0001", set_default=True)
    serve.seen.add(("v0001", 8))
    promote_judged(registry, "v0001", reason="first")
    report = deliver_judged(
        serve, registry, "v0002", REQUESTS, BATCHES_OF_8, clock=serve.clock, sleep=serve.sleep
    )
    assert report.outcome == "rejected"
    assert any("shadow p95 latency" in r for r in report.reasons)
    assert serve.default_version() == "v0001"


NEWEST_TX = datetime(2026, 11, 23, 10, tzinfo=UTC)
CARD_TTL, MERCHANT_TTL = timedelta(days=30), timedelta(days=7)


def test_online_freshness_names_views_without_rows_or_past_their_ttl():
    fresh = {
        "card_stats_fv": (NEWEST_TX - timedelta(days=29), CARD_TTL),
        "merchant_stats_fv": (NEWEST_TX - timedelta(hours=1), MERCHANT_TTL),
        "static_fv": (NEWEST_TX - timedelta(days=400), None),  # never expires
    }
    assert online_freshness_reasons(fresh, NEWEST_TX) == []
    stale = {
        "card_stats_fv": (NEWEST_TX - timedelta(days=1), CARD_TTL),
        "merchant_stats_fv": (NEWEST_TX - timedelta(days=8), MERCHANT_TTL),
    }
    [reason] = online_freshness_reasons(stale, NEWEST_TX)
    assert "merchant_stats_fv are stale" in reason and "7 days" in reason
    [empty] = online_freshness_reasons({"merchant_stats_fv": (None, MERCHANT_TTL)}, NEWEST_TX)
    assert "no rows of merchant_stats_fv" in empty


def test_a_challenger_is_deferred_while_its_features_are_stale_online_and_the_champion_stays(
    tmp_path,
):
    registry = stub_registry(tmp_path)
    serve = FakeServe({"v0001": _low, "v0002": lambda item: _low(item) * 1.1})
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    stale = online_freshness_reasons(
        {"merchant_stats_fv": (NEWEST_TX - timedelta(days=9), MERCHANT_TTL)}, NEWEST_TX
    )
    report = deliver_judged(serve, registry, "v0002", REQUESTS, FAST, stale_features=stale)

    assert report.outcome == "deferred" and report.reasons == stale
    # Held back before TorchServe changed: never registered, never probed, champion serves.
    assert "v0002" not in serve.registered and serve.defaults == ["v0001"]
    assert registry.get_alias(CHAMPION) == "v0001"
    steps = [e.detail for e in registry.events("v0002") if e.kind == "deployment"]
    assert [(d["step"], d["passed"]) for d in steps] == [("online_features", False)]
    # Not the model's fault: not rejected, so the same version deploys once features are fresh.
    assert not [e for e in registry.events("v0002") if e.kind == "rejected"]
    fresh = deliver_judged(serve, registry, "v0002", REQUESTS, FAST, stale_features=[])
    assert fresh.outcome == "promoted" and registry.get_alias(CHAMPION) == "v0002"


def test_a_regressor_may_move_live_as_far_as_it_moved_on_the_labelled_test_split(monkeypatch):
    """After rain a better delivery model predicts longer minutes by design: the shadow lets
    the live mean move as the gate's test split showed, and stops a model that moves live
    where it did not offline (a unit or scale mistake)."""
    monkeypatch.setenv("LOOPLINE_USECASE", "delivery")
    rng = np.random.default_rng(0)
    dry = rng.normal(37.4, 8.0, 200).tolist()
    rainy = [m * 1.21 for m in dry]  # the rain-adapted challenger: +21% on every order
    champion = Probe(version="v0001", sent=200, latencies_ms=[5.0] * 200, scores=dry)
    challenger = Probe(version="v0005", sent=200, latencies_ms=[5.0] * 200, scores=rainy)
    policy = DeliveryPolicy()
    assert compare_shadow(champion, challenger, policy, expected_shift=0.18) == []
    # Nothing moved offline: the mean check says how far, the score distribution moved too.
    mean, ks = sorted(compare_shadow(champion, challenger, policy))
    assert "+21%" in mean and "test split showed +0%" in mean
    assert ks.startswith("score distribution moved")
    seconds = Probe(
        version="v0006", sent=200, latencies_ms=[5.0] * 200, scores=[m * 60 for m in dry]
    )
    assert compare_shadow(champion, seconds, policy, expected_shift=0.18)  # minutes as seconds


def _beta_score(seed):
    """A version's probability for a request, drawn from ``seed`` and the request: two seeds
    are two sound retrains, scoring alike without scoring the same."""

    def score(item):
        return float(np.random.default_rng([seed, int(item["amount"])]).beta(2.0, 8.0))

    return score


def _errs_on_every_tenth(score):
    def answer(item):
        if int(item["amount"]) % 10 == 9:  # t9, t19...: the smoke test's t0..t7 pass
            return TorchServeError("worker died", status=503)
        return score(item)

    return answer


def test_four_challengers_only_the_sound_one_is_promoted_and_each_rejection_names_its_reason(
    tmp_path,
):
    champion = _beta_score(0)
    challengers = {
        "v0002": ("slower", champion, 5.0),  # the same scores, 5x the latency
        "v0003": ("shifted", lambda item: min(1.0, champion(item) + 0.2), 1.0),
        "v0004": ("errors", _errs_on_every_tenth(_beta_score(4)), 1.0),
        "v0005": ("sound", _beta_score(5), 1.0),
    }
    registry = stub_registry(tmp_path, 5)
    serve = FakeServe(
        {"v0001": champion, **{v: score for v, (_, score, _) in challengers.items()}},
        latency_ms={"v0001": 1.0, **{v: ms for v, (_, _, ms) in challengers.items()}},
    )
    requests = many_requests(300)
    deliver_judged(serve, registry, "v0001", requests, FAST)
    reasons = {}
    for version, (kind, _, _) in challengers.items():
        report = deliver_judged(
            serve, registry, version, requests, FAST, clock=serve.clock, sleep=serve.sleep
        )
        reasons[kind] = (report.outcome, report.reasons)
    assert reasons["sound"] == ("promoted", [])
    assert registry.get_alias(CHAMPION) == serve.default_version() == "v0005"
    for kind, expected in [
        ("slower", "shadow p95 latency 5.0 ms against the champion's 1.0 ms"),
        ("shifted", "score distribution moved"),
        ("errors", "shadow error rate 10.00% (30 of 300"),
    ]:
        outcome, why = reasons[kind]
        assert outcome == "rejected" and any(r.startswith(expected) for r in why), (kind, why)
    assert len(reasons["slower"][1]) == 1 and len(reasons["errors"][1]) == 1


def test_the_watch_sees_its_requests_and_rolls_back_a_version_erring_in_production(tmp_path):
    registry = stub_registry(tmp_path, 3)
    serve = FakeServe({"v0001": _low, "v0002": _low, "v0003": _low})
    serve.production["v0003"] = _errs_on_every_tenth(_low)  # fine in shadow, not as default
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    sound = deliver_judged(
        serve, registry, "v0002", REQUESTS, DeliveryPolicy(), clock=serve.clock, sleep=serve.sleep
    )
    watched = next(s for s in sound.steps if s["step"] == "post_promotion_watch")
    assert sound.outcome == "promoted" and watched["passed"]
    assert [c["requests"] for c in watched["checks"] if c["check"] == "watch_error_rate"] == [300]
    report = deliver_judged(
        serve, registry, "v0003", REQUESTS, DeliveryPolicy(), clock=serve.clock, sleep=serve.sleep
    )
    assert report.outcome == "rolled_back", report.reasons
    assert report.reasons[0].startswith("watch error rate 10.00% (30 of 300")
    assert registry.get_alias(CHAMPION) == serve.default_version() == "v0002"


def test_a_watch_that_sees_too_few_requests_keeps_the_promotion_and_says_so(tmp_path):
    registry = stub_registry(tmp_path)
    serve = FakeServe({"v0001": _low, "v0002": _low}, latency_ms={"v0002": 200.0})
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    policy = DeliveryPolicy(watch_seconds=30.0, max_latency_ratio=1000.0)
    report = deliver_judged(
        serve, registry, "v0002", REQUESTS, policy, clock=serve.clock, sleep=serve.sleep
    )
    assert report.outcome == "promoted" and registry.get_alias(CHAMPION) == "v0002"
    [reason] = report.reasons
    assert reason.startswith("post-promotion watch inconclusive: ")
    assert reason.endswith("of 300 requests answered in 30.0 s; the promotion stands")
    watched = next(s for s in report.steps if s["step"] == "post_promotion_watch")
    assert not watched["passed"]


def test_torchserve_keeps_only_the_champion_and_its_rollback_target(tmp_path):
    """Each registered version holds a worker: months of promotions must not pile them up."""
    registry = stub_registry(tmp_path, 5)
    serve = FakeServe({f"v000{i}": _low for i in range(1, 6)})
    for version in ("v0001", "v0002", "v0003"):
        assert deliver_judged(serve, registry, version, REQUESTS, FAST).outcome == "promoted"
    assert sorted(serve.registered) == ["v0002", "v0003"]
    serve.production["v0004"] = lambda item: TorchServeError("worker died", status=503)
    report = deliver_judged(serve, registry, "v0004", REQUESTS, FAST)
    assert report.outcome == "rolled_back"
    assert sorted(serve.registered) == ["v0002", "v0003"]  # the breached one is gone too
    registry.rollback("v0003 misbehaves")  # back to v0002, still registered: instant
    assert registry.get_alias(CHAMPION) == "v0002" and "v0002" in serve.registered


def test_delivery_refuses_a_version_the_gate_did_not_pass_against_this_champion(tmp_path):
    """Nothing reaches TorchServe without the gate's pass against the champion it replaces."""
    from serving.delivery import deliver

    registry = stub_registry(tmp_path, 2)  # both passed against no champion
    serve = FakeServe({"v0001": _low, "v0002": _low})
    assert deliver(serve, registry, "v0001", REQUESTS, FAST).outcome == "promoted"
    report = deliver(serve, registry, "v0002", REQUESTS, FAST)  # judged before v0001 served
    assert report.outcome == "refused"
    assert report.reasons == [
        "v0002 was judged against no champion, and the champion is now v0001: evaluate it again"
    ]
    assert "v0002" not in serve.registered and serve.default_version() == "v0001"
    assert registry.promotion_refusal("v0002")  # refused, not rejected: a new verdict can pass
    assert [e.detail["step"] for e in registry.events("v0002") if e.kind == "deployment"] == [
        "gate_verdict"
    ]
