"""Evidently's data-drift report on the benchmark's parquet files (run by ``bench_drift``).

Runs in ``benchmarks/.venv-drift-peer`` (Evidently 0.7.23 needs ``pandas<3``); it imports
nothing from Loopline. Writes the read and report times and each column's drift value as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset


def main() -> None:
    """Read both files with pandas, run ``Report([DataDriftPreset()])``, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--current", type=Path, required=True)
    parser.add_argument("--numeric", required=True)
    parser.add_argument("--categorical", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    definition = DataDefinition(
        numerical_columns=args.numeric.split(","), categorical_columns=args.categorical.split(",")
    )

    start = time.perf_counter()
    reference = pd.read_parquet(args.reference)
    current = pd.read_parquet(args.current)
    read_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    snapshot = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    metrics = snapshot.dict()["metrics"]
    drift_s, drift_cpu_s = time.perf_counter() - start, time.process_time() - cpu

    columns = {}
    for metric in metrics:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            columns[config["column"]] = {
                "method": config["method"],
                "value": float(metric["value"]),
                "drift": bool(metric["value"] >= config["threshold"]),
            }
    timings = {"read_s": read_s, "drift_s": drift_s, "drift_cpu_s": drift_cpu_s}
    args.out.write_text(json.dumps({**timings, "columns": columns}))


if __name__ == "__main__":
    main()
