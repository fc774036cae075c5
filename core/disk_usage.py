"""Bytes on disk per store of a home: what an operator watches to see that disk use stays flat.

A store is a folder Loopline writes (the lake's batch and feature files, the home's landing,
archive and quarantine, models, the prediction log, Dagster's instance, TorchServe's model store
and logs). Files are counted once, where they live; a store on object storage (``LOOPLINE_LAKE``
as ``s3://``) is not walked (0 bytes: its provider bills and reports it).
"""

from __future__ import annotations

import os
from pathlib import Path

from core.settings import Settings
from core.storage import is_remote


def stores(settings: Settings) -> dict[str, Path]:
    """Each store's folder (or file), by name."""
    home, lake = settings.home, settings.lake
    return {
        "landing": settings.landing,
        "archive": settings.archive,
        "quarantine": settings.quarantine,
        "raw": settings.raw,
        "validated": settings.validated,
        "features": lake / "features",
        "training_sets": settings.training_sets,
        "models": settings.models,
        "registry": settings.registry_path.parent,
        "model_store": settings.model_store,
        "predictions": settings.predictions,
        "batch_predictions": home / "batch_predictions",
        "monitoring": home / "monitoring",
        "dagster": settings.dagster_home,
        "dagster_log": home / "dagster.log",
        "serving_logs": settings.serving_dir / "logs",
        "ledger": settings.ledger_path,
    }


def store_usage(settings: Settings) -> dict[str, int]:
    """Bytes per store (0 for one that does not exist yet or lives on object storage)."""
    return {name: _bytes(path) for name, path in stores(settings).items()}


def _bytes(path: Path) -> int:
    if is_remote(path):
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while walking (retention, a rename)
                continue
    return total
