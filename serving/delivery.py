"""Progressive delivery of a validated challenger to TorchServe.

reconcile (TorchServe serves the registry's champion) -> register (not default) -> smoke test
on its versioned endpoint -> shadow replay of recent logged requests to champion and challenger
-> compare (``serving.release_checks``: tests with a stated false-rejection rate) -> promotion
-> watch error rate and p95 latency over a few hundred requests -> keep, or roll back to the
previous version. Promotion and rollback write the registry's intent first, then apply and
confirm it (``serving.reconciler``), so a crash between the two leaves the registry's champion
as the truth for the next reconcile. TorchServe's ``set-default`` switches atomically and the
previous version stays registered, so traffic during a promotion or a rollback never meets a
missing model. Every step is a registry event.

Before any of it, a version is deferred when the online store lacks fresh rows for a feature
view of its FeatureService (``online_freshness_reasons``): served, it would score every request
without that view's features. The champion keeps serving; the version is not rejected. A
shadow check without enough samples to decide defers it too.

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
from serving import prediction_log, release_checks
from serving.client import TorchServeClient, TorchServeError
from serving.reconciler import Archive, reconcile
from serving.release_checks import Check

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
    """Bounds a challenger must stay within, in shadow and after promotion.

    Each shadow and watch check is a test (``serving.release_checks``): a challenger that
    behaves as the champion does fails the shadow with probability at most ``alpha``, shared
    among its checks (Bonferroni), and the watch likewise. Rates and ratios below are the
    effects a check must be confident of, not figures the sample merely crosses."""

    smoke_requests: int = 8
    replay_requests: int = 300
    # One request a call: each call is a latency sample, and customers send one at a time.
    replay_batch: int = 1
    alpha: float = 0.01
    # Latency samples (calls) each version answers before p95s are compared: the shadow
    # replays its requests again until both reach it. A p95 of a few hundred calls is past
    # the few a scheduling pause on a shared host makes slow (decision 30).
    min_samples: int = 300
    max_error_rate: float = 0.01
    max_p95_latency_ms: float = 500.0
    max_latency_ratio: float = 2.0
    min_latency_gap_ms: float = 1.0
    # The smallest score-distribution distance worth a rejection: sound retrains on fresh
    # fraud-like data differed by KS up to 0.25 on 300 requests; a broken model (a constant,
    # a feature lost in serving) by 0.5 and more.
    min_score_ks: float = 0.35
    # A classifier's share of positive decisions, as a ratio to the champion's either way; a
    # regressor's mean prediction, relative: each as far from the change the gate's test
    # split showed (expected_shift).
    max_flag_rate_change: float = 0.5
    max_mean_change: float = 0.2
    # The watch sends watch_requests to the default endpoint, one every watch_interval_s,
    # and stops early at watch_seconds.
    watch_requests: int = 300
    watch_seconds: float = 120.0
    watch_interval_s: float = 0.02
    watch_max_error_rate: float = 0.01
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

    def add(self, part: Probe, *, scores: bool = True) -> None:
        """Count ``part``'s calls in this one; its scores only when ``scores`` (a request
        replayed again is another latency sample, not another score)."""
        self.sent += part.sent
        self.errors += part.errors
        self.latencies_ms += part.latencies_ms
        if scores:
            self.scores += part.scores
            self.flagged += part.flagged

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.sent,
            "scored": len(self.scores),
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
    outcome: str = "pending"  # promoted | rejected | rolled_back | deferred | refused
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
    clock: Callable[[], float] = time.perf_counter,
) -> Probe:
    """Send ``requests`` in lists of ``batch`` to a version (None: the default endpoint);
    ``clock`` (seconds) times each call."""
    result = Probe(version or "default")
    task = active().task
    score, positive = task.score, task.decision.positive
    # A classifier answers a probability; a regressor any finite value.
    bounded = task_of(task.type).has_threshold
    for start in range(0, len(requests), batch):
        chunk = list(requests[start : start + batch])
        result.sent += len(chunk)
        began = clock()
        try:
            answer = client.predict(chunk, version=version)
        except TorchServeError as exc:
            result.errors.extend([f"{exc.status}: {exc}"] * len(chunk))
            continue
        elapsed = (clock() - began) * 1000.0
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
    min_calls: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Probe, Probe]:
    """The same requests to both versions, batch by batch in turns, after one unmeasured
    warm-up batch each: both see the same background load at the same moments, and a fresh
    worker's first call at this batch size does not count against the challenger. A warm-up
    that fails is not hidden: its batch is measured. The requests are replayed again until
    each version got ``min_calls`` calls (latency samples); scores come from the first pass."""
    warm = list(requests[:batch])
    for version in (champion, challenger):
        if probe(client, warm, version=version, batch=batch, clock=clock).errors:
            break
    champ, chall = Probe(champion), Probe(challenger)
    calls = math.ceil(len(requests) / batch)
    passes = max(1, math.ceil(min_calls / calls)) if calls else 0
    turn = 0
    for first in [True] + [False] * (passes - 1):
        for start in range(0, len(requests), batch):
            chunk = requests[start : start + batch]
            order = [(champ, champion), (chall, challenger)]
            for into, version in order if turn % 2 == 0 else reversed(order):
                part = probe(client, chunk, version=version, batch=batch, clock=clock)
                into.add(part, scores=first)
            turn += 1
    return champ, chall


def expected_shift(registry: Registry, version: str) -> float:
    """How far the challenger moved from the champion on the gate's test split, relative: a
    regressor's mean prediction, a classifier's flag rate (0 when the evaluation did not record
    both). After concept drift a better model moves by design (rain: every delivery slower; a
    new fraud pattern: more declines); the shadow then checks that live traffic moves as the
    labelled test split did, not that nothing moved (decision 37)."""
    key = "flag_rate" if task_of(active().task.type).has_threshold else "mean_prediction"
    record = registry.get(version)
    champion = (record.extra.get("compared") or {}).get("champion") or {}
    before, after = champion.get(key), record.metrics.get(key)
    if before is None or after is None or not before or math.isnan(before + after):
        return 0.0
    return (float(after) - float(before)) / abs(float(before))


def expected_ks(registry: Registry, version: str) -> float:
    """The KS between the challenger's and the champion's scores on the gate's test split (0
    when not recorded): how far the shadow may see them apart live (decision 55)."""
    value = registry.get(version).extra.get("score_ks_vs_champion")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def availability_checks(
    seen: Probe, alpha: float, max_rate: float, limit_ms: float, stage: str
) -> list[Check]:
    """Error rate and p95 latency of what ``seen`` answered, against absolute bounds: the
    ``<stage>_error_rate`` and ``<stage>_p95_latency`` checks of the shadow and the watch."""
    return [
        release_checks.error_rate(
            len(seen.errors), seen.sent, alpha=alpha, max_rate=max_rate, name=f"{stage}_error_rate"
        ),
        release_checks.p95_latency_limit(
            seen.latencies_ms, alpha=alpha, limit_ms=limit_ms, name=f"{stage}_p95_latency"
        ),
    ]


def shadow_checks(
    champion: Probe,
    challenger: Probe,
    policy: DeliveryPolicy,
    expected_shift: float = 0.0,
    expected_ks: float = 0.0,
) -> list[Check]:
    """The shadow's tests of the challenger against the champion on the same requests, each at
    ``policy.alpha`` over their number. ``expected_shift``: the change the gate's test split
    showed (``expected_shift``): a classifier's flag rate and a regressor's mean prediction may
    move live as far, and a regressor's scores are compared with the champion's moved so.
    ``expected_ks``: the scores' KS on the test split (``expected_ks``), which live scores may
    reach."""
    alpha = policy.alpha / 5
    if task_of(active().task.type).has_threshold:
        reference = champion.scores
        change = release_checks.flag_rate_change(
            (champion.flagged, len(champion.scores)),
            (challenger.flagged, len(challenger.scores)),
            expected_change=expected_shift,
            alpha=alpha,
            max_change=policy.max_flag_rate_change,
        )
    else:
        reference = [p + expected_shift * abs(p) for p in champion.scores]
        change = release_checks.mean_change(
            champion.scores,
            challenger.scores,
            expected_shift=expected_shift,
            alpha=alpha,
            max_change=policy.max_mean_change,
        )
    return [
        *availability_checks(
            challenger, alpha, policy.max_error_rate, policy.max_p95_latency_ms, "shadow"
        ),
        release_checks.p95_latency_ratio(
            champion.latencies_ms,
            challenger.latencies_ms,
            alpha=alpha,
            max_ratio=policy.max_latency_ratio,
            min_gap_ms=policy.min_latency_gap_ms,
            min_samples=policy.min_samples,
        ),
        release_checks.score_shift(
            reference,
            challenger.scores,
            alpha=alpha,
            min_ks=policy.min_score_ks,
            expected_ks=expected_ks,
        ),
        change,
    ]


def compare_shadow(
    champion: Probe,
    challenger: Probe,
    policy: DeliveryPolicy,
    expected_shift: float = 0.0,
    expected_ks: float = 0.0,
) -> list[str]:
    """Reasons the challenger's shadow run is out of bounds (empty: none is)."""
    checks = shadow_checks(champion, challenger, policy, expected_shift, expected_ks)
    return [c.reason for c in checks if c.failed]


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
    clock: Callable[[], float] = time.perf_counter,
) -> DeliveryReport:
    """Take ``version`` (archived in the model store) from registered to default, or back out.

    ``replay``: recent real requests (transaction dicts) for smoke, shadow and watch traffic.
    ``stale_features``: reasons from ``online_freshness_reasons``; any of them defers the
    version before TorchServe is changed (outcome ``deferred``: not rejected, still promotable
    later), and the served version stays. ``archive``: the model-store lookup ``reconcile``
    uses for a champion TorchServe lacks (``serving.reconciler.from_model_store``).
    A shadow check without enough samples to decide defers the version too; a watch that saw
    too few requests by its deadline keeps the promotion and says so in the report.
    ``sleep``/``clock`` pace and time the probes (seconds).
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

    def withdraw(outcome: str, reasons: list[str]) -> DeliveryReport:
        """Rejected (the model's fault), or deferred: not rejected, only held back, and the
        next deployment of it (or of a later version) tries again."""
        report.outcome, report.reasons = outcome, reasons
        if outcome == "rejected":
            registry.reject(version, [f"deployment: {r}" for r in reasons])
        if version != served and version in client.versions():
            client.unregister(version)
        return report

    refusal = registry.promotion_refusal(version)
    if refusal:  # nothing the gate did not pass, against this champion, reaches TorchServe
        step("gate_verdict", False, reasons=[refusal])
        report.outcome, report.reasons = "refused", [refusal]
        return report
    if stale_features:
        step("online_features", False, reasons=list(stale_features))
        return withdraw("deferred", list(stale_features))
    if version not in client.versions():
        client.register(version, set_default=False)
    step("registered_in_torchserve", True, default=served)

    smoke = probe(
        client, tagged(replay[: policy.smoke_requests], "smoke:"), version=version, batch=1
    )
    smoke_ok = not smoke.errors and smoke.sent > 0
    step("smoke_test", smoke_ok, **smoke.summary())
    if not smoke_ok:
        return withdraw("rejected", [f"smoke test failed: {smoke.errors[:3]}"])

    if served is not None and served != version:
        checks = shadow(client, registry, version, served, replay, policy, step, clock)
        if any(c.failed for c in checks):
            return withdraw("rejected", [c.reason for c in checks if c.failed])
        if any(c.outcome == release_checks.NOT_ENOUGH for c in checks):
            return withdraw("deferred", [c.reason for c in checks if c.reason])

    if registry.get_alias(CHAMPION) != version:
        registry.promote(version, reason="passed smoke test and shadow replay")
    reconcile(registry, client, archive)
    step("promoted", True, previous=served)
    report.outcome = "promoted"

    if served == version:
        return report
    checks = watch(client, replay, policy, sleep=sleep, clock=clock)
    passed = all(c.outcome == release_checks.PASSED for c in checks)
    step("post_promotion_watch", passed, checks=[c.to_dict() for c in checks])
    breach = [c.reason for c in checks if c.failed]
    if breach and served is None:  # the first model: nothing to roll back to, so it serves
        report.reasons = [*breach, "no previous champion to roll back to: it keeps serving"]
        retire(client, keep={version})
    elif breach:
        registry.rollback(reason=f"post-promotion watch: {'; '.join(breach)}")
        reconcile(registry, client, archive)
        retire(client, keep=set(client.versions()) - {version})
        report.outcome, report.reasons = "rolled_back", breach
    else:  # an inconclusive watch (too few requests) keeps the promotion and says so
        report.reasons = [c.reason for c in checks if c.reason]
        retire(client, keep={version, served} - {None})
    return report


def retire(client: TorchServeClient, keep: set[str]) -> list[str]:
    """Unregisters every version of the model but ``keep`` (the champion and its rollback
    target): each registered version holds a worker process, so a loop that promotes for
    months would otherwise grow by one per release. An older champion a rollback walks back
    to is registered again from the model store by ``reconcile``. Returns the versions
    retired; one that TorchServe refuses to drop is left for the next release."""
    retired = []
    for old in sorted(set(client.versions()) - keep):
        try:
            client.unregister(old)
        except TorchServeError:
            continue
        retired.append(old)
    return retired


def shadow(
    client: TorchServeClient,
    registry: Registry,
    version: str,
    served: str,
    replay: Sequence[dict[str, Any]],
    policy: DeliveryPolicy,
    step: Callable[..., None],
    clock: Callable[[], float],
) -> list[Check]:
    """Replay requests to the champion and the challenger, test them, record the step."""
    requests = tagged(list(replay[: policy.replay_requests]), "shadow:")
    champ, chall = shadow_probes(
        client,
        requests,
        served,
        version,
        batch=policy.replay_batch,
        min_calls=policy.min_samples,
        clock=clock,
    )
    checks = shadow_checks(
        champ, chall, policy, expected_shift(registry, version), expected_ks(registry, version)
    )
    step(
        "shadow_replay",
        all(c.outcome == release_checks.PASSED for c in checks),
        champion=champ.summary(),
        challenger=chall.summary(),
        checks=[c.to_dict() for c in checks],
        reasons=[c.reason for c in checks if c.reason],
    )
    return checks


def watch(
    client: TorchServeClient,
    replay: Sequence[dict[str, Any]],
    policy: DeliveryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Check]:
    """Send ``watch_requests`` single requests to the default endpoint, one every
    ``watch_interval_s``, stopping early at ``watch_seconds``; then test its error rate and p95
    (``policy.alpha`` over the two). Failed checks are breaches; fewer requests answered than
    ``watch_requests`` adds a ``watch_requests`` check without enough samples."""
    deadline = clock() + policy.watch_seconds
    seen = Probe("default")
    requests = tagged(replay, "watch:")
    while seen.sent < policy.watch_requests:
        request = requests[seen.sent % len(requests)]
        seen.add(probe(client, [request], version=None, batch=1, clock=clock))
        if clock() >= deadline:
            break
        sleep(policy.watch_interval_s)
    checks = availability_checks(
        seen,
        policy.alpha / 2,
        policy.watch_max_error_rate,
        policy.watch_max_p95_latency_ms,
        "watch",
    )
    if seen.sent < policy.watch_requests:
        reason = (
            f"post-promotion watch inconclusive: {seen.sent} of {policy.watch_requests} "
            f"requests answered in {policy.watch_seconds} s; the promotion stands"
        )
        checks.append(Check("watch_requests", release_checks.NOT_ENOUGH, reason))
    return checks
