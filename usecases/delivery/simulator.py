"""Deterministic food-delivery scenario: restaurants, couriers, orders and the minutes each
order took, known at delivery (usually 20-60 minutes later). It follows the simulator protocol of
``core.simulation``, which lands its batches, injects faults and runs it live.

Every number comes from ``ScenarioConfig.seed``: window ``k`` draws from RNG streams of
``(seed, stream, k)``, so any window regenerates alone, in any order, byte-identically.

What the data hides, for a model to learn: a delivery takes the kitchen's preparation (slow
kitchens, more items, the lunch and dinner rush) plus the ride (distance over the courier's
speed: bikes are slow, cars crawl in the rush). Orders follow the day, with peaks at lunch and
dinner. Drifts:

- ``concept``: rain. Bikes and scooters slow down and kitchens fall behind; the orders look the
  same, so only the delivered minutes show it (``drift_strength`` scales the slow-down).
- ``covariate``: new restaurants open across town: orders go farther, to kitchens with no
  history yet (``drift_strength``: the share of orders they take).
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
ZONES: tuple[str, ...] = USECASE.vocabularies["zone"]
CUISINES: tuple[str, ...] = USECASE.vocabularies["cuisine"]
VEHICLES: tuple[str, ...] = USECASE.vocabularies["vehicle"]
DRIFTS: tuple[str, ...] = ("none", "covariate", "concept")
# loopline backtest's shape (orchestration.backtest.demo_config): a day a step, about 2,000
# orders a day (its default rows_per_batch); 8 days for the 7-day restaurant features to fill,
# then 6 for the first champion's training set (the declared 5-day window and a day of
# maturing labels) before the served days.
BACKTEST: dict = {"burn_in_days": 8, "warmup_days": 6}
# loopline demo (orchestration.cli_loop.DemoPlan): labels mature in 3 hours, so a shorter story
# than the fraud demo's: a simulated day in 2 wall minutes, a 12-hour window (~1,440 orders, half
# sent as customer traffic) a minute, rain after a day of traffic, and two more days of rain
# once a champion trained on rainy deliveries serves.
DEMO: dict = {
    "speed": 720.0,
    "headroom_days": 14.0,
    "history_days": 21.0,
    "batch_hours": 12.0,
    "drift_after_hours": 24.0,
    "rows_per_batch": 1440,
    "traffic_per_batch": 720,
    "min_new_labelled_rows": None,
    "recovery_hours": 48.0,  # two days of rain more: the loop retrains on a rainier window
}

MAX_MINUTES = 180.0  # every order is delivered within 3 hours (the label's maturity)
_S_WORLD, _S_ORDERS, _S_TIMES = 1, 2, 3  # RNG streams (7 is core.simulation's faults)
_US = timedelta(microseconds=1)
_HOUR = timedelta(hours=1)
# Orders per hour of the day (UTC), relative: quiet nights, lunch and dinner peaks.
_HOURLY = np.array(
    [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 1.0, 1.8,
     2.6, 2.2, 1.2, 0.9, 0.9, 1.3, 2.2, 2.8, 2.4, 1.5, 0.8, 0.4]
)  # fmt: skip
_HOURLY = _HOURLY / _HOURLY.mean()
_RUSH = np.zeros(24, dtype=bool)
_RUSH[[11, 12, 13, 18, 19, 20]] = True
_SPEED_KMH = np.array([14.0, 22.0, 26.0])  # bike, scooter, car
_VEHICLE_P = np.array([0.5, 0.35, 0.15])
_ZONE_P = np.array([0.35, 0.2, 0.15, 0.15, 0.15])


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything that defines a scenario; two equal configs give byte-identical data.
    ``rows_per_batch`` is the expected order count of a batch at average intensity."""

    seed: int = 7
    n_restaurants: int = 60
    n_couriers: int = 80
    new_restaurants: int = 20  # open when covariate drift starts
    start: datetime | None = None
    batch_span: timedelta = timedelta(hours=1)
    rows_per_batch: int = 120
    drift: str = "none"
    drift_start_batch: int = 0
    drift_strength: float = 1.0

    def __post_init__(self) -> None:
        check_scenario(self, DRIFTS)
        if self.n_restaurants < 1 or self.n_couriers < 1 or self.new_restaurants < 0:
            raise ValueError("n_restaurants and n_couriers must be >= 1, new_restaurants >= 0")


