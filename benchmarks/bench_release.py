"""Release integrity (issue 19): how often progressive delivery wrongly rejects a sound retrain.

Run: ``make bench-release``, or ``[LOOPLINE_USECASE=delivery] .venv/bin/python -m
benchmarks.bench_release [--retrains 20] [--aa-rounds N] [--step-hours 6] [--epochs E]
[--smoke] [--out benchmarks/results/release]``

Setup, in a temporary home (``benchmarks.serving_home.build_usecase_home``): the active use
case's demo data in the shape of ``loopline demo``'s history (its days, windows and rows per
window; ``DemoPlan``), its feature views materialized to the online store, and a real TorchServe
on free loopback ports driven through the Dagster assets ``model_archive`` and ``deployment``
with ``DeliveryPolicy()``'s defaults, as in production. A first champion is delivered through
them, then customer traffic (real request bodies for known entities) fills the prediction log
that every shadow replays.

(a) Sound retrains: N times, the platform's training code (``train_model``, the use case's
    declared ``TrainConfig``) on the demo data with a new seed, the training window moved
    ``--step-hours`` forward each time (labels as matured by then, split by the use case's
    declared policy); judged by the real gate (``evaluate_candidate`` with a baseline trained on
    the same window, against the current champion); delivered: smoke, shadow replay against the
    champion, promotion, watch. Each promoted retrain is the champion the next is shadowed
    against. A retrain the gate finds no better than its champion is delivered too, registered
    with a pass that names the gate's verdict: this measures delivery's false rejections, not
    the gate's.
(b) Anchor, interleaved round by round: an A/A release, the champion's own weights, threshold
    and record re-saved as a new version (identical behaviour), through the same path.

Between rounds, ``replay_requests`` new customer requests go to the default endpoint. After
each round, TorchServe keeps only the champion and its rollback target registered (delivery
leaves every promoted version registered, a worker each; 40 releases would not fit the host).

A false rejection is a sound retrain rejected or rolled back; a deferral, and a deployment run
that failed with no decision (TorchServe too slow to answer), are counted apart.
Goal (issue 19): at most 1 of 20. Results: a table, the headline, and a JSON file under
``--out`` named with the date and the use case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmarks import results
from benchmarks.serving_home import UseCaseHome, build_usecase_home
from core.storage import write_parquet_atomic
from core.usecase import active
from features.store import SERVICE
from features.training_set import SplitPolicy, assign_splits
from features.views import TS
from models.artifact import (
    SavedModel,
    load_model,
    read_sidecar,
    save_model,
    save_training_result,
)
from models.registry import CHAMPION, ModelRecord, Registry, Verdict
from models.release import Lineage, evaluate_candidate, model_record, write_documents
from models.spec import GatePolicy, Slicing, TrainConfig
from models.train import train_baseline, train_model
from orchestration.cli_loop import DemoPlan
from orchestration.feature_assets import TrainingSetConfig
from orchestration.resources import LooplineStorage
from orchestration.serving_assets import TorchServeResource
from orchestration.training_assets import MODEL_NAME
from serving.client import TorchServeClient, TorchServeError
from serving.delivery import DeliveryPolicy, logged_requests
from tests.e2e.kit import deploy, free_ports

HERE = Path(__file__).resolve().parent
GOAL_RETRAINS, GOAL_MAX_REJECTED = 20, 1
REPLAY = DeliveryPolicy().replay_requests
REJECTIONS = ("rejected", "rolled_back")
RETRAIN, AA = "retrain", "A/A"
FAILED = "run_failed"
# A wide table when written to a file or a pipe (rich's default there is 80 columns).
console = Console(width=None if sys.stdout.isatty() else 220)


@dataclass
class Bench:
    """The home, its TorchServe and what each retrain is trained with."""

    home: UseCaseHome
    storage: LooplineStorage
    torchserve: TorchServeResource
    train: TrainConfig
    split: SplitPolicy
    traffic_from: int = 0

    @property
    def registry(self) -> Registry:
        return self.home.registry

    @property
    def client(self) -> TorchServeClient:
        return self.torchserve.process(self.storage).client()


@dataclass
class Round:
    """One delivery: what was delivered, what the gate said, what delivery decided and why."""

    kind: str
    index: int
    version: str
    champion: str | None
    seed: int | None
    window_end: str
    gate: dict[str, Any]
    seconds: dict[str, float]
    outcome: str = "pending"
    reasons: list[str] = field(default_factory=list)
    shadow: dict[str, Any] = field(default_factory=dict)
    watch: dict[str, Any] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return self.outcome in REJECTIONS


# --- the home and its models -----------------------------------------------------------------


def build_home(root: Path, smoke: bool) -> UseCaseHome:
    """The demo's history (``DemoPlan``: days, window length, rows per window), or for
    ``--smoke`` a few days of 600 requests a day past the labels' maturity."""
    if smoke:
        days = math.ceil(active().label.maturity_days) + 4
        return build_usecase_home(
            root, batches=days, batch_span=timedelta(days=1), rows_per_batch=600
        )
    plan = DemoPlan.of_active()
    return build_usecase_home(
        root,
        batches=round(plan.history_days * 24 / plan.batch_hours),
        batch_span=plan.step,
        rows_per_batch=plan.rows_per_batch,
    )


