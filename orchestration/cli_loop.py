"""`loopline run | demo | retrain | status`: the whole loop for a person at a terminal.

``run`` and ``demo`` start the same three things: Dagster (webserver + daemon), TorchServe
(the registry's champion, if any), and the live simulator whose transactions are also sent to
the served model as customer traffic. ``demo`` then injects drift once a champion serves and
waits, headless and bounded in time, for the loop to retrain and promote on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from core.db import exists
from core.lifeline import StopSignals
from core.settings import Settings
from core.usecase import active
from models.tasks import metric_label
from models.tasks import of as task_of

console = Console()


def wait_http(url: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with console.status(f"waiting for {url}"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"process exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
    raise click.ClickException(f"{url} did not answer within {timeout:.0f}s")


def _still_stopping(signum: int) -> None:
    console.print(f"already stopping ({signal.Signals(signum).name} ignored)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LivePlatform:
    """Dagster, TorchServe, the live simulator and its traffic, stopped together."""

    settings: Settings
    host: str = "127.0.0.1"
    port: int = 3000
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.signals = StopSignals(note=_still_stopping)
        self.dagster = None
        self.serving = None
        self.traffic = None
        self.simulator = None
        self._sim_thread: threading.Thread | None = None
        self._owns_serving = False
        self.keep_serving = None  # orchestration.supervise.KeepServing, when it owns TorchServe

    def start(
        self,
        scenario,
        *,
        interval_s: float,
        hold_at_batch: int | None = None,
        fault=None,
        fault_batch=None,
        fmt="parquet",
        simulate: bool = True,
        quiet: bool = False,
        clock=None,
        history_files: int = 4,
        per_batch: int = 200,
    ) -> None:
        from orchestration import platform
        from orchestration.live import LiveSimulator, Traffic
        from orchestration.supervise import KeepServing
        from serving.config import ServingConfig
        from serving.process import TorchServeProcess

        # The first SIGINT/SIGTERM (Ctrl-C, `kill`, a container stop, a supervisor) interrupts
        # this thread; stop() runs to its end whatever else arrives.
        self.signals.install()
        self.dagster = platform.start_dagster(self.settings, host=self.host, port=self.port)
        config = ServingConfig.for_settings(self.settings)
        self.serving = TorchServeProcess.attach(config, self.settings.registry_location)
        if not self.serving.status().running:
            self._owns_serving = True  # before start: a stop during start stops it too
            with console.status("starting TorchServe"):
                self.serving.start(tied=True)
            self.keep_serving = KeepServing(self.serving).start()
        else:  # the platform's TorchServe, shared by its use cases: join it, leave it running
            self.serving.serve_champion()
        wait_http(f"http://{self.host}:{self.port}/server_info", self.dagster, timeout=180)
        if not simulate:
            return
        self.traffic = Traffic(self.serving.client(), per_batch=per_batch).start()

        def on_batch(batch) -> None:
            if not quiet:
                tag = f" [red]fault={batch.fault}[/]" if batch.fault else ""
                console.print(
                    f"landed [bold]{batch.dataset}[/] batch {batch.batch_index}: "
                    f"{batch.rows} rows -> {batch.path.name}{tag}"
                )
            if self.simulator is not None and self.simulator.live:  # history is not traffic
                self.traffic.submit(batch)

        self.simulator = LiveSimulator(
            scenario,
            self.settings.landing,
            self.settings.home,
            interval_s=interval_s,
            fault=fault,
            fault_batch=fault_batch,
            fmt=fmt,
            on_batch=on_batch,
            hold_at_batch=hold_at_batch,
            clock=clock,
            history_files=history_files,
        )
        self._sim_thread = threading.Thread(
            target=self.simulator.run, args=(self.stop_event,), daemon=True
        )
        self._sim_thread.start()

    def stop(self) -> None:
        """Stop what ``start`` started, ignoring further signals; safe to call again, and
        after a partial start."""
        self.signals.stopping(self._stop)
        self.signals.restore()

    def _stop(self) -> None:
        from orchestration import platform

        self.stop_event.set()
        if self._sim_thread is not None:
            self._sim_thread.join(timeout=30)
        if self.traffic is not None:
            self.traffic.stop()
        if self.keep_serving is not None:
            self.keep_serving.stop()
        if self.serving is not None and self._owns_serving:
            self.serving.stop()
        if self.dagster is not None:
            platform.stop(self.dagster)


def _registry(settings: Settings):
    from models.registry import Registry

    return Registry.for_settings(settings) if exists(settings.registry_location) else None


def summary(settings: Settings, since: datetime | None = None) -> dict[str, Any]:
    """What the loop did: batches, quarantines, models, promotions, drift, serving figures
    (the compacted log), feature availability (the window monitoring last judged), live
    quality and the platform's health."""
    from quality.ledger import BatchLedger
    from serving.monitoring import read_live_quality

    out: dict[str, Any] = {"home": str(settings.home), "lake": str(settings.lake)}
    if exists(settings.ledger_location):
        out["batches"] = BatchLedger.for_settings(settings).summary()
    registry = _registry(settings)
    if registry is not None:
        versions = registry.list_versions()
        out["models"] = {v.version: v.status for v in versions}
        out["champion"] = registry.get_alias("champion")
        events = registry.events()
        out["promotions"] = [
            {"version": e.version, "at": e.at, "reason": e.reason}
            for e in events
            if e.kind == "promoted"
        ]
        out["rejections"] = [
            {"version": e.version, "reasons": e.reasons[:3]} for e in events if e.kind == "rejected"
        ]
        out["rollbacks"] = [
            {"version": e.version, "reason": e.reason} for e in events if e.kind == "rolled_back"
        ]
    drift = settings.home / "monitoring" / "drift.json"
    if drift.exists():
        report = json.loads(drift.read_text())
        out["drift"] = {
            "champion": report["champion"],
            "max_psi": max(report["psi"].values()) if report["psi"] else 0.0,
            "drifted": report["drifted"],
            "psi": report["psi"],
        }
    out.update(_served(settings))
    out["live_quality"] = [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
        for row in read_live_quality(settings.home / "monitoring").to_dicts()
    ]
    out["health"] = _health(settings)
    return out


