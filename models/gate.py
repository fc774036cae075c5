"""The blocking champion/challenger gate: metric, slice and infrastructure checks.

Every check is recorded, passed or not, and every failure becomes a human-readable reason,
so a rejection can be shown and audited rather than just logged as "failed".
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from core.jsonutil import json_safe
from models.artifact import golden_check, load_model
from models.checksum import directory_size
from models.evaluate import EvaluationReport
from models.slice_compare import (
    NOT_ENOUGH_SUPPORT,
    PASSED,
    REGRESSED,
    SliceComparison,
    compare_slices,
    same_rows,
)
from models.spec import GatePolicy
from models.tasks import of as task_of

__all__ = ["GatePolicy", "InfraReport", "GateDecision", "infra_validate", "validate_challenger"]

REJECTED = "rejected"
SLICES_COMPARED = "slices_compared"


@dataclass(frozen=True)
class InfraReport:
    """Infrastructure facts about a saved model, measured on CPU."""

    reloaded: bool
    identical_outputs: bool
    max_abs_diff: float | None
    size_bytes: int
    latency_ms: dict[str, dict[str, float]]
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass(frozen=True)
class GateDecision:
    """passed: may the version be registered as a challenger and promoted (no check blocks).
    verdict: "passed", "rejected", or "not enough support" (no slice could be compared; it
    blocks or not by ``GatePolicy.slices_unsupported`` once a champion serves, and is never
    reported as passed).
    reasons: every blocking check's explanation; warnings: what was not verified."""

    passed: bool
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(self, "verdict", PASSED if self.passed else REJECTED)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "passed": self.passed,
                "verdict": self.verdict,
                "reasons": self.reasons,
                "warnings": self.warnings,
                "checks": self.checks,
            }
        )

    def slice_outcomes(self) -> dict[str, int]:
        """How many slices passed, regressed, or had not enough support."""
        outcomes = [c["outcome"] for c in self.checks if c["check"].startswith("slice:")]
        return {name: outcomes.count(name) for name in (PASSED, REGRESSED, NOT_ENOUGH_SUPPORT)}

    def to_markdown(self) -> str:
        verdict = self.verdict.upper()
        if self.verdict == NOT_ENOUGH_SUPPORT:
            verdict += " (promotable, unverified)" if self.passed else " (blocked)"
        lines = [f"**Validation gate: {verdict}**", ""]
        if self.reasons:
            lines += ["Reasons:", *[f"- {r}" for r in self.reasons], ""]
        if self.warnings:
            lines += ["Not verified:", *[f"- {w}" for w in self.warnings], ""]
        lines += ["| check | result | detail |", "|---|---|---|"]
        for c in self.checks:
            mark = c.get("outcome") or ("passed" if c["passed"] else "failed")
            lines.append(
                f"| {c['check']} | {mark if c['passed'] else mark.upper()} | {c['detail']} |"
            )
        return "\n".join(lines) + "\n"


