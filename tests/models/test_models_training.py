from __future__ import annotations

import contextlib
import datetime as dt
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from models.evaluate import evaluate_model, predict
from models.loop import (
    NonFiniteLossError,
    TensorData,
    autocast_for,
    fit,
    make_loss,
    mean_loss,
    select_device,
)
from models.metrics import average_precision
from models.network import TabularNet
from models.train import baseline_config, recency_weights, train_baseline, train_model
from tests.models.testkit import FAST, SPEC, make_training_set


def test_overfits_a_tiny_training_set():
    tiny = make_training_set(n=64, seed=5, fraud_rate=0.25).with_columns(split=pl.lit("train"))
    config = replace(FAST, epochs=150, batch_size=16, lr=1e-2, dropout=0.0, oov_rate=0.0)
    result = train_model(tiny, SPEC, config)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 150
    assert losses[-1] < 0.1 * losses[0]
    probs = predict(result.model, result.preprocessor, tiny)
    assert average_precision(tiny["label"].to_numpy(), probs) == 1.0


def test_extreme_inputs_train_and_predict_without_nan():
    frame = make_training_set(n=1200, seed=2)
    extreme = [1e308, -1e308, float("inf"), float("-inf"), float("nan"), 0.0, 1e-300]
    rng = np.random.default_rng(0)
    frame = frame.with_columns(
        amount=pl.Series(rng.choice(extreme, frame.height)).fill_nan(None),
        amount_to_card_mean_ratio=pl.Series(rng.choice(extreme, frame.height)),
    )
    result = train_model(frame, SPEC, FAST)
    assert all(
        math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history
    )
    probs = predict(result.model, result.preprocessor, frame)
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    weird = {"amount": 1e308, "card_txn_count_24h": -1e308, "country": "ATLANTIS"}
    assert np.isfinite(predict(result.model, result.preprocessor, [weird])).all()


def test_same_seed_gives_same_model_and_metrics(training_set):
    a = train_model(training_set, SPEC, replace(FAST, seed=7))
    b = train_model(training_set, SPEC, replace(FAST, seed=7))
    c = train_model(training_set, SPEC, replace(FAST, seed=8))
    for key, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[key]), key
    report_a = evaluate_model(a.model, a.preprocessor, training_set, name="a")
    report_b = evaluate_model(b.model, b.preprocessor, training_set, name="b")
    assert report_a.metrics == report_b.metrics
    losses = [[(h["train_loss"], h["val_loss"]) for h in r.history] for r in (a, b)]
    assert losses[0] == losses[1]
    assert not torch.equal(a.model.body[0].weight, c.model.body[0].weight)


