"""A small, real serving home: simulated transactions, materialized Feast features, and models
trained on the FeatureService and registered (the first one as champion)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from feast import FeatureStore

from features.store import (
    SERVICE,
    apply_definitions,
    feature_store,
    historical_features,
    materialize,
)
from features.views import training_entities, write_feature_file
from models.artifact import save_training_result
from models.registry import CHAMPION, ModelRecord, Registry, Verdict
from models.spec import FeatureSpec, TrainConfig
from models.train import train_model
from usecases.fraud.features import CARD_VIEW, MERCHANT_VIEW, card_features, merchant_features
from usecases.fraud.simulator import SCHEMAS, ScenarioConfig, Simulator

FAST = TrainConfig(epochs=4, batch_size=256, lr=5e-3, hidden=(16,), patience=2, device="cpu")
REQUEST_NUMERIC = ("amount",)
REQUEST_CATEGORICAL = ("channel", "country")


@dataclass
class ServingHome:
    home: Path
    store: FeatureStore
    registry: Registry
    transactions: pl.DataFrame
    training_frame: pl.DataFrame
    spec: FeatureSpec

    @property
    def request_rows(self) -> pl.DataFrame:
        """The request dataset's rows, by the name ``benchmarks.serving_home`` gives them."""
        return self.transactions

    def passed(self) -> Verdict:
        """The gate's pass against the champion serving now (these tests are not about the
        gate: ``tests/models`` and ``tests/serving/test_release_integrity*`` are)."""
        return Verdict(passed=True, champion=self.registry.get_alias(CHAMPION), words="passed")

    def rejudge(self, version: str) -> None:
        """``version`` judged again, and passed, against the champion serving now."""
        self.registry.judge(version, self.passed())

    def register(self, seed: int, *, champion: bool = False) -> str:
        """Trains a model (seed changes its weights), saves and registers it."""
        result = train_model(
            self.training_frame, self.spec, TrainConfig(**{**FAST.to_dict(), "seed": seed})
        )
        saved = save_training_result(
            result,
            self.home / "models" / f"seed-{seed}",
            metadata={"feature_service": SERVICE},
        )
        record = ModelRecord(
            model_name="fraud",
            artifact_dir=str(saved.path),
            artifacts=saved.checksums,
            training_set_version="test",
            feature_service=SERVICE,
            training_batches=["b1"],
            hyperparameters=result.config.to_dict(),
            metrics={"threshold": 0.5},
            data_window=result.data_window,
        )
        version = self.registry.register(record, self.passed())
        if champion:
            self.registry.promote(version, "test champion")
        return version

    def requests(self, n: int, *, offset: int = 0) -> list[dict]:
        """Valid request bodies for known cards and merchants, stamped now."""
        now = datetime.now(UTC).isoformat()
        rows = self.transactions.slice(offset, n).to_dicts()
        return [
            {
                "transaction_id": f"req-{offset + i}",
                "card_id": r["card_id"],
                "merchant_id": r["merchant_id"],
                "amount": r["amount"],
                "channel": r["channel"],
                "country": r["country"],
                "timestamp": now,
            }
            for i, r in enumerate(rows)
        ]


def spec_for(store: FeatureStore) -> FeatureSpec:
    """String fields categorical, the rest numeric, plus the transaction's own columns."""
    service = store.get_feature_service(SERVICE)
    numeric, categorical = [], []
    for projection in service.feature_view_projections:
        for f in projection.features:
            (categorical if str(f.dtype) == "String" else numeric).append(f.name)
    return FeatureSpec(
        numeric=(*numeric, *REQUEST_NUMERIC), categorical=(*categorical, *REQUEST_CATEGORICAL)
    )


def build_serving_home(home: Path, *, seed: int = 11) -> ServingHome:
    now = datetime.now(UTC)
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    sim = Simulator(
        ScenarioConfig(
            seed=seed,
            n_cards=120,
            n_merchants=40,
            start=start,
            batch_span=timedelta(hours=12),
            rows_per_batch=500,
            fraud_rate=0.06,
        )
    )
    batches = range(6)
    tx = pl.concat([sim.transactions(k) for k in batches]).sort("event_timestamp")
    truth = pl.concat([sim.ground_truth(k) for k in batches]).select(
        "transaction_id", pl.col("is_fraud").cast(pl.Int8).alias("label")
    )
    labels = pl.DataFrame(schema=SCHEMAS["labels"])
    write_feature_file(home, CARD_VIEW, "b1", card_features(tx, sim.cards(), created_at=now))
    write_feature_file(
        home, MERCHANT_VIEW, "b1", merchant_features(tx, labels, sim.merchants(), created_at=now)
    )
    store = feature_store(home)
    apply_definitions(store)
    materialize(store, now)
    rows = historical_features(store, training_entities(tx)).join(truth, on="transaction_id")
    n = rows.height
    split = ["train"] * int(0.7 * n) + ["validation"] * int(0.15 * n)
    split += ["test"] * (n - len(split))
    frame = rows.sort("event_timestamp").with_columns(pl.Series("split", split))
    registry = Registry(home / "registry" / "registry.sqlite")
    return ServingHome(home, store, registry, tx, frame, spec_for(store))
