"""Helpers for the reliability tests: TorchServe's processes and memory, traffic, latency."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

from serving.process import TorchServeProcess


def group_processes(process: TorchServeProcess) -> list[psutil.Process]:
    """Every live process of the TorchServe instance's process group (launcher, Java, workers)."""
    state = process._state()
    if not state:
        return []
    pgid = int(state["pid"])
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def memory_mib(process: TorchServeProcess) -> dict[str, float]:
    """RSS in MiB of the Java frontend and of each Python model worker (by pid)."""
    out: dict[str, float] = {}
    for proc in group_processes(process):
        try:
            cmd = " ".join(proc.cmdline())
            rss = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        if proc.name() == "java" or "java" in cmd.split(" ", 1)[0]:
            out["frontend"] = round(rss, 1)
        elif "model_service_worker" in cmd:
            out[f"worker-{proc.pid}"] = round(rss, 1)
    return out


def worker_pids(client) -> dict[str, list[int]]:
    """TorchServe's own account of each registered version's worker pids."""
    described = client.describe(version="all")
    return {
        d["modelVersion"]: sorted(int(w["pid"]) for w in d.get("workers", [])) for d in described
    }


def inference_session(client) -> tuple[requests.Session, str, dict[str, str]]:
    url = f"{client.config.inference_url}/predictions/{client.config.model_name}"
    headers = {"Authorization": f"Bearer {client.keys.inference}"}
    return requests.Session(), url, headers


def p99_ms(client, bodies: list[dict], repeats: int = 1) -> float:
    """p99 latency of valid requests sent one after another."""
    session, url, headers = inference_session(client)
    latencies = []
    for _ in range(repeats):
        for body in bodies:
            started = time.perf_counter()
            response = session.post(url, json=body, headers=headers, timeout=30)
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return float(np.percentile(latencies, 99))


@dataclass
class Traffic:
    """Steady concurrent valid traffic from ``clients`` threads until stopped."""

    client: object
    bodies: list[dict]
    clients: int = 4
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.clients)
        ]

    def _run(self, k: int) -> None:
        session, url, headers = inference_session(self.client)
        i = k
        while not self._stop.is_set():
            body = self.bodies[i % len(self.bodies)]
            i += self.clients
            started = time.perf_counter()
            try:
                response = session.post(url, json=body, headers=headers, timeout=30)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
                version = response.json()["model_version"]
            except Exception as exc:  # every failure is counted and reported, none hidden
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.ok += 1
                self.versions[version] = self.versions.get(version, 0) + 1
                self.latencies_ms.append(elapsed)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)


def leftover_temporaries(root: Path) -> list[Path]:
    """Files under ``root`` still carrying a temporary name that is not hidden (a writer that
    renamed nothing would leave them where readers look)."""
    return [
        p
        for p in Path(root).rglob("*")
        if p.is_file() and p.name.endswith(".tmp") and not p.name.startswith(".")
    ]
