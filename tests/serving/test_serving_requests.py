"""Request validation: every field typed and range-checked; a reason the caller can act on."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import requests as request_rules
from serving.requests import RequestError, decode_body, parse_request
from tests.serving.jsonvalues import typed

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
GOOD = {
    "transaction_id": "tx-1",
    "card_id": "c000001",
    "merchant_id": "m00001",
    "amount": 42.5,
    "channel": "online",
    "country": "US",
    "timestamp": "2026-06-01T11:59:00Z",
}


def parse(body, **kw):
    return parse_request(body, max_bytes=kw.pop("max_bytes", 4096), max_items=4, now=NOW, **kw)


def refusal(body, **kw) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(body, **kw)
    return info.value


def test_one_object_or_a_list_in_bytes_text_or_decoded_form() -> None:
    (tx,), single = parse(json.dumps(GOOD).encode())
    assert (
        single
        and tx["amount"] == 42.5
        and tx["timestamp"] == datetime(2026, 6, 1, 11, 59, tzinfo=UTC)
    )
    txs, single = parse(json.dumps([GOOD, {**GOOD, "transaction_id": "tx-2"}]))
    assert not single and [t["transaction_id"] for t in txs] == ["tx-1", "tx-2"]
    (tx,), _ = parse({**GOOD, "amount": 7, "timestamp": NOW.timestamp() - 60})
    assert tx["amount"] == 7.0 and tx["timestamp"] == datetime(2026, 6, 1, 11, 59, tzinfo=UTC)
    (tx,), _ = parse({**GOOD, "timestamp": "2026-06-01T13:59:00+02:00"})
    assert tx["timestamp"] == datetime(2026, 6, 1, 11, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"amount": "12.5"}, "amount", "must be a number"),
        ({"amount": True}, "amount", "must be a number"),
        ({"amount": 0.0}, "amount", "outside"),
        ({"amount": 1e9}, "amount", "outside"),
        ({"channel": "fax"}, "channel", "not allowed"),
        ({"country": "us"}, "country", "not allowed"),
        ({"country": 840}, "country", "must be a string"),
        ({"card_id": ""}, "card_id", "1-64 characters"),
        ({"card_id": 17}, "card_id", "must be a string"),
        ({"merchant_id": "m 1"}, "merchant_id", "characters"),
        ({"transaction_id": "x" * 65}, "transaction_id", "1-64"),
        ({"timestamp": "yesterday"}, "timestamp", "not ISO-8601"),
        ({"timestamp": "2026-06-01T11:59:00"}, "timestamp", "no UTC offset"),
        ({"timestamp": "1999-12-31T23:59:59Z"}, "timestamp", "outside"),
        ({"timestamp": "2026-06-03T12:00:00Z"}, "timestamp", "outside"),
        ({"timestamp": None}, "timestamp", "ISO-8601 text or epoch"),
        ({"timestamp": "9999-12-31T23:59:59-23:59"}, "timestamp", "out of range"),
        ({"timestamp": "0001-01-01T00:00:00+23:59"}, "timestamp", "out of range"),
        ({"coupon": "X"}, "coupon", "unknown field"),
    ],
)
def test_each_bad_field_is_named_with_a_reason(change, field, words) -> None:
    error = refusal({**GOOD, **change})
    assert error.status == 400 and error.field == field and words in error.reason
    assert json.loads(json.dumps(error.to_dict()))["field"] == field


def test_missing_fields_are_listed() -> None:
    body = {k: v for k, v in GOOD.items() if k not in ("amount", "country")}
    error = refusal(body)
    assert error.field == "amount" and "['amount', 'country']" in error.reason


def test_the_index_of_the_bad_item_in_a_list_is_reported() -> None:
    error = refusal([GOOD, GOOD, {**GOOD, "amount": -1}])
    assert error.index == 2 and error.field == "amount"


@pytest.mark.parametrize(
    ("body", "error_kind"),
    [
        (b'{"transaction_id": "t", ', "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"amount": NaN}', "invalid_json"),
        (b"[]", "invalid_request"),
        (b'"a string"', "invalid_request"),
        (b"[1, 2]", "invalid_request"),
    ],
)
def test_malformed_bodies_are_400(body, error_kind) -> None:
    error = refusal(body)
    assert error.status == 400 and error.error == error_kind


def test_oversize_bodies_and_too_many_items_are_413() -> None:
    big = json.dumps([GOOD] * 40).encode()
    error = refusal(big, max_bytes=1024)
    assert error.status == 413 and error.error == "payload_too_large" and "1024" in error.reason
    error = refusal(json.dumps([GOOD] * 5).encode(), max_bytes=1 << 20)
    assert error.status == 413 and "limit is 4" in error.reason


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[" * 100_000 + b"]" * 100_000, None),  # deeper than the JSON parser recurses
        (json.dumps({**GOOD, "amount": 10**400}).encode(), "amount"),
        (json.dumps({**GOOD, "timestamp": 10**400}).encode(), "timestamp"),
    ],
)
def test_bodies_that_overflow_the_parser_are_400_not_a_crash(body, field) -> None:
    error = refusal(body, max_bytes=1 << 20)
    assert error.status == 400 and error.field == field


@pytest.mark.parametrize("field", ["country", "channel", "timestamp", "amount", "x" * 5000])
def test_a_huge_bad_value_is_not_echoed_whole_in_the_reason(field) -> None:
    body = {**GOOD, field: "\u00e9" * 100_000}
    error = refusal(json.dumps(body).encode(), max_bytes=1 << 20)
    assert error.status == 400 and len(error.reason) < 200 and len(error.field) <= 80


def _outcome(body: bytes | str) -> object:
    try:
        return typed(decode_body(body, max_bytes=1 << 20))
    except RequestError as exc:
        return (exc.status, exc.error, exc.reason, exc.field)


_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e19, -9.3e18, 9.2e18, 5e-324, -0.0, 1e308])
    | st.text(max_size=10)  # lone surrogates included: json keeps them, orjson refuses
)
_DOCUMENTS = st.recursive(
    _VALUES,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids),
    max_leaves=10,
) | st.lists(st.fixed_dictionaries({k: _VALUES for k in GOOD}), max_size=3)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    text = json.dumps(draw(_DOCUMENTS), ensure_ascii=draw(st.booleans()))
    edit = draw(st.sampled_from(["none", "none", "cut", "nan", "bom", "duplicate", "big int"]))
    if edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "nan":
        text = f'{{"amount": {draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400"]))}}}'
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "duplicate":
        text = '{"amount": 1, "amount": 2.5, "channel": "pos"}'
    elif edit == "big int":
        text = json.dumps({**GOOD, "amount": draw(st.integers(2**62, 2**70))})
    return text.encode("utf-8", errors="surrogatepass")


@settings(max_examples=600, deadline=None)
@given(_bodies())
def test_bytes_decode_to_what_the_json_module_reads(body: bytes) -> None:
    """The bytes path (orjson where it is certain to agree) gives what the text path (the json
    module) gives: the same values and types, or the same refusal."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        assert _outcome(body)[:2] == (400, "invalid_json")
        return
    assert _outcome(body) == _outcome(text)


