"""Progressive delivery of a validated challenger to TorchServe.

reconcile (TorchServe serves the registry's champion) -> register (not default) -> smoke test
on its versioned endpoint -> shadow replay of recent logged requests to champion and challenger
-> compare -> promotion -> watch error rate and latency for a window -> keep, or roll back to
the previous version. Promotion and rollback write the registry's intent first, then apply and
confirm it (``serving.reconciler``), so a crash between the two leaves the registry's champion
as the truth for the next reconcile. TorchServe's ``set-default`` switches atomically and the
previous version stays registered, so traffic during a promotion or a rollback never meets a
missing model. Every step is a registry event.

Before any of it, a version is deferred when the online store lacks fresh rows for a feature
view of its FeatureService (``online_freshness_reasons``): served, it would score every request
without that view's features. The champion keeps serving; the version is not rejected.

Replayed and probe requests carry request ids prefixed ``shadow:``/``smoke:``/``watch:``
so monitoring can leave them out (``is_synthetic``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from core.usecase import active
from models.registry import CHAMPION, Registry
from models.tasks import of as task_of
from quality.drift import ks_statistic, psi
from serving import prediction_log
from serving.client import TorchServeClient, TorchServeError
from serving.reconciler import Archive, reconcile

SYNTHETIC_PREFIXES = ("smoke:", "shadow:", "watch:")


def is_synthetic(request_id: str | None) -> bool:
    """Requests the deployment step sent itself (not customer traffic)."""
    return bool(request_id) and request_id.startswith(SYNTHETIC_PREFIXES)


def logged_requests(
    log_dir: str | Path, limit: int, stats: prediction_log.ReadStats | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` customer requests answered in the prediction log, oldest first.

    The closed files are read newest first, and reading stops at the file that completes
    ``limit``: a deployment costs the requests it replays, not the whole log. Torn lines are
    skipped and counted in ``stats`` (monitoring's compaction alerts on them)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    key = active().request.id
    parts: list[list[dict[str, Any]]] = []
    found = 0
    for path in reversed(prediction_log.closed_files(log_dir)):
        part = [
            r["request"]
            for r in prediction_log.file_records(path, stats)
            if r.get("status") == 200 and r.get("request") and not is_synthetic(r.get(key))
        ]
        parts.append(part)
        found += len(part)
        if found >= limit:
            break
    return [request for part in reversed(parts) for request in part][-limit:]


@dataclass(frozen=True)
class DeliveryPolicy:
    """Bounds a challenger must stay within, in shadow and after promotion."""

    smoke_requests: int = 8
    replay_requests: int = 200
    replay_batch: int = 16
    max_error_rate: float = 0.0
    max_p95_latency_ms: float = 500.0
    # The challenger's median latency against the champion's on the same requests: a slower
    # model moves the median; a p95 of a few dozen batches is their slowest few, where one
    # scheduling pause on a shared host read as "3x slower" (decision 30). The ratio counts
    # only past this many ms over the champion.
    max_latency_ratio: float = 3.0
    min_latency_gap_ms: float = 10.0
    max_score_ks: float = 0.8
    # A classifier's share of positive decisions; a regressor's mean prediction, relative, as
    # far from the shift the gate's test split showed (expected_mean_shift).
    max_flag_rate_change: float = 0.2
    max_mean_change: float = 0.2
    watch_seconds: float = 5.0
    watch_interval_s: float = 0.5
    watch_max_error_rate: float = 0.0
    watch_max_p95_latency_ms: float = 500.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Probe:
    """Outcome of sending some requests to one version."""

    version: str
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    flagged: int = 0

    @property
    def error_rate(self) -> float:
        return len(self.errors) / self.sent if self.sent else 0.0

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else 0.0

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else 0.0

    @property
    def flag_rate(self) -> float:
        return self.flagged / len(self.scores) if self.scores else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.sent,
            "error_rate": round(self.error_rate, 4),
            "errors": self.errors[:5],
            "p50_ms": round(self.p50_ms, 2) if self.latencies_ms else None,
            "p95_ms": round(self.p95_ms, 2),
            "mean_score": round(float(np.mean(self.scores)), 5) if self.scores else None,
            "flag_rate": round(self.flag_rate, 4),
        }


@dataclass
class DeliveryReport:
    version: str
    previous: str | None
    outcome: str = "pending"  # promoted | rejected | rolled_back | deferred
    reasons: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "previous": self.previous,
            "outcome": self.outcome,
            "reasons": list(self.reasons),
            "steps": list(self.steps),
        }


def tagged(requests: Sequence[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Copies of ``requests`` whose ids say they are synthetic (max 64 chars)."""
    key = active().request.id
    out = []
    for i, r in enumerate(requests):
        tid = f"{prefix}{i}:{r.get(key, '')}"[:64]
        out.append({**r, key: tid})
    return out


