"""The results file every benchmark writes: one JSON file per run, read by ``benchmarks.report``.

A file says what ran (benchmark, variant, the exact command, its parameters), where (machine
facts, git commit), when (UTC) and what it measured: figures with their unit and, where a
figure has them, the anchor it is compared to, the ratio and the goal. Whether a goal is met is
computed from the ratio (or the value) when the file is written and again when it is read, so a
file cannot call a missed goal met. Smoke runs (``--smoke``) are marked in the file and in its
name; the report never publishes them. Files are written whole (temporary name, then rename)
and never edited: a new run is a new file.
"""

from __future__ import annotations

import argparse
import math
import operator
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, computed_field

from core.storage import write_bytes_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
RESULTS_ENV = "LOOPLINE_BENCH_RESULTS"  # where results go when --results-dir is not given
SCHEMA_VERSION = 1
PACKAGES = ("torch", "polars", "duckdb", "feast", "dagster", "torchserve", "soda-core")
# Environment that changes what a benchmark measures, so it belongs to its command line.
COMMAND_ENV = ("LOOPLINE_USECASE", "POLARS_MAX_THREADS", "OMP_NUM_THREADS")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


# A measurement; not measured is None, never NaN (JSON has no NaN).
Measured = Annotated[float | None, AfterValidator(_finite)]


class Goal(BaseModel):
    """A bound on a figure's ratio (the default) or on its value: ``ratio <= 3``; ``every``: on
    each round's ratio too, not only on their median."""

    op: Literal["<=", ">=", "<", ">"]
    target: float
    on: Literal["ratio", "value"] = "ratio"
    every: bool = False

    def text(self, unit: str) -> str:
        bound = f"{self.op} {self.target:g}" + ("x" if self.on == "ratio" else f" {unit}")
        return bound + (" in every round" if self.every else "")


class Anchor(BaseModel):
    """What a figure is compared to, measured in the same run where it has a value."""

    name: str
    value: Measured = None
    unit: str | None = None


class Figure(BaseModel):
    """One measured figure; ``ratio`` is the benchmark's own (``ratio_of`` says which way), and
    ``ratios`` each round's when ``ratio`` is their median. The README's table shows the figures
    that have both an anchor and a goal, and those marked ``headline``."""

    name: str
    value: Measured
    unit: str
    anchor: Anchor | None = None
    ratio: Measured = None
    ratio_of: str | None = None
    ratios: list[float] | None = None
    goal: Goal | None = None
    headline: bool = False

    @computed_field
    @property
    def met(self) -> bool | None:
        """The goal against the ratio or value; None without a goal or a measurement."""
        if self.goal is None:
            return None
        x = self.ratio if self.goal.on == "ratio" else self.value
        if x is None:
            return None
        rounds = self.ratios if self.goal.every and self.goal.on == "ratio" else None
        return all(_OPS[self.goal.op](r, self.goal.target) for r in [x, *(rounds or [])])


def compared(
    name: str,
    value: float | None,
    unit: str,
    anchor: str,
    anchor_value: float | None,
    *,
    ratio: float | None = None,
    ratio_of: str | None = None,
    ratios: list[float] | None = None,
    goal: Goal | None = None,
    headline: bool = False,
) -> Figure:
    """A figure beside its anchor in the same unit; the ratio defaults to value / anchor."""
    if ratio is None and value is not None and anchor_value:
        ratio = value / anchor_value
    return Figure(
        name=name,
        value=value,
        unit=unit,
        anchor=Anchor(name=anchor, value=anchor_value, unit=unit),
        ratio=ratio,
        ratio_of=ratio_of,
        ratios=ratios,
        goal=goal,
        headline=headline,
    )


class Machine(BaseModel):
    """Where a run ran: what a reader needs to compare two runs' figures."""

    cores: int
    cpu_model: str
    memory_gb: float | None
    os: str
    python: str
    packages: dict[str, str]
    gpu: str | None
    git_commit: str | None
    git_dirty: bool | None

    @classmethod
    def here(cls) -> Machine:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return cls(
            cores=len(os.sched_getaffinity(0)),
            cpu_model=_cpu_model(),
            memory_gb=_memory_gb(),
            os=platform.platform(),
            python=platform.python_version(),
            packages={p: v for p in PACKAGES if (v := _version(p))},
            gpu=_gpu(),
            git_commit=commit,
            git_dirty=None if dirty is None else bool(dirty),
        )


