"""The `loopline` command line."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from core.db import exists
from core.settings import Settings
from orchestration.cli_init import init
from orchestration.cli_loop import (
    LivePlatform,
    demo,
    platform_trigger_defaults,
    retrain,
    status,
)
from orchestration.cli_models import models
from orchestration.cli_serve import serve
from orchestration.live import live_simulator_running, request_drift

console = Console()


@click.group()
def main() -> None:
    """Loopline: a continuous-training ML platform on your machine."""


_SCENARIO_HELP = (
    "A field of the use case simulator's ScenarioConfig, KEY=VALUE (repeatable); an unknown "
    "key lists the known ones."
)


def _simulator_options(f):
    from core.simulation import FAULTS, FORMATS

    opts = [
        click.option("--seed", default=7, show_default=True, help="Scenario seed (deterministic)."),
        click.option(
            "--rows-per-batch",
            default=None,
            type=int,
            help="Expected rows per batch (default: the scenario's).",
        ),
        click.option(
            "--batch-hours",
            default=None,
            type=float,
            help="Simulated hours per batch (default: the scenario's).",
        ),
        click.option("--drift", default="none", show_default=True, help="A drift of the scenario."),
        click.option(
            "--drift-start", default=0, show_default=True, help="Batch index where drift starts."
        ),
        click.option(
            "--drift-strength",
            default=None,
            type=float,
            help="Scale of the drift (default: the scenario's, 1.0); a running simulator "
            "switches at that strength.",
        ),
        click.option("--scenario", "scenario_opts", multiple=True, help=_SCENARIO_HELP),
        click.option("--fault", type=click.Choice(FAULTS), default=None, help="Inject one fault."),
        click.option("--fault-batch", default=None, type=int, help="Batch index for the fault."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="parquet"),
        click.option("--interval", default=5.0, show_default=True, help="Seconds between batches."),
        click.option("--start-batch", default=0, show_default=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _scenario_options(pairs) -> dict:
    from core.simulation import scenario_options

    try:
        return scenario_options(pairs)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _with_scenario_defaults(opts: dict) -> dict:
    """``opts`` with ``batch_hours`` and ``rows_per_batch`` the scenario's own where unset."""
    import dataclasses

    from core.simulation import simulator_module

    try:
        defaults = {
            f.name: f.default for f in dataclasses.fields(simulator_module().ScenarioConfig)
        }
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    return {
        **opts,
        "batch_hours": opts["batch_hours"] or defaults["batch_span"].total_seconds() / 3600,
        "rows_per_batch": opts["rows_per_batch"] or defaults["rows_per_batch"],
    }


