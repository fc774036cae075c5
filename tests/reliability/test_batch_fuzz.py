"""Generated malformed batches through the landing sensor and ingest: each one quarantined with
its reason, the sensor never crashes, and good batches landed around them are validated."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core import simulation
from quality.ingest import batch_id_of
from quality.ledger import BatchLedger
from tests.orchestration.conftest import Platform
from usecases.fraud import simulator

CONFIG = simulator.ScenarioConfig(seed=9, n_cards=60, n_merchants=15, rows_per_batch=60)
COLUMNS = ("transaction_id", "card_id", "merchant_id", "amount", "channel", "country")
EXAMPLES = 30
FIGURES: dict[str, int] = {"malformed": 0, "good": 0}

_UNICODE = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30
)
_HUGE = st.integers(10_000, 200_000).map(lambda n: "\u00e9\U0001f600x" * (n // 3))


def _edit_breaks_contract(draw, frame: pl.DataFrame, fmt: str) -> pl.DataFrame:
    """One edit the data contract must refuse."""
    kind = draw(
        st.sampled_from(
            [
                "drop",
                "rename",
                "extra",
                "type",
                "vocabulary",
                "nan_inf",
                "timestamp",
                "null_key",
                "duplicate_key",
            ]
        )
    )
    n = frame.height
    if kind == "drop":
        return frame.drop(draw(st.sampled_from([*COLUMNS, "event_timestamp"])))
    if kind == "rename":
        column = draw(st.sampled_from([*COLUMNS, "event_timestamp"]))
        new = draw(_UNICODE.filter(lambda s: s not in frame.columns))
        return frame.rename({column: new})
    if kind == "extra":
        name = draw(_UNICODE.filter(lambda s: s not in frame.columns))
        return frame.with_columns(pl.lit(draw(_UNICODE | _HUGE)).alias(name))
    if kind == "type" and fmt == "csv":  # CSV carries no types: text where a number goes
        column = draw(st.sampled_from(["amount", "event_timestamp"]))
        bad = draw(_UNICODE.filter(lambda s: not s.strip().lstrip("-+").replace(".", "").isdigit()))
        at = draw(st.integers(0, n - 1))
        return frame.with_columns(pl.col(column).cast(pl.String)).with_columns(
            pl.when(pl.int_range(n) == at).then(pl.lit(bad)).otherwise(pl.col(column)).alias(column)
        )
    if kind == "type":
        column = draw(st.sampled_from([*COLUMNS, "event_timestamp"]))
        if column in ("amount", "event_timestamp"):
            return frame.with_columns(pl.col(column).cast(pl.String))
        return frame.with_columns(pl.int_range(n, dtype=pl.Int64).alias(column))
    if kind == "vocabulary":
        column = draw(st.sampled_from(["channel", "country"]))
        bad = draw((_UNICODE | _HUGE).filter(lambda s: len(s) > 3 or not s.isascii()))
        at = draw(st.integers(0, n - 1))
        return frame.with_columns(
            pl.when(pl.int_range(n) == at).then(pl.lit(bad)).otherwise(pl.col(column)).alias(column)
        )
    if kind == "nan_inf":
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e300, 0.0]))
        at = draw(st.integers(0, n - 1))
        return frame.with_columns(
            pl.when(pl.int_range(n) == at).then(value).otherwise(pl.col("amount")).alias("amount")
        )
    if kind == "timestamp":
        when = draw(
            st.sampled_from(
                [
                    datetime(1970, 1, 1, tzinfo=UTC),
                    datetime(1, 1, 1, tzinfo=UTC),
                    datetime(2200, 1, 1, tzinfo=UTC),
                    datetime(9999, 12, 31, tzinfo=UTC),
                ]
            )
        )
        at = draw(st.integers(0, n - 1))
        stamp = pl.lit(when).cast(pl.Datetime("us", "UTC"))
        return frame.with_columns(
            pl.when(pl.int_range(n) == at)
            .then(stamp)
            .otherwise(pl.col("event_timestamp"))
            .alias("event_timestamp")
        )
    if kind == "null_key":
        column = draw(st.sampled_from([*COLUMNS, "event_timestamp"]))
        at = draw(st.integers(0, n - 1))
        return frame.with_columns(
            pl.when(pl.int_range(n) == at).then(None).otherwise(pl.col(column)).alias(column)
        )
    return pl.concat([frame, frame.head(draw(st.integers(1, n)))])  # duplicate keys


def _noise(draw, frame: pl.DataFrame) -> pl.DataFrame:
    """Unicode or huge ids on top: allowed by themselves, they must not hide the fault.

    A null card_id is the fault itself (the null-key edit), so it stays null.
    """
    if "card_id" not in frame.columns or frame.schema["card_id"] != pl.String:
        return frame
    value = draw(st.none() | _UNICODE | _HUGE)
    if value is None:
        return frame
    card = pl.col("card_id")
    return frame.with_columns(
        pl.when(card.is_null()).then(card).otherwise(pl.lit(value)).alias("card_id")
    )


@st.composite
def malformed_batch(draw) -> tuple[bytes, str]:
    k = draw(st.integers(0, 20))
    frame = simulator.Simulator(CONFIG).transactions(k)
    kind = draw(st.sampled_from(["frame"] * 8 + ["garbage", "csv_garbage", "empty"]))
    if kind == "garbage":
        return b"PAR1" + draw(st.binary(min_size=1, max_size=500)), "parquet"
    if kind == "csv_garbage":
        return b"transaction_id,amount\n\xff\xfe," + draw(st.binary(max_size=200)), "csv"
    if kind == "empty":
        return frame.head(0).write_csv().encode() if draw(st.booleans()) else b"", "csv"
    fmt = draw(st.sampled_from(["parquet", "csv"]))
    frame = _noise(draw, _edit_breaks_contract(draw, frame, fmt))
    return simulation.encode(frame, fmt), fmt


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Platform:
    return Platform(tmp_path_factory.mktemp("batch-fuzz") / "home")


def test_malformed_batches_are_each_quarantined_with_a_reason_and_good_ones_flow(platform):
    ledger = BatchLedger(platform.settings.ledger_path)
    landing = platform.settings.landing
    good_batches: list[tuple[str, int]] = []
    seen: set[bytes] = set()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(malformed_batch(), st.booleans())
    def land_and_ingest(batch: tuple[bytes, str], with_good: bool) -> None:
        payload, fmt = batch
        n = FIGURES["malformed"]
        path = simulation.land(payload, landing, "transactions", f"fuzz{n:04d}", fmt)
        bad_id = batch_id_of(path)
        if payload in seen:  # the same bytes drawn twice: a re-landed copy, not a new batch
            platform.ingest_all()
            assert ledger.get(bad_id).status == "duplicate"
            return
        seen.add(payload)
        FIGURES["malformed"] += 1
        if with_good:
            frame = simulator.Simulator(CONFIG).transactions(40 + n)  # windows 0-20 are bad
            good = simulation.land(frame, landing, "transactions", f"good{n:04d}")
            good_batches.append((batch_id_of(good), frame.height))
            FIGURES["good"] += 1
        platform.ingest_all()  # raises if the sensor itself fails
        record = ledger.get(bad_id)
        assert record is not None and record.status == "quarantined", (record, payload[:200])
        assert record.reason
        assert not list(landing.glob("*.parquet")) + list(landing.glob("*.csv"))

    land_and_ingest()
    assert FIGURES["malformed"] >= EXAMPLES // 2
    for batch, rows in good_batches:
        record = ledger.get(batch)
        assert record.status == "validated" and record.rows == rows
    quarantined = ledger.batches(status="quarantined")
    assert len(quarantined) == FIGURES["malformed"]  # a copy drawn twice is a duplicate
    assert all(r.reason for r in quarantined)
    for r in quarantined:
        assert (platform.settings.quarantine / "transactions" / r.batch_id / "reason.json").exists()
    print(f"\nbatch fuzz figures: {FIGURES}")
