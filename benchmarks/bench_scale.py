"""Scale-out profile: online lookups on Redis vs SQLite, TorchServe with 1 vs 2 workers.

Run: ``make bench-scale``, or ``.venv/bin/python -m benchmarks.bench_scale [--lookups 2000]
[--duration 10] [--rounds 2] [--batch-sizes 32,1] [--smoke]`` (``--smoke``: 20 lookups, 2-s
runs, one round, batch size 32 only)

Setup (in a temporary home): ``tests.serving.kit.build_serving_home`` (simulated transactions,
Feast features materialized into SQLite, a trained champion), and a private redis-server
(``tests.scale.services``) into which the same feature rows are materialized.

(a) Online lookups through ``features.store.online_features`` (the serving handler's path: the
    FeatureService, TTL nulling, on-demand features) for the same requests, 1 and 32 entities
    per call, SQLite and Redis calls interleaved; p50 and p99 per call. Both answers are checked
    equal first. Also the store's own read (``FeatureStore.get_online_features`` of the views'
    features), the part the online store decides. Redis runs on loopback here, so the ratio
    prices the client and protocol, not a network hop.
(b) Serving throughput: two TorchServe instances from ``serving.process.TorchServeProcess``
    over the same home and champion, ``workers_per_model`` 1 and 2, each with dynamic batching
    (32, 5 ms) and with batch size 1; wrk (``benchmarks/serving_load.lua``) at 32 clients. The
    two instances run back to back within a round (second round reversed); ratios are taken
    within a round, the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from benchmarks import bench_serving, results
from benchmarks.bench_serving import Run, Target, load, measure, wrk
from features.store import feature_store, online_features, redis_online_store
from serving.process import TorchServeProcess
from tests.scale.services import redis_server
from tests.serving.kit import ServingHome, build_serving_home

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BODIES = 512
CLIENTS = 32


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def lookups(home: ServingHome, redis_url: str, n: int) -> list[tuple[str, float, float, float]]:
    """(case, SQLite ms, Redis ms, ratio) for p50 and p99 at 1 and 32 entities per call."""
    redis_store = feature_store(home.home, redis_online_store(redis_url))
    redis_store.materialize(start_date=EPOCH, end_date=datetime.now(UTC))
    stores = {"sqlite": feature_store(home.home), "redis": redis_store}
    requests = home.transactions.select(
        "card_id",
        "merchant_id",
        "amount",
        "country",
        pl.col("event_timestamp").alias("transaction_timestamp"),
    )
    at = datetime.now(UTC)
    sample = requests.head(64)
    answers = {k: online_features(s, sample, at=at) for k, s in stores.items()}
    if not answers["redis"].equals(answers["sqlite"]):
        raise RuntimeError("Redis and SQLite online features differ")
    # The store's own read, without the service resolution, TTL nulling and on-demand
    # transformation around it: the part the online store decides.
    refs = [f"{v.name}:{f.name}" for v in stores["sqlite"].list_feature_views() for f in v.features]

    def read(store, batch: pl.DataFrame) -> None:
        keys = batch.select("card_id", "merchant_id").to_dicts()
        store.get_online_features(features=refs, entity_rows=keys).to_dict()

    calls = {
        "online_features": lambda store, batch: online_features(store, batch, at=at),
        "store read only": read,
    }
    rows = []
    for label, call in calls.items():
        for size in (1, 32):
            times: dict[str, list[float]] = {k: [] for k in stores}
            for i in range(n):
                batch = requests.slice((i * size) % (requests.height - size), size)
                for name, store in stores.items():
                    began = time.perf_counter()
                    call(store, batch)
                    times[name].append((time.perf_counter() - began) * 1000)
            for q in (50, 99):
                sqlite, redis = percentile(times["sqlite"], q), percentile(times["redis"], q)
                rows.append(
                    (f"{label}, p{q}, {size:>2} entit{'y' if size == 1 else 'ies'}", sqlite, redis)
                )
    return [(case, s, r, r / s) for case, s, r in rows]


def torchserve(home: ServingHome, workers: int, batch_size: int) -> TorchServeProcess:
    """bench_serving's instance (own serving dir and ports over the home), with ``workers``."""
    base = bench_serving.torchserve(
        home, f"w{workers}-b{batch_size}", batch_size=batch_size, floor=False
    )
    return TorchServeProcess(replace(base.config, workers_per_model=workers), home.registry.path)


