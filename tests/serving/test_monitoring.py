"""Prediction log -> compacted parquet -> labels joined -> live metrics and serving drift."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from models.metrics import average_precision
from models.spec import Slicing
from serving.monitoring import (
    append_live_quality,
    availability,
    availability_findings,
    compact,
    event_window,
    join_labels,
    live_metrics,
    live_quality,
    live_quality_row,
    read_compacted,
    read_live_quality,
    schema_skew,
    serving_drift,
)
from serving.prediction_log import PredictionLog
from tests.models.testkit import SLICING

T0 = datetime(2026, 11, 20, tzinfo=UTC)


def _record(i: int, p: float, *, amount: float = 20.0, status: int = 200, tid: str | None = None):
    if status != 200:
        return {"logged_at": T0.isoformat(), "status": status, "model_version": "v0001"}
    return {
        "logged_at": (T0 + timedelta(seconds=i)).isoformat(),
        "status": 200,
        "model_version": "v0001",
        "transaction_id": tid or f"t{i}",
        "request": {
            "transaction_id": tid or f"t{i}",
            "card_id": f"c{i % 5}",
            "merchant_id": "m1",
            "amount": amount,
            "channel": "online" if i % 2 else "pos",
            "country": "US",
            "timestamp": (T0 + timedelta(seconds=i)).isoformat(),
        },
        "features": {"card_amount_mean_30d": amount, "merchant_category": "grocery"},
        "missing_features": [],
        "unknown_entities": [],
        "fraud_probability": p,
        "decision": "decline" if p >= 0.5 else "approve",
        "latency_ms": 3.0,
    }


def _write(log_dir, records):
    log = PredictionLog(log_dir, max_file_age_s=0.0).start()
    for r in records:
        log.log(r)
    log.close()


def test_compaction_keeps_real_traffic_once_and_drops_synthetic(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "compacted"
    _write(
        logs,
        [_record(i, 0.1) for i in range(10)]
        + [_record(99, 0.2, tid="shadow:1:t3"), _record(0, 0.0, status=400)],
    )
    first = compact(logs, out)
    assert first.rows == 11 and first.errors == 1  # 10 answered + 1 refused, no shadow
    assert compact(logs, out).files == 0  # nothing new: nothing rewritten
    _write(logs, [_record(i, 0.3) for i in range(10, 15)])
    assert compact(logs, out).rows == 5
    frame = read_compacted(out)
    assert frame.height == 16
    assert frame.filter(pl.col("transaction_id").str.starts_with("shadow:")).height == 0
    assert frame.schema["logged_at"] == pl.Datetime("us", "UTC")
    assert {"card_id", "amount", "card_amount_mean_30d", "merchant_category"} <= set(frame.columns)


def test_late_labels_join_and_live_metrics_per_slice(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "compacted"
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.2
    scores = np.where(labels, 0.6 + 0.3 * rng.random(200), 0.4 * rng.random(200))
    _write(logs, [_record(i, float(scores[i])) for i in range(200)] + [_record(0, 0.9)])
    compact(logs, out)
    known = pl.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(150)],  # the last 50 not labelled yet
            "is_fraud": labels[:150].tolist(),
            "label_timestamp": [T0 + timedelta(days=3)] * 150,
        }
    )
    joined = join_labels(read_compacted(out), known)
    assert joined.height == 200  # the retried t0 counts once
    assert joined["label"].null_count() == 50
    slicing = Slicing(("channel", "amount_bucket"), SLICING.buckets)
    report = live_metrics(joined, 0.5, slicing)
    assert report.support == 150
    assert report.metrics["pr_auc"] == pytest.approx(1.0)
    assert {s.column for s in report.slices} == {"channel", "amount_bucket"}
    unlabelled = joined.with_columns(pl.lit(None).alias("label"))
    assert live_metrics(unlabelled, 0.5, Slicing()) is None


def test_serving_drift_sees_shifted_amounts_and_schema_skew():
    rng = np.random.default_rng(1)
    reference = pl.DataFrame(
        {
            "amount": rng.lognormal(3, 1, 5000),
            "country": rng.choice(["US", "GB"], 5000).tolist(),
            "fraud_probability": rng.beta(1, 30, 5000),
        }
    )
    same = reference.sample(2000, seed=2)
    assert (
        serving_drift(reference, same, ["amount", "fraud_probability"], ["country"]).max_psi < 0.1
    )
    shifted = pl.DataFrame(
        {
            "amount": rng.lognormal(4, 1, 2000),
            "country": rng.choice(["US", "NG"], 2000).tolist(),
            "fraud_probability": rng.beta(2, 10, 2000),
        }
    )
    result = serving_drift(reference, shifted, ["amount", "fraud_probability"], ["country"])
    assert set(result.drifted(0.2)) == {"amount", "fraud_probability", "country"}
    assert result.feature("amount").ks > 0.3
    assert result.feature("country").js is not None
    findings = schema_skew(result)
    assert any("unexpected categories ['NG']" in f for f in findings)
    missing = serving_drift(reference, shifted.drop("amount"), ["amount"], ["country"])
    assert any("amount: missing in 100% of requests" in f for f in schema_skew(missing))


def test_compaction_reads_batches_logged_as_columns(tmp_path):
    """The handler logs a scored batch as one line of columns; compaction sees its rows."""
    logs, out = tmp_path / "logs", tmp_path / "compacted"
    records = [_record(i, 0.1 * i) for i in range(4)]
    shared = {k: records[0][k] for k in ("status", "model_version", "latency_ms")}
    rows = {
        k: (
            {f: [r[k][f] for r in records] for f in records[0][k]}
            if isinstance(records[0][k], dict)
            else [r[k] for r in records]
        )
        for k in records[0]
        if k not in shared
    }
    log = PredictionLog(logs, max_file_age_s=0.0).start()
    log.log_rows(shared, rows, len(records))
    log.log(_record(0, 0.0, status=400))
    log.close()
    assert compact(logs, out).rows == 5
    frame = read_compacted(out).filter(pl.col("status") == 200).sort("transaction_id")
    assert frame["transaction_id"].to_list() == ["t0", "t1", "t2", "t3"]
    assert frame["fraud_probability"].to_list() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert frame["card_id"].to_list() == ["c0", "c1", "c2", "c3"]
    assert frame["card_amount_mean_30d"].to_list() == [20.0] * 4


CARD_FEATURES = ("card_amount_mean_30d", "card_home_country")


def _served(i: int, *, unknown_card: bool, merchant_age: float | None = 3600.0):
    """A scored request as the handler logs it: features, what was missing, online row ages."""
    record = _record(i, 0.1)
    record["features"] = {
        "card_amount_mean_30d": None if unknown_card else 20.0,
        "card_home_country": None if unknown_card else "US",
        "merchant_category": "grocery" if merchant_age is not None else None,
    }
    record["missing_features"] = [
        *(CARD_FEATURES if unknown_card else ()),
        *(("merchant_category",) if merchant_age is None else ()),
    ]
    record["unknown_entities"] = ["card"] if unknown_card else []
    record["feature_age_s"] = {
        "card_stats_fv": None if unknown_card else 60.0 * (i + 1),
        "merchant_stats_fv": merchant_age,
    }
    return record


def test_availability_counts_unknown_entities_missing_features_and_row_ages(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "compacted"
    records = [
        _served(i, unknown_card=i < 3, merchant_age=None if i == 9 else 7200.0) for i in range(10)
    ]
    _write(logs, [*records, _record(0, 0.0, status=400)])
    compact(logs, out)
    frame = read_compacted(out)
    assert frame.schema["missing_features"] == pl.List(pl.String)
    assert frame.schema["feature_age_s__card_stats_fv"] == pl.Float64

    measured = availability(frame)  # the refused request is not a request scored
    assert measured.requests == 10
    assert measured.unknown_entity_rate == pytest.approx(0.3)
    assert measured.unknown_entity_rate_by == {"card": pytest.approx(0.3)}
    assert measured.missing_rate["card_home_country"] == pytest.approx(0.3)
    assert measured.missing_rate["merchant_category"] == pytest.approx(0.1)
    assert measured.missing_rate["amount"] == 0.0  # the request's own fields are never missing
    ages = np.array([60.0 * (i + 1) for i in range(3, 10)])
    assert measured.staleness_p95_s["card_stats_fv"] == pytest.approx(np.quantile(ages, 0.95))
    assert measured.staleness_p50_s["merchant_stats_fv"] == pytest.approx(7200.0)
    assert measured.no_row_rate == {
        "card_stats_fv": pytest.approx(0.3),
        "merchant_stats_fv": pytest.approx(0.1),
    }
    assert measured.window_end == T0 + timedelta(seconds=9)

    findings = availability_findings(
        measured,
        max_unknown_entity_rate=0.01,
        max_missing_rate=0.05,
        max_staleness_s={"merchant_stats_fv": 3600.0, "card_stats_fv": 86400.0},
    )
    assert findings[0].startswith("unknown entities in 30.0% of requests (> 1.0%): card 30.0%")
    assert "3 features missing in more than 5% of requests" in findings[1]
    assert "card_home_country 30%" in findings[1]
    assert findings[2].startswith("merchant_stats_fv: online rows 2.0 h old at p95")
    assert len(findings) == 3
    healthy = availability(frame.filter(pl.col("unknown_entity").not_()).head(6))
    assert (
        availability_findings(
            healthy, max_unknown_entity_rate=0.01, max_missing_rate=0.05, max_staleness_s={}
        )
        == []
    )


def test_availability_of_logs_written_before_missing_lists_reads_nulls():
    old = pl.DataFrame(
        {
            "status": [200] * 4,
            "unknown_entity": [True, False, False, False],
            "card_home_country": [None, "US", "US", "GB"],
        }
    )
    measured = availability(old)
    assert measured.missing_rate == {"card_home_country": pytest.approx(0.25)}
    assert measured.staleness_p95_s == {} and measured.unknown_entity_rate == 0.25


def test_drift_is_measured_on_present_values_and_missing_is_not_drift():
    rng = np.random.default_rng(3)
    countries = ["US", "GB", "FR", "DE", "NG", "BR", "IN", "JP"]
    reference = pl.DataFrame(
        {
            "card_home_country": rng.choice(countries, 5000).tolist(),
            "card_amount_mean_30d": rng.lognormal(3, 1, 5000),
            "merchant_category": rng.choice(["grocery", "travel"], 5000).tolist(),
        }
    )
    # 90% of requests scored without card features (unknown cards), merchant features absent
    # in every request: the values that are there come from the same distribution.
    serving = (
        reference.sample(3000, seed=4)
        .with_columns(
            pl.when(pl.int_range(pl.len()) % 10 != 0).then(None).otherwise(pl.col(c)).alias(c)
            for c in ("card_home_country", "card_amount_mean_30d")
        )
        .with_columns(pl.lit(None, dtype=pl.String).alias("merchant_category"))
    )
    numeric, categorical = ["card_amount_mean_30d"], ["card_home_country", "merchant_category"]

    result = serving_drift(reference, serving, numeric, categorical, min_present=50)
    home = result.feature("card_home_country")
    assert home.null_rate_current == pytest.approx(0.9)
    assert home.count == 300 and home.psi < 0.1  # present values: no drift
    assert result.feature("card_amount_mean_30d").psi < 0.1
    # Present nowhere: no PSI at all (it read 8.5 before: the demo's false "drift" alarm).
    assert np.isnan(result.feature("merchant_category").psi)
    assert result.drifted(0.2) == [] and result.max_psi < 0.1
    assert any("merchant_category: missing in 100%" in f for f in schema_skew(result))
    # Too few present values to describe a distribution: not measured either.
    sparse = serving_drift(reference, serving, numeric, categorical, min_present=500)
    assert np.isnan(sparse.feature("card_home_country").psi)


DAY = timedelta(days=1)


def _served_with_labels(seed: int, days: int = 40, per_day: int = 400):
    """Calibrated predictions over ``days``; labels as the simulator delays them (fraud 1-10
    days after the transaction, legit after 7), known as of the end of the period."""
    rng = np.random.default_rng(seed)
    n = days * per_day
    t = np.sort(rng.uniform(0, days * 86400.0, n))
    p = 1.0 / (1.0 + np.exp(-(-5.0 + 2.0 * rng.normal(size=n))))
    fraud = rng.random(n) < p
    delay = np.where(fraud, rng.uniform(1, 10, n), 7.0) * 86400.0
    now = days * 86400.0
    known = t + delay <= now
    times = [T0 + timedelta(seconds=float(s)) for s in t]
    predictions = pl.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(n)],
            "timestamp": times,
            "fraud_probability": p,
            "label": pl.Series(np.where(known, fraud, None).tolist(), dtype=pl.Int8),
            "label_timestamp": [
                T0 + timedelta(seconds=float(s + d)) if k else None
                for s, d, k in zip(t, delay, known, strict=True)
            ],
        }
    )
    newest_label = predictions["label_timestamp"].max()
    return predictions, newest_label, fraud


def test_live_quality_scores_a_label_mature_cohort_without_fraud_bias():
    predictions, newest_label, fraud = _served_with_labels(0)
    quality = live_quality(predictions, newest_label, label_maturity=7 * DAY, window=7 * DAY)
    assert quality.cohort_end == newest_label - 7 * DAY
    assert quality.cohort_start == quality.cohort_end - 7 * DAY
    in_cohort = predictions.filter(
        (pl.col("timestamp") > quality.cohort_start) & (pl.col("timestamp") <= quality.cohort_end)
    )
    true_rate = float(
        fraud[predictions["timestamp"].is_in(in_cohort["timestamp"]).to_numpy()].mean()
    )
    assert quality.labelled >= 0.97 * in_cohort.height  # nearly every label is in
    assert quality.positives / quality.labelled == pytest.approx(true_rate, rel=0.1)
    # The naive window (every labelled prediction of the last week) has the frauds labelled
    # early but not the legit ones: its fraud rate is several times the truth.
    naive = predictions.filter(
        (pl.col("timestamp") > newest_label - 7 * DAY) & pl.col("label").is_not_null()
    )
    assert naive["label"].mean() > 3 * true_rate
    # Realised and label-free estimate agree on calibrated scores.
    assert quality.value is not None and quality.estimated is not None
    assert abs(quality.estimate_error) < 0.06
    assert quality.recent == predictions.filter(pl.col("timestamp") > quality.cohort_end).height
    recent = predictions.filter(pl.col("timestamp") > quality.cohort_end)
    fraud_recent = fraud[-recent.height :].astype(float)
    realised_recent = average_precision(fraud_recent, recent["fraud_probability"].to_numpy())
    assert quality.estimated_unlabelled == pytest.approx(realised_recent, abs=0.08)


def test_live_quality_before_any_label_and_with_one_class_only():
    predictions, _, _ = _served_with_labels(1, days=5, per_day=50)
    none_yet = live_quality(predictions.with_columns(pl.lit(None, pl.Int8).alias("label")), None)
    assert none_yet.cohort_end is None and none_yet.labelled == 0
    assert none_yet.value is None and none_yet.estimate_error is None
    assert none_yet.recent == predictions.height
    assert 0.0 < none_yet.estimated_unlabelled < 1.0
    legit_only = predictions.with_columns(pl.lit(0, pl.Int8).alias("label"))
    newest = predictions["timestamp"].max() + 7 * DAY
    quality = live_quality(legit_only, newest)
    assert quality.labelled == predictions.height and quality.positives == 0
    assert quality.value is None and quality.estimated is not None


def test_live_quality_rows_append_and_read_back_oldest_first(tmp_path):
    predictions, newest_label, _ = _served_with_labels(2, days=20, per_day=100)
    quality = live_quality(predictions, newest_label)
    monitoring = tmp_path / "monitoring"
    assert read_live_quality(tmp_path).height == 0  # a home without any point yet
    for k in range(2):
        at = T0 + timedelta(days=30 + k)
        row = live_quality_row(quality, at=at, label_batch=f"labels-{k}", champion="v0001")
        append_live_quality(row, monitoring)
    frame = read_live_quality(tmp_path)
    assert frame["label_batch"].to_list() == ["labels-0", "labels-1"]
    assert frame.schema["cohort_end"] == pl.Datetime("us", "UTC")
    assert frame["estimate_error"][0] == pytest.approx(quality.estimate_error)
    assert read_live_quality(monitoring / "live_quality.parquet").equals(frame)


def test_the_window_is_event_time_whatever_the_wall_clock_said():
    hours = 72
    served = pl.DataFrame(
        {
            "timestamp": [T0 + timedelta(minutes=6 * i) for i in range(hours * 10)],
            # Logged within a minute of wall-clock time, as the accelerated demo does.
            "logged_at": [T0 + timedelta(milliseconds=80 * i) for i in range(hours * 10)],
            "fraud_probability": [0.01] * (hours * 10),
        }
    )
    day = event_window(served, hours=24, min_rows=100, max_rows=10_000)
    assert day.height == 240 and day["timestamp"].min() > T0 + timedelta(hours=47)
    widened = event_window(served, hours=24, min_rows=500, max_rows=10_000)
    assert widened.height == 500 and widened["timestamp"].max() == served["timestamp"].max()
    sampled = event_window(served, hours=24, min_rows=100, max_rows=60)
    assert sampled.height == 60
    span = sampled["timestamp"].max() - sampled["timestamp"].min()
    assert span > timedelta(hours=20)  # a sample across the day, not its last hour
    assert event_window(served.head(0), hours=24, min_rows=1, max_rows=10).height == 0
