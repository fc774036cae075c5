"""Backtest: replay a scenario through the platform's own code in simulated time, no servers.

What it answers: with a retraining policy, how good is the *served* model while the world
changes, and how fast does it recover after drift. One scenario of the active use case is
generated (its simulator, ``core.simulation``), its features are computed with the use case's
views, applied to a Feast repo in a temporary home, and every request is joined once to its
point-in-time features through the training FeatureService (``historical_features``).
Point-in-time features are what serving with perfectly fresh features sees and what any later
training set holds, so that one frame serves every step of every policy.

Then simulated time advances one scenario batch (a day) per step. At each step the champion
scores the step's requests (the served predictions); labels whose arrival time has passed
become known; the policy gathers its signals from what is known (new labels, PSI of the
served features against the champion's training data via ``serving_drift``, the live metric on
matured labels against the offline figure, the schedule) and asks
``orchestration.triggers.decide`` (cooldown in simulated time). A retraining builds the
training set as of now (matured labels only; the use case's declared ``training_set`` window
unless the policy sets its own), trains candidate and baseline with ``models.train``,
evaluates candidate, baseline and champion on the candidate's test split and applies
``models.gate.validate_challenger``; it promotes on pass and the new champion serves from the
next step. The gate's infrastructure checks (reload, size, latency) are not replayed: every
candidate is reported servable (``INFRA_NOT_REPLAYED``).

The live metric is the task's primary one (``models.tasks``: a classifier's PR-AUC, higher is
better; a regressor's MAE, lower is better), computed at the end with full ground truth per
request-time cohort (one step), pooled over a trailing window because ~20 frauds a day make
one day's PR-AUC noisy; the window never straddles the drift start. Beside it, the label-free
estimate of the same predictions: CBPE's expected average precision for a classifier, the
expected MAE for a regressor (each prediction expects the |error| its decile had on the
serving champion's test split, ``models.tasks.expected_errors``). Every figure is read in the
metric's direction: "recovered" means back within ``recovery_fraction`` of the pre-drift level
as a ratio of quality, i.e. at least ``fraction x level`` for a higher-is-better metric and at
most ``level / fraction`` for a lower-is-better one.

Plain Python: no Dagster, no TorchServe. It lives in ``orchestration`` because it composes
every package; import it inside functions of Dagster modules (it pulls in torch and Feast).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core import simulation
from core.usecase import active
from features.store import SERVICE, apply_definitions, feature_store, historical_features
from features.training_set import (
    LABEL,
    SplitPolicy,
    assign_splits,
    drift_reference,
    entity_columns,
    labelled_requests,
)
from features.views import TS, ViewBatch, training_entities, views, write_feature_file
from models.evaluate import EvaluationReport, evaluate_model, predict
from models.gate import InfraReport, validate_challenger
from models.metrics import average_precision, expected_average_precision
from models.spec import FeatureSpec, GatePolicy, TrainConfig, feature_spec_of_service
from models.tasks import (
    BINARY,
    ErrorCurve,
    Task,
    expected_errors,
    metric_label,
    regression_metrics,
)
from models.tasks import lower_is_better as metric_lower_is_better
from models.tasks import of as task_of
from models.train import TrainResult, train_baseline, train_model
from orchestration.triggers import (
    Signal,
    TriggerPolicy,
    decay_signal,
    decide,
    drift_signal,
    estimated_decay_signal,
    new_data_signal,
)
from quality.schema import schema
from serving.monitoring import live_quality, log_columns, serving_drift

POLICY_KINDS: tuple[str, ...] = ("static", "nightly", "triggers")
DRIFT_OR_DECAY = frozenset({"drift", "decay"})
INFRA_NOT_REPLAYED = (
    "the gate's infrastructure checks (reload, size, latency) are not replayed: "
    "every candidate counts as servable"
)
_SERVABLE = InfraReport(
    True, True, 0.0, 0, {"1": {"p50": 0.0, "p95": 0.0}, "64": {"p50": 0.0, "p95": 0.0}}
)
SCORE = log_columns().score
# A regressor's served rows carry each prediction's label-free expected |error| (the serving
# champion's error curve): the expected MAE of any pool of them is their mean.
EXPECTED = "expected_abs_error"


def _task() -> Task:
    """The active use case's task: its primary metric, direction, label and count."""
    return task_of(active().task.type)


def _binary() -> bool:
    return _task().name == BINARY


def _truth() -> tuple[str, str]:
    """The label column and its arrival time (the label dataset's), of the active use case."""
    label = active().label
    return label.column, label.time


def _key() -> str:
    """The request dataset's key: one row of the world per request."""
    return active().request_dataset.key


# -- the live metric, in the task's terms ---------------------------------------------------


def metric_of(y: np.ndarray, p: np.ndarray) -> float:
    """The task's primary metric of labelled predictions: a classifier's PR-AUC (NaN without
    a positive), a regressor's MAE (NaN without a row)."""
    if _binary():
        return average_precision(y, p)
    return float(regression_metrics(y, p)[_task().primary_metric])


def count_of(y: np.ndarray) -> int:
    """What a figure rests on (the task's count): a classifier's positives, a regressor's
    rows."""
    return int(np.sum(y)) if _binary() else int(np.size(y))


def _lower(metric: str | None) -> bool:
    return metric_lower_is_better(metric or _task().primary_metric)


def quality_ratio(value: float, level: float, metric: str | None = None) -> float:
    """``value`` as a share of ``level`` in quality, 1 as good and under 1 worse:
    ``value / level``, or ``level / value`` for a lower-is-better metric (the task's primary
    one by default)."""
    return level / value if _lower(metric) else value / level


def recovery_target(level: float, fraction: float, metric: str | None = None) -> float:
    """The figure a cohort must reach to count as recovered, a quality ratio of ``fraction``
    to ``level``: at least ``fraction x level`` (PR-AUC), at most ``level / fraction`` (MAE)."""
    return level / fraction if _lower(metric) else fraction * level


