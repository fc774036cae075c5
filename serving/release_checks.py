"""Shadow and watch checks as statistical tests with a stated false-rejection rate.

Each check gets a share ``alpha`` of its stage's false-rejection budget (Bonferroni: a sound
challenger, one that behaves as the champion does, fails any of a stage's checks with
probability at most the stage's alpha). A check that compares distributions fails only when the
difference is both significant at ``alpha`` and larger than a stated minimum effect, so a large
sample does not reject a negligible change. Each check has three outcomes: ``passed``,
``failed`` (with a reason an operator can read), and ``not_enough_samples`` (neither: the
caller decides what an undecided check means; ``serving.delivery`` defers or reports it).

scipy is imported inside the functions that need it: this module is imported by the Dagster
code location, which loads in about a second and a half (decision 38).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from quality.drift import ks_statistic

PASSED, FAILED, NOT_ENOUGH = "passed", "failed", "not_enough_samples"


@dataclass(frozen=True)
class Check:
    """One test's outcome; ``detail`` holds the figures it was decided on."""

    name: str
    outcome: str
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "outcome": self.outcome, "reason": self.reason, **self.detail}


def _z(alpha: float) -> float:
    """The standard normal's upper ``alpha`` quantile."""
    return NormalDist().inv_cdf(1.0 - alpha)


def score_shift(
    champion: Sequence[float],
    challenger: Sequence[float],
    *,
    alpha: float,
    min_ks: float,
    expected_ks: float = 0.0,
) -> Check:
    """Two-sample Kolmogorov-Smirnov: the scores' distributions differ more than they did on
    the gate's test split (``expected_ks``, the same two models' KS there).

    The asymptotic critical value ``c(alpha) * sqrt((n + m) / (n m))`` shrinks as the samples
    grow; ``min_ks`` is the smallest distance worth a rejection, beyond ``expected_ks``. Scores
    of the same requests are positively correlated, which makes the test conservative, not
    liberal."""
    n, m = len(champion), len(challenger)
    if not n or not m:
        return Check("score_shift", NOT_ENOUGH, f"no scores to compare ({n} and {m})")
    ks = ks_statistic(champion, challenger)
    critical = math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))
    bound = expected_ks + max(critical, min_ks)
    detail = {
        "ks": round(ks, 4),
        "expected_ks": round(expected_ks, 4),
        "critical": round(bound, 4),
        "n": n,
        "m": m,
    }
    if ks > bound:
        reason = (
            f"score distribution moved: KS {ks:.3f} vs the champion over {n} and {m} scores, "
            f"where the test split showed {expected_ks:.3f}: beyond {bound:.3f} (significant "
            f"at {alpha:.2%}, at least {min_ks} more)"
        )
        return Check("score_shift", FAILED, reason, detail)
    return Check("score_shift", PASSED, detail=detail)