def training_window(bench: Bench, at: datetime) -> pl.DataFrame:
    """The training set a retrain running at ``at`` sees: requests whose labels had matured,
    split by the use case's declared policy (its window, if any, included)."""
    matured = at - timedelta(days=active().label.maturity_days)
    rows = bench.home.training_frame.drop("split").filter(pl.col(TS) <= matured)
    return assign_splits(rows, bench.split)


def fit(bench: Bench, frame: pl.DataFrame, seed: int, out: Path, *, baseline: bool) -> SavedModel:
    """The platform's network (or its baseline) on ``frame``, saved as training saves it."""
    config = TrainConfig(**{**bench.train.to_dict(), "seed": seed})
    result = (train_baseline if baseline else train_model)(frame, bench.home.spec, config)
    return save_training_result(
        result,
        out,
        golden_rows=frame.filter(pl.col("split") == "validation"),
        metadata={"model_name": MODEL_NAME, "feature_service": SERVICE},
    )


def resave(bench: Bench, version: str, frame: pl.DataFrame, out: Path) -> str:
    """``version``'s own weights, preprocessor and record (its decision threshold, and itself
    as the champion it was compared with: no expected shift) registered again as another
    version with the same behaviour, the A/A anchor; its gate verdict a pass against it."""
    source = bench.registry.get(version)
    module, preprocessor = load_model(source.artifact_dir)
    metadata = {**read_sidecar(source.artifact_dir)["metadata"], "resaved_from": version}
    golden = frame.filter(pl.col("split") == "validation")
    saved = save_model(module, preprocessor, out, metadata=metadata, golden_rows=golden)
    record = ModelRecord(
        model_name=source.model_name,
        artifact_dir=str(saved.path),
        artifacts=saved.checksums,
        training_set_version=source.training_set_version,
        feature_service=source.feature_service,
        training_batches=source.training_batches,
        hyperparameters=source.hyperparameters,
        metrics=source.metrics,
        data_window=source.data_window,
        extra={**source.extra, "compared": {"champion": source.metrics}, "resaved_from": version},
    )
    verdict = Verdict(passed=True, champion=version, words=f"A/A: {version} re-saved")
    return bench.registry.register(record, verdict)


def judge(
    bench: Bench, candidate: SavedModel, baseline: SavedModel, frame: pl.DataFrame
) -> tuple[str, dict[str, Any]]:
    """The real gate against the current champion, then the version registered with its
    record (metrics, the champion's beside them: the shadow's expected shift); returns the
    version and the gate's verdict. A failed verdict is registered as a pass naming it."""
    registry = bench.registry
    champion = registry.get_alias(CHAMPION)
    evaluation = evaluate_candidate(
        frame,
        candidate,
        baseline,
        active().declared("gate", GatePolicy),
        Lineage("bench", SERVICE, ("bench",), "bench"),
        champion=(champion, registry.get(champion).artifact_dir) if champion else None,
        model_name=MODEL_NAME,
        slicing=Slicing.of(active()),
    )
    decision = evaluation.decision
    gate = {"verdict": decision.verdict, "passed": decision.passed, "reasons": decision.reasons}
    verdict = Verdict(
        passed=True,
        champion=champion,
        reasons=tuple(decision.reasons),
        words="passed" if decision.passed else f"benchmark: delivered past {decision.verdict}",
        detail={"gate": gate},
    )
    write_documents(evaluation)
    record = model_record(evaluation, model_name=MODEL_NAME, dagster_run_id=None)
    return registry.register(record, verdict), gate