def _scenario(opts: dict, start=None):
    from datetime import timedelta

    from core.simulation import scenario

    opts = _with_scenario_defaults(opts)

    try:
        return scenario(
            start=start,
            seed=opts["seed"],
            batch_span=timedelta(hours=opts["batch_hours"]),
            rows_per_batch=opts["rows_per_batch"],
            drift=opts["drift"],
            drift_start_batch=opts["drift_start"],
            **(
                {"drift_strength": opts["drift_strength"]}
                if opts["drift_strength"] is not None
                else {}
            ),
            **_scenario_options(opts["scenario_opts"]),
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _run_simulator(settings: Settings, opts: dict, batches: int | None, stop=None):
    from core import simulation

    def report(b) -> None:
        fault = f" [red]fault={b.fault}[/]" if b.fault else ""
        console.print(
            f"landed [bold]{b.dataset}[/] batch {b.batch_index}: {b.rows} rows -> {b.path.name}{fault}"
        )

    return simulation.run(
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
    """Land the use case's simulated batches into the landing folder."""
    settings = Settings.from_env().ensure()
    if batches is None and not once and live_simulator_running(settings.home):
        if opts["drift"] != "none":
            strength = opts["drift_strength"]
            request_drift(settings.home, opts["drift"], strength)
            at = f" at strength {strength}" if strength is not None else ""
            console.print(f"the running simulator switches to {opts['drift']} drift{at}")
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


RUN_HISTORY_DAYS = 21.0
RUN_STEP_S = 45.0


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
@click.option("--no-simulator", is_flag=True, help="Do not land demo data or send traffic.")
@click.option(
    "--speed",
    default=1440.0,
    show_default=True,
    help="Simulated seconds per wall second (1440: a simulated day a minute).",
)
@click.option(
    "--headroom-days",
    default=60.0,
    show_default=True,
    help="How far behind the wall clock simulated time starts; it runs at --speed until it "
    "meets the wall clock, then at 1x.",
)
@click.option(
    "--usecase",
    "usecases",
    multiple=True,
    help="A use case to run (repeatable). Default: LOOPLINE_USECASE's; else, with LOOPLINE_HOME "
    "unset, every use case under usecases/ with a simulator, side by side.",
)
@click.option(
    "--startup-timeout", default=300.0, show_default=True, help="Seconds for TorchServe to start."
)
@_simulator_options
@click.pass_context
def run(
    ctx: click.Context,
    host: str,
    port: int,
    no_simulator: bool,
    speed: float,
    headroom_days: float,
    usecases: tuple[str, ...],
    startup_timeout: float,
    **opts,
) -> None:
    """Run the platform: Dagster UI + daemon, TorchServe, the simulator and its traffic.

    Several use cases run side by side (decision 35): one TorchServe serves each one's model at
    /predictions/<use case>; each has its own Dagster UI (--port, --port + 1, ...), home,
    sensors and simulator.

    The simulator first lands 21 simulated days of history in a few large files, then runs on
    an accelerated clock (--speed; never ahead of the wall clock): each step lands one window
    of simulated time (at least --batch-hours, at least 45 wall seconds' worth, with
    --rows-per-batch scaled to keep the rate), and customer traffic sends a sample of it at
    once, near simulated now. The fraud demo's labels mature in 7 simulated days, so at the
    default speed `loopline simulate --drift concept` leads to a retraining on drifted labels within about
    10-15 minutes; watch it with `loopline status`. Retrainings are at least
    LOOPLINE_RETRAIN_COOLDOWN_MINUTES apart (5 here unless set), and drift retrains again
    only a label-maturity period of simulated time after it last did.
    """
    from datetime import timedelta

    from core.simulation import SimClock
    from core.usecase import active
    from orchestration.cli_platform import run_platform, selected

    names = selected(usecases)
    if usecases or len(names) > 1:
        given = [
            name
            for name in ctx.params
            if name not in {"host", "port", "usecases", "startup_timeout"}
            and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        run_platform(names, host, port, _as_args(ctx, given), timeout_s=startup_timeout)
        return
    uc = active()
    platform_trigger_defaults(speed)
    settings = Settings.from_env().ensure()
    console.print(f"[bold]Loopline[/] {uc.name}; home: {settings.home}, lake: {settings.lake}")
    if uc.simulator is None and not no_simulator:
        console.print(f"{uc.name} declares no simulator: land your files in {settings.landing}")
        no_simulator = True
    live = LivePlatform(settings, host=host, port=port)
    try:
        if no_simulator:
            live.start(None, interval_s=0.0, simulate=False)
        else:
            _start_simulated(live, SimClock(speed, timedelta(days=headroom_days)), speed, opts)
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


def _as_args(ctx: click.Context, names: list[str]) -> list[str]:
    """The command-line spelling of the parameters ``names`` of ``ctx``'s command."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name not in names or not isinstance(param, click.Option):
            continue
        flag, value = param.opts[0], ctx.params[param.name]
        if param.is_flag:
            args += [flag] if value else []
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def _start_simulated(live: LivePlatform, clock, speed: float, opts: dict) -> None:
    """Start ``live`` with the use case's simulator on ``clock``: one window per step, a step
    every RUN_STEP_S at least (each step is an ingest run per dataset, then a features and a
    monitoring run: about what two cores sustain beside a training run)."""
    from datetime import timedelta

    from core.simulation import simulator_module

    opts = _with_scenario_defaults(opts)
    step_s = max(opts["interval"], RUN_STEP_S)
    hours = max(opts["batch_hours"], speed * step_s / 3600)
    opts = {
        **opts,
        "batch_hours": hours,
        "rows_per_batch": round(opts["rows_per_batch"] * hours / opts["batch_hours"]),
    }
    scenario = _scenario(opts, start=clock.now() - timedelta(days=RUN_HISTORY_DAYS))
    if opts["fault"] is None and opts["fault_batch"] is None:  # show one quarantine, live
        live_from = simulator_module().Simulator(scenario).batch_at(clock.now())
        opts["fault"], opts["fault_batch"] = "renamed_column", live_from + 4
    live.start(
        scenario,
        interval_s=scenario.batch_span.total_seconds() / speed,
        fault=opts["fault"],
        fault_batch=opts["fault_batch"],
        fmt=opts["fmt"],
        clock=clock,
    )


@main.command()
@click.option("--dataset", default=None)
@click.option("--status", default=None)
@click.option("--limit", default=50, show_default=True)
def batches(dataset: str | None, status: str | None, limit: int) -> None:
    """Print the batch ledger: every landed batch and what happened to it."""
    from quality.ledger import BatchLedger

    settings = Settings.from_env()
    if not exists(settings.ledger_location):
        console.print("no batches yet")
        return
    ledger = BatchLedger.for_settings(settings)
    table = Table(title=f"Batches ({ledger.location})")
    for col in ("batch", "dataset", "file", "status", "rows", "received", "reason"):
        table.add_column(col, overflow="fold")
    colours = {
        "validated": "green",
        "quarantined": "red",
        "stored": "yellow",
        "received": "cyan",
        "duplicate": "magenta",
    }
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


@main.command()
@click.option("--drift", default="concept", show_default=True, help="A drift of the scenario.")
@click.option(
    "--drift-strength", default=1.0, show_default=True, help="Scale of the drift (0 to 1)."
)
@click.option("--scenario", "scenario_opts", multiple=True, help=_SCENARIO_HELP)
@click.option("--days", default=30, show_default=True, help="Simulated days served.")
@click.option("--drift-after", default=5, show_default=True, help="Days served before drift.")
@click.option(
    "--policies",
    default="static,nightly,triggers",
    show_default=True,
    help="Comma-separated; options as suffixes, e.g. triggers+hold50+win21d+hl7d.",
)
@click.option("--seed", default=3, show_default=True)
@click.option(
    "--ceiling",
    is_flag=True,
    help="Also train on full ground truth: the level any policy could reach, overall and by "
    "the recovery deadline.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG.")
def backtest(
    drift: str,
    drift_strength: float,
    scenario_opts: tuple[str, ...],
    days: int,
    drift_after: int,
    policies: str,
    seed: int,
    ceiling: bool,
    as_json: bool,
    plot: str | None,
) -> None:
    """Replay a scenario through features, training, gate and trigger policy in simulated time
    (the active use case's, judged on its task's metric: PR-AUC, MAE)."""
    import json
    from pathlib import Path

    from rich.progress import Progress

    from models.tasks import metric_label
    from orchestration import backtest as bt

    try:
        specs = [bt.PolicySpec.parse(p) for p in policies.split(",") if p.strip()]
        config = bt.demo_config(
            drift,
            drift_strength=drift_strength,
            seed=seed,
            scenario=_scenario_options(scenario_opts),
            days=days,
            drift_after=drift_after,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    err = Console(stderr=True)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("building the scenario's features", total=days * len(specs))
        world = bt.build_world(config)

        def step(policy: str) -> None:
            progress.update(task, advance=1, description=f"replaying {policy}")

        result = bt.run_backtest(config, specs, on_step=step, world=world)
        ceilings: tuple = ()
        no_deadline = None
        if ceiling and drift != "none":
            progress.update(task, description="training the ceilings")
            ceilings = bt.measure_ceiling(world, config)
            try:
                ceilings += bt.deadline_ceilings(world, config)
            except ValueError as exc:  # a deadline no model of drifted rows can meet
                no_deadline = str(exc)
    if plot:
        Path(plot).write_bytes(bt.backtest_png(result))
    if as_json:
        data = result.to_dict() | {"ceiling": [c.to_dict() for c in ceilings]}
        click.echo(json.dumps(data, default=str))
        return
    rows = bt.summary_rows(result)
    table = Table(title=f"Backtest: {drift} drift, {days} simulated days")
    for column in rows[0] if rows else ():
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for c in ceilings:
        console.print(
            f"ceiling {c.regime}: {metric_label(c.metric)} {c.value:.3f} (smoothed "
            f"{c.smoothed_value:.3f}) trained on {c.train_days:.0f} fully labelled days"
        )
    if len(ceilings) == 4:
        console.print(bt.deadline_note(result, ceilings[2], ceilings[3]))
    elif no_deadline:
        console.print(f"[dim]{no_deadline}[/]")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/]")
    console.print(
        f"{result.simulated_seconds / 86400:g} simulated days x {len(specs)} policies in "
        f"{result.wall_seconds:.0f} s ({result.simulated_seconds / result.wall_seconds:,.0f}x "
        "simulated time per policy set)"
    )
    if plot:
        console.print(f"plot: {plot}")


main.add_command(models)
main.add_command(serve)
main.add_command(retrain)
main.add_command(demo)
main.add_command(init)


@main.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--usecase",
    "usecases",
    multiple=True,
    help="A use case to show (repeatable); default as for `loopline run`.",
)
def status_command(as_json: bool, usecases: tuple[str, ...]) -> None:
    """Champion, models, promotions, drift and serving figures at a glance, per use case."""
    from orchestration.cli_platform import each, selected

    names = selected(usecases)
    if usecases or len(names) > 1:
        raise SystemExit(each(names, ["status", *(["--json"] if as_json else [])], as_json=as_json))
    status.callback(as_json)


if __name__ == "__main__":
    main()
