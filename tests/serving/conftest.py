from __future__ import annotations

import pytest

from tests.models.conftest import _one_thread  # noqa: F401  (one torch thread per test)
from tests.serving.kit import ServingHome, build_serving_home


@pytest.fixture(scope="session")
def serving_home(tmp_path_factory: pytest.TempPathFactory) -> ServingHome:
    """One home for the package: features materialized, v0001 the champion."""
    home = build_serving_home(tmp_path_factory.mktemp("serving") / "home")
    home.register(seed=1, champion=True)
    return home