def probe(
    client: TorchServeClient,
    requests: Sequence[dict[str, Any]],
    *,
    version: str | None,
    batch: int,
) -> Probe:
    """Send ``requests`` in lists of ``batch`` to a version (None: the default endpoint)."""
    result = Probe(version or "default")
    task = active().task
    score, positive = task.score, task.decision.positive
    # A classifier answers a probability; a regressor any finite value.
    bounded = task_of(task.type).has_threshold
    for start in range(0, len(requests), batch):
        chunk = list(requests[start : start + batch])
        result.sent += len(chunk)
        began = time.perf_counter()
        try:
            answer = client.predict(chunk, version=version)
        except TorchServeError as exc:
            result.errors.extend([f"{exc.status}: {exc}"] * len(chunk))
            continue
        elapsed = (time.perf_counter() - began) * 1000.0
        answers = answer if isinstance(answer, list) else [answer]
        if len(answers) != len(chunk):
            result.errors.extend([f"{len(answers)} answers for {len(chunk)} requests"] * len(chunk))
            continue
        result.latencies_ms.append(elapsed)
        for a in answers:
            p = a.get(score) if isinstance(a, dict) else None
            valid = isinstance(p, int | float) and math.isfinite(p)
            if not valid or (bounded and not 0.0 <= p <= 1.0):
                result.errors.append(f"invalid {score} {p!r}")
                continue
            result.scores.append(float(p))
            result.flagged += a.get("decision") == positive
    return result


def shadow_probes(
    client: TorchServeClient,
    requests: Sequence[dict[str, Any]],
    champion: str,
    challenger: str,
    *,
    batch: int,
) -> tuple[Probe, Probe]:
    """The same requests to both versions, batch by batch in turns, after one unmeasured
    warm-up batch each: both see the same background load at the same moments, and a fresh
    worker's first call at this batch size (a p95 of a dozen batches is their maximum) does not
    count against the challenger. A warm-up that fails is not hidden: its batch is measured."""
    warm = list(requests[:batch])
    for version in (champion, challenger):
        if probe(client, warm, version=version, batch=batch).errors:
            break
    champ, chall = Probe(champion), Probe(challenger)
    for i, start in enumerate(range(0, len(requests), batch)):
        chunk = requests[start : start + batch]
        order = [(champ, champion), (chall, challenger)]
        for into, version in order if i % 2 == 0 else reversed(order):
            part = probe(client, chunk, version=version, batch=batch)
            into.sent += part.sent
            into.errors += part.errors
            into.latencies_ms += part.latencies_ms
            into.scores += part.scores
            into.flagged += part.flagged
    return champ, chall


def score_psi(reference: Sequence[float], candidate: Sequence[float], bins: int = 10) -> float:
    """PSI of challenger scores against champion scores on the same requests (quantile bins)."""
    ref, cand = np.asarray(reference, float), np.asarray(candidate, float)
    if ref.size == 0 or cand.size == 0:
        return 0.0
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    p = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    q = np.bincount(np.searchsorted(edges, cand, side="right"), minlength=edges.size + 1)
    return psi(p / ref.size, q / cand.size)


def expected_mean_shift(registry: Registry, version: str) -> float:
    """How far the challenger's mean prediction moved from the champion's on the gate's test
    split (relative; 0 when the evaluation did not record both). After concept drift a better
    regressor moves by design (rain: every delivery slower); the shadow then checks that live
    traffic moves as the labelled test split did, not that nothing moved (decision 37)."""
    record = registry.get(version)
    champion = (record.extra.get("compared") or {}).get("champion") or {}
    before, after = champion.get("mean_prediction"), record.metrics.get("mean_prediction")
    if before is None or after is None or not before:
        return 0.0
    return (float(after) - float(before)) / abs(float(before))


