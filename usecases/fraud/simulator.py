"""Deterministic card-payments fraud scenario: reference data, transactions, delayed labels.

The platform needs a live-looking source to demo and test continuous training without real
card data. Every number comes from ``ScenarioConfig.seed``; batch ``k`` draws from RNG streams
derived from ``(seed, stream, k)``, so any batch can be regenerated alone, in any order, in any
process, byte-identically. Generation is vectorised NumPy + Polars (no per-row Python).

Ground truth the landed data hides: a few percent of merchants are risky; fraud comes from
card-testing bursts (small online charges within minutes, then a large one), foreign high
amounts, risky merchants, and a share of legit-looking fraud that no model can catch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from core.simulation import default_start
from core.usecase import load
from quality.schema import UTC_TS, keys, schemas

# This simulator writes the fraud use case's datasets, whichever use case the process runs.
FRAUD = load(Path(__file__).resolve().parent)
SCHEMAS = schemas(FRAUD)
KEYS = keys(FRAUD)
CHANNELS: tuple[str, ...] = FRAUD.vocabularies["channel"]
COUNTRIES: tuple[str, ...] = FRAUD.vocabularies["country"]
MERCHANT_CATEGORIES: tuple[str, ...] = FRAUD.vocabularies["merchant_category"]
SPENDING_PROFILES: tuple[str, ...] = FRAUD.vocabularies["spending_profile"]
_AMOUNT = FRAUD.request.fields["amount"]
AMOUNT_MIN, AMOUNT_MAX = float(_AMOUNT.min), float(_AMOUNT.max)

DRIFTS: tuple[str, ...] = ("none", "covariate", "concept")
# ``loopline backtest``'s scenario shape: ``loopline demo``'s 1,500 cards and 200 merchants.
BACKTEST = {"n_cards": 1500, "n_merchants": 200}
# ``loopline demo``'s world (orchestration.cli_loop.DemoPlan): the concept drift strikes a
# compromised chain (15% of the attacked category's merchants), a new fraud a model can learn
# from its labels. The default, new fraud drawn at random among look-alike legit rows, leaves
# no model above 64% of the pre-drift PR-AUC (benchmarks/RESULTS.md, the backtest's ceiling),
# so a retrained champion could not show the recovery the demo is about.
DEMO: dict = {"scenario": {"concept_merchant_share": 0.15}}
PATTERNS: tuple[str, ...] = (
    "legit",
    "card_testing",
    "foreign_high",
    "risky_merchant",
    "noise",
    "concept_shift",
)

LEGIT_LABEL_DELAY = timedelta(days=7)
FRAUD_LABEL_DELAY_MIN = timedelta(days=1)
FRAUD_LABEL_DELAY_MAX = timedelta(days=10)

_US = 1_000_000
_HOUR = 3600 * _US
_DAY = 24 * _HOUR
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)

# RNG stream tags: one independent stream per concern keeps e.g. inputs identical across
# drift modes that only change labels.
# (Stream 7 is core.simulation.FAULT_STREAM, the fault seeds.)
_S_CARDS, _S_MERCHANTS, _S_VOLUME, _S_FRAUD, _S_CONCEPT, _S_LABELS = range(1, 7)
_S_CONCEPT_MERCHANTS = 8

_P_LEGIT, _P_TESTING, _P_FOREIGN, _P_RISKY, _P_NOISE, _P_CONCEPT = range(6)
# Share of the fraud budget per pattern: card testing, foreign-high, risky merchant, noise.
_FRAUD_SHARES = np.array([0.35, 0.30, 0.25, 0.10])

_PROFILE_P = np.array([0.50, 0.35, 0.15])
_PROFILE_RATE = np.array([0.6, 1.0, 1.8])
_PROFILE_AMOUNT_SHIFT = np.array([-0.35, 0.0, 0.55])

_COUNTRY_W = {
    "US": 30, "GB": 12, "DE": 10, "FR": 8, "NL": 5, "ES": 5, "IT": 5, "SE": 3, "PL": 3, "IE": 2,
    "CA": 4, "MX": 2, "BR": 2, "JP": 2, "SG": 1, "AU": 2, "IN": 2, "AE": 1, "NG": 0.5, "ZA": 0.5,
}  # fmt: skip

# category: (median amount, log-sigma, (pos, contactless, online), P(foreign), merchant share)
_CATEGORY = {
    "grocery": (35.0, 0.65, (0.45, 0.47, 0.08), 0.02, 0.20),
    "restaurants": (28.0, 0.60, (0.45, 0.47, 0.08), 0.04, 0.18),
    "fuel": (45.0, 0.45, (0.60, 0.37, 0.03), 0.03, 0.08),
    "travel": (320.0, 0.90, (0.15, 0.05, 0.80), 0.35, 0.05),
    "electronics": (180.0, 0.85, (0.35, 0.15, 0.50), 0.05, 0.07),
    "fashion": (75.0, 0.75, (0.35, 0.25, 0.40), 0.05, 0.12),
    "digital_goods": (9.0, 0.80, (0.02, 0.03, 0.95), 0.08, 0.10),
    "gambling": (60.0, 0.90, (0.10, 0.05, 0.85), 0.10, 0.03),
    "pharmacy": (22.0, 0.60, (0.45, 0.47, 0.08), 0.02, 0.07),
    "utilities": (90.0, 0.50, (0.05, 0.00, 0.95), 0.01, 0.10),
}
# Traffic mix per spending profile: multipliers on the merchant share.
_PROFILE_CATEGORY_TILT = {
    "low": {"grocery": 1.5, "fuel": 1.3, "pharmacy": 1.3, "travel": 0.4, "electronics": 0.6},
    "medium": {},
    "high": {"travel": 2.2, "electronics": 1.8, "fashion": 1.5, "restaurants": 1.3},
}
# Risky merchants cluster in card-not-present categories and never sit in the category the
# concept drift later attacks, so that one is "previously safe".
_RISKY_SHARE = 0.04
_RISKY_POPULARITY = 0.3  # small shady shops: little legit traffic, so fraud stands out
_RISKY_CATEGORY_W = {
    "digital_goods": 4, "gambling": 4, "electronics": 3, "fashion": 2, "travel": 1,
    "restaurants": 1, "fuel": 1, "utilities": 0.5, "pharmacy": 0.5, "grocery": 0,
}  # fmt: skip
_CONCEPT_CATEGORY = "grocery"
_CONCEPT_AMOUNT = (40.0, 250.0)
_FOREIGN_HIGH_CATEGORY_W = {
    "electronics": 0.35, "travel": 0.25, "fashion": 0.20, "digital_goods": 0.10, "gambling": 0.10
}  # fmt: skip
_TESTING_LARGE_CATEGORY_W = {
    "electronics": 0.50, "digital_goods": 0.20, "fashion": 0.15, "travel": 0.15
}  # fmt: skip
_ONLINE_FOREIGN_BONUS = 0.05
_COVARIATE_AMOUNT = 1.6
_COVARIATE_ONLINE_PULL = 0.30
_COVARIATE_FOREIGN = 2.5

# Hour-of-day (UTC) event intensity; weekends start later and stay flatter.
_WEEKDAY_HOURS = [
    0.15, 0.10, 0.08, 0.07, 0.08, 0.15, 0.35, 0.70, 1.00, 1.10, 1.20, 1.35,
    1.50, 1.40, 1.25, 1.20, 1.30, 1.45, 1.55, 1.45, 1.20, 0.90, 0.60, 0.30,
]  # fmt: skip
_WEEKEND_HOURS = [
    0.25, 0.18, 0.12, 0.09, 0.08, 0.10, 0.18, 0.35, 0.60, 0.90, 1.15, 1.30,
    1.40, 1.40, 1.35, 1.30, 1.30, 1.35, 1.35, 1.25, 1.10, 0.90, 0.70, 0.45,
]  # fmt: skip
_DAY_W = [0.95, 0.97, 1.00, 1.02, 1.10, 1.05, 0.85]  # Monday .. Sunday


def _build_intensity() -> np.ndarray:
    rows = [np.array(_WEEKEND_HOURS if d >= 5 else _WEEKDAY_HOURS) * _DAY_W[d] for d in range(7)]
    table = np.stack(rows)
    return table / table.mean()


def _cum(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(np.asarray(weights, dtype=np.float64))
    return c / c[-1]


_INTENSITY = _build_intensity()  # [weekday, hour], mean 1 over a week
_N_CAT = len(MERCHANT_CATEGORIES)
_N_COUNTRY = len(COUNTRIES)
_CAT_INDEX = {c: i for i, c in enumerate(MERCHANT_CATEGORIES)}
_ONLINE = CHANNELS.index("online")
_CAT_MU = np.log([_CATEGORY[c][0] for c in MERCHANT_CATEGORIES])
_CAT_SIGMA = np.array([_CATEGORY[c][1] for c in MERCHANT_CATEGORIES])
_CAT_CHANNEL = np.array([_CATEGORY[c][2] for c in MERCHANT_CATEGORIES])
_CAT_FOREIGN = np.array([_CATEGORY[c][3] for c in MERCHANT_CATEGORIES])
_CAT_SHARE = np.array([_CATEGORY[c][4] for c in MERCHANT_CATEGORIES])
_COUNTRY_CUM = _cum(np.array([_COUNTRY_W[c] for c in COUNTRIES]))
_PROFILE_CAT_CUM = np.stack(
    [
        _cum(_CAT_SHARE * [_PROFILE_CATEGORY_TILT[p].get(c, 1.0) for c in MERCHANT_CATEGORIES])
        for p in SPENDING_PROFILES
    ]
)
_CHANNEL_CUM = np.stack([_cum(row) for row in _CAT_CHANNEL])


def _shifted_channel_cum(pull: float) -> np.ndarray:
    """Channel distributions per category with a share ``pull`` of traffic moved online."""
    shifted = _CAT_CHANNEL * (1 - pull)
    shifted[:, _ONLINE] += pull
    return np.stack([_cum(row) for row in shifted])


def _weights_over_categories(w: dict[str, float]) -> np.ndarray:
    return np.array([w.get(c, 0.0) for c in MERCHANT_CATEGORIES], dtype=np.float64)


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything that defines a scenario; two equal configs give byte-identical data.

    ``start`` None means "now, rounded down to the hour, minus 21 days", resolved once when a
    ``Simulator`` is built: pass an explicit start to reproduce a run in another process.
    ``rows_per_batch`` is the expected row count of a batch at average (weekly) intensity.
    ``drift_strength`` scales the drift: under covariate drift it multiplies the log of the
    amount shift, the share of traffic pulled online and the excess foreign rate (1.0 is the
    full shift, small values a shift below any alarm); under concept drift it is the share
    (0 to 1) of the old fraud mechanism that turns legit, replaced by as much new fraud.
    ``concept_merchant_share`` below 1 confines the new fraud to that share of the attacked
    category's merchants (a compromised chain), which a model can learn; at 1 it is a random
    subset of the whole segment, which no model can tell from its legit rows.
    """

    seed: int = 7
    n_cards: int = 2000
    n_merchants: int = 300
    start: datetime | None = None
    batch_span: timedelta = timedelta(hours=6)
    rows_per_batch: int = 2000
    fraud_rate: float = 0.01
    drift: str = "none"
    drift_start_batch: int = 0
    drift_strength: float = 1.0
    concept_merchant_share: float = 1.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.n_cards < 1:
            raise ValueError("n_cards must be >= 1")
        if self.n_merchants < _N_CAT:
            raise ValueError(f"n_merchants must be >= {_N_CAT} (one per category)")
        if self.batch_span < timedelta(seconds=1):
            raise ValueError("batch_span must be at least one second")
        if self.rows_per_batch < 0:
            raise ValueError("rows_per_batch must be >= 0")
        if not 0.0 <= self.fraud_rate <= 0.5:
            raise ValueError("fraud_rate must be in [0, 0.5]")
        if self.drift not in DRIFTS:
            raise ValueError(f"drift must be one of {DRIFTS}, got {self.drift!r}")
        if self.drift_start_batch < 0:
            raise ValueError("drift_start_batch must be >= 0")
        if not 0.0 <= self.drift_strength < math.inf:
            raise ValueError("drift_strength must be finite and >= 0")
        if self.drift == "concept" and self.drift_strength > 1.0:
            raise ValueError("concept drift_strength is a share of the fraud mechanism: <= 1")
        if not 0.0 < self.concept_merchant_share <= 1.0:
            raise ValueError("concept_merchant_share must be in (0, 1]")


