"""Keeping TorchServe up while `loopline run` owns it.

TorchServe is a child of `loopline run` (or of the multi-use-case platform). If it dies (the OOM
killer, a crash, a stray `kill`), nothing else brings it back: every prediction fails until a
deployment happens to start it. ``KeepServing`` checks every few seconds and, when the process is
gone, starts it again with the registry's champion. Each restart is an alert and a line in
``<serving_dir>/restarts.jsonl`` (when it went down, when it answered again), so an operator, and
the soak, can tell requests refused during a restart from requests refused by a bug.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestration import alerts
from serving.process import TorchServeProcess

RESTARTS = "restarts.jsonl"
logger = logging.getLogger("loopline.supervise")


def restarts_path(serving_dir: Path) -> Path:
    return Path(serving_dir) / RESTARTS


def read_restarts(serving_dir: Path) -> list[dict[str, Any]]:
    """Every restart recorded for this TorchServe, oldest first."""
    path = restarts_path(serving_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class KeepServing:
    """A thread that restarts ``process`` when it is gone; ``stop()`` before stopping it."""

    def __init__(self, process: TorchServeProcess, *, every_s: float = 5.0) -> None:
        self.process = process
        self.every_s = every_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keep-serving", daemon=True)

    def start(self) -> KeepServing:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.process.alive():
                continue
            try:
                self.restart()
            except Exception:  # noqa: BLE001 - logged; the next check tries again
                logger.exception("TorchServe is down and could not be restarted; retrying")

    def restart(self) -> None:
        """Start the process again and record the window it was down."""
        down_at = datetime.now(UTC)  # noticed: it went at most ``every_s`` before
        logger.warning("TorchServe is gone; restarting it")
        if self._stop.is_set():
            return
        status = self.process.start(tied=True)
        up_at = datetime.now(UTC)
        self.restarts += 1
        window = {
            "down_at": down_at.isoformat(),
            "up_at": up_at.isoformat(),
            "champion": status.champion,
        }
        with restarts_path(self.process.config.serving_dir).open("a") as out:
            out.write(json.dumps(window) + "\n")
        alerts.send(
            alerts.Alert(
                kind="serving_restarted",
                summary=f"TorchServe was down and was restarted serving {status.champion}",
                details=window,
            )
        )
