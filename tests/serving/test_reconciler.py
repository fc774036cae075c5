"""Promotion and rollback as intent, apply, confirm: a crash or timeout at any step converges
after one reconcile, and a default changed behind the registry's back is put back."""

import contextlib

import pytest

from models.registry import CHAMPION
from serving.delivery import DeliveryPolicy
from serving.reconciler import ReconcileError, out_of_sync, reconcile
from tests.serving.fakes import (
    REQUESTS,
    Crash,
    FakeServe,
    deliver_judged,
    promote_judged,
    stub_registry,
)

FAST = DeliveryPolicy(watch_seconds=0.05, watch_interval_s=0.01)
BREACH = DeliveryPolicy(watch_seconds=0.05, watch_interval_s=0.01, watch_max_p95_latency_ms=5.0)


def _score(item):
    return 0.01 + 0.001 * (float(item["amount"]) % 10)


def _served_v1(tmp_path, n=2):
    registry = stub_registry(tmp_path, n)
    serve = FakeServe({f"v{i + 1:04d}": _score for i in range(n)})
    deliver_judged(serve, registry, "v0001", REQUESTS, FAST)
    assert serve.set_default_calls == 1
    return registry, serve


# set-default calls: 1 serves v0001, 2 promotes v0002, 3 rolls back to v0001 after the breach.
@pytest.mark.parametrize(
    ("release", "call", "expected"), [("promote", 2, "v0002"), ("rollback", 3, "v0001")]
)
@pytest.mark.parametrize(
    "fault", ["crash", "crash_after", "timeout", "timeout_after", "timeout_every_try"]
)
def test_a_release_interrupted_at_any_step_converges_after_one_reconcile(
    tmp_path, release, call, expected, fault
):
    registry, serve = _served_v1(tmp_path)
    if release == "rollback":
        serve.slow.add("v0002")  # breaches the watch: delivery rolls back
    if fault == "timeout_every_try":
        serve.faults = {call + i: "timeout" for i in range(3)}
    else:
        serve.faults = {call: fault}
    with contextlib.suppress(Crash, ReconcileError):
        deliver_judged(
            serve, registry, "v0002", REQUESTS, BREACH if release == "rollback" else FAST
        )
    # The intent was in the registry before TorchServe was touched.
    assert registry.get_alias(CHAMPION) == expected

    serve.faults = {}
    result = reconcile(registry, serve)
    assert result.in_sync and not result.drift
    assert serve.default_version() == registry.get_alias(CHAMPION) == expected
    assert registry.releases(pending=True) == []
    last = registry.releases()[-1]
    assert (last.kind, last.to_version, last.outcome) == (release, expected, "served")
    assert reconcile(registry, serve).actions == []


def test_a_crash_right_after_torchserve_switched_leaves_registry_and_server_agreeing(tmp_path):
    """A crash right after TorchServe switched: the registry already names the new champion,
    so the next start (which serves the registry's champion) agrees with what was served."""
    registry, serve = _served_v1(tmp_path)
    serve.faults = {2: "crash_after"}
    with pytest.raises(Crash):
        deliver_judged(serve, registry, "v0002", REQUESTS, FAST)
    assert serve.default_version() == "v0002" == registry.get_alias(CHAMPION)
    assert [r.to_version for r in registry.releases(pending=True)] == ["v0002"]
    assert "not confirmed" in out_of_sync(registry, serve)


def test_a_default_changed_behind_the_registrys_back_is_put_back_and_recorded(tmp_path):
    registry, serve = _served_v1(tmp_path)
    serve.register("v0002")
    serve.set_default("v0002")
    assert out_of_sync(registry, serve) == (
        "TorchServe serves v0002; the registry's champion is v0001"
    )
    result = reconcile(registry, serve)
    assert serve.default_version() == "v0001"
    assert result.drift and result.served_before == "v0002" and result.served == "v0001"
    assert result.actions == ["set-default v0001"]
    reconciled = [e for e in registry.events("v0001") if e.detail.get("step") == "reconciled"]
    assert len(reconciled) == 1 and reconciled[0].detail["served_before"] == "v0002"
    assert out_of_sync(registry, serve) is None
    assert not reconcile(registry, serve).changed


def test_a_champion_torchserve_lacks_is_archived_and_registered(tmp_path):
    registry = stub_registry(tmp_path)
    promote_judged(registry, "v0001", "first")
    serve = FakeServe({"v0001": _score})
    archived = []
    result = reconcile(registry, serve, archived.append)
    assert archived == ["v0001"] and serve.default_version() == "v0001"
    assert result.actions == ["registered v0001 from the model store", "set-default v0001"]
    assert not result.drift and registry.releases(pending=True) == []


def test_without_a_champion_torchserve_is_left_alone(tmp_path):
    registry = stub_registry(tmp_path)
    serve = FakeServe({"v0001": _score})
    serve.register("v0001", set_default=True)
    result = reconcile(registry, serve)
    assert result.champion is None and not result.changed
    assert serve.default_version() == "v0001" and out_of_sync(registry, serve) is None


def test_a_champion_moved_while_reconciling_is_followed(tmp_path):
    registry, serve = _served_v1(tmp_path, 3)
    serve.register("v0002")
    serve.register("v0003")
    promote_judged(registry, "v0002", "to v2")
    moved = []

    class Racing(FakeServe):
        def set_default(self, version, model=None):
            super().set_default(version, model)
            if not moved:  # someone promotes v0003 while v0002 is being applied
                moved.append(promote_judged(registry, "v0003", "to v3"))

    racing = Racing(serve.behaviours)
    racing.registered = dict(serve.registered)
    result = reconcile(registry, racing)
    assert racing.default_version() == registry.get_alias(CHAMPION) == "v0003"
    assert result.actions == ["set-default v0002", "set-default v0003"]
    outcomes = [(r.to_version, r.outcome) for r in registry.releases()[-2:]]
    assert outcomes == [("v0002", "superseded"), ("v0003", "served")]


def test_delivery_shadows_against_the_registrys_champion_not_a_drifted_default(tmp_path):
    registry, serve = _served_v1(tmp_path, 3)
    serve.register("v0003")
    serve.set_default("v0003")
    report = deliver_judged(serve, registry, "v0002", REQUESTS, FAST)
    assert report.outcome == "promoted" and report.previous == "v0001"
    shadow = next(s for s in report.steps if s["step"] == "shadow_replay")
    assert shadow["champion"]["version"] == "v0001"
    assert serve.default_version() == registry.get_alias(CHAMPION) == "v0002"