def test_a_batch_of_transactions_in_bytes_decodes_as_in_text() -> None:
    items = [{**GOOD, "amount": a} for a in (1, 2.5, 2**64, 10**30, 9.3e18, 99_999.0)]
    body = json.dumps(items).encode()
    assert _outcome(body) == _outcome(body.decode())
    assert [type(v["amount"]) for v in decode_body(body, max_bytes=1 << 20)] == [
        int,
        float,
        int,
        int,
        float,
        float,
    ]


_FIELD_VALUES = {
    "transaction_id": st.sampled_from(["tx-1", "a" * 64, "a" * 65, "", "-x", "t:1.2_3", "t\n1"])
    | st.text(max_size=70),
    "card_id": st.sampled_from(["c000001", "c 1", "é1", "c\x00"]) | st.integers(),
    "merchant_id": st.sampled_from(["m00001", "M.1", "m" * 64]) | st.none(),
    "amount": st.sampled_from([0.01, 0.009, 50_000, 50_000.01, 2**70, -1, True, "42"])
    | st.floats()
    | st.integers(),
    "channel": st.sampled_from(["online", "pos", "contactless", "ONLINE", "", ["pos"]]),
    "country": st.sampled_from(["US", "DE", "us", "XX", 1, {"c": "US"}]),
    "timestamp": st.sampled_from(
        [
            "2026-06-01T11:59:00Z",
            "2026-06-01T11:59:00",
            "2026-06-01T13:59:00+02:00",
            "2026-06-02T12:00:00Z",
            "2026-06-02T12:00:01Z",
            "1999-12-31T23:59:59Z",
            "9999-12-31T23:59:59-23:59",
            "2026-13-01T00:00:00Z",
            1_780_000_000,
            1.78e9,
        ]
    )
    | st.text(max_size=30),
}


@st.composite
def _items(draw: st.DrawFn) -> object:
    item = {k: draw(v) if draw(st.booleans()) else GOOD[k] for k, v in _FIELD_VALUES.items()}
    change = draw(st.sampled_from(["none"] * 6 + ["drop", "extra", "list"]))
    if change == "drop":
        item.pop(draw(st.sampled_from(sorted(item))))
    elif change == "extra":
        item["note"] = "x"
    elif change == "list":
        return [item]
    return item


@settings(max_examples=1500, deadline=None)
@given(_items())
def test_the_quick_check_accepts_only_what_the_field_checks_accept_and_as_they_do(item) -> None:
    """Well-formed requests take a quick check (``RequestSchema.quick``); whatever it takes, the
    field-by-field checks take too, as the same record, and what they refuse it refuses."""
    quick = request_rules.request_schema().quick(item, NOW)
    try:
        checked = request_rules.request_schema().checked(item, None, NOW)
    except RequestError:
        checked = None
    if quick is not None:
        assert quick == checked
    elif checked is not None:  # taken by the field checks alone: only epoch-second timestamps
        assert not isinstance(item["timestamp"], str)


def test_the_quick_check_takes_the_requests_clients_send() -> None:
    for item in (GOOD, {**GOOD, "amount": 7, "timestamp": "2026-06-01T13:59:00+02:00"}):
        taken = request_rules.request_schema().quick(item, NOW)
        assert taken is not None and taken == request_rules.request_schema().checked(
            item, None, NOW
        )
        assert taken["timestamp"].tzinfo is UTC and type(taken["amount"]) is float