# --- serving ---------------------------------------------------------------------------------


def customer_traffic(bench: Bench, n: int) -> None:
    """``n`` customer requests, one at a time, to the default endpoint (the next rows of the
    history, stamped now): what the prediction log holds and the shadow replays."""
    rows = bench.home.request_rows.height
    start = bench.traffic_from % max(1, rows - n)
    bench.traffic_from = start + n
    client = bench.client
    for body in bench.home.requests(n, offset=start):
        client.predict(body)


def wait_for_log(bench: Bench, n: int, timeout_s: float = 90.0) -> None:
    """Until the prediction log's closed files hold ``n`` customer requests to replay."""
    log_dir = bench.torchserve.serving_config(bench.storage).prediction_log_dir
    deadline = time.monotonic() + timeout_s
    while len(logged_requests(log_dir, n)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {n} logged customer requests after {timeout_s:.0f} s")
        time.sleep(1.0)


def retire(bench: Bench) -> None:
    """Unregisters from TorchServe every version but the champion and its rollback target
    (one still loading after a failed run is left for the next round)."""
    keep = set(bench.registry.champion_stack()[-2:])
    client = bench.client
    for version, default in client.versions().items():
        if version not in keep and not default:
            with suppress(TorchServeError):
                client.unregister(version)


# --- figures ---------------------------------------------------------------------------------


def _step(report: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report's step ``name`` and its checks by name (both empty: it did not run)."""
    step = next((s for s in report["steps"] if s["step"] == name), {})
    return step, {c["check"]: c for c in step.get("checks", [])}


def shadow_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Each shadow check's statistic and outcome (empty: no shadow ran)."""
    step, checks = _step(report, "shadow_replay")
    if not step:
        return {}
    ks, errors = checks["score_shift"], checks["shadow_error_rate"]
    champion_p95, challenger_p95 = step["champion"]["p95_ms"], step["challenger"]["p95_ms"]
    figures = {
        "ks": ks.get("ks"),
        "ks_bound": ks.get("critical"),
        "champion_p95_ms": champion_p95,
        "challenger_p95_ms": challenger_p95,
        "p95_ratio": round(challenger_p95 / champion_p95, 3) if champion_p95 else None,
        "errors": errors.get("errors"),
        "requests": errors.get("requests"),
        "error_rate": step["challenger"]["error_rate"],
        "outcomes": {name: c["outcome"] for name, c in checks.items()},
    }
    if "flag_rate_change" in checks:
        change = checks["flag_rate_change"]
        keys = ("champion_rate", "challenger_rate", "expected_change", "z")
    else:
        change = checks["mean_change"]
        keys = ("shift", "expected_shift")
    return {**figures, **{k: change.get(k) for k in keys}}


def watch_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The watch's error count and p95 (empty: no watch ran)."""
    step, checks = _step(report, "post_promotion_watch")
    if not step:
        return {}
    errors, latency = checks["watch_error_rate"], checks["watch_p95_latency"]
    return {
        "errors": errors.get("errors"),
        "requests": errors.get("requests"),
        "p95_ms": latency.get("p95_ms"),
        "outcomes": {name: c["outcome"] for name, c in checks.items()},
    }


def summarize(rounds: list[Round]) -> dict[str, Any]:
    """Counts, the rejection rate and the spread of each shadow statistic over ``rounds``."""
    ks = [r.shadow["ks"] for r in rounds if r.shadow.get("ks") is not None]
    ratios = [r.shadow["p95_ratio"] for r in rounds if r.shadow.get("p95_ratio") is not None]
    rejected = [r for r in rounds if r.rejected]
    return {
        "delivered": len(rounds),
        "promoted": sum(r.outcome == "promoted" for r in rounds),
        "rejected": len(rejected),
        "deferred": sum(r.outcome == "deferred" for r in rounds),
        "failed": sum(r.outcome == FAILED for r in rounds),
        "rejection_rate": round(len(rejected) / len(rounds), 4) if rounds else None,
        "gate_passed": sum(bool(r.gate.get("passed")) for r in rounds),
        "ks_median": round(statistics.median(ks), 4) if ks else None,
        "ks_max": max(ks) if ks else None,
        "p95_ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "p95_ratio_max": max(ratios) if ratios else None,
        "rejections": [{"version": r.version, "reasons": r.reasons} for r in rejected],
    }


def headline(retrains: dict[str, Any]) -> str:
    """``false rejections: k of n (goal <= 1)``: met or missed, judged at 20 retrains or more."""
    k, n = retrains["rejected"], retrains["delivered"]
    text = f"false rejections: {k} of {n} (goal <= {GOAL_MAX_REJECTED} of {GOAL_RETRAINS})"
    if n < GOAL_RETRAINS:
        text += f": not judged, {n} < {GOAL_RETRAINS} retrains"
    else:
        text += f": {'met' if k <= GOAL_MAX_REJECTED * n / GOAL_RETRAINS else 'MISSED'}"
    if retrains["failed"]:
        text += f"; {retrains['failed']} deliveries failed to run (no decision; see the table)"
    return text


def _change(shadow: dict[str, Any]) -> str:
    if "champion_rate" in shadow:
        return f"{shadow['champion_rate']:.2%} -> {shadow['challenger_rate']:.2%}"
    return f"{shadow['shift']:+.1%} (exp. {shadow['expected_shift']:+.1%})"


def rounds_table(rounds: list[Round]) -> Table:
    table = Table(title=f"{active().name}: deliveries, DeliveryPolicy() defaults")
    for column in ("round", "kind", "version", "gate", "outcome", "KS / bound", "p95 ms"):
        table.add_column(column)
    for column in ("errors", "flag rate / mean", "watch p95", "reasons"):
        table.add_column(column)
    for r in rounds:
        s = r.shadow
        shadowed = bool(s)
        table.add_row(
            str(r.index),
            r.kind,
            r.version,
            r.gate.get("verdict", ""),
            r.outcome,
            f"{s['ks']:.3f} / {s['ks_bound']:.3f}" if shadowed else "-",
            f"{s['champion_p95_ms']:.1f} -> {s['challenger_p95_ms']:.1f}" if shadowed else "-",
            f"{s['errors']}/{s['requests']}" if shadowed else "-",
            _change(s) if shadowed else "-",
            f"{r.watch['p95_ms']:.1f}" if r.watch.get("p95_ms") is not None else "-",
            "; ".join(r.reasons)[:120],
        )
    return table


def summary_table(retrains: dict[str, Any], anchor: dict[str, Any]) -> Table:
    table = Table(title="sound retrains beside the A/A anchor (same run, interleaved)")
    for column in ("", "sound retrains", "A/A anchor"):
        table.add_column(column)
    counts = ("delivered", "promoted", "rejected", "deferred", "failed", "rejection_rate")
    for key in (*counts, "gate_passed"):
        table.add_row(key.replace("_", " "), str(retrains[key]), str(anchor[key]))
    for key in ("ks_median", "ks_max", "p95_ratio_median", "p95_ratio_max"):
        table.add_row(key.replace("_", " "), str(retrains[key]), str(anchor[key]))
    return table


# --- the run ---------------------------------------------------------------------------------


def start(root: Path, args: argparse.Namespace) -> Bench:
    """The home, its training settings, and TorchServe's resource on free ports (the first
    delivery starts it)."""
    home = build_home(root, args.smoke)
    inference, management, metrics = free_ports(3)
    storage = LooplineStorage(home=str(home.home))
    train = active().declared("training", TrainConfig, device="cpu")
    if args.epochs:
        train = TrainConfig(**{**train.to_dict(), "epochs": args.epochs})
    bench = Bench(
        home,
        storage,
        TorchServeResource(
            home=str(home.home),
            inference_port=inference,
            management_port=management,
            metrics_port=metrics,
        ),
        train,
        TrainingSetConfig().split_policy(),
    )
    # The freshness check's reference and the replay's fallback: the newest requests.
    dataset = active().request.dataset
    write_parquet_atomic(
        home.request_rows.tail(REPLAY), storage.settings.validated_file(dataset, "recent")
    )
    bench.traffic_from = max(0, home.request_rows.height - (2 * args.retrains + 2) * REPLAY)
    return bench


def retrain_round(bench: Bench, k: int, at: datetime, models: Path) -> Round:
    """Retrain ``k`` (seed ``k``) on the window as of ``at``: trained, judged by the gate and,
    after customer traffic (once a champion serves), delivered."""
    began = time.perf_counter()
    frame = training_window(bench, at)
    candidate = fit(bench, frame, k, models / f"retrain-{k}", baseline=False)
    baseline = fit(bench, frame, k, models / f"baseline-{k}", baseline=True)
    timings = {"train_s": time.perf_counter() - began}
    champion = bench.registry.get_alias(CHAMPION)
    if champion:
        customer_traffic(bench, REPLAY)
    began = time.perf_counter()
    version, gate = judge(bench, candidate, baseline, frame)
    timings["gate_s"] = time.perf_counter() - began
    return delivered(bench, Round(RETRAIN, k, version, champion, k, at.isoformat(), gate, timings))


def aa_round(bench: Bench, k: int, at: datetime, models: Path) -> Round:
    """The champion re-saved (``resave``) and delivered against it."""
    champion = bench.registry.get_alias(CHAMPION)
    customer_traffic(bench, REPLAY)
    version = resave(bench, champion, training_window(bench, at), models / f"aa-{k}")
    gate = {"verdict": "A/A, not judged", "passed": None, "reasons": []}
    return delivered(bench, Round(AA, k, version, champion, None, at.isoformat(), gate, {}))


def delivered(bench: Bench, r: Round) -> Round:
    """``r``'s version through the deployment asset; ``r`` with delivery's decision and
    figures."""
    began = time.perf_counter()
    # The policy's defaults untouched; Dagster's own log lines only from warnings up.
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    try:
        report = deploy(r.version, bench.storage, bench.torchserve, quiet)
    except dg.DagsterExecutionStepExecutionError as exc:
        # The run failed (TorchServe too slow to answer, say): no decision on the version,
        # which stays promotable. Counted apart from rejections, and shown.
        report = {"outcome": FAILED, "reasons": [str(exc.user_exception or exc)], "steps": []}
    r.seconds["deliver_s"] = time.perf_counter() - began
    r.seconds = {name: round(s, 2) for name, s in r.seconds.items()}
    if report["outcome"] == "refused":
        raise RuntimeError(f"{r.version} was refused: {report['reasons']}")
    retire(bench)
    r.outcome, r.reasons = report["outcome"], report["reasons"]
    r.shadow, r.watch = shadow_figures(report), watch_figures(report)
    return r


def run(bench: Bench, args: argparse.Namespace, models: Path) -> list[Round]:
    """The first champion, then each round: retrain ``k``, and A/A ``k`` while ``k`` is
    within ``--aa-rounds``. Round ``k``'s window ends ``retrains - k`` steps before now."""
    now = datetime.now(UTC)
    step = timedelta(hours=args.step_hours)
    first = retrain_round(bench, 0, now - step * args.retrains, models)
    if first.outcome != "promoted":
        raise RuntimeError(f"the first champion was not promoted: {first.reasons}")
    customer_traffic(bench, REPLAY)
    wait_for_log(bench, REPLAY)
    rounds = [first]
    aa_rounds = args.retrains if args.aa_rounds is None else args.aa_rounds
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("rounds", total=args.retrains)
        for k in range(1, args.retrains + 1):
            at = now - step * (args.retrains - k)
            rounds.append(retrain_round(bench, k, at, models))
            console.log(_line(rounds[-1]))
            if k <= aa_rounds:
                rounds.append(aa_round(bench, k, at, models))
                console.log(_line(rounds[-1]))
            progress.advance(task)
    return rounds


def _line(r: Round) -> str:
    ks = f"KS {r.shadow['ks']:.3f}" if r.shadow else "no shadow"
    return f"{r.kind} {r.index} {r.version}: {r.outcome} ({ks}) {'; '.join(r.reasons)}"


def report(
    rounds: list[Round], args: argparse.Namespace, command: str, load: tuple[float, ...]
) -> Path:
    """Prints the tables and the headline; writes the JSON result."""
    measured = [r for r in rounds if r.index > 0]  # round 0: the first champion
    retrains = summarize([r for r in measured if r.kind == RETRAIN])
    anchor = summarize([r for r in measured if r.kind == AA])
    console.print(rounds_table(rounds))
    console.print(summary_table(retrains, anchor))
    line = headline(retrains)
    console.print(f"[bold]{line}[/]; A/A anchor: {anchor['rejected']} of {anchor['delivered']}")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    out = Path(args.out) / f"release-{today}-{active().name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "usecase": active().name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "arguments": vars(args),
        "policy": DeliveryPolicy().to_dict(),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": {"start": load, "end": os.getloadavg()},
        },
        "headline": line,
        "retrains": retrains,
        "anchor": anchor,
        "rounds": [r.__dict__ for r in rounds],
    }
    out.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"result: {out}")
    return out


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, results.Recording]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--retrains", type=int, default=GOAL_RETRAINS)
    parser.add_argument("--aa-rounds", type=int, default=None, help="default: --retrains")
    parser.add_argument("--step-hours", type=float, default=6.0)
    parser.add_argument("--epochs", type=int, default=None, help="default: the use case's")
    parser.add_argument(
        "--out", default=str(HERE / "results" / "release"), help="every delivery's details"
    )
    args, recording = results.parse_args(parser, "bench_release", {"retrains": 2}, argv)
    if args.retrains < 1 or (args.aa_rounds is not None and args.aa_rounds < 0):
        parser.error("--retrains must be >= 1 and --aa-rounds >= 0")
    if args.step_hours < 0:
        parser.error("--step-hours must be >= 0 (the window moves forward)")
    return args, recording


