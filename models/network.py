"""The tabular network: embeddings for categoricals, an MLP on top, normalisation inside.

Normalisation and calibration are buffers, so the state_dict alone (loaded with
`weights_only=True`) reproduces the model's outputs; nothing else has to travel beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def embedding_size(cardinality: int, max_dim: int = 16) -> int:
    """fast.ai's rule of thumb: grows sub-linearly with the vocabulary, capped."""
    return int(min(max_dim, max(2, round(1.6 * cardinality**0.56))))


class TabularNet(nn.Module):
    """Logits for tabular rows; with `hidden=()` and 1-wide embeddings it is a logistic regression."""

    def __init__(
        self,
        n_numeric: int,
        cardinalities: Sequence[int],
        embedding_dims: Sequence[int],
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.1,
        numeric_clip: float = 8.0,
    ) -> None:
        super().__init__()
        if len(cardinalities) != len(embedding_dims):
            raise ValueError("one embedding size per categorical column is needed")
        self.architecture: dict[str, Any] = {
            "n_numeric": int(n_numeric),
            "cardinalities": [int(c) for c in cardinalities],
            "embedding_dims": [int(d) for d in embedding_dims],
            "hidden": [int(h) for h in hidden],
            "dropout": float(dropout),
            "numeric_clip": float(numeric_clip),
        }
        self.numeric_clip = float(numeric_clip)
        self.register_buffer("num_mean", torch.zeros(n_numeric))
        self.register_buffer("num_std", torch.ones(n_numeric))
        self.register_buffer("calib_scale", torch.ones(()))
        self.register_buffer("calib_bias", torch.zeros(()))
        self.embeddings = nn.ModuleList(
            nn.Embedding(c, d) for c, d in zip(cardinalities, embedding_dims, strict=True)
        )
        layers: list[nn.Module] = []
        width = n_numeric + sum(embedding_dims)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> TabularNet:
        return cls(**architecture)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Stores training statistics; constant columns get std 1 instead of a division by 0."""
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.num_mean.copy_(mean.to(self.num_mean))
        self.num_std.copy_(std.to(self.num_std))

    def set_calibration(self, scale: float, bias: float) -> None:
        self.calib_scale.fill_(float(scale))
        self.calib_bias.fill_(float(bias))

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        x = (numeric - self.num_mean) / self.num_std
        x = torch.nan_to_num(x, nan=0.0).clamp(-self.numeric_clip, self.numeric_clip)
        parts = [x]
        parts += [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        logits = self.body(torch.cat(parts, dim=1)).squeeze(-1)
        return logits.float() * self.calib_scale + self.calib_bias


class FrozenNet:
    """``TabularNet.forward`` in eval mode for inference only, on a snapshot of its weights: the
    serving path, where a batch's forward is a few microseconds of arithmetic and most of the
    module path's cost is Python (a module call per categorical column, per layer).

    The embedding tables are concatenated into one flat table and a row's embeddings are one
    ``take`` of it at ``offset + index * width + k``: the same values copied, in the same order,
    as the per-column ``nn.Embedding`` calls and their ``torch.cat``. The MLP runs as the
    functional calls its modules make (``F.linear``, ``F.relu``), skipping ``Dropout`` (an
    identity in eval mode); any other layer is called as a module. A test holds the outputs
    equal bit for bit to ``TabularNet.forward``. Built once per loaded model: a later change to
    the module's weights is not seen (build another).
    """

    def __init__(self, module: TabularNet) -> None:
        with torch.no_grad():
            weights = [emb.weight.detach().clone() for emb in module.embeddings]
            self.num_mean = module.num_mean.detach().clone()
            self.num_std = module.num_std.detach().clone()
            self.calib_scale = module.calib_scale.detach().clone()
            self.calib_bias = module.calib_bias.detach().clone()
        self.numeric_clip = module.numeric_clip
        device = self.num_mean.device
        columns: list[int] = []
        strides: list[int] = []
        offsets: list[int] = []
        start = 0
        for j, weight in enumerate(weights):
            rows, width = weight.shape
            columns += [j] * width
            strides += [width] * width
            offsets += [start + k for k in range(width)]
            start += rows * width
        self.table = (
            torch.cat([w.reshape(-1) for w in weights])
            if weights
            else torch.zeros(0, device=device, dtype=self.num_mean.dtype)
        )
        self.columns = torch.tensor(columns, dtype=torch.int64, device=device)
        self.strides = torch.tensor(strides, dtype=torch.int64, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=device)
        self.cardinalities = torch.tensor(
            [w.shape[0] for w in weights], dtype=torch.int64, device=device
        )
        self.layers: list[Callable[[torch.Tensor], torch.Tensor]] = []
        for layer in module.body:
            if type(layer) is nn.Linear:
                weight = layer.weight.detach().clone()
                bias = None if layer.bias is None else layer.bias.detach().clone()
                self.layers.append(partial(_linear, weight=weight, bias=bias))
            elif type(layer) is nn.ReLU and not layer.inplace:
                self.layers.append(F.relu)
            elif type(layer) is not nn.Dropout:
                self.layers.append(layer)

    def embed(self, categorical: torch.Tensor) -> torch.Tensor:
        """The concatenated embeddings of the rows' category indices ([n, sum of widths])."""
        if ((categorical < 0) | (categorical >= self.cardinalities)).any():
            raise IndexError("a category index is out of its embedding table's range")
        index = categorical.index_select(1, self.columns) * self.strides + self.offsets
        return self.table.take(index)

    def __call__(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        x = (numeric - self.num_mean) / self.num_std
        x = torch.nan_to_num(x, nan=0.0).clamp(-self.numeric_clip, self.numeric_clip)
        x = torch.cat([x, self.embed(categorical)], dim=1)
        for layer in self.layers:
            x = layer(x)
        logits = x.squeeze(-1)
        return logits.float() * self.calib_scale + self.calib_bias


def _linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def build_network(
    n_numeric: int,
    cardinalities: Sequence[int],
    *,
    hidden: Sequence[int],
    dropout: float,
    embedding_dim: int | None,
    max_embedding_dim: int,
    numeric_clip: float,
) -> TabularNet:
    """Sizes embeddings from the vocabularies unless a fixed width is asked for."""
    dims = [
        embedding_dim if embedding_dim is not None else embedding_size(c, max_embedding_dim)
        for c in cardinalities
    ]
    return TabularNet(n_numeric, cardinalities, dims, hidden, dropout, numeric_clip)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
