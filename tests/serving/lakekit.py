"""A fake Loopline home for retention tests: batches in every batch store with the ledger's rows,
registered model versions with their model directories, .mar files and training sets."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from core.settings import Settings
from models.checksum import sha256_file
from models.registry import CHAMPION, ModelRecord, Registry, Verdict
from quality.ledger import BatchLedger
from serving.config import ServingConfig

DAY = timedelta(days=1)


def land(
    settings: Settings,
    ledger: BatchLedger,
    batch_id: str,
    newest: datetime | None,
    *,
    dataset: str = "transactions",
    status: str = "validated",
    views: tuple[str, ...] = ("card_stats",),
) -> None:
    """A batch whose newest event is ``newest`` (None: reference data), in raw, validated,
    archive and one feature view, at ledger ``status``."""
    column = {"transactions": "event_timestamp", "labels": "label_timestamp"}.get(dataset)
    frame = pl.DataFrame({"id": ["a", "b"]})
    if column is not None:
        frame = frame.with_columns(
            pl.Series(column, [newest - DAY, newest]).dt.cast_time_unit("us")
        )
    source = settings.landing / f"{dataset}-{batch_id}.parquet"
    ledger.receive(batch_id, dataset, source)
    for path in (settings.raw_file(dataset, batch_id), settings.validated_file(dataset, batch_id)):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path, statistics=True)
    archived = settings.archive / dataset / f"{batch_id}__{source.name}"
    archived.parent.mkdir(parents=True, exist_ok=True)
    archived.write_bytes(b"landed")
    for view in views:
        feature = settings.lake / "features" / view / f"{batch_id}.parquet"
        feature.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(feature)
    if status != "received":
        ledger.mark(batch_id, "stored")
    if status in ("validated", "quarantined"):
        ledger.mark(batch_id, status, rows=2)


def register(settings: Settings, run: str, *, promote: bool = True) -> str:
    """A version trained in ``run``: model directory, training set and .mar; promoted."""
    folder = settings.models / run / "candidate"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(run.encode() * 100)
    training_set = f"ts-{run}"
    settings.training_sets.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"x": [1]}).write_parquet(settings.training_sets / f"{training_set}.parquet")
    (settings.training_sets / f"{training_set}.json").write_text("{}")
    registry = Registry(settings.registry_path)
    version = registry.register(
        ModelRecord(
            model_name="fraud",
            artifact_dir=str(folder),
            artifacts={"model.pt": sha256_file(folder / "model.pt")},
            training_set_version=training_set,
            feature_service="fraud_model_v1",
            training_batches=[],
            hyperparameters={},
            metrics={},
            data_window={},
        ),
        Verdict(True, champion=registry.get_alias(CHAMPION)),
    )
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    config.model_store.mkdir(parents=True, exist_ok=True)
    (config.model_store / config.mar_name(version)).write_bytes(b"mar" * 100)
    if promote:
        registry.promote(version, reason="test")
    return version


def mar(settings: Settings, version: str) -> Path:
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    return config.model_store / config.mar_name(version)
