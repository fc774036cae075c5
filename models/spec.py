"""Plain, frozen descriptions of what a model is trained on and how: no torch, no polars."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from core.usecase import UseCase, active

SPLITS = ("train", "validation", "test")
# models.tasks' task types (spec.py stays free of torch and Polars, so it names them here).
TASK_TYPES = ("binary_classification", "regression")
MISSING_INDEX = 0
OOV_INDEX = 1
FIRST_CATEGORY_INDEX = 2


@dataclass(frozen=True)
class Bucket:
    """A derived slice column ``name``: ``column`` cut at ``edges`` (left-closed bins), one
    label per bin; nulls stay null."""

    name: str
    column: str
    edges: tuple[float, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"bucket {self.name!r}: {len(self.edges)} edges need one more label")


@dataclass(frozen=True)
class Slicing:
    """What metrics are broken down by: slice columns, some of them derived ``buckets``."""

    columns: tuple[str, ...] = ()
    buckets: tuple[Bucket, ...] = ()

    @classmethod
    def of(cls, uc: UseCase) -> Slicing:
        declared = uc.evaluation
        return cls(
            columns=declared.slices,
            buckets=tuple(
                Bucket(name, b.column, b.edges, b.labels) for name, b in declared.buckets.items()
            ),
        )


NO_SLICES = Slicing()


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns feed the model; the feature store owns the list, so it is passed in."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label: str = "label"
    # What the model predicts (models.tasks): saved with the model, so it knows its own task.
    task: str = "binary_classification"

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise ValueError(f"unknown task type {self.task!r}; expected one of {TASK_TYPES}")
        names = (*self.numeric, *self.categorical)
        if not names:
            raise ValueError("FeatureSpec needs at least one feature column")
        if len(set(names)) != len(names):
            raise ValueError(f"FeatureSpec lists a column twice: {names}")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "label": self.label,
            "task": self.task,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(
            numeric=tuple(data["numeric"]),
            categorical=tuple(data["categorical"]),
            label=data.get("label", "label"),
            task=data.get("task", "binary_classification"),  # models saved before tasks
        )


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run; the orchestration layer maps its dg.Config onto this.

    `embedding_dim=None` sizes each embedding from its vocabulary; the baseline sets
    `hidden=()` and `embedding_dim=1`, which makes the same network a logistic regression.

    Sized for a few hundred positives, which is what a retraining sees (decision 16): a
    one-layer MLP, 4-wide embeddings and a positive-class weight capped at 10. The full
    n_neg / n_pos (~90 at 1% fraud) let a few hundred positives dominate the loss and its
    validation value, so training stopped on noise after 2-6 epochs and lost to the baseline.

    `recency_half_life_days` weights each train row's loss by 0.5 ** (age / half-life), age
    counted back from the newest train row, so a changed world outweighs the old one sooner
    than its rows outnumber it. None trains every row alike.
    """

    seed: int = 0
    epochs: int = 30
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (32,)
    dropout: float = 0.1
    embedding_dim: int | None = None
    max_embedding_dim: int = 4
    max_categories: int = 1000
    oov_rate: float = 0.01
    patience: int = 3
    min_delta: float = 1e-4
    imbalance: Literal["pos_weight", "focal", "none"] = "pos_weight"
    max_pos_weight: float = 10.0
    focal_gamma: float = 2.0
    calibrate: bool = True
    numeric_clip: float = 8.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = 65536
    recency_half_life_days: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0:
            raise ValueError("epochs and batch_size must be >= 1 and patience >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.oov_rate < 1.0:
            raise ValueError("dropout and oov_rate must lie in [0, 1)")
        if self.imbalance not in ("pos_weight", "focal", "none"):
            raise ValueError(f"unknown imbalance strategy {self.imbalance!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}")
        half_life = self.recency_half_life_days
        if half_life is not None and not (isinstance(half_life, int | float) and half_life > 0):
            raise ValueError(f"recency_half_life_days must be > 0 or None, got {half_life!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "hidden" in kwargs:
            kwargs["hidden"] = tuple(kwargs["hidden"])
        return cls(**kwargs)


CATEGORICAL_DTYPES = frozenset({"String"})


def feature_spec_from_fields(
    schema: Iterable[tuple[str, str]],
    *,
    request_numeric: Sequence[str] = (),
    request_categorical: Sequence[str] = (),
    label: str = "label",
    task: str = "binary_classification",
) -> FeatureSpec:
    """A feature store's fields, given as (name, dtype name), as a FeatureSpec.

    String fields are categorical; numbers and booleans are numeric. Request-time columns
    (what the request itself carries) follow the stored features; a name seen twice keeps
    its first kind and place, so the column order, and with it the model's inputs, is stable.
    """
    kinds: dict[str, bool] = {}
    for name, dtype in schema:
        kinds.setdefault(name, dtype in CATEGORICAL_DTYPES)
    for name in request_numeric:
        kinds.setdefault(name, False)
    for name in request_categorical:
        kinds.setdefault(name, True)
    return FeatureSpec(
        numeric=tuple(n for n, cat in kinds.items() if not cat),
        categorical=tuple(n for n, cat in kinds.items() if cat),
        label=label,
        task=task,
    )


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate. Gains are in metric units (PR-AUC 0.005 = half a point; MAE in
    the target's units)."""

    # "" is the task's own (models.tasks): PR-AUC for a classifier, MAE for a regressor.
    primary_metric: str = ""
    min_gain_over_baseline: float = 0.0
    min_gain_over_champion: float = 0.002
    # Below this many positives in the test split the metric is noise (decision 16): no verdict.
    min_test_positives: int = 30
    # A regressor's metric needs rows rather than positives.
    min_test_rows: int = 200
    # Slices (models.slice_compare): a slice regresses only when the one-sided upper bound of
    # the challenger's gain over the reference, from a paired bootstrap of its rows at
    # family-wise confidence 1 - slice_alpha over the compared slices, lies below
    # -slice_tolerance. Below the floors, or with a bound further than
    # slice_max_margin_tolerances tolerances from its estimate, a slice has "not enough support".
    slice_metric: str | None = None
    slice_tolerance: float = 0.05
    slice_min_support: int = 50
    slice_min_positives: int = 10
    slice_alpha: float = 0.05
    slice_max_margin_tolerances: float = 2.0
    slice_bootstrap_draws: int = 400
    slice_seed: int = 0
    # When no slice has support to be compared with the champion: "block" (rejected until
    # more labels arrive, or promoted by a person with --force and a reason) or "warn"
    # (promotable, the verdict "not enough support" recorded in the registry and on the card).
    # A first model (no champion) is promotable either way, with that verdict (decision 54).
    slices_unsupported: Literal["block", "warn"] = "block"
    max_model_bytes: int = 50 * 2**20
    max_latency_ms_batch1: float = 25.0
    max_latency_ms_batch64: float = 60.0
    # Customers meet the slow tail: the budget holds the p95, of enough repeats that it is the
    # tenth slowest call, not the one a scheduling pause on a shared host made slow.
    latency_percentile: str = "p95"
    latency_repeats: int = 200
    latency_warmup: int = 5
    latency_threads: int = 1

    def __post_init__(self) -> None:
        if self.slices_unsupported not in ("block", "warn"):
            raise ValueError(
                f"slices_unsupported must be 'block' or 'warn', got {self.slices_unsupported!r}"
            )
        if not 0.0 < self.slice_alpha < 1.0:
            raise ValueError(f"slice_alpha must lie in (0, 1), got {self.slice_alpha}")
        if self.slice_tolerance < 0 or self.slice_max_margin_tolerances <= 0:
            raise ValueError("slice_tolerance must be >= 0 and slice_max_margin_tolerances > 0")
        if self.slice_bootstrap_draws < 50:
            raise ValueError("slice_bootstrap_draws must be >= 50 to estimate a spread")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_spec_of_service(
    service: Any, uc: UseCase | None = None, label: str = "label"
) -> FeatureSpec:
    """The model's inputs: a Feast FeatureService's features (read from its
    ``feature_view_projections``, so no Feast import here) plus the request's own model
    inputs (``request.model_inputs`` of the use case, the active one by default)."""
    uc = uc or active()
    schema = [
        (f.name, str(f.dtype))
        for projection in service.feature_view_projections
        for f in projection.features
    ]
    inputs = {name: uc.request.fields[name].type for name in uc.request.model_inputs}
    return feature_spec_from_fields(
        schema,
        request_numeric=[n for n, kind in inputs.items() if kind == "number"],
        request_categorical=[n for n, kind in inputs.items() if kind == "category"],
        label=label,
        task=uc.task.type,
    )
