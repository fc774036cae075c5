"""The delivery demo, a regression beside the fraud demo's classifier: its declaration loads,
its data is deterministic and drifts as documented, its features are point in time and
incremental, and (in its own process, as the platform runs it) it trains, beats its linear
baseline on MAE at the gate and answers REST requests in minutes with no decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from core.usecase import REPO_ROOT, load
from features.views import CREATED, TS, ViewBatch, views
from quality.schema import schemas

USECASE = load("delivery")
SIM = USECASE.module("simulator")
START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
CONFIG = SIM.ScenarioConfig(seed=3, start=START, rows_per_batch=150)
VIEWS = views(USECASE)


def test_the_declaration_is_a_regression_with_its_own_entities():
    assert USECASE.task.type == "regression" and USECASE.task.score == "predicted_minutes"
    assert USECASE.request.entity_keys == ("restaurant_id", "courier_id")
    assert USECASE.label.column == "delivery_minutes" and USECASE.label_maturity == timedelta(
        hours=3
    )
    assert set(VIEWS) == {"restaurant_stats_fv", "courier_stats_fv"}


def test_the_data_is_deterministic_and_every_order_is_delivered_once_within_three_hours():
    a, b = SIM.Simulator(CONFIG), SIM.Simulator(CONFIG)
    hours = 30
    orders = pl.concat([a.events(k)["orders"] for k in range(hours)])
    assert orders.equals(pl.concat([b.events(k)["orders"] for k in range(hours)]))
    assert orders.schema == pl.Schema(schemas(USECASE)["orders"])
    deliveries = pl.concat([a.events(k)["deliveries"] for k in range(hours + 4)])
    joined = orders.join(deliveries, on="order_id", how="left")
    assert joined["delivery_minutes"].null_count() == 0
    assert deliveries["order_id"].is_unique().all()
    waited = joined["delivered_at"] - joined["event_timestamp"]
    assert (waited > timedelta(0)).all() and (waited <= timedelta(hours=3)).all()
    # Lunch and dinner are busier than the night.
    by_hour = orders.group_by(pl.col("event_timestamp").dt.hour().alias("h")).len()
    count = dict(by_hour.iter_rows())
    assert count.get(12, 0) > 4 * count.get(3, 0) and count.get(19, 0) > 4 * count.get(3, 0)


def test_rain_slows_deliveries_without_changing_the_orders_and_new_restaurants_open():
    plain = SIM.Simulator(CONFIG)
    rain = SIM.Simulator(SIM.ScenarioConfig(**{**CONFIG.__dict__, "drift": "concept"}))
    hours = range(24)
    truth = pl.concat([plain.truth(k) for k in hours])
    wet = pl.concat([rain.truth(k) for k in hours])
    orders = pl.concat([plain.events(k)["orders"] for k in hours])
    assert orders.equals(pl.concat([rain.events(k)["orders"] for k in hours]))
    assert wet["delivery_minutes"].mean() > truth["delivery_minutes"].mean() + 5

    moved = SIM.Simulator(
        SIM.ScenarioConfig(**{**CONFIG.__dict__, "drift": "covariate", "drift_strength": 0.4})
    )
    after = pl.concat([moved.events(k)["orders"] for k in hours])
    opened = after["restaurant_id"] >= f"r{CONFIG.n_restaurants:05d}"
    assert 0.3 < opened.mean() < 0.5
    assert after["distance_km"].mean() > orders["distance_km"].mean() + 0.5
    assert not (orders["restaurant_id"] >= f"r{CONFIG.n_restaurants:05d}").any()


def _rows(view: str, batch_dataset: str, rows, known: dict, created) -> pl.DataFrame:
    def read(dataset, since=None, *, with_batch=False):
        frame = known[dataset]
        time = USECASE.datasets[dataset].event_time
        return frame if since is None or time is None else frame.filter(pl.col(time) >= since)

    return VIEWS[view].compute(ViewBatch(batch_dataset, rows, created, read))


def test_a_training_set_keeps_the_delivered_minutes_as_they_are():
    """A regressor's label is its value: 47.5 minutes stays 47.5, a 3-hour delivery 180."""
    from features.training_set import LABEL, labelled_requests

    sim = SIM.Simulator(CONFIG)
    orders = pl.concat([sim.events(k)["orders"] for k in range(30)])
    truth = pl.concat([sim.truth(k) for k in range(30)])
    slow = truth.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(180.0)
        .otherwise(pl.col("delivery_minutes"))
        .alias("delivery_minutes")
    )
    rows = labelled_requests(orders, slow, uc=USECASE)
    assert rows[LABEL].dtype == pl.Float64 and rows.height > 1000
    joined = rows.join(slow, on="order_id")
    assert (joined[LABEL] == joined["delivery_minutes"]).all()
    assert 180.0 in rows[LABEL].to_list() and (rows[LABEL] % 1 != 0).any()
    with pytest.raises(ValueError, match="for a classifier"):
        labelled_requests(orders, slow, uc=USECASE, presume_negative_after=timedelta(hours=1))


