"""`loopline models`: the model registry from the command line (no Dagster, no torch)."""

import json

import click
from rich.console import Console
from rich.table import Table

from core.db import exists
from core.settings import Settings
from models.registry import CHAMPION, Registry, RegistryError

console = Console()
STATUS_COLOURS = {
    "champion": "green",
    "challenger": "cyan",
    "rejected": "red",
    "retired": "yellow",
    "registered": "white",
}
METRICS = ("pr_auc", "roc_auc", "log_loss", "brier", "precision", "recall", "threshold")


def _registry() -> Registry:
    settings = Settings.from_env()
    if not exists(settings.registry_location):
        raise click.ClickException(
            f"no model registry at {settings.registry_location}; train a model first "
            "(materialize training_job)"
        )
    return Registry.for_settings(settings)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


@click.group()
def models() -> None:
    """The model registry: versions, lineage, champion promotion and rollback."""


@models.command("list")
def list_versions() -> None:
    """Every registered version with its status, aliases and headline metrics."""
    registry = _registry()
    table = Table(title=f"Model versions ({registry.path})")
    for col in ("version", "status", "aliases", "created", "pr_auc", "roc_auc", "training set"):
        table.add_column(col, overflow="fold")
    for v in registry.list_versions():
        colour = STATUS_COLOURS.get(v.status, "white")
        table.add_row(
            v.version,
            f"[{colour}]{v.status}[/]",
            ", ".join(v.aliases),
            v.created_at[:19],
            _num(v.metrics.get("pr_auc")),
            _num(v.metrics.get("roc_auc")),
            v.training_set_version[:16],
        )
    console.print(table)
    aliases = registry.aliases()
    console.print(
        "champion: "
        + aliases.get(CHAMPION, "none")
        + "; challenger: "
        + aliases.get("challenger", "none")
    )


@models.command()
@click.argument("version")
def show(version: str) -> None:
    """Lineage, metrics, gate verdict and the event log of one version."""
    registry = _registry()
    try:
        mv = registry.get(version)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    colour = STATUS_COLOURS.get(mv.status, "white")
    console.print(f"[bold]{mv.model_name} {mv.version}[/]  [{colour}]{mv.status}[/]")

    lineage = Table(title="Lineage", show_header=False)
    lineage.add_column("field", style="bold")
    lineage.add_column("value", overflow="fold")
    for key, value in mv.lineage().items():
        if key == "artifacts":
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        lineage.add_row(key, text)
    console.print(lineage)

    artifacts = Table(title="Artifacts")
    for col in ("file", "sha256", "bytes"):
        artifacts.add_column(col, overflow="fold")
    for path, art in mv.artifacts.items():
        artifacts.add_row(path, art["sha256"], str(art["size_bytes"]))
    console.print(artifacts)

    metrics = Table(title=f"Metrics ({mv.metrics.get('split', 'test')} split)")
    compared = mv.extra.get("compared", {})
    metrics.add_column("metric")
    metrics.add_column(mv.version)
    for name in compared:
        metrics.add_column(name)
    for m in METRICS:
        metrics.add_row(
            m,
            _num(mv.metrics.get(m)),
            *[_num(compared[n].get(m)) for n in compared],
        )
    console.print(metrics)

    gate = mv.extra.get("gate")
    if gate:
        verdict = gate.get("verdict") or ("passed" if gate["passed"] else "rejected")
        colour = "green" if verdict == "passed" else "red" if not gate["passed"] else "yellow"
        console.print(f"Validation gate: [{colour}]{verdict}[/]")
        for reason in gate["reasons"]:
            console.print(f"  - {reason}")
        for warning in gate.get("warnings", []):
            console.print(f"  - not verified: {warning}")

    events = Table(title="Events")
    for col in ("at", "event", "reason"):
        events.add_column(col, overflow="fold")
    for e in registry.events(version):
        reason = e.reason or ""
        if e.reasons:
            reason = "; ".join(e.reasons)
        events.add_row(e.at[:19], e.kind, reason)
    console.print(events)


@models.command()
@click.argument("version")
@click.option("--reason", default=None, help="Why; required with --force.")
@click.option(
    "--force",
    is_flag=True,
    help="Override: promote a version the gate did not pass against the current champion "
    "(rejected, never judged, judged against another champion, rolled back). Recorded as an "
    "override event, shown by `loopline status`.",
)
def promote(version: str, reason: str | None, force: bool) -> None:
    """Make VERSION the champion: only a version the gate passed against the current champion,
    unless --force with a --reason."""
    if force and not (reason or "").strip():
        raise click.UsageError("--force needs --reason: the override is recorded with it")
    registry = _registry()
    try:
        previous = registry.promote(
            version, reason or "promoted from the command line", force=force
        )
    except (KeyError, RegistryError) as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    override = registry.overrides()[-1:] if force else []
    if override and override[0].version == version and override[0].detail.get("from") == previous:
        console.print(f"[yellow]override recorded[/]: {override[0].reasons[0]}")
    console.print(f"champion: {previous or 'none'} -> [green]{version}[/]")
    console.print(_serve_champion())


@models.command()
@click.option("--reason", default="rolled back from the command line", show_default=True)
def rollback(reason: str) -> None:
    """Restore the previous champion, in the registry and, when it runs, in TorchServe."""
    registry = _registry()
    current = registry.get_alias(CHAMPION)
    try:
        restored = registry.rollback(reason)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"champion: {current} -> [green]{restored}[/] (rolled back)")
    console.print(_serve_champion())


@models.command()
def reconcile() -> None:
    """Make TorchServe serve the registry's champion and confirm pending promotions/rollbacks."""
    registry = _registry()
    for release in registry.releases(pending=True):
        console.print(
            f"pending: {release.kind} {release.from_version or 'none'} -> {release.to_version} "
            f"({release.reason}) since {release.at[:19]}"
        )
    console.print(_serve_champion())


def _serve_champion() -> str:
    """Apply the registry's move to TorchServe and confirm it (``serving.reconciler``): this use
    case's model only (the platform's TorchServe is shared with other use cases). The intent
    is already in the registry, so a failure here is finished by the next reconcile."""
    from serving.config import ServingConfig
    from serving.process import TorchServeProcess

    settings = Settings.from_env()
    config = ServingConfig.for_home(settings.home, settings.serving_dir)
    process = TorchServeProcess.attach(config, settings.registry_location)
    from serving.client import TorchServeError
    from serving.reconciler import ReconcileError

    if not process.status().healthy:
        return "TorchServe is not running: it serves the champion when it starts"
    try:
        result = process.serve_champion()
    except (TorchServeError, ReconcileError) as exc:
        raise click.ClickException(
            f"the registry's champion is set, but TorchServe did not follow: {exc}. The "
            "reconcile sensor finishes it, or `loopline models reconcile`."
        ) from exc
    done = result.summary() if result else "no registry"
    return f"TorchServe {process.config.inference_url}/predictions/{config.model_name}: {done}"
