"""The training loop over preloaded, device-resident tensors (torch only, no data frames).

An epoch is one random permutation of the device tensors, sliced into large batches: no
DataLoader, no per-row Python. Kept free of Polars so the benchmark runs it as-is on a GPU machine.
Optional per-row loss weights (recency weighting) travel with the rows; without them the loop
does exactly the work it did before weights existed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.spec import MISSING_INDEX, OOV_INDEX, TrainConfig


class LossFn(Protocol):
    """Mean loss of a batch; ``weight`` (per row, mean about 1) scales each row's term."""

    def __call__(
        self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN or inf: the run must fail, not save a broken model."""


@dataclass(frozen=True)
class TensorData:
    """One split as tensors: numeric [n, f] float32, categorical [n, c] int64, label [n] float32,
    and optionally weight [n] float32, each row's weight in the training loss."""

    numeric: torch.Tensor
    categorical: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.numeric.shape[0]
        if self.categorical.shape[0] != n or self.label.shape[0] != n:
            raise ValueError("numeric, categorical and label must have the same number of rows")
        if self.weight is not None and tuple(self.weight.shape) != (n,):
            raise ValueError(f"weight must have shape ({n},), got {tuple(self.weight.shape)}")

    def __len__(self) -> int:
        return int(self.numeric.shape[0])

    def to(self, device: torch.device) -> TensorData:
        return TensorData(
            self.numeric.to(device, non_blocking=True),
            self.categorical.to(device, non_blocking=True),
            self.label.to(device, non_blocking=True),
            None if self.weight is None else self.weight.to(device, non_blocking=True),
        )


@dataclass(frozen=True)
class FitResult:
    """What the loop did: per-epoch losses, which epoch's weights were kept, and how fast."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float | None
    stopped_early: bool
    seconds: float
    samples_seen: int
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples_seen / self.seconds if self.seconds > 0 else float("nan")


def select_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), CPU otherwise."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
        return torch.device("cuda")
    if preference != "auto":
        raise ValueError(f"unknown device preference {preference!r}")
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA only; CPU runs in float32."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (CPU and CUDA): one launch per step instead of one per tensor."""
    return torch.optim.AdamW(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )


def make_loss(config: TrainConfig, pos_weight: float, device: torch.device) -> LossFn:
    """Imbalance handling: positive-class weight, focal loss, or plain BCE; each takes row weights."""
    positive = torch.tensor(pos_weight, dtype=torch.float32, device=device)
    if config.imbalance == "pos_weight":

        def weighted_bce(
            logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
        ) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits, y, weight=weight, pos_weight=positive)

        return weighted_bce
    if config.imbalance == "focal":
        gamma = config.focal_gamma

        def focal(
            logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
        ) -> torch.Tensor:
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            p_t = torch.exp(-bce)
            terms = (1.0 - p_t) ** gamma * bce
            return (terms if weight is None else terms * weight).mean()

        return focal

    def bce(
        logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, y, weight=weight)

    return bce


@torch.inference_mode()
def predict_logits(
    module: nn.Module,
    numeric: torch.Tensor,
    categorical: torch.Tensor,
    batch_size: int = 65536,
) -> torch.Tensor:
    """Logits in eval mode, in large chunks, on whatever device the tensors live on."""
    module.eval()
    device = numeric.device
    out = []
    for s in range(0, numeric.shape[0], batch_size):
        with autocast_for(device):
            logits = module(numeric[s : s + batch_size], categorical[s : s + batch_size])
        out.append(logits.float())
    return torch.cat(out) if out else torch.zeros(0, device=device)


@torch.inference_mode()
def mean_loss(
    module: nn.Module, data: TensorData, loss_fn: LossFn, batch_size: int = 65536
) -> float:
    """Mean loss per row over a split (validation loss for early stopping); row weights unused."""
    module.eval()
    device = data.numeric.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    for s in range(0, len(data), batch_size):
        with autocast_for(device):
            logits = module(data.numeric[s : s + batch_size], data.categorical[s : s + batch_size])
        y = data.label[s : s + batch_size]
        total += loss_fn(logits.float(), y).double() * y.shape[0]
    return float(total.item() / max(len(data), 1))


def fit(
    module: nn.Module,
    train: TensorData,
    validation: TensorData | None,
    config: TrainConfig,
    device: torch.device,
    pos_weight: float = 1.0,
    loss_fn: LossFn | None = None,
) -> FitResult:
    """Trains in place; with a validation split, early-stops and keeps the best epoch's weights.
    ``loss_fn`` (a regression's) replaces the classifier's loss built from ``config``.

    Seeded (permutations, OOV masking and dropout draw from generators seeded by
    `config.seed`), so the same seed on the same device and thread count gives the same
    weights. A NaN/inf training or validation loss raises NonFiniteLossError.
    """
    if len(train) == 0:
        raise ValueError("the training split is empty")
    module.to(device)
    train = train.to(device)
    validation = validation.to(device) if validation is not None and len(validation) else None
    loss_fn = loss_fn or make_loss(config, pos_weight, device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        optimizer = make_optimizer(module, config)
        return _run_epochs(module, train, validation, config, device, loss_fn, optimizer, generator)


def _run_epochs(
    module: nn.Module,
    train: TensorData,
    validation: TensorData | None,
    config: TrainConfig,
    device: torch.device,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> FitResult:
    n = len(train)
    bs = config.batch_size
    history: list[dict[str, float]] = []
    best_loss = math.inf
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    stopped_early = False
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        module.train()
        # One gather per epoch, then contiguous slices: cheaper than gathering every batch.
        perm = torch.randperm(n, device=device, generator=generator)
        numeric, categorical, label = (
            train.numeric[perm],
            train.categorical[perm],
            train.label[perm],
        )
        weight = None if train.weight is None else train.weight[perm]
        if config.oov_rate > 0 and categorical.shape[1] > 0:
            mask = (
                torch.rand(categorical.shape, device=device, generator=generator) < config.oov_rate
            )
            categorical.masked_fill_(mask & (categorical != MISSING_INDEX), OOV_INDEX)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for s in range(0, n, bs):
            with autocast_for(device):
                logits = module(numeric[s : s + bs], categorical[s : s + bs])
            y = label[s : s + bs]
            loss = loss_fn(logits.float(), y, None if weight is None else weight[s : s + bs])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * y.shape[0]
        train_loss = float(loss_sum.item() / n)
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"training loss became {train_loss} in epoch {epoch} (lr={config.lr}, "
                f"batch_size={bs}); the run is stopped and no model is kept. Check the "
                "training set for extreme or corrupt values, or lower the learning rate."
            )
        record = {"epoch": float(epoch), "train_loss": train_loss}
        if validation is not None:
            val_loss = mean_loss(module, validation, loss_fn, config.eval_batch_size)
            if not math.isfinite(val_loss):
                raise NonFiniteLossError(
                    f"validation loss became {val_loss} in epoch {epoch}; the run is stopped."
                )
            record["val_loss"] = val_loss
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if validation is None:
            best_epoch = epoch
        elif record["val_loss"] < best_loss - config.min_delta:
            best_loss, best_epoch, stale = record["val_loss"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                stopped_early = True
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_loss if validation is not None else None,
        stopped_early=stopped_early,
        seconds=seconds,
        samples_seen=n * len(history),
        device=str(device),
    )
