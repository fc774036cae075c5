"""Monitoring assets on a temp home: availability apart from drift, live quality over time."""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import polars as pl
import pytest

from core.settings import Settings
from core.storage import write_parquet_atomic
from models.registry import CHAMPION, ModelRecord, Registry, Verdict
from orchestration.monitoring_assets import (
    live_performance,
    prediction_log,
    serving_availability,
)
from orchestration.resources import LooplineStorage
from orchestration.retraining import RetrainPolicy, gather_signals
from orchestration.serving_assets import TorchServeResource
from serving.monitoring import read_live_quality
from serving.prediction_log import PredictionLog

START = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 30


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Home:
    """A Loopline home with a registered champion, its served traffic logged, labels landed."""

    def __init__(self, path, offline_pr_auc: float = 0.3) -> None:
        self.settings = Settings(path).ensure()
        self.storage = LooplineStorage(home=str(path))
        ports = _free_ports(3)  # nothing answers: no TorchServe counters
        self.torchserve = TorchServeResource(
            home=str(path),
            inference_port=ports[0],
            management_port=ports[1],
            metrics_port=ports[2],
        )
        self.registry = Registry(self.settings.registry_path)
        self.champion = self.promote(offline_pr_auc)
        self.log_dir = self.torchserve.serving_config(self.storage).prediction_log_dir
        self.instance = dg.DagsterInstance.ephemeral()

    def promote(self, offline_pr_auc: float) -> str:
        seq = len(self.registry.list_versions())
        record = ModelRecord(
            model_name="fraud",
            artifact_dir=str(self.settings.home / f"model{seq}"),
            artifacts={"model.pt": f"{seq:064d}"},
            training_set_version="ts",
            feature_service="fraud_model_v1",
            training_batches=[],
            hyperparameters={},
            metrics={"pr_auc": offline_pr_auc, "threshold": 0.5},
            data_window={},
        )
        version = self.registry.register(
            record, Verdict(True, self.registry.get_alias(CHAMPION)), verify_files=False
        )
        self.registry.promote(version, "test")
        return version

    def serve(self, n: int, *, unknown_card_share: float = 0.0, seed: int = 0) -> np.ndarray:
        """``n`` answered requests over DAYS days of event time; returns the true labels."""
        rng = np.random.default_rng(seed)
        t = np.sort(rng.uniform(0, DAYS * 86400.0, n))
        p = 1.0 / (1.0 + np.exp(-(-5.0 + 2.0 * rng.normal(size=n))))
        fraud = rng.random(n) < p
        unknown = rng.random(n) < unknown_card_share
        log = PredictionLog(self.log_dir, max_file_age_s=0.0).start()
        for i in range(n):
            ts = (START + timedelta(seconds=float(t[i]))).isoformat()
            log.log(
                {
                    "logged_at": datetime.now(UTC).isoformat(),  # the wall clock: not used
                    "status": 200,
                    "model_version": self.champion,
                    "transaction_id": f"t{seed}-{i}",
                    "request": {"transaction_id": f"t{seed}-{i}", "card_id": "c1", "timestamp": ts},
                    "features": {
                        "card_home_country": None if unknown[i] else "US",
                        "merchant_category": "grocery",
                    },
                    "missing_features": ["card_home_country"] if unknown[i] else [],
                    "unknown_entities": ["card"] if unknown[i] else [],
                    "feature_age_s": {
                        "card_stats_fv": None if unknown[i] else 3600.0,
                        "merchant_stats_fv": 600.0,
                    },
                    "fraud_probability": float(p[i]),
                    "decision": "approve",
                    "latency_ms": 2.0,
                }
            )
        log.close()
        self.times, self.fraud, self.seed = t, fraud, seed
        return fraud

    def land_labels(self, as_of_day: float) -> int:
        """Labels known at ``as_of_day``: fraud 1-10 days after the transaction, legit 7."""
        rng = np.random.default_rng(self.seed + 99)
        delay = np.where(self.fraud, rng.uniform(1, 10, self.fraud.size), 7.0) * 86400.0
        known = self.times + delay <= as_of_day * 86400.0
        labels = pl.DataFrame(
            {
                "transaction_id": [f"t{self.seed}-{i}" for i in np.flatnonzero(known)],
                "is_fraud": self.fraud[known].tolist(),
                "label_timestamp": [
                    START + timedelta(seconds=float(s)) for s in (self.times + delay)[known]
                ],
            },
            schema={
                "transaction_id": pl.String,
                "is_fraud": pl.Boolean,
                "label_timestamp": pl.Datetime("us", "UTC"),
            },
        )
        batch = f"labels-{as_of_day:g}"
        write_parquet_atomic(
            labels, self.settings.lake / "validated" / "labels" / f"{batch}.parquet"
        )
        ledger = self.storage.ledger
        ledger.receive(batch, "labels", self.settings.landing / f"{batch}.parquet")
        ledger.mark(batch, "validated", rows=labels.height)
        return labels.height

    def monitor(self) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [prediction_log, serving_availability, live_performance],
            instance=self.instance,
            resources={"storage": self.storage, "torchserve": self.torchserve},
        )


