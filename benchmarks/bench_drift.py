"""Drift statistics on 1M reference + 1M current rows x 16 columns: Loopline vs Evidently (issue 6).

Run: ``make bench-drift``, or ``.venv/bin/python -m benchmarks.bench_drift
[--rows 1000000] [--loopline-runs 3] [--peer-python benchmarks/.venv-drift-peer/bin/python]
[--smoke]``. A smoke run (``--smoke``) without the peer's venv measures Loopline and checks it
against SciPy, and records the peer as skipped.

Two frames (10 numeric + 6 categorical columns, seeded; several columns drift, some gain nulls
or a new category) are written to parquet in a temp dir. Each side then runs in its own process,
so wall time and peak RSS (``os.wait4``) are measured the same way:

- ``loopline``: ``pl.read_parquet`` of both files, ``build_profile`` of the reference and
  ``compare`` of the current batch: the calls ``serving.monitoring.serving_drift`` (the
  ``drift_report`` asset) makes. Run ``--loopline-runs`` times (median), plus once with
  ``POLARS_MAX_THREADS=1``;
- ``evidently``: ``pd.read_parquet`` of both files and ``Report([DataDriftPreset()])`` with the
  same column types, in ``--peer-python`` (its own venv: Evidently 0.7.23 needs ``pandas<3``;
  ``benchmarks/drift_peer.py``).

Each side times the parquet read and the drift statistics separately, the latter in wall and
CPU time, symmetrically: from frames in memory to the per-column results as a plain dict
(Evidently's ``snapshot.dict()``, Loopline's ``DriftResult.to_dict()``); writing them out is
untimed on both sides. Both ratios Evidently / Loopline of the drift statistics have the goal,
wall and CPU time: on a loaded machine the CPU-time one is the steadier (a 1 s run depends on
when it gets a core, a 100 s run averages the load).

Afterwards the KS statistic and Jensen-Shannon distance of every column are checked against
SciPy on the same inputs (within 1e-9): Loopline's KS compares the reference profile's stored
20,000-row sample with every current value, so SciPy gets that sample and the current column.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from benchmarks import results
from quality.drift import OTHER, Profile, build_profile, compare

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_SCRIPT = HERE / "drift_peer.py"
DEFAULT_PEER = HERE / ".venv-drift-peer" / "bin" / "python"
TOLERANCE = 1e-9

NUMERIC = [
    "amount",
    "latency_ms",
    "score_a",
    "score_b",
    "balance",
    "hour_of_day",
    "velocity_1h",
    "ratio",
    "age_days",
    "rounded_z",
]
CATEGORICAL = ["channel", "country", "merchant_category", "merchant", "device", "is_weekend"]
CHANNELS = ["web", "app", "pos"]
COUNTRIES = [f"C{i:02d}" for i in range(20)]
MCC = [f"mcc-{i}" for i in range(60)]
MERCHANTS = [f"m-{i}" for i in range(300)]
DEVICES = ["ios", "android", "windows", "mac", "linux"]


def make_frame(rows: int, *, seed: int, drifted: bool) -> pl.DataFrame:
    """One batch; ``drifted`` moves six numeric and three categorical columns."""
    rng = np.random.default_rng(seed)
    d = 1.0 if drifted else 0.0

    def with_nulls(values: np.ndarray, rate: float) -> pl.Series:
        mask = rng.random(rows) < rate
        return pl.Series(values).set(pl.Series(mask), None) if rate else pl.Series(values)

    def categories(names: list[str], p: np.ndarray) -> np.ndarray:
        return np.asarray(names)[rng.choice(len(names), rows, p=p / p.sum())]

    hour_p = np.exp(-0.5 * ((np.arange(24) - 14 + 4 * d) / 4.0) ** 2)
    zipf = 1.0 / np.arange(1, len(MERCHANTS) + 1) ** 1.1
    devices = DEVICES + (["smart_tv"] if drifted else [])
    device_p = np.array([0.35, 0.35, 0.15, 0.1, 0.05] + ([0.05] if drifted else []))
    return pl.DataFrame(
        {
            "amount": np.round(rng.lognormal(3.5 + 0.2 * d, 1.1, rows), 2),
            "latency_ms": rng.normal(120.0, 15.0, rows),
            "score_a": rng.normal(0.1 * d, 1.0, rows),
            "score_b": rng.uniform(0.0, 100.0, rows),
            "balance": rng.exponential(2000.0 * (1 + 0.25 * d), rows),
            "hour_of_day": rng.choice(24, rows, p=hour_p / hour_p.sum()),
            "velocity_1h": with_nulls(rng.normal(3.0, 1.0, rows), 0.05 + 0.10 * d),
            "ratio": rng.gamma(2.0, 2.0, rows),
            "age_days": rng.beta(2.0 + 0.5 * d, 5.0, rows) * 3650,
            "rounded_z": np.round(rng.normal(0.0, 1.0, rows), 2),
            "channel": categories(
                CHANNELS, np.array([0.5, 0.3, 0.2]) + d * np.array([-0.1, 0.1, 0])
            ),
            "country": categories(COUNTRIES, np.ones(len(COUNTRIES))),
            "merchant_category": categories(MCC, np.linspace(1.0, 2.0 + d, len(MCC))),
            "merchant": categories(MERCHANTS, zipf),
            "device": with_nulls(categories(devices, device_p), 0.02),
            "is_weekend": categories(["no", "yes"], np.array([5.0, 2.0])),
        }
    )


@dataclass(frozen=True)
class Run:
    """One side's process: its own timings and result, plus wall time and peak RSS."""

    side: str
    wall_s: float
    peak_rss_mb: float
    payload: dict[str, Any]

    @property
    def read_s(self) -> float:
        return self.payload["read_s"]

    @property
    def drift_s(self) -> float:
        return self.payload["drift_s"]

    @property
    def drift_cpu_s(self) -> float:
        return self.payload["drift_cpu_s"]

    @property
    def work_s(self) -> float:
        return self.read_s + self.drift_s


