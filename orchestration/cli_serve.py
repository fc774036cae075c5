"""`loopline serve`: the TorchServe model server of this home (no Dagster)."""

from __future__ import annotations

import json

import click
from rich.console import Console

from core.settings import Settings

console = Console()


def _process(**overrides):
    from serving.config import ServingConfig
    from serving.process import TorchServeProcess

    settings = Settings.from_env()
    if overrides.get("workers_per_model") is None:
        overrides["workers_per_model"] = settings.serving_workers
    if settings.serving_key_minutes:
        overrides["token_expiration_min"] = settings.serving_key_minutes
    config = ServingConfig(
        serving_dir=settings.serving_dir,
        model_store=settings.model_store,
        home=settings.home,
        **overrides,
    )
    return TorchServeProcess.attach(config, settings.registry_location)


@click.group()
def serve() -> None:
    """TorchServe: serve the registry's champion over REST (token auth, loopback)."""


@serve.command()
@click.option("--inference-port", default=8080, show_default=True)
@click.option("--management-port", default=8081, show_default=True)
@click.option("--metrics-port", default=8082, show_default=True)
@click.option("--batch-size", default=32, show_default=True, help="Dynamic batching: max batch.")
@click.option("--max-batch-delay", default=5, show_default=True, help="Dynamic batching: ms.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Workers per model version (default: the profile's, LOOPLINE_SERVING_WORKERS).",
)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for health.")
def start(
    inference_port: int,
    management_port: int,
    metrics_port: int,
    batch_size: int,
    max_batch_delay: int,
    workers: int | None,
    timeout: float,
) -> None:
    """Start TorchServe in the background with the registry's champion registered."""
    from serving.process import ServingProcessError

    process = _process(
        inference_port=inference_port,
        management_port=management_port,
        metrics_port=metrics_port,
        batch_size=batch_size,
        max_batch_delay_ms=max_batch_delay,
        workers_per_model=workers,
    )
    with console.status("starting TorchServe (Java frontend, then one Python worker)"):
        try:
            status = process.start(timeout=timeout)
        except ServingProcessError as exc:
            raise click.ClickException(str(exc)) from exc
    cfg = process.config
    console.print(f"[green]TorchServe is up[/] (pid {status.pid})")
    if status.champion is None:
        console.print("[yellow]no champion in the registry yet: no model is served[/]")
    else:
        console.print(f"serving [bold]{cfg.model_name}[/] {status.champion} (the champion)")
    console.print(f"inference  {cfg.inference_url}/predictions/{cfg.model_name}")
    console.print(f"management {cfg.management_url}   metrics {cfg.metrics_url}/metrics")
    console.print(f"keys       {cfg.key_file}  (Authorization: Bearer <inference key>)")
    console.print(f"logs       {cfg.log_dir}   predictions {cfg.prediction_log_dir}")


@serve.command()
def stop() -> None:
    """Stop this home's TorchServe."""
    process = _process()
    if process.stop():
        console.print("TorchServe stopped")
    else:
        console.print("TorchServe was not running")


@serve.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Whether TorchServe runs, is healthy, and which model versions it serves."""
    state = _process().status()
    if as_json:
        click.echo(json.dumps(state.to_dict(), indent=2))
        return
    if not state.running:
        console.print("TorchServe is [red]not running[/]")
        raise SystemExit(1)
    health = "[green]healthy[/]" if state.healthy else "[red]not answering /ping[/]"
    console.print(f"TorchServe pid {state.pid}, {health}, started {state.started_at}")
    console.print(f"inference {state.inference_url}  keys {state.key_file}")
    for version, default in sorted(state.versions.items()):
        console.print(f"  {version}{'  (default)' if default else ''}")