def quantile_bounds(
    values: Sequence[float], q: float, alpha: float
) -> tuple[float | None, float | None]:
    """Distribution-free one-sided (1 - alpha) bounds on the ``q`` quantile from order
    statistics: the true quantile is at least the lower one, and at most the upper one, each
    with probability 1 - alpha. None where the sample is too small to give that bound."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values, float))
    n = x.size
    if not n:
        return None, None
    # Lower: X_(k+1) with P(Bin(n, q) <= k) <= alpha. Upper: X_(u+1), u the smallest with
    # P(Bin(n, q) <= u) >= 1 - alpha.
    k = int(binom.ppf(alpha, n, q))
    if binom.cdf(k, n, q) > alpha:
        k -= 1
    u = int(binom.ppf(1.0 - alpha, n, q))
    return (float(x[k]) if k >= 0 else None), (float(x[u]) if u < n else None)


def p95_latency_ratio(
    champion_ms: Sequence[float],
    challenger_ms: Sequence[float],
    *,
    alpha: float,
    max_ratio: float,
    min_gap_ms: float,
    min_samples: int,
) -> Check:
    """The challenger's p95 is more than ``max_ratio`` times the champion's, and more than
    ``min_gap_ms`` over it: its lower bound beyond the champion's upper bound (alpha split
    between the two). Fewer than ``min_samples`` latencies either side: not enough samples."""
    n, m = len(champion_ms), len(challenger_ms)
    if min(n, m) < min_samples:
        return Check(
            "p95_latency_ratio",
            NOT_ENOUGH,
            f"{n} champion and {m} challenger latencies; {min_samples} each are needed to "
            "compare p95s",
        )
    _, champ_hi = quantile_bounds(champion_ms, 0.95, alpha / 2)
    chall_lo, _ = quantile_bounds(challenger_ms, 0.95, alpha / 2)
    detail = {
        "champion_p95_ms": round(float(np.percentile(champion_ms, 95)), 3),
        "challenger_p95_ms": round(float(np.percentile(challenger_ms, 95)), 3),
        "champion_p95_upper_ms": champ_hi,
        "challenger_p95_lower_ms": chall_lo,
        "n": n,
        "m": m,
    }
    if champ_hi is None or chall_lo is None:
        return Check("p95_latency_ratio", NOT_ENOUGH, "too few latencies for p95 bounds", detail)
    if chall_lo > max_ratio * champ_hi and chall_lo - champ_hi > min_gap_ms:
        reason = (
            f"shadow p95 latency {detail['challenger_p95_ms']:.1f} ms against the champion's "
            f"{detail['champion_p95_ms']:.1f} ms: at least {chall_lo:.1f} ms against at most "
            f"{champ_hi:.1f} ms, more than {max_ratio}x (at {alpha:.2%})"
        )
        return Check("p95_latency_ratio", FAILED, reason, detail)
    return Check("p95_latency_ratio", PASSED, detail=detail)


def p95_latency_limit(
    latencies_ms: Sequence[float], *, alpha: float, limit_ms: float, name: str
) -> Check:
    """The p95 is over an absolute limit: its lower bound is (any sample size; a small one
    only has less power)."""
    lower, _ = quantile_bounds(latencies_ms, 0.95, alpha)
    if lower is None:
        return Check(name, NOT_ENOUGH, f"{len(latencies_ms)} latencies give no p95 bound")
    p95 = float(np.percentile(latencies_ms, 95))
    detail = {"p95_ms": round(p95, 3), "p95_lower_ms": lower, "limit_ms": limit_ms}
    if lower > limit_ms:
        label = name.replace("_", " ")
        reason = f"{label} {p95:.1f} ms (at least {lower:.1f} ms) > {limit_ms} ms"
        return Check(name, FAILED, reason, detail)
    return Check(name, PASSED, detail=detail)


def error_rate(errors: int, requests: int, *, alpha: float, max_rate: float, name: str) -> Check:
    """The error rate is over ``max_rate``: the exact (Clopper-Pearson) one-sided lower bound
    of ``errors`` in ``requests`` is. With ``max_rate`` 0, any error fails."""
    from scipy.stats import beta

    if not requests:
        return Check(name, NOT_ENOUGH, "no requests sent")
    lower = float(beta.ppf(alpha, errors, requests - errors + 1)) if errors else 0.0
    rate = errors / requests
    detail = {"errors": errors, "requests": requests, "rate_lower": round(lower, 5)}
    if errors and lower > max_rate:
        label = name.replace("_", " ")
        reason = (
            f"{label} {rate:.2%} ({errors} of {requests}; at least {lower:.2%}) > {max_rate:.2%}"
        )
        return Check(name, FAILED, reason, detail)
    return Check(name, PASSED, detail=detail)


_LEAST_EXPECTED = 0.01


def flag_rate_change(
    champion: tuple[int, int],
    challenger: tuple[int, int],
    *,
    expected_change: float,
    alpha: float,
    max_change: float,
) -> Check:
    """A classifier's share of positive decisions moved, relative to the champion's, other than
    as it moved on the gate's test split (``expected_change``, relative): the difference is
    significant (a two-sided z-test, each rate smoothed by half a decision so that a few
    decisions do not read as certainty) and the ratio is beyond ``1 + max_change`` of the
    expected one either way. ``champion``/``challenger``: (flagged, scored)."""
    (a, n), (b, m) = champion, challenger
    if not n or not m:
        return Check("flag_rate_change", NOT_ENOUGH, f"no decisions to compare ({n} and {m})")
    p, r = a / n, b / m
    # A challenger that flagged nothing on the test split (-100%) is expected to flag next to
    # nothing live: a ratio needs a denominator, so at least a hundredth of the champion's.
    expected = max(1.0 + expected_change, _LEAST_EXPECTED)
    ps, rs = (a + 0.5) / (n + 1), (b + 0.5) / (m + 1)
    z = (r - expected * p) / math.sqrt(rs * (1 - rs) / m + expected**2 * ps * (1 - ps) / n)
    ratio = rs / (expected * ps)
    detail = {
        "champion_rate": round(p, 4),
        "challenger_rate": round(r, 4),
        "expected_change": round(expected_change, 4),
        "z": round(z, 3),
    }
    if abs(z) > _z(alpha / 2) and max(ratio, 1 / ratio) > 1 + max_change:
        reason = (
            f"flag rate {r:.2%} against the champion's {p:.2%} ({b} of {m} and {a} of {n}), "
            f"where the test split showed {expected_change:+.0%}: {ratio:.2f}x the expected, "
            f"beyond {1 + max_change:.2f}x either way (significant at {alpha:.2%})"
        )
        return Check("flag_rate_change", FAILED, reason, detail)
    return Check("flag_rate_change", PASSED, detail=detail)


def mean_change(
    champion: Sequence[float],
    challenger: Sequence[float],
    *,
    expected_shift: float,
    alpha: float,
    max_change: float,
) -> Check:
    """A regressor's mean prediction moved, relative to the champion's, other than as it moved
    on the gate's test split (``expected_shift``, decision 37): the difference is significant
    (a two-sided z-test on the means) and more than ``max_change`` apart."""
    n, m = len(champion), len(challenger)
    if n < 2 or m < 2:
        return Check("mean_change", NOT_ENOUGH, f"too few predictions ({n} and {m})")
    before, after = float(np.mean(champion)), float(np.mean(challenger))
    if not before:
        return Check("mean_change", NOT_ENOUGH, "the champion's mean prediction is 0")
    shift = (after - before) / abs(before)
    se = math.sqrt(np.var(champion, ddof=1) / n + np.var(challenger, ddof=1) / m) / abs(before)
    gap = shift - expected_shift
    z = gap / se if se else (math.inf if gap else 0.0)
    detail = {"shift": round(shift, 4), "expected_shift": round(expected_shift, 4)}
    if abs(z) > _z(alpha / 2) and abs(gap) > max_change:
        reason = (
            f"mean prediction {after:.3f} differs from the champion's {before:.3f} by "
            f"{shift:+.0%}, where the test split showed {expected_shift:+.0%}: more than "
            f"{max_change:.0%} apart (significant at {alpha:.2%})"
        )
        return Check("mean_change", FAILED, reason, detail)
    return Check("mean_change", PASSED, detail=detail)
