"""Monitoring's windows read the compacted files their event time reaches, and give what a read
of the whole log gives: the drift/availability window, the live-quality cohort and its labels."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import serving.monitoring
from serving.monitoring import (
    MERGING,
    answered_once,
    compact,
    compacted_spans,
    event_window,
    join_labels,
    judged_since,
    live_quality,
    merge_small,
    read_compacted,
    served_window,
)
from serving.prediction_log import PredictionLog
from serving.time_spans import spans

T0 = datetime(2026, 6, 1, tzinfo=UTC)
DAYS, PER_DAY, PROMOTED_ON = 40, 60, 30


def _record(day: float, i: str, version: str, p: float) -> dict:
    at = (T0 + timedelta(days=day)).isoformat()
    return {
        "logged_at": datetime.now(UTC).isoformat(),
        "status": 200,
        "model_version": version,
        "transaction_id": i,
        "request": {"transaction_id": i, "card_id": "c1", "amount": 10.0, "timestamp": at},
        "features": {"card_amount_mean_30d": 10.0},
        "missing_features": [],
        "unknown_entities": [],
        "fraud_probability": p,
        "latency_ms": 2.0,
    }


def _history(tmp_path, rng) -> tuple:
    """40 compacted files, a day of event time each; v2 promoted on day 30; a request retried
    across that promotion (its first answer v1's); day 35's file also holds late day-10
    events. Returns the compacted folder and every request's (id, day, fraud)."""
    logs, out = tmp_path / "logs", tmp_path / "compacted"
    truth = []
    for day in range(DAYS):
        version = "v2" if day >= PROMOTED_ON else "v1"
        times = np.sort(day + rng.random(PER_DAY))
        if day == 35:
            times = np.concatenate([10 + rng.random(5), times])
        fraud = rng.random(times.size) < 0.1
        scores = np.clip(0.5 * fraud + 0.5 * rng.random(times.size), 0, 1)
        records = [
            _record(t, f"d{day}-{k}", version, float(s))
            for k, (t, s) in enumerate(zip(times, scores, strict=True))
        ]
        truth += [(f"d{day}-{k}", t, f) for k, (t, f) in enumerate(zip(times, fraud, strict=True))]
        if day == PROMOTED_ON - 1:
            records.append(_record(PROMOTED_ON - 0.5, "retried", "v1", 0.2))
        if day == PROMOTED_ON:
            records.append(_record(PROMOTED_ON - 0.5, "retried", "v2", 0.9))
        log = PredictionLog(logs, max_file_age_s=3600.0).start()
        log.log_many(records)
        log.close()
        assert compact(logs, out).files == 1
    return out, truth


def label_frame(known: list[tuple[str, datetime, bool]]) -> pl.DataFrame:
    """Labels in the fraud use case's columns from (request id, label time, fraud)."""
    return pl.DataFrame(
        {
            "transaction_id": [k[0] for k in known],
            "is_fraud": [k[2] for k in known],
            "label_timestamp": [k[1] for k in known],
        },
        schema={
            "transaction_id": pl.String,
            "is_fraud": pl.Boolean,
            "label_timestamp": pl.Datetime("us", "UTC"),
        },
    )


def _labels(truth, as_of_day: float) -> pl.DataFrame:
    """Labels known by ``as_of_day``: fraud 2 days after the request, legit 7."""
    timed = [(i, t + (2 if f else 7), bool(f)) for i, t, f in truth]
    return label_frame([(i, T0 + timedelta(days=d), f) for i, d, f in timed if d <= as_of_day])


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    return _history(tmp_path_factory.mktemp("history"), np.random.default_rng(7))


@pytest.mark.parametrize(
    ("version", "hours", "min_rows", "max_rows", "most_files"),
    [
        ("v2", 24.0, 50, 10_000, 2),  # a day of the newest traffic
        ("v2", 24.0, 400, 10_000, 8),  # a quiet day: widened to the newest 400
        ("v2", 72.0, 50, 100, 4),  # three days, sampled
        ("v1", 24.0, 50, 10_000, 16),  # rolled back to v1: its newest rows are 10 days old
    ],
)
def test_the_served_window_reads_the_newest_files_and_equals_the_whole_logs(
    history, version, hours, min_rows, max_rows, most_files
):
    out, _ = history
    everything = answered_once(read_compacted(out)).filter(pl.col("model_version") == version)
    expected = event_window(everything, hours=hours, min_rows=min_rows, max_rows=max_rows)

    window, files_read = served_window(
        compacted_spans(out), version, hours=hours, min_rows=min_rows, max_rows=max_rows
    )

    assert expected.height >= min(min_rows, max_rows)
    assert_frame_equal(window, expected.select(window.columns))
    assert files_read <= most_files < DAYS


def test_the_live_quality_cohort_reads_the_files_reaching_it_and_equals_the_whole_logs(history):
    out, truth = history
    labels = _labels(truth, as_of_day=DAYS)
    newest = labels["label_timestamp"].max()
    maturity, window = timedelta(days=7), timedelta(days=7)
    start = newest - maturity - window
    whole = join_labels(read_compacted(out), labels).filter(pl.col("model_version") == "v2")
    expected = live_quality(whole, newest, label_maturity=maturity, window=window)

    predictions, files_read = judged_since(compacted_spans(out), start)
    judged = join_labels(predictions, labels).filter(pl.col("model_version") == "v2")
    got = live_quality(judged, newest, label_maturity=maturity, window=window)

    assert got == expected
    assert expected.labelled > 100 and expected.value is not None and expected.recent > 100
    # The files whose events reach the cohort's start (about 14 days of them), not all 40.
    assert files_read <= 15 < DAYS
    assert "retried" not in judged["transaction_id"].to_list()  # v1 answered it first


def test_each_compacted_file_is_read_once_for_its_span(tmp_path, monkeypatch):
    out, _ = _history(tmp_path, np.random.default_rng(1))
    scanned: list[str] = []
    scan = pl.scan_parquet

    def spy(source, *args, **kwargs):
        scanned.append(str(source))
        return scan(source, *args, **kwargs)

    monkeypatch.setattr(pl, "scan_parquet", spy)
    first = compacted_spans(out)
    assert len(first) == DAYS and len(scanned) == DAYS
    assert compacted_spans(out) == first and len(scanned) == DAYS  # the index answers
    answered = [s.facts["answered"] for s in first]
    assert sum(a.get("v1", 0) for a in answered) == PROMOTED_ON * PER_DAY + 1  # and the retry
    assert sum(a.get("v2", 0) for a in answered) == (DAYS - PROMOTED_ON) * PER_DAY + 5 + 1
    late = next(s for s in first if s.rows == PER_DAY + 5)
    assert late.start < T0 + timedelta(days=11) and late.end > T0 + timedelta(days=35)


def test_a_champion_silent_since_before_the_cohort_has_an_empty_judged_window(history):
    out, truth = history
    labels = _labels(truth, as_of_day=DAYS + 30)
    newest = T0 + timedelta(days=DAYS + 30)  # a label a month on, and no traffic since
    start = newest - timedelta(days=14)
    predictions, files_read = judged_since(compacted_spans(out), start)
    judged = join_labels(predictions, labels).filter(pl.col("model_version") == "v2")
    whole = join_labels(read_compacted(out), labels).filter(pl.col("model_version") == "v2")

    got = live_quality(judged, newest)

    assert files_read == 0 and judged.height == 0
    assert got == live_quality(whole, newest) and got.labelled == 0 and got.recent == 0


def _rows(out) -> pl.DataFrame:
    return read_compacted(out).sort("transaction_id", "model_version")


def test_small_files_merge_oldest_first_and_the_windows_do_not_change(tmp_path):
    out, truth = _history(tmp_path, np.random.default_rng(3))
    before = _rows(out)
    window = {"hours": 24.0, "min_rows": 400, "max_rows": 10_000}
    expected, _ = served_window(compacted_spans(out), "v2", **window)

    assert merge_small(out, most_small=16) == 16
    spans = compacted_spans(out)
    assert len(spans) == DAYS - 16 + 1 and not (out / MERGING).exists()
    merged = max(spans, key=lambda s: s.rows)
    assert merged.rows == 16 * PER_DAY and merged.end < T0 + timedelta(days=16)
    assert_frame_equal(_rows(out), before.select(_rows(out).columns))
    got, _ = served_window(spans, "v2", **window)
    assert_frame_equal(got, expected)
    assert merge_small(out, most_small=DAYS) == 0  # few enough small files: nothing to do


def test_a_merge_cut_short_is_finished_or_forgotten_and_no_row_counts_twice(tmp_path, monkeypatch):
    out, _ = _history(tmp_path, np.random.default_rng(4))
    before = _rows(out).height

    def fail(*args, **kwargs):
        raise OSError("killed")

    with monkeypatch.context() as m:  # killed after the merged file, before the parts went
        m.setattr(Path, "unlink", fail)
        with pytest.raises(OSError):
            merge_small(out, most_small=16)
    assert (out / MERGING).exists() and read_compacted(out).height > before
    assert merge_small(out, most_small=DAYS) == 0
    assert _rows(out).height == before and not (out / MERGING).exists()

    with monkeypatch.context() as m:  # killed before the merged file was written
        m.setattr(serving.monitoring, "write_parquet_atomic", fail)
        with pytest.raises(OSError):
            merge_small(out, most_small=8)
    assert merge_small(out, most_small=DAYS) == 0
    assert _rows(out).height == before and len(compacted_spans(out)) == DAYS - 16 + 1


def test_a_file_deleted_while_it_is_listed_is_left_out_of_the_spans(history, monkeypatch):
    out, _ = history
    listed = sorted(out.glob("predictions-*.parquet"))
    gone = out / "predictions-deleted-by-retention.parquet"
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([*listed, gone]))
    assert [s.path for s in compacted_spans(out)] == listed


def test_naive_event_times_are_read_as_utc(tmp_path):
    naive = datetime(2026, 6, 2, 12, 30)
    pl.DataFrame({"label_timestamp": [naive]}).write_parquet(tmp_path / "labels-1.parquet")
    [span] = spans(tmp_path, "*.parquet", "label_timestamp", tmp_path / "index.json")
    assert span.end == naive.replace(tzinfo=UTC) and span.rows == 1