def compare_shadow(
    champion: Probe, challenger: Probe, policy: DeliveryPolicy, expected_shift: float = 0.0
) -> list[str]:
    """Reasons the challenger's shadow run is out of bounds (empty: within bounds).
    ``expected_shift``: a regressor's mean-prediction change the gate's test split showed
    (``expected_mean_shift``); the live change may differ from it by ``max_mean_change``."""
    reasons = []
    if challenger.error_rate > policy.max_error_rate:
        reasons.append(
            f"shadow error rate {challenger.error_rate:.2%} > {policy.max_error_rate:.2%}"
        )
    if challenger.p95_ms > policy.max_p95_latency_ms:
        reasons.append(
            f"shadow p95 latency {challenger.p95_ms:.1f} ms > {policy.max_p95_latency_ms} ms"
        )
    if (
        champion.p50_ms > 0
        and challenger.p50_ms > policy.max_latency_ratio * champion.p50_ms
        and challenger.p50_ms - champion.p50_ms > policy.min_latency_gap_ms
    ):
        reasons.append(
            f"shadow p50 latency {challenger.p50_ms:.1f} ms is more than "
            f"{policy.max_latency_ratio}x the champion's {champion.p50_ms:.1f} ms"
        )
    if champion.scores and challenger.scores:
        ks = ks_statistic(champion.scores, challenger.scores)
        if ks > policy.max_score_ks:
            reasons.append(
                f"score distribution moved: KS {ks:.3f} vs the champion > {policy.max_score_ks}"
            )
    if task_of(active().task.type).has_threshold:
        change = abs(challenger.flag_rate - champion.flag_rate)
        if change > policy.max_flag_rate_change:
            reasons.append(
                f"flag rate {challenger.flag_rate:.2%} differs from the champion's "
                f"{champion.flag_rate:.2%} by more than {policy.max_flag_rate_change:.0%}"
            )
    elif champion.scores and challenger.scores:
        before, after = float(np.mean(champion.scores)), float(np.mean(challenger.scores))
        shift = (after - before) / abs(before) if before else 0.0
        if before and abs(shift - expected_shift) > policy.max_mean_change:
            reasons.append(
                f"mean prediction {after:.3f} differs from the champion's {before:.3f} by "
                f"{shift:+.0%}, where the test split showed {expected_shift:+.0%}: more than "
                f"{policy.max_mean_change:.0%} apart"
            )
    return reasons


def online_freshness_reasons(
    views: Mapping[str, tuple[datetime | None, timedelta | None]], reference: datetime
) -> list[str]:
    """Why serving would answer without some view's features (empty: every view is fresh).

    ``views``: per feature view, the newest event time of its online rows (None: no rows)
    and its TTL (None: rows never expire). ``reference``: the newest validated transaction's
    event time, the time live requests are looked up at. A view is stale when its newest row
    is older than its TTL before that time: every lookup would find its rows expired.
    """
    reasons = []
    for view, (newest, ttl) in views.items():
        if newest is None:
            reasons.append(
                f"the online store has no rows of {view}: every request would be scored "
                "without its features"
            )
        elif ttl and newest < reference - ttl:
            reasons.append(
                f"the online rows of {view} are stale: the newest ({newest.isoformat()}) is "
                f"more than its TTL ({ttl}) older than the newest validated transaction "
                f"({reference.isoformat()}), so every request would be scored without them"
            )
    return reasons