def test_unknown_entities_raise_an_availability_alert_not_drift(tmp_path, caplog):
    home = Home(tmp_path)
    home.serve(600, unknown_card_share=0.96)
    with caplog.at_level(logging.WARNING, logger="loopline.alerts"):
        result = home.monitor()
    meta = result.asset_materializations_for_node("serving_availability")[0].metadata
    assert meta["measured"].value is True
    assert meta["unknown_entity_rate"].value == pytest.approx(0.96, abs=0.03)
    assert meta["worst_missing_feature"].value.startswith("card_home_country 9")
    [check] = [
        c for c in result.get_asset_check_evaluations() if c.check_name == "feature_availability"
    ]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    report = json.loads((home.settings.home / "monitoring" / "availability.json").read_text())
    assert report["champion"] == home.champion
    assert report["missing_rate"]["merchant_category"] == 0.0
    assert report["staleness_p95_s"] == {"card_stats_fv": 3600.0, "merchant_stats_fv": 600.0}
    alerts = [json.loads(r.getMessage()) for r in caplog.records]
    assert [a["alert"] for a in alerts] == ["availability"]
    assert "unknown entities in 9" in alerts[0]["summary"]


def test_healthy_traffic_passes_the_availability_check(tmp_path):
    home = Home(tmp_path)
    home.serve(300)
    result = home.monitor()
    [check] = [
        c for c in result.get_asset_check_evaluations() if c.check_name == "feature_availability"
    ]
    assert check.passed