def _served(settings: Settings) -> dict[str, Any]:
    """Serving figures from what monitoring compacted (its span index and newest files) and
    the availability its last run measured: a status costs what is new, not all history."""
    import shutil

    from serving.config import ServingConfig
    from serving.monitoring import uncompacted

    shutil.rmtree(settings.monitoring / "status-log", ignore_errors=True)  # older versions' copy
    out: dict[str, Any] = {}
    store = settings.monitoring / "log"
    totals = _served_totals(store) if store.is_dir() else None
    log_dir = ServingConfig.for_home(settings.home, settings.serving_dir).prediction_log_dir
    waiting = len(uncompacted(log_dir, store))
    if totals is not None or waiting:
        out["serving"] = {**(totals or {}), "log_files_not_compacted": waiting}
    measured = settings.monitoring / "availability.json"
    if measured.exists():
        report = json.loads(measured.read_text())
        keys = ("champion", "requests", "unknown_entity_rate", "missing_rate", "staleness_p95_s")
        out["availability"] = {k: report.get(k) for k in (*keys, "window_start", "window_end")}
    return out


def _served_totals(store: Path) -> dict[str, Any] | None:
    """``served_totals`` of the compacted log; read again if a monitoring run merged the
    newest files away while it read them."""
    from serving.monitoring import compacted_spans, served_totals

    try:
        return served_totals(compacted_spans(store))
    except FileNotFoundError:
        return served_totals(compacted_spans(store))


def _health(settings: Settings) -> dict[str, Any]:
    """Disk per store, key expiry and each sensor's last tick (orchestration.health), read
    from the home's Dagster instance with the sensors its code location declares."""
    import warnings

    import dagster as dg

    from orchestration.definitions import defs
    from orchestration.health import declared_sensors, health_report, local_instance

    instance = local_instance(settings)
    try:
        with warnings.catch_warnings():  # Dagster's own beta notices, not the operator's
            warnings.simplefilter("ignore", dg.BetaWarning)
            declared = declared_sensors(defs.get_repository_def()) if instance else None
        return health_report(settings, instance, declared=declared)
    finally:
        if instance is not None:
            instance.dispose()


