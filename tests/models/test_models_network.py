"""FrozenNet (the serving forward: one gather over the concatenated embedding tables, the MLP as
functional calls) gives TabularNet's eval-mode outputs bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.evaluate import batch_predict
from models.network import FrozenNet, TabularNet, build_network
from models.preprocess import TabularBatch

ARCHITECTURES = [
    # n_numeric, cardinalities, embedding dims, hidden
    (6, [5, 3, 40], [3, 2, 16], (128, 64)),
    (46, [20, 5, 12, 17, 5, 22], [4, 4, 4, 4, 4, 4], (16,)),
    (4, [7], [1], ()),  # a logistic regression
    (3, [], [], (8,)),  # no categorical columns
]


def _trained_like(architecture: tuple, seed: int) -> TabularNet:
    """A network with random weights everywhere, normalisation and calibration included."""
    torch.manual_seed(seed)
    n_numeric, cardinalities, dims, hidden = architecture
    module = TabularNet(n_numeric, cardinalities, dims, hidden, dropout=0.3, numeric_clip=4.0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 3.0)
    module.set_normalization(torch.randn(n_numeric) * 100.0, torch.rand(n_numeric) * 10.0)
    module.set_calibration(0.8, -1.3)
    return module.eval()


def _inputs(module: TabularNet, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    numeric = torch.randn(n, module.architecture["n_numeric"], generator=g) * 1e3
    if n:  # NaN, +-inf, huge and tiny values (the preprocessor never sends them; still equal)
        numeric[0, 0] = float("nan")
        numeric[-1, -1] = float("inf")
        numeric[n // 2, 0] = -float("inf")
        numeric[n // 3, -1] = 1e-38
    columns = [torch.randint(0, c, (n,), generator=g) for c in module.architecture["cardinalities"]]
    categorical = torch.stack(columns, 1) if columns else torch.zeros(n, 0, dtype=torch.int64)
    return numeric, categorical


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("n", [0, 1, 2, 32, 1000])
def test_the_frozen_forward_equals_the_module_bit_for_bit(architecture, n: int) -> None:
    module = _trained_like(architecture, seed=n)
    frozen = FrozenNet(module)
    numeric, categorical = _inputs(module, n, seed=n + 1)
    with torch.inference_mode():
        expected = module(numeric, categorical)
        got = frozen(numeric, categorical)
    assert got.dtype == expected.dtype and got.shape == expected.shape == (n,)
    assert torch.equal(got, expected)
    assert torch.equal(
        torch.from_numpy(batch_predict(frozen, TabularBatch(numeric, categorical))),
        torch.from_numpy(batch_predict(module, TabularBatch(numeric, categorical))),
    )


def test_every_category_of_every_column_gets_its_own_embedding() -> None:
    """Each index of each table, first and last rows included, at every row position."""
    module = _trained_like(ARCHITECTURES[0], seed=7)
    frozen = FrozenNet(module)
    cardinalities = module.architecture["cardinalities"]
    n = max(cardinalities)
    categorical = torch.stack([torch.arange(n) % c for c in cardinalities], 1)
    with torch.inference_mode():
        expected = torch.cat([e(categorical[:, i]) for i, e in enumerate(module.embeddings)], 1)
        assert torch.equal(frozen.embed(categorical), expected)


def test_built_networks_and_layers_it_does_not_unroll_still_match() -> None:
    module = build_network(
        5,
        [4, 9],
        hidden=(12, 6),
        dropout=0.5,
        embedding_dim=None,
        max_embedding_dim=16,
        numeric_clip=8.0,
    ).eval()
    module.body.insert(1, nn.Tanh())  # not one of its functional calls: called as a module
    numeric, categorical = _inputs(module, 64, seed=3)
    with torch.inference_mode():
        assert torch.equal(FrozenNet(module)(numeric, categorical), module(numeric, categorical))


def test_an_index_outside_a_table_is_refused_as_by_the_module() -> None:
    module = _trained_like(ARCHITECTURES[0], seed=1)
    frozen = FrozenNet(module)
    numeric, categorical = _inputs(module, 4, seed=2)
    for bad in (5, -1):  # the first table has 5 rows: 5 would read the next table's
        categorical[1, 0] = bad
        with torch.inference_mode(), pytest.raises(IndexError):
            module(numeric, categorical)
        with torch.inference_mode(), pytest.raises(IndexError):
            frozen(numeric, categorical)


def test_the_frozen_forward_keeps_the_weights_it_was_built_with() -> None:
    module = _trained_like(ARCHITECTURES[0], seed=4)
    frozen = FrozenNet(module)
    numeric, categorical = _inputs(module, 8, seed=5)
    with torch.inference_mode():
        before = module(numeric, categorical)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    with torch.inference_mode():
        assert torch.equal(frozen(numeric, categorical), before)
        assert not torch.equal(module(numeric, categorical), before)