def run_process(side: str, command: list[str], out: Path, env: dict[str, str]) -> Run:
    """Start one side, wait for it with ``os.wait4`` (its own peak RSS), read its JSON result."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} exited with {proc.returncode}: {command}")
    return Run(side, wall, usage.ru_maxrss / 1024, json.loads(out.read_text()))


def loopline_worker(reference: Path, current: Path, out: Path) -> None:
    """The timed Loopline side: read both files, profile the reference, compare the batch."""
    start = time.perf_counter()
    ref = pl.read_parquet(reference)
    cur = pl.read_parquet(current)
    read_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    profile = build_profile(ref, NUMERIC, CATEGORICAL)
    result = compare(profile, cur).to_dict()  # as Evidently's side ends in snapshot.dict()
    drift_s, drift_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    profile.save(out.with_suffix(".profile.json"))  # for the SciPy check, untimed
    timings = {"read_s": read_s, "drift_s": drift_s, "drift_cpu_s": drift_cpu_s}
    out.write_text(json.dumps({**timings, "result": result}))


def scipy_check(reference: pl.DataFrame, current: pl.DataFrame, run: Run, profile_path: Path):
    """Per column: Loopline's KS / JS and SciPy's on the same inputs; raises past TOLERANCE."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import ks_2samp

    profile = Profile.load(profile_path)
    features = {f["feature"]: f for f in run.payload["result"]["features"]}
    rows = []
    for name in NUMERIC:
        sample = np.asarray(profile.numeric[name].sample)
        cur = _present(current[name])
        ref = _present(reference[name])
        expected = ks_2samp(sample, cur).statistic
        full = ks_2samp(ref, cur).statistic
        rows.append((name, "KS", features[name]["ks"], expected, full))
    for name in CATEGORICAL:
        p, q = _category_fractions(reference[name], current[name], profile.categorical[name])
        rows.append((name, "JS", features[name]["js"], jensenshannon(p, q, base=2), None))
    worst = max(abs(got - want) for _, _, got, want, _ in rows)
    if worst > TOLERANCE:
        bad = [r for r in rows if abs(r[2] - r[3]) > TOLERANCE]
        raise AssertionError(f"Loopline differs from SciPy by {worst:.3g}: {bad}")
    return rows, worst


def _present(series: pl.Series) -> np.ndarray:
    return series.cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()


def _category_fractions(reference: pl.Series, current: pl.Series, profile: Any):
    """Reference and current category shares, rebuilt from the data (not from Loopline's code).

    The profile keeps the ``top_k`` most frequent reference categories (ties by name) and folds
    the rest into ``__other__``; a current category outside the kept ones goes to ``__other__``
    when the reference was folded, and to its own bin (reference share 0) when it was not.
    """
    ref_counts = dict(reference.drop_nulls().value_counts().iter_rows())
    cur_counts = dict(current.drop_nulls().value_counts().iter_rows())
    ranked = sorted(ref_counts, key=lambda k: (-ref_counts[k], k))
    kept = ranked[: len(profile.frequencies) - profile.truncated]
    if profile.truncated:
        assert set(kept) | {OTHER} == set(profile.frequencies)

        def fold(counts: dict[str, int]) -> dict[str, int]:
            out = {k: counts.get(k, 0) for k in kept}
            out[OTHER] = sum(v for k, v in counts.items() if k not in out)
            return out

        ref_counts, cur_counts = fold(ref_counts), fold(cur_counts)
    keys = sorted(set(ref_counts) | set(cur_counts))
    p = np.array([ref_counts.get(k, 0) for k in keys], dtype=np.float64)
    q = np.array([cur_counts.get(k, 0) for k in keys], dtype=np.float64)
    return p / p.sum(), q / q.sum()


