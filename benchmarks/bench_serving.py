"""Serving: Loopline's TorchServe endpoint under load from wrk (a separate client process).

Run: ``make bench-serving``, or ``[LOOPLINE_USECASE=delivery] .venv/bin/python -m
benchmarks.bench_serving [--duration 15] [--warmup 5] [--rounds 2]
[--peer-python benchmarks/.venv-peer/bin/python] [--smoke]`` (``--smoke``: one round of 2-s runs;
without ``--peer-python`` the peer is skipped and its results file says so).

It serves the active use case (``LOOPLINE_USECASE``, the fraud demo by default). Setup (in a
temporary home): for the fraud demo, ``tests.serving.kit.build_serving_home`` (simulated
transactions, materialized Feast features, a trained model registered as champion); for any
other use case, the same from its own simulator and declaration
(``benchmarks.serving_home.build_usecase_home``). Then these servers on free loopback ports,
all serving that champion:

- ``loopline``: ``TorchServeProcess`` as ``loopline serve start`` runs it (batch 32, 5 ms);
- ``floor``: the same TorchServe settings and archive, with a no-op handler that parses the body
  and answers a constant JSON (``benchmarks/serving_floor_handler.py``);
- ``loopline-b1`` / ``floor-b1``: the same with batch size 1 (dynamic batching off);
- ``peer``: the two-hop setup users build today, ``feast serve`` on the same Feast repo and home
  plus a FastAPI model endpoint under uvicorn that calls it over HTTP and runs the same model
  (``benchmarks/serving_peer.py``), one worker each; it needs ``--peer-python`` (httpx). The
  peer is written for the fraud demo's transactions: for other use cases it is skipped (and
  says so), and (b) is not reported.

wrk POSTs 512 distinct valid requests in turn (``benchmarks/serving_load.lua``) with the
inference token. Each round runs every case back to back (the second round in reverse order);
ratios are taken within a round, and the median over rounds is reported (the results file
keeps each round's ratio beside the medians of both sides' own figures).

(a) loopline vs floor at 1 and 32 clients (goals: p50 <= 1.5x the floor at both, throughput at
    32 clients >= 0.4x the floor);
(b) loopline vs peer at 32 clients (goals: throughput >= 8x, lower p99);
(c) loopline batched vs loopline-b1 at 32 clients (goal: throughput >= 3x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from benchmarks import results
from benchmarks.serving_home import UseCaseHome, build_usecase_home
from core.simulation import scenario_options
from core.usecase import active
from features.store import REPO_DIR
from serving.archive import build_archive
from serving.config import ServingConfig
from serving.process import TorchServeProcess
from serving.scoring import version_info

if TYPE_CHECKING:
    from tests.serving.kit import ServingHome

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA = HERE / "serving_load.lua"
FLOOR_HANDLER = HERE / "serving_floor_handler.py"
PEER_APP = "benchmarks.serving_peer:app"
BODIES = 512
# Requests of the newest part of a large home the champion is trained on (seconds, not minutes).
TRAIN = 50_000
# The use case the test kit's serving home and the peer are written for.
FRAUD = "fraud"
TS_METRICS = (
    "ts_inference_requests_total",
    "ts_queue_latency_microseconds",
    "ts_inference_latency_microseconds",
)


@dataclass
class Target:
    """One endpoint under test."""

    name: str
    url: str
    token: str = ""
    process: TorchServeProcess | None = None


@dataclass
class Run:
    case: str
    clients: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    extra: dict[str, float] = field(default_factory=dict)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- servers -----------------------------------------------------------------------------------


def build_home(
    path: Path, scenario: dict[str, Any] | None = None, requests_total: int | None = None
) -> ServingHome | UseCaseHome:
    """The fraud demo's home as the test kit builds it (as earlier runs measured it), or the
    active use case's from its simulator: at the demo's shape, or with ``scenario``'s
    simulator options over ``requests_total`` requests (a key space no cache holds)."""
    if scenario or requests_total:
        batches = 6
        rows = (requests_total or 3000) // batches
        return build_usecase_home(
            path, scenario=scenario, batches=batches, rows_per_batch=rows, training_rows=TRAIN
        )
    if active().name == FRAUD:
        from tests.serving.kit import build_serving_home

        return build_serving_home(path)
    return build_usecase_home(path)


def bodies_of(home: ServingHome | UseCaseHome, n: int, spread: bool) -> list[dict]:
    """``n`` request bodies: the first ``n`` requests, or (``spread``) one per entity of the
    largest key space, in random order."""
    if spread:
        assert isinstance(home, UseCaseHome)
        return home.spread_requests(n)
    return home.requests(n)


def torchserve(
    home: ServingHome | UseCaseHome,
    name: str,
    *,
    batch_size: int,
    floor: bool = False,
    workers: int = 1,
) -> TorchServeProcess:
    """A TorchServe instance of its own (serving dir, ports) over the shared home; ``floor``
    serves the champion through the no-op handler."""
    inference, management, metrics = free_ports(3)
    serving_dir = home.home / f"serving-{name}"
    config = ServingConfig(
        serving_dir=serving_dir,
        model_store=serving_dir / "model-store",
        home=home.home,
        inference_port=inference,
        management_port=management,
        metrics_port=metrics,
        batch_size=batch_size,
        workers_per_model=workers,
    )
    if floor:
        # The champion's archive, prebuilt with the no-op handler: start() finds it in the
        # model store and loads it through config.properties like Loopline's own.
        version = home.registry.get_alias("champion")
        info = version_info(home.registry, version, config.model_name)
        model_dir = home.registry.get(version).artifact_dir
        build_archive(model_dir, config, version=version, info=info, handler=FLOOR_HANDLER)
    return TorchServeProcess(config, home.registry.path)


def start_group(command: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def stop_group(pgid: int) -> None:
    """SIGTERM to a process group this benchmark started, SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # our child: reap it, or it lingers as a zombie
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def wait_http(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f}s")


