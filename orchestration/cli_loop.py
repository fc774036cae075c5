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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from orchestration.settings import Settings

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


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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
        self.dagster = None
        self.serving = None
        self.traffic = None
        self.simulator = None
        self._sim_thread: threading.Thread | None = None

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
    ) -> None:
        from orchestration import platform
        from orchestration.live import LiveSimulator, Traffic
        from serving.config import ServingConfig
        from serving.process import TorchServeProcess

        if threading.current_thread() is threading.main_thread():
            # `kill`, a container stop or a CI timeout stop everything, as Ctrl-C does.
            signal.signal(signal.SIGTERM, _interrupt)
        self.dagster = platform.start_dagster(self.settings, host=self.host, port=self.port)
        config = ServingConfig.for_home(self.settings.home)
        self.serving = TorchServeProcess.attach(config, self.settings.registry_path)
        if not self.serving.status().running:
            with console.status("starting TorchServe"):
                self.serving.start()
        wait_http(f"http://{self.host}:{self.port}/server_info", self.dagster, timeout=180)
        if not simulate:
            return
        self.traffic = Traffic(self.serving.client()).start()

        def on_batch(batch) -> None:
            if not quiet:
                tag = f" [red]fault={batch.fault}[/]" if batch.fault else ""
                console.print(
                    f"landed [bold]{batch.dataset}[/] batch {batch.batch_index}: "
                    f"{batch.rows} rows -> {batch.path.name}{tag}"
                )
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
        )
        self._sim_thread = threading.Thread(
            target=self.simulator.run, args=(self.stop_event,), daemon=True
        )
        self._sim_thread.start()

    def stop(self) -> None:
        from orchestration import platform

        self.stop_event.set()
        if self._sim_thread is not None:
            self._sim_thread.join(timeout=30)
        if self.traffic is not None:
            self.traffic.stop()
        if self.serving is not None:
            self.serving.stop()
        if self.dagster is not None:
            platform.stop(self.dagster)


def _registry(settings: Settings):
    from models.registry import Registry

    return Registry(settings.registry_path) if settings.registry_path.exists() else None


def summary(settings: Settings, since: datetime | None = None) -> dict[str, Any]:
    """What the loop did: batches, quarantines, models, promotions, drift, serving figures."""
    from quality.ledger import BatchLedger
    from serving.config import ServingConfig
    from serving.monitoring import compact, read_compacted

    out: dict[str, Any] = {"home": str(settings.home), "lake": str(settings.lake)}
    if settings.ledger_path.exists():
        out["batches"] = BatchLedger(settings.ledger_path).summary()
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
        }
    config = ServingConfig.for_home(settings.home)
    folder = settings.home / "monitoring" / "status-log"
    compact(config.prediction_log_dir, folder)
    logged = read_compacted(folder)
    if logged.height:
        answered = logged.filter(logged["status"] == 200)
        out["serving"] = {
            "requests": logged.height,
            "refused": logged.height - answered.height,
            "latency_p50_ms": float(answered["latency_ms"].quantile(0.5) or 0.0),
            "latency_p99_ms": float(answered["latency_ms"].quantile(0.99) or 0.0),
            "by_version": {
                str(k): int(v) for k, v in answered.group_by("model_version").len().iter_rows()
            },
        }
    return out


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
    if "serving" in data:
        s = data["serving"]
        table.add_row(
            "serving",
            f"{s['requests']} requests ({s['refused']} refused), p50 {s['latency_p50_ms']:.1f} ms, "
            f"p99 {s['latency_p99_ms']:.1f} ms; by version {s['by_version']}",
        )
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
    console.print(table)


@click.command()
@click.option("--reason", default="asked from the command line", show_default=True)
def retrain(reason: str) -> None:
    """Ask the retrain sensor for a retraining now (it still waits for one in flight)."""
    from features.storage import write_json_atomic

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

    from orchestration.monitoring import LOOP_JOB

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
    from features import simulator
    from quality.ledger import BatchLedger

    settings = platform.settings
    live = platform.simulator
    live.paused.set()
    time.sleep(platform.simulator.interval_s + 1)
    before = len(_loop_runs(settings))
    k = live.next_batch
    frame = live.sim.transactions(k)
    path = simulator.land(
        simulator.apply_fault(frame, "renamed_column", seed=k),
        settings.landing,
        "transactions",
        f"skewed-{k:06d}",
    )
    ledger = BatchLedger(settings.ledger_path)
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