def _tensor_split(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(
        torch.randn(n, 4, generator=g),
        torch.randint(0, 5, (n, 1), generator=g),
        (torch.rand(n, generator=g) < 0.3).float(),
    )


def test_nan_loss_fails_the_run_with_a_clear_message():
    net = TabularNet(4, [5], [2], hidden=(8,))
    with torch.no_grad():
        net.body[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan in epoch 1"):
        fit(net, _tensor_split(64, 0), None, FAST, torch.device("cpu"))


def test_early_stopping_keeps_the_best_validation_epoch():
    # Pure-noise labels and a big step: validation loss bottoms out early, then rises.
    config = replace(FAST, epochs=60, patience=2, lr=3e-2, batch_size=32, dropout=0.0, oov_rate=0.0)
    train, val = _tensor_split(256, 1), _tensor_split(256, 2)
    net = TabularNet(4, [5], [2], hidden=(64, 64))
    result = fit(net, train, val, config, torch.device("cpu"))
    val_losses = [h["val_loss"] for h in result.history]
    assert result.stopped_early and len(val_losses) < 60
    assert len(val_losses) == result.best_epoch + config.patience
    assert result.best_val_loss == min(val_losses)
    restored = mean_loss(net, val, make_loss(config, 1.0, torch.device("cpu")))
    assert restored == pytest.approx(result.best_val_loss, abs=1e-6)


def test_class_imbalance_is_weighted_then_calibrated_back(training_set):
    result = train_model(training_set, SPEC, FAST)
    train = training_set.filter(pl.col("split") == "train")
    positives = int(train["label"].sum())
    ratio = (train.height - positives) / positives
    assert result.pos_weight == pytest.approx(min(ratio, FAST.max_pos_weight))
    assert result.calibration["method"] == "platt"
    test = training_set.filter(pl.col("split") == "test")
    probs = predict(result.model, result.preprocessor, test)
    assert abs(probs.mean() - test["label"].mean()) < 0.03
    result.model.set_calibration(1.0, 0.0)  # the raw weighted logits over-predict fraud
    raw = predict(result.model, result.preprocessor, test)
    assert raw.mean() > 2 * test["label"].mean()


def test_focal_loss_trains(training_set):
    result = train_model(training_set, SPEC, replace(FAST, imbalance="focal"))
    assert result.pos_weight == 1.0
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_baseline_is_a_logistic_regression_that_learns(training_set):
    result = train_baseline(training_set, SPEC, FAST)
    assert result.kind == "baseline"
    assert [type(m).__name__ for m in result.model.body] == ["Linear"]
    assert all(e.embedding_dim == 1 for e in result.model.embeddings)
    test = training_set.filter(pl.col("split") == "test")
    ap = average_precision(
        test["label"].to_numpy(), predict(result.model, result.preprocessor, test)
    )
    assert ap > 3 * test["label"].mean()


def test_device_choice(monkeypatch):
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu").type == "cpu"
    assert isinstance(autocast_for(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device("cuda")


def test_training_needs_both_classes(training_set):
    with pytest.raises(ValueError, match="both classes"):
        train_model(training_set.with_columns(label=pl.lit(0, dtype=pl.Int8)), SPEC, FAST)


def test_recency_weights_halve_each_half_life_and_average_one():
    newest = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    ages = [0.0, 3.0, 6.0, 9.0, 1.5]
    stamps = pl.Series([newest - dt.timedelta(days=a) for a in ages])
    w = recency_weights(stamps, half_life_days=3.0)
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(w[1] / w[0]) == pytest.approx(0.5)
    assert float(w[2] / w[0]) == pytest.approx(0.25)
    assert float(w[3] / w[2]) == pytest.approx(0.5)
    assert float(w[4] / w[0]) == pytest.approx(0.5**0.5)
    with pytest.raises(ValueError, match="recency_half_life_days"):
        replace(FAST, recency_half_life_days=0.0)


def _fit_state(train: TensorData, config) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = TabularNet(4, [5], [2], hidden=(8,))
    fit(net, train, None, config, torch.device("cpu"), pos_weight=3.0)
    return net.state_dict()


@pytest.mark.parametrize("imbalance", ["pos_weight", "focal", "none"])
def test_unit_weights_train_the_same_bits_as_no_weights(imbalance):
    config = replace(FAST, imbalance=imbalance, epochs=3, batch_size=32)
    plain = _tensor_split(256, 3)
    ones = TensorData(plain.numeric, plain.categorical, plain.label, torch.ones(256))
    halves = TensorData(plain.numeric, plain.categorical, plain.label, torch.rand(256) * 2)
    a, b, c = _fit_state(plain, config), _fit_state(ones, config), _fit_state(halves, config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the weights reach the loss
    with pytest.raises(ValueError, match="weight must have shape"):
        TensorData(plain.numeric, plain.categorical, plain.label, torch.ones(3))


def _concept_drift_set(n: int = 4000, old: int = 2000) -> pl.DataFrame:
    """The testkit set whose oldest ``old`` rows follow a reversed rule (another world)."""
    frame = make_training_set(n=n, seed=11, fraud_rate=0.08)
    ratio = frame["amount_to_card_mean_ratio"].fill_null(1.0).to_numpy()
    reversed_score = -np.log1p(ratio) - 25 * frame["merchant_chargeback_rate_30d"].to_numpy()
    old_label = (reversed_score > np.quantile(reversed_score, 0.92)).astype(np.int8)
    label = np.where(np.arange(n) < old, old_label, frame["label"].to_numpy())
    return frame.with_columns(label=pl.Series(label, dtype=pl.Int8))


def test_recency_weighting_learns_the_new_world_after_a_concept_drift():
    frame = _concept_drift_set()  # 2000 old-world rows, then 800 new-world train rows
    test = frame.filter(pl.col("split") == "test")
    y = test["label"].to_numpy()

    def test_ap(frame: pl.DataFrame, config) -> tuple[float, dict]:
        result = train_model(frame, SPEC, config)
        return average_precision(y, predict(result.model, result.preprocessor, test)), (
            result.summary()
        )

    unweighted, plain_summary = test_ap(frame, FAST)
    weighted, summary = test_ap(frame, replace(FAST, recency_half_life_days=2.0))
    new_rows_only = frame.with_columns(
        split=pl.when(pl.int_range(pl.len()) < 2000).then(pl.lit("dropped")).otherwise("split")
    )
    reference, _ = test_ap(new_rows_only, FAST)
    assert unweighted < 0.3 * reference  # the old world outnumbers the new one 5:2
    assert weighted > 0.9 * reference
    assert plain_summary["weighting"] == {"method": "none"}
    assert summary["weighting"]["method"] == "recency"
    assert summary["weighting"]["half_life_days"] == 2.0
    assert summary["weighting"]["effective_rows"] < 2800
    assert summary["config"]["recency_half_life_days"] == 2.0


def test_the_baseline_inherits_recency_weighting(training_set):
    config = replace(FAST, recency_half_life_days=5.0)
    assert baseline_config(config).recency_half_life_days == 5.0
    result = train_baseline(training_set, SPEC, config)
    assert result.summary()["weighting"]["method"] == "recency"
