"""Point-in-time training sets: labelled transactions joined to features, split by time.

Entity rows are the validated transactions that carry a label (the latest label of each, as
0/1 ``label``). Features come through the FeatureService with ``historical_features``, each
row as of just before its transaction (``training_entities``), so training sees what serving
saw. Splits are consecutive time ranges: every validation row is later than every train row,
every test row later than every validation row.

Labels arrive late: a legit transaction is labelled once its settlement period (7 days) has
passed, a fraud one after a 1-10 day chargeback delay. Transactions of the last days before the
newest label are therefore mostly labelled only when they are fraud, which would inflate the
fraud rate of exactly the test split. ``label_maturity`` drops transactions that recent.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from feast import FeatureStore

from features.engineering import TS, read_validated, training_entities
from features.storage import data_root, uri, write_json_atomic, write_parquet_atomic
from features.store import SERVICE, historical_features

SPLITS: tuple[str, ...] = ("train", "validation", "test")
LABEL = "label"
ENTITY_COLUMNS: tuple[str, ...] = (
    "transaction_id",
    "card_id",
    "merchant_id",
    TS,
    "amount",
    "country",
    "channel",
)
DEFAULT_LABEL_MATURITY = timedelta(days=7)


@dataclass(frozen=True)
class TrainingSetRef:
    """What the ``training_set`` asset hands downstream: the parquet file of record and its identity.

    ``version`` is a content hash of the rows; ``batches`` are the validated transactions and
    labels batch ids the set was built from (lineage back to the ledger).
    """

    path: str
    version: str
    feature_service: str
    batches: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class SplitFractions:
    """Shares of the rows, in time order, that go to train, validation and test."""

    train: float = 0.70
    validation: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        shares = (self.train, self.validation, self.test)
        if any(s < 0 for s in shares) or self.train <= 0:
            raise ValueError(f"split fractions must be >= 0 with train > 0, got {shares}")
        if not math.isclose(sum(shares), 1.0, abs_tol=1e-9):
            raise ValueError(f"split fractions must sum to 1, got {sum(shares)}")


@dataclass(frozen=True)
class TrainingSet:
    """A built training set before it is written: rows, version and what describes it."""

    frame: pl.DataFrame
    version: str
    feature_service: str
    summary: dict[str, Any]


def labelled_transactions(
    transactions: pl.DataFrame,
    labels: pl.DataFrame,
    *,
    label_maturity: timedelta = DEFAULT_LABEL_MATURITY,
) -> pl.DataFrame:
    """Transactions with their latest known label (``label`` 0/1), unlabelled ones dropped.

    Only transactions at or before ``newest label time - label_maturity`` are kept, so every
    kept transaction had the time to receive its label whatever it is.
    """
    if label_maturity < timedelta(0):
        raise ValueError("label_maturity must be >= 0")
    latest = (
        labels.sort("label_timestamp", "transaction_id")
        .unique("transaction_id", keep="last", maintain_order=True)
        .select("transaction_id", pl.col("is_fraud").cast(pl.Int8).alias(LABEL))
    )
    tx = transactions.unique("transaction_id", keep="last", maintain_order=True)
    if not labels.is_empty():
        cutoff = labels["label_timestamp"].max() - label_maturity
        tx = tx.filter(pl.col(TS) <= cutoff)
    return tx.join(latest, on="transaction_id", how="inner").sort(TS, "transaction_id")


def assign_splits(
    frame: pl.DataFrame, fractions: SplitFractions = SplitFractions()
) -> pl.DataFrame:
    """Add ``split``: the earliest rows train, then validation, then test, by ``event_timestamp``.

    Cuts fall on timestamps, so rows sharing a timestamp share a split and no two splits overlap
    in time; the shares are met as closely as that allows.
    """
    stamps = frame[TS].sort()
    n = stamps.len()

    def cut(share: float) -> datetime | None:
        i = round(n * share)
        return stamps[i] if i < n else None

    first_validation = cut(fractions.train)
    first_test = cut(fractions.train + fractions.validation)
    ts = pl.col(TS)
    split = (
        pl.lit("validation")
        if first_test is None
        else pl.when(ts < first_test).then(pl.lit("validation")).otherwise(pl.lit("test"))
    )
    if first_validation is None:
        split = pl.lit("train")
    else:
        split = pl.when(ts < first_validation).then(pl.lit("train")).otherwise(split)
    return frame.with_columns(split.alias("split"))


def split_summary(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per split: rows, positives, fraud rate and the event-time window."""
    out: dict[str, dict[str, Any]] = {}
    for name in SPLITS:
        part = frame.filter(pl.col("split") == name)
        positives = int(part[LABEL].sum()) if part.height else 0
        out[name] = {
            "rows": part.height,
            "positives": positives,
            "fraud_rate": positives / part.height if part.height else None,
            "start": part[TS].min().isoformat() if part.height else None,
            "end": part[TS].max().isoformat() if part.height else None,
        }
    return out


