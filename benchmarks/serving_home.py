"""A serving home for the active use case (``LOOPLINE_USECASE``), for ``bench_serving``: the
use case's simulated requests, its feature views computed and materialized to the online
store, and models trained on its FeatureService and registered (the first as champion).

``tests.serving.kit.build_serving_home`` builds the fraud demo's home and stays the fraud
benchmark's, so its figures compare with earlier runs; this builds any use case's from its
declaration and simulator, as ``orchestration.backtest.build_world`` does: the whole history
is one batch of the request dataset for every view, with the other event datasets (labels
known by now among them) and the reference data as its history. No ingest, no Dagster.
Every request's truth labels the training set, as in the fraud kit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import torch
from feast import FeatureStore

from core import simulation
from core.usecase import active
from features.store import (
    SERVICE,
    apply_definitions,
    feature_store,
    historical_features,
    materialize,
)
from features.training_set import LABEL, assign_splits
from features.views import TS, ViewBatch, training_entities, views, write_feature_file
from models.artifact import save_training_result
from models.registry import CHAMPION, ModelRecord, Registry, Verdict
from models.spec import FeatureSpec, TrainConfig, feature_spec_of_service
from models.tasks import of as task_of
from models.train import train_model
from quality.schema import time_columns
from serving.requests import request_bodies

# As tests.serving.kit.FAST: a small model, trained in seconds.
FAST = TrainConfig(epochs=4, batch_size=256, lr=5e-3, hidden=(16,), patience=2, device="cpu")


@dataclass
class UseCaseHome:
    """What ``bench_serving`` uses of ``tests.serving.kit.ServingHome``, for any use case."""

    home: Path
    store: FeatureStore
    registry: Registry
    request_rows: pl.DataFrame
    training_frame: pl.DataFrame
    spec: FeatureSpec

    def register(self, seed: int, *, champion: bool = False, shift: float = 0.0) -> str:
        """Trains a model (seed changes its weights), saves and registers it. ``shift`` is
        added to its final layer's bias before it is saved (a release drill's model whose
        scores moved: in units of a regressor's target deviation, or of a classifier's logit
        before calibration); its golden rows and checksums are its own."""
        uc = active()
        result = train_model(
            self.training_frame, self.spec, TrainConfig(**{**FAST.to_dict(), "seed": seed})
        )
        if shift:
            with torch.no_grad():
                result.model.body[-1].bias += shift
        saved = save_training_result(
            result, self.home / "models" / f"seed-{seed}", metadata={"feature_service": SERVICE}
        )
        has_threshold = task_of(uc.task.type).has_threshold
        version = self.registry.register(
            ModelRecord(
                model_name=uc.name,
                artifact_dir=str(saved.path),
                artifacts=saved.checksums,
                training_set_version="bench",
                feature_service=SERVICE,
                training_batches=["b1"],
                hyperparameters=result.config.to_dict(),
                metrics={"threshold": 0.5} if has_threshold else {},
                data_window=result.data_window,
            ),
            Verdict(True, champion=self.registry.get_alias(CHAMPION)),
        )
        if champion:
            self.registry.promote(version, "bench champion")
        return version

    def rejudge(self, version: str) -> None:
        """``version`` judged again, and passed, against the champion serving now (as
        ``tests.serving.kit.ServingHome``'s, for ``tests.e2e.kit.Loop``)."""
        self.registry.judge(version, Verdict(True, champion=self.registry.get_alias(CHAMPION)))

    def requests(self, n: int, *, offset: int = 0) -> list[dict]:
        """Valid request bodies for known entities from ``offset`` on, stamped now
        (``serving.requests``)."""
        return _stamped(self.request_rows.slice(offset, n))

    def spread_requests(self, n: int, *, seed: int = 0) -> list[dict]:
        """``n`` valid request bodies, one per entity of the largest key space (``keys``: the
        fraud demo's cards) as far as there are entities (then repeats), in random order:
        bodies whose features no cache of recent entities holds."""
        key = max(self.keys, key=self.keys.__getitem__)
        rows = self.request_rows.unique(subset=key, keep="last", maintain_order=False)
        if rows.height < n:
            rows = pl.concat([rows, self.request_rows.sample(n - rows.height, seed=seed)])
        return _stamped(rows.sample(n, seed=seed, shuffle=True))

    @property
    def keys(self) -> dict[str, int]:
        """Per entity column of the requests that a feature view is keyed on, its distinct
        values: the key space a lookup reads (cards and merchants, for the fraud demo)."""
        columns = {c.name for v in self.store.list_feature_views() for c in v.entity_columns}
        present = sorted(columns & set(self.request_rows.columns))
        return {c: self.request_rows[c].n_unique() for c in present}


def _stamped(rows: pl.DataFrame) -> list[dict]:
    now = datetime.now(UTC).isoformat()
    field = active().timestamp_field
    return [{**b, field: now} for b in request_bodies(rows)]


def build_usecase_home(
    home: Path,
    *,
    seed: int = 11,
    batches: int = 6,
    batch_span: timedelta = timedelta(hours=12),
    rows_per_batch: int = 500,
    scenario: Mapping[str, Any] | None = None,
    training_rows: int | None = None,
) -> UseCaseHome:
    """The use case's simulator over ``batches`` windows of ``batch_span`` up to now (about
    ``rows_per_batch`` requests each; ``scenario``: more of its ``ScenarioConfig`` fields, such
    as the fraud demo's ``n_cards``), features in the online store as of now, the training
    set (of the newest ``training_rows`` requests, if given) split by time."""
    uc = active()
    now = datetime.now(UTC)
    start = now.replace(minute=0, second=0, microsecond=0) - batch_span * batches
    config = simulation.scenario(
        seed=seed,
        start=start,
        batch_span=batch_span,
        rows_per_batch=rows_per_batch,
        **(scenario or {}),
    )
    sim = simulation.simulator_module(uc).Simulator(config)
    events = [sim.events(k) for k in range(batches)]
    known = {name: pl.concat([e[name] for e in events]) for name in events[0]}
    name, key = uc.request.dataset, uc.request_dataset.key
    requests = known[name].sort(uc.request_dataset.event_time, key)
    _write_views(home, requests, {**known, name: requests.clear(), **sim.reference()}, now)
    store = feature_store(home)
    apply_definitions(store)
    materialize(store, now)
    # Joined here rather than by features.training_set.labelled_requests, which casts every
    # label to Int8 (a regressor's minutes would be truncated).
    truth = pl.concat([sim.truth(k) for k in range(batches)]).select(
        pl.col(uc.label.key).alias(uc.request.id),
        pl.col(uc.label.column).cast(task_of(uc.task.type).label_dtype).alias(LABEL),
    )
    trained_on = requests if training_rows is None else requests.tail(training_rows)
    rows = historical_features(store, training_entities(trained_on)).join(truth, on=uc.request.id)
    frame = assign_splits(rows.sort(TS, uc.request.id))
    spec = feature_spec_of_service(store.get_feature_service(SERVICE))
    registry = Registry(home / "registry" / "registry.sqlite")
    return UseCaseHome(home, store, registry, requests, frame, spec)


def _write_views(
    home: Path, requests: pl.DataFrame, history: dict[str, pl.DataFrame], now: datetime
) -> None:
    """Every view's rows of the whole history, computed as one batch of the request dataset."""
    times = time_columns()
    requests_name = active().request.dataset

    def read(dataset: str, since: datetime | None = None, *, with_batch: bool = False):
        rows = requests if with_batch and dataset == requests_name else history[dataset]
        column = times.get(dataset)
        return rows if since is None or column is None else rows.filter(pl.col(column) >= since)

    for view in views().values():
        rows = view.compute(ViewBatch(requests_name, requests, now, read))
        write_feature_file(home, view.name, "b1", rows)
