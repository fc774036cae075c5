"""The deployment step's view of the online store: fresh, stale, or unknown (not blocking)."""

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from core.storage import write_parquet_atomic
from orchestration.resources import LooplineStorage
from orchestration.serving_assets import stale_online_features
from tests.serving.kit import build_serving_home


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def info(self, _msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)


def test_deployment_sees_stale_online_rows_against_the_newest_validated_transaction(
    tmp_path: Path,
) -> None:
    home = build_serving_home(tmp_path / "home", seed=5)
    storage = LooplineStorage(home=str(home.home))
    log = _Log()
    assert stale_online_features(storage, "fraud_model_v1", log) == []
    assert log.warnings == [
        "cannot check the online store's freshness for fraud_model_v1 "
        "(no validated transactions); delivery goes on without that check"
    ]

    validated = home.home / "validated" / "transactions"
    write_parquet_atomic(home.transactions.tail(50), validated / "recent.parquet")
    assert stale_online_features(storage, "fraud_model_v1", log) == []  # materialized to now

    later = home.transactions.tail(5).with_columns(
        pl.col("event_timestamp") + timedelta(days=10)  # a week past the merchant TTL
    )
    write_parquet_atomic(later, validated / "later.parquet")
    [reason] = stale_online_features(storage, "fraud_model_v1", log)
    assert "merchant_stats_fv are stale" in reason
    with pytest.raises(Exception, match="no_such_service does not exist"):
        stale_online_features(storage, "no_such_service", log)
