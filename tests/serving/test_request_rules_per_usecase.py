"""Request validation is generated from each use case's declaration, so it holds for every use
case alike: fuzzed from the declared fields (ids, ranged numbers, vocabularies, times), the
quick path takes only what the field-by-field checks take, as they take it, and every refusal
names a declared field with a reason (a JSON 4xx, never a crash)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.usecase import USECASES_DIR, load
from serving.requests import RequestError, RequestSchema

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
USECASES = sorted(p.parent.name for p in USECASES_DIR.glob("*/usecase.yaml"))


def _good(schema: RequestSchema) -> dict:
    item = {}
    for name in schema.fields:
        if name == schema.time_field:
            item[name] = "2026-06-01T11:59:00Z"
        elif name in schema.numbers:
            lo, hi = schema.numbers[name]
            item[name] = (lo + hi) / 2
        elif name in schema.categories:
            item[name] = schema.categories[name][0]
        else:
            item[name] = f"{name[:3]}-1"
    return item


def _values(schema: RequestSchema, name: str) -> st.SearchStrategy:
    """Good, edge and bad values for one declared field, from its declaration."""
    if name == schema.time_field:
        return st.sampled_from(
            ["2026-06-01T11:59:00Z", "2026-06-01T11:59:00", "2026-06-02T12:00:01Z",
             "2026-13-01T00:00:00Z", 1_780_000_000, 1.78e9, None]
        ) | st.text(max_size=30)  # fmt: skip
    if name in schema.numbers:
        lo, hi = schema.numbers[name]
        edges = [lo, hi, lo - 0.001, hi + 0.001, -1, 2**70, True, "42", None]
        return st.sampled_from(edges) | st.floats() | st.integers()
    if name in schema.categories:
        vocab = list(schema.categories[name])
        return st.sampled_from([*vocab, vocab[0].upper(), "", None, 1, [vocab[0]]])
    return st.sampled_from(["a" * 64, "a" * 65, "", "-x", "t:1.2_3", "t\n1", 7, None]) | st.text(
        max_size=70
    )


@st.composite
def _requests(draw: st.DrawFn, schema: RequestSchema) -> object:
    good = _good(schema)
    item = {k: draw(_values(schema, k)) if draw(st.booleans()) else good[k] for k in schema.fields}
    change = draw(st.sampled_from(["none"] * 6 + ["drop", "extra"]))
    if change == "drop":
        item.pop(draw(st.sampled_from(sorted(item))))
    elif change == "extra":
        item["note"] = "x"
    return item


@pytest.mark.parametrize("name", USECASES)
def test_every_use_case_validates_its_requests_as_declared(name: str) -> None:
    schema = RequestSchema(load(name))
    good = _good(schema)
    assert schema.quick(good, NOW) == schema.checked(good, None, NOW)

    @settings(max_examples=400, deadline=None)
    @given(_requests(schema))
    def fuzz(item) -> None:
        quick = schema.quick(item, NOW)
        try:
            checked = schema.checked(item, None, NOW)
        except RequestError as exc:
            checked = None
            assert 400 <= exc.status < 500 and exc.to_dict()["reason"]
            assert exc.field is None or exc.field in schema.fields or exc.field == "note"
        if quick is not None:
            assert quick == checked
        elif checked is not None:  # the field checks alone take epoch-second timestamps
            assert not isinstance(item[schema.time_field], str)

    fuzz()
