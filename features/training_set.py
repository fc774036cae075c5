"""Point-in-time training sets: labelled transactions joined to features, split by time.

Entity rows are the validated transactions that carry a label (the latest label of each, as
0/1 ``label``). Features come through the FeatureService with ``historical_features``, each
row as of just before its transaction (``training_entities``), so training sees what serving
saw. Splits are consecutive time ranges: every validation row is later than every train row,
every test row later than every validation row. A ``SplitPolicy`` says where the cuts fall:
by shares of the rows (``SplitFractions``), or so that validation and test each hold a fixed
number of the newest positives, which lets everything older, recent rows included, reach
training; an optional window keeps only the newest labelled rows.

Labels arrive late: a legit transaction is labelled once its settlement period (7 days) has
passed, a fraud one after a 1-10 day chargeback delay. Transactions of the last days before the
newest label are therefore mostly labelled only when they are fraud, which would inflate the
fraud rate of exactly the test split. ``label_maturity`` drops transactions that recent, or
``presume_negative_after`` counts those old enough as legit until a fraud label arrives.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow.parquet as pq

from core.storage import data_root, uri, write_json_atomic, write_parquet_atomic
from core.usecase import UseCase, active
from features.declarations import build_definitions
from features.declarations import service_name as _service_name
from features.views import TS, read_validated, training_entities
from models.tasks import of as task_of

if TYPE_CHECKING:
    from feast import FeatureStore

# The active use case's FeatureService (features.store.SERVICE, without importing Feast: the
# code location imports this module, and every run process with it).
SERVICE = _service_name()

SPLITS: tuple[str, ...] = ("train", "validation", "test")
LABEL = "label"


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


def entity_columns(uc: UseCase | None = None) -> tuple[str, ...]:
    """The key columns of a training set: every request field but the time, then ``TS`` (the
    request's own time)."""
    uc = uc or active()
    return (*(f for f in uc.request.fields if f != uc.timestamp_field), TS)


def labelled_requests(
    requests: pl.DataFrame,
    labels: pl.DataFrame,
    *,
    label_maturity: timedelta | None = None,
    presume_negative_after: timedelta | None = None,
    uc: UseCase | None = None,
) -> pl.DataFrame:
    """Rows of the request dataset with their latest known label (``label``: 0/1 for a
    classifier, the value for a regressor, as the task's ``label_dtype``), unlabelled ones
    dropped; the use case's ``label`` declares where the labels are and how they join.

    Only requests at or before ``newest label time - label_maturity`` are kept, so every kept
    request had the time to receive its label whatever it is (the use case's maturity by
    default).

    With ``presume_negative_after`` (shorter than the maturity), a request that old counts as
    negative until a positive label arrives, as a card issuer counts a payment with no
    chargeback yet as legit: positive labels (1-10 days late in the fraud demo) then reach
    training days before the negative ones would, with the requests around them, and the split
    stays in time order. The price is positives counted as negatives until their label comes:
    with the demo's 1-10 day delays and two days' presumption, about 60% of the positives among
    the presumed rows are not known yet.
    """
    uc = uc or active()
    declared = uc.label
    key, time = uc.request_dataset.key, uc.request_dataset.event_time
    if label_maturity is None:
        label_maturity = uc.label_maturity
    if label_maturity < timedelta(0):
        raise ValueError("label_maturity must be >= 0")
    presume = presume_negative_after
    if presume is not None and not timedelta(0) <= presume <= label_maturity:
        raise ValueError("presume_negative_after must be between 0 and label_maturity")
    task = task_of(uc.task.type)
    if presume is not None and not task.has_threshold:
        raise ValueError("presume_negative_after is for a classifier's labels (no positive yet)")
    value = pl.col(declared.column).cast(task.label_dtype)  # 0/1, or the regressor's minutes
    latest = (
        labels.sort(declared.time, declared.key)
        .unique(declared.key, keep="last", maintain_order=True)
        .select(pl.col(declared.key).alias(key), value.alias(LABEL))
    )
    rows = requests.unique(key, keep="last", maintain_order=True)
    if labels.is_empty():
        return rows.join(latest, on=key, how="inner").sort(time, key)
    newest = labels[declared.time].max()
    at = pl.col(time)
    out = rows.filter(at <= newest - label_maturity).join(latest, on=key, how="inner")
    if presume is not None:
        young = rows.filter((at > newest - label_maturity) & (at <= newest - presume))
        presumed = young.join(latest, on=key, how="left").with_columns(pl.col(LABEL).fill_null(0))
        out = pl.concat([out, presumed])
    return out.sort(time, key)


@dataclass(frozen=True)
class SplitPolicy:
    """Where the time cuts fall, and how much labelled history is kept.

    With ``held_out_positives`` set, test is the newest rows holding that many positives and
    validation the next newest holding as many; train is everything before. Held-out splits
    then shrink to what a metric needs, and the newest labelled rows reach training instead of
    waiting in a 30% tail. Without it, ``fractions`` cut the rows by shares. ``window`` keeps
    only labelled rows within that span of the newest one, before splitting.

    ``warm_up`` leaves out the rows of the history's first span (from its earliest
    transaction): their rolling features were still filling (a 30-day count over 3 days of
    data), so a model would learn values it never sees served, and drift monitoring against
    such training rows reads the filling as drift. When the history is too short to spare it,
    the warm-up is shortened so that half the labelled rows stay (`apply_warm_up`).
    """

    fractions: SplitFractions = SplitFractions()
    held_out_positives: int | None = None
    window: timedelta | None = None
    warm_up: timedelta | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fractions, SplitFractions):
            raise TypeError(f"fractions must be a SplitFractions, got {self.fractions!r}")
        k = self.held_out_positives
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"held_out_positives must be an integer >= 1 or None, got {k!r}")
        if self.window is not None and self.window <= timedelta(0):
            raise ValueError(f"window must be a positive timedelta or None, got {self.window}")
        if self.warm_up is not None and self.warm_up < timedelta(0):
            raise ValueError(
                f"warm_up must be a non-negative timedelta or None, got {self.warm_up}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the training set's summary."""
        return {
            "fractions": asdict(self.fractions),
            "held_out_positives": self.held_out_positives,
            "window_days": self.window.total_seconds() / 86400 if self.window else None,
            "warm_up_days": self.warm_up.total_seconds() / 86400 if self.warm_up else None,
        }


@dataclass(frozen=True)
class SplitCuts:
    """The first validation and first test timestamps (None: that split and later are empty).

    ``method`` is the rule that placed them (``fractions`` or ``held_out_positives``); ``note``
    says why a held-out-positives policy fell back to its fractions.
    """

    first_validation: datetime | None
    first_test: datetime | None
    method: str
    note: str | None = None


def as_policy(policy: SplitFractions | SplitPolicy) -> SplitPolicy:
    """A SplitFractions as the policy that cuts by those shares; a SplitPolicy as itself."""
    if isinstance(policy, SplitFractions):
        return SplitPolicy(fractions=policy)
    if isinstance(policy, SplitPolicy):
        return policy
    raise TypeError(f"expected SplitFractions or SplitPolicy, got {type(policy).__name__}")


def apply_window(frame: pl.DataFrame, window: timedelta | None) -> pl.DataFrame:
    """Rows whose ``event_timestamp`` lies within ``window`` of the newest one (all if None)."""
    if window is None or frame.is_empty():
        return frame
    return frame.filter(pl.col(TS) >= frame[TS].max() - window)


WARM_UP_KEEPS = 0.5


def drift_reference(
    training: pl.DataFrame,
    max_rows: int,
    *,
    warm_up: timedelta | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """What serving is compared with: the train split, less its first ``warm_up`` (from its
    oldest row, shortened as `apply_warm_up` does), sampled down to ``max_rows``. Rows from the
    history's first weeks carry rolling features still filling, which serving never shows, so
    a reference holding them reads the filling as drift (decision 26)."""
    train = training.filter(pl.col("split") == "train")
    if train.height:
        train, _ = apply_warm_up(train, train[TS].min(), warm_up)
    if train.height > max_rows:
        train = train.sample(max_rows, seed=seed)
    return train


def apply_warm_up(
    frame: pl.DataFrame, history_start: datetime | None, warm_up: timedelta | None
) -> tuple[pl.DataFrame, timedelta | None]:
    """Rows at least ``warm_up`` after ``history_start`` (the earliest transaction), and the
    warm-up applied: shortened, when the full one would leave fewer than ``WARM_UP_KEEPS`` of
    the rows, to the longest that keeps them (None when nothing was left out)."""
    if not warm_up or history_start is None or frame.is_empty():
        return frame, None
    keep = max(1, math.ceil(frame.height * WARM_UP_KEEPS))
    stamps = frame[TS].sort(descending=True)
    latest_start = stamps[keep - 1]
    start = min(history_start + warm_up, latest_start)
    if start <= history_start:
        return frame, None
    return frame.filter(pl.col(TS) >= start), start - history_start


def fraction_cuts(frame: pl.DataFrame, fractions: SplitFractions) -> SplitCuts:
    """Cuts at the timestamps that meet the shares as closely as whole timestamps allow."""
    stamps = frame[TS].sort()
    n = stamps.len()

    def cut(share: float) -> datetime | None:
        i = round(n * share)
        return stamps[i] if i < n else None

    return SplitCuts(cut(fractions.train), cut(fractions.train + fractions.validation), "fractions")


def _newest_positive_cut(frame: pl.DataFrame, k: int) -> datetime | None:
    """Timestamp of the k-th newest positive row of ``frame`` (None when it has fewer)."""
    stamps = frame.filter(pl.col(LABEL) == 1)[TS].sort(descending=True)
    return stamps[k - 1] if stamps.len() >= k else None


def held_out_positive_cuts(frame: pl.DataFrame, k: int) -> SplitCuts | None:
    """Cuts that give test, then validation, the newest ``k`` positives each.

    None when the rows hold too few positives for both held-out splits and a train split
    with at least one positive.
    """
    first_test = _newest_positive_cut(frame, k)
    if first_test is None:
        return None
    first_validation = _newest_positive_cut(frame.filter(pl.col(TS) < first_test), k)
    if first_validation is None:
        return None
    train = frame.filter(pl.col(TS) < first_validation)
    if not int(train[LABEL].sum()):
        return None
    return SplitCuts(first_validation, first_test, "held_out_positives")


def held_out_row_cuts(
    frame: pl.DataFrame, rows: int, fractions: SplitFractions | None = None
) -> SplitCuts:
    """A regressor's held-out splits (it has no positives to count): test the newest ``rows``
    rows, validation the ``rows`` before them, train everything older; cut on whole
    timestamps. Too few rows for that and a train split: the fractions' cuts, with a note."""
    stamps = frame[TS].sort(descending=True)
    if stamps.len() < 3 * rows:
        cuts = fraction_cuts(frame, fractions or SplitFractions())
        note = f"{stamps.len()} rows are too few to hold out {rows} twice: split by fractions"
        return SplitCuts(cuts.first_validation, cuts.first_test, "fractions", note)
    return SplitCuts(stamps[2 * rows - 1], stamps[rows - 1], "held_out_rows")


def split_cuts(frame: pl.DataFrame, policy: SplitFractions | SplitPolicy) -> SplitCuts:
    """Where the policy cuts these rows (the window is not applied here).

    ``held_out_positives`` counts positives of a 0/1 label and rows of a regressor's (float)
    label. A policy that the rows cannot satisfy falls back to its fractions, and the cuts'
    ``note`` says so.
    """
    policy = as_policy(policy)
    k = policy.held_out_positives
    if k is None:
        return fraction_cuts(frame, policy.fractions)
    if LABEL in frame.columns and frame.schema[LABEL].is_float():
        return held_out_row_cuts(frame, k, policy.fractions)
    cuts = held_out_positive_cuts(frame, k)
    if cuts is not None:
        return cuts
    positives = int(frame[LABEL].sum()) if frame.height else 0
    fallback = fraction_cuts(frame, policy.fractions)
    note = (
        f"{positives} positives are too few for {k} in test, {k} in validation and at least "
        f"one in train: split by fractions {asdict(policy.fractions)} instead"
    )
    return SplitCuts(fallback.first_validation, fallback.first_test, "fractions", note)


def label_splits(frame: pl.DataFrame, cuts: SplitCuts) -> pl.DataFrame:
    """Add ``split`` from the cuts: train before the first, validation before the second, test."""
    ts = pl.col(TS)
    split = (
        pl.lit("validation")
        if cuts.first_test is None
        else pl.when(ts < cuts.first_test).then(pl.lit("validation")).otherwise(pl.lit("test"))
    )
    if cuts.first_validation is None:
        split = pl.lit("train")
    else:
        split = pl.when(ts < cuts.first_validation).then(pl.lit("train")).otherwise(split)
    return frame.with_columns(split.alias("split"))


def assign_splits(
    frame: pl.DataFrame, policy: SplitFractions | SplitPolicy = SplitPolicy()
) -> pl.DataFrame:
    """Rows within the policy's window, with ``split``: train, then validation, then test.

    Cuts fall on ``event_timestamp`` values, so rows sharing a timestamp share a split and no
    two splits overlap in time. A SplitFractions cuts by shares, as closely as ties allow;
    held-out-positives cuts need a 0/1 ``label`` column.
    """
    policy = as_policy(policy)
    frame = apply_window(frame, policy.window)
    return label_splits(frame, split_cuts(frame, policy))


def split_summary(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per split: rows, positives and positive rate (a regressor's label: none, its mean
    instead) and the event-time window."""
    out: dict[str, dict[str, Any]] = {}
    regression = frame.schema[LABEL].is_float()
    for name in SPLITS:
        part = frame.filter(pl.col("split") == name)
        positives = None if regression else int(part[LABEL].sum()) if part.height else 0
        out[name] = {
            "rows": part.height,
            "positives": positives,
            "positive_rate": positives / part.height
            if part.height and positives is not None
            else None,
            "mean_label": float(part[LABEL].mean()) if regression and part.height else None,
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
    requests: pl.DataFrame,
    labels: pl.DataFrame,
    *,
    split: SplitPolicy = SplitPolicy(),
    fractions: SplitFractions | None = None,
    label_maturity: timedelta | None = None,
    presume_negative_after: timedelta | None = None,
    service_name: str = SERVICE,
) -> TrainingSet:
    """Labelled requests, their features through ``service_name`` as of just before each
    request, a time-based split and a content hash. Deterministic in its inputs' rows.
    ``requests`` and ``labels`` are rows of the use case's request and label datasets.

    ``fractions`` is the older spelling of ``split=SplitPolicy(fractions=...)``.
    """
    uc = active()
    label_maturity = uc.label_maturity if label_maturity is None else label_maturity
    policy = resolve_policy(split, fractions)
    labelled = labelled_requests(
        requests,
        labels,
        label_maturity=label_maturity,
        presume_negative_after=presume_negative_after,
    )
    time = uc.request_dataset.event_time  # always set: the request time is checked to be it
    labelled = labelled.with_columns(pl.col(time).alias(TS)) if time != TS else labelled
    history_start = requests[time].min() if requests.height else None
    labelled, warmed = apply_warm_up(labelled, history_start, policy.warm_up)
    labelled = apply_window(labelled, policy.window)
    if labelled.is_empty():
        raise ValueError("no labelled requests old enough to train on")
    entities = training_entities(labelled).with_columns(labelled[LABEL])
    from features.store import historical_features

    joined = historical_features(store, entities, service_name)
    features = [c for c in joined.columns if c not in entities.columns]
    rows = (
        joined.with_columns(pl.col(uc.request.time_feature).alias(TS))
        .select(*entity_columns(uc), *features, LABEL)
        .sort(TS, uc.request.id)
    )
    cuts = split_cuts(rows, policy)
    rows = label_splits(rows, cuts)
    numeric = [c for c in features if rows.schema[c] != pl.String()]
    categorical = [c for c in features if rows.schema[c] == pl.String()]
    summary = {
        "splits": split_summary(rows),
        "fractions": asdict(policy.fractions),
        "split_policy": policy.to_dict(),
        "split_method": cuts.method,
        "split_note": cuts.note,
        "label_maturity_s": label_maturity.total_seconds(),
        "presume_negative_after_s": (
            presume_negative_after.total_seconds() if presume_negative_after is not None else None
        ),
        "warm_up_days": warmed.total_seconds() / 86400 if warmed else 0.0,
        "rows": rows.height,
        "positives": None if rows.schema[LABEL].is_float() else int(rows[LABEL].sum()),
        "features": {"numeric": numeric, "categorical": categorical},
    }
    return TrainingSet(rows, content_version(rows), service_name, summary)


def resolve_policy(split: SplitPolicy, fractions: SplitFractions | None) -> SplitPolicy:
    """The policy asked for, whether as ``split=`` or as the older ``fractions=`` keyword."""
    if fractions is None:
        return as_policy(split)
    if split != SplitPolicy():
        raise ValueError("give either split= or fractions=, not both")
    return SplitPolicy(fractions=fractions)


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


def service_feature_views(lake: Path, service_name: str = SERVICE) -> list[str]:
    """The stored (file-backed) feature views a FeatureService reads, in its order."""
    from feast import FeatureService, FeatureView

    declared = list(build_definitions(lake))
    stored = {d.name for d in declared if isinstance(d, FeatureView)}
    services = {d.name: d for d in declared if isinstance(d, FeatureService)}
    if service_name not in services:
        raise ValueError(f"unknown FeatureService {service_name!r}; known: {sorted(services)}")
    projections = services[service_name].feature_view_projections
    return [p.name for p in projections if p.name in stored]


def views_without_feature_files(lake: Path, views: Iterable[str]) -> list[str]:
    """Those of ``views`` with no feature file under ``<lake>/features/<view>/`` yet.

    The offline store reads each view through a ``*.parquet`` glob there, and a glob that
    matches nothing is an error, not an empty table.
    """
    root = data_root(lake) / "features"
    return [v for v in views if next(iter((root / v).glob("*.parquet")), None) is None]


def missing_feature_views(lake: Path, service_name: str = SERVICE) -> list[str]:
    """The FeatureService's stored views that have no feature files yet (empty: ready)."""
    return views_without_feature_files(lake, service_feature_views(lake, service_name))


def waiting_for_features(missing: Sequence[str]) -> str:
    """The one wording for a training set that cannot be built yet, for failures and skips."""
    return f"waiting for features: {', '.join(missing)} have no feature files yet"


def validated_batches(lake: Path, dataset: str) -> tuple[str, ...]:
    """Ids of the validated batches of a dataset in the lake, sorted."""
    folder = data_root(lake) / "validated" / dataset
    return tuple(sorted(p.stem for p in folder.glob("*.parquet")))


def training_set_from_home(
    lake: Path,
    store: FeatureStore,
    *,
    split: SplitPolicy = SplitPolicy(),
    fractions: SplitFractions | None = None,
    label_maturity: timedelta | None = None,
    presume_negative_after: timedelta | None = None,
    service_name: str = SERVICE,
) -> tuple[TrainingSetRef, TrainingSet]:
    """Build and write a training set from every validated batch of the request and label
    datasets."""
    uc = active()
    requests, labels = uc.request.dataset, uc.label.dataset
    built = build_training_set(
        store,
        read_validated(lake, requests),
        read_validated(lake, labels),
        split=split,
        fractions=fractions,
        label_maturity=label_maturity,
        presume_negative_after=presume_negative_after,
        service_name=service_name,
    )
    batches = validated_batches(lake, requests) + validated_batches(lake, labels)
    return write_training_set(lake, built, batches), built