class Simulator(Windows):
    """The scenario of one ``ScenarioConfig`` (the time grid and the window cache are
    ``core.simulation.Windows``')."""

    def __init__(self, config: ScenarioConfig | None = None) -> None:
        super().__init__(config or ScenarioConfig())
        cfg = self.config
        rng = stream_rng(cfg.seed, _S_WORLD)
        n = cfg.n_restaurants + cfg.new_restaurants
        self._zone = rng.choice(len(ZONES), size=n, p=_ZONE_P)
        self._cuisine = rng.integers(0, len(CUISINES), n)
        self._prep = rng.gamma(6.0, 2.0, n)  # minutes for one item, when the kitchen is calm
        self._popularity = rng.lognormal(0.0, 0.8, n)
        self._vehicle = rng.choice(len(VEHICLES), size=cfg.n_couriers, p=_VEHICLE_P)
        self._restaurants = [f"r{i:05d}" for i in range(n)]
        self._couriers = [f"k{i:05d}" for i in range(cfg.n_couriers)]

    # -- the simulator protocol -----------------------------------------------------------

    def reference(self) -> dict[str, pl.DataFrame]:
        """Restaurants (those opening later included) and couriers."""
        restaurants = pl.DataFrame(
            {
                "restaurant_id": self._restaurants,
                "cuisine": [CUISINES[c] for c in self._cuisine],
                "restaurant_zone": [ZONES[z] for z in self._zone],
            }
        )
        couriers = pl.DataFrame(
            {"courier_id": self._couriers, "vehicle": [VEHICLES[v] for v in self._vehicle]}
        )
        return {
            "restaurants": restaurants.cast(SCHEMAS["restaurants"]),
            "couriers": couriers.cast(SCHEMAS["couriers"]),
        }

    def events(
        self, k: int, *, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, pl.DataFrame]:
        """Window ``k``'s orders (or its sub-window's), then the deliveries made in it."""
        lo, hi = self.window(k)
        lo, hi = max(lo, since or lo), min(hi, until or hi)
        orders = self._batch(k).filter(pl.col("event_timestamp").is_between(lo, hi, "left"))
        first = max(0, self.batch_at(lo - timedelta(minutes=MAX_MINUTES)))
        delivered = pl.concat(
            [self._batch(j) for j in range(first, self.batch_at(hi - _US) + 1)]
        ).filter(pl.col("delivered_at").is_between(lo, hi, "left"))
        return {
            "orders": orders.select(list(SCHEMAS["orders"])),
            "deliveries": delivered.select(list(SCHEMAS["deliveries"])).sort(
                "delivered_at", "order_id"
            ),
        }

    def truth(self, k: int) -> pl.DataFrame:
        """The delivery of every order of window ``k``, whenever it is made."""
        return self._batch(k).select(list(SCHEMAS["deliveries"]))

    # -- generation -----------------------------------------------------------------------

    def _times(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Order times of window ``k`` (µs since the window's start), following the day."""
        lo, hi = self.window(k)
        span_us = (hi - lo) // _US
        hour_start = lo.replace(minute=0, second=0, microsecond=0)
        edges, weights = [], []
        t = hour_start
        while t < hi:
            a, b = max(t, lo), min(t + _HOUR, hi)
            edges.append(((a - lo) // _US, (b - lo) // _US))
            weights.append(_HOURLY[t.hour] * ((b - a) / _HOUR))
            t += _HOUR
        w = np.asarray(weights)
        expected = self.config.rows_per_batch * w.sum() / (self.config.batch_span / _HOUR)
        n = int(rng.poisson(expected))
        bins = rng.choice(len(w), size=n, p=w / w.sum()) if n else np.zeros(0, int)
        starts = np.array([e[0] for e in edges])[bins]
        widths = np.array([e[1] - e[0] for e in edges])[bins]
        offsets = starts + (rng.random(n) * widths).astype(np.int64)
        return np.sort(np.clip(offsets, 0, span_us - 1))

    def _generate(self, k: int) -> pl.DataFrame:
        cfg = self.config
        rng = stream_rng(cfg.seed, _S_ORDERS, k)
        drifted = cfg.drift != "none" and k >= cfg.drift_start_batch
        strength = cfg.drift_strength if drifted else 0.0
        offsets = self._times(k, stream_rng(cfg.seed, _S_TIMES, k))
        n = offsets.size
        lo, _ = self.window(k)
        at = pl.Series(offsets, dtype=pl.Int64).cast(pl.Duration("us")) + lo
        hour = ((lo.hour + offsets // (_HOUR // _US)) % 24).astype(np.int64)
        rush = _RUSH[hour]
        # Restaurants: the established ones; after covariate drift the new ones take a share.
        popularity = self._popularity.copy()
        new = slice(cfg.n_restaurants, None)
        if drifted and cfg.drift == "covariate" and cfg.new_restaurants:
            popularity[new] *= (
                strength
                * popularity[: cfg.n_restaurants].sum()
                / (max(popularity[new].sum(), 1e-9) * max(1.0 - strength, 1e-3))
            )
        else:
            popularity[new] = 0.0
        restaurant = rng.choice(popularity.size, size=n, p=popularity / popularity.sum())
        courier = rng.integers(0, cfg.n_couriers, n)
        vehicle = self._vehicle[courier]
        home = self._zone[restaurant]
        zone = np.where(rng.random(n) < 0.8, home, rng.choice(len(ZONES), size=n, p=_ZONE_P))
        opened = restaurant >= cfg.n_restaurants  # new kitchens deliver across town
        distance = rng.gamma(2.0, 1.2, n) + 1.5 * (zone != home) + 2.5 * opened
        distance = np.round(np.clip(distance, 0.2, 50.0), 2)
        items = 1 + rng.poisson(1.5, n)
        # The hidden truth: the kitchen, then the ride.
        prep = self._prep[restaurant] * (1 + 0.08 * (items - 1)) * np.where(rush, 1.5, 1.0)
        speed = _SPEED_KMH[vehicle] * np.where(rush & (vehicle == 2), 0.6, 1.0)
        if drifted and cfg.drift == "concept":  # rain
            speed = speed * np.array([1 - 0.45 * strength, 1 - 0.25 * strength, 1.0])[vehicle]
            prep = prep + 4.0 * strength
        minutes = 4.0 + prep + 60.0 * distance / speed + rng.normal(0.0, 3.0, n)
        minutes = np.round(np.clip(minutes, 5.0, MAX_MINUTES), 2)
        delivered = at + pl.Series((minutes * 60e6).astype(np.int64)).cast(pl.Duration("us"))
        return pl.DataFrame(
            {
                "order_id": [f"o{k:06d}-{i:06d}" for i in range(n)],
                "restaurant_id": [self._restaurants[r] for r in restaurant],
                "courier_id": [self._couriers[c] for c in courier],
                "zone": [ZONES[z] for z in zone],
                "distance_km": distance,
                "items": items.astype(np.int64),
                "event_timestamp": at.cast(UTC_TS),
                "delivery_minutes": minutes,
                "delivered_at": delivered.cast(UTC_TS),
            }
        )
