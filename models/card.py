"""Markdown model card stored with each version: what it was trained on, how well it does, where not to trust it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from models.evaluate import EvaluationReport, evaluation_markdown
from models.gate import GateDecision
from models.spec import FeatureSpec
from models.tasks import BINARY

_COMMON_LIMITATIONS = (
    "Trained on historical labelled data; labels arrive late, so the most recent patterns "
    "are under-represented in the training window.",
    "Slices with small support have wide uncertainty; their metrics are indicative only.",
    "Categories unseen in training share one 'unknown' embedding; expect weaker scores for "
    "them until the next retrain.",
)
DEFAULT_LIMITATIONS = (
    *_COMMON_LIMITATIONS,
    "Probabilities are calibrated on the validation split; calibration drifts as the positive "
    "rate changes, so re-check the threshold after a base-rate shift.",
)
REGRESSION_LIMITATIONS = (
    *_COMMON_LIMITATIONS,
    "Predictions regress towards the training mean: rare extreme values are under-predicted, "
    "and a shift of the target's level shows as bias until the next retrain.",
)


def model_card(
    *,
    name: str,
    version: str | None,
    spec: FeatureSpec,
    training: Mapping[str, Any],
    reports: Mapping[str, EvaluationReport],
    decision: GateDecision | None = None,
    lineage: Mapping[str, Any] | None = None,
    limitations: Sequence[str] | None = None,
    intended_use: str = "",
) -> str:
    """Renders the card; `training` is TrainResult.summary(), `reports` challenger first."""
    window = training.get("data_window", {})
    binary = spec.task == BINARY
    if limitations is None:
        limitations = DEFAULT_LIMITATIONS if binary else REGRESSION_LIMITATIONS

    def counts(part: Mapping[str, Any]) -> str:
        if binary:
            return f"{part.get('rows')} rows, {part.get('positives')} positives"
        return f"{part.get('rows')} rows, mean label {_num(part.get('mean_label'))}"

    lines = [
        f"# Model card: {name}" + (f" {version}" if version else ""),
        "",
        "## Intended use",
        "",
        (intended_use.strip() or "Scores requests in real time.")
        + (
            " Scores at or above the decision threshold get the positive decision."
            if binary
            else " Predicts a value in the label's units; no decision is taken."
        ),
        "",
        "## Data window",
        "",
        f"- Events from {window.get('start')} to {window.get('end')} ({counts(window)})",
    ]
    for split, part in (window.get("splits") or {}).items():
        lines.append(f"- {split}: {part.get('start')} to {part.get('end')} ({counts(part)})")
    if lineage:
        lines += ["", "## Lineage", ""]
        lines += [f"- {k}: {_short(v)}" for k, v in lineage.items() if k != "artifacts"]
    lines += [
        "",
        "## Features",
        "",
        f"- Numeric ({len(spec.numeric)}): " + ", ".join(spec.numeric),
        f"- Categorical ({len(spec.categorical)}): " + ", ".join(spec.categorical),
        "- Nulls in numeric features are imputed with the training median and flagged by a "
        "missing indicator; unknown categories map to an out-of-vocabulary embedding.",
        "",
        "## Training",
        "",
    ]
    config = training.get("config", {})
    lines += [
        f"- Kind: {training.get('kind')}; hidden layers {config.get('hidden')}, "
        f"lr {config.get('lr')}, batch {config.get('batch_size')}, seed {config.get('seed')}",
        f"- Epochs run: {training.get('epochs_run')} (best {training.get('best_epoch')}, "
        f"early stop: {training.get('stopped_early')}) on {training.get('train_device')}",
        (
            f"- Imbalance: {config.get('imbalance')} (pos_weight "
            f"{_num(training.get('pos_weight'))}); "
            if binary
            else "- Loss: Huber on the standardised label; "
        )
        + ("calibration" if binary else "output")
        + f": {(training.get('calibration') or {}).get('method')}",
        "",
        "## Metrics",
        "",
        evaluation_markdown(reports).rstrip(),
    ]
    if decision is not None:
        lines += ["", "## Validation gate", "", decision.to_markdown().rstrip()]
    lines += ["", "## Limitations", "", *[f"- {item}" for item in limitations], ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _short(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) > 10:
        return ", ".join(map(str, value[:10])) + f", ... ({len(value)} in all)"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)
