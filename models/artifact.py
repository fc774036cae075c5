"""The on-disk model: a weights-only state_dict, a JSON sidecar, golden outputs, checksums.

Layout of a model directory (written to a temporary sibling and renamed, so a crash
never leaves half a model):

    model.pt      state_dict only: loads with torch.load(..., weights_only=True)
    model.json    architecture, preprocessor (spec, imputation, vocabularies), metadata
    golden.json   up to 64 feature rows and the logits the trained model gave for them
    SHA256SUMS    `sha256sum -c` format over the three files above
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from core.jsonutil import json_safe
from models.checksum import directory_size, file_checksums, sha256_file
from models.loop import predict_logits
from models.network import TabularNet
from models.preprocess import Preprocessor
from models.train import TrainResult

FORMAT_VERSION = 1
WEIGHTS = "model.pt"
SIDECAR = "model.json"
GOLDEN = "golden.json"
CHECKSUMS = "SHA256SUMS"
GOLDEN_ROWS = 64


class ArtifactError(RuntimeError):
    """The model directory is incomplete, tampered with, or of an unknown format."""


@dataclass(frozen=True)
class SavedModel:
    """Where a model went and what its files hash to (the registry records these)."""

    path: Path
    checksums: dict[str, str]
    size_bytes: int

    @property
    def content_hash(self) -> str:
        """One hash for the whole artifact: sha256 of its SHA256SUMS file."""
        return self.checksums[CHECKSUMS]


def save_model(
    module: TabularNet,
    preprocessor: Preprocessor,
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    golden_rows: pl.DataFrame | Sequence[Mapping[str, Any]] | None = None,
) -> SavedModel:
    """Writes the model directory atomically; refuses to overwrite an existing one."""
    target = Path(out_dir)
    if target.exists():
        raise FileExistsError(f"model directory {target} already exists; artifacts are immutable")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        module = module.cpu().eval()
        state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        with open(tmp / WEIGHTS, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        sidecar = {
            "format_version": FORMAT_VERSION,
            "architecture": module.architecture,
            "preprocessor": preprocessor.to_dict(),
            "metadata": json_safe(dict(metadata or {})),
        }
        _write_text(tmp / SIDECAR, json.dumps(sidecar, indent=2, sort_keys=True))
        records = _golden_records(preprocessor, golden_rows)
        batch = preprocessor.transform(records)
        logits = predict_logits(module, batch.numeric, batch.categorical)
        golden = {"records": records, "logits": [float(v) for v in logits.tolist()]}
        _write_text(tmp / GOLDEN, json.dumps(golden, indent=1, sort_keys=True))
        sums = "".join(f"{sha256_file(tmp / n)}  {n}\n" for n in (WEIGHTS, SIDECAR, GOLDEN))
        _write_text(tmp / CHECKSUMS, sums)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return SavedModel(target, file_checksums(target), directory_size(target))


def save_training_result(
    result: TrainResult,
    out_dir: str | Path,
    *,
    golden_rows: pl.DataFrame | Sequence[Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SavedModel:
    """save_model with the training summary (config, history, calibration, window) as metadata."""
    meta = {"training": result.summary(), **dict(metadata or {})}
    return save_model(
        result.model, result.preprocessor, out_dir, metadata=meta, golden_rows=golden_rows
    )


def read_sidecar(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / SIDECAR
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not a Loopline model directory")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"unsupported model format {data.get('format_version')!r} in {path}")
    return data


def verify_checksums(model_dir: str | Path) -> list[str]:
    """Problems found against SHA256SUMS (empty when the artifact is intact)."""
    root = Path(model_dir)
    sums = root / CHECKSUMS
    if not sums.is_file():
        return [f"{CHECKSUMS} is missing"]
    problems = []
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


def load_model(model_dir: str | Path, *, verify: bool = True) -> tuple[TabularNet, Preprocessor]:
    """Rebuilds the module (eval mode, CPU) and its preprocessor; weights load weights_only."""
    root = Path(model_dir)
    if verify:
        problems = verify_checksums(root)
        if problems:
            raise ArtifactError(f"model at {root} failed verification: {'; '.join(problems)}")
    sidecar = read_sidecar(root)
    module = TabularNet.from_architecture(sidecar["architecture"])
    state = torch.load(root / WEIGHTS, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    module.eval()
    return module, Preprocessor.from_dict(sidecar["preprocessor"])


def golden_check(model_dir: str | Path) -> tuple[bool, float]:
    """Reloads the model and replays golden rows: (bitwise identical?, max |difference|)."""
    module, preprocessor = load_model(model_dir)
    golden = json.loads((Path(model_dir) / GOLDEN).read_text())
    batch = preprocessor.transform(golden["records"])
    got = predict_logits(module, batch.numeric, batch.categorical)
    want = torch.tensor(golden["logits"], dtype=torch.float32)
    if got.shape != want.shape:
        return False, math.inf
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return bool(torch.equal(got, want)), diff


def _golden_records(
    preprocessor: Preprocessor, rows: pl.DataFrame | Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    columns = preprocessor.spec.columns
    if rows is None:
        return [_synthetic_row(preprocessor)]
    if isinstance(rows, pl.DataFrame):
        records = rows.select(columns).head(GOLDEN_ROWS).to_dicts()
    else:
        records = [{c: r.get(c) for c in columns} for r in list(rows)[:GOLDEN_ROWS]]
    return [json_safe(r) for r in records]


def _synthetic_row(preprocessor: Preprocessor) -> dict[str, Any]:
    row: dict[str, Any] = dict(preprocessor.impute)
    for name, vocab in preprocessor.vocab.items():
        row[name] = vocab[0] if vocab else None
    return row


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