def validate_challenger(
    challenger: EvaluationReport,
    baseline: EvaluationReport,
    champion: EvaluationReport | None,
    infra: InfraReport,
    policy: GatePolicy,
) -> GateDecision:
    """Passes only if the challenger beats baseline and champion, regresses no slice
    significantly, and is servable; with no slice comparable the verdict is "not enough
    support", which blocks a replacement of the champion unless ``policy.slices_unsupported``
    is "warn" (a first model, with no champion, is promotable with that verdict)."""
    checks: list[dict[str, Any]] = []

    def add(name: str, passed: bool | None, detail: str, outcome: str = "", **values: Any) -> None:
        """passed None: neither passed nor failed (not enough support), so it blocks nothing."""
        flag = None if passed is None else bool(passed)
        outcome = outcome or (PASSED if flag else "failed")
        checks.append(
            {"check": name, "passed": flag, "outcome": outcome, "detail": detail, **values}
        )

    task = task_of(challenger.task)
    metric = policy.primary_metric or task.primary_metric
    for name, other in (("baseline", baseline), ("champion", champion)):
        if other is None:
            continue
        same = (
            other.split == challenger.split
            and other.support == challenger.support
            and other.metrics.get("positives") == challenger.metrics.get("positives")
        )
        add(
            f"same_data_as_{name}",
            same,
            f"{name} evaluated on {other.split} ({other.support} rows) like the challenger"
            if same
            else f"{name} was evaluated on different data ({other.split}, {other.support} rows) "
            f"than the challenger ({challenger.split}, {challenger.support} rows)",
        )

    # A classifier's metric needs positives, a regressor's rows (decision 16).
    counted, needed = (
        ("positives", policy.min_test_positives)
        if task.count_metric == "positives"
        else ("rows", policy.min_test_rows)
    )
    count = int(challenger.metrics.get(task.count_metric, 0))
    enough = count >= needed
    add(
        f"enough_{counted}",
        enough,
        f"{count} {counted} in {challenger.split}"
        + (
            f" (>= {needed})"
            if enough
            else f", fewer than {needed}: too few to tell models apart; "
            "retrain once more labels have arrived"
        ),
        **{counted: count},
    )
    value = challenger.metrics.get(metric, math.nan)
    if value is None or math.isnan(value):
        add(
            "primary_metric_defined",
            False,
            f"challenger {metric} is undefined on {challenger.split}",
        )
    for name, other, margin in (
        ("baseline", baseline, policy.min_gain_over_baseline),
        ("champion", champion, policy.min_gain_over_champion),
    ):
        if other is None:
            add(f"beats_{name}", True, f"no {name}: nothing to beat", margin=margin)
            continue
        ref = other.metrics.get(metric, math.nan)
        gain = task.gain(metric, value, ref)
        ok = not math.isnan(gain) and gain > 0 and gain >= margin
        verb = "beats" if ok else "does not beat"
        add(
            f"beats_{name}",
            ok,
            f"challenger {metric} {value:.4f} {verb} {name} {ref:.4f} "
            f"(gain {gain:+.4f}, required > 0 and >= {margin:.4f})",
            challenger_value=value,
            reference_value=ref,
            gain=gain,
            margin=margin,
        )

    # Slices are compared with the model in production. With none yet (a first model, judged
    # against the baseline, which serves nobody), "not enough support" is recorded but never
    # blocks: blocking would leave nothing serving until labels pile up (decision 54).
    slice_policy = policy if champion else replace(policy, slices_unsupported="warn")
    _slice_checks(
        challenger, champion or baseline, "champion" if champion else "baseline", slice_policy, add
    )
    _infra_checks(infra, policy, add)
    return _decision(checks)


def _decision(checks: list[dict[str, Any]]) -> GateDecision:
    blocking = [c for c in checks if c["passed"] is False]
    unverified = [c for c in checks if c["check"] == SLICES_COMPARED and c["outcome"] != PASSED]
    if any(c["outcome"] != NOT_ENOUGH_SUPPORT for c in blocking):
        verdict = REJECTED
    else:
        verdict = NOT_ENOUGH_SUPPORT if unverified else PASSED
    return GateDecision(
        passed=not blocking,
        reasons=[c["detail"] for c in blocking],
        checks=checks,
        verdict=verdict,
        warnings=[
            c["detail"]
            for c in checks
            if not c["check"].startswith("slice:") and (c["passed"] is None or c.get("unverified"))
        ],
    )


def _slice_checks(
    challenger: EvaluationReport,
    reference: EvaluationReport,
    reference_name: str,
    policy: GatePolicy,
    add: Any,
) -> None:
    """One check per slice (passed, regressed, or not enough support), then one that says
    whether any slice could be compared at all."""
    if not challenger.slices:
        return
    task = task_of(challenger.task)
    metric = policy.slice_metric or policy.primary_metric or task.primary_metric
    if not same_rows(challenger, reference):
        add(
            SLICES_COMPARED,
            False,
            f"slices not compared: the challenger and the {reference_name} hold no "
            "row-level scores of the same rows (a report read back from JSON holds none)",
        )
        return
    compared = compare_slices(challenger, reference, policy, metric)
    for c in compared:
        add(
            f"slice:{c.column}={c.value}",
            {PASSED: True, REGRESSED: False}.get(c.outcome),
            _slice_detail(c, metric, reference_name, policy),
            outcome=c.outcome,
            **{k: v for k, v in asdict(c).items() if k not in ("column", "value", "outcome")},
        )
    lacking = [f"{c.column}={c.value}" for c in compared if c.outcome == NOT_ENOUGH_SUPPORT]
    n_compared = len(compared) - len(lacking)
    listed = ", ".join(lacking[:12]) + (
        f" and {len(lacking) - 12} more" if len(lacking) > 12 else ""
    )
    if n_compared == 0:
        add(
            SLICES_COMPARED,
            None if policy.slices_unsupported == "warn" else False,
            f"not enough support: none of {len(compared)} slices could be compared with the "
            f"{reference_name} ({listed}); slice regressions are unverified"
            + (
                "; retrain once more labels have arrived, or promote with --force and a reason"
                if policy.slices_unsupported == "block"
                else ""
            ),
            outcome=NOT_ENOUGH_SUPPORT,
        )
        return
    add(
        SLICES_COMPARED,
        True,
        f"{n_compared} of {len(compared)} slices compared with the {reference_name} at "
        f"family-wise confidence {1 - policy.slice_alpha:.0%}"
        + (f"; not enough support, unverified: {listed}" if lacking else ""),
        unverified=bool(lacking),
        compared=n_compared,
        not_enough_support=len(lacking),
    )


