"""Batch inference: a frame of transactions scored through the online endpoint's own path.

Rows are validated like requests, features come from the same FeatureService, and the same
``Scorer`` turns them into probabilities, so for the same rows and the same feature state the
scores equal the endpoint's. Two feature sources:

- ``online`` (default): the online store as the endpoint sees it now (or at ``at``); this is
  what "batch equals online" compares.
- ``offline``: the point-in-time join, each row seeing the features just before its own
  timestamp, as in training: the right source for back-filling or replaying history.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

import polars as pl

from models.registry import Registry
from serving.requests import request_schema
from serving.scoring import RequestLayout, Scorer, ServingInfo, version_info

CHUNK_ROWS = 50_000


def output_schema() -> dict[str, pl.DataType]:
    """The columns ``score_frame`` returns: the request's id, the use case's score, the
    decision and what the scorer reports beside it."""
    layout = RequestLayout()
    return {
        layout.id: pl.String(),
        layout.score: pl.Float64(),
        "decision": pl.String(),
        "model_version": pl.String(),
        "missing_features": pl.List(pl.String()),
        "unknown_entities": pl.List(pl.String()),
    }


def score_frame(
    model_dir: str | Path,
    home: str | Path,
    frame: pl.DataFrame,
    *,
    source: Literal["online", "offline"] = "online",
    at: datetime | None = None,
    info: ServingInfo | None = None,
    scorer: Scorer | None = None,
) -> pl.DataFrame:
    """One output row per input row, in order (``output_schema()``).

    ``frame`` holds the request fields, or the request dataset's columns they carry (its
    event-time column for the time field). An invalid row raises ``RequestError`` naming its
    index.
    """
    if source not in ("online", "offline"):
        raise ValueError(f"source must be 'online' or 'offline', got {source!r}")
    scorer = scorer or Scorer.load(model_dir, home, info)
    rules = request_schema()
    frame = rules.frame(frame)
    schema = output_schema()
    parts = []
    for offset in range(0, frame.height, CHUNK_ROWS):
        chunk = frame.slice(offset, CHUNK_ROWS).to_dicts()
        requests = [
            rules.validate(_plain(row, rules.time_field), index=offset + i, now=at)
            for i, row in enumerate(chunk)
        ]
        if source == "online":
            features = scorer.online_features(requests, at=at)
        else:
            features = scorer.offline_features(requests)
        scores = scorer.score(features)
        parts.append(pl.DataFrame(scorer.responses(requests, scores), schema=schema))
    if not parts:
        return pl.DataFrame(schema=schema)
    return pl.concat(parts)


def score_version(
    registry: Registry,
    version: str,
    home: str | Path,
    frame: pl.DataFrame,
    *,
    source: Literal["online", "offline"] = "online",
    at: datetime | None = None,
) -> pl.DataFrame:
    """``score_frame`` for a registered version (FeatureService and threshold from the registry)."""
    info = version_info(registry, version)
    model_dir = registry.get(version).artifact_dir
    return score_frame(model_dir, home, frame, source=source, at=at, info=info)


def _plain(row: dict, time_field: str) -> dict:
    """Frame values as a JSON request would carry them (datetimes as ISO text)."""
    ts = row.get(time_field)
    if isinstance(ts, datetime):
        row = {**row, time_field: ts.isoformat() if ts.tzinfo else ts.isoformat() + "+00:00"}
    return row