def start_peer(
    home: ServingHome | UseCaseHome, python: str, logs: Path, stack: ExitStack, workers: int
) -> Target:
    """``feast serve`` on the repo and home, and the FastAPI model endpoint in front of it,
    ``workers`` worker processes each (as their users size them: one per core)."""
    feast_port, peer_port = free_ports(2)
    env = {
        **os.environ,
        "LOOPLINE_HOME": str(home.home),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    # No periodic worker restart (Feast's default restarts a worker every ~1000 requests,
    # which a steady benchmark would pay as downtime).
    feast_cmd = [python, "-c", "from feast.cli.cli import cli; cli()", "-c", str(REPO_DIR)]
    feast_cmd += ["serve", "-p", str(feast_port), "--no-access-log", "-w", str(workers)]
    feast_cmd += ["--max-requests", "0", "--max-requests-jitter", "0"]
    feast_pid = start_group(feast_cmd, cwd=logs, env=env, log=logs / "feast-serve.log")
    stack.callback(stop_group, feast_pid)
    feast_url = f"http://127.0.0.1:{feast_port}"
    wait_http(lambda: requests.get(feast_url + "/health", timeout=2).ok, "feast serve")

    version = home.registry.get_alias("champion")
    info = version_info(home.registry, version)
    env |= {
        "PEER_MODEL_DIR": str(home.registry.get(version).artifact_dir),
        "PEER_FEAST_URL": feast_url,
        "PEER_FEATURE_SERVICE": info.feature_service,
        "PEER_MODEL_VERSION": version,
        "PEER_THRESHOLD": str(info.threshold),
    }
    uvicorn_cmd = [python, "-m", "uvicorn", PEER_APP, "--host", "127.0.0.1"]
    uvicorn_cmd += ["--port", str(peer_port), "--workers", str(workers), "--no-access-log"]
    uvicorn_cmd += ["--log-level", "warning"]
    peer_pid = start_group(uvicorn_cmd, cwd=ROOT, env=env, log=logs / "peer-uvicorn.log")
    stack.callback(stop_group, peer_pid)
    url = f"http://127.0.0.1:{peer_port}/predict"
    wait_http(lambda: requests.get(url, timeout=2).status_code == 405, "the peer's endpoint")
    return Target("peer", url)


# --- load --------------------------------------------------------------------------------------


def wrk(target: Target, bodies: Path, clients: int, seconds: float) -> dict[str, int]:
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "10s"]
    command += ["-s", str(LUA), target.url, "--", str(bodies), target.token]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1])


