"""Training entry point: a training_set frame in, a fitted model and its preprocessor out.

With `TrainConfig.recency_half_life_days` set, train rows carry loss weights that halve with
each half-life of age (mean 1 over the train split); validation and test stay unweighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from models.loop import FitResult, TensorData, fit, predict_logits, select_device
from models.network import TabularNet, build_network, count_parameters
from models.preprocess import Preprocessor, label_array
from models.spec import SPLITS, FeatureSpec, TrainConfig
from models.tasks import BINARY, Regression


@dataclass(frozen=True)
class TrainResult:
    """A trained model (on CPU, eval mode) with everything needed to save, evaluate and explain it."""

    model: TabularNet
    preprocessor: Preprocessor
    config: TrainConfig
    fit: FitResult
    pos_weight: float
    calibration: dict[str, float | str]
    data_window: dict[str, Any]
    kind: str
    weighting: dict[str, Any] = field(default_factory=lambda: {"method": "none"})

    @property
    def history(self) -> list[dict[str, float]]:
        return self.fit.history

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for the sidecar, the registry and the model card."""
        return {
            "kind": self.kind,
            "config": self.config.to_dict(),
            "history": self.fit.history,
            "best_epoch": self.fit.best_epoch,
            "best_val_loss": self.fit.best_val_loss,
            "stopped_early": self.fit.stopped_early,
            "epochs_run": len(self.fit.history),
            "train_device": self.fit.device,
            "train_seconds": round(self.fit.seconds, 3),
            "samples_per_s": round(self.fit.samples_per_s, 1),
            "pos_weight": self.pos_weight,
            "calibration": dict(self.calibration),
            "parameters": count_parameters(self.model),
            "data_window": self.data_window,
            "weighting": dict(self.weighting),
        }


def split_frame(frame: pl.DataFrame, split: str) -> pl.DataFrame:
    return frame.filter(pl.col("split") == split)


def data_window(frame: pl.DataFrame, label: str = "label", task: str = BINARY) -> dict[str, Any]:
    """Event-time span and row counts, overall and per split, with the positives of a
    classifier or the mean label of a regressor (for lineage and the card)."""

    def span(part: pl.DataFrame) -> dict[str, Any]:
        ts = part.get_column("event_timestamp")
        out: dict[str, Any] = {
            "start": ts.min().isoformat() if part.height else None,
            "end": ts.max().isoformat() if part.height else None,
            "rows": part.height,
        }
        column = part.get_column(label)
        if task == BINARY:
            out["positives"] = int(column.cast(pl.Int64).sum()) if part.height else 0
        else:
            out["mean_label"] = float(column.cast(pl.Float64).mean()) if part.height else None
        return out

    out = span(frame)
    out["splits"] = {s: span(split_frame(frame, s)) for s in SPLITS}
    return out


def tensor_data(
    preprocessor: Preprocessor,
    frame: pl.DataFrame,
    weight: torch.Tensor | None = None,
    standardise: tuple[float, float] | None = None,
) -> TensorData:
    """A split as tensors; ``standardise`` (mean, std) turns a regression target into z-scores."""
    batch = preprocessor.transform(frame)
    label = preprocessor.labels(frame)
    if standardise is not None:
        label = (label - standardise[0]) / standardise[1]
    return TensorData(batch.numeric, batch.categorical, label, weight)


