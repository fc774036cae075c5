"""The tabular network: embeddings for categoricals, an MLP on top, normalisation inside.

Normalisation and calibration are buffers, so the state_dict alone (loaded with
`weights_only=True`) reproduces the model's outputs; nothing else has to travel beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
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
