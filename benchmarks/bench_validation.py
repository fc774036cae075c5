"""Validation + profiling of one transactions batch against a single-scan DuckDB floor.

Run: ``.venv/bin/python -m benchmarks.bench_validation [--rows 1000000] [--smoke]``

(a) Loopline: the soda contract over the parquet file, then the drift columns read, profiled
    (the batch's own profile) and compared with a reference profile.
(b) Floor: one DuckDB aggregate query that reads every column of the same file once.
Both are timed best of N in the same process; the ratio a/b is the figure of merit (goal <= 3x).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from benchmarks import results
from quality.contracts import run_contract
from quality.drift import build_profile, drift_frame, profile_and_compare
from quality.schema import drift_columns
from usecases.fraud.simulator import CHANNELS, COUNTRIES, SCHEMAS

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def make_transactions(rows: int, *, seed: int, amount_shift: float = 0.0) -> pl.DataFrame:
    """A valid transactions batch in the canonical schema, generated vectorised."""
    rng = np.random.default_rng(seed)
    start = NOW - timedelta(days=30)
    offsets_us = np.sort(rng.integers(0, 30 * 86_400 * 1_000_000, rows))
    frame = pl.DataFrame(
        {
            "transaction_id": pl.int_range(0, rows, eager=True) + seed * 10 * rows,
            "card_id": rng.integers(0, 100_000, rows),
            "merchant_id": rng.integers(0, 20_000, rows),
            "amount": np.clip(rng.lognormal(3.5 + amount_shift, 1.1, rows), 0.01, 50_000.0),
            "channel": rng.choice(np.array(CHANNELS), rows, p=[0.5, 0.3, 0.2]),
            "country": rng.choice(np.array(COUNTRIES), rows),
            "event_timestamp": offsets_us,
        }
    )
    return frame.select(
        pl.format("tx-{}", pl.col("transaction_id")).alias("transaction_id"),
        pl.format("card-{}", pl.col("card_id")).alias("card_id"),
        pl.format("m-{}", pl.col("merchant_id")).alias("merchant_id"),
        pl.col("amount"),
        pl.col("channel"),
        pl.col("country"),
        (pl.lit(start) + pl.duration(microseconds=pl.col("event_timestamp"))).alias(
            "event_timestamp"
        ),
    ).cast(SCHEMAS["transactions"])


def floor_sql(path: Path) -> str:
    """One aggregate that touches every column once: min, max and count of each."""
    parts = []
    for column in SCHEMAS["transactions"]:
        parts += [f"min({column})", f"max({column})", f"count({column})"]
    return f"SELECT count(*), {', '.join(parts)} FROM read_parquet('{path}')"


def best_of(repeats: int, cases: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best wall time of each case in seconds, rounds interleaved so load swings hit all alike."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    """Generate the batch, time both sides, print the table and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args, recording = results.parse_args(
        parser, "bench_validation", smoke={"rows": 20_000, "repeats": 1}
    )

    numeric, categorical = drift_columns("transactions")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transactions-bench.parquet"
        make_transactions(args.rows, seed=1, amount_shift=0.2).write_parquet(path)
        reference = build_profile(
            drift_frame("transactions", make_transactions(args.rows, seed=0)), numeric, categorical
        )
        columns = list(SCHEMAS["transactions"])
        drift_inputs = [c for c in columns if c in (*numeric, *categorical, "event_timestamp")]
        outcome: dict[str, object] = {}

        def contract() -> None:
            result = run_contract("transactions", path, now=NOW)
            if not result.passed:
                raise RuntimeError(f"benchmark batch failed its contract: {result.reasons}")

        def profile() -> None:
            frame = drift_frame("transactions", pl.read_parquet(path, columns=drift_inputs))
            _, outcome["drift"] = profile_and_compare(reference, frame)

        def loopline() -> None:
            contract()
            profile()

        def floor() -> None:
            con = duckdb.connect()
            try:
                con.execute(floor_sql(path)).fetchall()
            finally:
                con.close()

        loopline()  # warm-up: imports, file cache
        floor()
        timings = best_of(
            args.repeats,
            {
                "contract (soda, 15 checks)": contract,
                "profile + compare (4 features)": profile,
                "loopline total": loopline,
                "floor (1 DuckDB scan)": floor,
            },
        )

    ratio = timings["loopline total"] / timings["floor (1 DuckDB scan)"]
    print(f"rows: {args.rows:,}  best of {args.repeats}")
    width = max(len(k) for k in timings)
    for name, seconds in timings.items():
        print(f"  {name:<{width}}  {seconds * 1000:9.1f} ms")
    print(f"  {'ratio loopline / floor':<{width}}  {ratio:9.2f} x")
    drift = outcome["drift"]
    print(f"  max PSI vs reference (amount shifted): {drift.max_psi:.3f}")
    recording.write(figures(timings, drift.max_psi))


def figures(timings: dict[str, float], max_psi: float) -> list[results.Figure]:
    """Loopline's parts in ms, its total against the floor (goal <= 3x), and the drift seen."""
    parts = ("contract (soda, 15 checks)", "profile + compare (4 features)")
    return [
        *(results.Figure(name=k, value=timings[k] * 1000, unit="ms") for k in parts),
        results.compared(
            "validate + profile a batch (loopline total)",
            timings["loopline total"] * 1000,
            "ms",
            "one DuckDB scan of every column",
            timings["floor (1 DuckDB scan)"] * 1000,
            ratio_of="loopline / floor",
            goal=results.Goal(op="<=", target=3),
        ),
        results.Figure(name="max PSI vs reference (amount shifted)", value=max_psi, unit="PSI"),
    ]


if __name__ == "__main__":
    main()