def ts_counters(target: Target) -> dict[str, float]:
    """TorchServe's cumulative request count, queue and inference time (all versions)."""
    if target.process is None:
        return {}
    text = target.process.client(timeout=5).metrics()
    out = dict.fromkeys(TS_METRICS, 0.0)
    for line in text.splitlines():
        match = re.match(r"(\w+)\{.*\}\s+(\S+)$", line)
        if match and match.group(1) in out:
            out[match.group(1)] += float(match.group(2))
    return out


def measure(target: Target, bodies: Path, clients: int, seconds: float) -> Run:
    before = ts_counters(target)
    result = wrk(target, bodies, clients, seconds)
    after = ts_counters(target)
    extra: dict[str, float] = {}
    count = after.get(TS_METRICS[0], 0.0) - before.get(TS_METRICS[0], 0.0)
    if count > 0:
        extra["queue_ms"] = (after[TS_METRICS[1]] - before[TS_METRICS[1]]) / count / 1000
        extra["backend_ms"] = (after[TS_METRICS[2]] - before[TS_METRICS[2]]) / count / 1000
    errors = sum(result[k] for k in ("non_2xx", "connect", "read", "write", "timeout"))
    return Run(
        case=target.name,
        clients=clients,
        rps=result["requests"] / (result["duration_us"] / 1e6),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        errors=errors,
        extra=extra,
    )


# --- checks ------------------------------------------------------------------------------------


def post(target: Target, body: dict) -> requests.Response:
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    return requests.post(target.url, json=body, headers=headers, timeout=30)


def check_targets(targets: dict[str, Target], bodies: list[dict]) -> None:
    """Every endpoint answers; Loopline's and the peer's scores agree (same features, model)."""
    score = active().task.score
    sample = bodies[:8]
    reference = [post(targets["loopline"], b).json()[score] for b in sample]
    for name, target in targets.items():
        answers = [post(target, b) for b in sample]
        bad = [a.status_code for a in answers if a.status_code != 200]
        if bad:
            raise RuntimeError(f"{name} answered {bad}: {answers[0].text[:500]}")
        if name.startswith("floor"):
            continue
        got = [a.json()[score] for a in answers]
        worst = max(abs(g - r) for g, r in zip(got, reference, strict=True))
        if worst > 1e-6:
            raise RuntimeError(f"{name} scores differ from loopline's by {worst:.2e}")


# --- report ------------------------------------------------------------------------------------

CASES = [  # round order; back-to-back neighbours are the pairs compared
    ("floor", 1),
    ("loopline", 1),
    ("peer", 1),
    ("peer", 32),
    ("loopline", 32),
    ("floor", 32),
    ("loopline-b1", 32),
    ("floor-b1", 32),
]


