from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from models.artifact import (
    CHECKSUMS,
    SIDECAR,
    WEIGHTS,
    ArtifactError,
    golden_check,
    load_model,
    read_sidecar,
    save_training_result,
)
from models.evaluate import predict
from models.train import train_model
from tests.models.testkit import FAST, SPEC


@pytest.fixture(scope="module")
def trained(training_set):
    return train_model(training_set, SPEC, FAST)


def test_saved_model_reloads_weights_only_with_identical_outputs(trained, training_set, tmp_path):
    saved = save_training_result(trained, tmp_path / "m", golden_rows=training_set.head(64))
    assert sorted(saved.checksums) == sorted([WEIGHTS, SIDECAR, "golden.json", CHECKSUMS])
    state = torch.load(saved.path / WEIGHTS, weights_only=True)
    assert "num_mean" in state and "calib_bias" in state  # normalisation travels in the weights
    module, preprocessor = load_model(saved.path)
    assert preprocessor == trained.preprocessor
    before = predict(trained.model, trained.preprocessor, training_set)
    after = predict(module, preprocessor, training_set)
    np.testing.assert_array_equal(before, after)
    assert golden_check(saved.path) == (True, 0.0)
    sidecar = read_sidecar(saved.path)
    assert sidecar["metadata"]["training"]["config"]["seed"] == FAST.seed
    assert len(json.loads((saved.path / "golden.json").read_text())["records"]) == 64


def test_checksum_file_is_sha256sum_compatible(trained, tmp_path):
    saved = save_training_result(trained, tmp_path / "m")
    out = subprocess.run(
        ["sha256sum", "-c", CHECKSUMS], cwd=saved.path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_tampered_weights_are_refused(trained, tmp_path):
    saved = save_training_result(trained, tmp_path / "m")
    data = bytearray((saved.path / WEIGHTS).read_bytes())
    data[-100] ^= 0xFF
    (saved.path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt does not match"):
        load_model(saved.path)


def test_save_is_atomic_and_never_overwrites(trained, tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_training_result(trained, target)
    with pytest.raises(FileExistsError):
        save_training_result(trained, target)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("models.artifact.predict_logits", crash)
    with pytest.raises(OSError, match="disk full"):
        save_training_result(trained, tmp_path / "m2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_same_model_saves_to_same_bytes(trained, tmp_path):
    a = save_training_result(trained, tmp_path / "a")
    b = save_training_result(trained, tmp_path / "b")
    assert a.content_hash == b.content_hash
