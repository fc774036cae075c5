"""An in-memory TorchServe stand-in and a registry of stub versions, for delivery and release
tests: no Java, no torch."""

from models.registry import CHAMPION, ModelRecord, Registry, Verdict
from serving.client import TorchServeError


class Crash(BaseException):
    """The process dying at that point (not an error anything should catch)."""


def requests(n: int) -> list[dict]:
    """``n`` distinct transactions (t0...), amounts 10, 11, 12..."""
    return [
        {
            "transaction_id": f"t{i}",
            "card_id": f"c{i % 7}",
            "merchant_id": "m1",
            "amount": 10.0 + i,
            "channel": "online",
            "country": "US",
            "timestamp": "2026-11-23T10:00:00Z",
        }
        for i in range(n)
    ]


REQUESTS = requests(40)


class FakeServe:
    """Versions -> scoring function; records every default switch.

    ``faults``: set-default call number (1-based) -> what goes wrong on that call: "crash"
    (the caller dies before TorchServe switched), "crash_after" (TorchServe switched, then
    the caller died), "timeout" (no answer, no switch), "timeout_after" (no answer, switched).

    ``clock``/``sleep``: a virtual clock (seconds) for delivery's probes; each predict call
    advances it by its version's ``latency_ms`` (1 ms unless given), so latency tests do not
    depend on how loaded the host is.
    """

    def __init__(self, behaviours, faults=None, latency_ms=None):
        self.behaviours = behaviours
        self.registered: dict[str, bool] = {}
        self.defaults: list[str] = []
        self.slow: set[str] = set()
        # Versions that answer differently once they are the default (production traffic).
        self.production: dict = {}
        self.faults: dict[int, str] = dict(faults or {})
        self.set_default_calls = 0
        self.latency_ms: dict[str, float] = dict(latency_ms or {})
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def versions(self, model=None):
        return dict(self.registered)

    def default_version(self, model=None):
        return next((v for v, d in self.registered.items() if d), None)

    def register(self, version, set_default=False):
        self.registered[version] = False
        if set_default:
            self.set_default(version)

    def set_default(self, version, model=None):
        self.set_default_calls += 1
        fault = self.faults.get(self.set_default_calls)
        if fault == "crash":
            raise Crash(f"died before set-default {version}")
        if fault == "timeout":
            raise TorchServeError(f"PUT set-default {version} failed: read timed out")
        if version not in self.registered:
            raise TorchServeError(f"{version} is not registered", status=404)
        self.registered = {v: v == version for v in self.registered}
        self.defaults.append(version)
        if fault == "crash_after":
            raise Crash(f"died after set-default {version}")
        if fault == "timeout_after":
            raise TorchServeError(f"PUT set-default {version} failed: read timed out")

    def unregister(self, version, model=None):
        del self.registered[version]

    def predict(self, payload, version=None, model=None):
        via_default = version is None
        version = version or self.default_version()
        if via_default and version in self.slow:  # degrades only under production traffic
            import time

            time.sleep(0.01)
        self.now += self.latency_ms.get(version, 1.0) / 1000.0
        score = (via_default and self.production.get(version)) or self.behaviours[version]
        items = payload if isinstance(payload, list) else [payload]
        out = []
        for item in items:
            p = score(item)
            if isinstance(p, Exception):
                raise p
            out.append(
                {
                    "transaction_id": item["transaction_id"],
                    "fraud_probability": p,
                    "decision": "decline" if p >= 0.5 else "approve",
                }
            )
        return out if isinstance(payload, list) else out[0]


def passed(registry: Registry, *versions: str) -> None:
    """Each version judged, and passed, by the gate against the champion serving now."""
    for version in versions:
        registry.judge(version, Verdict(True, champion=registry.get_alias(CHAMPION)))


def stub_registry(tmp_path, n=2, path=None) -> Registry:
    """``n`` versions (v0001...) whose artifact files are never read, each passed by the gate
    against no champion (call ``passed`` again once a champion serves)."""
    registry = Registry(path or tmp_path / "registry.sqlite")
    for i in range(n):
        registry.register(
            ModelRecord(
                model_name="fraud",
                artifact_dir=str(tmp_path),
                artifacts={"model.pt": f"{i:064d}"},
                training_set_version="ts1",
                feature_service="fraud_model_v1",
                training_batches=["b1"],
                hyperparameters={},
                metrics={},
                data_window={},
            ),
            Verdict(True, champion=None),
            verify_files=False,
        )
    return registry


def deliver_judged(client, registry: Registry, version: str, *args, **kwargs):
    """``deliver`` of a version the gate passed against the champion serving now (these tests
    are about delivery; the refusal of an unjudged version has its own)."""
    from serving.delivery import deliver

    if registry.get_alias(CHAMPION) != version:
        passed(registry, version)
    return deliver(client, registry, version, *args, **kwargs)


def promote_judged(registry: Registry, version: str, reason: str) -> str | None:
    """``Registry.promote`` of a version the gate passed against the champion serving now."""
    passed(registry, version)
    return registry.promote(version, reason)