def serve(home: ServingHome, tmp: Path, args, stack: ExitStack) -> list[tuple[str, Run, Run]]:
    bodies_file = tmp / "bodies.jsonl"
    bodies_file.write_text("".join(json.dumps(b) + "\n" for b in home.requests(BODIES)))
    results: list[tuple[str, Run, Run]] = []
    for batch_size in args.batch_sizes:
        targets = {}
        # One pair at a time: four TorchServe instances at once do not fit 2 cores' memory
        # and CPU without disturbing each other.
        with ExitStack() as pair:
            for workers in (1, 2):
                process = torchserve(home, workers, batch_size)
                pair.callback(process.stop)
                process.start(timeout=300)
                url = f"{process.config.inference_url}/predictions/{process.config.model_name}"
                targets[workers] = Target(
                    f"w{workers}-b{batch_size}", url, process.client().keys.inference, process
                )
            for target in targets.values():
                wrk(target, bodies_file, CLIENTS, args.warmup)
            for k in range(args.rounds):
                order = (1, 2) if k % 2 == 0 else (2, 1)
                runs = {w: measure(targets[w], bodies_file, CLIENTS, args.duration) for w in order}
                for w in (1, 2):
                    r = runs[w]
                    print(
                        f"  batch {batch_size:>2}, {w} worker(s), round {k + 1}: {r.rps:7.0f} req/s"
                        f"  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:7.2f} ms  errors {r.errors}",
                        flush=True,
                    )
                    if r.errors:
                        raise RuntimeError(f"{r.case}: {r.errors} failed requests")
                results.append((f"batch {batch_size}", runs[1], runs[2]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=2000, help="calls per store and size")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per server, first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[32, 1],
        help="TorchServe batch sizes of (b), comma-separated (default 32,1)",
    )
    smoke = {"lookups": 20, "duration": 2.0, "warmup": 1.0, "rounds": 1, "batch_sizes": [32]}
    args, recording = results.parse_args(parser, "bench_scale", smoke)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (`make bench-tools` does)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = Path(tempfile.mkdtemp(prefix="loopline-bench-scale-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        started = time.monotonic()
        print(f"setup in {tmp} ({load()})", flush=True)
        home = build_serving_home(tmp / "home")
        home.register(seed=1, champion=True)
        redis_url = stack.enter_context(redis_server())

        print(f"\n(a) online lookups, {args.lookups} calls each ({load()})")
        print(f"  {'case':<38} {'SQLite ms':>10} {'Redis ms':>10} {'Redis / SQLite':>15}")
        lookup_rows = lookups(home, redis_url, args.lookups)
        for case, sqlite, redis, ratio in lookup_rows:
            print(f"  {case:<38} {sqlite:>10.3f} {redis:>10.3f} {ratio:>14.2f}x")

        print(f"\n(b) TorchServe, {CLIENTS} clients, {args.duration:g} s per run ({load()})")
        pairs = serve(home, tmp, args, stack)
        print(f"\nratios, 2 workers / 1 worker, median of {args.rounds} round(s):")
        worker_rows = worker_figures(pairs)
        for rps, p99 in zip(worker_rows[::2], worker_rows[1::2], strict=True):
            case = rps.name.rsplit(", ", 1)[-1]
            print(f"  {case:<9} throughput {rps.ratio:5.2f}x   p99 {p99.ratio:5.2f}x")
        print(f"\ntotal {time.monotonic() - started:.0f}s ({load()})")
        lookup_figures = [
            results.compared(
                f"online lookup, Redis: {' '.join(case.split())}",
                redis,
                "ms",
                "SQLite, same keys",
                sqlite,
                ratio_of="redis / sqlite",
                headline=case.startswith("online_features, p50"),
            )
            for case, sqlite, redis, _ in lookup_rows
        ]
        recording.write(lookup_figures + worker_rows)


def worker_figures(pairs: list[tuple[str, Run, Run]]) -> list[results.Figure]:
    """Per batch size: throughput and p99 of 2 workers against 1, the median of the rounds'
    ratios (each round's kept), beside each side's median."""
    out = []
    for case in dict.fromkeys(c for c, _, _ in pairs):
        mine = [(one, two) for c, one, two in pairs if c == case]
        for metric, unit, label in (("rps", "req/s", "throughput"), ("p99_ms", "ms", "p99")):
            per_round = [getattr(two, metric) / getattr(one, metric) for one, two in mine]
            out.append(
                results.compared(
                    f"serving {label}, 2 TorchServe workers, {CLIENTS} clients, {case}",
                    statistics.median(getattr(two, metric) for _, two in mine),
                    unit,
                    "1 worker",
                    statistics.median(getattr(one, metric) for one, _ in mine),
                    ratio=statistics.median(per_round),
                    ratio_of=f"2 workers / 1 worker, median of {len(mine)} round(s)",
                    ratios=per_round,
                    headline=metric == "rps",
                )
            )
    return out


if __name__ == "__main__":
    main()
