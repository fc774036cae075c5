"""When to retrain: one decision over every trigger signal, debounced.

Plain logic (no Dagster) so it is tested on its own; the retraining sensor gathers the signals
(new validated data, drift, live decay realised or estimated without labels, the nightly
schedule, a person asking) and the state (is a retraining in flight, when did the last one
start) and asks ``decide``.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import NormalDist

from models.tasks import lower_is_better, metric_label, task_of_metric
from models.tasks import of as task_of

# Highest first: a person asking wins, then what says the model is wrong, then plain freshness.
PRIORITY = ("manual", "drift", "decay", "new_data", "schedule")
BYPASSES_COOLDOWN = frozenset({"manual", "schedule"})
# Triggers that wait for labels newer than the last retraining's start: with none, it would
# train on the same labelled rows and give the same candidate (decay fires at every monitoring
# run while the champion stays decayed).
NEEDS_NEW_LABELS = frozenset({"drift", "decay"})


@dataclass(frozen=True)
class TriggerPolicy:
    """Thresholds and debouncing; every number a user may want to tune."""

    min_new_labelled_rows: int = 20_000
    # 0.25 is the usual "significant shift" line; with no drift at all the demo's merchant
    # chargeback rate wanders to PSI 0.24 within a month (its merchants' rates move), so 0.3.
    drift_psi: float = 0.3
    # Decay: the live primary metric worse than offline by this fraction (a classifier's
    # PR-AUC 15% lower, a regressor's MAE 15% higher).
    decay_drop: float = 0.15
    min_labelled_for_decay: int = 200
    # Average precision on fewer positives than this is too coarse to call decay on.
    min_positives_for_decay: int = 30
    cooldown: timedelta = timedelta(minutes=30)
    # Decay may also be read from the label-free estimate (CBPE for a classifier, the expected
    # MAE for a regressor) of the newest predictions, days before their labels arrive; it is
    # blind to concept drift (the predictions look the same).
    decay_on_estimate: bool = True
    # A PR-AUC on ~1% positives moves by 0.05-0.15 between samples. Decay fires only when the
    # live figure is past (1 -/+ decay_drop) x offline with this confidence, given both
    # figures' standard errors (decision 26); 0.5 compares the point figures alone. One-sided
    # 99%, not 95%: the sensor tests again at every labels batch, ~30 times a month.
    decay_confidence: float = 0.99
    # After a drift-triggered retraining, drift fires again only this much later. A retraining
    # sooner builds its training set from the same labelled rows (labels of the drifted
    # traffic take the label maturity to arrive), so it cannot answer the drift either; under
    # a lasting covariate drift the trigger fired every cooldown (22 retrainings in 30 days).
    # Decay, new data, the schedule and a person asking are not held back by it.
    drift_rearm: timedelta = timedelta(days=7)

    def __post_init__(self) -> None:
        if min(self.min_new_labelled_rows, self.min_labelled_for_decay) < 1:
            raise ValueError("row thresholds must be >= 1")
        if self.min_positives_for_decay < 1:
            raise ValueError("min_positives_for_decay must be >= 1")
        if self.drift_psi <= 0 or not 0 < self.decay_drop < 1:
            raise ValueError("drift_psi must be > 0 and decay_drop in (0, 1)")
        if not 0.5 <= self.decay_confidence < 1:
            raise ValueError("decay_confidence must be in [0.5, 1)")
        if self.cooldown < timedelta(0) or self.drift_rearm < timedelta(0):
            raise ValueError("cooldown and drift_rearm must not be negative")


@dataclass(frozen=True)
class Signal:
    """One reason to retrain, with the number that crossed its threshold and the batch whose
    arrival it was measured on (the labels batch behind a decay or new-data signal, the request
    batch behind a value skew; None when no batch is: serving drift, the schedule, a person)."""

    kind: str
    reason: str
    value: float | None = None
    threshold: float | None = None
    batch: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PRIORITY:
            raise ValueError(f"unknown trigger {self.kind!r}; expected one of {PRIORITY}")

    def tags(self, seen: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """Run tags shown in the Dagster UI: which trigger, and why; with ``seen`` (``first_seen``'s
        entry of this kind), where the trigger started: the batch that set it off and when the
        sensor first saw it (``loopline demo``'s loop latency is measured from that batch)."""
        tags = {"loopline/trigger": self.kind, "loopline/reason": self.reason[:200]}
        if self.value is not None:
            tags["loopline/trigger_value"] = f"{self.value:.6g}"
        origin = seen or {"batch": self.batch}
        if origin.get("batch"):
            tags[TRIGGER_BATCH_TAG] = str(origin["batch"])
        if origin.get("since"):
            tags[TRIGGER_SEEN_TAG] = str(origin["since"])
        return tags


TRIGGER_BATCH_TAG = "loopline/trigger_batch"
TRIGGER_SEEN_TAG = "loopline/trigger_seen_at"


def first_seen(
    previous: Mapping[str, Mapping[str, str | None]],
    signals: list[Signal | None],
    now: datetime,
) -> dict[str, dict[str, str | None]]:
    """Per trigger kind present now: when the sensor first saw it and the batch behind it then,
    kept from ``previous`` for as long as the kind stays present. A retraining held back (the
    cooldown, drift's re-arm, one already in flight) so still names the batch that set it off,
    not the newest one before it fired; a kind gone absent starts afresh."""
    out: dict[str, dict[str, str | None]] = {}
    for signal in signals:
        if signal is None or signal.kind in out:
            continue
        kept = previous.get(signal.kind)
        out[signal.kind] = dict(kept) if kept else {"since": now.isoformat(), "batch": signal.batch}
    return out


@dataclass(frozen=True)
class Decision:
    fire: bool
    signal: Signal | None
    why: str
    suppressed: tuple[Signal, ...] = field(default_factory=tuple)


def new_data_signal(new_labelled_rows: int, policy: TriggerPolicy) -> Signal | None:
    if new_labelled_rows < policy.min_new_labelled_rows:
        return None
    return Signal(
        "new_data",
        f"{new_labelled_rows} new labelled rows since the last training set",
        float(new_labelled_rows),
        float(policy.min_new_labelled_rows),
    )


def drift_signal(psi_by_feature: dict[str, float | None], policy: TriggerPolicy) -> Signal | None:
    """PSI past the threshold on some feature. A feature without a PSI (None or NaN: it was
    missing in serving) is an availability problem, not drift, and never fires this."""
    drifted = {
        f: v
        for f, v in psi_by_feature.items()
        if v is not None and math.isfinite(v) and v >= policy.drift_psi
    }
    if not drifted:
        return None
    worst = max(drifted, key=drifted.__getitem__)
    names = ", ".join(sorted(drifted))
    return Signal(
        "drift",
        f"PSI >= {policy.drift_psi} on {names} (worst {worst} {drifted[worst]:.3f})",
        drifted[worst],
        policy.drift_psi,
    )


def decay_signal(
    live: float | None,
    offline: float | None,
    labelled: int,
    policy: TriggerPolicy,
    *,
    positives: int | None = None,
    live_se: float | None = None,
    offline_se: float | None = None,
    metric: str = "pr_auc",
) -> Signal | None:
    """The live metric (a classifier's PR-AUC, a regressor's MAE) is worse than the offline
    evaluation's by more than the allowed fraction, by more than chance explains (``live_se``,
    ``offline_se``: the figures' standard errors; missing ones count as exact), on enough
    labelled predictions and (a classifier's) ``positives``."""
    if labelled < policy.min_labelled_for_decay:
        return None
    if positives is not None and positives < policy.min_positives_for_decay:
        return None
    found = _significant_decay(live, offline, live_se, offline_se, policy, metric)
    if found is None:
        return None
    change, margin = found
    name = metric_label(metric)
    return Signal(
        "decay",
        f"live {name} {live:.3f} is {change:.0%} {_direction(metric)} "
        f"offline {offline:.3f} on {labelled} labelled predictions{margin}",
        change,
        policy.decay_drop,
    )


def estimated_decay_signal(
    estimated: float | None,
    offline: float | None,
    rows: int,
    policy: TriggerPolicy,
    *,
    estimate_se: float | None = None,
    offline_se: float | None = None,
    metric: str = "pr_auc",
) -> Signal | None:
    """The label-free estimate of the live metric on predictions not labelled yet (CBPE for a
    classifier, the expected MAE for a regressor) is worse than the offline evaluation's by
    more than the allowed fraction, by more than chance explains; off with
    ``decay_on_estimate``."""
    if not policy.decay_on_estimate or rows < policy.min_labelled_for_decay:
        return None
    found = _significant_decay(estimated, offline, estimate_se, offline_se, policy, metric)
    if found is None:
        return None
    change, margin = found
    name, method = metric_label(metric), task_of(task_of_metric(metric)).estimate_name
    return Signal(
        "decay",
        f"estimated live {name} {estimated:.3f} (label-free, {method}) is {change:.0%} "
        f"{_direction(metric)} offline {offline:.3f} on {rows} "
        f"predictions not labelled yet{margin}",
        change,
        policy.decay_drop,
    )


def _direction(metric: str) -> str:
    return "above" if lower_is_better(metric) else "below"


def decay_bound(offline: float, policy: TriggerPolicy, metric: str = "pr_auc") -> float:
    """The live figure past which the point figures alone count as decay: under
    ``(1 - decay_drop) x offline`` for a higher-is-better metric, over ``(1 + decay_drop) x
    offline`` for a lower-is-better one."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    return (1.0 + sign * policy.decay_drop) * offline


def _significant_decay(
    live: float | None,
    offline: float | None,
    live_se: float | None,
    offline_se: float | None,
    policy: TriggerPolicy,
    metric: str = "pr_auc",
) -> tuple[float, str] | None:
    """(relative worsening, reason suffix) when ``live`` lies past the decay bound by more
    than ``policy.decay_confidence`` allows for chance; None otherwise or when not measured."""
    if not _positive(live, allow_zero=True) or not _positive(offline):
        return None
    assert live is not None and offline is not None
    lower = lower_is_better(metric)
    change = live / offline - 1.0 if lower else 1.0 - live / offline
    if change < policy.decay_drop:
        return None
    scale = 1.0 + policy.decay_drop if lower else 1.0 - policy.decay_drop
    se = math.hypot(_se(live_se), scale * _se(offline_se))
    z = NormalDist().inv_cdf(policy.decay_confidence)
    bound = decay_bound(offline, policy, metric)
    gap = live - bound if lower else bound - live
    if se > 0 and gap < z * se:
        return None
    margin = f" (z {gap / se:.1f}; standard error {se:.3f})" if se > 0 else ""
    return change, margin


def _se(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) and value > 0 else 0.0


def _positive(value: float | None, *, allow_zero: bool = False) -> bool:
    """A measured number (not None, not NaN) above zero (or at it, when allowed)."""
    if value is None or not math.isfinite(value):
        return False
    return value >= 0 if allow_zero else value > 0


def decide(
    signals: list[Signal | None],
    *,
    in_flight: bool,
    last_started: datetime | None,
    now: datetime,
    policy: TriggerPolicy,
    last_drift: datetime | None = None,
    new_labels: bool = True,
) -> Decision:
    """Fire at most one retraining: never while one is in flight, never inside the cooldown
    (except for a person asking or the nightly schedule), drift never within ``drift_rearm``
    of the last drift-triggered retraining (``last_drift``), drift and decay never without
    ``new_labels`` (a labels batch since the last retraining started), the most important
    signal first."""
    present = sorted((s for s in signals if s is not None), key=lambda s: PRIORITY.index(s.kind))
    if not present:
        return Decision(False, None, "no trigger")
    if in_flight:
        return Decision(False, None, "a retraining is already in flight", tuple(present))
    cooling = last_started is not None and now - last_started < policy.cooldown
    rearming = last_drift is not None and now - last_drift < policy.drift_rearm
    stale = not new_labels and last_started is not None
    held: list[str] = []
    for signal in present:
        if cooling and signal.kind not in BYPASSES_COOLDOWN:
            left = policy.cooldown - (now - last_started)  # type: ignore[operator]
            held.append(f"cooling down for {int(left.total_seconds())} s more")
            continue
        if rearming and signal.kind == "drift":
            left = policy.drift_rearm - (now - last_drift)  # type: ignore[operator]
            held.append(f"drift already answered: it re-arms in {_duration(left)}")
            continue
        if stale and signal.kind in NEEDS_NEW_LABELS:
            held.append(
                f"{signal.kind} waits for labels newer than the last retraining (it would "
                "train on the same rows)"
            )
            continue
        rest = tuple(s for s in present if s is not signal)
        return Decision(True, signal, signal.reason, rest)
    return Decision(False, None, held[0], tuple(present))


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} days"
    return f"{seconds} s"
