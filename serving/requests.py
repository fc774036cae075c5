"""What a scoring request may contain, checked field by field before any lookup or model call.

A request body is one object or a non-empty list of them. The fields, their types, ranges and
vocabularies are the use case's ``request`` declaration (``core.usecase``); ``RequestSchema``
is generated from it. Every field is required, typed and range-checked; unknown fields are
refused too, so a misspelt field name is an error rather than a silent default. A validated
request is a dict of its fields in declaration order, numbers as floats and the timestamp as a
UTC ``datetime``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from core.usecase import UseCase, active

MAX_ID_LENGTH = 64
MAX_SHOWN = 80  # characters of a bad value quoted back in a reason
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_CLOCK_SKEW = timedelta(days=1)
_ID_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9_.:\-]{{0,{MAX_ID_LENGTH - 1}}}"
_ID = re.compile(_ID_PATTERN)
_FLAT = {str, int, bool, type(None)}
_INT64 = float(2**63)

Record = dict[str, Any]


class RequestError(ValueError):
    """A request that cannot be scored; ``status`` is the HTTP status it earns (400 or 413)."""

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        index: int | None = None,
        status: int = 400,
        error: str = "invalid_request",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.index = index
        self.status = status
        self.error = error

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "reason": self.reason}
        if self.field is not None:
            body["field"] = self.field
        if self.index is not None:
            body["index"] = self.index
        return body


def decode_body(body: Any, *, max_bytes: int) -> Any:
    """Raw request body (bytes, text or already-decoded JSON) -> a Python value."""
    if isinstance(body, bytes | bytearray):
        if len(body) > max_bytes:
            raise RequestError(
                f"request body is {len(body)} bytes; the limit is {max_bytes}",
                status=413,
                error="payload_too_large",
            )
        value = _fast_loads(body)
        if value is not None:
            return value
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"request body is not UTF-8: {exc}", error="invalid_json") from exc
    if isinstance(body, str):
        if len(body.encode("utf-8")) > max_bytes:
            raise RequestError(
                f"request body exceeds the limit of {max_bytes} bytes",
                status=413,
                error="payload_too_large",
            )
        if not body.strip():
            raise RequestError("request body is empty", error="invalid_json")
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as exc:
            raise RequestError(
                f"request body is not valid JSON: {exc}", error="invalid_json"
            ) from exc
        except RecursionError as exc:  # "[[[[..." within the size limit
            raise RequestError("request body is nested too deeply", error="invalid_json") from exc
    if body is None:
        raise RequestError("request body is empty", error="invalid_json")
    return body


def _fast_loads(body: bytes | bytearray) -> Any:
    """The body as ``json.loads`` would read it, through orjson (a seventh of its time), when
    that is certain to be the same value: a transaction object or a list of them with only
    scalar fields. None otherwise (invalid JSON included): the ``json`` path then decides,
    with its own reasons for a refusal. orjson reads an integer beyond 64 bits as a float where
    ``json`` keeps an int, so a float that large also goes the ``json`` way."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    for item in value if type(value) is list else (value,):
        if type(item) is not dict:
            return None
        for v in item.values():
            t = type(v)
            if t is float:
                if not -_INT64 < v < _INT64:
                    return None
            elif t not in _FLAT:
                return None
    return value