def test_live_quality_is_recorded_per_label_batch_and_estimated_before_labels(tmp_path):
    home = Home(tmp_path, offline_pr_auc=0.9)  # offline far above what serving achieves
    home.serve(6000, seed=1)

    # No label yet: no realised metric, but the label-free estimate already reads decay.
    first = home.monitor().asset_materializations_for_node("live_performance")[0].metadata
    assert first["evaluated"].value is False and first["labelled"].value == 0
    assert first["recent"].value == 6000
    assert 0.1 < first["estimated_pr_auc_unlabelled"].value < 0.6
    policy = RetrainPolicy(min_new_labelled_rows=10**9).policy()
    signals = [s for s in gather_signals(home.instance, home.storage, policy, 0.0) if s]
    assert [s.kind for s in signals] == ["decay"]
    assert signals[0].reason.startswith("estimated live PR-AUC")
    off = RetrainPolicy(min_new_labelled_rows=10**9, decay_on_estimate=False).policy()
    assert not any(gather_signals(home.instance, home.storage, off, 0.0))

    _write_offline_evaluation(home)
    home.land_labels(as_of_day=DAYS + 1)
    second = home.monitor().asset_materializations_for_node("live_performance")[0].metadata
    assert second["evaluated"].value is True
    assert second["labelled"].value > 1000
    # The label-free estimate of the same cohort is close to what the labels say.
    assert abs(second["estimate_error"].value) < 0.08
    assert second["plot"].value.startswith("![live PR-AUC over time](data:image/png;base64,")
    # The champion's offline evaluation (as models.release writes it) beside the live slices.
    assert second["plot_by_channel"].value.startswith("![PR-AUC by channel](data:image/png")

    home.monitor()  # nothing new in the labels: no new point
    points = read_live_quality(home.settings.home)
    assert points["label_batch"].to_list() == [None, "labels-31"]
    assert points["champion"].to_list() == [home.champion] * 2
    latest = points.row(-1, named=True)
    cohort_end = latest["cohort_end"]
    assert cohort_end == home_newest_label(home) - timedelta(days=7)
    assert latest["cohort_start"] == cohort_end - timedelta(days=7)
    assert latest["pr_auc"] == pytest.approx(second["live_pr_auc"].value)
    assert latest["estimate_error"] == pytest.approx(latest["estimated_pr_auc"] - latest["pr_auc"])

    home.champion = home.promote(0.3)  # a new champion starts its own series
    home.serve(500, seed=2)
    home.monitor()
    assert read_live_quality(home.settings.home)["champion"].to_list()[-1] == home.champion


def _write_offline_evaluation(home: Home) -> None:
    """``evaluation.json`` in the champion's folder, in the layout ``models.release`` writes."""
    from models.evaluate import evaluate_scores
    from models.release import EVALUATION

    rng = np.random.default_rng(5)
    y = (rng.random(2000) < 0.05).astype(np.float64)
    scores = np.clip(y * 0.5 + rng.random(2000) * 0.5, 0, 1)
    frame = pl.DataFrame({"channel": rng.choice(["online", "pos"], 2000)})
    report = evaluate_scores("challenger", y, scores, 0.5, frame, slice_columns=("channel",))
    folder = home.settings.home / f"model{len(home.registry.list_versions()) - 1}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVALUATION).write_text(json.dumps({"reports": {"challenger": report.to_dict()}}))


def home_newest_label(home: Home) -> datetime:
    labels = pl.read_parquet(home.settings.lake / "validated" / "labels" / "*.parquet")
    return labels["label_timestamp"].max()


def test_loopline_status_shows_availability_and_live_quality(tmp_path):
    from rich.console import Console

    from orchestration import cli_loop

    home = Home(tmp_path)
    home.serve(2000, unknown_card_share=0.25, seed=3)
    home.land_labels(as_of_day=DAYS)
    home.monitor()
    data = cli_loop.summary(home.settings)
    a = data["availability"]
    assert a["requests"] == 2000
    assert a["unknown_entity_rate"] == pytest.approx(0.25, abs=0.03)
    assert a["missing_rate"]["card_home_country"] == pytest.approx(a["unknown_entity_rate"])
    assert a["staleness_p95_s"] == {"card_stats_fv": 3600.0, "merchant_stats_fv": 600.0}
    [point] = data["live_quality"]
    assert point["champion"] == home.champion and point["label_batch"] == "labels-30"
    assert point["labelled"] > 300 and point["pr_auc"] is not None
    json.dumps(data)  # `loopline status --json` prints it as is

    console = Console(record=True, width=200)
    original, cli_loop.console = cli_loop.console, console
    try:
        cli_loop.print_summary(data)
    finally:
        cli_loop.console = original
    text = console.export_text()
    assert f"{point['pr_auc']:.3f} realised on {point['labelled']} labelled" in text
    assert "worst missing card_home_country 2" in text
    assert "online row age p95 card_stats_fv 1.0 h, merchant_stats_fv 0.2 h" in text