@click.command()
@click.option("--drift", type=click.Choice(["concept", "covariate"]), default="concept")
@click.option("--timeout", default=1500.0, show_default=True, help="Seconds before giving up.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--seed", default=7, show_default=True)
def demo(drift: str, timeout: float, as_json: bool, seed: int) -> None:
    """Headless, bounded demo: train a champion, show a bad batch change nothing, inject drift,
    and watch the loop replace the champion on its own."""
    from features.simulator import ScenarioConfig

    # Demo-sized triggers for the Dagster processes started below (an explicit setting wins).
    os.environ.setdefault("LOOPLINE_RETRAIN_MIN_ROWS", "15000")
    os.environ.setdefault("LOOPLINE_RETRAIN_COOLDOWN_MINUTES", "1")
    settings = Settings.from_env().ensure()
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    scenario = ScenarioConfig(
        seed=seed,
        n_cards=1500,
        n_merchants=200,
        start=now - timedelta(days=80),
        batch_span=timedelta(hours=48),
        rows_per_batch=4000,
    )
    platform = LivePlatform(settings, port=free_port())
    deadline = time.monotonic() + timeout
    outcome = "timed out waiting for the first champion"
    skew: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    try:
        # 40 batches of history: the first 14 train the first champion, the rest drift. The
        # split is in time order and labels mature for 7 days, so drifted rows reach a
        # challenger's train split only once validation and test are drifted too
        # (docs/decisions.md, 17): 26 drifted batches make that a clear win, not a coin flip.
        platform.start(scenario, interval_s=2.0, quiet=True, hold_at_batch=14)
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
            from orchestration.live import request_drift

            request_drift(settings.home, drift)
            platform.simulator.paused.clear()
            drift_at = datetime.now(UTC).isoformat()
            console.print(f"injecting {drift} drift")

            def replaced() -> str | None:
                registry = _registry(settings)
                promoted = [
                    e for e in registry.events() if e.kind == "promoted" and e.at > drift_at
                ]
                served = _champion_served(platform)
                return served if promoted and served == promoted[-1].version else None

            new = _wait_for(deadline, replaced, "a new champion", settings, every_s=1.0)
            outcome = (
                f"{first} replaced by {new} after {drift} drift"
                if new
                else f"timed out waiting for a champion after {drift} drift"
            )
            if new:
                answered_at = datetime.now(UTC)
                latency = loop_latency(settings, new, answered_at)
                # No more batches (nothing new to trigger on); customers reach the new
                # champion: score a sample of the newest batch.
                live = platform.simulator
                live.paused.set()
                frame = live.sim.transactions(max(live.next_batch - 1, 0))
                frame = frame.filter(frame["event_timestamp"] < answered_at)  # none from the future
                platform.traffic.send(platform.traffic.requests_of_frame(frame))
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
    if platform.traffic is not None:
        data["traffic"] = {"sent": platform.traffic.sent, "failed": platform.traffic.failed}
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        print_summary(data)
        console.print(f"[bold]{outcome}[/]")
    if " replaced by " not in outcome:
        raise SystemExit(1)


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

    The batch is the newest one the landing sensor received before that run started (its
    trigger condition became true with it); the stages split the time between the sensors
    (batch received -> run started), training and the gate (-> registered) and delivery
    (-> promoted -> answering requests).
    """
    import dagster as dg

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
    started = datetime.fromtimestamp(run.start_time, UTC)
    batch = next(
        (
            b
            for b in BatchLedger(settings.ledger_path).batches()
            if datetime.fromisoformat(b.received_at) <= started
        ),
        None,
    )
    if batch is None:
        return None
    received = datetime.fromisoformat(batch.received_at)
    promoted = [
        datetime.fromisoformat(e.at)
        for e in registry.events()
        if e.kind == "promoted" and e.version == version
    ]

    def since(t: datetime) -> float:
        return round((t - received).total_seconds(), 1)

    return {
        "batch": batch.source_name,
        "run_id": record.dagster_run_id,
        "trigger": run.dagster_run.tags.get("loopline/trigger"),
        "run_started_s": since(started),
        "registered_s": since(datetime.fromisoformat(record.created_at)),
        "promoted_s": since(promoted[-1]) if promoted else None,
        "answering_s": since(answered_at),
    }


def _progress(settings: Settings) -> str:
    from quality.ledger import BatchLedger

    if not settings.ledger_path.exists():
        return "no batches yet"
    counts = BatchLedger(settings.ledger_path).summary()
    parts = [
        f"{d} {c.get('validated_batches', 0)} ok/{c.get('quarantined_batches', 0)} bad"
        for d, c in sorted(counts.items())
        if d in ("transactions", "labels")
    ]
    registry = _registry(settings)
    models = len(registry.list_versions()) if registry else 0
    return ", ".join(parts) + f", {models} models"
