"""The blocking champion/challenger gate: metric, slice and infrastructure checks.

Every check is recorded, passed or not, and every failure becomes a human-readable reason,
so a rejection can be shown and audited rather than just logged as "failed".
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from core.jsonutil import json_safe
from models.artifact import golden_check, load_model
from models.checksum import directory_size
from models.evaluate import EvaluationReport
from models.spec import GatePolicy
from models.tasks import of as task_of

__all__ = ["GatePolicy", "InfraReport", "GateDecision", "infra_validate", "validate_challenger"]


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
    """passed only if every check passed; reasons lists every failed check's explanation."""

    passed: bool
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"passed": self.passed, "reasons": self.reasons, "checks": self.checks})

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "REJECTED"
        lines = [f"**Validation gate: {verdict}**", ""]
        if self.reasons:
            lines += ["Reasons:", *[f"- {r}" for r in self.reasons], ""]
        lines += ["| check | result | detail |", "|---|---|---|"]
        for c in self.checks:
            mark = "pass" if c["passed"] else "FAIL"
            lines.append(f"| {c['check']} | {mark} | {c['detail']} |")
        return "\n".join(lines) + "\n"


def validate_challenger(
    challenger: EvaluationReport,
    baseline: EvaluationReport,
    champion: EvaluationReport | None,
    infra: InfraReport,
    policy: GatePolicy,
) -> GateDecision:
    """Passes only if the challenger beats baseline and champion, regresses no slice, and is servable."""
    checks: list[dict[str, Any]] = []

    def add(name: str, passed: bool, detail: str, **values: Any) -> None:
        checks.append({"check": name, "passed": bool(passed), "detail": detail, **values})

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

    _slice_checks(
        challenger, champion or baseline, "champion" if champion else "baseline", policy, add
    )
    _infra_checks(infra, policy, add)
    reasons = [c["detail"] for c in checks if not c["passed"]]
    return GateDecision(passed=not reasons, reasons=reasons, checks=checks)


def _slice_checks(
    challenger: EvaluationReport,
    reference: EvaluationReport,
    reference_name: str,
    policy: GatePolicy,
    add: Any,
) -> None:
    task = task_of(challenger.task)
    metric = policy.slice_metric or policy.primary_metric or task.primary_metric
    binary = task.count_metric == "positives"
    evaluated = 0
    for s in challenger.slices:
        if s.support < policy.slice_min_support or (
            binary and s.positives < policy.slice_min_positives
        ):
            continue
        ref = reference.slice(s.column, s.value)
        if ref is None:
            continue
        evaluated += 1
        mine = s.metrics.get(metric, math.nan)
        theirs = ref.metrics.get(metric, math.nan)
        drop = -task.gain(metric, mine, theirs)
        ok = not math.isnan(drop) and drop <= policy.slice_tolerance
        add(
            f"slice:{s.column}={s.value}",
            ok,
            f"slice {s.column}={s.value} (support {s.support}"
            + (f", {s.positives} positives): " if binary else "): ")
            + f"{metric} {mine:.4f} vs {reference_name} {theirs:.4f} "
            + (
                f"within tolerance {policy.slice_tolerance:.4f}"
                if ok
                else f"regresses by {drop:.4f}, more than the tolerance {policy.slice_tolerance:.4f}"
            ),
            support=s.support,
            challenger_value=mine,
            reference_value=theirs,
            drop=drop,
        )
    if evaluated == 0:
        add(
            "slices_evaluated",
            True,
            f"no slice reached support {policy.slice_min_support}"
            + (f" with {policy.slice_min_positives} positives" if binary else "")
            + "; no slice comparison made",
        )


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
