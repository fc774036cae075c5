"""Model archives (``.mar``) for TorchServe, built with torch-model-archiver.

An archive carries the whole model directory (weights, sidecar with architecture and
preprocessor, golden rows, SHA256SUMS, which the worker verifies on load), the handler as
``loopline_handler.py`` (``serving/entry.py``, which hands over to ``serving.handler``), and
``serving.json``: model name, registry version id, FeatureService, decision threshold, request
limits, and the use case and home it serves (one TorchServe serves every use case of a
platform, so a worker learns its own from its archive). Its TorchServe version is the registry version id.
A release drill's archive also carries ``faults`` (``serving.faults``); no other does.

torch-model-archiver stages files in ``$TMPDIR/<model name>``, so it runs in a subprocess
with a private TMPDIR (two builds at once must not share that folder); the result is renamed
into the model store, so the store never holds half an archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from core.usecase import active
from models.artifact import CHECKSUMS, GOLDEN, SIDECAR, WEIGHTS, verify_checksums
from models.registry import Registry
from serving.config import ServingConfig
from serving.faults import Faults
from serving.scoring import SERVING_FILE, ServingInfo, version_info

HANDLER_FILE = "loopline_handler.py"
HANDLER_SOURCE = Path(__file__).resolve().parent / "entry.py"


class ArchiveError(RuntimeError):
    """The archive could not be built (bad model directory, archiver failure)."""


def build_archive(
    model_dir: str | Path,
    config: ServingConfig,
    *,
    version: str,
    info: ServingInfo | None = None,
    overwrite: bool = False,
    handler: str | Path = HANDLER_SOURCE,
    faults: Faults | None = None,
) -> Path:
    """Builds ``<model store>/<model name>-<version>.mar``; an existing one is returned as is.

    ``info`` defaults to what the model directory's sidecar says (see ServingInfo). ``handler``
    is the source archived as the handler (the serving benchmark's floor archives a no-op one).
    ``faults``: a release drill's (``serving.faults``); the archive is built anew with them,
    and is the version's archive from then on (the deployment serves it as any other).
    """
    model_dir = Path(model_dir)
    problems = verify_checksums(model_dir)
    if problems:
        raise ArchiveError(f"model at {model_dir} failed verification: {'; '.join(problems)}")
    store = Path(config.model_store)
    target = store / config.mar_name(version)
    if target.exists() and not overwrite and not faults:
        return target
    info = info or ServingInfo.from_model_dir(
        model_dir, model_version=version, model_name=config.model_name
    )
    if info.model_version != version or info.model_name != config.model_name:
        raise ArchiveError(f"serving info {info} does not match {config.model_name} {version}")
    settings = {
        **info.to_dict(),
        "max_body_bytes": config.max_body_bytes,
        "max_items_per_request": config.max_items_per_request,
        "source_model_dir": str(model_dir.resolve()),
        "usecase": str(active().root.resolve()),
        "home": str(Path(config.home).resolve()),
    }
    if faults:
        settings["faults"] = faults.to_dict()
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.model_name}-{version}-", dir=store))
    try:
        files = staging / "files"
        files.mkdir()
        for name in (WEIGHTS, SIDECAR, GOLDEN, CHECKSUMS):
            shutil.copy2(model_dir / name, files / name)
        (files / SERVING_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
        shutil.copy2(handler, files / HANDLER_FILE)
        (staging / "tmp").mkdir()
        (staging / "out").mkdir()
        extra = ",".join(str(files / n) for n in (SIDECAR, GOLDEN, CHECKSUMS, SERVING_FILE))
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            config.model_name,
            "--version",
            version,
            "--serialized-file",
            str(files / WEIGHTS),
            "--handler",
            str(files / HANDLER_FILE),
            "--extra-files",
            extra,
            "--export-path",
            str(staging / "out"),
        ]
        env = {**os.environ, "TMPDIR": str(staging / "tmp")}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        built = staging / "out" / f"{config.model_name}.mar"
        if done.returncode != 0 or not built.is_file():
            raise ArchiveError(
                f"torch-model-archiver failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        with open(built, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def archive_version(
    registry: Registry, version: str, config: ServingConfig, *, faults: Faults | None = None
) -> Path:
    """The archive of a registered version (lineage from the registry: FeatureService,
    threshold from its metrics when recorded); ``faults`` only for a release drill."""
    info = version_info(registry, version, config.model_name)
    record = registry.get(version)
    return build_archive(record.artifact_dir, config, version=version, info=info, faults=faults)


def read_manifest(mar: str | Path) -> dict[str, Any]:
    """MAR-INF/MANIFEST.json and serving.json of an archive (for checks and the CLI)."""
    with zipfile.ZipFile(mar) as zf:
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        serving = json.loads(zf.read(SERVING_FILE))
    return {"manifest": manifest, "serving": serving}