def _to_us(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // _ONE_US


def _rng(seed: int, stream: int, k: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, k]))


def _grouped_choice(group: np.ndarray, cum_table: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per-row categorical draw where each row's distribution is row ``group`` of the table."""
    n_groups, k = cum_table.shape
    flat = (cum_table + np.arange(n_groups)[:, None]).ravel()
    idx = np.searchsorted(flat, group + u, side="right") - group * k
    return np.clip(idx, 0, k - 1)


def _uniform_foreign(rng: np.random.Generator, home: np.ndarray) -> np.ndarray:
    return (home + 1 + rng.integers(0, _N_COUNTRY - 1, home.size)) % _N_COUNTRY


@dataclass
class _Cards:
    frame: pl.DataFrame
    ids: pl.Series
    home: np.ndarray
    profile: np.ndarray
    cum_activity: np.ndarray


@dataclass
class _Merchants:
    frame: pl.DataFrame
    ids: pl.Series
    category: np.ndarray
    risky: np.ndarray
    order: np.ndarray  # merchant indices sorted by category
    block_cum: np.ndarray  # popularity cumsum, category c spans (c, c + 1]
    block_start: np.ndarray
    block_end: np.ndarray

    def pick(self, category: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Popularity-weighted merchant of the given category for each row."""
        pos = np.searchsorted(self.block_cum, category + u, side="right")
        pos = np.clip(pos, self.block_start[category], self.block_end[category] - 1)
        return self.order[pos]


@dataclass
class _Rows:
    t: np.ndarray
    card: np.ndarray
    merchant: np.ndarray
    amount: np.ndarray
    channel: np.ndarray
    country: np.ndarray
    pattern: np.ndarray
    fraud: np.ndarray

    @staticmethod
    def empty() -> _Rows:
        e = np.zeros(0, dtype=np.int64)
        return _Rows(e, e, e, np.zeros(0), e, e, np.zeros(0, np.uint8), np.zeros(0, bool))

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        names = [f.name for f in fields(_Rows)]
        return _Rows(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})

    def take(self, idx: np.ndarray) -> _Rows:
        return _Rows(**{f.name: getattr(self, f.name)[idx] for f in fields(_Rows)})


class Simulator:
    """Generates the scenario of one ``ScenarioConfig``: reference data and batches by index.

    Batch ``k`` covers ``[start + k * span, start + (k + 1) * span)``. Generated batches are kept
    in a small cache (bounded by ``cache_rows``) because label windows need the transactions of
    the previous ten days; a cache miss regenerates the same bytes. Not thread-safe: use one
    instance per thread.
    """

    def __init__(self, config: ScenarioConfig | None = None, *, cache_rows: int = 4_000_000):
        self.config = config or ScenarioConfig()
        start = self.config.start or default_start()
        self.start: datetime = (start if start.tzinfo else start.replace(tzinfo=UTC)).astimezone(
            UTC
        )
        self._start_us = _to_us(self.start)
        self._span_us = self.config.batch_span // _ONE_US
        self._cache: OrderedDict[int, pl.DataFrame] = OrderedDict()
        self._cache_rows = cache_rows
        self._cards = self._make_cards()
        self._merchants = self._make_merchants()
        self._channel_cum_shifted = _shifted_channel_cum(
            _COVARIATE_ONLINE_PULL * self.config.drift_strength
        )
        self._concept_merchants = self._pick_concept_merchants()

    # -- the simulator protocol (core.simulation) ----------------------------------------

    def reference(self) -> dict[str, pl.DataFrame]:
        """The reference datasets: cards and merchants."""
        return {"cards": self.cards(), "merchants": self.merchants()}

    def events(
        self, k: int, *, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, pl.DataFrame]:
        """Window ``k``'s (or its sub-window's) transactions, then the labels known in it."""
        return {
            "transactions": self.transactions(k, since=since, until=until),
            "labels": self.labels(k, since=since, until=until),
        }

    def truth(self, k: int) -> pl.DataFrame:
        """The label of every transaction of window ``k`` (schema ``labels``)."""
        return self._batch(k).select(list(SCHEMAS["labels"]))

    # -- reference data -------------------------------------------------------------------

    def cards(self) -> pl.DataFrame:
        """Card reference data (schema ``cards``)."""
        return self._cards.frame

    def merchants(self) -> pl.DataFrame:
        """Merchant reference data (schema ``merchants``); the latent risk is not included."""
        return self._merchants.frame

    def risky_merchant_ids(self) -> list[str]:
        """Ground truth for tests and demos: the merchants with latent fraud risk."""
        return self._merchants.ids.filter(pl.Series(self._merchants.risky)).to_list()

    def _make_cards(self) -> _Cards:
        cfg = self.config
        rng = _rng(cfg.seed, _S_CARDS)
        n = cfg.n_cards
        home = np.searchsorted(_COUNTRY_CUM, rng.random(n), side="right").clip(0, _N_COUNTRY - 1)
        profile = np.searchsorted(_cum(_PROFILE_P), rng.random(n), side="right").clip(0, 2)
        activity = _PROFILE_RATE[profile] * rng.gamma(2.0, 0.5, n)
        ids = pl.select(
            card_id=pl.lit("c") + pl.int_range(n, dtype=pl.Int64).cast(pl.String).str.zfill(6)
        ).to_series()
        frame = pl.DataFrame(
            {
                "card_id": ids,
                "home_country": pl.Series(COUNTRIES).gather(home),
                "spending_profile": pl.Series(SPENDING_PROFILES).gather(profile),
            },
            schema=SCHEMAS["cards"],
        )
        return _Cards(frame, ids, home, profile, np.cumsum(activity))

    def _make_merchants(self) -> _Merchants:
        cfg = self.config
        rng = _rng(cfg.seed, _S_MERCHANTS)
        n = cfg.n_merchants
        drawn = np.searchsorted(_cum(_CAT_SHARE), rng.random(n), side="right").clip(0, _N_CAT - 1)
        category = np.where(np.arange(n) < _N_CAT, np.arange(n) % _N_CAT, drawn)
        country = np.searchsorted(_COUNTRY_CUM, rng.random(n), side="right").clip(0, _N_COUNTRY - 1)
        popularity = rng.lognormal(0.0, 1.0, n)
        risk_w = _weights_over_categories(_RISKY_CATEGORY_W)[category] * rng.random(n)
        n_risky = min(max(1, round(_RISKY_SHARE * n)), int((risk_w > 0).sum()))
        risky = np.zeros(n, dtype=bool)
        risky[np.argsort(-risk_w, kind="stable")[:n_risky]] = True
        popularity[risky] *= _RISKY_POPULARITY

        order = np.argsort(category, kind="stable")
        counts = np.bincount(category, minlength=_N_CAT)
        block_end = np.cumsum(counts)
        block_start = block_end - counts
        pop_sorted = popularity[order]
        cat_sorted = category[order]
        totals = np.bincount(cat_sorted, weights=pop_sorted, minlength=_N_CAT)
        within = pop_sorted / totals[cat_sorted]
        block_cum = np.cumsum(within)  # every category is non-empty and sums to 1
        ids = pl.select(
            merchant_id=pl.lit("m") + pl.int_range(n, dtype=pl.Int64).cast(pl.String).str.zfill(5)
        ).to_series()
        frame = pl.DataFrame(
            {
                "merchant_id": ids,
                "category": pl.Series(MERCHANT_CATEGORIES).gather(category),
                "country": pl.Series(COUNTRIES).gather(country),
            },
            schema=SCHEMAS["merchants"],
        )
        return _Merchants(frame, ids, category, risky, order, block_cum, block_start, block_end)

    def _pick_concept_merchants(self) -> np.ndarray | None:
        """Mask of the attacked category's merchants concept drift may strike (None: all)."""
        share = self.config.concept_merchant_share
        if share >= 1.0:
            return None
        merchants = self._merchants
        pool = np.flatnonzero(merchants.category == _CAT_INDEX[_CONCEPT_CATEGORY])
        rng = _rng(self.config.seed, _S_CONCEPT_MERCHANTS)
        chosen = rng.choice(pool, size=max(1, round(share * pool.size)), replace=False)
        mask = np.zeros(merchants.category.size, dtype=bool)
        mask[chosen] = True
        return mask

    # -- time -----------------------------------------------------------------------------

    def window(self, k: int) -> tuple[datetime, datetime]:
        """Simulated time window ``[start, end)`` of batch ``k``."""
        if k < 0:
            raise ValueError("batch index must be >= 0")
        return (
            self.start + k * self.config.batch_span,
            self.start + (k + 1) * self.config.batch_span,
        )

    def batch_at(self, t: datetime) -> int:
        """Index of the batch whose window contains ``t`` (negative before ``start``)."""
        return (_to_us(t) - self._start_us) // self._span_us

    def expected_rows(self, k: int) -> float:
        """Expected transaction count of batch ``k``: seasonality times ``rows_per_batch``."""
        s, e = self._window_us(k)
        return float(self._bins(s, e)[2].sum())

    def _window_us(self, k: int) -> tuple[int, int]:
        if k < 0:
            raise ValueError("batch index must be >= 0")
        s = self._start_us + k * self._span_us
        return s, s + self._span_us

    def _bins(self, s: int, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hour bins of ``[s, e)`` with the expected row count in each."""
        starts = np.arange((s // _HOUR) * _HOUR, e, _HOUR, dtype=np.int64)
        lo = np.maximum(starts, s)
        hi = np.minimum(starts + _HOUR, e)
        hour = (starts // _HOUR) % 24
        weekday = (starts // _DAY + 3) % 7  # 1970-01-01 was a Thursday
        hours = (hi - lo) / _HOUR
        per_hour = self.config.rows_per_batch * _HOUR / self._span_us
        return lo, hi, _INTENSITY[weekday, hour] * hours * per_hour

    # -- batches --------------------------------------------------------------------------

    def transactions(
        self, k: int, *, since: datetime | None = None, until: datetime | None = None
    ) -> pl.DataFrame:
        """Transactions of batch ``k`` (schema ``transactions``), optionally a sub-window."""
        df = self._batch(k)
        if since is not None:
            df = df.filter(pl.col("event_timestamp") >= since)
        if until is not None:
            df = df.filter(pl.col("event_timestamp") < until)
        return df.select(list(SCHEMAS["transactions"]))

    def labels(
        self, k: int, *, since: datetime | None = None, until: datetime | None = None
    ) -> pl.DataFrame:
        """Labels whose ``label_timestamp`` falls in window ``k`` (or its sub-window).

        Every transaction gets exactly one label, in exactly one label window: fraud after a
        chargeback delay of 1-10 days, legit after the 7-day settlement period.
        """
        a, b = self.window(k)
        a = max(a, since) if since is not None else a
        b = min(b, until) if until is not None else b
        first = max(0, self.batch_at(a - FRAUD_LABEL_DELAY_MAX))
        last = self.batch_at(b - timedelta(microseconds=1))
        parts = [
            self._batch(j)
            .select(list(SCHEMAS["labels"]))
            .filter(pl.col("label_timestamp") >= a, pl.col("label_timestamp") < b)
            for j in range(first, last + 1)
        ]
        out = pl.concat(parts) if parts else pl.DataFrame(schema=SCHEMAS["labels"])
        return out.sort("label_timestamp", "transaction_id")

    def ground_truth(self, k: int) -> pl.DataFrame:
        """Hidden truth of batch ``k`` for tests and demos: label, label time, and the generator
        (``PATTERNS``) of each row; after concept drift, foreign_high/risky_merchant rows are legit."""
        return self._batch(k).select(
            "transaction_id",
            "is_fraud",
            "label_timestamp",
            pl.col("pattern").replace_strict(dict(enumerate(PATTERNS)), return_dtype=pl.String),
        )

    def _batch(self, k: int) -> pl.DataFrame:
        cached = self._cache.get(k)
        if cached is not None:
            self._cache.move_to_end(k)
            return cached
        df = self._generate(k)
        self._cache[k] = df
        total = sum(f.height for f in self._cache.values())
        while len(self._cache) > 1 and total > self._cache_rows:
            _, old = self._cache.popitem(last=False)
            total -= old.height
        return df

    def _generate(self, k: int) -> pl.DataFrame:
        cfg = self.config
        s, e = self._window_us(k)
        drifted = k >= cfg.drift_start_batch
        covariate = drifted and cfg.drift == "covariate"
        concept = drifted and cfg.drift == "concept"
        rng_v = _rng(cfg.seed, _S_VOLUME, k)
        rng_f = _rng(cfg.seed, _S_FRAUD, k)

        lo, hi, w = self._bins(s, e)
        n_total = int(rng_v.poisson(w.sum()))
        n_fraud = int(rng_v.binomial(n_total, cfg.fraud_rate))
        n_test, n_foreign, n_risky, n_noise = rng_v.multinomial(n_fraud, _FRAUD_SHARES)

        testing = self._card_testing(rng_f, n_test, s, e)
        foreign = self._foreign_high(rng_f, int(n_foreign), s, e)
        risky = self._risky_merchant(rng_f, int(n_risky), s, e)
        injected = testing.t.size + foreign.t.size + risky.t.size
        n_legit = max(n_total - injected, int(n_noise))
        legit = self._legit(rng_v, n_legit, lo, hi, w, covariate)
        noise_idx = rng_f.choice(n_legit, size=int(n_noise), replace=False)
        legit.fraud[noise_idx] = True
        legit.pattern[noise_idx] = _P_NOISE

        rows = _Rows.concat([legit, testing, foreign, risky])
        if concept:
            self._shift_concept(_rng(cfg.seed, _S_CONCEPT, k), rows)
        rows = rows.take(np.argsort(rows.t, kind="stable"))
        n = rows.t.size

        fraud_delay = _rng(cfg.seed, _S_LABELS, k).integers(
            FRAUD_LABEL_DELAY_MIN // _ONE_US, FRAUD_LABEL_DELAY_MAX // _ONE_US + 1, n
        )
        label_t = rows.t + np.where(rows.fraud, fraud_delay, LEGIT_LABEL_DELAY // _ONE_US)
        amount = np.round(np.clip(rows.amount, AMOUNT_MIN, AMOUNT_MAX), 2)
        return pl.DataFrame(
            {
                "transaction_id": pl.select(
                    pl.lit(f"t{k:06d}-")
                    + pl.int_range(n, dtype=pl.Int64).cast(pl.String).str.zfill(8)
                ).to_series(),
                "card_id": self._cards.ids.gather(rows.card),
                "merchant_id": self._merchants.ids.gather(rows.merchant),
                "amount": amount,
                "channel": pl.Series(CHANNELS).gather(rows.channel),
                "country": pl.Series(COUNTRIES).gather(rows.country),
                "event_timestamp": pl.Series(rows.t, dtype=pl.Int64).cast(UTC_TS),
                "is_fraud": rows.fraud,
                "label_timestamp": pl.Series(label_t, dtype=pl.Int64).cast(UTC_TS),
                "pattern": pl.Series(rows.pattern, dtype=pl.UInt8),
            }
        )

    # -- row generators -------------------------------------------------------------------

    def _legit(
        self,
        rng: np.random.Generator,
        n: int,
        lo: np.ndarray,
        hi: np.ndarray,
        w: np.ndarray,
        covariate: bool,
    ) -> _Rows:
        cards, merchants = self._cards, self._merchants
        if n == 0:
            return _Rows.empty()
        b = np.searchsorted(_cum(w), rng.random(n), side="right").clip(0, lo.size - 1)
        t = lo[b] + (rng.random(n) * (hi - lo)[b]).astype(np.int64)
        card = np.searchsorted(
            cards.cum_activity, rng.random(n) * cards.cum_activity[-1], side="right"
        ).clip(0, cards.home.size - 1)
        profile = cards.profile[card]
        merchant = merchants.pick(
            _grouped_choice(profile, _PROFILE_CAT_CUM, rng.random(n)), rng.random(n)
        )
        cat = merchants.category[merchant]
        mu = _CAT_MU[cat] + _PROFILE_AMOUNT_SHIFT[profile]
        strength = self.config.drift_strength
        if covariate:
            mu = mu + strength * math.log(_COVARIATE_AMOUNT)
        amount = np.exp(mu + _CAT_SIGMA[cat] * rng.standard_normal(n))
        channel = _grouped_choice(
            cat, self._channel_cum_shifted if covariate else _CHANNEL_CUM, rng.random(n)
        )
        p_foreign = _CAT_FOREIGN[cat] + _ONLINE_FOREIGN_BONUS * (channel == _ONLINE)
        if covariate:
            factor = 1.0 + strength * (_COVARIATE_FOREIGN - 1.0)
            p_foreign = np.minimum(p_foreign * factor, 0.9)
        home = cards.home[card]
        travelled = np.searchsorted(_COUNTRY_CUM, rng.random(n), side="right").clip(
            0, _N_COUNTRY - 1
        )
        travelled = np.where(travelled == home, _uniform_foreign(rng, home), travelled)
        country = np.where(rng.random(n) < p_foreign, travelled, home)
        return _Rows(
            t,
            card,
            merchant,
            amount,
            channel,
            country,
            np.full(n, _P_LEGIT, dtype=np.uint8),
            np.zeros(n, dtype=bool),
        )

    def _card_testing(self, rng: np.random.Generator, budget: int, s: int, e: int) -> _Rows:
        """Compromised cards: 3-6 small online charges seconds apart, then a large one."""
        n_bursts = int(budget / 5.5 + rng.random())
        tests = rng.integers(3, 7, n_bursts)
        size = tests + 1
        total = int(size.sum())
        burst = np.repeat(np.arange(n_bursts), size)
        first = np.cumsum(size) - size
        pos = np.arange(total) - first[burst]
        large = pos == tests[burst]
        gaps = np.where(large, rng.uniform(60, 600, total), rng.exponential(40.0, total))
        gaps[pos == 0] = 0.0
        cs = np.cumsum(gaps)
        offset = ((cs - cs[first][burst]) * _US).astype(np.int64)
        t = rng.integers(s, e, n_bursts)[burst] + offset
        card = rng.integers(0, self._cards.home.size, n_bursts)
        home = self._cards.home[card]
        country = np.where(rng.random(n_bursts) < 0.25, _uniform_foreign(rng, home), home)
        large_cat = np.searchsorted(
            _cum(_weights_over_categories(_TESTING_LARGE_CATEGORY_W)), rng.random(total), "right"
        )
        cat = np.where(large, large_cat, _CAT_INDEX["digital_goods"])
        merchant = self._merchants.pick(cat, rng.random(total))
        amount = np.where(
            large,
            rng.lognormal(math.log(700.0), 0.45, total),
            np.round(rng.uniform(0.5, 4.99, total), 2),
        )
        keep = t < e
        rows = _Rows(
            t,
            card[burst],
            merchant,
            amount,
            np.full(total, _ONLINE),
            country[burst],
            np.full(total, _P_TESTING, dtype=np.uint8),
            np.ones(total, dtype=bool),
        )
        return rows.take(np.flatnonzero(keep))

    def _foreign_high(self, rng: np.random.Generator, n: int, s: int, e: int) -> _Rows:
        """Stolen card details used abroad for large purchases."""
        card = rng.integers(0, self._cards.home.size, n)
        cat = np.searchsorted(
            _cum(_weights_over_categories(_FOREIGN_HIGH_CATEGORY_W)), rng.random(n), "right"
        )
        channel = np.where(rng.random(n) < 0.6, _ONLINE, CHANNELS.index("pos"))
        return _Rows(
            rng.integers(s, e, n),
            card,
            self._merchants.pick(cat, rng.random(n)),
            rng.lognormal(math.log(650.0), 0.6, n),
            channel,
            _uniform_foreign(rng, self._cards.home[card]),
            np.full(n, _P_FOREIGN, dtype=np.uint8),
            np.ones(n, dtype=bool),
        )

    def _risky_merchant(self, rng: np.random.Generator, n: int, s: int, e: int) -> _Rows:
        """Fraud concentrated at the few merchants with latent risk (compromised terminals)."""
        cards, merchants = self._cards, self._merchants
        risky = np.flatnonzero(merchants.risky)
        merchant = risky[rng.integers(0, risky.size, n)]
        cat = merchants.category[merchant]
        card = np.searchsorted(
            cards.cum_activity, rng.random(n) * cards.cum_activity[-1], side="right"
        ).clip(0, cards.home.size - 1)
        profile = cards.profile[card]
        amount = np.exp(
            _CAT_MU[cat]
            + 0.6
            + _PROFILE_AMOUNT_SHIFT[profile]
            + _CAT_SIGMA[cat] * rng.standard_normal(n)
        )
        home = cards.home[card]
        country = np.where(rng.random(n) < _CAT_FOREIGN[cat], _uniform_foreign(rng, home), home)
        return _Rows(
            rng.integers(s, e, n),
            card,
            merchant,
            amount,
            _grouped_choice(cat, _CHANNEL_CUM, rng.random(n)),
            country,
            np.full(n, _P_RISKY, dtype=np.uint8),
            np.ones(n, dtype=bool),
        )

    def _shift_concept(self, rng: np.random.Generator, rows: _Rows) -> None:
        """Same inputs, new mechanism: foreign-high and risky-merchant rows turn legit, and as
        many domestic mid-amount rows in a previously safe category turn fraud.

        Below full strength only that share of the old-mechanism rows (drawn at random) turns.
        """
        old = np.flatnonzero((rows.pattern == _P_FOREIGN) | (rows.pattern == _P_RISKY))
        strength = self.config.drift_strength
        if strength < 1.0:
            old = rng.choice(old, size=round(strength * old.size), replace=False)
        rows.fraud[old] = False
        candidates = np.flatnonzero(
            (rows.pattern == _P_LEGIT)
            & (self._merchants.category[rows.merchant] == _CAT_INDEX[_CONCEPT_CATEGORY])
            & (rows.country == self._cards.home[rows.card])
            & (rows.amount >= _CONCEPT_AMOUNT[0])
            & (rows.amount <= _CONCEPT_AMOUNT[1])
            & (True if self._concept_merchants is None else self._concept_merchants[rows.merchant])
        )
        chosen = rng.choice(candidates, size=min(old.size, candidates.size), replace=False)
        rows.fraud[chosen] = True
        rows.pattern[chosen] = _P_CONCEPT