def reaches(value: float, target: float, metric: str | None = None) -> bool:
    """Whether ``value`` is at least as good as ``target`` in the metric's direction."""
    return value <= target if _lower(metric) else value >= target


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Adaptation:
    """How a retraining builds and weights its training set (the options issue 14 adds).

    ``held_out``: validation and test are the newest rows holding that many of the task's count
    each (positives for a classifier, rows for a regressor); ``window_days``: only labelled rows
    that recent; ``recency_half_life_days``: recency weights; ``presume_negative_days`` (a
    classifier's): a request that old counts as negative until a positive label arrives. An
    option left None is the use case's declared one (``BacktestConfig.training_set``).
    """

    held_out: int | None = None
    window_days: float | None = None
    recency_half_life_days: float | None = None
    presume_negative_days: float | None = None

    def __post_init__(self) -> None:
        if self.presume_negative_days is not None and not _binary():
            raise ValueError(
                "presume_negative_days is for a classifier's labels; "
                f"this use case's task is {_task().name}"
            )

    @classmethod
    def declared(cls) -> Adaptation:
        """The active use case's ``training_set`` block, as far as the backtest replays it."""
        block = active().training_set
        return cls(
            held_out=block.get("held_out_positives"),
            window_days=block.get("window_days"),
            presume_negative_days=block.get("presume_negative_after_days"),
        )

    def over(self, base: Adaptation) -> Adaptation:
        """These options, and ``base``'s where these set none."""
        chosen = {f.name: getattr(self, f.name) for f in fields(self)}
        return Adaptation(**{k: getattr(base, k) if v is None else v for k, v in chosen.items()})

    @property
    def presume_negative_after(self) -> timedelta | None:
        days = self.presume_negative_days
        return timedelta(days=days) if days is not None else None

    def split(self, rows: pl.DataFrame) -> pl.DataFrame:
        """``rows`` within the window, with ``split`` (train, validation, test in time)."""
        window = timedelta(days=self.window_days) if self.window_days else None
        # A held-out count is positives for a classifier, rows for a regressor (split_cuts).
        return assign_splits(rows, SplitPolicy(held_out_positives=self.held_out, window=window))

    def train_config(self, base: TrainConfig) -> TrainConfig:
        if self.recency_half_life_days is None:
            return base
        if "recency_half_life_days" not in {f.name for f in fields(TrainConfig)}:
            raise ValueError("this TrainConfig has no recency_half_life_days option")
        return replace(base, recency_half_life_days=self.recency_half_life_days)  # type: ignore[call-arg]

    @property
    def suffix(self) -> str:
        parts = []
        if self.held_out is not None:
            parts.append(f"+hold{self.held_out}")
        if self.window_days is not None:
            parts.append(f"+win{self.window_days:g}d")
        if self.recency_half_life_days is not None:
            parts.append(f"+hl{self.recency_half_life_days:g}d")
        if self.presume_negative_days is not None:
            parts.append(f"+presume{self.presume_negative_days:g}d")
        return "".join(parts)


@dataclass(frozen=True)
class PolicySpec:
    """A retraining policy: ``static`` (the first model forever), ``nightly`` (a retraining
    every simulated day) or ``triggers`` (Loopline's sensor: new data, drift, decay), each
    with optional adaptation options. Spelled ``triggers+hold100+win21d+hl7d`` on the CLI."""

    kind: str
    adaptation: Adaptation = Adaptation()

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy must be one of {POLICY_KINDS}, got {self.kind!r}")

    @property
    def name(self) -> str:
        return self.kind + self.adaptation.suffix

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        kind, *options = text.strip().split("+")
        values: dict[str, Any] = {}
        for option in options:
            for prefix, key, cast in (
                ("hold", "held_out", int),
                ("win", "window_days", float),
                ("hl", "recency_half_life_days", float),
                ("presume", "presume_negative_days", float),
            ):
                if option.startswith(prefix):
                    values[key] = cast(option[len(prefix) :].rstrip("d"))
                    break
            else:
                raise ValueError(f"unknown policy option {option!r} in {text!r}")
        return cls(kind, Adaptation(**values))


@dataclass(frozen=True)
class BacktestConfig:
    """The scenario and how it is replayed, in scenario batches (steps).

    The first ``burn_in_batches`` only give the features their history: rolling windows reach
    back (the fraud demo's 30 days, and its merchant chargeback counts need labels, which
    arrive days late), so rows of a scenario's first weeks carry immature features that no
    steady-state platform trains on or serves (drift on them against later serving is 0.2-6
    PSI). Training sets start after it. The first champion is trained at the end of the next
    ``warmup_batches``, then ``batches`` steps are served. ``training_set``: what a retraining
    builds where its policy sets no option (the use case's declared ``training_set``).
    """

    scenario: Any  # the use case simulator's ScenarioConfig
    burn_in_batches: int = 40
    warmup_batches: int = 28
    batches: int = 30
    smoothing_batches: int = 3
    label_maturity: timedelta = field(default_factory=lambda: active().label_maturity)
    decay_window: timedelta = timedelta(days=7)
    # The use case's declared policies (its `retrain:`, `gate:` and `training:` blocks).
    triggers: TriggerPolicy = field(
        default_factory=lambda: active().declared("retrain", TriggerPolicy)
    )
    gate: GatePolicy = field(default_factory=lambda: active().declared("gate", GatePolicy))
    train: TrainConfig = field(
        default_factory=lambda: active().declared("training", TrainConfig, device="cpu")
    )
    training_set: Adaptation = field(default_factory=Adaptation.declared)
    recovery_fraction: float = 0.9
    # Issue 14's deadline: recovered within this many label-maturity periods of the drift.
    recovery_periods: float = 3.0
    reference_rows: int = 50_000
    # These small networks train faster on one thread than on two contending for a 2-core
    # host (measured 7.7 s against 25 s for one fit under load); None leaves torch's setting.
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.warmup_batches < 1 or self.batches < 1 or self.smoothing_batches < 1:
            raise ValueError("warmup_batches, batches and smoothing_batches must be >= 1")
        if self.burn_in_batches < 0:
            raise ValueError("burn_in_batches must be >= 0")
        if self.scenario.drift != "none" and self.drift_step >= self.total_batches:
            raise ValueError("the drift starts after the last served step: serve more steps")
        if not 0 < self.recovery_fraction <= 1:
            raise ValueError("recovery_fraction must be in (0, 1]")
        if self.recovery_periods <= 0:
            raise ValueError("recovery_periods must be > 0")

    @property
    def recovery_deadline_steps(self) -> int:
        """Steps from the drift start to the recovery deadline (at least one: the drift's own
        step, when label-maturity periods are shorter than a step)."""
        steps = round(self.recovery_periods * self.label_maturity / self.scenario.batch_span)
        return max(1, steps)

    @property
    def first_step(self) -> int:
        """The first served step; the first champion is trained at the end of the one before."""
        return self.burn_in_batches + self.warmup_batches

    @property
    def total_batches(self) -> int:
        return self.first_step + self.batches

    @property
    def drift_step(self) -> int:
        """The step the drift starts at (nominal when the scenario has no drift)."""
        return max(self.scenario.drift_start_batch, self.first_step)