def figures(retrains: dict[str, Any], anchor: dict[str, Any]) -> list[results.Figure]:
    """The common results file's figures: sound retrains wrongly rejected beside the A/A
    anchor's rejections, and the largest shadow statistics of the sound retrains."""
    return [
        results.compared(
            f"sound retrains rejected (of {retrains['delivered']})",
            retrains["rejected"],
            "releases",
            f"A/A releases of the champion's own weights rejected (of {anchor['delivered']})",
            anchor["rejected"],
            ratio=None,
            goal=results.Goal(
                op="<=",
                target=GOAL_MAX_REJECTED * retrains["delivered"] / GOAL_RETRAINS,
                on="value",
            ),
            headline=True,
        ),
        results.Figure(name="largest sound-retrain KS", value=retrains["ks_max"], unit="KS"),
        results.Figure(
            name="largest sound-retrain p95 ratio", value=retrains["p95_ratio_max"], unit="x"
        ),
    ]


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args, recording = parse(argv)
    command = recording.command
    # One thread: two OpenMP threads contending with TorchServe and other work on a busy 2-core
    # host trained the same model several times slower.
    torch.set_num_threads(1)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        bench = start(Path(tmp) / "home", args)
        try:
            rounds = run(bench, args, Path(tmp) / "home" / "models")
        finally:
            bench.torchserve.process(bench.storage).stop()
    details = report(rounds, args, command, load)
    measured = [r for r in rounds if r.index > 0]
    recording.write(
        figures(
            summarize([r for r in measured if r.kind == RETRAIN]),
            summarize([r for r in measured if r.kind == AA]),
        ),
        variant=None if active().name == "fraud" else active().name,
        notes=[f"every delivery's checks: {details}"],
        exclude=("out",),
    )
    return details


if __name__ == "__main__":
    main()