def print_summary(data: dict[str, Any]) -> None:
    table = Table(title=f"Loopline ({data['home']})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for dataset, counts in sorted(data.get("batches", {}).items()):
        table.add_row(
            f"batches: {dataset}",
            ", ".join(
                f"{k.replace('_batches', '')} {v}"
                for k, v in counts.items()
                if k.endswith("_batches")
            ),
        )
    table.add_row("champion", str(data.get("champion")))
    table.add_row(
        "models", ", ".join(f"{v} {s}" for v, s in data.get("models", {}).items()) or "none"
    )
    for p in data.get("promotions", []):
        table.add_row("promoted", f"{p['version']} at {p['at'][:19]}: {p['reason']}")
    for r in data.get("rejections", []):
        table.add_row("rejected", f"{r['version']}: {'; '.join(r['reasons'])}")
    for r in data.get("rollbacks", []):
        table.add_row("rolled back", f"{r['version']}: {r['reason']}")
    if "drift" in data:
        d = data["drift"]
        table.add_row(
            "drift",
            f"max PSI {d['max_psi']:.3f} on {d['champion']}; drifted: {', '.join(d['drifted']) or 'none'}",
        )
    for what, line in _monitoring_lines(data):
        table.add_row(what, line)
    if "serving" in data:
        table.add_row("serving", _serving_line(data["serving"]))
    for r in data.get("retrainings", []):
        table.add_row("retraining", f"{r['status']}: {r['trigger']} ({r['reason']})")
    latency = data.get("loop_latency")
    if latency:
        table.add_row(
            "loop latency",
            f"{latency['answering_s']:.0f} s from {latency['batch']} landing to "
            f"the new champion answering (run started {latency['run_started_s']:.0f} s, "
            f"registered {latency['registered_s']:.0f} s, promoted {latency['promoted_s']} s)",
        )
    check = data.get("schema_skew_check")
    if check:
        table.add_row(
            "bad batch",
            f"{check['batch']} {check['status']} ({check['reason']}); retrainings started: "
            f"{check['retrainings_started']}; champion kept serving: {check['champion_serving']}",
        )
    if "traffic" in data:
        table.add_row(
            "traffic", f"{data['traffic']['sent']} sent, {data['traffic']['failed']} failed"
        )
    for what, line in _health_lines(data.get("health")):
        table.add_row(what, line)
    console.print(table)


def _serving_line(s: dict[str, Any]) -> str:
    line = (
        f"{s['requests']} requests ({s['refused']} refused), p50 {s['latency_p50_ms']:.1f} ms, "
        f"p99 {s['latency_p99_ms']:.1f} ms over the newest {s['latency_answers']} answers; "
        f"by version {s['by_version']}"
        if "requests" in s
        else "nothing compacted yet"
    )
    waiting = s["log_files_not_compacted"]
    return line + (f"; {waiting} log files wait for monitoring" if waiting else "")


def _health_lines(report: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Table lines for ``summary``'s health: disk by store, key expiry, sensor ticks."""
    from orchestration.health import override_line, release_line, tick_line

    if not report:
        return []
    disk = report["disk_bytes"]
    largest = sorted((n for n in disk if disk[n]), key=disk.__getitem__, reverse=True)
    lines = [
        (
            "disk",
            f"{_size(sum(disk.values()))} in all; "
            + (", ".join(f"{n} {_size(disk[n])}" for n in largest) or "empty"),
        )
    ]
    keys = report["keys"]
    if keys is None:
        lines.append(("key expiry", "no TorchServe key file (TorchServe not running)"))
    else:
        left = keys["expires_in_s"]
        colour = "red" if left < 86400 else "green"
        lines.append(
            (
                "key expiry",
                f"[{colour}]{'expired' if left <= 0 else f'in {left / 3600:.1f} h'}[/] "
                f"({keys['expires_at'][:19]})",
            )
        )
    for tick in report["sensors"]:
        colour = "red" if tick["stale"] else "green"
        lines.append((f"sensor {tick['name']}", f"[{colour}]{tick_line(tick)}[/]"))
    for release in report.get("pending_releases", []):
        colour = "red" if release["stuck"] else "yellow"
        lines.append(("release", f"[{colour}]{release_line(release)}[/]"))
    for override in report.get("overrides", []):
        lines.append(("override", f"[yellow]{override_line(override)}[/]"))
    return lines


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def _metric() -> str:
    """The active use case's primary metric: the live quality's column."""
    return task_of(active().task.type).primary_metric


def _monitoring_lines(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Table lines for live quality and feature availability (``summary``'s keys)."""
    lines = []
    points = data.get("live_quality") or []
    if points:
        p = points[-1]

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        m = _metric()
        counted = f" ({p['positives']} positive)" if p.get("positives") is not None else ""
        lines.append(
            (
                f"live {metric_label(m)}",
                f"{fmt(p[m])} realised on {p['labelled']} labelled{counted}, "
                f"{fmt(p[f'estimated_{m}'])} estimated; newest unlabelled estimated "
                f"{fmt(p[f'estimated_{m}_unlabelled'])} ({p['champion']}, {len(points)} points)",
            )
        )
    a = data.get("availability")
    if a:
        missing = a["missing_rate"]
        worst = max(missing, key=missing.__getitem__, default=None)
        stale = ", ".join(f"{v} {s / 3600:.1f} h" for v, s in sorted(a["staleness_p95_s"].items()))
        lines.append(
            (
                "availability",
                f"unknown entities {a['unknown_entity_rate']:.1%} of {a['requests']} requests; "
                f"worst missing {f'{worst} {missing[worst]:.1%}' if worst else 'none'}; "
                f"online row age p95 {stale or 'not logged'}",
            )
        )
    return lines


@click.command()
@click.option("--reason", default="asked from the command line", show_default=True)
def retrain(reason: str) -> None:
    """Ask the retrain sensor for a retraining now (it still waits for one in flight)."""
    from core.storage import write_json_atomic

    settings = Settings.from_env().ensure()
    path = write_json_atomic(
        {"reason": reason, "at": datetime.now(UTC).isoformat()},
        settings.retrain_request,
    )
    console.print(f"retraining requested ({path}); the retrain sensor picks it up within 15 s")


@click.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Champion, models, promotions, drift and serving figures at a glance."""
    data = summary(Settings.from_env())
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        print_summary(data)


def _champion_served(platform: LivePlatform) -> str | None:
    registry = _registry(platform.settings)
    champion = registry.get_alias("champion") if registry else None
    if champion is None:
        return None
    try:
        default = platform.serving.client(timeout=5).default_version()
    except Exception:
        return None
    return champion if default == champion else None


def _loop_runs(settings: Settings) -> list[dict[str, Any]]:
    """Every continuous_training run with its trigger tags (from the Dagster instance)."""
    import dagster as dg

    from orchestration.retraining import LOOP_JOB

    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=LOOP_JOB))
        return [
            {
                "run_id": r.run_id,
                "status": r.status.value,
                "trigger": r.tags.get("loopline/trigger"),
                "reason": r.tags.get("loopline/reason"),
            }
            for r in runs
        ]
    finally:
        instance.dispose()


def _skewed_batch_check(platform: LivePlatform, champion: str, wait_s: float) -> dict[str, Any]:
    """Land a batch with a renamed column while nothing else lands: it must be quarantined,
    start no retraining, and leave the champion serving."""
    from core import simulation
    from quality.ledger import BatchLedger

    settings = platform.settings
    live = platform.simulator
    live.paused.set()
    time.sleep(platform.simulator.interval_s + 1)
    before = len(_loop_runs(settings))
    k = max(live.next_batch - 1, 0)  # a window of the past: nothing from the future
    dataset = active().request.dataset
    frame = live.sim.events(k)[dataset]
    path = simulation.land(
        simulation.apply_fault(frame, "renamed_column", seed=k),
        settings.landing,
        dataset,
        f"skewed-{k:06d}",
    )
    ledger = BatchLedger.for_settings(settings)
    deadline = time.monotonic() + wait_s
    record = None
    while time.monotonic() < deadline:
        record = next((b for b in ledger.batches() if b.source_name == path.name), None)
        if record is not None and record.status == "quarantined":
            break
        time.sleep(2)
    time.sleep(45)  # a few retrain-sensor ticks: nothing may start
    after = _loop_runs(settings)
    return {
        "batch": path.name,
        "status": record.status if record else "not seen",
        "reason": record.reason if record else None,
        "retrainings_started": len(after) - before,
        "champion_serving": _champion_served(platform) == champion,
    }


@dataclass(frozen=True)
class DemoPlan:
    """How ``loopline demo`` runs a use case's world; a simulator module's optional ``DEMO``
    dict overrides these fields (``scenario``: ScenarioConfig fields).

    The defaults are the fraud demo's: an accelerated clock, history landed in bulk before any
    traffic, then a live phase in which a simulated day passes in 36 wall seconds. Each live
    step lands one 48-hour window (two files, so two ingest runs, then a features and a
    monitoring run) every 72 s: the pipeline's own lag, a minute or two of wall time, is then
    2-4 simulated days, well within the merchant view's 7-day TTL (at 3600x on two busy cores
    it reached 7-12 days and merchant rows expired). History is long enough for the 30-day
    features of most training rows to cover whole windows (a shorter one trains on warm-up
    values that serving never sees again), and history plus headroom stays under the
    contracts' 120-day maximum event age; the headroom outlasts the live phase, so the clock
    never meets the wall clock during a demo. A use case whose labels mature in hours runs
    slower and shorter (the delivery demo: 360x, 6-hour steps, 21 days of history)."""

    speed: float = 2400.0  # simulated seconds per wall second (40 minutes)
    headroom_days: float = 45.0
    history_days: float = 64.0
    batch_hours: float = 48.0
    drift_after_hours: float = 48.0  # of served traffic before the drift
    rows_per_batch: int = 2000
    traffic_per_batch: int = 2000
    history_files: int = 4
    # Simulated hours the demo keeps serving once a champion trained on drifted labels serves
    # (the loop may promote a better one meanwhile); 0 stops at once.
    recovery_hours: float = 0.0
    # New labelled rows that start a retraining (11 simulated days of the fraud demo's labels:
    # new data alone retrains once drifted labels matured); None keeps the use case's own.
    min_new_labelled_rows: int | None = 11000
    scenario: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_active(cls) -> DemoPlan:
        from core import simulation

        declared = dict(getattr(simulation.simulator_module(), "DEMO", {}))
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(declared) - known):
            raise click.ClickException(
                f"the simulator's DEMO has unknown fields {unknown}; known: {sorted(known)}"
            )
        return cls(**declared)

    @property
    def step(self) -> timedelta:
        return timedelta(hours=self.batch_hours)

    @property
    def step_s(self) -> float:
        return self.step.total_seconds() / self.speed


def demo_world(plan: DemoPlan, seed: int, clock) -> tuple[Any, int]:
    """The demo's scenario, its history ending at the clock's (still) time, and the window the
    simulator holds at once history is landed (the first live one)."""
    from core import simulation

    scenario = simulation.scenario(
        seed=seed,
        start=clock.now().replace(minute=0, second=0, microsecond=0)
        - timedelta(days=plan.history_days),
        batch_span=plan.step,
        rows_per_batch=plan.rows_per_batch,
        **plan.scenario,
    )
    return scenario, simulation.simulator_module().Simulator(scenario).batch_at(clock.now())


def _inject_drift(
    platform: LivePlatform, drift: str, served_from: datetime, after: timedelta
) -> datetime:
    """Once ``after`` of traffic is served, ask for drift; the simulated time it
    starts at (the next whole window)."""
    from orchestration.live import request_drift

    live = platform.simulator
    time.sleep(live.clock.wall_seconds_until(served_from + after))
    request_drift(platform.settings.home, drift)
    while live.drift != drift and not platform.stop_event.is_set():
        time.sleep(0.5)
    return live.sim.window(live.config.drift_start_batch)[0]


def live_quality_by_phase(
    rows: list[dict[str, Any]], first: str | None, new: str | None, drift_start: datetime | None
) -> dict[str, Any]:
    """The served model's live quality (the task's primary metric) in each phase, from
    ``live_quality`` rows: before the drift (cohorts ending before it), after it (the old
    champion on cohorts reaching into it), after recovery (the new champion). Per phase its
    newest evaluated point and the number of evaluated points."""
    m = _metric()
    evaluated = [r for r in rows if r.get(m) is not None]

    def phase(keep) -> dict[str, Any] | None:
        points = [r for r in evaluated if keep(r)]
        if not points:
            return None
        last = points[-1]
        keys = ("champion", m, f"estimated_{m}", "labelled", "positives")
        return {k: last.get(k) for k in keys} | {
            "cohort_start": str(last.get("cohort_start")),
            "cohort_end": str(last.get("cohort_end")),
            "evaluations": len(points),
        }

    def end(r: dict[str, Any]) -> datetime:
        stamp = r["cohort_end"]
        return datetime.fromisoformat(stamp) if isinstance(stamp, str) else stamp

    drifted = drift_start or datetime.max.replace(tzinfo=UTC)
    return {
        "before_drift": phase(lambda r: end(r) <= drifted),
        "after_drift": phase(lambda r: end(r) > drifted and r["champion"] != new),
        "after_recovery": phase(lambda r: new is not None and r["champion"] == new),
        "drift_start": str(drift_start) if drift_start else None,
        "first_champion": first,
        "new_champion": new,
    }


def measured_by_phase(
    settings: Settings, new: str | None, drift_start: datetime | None, final: str | None = None
) -> dict[str, Any]:
    """The live quality of every label-mature prediction served in each phase, measured from
    the prediction log and the labels once the demo ends, with ``live_quality`` (the loop's
    own points judge only the champion of the moment, on a trailing week: a champion replaced
    before its predictions' labels matured is never judged there): before the drift, after it
    (every champion whose train split ends before the drift: the first, and any retrained on
    new data before drifted labels reached training), after recovery (the first champion
    trained on drifted labels) and, if the loop promoted again since, ``final`` (the champion
    at the end)."""
    import polars as pl

    from features.views import read_validated
    from serving.monitoring import join_labels, live_quality, read_compacted

    predictions = read_compacted(settings.monitoring / "log")
    label = active().label
    labels = read_validated(settings.lake, label.dataset)
    if drift_start is None or not predictions.height or not labels.height:
        return {}
    joined = join_labels(predictions, labels)
    newest = labels[label.time].max()
    t, version = pl.col("timestamp"), pl.col("model_version")
    before = joined.filter(t < drift_start)
    after = joined.filter(t >= drift_start)
    registry = _registry(settings)

    def never_saw_drift(name: str) -> bool:
        until = registry.get(name).trained_until() if registry else None
        return until is None or until <= drift_start

    old = [v for v in after["model_version"].unique().to_list() if never_saw_drift(v)]
    phases = {
        "before_drift": before,
        "after_drift": after.filter(version.is_in(old)),
        "after_recovery": joined.filter(version == (new or "")),
    }
    if final and final != new and drift_start is not None:
        phases["final_champion"] = joined.filter(version == final)
    out: dict[str, Any] = {}
    for name, part in phases.items():
        q = live_quality(
            part, newest, label_maturity=active().label_maturity, window=timedelta(days=3650)
        )
        out[name] = (
            None
            if q.value is None
            else {
                q.metric: q.value,
                f"estimated_{q.metric}": q.estimated,
                "labelled": q.labelled,
                "positives": q.positives,
                "versions": sorted(part["model_version"].unique().to_list()),
            }
        )
    return out


def _recovered_metric(settings: Settings, new: str) -> bool | None:
    from serving.monitoring import read_live_quality

    rows = read_live_quality(settings.home / "monitoring")
    done = rows.filter((rows["champion"] == new) & rows[_metric()].is_not_null()).height
    return True if done else None


# `loopline run`'s retraining cooldown unless LOOPLINE_RETRAIN_COOLDOWN_MINUTES is set.
RUN_COOLDOWN_MIN = 5


def platform_trigger_defaults(speed: float) -> None:
    """The trigger settings ``loopline run`` gives an accelerated simulator, where the
    environment does not set them: retrainings ``RUN_COOLDOWN_MIN`` apart, and drift re-armed
    after a label-maturity period of simulated time. Every other trigger threshold is the use
    case's declaration or the policy default."""
    os.environ.setdefault("LOOPLINE_RETRAIN_COOLDOWN_MINUTES", str(RUN_COOLDOWN_MIN))
    maturity_min = active().label_maturity.total_seconds() / 60
    os.environ.setdefault("LOOPLINE_RETRAIN_DRIFT_REARM_MINUTES", f"{maturity_min / speed:.2f}")


@click.command()
@click.option("--drift", type=click.Choice(["concept", "covariate"]), default="concept")
@click.option("--timeout", default=2100.0, show_default=True, help="Seconds before giving up.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--seed", default=7, show_default=True)
@click.option(
    "--triggers",
    type=click.Choice(["demo", "platform"]),
    default="demo",
    show_default=True,
    help="demo: demo-sized retraining triggers (1-minute cooldown, the plan's row threshold, a "
    "third run slot); platform: the settings `loopline run` uses.",
)
def demo(drift: str, timeout: float, as_json: bool, seed: int, triggers: str) -> None:
    """Headless, bounded demo on an accelerated clock (the fraud demo's: a simulated day every
    36 s; a use case's simulator may set its own, see DemoPlan): history first, a champion
    trained on it serves live traffic, a bad batch changes nothing, drift is injected, and the
    loop retrains from the drifted labels as they mature and replaces the champion on its own. Prints the served model's live metric before the drift, after it, and
    after recovery."""
    from core.simulation import SimClock

    plan = DemoPlan.of_active()
    if triggers == "demo":
        # Demo-sized triggers for the Dagster processes started below (an explicit setting
        # wins).
        if plan.min_new_labelled_rows is not None:
            os.environ.setdefault("LOOPLINE_RETRAIN_MIN_ROWS", str(plan.min_new_labelled_rows))
        os.environ.setdefault("LOOPLINE_RETRAIN_COOLDOWN_MINUTES", "1")
        # A third run slot: a training run (minutes) must not hold up ingestion and features.
        os.environ.setdefault("LOOPLINE_MAX_CONCURRENT_RUNS", "3")
    # Drift re-arms after a label-maturity period of simulated time (the fraud demo's 7 days:
    # 4.2 wall minutes).
    platform_trigger_defaults(plan.speed)
    settings = Settings.from_env().ensure()
    clock = SimClock(plan.speed, timedelta(days=plan.headroom_days))
    scenario, live_from = demo_world(plan, seed, clock)
    platform = LivePlatform(settings, port=free_port())
    deadline = time.monotonic() + timeout
    outcome = "timed out waiting for the first champion"
    skew: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    first = new = drift_start = None
    try:
        platform.start(
            scenario, interval_s=plan.step_s, quiet=True, hold_at_batch=live_from, clock=clock,
            history_files=plan.history_files, per_batch=plan.traffic_per_batch,
        )  # fmt: skip
        console.print(
            f"Dagster on http://127.0.0.1:{platform.port} (headless), home {settings.home}"
        )
        first = _wait_for(
            deadline, lambda: _first_champion(platform), "the first champion", settings
        )
        if first is not None:
            console.print(f"{first} serves; landing a schema-skewed batch")
            skew = _skewed_batch_check(
                platform, first, wait_s=max(0.0, deadline - time.monotonic())
            )
            clock.start()
            platform.simulator.paused.clear()  # live traffic, on the accelerated clock
            drift_start = _inject_drift(
                platform, drift, clock.now(), timedelta(hours=plan.drift_after_hours)
            )
            console.print(f"{drift} drift from simulated {drift_start:%Y-%m-%d %H:%M}")
            new = _wait_for(
                deadline,
                lambda: _replaced_after(platform, drift_start),
                "a champion trained on drifted labels",
                settings,
            )
            outcome = (
                f"{first} replaced by {new} after {drift} drift"
                if new
                else f"timed out waiting for a champion after {drift} drift"
            )
            if new:
                latency = loop_latency(settings, new, datetime.now(UTC))
                _wait_for(
                    deadline,
                    lambda: _recovered_metric(settings, new),
                    f"{new}'s live metric",
                    settings,
                )
                if plan.recovery_hours:  # the loop goes on learning the drifted world
                    settle = timedelta(hours=plan.recovery_hours)
                    console.print(f"serving {settle} more of drifted traffic")
                    time.sleep(
                        min(platform.simulator.clock.wall_seconds_until(clock.now() + settle),
                            max(0.0, deadline - time.monotonic() - 120))
                    )  # fmt: skip
                    final = _champion_served(platform)
                    if final and final != new:
                        _wait_for(
                            deadline,
                            lambda: _recovered_metric(settings, final),
                            f"{final}'s live metric",
                            settings,
                        )
                # The promoting run watches the new version after promotion: let it finish
                # rather than stop Dagster under it.
                _wait_for(
                    min(deadline, time.monotonic() + 600),
                    lambda: True if not _loop_in_flight(settings) else None,
                    "the promoting run to finish",
                    settings,
                    every_s=2.0,
                )
    except KeyboardInterrupt:
        outcome = "interrupted"
    finally:
        platform.stop()
    data = summary(settings)
    data["outcome"] = outcome
    data["loop_latency"] = latency
    data["schema_skew_check"] = skew
    data["retrainings"] = _loop_runs(settings)
    data["live_quality_by_phase"] = live_quality_by_phase(
        data.get("live_quality", []), first, new, drift_start
    ) | {"measured_at_end": measured_by_phase(settings, new, drift_start, data.get("champion"))}
    data["clock"] = {"speed": plan.speed, "simulated_now": clock.now().isoformat()}
    if platform.traffic is not None:
        data["traffic"] = {"sent": platform.traffic.sent, "failed": platform.traffic.failed}
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        print_summary(data)
        _print_phases(data)
        console.print(f"[bold]{outcome}[/]")
    if " replaced by " not in outcome:
        raise SystemExit(1)


def _replaced_after(platform: LivePlatform, drift_start: datetime) -> str | None:
    """The newest champion whose train split reaches past ``drift_start`` (it learned from
    drifted labels), once TorchServe serves it; else None. A promotion of a model trained on
    the old world alone is no recovery, even when its test split (newer rows it was only
    evaluated on) holds drifted rows: a retraining on new data just after the drift."""
    registry = _registry(platform.settings)
    promoted = [e.version for e in registry.events() if e.kind == "promoted"]
    served = _champion_served(platform)
    if not promoted or served != promoted[-1]:
        return None
    until = registry.get(served).trained_until()
    return served if until is not None and until > drift_start else None


def _print_phases(data: dict[str, Any]) -> None:
    phases = data["live_quality_by_phase"]
    m = _metric()
    label = metric_label(m)

    def counted(point: dict[str, Any]) -> str:
        positives = point.get("positives")
        return f" ({positives} positives)" if positives is not None else ""

    for name in ("before_drift", "after_drift", "after_recovery"):
        point = phases.get(name)
        text = (
            f"{point['champion']}: live {label} {point[m]:.3f} on {point['labelled']} "
            f"labelled{counted(point)}, cohort to {point['cohort_end'][:16]}"
            if point
            else "not evaluated by the loop"
        )
        end = phases["measured_at_end"].get(name)
        if end:
            text += (
                f"; all its label-mature predictions ({', '.join(end['versions'])}): "
                f"{end[m]:.3f} on {end['labelled']}{counted(end)}"
            )
        console.print(f"live quality {name.replace('_', ' ')}: {text}")
    rate = data.get("availability", {}).get("unknown_entity_rate")
    if rate is not None:
        console.print(f"requests with unknown entities: {rate:.2%}")


def _first_champion(platform: LivePlatform) -> str | None:
    """The served champion; if the held simulator's data gave only rejected candidates and
    nothing is in flight, land four more batches so the loop can try again."""
    served = _champion_served(platform)
    live = platform.simulator
    if served is None and live.paused.is_set():
        runs = _loop_runs(platform.settings)
        if runs and all(r["status"] in _DONE for r in runs) and runs[0]["run_id"] != live.retried:
            live.retried = runs[0]["run_id"]
            live.hold_at_batch = live.next_batch + 4
            live.paused.clear()
    return served


def _wait_for(deadline: float, probe, what: str, settings: Settings, every_s: float = 5.0):
    with console.status(f"waiting for {what}") as line:
        while time.monotonic() < deadline:
            found = probe()
            if found is not None:
                return found
            line.update(f"waiting for {what} ({_progress(settings)})")
            time.sleep(every_s)
    return None


_DONE = ("SUCCESS", "FAILURE", "CANCELED")


def _loop_in_flight(settings: Settings) -> bool:
    return any(r["status"] not in _DONE for r in _loop_runs(settings))


def loop_latency(settings: Settings, version: str, answered_at: datetime) -> dict[str, Any] | None:
    """Seconds from the batch that set off ``version``'s training run to ``version`` answering.

    The batch is the one the run's trigger was measured on when the retraining sensor first saw
    it (``orchestration.triggers.first_seen``: a trigger held back by the cooldown still counts
    from there), received as the ledger says; a trigger without a batch (serving drift) counts
    from when the sensor first saw it. The stages split the time between the sensors (->
    run started), training and the gate (-> registered) and delivery (-> promoted ->
    answering requests).
    """
    import dagster as dg

    from orchestration.triggers import TRIGGER_BATCH_TAG, TRIGGER_SEEN_TAG
    from quality.ledger import BatchLedger

    registry = _registry(settings)
    record = next((v for v in registry.list_versions() if v.version == version), None)
    if record is None or not record.dagster_run_id:
        return None
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    try:
        run = instance.get_run_record_by_id(record.dagster_run_id)
    finally:
        instance.dispose()
    if run is None or run.start_time is None:
        return None
    tags = run.dagster_run.tags
    started = datetime.fromtimestamp(run.start_time, UTC)
    batch = BatchLedger.for_settings(settings).get(tags.get(TRIGGER_BATCH_TAG) or "")
    if batch is not None:
        origin, origin_at = batch.source_name, datetime.fromisoformat(batch.received_at)
    elif tags.get(TRIGGER_SEEN_TAG):
        origin, origin_at = (
            "the sensor first saw the trigger",
            datetime.fromisoformat(tags[TRIGGER_SEEN_TAG]),
        )
    else:  # a run of no sensor's (a person, the schedule): from its own start
        origin, origin_at = "the run started", started
    promoted = [
        datetime.fromisoformat(e.at)
        for e in registry.events()
        if e.kind == "promoted" and e.version == version
    ]

    def since(t: datetime) -> float:
        return round((t - origin_at).total_seconds(), 1)

    return {
        "batch": origin,
        "run_id": record.dagster_run_id,
        "trigger": tags.get("loopline/trigger"),
        "trigger_seen_s": since(datetime.fromisoformat(tags[TRIGGER_SEEN_TAG]))
        if tags.get(TRIGGER_SEEN_TAG)
        else None,
        "run_started_s": since(started),
        "registered_s": since(datetime.fromisoformat(record.created_at)),
        "promoted_s": since(promoted[-1]) if promoted else None,
        "answering_s": since(answered_at),
    }


def _progress(settings: Settings) -> str:
    from quality.ledger import BatchLedger

    if not exists(settings.ledger_location):
        return "no batches yet"
    counts = BatchLedger.for_settings(settings).summary()
    parts = [
        f"{d} {c.get('validated_batches', 0)} ok/{c.get('quarantined_batches', 0)} bad"
        for d, c in sorted(counts.items())
        if d in (active().request.dataset, active().label.dataset)
    ]
    registry = _registry(settings)
    models = len(registry.list_versions()) if registry else 0
    return ", ".join(parts) + f", {models} models"
