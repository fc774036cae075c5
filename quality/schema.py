"""The datasets of the use case that runs, as Polars schemas.

A use case declares its datasets in its ``usecase.yaml`` (``core.usecase``): columns and types,
keys, event time, drift columns. This module turns that declaration into what ingestion, the
contracts and the drift profile work with. ``uc`` defaults to the active use case.
"""

from __future__ import annotations

import polars as pl

from core.usecase import UseCase, active

UTC_TS = pl.Datetime("us", "UTC")
DTYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "float": pl.Float64(),
    "int": pl.Int64(),
    "bool": pl.Boolean(),
    "timestamp": UTC_TS,
}


def schemas(uc: UseCase | None = None) -> dict[str, dict[str, pl.DataType]]:
    """Every dataset's columns and Polars types, in declaration order."""
    uc = uc or active()
    return {
        name: {col: DTYPES[kind] for col, kind in ds.columns.items()}
        for name, ds in uc.datasets.items()
    }


def schema(dataset: str, uc: UseCase | None = None) -> dict[str, pl.DataType]:
    return schemas(uc)[dataset]


def datasets(uc: UseCase | None = None) -> tuple[str, ...]:
    return tuple((uc or active()).datasets)


def keys(uc: UseCase | None = None) -> dict[str, str]:
    """Primary key per dataset: never null, unique within a batch."""
    return {name: ds.key for name, ds in (uc or active()).datasets.items()}


def time_columns(uc: UseCase | None = None) -> dict[str, str | None]:
    """Event-time column per dataset (None for reference data)."""
    return {name: ds.event_time for name, ds in (uc or active()).datasets.items()}


def drift_columns(
    dataset: str, uc: UseCase | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(numeric, categorical) columns profiled per batch of ``dataset``; both empty when none."""
    ds = (uc or active()).datasets.get(dataset)
    return (ds.drift.numeric, ds.drift.categorical) if ds else ((), ())


def dataset_of(filename: str, uc: UseCase | None = None) -> str | None:
    """The dataset a landed file belongs to, from its name prefix (``<dataset>-*.parquet``)."""
    stem = filename.split("-", 1)[0].split(".", 1)[0].lower()
    return stem if stem in (uc or active()).datasets else None
