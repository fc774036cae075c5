"""A use case's Feast declarations, as the platform loads and fingerprints them.

The use case's Feast repo (``features.repo`` in its ``usecase.yaml``) holds ``feature_store.yaml``
and ``definitions.py``, whose ``build_definitions(lake)`` returns every Feast object (entities,
sources, feature views, on-demand views, FeatureServices) for one Loopline lake. Sources read
``feature_glob(lake, view)``, the per-batch files the platform writes for a view. The platform
tags the use case's FeatureService with a fingerprint of the repo's files, the lake and the
Feast version (``HASH_TAG``), so declarations are applied again exactly when they change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import default_home
from core.storage import data_root, duckdb_uri
from core.usecase import UseCase, active, load

HASH_TAG = "loopline_definitions_sha256"
# On an on-demand view: its pandas UDF also takes and returns a dict of NumPy columns, which
# the serving path uses to skip pandas for a few rows (features.store.online_columns).
NUMPY_UDF_TAG = "loopline_udf_takes_numpy"


def feature_glob(lake: Path | str, view: str) -> str:
    """The glob a view's source reads: every per-batch file the feature assets wrote, spelt as
    DuckDB reads it (``core.storage.duckdb_uri``)."""
    return duckdb_uri(data_root(lake) / "features" / view / "*.parquet")


def declarations_hash(lake: Path | str, uc: UseCase | None = None) -> str:
    """Fingerprint of what the use case's repo declares for ``lake``: its files, the lake and
    the Feast version."""
    import feast

    uc = uc or active()
    digest = hashlib.sha256()
    for path in sorted(uc.feature_repo.glob("*")):
        if path.suffix in (".py", ".yaml") and path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(f"{data_root(lake)}|{feast.__version__}".encode())
    return digest.hexdigest()


def build_definitions(lake: Path | str, uc: UseCase | None = None) -> list[Any]:
    """Every Feast object the use case declares for ``lake``, its FeatureService tagged with
    ``declarations_hash``. A declaration without the use case's FeatureService is refused."""
    uc = uc or active()
    declared = uc.module(f"{uc.features.repo}.definitions").build_definitions(lake)
    return _stamped(list(declared), lake, uc)


def feast_cli_objects(build: Callable[[Path | str], Any], definitions_file: str) -> list[Any]:
    """What ``feast apply`` and the other Feast commands see in a use case's repo: its objects
    for ``$LOOPLINE_LAKE``, else ``$LOOPLINE_HOME`` (the variable ``feature_store.yaml``
    substitutes), else the use case's default home, stamped as the platform stamps them, so
    the library finds nothing to apply after a ``feast apply``. ``definitions_file``: the
    repo's ``definitions.py``, which names the use case (the folder above the repo)."""
    uc = load(Path(definitions_file).resolve().parents[1])
    lake = (
        os.environ.get("LOOPLINE_LAKE")
        or os.environ.get("LOOPLINE_HOME")
        or str(default_home(os.environ.get("LOOPLINE_USECASE")))
    )
    return _stamped(list(build(lake)), lake, uc)


def _stamped(objects: list[Any], lake: Path | str, uc: UseCase) -> list[Any]:
    services = [o for o in objects if type(o).__name__ == "FeatureService"]
    named = [s for s in services if s.name == uc.features.service]
    if not named:
        raise ValueError(
            f"{uc.feature_repo / 'definitions.py'} declares no FeatureService "
            f"{uc.features.service!r} (features.service); it declares {[s.name for s in services]}"
        )
    named[0].tags[HASH_TAG] = declarations_hash(lake, uc)
    return objects


def service_name(uc: UseCase | None = None) -> str:
    """The FeatureService models of the use case train and serve on."""
    return (uc or active()).features.service
