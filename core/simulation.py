"""Demo data for any use case: its simulator, the faults real batches have, and the driver that
lands batches into the landing folder in (simulated) time.

A use case may declare ``simulator: <module>`` in its ``usecase.yaml``; that module of its
folder provides (the *simulator protocol*):

- ``DRIFTS``: the drift modes it can simulate, ``"none"`` first;
- ``ScenarioConfig``: a frozen dataclass of everything that defines a scenario (two equal
  configs give byte-identical data). Besides its own fields it has ``seed``, ``start`` (None:
  ``default_start()``), ``batch_span``, ``rows_per_batch``, ``drift``, ``drift_start_batch``
  and ``drift_strength``, and checks its values in ``__post_init__`` (``ValueError``);
- ``Simulator(config)``: ``config`` and ``start`` (the resolved start); ``window(k)`` and
  ``batch_at(t)`` (batch ``k`` covers ``[start + k * span, start + (k + 1) * span)``);
  ``reference()``, the reference datasets (no event time) by name; ``events(k, since=,
  until=)``, the event datasets whose event time falls in window ``k`` (or its sub-window) by
  name, the request dataset first; ``truth(k)``, the label rows (the label dataset's schema) of
  every request of window ``k``, whenever each label arrives;
- optionally ``BACKTEST``: ``loopline backtest``'s shape (scenario fields, and the days of
  feature burn-in and warm-up before its first champion, ``burn_in_days`` and
  ``warmup_days``: ``orchestration.backtest.demo_config``), and ``DEMO``: how
  ``loopline demo`` runs it (``orchestration.cli_loop.DemoPlan``'s fields).

Everything else here is generic and reads the declaration: the driver (``run``,
``land_history``, ``land_reference_data``), the accelerated clock (``SimClock``), the atomic
landing (``land``) and the faults (``apply_fault``), which break the request dataset the way
upstream batches break, from its declared columns, types and request ranges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
import threading
import time
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl

from core.usecase import UseCase, UseCaseError, active

FAULTS: tuple[str, ...] = (
    "missing_column",
    "extra_column",
    "renamed_column",
    "wrong_dtype",
    "null_keys",
    "out_of_range",
    "empty_file",
    "corrupt_file",
    "duplicate",
)
FORMATS: tuple[str, ...] = ("parquet", "csv")
CSV_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.6f%:z"
# The RNG stream of the fault seeds: seeds of (scenario seed, FAULT_STREAM, batch index).
FAULT_STREAM = 7
# Scenario fields every use case's ScenarioConfig has (the driver and the CLI set them).
SCENARIO_FIELDS = (
    "seed",
    "start",
    "batch_span",
    "rows_per_batch",
    "drift",
    "drift_start_batch",
    "drift_strength",
)
_SIMULATOR_NAMES = ("DRIFTS", "ScenarioConfig", "Simulator")
_ROW_FAULTS = frozenset({"null_keys", "out_of_range"})


# -- the use case's simulator ---------------------------------------------------------------


def simulator_module(usecase: UseCase | None = None) -> ModuleType:
    """The use case's simulator module, checked against the protocol."""
    uc = usecase or active()
    if uc.simulator is None:
        raise UseCaseError(
            uc.file, "simulator", "this use case declares no simulator: land your own files"
        )
    module = uc.module(uc.simulator)
    missing = [name for name in _SIMULATOR_NAMES if not hasattr(module, name)]
    if missing:
        raise UseCaseError(uc.file, "simulator", f"{module.__name__} lacks {', '.join(missing)}")
    config_fields = {f.name for f in dataclasses.fields(module.ScenarioConfig)}
    lacking = [f for f in SCENARIO_FIELDS if f not in config_fields]
    if lacking:
        raise UseCaseError(
            uc.file, "simulator", f"{module.__name__}.ScenarioConfig lacks {', '.join(lacking)}"
        )
    return module


def scenario(usecase: UseCase | None = None, /, **fields: Any) -> Any:
    """The use case's ``ScenarioConfig`` with ``fields`` set; an unknown field is a ValueError
    naming the known ones."""
    config_cls = simulator_module(usecase).ScenarioConfig
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown scenario option(s) {unknown}; this scenario has {sorted(known)}")
    return config_cls(**fields)


