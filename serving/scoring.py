"""Requests -> features -> model scores: the one scoring path of the handler and of
batch inference.

Features come from the model's own FeatureService: the online store (``features.store.
online_columns``) for live requests, or the point-in-time offline join for historical rows; in
both, request-time features run through the same on-demand feature view as in training. A
feature the store does not have (unknown entity, expired row) is left null, imputed by the
model's preprocessor, and reported in ``missing_features``. The handler's batches (a few rows)
stay columns of Python values from lookup to model; batch inference works on frames; a test
holds the two equal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
from feast import FeatureStore
from feast.errors import FeatureViewNotFoundException

from core.usecase import UseCase, active
from features.store import (
    SERVICE,
    feature_store,
    historical_features,
    online_columns,
    online_features,
)
from models.artifact import load_model, read_sidecar
from models.evaluate import batch_predict
from models.network import FrozenNet, TabularNet
from models.preprocess import Preprocessor
from models.registry import Registry
from models.tasks import of as task_of
from quality.schema import UTC_TS
from serving.config import MODEL_NAME
from serving.requests import Record, request_schema

SERVING_FILE = "serving.json"
DEFAULT_THRESHOLD = 0.5
# Training joins features 1 µs before each request (features.views.training_entities):
# the state after the previous event of its entities, never the one being scored.
_OFFLINE_OFFSET = timedelta(microseconds=1)


@dataclass(frozen=True)
class ServingInfo:
    """What serving needs beyond the weights: identity, FeatureService, decision threshold."""

    model_name: str
    model_version: str
    feature_service: str
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingInfo:
        return cls(
            model_name=str(data["model_name"]),
            model_version=str(data["model_version"]),
            feature_service=str(data["feature_service"]),
            threshold=float(data["threshold"]),
        )

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        *,
        model_version: str | None = None,
        feature_service: str | None = None,
        threshold: float | None = None,
        model_name: str = MODEL_NAME,
    ) -> ServingInfo:
        """Arguments win; otherwise the sidecar's metadata (``version``, ``feature_service``,
        ``decision_threshold``); otherwise the defaults (FeatureService ``fraud_model_v1``, 0.5).
        """
        root = Path(model_dir)
        if (root / SERVING_FILE).is_file():
            saved = cls.from_dict(json.loads((root / SERVING_FILE).read_text()))
            return cls(
                model_name=model_name if model_name != MODEL_NAME else saved.model_name,
                model_version=model_version or saved.model_version,
                feature_service=feature_service or saved.feature_service,
                threshold=saved.threshold if threshold is None else float(threshold),
            )
        meta = read_sidecar(root).get("metadata", {})
        version = model_version or meta.get("version") or root.name
        chosen = meta.get("decision_threshold") if threshold is None else threshold
        return cls(
            model_name=model_name,
            model_version=str(version),
            feature_service=feature_service or meta.get("feature_service") or SERVICE,
            threshold=DEFAULT_THRESHOLD if chosen is None else float(chosen),
        )


def version_info(registry: Registry, version: str, model_name: str = MODEL_NAME) -> ServingInfo:
    """ServingInfo of a registered version: its FeatureService and (when the evaluation recorded
    one) its decision threshold come from the registry."""
    record = registry.get(version)
    threshold = record.metrics.get("threshold")
    return ServingInfo.from_model_dir(
        record.artifact_dir,
        model_version=version,
        feature_service=record.feature_service,
        threshold=None if threshold is None else float(threshold),
        model_name=model_name,
    )


_POLARS_TYPES = {
    "id": pl.String(),
    "category": pl.String(),
    "number": pl.Float64(),
    "timestamp": UTC_TS,
}
_ARROW_TYPES = {
    "id": pa.string(),
    "category": pa.string(),
    "number": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


class RequestLayout:
    """Validated requests as the entity/request rows Feast expects: one column per request
    field, the time named as the feature store's request source names it (``time``)."""

    def __init__(self, uc: UseCase | None = None) -> None:
        uc = uc or active()
        rules = request_schema(uc)
        kinds = [uc.request.fields[f].type for f in rules.fields]
        self.fields = rules.fields
        self.time = uc.request.time_feature
        self.names = [self.time if f == rules.time_field else f for f in rules.fields]
        self.id = rules.id_field
        self.score = uc.task.score
        self.positive, self.negative = uc.task.decision.positive, uc.task.decision.negative
        self.polars = dict(zip(self.names, (_POLARS_TYPES[k] for k in kinds), strict=True))
        self.arrow = pa.schema(list(zip(self.names, (_ARROW_TYPES[k] for k in kinds), strict=True)))
        self._row = itemgetter(*self.fields)

    def frame(self, requests: Sequence[Record]) -> pl.DataFrame:
        """The requests as a frame of fixed schema. Built from rows: a few times cheaper than
        column by column for the small batches serving sees."""
        rows = [self._row(r) for r in requests]
        if len(self.fields) == 1:
            rows = [(v,) for v in rows]
        return pl.DataFrame(rows, schema=self.polars, orient="row")

    def columns(self, requests: Sequence[Record]) -> dict[str, list[Any]]:
        """The requests column by column, named as in ``frame``."""
        return {
            name: [r[field] for r in requests]
            for name, field in zip(self.names, self.fields, strict=True)
        }


