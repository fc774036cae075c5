"""Time to the first model: from ``loopline run`` on a fresh home to the first champion of each
use case answering a REST prediction.

Run: ``make bench-first-model`` (= ``.venv/bin/python -m benchmarks.bench_first_model``), about
10 min; ``--only fraud`` (what ``--smoke`` runs) measures fraud alone.

(a) Loopline: ``loopline run --usecase fraud`` (what ``make run`` starts), then
    ``loopline run --usecase fraud --usecase delivery``, each on a fresh ``LOOPLINE_HOME``:
    the demo's history lands and is ingested, features are computed, the first training runs,
    passes its gate and is deployed; the clock stops when TorchServe answers
    ``/predictions/<use case>`` with that version for a request built from validated data.
(b) Anchor: the first ``continuous_training`` run's own length, from its creation (its Dagster
    run record) to the champion's promotion (the registry's event), in the same run: the work no
    orchestration can skip. The ratio
    a/b is what the platform adds around it (landing, ingest, features, queueing, start-up).
Goals (issue 17): fraud at most 180 s, both use cases at most 300 s, on 2 cores (1,119 s for
fraud before decision 38's batched ingest and lazy imports).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from benchmarks import results
from core.usecase import load
from models.registry import CHAMPION, Registry
from orchestration.cli_loop import free_port
from orchestration.cli_platform import Layout
from serving.client import TorchServeError
from serving.config import ServingConfig
from serving.process import TorchServeProcess

REPO = Path(__file__).resolve().parents[1]
GOALS = {("fraud",): 180.0, ("fraud", "delivery"): 300.0}
console = Console()


def _request(layout: Layout, name: str) -> dict | None:
    uc = load(name)
    files = sorted((layout.homes[name] / "validated" / uc.request.dataset).glob("*.parquet"))
    if not files:
        return None
    row = pl.read_parquet(files[-1]).tail(1).to_dicts()[0]
    body = {f: row[spec.column_name(f)] for f, spec in uc.request.fields.items()}
    for f, spec in uc.request.fields.items():
        if spec.type == "timestamp" and isinstance(body[f], datetime):
            body[f] = body[f].isoformat()
    return body


def _answered(layout: Layout, name: str) -> str | None:
    """The version that answered a prediction, once a champion is served."""
    config = ServingConfig.for_home(layout.homes[name], layout.serving_dir, model_name=name)
    process = TorchServeProcess.attach(config)
    if not process.status().healthy:
        return None
    client = process.client(timeout=10)
    try:
        if not client.default_version():
            return None
        body = _request(layout, name)
        return client.predict(body)["model_version"] if body else None
    except TorchServeError:
        return None


def _first_training_s(layout: Layout, name: str) -> float:
    """The first champion's ``continuous_training`` run, from its creation to the champion's
    promotion: training, gate and delivery. The run itself goes on to watch the first release
    (decision 51) after the champion answers, so it has not finished when the clock stops."""
    import dagster as dg

    settings = layout.settings(name)
    registry = Registry.for_settings(settings)
    champion = registry.get_alias(CHAMPION)
    run_id = registry.get(champion).dagster_run_id if champion else None
    promoted = [e.at for e in registry.events(champion) if e.kind == "promoted"] if champion else []
    if not run_id or not promoted:
        return float("nan")
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        run = instance.get_run_record_by_id(run_id)
    finally:
        instance.dispose()
    if run is None:
        return float("nan")
    return datetime.fromisoformat(promoted[0]).timestamp() - run.create_timestamp.timestamp()


def measure(root: Path, names: tuple[str, ...], timeout_s: float) -> dict:
    env = {**os.environ, "LOOPLINE_HOME": str(root)}
    env.pop("LOOPLINE_USECASE", None)
    layout = Layout.of(names, env)
    cmd = [sys.executable, "-m", "orchestration.cli", "run", "--port", str(free_port())]
    cmd += [arg for name in names for arg in ("--usecase", name)]
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(root.parent / f"{'-'.join(names)}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    seconds: dict[str, float] = {}
    try:
        while len(seconds) < len(names):
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"{names}: no champion within {timeout_s:.0f} s")
            if proc.poll() is not None:
                raise SystemExit(f"loopline run exited ({proc.returncode}); see {log.name}")
            for name in names:
                if name not in seconds and _answered(layout, name):
                    seconds[name] = time.monotonic() - started
                    console.print(f"  {name}: first champion answered after {seconds[name]:.0f} s")
            time.sleep(2)
        training = {name: _first_training_s(layout, name) for name in names}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"seconds": seconds, "training": training, "all": max(seconds.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=1500.0)
    parser.add_argument(
        "--only", choices=[" + ".join(names) for names in GOALS], help="one set of use cases"
    )
    args, recording = results.parse_args(parser, "bench_first_model", {"only": "fraud"}, argv)
    sets = [names for names in GOALS if args.only in (None, " + ".join(names))]
    table = Table(title="loopline run on a fresh home -> first champion answering REST (2 cores)")
    for col in ("use cases", "use case", "first champion (s)", "its training run (s)", "ratio"):
        table.add_column(col)
    verdicts, figures = [], []
    with tempfile.TemporaryDirectory(prefix="bench-first-") as tmp:
        for names in sets:
            console.print(f"[bold]{' + '.join(names)}[/]")
            r = measure(Path(tmp) / "-".join(names) / "root", names, args.timeout)
            for name in names:
                s, t = r["seconds"][name], r["training"][name]
                table.add_row(" + ".join(names), name, f"{s:.0f}", f"{t:.0f}", f"{s / t:.2f}x")
            goal = GOALS[names]
            figures += [
                results.compared(
                    f"first champion answering ({' + '.join(names)}): {name}",
                    r["seconds"][name],
                    "s",
                    "its first training run's own length",
                    r["training"][name],
                    ratio_of="first champion / training run",
                    goal=results.Goal(op="<=", target=goal, on="value"),
                )
                for name in names
            ]
            verdicts.append(
                f"{' + '.join(names)}: {r['all']:.0f} s vs goal {goal:.0f} s: "
                + ("met" if r["all"] <= goal else "MISSED")
            )
    console.print(table)
    for line in verdicts:
        console.print(line)
    recording.write(figures)


if __name__ == "__main__":
    main()
