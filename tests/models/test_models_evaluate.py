from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from models import plots
from models.card import model_card
from models.evaluate import (
    EvaluationReport,
    evaluate_model,
    evaluate_scores,
    evaluation_markdown,
    predict,
    with_buckets,
)
from models.metrics import average_precision, best_f1_threshold, binary_metrics
from models.spec import Slicing
from models.train import train_baseline, train_model
from tests.models.testkit import FAST, SLICING, SPEC


@pytest.fixture(scope="module")
def models(training_set):
    return train_model(training_set, SPEC, FAST), train_baseline(training_set, SPEC, FAST)


@pytest.fixture(scope="module")
def reports(models, training_set):
    net, base = models
    return {
        "challenger": evaluate_model(
            net.model, net.preprocessor, training_set, name="challenger", slicing=SLICING
        ),
        "baseline": evaluate_model(
            base.model, base.preprocessor, training_set, name="baseline", slicing=SLICING
        ),
    }


def test_amount_buckets_are_left_closed():
    frame = pl.DataFrame({"amount": [0.0, 9.99, 10.0, 99.99, 100.0, 999.99, 1000.0, None]})
    buckets = with_buckets(frame, SLICING.buckets)["amount_bucket"].to_list()
    assert buckets == ["<10", "<10", "10-100", "10-100", "100-1000", "100-1000", ">=1000", None]


def test_slices_carry_support_and_their_own_metrics():
    rng = np.random.default_rng(0)
    n = 400
    frame = pl.DataFrame(
        {
            "country": [[None, "DE", "FR"][i] for i in rng.integers(0, 3, n)],
            "channel": rng.choice(["web", "pos"], n),
        }
    )
    y = (rng.random(n) < 0.3).astype(float)
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    report = evaluate_scores("m", y, p, 0.5, frame, slice_columns=("country", "channel"))
    assert sum(s.support for s in report.slices if s.column == "country") == n
    de = report.slice("country", "DE")
    mask = (frame["country"] == "DE").fill_null(False).to_numpy()
    assert de.support == mask.sum()
    assert de.metrics == binary_metrics(y[mask], p[mask], 0.5)
    assert report.slice("country", "(null)").support == frame["country"].null_count()
    supports = [s.support for s in report.slices if s.column == "channel"]
    assert supports == sorted(supports, reverse=True)


def test_threshold_is_chosen_on_validation_not_test(models, training_set, reports):
    net, _ = models
    val = training_set.filter(pl.col("split") == "validation")
    expected = best_f1_threshold(val["label"].to_numpy(), predict(net.model, net.preprocessor, val))
    report = reports["challenger"]
    assert report.threshold == expected and report.threshold_split == "validation"
    test = training_set.filter(pl.col("split") == "test")
    assert report.support == test.height
    probs = predict(net.model, net.preprocessor, test)
    assert report.metrics["pr_auc"] == average_precision(test["label"].to_numpy(), probs)


def test_report_round_trips_through_json(reports):
    report = reports["challenger"]
    again = EvaluationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.metrics["pr_auc"] == report.metrics["pr_auc"]
    assert again.slice("country", "DE").support == report.slice("country", "DE").support
    empty = again.slice("amount_bucket", "<10")
    assert empty.positives == 0 and math.isnan(empty.metrics["pr_auc"])


def test_unknown_slice_column_fails(models, training_set):
    net, _ = models
    with pytest.raises(KeyError, match="merchant_tier"):
        evaluate_model(
            net.model,
            net.preprocessor,
            training_set,
            name="x",
            slicing=Slicing(columns=("merchant_tier",)),
        )


def test_side_by_side_markdown_shows_every_model_and_slice(reports):
    md = evaluation_markdown(reports)
    challenger_ap = f"{reports['challenger'].metrics['pr_auc']:.4f}"
    baseline_ap = f"{reports['baseline'].metrics['pr_auc']:.4f}"
    assert f"| challenger | {challenger_ap} |" in md
    assert f"| baseline | {baseline_ap} |" in md
    for column in ("country", "merchant_category", "channel", "amount_bucket"):
        assert f"**Slices by {column}**" in md
    de = reports["challenger"].slice("country", "DE")
    assert f"| DE | {de.support} | {de.positives} |" in md


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return imread(io.BytesIO(png), format="png")


def test_plots_render_to_png(models, reports):
    net, base = models
    for png in (
        plots.loss_curves_png({"network": net.history, "baseline": base.history}),
        plots.calibration_png(reports),
        plots.pr_curve_png(reports),
        plots.slice_metric_png(reports, "country"),
        plots.drift_png({"amount": 0.4, "country": 0.05, "hour": 0.1}, 0.2),
    ):
        image = _decode(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
    png = plots.pr_curve_png(reports)
    md = plots.png_markdown(png, "PR curve")
    assert md.startswith("![PR curve](data:image/png;base64,") and md.endswith(")")
    assert base64.b64decode(md.split(",", 1)[1][:-1]) == png


def test_model_card_covers_window_features_metrics_slices_limitations(models, reports):
    net, _ = models
    lineage = {"training_set_version": "ts-42", "training_batches": ["b1", "b2"]}
    card = model_card(
        name="fraud",
        version="v0003",
        spec=SPEC,
        training=net.summary(),
        reports=reports,
        lineage=lineage,
    )
    window = net.data_window
    assert card.startswith("# Model card: fraud v0003")
    for section in ("## Data window", "## Features", "## Metrics", "## Limitations", "## Lineage"):
        assert section in card
    assert window["start"] in card and window["splits"]["test"]["end"] in card
    assert "merchant_chargeback_rate_30d" in card and "card_home_country" in card
    assert f"{reports['challenger'].metrics['pr_auc']:.4f}" in card
    assert "**Slices by amount_bucket**" in card
    assert "training_set_version: ts-42" in card and "b1, b2" in card
