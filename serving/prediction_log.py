"""The prediction log: every scored (or refused) transaction as one JSON line, for monitoring.

Layout (``<home>/predictions/<model name>/``):

    .<opened>-<prefix>-<pid>-<seq>.jsonl.open   being written by one worker (hidden)
    <opened>-<prefix>-<pid>-<seq>.jsonl         closed, complete, never written again

A worker's file is closed (renamed) when it reaches ``max_file_bytes`` or is
``max_file_age_s`` old, so readers only ever see complete files, at most that old. After each
rotation the oldest closed files are deleted until the directory holds at most
``max_total_bytes``. Files left open by a worker that died are closed by the next one.

Writes happen on a background thread fed by a queue bounded in records: ``log``,
``log_many`` and ``log_rows`` never block the request; what does not fit is dropped and
counted (``dropped``). A batch's records go in as one item: one wake-up of the writer per batch.

An I/O error (a full or failing disk) never stops the writer: it logs an error, counts the
records it lost in ``dropped`` and the error in ``errors``, turns ``healthy`` false, abandons the
file it was writing (published as it stands) and tries a new file with the next records, so
writing resumes by itself once the disk works. Each writer keeps its counters in a small health
file (``.health-<prefix>-<pid>.json``) for other processes (``writer_health``).

Readers skip a torn line (cut short by a full disk or a kill mid-write) and count it
(``ReadStats``): one bad line costs its own records, never the file's.

A line is one record, or a batch of records in columns (``log_rows``, the handler's scored
batches): ``{<fields every row shares>, "rows": {<field>: [one value per row], ...}}``, where a
field of ``rows`` may itself be such a mapping of columns (a nested object per row). Readers
(``file_records``, ``read_records``) give one record per row either way. Columns cost the
serving worker one list per field instead of a dict per row and one ``orjson`` call per batch.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import orjson

from core.jsonutil import json_safe
from core.storage import write_json_atomic

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
ROWS = "rows"
OPEN_SUFFIX = ".jsonl.open"
HEALTH_PREFIX = ".health-"
_STOP = object()


class PredictionLog:
    """Appends JSON lines from any thread; one writer thread owns the file."""

    def __init__(
        self,
        directory: str | Path,
        *,
        prefix: str = "predictions",
        max_file_bytes: int = 16 << 20,
        max_file_age_s: float = 30.0,
        max_total_bytes: int = 512 << 20,
        queue_size: int = 10_000,
    ) -> None:
        if max_file_bytes <= 0 or max_total_bytes < max_file_bytes:
            raise ValueError("need 0 < max_file_bytes <= max_total_bytes")
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self.max_file_age_s = max_file_age_s
        self.max_total_bytes = max_total_bytes
        self.queue_size = queue_size
        self.dropped = 0
        self.written = 0
        self.errors = 0
        self.last_error: str | None = None
        self._failing = False
        self._pending = 0  # records written since the last successful flush
        self._unwritten = 0  # records of the item being written not written yet
        self._stranded: list[Path] = []  # finished files an error kept from being published
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued = 0  # records in the queue, under _lock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._seq = 0

    def start(self) -> PredictionLog:
        if self._thread is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            close_orphans(self.directory)
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
        return self

    def log(self, record: Mapping[str, Any]) -> bool:
        """Queues one record; False (and counted in ``dropped``) when the queue is full."""
        return self.log_many([record]) == 1

    def log_many(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Queues records as one item, as many as the queue has room for; returns how many
        (the rest are counted in ``dropped``)."""
        taken = self._reserve(len(records), whole=False)
        if taken:
            self._queue.put(records[:taken] if taken < len(records) else records)
        return taken

    def log_rows(self, shared: Mapping[str, Any], rows: Mapping[str, Any], n: int) -> bool:
        """Queues ``n`` records given as columns (see the module's docstring) with the fields
        they share, written as one line; all or none: False (and ``n`` counted in
        ``dropped``) when the queue lacks room for them. The columns are read on the writer's
        thread: the caller must not change them afterwards."""
        if not self._reserve(n, whole=True):
            return False
        self._queue.put(_Batch(shared, rows, n))
        return True

    def _reserve(self, n: int, *, whole: bool) -> int:
        """Room in the queue for up to ``n`` records (all of them or none if ``whole``); the
        rest are counted as dropped, with a warning at 1, 10, 100 and every 1,000 drops."""
        with self._lock:
            room = max(0, self.queue_size - self._queued)
            taken = (n if n <= room else 0) if whole else min(n, room)
            self._queued += taken
            before = self.dropped
            self.dropped = after = before + n - taken
        if any(before < m <= after for m in (1, 10, 100)) or after // 1000 > before // 1000:
            logger.warning("prediction log queue full: %d records dropped", after)
        return taken

    def close(self, timeout: float = 10.0) -> None:
        """Drains the queue, closes the current file under its final name."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> PredictionLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        """False from an I/O error until records are written again."""
        return not self._failing

    @property
    def health_path(self) -> Path:
        return self.directory / f"{HEALTH_PREFIX}{self.prefix}-{os.getpid()}.json"

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._guarded(self._rotate_if_due)
                continue
            while item is not _STOP:
                self._guarded(self._write_all, item)
                try:  # drain what is already queued, then flush once
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._guarded(self._flush)
            self._guarded(self._rotate_if_due)
            if item is _STOP:
                self._guarded(self._finish)
                return

    def _guarded(self, step: Any, *args: Any) -> None:
        """Runs one writer step; an error is alerted and counted, never raised: the writer
        thread must outlive a full disk."""
        self._unwritten = 0
        try:
            step(*args)
        except OSError as exc:
            self._io_failed(exc)
        except Exception:  # a logging bug must never take the worker down
            logger.exception("prediction log write failed")
            with self._lock:
                self.dropped += self._unwritten

    def _io_failed(self, exc: OSError) -> None:
        lost, self._pending = self._pending + self._unwritten, 0
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.dropped += lost
        if not self._failing or self.errors % 100 == 0:
            logger.error(
                "prediction log in %s cannot write (%s): %d records dropped so far, "
                "%d errors; retrying with the next records",
                self.directory,
                self.last_error,
                self.dropped,
                self.errors,
            )
        starts = not self._failing
        self._failing = True
        self._abandon_file()
        if starts:
            self._write_health()

    def _abandon_file(self) -> None:
        """Gives up the file an error hit: its complete lines stay readable (a torn last line
        is skipped by readers) once it is published, now or at the next rotation."""
        fh, path = self._file, self._path
        self._file, self._path = None, None
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:  # its unflushed bytes are already counted as dropped
                logger.warning("closing %s after an error failed too: %s", path, exc)
        if path is not None:
            self._stranded.append(path)
        self._publish_stranded()

    def _publish_stranded(self) -> None:
        for path in list(self._stranded):
            try:
                if path.exists() and path.stat().st_size > 0:
                    _publish(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:  # while the disk fails, its error was logged already
                log = logger.debug if self._failing else logger.warning
                log("cannot publish %s yet: %s", path, exc)
                return
            self._stranded.remove(path)

    def _flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        self.written += self._pending
        self._pending = 0
        if self._failing:
            self._failing = False
            logger.warning(
                "prediction log in %s writes again (%d records dropped, %d errors so far)",
                self.directory,
                self.dropped,
                self.errors,
            )
            self._write_health()

    def _write_health(self) -> None:
        """The writer's counters for other processes; on a failing disk this may fail too
        (logged): the file then tells once the disk works again."""
        health = {
            "pid": os.getpid(),
            "prefix": self.prefix,
            "healthy": self.healthy,
            "written": self.written,
            "dropped": self.dropped,
            "errors": self.errors,
            "last_error": self.last_error,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        try:
            write_json_atomic(health, self.health_path)
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.health_path, exc)

    def _write_all(self, item: Sequence[Mapping[str, Any]] | _Batch) -> None:
        batch = isinstance(item, _Batch)
        self._unwritten = item.n if batch else len(item)
        try:
            if batch:
                self._write(batch_line(item.shared, item.rows), item.n)
            else:
                for record in item:
                    self._write(json_line(record))
        finally:
            with self._lock:
                self._queued -= item.n if batch else len(item)

    def _write(self, line: bytes, records: int = 1) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None
        self._file.write(line)
        self._size += len(line)
        self._pending += records
        self._unwritten -= records
        if self._size >= self.max_file_bytes:
            self._close_current()
            enforce_bound(self.directory, self.max_total_bytes)

    def _open(self) -> None:
        self._publish_stranded()
        self._seq += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{self.prefix}-{os.getpid()}-{self._seq:06d}"
        self._path = self.directory / f".{name}{OPEN_SUFFIX}"
        self._file = open(self._path, "wb")  # noqa: SIM115 (owned by the thread)
        self._opened_at = time.monotonic()
        self._size = 0

    def _rotate_if_due(self) -> None:
        if self._file is None:
            return
        age = time.monotonic() - self._opened_at
        if self._size >= self.max_file_bytes or age >= self.max_file_age_s:
            self._close_current()
            enforce_bound(self.directory, self.max_total_bytes)
            self._write_health()

    def _close_current(self) -> None:
        if self._file is None or self._path is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.written += self._pending
        self._pending = 0
        path, self._file, self._path = self._path, None, None
        self._stranded.append(path)
        self._publish_stranded()

    def _finish(self) -> None:
        self._close_current()
        self._publish_stranded()
        enforce_bound(self.directory, self.max_total_bytes)
        self._write_health()


# Types orjson would write differently from json_safe (datetimes, dataclasses, subclasses of
# str/int/dict/list) raise instead, like numpy scalars, non-str keys and ints beyond 64 bits.
_ORJSON = (
    orjson.OPT_APPEND_NEWLINE
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def json_line(record: Mapping[str, Any]) -> bytes:
    """One record as a UTF-8 JSON line holding what ``json_safe`` makes of it (NaN and
    infinities null, numpy scalars and datetimes converted). Plain records, as the handler's
    are, go through orjson: a tenth of ``json.dumps``'s time on the worker's one core, the same
    values when read back, but spelt its way (``0.000052`` for ``5.2e-05``, non-ASCII text as
    UTF-8 rather than ``\\u`` escapes). Anything else takes the ``json`` path as before."""
    if type(record) is dict:
        try:
            return orjson.dumps(record, option=_ORJSON)
        except TypeError:  # orjson.JSONEncodeError: a type above, or a lone surrogate
            pass
    line = json.dumps(json_safe(dict(record)), separators=(",", ":"))
    return line.encode("ascii") + b"\n"


class _Batch(NamedTuple):
    shared: Mapping[str, Any]
    rows: Mapping[str, Any]
    n: int


def batch_line(shared: Mapping[str, Any], rows: Mapping[str, Any]) -> bytes:
    """A batch of records in columns as one JSON line (see the module's docstring), through
    orjson: NaN and infinities null, numpy scalars as Python values, dataclasses as objects
    and datetimes as ISO-8601 text, as ``json_safe`` writes them; anything orjson refuses (ints
    beyond 64 bits, non-str keys, lone surrogates) takes the ``json`` path. NumPy arrays are
    written as lists."""
    line = {**shared, ROWS: rows}
    try:
        return orjson.dumps(line, default=_numpy_scalar, option=_ORJSON_BATCH)
    except TypeError:  # orjson.JSONEncodeError
        pass
    text = json.dumps(json_safe(line), separators=(",", ":"))
    return text.encode("ascii") + b"\n"


_ORJSON_BATCH = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY


def _numpy_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def records_of(line: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The records one decoded line holds: itself, or each row of a batch line."""
    rows = line.get(ROWS)
    if not isinstance(rows, Mapping):
        yield dict(line)
        return
    shared = {k: v for k, v in line.items() if k != ROWS}
    for i in range(_height(rows)):
        yield {**shared, **_row(rows, i)}


def _height(rows: Mapping[str, Any]) -> int:
    for column in rows.values():
        return _height(column) if isinstance(column, Mapping) else len(column)
    return 0


def _row(rows: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: _row(v, i) if isinstance(v, Mapping) else v[i] for k, v in rows.items()}


@dataclass
class ReadStats:
    """What the readers met: records given, torn lines skipped (and in how many files).
    A monitoring step passes one in and alerts when ``torn_lines`` is not 0."""

    records: int = 0
    torn_lines: int = 0
    files_with_torn_lines: int = 0


def file_records(path: str | Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every record of one log file, in order. A torn line (not one JSON object of valid
    UTF-8) is skipped with a warning and counted in ``stats``."""
    stats = stats if stats is not None else ReadStats()
    torn = 0
    with open(path, "rb") as fh:
        for number, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                records = list(records_of(line)) if isinstance(line, dict) else None
            except (ValueError, TypeError, IndexError, AttributeError):
                records = None
            if records is None:
                torn += 1
                stats.torn_lines += 1
                stats.files_with_torn_lines += torn == 1
                logger.warning("%s line %d is torn (%d bytes): skipped", path, number, len(text))
                continue
            stats.records += len(records)
            yield from records


def _publish(hidden: Path) -> Path:
    final = hidden.with_name(hidden.name[1 : -len(OPEN_SUFFIX)] + SUFFIX)
    os.replace(hidden, final)
    return final


def close_orphans(directory: Path) -> list[Path]:
    """Publishes open files whose writer process is gone (crashed or killed workers)."""
    published = []
    for path in directory.glob(f".*{OPEN_SUFFIX}"):
        try:
            pid = int(path.name[: -len(OPEN_SUFFIX)].rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid) and path.stat().st_size > 0:
            published.append(_publish(path))
        elif pid != os.getpid() and not _alive(pid):
            path.unlink(missing_ok=True)
    for path in directory.glob(f"{HEALTH_PREFIX}*.json"):
        pid_text = path.name[: -len(".json")].rsplit("-", 1)[-1]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            path.unlink(missing_ok=True)
    return published


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def closed_files(directory: str | Path) -> list[Path]:
    """Complete log files, oldest first (names start with the time they were opened)."""
    return sorted(Path(directory).glob(f"[!.]*{SUFFIX}"))


def enforce_bound(directory: Path, max_total_bytes: int) -> list[Path]:
    """Deletes the oldest closed files until the rest fit in ``max_total_bytes``."""
    files = []
    for path in closed_files(directory):
        try:
            files.append((path, path.stat().st_size))
        except FileNotFoundError:
            continue
    total = sum(size for _, size in files)
    removed = []
    for path, size in files:
        if total <= max_total_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def read_records(directory: str | Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every record of the closed files, oldest file first (torn lines counted in ``stats``)."""
    for path in closed_files(directory):
        yield from file_records(path, stats)


def writer_health(directory: str | Path) -> list[dict[str, Any]]:
    """The health files of the writers of ``directory`` whose process still runs: each with
    ``healthy``, ``written``, ``dropped``, ``errors`` and ``last_error``."""
    found = []
    for path in sorted(Path(directory).glob(f"{HEALTH_PREFIX}*.json")):
        try:
            health = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(health, dict) and _alive(int(health.get("pid", 0))):
            found.append(health)
    return found
