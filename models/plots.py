"""PNG plots for the UI and the model card, drawn without pyplot (no global state, no display)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.evaluate import EvaluationReport
from models.tasks import BINARY
from models.tasks import of as task_of


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """Inline image for Dagster's MetadataValue.md or a markdown file."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def loss_curves_png(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> bytes:
    """Train and validation loss per epoch, one colour per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], color=color, label=f"{name} train")
        if history and "val_loss" in history[0]:
            ax.plot(
                epochs,
                [h["val_loss"] for h in history],
                color=color,
                linestyle="--",
                label=f"{name} validation",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def calibration_png(reports: Mapping[str, EvaluationReport]) -> bytes:
    """Reliability diagram: a classifier's observed positive rate against its mean predicted
    probability, or a regressor's mean actual against mean predicted value per decile."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    binary = next(iter(reports.values())).task == BINARY if reports else True
    points = [
        v for r in reports.values() for v in (*r.calibration.prob_pred, *r.calibration.prob_true)
    ]
    lo, hi = (0.0, 1.0) if binary or not points else (min(points), max(points))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", label="perfect")
    for i, (name, r) in enumerate(reports.items()):
        ece = r.calibration.ece
        ax.plot(
            r.calibration.prob_pred,
            r.calibration.prob_true,
            marker="o",
            color=f"C{i}",
            label=f"{name} ({'ECE' if binary else 'mean gap'} {ece:.3f})",
        )
    ax.set_xlabel("mean predicted probability" if binary else "mean prediction (decile)")
    ax.set_ylabel("observed positive rate" if binary else "mean actual")
    ax.set_title("Calibration")
    if binary:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def pr_curve_png(reports: Mapping[str, EvaluationReport]) -> bytes:
    """Precision-recall curves with PR-AUC in the legend."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for i, (name, r) in enumerate(reports.items()):
        ax.step(
            r.pr_curve["recall"],
            r.pr_curve["precision"],
            where="post",
            color=f"C{i}",
            label=f"{name} (PR-AUC {r.metrics['pr_auc']:.3f})",
        )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def slice_metric_png(
    reports: Mapping[str, EvaluationReport],
    column: str,
    metric: str | None = None,
    max_values: int = 15,
) -> bytes:
    """Grouped bars of one metric (the task's primary one by default) per slice value
    (largest slices first), support in labels."""
    names = list(reports)
    first = reports[names[0]]
    metric = metric or task_of(first.task).primary_metric
    slices = [s for s in first.slices if s.column == column][:max_values]
    fig = Figure(figsize=(max(6, 0.6 * len(slices) * len(names)), 4))
    ax = fig.add_subplot()
    x = np.arange(len(slices))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = []
        for s in slices:
            other = reports[name].slice(column, s.value)
            v = other.metrics.get(metric, math.nan) if other else math.nan
            values.append(0.0 if v is None or math.isnan(v) else v)
        ax.bar(x + i * width - 0.4 + width / 2, values, width, color=f"C{i}", label=name)
    ax.set_xticks(x, [f"{s.value}\n(n={s.support})" for s in slices], fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {column}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _png(fig)


def drift_png(psi_by_feature: Mapping[str, float], threshold: float) -> bytes:
    """Horizontal bars of PSI per feature, worst first, with the retraining threshold."""
    items = sorted(psi_by_feature.items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(6, max(2.5, 0.28 * len(items) + 1)))
    ax = fig.add_subplot()
    colors = ["C3" if v >= threshold else "C0" for _, v in items]
    ax.barh([k for k, _ in items], [v for _, v in items], color=colors)
    ax.axvline(threshold, color="grey", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("PSI (serving vs training)")
    ax.set_title("Feature drift")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3, axis="x")
    ax.legend()
    return _png(fig)


def live_quality_png(
    points: Sequence[Mapping[str, object]],
    promotions: Sequence[tuple[datetime, str]] = (),
    offline: float | None = None,
    *,
    task: str = BINARY,
) -> bytes:
    """The live metric over time: the task's primary metric (a classifier's PR-AUC, a
    regressor's MAE) realised and estimated per point (``at`` on the x axis), each promotion
    of the registry a vertical line, the offline evaluation a level."""
    kind = task_of(task)
    m = kind.primary_metric
    method = kind.estimate_name
    series = (
        (m, "realised (label-mature cohort)", "-", "o"),
        (f"estimated_{m}", f"estimated, same cohort ({method})", "--", "x"),
        (f"estimated_{m}_unlabelled", f"estimated, newest unlabelled ({method})", ":", "^"),
    )
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    times = [p["at"] for p in points]
    for i, (key, label, style, marker) in enumerate(series):
        values = [_finite_or_nan(p.get(key)) for p in points]
        if any(not math.isnan(v) for v in values):
            ax.plot(times, values, linestyle=style, marker=marker, color=f"C{i}", label=label)
    for at, version in promotions:
        ax.axvline(at, color="grey", linewidth=1, alpha=0.7)
        ax.annotate(
            f"{version} promoted",
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
        )
    if offline is not None and math.isfinite(offline):
        ax.axhline(offline, color="C3", linewidth=1, linestyle="-.", label="offline (test split)")
    if kind.name == BINARY:
        ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("PR-AUC" if kind.name == BINARY else m.upper())
    ax.set_title("Live quality of the served model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.autofmt_xdate()
    return _png(fig)


def _finite_or_nan(value: object) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def figure_png(fig: Figure) -> bytes:
    """A figure drawn elsewhere (e.g. the backtest's) as PNG bytes, with this module's settings."""
    return _png(fig)