class OnlineLookup(NamedTuple):
    """A batch's online lookup: the request and feature columns (Python values, None where
    null), and per feature view the age in seconds of each row's online row (None: absent or
    expired), which the prediction log keeps as ``feature_age_s``."""

    columns: dict[str, list[Any]]
    feature_age_s: dict[str, list[float | None]]


@dataclass(frozen=True)
class Scores:
    """Model outputs for a feature frame, row-aligned with it: a classifier's probabilities and
    decision words, or a regressor's values (and no decisions)."""

    predictions: np.ndarray
    decisions: list[str]
    missing_features: list[list[str]]
    unknown_entities: list[list[str]]
    # The model's inputs by column (the prediction log's ``features``), as scored: Python
    # values, None where null. The online path hands over the lookup's own lists.
    inputs: dict[str, Sequence[Any]]


class Scorer:
    """A loaded model bound to a feature store; cheap to call many times."""

    def __init__(
        self,
        module: TabularNet,
        preprocessor: Preprocessor,
        info: ServingInfo,
        store: FeatureStore,
    ) -> None:
        self.module = module.cpu().eval()  # once; explanations differentiate through it
        self.forward = FrozenNet(self.module)  # the same outputs, for scoring (decision 19)
        self.preprocessor = preprocessor
        self.info = info
        self.store = store
        self.entity_features = _entity_features(store, info.feature_service)
        self.columns = list(preprocessor.spec.columns)
        # Entity features the model does not take: their nulls are found apart (rarely any).
        entity = dict.fromkeys(n for names in self.entity_features.values() for n in names)
        self._others = [n for n in entity if n not in self.columns]
        self._masks: dict[tuple[str, ...], tuple[list[str], list[np.ndarray]]] = {}
        self.layout = RequestLayout()
        available = set(self.layout.names) | set(_service_features(store, info))
        lacking = [c for c in preprocessor.spec.columns if c not in available]
        if lacking:
            raise ValueError(
                f"model {info.model_version} needs columns {lacking} that neither the request "
                f"nor FeatureService {info.feature_service!r} provides"
            )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        home: str | Path,
        info: ServingInfo | None = None,
        online_store: dict[str, Any] | None = None,
    ) -> Scorer:
        """Loads weights (checksums verified, weights_only) and opens the home's feature store
        (its online store replaced by ``online_store``, the scale profile's Redis, if given)."""
        module, preprocessor = load_model(model_dir)
        info = info or ServingInfo.from_model_dir(model_dir)
        return cls(module, preprocessor, info, feature_store(Path(home), online_store))

    def lookup(self, requests: Sequence[Record], at: datetime | None = None) -> OnlineLookup:
        """``online_features`` as columns of Python values (None where null): the request's,
        then the features'; and per feature view, the age of the online row each request
        was scored with. TTLs apply at each request's own time, as in training (or at
        ``at`` for all, when given). No frame is built: the handler's path."""
        request = self.layout.columns(requests)
        found = online_columns(
            self.store,
            request,
            schema=self.layout.arrow,
            service_name=self.info.feature_service,
            at=at,
            time_column=None if at is not None else self.layout.time,
        )
        return OnlineLookup({**request, **found.values}, found.ages)

    def online_columns(
        self, requests: Sequence[Record], at: datetime | None = None
    ) -> dict[str, list[Any]]:
        """The columns of ``lookup``."""
        return self.lookup(requests, at).columns

    def online_features(
        self, requests: Sequence[Record], at: datetime | None = None
    ) -> pl.DataFrame:
        """Latest features from the online store, rows older than their TTL at each
        request's time (or at ``at``) nulled: ``lookup``'s columns as a frame."""
        return online_features(
            self.store,
            self.layout.frame(requests),
            service_name=self.info.feature_service,
            at=at,
            time_column=None if at is not None else self.layout.time,
        )

    def offline_features(self, requests: Sequence[Record]) -> pl.DataFrame:
        """Point-in-time features as training saw them: the state just before each request."""
        frame = self.layout.frame(requests)
        entities = frame.with_columns(
            (pl.col(self.layout.time) - _OFFLINE_OFFSET).alias("event_timestamp")
        )
        return historical_features(self.store, entities, self.info.feature_service).drop(
            "event_timestamp"
        )

    def score(self, features: pl.DataFrame | Mapping[str, Sequence[Any]]) -> Scores:
        """Probabilities, decisions and missing-feature flags for feature rows: a frame (batch
        inference) or columns of Python values (``online_columns``, the handler's batches)."""
        columns = self.columns
        present = features.columns if isinstance(features, pl.DataFrame) else features
        others = [n for n in self._others if n in present]
        if isinstance(features, pl.DataFrame):
            frame = features[columns]  # eager column pick; select() plans a query per batch
            batch = self.preprocessor.transform(frame)
            others_null = _null_matrix(features[others]) if others else None
            inputs = {c: frame[c].to_list() for c in columns}
        else:
            batch = self.preprocessor.transform_columns(features)
            others_null = _null_columns([features[n] for n in others]) if others else None
            inputs = {c: features[c] for c in columns}
        # The model's inputs are missing where the preprocessor imputed them: a null, or NaN in
        # a number. Entity features beyond them are flagged alike (unknown entities).
        missing = self.preprocessor.missing(batch)
        nulls = missing if others_null is None else np.concatenate([missing, others_null], 1)
        predictions = batch_predict(self.forward, batch, self.preprocessor.spec.task)
        decisions: list[str] = []
        if task_of(self.preprocessor.spec.task).has_threshold:
            threshold = self.info.threshold
            yes, no = self.layout.positive, self.layout.negative
            decisions = [yes if p >= threshold else no for p in predictions.tolist()]
        entities, masks = self._entity_masks(tuple(others))
        # An entity is unknown where every feature it contributes is null.
        by_row = np.stack([nulls[:, m].all(axis=1) for m in masks], axis=1) if masks else None
        return Scores(
            predictions=predictions,
            decisions=decisions,
            missing_features=_names_where(columns, missing),
            unknown_entities=(
                _names_where(entities, by_row) if masks else [[] for _ in range(len(predictions))]
            ),
            inputs=inputs,
        )

    def _entity_masks(self, others: tuple[str, ...]) -> tuple[list[str], list[np.ndarray]]:
        """Per entity with a feature among the model's columns and ``others``: its name and
        those features' positions in that order (computed once per ``others``)."""
        if others not in self._masks:
            at = {name: j for j, name in enumerate([*self.columns, *others])}
            picked = [
                (e, np.array([at[n] for n in names if n in at]))
                for e, names in self.entity_features.items()
                if any(n in at for n in names)
            ]
            self._masks[others] = ([e for e, _ in picked], [m for _, m in picked])
        return self._masks[others]

    def predict(
        self, requests: Sequence[Record], at: datetime | None = None
    ) -> tuple[list[dict[str, Any]], Scores]:
        """Response objects (one per request) and the scores behind them (for the log)."""
        if not requests:
            return [], Scores(np.zeros(0), [], [], [], {c: [] for c in self.columns})
        scores = self.score(self.online_columns(requests, at))
        return self.responses(requests, scores), scores

    def responses(self, requests: Sequence[Record], scores: Scores) -> list[dict[str, Any]]:
        """One object per request: its id, the declared score field, a classifier's decision,
        the model version, and which features were missing and which entities unknown."""
        request_id, score = self.layout.id, self.layout.score
        version, decisions = self.info.model_version, scores.decisions
        out = []
        for i, t in enumerate(requests):
            response = {request_id: t[request_id], score: float(scores.predictions[i])}
            if decisions:
                response["decision"] = decisions[i]
            response["model_version"] = version
            response["missing_features"] = scores.missing_features[i]
            response["unknown_entities"] = scores.unknown_entities[i]
            out.append(response)
        return out


