"""Several use cases side by side in one platform (decision 35).

Each use case runs as today in a process of its own (``LOOPLINE_USECASE`` chooses it): its own
home (ledger, lake, Feast project, registry, monitoring), its own Dagster instance, code
location, sensors and UI port, its own simulator and traffic. What they share is one
TorchServe, in the platform's serving folder (``LOOPLINE_SERVING_DIR``), serving each use
case's model at ``/predictions/<use case>``. Nothing else is shared, so a quarantine, a failed
training or a rollback in one cannot reach another.

Layout: with ``LOOPLINE_HOME`` set it is the platform's root, each use case at
``<root>/<name>`` and TorchServe at ``<root>/serving``; else each use case at its default home
(``.loopline/``, ``.loopline-<name>/``) and TorchServe in the default use case's
(``.loopline/serving``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from core.lifeline import StopSignals, tied
from core.settings import REPO_ROOT, Settings, default_home, local_path
from core.usecase import DEFAULT_USECASE, ENV_VAR, UseCaseError, available, load

console = Console()


@dataclass(frozen=True)
class Layout:
    """Where each use case of a platform lives, and the TorchServe they share."""

    homes: Mapping[str, Path]
    serving_dir: Path

    @classmethod
    def of(cls, names: Sequence[str], env: Mapping[str, str] | None = None) -> Layout:
        env = os.environ if env is None else env
        if not names:
            raise click.UsageError("a platform runs at least one use case")
        for name in names:
            try:
                load(name)
            except UseCaseError as exc:
                raise click.UsageError(str(exc)) from None
        if env.get("LOOPLINE_HOME"):
            root = local_path(env["LOOPLINE_HOME"])
            homes = {n: root / n for n in names}
            serving = root / "serving"
        else:
            homes = {n: default_home(n) for n in names}
            serving = default_home(DEFAULT_USECASE) / "serving"
        if env.get("LOOPLINE_SERVING_DIR"):
            serving = local_path(env["LOOPLINE_SERVING_DIR"])
        return cls(homes, serving)

    def env(self, name: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of use case ``name``'s processes."""
        return {
            **(os.environ if base is None else base),
            ENV_VAR: name,
            "LOOPLINE_HOME": str(self.homes[name]),
            "LOOPLINE_SERVING_DIR": str(self.serving_dir),
        }

    def settings(self, name: str) -> Settings:
        return Settings.from_env(self.env(name))


def selected(usecases: Sequence[str]) -> list[str]:
    """The use cases a command runs: those named (``--usecase``), else ``LOOPLINE_USECASE``'s,
    else the default one when ``LOOPLINE_HOME`` is set (it is one use case's home), else every
    use case under ``usecases/`` that generates demo data."""
    if usecases:
        return list(dict.fromkeys(usecases))
    if os.environ.get(ENV_VAR):
        return [os.environ[ENV_VAR]]
    if os.environ.get("LOOPLINE_HOME"):
        return [DEFAULT_USECASE]
    return available(with_simulator=True)


def run_platform(
    names: Sequence[str], host: str, port: int, child_args: Sequence[str], *, timeout_s: float
) -> None:
    """Start the shared TorchServe, then one ``loopline run`` per use case (Dagster UI on
    ``port``, ``port + 1``, ...); stop them all on Ctrl-C, SIGTERM or when one exits."""
    from orchestration.supervise import KeepServing
    from serving.config import ServingConfig
    from serving.process import TorchServeProcess

    layout = Layout.of(names)
    first = layout.settings(names[0]).ensure()
    serving = TorchServeProcess.attach(ServingConfig.for_settings(first))
    owns_serving = False
    keep_serving = None
    children: dict[str, subprocess.Popen] = {}
    signals = StopSignals().install()
    try:
        if not serving.status().running:
            owns_serving = True
            with console.status("starting TorchServe for every use case"):
                serving.start(timeout=timeout_s, tied=True)
            keep_serving = KeepServing(serving).start()
        cfg = serving.config
        console.print(
            f"[bold]Loopline[/] platform: {', '.join(names)}; TorchServe {cfg.inference_url} "
            f"(token in {cfg.key_file})"
        )
        for i, name in enumerate(names):
            console.print(
                f"  {name}: Dagster UI http://{host}:{port + i}, "
                f"{cfg.inference_url}/predictions/{name}, home {layout.homes[name]}"
            )
            command = [sys.executable, "-m", "orchestration.cli", "run"]
            command += ["--host", host, "--port", str(port + i), *child_args]
            children[name] = subprocess.Popen(
                tied(command), cwd=REPO_ROOT, env=layout.env(name), start_new_session=True
            )
        while all(p.poll() is None for p in children.values()):
            time.sleep(0.5)
        exited = [n for n, p in children.items() if p.poll() is not None]
        console.print(f"[red]{', '.join(exited)} stopped[/]; stopping the platform")
    except KeyboardInterrupt:
        console.print("stopping the platform...")
    finally:

        def stop() -> None:
            if keep_serving is not None:
                keep_serving.stop()
            _stop_children(list(children.values()))
            if owns_serving:
                serving.stop()

        signals.stopping(stop)
        signals.restore()
        console.print("platform stopped")


def _stop_children(children: list[subprocess.Popen]) -> None:
    """Ask each child's process group once (SIGINT: each stops its Dagster and simulator; its
    guard waits for it), and kill the groups still running after 90 s. Each child leads a
    group of its own, so a signal to this command's group (Ctrl-C, a supervisor) reaches
    only this command, which stops them here, once."""
    for proc in children:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 90
    for proc in children:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def each(names: Sequence[str], args: Sequence[str], *, as_json: bool = False) -> int:
    """Run ``loopline <args>`` once per use case of the platform, each in its own process; with
    ``as_json``, print one JSON object of their JSON outputs by use case. The worst exit code."""
    import json

    layout = Layout.of(names)
    worst, outputs = 0, {}
    for name in names:
        if not as_json:
            console.rule(f"[bold]{name}[/]")
        done = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", *args],
            cwd=REPO_ROOT,
            env=layout.env(name),
            stdout=subprocess.PIPE if as_json else None,
            text=True,
        )
        worst = max(worst, done.returncode)
        if as_json:
            outputs[name] = json.loads(done.stdout) if done.returncode == 0 else None
    if as_json:
        click.echo(json.dumps(outputs, indent=2, default=str))
    return worst