# The ratios reported: printed label, figure, metric, unit, Loopline's case, the anchor's case
# and what it is, and the goal (None: context); each needs both cases measured.
RATIOS = [
    *(
        (f"(a) p50 loopline / floor, {c} client(s)", f"serving p50, {c} client(s)", "p50_ms",
         "ms", ("loopline", c), ("floor", c), "same TorchServe, no-op handler",
         results.Goal(op="<=", target=1.5, every=True))
        for c in (1, 32)
    ),
    ("(a) throughput loopline / floor, 32 clients", "serving throughput, 32 clients", "rps",
     "req/s", ("loopline", 32), ("floor", 32), "same TorchServe, no-op handler",
     results.Goal(op=">=", target=0.4)),
    ("(b) throughput loopline / peer, 32 clients", "serving throughput, 32 clients", "rps",
     "req/s", ("loopline", 32), ("peer", 32), "`feast serve` + FastAPI model endpoint",
     results.Goal(op=">=", target=8)),
    ("(b) p99 loopline / peer, 32 clients", "serving p99, 32 clients", "p99_ms", "ms",
     ("loopline", 32), ("peer", 32), "`feast serve` + FastAPI model endpoint",
     results.Goal(op="<", target=1)),
    ("(c) throughput batched / batch 1, loopline, 32", "serving throughput, dynamic batching "
     "(32, 5 ms), 32 clients", "rps", "req/s", ("loopline", 32), ("loopline-b1", 32),
     "batch size 1", results.Goal(op=">=", target=3)),
    ("    throughput batched / batch 1, floor, 32", "no-op handler throughput, dynamic "
     "batching, 32 clients", "rps", "req/s", ("floor", 32), ("floor-b1", 32),
     "batch size 1", None),
]  # fmt: skip


def ratio_table(rounds: list[dict[tuple[str, int], Run]]) -> list[tuple[str, results.Figure]]:
    """Each ratio with its printed label: the median of the within-round ratios, beside the
    medians of both sides' own figures and every round's ratio."""
    rows = []
    for label, name, metric, unit, ours, theirs, anchor, goal in RATIOS:
        if not all(ours in r and theirs in r for r in rounds):
            continue
        mine = [getattr(r[ours], metric) for r in rounds]
        other = [getattr(r[theirs], metric) for r in rounds]
        per_round = [a / b for a, b in zip(mine, other, strict=True)]
        figure = results.compared(
            name,
            statistics.median(mine),
            unit,
            anchor,
            statistics.median(other),
            ratio=statistics.median(per_round),
            ratio_of=f"{ours[0]} / {theirs[0]}, median of {len(rounds)} round(s)",
            ratios=per_round,
            goal=goal,
        )
        rows.append((label, figure))
    return rows