def main() -> None:
    """Generate the data, run both sides, check against SciPy, print the tables and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loopline-runs", type=int, default=3)
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER)
    parser.add_argument("--worker", choices=["loopline"], help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--current", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args, recording = results.parse_args(
        parser, "bench_drift", smoke={"rows": 20_000, "loopline_runs": 1}
    )
    if args.worker:
        loopline_worker(args.reference, args.current, args.out)
        return
    skipped = []
    if not args.peer_python.exists():
        if not args.smoke:
            parser.error(f"{args.peer_python} not found: run `make bench-drift` to create it")
        skipped.append(
            f"peer (Evidently DataDriftPreset): {args.peer_python} not found; "
            "`make bench-drift` installs it"
        )
        print(f"skipped: {skipped[0]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        reference = make_frame(args.rows, seed=0, drifted=False)
        current = make_frame(args.rows, seed=1, drifted=True)
        paths = {"reference": tmp / "reference.parquet", "current": tmp / "current.parquet"}
        reference.write_parquet(paths["reference"])
        current.write_parquet(paths["current"])
        print(
            f"data: {args.rows:,} + {args.rows:,} rows x {len(NUMERIC) + len(CATEGORICAL)} "
            f"columns, {sum(p.stat().st_size for p in paths.values()) / 1e6:.0f} MB parquet, "
            f"generated in {time.perf_counter() - start:.1f} s; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        files = ["--reference", str(paths["reference"]), "--current", str(paths["current"])]
        env = {**os.environ, "DO_NOT_TRACK": "1"}

        def loopline(i: int, threads: int | None = None) -> Run:
            out = tmp / f"loopline-{i}.json"
            run_env = {**env, "POLARS_MAX_THREADS": str(threads)} if threads else env
            command = [sys.executable, "-m", "benchmarks.bench_drift", "--worker", "loopline"]
            return run_process("loopline", [*command, *files, "--out", str(out)], out, run_env)

        def evidently() -> Run:
            out = tmp / "evidently.json"
            columns = ["--numeric", ",".join(NUMERIC), "--categorical", ",".join(CATEGORICAL)]
            command = [str(args.peer_python), str(PEER_SCRIPT), *files, *columns]
            return run_process("evidently", [*command, "--out", str(out)], out, env)

        # Evidently between Loopline's runs, so a load swing on the shared machine hits both.
        runs = [loopline(0)]
        print(f"loopline run 1: {runs[0].work_s:.2f} s", flush=True)
        peer = None
        if not skipped:
            peer = evidently()
            print(f"evidently: {peer.work_s:.1f} s", flush=True)
        for i in range(1, args.loopline_runs):
            runs.append(loopline(i))
        single = loopline(args.loopline_runs, threads=1)
        if any(r.payload["result"] != runs[0].payload["result"] for r in [*runs, single]):
            raise AssertionError("Loopline's runs disagree with each other")
        checks, worst = scipy_check(
            reference, current, runs[0], (tmp / "loopline-0.json").with_suffix(".profile.json")
        )

    report(args, runs, single, peer, checks, worst)
    recording.write(figures(runs, single, peer, worst), skipped=skipped)


def figures(runs: list[Run], single: Run, peer: Run | None, worst: float) -> list[results.Figure]:
    """The ratios printed, Evidently's side as the anchor, and the SciPy check; without the
    peer, Loopline's own medians."""
    median = {k: statistics.median(getattr(r, k) for r in runs) for k in UNITS}
    scipy = results.Figure(
        name="largest |Loopline - SciPy| (KS, JS)",
        value=worst,
        unit="abs",
        goal=results.Goal(op="<=", target=TOLERANCE, on="value"),
        headline=True,
    )
    if peer is None:
        return [
            *(
                results.Figure(name=f"loopline {k}", value=median[k], unit=u)
                for k, u in UNITS.items()
            ),
            scipy,
        ]
    out = []
    for name, (field_, one_thread, goal) in RATIOS.items():
        value = getattr(single, field_) if one_thread else median[field_]
        out.append(
            results.compared(
                name,
                value,
                UNITS[field_],
                "Evidently 0.7.23 DataDriftPreset, same data",
                getattr(peer, field_),
                ratio=getattr(peer, field_) / value,
                ratio_of="evidently / loopline",
                goal=results.Goal(op=">=", target=50) if goal else None,
            )
        )
    return [*out, scipy]