# Fields of a simulator's ``BACKTEST`` besides its ScenarioConfig's: the days before the first
# champion (feature burn-in, then warm-up), which depend on its features' windows.
SHAPE_FIELDS = ("burn_in_days", "warmup_days")


def demo_config(
    drift: str = "none",
    *,
    drift_strength: float = 1.0,
    seed: int = 3,
    days: int = 30,
    drift_after: int = 5,
    burn_in_days: int | None = None,
    warmup_days: int | None = None,
    scenario: Mapping[str, Any] | None = None,
    **options: Any,
) -> BacktestConfig:
    """``loopline backtest``'s scenario for the active use case, in one-day steps: its
    simulator's ``BACKTEST`` shape (ScenarioConfig fields, e.g. the fraud demo's ~2,000
    transactions and ~20 frauds a day, and ``SHAPE_FIELDS``: 40 burn-in and 28 warm-up days
    unless it says otherwise), ``days`` served days after the first champion, drift
    ``drift_after`` days into them. ``scenario``: more ScenarioConfig fields; ``options``:
    other BacktestConfig fields."""
    declared = dict(getattr(simulation.simulator_module(), "BACKTEST", {}))
    shape = {k: declared.pop(k) for k in SHAPE_FIELDS if k in declared}
    burn_in = shape.get("burn_in_days", 40) if burn_in_days is None else burn_in_days
    warm_up = shape.get("warmup_days", 28) if warmup_days is None else warmup_days
    fields_ = {"rows_per_batch": 2000, **declared, **(scenario or {})}
    config = simulation.scenario(
        seed=seed,
        start=datetime(2024, 1, 1, tzinfo=UTC),
        batch_span=timedelta(days=1),
        drift=drift,
        drift_start_batch=burn_in + warm_up + drift_after,
        drift_strength=drift_strength,
        **fields_,
    )
    return BacktestConfig(
        config,
        burn_in_batches=burn_in,
        warmup_batches=warm_up,
        batches=days,
        **options,
    )


# -- the world: every transaction with its point-in-time features ---------------------------


@dataclass(frozen=True)
class World:
    """Every transaction of the scenario, its features as of just before it, and its truth.

    ``rows``: ``entity_columns()``, the FeatureService's features, the label column and its
    arrival time (the label dataset's), and ``step`` (the batch index), in time order.
    """

    rows: pl.DataFrame
    spec: FeatureSpec
    windows: tuple[tuple[datetime, datetime], ...]
    history_start: datetime
    seconds: float

    def step_rows(self, step: int) -> pl.DataFrame:
        return self.rows.filter(pl.col("step") == step)