def deliver(
    client: TorchServeClient,
    registry: Registry,
    version: str,
    replay: Sequence[dict[str, Any]],
    policy: DeliveryPolicy,
    *,
    stale_features: Sequence[str] = (),
    archive: Archive | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Take ``version`` (archived in the model store) from registered to default, or back out.

    ``replay``: recent real requests (transaction dicts) for smoke, shadow and watch traffic.
    ``stale_features``: reasons from ``online_freshness_reasons``; any of them defers the
    version before TorchServe is changed (outcome ``deferred``: not rejected, still promotable
    later), and the served version stays. ``archive``: the model-store lookup ``reconcile``
    uses for a champion TorchServe lacks (``serving.reconciler.from_model_store``).
    """
    if not replay:
        raise ValueError("progressive delivery needs at least one request to replay")
    # Shadow against, and roll back to, the registry's champion, even if TorchServe was left
    # serving something else (a crash mid-release, a hand-made set-default).
    start = reconcile(registry, client, archive)
    if start.changed:
        log(f"reconciled before delivery: {start.summary()}")
    served = start.served
    report = DeliveryReport(version=version, previous=served)

    def step(name: str, passed: bool, **detail: Any) -> None:
        entry = {"step": name, "passed": passed, **detail}
        report.steps.append(entry)
        registry.record_deployment(version, name, passed, detail)
        log(f"{version} {name}: {'ok' if passed else 'FAILED'} {detail}")

    def reject(reasons: list[str]) -> DeliveryReport:
        report.outcome, report.reasons = "rejected", reasons
        registry.reject(version, [f"deployment: {r}" for r in reasons])
        if version != served and version in client.versions():
            client.unregister(version)
        return report

    if stale_features:
        # Not the model's fault: the version is not rejected, only held back, and the next
        # deployment of it (or of a later version) tries again once the features are fresh.
        step("online_features", False, reasons=list(stale_features))
        report.outcome, report.reasons = "deferred", list(stale_features)
        return report
    if version not in client.versions():
        client.register(version, set_default=False)
    step("registered_in_torchserve", True, default=served)

    smoke = probe(
        client, tagged(replay[: policy.smoke_requests], "smoke:"), version=version, batch=1
    )
    smoke_ok = not smoke.errors and smoke.sent > 0
    step("smoke_test", smoke_ok, **smoke.summary())
    if not smoke_ok:
        return reject([f"smoke test failed: {smoke.errors[:3]}"])

    if served is not None and served != version:
        shadow_requests = tagged(list(replay[: policy.replay_requests]), "shadow:")
        champ, chall = shadow_probes(
            client, shadow_requests, served, version, batch=policy.replay_batch
        )
        reasons = compare_shadow(champ, chall, policy, expected_mean_shift(registry, version))
        psi = score_psi(champ.scores, chall.scores)
        step(
            "shadow_replay",
            not reasons,
            champion=champ.summary(),
            challenger=chall.summary(),
            score_psi=round(psi, 4),
            reasons=reasons,
        )
        if reasons:
            return reject(reasons)

    if registry.get_alias(CHAMPION) != version:
        registry.promote(version, reason="passed smoke test and shadow replay")
    reconcile(registry, client, archive)
    step("promoted", True, previous=served)
    report.outcome = "promoted"

    if served is None or served == version:
        return report
    breach = watch(client, replay, policy, sleep=sleep)
    step("post_promotion_watch", not breach, **({"breach": breach} if breach else {}))
    if breach:
        registry.rollback(reason=f"post-promotion watch: {'; '.join(breach)}")
        reconcile(registry, client, archive)
        report.outcome, report.reasons = "rolled_back", breach
    return report


def watch(
    client: TorchServeClient,
    replay: Sequence[dict[str, Any]],
    policy: DeliveryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Probe the default endpoint for ``watch_seconds``; the breaches seen (empty: none)."""
    deadline = time.monotonic() + policy.watch_seconds
    seen = Probe("default")
    requests = tagged(replay[: policy.replay_batch], "watch:")
    while True:
        part = probe(client, requests, version=None, batch=policy.replay_batch)
        seen.sent += part.sent
        seen.errors += part.errors
        seen.latencies_ms += part.latencies_ms
        if time.monotonic() >= deadline:
            break
        sleep(policy.watch_interval_s)
    breaches = []
    if seen.error_rate > policy.watch_max_error_rate:
        breaches.append(
            f"error rate {seen.error_rate:.2%} > {policy.watch_max_error_rate:.2%} after promotion"
        )
    if seen.p95_ms > policy.watch_max_p95_latency_ms:
        breaches.append(
            f"p95 latency {seen.p95_ms:.1f} ms > {policy.watch_max_p95_latency_ms} ms after promotion"
        )
    return breaches
