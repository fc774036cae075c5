from __future__ import annotations

from collections.abc import Iterator

import polars as pl
import pytest
import torch

from tests.models.testkit import make_training_set


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Two shared cores: one thread keeps tests fast and CPU results bitwise repeatable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def training_set() -> pl.DataFrame:
    return make_training_set()