class _DigestSink(io.RawIOBase):
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def content_version(frame: pl.DataFrame) -> str:
    """First 16 hex digits of the sha256 of the rows, serialized canonically.

    Uncompressed parquet of plain Arrow types: unlike Polars' own writers (string views, bytes
    under null slots), it gives equal bytes for equal rows however the frame was assembled.
    """
    sink = _DigestSink()
    table = frame.rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    pq.write_table(table, sink, compression="none")
    return sink.sha.hexdigest()[:16]


def build_training_set(
    store: FeatureStore,
    transactions: pl.DataFrame,
    labels: pl.DataFrame,
    *,
    fractions: SplitFractions = SplitFractions(),
    label_maturity: timedelta = DEFAULT_LABEL_MATURITY,
    service_name: str = SERVICE,
) -> TrainingSet:
    """Labelled transactions, their features through ``service_name`` as of just before each
    transaction, a time-based split and a content hash. Deterministic in its inputs' rows."""
    labelled = labelled_transactions(transactions, labels, label_maturity=label_maturity)
    if labelled.is_empty():
        raise ValueError("no labelled transactions old enough to train on")
    entities = training_entities(labelled).with_columns(labelled[LABEL])
    joined = historical_features(store, entities, service_name)
    features = [c for c in joined.columns if c not in entities.columns]
    rows = (
        joined.with_columns(pl.col("transaction_timestamp").alias(TS))
        .select(*ENTITY_COLUMNS, *features, LABEL)
        .sort(TS, "transaction_id")
    )
    rows = assign_splits(rows, fractions)
    numeric = [c for c in features if rows.schema[c] != pl.String()]
    categorical = [c for c in features if rows.schema[c] == pl.String()]
    summary = {
        "splits": split_summary(rows),
        "fractions": asdict(fractions),
        "label_maturity_s": label_maturity.total_seconds(),
        "rows": rows.height,
        "positives": int(rows[LABEL].sum()),
        "features": {"numeric": numeric, "categorical": categorical},
    }
    return TrainingSet(rows, content_version(rows), service_name, summary)


def write_training_set(lake: Path, built: TrainingSet, batches: tuple[str, ...]) -> TrainingSetRef:
    """``<lake>/training_sets/<version>.parquet`` (and ``.json`` with the summary), atomically.

    A version already stored holds the same rows and is not rewritten.
    """
    folder = data_root(lake) / "training_sets"
    path = folder / f"{built.version}.parquet"
    if not path.exists():
        write_parquet_atomic(built.frame, path)
    write_json_atomic(
        {
            **built.summary,
            "version": built.version,
            "feature_service": built.feature_service,
            "batches": list(batches),
        },
        folder / f"{built.version}.json",
    )
    return TrainingSetRef(
        path=uri(path),
        version=built.version,
        feature_service=built.feature_service,
        batches=batches,
        rows=built.frame.height,
    )


def validated_batches(lake: Path, dataset: str) -> tuple[str, ...]:
    """Ids of the validated batches of a dataset in the lake, sorted."""
    folder = data_root(lake) / "validated" / dataset
    return tuple(sorted(p.stem for p in folder.glob("*.parquet")))


def training_set_from_home(
    lake: Path,
    store: FeatureStore,
    *,
    fractions: SplitFractions = SplitFractions(),
    label_maturity: timedelta = DEFAULT_LABEL_MATURITY,
    service_name: str = SERVICE,
) -> tuple[TrainingSetRef, TrainingSet]:
    """Build and write a training set from every validated transactions and labels batch."""
    built = build_training_set(
        store,
        read_validated(lake, "transactions"),
        read_validated(lake, "labels"),
        fractions=fractions,
        label_maturity=label_maturity,
        service_name=service_name,
    )
    batches = validated_batches(lake, "transactions") + validated_batches(lake, "labels")
    return write_training_set(lake, built, batches), built
