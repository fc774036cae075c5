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
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import orjson

from core.jsonutil import json_safe

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
ROWS = "rows"
OPEN_SUFFIX = ".jsonl.open"
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

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._rotate_if_due()
                continue
            if item is _STOP:
                self._finish()
                return
            try:
                self._write_all(item)
                while True:  # drain what is already queued, then flush once
                    item = self._queue.get_nowait()
                    if item is _STOP:
                        self._finish()
                        return
                    self._write_all(item)
            except queue.Empty:
                pass
            except Exception:  # a logging failure must never take the worker down
                logger.exception("prediction log write failed")
            if self._file is not None:
                self._file.flush()
            self._rotate_if_due()

    def _write_all(self, item: Sequence[Mapping[str, Any]] | _Batch) -> None:
        try:
            if isinstance(item, _Batch):
                self._write(batch_line(item.shared, item.rows), item.n)
            else:
                for record in item:
                    self._write(json_line(record))
        finally:
            with self._lock:
                self._queued -= item.n if isinstance(item, _Batch) else len(item)

    def _write(self, line: bytes, records: int = 1) -> None:
        if self._file is None:
            self._open()
        assert self._file is not None
        self._file.write(line)
        self._size += len(line)
        self.written += records
        if self._size >= self.max_file_bytes:
            self._close_current()
            enforce_bound(self.directory, self.max_total_bytes)

    def _open(self) -> None:
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

    def _close_current(self) -> None:
        if self._file is None or self._path is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        _publish(self._path)
        self._file, self._path = None, None

    def _finish(self) -> None:
        self._close_current()
        enforce_bound(self.directory, self.max_total_bytes)


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


def file_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of one log file, in order."""
    with open(path, encoding="utf-8") as fh:
        for text in fh:
            if text.strip():
                yield from records_of(json.loads(text))


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


def read_records(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of the closed files, oldest file first."""
    for path in closed_files(directory):
        yield from file_records(path)
