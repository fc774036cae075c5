"""`loopline status` costs what is new: it reads monitoring's span index and its newest
compacted files, never the prediction log itself, and keeps no copy of it."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from orchestration import cli_loop
from serving import prediction_log
from serving.monitoring import compacted_spans, served_totals
from tests.orchestration.test_monitoring_assets import Home

ROUNDS, PER_ROUND = 4, 300


class Opened:
    """The parquet and log files read while it is installed."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[Path] = []
        read_parquet, scan_parquet = pl.read_parquet, pl.scan_parquet
        records = prediction_log.file_records
        monkeypatch.setattr(pl, "read_parquet", self._spy(read_parquet))
        monkeypatch.setattr(pl, "scan_parquet", self._spy(scan_parquet))
        monkeypatch.setattr(prediction_log, "file_records", self._spy(records))

    def _spy(self, read):
        def spy(source, *args, **kwargs):
            self.paths.append(Path(str(source)))
            return read(source, *args, **kwargs)

        return spy


def _served_in_rounds(tmp_path) -> Home:
    home = Home(tmp_path)
    for seed in range(ROUNDS):
        home.serve(PER_ROUND, seed=seed)
        home.monitor()  # one compacted file per round
    return home


def test_status_reads_monitorings_newest_files_not_the_log(tmp_path, monkeypatch):
    home = _served_in_rounds(tmp_path)
    log_files = len(prediction_log.closed_files(home.log_dir))
    home.serve(50, seed=99)  # closed since monitoring last ran: waiting for it
    legacy = home.settings.monitoring / "status-log"  # the copy older versions kept
    legacy.mkdir()
    (legacy / "predictions-0.parquet").write_bytes(b"x" * 1000)
    opened = Opened(monkeypatch)

    data = cli_loop.summary(home.settings)
    cli_loop.summary(home.settings)

    s = data["serving"]
    assert s["requests"] == ROUNDS * PER_ROUND and s["refused"] == 0
    assert s["by_version"] == {home.champion: ROUNDS * PER_ROUND}
    assert s["latency_p50_ms"] == 2.0 and s["log_files_not_compacted"] == 1
    assert data["availability"]["requests"] == ROUNDS * PER_ROUND  # monitoring's last window
    assert not [p for p in opened.paths if p.parent == home.log_dir], "no log file read"
    assert len(prediction_log.closed_files(home.log_dir)) == log_files + 1
    assert not legacy.exists()


def test_latency_reads_the_newest_compacted_files_only(tmp_path, monkeypatch):
    home = _served_in_rounds(tmp_path)
    spans = compacted_spans(home.settings.monitoring / "log")
    assert len(spans) == ROUNDS
    opened = Opened(monkeypatch)

    totals = served_totals(spans, latest_rows=PER_ROUND)

    assert len(opened.paths) == 1  # one file holds the newest PER_ROUND requests
    assert totals["latency_answers"] == PER_ROUND and totals["requests"] == ROUNDS * PER_ROUND
