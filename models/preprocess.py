"""Turns feature rows into model tensors, identically at training and serving time.

Training hands in a Polars frame; the serving handler columns of Python values (a batch of a
few rows, where building a frame and planning Polars expressions would cost more than the
arithmetic). Both run the same NumPy arithmetic on the numbers and the same vocabulary lookup,
and a test holds the two paths equal bit for bit. Everything fitted (imputation values,
vocabularies) is plain JSON so it can sit beside a `weights_only` state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch

from models.spec import FIRST_CATEGORY_INDEX, MISSING_INDEX, OOV_INDEX, FeatureSpec
from models.tasks import of as task_of

_FLOAT64_MAX = float(np.finfo(np.float64).max)


class TabularBatch(NamedTuple):
    """Model inputs: numeric holds transformed values then missing indicators ([n, 2k])."""

    numeric: torch.Tensor
    categorical: torch.Tensor

    def to(self, device: torch.device | str) -> TabularBatch:
        return TabularBatch(self.numeric.to(device), self.categorical.to(device))

    def __len__(self) -> int:
        return int(self.numeric.shape[0])


def signed_log1p(values: np.ndarray) -> np.ndarray:
    """Compresses heavy tails (amounts, counts, ratios) so one extreme value cannot dominate."""
    finite = np.nan_to_num(values, nan=0.0, posinf=_FLOAT64_MAX, neginf=-_FLOAT64_MAX)
    return np.sign(finite) * np.log1p(np.abs(finite))


def _impute_and_compress(
    raw: np.ndarray, impute: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """(compressed values, missing flags) of float64 values: NaN becomes the training median.
    Elementwise, so a column at a time (training) and a block of columns with one median per
    column (serving) give the same numbers."""
    missing = np.isnan(raw)
    return signed_log1p(np.where(missing, impute, raw)), missing


def _category_indices(values: Sequence[Any], mapping: dict[str, int]) -> list[int]:
    """Vocabulary indices of Python values: None is ``MISSING_INDEX``, a value is looked up as
    its text (``str(v)`` where it is not text), anything else is ``OOV_INDEX``. Text is looked
    up in one ``map``; only values that missed are looked at again, one by one."""
    try:
        codes = list(map(mapping.get, values, repeat(OOV_INDEX)))
    except TypeError:  # an unhashable value
        return [_category_index(v, mapping) for v in values]
    if OOV_INDEX in codes:
        for i, v in enumerate(values):
            if codes[i] == OOV_INDEX and type(v) is not str:
                codes[i] = _category_index(v, mapping)
    return codes


def _category_index(value: Any, mapping: dict[str, int]) -> int:
    if value is None:
        return MISSING_INDEX
    return mapping.get(value if type(value) is str else str(value), OOV_INDEX)


class _Compiled(NamedTuple):
    """What every transform needs, derived once per Preprocessor (per loaded model)."""

    impute: np.ndarray  # float64, one median per numeric column
    categories: tuple[dict[str, int], ...]  # value -> index, per categorical column
    category_exprs: tuple[pl.Expr, ...]  # the same mapping as Polars expressions


@dataclass(frozen=True)
class Preprocessor:
    """Fitted imputation values and vocabularies for one FeatureSpec.

    Categorical index 0 is "missing", 1 is "unknown category" (OOV), 2.. the vocabulary.
    A numeric null (or NaN) becomes the training median plus a 1 in its indicator column.
    """

    spec: FeatureSpec
    impute: dict[str, float]
    vocab: dict[str, tuple[str, ...]]

    @classmethod
    def fit(
        cls, frame: pl.DataFrame, spec: FeatureSpec, max_categories: int = 1000
    ) -> Preprocessor:
        """Learns statistics from the training rows only, so validation and test stay unseen."""
        _require_columns(frame, spec.columns)
        impute: dict[str, float] = {}
        for name in spec.numeric:
            values = frame.get_column(name).cast(pl.Float64).to_numpy()
            values = values[np.isfinite(values)]
            impute[name] = float(np.median(values)) if values.size else 0.0
        vocab: dict[str, tuple[str, ...]] = {}
        for name in spec.categorical:
            counts = (
                frame.select(pl.col(name).cast(pl.String).alias("v"))
                .drop_nulls()
                .group_by("v")
                .agg(pl.len().alias("n"))
                .sort(["n", "v"], descending=[True, False])
                .head(max_categories)
            )
            vocab[name] = tuple(sorted(counts.get_column("v").to_list()))
        return cls(spec=spec, impute=impute, vocab=vocab)

    @property
    def n_numeric_inputs(self) -> int:
        return 2 * len(self.spec.numeric)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(len(self.vocab[name]) + FIRST_CATEGORY_INDEX for name in self.spec.categorical)

    @cached_property
    def _compiled(self) -> _Compiled:
        impute = np.array([self.impute[name] for name in self.spec.numeric], dtype=np.float64)
        categories = tuple(
            {v: i + FIRST_CATEGORY_INDEX for i, v in enumerate(self.vocab[name])}
            for name in self.spec.categorical
        )
        exprs = []
        for name, mapping in zip(self.spec.categorical, categories, strict=True):
            col = pl.col(name).cast(pl.String)
            exprs.append(
                pl.when(col.is_null())
                .then(pl.lit(MISSING_INDEX, dtype=pl.Int64))
                .otherwise(col.replace_strict(mapping, default=OOV_INDEX, return_dtype=pl.Int64))
                .alias(name)
            )
        return _Compiled(impute, categories, tuple(exprs))

    def transform(self, data: pl.DataFrame | Sequence[Mapping[str, Any]]) -> TabularBatch:
        """Rows -> tensors; unknown categories map to OOV, nulls to imputed value + indicator."""
        frame = data if isinstance(data, pl.DataFrame) else self.records_to_frame(data)
        _require_columns(frame, self.spec.columns)
        compiled = self._compiled
        n = frame.height
        k = len(self.spec.numeric)
        numeric = np.zeros((n, 2 * k), dtype=np.float32)
        for j, name in enumerate(self.spec.numeric):
            raw = frame.get_column(name).cast(pl.Float64).to_numpy()
            numeric[:, j], numeric[:, k + j] = _impute_and_compress(raw, compiled.impute[j])
        if self.spec.categorical:
            categorical = np.array(frame.select(compiled.category_exprs).to_numpy(), dtype=np.int64)
        else:
            categorical = np.zeros((n, 0), dtype=np.int64)
        return TabularBatch(
            torch.from_numpy(np.ascontiguousarray(numeric)),
            torch.from_numpy(np.ascontiguousarray(categorical)),
        )

    def transform_columns(self, columns: Mapping[str, Sequence[Any]]) -> TabularBatch:
        """``transform`` of columns of Python values (None or NaN for null), as a serving batch
        holds them: the numeric columns as one float64 block through the same arithmetic, the
        categories looked up in the same vocabularies, with no frame built."""
        _require_columns(columns, self.spec.columns)
        compiled = self._compiled
        n = len(columns[self.spec.columns[0]])
        k = len(self.spec.numeric)
        numeric = np.zeros((n, 2 * k), dtype=np.float32)
        if k:
            raw = np.array([columns[name] for name in self.spec.numeric], dtype=np.float64).T
            numeric[:, :k], numeric[:, k:] = _impute_and_compress(raw, compiled.impute)
        categorical = np.zeros((n, len(self.spec.categorical)), dtype=np.int64)
        for j, (name, mapping) in enumerate(
            zip(self.spec.categorical, compiled.categories, strict=True)
        ):
            categorical[:, j] = _category_indices(columns[name], mapping)
        return TabularBatch(torch.from_numpy(numeric), torch.from_numpy(categorical))

    def missing(self, batch: TabularBatch) -> np.ndarray:
        """Rows x ``spec.columns`` of a batch this preprocessor built: which inputs it imputed (a
        null or NaN number: its indicator column; a null category: ``MISSING_INDEX``)."""
        k = len(self.spec.numeric)
        return np.concatenate(
            [batch.numeric[:, k:].numpy() != 0, batch.categorical.numpy() == MISSING_INDEX], axis=1
        )

    def records_to_frame(self, records: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
        """Builds a frame with a fixed schema, so a batch of one row types like a million."""
        columns: dict[str, pl.Series] = {}
        for name in self.spec.numeric:
            values = [r.get(name) for r in records]
            columns[name] = pl.Series(
                name, [None if v is None else float(v) for v in values], dtype=pl.Float64
            )
        for name in self.spec.categorical:
            values = [r.get(name) for r in records]
            columns[name] = pl.Series(
                name, [None if v is None else str(v) for v in values], dtype=pl.String
            )
        return pl.DataFrame(columns)

    def labels(self, frame: pl.DataFrame) -> torch.Tensor:
        """The label as float32 (0/1 for a classifier); nulls or other values are an error,
        not a silent 0."""
        _require_columns(frame, (self.spec.label,))
        values = label_array(frame, self.spec.label, self.spec.task)
        return torch.from_numpy(values.astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "impute": dict(self.impute),
            "vocab": {k: list(v) for k, v in self.vocab.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessor:
        return cls(
            spec=FeatureSpec.from_dict(data["spec"]),
            impute={k: float(v) for k, v in data["impute"].items()},
            vocab={k: tuple(v) for k, v in data["vocab"].items()},
        )


def label_array(
    frame: pl.DataFrame, label: str = "label", task: str = "binary_classification"
) -> np.ndarray:
    """Labels as the task reads them (models.tasks): 0/1 int8 for a classifier, finite floats
    for a regressor; nulls and other values are refused."""
    return task_of(task).labels(frame.get_column(label))


def _require_columns(data: pl.DataFrame | Mapping[str, Any], names: Sequence[str]) -> None:
    present = data.columns if isinstance(data, pl.DataFrame) else data
    missing = [n for n in names if n not in present]
    if missing:
        raise KeyError(f"input is missing feature columns {missing}")
