"""A month of unattended running in an hour: `make soak-month` (issue 18).

Runs `loopline run` for one use case on an accelerated clock with short TorchServe keys and
retention set to keep a few days of data, sends valid requests the whole time, and injects the
faults an unattended platform meets: a 2 GB junk file and a file written in place in landing,
TorchServe killed, the online store wiped, a torn prediction-log line, the prediction log's
disk failing for a while. It samples bytes per store and reads monitoring run times as it goes,
then reports (``report.json``, ``soak.png``) and checks:

- no valid request failed outside the windows in which TorchServe was down and restarting;
- every landed file is in the ledger with a final status, with its rows where it was read;
- each fault was met as designed (junk quarantined unread, the in-place file taken whole,
  TorchServe restarted with the champion, the online store reloaded, monitoring ran on);
- for a long run: bytes per retained store flat once the retention window has passed, and
  monitoring run time flat as history grows.

``LOOPLINE_USECASE=delivery python -m tests.soak.driver --days 30 --speed 720`` is the month
(the use case is the process's, as for every Loopline command); the test suite runs a
few-minute variant (tests/soak/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from core.settings import REPO_ROOT, Settings
from core.usecase import active
from orchestration.cli_loop import free_port
from quality.ledger import FINAL, BatchLedger
from serving.client import TorchServeClient, TorchServeError
from serving.config import ServingConfig
from serving.requests import request_bodies

# When each fault is injected, as a fraction of the soak's simulated span.
FAULTS = {
    "junk_files": 0.15,
    "written_in_place": 0.25,
    "torchserve_killed": 0.35,
    "online_store_wiped": 0.45,
    "torn_log_line": 0.55,
    "log_disk_failing": 0.65,
}
# Stores retention keeps within limits, whose bytes must stay flat.
# (Models, archives and training sets are bounded by count: they reach their bound when enough
# retrainings have happened, not at a data age; the plot shows them.)
RETAINED = (
    *("raw", "validated", "features", "archive", "quarantine"),
    *("compacted_log", "prediction_log"),
)


@dataclass
class SoakConfig:
    days: float = 30.0
    speed: float = 720.0
    retain_days: float = 10.0  # data days kept by retention (delivery's features reach 9)
    key_minutes: float = 2.0
    sample_s: float = 10.0
    first_model_timeout_s: float = 1200.0
    disk_fault_s: float = 40.0  # longer than the log writer's 30-s file rotation
    check_flat: bool = True  # a short run cannot pass a retention window


@dataclass
class Outcome:
    at: float
    ok: bool
    error: str = ""


@dataclass
class Soak:
    config: SoakConfig
    out: Path
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    landed: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = self.out / "home"
        self.ports = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "COLUMNS": "240",
            "LOOPLINE_HOME": str(self.home),
            "LOOPLINE_SERVING_PORTS": ",".join(map(str, self.ports)),
            "LOOPLINE_SERVING_KEY_MINUTES": str(self.config.key_minutes),
            "LOOPLINE_RETENTION_INTERVAL_MINUTES": "1",
            "LOOPLINE_RETAIN_GRACE_MINUTES": "1",
            "LOOPLINE_RETAIN_DAGSTER_RUNS": "days=0.01",  # wall-clock: 15 minutes
            "LOOPLINE_LOG_MAX_BYTES": "2M",
            "LOOPLINE_RETAIN_PREDICTION_LOG": "bytes=20M",
            **{
                f"LOOPLINE_RETAIN_{s}": f"days={self.config.retain_days}"
                for s in ("RAW", "VALIDATED", "FEATURES", "ARCHIVE", "COMPACTED_LOG")
            },
        }
        self.settings = Settings.from_env(self.env)
        self.serving = ServingConfig.for_settings(self.settings)
        self._stop = threading.Event()
        self._t0 = 0.0
        self.served_at_end: str | None = None

    # --- running ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        dagster_port = free_port()
        command = [sys.executable, "-m", "orchestration.cli", "run", "--port", str(dagster_port)]
        command += ["--speed", str(self.config.speed)]
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._read_output, args=(proc,), daemon=True).start()
        try:
            self._wait_first_model(proc)
            self._t0 = time.monotonic()
            workers = [self._traffic, self._sample]
            threads = [threading.Thread(target=w, daemon=True) for w in workers]
            for thread in threads:
                thread.start()
            self._inject_faults(proc)
            self._stop.set()
            for thread in threads:
                thread.join(60)
            self._await_ingestion()
            self.served_at_end = self._served()
        finally:
            self._stop.set()
            stop_at = time.time()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        return self.report(stop_at)

    def _read_output(self, proc: subprocess.Popen) -> None:
        with (self.out / "run.log").open("w") as log:
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                log.write(f"{time.time():.3f} {line}")
                log.flush()
                self._note_landed(line)

    def _note_landed(self, line: str) -> None:
        # "landed <dataset> batch <i>: <rows> rows -> <file>[ fault=...]"
        words = line.split()
        if len(words) >= 8 and words[0] == "landed" and words[6] == "->":
            self.landed[words[7]] = {
                "dataset": words[1],
                "rows": int(words[4]),
                "at": time.time(),
                "fault": " ".join(words[8:]) or None,
            }

    def _wait_first_model(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.config.first_model_timeout_s
        while self._served() is None:
            if proc.poll() is not None:
                raise RuntimeError(f"loopline run exited ({proc.returncode}); see run.log")
            if time.monotonic() > deadline:
                raise RuntimeError("no champion served in time; see run.log")
            time.sleep(5)

    def _served(self) -> str | None:
        try:
            return TorchServeClient(self.serving, timeout=10).default_version()
        except (TorchServeError, OSError):
            return None

    def sim_days(self) -> float:
        return (time.monotonic() - self._t0) * self.config.speed / 86400

    def _wait_sim_day(self, day: float) -> None:
        while self.sim_days() < day:
            time.sleep(0.5)

    def _traffic(self) -> None:
        """Valid requests, a list of 16 a second, from the newest validated orders."""
        client, rows, refreshed = TorchServeClient(self.serving, timeout=30), None, 0.0
        while not self._stop.is_set():
            if rows is None or time.monotonic() - refreshed > 30:
                rows, refreshed = self._recent_requests() or rows, time.monotonic()
            if rows:
                try:
                    client.predict(rows[:16])
                    self.outcomes.append(Outcome(time.time(), True))
                except (TorchServeError, OSError) as exc:
                    self.outcomes.append(Outcome(time.time(), False, str(exc)[:300]))
                rows = rows[16:] + rows[:16]
            time.sleep(1.0)

    def _recent_requests(self) -> list[dict] | None:
        folder = self.settings.validated / self._request_dataset()
        for path in sorted(folder.glob("*.parquet"), key=_mtime, reverse=True)[:3]:
            try:
                return request_bodies(pl.read_parquet(path).tail(200))
            except (OSError, pl.exceptions.ComputeError):
                continue  # retention took it meanwhile
        return None

    def _sample(self) -> None:
        from serving.keys import key_expiry
        from serving.prediction_log import writer_health
        from serving.stores import disk_usage

        while not self._stop.wait(self.config.sample_s):
            try:
                usage = disk_usage(self.settings)
                expiry = key_expiry(self.serving)
            except Exception as exc:  # noqa: BLE001 - a sample lost is reported, not fatal
                self.samples.append({"day": self.sim_days(), "error": str(exc)})
                continue
            self.samples.append(
                {
                    "day": self.sim_days(),
                    "bytes": {store: u["bytes"] for store, u in usage.items()},
                    "key_expires": {k: v.isoformat() for k, v in expiry.items()},
                    "writers": writer_health(self.serving.prediction_log_dir),
                }
            )

    # --- faults -------------------------------------------------------------------------------

    def _inject_faults(self, proc: subprocess.Popen) -> None:
        for name, at in sorted(FAULTS.items(), key=lambda kv: kv[1]):
            self._wait_sim_day(at * self.config.days)
            if proc.poll() is not None:
                raise RuntimeError(f"loopline run exited ({proc.returncode}); see run.log")
            started = time.time()
            detail = getattr(self, f"_fault_{name}")() or {}
            self.faults[name] = {"at": started, "day": at * self.config.days, **detail}
        self._wait_sim_day(self.config.days)

    def _fault_junk_files(self) -> dict[str, Any]:
        names = [f"{self._request_dataset()}-junk.parquet", "backup.zip"]
        for name in names:
            with (self.settings.landing / name).open("wb") as f:
                f.truncate(2 << 30)  # sparse: 2 GB that take no disk
        return {"files": names}

    def _fault_written_in_place(self) -> dict[str, Any]:
        """A valid batch copied in place, slowly, under its final name (scp, SFTP)."""
        dataset = self._request_dataset()
        folder = self.settings.validated / dataset
        source = max(folder.glob("*.parquet"), key=_mtime)
        frame = pl.read_parquet(source)
        key = next(c for c in frame.columns if c.endswith("_id"))
        frame = frame.with_columns((pl.lit("inplace-") + pl.col(key)).alias(key))
        data = _parquet_bytes(frame)
        name = f"{dataset}-written-in-place.parquet"
        with (self.settings.landing / name).open("wb") as f:
            for i in range(0, len(data), max(1, len(data) // 4)):
                f.write(data[i : i + max(1, len(data) // 4)])
                f.flush()
                time.sleep(2.0)  # the landing sensor ticks meanwhile
        self.landed[name] = {"dataset": dataset, "rows": frame.height, "at": time.time()}
        return {"file": name, "rows": frame.height}

    def _fault_torchserve_killed(self) -> dict[str, Any]:
        from serving.process import TorchServeProcess

        pid = TorchServeProcess.attach(self.serving).status().pid
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the OOM killer, a stray kill -9
        return {"pid": pid}

    def _fault_online_store_wiped(self) -> dict[str, Any]:
        with sqlite3.connect(self.home / "feast" / "online.db") as con:
            tables = [
                r[0] for r in con.execute("select name from sqlite_master where type='table'")
            ]
            for table in tables:
                con.execute(f'delete from "{table}"')
        return {"tables": tables}

    def _fault_torn_log_line(self) -> dict[str, Any]:
        name = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-predictions-soak-000001.jsonl"
        (self.serving.prediction_log_dir / name).write_bytes(b'{"logged_at": "2026-')
        return {"file": name}

    def _fault_log_disk_failing(self) -> dict[str, Any]:
        folder = self.serving.prediction_log_dir
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            time.sleep(self.config.disk_fault_s)
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return {"seconds": self.config.disk_fault_s}

    def _request_dataset(self) -> str:
        return active().request.dataset

    def _await_ingestion(self, timeout_s: float = 180.0) -> None:
        """Give the files landed before the end time to be ingested."""
        cutoff, deadline = time.time(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.unaccounted(cutoff):
                return
            time.sleep(5)

    # --- the report ---------------------------------------------------------------------------

    def unaccounted(self, cutoff: float) -> list[str]:
        """Landed files (before ``cutoff``) without a final ledger status or with other rows."""
        ledger = BatchLedger.for_settings(self.settings)
        records = {r.source_name: r for r in ledger.batches()}
        missing = []
        for name, landed in list(self.landed.items()):
            record = records.get(name)
            if landed["at"] > cutoff:
                continue
            if record is None or record.status not in FINAL:
                missing.append(f"{name}: {record.status if record else 'not in the ledger'}")
            elif record.status == "validated" and record.rows != landed["rows"]:
                missing.append(f"{name}: {record.rows} rows in the ledger, {landed['rows']} landed")
        return missing

    def restart_windows(self) -> list[tuple[float, float]]:
        from orchestration.supervise import read_restarts

        killed = self.faults.get("torchserve_killed", {}).get("at")
        windows = []
        for restart in read_restarts(self.serving.serving_dir):
            up = datetime.fromisoformat(restart["up_at"]).timestamp() + 10.0
            down = datetime.fromisoformat(restart["down_at"]).timestamp()
            windows.append((min(down, killed or down), up))
        return windows

    def report(self, stop_at: float) -> dict[str, Any]:
        windows = self.restart_windows()
        failed = [o for o in self.outcomes if not o.ok]
        outside = [o for o in failed if not any(a <= o.at <= b for a, b in windows)]
        ledger = BatchLedger.for_settings(self.settings)
        records = {r.source_name: r for r in ledger.batches()}
        report = {
            "config": asdict(self.config),
            "requests": {"lists": len(self.outcomes), "failed": len(failed)},
            "failed_outside_restarts": [asdict(o) for o in outside[:20]],
            "restart_windows": windows,
            "landed_files": len(self.landed),
            "unaccounted": self.unaccounted(stop_at - 120),
            "faults": self.faults,
            "fault_outcomes": self.fault_outcomes(records),
            "samples": self.samples,
            "monitoring": self.monitoring_costs(),
        }
        report["flat"] = self.flatness(report) if self.config.check_flat else None
        (self.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        self.plot(report)
        return report

    def fault_outcomes(self, records: dict[str, Any]) -> dict[str, Any]:
        junk = self.faults.get("junk_files", {}).get("files", [])
        in_place = self.faults.get("written_in_place", {}).get("file")
        writers = [w for s in self.samples for w in s.get("writers", [])]
        return {
            "junk_quarantined": {
                n: (records[n].status, records[n].reason) if n in records else None for n in junk
            },
            "in_place": (records[in_place].status, records[in_place].rows)
            if in_place in records
            else None,
            "writer_errors_seen": max((w.get("errors", 0) for w in writers), default=0),
            "writer_dropped_seen": max((w.get("dropped", 0) for w in writers), default=0),
            "online_reloads": self._online_reloads(),
            "served_at_end": self.served_at_end,
        }

    def _dagster(self):
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.settings.dagster_home))

    def _online_reloads(self) -> int:
        import dagster as dg

        with self._dagster() as instance:
            events = instance.fetch_materializations(dg.AssetKey("online_features"), limit=10_000)
            return sum(
                1
                for e in events.records
                if e.asset_materialization.metadata.get("reloaded")
                and e.asset_materialization.metadata["reloaded"].value
            )

    def monitoring_costs(self) -> list[dict[str, Any]]:
        from orchestration.monitoring_assets import monitoring_costs

        with self._dagster() as instance:
            return monitoring_costs(instance)

    def flatness(self, report: dict[str, Any]) -> dict[str, Any]:
        """Bytes per retained store, and monitoring run time, late against mid-run."""
        days = self.config.days
        window = self.config.retain_days + 2
        samples = [s for s in report["samples"] if "bytes" in s]
        mid = [s for s in samples if window <= s["day"] < (window + days) / 2]
        late = [s for s in samples if s["day"] >= (window + days) / 2]
        stores = {}
        for store in RETAINED:
            a = max((s["bytes"].get(store, 0) for s in mid), default=0)
            b = max((s["bytes"].get(store, 0) for s in late), default=0)
            stores[store] = {"mid_max": a, "late_max": b, "flat": b <= 1.5 * a + (1 << 20)}
        runs = report["monitoring"]
        third = max(1, len(runs) // 3)
        early = statistics.median([r["seconds"] for r in runs[third : 2 * third]] or [0])
        latest = statistics.median([r["seconds"] for r in runs[-third:]] or [0])
        return {
            "stores": stores,
            "monitoring_seconds": {"mid": early, "late": latest, "flat": latest <= 1.5 * early + 2},
        }

    def plot(self, report: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        samples = [s for s in report["samples"] if "bytes" in s]
        fig, (disk, mon) = plt.subplots(2, 1, figsize=(9, 8))
        for store in sorted({k for s in samples for k in s["bytes"]}):
            sizes = [s["bytes"].get(store, 0) / 1e6 for s in samples]
            disk.plot([s["day"] for s in samples], sizes, label=store)
        disk.set(xlabel="simulated day", ylabel="MB", title="Bytes per store", yscale="symlog")
        disk.legend(fontsize=7, ncol=3)
        runs = report["monitoring"]
        mon.plot(range(len(runs)), [r["seconds"] for r in runs], marker=".")
        mon.set(xlabel="monitoring run", ylabel="seconds", title="Monitoring run time")
        fig.tight_layout()
        fig.savefig(self.out / "soak.png", dpi=80)
        plt.close(fig)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    import io

    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def failures(report: dict[str, Any], config: SoakConfig) -> list[str]:
    """What the soak must show; empty when it did."""
    out = []
    if report["failed_outside_restarts"]:
        out.append(f"valid requests failed outside restarts: {report['failed_outside_restarts']}")
    if report["unaccounted"]:
        out.append(f"landed files not accounted for: {report['unaccounted'][:10]}")
    outcomes = report["fault_outcomes"]
    if any(v is None or v[0] != "quarantined" for v in outcomes["junk_quarantined"].values()):
        out.append(f"junk files not quarantined: {outcomes['junk_quarantined']}")
    if outcomes["in_place"] is None or outcomes["in_place"][0] != "validated":
        out.append(f"the file written in place was not taken whole: {outcomes['in_place']}")
    if not report["restart_windows"]:
        out.append("TorchServe was killed and not restarted")
    if outcomes["online_reloads"] < 1:
        out.append("the wiped online store was never reloaded")
    if outcomes["writer_errors_seen"] < 1:
        out.append("the log writer never saw its disk fail (fault not injected?)")
    if outcomes["served_at_end"] is None:
        out.append("nothing served at the end")
    if report["flat"]:
        for store, s in report["flat"]["stores"].items():
            if not s["flat"]:
                out.append(f"{store} grew after the retention window: {s}")
        if not report["flat"]["monitoring_seconds"]["flat"]:
            out.append(f"monitoring run time grew: {report['flat']['monitoring_seconds']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--speed", type=float, default=720.0)
    parser.add_argument("--retain-days", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "soak-results")
    parser.add_argument("--short", action="store_true", help="no flatness checks")
    args = parser.parse_args()
    config = SoakConfig(
        days=args.days, speed=args.speed, retain_days=args.retain_days, check_flat=not args.short
    )
    report = Soak(config, args.out).run()
    problems = failures(report, config)
    print(json.dumps({k: report[k] for k in ("requests", "fault_outcomes", "flat")}, indent=2))
    for problem in problems:
        print("FAILED:", problem)
    print(f"report: {args.out / 'report.json'}, plot: {args.out / 'soak.png'}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