def _slice_detail(c: SliceComparison, metric: str, reference_name: str, policy: GatePolicy) -> str:
    head = f"slice {c.column}={c.value} (support {c.support}" + (
        f", {c.positives} positives): " if c.positives is not None else "): "
    )
    values = f"{metric} {c.challenger_value:.4f} vs {reference_name} {c.reference_value:.4f}"
    if c.outcome == NOT_ENOUGH_SUPPORT:
        return f"{head}not enough support ({c.why}); {values}"
    bound = f"gain {c.gain:+.4f}, upper bound {c.upper_bound:+.4f} at {c.confidence:.2%} one-sided"
    if c.outcome == REGRESSED:
        return (
            f"{head}{values}: regresses by {-c.gain:.4f}, significantly ({bound}, below "
            f"-{policy.slice_tolerance:.4f})"
        )
    return f"{head}{values}: no significant regression ({bound}, >= -{policy.slice_tolerance:.4f})"


def _infra_checks(infra: InfraReport, policy: GatePolicy, add: Any) -> None:
    add(
        "reloads",
        infra.reloaded,
        "serialized model reloads (weights_only) and verifies its checksums"
        if infra.reloaded
        else "serialized model does not reload: " + "; ".join(infra.errors),
    )
    add(
        "identical_outputs",
        infra.identical_outputs,
        "reloaded model reproduces the trained model's outputs exactly"
        if infra.identical_outputs
        else f"reloaded model's outputs differ (max |diff| {infra.max_abs_diff})",
    )
    size_ok = infra.size_bytes <= policy.max_model_bytes
    add(
        "model_size",
        size_ok,
        f"artifact is {infra.size_bytes} bytes "
        f"({'within' if size_ok else 'over'} the limit of {policy.max_model_bytes})",
        size_bytes=infra.size_bytes,
    )
    for batch, budget in (
        ("1", policy.max_latency_ms_batch1),
        ("64", policy.max_latency_ms_batch64),
    ):
        measured = infra.latency_ms.get(batch, {}).get(policy.latency_percentile, math.nan)
        ok = not math.isnan(measured) and measured <= budget
        add(
            f"latency_batch{batch}",
            ok,
            f"CPU latency {policy.latency_percentile} for a batch of {batch}: {measured:.2f} ms "
            f"({'within' if ok else 'over'} the budget of {budget:.2f} ms)",
            latency_ms=measured,
            budget_ms=budget,
        )


def infra_validate(
    model_dir: str | Path,
    sample: pl.DataFrame | Sequence[Mapping[str, Any]],
    policy: GatePolicy,
) -> InfraReport:
    """Reload from disk, replay golden rows, check frame/record parity, size, CPU latency."""
    errors: list[str] = []
    size = directory_size(model_dir) if Path(model_dir).is_dir() else 0
    try:
        module, preprocessor = load_model(model_dir)
        identical, diff = golden_check(model_dir)
    except Exception as exc:  # any load failure is a rejection reason, recorded verbatim
        return InfraReport(False, False, None, size, {}, (f"{type(exc).__name__}: {exc}",))
    frame = sample if isinstance(sample, pl.DataFrame) else preprocessor.records_to_frame(sample)
    records = frame.select(preprocessor.spec.columns).to_dicts()
    if not records:
        raise ValueError("infra_validate needs at least one sample row")
    from_frame = _forward(module, preprocessor, frame)
    from_records = _forward(module, preprocessor, records)
    if not torch.equal(from_frame, from_records):
        identical = False
        diff = max(diff, float((from_frame - from_records).abs().max()))
        errors.append("a Polars frame and the same rows as dicts give different outputs")
    latency = {
        str(n): _latency(module, preprocessor, (records * (n // len(records) + 1))[:n], policy)
        for n in (1, 64)
    }
    return InfraReport(True, identical, diff, size, latency, tuple(errors))


@torch.inference_mode()
def _forward(module: torch.nn.Module, preprocessor: Any, data: Any) -> torch.Tensor:
    batch = preprocessor.transform(data)
    return torch.sigmoid(module(batch.numeric, batch.categorical))


def _latency(
    module: torch.nn.Module, preprocessor: Any, records: list[dict[str, Any]], policy: GatePolicy
) -> dict[str, float]:
    """End-to-end serving cost (dicts -> tensors -> probabilities), in milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(policy.latency_threads)
    try:
        for _ in range(policy.latency_warmup):
            _forward(module, preprocessor, records)
        times = []
        for _ in range(policy.latency_repeats):
            t0 = time.perf_counter()
            _forward(module, preprocessor, records)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(before)
    arr = np.asarray(times)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "mean": float(arr.mean()),
    }