def _service_features(store: FeatureStore, info: ServingInfo) -> list[str]:
    service = store.get_feature_service(info.feature_service)
    return [f.name for p in service.feature_view_projections for f in p.features]


def _entity_features(store: FeatureStore, service_name: str) -> dict[str, list[str]]:
    """Entity name -> the features its views contribute (on-demand views are skipped)."""
    out: dict[str, list[str]] = {}
    for projection in store.get_feature_service(service_name).feature_view_projections:
        try:
            view = store.get_feature_view(projection.name)
        except FeatureViewNotFoundException:
            continue
        for entity in view.entities:
            out.setdefault(entity, []).extend(f.name for f in projection.features)
    return out


def _names_where(names: Sequence[str], flags: np.ndarray) -> list[list[str]]:
    """Per row of a rows x ``names`` boolean matrix, the names flagged (in ``names`` order)."""
    out: list[list[str]] = [[] for _ in range(flags.shape[0])]
    rows, cols = np.nonzero(flags)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        out[i].append(names[j])
    return out


def _null_columns(columns: Sequence[Sequence[Any]]) -> np.ndarray:
    """``_null_matrix`` of columns of Python values: None, or a float NaN."""
    return np.array(
        [[v is None or (type(v) is float and v != v) for v in column] for column in columns],
        dtype=bool,
    ).T.reshape(-1, len(columns))


def _null_matrix(frame: pl.DataFrame) -> np.ndarray:
    """Rows x columns: null, or NaN in a float column (what the preprocessor imputes)."""
    out = np.zeros((frame.height, frame.width), dtype=bool)
    for j, column in enumerate(frame.iter_columns()):
        if column.dtype.is_float():
            out[:, j] = np.isnan(column.to_numpy())  # nulls come out as NaN
        elif column.null_count():
            out[:, j] = column.is_null().to_numpy()
    return out
