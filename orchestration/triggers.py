"""When to retrain: one decision over every trigger signal, debounced.

Plain logic (no Dagster) so it is tested on its own; the retraining sensor gathers the signals
(new validated data, drift, live decay realised or estimated without labels, the nightly
schedule, a person asking) and the state (is a retraining in flight, when did the last one
start) and asks ``decide``.
"""

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# Highest first: a person asking wins, then what says the model is wrong, then plain freshness.
PRIORITY = ("manual", "drift", "decay", "new_data", "schedule")
BYPASSES_COOLDOWN = frozenset({"manual", "schedule"})


@dataclass(frozen=True)
class TriggerPolicy:
    """Thresholds and debouncing; every number a user may want to tune."""

    min_new_labelled_rows: int = 20_000
    drift_psi: float = 0.2
    decay_pr_auc_drop: float = 0.15
    min_labelled_for_decay: int = 200
    cooldown: timedelta = timedelta(minutes=30)
    # Decay may also be read from the label-free estimate (CBPE) of the newest predictions,
    # days before their labels arrive; it is blind to concept drift (scores look the same).
    decay_on_estimate: bool = True

    def __post_init__(self) -> None:
        if self.min_new_labelled_rows < 1 or self.min_labelled_for_decay < 1:
            raise ValueError("row thresholds must be >= 1")
        if self.drift_psi <= 0 or not 0 < self.decay_pr_auc_drop < 1:
            raise ValueError("drift_psi must be > 0 and decay_pr_auc_drop in (0, 1)")
        if self.cooldown < timedelta(0):
            raise ValueError("cooldown must not be negative")


@dataclass(frozen=True)
class Signal:
    """One reason to retrain, with the number that crossed its threshold."""

    kind: str
    reason: str
    value: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in PRIORITY:
            raise ValueError(f"unknown trigger {self.kind!r}; expected one of {PRIORITY}")

    def tags(self) -> dict[str, str]:
        """Run tags shown in the Dagster UI: which trigger, and why."""
        tags = {"loopline/trigger": self.kind, "loopline/reason": self.reason[:200]}
        if self.value is not None:
            tags["loopline/trigger_value"] = f"{self.value:.6g}"
        return tags


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
    live_pr_auc: float | None, offline_pr_auc: float | None, labelled: int, policy: TriggerPolicy
) -> Signal | None:
    """Live PR-AUC fell by more than the allowed fraction of the offline evaluation's."""
    if not _positive(live_pr_auc, allow_zero=True) or not _positive(offline_pr_auc):
        return None
    if labelled < policy.min_labelled_for_decay:
        return None
    drop = 1.0 - live_pr_auc / offline_pr_auc
    if drop < policy.decay_pr_auc_drop:
        return None
    return Signal(
        "decay",
        f"live PR-AUC {live_pr_auc:.3f} is {drop:.0%} below offline {offline_pr_auc:.3f} "
        f"on {labelled} labelled predictions",
        drop,
        policy.decay_pr_auc_drop,
    )


def estimated_decay_signal(
    estimated_pr_auc: float | None, offline_pr_auc: float | None, rows: int, policy: TriggerPolicy
) -> Signal | None:
    """The label-free estimate of live PR-AUC (CBPE on predictions not labelled yet) fell by
    more than the allowed fraction of the offline evaluation's; off with ``decay_on_estimate``."""
    if not policy.decay_on_estimate or rows < policy.min_labelled_for_decay:
        return None
    if not _positive(estimated_pr_auc, allow_zero=True) or not _positive(offline_pr_auc):
        return None
    drop = 1.0 - estimated_pr_auc / offline_pr_auc
    if drop < policy.decay_pr_auc_drop:
        return None
    return Signal(
        "decay",
        f"estimated live PR-AUC {estimated_pr_auc:.3f} (label-free, CBPE) is {drop:.0%} below "
        f"offline {offline_pr_auc:.3f} on {rows} predictions not labelled yet",
        drop,
        policy.decay_pr_auc_drop,
    )


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
) -> Decision:
    """Fire at most one retraining: never while one is in flight, never inside the cooldown
    (except for a person asking or the nightly schedule), the most important signal first."""
    present = sorted((s for s in signals if s is not None), key=lambda s: PRIORITY.index(s.kind))
    if not present:
        return Decision(False, None, "no trigger")
    if in_flight:
        return Decision(False, None, "a retraining is already in flight", tuple(present))
    cooling = last_started is not None and now - last_started < policy.cooldown
    for signal in present:
        if cooling and signal.kind not in BYPASSES_COOLDOWN:
            continue
        rest = tuple(s for s in present if s is not signal)
        return Decision(True, signal, signal.reason, rest)
    left = policy.cooldown - (now - last_started)  # type: ignore[operator]
    return Decision(
        False, None, f"cooling down for {int(left.total_seconds())} s more", tuple(present)
    )