def build_world(config: BacktestConfig) -> World:
    """Generate the scenario, compute and store its features, join every transaction once."""
    started = time.perf_counter()
    uc = active()
    sim = simulation.simulator_module(uc).Simulator(config.scenario)
    total = config.total_batches
    requests, key = uc.request.dataset, _key()
    tx = pl.concat([sim.events(k)[requests] for k in range(total)]).sort(TS, key)
    truth = pl.concat([sim.truth(k) for k in range(total)])
    created = sim.window(total - 1)[1]
    with tempfile.TemporaryDirectory(prefix="loopline-backtest-") as tmp:
        home = Path(tmp)
        known = {
            requests: tx.clear(),  # the whole scenario is the one batch: no history
            uc.label.dataset: truth,
            **sim.reference(),
        }

        def read(dataset: str, since: datetime | None = None, *, with_batch: bool = False):
            return known[dataset]

        for view in views().values():
            rows = view.compute(ViewBatch(requests, tx, created, read))
            write_feature_file(home, view.name, "backtest", rows)
        store = feature_store(home)
        apply_definitions(store)
        joined = historical_features(store, training_entities(tx), SERVICE)
        spec = _feature_spec(store)
    entity = set(training_entities(tx.head(0)).columns)
    features = [c for c in joined.columns if c not in entity]
    span_us = config.scenario.batch_span // timedelta(microseconds=1)
    rows = (
        joined.with_columns(pl.col(uc.request.time_feature).alias(TS))
        .select(*entity_columns(), *features)
        .join(truth.select(uc.label.key, *_truth()), left_on=key, right_on=uc.label.key, how="left")
        .with_columns(
            ((pl.col(TS) - pl.lit(sim.start)).dt.total_microseconds() // span_us)
            .cast(pl.Int64)
            .alias("step")
        )
        .sort(TS, key)
    )
    windows = tuple(sim.window(k) for k in range(total))
    history_start = windows[config.burn_in_batches][0]
    return World(rows, spec, windows, history_start, time.perf_counter() - started)


def _feature_spec(store: Any) -> FeatureSpec:
    return feature_spec_of_service(store.get_feature_service(SERVICE))


def known_labels(world: World, now: datetime) -> pl.DataFrame:
    """Labels that have arrived before ``now`` (schema ``labels``)."""
    label = active().label
    return world.rows.filter(pl.col(label.time) < now).select(list(schema(label.dataset)))


def training_frame(
    world: World, now: datetime, adaptation: Adaptation, label_maturity: timedelta
) -> pl.DataFrame:
    """The training set a retraining at ``now`` builds: requests before now with matured
    labels, their features, split as the adaptation says (``Adaptation.split``). Rows of the
    burn-in are left out: their features are immature."""
    seen = world.rows.filter((pl.col(TS) >= world.history_start) & (pl.col(TS) < now))
    seen = seen.drop(*_truth(), "step")
    labelled = labelled_requests(
        seen,
        known_labels(world, now),
        label_maturity=label_maturity,
        presume_negative_after=adaptation.presume_negative_after,
    )
    keys = entity_columns()
    features = [c for c in seen.columns if c not in keys]
    rows = labelled.select(*keys, *features, LABEL).sort(TS, _key())
    return adaptation.split(rows)


# -- training, cached across policies -------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """Candidate and baseline trained at one step, evaluated on the candidate's test split."""

    frame: pl.DataFrame
    candidate: TrainResult
    baseline: TrainResult
    candidate_report: EvaluationReport
    baseline_report: EvaluationReport
    seconds: float


class Trainer:
    """Trains at most once per (step, adaptation): the training set and both models depend
    only on what is known at that step, not on the policy, so policies share them. Each policy
    is still charged the training's seconds. A policy's options go over the use case's
    declared training set (``BacktestConfig.training_set``)."""

    def __init__(self, world: World, config: BacktestConfig) -> None:
        self.world = world
        self.config = config
        self._cache: dict[tuple[int, Adaptation], Trained | str] = {}

    @property
    def trainings(self) -> tuple[Trained, ...]:
        """The distinct trainings run so far (each a candidate and a baseline)."""
        return tuple(t for t in self._cache.values() if isinstance(t, Trained))

    def at(self, step: int, adaptation: Adaptation) -> Trained | str:
        """The training at the end of ``step``, or why there is none."""
        key = (step, adaptation.over(self.config.training_set))
        if key not in self._cache:
            self._cache[key] = self._train(*key)
        return self._cache[key]

    def _train(self, step: int, adaptation: Adaptation) -> Trained | str:
        now = self.world.windows[step][1]
        started = time.perf_counter()
        try:
            frame = training_frame(self.world, now, adaptation, self.config.label_maturity)
            config = adaptation.train_config(self.config.train)
            candidate = train_model(frame, self.world.spec, config)
            baseline = train_baseline(frame, self.world.spec, config)
            cand_report = evaluate_model(
                candidate.model, candidate.preprocessor, frame, name="challenger"
            )
            base_report = evaluate_model(
                baseline.model, baseline.preprocessor, frame, name="baseline"
            )
        except ValueError as exc:  # too few labelled rows (or positives) for a split
            return f"training failed: {exc}"
        seconds = time.perf_counter() - started
        return Trained(frame, candidate, baseline, cand_report, base_report, seconds)


# -- one policy through simulated time ------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    """The served model and what monitoring compares it with."""

    version: str
    trained: Trained
    reference: pl.DataFrame
    reference_scores: np.ndarray

    @property
    def offline(self) -> float:
        """The task's primary metric on the champion's test split: what decay compares with."""
        return float(self.trained.candidate_report.metrics[_task().primary_metric])

    @property
    def offline_se(self) -> float:
        metric = _task().primary_metric
        return float(self.trained.candidate_report.metrics.get(f"{metric}_se", math.nan))

    @property
    def error_curve(self) -> ErrorCurve | None:
        """A regressor's |error| by prediction decile on its test split: the reference of the
        label-free expected MAE (None for a classifier)."""
        curve = self.trained.candidate_report.error_curve
        return ErrorCurve.from_dict(curve) if curve else None

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        model = self.trained.candidate
        return predict(model.model, model.preprocessor, frame)

    def serve(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` with the served score, the version and, for a regressor, each
        prediction's expected |error| (``EXPECTED``)."""
        scores = self.score(frame)
        served = frame.with_columns(pl.Series(SCORE, scores), pl.lit(self.version).alias("version"))
        curve = self.error_curve
        if curve is None:
            return served
        return served.with_columns(pl.Series(EXPECTED, expected_errors(curve, scores)))


@dataclass(frozen=True)
class Retraining:
    """One retraining a policy started: when, why, and what the gate said; the candidate's,
    champion's and baseline's figures on the candidate's test split are the task's ``metric``
    (``Task.gain`` reads them in its direction)."""

    step: int
    at: datetime
    trigger: str
    reason: str
    passed: bool
    promoted: bool
    reasons: tuple[str, ...]
    version: str | None = None
    candidate_value: float | None = None
    champion_value: float | None = None
    baseline_value: float | None = None
    seconds: float = 0.0
    train_end: datetime | None = None
    drifted_train_share: float | None = None
    metric: str = field(default_factory=lambda: _task().primary_metric)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["at"] = self.at.isoformat()
        out["train_end"] = self.train_end.isoformat() if self.train_end else None
        out["reasons"] = list(self.reasons)
        return out


@dataclass
class _State:
    champion: Champion
    last_started: datetime
    last_drift: datetime | None = None
    versions: int = 1
    retrainings: list[Retraining] = field(default_factory=list)
    served: list[pl.DataFrame] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    worst_psi: list[tuple[str, float]] = field(default_factory=list)


def _champion_of(trained: Trained, version: str, reference_rows: int) -> Champion:
    columns = trained.candidate.preprocessor.spec.columns
    # Training frames start after the burn-in already: no warm-up to leave out here.
    train = drift_reference(trained.frame, reference_rows).select(columns)
    model = trained.candidate
    test = trained.frame.filter(pl.col("split") == "test")
    scores = predict(model.model, model.preprocessor, test)
    return Champion(version, trained, train, scores)


def gather_signals(
    policy: PolicySpec,
    state: _State,
    world: World,
    config: BacktestConfig,
    step: int,
    psi: dict[str, float],
) -> list[Signal | None]:
    """What the retraining sensor (or the nightly schedule) would see at the end of ``step``;
    ``psi``: the step's served features and score against the champion's training data."""
    if policy.kind == "static":
        return []
    if policy.kind == "nightly":
        return [Signal("schedule", "nightly schedule")]
    now = world.windows[step][1]
    rules = config.triggers
    arrived = world.rows.filter(
        pl.col(_truth()[1]).is_between(state.last_started, now, closed="left")
    ).height
    return [
        new_data_signal(arrived, rules),
        drift_signal(psi, rules),
        *_decay(state, now, config),
    ]


def served_psi(champion: Champion, spec: FeatureSpec, served: pl.DataFrame) -> dict[str, float]:
    """PSI per served feature and of the score, against the champion's training data."""
    features = serving_drift(
        champion.reference, served.select(spec.columns), list(spec.numeric), list(spec.categorical)
    )
    score = serving_drift(
        pl.DataFrame({SCORE: champion.reference_scores}), served.select(SCORE), [SCORE], []
    )
    return {f.feature: f.psi for f in [*features.features, *score.features]}


def _decay(state: _State, now: datetime, config: BacktestConfig) -> list[Signal | None]:
    """Decay as the sensor reads it from ``live_quality``: the realised metric of the
    champion's label-mature cohort, and the label-free estimate (CBPE, or the expected MAE by
    the champion's error curve) on its predictions not labelled yet."""
    if not state.served:
        return []
    mine = pl.concat(state.served[-_steps_back(config) :]).filter(
        pl.col("version") == state.champion.version
    )
    task, (label, label_time) = _task(), _truth()
    predictions = mine.select(
        pl.col(TS).alias(log_columns().time),
        SCORE,
        pl.when(pl.col(label_time) < now).then(pl.col(label).cast(task.label_dtype)).alias("label"),
    )
    champion, rules = state.champion, config.triggers
    quality = live_quality(
        predictions,
        now,
        label_maturity=config.label_maturity,
        window=config.decay_window,
        task=task.name,
        reference=champion.error_curve,
    )
    offline, offline_se, metric = champion.offline, champion.offline_se, task.primary_metric
    return [
        decay_signal(
            quality.value,
            offline,
            quality.labelled,
            rules,
            positives=quality.positives,
            live_se=quality.value_se,
            offline_se=offline_se,
            metric=metric,
        ),
        estimated_decay_signal(
            quality.estimated_unlabelled,
            offline,
            quality.recent,
            rules,
            estimate_se=quality.estimated_unlabelled_se,
            offline_se=offline_se,
            metric=metric,
        ),
    ]


def _steps_back(config: BacktestConfig) -> int:
    span = config.scenario.batch_span
    return math.ceil((config.label_maturity + config.decay_window) / span) + 1


def _retrain(
    state: _State,
    trainer: Trainer,
    policy: PolicySpec,
    step: int,
    signal: Signal,
    drift_start: datetime | None,
) -> None:
    now = trainer.world.windows[step][1]
    state.last_started = now
    if signal.kind == "drift":
        state.last_drift = now
    trained = trainer.at(step, policy.adaptation)
    if isinstance(trained, str):
        state.retrainings.append(
            Retraining(step, now, signal.kind, signal.reason, False, False, (trained,))
        )
        return
    champ = state.champion.trained.candidate
    champion_report = evaluate_model(
        champ.model, champ.preprocessor, trained.frame, name="champion"
    )
    decision = validate_challenger(
        trained.candidate_report,
        trained.baseline_report,
        champion_report,
        _SERVABLE,
        trainer.config.gate,
    )
    version = None
    if decision.passed:
        state.versions += 1
        version = f"v{state.versions:04d}"
        state.champion = _champion_of(trained, version, trainer.config.reference_rows)
    train = trained.frame.filter(pl.col("split") == "train")
    share = (
        train.filter(pl.col(TS) >= drift_start).height / train.height
        if drift_start is not None and train.height
        else None
    )
    metric = _task().primary_metric
    state.retrainings.append(
        Retraining(
            step=step,
            at=now,
            trigger=signal.kind,
            reason=signal.reason,
            passed=decision.passed,
            promoted=decision.passed,
            reasons=tuple(decision.reasons),
            version=version,
            candidate_value=float(trained.candidate_report.metrics[metric]),
            champion_value=float(champion_report.metrics[metric]),
            baseline_value=float(trained.baseline_report.metrics[metric]),
            seconds=trained.seconds,
            train_end=train[TS].max() if train.height else None,
            drifted_train_share=share,
        )
    )


def run_policy(
    world: World,
    config: BacktestConfig,
    policy: PolicySpec,
    trainer: Trainer,
    first: Trained,
    on_step: Callable[[], None] | None = None,
) -> PolicyResult:
    """Serve, monitor and retrain through every step; the live metric comes at the end."""
    drift_start = world.windows[config.drift_step][0] if config.scenario.drift != "none" else None
    start_step = config.first_step
    state = _State(
        champion=_champion_of(first, "v0001", config.reference_rows),
        last_started=world.windows[start_step - 1][1],
    )
    for step in range(start_step, start_step + config.batches):
        now = world.windows[step][1]
        served = state.champion.serve(world.step_rows(step))
        kept = [c for c in (TS, "step", "version", SCORE, EXPECTED) if c in served.columns]
        state.served.append(served.select(*kept, *_truth()))
        psi = served_psi(state.champion, world.spec, served)
        state.worst_psi.append(max(psi.items(), key=lambda kv: kv[1]))
        signals = gather_signals(policy, state, world, config, step, psi)
        decision = decide(
            signals,
            in_flight=False,
            last_started=state.last_started,
            now=now,
            policy=config.triggers,
            last_drift=state.last_drift,
        )
        state.decisions.append(decision.why)
        if decision.fire and decision.signal is not None:
            _retrain(state, trainer, policy, step, decision.signal, drift_start)
        if on_step is not None:
            on_step()
    predictions = pl.concat(state.served)
    series = cohort_series(predictions, config.drift_step, config.smoothing_batches)
    series = series.with_columns(
        pl.Series("max_psi", [v for _, v in state.worst_psi], dtype=pl.Float64),
        pl.Series("max_psi_feature", [k for k, _ in state.worst_psi], dtype=pl.String),
        pl.Series("decision", state.decisions, dtype=pl.String),
    )
    summary = summarize(
        policy.name, series, state.retrainings, config, first.seconds, _pooled(predictions)
    )
    return PolicyResult(policy.name, series, tuple(state.retrainings), summary)


# -- the live metric and its summary --------------------------------------------------------


def _pooled(frame: pl.DataFrame) -> tuple[float, float]:
    """The realised metric and the label-free estimate of pooled predictions: PR-AUC and
    CBPE's expected average precision, or MAE and the mean of the rows' expected |error|."""
    if frame.height == 0:
        return math.nan, math.nan
    y = frame[_truth()[0]].cast(pl.Float64).to_numpy()
    p = frame[SCORE].to_numpy()
    if _binary():
        return metric_of(y, p), expected_average_precision(p)
    if EXPECTED not in frame.columns:  # predictions of a model without an error curve
        return metric_of(y, p), math.nan
    return metric_of(y, p), float(frame[EXPECTED].cast(pl.Float64).mean())  # type: ignore[arg-type]


def cohort_series(predictions: pl.DataFrame, drift_step: int, smoothing: int) -> pl.DataFrame:
    """Per step (request-time cohort): ``rows``, ``count`` (the task's: positives or rows),
    the task's metric (``value``) and its label-free ``estimate``, each alone and pooled over
    the trailing ``smoothing`` steps (``smoothed_value``, ``smoothed_estimate``); a trailing
    window stops at the drift start, so no post-drift cohort borrows pre-drift predictions."""
    steps = sorted(predictions["step"].unique().to_list())
    first = steps[0] if steps else 0
    by_step = {s: predictions.filter(pl.col("step") == s) for s in steps}
    label = _truth()[0]
    out = []
    for s in steps:
        floor = drift_step if s >= drift_step else first
        window = [by_step[j] for j in range(max(floor, s - smoothing + 1), s + 1) if j in by_step]
        pooled = pl.concat(window)
        day = by_step[s]
        realised, estimate = _pooled(day)
        smooth, smooth_estimate = _pooled(pooled)
        out.append(
            {
                "step": s,
                "start": day[TS].min(),
                "version": day["version"][0],
                "rows": day.height,
                "count": count_of(day[label].cast(pl.Float64).to_numpy()),
                "value": realised,
                "estimate": estimate,
                "smoothed_value": smooth,
                "smoothed_estimate": smooth_estimate,
            }
        )
    return pl.DataFrame(out)


def steps_to_recover(
    smoothed: Sequence[float],
    steps: Sequence[int],
    drift_step: int,
    level: float,
    fraction: float,
    metric: str | None = None,
) -> int | None:
    """Cohorts from the drift start up to and including the first whose smoothed figure
    reaches ``recovery_target(level, fraction, metric)`` (``metric``: the task's primary one
    by default); None when none does."""
    target = recovery_target(level, fraction, metric)
    for step, value in zip(steps, smoothed, strict=True):
        if step >= drift_step and not math.isnan(value) and reaches(value, target, metric):
            return step - drift_step + 1
    return None


@dataclass(frozen=True)
class PolicySummary:
    """One policy's row of the table; every figure is the task's ``metric`` (``pr_auc``,
    ``mae``...), read in its direction."""

    policy: str
    metric: str
    pre_drift_level: float
    recovery_target: float
    recovery_days: float | None
    recovery_periods: float | None
    post_drift_mean: float
    retrainings: int
    by_trigger: dict[str, int]
    drift_or_decay_retrainings: int
    promotions: int
    train_seconds: float
    estimate_mean_abs_error: float
    estimate_bias: float
    realised_all: float = math.nan
    estimate_all: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def summarize(
    name: str,
    series: pl.DataFrame,
    retrainings: Sequence[Retraining],
    config: BacktestConfig,
    first_seconds: float,
    pooled: tuple[float, float] = (math.nan, math.nan),
) -> PolicySummary:
    """Pre-drift level (pooled over the cohorts before the drift), time to recover, post-drift
    mean of the cohorts' metric, retrainings by trigger, compute, and the estimate's error:
    per smoothed cohort (mean absolute), per cohort (mean signed), and ``pooled`` (realised
    metric and estimate over every served prediction)."""
    drift_step = config.drift_step
    metric = _task().primary_metric
    pre = series.filter(pl.col("step") < drift_step)
    post = series.filter(pl.col("step") >= drift_step)
    level = _level(pre)
    n = steps_to_recover(
        series["smoothed_value"].to_list(),
        series["step"].to_list(),
        drift_step,
        level,
        config.recovery_fraction,
        metric,
    )
    span_days = config.scenario.batch_span / timedelta(days=1)
    days = None if n is None else n * span_days
    periods = None if days is None else days / (config.label_maturity / timedelta(days=1))
    triggers = Counter(r.trigger for r in retrainings)
    errors = (series["smoothed_estimate"] - series["smoothed_value"]).drop_nans().abs()
    bias = _estimate_bias(series)
    return PolicySummary(
        policy=name,
        metric=metric,
        pre_drift_level=level,
        recovery_target=recovery_target(level, config.recovery_fraction, metric),
        recovery_days=days,
        recovery_periods=periods,
        post_drift_mean=float(post["value"].drop_nans().mean() or math.nan),
        retrainings=len(retrainings),
        by_trigger=dict(sorted(triggers.items())),
        drift_or_decay_retrainings=sum(v for k, v in triggers.items() if k in DRIFT_OR_DECAY),
        promotions=sum(r.promoted for r in retrainings),
        train_seconds=first_seconds + sum(r.seconds for r in retrainings),
        estimate_mean_abs_error=float(errors.mean()) if errors.len() else math.nan,
        estimate_bias=bias,
        realised_all=pooled[0],
        estimate_all=pooled[1],
    )


def _level(pre: pl.DataFrame) -> float:
    """Pre-drift level: the mean of the pre-drift cohorts' metric weighted by the task's count
    (positives; rows, which makes a regressor's the pooled MAE)."""
    pre = pre.filter(pl.col("value").is_not_nan())
    if pre.height == 0:
        return math.nan
    weights = pre["count"].cast(pl.Float64)
    return float((pre["value"] * weights).sum() / weights.sum())


def _estimate_bias(series: pl.DataFrame) -> float:
    """Mean over cohorts of estimate minus realised metric (the estimate's bias)."""
    diff = (series["estimate"] - series["value"]).drop_nans()
    return float(diff.mean()) if diff.len() else math.nan


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    series: pl.DataFrame
    retrainings: tuple[Retraining, ...]
    summary: PolicySummary

    def to_dict(self) -> dict[str, Any]:
        series = self.series.with_columns(pl.col("start").dt.to_string("%Y-%m-%dT%H:%M:%S%z"))
        return {
            "policy": self.policy,
            "summary": self.summary.to_dict(),
            "retrainings": [r.to_dict() for r in self.retrainings],
            "series": series.to_dicts(),
        }


@dataclass(frozen=True)
class BacktestResult:
    """Every policy on one scenario, and what the run cost."""

    config: BacktestConfig
    policies: dict[str, PolicyResult]
    drift_start: datetime
    world_seconds: float
    wall_seconds: float
    simulated_seconds: float
    trainings: int
    training_seconds: float
    notes: tuple[str, ...] = (INFRA_NOT_REPLAYED,)

    def to_dict(self) -> dict[str, Any]:
        scenario = self.config.scenario
        return {
            "scenario": {
                "drift": scenario.drift,
                "drift_strength": scenario.drift_strength,
                "seed": scenario.seed,
                "drift_start": self.drift_start.isoformat(),
                "burn_in_batches": self.config.burn_in_batches,
                "warmup_batches": self.config.warmup_batches,
                "batches": self.config.batches,
                "batch_days": scenario.batch_span / timedelta(days=1),
            },
            "wall_seconds": self.wall_seconds,
            "world_seconds": self.world_seconds,
            "simulated_seconds": self.simulated_seconds,
            "trainings": self.trainings,
            "training_seconds": self.training_seconds,
            "notes": list(self.notes),
            "policies": {k: v.to_dict() for k, v in self.policies.items()},
        }


def run_backtest(
    config: BacktestConfig,
    policies: Sequence[PolicySpec],
    *,
    on_step: Callable[[str], None] | None = None,
    world: World | None = None,
) -> BacktestResult:
    """Every policy through the same scenario; ``on_step(policy)`` after each served step."""
    import torch

    started = time.perf_counter()
    threads = torch.get_num_threads()
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        world = world or build_world(config)
        trainer = Trainer(world, config)
        results = _run_policies(world, config, policies, trainer, on_step)
    finally:
        torch.set_num_threads(threads)
    span = config.scenario.batch_span.total_seconds()
    declared = config.training_set.suffix
    notes = (INFRA_NOT_REPLAYED,) + (
        (
            f"every training set follows the use case's declared training_set ({declared} in "
            "policy options) where its policy sets no option of its own",
        )
        if declared
        else ()
    )
    return BacktestResult(
        config=config,
        notes=notes,
        policies=results,
        drift_start=_drift_start(world, config),
        world_seconds=world.seconds,
        wall_seconds=time.perf_counter() - started,
        simulated_seconds=span * config.batches,
        trainings=len(trainer.trainings),
        training_seconds=sum(t.seconds for t in trainer.trainings),
    )


def _drift_start(world: World, config: BacktestConfig) -> datetime:
    """When the drift starts; for a scenario without drift, its nominal start (or the end)."""
    if config.drift_step < len(world.windows):
        return world.windows[config.drift_step][0]
    return world.windows[-1][1]


def _run_policies(
    world: World,
    config: BacktestConfig,
    policies: Sequence[PolicySpec],
    trainer: Trainer,
    on_step: Callable[[str], None] | None,
) -> dict[str, PolicyResult]:
    first = trainer.at(config.first_step - 1, Adaptation())
    if isinstance(first, str):
        raise ValueError(f"the first champion could not be trained: {first}")
    results = {}
    for policy in policies:
        tick = (lambda name=policy.name: on_step(name)) if on_step else None
        results[policy.name] = run_policy(world, config, policy, trainer, first, tick)
    return results


# -- the ceiling: how predictable the drifted world is at all -------------------------------


@dataclass(frozen=True)
class Ceiling:
    """A model trained with full ground truth on one regime, judged on its later days.

    ``value`` is the task's ``metric`` on the test split (pooled), ``smoothed_value`` the mean
    over test cohorts of the live metric's trailing-window figure, comparable with the
    backtest's; ``test_count`` and ``train_count`` the task's count (positives or rows).
    """

    regime: str
    metric: str
    train_days: float
    test_days: float
    test_count: int
    value: float
    smoothed_value: float
    train_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def measure_ceiling(world: World, config: BacktestConfig) -> tuple[Ceiling, Ceiling]:
    """Pre-drift and post-drift ceilings: every row of the regime labelled (no maturity lag),
    split 70/15/15 in time, the default network trained on it. If the post-drift ceiling is
    not within ``recovery_fraction`` of the pre-drift one, no policy can recover to that
    level."""
    if config.scenario.drift == "none" or config.drift_step >= len(world.windows):
        raise ValueError("a ceiling needs a scenario that drifts within its served steps")
    drift_start = world.windows[config.drift_step][0]
    pre = world.rows.filter((pl.col(TS) >= world.history_start) & (pl.col(TS) < drift_start))
    post = world.rows.filter(pl.col(TS) >= drift_start)
    return (
        _ceiling("pre-drift", pre, world.spec, config),
        _ceiling("post-drift", post, world.spec, config),
    )


def _labelled(rows: pl.DataFrame) -> pl.DataFrame:
    """World rows with every label known, as a training set's ``LABEL``."""
    return rows.with_columns(pl.col(_truth()[0]).cast(_task().label_dtype).alias(LABEL))


def deadline_ceilings(
    world: World, config: BacktestConfig, seeds: Sequence[int] = (0, 1, 2)
) -> tuple[Ceiling, Ceiling]:
    """What any policy could serve on the cohorts that decide recovery by the deadline.

    Recovery by the deadline (``recovery_periods`` label-maturity periods after the drift) is
    judged on the last ``smoothing_batches`` cohorts before it, so the model serving them is
    trained at the start of that window at the latest. Two bounds, each trained on the
    drifted rows only (older rows teach the old concept; adding them measured worse), split
    with 25 held-out positives per split (a regressor: the gate's ``min_test_rows`` rows) and
    judged on that window with full ground truth, averaged over ``seeds``:

    - ``labels at once``: every drifted row labelled the moment it happens (no policy can do
      better with this network and features);
    - ``matured labels``: only the drifted rows a label-maturity period old by then, i.e. what
      a training set on matured labels can hold at best.

    A ValueError when that window starts at the drift (a deadline within ``smoothing_batches``
    steps of it, as one-day steps make 3 periods of 3-hour labels): no model of drifted rows
    could serve those cohorts.
    """
    if config.scenario.drift == "none":
        raise ValueError("a ceiling needs a scenario that drifts within its served steps")
    drift = config.drift_step
    judged_from = drift + config.recovery_deadline_steps - config.smoothing_batches
    judged_to = judged_from + config.smoothing_batches
    if judged_from <= drift:
        raise ValueError(
            f"the recovery deadline ({config.recovery_deadline_steps} step(s) after the drift) "
            f"is judged on {config.smoothing_batches}-step cohorts from the drift's own step: "
            "no model of drifted rows could serve them; no deadline ceiling"
        )
    if judged_to > len(world.windows):
        raise ValueError("the scenario ends before the recovery deadline: serve more steps")
    drift_start = world.windows[drift][0]
    cutoff = world.windows[judged_from][0]
    judged = world.rows.filter(pl.col("step").is_between(judged_from, judged_to - 1))
    held_out = Adaptation(held_out=25 if _binary() else config.gate.min_test_rows)
    out = []
    for regime, until in (
        ("labels at once, by the deadline", cutoff),
        ("matured labels, by the deadline", cutoff - config.label_maturity),
    ):
        rows = world.rows.filter((pl.col(TS) >= drift_start) & (pl.col(TS) < until))
        frame = held_out.split(_labelled(rows))
        truth = judged[_truth()[0]].cast(_task().label_dtype).to_numpy()
        scores = []
        for seed in seeds:
            trained = train_model(frame, world.spec, replace(config.train, seed=seed))
            scores.append(metric_of(truth, predict(trained.model, trained.preprocessor, judged)))
        train = frame.filter(pl.col("split") == "train")
        day = timedelta(days=1)
        out.append(
            Ceiling(
                regime=regime,
                metric=_task().primary_metric,
                train_days=(until - drift_start) / day,
                test_days=config.smoothing_batches * (config.scenario.batch_span / day),
                test_count=count_of(truth),
                value=float(np.mean(scores)),
                smoothed_value=float(np.mean(scores)),
                train_count=count_of(train[LABEL].to_numpy()),
            )
        )
    return out[0], out[1]


def deadline_note(result: BacktestResult, at_once: Ceiling, matured: Ceiling) -> str:
    """One sentence: the recovery target against what any policy could reach by the deadline
    (shares are quality ratios to the best pre-drift level, ``quality_ratio``)."""
    config = result.config
    metric = _task().primary_metric
    levels = [p.summary.pre_drift_level for p in result.policies.values()]
    best = np.nanmin if metric_lower_is_better(metric) else np.nanmax
    level = float(best(levels)) if levels else math.nan
    target = recovery_target(level, config.recovery_fraction, metric)
    days = config.recovery_deadline_steps * (config.scenario.batch_span / timedelta(days=1))
    name = metric_label(metric)

    def share(c: Ceiling) -> str:
        return f"{quality_ratio(c.value, level, metric):.0%}"

    return (
        f"recovery target {name} {target:.3f} "
        f"({_target_rule(metric, config.recovery_fraction, f'{level:.3f}')}) within {days:g} "
        "days; by then a model of the drifted rows reaches "
        f"{at_once.value:.3f} with every label known at once ({share(at_once)}) "
        f"and {matured.value:.3f} on matured labels ({share(matured)})"
    )


def _target_rule(metric: str, fraction: float, level: str) -> str:
    """How the recovery target follows from the pre-drift ``level``, in words."""
    if metric_lower_is_better(metric):
        return f"the pre-drift {level} / {fraction:.0%}, at most {1 / fraction - 1:.0%} above it"
    return f"{fraction:.0%} of the pre-drift {level}"


def _ceiling(regime: str, rows: pl.DataFrame, spec: FeatureSpec, config: BacktestConfig) -> Ceiling:
    frame = assign_splits(_labelled(rows), SplitPolicy())
    trained = train_model(frame, spec, config.train)
    test = frame.filter(pl.col("split") == "test")
    scored = test.with_columns(
        pl.Series(SCORE, predict(trained.model, trained.preprocessor, test)),
        pl.lit("ceiling").alias("version"),
    )
    first_test = int(scored["step"].min())
    series = cohort_series(scored, first_test, config.smoothing_batches)
    day = timedelta(days=1)
    train = frame.filter(pl.col("split") == "train")
    return Ceiling(
        regime=regime,
        metric=_task().primary_metric,
        train_days=(train[TS].max() - train[TS].min()) / day,
        test_days=(test[TS].max() - test[TS].min()) / day,
        test_count=count_of(test[LABEL].to_numpy()),
        value=metric_of(test[LABEL].to_numpy(), scored[SCORE].to_numpy()),
        smoothed_value=float(series["smoothed_value"].drop_nans().mean() or math.nan),
    )


# -- reporting ------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def summary_rows(result: BacktestResult) -> list[dict[str, str]]:
    """One formatted row per policy: what the CLI's table and the markdown table show."""
    name = metric_label(_task().primary_metric)
    rows = []
    for r in result.policies.values():
        s = r.summary
        if result.config.scenario.drift == "none":
            recovered = "n/a (no drift)"
        elif s.recovery_days is None:
            recovered = "not recovered"
        else:
            recovered = f"{s.recovery_days:g} d ({s.recovery_periods:.1f} periods)"
        triggers = ", ".join(f"{k} {v}" for k, v in s.by_trigger.items()) or "-"
        rows.append(
            {
                "policy": s.policy,
                f"pre-drift {name}": _fmt(s.pre_drift_level),
                "time to recover": recovered,
                f"post-drift mean {name}": _fmt(s.post_drift_mean),
                "retrainings": f"{s.retrainings} ({triggers})",
                "drift/decay": str(s.drift_or_decay_retrainings),
                "promoted": str(s.promotions),
                "train s": f"{s.train_seconds:.0f}",
                "estimate error": _fmt(s.estimate_mean_abs_error),
                "all: realised / estimate": f"{_fmt(s.realised_all)} / {_fmt(s.estimate_all)}",
                "max served PSI": _fmt(float(r.series["max_psi"].max() or math.nan), 2),
            }
        )
    return rows


def _estimate_words() -> str:
    if _binary():
        return "CBPE's expected average precision of the scores"
    return "the expected MAE, each prediction's decile error on the serving champion's test split"


def summary_markdown(result: BacktestResult) -> str:
    """The summary table as markdown, with the scenario and the caveats under it."""
    rows = summary_rows(result)
    if not rows:
        return "_no policies_\n"
    header = list(rows[0])
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row[h] for h in header) + " |" for row in rows),
    ]
    scenario, config = result.config.scenario, result.config
    metric = _task().primary_metric
    sign = "<=" if metric_lower_is_better(metric) else ">="
    lines += [
        "",
        f"Scenario: {scenario.drift} drift (strength {scenario.drift_strength:g}) from "
        f"{result.drift_start:%Y-%m-%d}, seed {scenario.seed}, {config.batches} served "
        f"steps of {scenario.batch_span / timedelta(days=1):g} day(s); recovery = first cohort whose "
        f"{config.smoothing_batches}-step {metric_label(metric)} is {sign} "
        f"{_target_rule(metric, config.recovery_fraction, 'level')}. Label-free estimate: "
        f"{_estimate_words()}; its error: the mean absolute gap to the realised figure over "
        "the smoothed cohorts.",
        *(f"Note: {n}." for n in result.notes),
    ]
    return "\n".join(lines) + "\n"


def backtest_png(result: BacktestResult) -> bytes:
    """The live metric (trailing window) per policy over simulated time; the drift start, the
    recovery target and every promotion marked; the label-free estimate dotted."""
    from matplotlib.figure import Figure

    from models.plots import figure_png

    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    for i, (name, r) in enumerate(result.policies.items()):
        color = f"C{i}"
        x = r.series["start"].to_list()
        ax.plot(x, r.series["smoothed_value"].to_list(), color=color, label=name)
        ax.plot(x, r.series["smoothed_estimate"].to_list(), color=color, linestyle=":", alpha=0.6)
        promoted = [t.step for t in r.retrainings if t.promoted]
        points = r.series.filter(pl.col("step").is_in([s + 1 for s in promoted]))
        ax.scatter(
            points["start"].to_list(), points["smoothed_value"].to_list(), color=color,
            marker="^", zorder=3,
        )  # fmt: skip
    if result.config.scenario.drift != "none":
        ax.axvline(result.drift_start, color="grey", linestyle="--", label="drift starts")
    targets = [r.summary.recovery_target for r in result.policies.values()]
    if targets and not math.isnan(targets[0]):
        target = targets[0]
        ax.axhline(target, color="grey", linestyle=":", label=f"recovery target {target:.2f}")
    metric = _task().primary_metric
    ax.set_ylabel(f"live {metric_label(metric)} ({result.config.smoothing_batches}-step window)")
    direction = "lower" if metric_lower_is_better(metric) else "higher"
    ax.set_title(
        f"Served model quality per policy ({direction} is better; ^ promotion, dotted: "
        "label-free estimate)"
    )
    if _binary():
        ax.set_ylim(0, 1)
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return figure_png(fig)