UNITS = {"drift_s": "s", "drift_cpu_s": "s", "work_s": "s", "wall_s": "s", "peak_rss_mb": "MB"}
# The ratios printed (evidently / loopline): the Run field each divides, whether Loopline's side
# is its 1-thread run (else the median of its runs), and whether issue 6's goal (>= 50x) applies.
RATIOS = {
    "drift statistics (frames in memory)": ("drift_s", False, True),
    "drift statistics, CPU time": ("drift_cpu_s", False, True),
    "drift, loopline on 1 Polars thread": ("drift_s", True, False),
    "drift CPU time, loopline on 1 thread": ("drift_cpu_s", True, False),
    "read parquet + drift": ("work_s", False, False),
    "whole process (imports too)": ("wall_s", False, False),
    "peak RSS": ("peak_rss_mb", False, False),
}


def report(args, runs: list[Run], single: Run, peer: Run | None, checks, worst: float) -> None:
    """Print the timing table, the ratios, the per-column statistics and the SciPy check."""
    fields = ("read_s", "drift_s", "drift_cpu_s", "work_s", "wall_s", "peak_rss_mb")
    median = {k: statistics.median(getattr(r, k) for r in runs) for k in fields}

    def row(name: str, values: dict[str, float] | Run) -> None:
        get = values.get if isinstance(values, dict) else lambda k: getattr(values, k)
        cells = " ".join(
            f"{get(k):{w}.2f}" for k, w in zip(fields[:-1], (8, 9, 9, 9, 10), strict=True)
        )
        print(f"  {name:<34} {cells} {get('peak_rss_mb'):9.0f}")

    columns = len(NUMERIC) + len(CATEGORICAL)
    print(f"\nrows: {args.rows:,} reference + {args.rows:,} current, {columns} columns")
    print(
        "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    header = ("read s", "drift s", "drift cpu", "work s", "process s", "RSS MB")
    print(
        f"  {'side':<34} "
        + " ".join(f"{h:>{w}}" for h, w in zip(header, (8, 9, 9, 9, 10, 9), strict=True))
    )
    row(f"loopline (median of {len(runs)})", median)
    for r in runs:
        row("  loopline run", r)
    row("  loopline, POLARS_MAX_THREADS=1", single)
    if peer is not None:
        row("evidently DataDriftPreset", peer)
        for figure in figures(runs, single, peer, worst)[:-1]:
            print(f"  ratio evidently / loopline, {figure.name:<36} {figure.ratio:7.1f} x")

    loop = {f["feature"]: f for f in runs[0].payload["result"]["features"]}
    ev = peer.payload["columns"] if peer else {}
    print("\nper column: Loopline PSI / KS (20k reference sample vs all current) / JS (base 2),")
    print("SciPy on the same inputs, SciPy KS on all reference rows; Evidently's own test")
    print(f"  {'column':<18} {'psi':>7} {'stat':>4} {'loopline':>10} {'scipy':>10} "
          f"{'|diff|':>8} {'ks full':>8}  evidently")  # fmt: skip
    for name, stat, got, want, full in checks:
        f = loop[name]
        full_s = f"{full:8.4f}" if full is not None else " " * 8
        print(
            f"  {name:<18} {f['psi']:7.3f} {stat:>4} {got:10.6f} {want:10.6f} "
            f"{abs(got - want):8.1e} {full_s}{_evidently_cell(ev.get(name), stat)}"
        )
    print(f"  largest |Loopline - SciPy|: {worst:.1e} (tolerance {TOLERANCE:g}): equal")
    drifted = [f["feature"] for f in runs[0].payload["result"]["features"] if f["psi"] > 0.1]
    print(f"  PSI > 0.1: {', '.join(drifted)}")
    if peer is not None:
        print(f"  Evidently drifted: {', '.join(k for k, e in ev.items() if e['drift'])}")
    new = {f["feature"]: f["new_categories"] for f in loop.values() if f["new_categories"]}
    print(f"  new categories: {new}")


def _evidently_cell(e: dict[str, Any] | None, stat: str) -> str:
    """Evidently's test and value for a column ("" without the peer)."""
    if e is None:
        return ""
    # Evidently's JS is SciPy's in base e: in base 2 it is the value / sqrt(ln 2).
    base2 = f" (base 2: {e['value'] / math.sqrt(math.log(2)):.6f})" if stat == "JS" else ""
    return f"  {e['method']} {e['value']:.4f}{base2}{' drift' if e['drift'] else ''}"


if __name__ == "__main__":
    main()
