"""Loop latency: seconds from a batch landing to the new champion answering requests.

Run: ``make bench-loop`` (= ``.venv/bin/python -m benchmarks.bench_loop [--triggers
platform]``), about 15-25 min each; ``--anchor-only`` (what ``--smoke`` runs) measures the
anchor alone, in about a minute.

(a) Loopline: ``loopline demo --triggers demo|platform`` in a temporary home (real Dagster
    daemon, real TorchServe, the live simulator): with the demo's trigger settings (1-minute
    cooldown, its row threshold, a third run slot) or with those ``loopline run`` uses (5-minute
    cooldown, the declared thresholds). After concept drift is injected, the sensors start a
    retraining on their own; the demo reports ``loop_latency``: from the landing sensor
    receiving the batch that set off the winning run (the batch its trigger was measured on
    when the retraining sensor first saw it, however long the cooldown then held it back), to
    the run starting, the version being registered, promoted, and the new champion answering
    requests (polled every second).
(b) Anchor: Dagster's default 30 s sensor interval plus run launch, measured in the same run:
    ``dagster dev`` on ``benchmarks/loop_anchor.py`` (a file sensor at the default interval
    starting a no-op job); a file lands, and the run's launch time (created -> finished) is
    read from its run record. Anchor = 30 s + that launch time; the land -> finished time is
    printed beside it (it depends on where in the 30 s the file lands).
Goal: (a) at most 120 s on demo data. The ratio a/b says how many "sensor tick + launch" hops
the whole loop (ingest, features, monitoring, training, gate, registry, delivery) costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
from rich.console import Console
from rich.table import Table

from benchmarks import results
from orchestration.cli_loop import free_port
from orchestration.platform import stop

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INTERVAL_S = 30.0
console = Console()


def anchor(root: Path, timeout: float = 300.0) -> dict[str, float]:
    """Land one file for the default-interval sensor; time the run it starts."""
    home, watch = root / "dagster", root / "watch"
    home.mkdir(parents=True)
    watch.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "LOOP_ANCHOR_DIR": str(watch)}
    exe = Path(sys.executable).with_name("dagster")
    cmd = [str(exe), "dev", "-f", str(REPO / "benchmarks" / "loop_anchor.py")]
    cmd += ["-h", "127.0.0.1", "-p", str(free_port())]
    with open(root / "dagster.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        time.sleep(20)  # the daemon is up and the sensor has ticked once
        landed = time.time()
        (watch / "batch-1").write_text("landed")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            instance = dg.DagsterInstance.from_config(str(home))
            try:
                records = instance.get_run_records(dg.RunsFilter(job_name="anchor_job"))
            finally:
                instance.dispose()
            done = [r for r in records if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS]
            if done:
                r = done[0]
                launch = r.end_time - r.create_timestamp.timestamp()
                return {
                    "launch_s": launch,
                    "anchor_s": DEFAULT_INTERVAL_S + launch,
                    "landed_to_done_s": r.end_time - landed,
                }
            time.sleep(0.5)
        raise SystemExit(f"the anchor run did not finish within {timeout:.0f}s")
    finally:
        stop(proc)


def loopline(root: Path, timeout: float, triggers: str) -> dict:
    env = {**os.environ, "LOOPLINE_HOME": str(root / "home")}
    cmd = [sys.executable, "-m", "orchestration.cli", "demo", "--json", "--timeout", str(timeout)]
    cmd += ["--triggers", triggers]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    start = done.stdout.find("{\n")
    if done.returncode != 0 or start < 0:
        raise SystemExit(f"loopline demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[start:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1800.0, help="demo time limit (s)")
    parser.add_argument("--anchor-only", action="store_true", help="skip `loopline demo`")
    parser.add_argument(
        "--triggers", choices=["demo", "platform"], default="demo", help="the demo's triggers"
    )
    args, recording = results.parse_args(parser, "bench_loop", {"anchor_only": True})
    root = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    try:
        console.print("anchor: default-interval sensor + no-op run launch")
        a = anchor(root / "anchor")
        summary = None
        if not args.anchor_only:
            console.print(
                f"loopline: `loopline demo --triggers {args.triggers}` (concept drift), "
                "this takes a while"
            )
            summary = loopline(root / "loopline", args.timeout, args.triggers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if summary is None:
        console.print(
            f"anchor: {a['anchor_s']:.1f} s (30 s interval + {a['launch_s']:.1f} s launch)"
        )
        recording.write(
            figures(a, None),
            variant="anchor-only",
            skipped=["loopline demo (15-25 min): --anchor-only"],
        )
        return
    print_table(a, summary)
    lat = summary["loop_latency"] or {}
    recording.write(
        figures(a, summary),
        variant=None if args.triggers == "demo" else f"{args.triggers}-triggers",
        notes=[
            f"outcome: {summary['outcome']}",
            f"counted from: {lat.get('batch')} (trigger {lat.get('trigger')})",
        ],
    )


def print_table(a: dict[str, float], summary: dict) -> None:
    lat = summary["loop_latency"]
    table = Table(title="Loop latency (seconds)")
    for col in ("", "seconds", "detail"):
        table.add_column(col)
    table.add_row(
        "anchor",
        f"{a['anchor_s']:.1f}",
        f"30 s interval + {a['launch_s']:.1f} s launch (land -> done {a['landed_to_done_s']:.1f})",
    )
    table.add_row(
        "loopline",
        f"{lat['answering_s']:.1f}",
        f"from {lat['batch']} ({lat['trigger']}): trigger seen {lat['trigger_seen_s']}, run "
        f"started {lat['run_started_s']}, registered "
        f"{lat['registered_s']}, promoted {lat['promoted_s']}, answering {lat['answering_s']}",
    )
    console.print(table)
    console.print(f"outcome: {summary['outcome']}")
    ratio = lat["answering_s"] / a["anchor_s"]
    verdict = "met" if lat["answering_s"] <= 120 else "MISSED"
    console.print(f"loopline / anchor = {ratio:.2f}x; goal <= 120 s: {verdict}")


def figures(a: dict[str, float], summary: dict | None) -> list[results.Figure]:
    """The loop latency against the anchor (goal <= 120 s) and its stages; the anchor alone
    without the demo."""
    if summary is None:
        return [
            results.Figure(name="anchor: 30 s interval + run launch", value=a["anchor_s"], unit="s")
        ]
    lat = summary["loop_latency"]
    stages = ("trigger_seen_s", "run_started_s", "registered_s", "promoted_s")
    return [
        results.compared(
            "loop latency: the batch that set it off lands -> new champion answers",
            lat["answering_s"],
            "s",
            "Dagster default 30 s sensor interval + run launch",
            a["anchor_s"],
            ratio_of="loopline / anchor",
            goal=results.Goal(op="<=", target=120, on="value"),
        ),
        *(
            results.Figure(name=f"loop latency: {k[:-2]}", value=lat[k], unit="s")
            for k in stages
            if lat.get(k) is not None
        ),
    ]


if __name__ == "__main__":
    main()
