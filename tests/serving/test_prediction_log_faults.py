"""The prediction log survives what a month brings: torn lines and a disk that fails for a while."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

import pytest

from serving import prediction_log
from serving.monitoring import compact
from serving.prediction_log import (
    PredictionLog,
    ReadStats,
    closed_files,
    file_records,
    json_line,
    read_records,
    writer_health,
)


def test_torn_lines_are_skipped_and_counted_not_fatal(tmp_path: Path) -> None:
    whole = [json_line({"i": i}) for i in range(4)]
    (tmp_path / "20260101T000000000000Z-p-1-000001.jsonl").write_bytes(
        whole[0]
        + whole[1][:5]  # a write cut short by a full disk, the next record appended to it
        + whole[2]
        + b'{"note": "Z\xc3'  # killed mid-write, inside a UTF-8 character, no newline
    )
    (tmp_path / "20260101T000001000000Z-p-1-000002.jsonl").write_bytes(whole[3] + b"42\n")
    stats = ReadStats()

    records = list(read_records(tmp_path, stats))

    assert [r["i"] for r in records] == [0, 3]
    assert stats.torn_lines == 3 and stats.files_with_torn_lines == 2
    assert stats.records == 2
    single = ReadStats()
    assert [r["i"] for r in file_records(closed_files(tmp_path)[0], single)] == [0]
    assert single.torn_lines == 2


def test_compaction_reads_past_a_torn_line(tmp_path: Path) -> None:
    """Monitoring's compaction (and deployment replay) read the log through these readers."""
    logs = tmp_path / "logs"
    with PredictionLog(logs, max_file_age_s=0.0) as log:
        for _ in range(5):
            log.log({"logged_at": "2026-12-01T00:00:00+00:00", "status": 400})
    with open(closed_files(logs)[-1], "ab") as fh:
        fh.write(b'{"logged_at": "2026-12-01T00:0')  # the worker was killed mid-write
    assert compact(logs, tmp_path / "compacted").rows == 5


class _FlakyDisk:
    """``open`` for the log module whose files fail (ENOSPC on write, EIO on open) while
    ``failing`` is set, as a full or broken disk would."""

    def __init__(self) -> None:
        self.failing = False

    def open(self, path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if "r" in mode:
            return fh
        if self.failing:
            fh.close()
            raise OSError(errno.EIO, "Input/output error", str(path))
        return _FlakyFile(fh, self)


class _FlakyFile:
    def __init__(self, fh, disk: _FlakyDisk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, data: bytes) -> int:
        if self._disk.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._fh.write(data)

    def flush(self) -> None:
        if self._disk.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._fh.flush()

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _until(probe, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_the_writer_alerts_on_io_errors_and_resumes_when_the_disk_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = _FlakyDisk()
    monkeypatch.setattr(prediction_log, "open", disk.open, raising=False)
    log = PredictionLog(tmp_path, max_file_age_s=0.2).start()
    for i in range(10):
        log.log({"i": i})
    _until(lambda: log.written == 10, "the first records are written")
    assert log.healthy

    disk.failing = True
    with caplog.at_level(logging.ERROR, logger=prediction_log.__name__):
        for i in range(10, 30):
            log.log({"i": i})
            time.sleep(0.01)  # some fail on write, some on opening the next file
        _until(lambda: log.written + log.dropped == 30, "failed records are counted")
    assert not log.healthy and log.errors >= 1 and log.dropped >= 20
    assert any("prediction log" in r.getMessage() for r in caplog.records)
    disk.failing = False

    for i in range(30, 40):
        log.log({"i": i})
    _until(lambda: log.written + log.dropped == 40, "writing resumes")
    log.close()
    assert log.healthy
    kept = [r["i"] for r in read_records(tmp_path)]
    assert kept[:10] == list(range(10)) and kept[-10:] == list(range(30, 40))
    assert len(kept) + log.dropped == 40
    # The health file (for monitoring, in another process) tells once the disk works again.
    health = writer_health(tmp_path)
    assert health and health[0]["dropped"] == log.dropped and health[0]["errors"] == log.errors
    assert not list(tmp_path.glob(".*.open"))
