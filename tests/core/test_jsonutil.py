"""json_safe: one conversion for reports, sidecars, the registry and contract outcomes."""

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np

from core.jsonutil import json_safe


@dataclass
class _Point:
    x: float
    tags: tuple[str, ...]


def test_every_value_becomes_strict_json():
    value = {
        "nan": math.nan,
        "inf": np.float32("inf"),
        "scalar": np.int64(3),
        "array": np.array([0.5, np.nan]),
        "point": _Point(np.float64(1.5), ("a", "b")),
        "when": datetime(2026, 12, 6, tzinfo=UTC),
        "decimal": Decimal("0.10"),
        "path": Path("/tmp/x"),
        1: [True, None, "s"],
    }
    out = json_safe(value)
    assert out == {
        "nan": None,
        "inf": None,
        "scalar": 3,
        "array": [0.5, None],
        "point": {"x": 1.5, "tags": ["a", "b"]},
        "when": "2026-12-06T00:00:00+00:00",
        "decimal": "0.10",
        "path": "/tmp/x",
        "1": [True, None, "s"],
    }
    json.dumps(out, allow_nan=False)  # strict JSON: raises on NaN or an unknown type
