"""What a scoring request may contain, checked field by field before any lookup or model call.

A request body is one transaction object or a non-empty list of them. Every field is required,
typed and range-checked against the canonical vocabularies in ``quality/schema.py``; unknown
fields are refused too, so a misspelt field name is an error rather than a silent default.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl

from quality.schema import AMOUNT_MAX, AMOUNT_MIN, CHANNELS, COUNTRIES

FIELDS = ("transaction_id", "card_id", "merchant_id", "amount", "channel", "country", "timestamp")
_FIELD_SET = frozenset(FIELDS)
MAX_ID_LENGTH = 64
MAX_SHOWN = 80  # characters of a bad value quoted back in a reason
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
MAX_CLOCK_SKEW = timedelta(days=1)
# An id, its length included; the quick check matches the three at once, joined by a newline
# (which no id may hold).
_ID_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9_.:\-]{{0,{MAX_ID_LENGTH - 1}}}"
_ID = re.compile(_ID_PATTERN)
_THREE_IDS = re.compile(rf"{_ID_PATTERN}\n{_ID_PATTERN}\n{_ID_PATTERN}")
_CHANNEL_SET, _COUNTRY_SET = frozenset(CHANNELS), frozenset(COUNTRIES)
_FLAT = {str, int, bool, type(None)}
_INT64 = float(2**63)


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


@dataclass(frozen=True)
class Transaction:
    """One validated transaction, as the scorer consumes it (timestamp in UTC)."""

    transaction_id: str
    card_id: str
    merchant_id: str
    amount: float
    channel: str
    country: str
    timestamp: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "transaction_id": self.transaction_id,
            "card_id": self.card_id,
            "merchant_id": self.merchant_id,
            "amount": self.amount,
            "channel": self.channel,
            "country": self.country,
            "timestamp": self.timestamp.isoformat(),
        }


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


def parse_request(
    body: Any, *, max_bytes: int, max_items: int, now: datetime | None = None
) -> tuple[list[Transaction], bool]:
    """Validated transactions and whether the body was a single object (not a list)."""
    value = decode_body(body, max_bytes=max_bytes)
    if isinstance(value, dict):
        return [validate_transaction(value, now=now)], True
    if isinstance(value, list):
        if not value:
            raise RequestError("request list is empty")
        if len(value) > max_items:
            raise RequestError(
                f"request holds {len(value)} transactions; the limit is {max_items}",
                status=413,
                error="payload_too_large",
            )
        return [validate_transaction(v, index=i, now=now) for i, v in enumerate(value)], False
    raise RequestError(
        f"request must be a JSON object or a list of objects, got {type(value).__name__}"
    )


def validate_transaction(
    item: Any, *, index: int | None = None, now: datetime | None = None
) -> Transaction:
    """One request object -> Transaction, or RequestError naming the first bad field."""
    valid = _valid_transaction(item, now)
    return valid if valid is not None else _checked_transaction(item, index, now)


def _checked_transaction(item: Any, index: int | None, now: datetime | None) -> Transaction:
    """``validate_transaction`` field by field: the first bad field's reason, or the
    Transaction of a request the quick check did not take."""
    if not isinstance(item, dict):
        raise RequestError(
            f"a transaction must be a JSON object, got {type(item).__name__}", index=index
        )
    if item.keys() != _FIELD_SET:
        missing = [f for f in FIELDS if f not in item]
        if missing:
            raise RequestError(f"missing field(s) {missing}", field=missing[0], index=index)
        unknown = sorted(set(item) - _FIELD_SET)
        names = ", ".join(_shown(name) for name in unknown[:8])
        raise RequestError(f"unknown field(s) [{names}]", field=unknown[0][:MAX_SHOWN], index=index)
    return Transaction(
        transaction_id=_identifier(item, "transaction_id", index),
        card_id=_identifier(item, "card_id", index),
        merchant_id=_identifier(item, "merchant_id", index),
        amount=_amount(item["amount"], index),
        channel=_choice(item, "channel", CHANNELS, index),
        country=_choice(item, "country", COUNTRIES, index),
        timestamp=parse_timestamp(item["timestamp"], index=index, now=now),
    )


def _valid_transaction(item: Any, now: datetime | None) -> Transaction | None:
    """The Transaction of a well-formed request object in a few checks (the serving worker's
    every request); None for anything else, which ``validate_transaction``'s field-by-field
    checks then refuse with a reason (or accept: text timestamps only here). The same rules,
    and a test holds the two to the same verdicts."""
    if type(item) is not dict or item.keys() != _FIELD_SET:
        return None
    tid, card, merchant = item["transaction_id"], item["card_id"], item["merchant_id"]
    amount, channel, country = item["amount"], item["channel"], item["country"]
    stamp = item["timestamp"]
    if not (
        type(tid) is str
        and type(card) is str
        and type(merchant) is str
        and (type(amount) is float or type(amount) is int)
        and AMOUNT_MIN <= amount <= AMOUNT_MAX  # False for NaN
        and type(channel) is str
        and channel in _CHANNEL_SET
        and type(country) is str
        and country in _COUNTRY_SET
        and type(stamp) is str
        and _THREE_IDS.fullmatch(f"{tid}\n{card}\n{merchant}")
    ):
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
    return Transaction(tid, card, merchant, float(amount), channel, country, ts)


def parse_timestamp(
    value: Any, *, index: int | None = None, now: datetime | None = None
) -> datetime:
    """ISO-8601 text with a UTC offset, or epoch seconds; not before 2000 nor a day ahead."""
    if isinstance(value, bool):
        raise RequestError(
            "timestamp must be ISO-8601 text or epoch seconds", field="timestamp", index=index
        )
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError("timestamp must be finite", field="timestamp", index=index)
        try:  # an int too large for a float overflows here too
            ts = datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise RequestError(
                f"timestamp {_shown(value)} is out of range", field="timestamp", index=index
            ) from exc
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RequestError(
                f"timestamp {_shown(value)} is not ISO-8601", field="timestamp", index=index
            ) from exc
        if ts.tzinfo is None:
            raise RequestError(
                f"timestamp {_shown(value)} has no UTC offset (add 'Z' or '+00:00')",
                field="timestamp",
                index=index,
            )
        try:
            ts = ts.astimezone(UTC)
        except OverflowError as exc:  # year 1 or 9999 pushed past the calendar by its offset
            raise RequestError(
                f"timestamp {_shown(value)} is out of range", field="timestamp", index=index
            ) from exc
    else:
        raise RequestError(
            f"timestamp must be ISO-8601 text or epoch seconds, got {type(value).__name__}",
            field="timestamp",
            index=index,
        )
    latest = (now or datetime.now(UTC)) + MAX_CLOCK_SKEW
    if not EARLIEST <= ts <= latest:
        raise RequestError(
            f"timestamp {ts.isoformat()} is outside [{EARLIEST.date()}, now + 1 day]",
            field="timestamp",
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


def _amount(value: Any, index: int | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(
            f"amount must be a number, got {type(value).__name__}", field="amount", index=index
        )
    try:
        amount = float(value)
    except OverflowError:  # an integer beyond any float
        amount = math.inf
    if not math.isfinite(amount) or not AMOUNT_MIN <= amount <= AMOUNT_MAX:
        raise RequestError(
            f"amount {_shown(value)} is outside [{AMOUNT_MIN}, {AMOUNT_MAX}]",
            field="amount",
            index=index,
        )
    return amount


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


def request_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The request fields of a transactions frame, in ``FIELDS`` order; ``event_timestamp``
    (the transactions dataset's name) stands for ``timestamp``. A missing field raises
    ``RequestError`` naming it."""
    if "timestamp" not in frame.columns and "event_timestamp" in frame.columns:
        frame = frame.rename({"event_timestamp": "timestamp"})
    missing = [c for c in FIELDS if c not in frame.columns]
    if missing:
        raise RequestError(f"batch frame lacks column(s) {missing}", field=missing[0])
    return frame.select(FIELDS)


def request_bodies(frame: pl.DataFrame) -> list[dict]:
    """JSON-ready scoring requests of a transactions frame (timestamps as ISO-8601 UTC text),
    as a client would send them to ``/predictions``."""
    frame = request_frame(frame)
    stamp = pl.col("timestamp").cast(pl.Datetime("us", "UTC"))
    return frame.with_columns(stamp.dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ")).to_dicts()