def scenario_options(
    pairs: Iterable[str], usecase: UseCase | None = None
) -> dict[str, bool | int | float | str]:
    """``KEY=VALUE`` texts as scenario fields, each typed as its ``ScenarioConfig`` field
    (``bool``, ``int``, ``float`` or ``str``): the CLI's ``--scenario`` options."""
    config_cls = simulator_module(usecase).ScenarioConfig
    hints = typing.get_type_hints(config_cls)
    out: dict[str, bool | int | float | str] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"scenario option {pair!r}: expected KEY=VALUE")
        kind = hints.get(key)
        if kind is None or key in SCENARIO_FIELDS:
            settable = sorted(k for k in hints if k not in SCENARIO_FIELDS)
            raise ValueError(f"scenario option {key!r}: expected one of {settable}")
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[key] = text.lower() in ("true", "1")
            elif kind in (int, float, str):
                out[key] = kind(text)
            else:
                raise ValueError(f"{kind} cannot be set from the command line")
        except ValueError as exc:
            raise ValueError(f"scenario option {key}={text!r}: {exc}") from None
    return out


def check_scenario(config: Any, drifts: Iterable[str]) -> None:
    """The protocol's fields of a ``ScenarioConfig`` are sane (a ValueError otherwise): a
    use case's ``__post_init__`` calls it, then checks its own fields."""
    drifts = tuple(drifts)
    if config.seed < 0 or config.rows_per_batch < 0:
        raise ValueError("seed and rows_per_batch must be >= 0")
    if config.batch_span < timedelta(seconds=1):
        raise ValueError("batch_span must be at least one second")
    if config.drift not in drifts:
        raise ValueError(f"drift must be one of {drifts}, got {config.drift!r}")
    if config.drift_start_batch < 0 or not 0.0 <= config.drift_strength <= 1.0:
        raise ValueError("drift_start_batch must be >= 0 and drift_strength in [0, 1]")


def stream_rng(seed: int, stream: int, k: int = 0) -> np.random.Generator:
    """The RNG of one concern (``stream``) of window ``k``: any window regenerates alone, in any
    order, byte-identically. Stream ``FAULT_STREAM`` is the faults'."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, k]))


class Windows:
    """A base for a use case's ``Simulator``: the scenario's time grid and a cache of generated
    windows. Window ``k`` covers ``[start + k * span, start + (k + 1) * span)``; ``start`` is
    ``config.start`` in UTC, or ``default_start()``. A subclass implements ``_generate(k)``
    (every row of window ``k``, whatever dataset it lands in) and reads it with ``_batch(k)``,
    which keeps the newest ``cached_windows`` (label windows reach back a few)."""

    cached_windows = 256

    def __init__(self, config: Any) -> None:
        self.config = config
        start = config.start or default_start()
        self.start: datetime = (start if start.tzinfo else start.replace(tzinfo=UTC)).astimezone(
            UTC
        )
        self._cache: OrderedDict[int, pl.DataFrame] = OrderedDict()

    def window(self, k: int) -> tuple[datetime, datetime]:
        if k < 0:
            raise ValueError("batch index must be >= 0")
        span = self.config.batch_span
        return self.start + k * span, self.start + (k + 1) * span

    def batch_at(self, t: datetime) -> int:
        """The window holding ``t`` (negative before ``start``)."""
        return (t - self.start) // self.config.batch_span

    def _batch(self, k: int) -> pl.DataFrame:
        if k not in self._cache:
            self._cache[k] = self._generate(k)
            while len(self._cache) > self.cached_windows:
                self._cache.popitem(last=False)
        return self._cache[k]

    def _generate(self, k: int) -> pl.DataFrame:
        raise NotImplementedError


def default_start(now: datetime | None = None) -> datetime:
    """Now rounded down to the hour minus 21 days: three weeks of history to backfill."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=21)


def reference_datasets(usecase: UseCase | None = None) -> tuple[str, ...]:
    """The datasets without an event time: reference data, landed once."""
    uc = usecase or active()
    return tuple(name for name, d in uc.datasets.items() if d.event_time is None)


@dataclass(frozen=True)
class LandedBatch:
    """One file the driver landed; ``rows`` is the row count of the frame it was written from;
    ``batch_index`` is -1 for reference data."""

    dataset: str
    path: Path
    rows: int
    window_start: datetime
    window_end: datetime
    batch_index: int
    fault: str | None = None


# -- faults -----------------------------------------------------------------------------------


def _renamed(column: str) -> str:
    """An upstream rename: ``snake_case`` to ``camelCase``, else a suffix."""
    head, *rest = column.split("_")
    return head + "".join(p.title() for p in rest) if rest else f"{column}_value"