def print_runs(runs: list[Run]) -> None:
    print(
        f"  {'case':<12} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f"  {'TorchServe queue / backend ms per request':>4}"
    )
    for r in runs:
        ts = f"  {r.extra['queue_ms']:.2f} / {r.extra['backend_ms']:.2f}" if r.extra else ""
        print(
            f"  {r.case:<12} {r.clients:>7} {r.rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f}"
            f" {r.errors:>6}{ts}"
        )


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds per server, first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer-python", help="python of benchmarks/.venv-peer (skip if unset)")
    parser.add_argument(
        "--peer-workers", type=int, default=os.cpu_count() or 1, help="per peer server"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a simulator option of the use case (n_cards=1000000): the home is simulated",
    )
    parser.add_argument("--requests", type=int, help="simulated requests in the home")
    parser.add_argument("--bodies", type=int, default=BODIES, help="distinct request bodies")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    smoke = {"duration": 2.0, "warmup": 1.0, "rounds": 1}
    args, recording = results.parse_args(parser, "bench_serving", smoke)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (`make bench-tools` does)")
    # A SIGTERM (or Ctrl-C) unwinds the ExitStack, which stops every server started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = Path(tempfile.mkdtemp(prefix="loopline-bench-serving-"))
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        started = time.monotonic()
        print(f"use case {active().name}; setup in {tmp} ({load()})", flush=True)
        scenario = scenario_options(args.scenario)
        large = bool(scenario or args.requests)
        home = build_home(tmp / "home", scenario, args.requests)
        home.register(seed=1, champion=True)
        bodies = bodies_of(home, args.bodies, spread=large)
        keys = home.keys if large else {}
        if keys:
            spaces = ", ".join(f"{n:,} {c}" for c, n in keys.items())
            print(f"key space: {spaces}; {len(bodies):,} request bodies", flush=True)
        bodies_file = tmp / "bodies.jsonl"
        bodies_file.write_text("".join(json.dumps(b) + "\n" for b in bodies))

        specs = {
            "loopline": (32, False),
            "floor": (32, True),
            "loopline-b1": (1, False),
            "floor-b1": (1, True),
        }
        processes = {n: torchserve(home, n, batch_size=b, floor=f) for n, (b, f) in specs.items()}
        for process in processes.values():
            stack.callback(process.stop)
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(lambda p: p.start(timeout=300), processes.values()))
        targets = {
            name: Target(
                name,
                f"{p.config.inference_url}/predictions/{p.config.model_name}",
                p.client().keys.inference,
                p,
            )
            for name, p in processes.items()
        }
        skipped = []
        if active().name != FRAUD:
            skipped.append(
                f"peer skipped: benchmarks/serving_peer.py serves the {FRAUD} demo's "
                f"transactions, not {active().name}'s requests; (b) is not measured"
            )
            print(skipped[-1], flush=True)
        elif args.peer_python:
            python = os.path.abspath(args.peer_python)
            targets["peer"] = start_peer(home, python, tmp, stack, args.peer_workers)
        else:
            skipped.append("peer (feast serve + FastAPI): no --peer-python; (b) is not measured")
        check_targets(targets, bodies)
        print(f"servers up after {time.monotonic() - started:.0f}s; warm-up ({load()})", flush=True)
        for target in targets.values():
            wrk(target, bodies_file, 32, args.warmup)

        cases = [c for c in CASES if c[0] in targets]
        rounds: list[dict[tuple[str, int], Run]] = []
        for k in range(args.rounds):
            order = cases if k % 2 == 0 else cases[::-1]
            runs = [measure(targets[n], bodies_file, c, args.duration) for n, c in order]
            rounds.append({(r.case, r.clients): r for r in runs})
            print(f"\nround {k + 1} ({load()})")
            print_runs(sorted(runs, key=lambda r: cases.index((r.case, r.clients))))

        print(f"\nratios, median of {args.rounds} round(s), each taken within its round:")
        ratios = ratio_table(rounds)
        for label, f in ratios:
            goal = f.goal.text(f.unit) if f.goal else "(context)"
            verdict = "" if f.met is None else ("met" if f.met else "MISSED")
            print(f"  {label:<48} {f.ratio:7.2f}x  goal {goal:<9} {verdict}")
        print(f"\ntotal {time.monotonic() - started:.0f}s ({load()})")
        usecase = active().name
        variant = [] if usecase == FRAUD else [usecase]
        variant += [f"{k}={v}" for k, v in scenario.items()]
        variant += [f"{args.requests}-requests"] if args.requests and not scenario else []
        key_space = [
            results.Figure(name=f"key space: distinct {column} in the requests", value=n, unit="")
            for column, n in keys.items()
        ]
        recording.write(
            [f for _, f in ratios] + case_figures(rounds) + key_space,
            variant="-".join(variant) or None,
            skipped=skipped,
            exclude=["keep"],
        )


def case_figures(rounds: list[dict[tuple[str, int], Run]]) -> list[results.Figure]:
    """Every case's throughput, p50 and p99, the median over rounds."""
    out = []
    for case, clients in rounds[0]:
        runs = [r[case, clients] for r in rounds]
        for metric, unit in (("rps", "req/s"), ("p50_ms", "ms"), ("p99_ms", "ms")):
            value = statistics.median(getattr(run, metric) for run in runs)
            name = f"{case}, {clients} client(s): {metric.removesuffix('_ms')}"
            out.append(results.Figure(name=name, value=value, unit=unit))
    return out


if __name__ == "__main__":
    main()
