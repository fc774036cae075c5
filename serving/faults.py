"""Fault injection for release drills: an archive whose worker answers slowly or fails requests.

A drill proves that delivery's shadow and watch catch a bad release against a real TorchServe
(``tests/e2e/test_release_integrity_e2e.py``). The faults are the ``faults`` block of an
archive's ``serving.json`` (``serving.archive.build_archive(faults=...)``), read once when a
worker starts, e.g. ``{"delay_ms": 50, "error_every": 10}``. Nothing writes that block in normal
operation, and a worker of an archive without it does no fault work per request.

The faults act as a sick model would: ``delay_ms`` is slept once per batch before it is
answered (a slower model), and every ``error_every``-th request a worker receives is answered
500 (a model that crashes on some inputs), counted per worker across batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.requests import RequestError

FAULT_ERROR = "injected_fault"


@dataclass
class Faults:
    """A drill's faults; all zero is no fault at all (``bool(faults)`` is False)."""

    delay_ms: float = 0.0
    error_every: int = 0
    received: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.delay_ms, bool) or not isinstance(self.delay_ms, int | float):
            raise ValueError(f"faults.delay_ms must be a number, got {self.delay_ms!r}")
        if not math.isfinite(self.delay_ms) or self.delay_ms < 0:
            raise ValueError(f"faults.delay_ms must be finite and >= 0, got {self.delay_ms}")
        if isinstance(self.error_every, bool) or not isinstance(self.error_every, int):
            raise ValueError(f"faults.error_every must be an integer, got {self.error_every!r}")
        if self.error_every < 0:
            raise ValueError(f"faults.error_every must be >= 0, got {self.error_every}")

    def __bool__(self) -> bool:
        return self.delay_ms > 0 or self.error_every > 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """The ``faults`` block of ``serving.json``; an unknown key is refused by name (a typo
        would otherwise make a drill that injects nothing)."""
        unknown = sorted(set(data) - {"delay_ms", "error_every"})
        if unknown:
            raise ValueError(f"unknown faults {unknown}: known are delay_ms and error_every")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"delay_ms": self.delay_ms, "error_every": self.error_every}

    def strike(self, size: int, sleep: Callable[[float], None] = time.sleep) -> set[int]:
        """Before a batch of ``size`` requests is answered: sleeps ``delay_ms``, and returns
        the indices of the batch's requests that must fail."""
        if self.delay_ms:
            sleep(self.delay_ms / 1000.0)
        first, self.received = self.received, self.received + size
        if not self.error_every:
            return set()
        return {i for i in range(size) if (first + i + 1) % self.error_every == 0}

    def error(self) -> RequestError:
        """What a failed request is answered: a server error, as from a crashing model."""
        return RequestError(
            f"fault injected by a drill (one request in {self.error_every} fails)",
            status=500,
            error=FAULT_ERROR,
        )
