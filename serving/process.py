"""Starting, watching and stopping one TorchServe instance of a Loopline home.

TorchServe runs as ``python -m ts.model_server --start --foreground`` in its own session
(process group), launched with this interpreter: TorchServe passes ``sys.executable`` on to
the Java frontend as the worker Python, so workers import ``serving``, ``models`` and
``features`` from the same environment. Its working directory is ``serving_dir`` (where it
writes ``key_file.json``), and TMPDIR points at a private folder, because TorchServe keeps its
pid file, worker sockets and unpacked archives there: two instances on one machine never share
them. A small state file (``torchserve.json``) lets another process (``loopline serve stop``)
find and stop the instance. Start writes ``config.properties`` with the registry's champion
(archived first when needed), so the champion is registered again on every start, then
reconciles (``serving.reconciler``): a release pending when the last one stopped is confirmed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from core import lifeline
from core.db import Location, Postgres, exists
from core.storage import write_json_atomic
from models.registry import CHAMPION, Registry
from serving.client import TorchServeClient, TorchServeError
from serving.config import ServingConfig, write_log_config, write_properties
from serving.keys import renew_keys_if_due
from serving.output_log import start_copier
from serving.prediction_log import close_orphans
from serving.reconciler import Reconciliation, from_model_store, reconcile

STATE_FILE = "torchserve.json"
OUTPUT_LOG = "torchserve.out"
# Unix socket paths are limited to 108 bytes; TorchServe puts ".ts.sock.<port>" in TMPDIR.
_MAX_TMP_PATH = 80


class ServingProcessError(RuntimeError):
    """TorchServe could not be started or stopped as asked."""


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    healthy: bool
    pid: int | None = None
    started_at: str | None = None
    inference_url: str | None = None
    management_url: str | None = None
    metrics_url: str | None = None
    key_file: str | None = None
    champion: str | None = None
    versions: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TorchServeProcess:
    """Lifecycle of the TorchServe instance described by ``config``."""

    def __init__(self, config: ServingConfig, registry: Location | str | None = None) -> None:
        """``registry``: where the use case's registry is (``Settings.registry_location``), to
        serve its champion; None to serve what the model store holds."""
        self.config = config
        self.registry = (
            registry if isinstance(registry, Postgres) or not registry else Path(registry)
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: subprocess.Popen[bytes] | None = None  # copies TorchServe's output

    @classmethod
    def attach(
        cls, config: ServingConfig, registry: Location | str | None = None
    ) -> TorchServeProcess:
        """The instance running in ``config.serving_dir`` with the settings it was started
        with (ports may differ from ``config``); ``config`` itself when none runs. The model
        and its home stay ``config``'s: a platform's use cases share one TorchServe, which may
        have been started for another of them."""
        state_path = config.serving_dir / STATE_FILE
        try:
            saved = json.loads(state_path.read_text()).get("config")
        except (FileNotFoundError, json.JSONDecodeError):
            saved = None
        if not saved:
            return cls(config, registry)
        running = replace(ServingConfig.from_dict(saved), model_name=config.model_name)
        return cls(replace(running, home=config.home), registry)

    @property
    def state_path(self) -> Path:
        return self.config.serving_dir / STATE_FILE

    def client(self, **kwargs: Any) -> TorchServeClient:
        return TorchServeClient(self.config, **kwargs)

    # --- start ---------------------------------------------------------------------------

    def champion(self) -> str | None:
        """The registry's champion version, archived into the model store; None without one."""
        if self.registry is None or not exists(self.registry):
            return None
        registry = Registry(self.registry)
        version = registry.get_alias(CHAMPION)
        if version is not None:
            from serving.archive import archive_version  # torch and Feast: only when needed

            archive_version(registry, version, self.config)
        return version

    def serve_champion(self, timeout: float | None = None) -> Reconciliation | None:
        """On a running instance, make this registry's champion the model's default version
        (archived and registered if it is not yet) and confirm pending releases: how a use
        case joins a TorchServe that another one started, and how a start finishes a release
        a crash left half done. None without a registry."""
        if self.registry is None or not exists(self.registry):
            return None
        registry = Registry(self.registry)
        client = self.client(timeout=timeout or float(self.config.startup_timeout_s))
        return reconcile(registry, client, from_model_store(registry, self.config))

    def start(self, *, timeout: float | None = None, tied: bool = False) -> ServerStatus:
        """Starts TorchServe, waits until it is healthy and the champion's worker is ready.

        ``tied``: TorchServe stops when this process is gone, even SIGKILLed (``loopline run``
        owns it); by default it outlives the caller (``loopline serve start``, a Dagster run).
        """
        cfg = self.config
        if self._state_pid() is not None:
            raise ServingProcessError(
                f"TorchServe is already running for {cfg.serving_dir} (pid {self._state_pid()})"
            )
        for folder in (cfg.serving_dir, cfg.model_store, cfg.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        champion = self.champion()
        properties = write_properties(cfg, champion)
        cfg.key_file.unlink(missing_ok=True)
        tmp = self._tmp_dir()
        env = {
            **os.environ,
            "LOOPLINE_HOME": str(cfg.home),
            "LOG_LOCATION": str(cfg.log_dir),
            "METRICS_LOCATION": str(cfg.log_dir),
            "TMPDIR": str(tmp),
            "TEMP": str(tmp),
            "TMP": str(tmp),
            # One intra-op thread per worker: the model is small and batching does the rest;
            # more threads only fight the frontend for a 2-core host's cores.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "SODA_CORE_TELEMETRY_ENABLED": "false",
        }
        env.pop("TS_CONFIG_FILE", None)
        command = [
            sys.executable,
            "-m",
            "ts.model_server",
            "--start",
            "--foreground",
            "--ts-config",
            str(properties),
            "--model-store",
            str(cfg.model_store),
            "--log-config",
            str(write_log_config(cfg)),
            "--ncs",
        ]
        if tied:
            command = lifeline.tied(command)
        self._output, out = start_copier(
            cfg.log_dir / OUTPUT_LOG, cfg.log_max_bytes, cfg.log_backups
        )
        try:
            self._proc = subprocess.Popen(
                command,
                cwd=cfg.serving_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            os.close(out)
        write_json_atomic(
            {
                "pid": self._proc.pid,
                "started_at": datetime.now(UTC).isoformat(),
                "properties": str(properties),
                "tmp_dir": str(tmp),
                "champion": champion,
                "command": command,
                "config": cfg.to_dict(),
            },
            self.state_path,
        )
        try:
            self._wait_ready(champion, timeout or float(cfg.startup_timeout_s))
        except BaseException:
            self.stop()
            raise
        self.serve_champion(timeout)  # the champion may have moved while TorchServe started
        return self.status()

    def _tmp_dir(self) -> Path:
        tmp = self.config.serving_dir / "tmp"
        if len(str(tmp)) > _MAX_TMP_PATH:
            return Path(tempfile.mkdtemp(prefix="loopline-ts-"))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def _wait_ready(self, champion: str | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(timeout=5.0)
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServingProcessError(
                    f"TorchServe exited with code {self._proc.returncode}:\n{self.log_tail()}"
                )
            healthy = self.config.key_file.exists() and client.ping()
            if healthy and (champion is None or _worker_ready(client, champion)):
                return
            if not healthy and self.config.key_file.exists():
                _renew_keys(self.config, client)
            time.sleep(0.25)
        raise ServingProcessError(
            f"TorchServe was not ready within {timeout:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """The end of ``torchserve.out``; once TorchServe has exited, after its last words
        have been copied there."""
        if self._output is not None and self._proc is not None and self._proc.poll() is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._output.wait(timeout=5)
        path = self.config.log_dir / OUTPUT_LOG
        if not path.exists():
            return "(no output)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- stop ----------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> bool:
        """Stops the instance (SIGTERM to its process group, SIGKILL after ``timeout``).

        Returns False when nothing was running.
        """
        state = self._state()
        pid = _our_group(state)
        stopped = False
        if pid is not None:
            _signal_group(pid, signal.SIGTERM)
            if not self._wait_gone(pid, timeout):
                _signal_group(pid, signal.SIGKILL)
                self._wait_gone(pid, 10.0)
            stopped = True
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self.config.key_file.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        if self.config.prediction_log_dir.is_dir():  # files of workers TorchServe SIGKILLed
            close_orphans(self.config.prediction_log_dir)
        if state and state.get("tmp_dir"):
            shutil.rmtree(state["tmp_dir"], ignore_errors=True)
        return stopped

    def _wait_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                self._proc.poll()  # reap our own child, or it lingers as a zombie
            if not _group_alive(pgid):
                return True
            time.sleep(0.1)
        return False

    # --- status --------------------------------------------------------------------------

    def _state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _state_pid(self, state: dict[str, Any] | None = None) -> int | None:
        """The recorded pid, if that process still runs TorchServe with our config."""
        state = state if state is not None else self._state()
        if not state:
            return None
        pid = int(state["pid"])
        try:
            proc = psutil.Process(pid)
            alive = proc.status() != psutil.STATUS_ZOMBIE
            ours = state["properties"] in proc.cmdline()
        except psutil.Error:
            return None
        return pid if alive and ours else None

    def alive(self) -> bool:
        """Whether this instance's process runs (no request made: cheap enough to poll)."""
        return self._state_pid() is not None

    def status(self) -> ServerStatus:
        cfg = self.config
        state = self._state()
        pid = self._state_pid(state)
        if pid is None:
            return ServerStatus(running=False, healthy=False)
        client = self.client(timeout=5.0)
        healthy = client.ping()
        versions: dict[str, bool] = {}
        if healthy:
            try:
                versions = client.versions()
            except TorchServeError:
                versions = {}
        return ServerStatus(
            running=True,
            healthy=healthy,
            pid=pid,
            started_at=state.get("started_at") if state else None,
            inference_url=cfg.inference_url,
            management_url=cfg.management_url,
            metrics_url=cfg.metrics_url,
            key_file=str(cfg.key_file),
            champion=state.get("champion") if state else None,
            versions=versions,
        )


def _renew_keys(config: ServingConfig, client: TorchServeClient) -> None:
    """Keys short-lived enough (minutes, as in a soak) can expire before the first worker is
    ready: renew them as the key sensor would (the management API may not answer yet)."""
    with contextlib.suppress(TorchServeError):
        renew_keys_if_due(config, client=client)


def _worker_ready(client: TorchServeClient, version: str) -> bool:
    try:
        described = client.describe(version=version)
    except TorchServeError:
        return False
    workers = described[0].get("workers", []) if described else []
    return any(w.get("status") == "READY" for w in workers)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _our_group(state: dict[str, Any] | None) -> int | None:
    """The recorded process group, if any live member runs with our config.properties
    (the Java frontend does even when the Python launcher died)."""
    if not state:
        return None
    pgid = int(state["pid"])
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and state["properties"] in " ".join(proc.cmdline()):
                return pgid
        except (ProcessLookupError, psutil.Error):
            continue
    return None


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group."""
    return bool(lifeline.group_members(pgid))