def recency_weights(
    timestamps: pl.Series, half_life_days: float, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """0.5 ** (age_days / half_life_days) per row, age from the newest timestamp, mean 1.

    Normalised to mean 1 so the loss keeps its scale, and with it the learning rate's meaning.
    """
    if not half_life_days > 0:
        raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
    if timestamps.len() == 0:
        return torch.zeros(0, dtype=dtype)
    age_s = (timestamps.max() - timestamps).dt.total_microseconds().cast(pl.Float64) / 1e6
    raw = (
        torch.tensor(age_s.to_numpy(), dtype=torch.float64)
        .div(86400.0 * half_life_days)
        .neg()
        .exp2()
    )
    return (raw / raw.mean()).to(dtype)


def weighting_summary(weight: torch.Tensor | None, half_life_days: float | None) -> dict[str, Any]:
    """What the weights did: the half-life, the lightest row and the effective row count."""
    if weight is None or half_life_days is None:
        return {"method": "none"}
    w = weight.double()
    return {
        "method": "recency",
        "half_life_days": half_life_days,
        "min_weight": round(float(w.min()), 6),
        "max_weight": round(float(w.max()), 6),
        "effective_rows": round(float(w.sum() ** 2 / (w * w).sum()), 1),
        "rows": int(w.numel()),
    }


def train_model(
    frame: pl.DataFrame, spec: FeatureSpec, config: TrainConfig, *, kind: str = "network"
) -> TrainResult:
    """Fits preprocessing on the train split, trains with early stopping on validation, and
    fits the output to the task (``spec.task``, models.tasks).

    A classifier: class imbalance by `pos_weight = n_neg / n_pos` (capped) or focal loss.
    Weighting inflates probabilities, so the logits are Platt-scaled on the validation split
    afterwards (falling back to the exact prior correction -log(pos_weight)). A regressor
    learns the standardised target with the Huber loss; the model's output affine maps it back
    to the target's units.
    """
    missing = [c for c in ("split", "event_timestamp", spec.label) if c not in frame.columns]
    if missing:
        raise KeyError(f"training set is missing columns {missing}")
    train_df = split_frame(frame, "train")
    val_df = split_frame(frame, "validation")
    y_train = label_array(train_df, spec.label, spec.task)
    standardise = _check_labels(y_train, spec.task)
    preprocessor = Preprocessor.fit(train_df, spec, max_categories=config.max_categories)
    half_life = config.recency_half_life_days
    weight = (
        None
        if half_life is None
        else recency_weights(train_df.get_column("event_timestamp"), half_life)
    )
    train = tensor_data(preprocessor, train_df, weight, standardise)
    validation = (
        tensor_data(preprocessor, val_df, standardise=standardise) if val_df.height else None
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_network(
            preprocessor.n_numeric_inputs,
            preprocessor.cardinalities,
            hidden=config.hidden,
            dropout=config.dropout,
            embedding_dim=config.embedding_dim,
            max_embedding_dim=config.max_embedding_dim,
            numeric_clip=config.numeric_clip,
        )
    numeric64 = train.numeric.double()
    model.set_normalization(numeric64.mean(0).float(), numeric64.std(0, correction=0).float())
    device = select_device(config.device)
    if standardise is not None:
        pos_weight = 1.0
        result = fit(model, train, validation, config, device, loss_fn=Regression().huber)
        model.cpu().eval()
        mean, std = standardise
        calibration: dict[str, float | str] = {"method": "standardised", "scale": std, "bias": mean}
    else:
        n_pos = int(y_train.sum())
        pos_weight = (
            min((y_train.size - n_pos) / n_pos, config.max_pos_weight)
            if config.imbalance == "pos_weight"
            else 1.0
        )
        result = fit(model, train, validation, config, device, pos_weight=pos_weight)
        model.cpu().eval()
        prior_bias = -math.log(pos_weight) if config.imbalance == "pos_weight" else 0.0
        calibration = {"method": "prior", "scale": 1.0, "bias": prior_bias}
        if config.calibrate and validation is not None:
            fitted = platt_scale(model, validation)
            if fitted is not None:
                calibration = {"method": "platt", "scale": fitted[0], "bias": fitted[1]}
    model.set_calibration(float(calibration["scale"]), float(calibration["bias"]))
    return TrainResult(
        model=model,
        preprocessor=preprocessor,
        config=config,
        fit=result,
        pos_weight=float(pos_weight),
        calibration=calibration,
        data_window=data_window(frame, spec.label, spec.task),
        kind=kind,
        weighting=weighting_summary(weight, half_life),
    )


def _check_labels(y: np.ndarray, task: str) -> tuple[float, float] | None:
    """Refuses a train split the task cannot learn from; a regressor's (mean, std)."""
    if task == BINARY:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            raise ValueError(
                f"the train split needs both classes, got {n_pos} positives and "
                f"{y.size - n_pos} negatives"
            )
        return None
    std = float(np.std(y))
    if y.size < 2 or not std > 0:
        raise ValueError(f"the train split's label is constant ({y.size} rows): nothing to learn")
    return float(np.mean(y)), std


def platt_scale(model: TabularNet, validation: TensorData) -> tuple[float, float] | None:
    """Fits p = sigmoid(a * logit + b) on validation; None when it cannot be trusted."""
    y = validation.label.double()
    if y.numel() == 0 or y.min() == y.max():
        return None
    model.set_calibration(1.0, 0.0)
    z = predict_logits(model, validation.numeric, validation.categorical).double().cpu()
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a * z + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    scale, bias = float(a.detach()), float(b.detach())
    if not (math.isfinite(scale) and math.isfinite(bias) and scale > 0):
        return None
    return scale, bias


def baseline_config(config: TrainConfig) -> TrainConfig:
    """The same run as a logistic (or linear) regression: no hidden layers, one weight per
    category.

    A convex model tolerates (and needs, to converge in few epochs) a larger step size.
    """
    return replace(config, hidden=(), embedding_dim=1, dropout=0.0, lr=max(config.lr, 0.02))


def train_baseline(frame: pl.DataFrame, spec: FeatureSpec, config: TrainConfig) -> TrainResult:
    """Logistic (a classifier's) or linear (a regressor's) regression on the same
    preprocessing, split and imbalance handling."""
    return train_model(frame, spec, baseline_config(config), kind="baseline")