class BenchResult(BaseModel):
    """One run of one benchmark."""

    schema_version: int = SCHEMA_VERSION
    benchmark: str
    variant: str | None = None
    smoke: bool
    command: str
    date: datetime
    duration_s: float
    load_average: dict[str, list[float]]
    machine: Machine
    parameters: dict[str, Any]
    figures: list[Figure]
    skipped: list[str] = []
    notes: list[str] = []

    @property
    def key(self) -> str:
        """Benchmark and variant: what the report shows one row group for."""
        return self.benchmark + (f"[{self.variant}]" if self.variant else "")

    def file_name(self) -> str:
        stamp = self.date.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        parts = [self.benchmark, self.variant, stamp, "smoke" if self.smoke else None]
        return "-".join(p for p in parts if p) + ".json"


class Recording:
    """A benchmark run being recorded: started with its arguments, written with its figures."""

    def __init__(self, benchmark: str, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.benchmark = benchmark
        self.args = args
        self.command = command_line(benchmark, argv)
        self.started = time.monotonic()
        self.load_at_start = _load()

    def write(
        self,
        figures: Iterable[Figure],
        *,
        variant: str | None = None,
        skipped: Iterable[str] = (),
        notes: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ) -> Path:
        """The results file, in ``--results-dir`` (else $LOOPLINE_BENCH_RESULTS, else
        benchmarks/results/); prints its path. ``exclude``: arguments that are not sizes."""
        left_out = {"smoke", "results_dir", *exclude}
        parameters = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(self.args).items()
            if k not in left_out and v is not None
        }
        result = BenchResult(
            benchmark=self.benchmark,
            variant=variant,
            smoke=self.args.smoke,
            command=self.command,
            date=datetime.now(UTC),
            duration_s=round(time.monotonic() - self.started, 1),
            load_average={"start": self.load_at_start, "end": _load()},
            machine=Machine.here(),
            parameters=parameters,
            figures=list(figures),
            skipped=list(skipped),
            notes=list(notes),
        )
        path = write(result, results_dir(self.args.results_dir))
        print(f"results: {path}")
        return path


def parse_args(
    parser: argparse.ArgumentParser,
    benchmark: str,
    smoke: dict[str, Any],
    argv: Sequence[str] | None = None,
) -> tuple[argparse.Namespace, Recording]:
    """``parser``'s arguments plus ``--smoke`` and ``--results-dir``, and the run's recording.

    ``--smoke`` makes ``smoke``'s values the defaults (sizes of seconds to a minute, for
    ``make test``); an option given on the command line still wins."""
    words = ", ".join(f"{k}={v}" for k, v in smoke.items())
    parser.add_argument("--smoke", action="store_true", help=f"small sizes ({words})")
    parser.add_argument(
        "--results-dir", type=Path, help=f"default ${RESULTS_ENV}, else benchmarks/results"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if unknown := sorted(set(smoke) - set(vars(args))):
        raise ValueError(f"smoke sizes name unknown options: {unknown}")
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args, Recording(benchmark, args, argv)


def command_line(benchmark: str, argv: Sequence[str]) -> str:
    """The command that reruns this benchmark: environment that matters, interpreter (relative
    to the repository when it lives there), module and arguments."""
    python = sys.executable
    if Path(python).is_relative_to(ROOT):
        python = os.path.relpath(python, ROOT)
    env = [f"{k}={os.environ[k]}" for k in COMMAND_ENV if os.environ.get(k)]
    return shlex.join([*env, python, "-m", f"benchmarks.{benchmark}", *argv])


def results_dir(given: Path | None) -> Path:
    return Path(given or os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def write(result: BenchResult, directory: Path) -> Path:
    """``result`` as a new file in ``directory`` (a same-second name gets a suffix)."""
    path = directory / result.file_name()
    n = 1
    while path.exists():
        n += 1
        path = path.with_name(result.file_name().replace(".json", f"-{n}.json"))
    return write_bytes_atomic((result.model_dump_json(indent=2) + "\n").encode(), path)


def read(path: Path) -> BenchResult:
    """A results file, checked against the schema; a file that is not one says which."""
    try:
        return BenchResult.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a benchmark results file: {exc}") from exc


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return round(pages * size / 2**30, 1)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    """The CUDA device, when the benchmark imported torch and has one (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)