def test_restaurant_features_are_point_in_time_and_batches_agree_with_one_pass():
    sim = SIM.Simulator(CONFIG)
    reference = sim.reference()
    created = datetime(2030, 1, 1, tzinfo=UTC)
    first = [sim.events(k) for k in range(6)]
    second = [sim.events(k) for k in range(6, 12)]
    o1 = pl.concat([e["orders"] for e in first])
    d1 = pl.concat([e["deliveries"] for e in first])
    o2 = pl.concat([e["orders"] for e in second])
    d2 = pl.concat([e["deliveries"] for e in second])
    empty = {"orders": o1.clear(), "deliveries": d1.clear(), **reference}
    # One pass: every order, then every delivery.
    whole = _rows("restaurant_stats_fv", "orders", pl.concat([o1, o2]), empty, created)
    whole_d = _rows(
        "restaurant_stats_fv", "deliveries", pl.concat([d1, d2]),
        {**empty, "orders": pl.concat([o1, o2])}, created,
    )  # fmt: skip
    # Step by step: orders 1, deliveries 1, orders 2, deliveries 2; the newest row per key wins.
    steps = pl.concat(
        [
            _rows("restaurant_stats_fv", "orders", o1, empty, created),
            _rows("restaurant_stats_fv", "deliveries", d1, {**empty, "orders": o1}, created),
            _rows("restaurant_stats_fv", "orders", o2, {**empty, "orders": o1, "deliveries": d1}, created),
            _rows(
                "restaurant_stats_fv", "deliveries", d2,
                {**empty, "orders": pl.concat([o1, o2]), "deliveries": d1}, created,
            ),
        ]
    )  # fmt: skip
    keys = ["restaurant_id", TS]
    final = pl.concat([whole, whole_d]).unique(keys, keep="last").sort(keys)
    stepped = steps.unique(keys, keep="last").sort(keys)
    assert stepped.select(keys).equals(final.select(keys))
    assert stepped.drop(CREATED).equals(final.drop(CREATED))
    # Brute force: the 7-day mean at a row is over deliveries of that restaurant known by then.
    orders, deliveries = pl.concat([o1, o2]), pl.concat([d1, d2])
    made = deliveries.join(orders.select("order_id", "restaurant_id"), on="order_id")
    for row in (
        stepped.filter(pl.col("restaurant_deliveries_7d") > 0)
        .sample(15, seed=2)
        .iter_rows(named=True)
    ):
        known = made.filter(
            (pl.col("restaurant_id") == row["restaurant_id"])
            & (pl.col("delivered_at") > row[TS] - timedelta(days=7))
            & (pl.col("delivered_at") <= row[TS])
        )
        assert row["restaurant_deliveries_7d"] == known.height
        assert row["restaurant_minutes_mean_7d"] == pytest.approx(known["delivery_minutes"].mean())


@pytest.mark.slow
def test_delivery_trains_beats_its_baseline_on_mae_and_answers_in_minutes(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "LOOPLINE_USECASE": "delivery", "LOOPLINE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.usecases.usecase_loop", str(tmp_path / "home"), str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["usecase"] == "delivery" and summary["failed_ingest_runs"] == 1
    status, reason = summary["ledger"][summary["users_bad"]]
    assert status == "quarantined" and "missing column 'order_id'" in reason
    assert summary["gate_passed"] and summary["champion"] == "v0001", summary["gate"]
    # MAE in minutes, below the linear baseline's by a margin (the rush and vehicle interact).
    assert summary["metric"] == "mae"
    assert summary["value"] < summary["baseline_value"] - 0.3
    assert summary["value"] < 5.0
    assert summary["deployed_ok"]
    for p in summary["predictions"]:
        assert 5.0 <= p["predicted_minutes"] <= 180.0 and "decision" not in p
        assert p["unknown_entities"] == [] and p["missing_features"] == []
    # The guarantees hold for it too: the training set's join equals Feast's, and online
    # scores equal batch scores of the same requests (float32 rounding apart).
    assert summary["asof_equals_feast"]
    online = [p["predicted_minutes"] for p in summary["predictions"]]
    assert online == pytest.approx(summary["batch_scores"], rel=1e-5, abs=1e-6)
    assert summary["malformed"]["status"] == 400 and summary["still_serving"]
    # Monitoring: a day of traffic and its truth give the live MAE, near the offline one, and
    # the label-free expected MAE agrees with it.
    live = summary["live"]
    assert live["evaluated"] and live["labelled"] == summary["traffic"] > 1000
    assert live["live_mae"] == pytest.approx(live["offline_mae"], rel=0.25)
    assert live["estimated_mae"] == pytest.approx(live["live_mae"], rel=0.15)
    assert "| zone=centre |" in live["slices"]
