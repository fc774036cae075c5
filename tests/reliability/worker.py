"""Work the reliability tests run in a separate process, to kill it or to run two at once.

    python -m tests.reliability.worker train HOME FRAME SPEC OUT EPOCHS
    python -m tests.reliability.worker register-loop HOME MODEL_DIR COUNT
    python -m tests.reliability.worker features HOME
    python -m tests.reliability.worker write HOME TAG COUNT

Each prints ``started`` once its real work begins (the tests poll for it) and ``done`` at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _say(word: str) -> None:
    print(word, flush=True)


def _record(saved, *, batch: str):
    from models.registry import ModelRecord

    return ModelRecord(
        model_name="fraud",
        artifact_dir=str(saved.path),
        artifacts=saved.checksums,
        training_set_version="reliability",
        feature_service="fraud_model_v1",
        training_batches=[batch],
        hyperparameters={},
        metrics={"threshold": 0.5},
        data_window={},
    )


def train(home: str, frame: str, spec: str, out: str, epochs: str) -> None:
    """Train, save atomically, register: the library path of the training run."""
    import polars as pl
    import torch

    from models.artifact import save_training_result
    from models.registry import Registry
    from models.spec import FeatureSpec, TrainConfig
    from models.train import train_model

    torch.set_num_threads(1)
    data = pl.read_parquet(frame)
    feature_spec = FeatureSpec.from_dict(json.loads(Path(spec).read_text()))
    n = int(epochs)
    config = TrainConfig(epochs=n, patience=n, batch_size=256, hidden=(16,), device="cpu")
    _say("started")
    result = train_model(data, feature_spec, config)
    saved = save_training_result(result, out)
    Registry(Path(home) / "registry" / "registry.sqlite").register(_record(saved, batch=out), None)
    _say("done")


def register_loop(home: str, model_dir: str, count: str) -> None:
    """Save and register copies of one model as fast as possible (distinct metadata each)."""
    from models.artifact import SavedModel, load_model, save_model, verify_checksums
    from models.checksum import directory_size, file_checksums
    from models.registry import Registry

    module, preprocessor = load_model(model_dir)
    registry = Registry(Path(home) / "registry" / "registry.sqlite")
    _say("started")
    for i in range(int(count)):
        target = Path(home) / "models" / f"loop-{i:05d}"
        if target.exists():  # saved by a killed run: register it (idempotent if it was)
            assert verify_checksums(target) == [], target
            saved = SavedModel(target, file_checksums(target), directory_size(target))
        else:
            saved = save_model(module, preprocessor, target, metadata={"copy": i})
        registry.register(_record(saved, batch=str(i)), None)
    _say("done")


def features(home: str) -> None:
    """Materialize the feature assets, as an update_features run does."""
    import dagster as dg

    from orchestration import feature_assets as assets
    from orchestration.resources import LooplineStorage

    _say("started")
    result = dg.materialize(
        [
            *assets.VIEW_ASSETS,
            assets.feature_registry,
            assets.online_features,
        ],
        resources={"storage": LooplineStorage(home=home)},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    if not result.success:
        for event in result.all_events:
            if event.is_failure:
                print(event.message, file=sys.stderr)
        sys.exit(1)
    _say("done")


def write(home: str, tag: str, count: str) -> None:
    """Ledger and registry writes in a tight loop (two of these run at once)."""
    from models.registry import ModelRecord, Registry
    from quality.ledger import BatchLedger

    ledger = BatchLedger(Path(home) / "ledger.sqlite")
    registry = Registry(Path(home) / "registry" / "registry.sqlite")
    _say("started")
    for i in range(int(count)):
        batch = f"{tag}-{i:05d}"
        ledger.receive(batch, "transactions", Path(home) / "landing" / f"transactions-{batch}.csv")
        ledger.mark(batch, "stored", rows=i)
        version = registry.register(
            ModelRecord(
                model_name="fraud",
                artifact_dir="/nowhere",
                artifacts={"model.pt": f"{tag}{i:060d}"},
                training_set_version=tag,
                feature_service="fraud_model_v1",
                training_batches=[batch],
                hyperparameters={},
                metrics={},
                data_window={},
            ),
            None,
            verify_files=False,
        )
        registry.record_deployment(version, "smoke_test", True, {"writer": tag})
        ledger.mark(batch, "validated", rows=i)
    _say("done")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    commands = {
        "train": train,
        "register-loop": register_loop,
        "features": features,
        "write": write,
    }
    commands[command](*args)
