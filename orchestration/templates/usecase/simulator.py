"""Demo data for the {{name}} use case: accounts, their events and each event's outcome, learnt
a few days later. It follows the simulator protocol of ``core.simulation``, which lands its
batches (``loopline simulate``), injects faults and runs it live (``loopline run``).

Every number comes from ``ScenarioConfig.seed``: window ``k`` draws from RNG streams of
``(seed, stream, k)``, so any window regenerates alone, in any order, byte-identically.

What the data hides, for a model to learn: an event is more likely positive when it is large
and on the web, when it is small in a store for a basic account, and when its account is one
of the few risky ones (which are busier than the rest). Covariate drift moves values up and
traffic to the web; concept drift swaps the web rule for an app rule (``drift_strength``: the
share of events under the new rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from core.simulation import Windows, check_scenario, stream_rng
from core.usecase import load
from quality.schema import UTC_TS, schemas

USECASE = load(Path(__file__).resolve().parent)
SCHEMAS = schemas(USECASE)
KINDS: tuple[str, ...] = USECASE.vocabularies["kind"]
SEGMENTS: tuple[str, ...] = USECASE.vocabularies["segment"]
DRIFTS: tuple[str, ...] = ("none", "covariate", "concept")
# loopline backtest's shape (scenario fields, burn_in_days, warmup_days: orchestration.backtest.
# demo_config), and loopline demo's plan (orchestration.cli_loop.DemoPlan: clock speed, history,
# window; `scenario` for scenario fields), none beyond the defaults.
BACKTEST: dict = {}
DEMO: dict = {}

POSITIVE_DELAY = (timedelta(hours=6), timedelta(days=2))  # a positive outcome is learnt soon
NEGATIVE_DELAY = timedelta(days=3)  # a negative one when the case closes (label.maturity_days)
_S_ACCOUNTS, _S_EVENTS, _S_OUTCOMES = 1, 2, 3  # RNG streams (7 is core.simulation's faults)
_KIND_P = np.array([0.4, 0.4, 0.2])  # web, app, store
_SEGMENT_P = np.array([0.6, 0.3, 0.1])  # basic, plus, business
_SEGMENT_LOG_VALUE = np.array([3.0, 3.5, 4.2])
_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything that defines a scenario; two equal configs give byte-identical data."""

    seed: int = 7
    n_accounts: int = 400
    start: datetime | None = None
    batch_span: timedelta = timedelta(hours=6)
    rows_per_batch: int = 1000
    risky_share: float = 0.05
    drift: str = "none"
    drift_start_batch: int = 0
    drift_strength: float = 1.0

    def __post_init__(self) -> None:
        check_scenario(self, DRIFTS)
        if self.n_accounts < 1 or not 0.0 <= self.risky_share <= 0.5:
            raise ValueError("n_accounts must be >= 1 and risky_share in [0, 0.5]")


class Simulator(Windows):
    """The scenario of one ``ScenarioConfig`` (the time grid and the window cache are
    ``core.simulation.Windows``')."""

    def __init__(self, config: ScenarioConfig | None = None) -> None:
        super().__init__(config or ScenarioConfig())
        rng = stream_rng(self.config.seed, _S_ACCOUNTS)
        n = self.config.n_accounts
        self._segment = rng.choice(len(SEGMENTS), size=n, p=_SEGMENT_P)
        self._risky = rng.random(n) < self.config.risky_share
        activity = rng.gamma(2.0, 0.5, n) * np.where(self._risky, 4.0, 1.0)
        self._activity = activity / activity.sum()
        self._ids = [f"a{i:06d}" for i in range(n)]

    # -- the simulator protocol -----------------------------------------------------------

    def reference(self) -> dict[str, pl.DataFrame]:
        segments = [SEGMENTS[s] for s in self._segment]
        frame = pl.DataFrame({"account_id": self._ids, "segment": segments})
        return {"accounts": frame.cast(SCHEMAS["accounts"])}

    def events(
        self, k: int, *, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, pl.DataFrame]:
        """Window ``k``'s events (or those of its sub-window), then the outcomes learnt in it."""
        lo, hi = self.window(k)
        lo, hi = max(lo, since or lo), min(hi, until or hi)
        events = self._batch(k).filter(pl.col("event_timestamp").is_between(lo, hi, "left"))
        first = max(0, self.batch_at(lo - NEGATIVE_DELAY))
        outcomes = pl.concat(
            [self._batch(j) for j in range(first, self.batch_at(hi - _US) + 1)]
        ).filter(pl.col("outcome_timestamp").is_between(lo, hi, "left"))
        return {
            "events": events.select(list(SCHEMAS["events"])),
            "outcomes": outcomes.select(list(SCHEMAS["outcomes"])).sort(
                "outcome_timestamp", "event_id"
            ),
        }

    def truth(self, k: int) -> pl.DataFrame:
        """The outcome of every event of window ``k``, whenever it is learnt."""
        return self._batch(k).select(list(SCHEMAS["outcomes"]))

    # -- generation -----------------------------------------------------------------------

    def _generate(self, k: int) -> pl.DataFrame:
        cfg = self.config
        rng, decide = stream_rng(cfg.seed, _S_EVENTS, k), stream_rng(cfg.seed, _S_OUTCOMES, k)
        drifted = k >= cfg.drift_start_batch and cfg.drift != "none"
        covariate = drifted and cfg.drift == "covariate"
        lo, _ = self.window(k)
        n = int(rng.poisson(cfg.rows_per_batch))
        offsets = np.sort(rng.integers(0, cfg.batch_span // _US, n))
        account = rng.choice(cfg.n_accounts, size=n, p=self._activity)
        segment = self._segment[account]
        kind_p = _KIND_P + (np.array([0.3, -0.2, -0.1]) * cfg.drift_strength if covariate else 0)
        kind = rng.choice(len(KINDS), size=n, p=kind_p / kind_p.sum())
        shift = 0.7 * cfg.drift_strength if covariate else 0.0
        value = np.exp(_SEGMENT_LOG_VALUE[segment] + shift + rng.normal(0.0, 0.8, n))
        value = np.round(np.clip(value, 0.0, 100_000.0), 2)
        # The hidden rules: web and large, store and small for a basic account, risky accounts.
        new_rule = (
            decide.random(n) < cfg.drift_strength
            if drifted and cfg.drift == "concept"
            else np.zeros(n, bool)
        )
        web_rule = (kind == 0) & (value > 100) & ~new_rule
        app_rule = (kind == 1) & (value < 20) & new_rule
        logit = (
            -4.0
            + 3.0 * (web_rule | app_rule)
            + 2.0 * ((kind == 2) & (value < 20) & (segment == 0))
            + 2.5 * self._risky[account]
        )
        positive = decide.random(n) < 1.0 / (1.0 + np.exp(-logit))
        lo_us, hi_us = (d // _US for d in POSITIVE_DELAY)
        delay = np.where(positive, decide.integers(lo_us, hi_us, n), NEGATIVE_DELAY // _US)
        at = pl.Series(offsets, dtype=pl.Int64).cast(pl.Duration("us")) + lo
        return pl.DataFrame(
            {
                "event_id": [f"e{k:06d}-{i:07d}" for i in range(n)],
                "account_id": [self._ids[a] for a in account],
                "value": value,
                "kind": [KINDS[i] for i in kind],
                "event_timestamp": at.cast(UTC_TS),
                "outcome": positive,
                "outcome_timestamp": (at + pl.Series(delay).cast(pl.Duration("us"))).cast(UTC_TS),
            }
        )
