"""A use case's declaration: ``usecases/<name>/usecase.yaml``, typed and checked when loaded.

A use case is one folder holding everything specific to one model; the platform packages read
it through this module and name none of its datasets or columns. The YAML is parsed into the
pydantic models below (unknown keys refused, types checked), then cross-checked (a key that is
not a column, a request field the model never uses, a drift column no dataset has). Any mistake
is one ``UseCaseError`` naming the file and the field, raised at load time rather than from deep
inside a run.

Which use case runs: ``LOOPLINE_USECASE`` (a name under ``usecases/`` or a folder path),
``fraud`` when unset.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from datetime import timedelta
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[1]
USECASES_DIR = REPO_ROOT / "usecases"
DECLARATION = "usecase.yaml"
DEFAULT_USECASE = "fraud"
ENV_VAR = "LOOPLINE_USECASE"

ColumnType = Literal["string", "float", "int", "bool", "timestamp"]
# Derived from a dataset's event time when profiled for drift (no column holds it).
DERIVED_DRIFT_COLUMNS = frozenset({"hour_of_day"})
T = TypeVar("T")
Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]


class UseCaseError(ValueError):
    """A declaration that cannot be used: ``file``, the dotted ``field`` and what is wrong."""

    def __init__(self, file: Path | str, field: str, problem: str) -> None:
        self.file, self.field, self.problem = str(file), field, problem
        where = f"{self.file}: {field}" if field else self.file
        super().__init__(f"{where}: {problem}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DriftColumns(_Strict):
    """Columns of a dataset whose distribution is profiled per batch and compared."""

    numeric: tuple[Name, ...] = ()
    categorical: tuple[Name, ...] = ()


class Dataset(_Strict):
    """One dataset that lands: its columns and their types, its key, its event time (None for
    reference data) and its soda contract (a path relative to the use case's folder)."""

    columns: dict[Name, ColumnType] = Field(min_length=1)
    key: Name
    event_time: Name | None = None
    contract: str
    drift: DriftColumns = DriftColumns()


class RequestField(_Strict):
    """One field of an online scoring request.

    ``id``: 1-64 characters of letters, digits and ``_.:-``; ``number``: finite, within
    [min, max]; ``category``: one of a vocabulary (a name under ``vocabularies``);
    ``timestamp``: ISO-8601 text with an offset or epoch seconds. ``column`` is the request
    dataset's column the field carries (the field's own name by default)."""

    type: Literal["id", "number", "category", "timestamp"]
    column: Name | None = None
    min: float | None = None
    max: float | None = None
    vocabulary: Name | None = None

    def column_name(self, field: str) -> str:
        return self.column or field


class Request(_Strict):
    """The online request: one row of ``dataset`` as a client sends it. ``id`` names the field
    that identifies a request in the prediction log; ``model_inputs`` the fields fed to the
    model as they arrive (the rest are the id, the time and entity keys for feature lookup)."""

    dataset: Name
    id: Name
    fields: dict[Name, RequestField] = Field(min_length=1)
    # The name the feature store's request source gives the request's time.
    time_feature: Name
    entity_keys: tuple[Name, ...] = ()
    model_inputs: tuple[Name, ...] = ()


class Label(_Strict):
    """The ground truth: ``column`` of ``dataset``, joined to the request dataset by ``key``
    (the label dataset's column holding the request dataset's key); ``time`` is when a label
    became known. A request is judged once ``maturity_days`` have passed: most of its labels
    have arrived by then."""

    dataset: Name
    column: Name
    key: Name
    time: Name
    maturity_days: float = Field(gt=0)


class Features(_Strict):
    """Where the features are declared: ``module``, a Python module of the use case's folder
    that computes the feature views (``VIEWS``, see ``features.views``); ``repo``, the Feast
    repo folder (``feature_store.yaml`` and ``definitions.py``, whose ``build_definitions(lake)``
    returns the Feast objects); ``service``, the FeatureService models train and serve on."""

    module: Name
    repo: Name
    service: Name


class Bucket(_Strict):
    """A derived slice: ``column``'s values cut at ``edges`` (left-closed), one label per bin."""

    column: Name
    edges: tuple[float, ...] = Field(min_length=1)
    labels: tuple[str, ...]


class Evaluation(_Strict):
    """How a model is judged: the slices its metrics are broken down by (training-set columns,
    or the derived ``buckets``)."""

    slices: tuple[Name, ...] = ()
    buckets: dict[Name, Bucket] = {}
    # The slice whose live metrics are plotted beside the offline ones (the first by default).
    live_plot_slice: Name | None = None

    @property
    def plot_slice(self) -> str | None:
        return self.live_plot_slice or (self.slices[0] if self.slices else None)


class Decision(_Strict):
    """The decision words of a binary classifier: ``positive`` at or above the threshold (a
    regressor takes no decision)."""

    positive: Name = "positive"
    negative: Name = "negative"


class Task(_Strict):
    """What the model predicts (models.tasks): a probability of the label being true
    (``binary_classification``) or the label's value (``regression``). ``score`` names the
    response and prediction-log field that holds the model's output; ``decision`` the words a
    classifier's response decides with."""

    type: Literal["binary_classification", "regression"]
    score: Name
    decision: Decision = Decision()


class UseCase(_Strict):
    """A loaded, checked declaration; ``root`` is its folder."""

    name: Name
    description: str = ""
    datasets: dict[Name, Dataset] = Field(min_length=1)
    vocabularies: dict[Name, tuple[str, ...]] = {}
    request: Request
    features: Features
    label: Label
    task: Task
    evaluation: Evaluation = Evaluation()
    # Overrides of the platform's defaults, checked by their owners when the platform loads
    # (models.spec.train_config/gate_policy, orchestration.triggers.trigger_policy).
    training: dict[Name, Any] = {}
    # How labelled rows are kept and split (orchestration.feature_assets.TrainingSetConfig).
    training_set: dict[Name, Any] = {}
    gate: dict[Name, Any] = {}
    retrain: dict[Name, Any] = {}
    # The module of the folder that generates demo data (see core.simulation), if any.
    simulator: Name | None = None
    root: Path = Field(default=Path("."), exclude=True)

    @property
    def file(self) -> Path:
        return self.root / DECLARATION

    def contract_path(self, dataset: str) -> Path:
        return self.root / self.datasets[dataset].contract

    @property
    def request_dataset(self) -> Dataset:
        return self.datasets[self.request.dataset]

    @property
    def feature_repo(self) -> Path:
        return self.root / self.features.repo

    def module(self, name: str) -> ModuleType:
        """The use case's Python module ``name`` (dotted, relative to its folder): imported as
        ``usecases.<folder>.<name>`` when the folder is under ``usecases/``, else from its file."""
        if self.root.parent == USECASES_DIR:
            return importlib.import_module(f"usecases.{self.root.name}.{name}")
        qualified = f"loopline_usecase_{self.name}.{name}"
        if qualified in sys.modules:
            return sys.modules[qualified]
        path = self.root.joinpath(*name.split(".")).with_suffix(".py")
        spec = importlib.util.spec_from_file_location(qualified, path)
        if spec is None or spec.loader is None:
            raise UseCaseError(self.file, "", f"cannot import {path}")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = loaded
        spec.loader.exec_module(loaded)
        return loaded

    def declared(self, block: str, cls: type[T], /, **overrides: Any) -> T:
        """``cls``, a frozen dataclass of the platform's defaults, with this use case's
        ``block`` (``training``, ``gate`` or ``retrain``) applied, then ``overrides`` (run
        configuration, the environment). A ``timedelta`` field is declared in minutes as
        ``<field>_minutes``. A key ``cls`` lacks, or a value it refuses, is a UseCaseError
        naming the field."""
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        for key, value in {**getattr(self, block), **overrides}.items():
            name = key.removesuffix("_minutes")
            if key.endswith("_minutes") and name in known:
                try:
                    values[name] = timedelta(minutes=float(value))
                except (TypeError, ValueError):
                    raise UseCaseError(self.file, f"{block}.{key}", "must be a number") from None
            elif key in known:
                values[key] = tuple(value) if isinstance(value, list) else value
            else:
                settable = sorted(
                    f"{n}_minutes" if "timedelta" in str(f.type) else n for n, f in known.items()
                )
                raise UseCaseError(
                    self.file, f"{block}.{key}", f"unknown; expected one of {settable}"
                )
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise UseCaseError(self.file, block, str(exc)) from None

    @property
    def label_maturity(self) -> timedelta:
        return timedelta(days=self.label.maturity_days)

    @property
    def timestamp_field(self) -> str:
        return next(n for n, f in self.request.fields.items() if f.type == "timestamp")


def _problems(uc: UseCase) -> list[tuple[str, str]]:
    """Cross-field mistakes pydantic's per-field types cannot see, as (field, problem)."""
    found: list[tuple[str, str]] = []
    for name, ds in uc.datasets.items():
        at = f"datasets.{name}"
        cols = ds.columns
        if ds.key not in cols:
            found.append((f"{at}.key", f"{ds.key!r} is not one of its columns {sorted(cols)}"))
        if ds.event_time is not None:
            if ds.event_time not in cols:
                found.append((f"{at}.event_time", f"{ds.event_time!r} is not one of its columns"))
            elif cols[ds.event_time] != "timestamp":
                found.append(
                    (
                        f"{at}.event_time",
                        f"{ds.event_time!r} is {cols[ds.event_time]}, not timestamp",
                    )
                )
        if not (uc.root / ds.contract).is_file():
            found.append((f"{at}.contract", f"no contract file {ds.contract!r} in {uc.root}"))
        derived = DERIVED_DRIFT_COLUMNS if ds.event_time else frozenset()
        for kind in ("numeric", "categorical"):
            for col in getattr(ds.drift, kind):
                if col not in cols and col not in derived:
                    found.append((f"{at}.drift.{kind}", f"{col!r} is not one of its columns"))
    req = uc.request
    if req.dataset not in uc.datasets:
        found.append(("request.dataset", f"{req.dataset!r} is not a declared dataset"))
        return found
    cols = uc.datasets[req.dataset].columns
    stamps = [n for n, f in req.fields.items() if f.type == "timestamp"]
    if len(stamps) != 1:
        found.append(("request.fields", f"needs exactly one timestamp field, has {stamps}"))
    else:
        carried = req.fields[stamps[0]].column_name(stamps[0])
        event_time = uc.datasets[req.dataset].event_time
        if carried in cols and carried != event_time:
            found.append(
                (
                    f"request.fields.{stamps[0]}",
                    f"carries column {carried!r}, but the event time of {req.dataset!r} is "
                    f"{event_time!r}: requests are judged and joined by their event time",
                )
            )
    if req.id not in req.fields:
        found.append(("request.id", f"{req.id!r} is not a request field"))
    elif req.fields[req.id].type != "id":
        found.append(("request.id", f"{req.id!r} must be of type id"))
    want = {"id": "string", "category": "string", "number": ("float", "int")}
    for name, f in req.fields.items():
        at = f"request.fields.{name}"
        column = f.column_name(name)
        if column not in cols:
            found.append((at, f"column {column!r} is not in dataset {req.dataset!r}"))
        elif f.type == "timestamp" and cols[column] != "timestamp":
            found.append((at, f"column {column!r} is {cols[column]}, not timestamp"))
        elif f.type in want and cols[column] not in want[f.type]:
            found.append((at, f"a {f.type} field cannot carry a {cols[column]} column"))
        if f.type == "category":
            if f.vocabulary is None:
                found.append((f"{at}.vocabulary", "a category field needs a vocabulary"))
            elif f.vocabulary not in uc.vocabularies:
                found.append((f"{at}.vocabulary", f"no vocabulary {f.vocabulary!r} declared"))
        if f.type == "number" and (f.min is None or f.max is None or not f.min <= f.max):
            found.append((at, "a number field needs min <= max"))
        if f.type != "number" and (f.min is not None or f.max is not None):
            found.append((at, "only a number field takes min and max"))
        used = name == req.id or f.type == "timestamp"
        if not used and name not in req.entity_keys and name not in req.model_inputs:
            found.append(
                (
                    at,
                    "the model never uses this field: it is not the id, the timestamp, an entity "
                    "key (request.entity_keys) nor a model input (request.model_inputs)",
                )
            )
    module = uc.root / f"{uc.features.module}.py"
    if not module.is_file():
        found.append(("features.module", f"no module {module.name} in {uc.root}"))
    for part in ("feature_store.yaml", "definitions.py"):
        if not (uc.root / uc.features.repo / part).is_file():
            found.append(("features.repo", f"{uc.features.repo}/ has no {part}"))
    label = uc.label
    if label.dataset not in uc.datasets:
        found.append(("label.dataset", f"{label.dataset!r} is not a declared dataset"))
    else:
        cols = uc.datasets[label.dataset].columns
        # A classifier learns a bool, a regressor a number.
        kinds = ("bool",) if uc.task.type == "binary_classification" else ("float", "int")
        want = {"column": kinds, "key": None, "time": ("timestamp",)}
        for part, allowed in want.items():
            column = getattr(label, part)
            if column not in cols:
                found.append((f"label.{part}", f"{column!r} is not a column of {label.dataset!r}"))
            elif allowed and cols[column] not in allowed:
                need = " or ".join(allowed)
                found.append((f"label.{part}", f"{column!r} is {cols[column]}, not {need}"))
    if uc.simulator is not None:
        module = uc.root.joinpath(*uc.simulator.split(".")).with_suffix(".py")
        if not module.is_file():
            found.append(("simulator", f"no module {uc.simulator!r} ({module.name}) in {uc.root}"))
    plotted = uc.evaluation.live_plot_slice
    if plotted is not None and plotted not in uc.evaluation.slices:
        found.append(("evaluation.live_plot_slice", f"{plotted!r} is not one of the slices"))
    for name, bucket in uc.evaluation.buckets.items():
        at = f"evaluation.buckets.{name}"
        if len(bucket.labels) != len(bucket.edges) + 1:
            found.append((at, f"{len(bucket.edges)} edges need {len(bucket.edges) + 1} labels"))
        if list(bucket.edges) != sorted(set(bucket.edges)):
            found.append((at, "edges must increase"))
    for kind in ("entity_keys", "model_inputs"):
        for name in getattr(req, kind):
            if name not in req.fields:
                found.append((f"request.{kind}", f"{name!r} is not a request field"))
    for name in req.model_inputs:
        if name in req.fields and req.fields[name].type not in ("number", "category"):
            found.append(("request.model_inputs", f"{name!r} is neither a number nor a category"))
    return found


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load(where: str | Path) -> UseCase:
    """The use case named ``where`` (a folder under ``usecases/``) or at the folder ``where``."""
    root = Path(where)
    if not root.is_dir() and not root.is_absolute() and len(root.parts) == 1:
        root = USECASES_DIR / str(where)
    file = root / DECLARATION
    if not file.is_file():
        known = sorted(p.parent.name for p in USECASES_DIR.glob(f"*/{DECLARATION}"))
        raise UseCaseError(file, "", f"no use case declared here (known use cases: {known})")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise UseCaseError(file, "", f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise UseCaseError(file, "", "must be a mapping of fields")
    try:
        uc = UseCase.model_validate({**raw, "root": root.resolve()})
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise UseCaseError(file, _dotted(first["loc"]), first["msg"] + more) from None
    problems = _problems(uc)
    if problems:
        field, problem = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UseCaseError(file, field, problem + more)
    return uc


@cache
def _cached(where: str) -> UseCase:
    return load(where)


def available(with_simulator: bool = False) -> list[str]:
    """The use cases under ``usecases/`` by name, the default one first (only those that
    generate demo data, if asked)."""
    names = sorted(
        (p.parent.name for p in USECASES_DIR.glob(f"*/{DECLARATION}")),
        key=lambda n: (n != DEFAULT_USECASE, n),
    )
    return [n for n in names if not with_simulator or load(n).simulator is not None]


def active() -> UseCase:
    """The use case this process runs: ``LOOPLINE_USECASE`` or ``fraud``."""
    return _cached(os.environ.get(ENV_VAR) or DEFAULT_USECASE)