class RequestSchema:
    """The request rules of one use case, compiled for the serving worker's every request:
    the field names in order, which are ids, numbers (with their ranges) and categories (with
    their vocabularies), and which one is the time."""

    def __init__(self, uc: UseCase) -> None:
        declared = uc.request.fields
        self.fields: tuple[str, ...] = tuple(declared)
        self.id_field = uc.request.id
        self.time_field = uc.timestamp_field
        self.ids = tuple(n for n, f in declared.items() if f.type == "id")
        # min and max are present on every number field, vocabularies declared: load checks it.
        self.numbers: dict[str, tuple[float, float]] = {
            n: (float(f.min or 0.0), float(f.max or 0.0))
            for n, f in declared.items()
            if f.type == "number"
        }
        self.categories: dict[str, tuple[str, ...]] = {
            n: uc.vocabularies[f.vocabulary or ""]
            for n, f in declared.items()
            if f.type == "category"
        }
        self.columns = {n: f.column_name(n) for n, f in declared.items()}  # field -> column
        self._field_set = frozenset(self.fields)
        self._category_sets = {n: frozenset(v) for n, v in self.categories.items()}
        # The quick check matches every id at once, joined by a newline (which no id may hold).
        self._all_ids = re.compile("\n".join([_ID_PATTERN] * len(self.ids)))

    def parse(
        self, body: Any, *, max_bytes: int, max_items: int, now: datetime | None = None
    ) -> tuple[list[Record], bool]:
        """Validated requests and whether the body was a single object (not a list)."""
        value = decode_body(body, max_bytes=max_bytes)
        if isinstance(value, dict):
            return [self.validate(value, now=now)], True
        if isinstance(value, list):
            if not value:
                raise RequestError("request list is empty")
            if len(value) > max_items:
                raise RequestError(
                    f"request holds {len(value)} items; the limit is {max_items}",
                    status=413,
                    error="payload_too_large",
                )
            return [self.validate(v, index=i, now=now) for i, v in enumerate(value)], False
        raise RequestError(
            f"request must be a JSON object or a list of objects, got {type(value).__name__}"
        )

    def validate(
        self, item: Any, *, index: int | None = None, now: datetime | None = None
    ) -> Record:
        """One request object -> its Record, or RequestError naming the first bad field."""
        valid = self.quick(item, now)
        return valid if valid is not None else self.checked(item, index, now)

    def checked(self, item: Any, index: int | None, now: datetime | None) -> Record:
        """``validate`` field by field: the first bad field's reason, or the Record of a
        request the quick check did not take."""
        if not isinstance(item, dict):
            raise RequestError(
                f"a request item must be a JSON object, got {type(item).__name__}", index=index
            )
        if item.keys() != self._field_set:
            missing = [f for f in self.fields if f not in item]
            if missing:
                raise RequestError(f"missing field(s) {missing}", field=missing[0], index=index)
            unknown = sorted(set(item) - self._field_set)
            names = ", ".join(_shown(name) for name in unknown[:8])
            raise RequestError(
                f"unknown field(s) [{names}]", field=unknown[0][:MAX_SHOWN], index=index
            )
        out: Record = {}
        for name in self.fields:
            if name in self.numbers:
                out[name] = _number(item, name, self.numbers[name], index)
            elif name in self.categories:
                out[name] = _choice(item, name, self.categories[name], index)
            elif name == self.time_field:
                out[name] = parse_timestamp(item[name], index=index, now=now, field=name)
            else:
                out[name] = _identifier(item, name, index)
        return out

    def quick(self, item: Any, now: datetime | None) -> Record | None:
        """The Record of a well-formed request object in a few checks (the serving worker's
        every request); None for anything else, which ``checked`` then refuses with a reason
        (or accepts: text timestamps only here). The same rules, and a test holds the two to
        the same verdicts."""
        if type(item) is not dict or item.keys() != self._field_set:
            return None
        ids = [item[n] for n in self.ids]
        for value in ids:
            if type(value) is not str:
                return None
        if not self._all_ids.fullmatch("\n".join(ids)):
            return None
        out = {name: item[name] for name in self.fields}
        for name, (low, high) in self.numbers.items():
            value = item[name]
            if not ((type(value) is float or type(value) is int) and low <= value <= high):
                return None  # False for NaN
            out[name] = float(value)
        for name, allowed in self._category_sets.items():
            value = item[name]
            if type(value) is not str or value not in allowed:
                return None
        stamp = item[self.time_field]
        if type(stamp) is not str:
            return None
        try:
            ts = datetime.fromisoformat(stamp)
        except ValueError:
            return None
        if ts.tzinfo is None:
            return None
        try:
            ts = ts.astimezone(UTC)
        except OverflowError:  # year 1 or 9999 pushed past the calendar by its offset
            return None
        if not EARLIEST <= ts <= (now or datetime.now(UTC)) + MAX_CLOCK_SKEW:
            return None
        out[self.time_field] = ts
        return out

    def frame(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The request fields of a frame of the request dataset, in field order (a field named
        apart from its column, such as ``timestamp`` for ``event_timestamp``, renamed). A
        missing field raises ``RequestError`` naming it."""
        present = frame.columns
        frame = frame.rename(
            {c: n for n, c in self.columns.items() if c != n and c in present and n not in present}
        )
        missing = [c for c in self.fields if c not in frame.columns]
        if missing:
            raise RequestError(f"batch frame lacks column(s) {missing}", field=missing[0])
        return frame.select(self.fields)

    def bodies(self, frame: pl.DataFrame) -> list[dict]:
        """JSON-ready scoring requests of a frame of the request dataset (timestamps as
        ISO-8601 UTC text), as a client would send them to ``/predictions``."""
        frame = self.frame(frame)
        stamp = pl.col(self.time_field).cast(pl.Datetime("us", "UTC"))
        return frame.with_columns(stamp.dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")).to_dicts()


_COMPILED: dict[Path, tuple[UseCase, RequestSchema]] = {}


def request_schema(uc: UseCase | None = None) -> RequestSchema:
    """The request rules of ``uc``, the active use case by default (built once per use case)."""
    uc = uc or active()
    known = _COMPILED.get(uc.root)
    if known is None or known[0] is not uc:
        known = _COMPILED[uc.root] = (uc, RequestSchema(uc))
    return known[1]


def parse_request(
    body: Any, *, max_bytes: int, max_items: int, now: datetime | None = None
) -> tuple[list[Record], bool]:
    """``RequestSchema.parse`` with the active use case's rules."""
    return request_schema().parse(body, max_bytes=max_bytes, max_items=max_items, now=now)


def validate_request(item: Any, *, index: int | None = None, now: datetime | None = None) -> Record:
    """``RequestSchema.validate`` with the active use case's rules."""
    return request_schema().validate(item, index=index, now=now)


def request_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """``RequestSchema.frame`` with the active use case's rules."""
    return request_schema().frame(frame)


def request_bodies(frame: pl.DataFrame) -> list[dict]:
    """``RequestSchema.bodies`` with the active use case's rules."""
    return request_schema().bodies(frame)


def request_ids(records: Sequence[Record]) -> list[str]:
    """The id field of each validated request."""
    name = request_schema().id_field
    return [r[name] for r in records]


def parse_timestamp(
    value: Any, *, index: int | None = None, now: datetime | None = None, field: str = "timestamp"
) -> datetime:
    """ISO-8601 text with a UTC offset, or epoch seconds; not before 2000 nor a day ahead."""
    if isinstance(value, bool):
        raise RequestError(
            f"{field} must be ISO-8601 text or epoch seconds", field=field, index=index
        )
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{field} must be finite", field=field, index=index)
        try:  # an int too large for a float overflows here too
            ts = datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise RequestError(
                f"{field} {_shown(value)} is out of range", field=field, index=index
            ) from exc
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RequestError(
                f"{field} {_shown(value)} is not ISO-8601", field=field, index=index
            ) from exc
        if ts.tzinfo is None:
            raise RequestError(
                f"{field} {_shown(value)} has no UTC offset (add 'Z' or '+00:00')",
                field=field,
                index=index,
            )
        try:
            ts = ts.astimezone(UTC)
        except OverflowError as exc:  # year 1 or 9999 pushed past the calendar by its offset
            raise RequestError(
                f"{field} {_shown(value)} is out of range", field=field, index=index
            ) from exc
    else:
        raise RequestError(
            f"{field} must be ISO-8601 text or epoch seconds, got {type(value).__name__}",
            field=field,
            index=index,
        )
    latest = (now or datetime.now(UTC)) + MAX_CLOCK_SKEW
    if not EARLIEST <= ts <= latest:
        raise RequestError(
            f"{field} {ts.isoformat()} is outside [{EARLIEST.date()}, now + 1 day]",
            field=field,
            index=index,
        )
    return ts


def _identifier(item: dict[str, Any], name: str, index: int | None) -> str:
    value = item[name]
    if not isinstance(value, str):
        raise RequestError(
            f"{name} must be a string, got {type(value).__name__}", field=name, index=index
        )
    if not _ID.fullmatch(value):
        raise RequestError(
            f"{name} must be 1-{MAX_ID_LENGTH} characters of letters, digits, '_.:-'",
            field=name,
            index=index,
        )
    return value


def _number(
    item: dict[str, Any], name: str, bounds: tuple[float, float], index: int | None
) -> float:
    value = item[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(
            f"{name} must be a number, got {type(value).__name__}", field=name, index=index
        )
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    low, high = bounds
    if not math.isfinite(number) or not low <= number <= high:
        raise RequestError(
            f"{name} {_shown(value)} is outside [{low}, {high}]", field=name, index=index
        )
    return number


def _choice(item: dict[str, Any], name: str, allowed: tuple[str, ...], index: int | None) -> str:
    value = item[name]
    if not isinstance(value, str):
        raise RequestError(
            f"{name} must be a string, got {type(value).__name__}", field=name, index=index
        )
    if value not in allowed:
        shown = list(allowed) if len(allowed) <= 5 else f"one of {len(allowed)} codes"
        raise RequestError(
            f"{name} {_shown(value)} is not allowed ({shown})", field=name, index=index
        )
    return value


def _shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """A client's value as quoted in a reason: its repr, cut short. Echoing a huge field whole
    made TorchServe drop the connection instead of answering."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else "<huge int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")
