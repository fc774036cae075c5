"""Prediction log -> compacted parquet -> labels joined -> live metrics and serving drift."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from serving.monitoring import (
    compact,
    join_labels,
    live_metrics,
    read_compacted,
    schema_skew,
    serving_drift,
)
from serving.prediction_log import PredictionLog

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
    report = live_metrics(joined, 0.5, ("channel", "amount_bucket"))
    assert report.support == 150
    assert report.metrics["pr_auc"] == pytest.approx(1.0)
    assert {s.column for s in report.slices} == {"channel", "amount_bucket"}
    assert live_metrics(joined.with_columns(pl.lit(None).alias("label")), 0.5, ()) is None


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
