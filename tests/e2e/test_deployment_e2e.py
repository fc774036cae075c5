"""The deployment asset against a real TorchServe: first release, a promotion under continuous
traffic with no failed request, a forced breach that rolls back, and a default changed by hand
that the reconciler puts back."""

import threading
import time

import dagster as dg
import polars as pl
import pytest

from models.registry import CHAMPION
from orchestration.serving_assets import reconcile_sensor, served_champion
from serving.client import TorchServeError
from tests.e2e.kit import Loop

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    state = Loop(tmp_path_factory.mktemp("deploy"))
    try:
        yield state
    finally:
        state.stop()


def test_first_release_starts_torchserve_and_serves_the_new_champion(loop):
    v1 = loop.versions[0]
    report = loop.deploy(v1)
    assert report["outcome"] == "promoted"
    assert [s["step"] for s in report["steps"]] == [
        "registered_in_torchserve",
        "smoke_test",
        "promoted",
        "post_promotion_watch",  # the first release is watched too
    ]
    assert loop.client.default_version() == v1
    assert loop.home.registry.get_alias(CHAMPION) == v1
    answer = loop.client.predict(loop.home.requests(1)[0])
    assert answer["model_version"] == v1


def test_promotion_under_continuous_traffic_fails_no_request(loop):
    v1, v2 = loop.versions[:2]
    assert loop.client.default_version() == v1
    stop = threading.Event()
    outcomes: list[str] = []
    failures: list[str] = []
    requests = loop.home.requests(32, offset=50)

    def traffic():
        client = loop.client
        i = 0
        while not stop.is_set():
            try:
                answer = client.predict(requests[i % len(requests)])
                outcomes.append(answer["model_version"])
            except TorchServeError as exc:
                failures.append(str(exc))
            i += 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        report = loop.deploy(v2)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(30)
    assert report["outcome"] == "promoted", report["reasons"]
    assert failures == []
    assert outcomes[0] == v1 and outcomes[-1] == v2
    assert len(outcomes) > 50
    steps = [s["step"] for s in report["steps"]]
    assert steps == [
        "registered_in_torchserve",
        "smoke_test",
        "shadow_replay",
        "promoted",
        "post_promotion_watch",
    ]
    shadow = next(s for s in report["steps"] if s["step"] == "shadow_replay")
    assert shadow["champion"]["version"] == v1 and shadow["challenger"]["version"] == v2
    assert shadow["challenger"]["scored"] == 64  # replayed again to 300 calls each
    assert loop.home.registry.get_alias(CHAMPION) == v2
    kinds = [e.detail.get("step") for e in loop.home.registry.events(v2) if e.kind == "deployment"]
    assert kinds == steps


def test_a_forced_breach_after_promotion_rolls_back(loop):
    v2, v3 = loop.versions[1:]
    report = loop.deploy(v3, watch_max_p95_latency_ms=0.001)
    assert report["outcome"] == "rolled_back"
    assert "p95 latency" in report["reasons"][0]
    assert loop.client.default_version() == v2
    assert loop.home.registry.get_alias(CHAMPION) == v2
    events = [e.kind for e in loop.home.registry.events(v3)]
    assert events[-1] == "rolled_back"
    assert loop.client.predict(loop.home.requests(1)[0])["model_version"] == v2


def test_a_default_changed_behind_the_registrys_back_is_put_back_by_the_reconciler(loop):
    v2, v3 = loop.versions[1:]
    champion = loop.home.registry.get_alias(CHAMPION)
    assert champion == v2 and loop.client.default_version() == v2
    assert v3 not in loop.client.versions()  # rolled back, so retired from TorchServe
    loop.client.register(v3, set_default=False)  # by hand, through TorchServe's management API
    loop.client.set_default(v3)
    assert loop.client.predict(loop.home.requests(1)[0])["model_version"] == v3

    resources = {"storage": loop.storage, "torchserve": loop.torchserve}

    def tick(instance):
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            return reconcile_sensor(context)

    with dg.instance_for_test() as instance:
        assert isinstance(tick(instance), dg.RunRequest)
        result = dg.materialize([served_champion], resources=resources, instance=instance)
        metadata = result.asset_materializations_for_node("served_champion")[0].metadata
        assert metadata["drift"].value is True
        assert (metadata["served_before"].value, metadata["served"].value) == (v3, v2)
        assert loop.client.default_version() == v2
        assert loop.client.predict(loop.home.requests(1)[0])["model_version"] == v2
        assert isinstance(tick(instance), dg.SkipReason)


def test_restart_serves_the_registry_champion(loop):
    loop.stop()
    process = loop.torchserve.process(loop.storage)
    assert not process.status().running
    v3 = loop.versions[2]
    loop.home.rejudge(v3)
    loop.home.registry.promote(v3, "promoted while TorchServe was stopped")
    assert [r.to_version for r in loop.home.registry.releases(pending=True)] == [v3]
    process.start()
    assert loop.client.default_version() == loop.home.registry.get_alias(CHAMPION) == v3
    assert loop.home.registry.releases(pending=True) == []  # the start confirmed it
    frame = pl.DataFrame(loop.home.requests(3))
    assert frame.height == 3
