"""The `loopline` command line."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from orchestration.cli_loop import LivePlatform, demo, retrain, status
from orchestration.cli_models import models
from orchestration.cli_serve import serve
from orchestration.live import live_simulator_running, request_drift
from orchestration.settings import Settings

console = Console()


@click.group()
def main() -> None:
    """Loopline: a continuous-training ML platform on your machine."""


def _simulator_options(f):
    from features.simulator import FAULTS

    opts = [
        click.option("--seed", default=7, show_default=True, help="Scenario seed (deterministic)."),
        click.option("--rows-per-batch", default=2000, show_default=True),
        click.option("--cards", "n_cards", default=2000, show_default=True),
        click.option("--merchants", "n_merchants", default=300, show_default=True),
        click.option(
            "--batch-hours", default=6.0, show_default=True, help="Simulated hours per batch."
        ),
        click.option(
            "--drift", type=click.Choice(["none", "covariate", "concept"]), default="none"
        ),
        click.option(
            "--drift-start", default=0, show_default=True, help="Batch index where drift starts."
        ),
        click.option("--fault", type=click.Choice(FAULTS), default=None, help="Inject one fault."),
        click.option("--fault-batch", default=None, type=int, help="Batch index for the fault."),
        click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet"),
        click.option("--interval", default=5.0, show_default=True, help="Seconds between batches."),
        click.option("--start-batch", default=0, show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _scenario(opts: dict):
    from datetime import timedelta

    from features.simulator import ScenarioConfig

    return ScenarioConfig(
        seed=opts["seed"],
        n_cards=opts["n_cards"],
        n_merchants=opts["n_merchants"],
        batch_span=timedelta(hours=opts["batch_hours"]),
        rows_per_batch=opts["rows_per_batch"],
        drift=opts["drift"],
        drift_start_batch=opts["drift_start"],
    )


def _run_simulator(settings: Settings, opts: dict, batches: int | None, stop=None):
    from features import simulator

    def report(b) -> None:
        fault = f" [red]fault={b.fault}[/]" if b.fault else ""
        console.print(
            f"landed [bold]{b.dataset}[/] batch {b.batch_index}: {b.rows} rows -> {b.path.name}{fault}"
        )

    return simulator.run(
        _scenario(opts),
        settings.landing,
        batches=batches,
        interval_s=opts["interval"],
        fault=opts["fault"],
        fault_batch=opts["fault_batch"],
        fmt=opts["fmt"],
        start_batch=opts["start_batch"],
        on_batch=report,
        stop=stop,
    )


@main.command()
@_simulator_options
@click.option("--batches", default=None, type=int, help="Land N batches and exit (default: run).")
@click.option("--once", is_flag=True, help="Same as --batches 1.")
def simulate(batches: int | None, once: bool, **opts) -> None:
    """Land simulated card-payment batches into the landing folder."""
    settings = Settings.from_env().ensure()
    if batches is None and not once and live_simulator_running(settings.home):
        if opts["drift"] != "none":
            request_drift(settings.home, opts["drift"])
            console.print(f"the running simulator switches to {opts['drift']} drift")
            return
        raise click.ClickException("a simulator already runs for this home (loopline run)")
    if once:
        batches = 1
    if batches is not None:
        opts["interval"] = 0.0 if opts["interval"] == 5.0 else opts["interval"]
    try:
        landed = _run_simulator(settings, opts, batches)
    except KeyboardInterrupt:
        return
    console.print(f"{len(landed)} files landed in {settings.landing}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
@click.option("--no-simulator", is_flag=True, help="Do not land demo data or send traffic.")
@_simulator_options
def run(host: str, port: int, no_simulator: bool, **opts) -> None:
    """Run the platform: Dagster UI + daemon, TorchServe, the simulator and its traffic."""
    settings = Settings.from_env().ensure()
    if opts["fault"] is None and opts["fault_batch"] is None:
        opts["fault"], opts["fault_batch"] = "renamed_column", 5  # show one quarantine in the demo
    console.print(f"[bold]Loopline[/] home: {settings.home}, lake: {settings.lake}")
    live = LivePlatform(settings, host=host, port=port)
    try:
        live.start(
            _scenario(opts),
            interval_s=opts["interval"],
            fault=opts["fault"],
            fault_batch=opts["fault_batch"],
            fmt=opts["fmt"],
            simulate=not no_simulator,
        )
        cfg = live.serving.config
        console.print(f"Dagster UI: [link]http://{host}:{port}[/link]  (Ctrl-C stops everything)")
        console.print(
            f"TorchServe: {cfg.inference_url}/predictions/{cfg.model_name} "
            f"(token in {cfg.key_file})"
        )
        while live.dagster.poll() is None:
            time.sleep(0.5)
        console.print(
            f"[red]dagster exited with code {live.dagster.returncode}[/]; "
            f"see {settings.home / 'dagster.log'}"
        )
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        live.stop()
        console.print("stopped")


@main.command()
@click.option("--dataset", default=None)
@click.option("--status", default=None)
@click.option("--limit", default=50, show_default=True)
def batches(dataset: str | None, status: str | None, limit: int) -> None:
    """Print the batch ledger: every landed batch and what happened to it."""
    from quality.ledger import BatchLedger

    settings = Settings.from_env()
    if not settings.ledger_path.exists():
        console.print("no batches yet")
        return
    ledger = BatchLedger(settings.ledger_path)
    table = Table(title=f"Batches ({settings.ledger_path})")
    for col in ("batch", "dataset", "file", "status", "rows", "received", "reason"):
        table.add_column(col, overflow="fold")
    colours = {"validated": "green", "quarantined": "red", "stored": "yellow", "received": "cyan"}
    for b in ledger.batches(dataset=dataset, status=status, limit=limit):
        table.add_row(
            b.batch_id,
            b.dataset,
            b.source_name,
            f"[{colours[b.status]}]{b.status}[/]",
            "" if b.rows is None else str(b.rows),
            b.received_at[:19],
            b.reason or "",
        )
    console.print(table)
    totals = ledger.summary()
    for ds, counts in sorted(totals.items()):
        console.print(f"{ds}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


main.add_command(models)
main.add_command(serve)
main.add_command(retrain)
main.add_command(status)
main.add_command(demo)

if __name__ == "__main__":
    main()
