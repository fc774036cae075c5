"""Feature views as a use case declares them, and the feature files the platform keeps for them.

A use case's features module (``features.module`` in its ``usecase.yaml``) lists its views in
``VIEWS``: each a ``View`` naming its entity key, the schema of its rows, the datasets whose
batches change it, and ``compute``, which returns the rows one validated batch adds or changes
(``ViewBatch``). Rows are event-stamped (``TS``) and versioned (``CREATED``): a row recomputed
later carries a later ``created_timestamp``, which both Feast and ``features.store`` prefer.

The platform writes one file per view and batch, ``<lake>/features/<view>/<batch>.parquet``
(``write_feature_file``), and the view's Feast source reads the glob over that folder. Training
entities are the request dataset's rows stamped just before their own time
(``training_entities``), so the offline join sees what serving sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from core.storage import data_root, uri, write_parquet_atomic
from core.usecase import UseCase, active
from quality.schema import UTC_TS, schema, time_columns

TS = "event_timestamp"
CREATED = "created_timestamp"
# Training joins features at each request's time less this: the state after the entity's
# previous events, never the one being scored.
TRAINING_OFFSET = timedelta(microseconds=1)


@dataclass(frozen=True)
class ViewBatch:
    """One validated batch as a view's ``compute`` sees it.

    ``read(dataset, since, with_batch=False)``: the validated rows of ``dataset`` with event
    time at or after ``since`` (all when None), leaving out the batches still waiting for this
    view and, unless ``with_batch``, this batch itself (its rows are ``rows``)."""

    dataset: str
    rows: pl.DataFrame
    created_at: datetime
    read: Callable[..., pl.DataFrame]


@dataclass(frozen=True)
class View:
    """A feature view a use case computes: ``name`` as its Feast FeatureView is named (and its
    Dagster asset); ``datasets``, those whose batches change it."""

    name: str
    key: str
    schema: Mapping[str, pl.DataType]
    datasets: tuple[str, ...]
    compute: Callable[[ViewBatch], pl.DataFrame]
    reads: tuple[str, ...] = ()  # other datasets ``compute`` reads (reference data): lineage
    description: str = ""

    def __post_init__(self) -> None:
        for column in (self.key, TS, CREATED):
            if column not in self.schema:
                raise ValueError(f"view {self.name!r}: its schema lacks {column!r}")


def views(uc: UseCase | None = None) -> dict[str, View]:
    """The use case's views by name (the active use case by default)."""
    uc = uc or active()
    return {v.name: v for v in uc.module(uc.features.module).VIEWS}


def read_validated(
    lake: Path,
    dataset: str,
    *,
    since: datetime | None = None,
    exclude_batches: Iterable[str] = (),
) -> pl.DataFrame:
    """Validated rows of a dataset with time column >= ``since``; parquet statistics skip the rest.

    This is how a batch reads its history without touching all of it.
    """
    folder = data_root(lake) / "validated" / dataset
    excluded = set(exclude_batches)
    files = sorted(uri(p) for p in folder.glob("*.parquet") if p.stem not in excluded)
    columns = schema(dataset)
    if not files:
        return pl.DataFrame(schema=columns)
    frame = pl.scan_parquet(files)
    time_column = time_columns().get(dataset)
    if since is not None and time_column is not None:
        if since.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware (UTC)")
        frame = frame.filter(pl.col(time_column) >= since)
    return frame.select([pl.col(c).cast(t) for c, t in columns.items()]).collect()


def write_feature_file(lake: Path, view: str, batch_id: str, rows: pl.DataFrame) -> Path:
    """Write a batch's rows of a view to ``<lake>/features/<view>/<batch_id>.parquet``, atomically.

    The view's Feast source is the glob over that folder, so the file is visible once in place.
    """
    declared = dict(views()[view].schema)
    if list(rows.schema) != list(declared) or any(rows.schema[c] != t for c, t in declared.items()):
        raise ValueError(f"{view} rows do not have the declared schema {declared}")
    return write_parquet_atomic(rows, data_root(lake) / "features" / view / f"{batch_id}.parquet")


def training_entities(requests: pl.DataFrame, uc: UseCase | None = None) -> pl.DataFrame:
    """Entity rows for a training set from rows of the request dataset: every request field
    (named as the request names it; the time as the feature store's request source does) and
    ``TS``, the time to join features at, 1 µs before the request's own."""
    uc = uc or active()
    time_field = uc.timestamp_field
    fields = uc.request.fields
    time_column = fields[time_field].column_name(time_field)
    stamp = pl.col(time_column).cast(UTC_TS)
    return requests.select(
        *(pl.col(f.column_name(n)).alias(n) for n, f in fields.items() if n != time_field),
        (stamp - TRAINING_OFFSET).alias(TS),
        stamp.alias(uc.request.time_feature),
    )