def apply_fault(
    df: pl.DataFrame,
    fault: str,
    seed: int = 0,
    *,
    fmt: str = "parquet",
    usecase: UseCase | None = None,
) -> pl.DataFrame | bytes:
    """A copy of ``df`` (a batch of the use case's request dataset) broken the way real upstream
    batches break, to exercise the gates.

    From the declaration: the key is nulled; a float column becomes text with a decimal comma;
    a ranged number field goes negative and past its maximum, a category field gets a value
    outside its vocabulary. Returns bytes only for ``corrupt_file`` (content that is not a valid
    ``fmt`` file). ``duplicate`` returns ``df`` unchanged: the fault is landing the same bytes
    twice.
    """
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
    uc = usecase or active()
    dataset = uc.request_dataset
    rng = np.random.default_rng(seed)
    key = dataset.key if dataset.key in df.columns else df.columns[0]
    if fault in _ROW_FAULTS and df.height < 3:
        raise ValueError(f"fault {fault!r} needs at least 3 rows")
    if fault == "missing_column":
        others = [c for c in df.columns if c != key]
        return df.drop(others[int(rng.integers(0, len(others)))])
    if fault == "extra_column":
        return df.with_columns(
            pl.Series("promo_code", rng.integers(0, 10_000, df.height)).cast(pl.String)
        )
    if fault == "renamed_column":
        options = [c for c in df.columns if c != key]
        old = options[int(rng.integers(0, len(options)))]
        return df.rename({old: _renamed(old)})
    if fault == "wrong_dtype":
        # A locale bug upstream: numbers as strings with a decimal comma.
        column = next(
            (c for c, t in dataset.columns.items() if t == "float" and c in df.columns), None
        )
        if column is None:
            raise ValueError(f"fault {fault!r} needs a float column")
        return df.with_columns(
            pl.col(column).round(2).cast(pl.String).str.replace(".", ",", literal=True)
        )
    if fault == "null_keys":
        n = max(1, df.height // 20)
        mask = np.zeros(df.height, dtype=bool)
        mask[rng.choice(df.height, size=n, replace=False)] = True
        return df.with_columns(
            pl.when(pl.Series(mask)).then(None).otherwise(pl.col(key)).alias(key)
        )
    if fault == "out_of_range":
        return _out_of_range(df, uc, rng)
    if fault == "empty_file":
        return df.clear()
    if fault == "corrupt_file":
        good = encode(df, fmt)
        if fmt == "parquet":
            return good[: max(4, len(good) // 2)]
        header = good.split(b"\n", 1)[0] + b"\n"
        return header + b"\xff\xfe\x00" + rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    return df


def _out_of_range(df: pl.DataFrame, uc: UseCase, rng: np.random.Generator) -> pl.DataFrame:
    """A third of the bad rows negative, a third far past the maximum (the first ranged number
    field), a third an unknown category (the first category field)."""
    fields = uc.request.fields.items()
    number = next(
        ((f.column_name(n), f) for n, f in fields if f.type == "number" and f.max is not None),
        None,
    )
    category = next((f.column_name(n) for n, f in fields if f.type == "category"), None)
    if number is None and category is None:
        raise ValueError("fault 'out_of_range' needs a ranged number or a category field")
    n = max(3, df.height // 30)
    idx = rng.choice(df.height, size=n, replace=False)
    kind = np.zeros(df.height, dtype=np.int8)
    kind[idx] = np.arange(n) % 3 + 1  # 1 negative, 2 absurd, 3 unknown category
    kinds = pl.Series(kind)
    broken = []
    if number is not None:
        column, field = number
        below = (
            -pl.col(column)
            if field.min is not None and field.min > 0
            else pl.lit(field.min or 0.0) - 1.0 - pl.col(column).abs()
        )
        broken.append(
            pl.when(kinds == 1)
            .then(below)
            .when(kinds == 2)
            .then(pl.col(column) + float(field.max) * 1000)
            .otherwise(pl.col(column))
            .alias(column)
        )
    if category is not None:
        broken.append(
            pl.when(kinds == 3).then(pl.lit("teleport")).otherwise(pl.col(category)).alias(category)
        )
    return df.with_columns(broken)


# -- landing ----------------------------------------------------------------------------------


def encode(df: pl.DataFrame, fmt: str = "parquet") -> bytes:
    """File bytes of ``df`` with fixed writer settings, so equal frames give equal bytes."""
    buf = io.BytesIO()
    if fmt == "parquet":
        df.write_parquet(buf, compression="zstd", compression_level=3, statistics=True)
    elif fmt == "csv":
        df.write_csv(buf, datetime_format=CSV_DATETIME_FORMAT)
    else:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return buf.getvalue()


def land(
    data: pl.DataFrame | bytes,
    landing_dir: str | Path,
    dataset: str,
    name: str,
    fmt: str = "parquet",
) -> Path:
    """Write ``<dataset>-<name>.<fmt>`` atomically: a reader sees no file or the whole file.

    Written to a hidden temp name in the same directory, fsynced, then renamed over the target.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if "-" in dataset or "/" in dataset or not dataset:
        raise ValueError(f"bad dataset name {dataset!r}")
    if "/" in name or name.startswith(".") or not name:
        raise ValueError(f"bad file name part {name!r}")
    payload = data if isinstance(data, bytes) else encode(data, fmt)
    directory = Path(landing_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{dataset}-{name}.{fmt}"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def reference_landed(landing_dir: str | Path, usecase: UseCase | None = None) -> bool:
    """Whether every reference dataset already has a file in the landing directory."""
    directory = Path(landing_dir)
    return all(any(directory.glob(f"{name}-*")) for name in reference_datasets(usecase))


# -- driver -----------------------------------------------------------------------------------


class SimClock:
    """Simulated "now" for a demo world: ``speed`` times faster than the wall clock, never
    ahead of it (contracts and request validation refuse future times).

    Until ``start`` it stands still at ``wall - headroom`` (history is landed up to it); then
    it advances ``speed`` simulated seconds per wall second until it meets the wall clock
    (its lead, the headroom plus the time it stood still, gone after ``lead / (speed - 1)``),
    and from there keeps pace with it. Elapsed time is read from a monotonic timer, so
    ``now`` never goes backwards.
    """

    def __init__(
        self,
        speed: float,
        headroom: timedelta,
        *,
        wall: datetime | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(speed) and speed >= 1.0):
            raise ValueError("speed must be finite and >= 1")
        if headroom < timedelta(0):
            raise ValueError("headroom must be >= 0")
        self.speed = speed
        self.headroom = headroom
        self._timer = timer
        self._wall0 = (wall or datetime.now(UTC)).astimezone(UTC)
        self._t0 = timer()
        self._started: float | None = None  # timer reading at start
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._started is not None

    def start(self) -> SimClock:
        """Lets simulated time run (once; later calls change nothing)."""
        with self._lock:
            if self._started is None:
                self._started = self._timer()
        return self

    def now(self) -> datetime:
        t = self._timer()
        wall = self._wall0 + timedelta(seconds=t - self._t0)
        origin = self._wall0 - self.headroom
        if self._started is None:
            return origin
        simulated = origin + timedelta(seconds=(t - self._started) * self.speed)
        return min(simulated, wall)

    def wall_seconds_until(self, t: datetime) -> float:
        """Wall seconds until ``now`` reaches ``t`` once started (0 if it has)."""
        ahead = (t - self.now()).total_seconds()
        return max(0.0, ahead / self.speed)


def land_reference_data(
    sim: Any,
    landing_dir: str | Path,
    fmt: str = "parquet",
    on_batch: Callable[[LandedBatch], None] | None = None,
    usecase: UseCase | None = None,
) -> list[LandedBatch]:
    """The reference datasets, unless the landing directory has them already."""
    if reference_landed(landing_dir, usecase):
        return []
    landed = []
    name = f"seed{sim.config.seed}"
    for dataset, frame in sim.reference().items():
        path = land(frame, landing_dir, dataset, name, fmt)
        landed.append(LandedBatch(dataset, path, frame.height, sim.start, sim.start, -1))
        if on_batch is not None:
            on_batch(landed[-1])
    return landed


def land_history(
    sim: Any,
    landing_dir: str | Path,
    *,
    until: datetime,
    files: int,
    fmt: str = "parquet",
    on_batch: Callable[[LandedBatch], None] | None = None,
) -> list[LandedBatch]:
    """Whole windows from the scenario start up to ``until`` (the last whole window before it)
    in ``files`` files per dataset, for bulk backfill: each file a Dagster run, so history goes
    in a few large files rather than one per window. The labels are those known by then."""
    last = sim.batch_at(until)  # windows before this one are whole
    if last <= 0:
        return []
    per_file = math.ceil(last / max(1, files))
    landed: list[LandedBatch] = []
    for first in range(0, last, per_file):
        end = min(first + per_file, last)
        lo, hi = sim.window(first)[0], sim.window(end - 1)[1]
        name = f"b{first:06d}-b{end - 1:06d}"
        windows = [sim.events(k) for k in range(first, end)]
        for dataset in windows[0]:
            frame = pl.concat([w[dataset] for w in windows])
            if frame.height:
                path = land(frame, landing_dir, dataset, name, fmt)
                landed.append(LandedBatch(dataset, path, frame.height, lo, hi, first))
                if on_batch is not None:
                    on_batch(landed[-1])
    return landed


def _fault_seed(seed: int, k: int) -> int:
    return int(stream_rng(seed, FAULT_STREAM, k).integers(2**31))


def run(
    config: Any,
    landing_dir: str | Path,
    *,
    batches: int | None = None,
    interval_s: float = 0.0,
    fault: str | None = None,
    fault_batch: int | None = None,
    fmt: str = "parquet",
    on_batch: Callable[[LandedBatch], None] | None = None,
    stop: threading.Event | None = None,
    start_batch: int = 0,
    resume_at: datetime | None = None,
    land_reference: bool = True,
    clock: Callable[[], datetime] | None = None,
    simulator: Any = None,
    usecase: UseCase | None = None,
) -> list[LandedBatch]:
    """Land reference data once, then a file per event dataset per step.

    A step is window ``k``, or the part of it up to "now" (whole seconds; ``clock``, such as a
    ``SimClock``'s ``now``, else the wall clock): nothing in the future is ever landed; the next
    step continues where the last part ended. ``batches`` counts steps; None runs until ``stop``
    is set. ``resume_at`` (a previous step's ``window_end``) resumes inside a window; otherwise
    the run starts at window ``start_batch``. The fault hits the first request-dataset file of
    window ``fault_batch`` (default: the first window run). Empty frames are not landed (labels
    may start arriving days into a scenario): an empty file is a fault the gates quarantine,
    not a normal batch.
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    uc = usecase or active()
    sim = simulator or simulator_module(uc).Simulator(config)
    now_fn = clock or (lambda: datetime.now(UTC))
    landed: list[LandedBatch] = []

    def emit(item: LandedBatch) -> None:
        landed.append(item)
        if on_batch is not None:
            on_batch(item)

    def wait(seconds: float) -> None:
        if seconds <= 0:
            return
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)

    if land_reference:
        landed += land_reference_data(sim, landing_dir, fmt, on_batch, uc)

    if resume_at is not None:
        k, lo = sim.batch_at(resume_at), resume_at
        if k < 0:
            raise ValueError("resume_at is before the scenario start")
    else:
        k, lo = start_batch, sim.window(start_batch)[0]
    fault_k = k if fault_batch is None else fault_batch
    if fault_k < k:
        raise ValueError(f"fault_batch {fault_k} is before the first batch of this run ({k})")
    fault_pending = fault is not None
    span_s = int(config.batch_span.total_seconds())
    width = len(str(span_s))
    steps = 0
    while (batches is None or steps < batches) and not (stop is not None and stop.is_set()):
        s, e = sim.window(k)
        caught_up = s + timedelta(seconds=math.floor((now_fn() - s).total_seconds()))
        hi = min(e, caught_up)
        if hi <= lo:
            wait(max(interval_s, 1.0))
            continue
        if (lo, hi) == (s, e):
            name = f"b{k:06d}"
        else:
            lo_s, hi_s = int((lo - s).total_seconds()), int((hi - s).total_seconds())
            name = f"b{k:06d}-{lo_s:0{width}d}-{hi_s:0{width}d}"
        for dataset, frame in sim.events(k, since=lo, until=hi).items():
            if dataset != uc.request.dataset:
                if frame.height:
                    path = land(frame, landing_dir, dataset, name, fmt)
                    emit(LandedBatch(dataset, path, frame.height, lo, hi, k))
                continue
            this_fault = None
            eligible = fault not in _ROW_FAULTS or frame.height >= 3
            if fault is not None and fault_pending and k >= fault_k and eligible:
                this_fault, fault_pending = fault, False
            payload: pl.DataFrame | bytes = frame
            if this_fault not in (None, "duplicate"):
                payload = apply_fault(
                    frame, this_fault, _fault_seed(config.seed, k), fmt=fmt, usecase=uc
                )
            if frame.height or this_fault is not None:
                path = land(payload, landing_dir, dataset, name, fmt)
                tagged = None if this_fault == "duplicate" else this_fault
                emit(LandedBatch(dataset, path, frame.height, lo, hi, k, tagged))
                if this_fault == "duplicate":
                    copy = land(path.read_bytes(), landing_dir, dataset, f"{name}-redelivered", fmt)
                    emit(LandedBatch(dataset, copy, frame.height, lo, hi, k, "duplicate"))
        steps += 1
        if hi == e:
            k, lo = k + 1, e
        else:
            lo = hi
        if batches is None or steps < batches:
            wait(interval_s)
    return landed
