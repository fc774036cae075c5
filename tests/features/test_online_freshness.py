"""How fresh the online store is per feature view: what deployment checks before promoting."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from features.store import OnlineNewest, materialize, online_newest_event_times
from serving.delivery import online_freshness_reasons
from tests.features.test_point_in_time import CARD_TTL, MERCHANT_TTL, T0, _build_home
from usecases.fraud.features import CARD_VIEW, MERCHANT_VIEW


def _newest_file_row(home: Path, view: str):
    return pl.read_parquet(home / "features" / view / "*.parquet")["event_timestamp"].max()


def test_newest_online_rows_per_view_before_and_after_materializing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("fresh") / "home"
    store, _ = _build_home(home, seed=7)
    assert online_newest_event_times(store) == {
        CARD_VIEW: OnlineNewest(None, CARD_TTL),
        MERCHANT_VIEW: OnlineNewest(None, MERCHANT_TTL),
    }
    empty = online_newest_event_times(store)
    reasons = online_freshness_reasons(empty, T0 + timedelta(days=60))
    assert len(reasons) == 2 and all("no rows of" in r for r in reasons)

    materialize(store, T0 + timedelta(days=62))
    newest = online_newest_event_times(store)
    for view in (CARD_VIEW, MERCHANT_VIEW):
        expected = _newest_file_row(home, view).replace(microsecond=0)  # SQLite keeps seconds
        assert newest[view].newest == expected
    latest = max(n.newest for n in newest.values())
    assert online_freshness_reasons(newest, latest) == []
    later = latest + MERCHANT_TTL + timedelta(days=1)  # merchants expired, cards not yet
    [reason] = online_freshness_reasons(newest, later)
    assert MERCHANT_VIEW in reason and "stale" in reason


def test_other_online_stores_are_unknown_not_fresh() -> None:
    redis = SimpleNamespace(config=SimpleNamespace(online_store=SimpleNamespace(type="redis")))
    assert online_newest_event_times(redis) is None  # type: ignore[arg-type]
