"""The scale profile against real servers: the same simulated batches go through ingest ->
features -> training twice, once in the local profile (SQLite) and once with
``LOOPLINE_PROFILE=scale`` (Dagster instance on Postgres, Feast online store on Redis, batch and
feature files on object storage through ``LOOPLINE_LAKE=s3://...``, the home given as a
``file://`` URI); both must give the same training set, model, online features and scores. Then
the scale home closes the loop: deploy to TorchServe (features from Redis), serve drifted
traffic, monitoring finds the drift, and the retrain it asks for runs on Postgres.
"""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import dagster as dg
import polars as pl
import psycopg2
import pytest
import redis
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

from core.settings import Settings
from core.storage import is_remote, uri
from features.store import feature_store, online_features, redis_online_store
from models.registry import CHAMPION, Registry
from orchestration.feature_assets import VIEW_ASSETS, feature_registry, features_sensor
from orchestration.feature_assets import online_features as online_features_asset
from orchestration.monitoring_assets import drift_report, live_performance
from orchestration.monitoring_assets import prediction_log as prediction_log_asset
from orchestration.platform import write_instance_config
from orchestration.resources import LooplineStorage
from orchestration.retraining import RetrainPolicy, retrain_sensor
from orchestration.serving_assets import TorchServeResource, deployment, model_archive
from serving import handler
from serving.scoring import Scorer, version_info
from tests.e2e.kit import free_ports
from tests.orchestration.conftest import Platform
from tests.orchestration.test_training_assets import FEATURES, GOOD, SCENARIO, _materialize
from usecases.fraud import simulator

BATCHES = 16


def _start() -> datetime:
    """A Monday midnight 40 days back, as in the local training test."""
    start = (datetime.now(UTC) - timedelta(days=40)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return start - timedelta(days=start.weekday())


def _run_chain(platform: Platform, start: datetime) -> dict:
    platform.land(simulator.ScenarioConfig(start=start, **SCENARIO), batches=BATCHES)
    ingested = platform.ingest_all()
    built = dg.materialize(FEATURES, instance=platform.instance, resources=platform.resources)
    trained = _materialize(platform, GOOD, with_training_set=True)
    if trained.success:  # training names a challenger; this stands in for the deployment step
        Registry.for_settings(platform.storage.settings).promote("v0001", "deployed by the test")
    return {"ingested": ingested, "features": built, "training": trained}


@pytest.fixture(scope="module")
def start() -> datetime:
    return _start()


@pytest.fixture(scope="module")
def local(tmp_path_factory, start):
    platform = Platform(tmp_path_factory.mktemp("local") / "home")
    return platform, _run_chain(platform, start)


@pytest.fixture(scope="module")
def scale(tmp_path_factory, local, start, postgres_url, redis_url, s3_bucket):
    """The same chain with the scale profile chosen the way a user chooses it: env vars."""
    home = tmp_path_factory.mktemp("scale") / "home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PROFILE", "scale")
        env.setenv("LOOPLINE_HOME", home.as_uri())
        env.setenv("LOOPLINE_LAKE", f"{s3_bucket}/scale")
        env.setenv("LOOPLINE_POSTGRES_URL", postgres_url)
        env.setenv("LOOPLINE_REDIS_URL", redis_url)
        settings = Settings.from_env().ensure()
        platform = Platform(settings.home)
        platform.storage = LooplineStorage()  # everything from the environment
        platform.resources = {"storage": platform.storage}
        write_instance_config(settings)
        platform.instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
        try:
            yield platform, _run_chain(platform, start), settings
        finally:
            platform.instance.dispose()


def test_scale_profile_runs_the_chain_on_postgres(scale, postgres_url):
    platform, runs, settings = scale
    assert settings.scale and settings.home == platform.settings.home
    assert all(r.success for r in runs["ingested"])
    # One ingest run per tick takes every batch waiting (decision 38): each one validated.
    ledger = platform.storage.ledger.batches(dataset="transactions", status="validated")
    assert len(ledger) == BATCHES
    assert runs["features"].success and runs["training"].success

    instance = platform.instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    queue = instance.get_concurrency_config().run_queue_config
    assert queue.max_concurrent_runs == settings.max_concurrent_runs == 8
    assert [(t["key"], t["limit"]) for t in queue.tag_concurrency_limits] == [
        ("loopline/dataset", 4),
        ("loopline/pool", 1),
    ]
    # The instance config names the variable; the password never lands in a file.
    config_text = (settings.dagster_home / "dagster.yaml").read_text()
    assert "LOOPLINE_POSTGRES_URL" in config_text
    assert postgres_url.split(":")[2].split("@")[0] not in config_text

    # The runs are rows in Postgres: another client sees every one, and the training run's
    # materializations are in its event log. So are the ledger and the registry, in their
    # own schemas: no SQLite file of theirs in the home (a network volume at scale).
    dsn = postgres_url.replace("+psycopg2", "", 1)
    with psycopg2.connect(dsn) as con, con.cursor() as cur:
        cur.execute("select run_id, status from runs")
        stored = dict(cur.fetchall())
        ledger_table = f"{settings.ledger_location.schema}.batches"
        cur.execute(f"select count(*) from {ledger_table} where status = 'validated'")
        assert cur.fetchone()[0] == len(platform.storage.ledger.batches(status="validated"))
        cur.execute(f"select version from {settings.registry_location.schema}.versions")
        assert cur.fetchall() == [("v0001",)]
    assert not settings.ledger_path.exists() and not settings.registry_path.parent.exists()
    ours = [r.run_id for r in runs["ingested"]] + [runs["training"].run_id]
    assert {stored[run_id] for run_id in ours} == {"SUCCESS"}
    assert instance.get_latest_materialization_event(dg.AssetKey("registered_model"))


def test_batch_and_feature_files_are_objects_in_the_bucket(scale, s3_bucket):
    """Raw and validated batches, feature files and the training set went to object storage;
    the home kept only its state (SQLite files, the landing archive), not one data file."""
    platform, runs, settings = scale
    assert is_remote(settings.lake) and str(settings.lake) == f"{s3_bucket}/scale"
    bucket = s3_bucket.removeprefix("s3://")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    kinds = {key.split("/")[1] for key in keys if key.startswith("scale/")}
    assert kinds == {"raw", "validated", "features", "training_sets"}
    assert sum(key.startswith("scale/validated/transactions/") for key in keys) >= BATCHES
    training_set = runs["training"].output_for_node("training_set")
    assert training_set.path.startswith(f"{s3_bucket}/scale/training_sets/")
    home = settings.home
    for folder in ("raw", "validated", "features", "training_sets"):
        assert not list((home / folder).rglob("*.parquet")), folder


def test_same_training_set_and_model_as_the_local_profile(local, scale):
    (local_platform, local_runs), (_, scale_runs, settings) = local, scale
    assert local_runs["training"].success and scale_runs["training"].success
    local_ref = local_runs["training"].output_for_node("training_set")
    scale_ref = scale_runs["training"].output_for_node("training_set")
    assert scale_ref.version == local_ref.version and scale_ref.rows == local_ref.rows

    local_model = Registry.for_settings(local_platform.settings).get("v0001")
    scale_model = Registry.for_settings(settings).get("v0001")
    assert local_model.status == scale_model.status == CHAMPION
    assert scale_model.training_set_version == local_ref.version
    assert scale_model.metrics["pr_auc"] == pytest.approx(local_model.metrics["pr_auc"], abs=1e-6)


def request_columns() -> list:
    """What an online lookup takes from a validated transaction."""
    fields = ["card_id", "merchant_id", "amount", "country", "channel"]
    return [*fields, pl.col("event_timestamp").alias("transaction_timestamp")]


def _requests(validated: Path, n: int = 300) -> pl.DataFrame:
    """Transactions from the validated batches: every card and merchant the store serves."""
    frame = pl.read_parquet(uri(validated / "transactions" / "*.parquet"))
    return (
        frame.sort("event_timestamp", "transaction_id")
        .unique(subset=["card_id"], keep="last", maintain_order=True)
        .head(n)
        .select(*request_columns())
    )


def test_online_features_from_redis_equal_sqlite(local, scale, redis_url):
    (local_platform, _), (_, _, settings) = local, scale
    rows = _requests(local_platform.settings.validated)
    assert rows.height >= 100
    at = datetime.now(UTC)

    sqlite_store = feature_store(local_platform.settings.home)
    redis_store = feature_store(settings.home, redis_online_store(redis_url))
    assert sqlite_store.config.online_store.type == "sqlite"
    assert redis_store.config.online_store.type == "redis"
    from_sqlite = online_features(sqlite_store, rows, at=at)
    from_redis = online_features(redis_store, rows, at=at)

    feature_columns = [c for c in from_sqlite.columns if c not in rows.columns]
    assert len(feature_columns) >= 5
    # Features were found, not just nulls on both sides.
    assert from_sqlite.select(pl.col(feature_columns[0]).is_not_null().sum()).item() > 0
    assert from_redis.equals(from_sqlite)

    # The scale home kept its online features in Redis only.
    assert redis.Redis.from_url(redis_url).dbsize() > 0
    assert not (settings.home / "feast" / "online.db").exists()
    assert (local_platform.settings.home / "feast" / "online.db").exists()


def test_a_restarted_redis_is_found_empty_and_reloaded(scale, redis_url):
    """Redis without persistence restarts empty while the manifest says every feature file is
    loaded: the features sensor's probe finds the gap and the next run reloads everything,
    with keys that expire after the views' TTL."""
    platform, _, settings = scale
    client = redis.Redis.from_url(redis_url)
    keys = client.keys("*")
    assert keys and all(0 < client.ttl(k) <= 30 * 86400 for k in keys[:20])
    before = client.dbsize()
    client.flushdb()

    context = dg.build_sensor_context(instance=platform.instance, resources=platform.resources)
    assert isinstance(features_sensor(context), dg.RunRequest)
    out = dg.materialize(
        [*VIEW_ASSETS, feature_registry, online_features_asset],
        instance=platform.instance,
        resources=platform.resources,
    )
    [loaded] = out.asset_materializations_for_node("online_features")
    assert loaded.metadata["reloaded"].value is True
    assert client.dbsize() == before
    context = dg.build_sensor_context(instance=platform.instance, resources=platform.resources)
    assert isinstance(features_sensor(context), dg.SkipReason)


def test_serving_in_the_scale_profile_scores_from_redis_like_local(local, scale):
    """The handler's scorer: in the scale home it reads Redis (named by the environment that
    TorchServe passes on) and answers exactly as the local home's scorer reading SQLite."""
    (local_platform, _), (_, _, settings) = local, scale
    env = {"LOOPLINE_PROFILE": "scale", "LOOPLINE_REDIS_URL": settings.redis_url}
    assert handler.online_store({}) is None
    scorers = {}
    for name, home_settings, online in (
        ("local", local_platform.settings, None),
        ("scale", settings, handler.online_store(env)),
    ):
        registry, home = Registry.for_settings(home_settings), home_settings.home
        version = registry.get_alias(CHAMPION)
        scorers[name] = Scorer.load(
            registry.get(version).artifact_dir, home, version_info(registry, version), online
        )
    assert scorers["scale"].store.config.online_store.type == "redis"
    rows = _requests(local_platform.settings.validated, n=64)
    now = datetime.now(UTC)
    transactions = [
        {
            "transaction_id": f"t{i}",
            **{k: r[k] for k in ("card_id", "merchant_id", "amount", "channel", "country")},
            "timestamp": now,
        }
        for i, r in enumerate(rows.to_dicts())
    ]
    local_answers, local_scores = scorers["local"].predict(transactions, now)
    scale_answers, scale_scores = scorers["scale"].predict(transactions, now)
    # Cards are found (the data is weeks old, so merchants are past their TTL on both sides).
    assert not any("card" in unknown for unknown in scale_scores.unknown_entities)
    assert scale_scores.unknown_entities == local_scores.unknown_entities
    assert [a["decision"] for a in scale_answers] == [a["decision"] for a in local_answers]
    assert scale_scores.predictions == pytest.approx(local_scores.predictions, abs=1e-6)


def _traffic(validated: Path, n: int) -> list[dict]:
    """Request bodies for the newest validated transactions, stamped now."""
    frame = pl.read_parquet(uri(validated / "transactions" / "*.parquet"))
    now = datetime.now(UTC).isoformat()
    rows = frame.sort("event_timestamp", "transaction_id").tail(n).to_dicts()
    fields = ("card_id", "merchant_id", "amount", "channel", "country")
    return [
        {"transaction_id": f"req-{i}", **{f: r[f] for f in fields}, "timestamp": now}
        for i, r in enumerate(rows)
    ]


def test_the_loop_closes_deploy_drift_retrain(scale):
    """TorchServe serves the champion with features from Redis; drifted traffic reaches the
    prediction log, drift_report on the Postgres instance flags it, the retrain sensor asks for
    continuous training, and that run (same data) is judged by the gate on Postgres."""
    platform, _, settings = scale
    inference, management, metrics = free_ports(3)
    torchserve = TorchServeResource(
        inference_port=inference, management_port=management, metrics_port=metrics
    )
    resources = {"storage": platform.storage, "torchserve": torchserve}
    registry = Registry.for_settings(settings)
    champion = registry.get_alias(CHAMPION)

    @dg.asset(name="registered_model")
    def registered() -> str:
        return champion

    process = torchserve.process(platform.storage)
    try:
        deployed = dg.materialize(
            [registered, model_archive, deployment],
            instance=platform.instance,
            resources=resources,
            run_config={"ops": {"deployment": {"config": {"watch_seconds": 1.0}}}},
        )
        assert deployed.success
        assert deployed.output_for_node("deployment")["outcome"] == "promoted"
        assert process.config.workers_per_model == settings.serving_workers == 2

        normal = _traffic(settings.validated, 400)[:200]
        drifted = [
            {
                **r,
                "transaction_id": f"d-{i}",
                "amount": round(min(r["amount"] * 20 + 300, 40_000.0), 2),
            }
            for i, r in enumerate(_traffic(settings.validated, 400)[200:])
        ]
        client = torchserve.process(platform.storage).client()
        answers = []
        for i in range(0, 400, 25):
            answers += client.predict((normal + drifted)[i : i + 25])
        assert {a["model_version"] for a in answers} == {champion}
        # Card features came from Redis (the only online store of this home).
        assert not any("card" in a["unknown_entities"] for a in answers)
    finally:
        process.stop()  # closes the workers' prediction log files

    monitored = dg.materialize(
        [prediction_log_asset, drift_report, live_performance],
        instance=platform.instance,
        resources=resources,
        run_config={"ops": {"drift_report": {"config": {"min_rows": 100}}}},
    )
    assert monitored.success
    [logged] = monitored.asset_materializations_for_node("prediction_log")
    assert logged.metadata["predictions"].value == 400
    [drift] = monitored.asset_materializations_for_node("drift_report")
    assert "amount" in drift.metadata["drifted"].value

    policy = RetrainPolicy(min_new_labelled_rows=10**9, cooldown_minutes=30)
    context = dg.build_sensor_context(
        instance=platform.instance,
        resources={"storage": platform.storage, "retrain_policy": policy},
    )
    request = retrain_sensor(context)
    assert isinstance(request, dg.RunRequest)
    assert request.tags["loopline/trigger"] == "drift"

    # The retrain on the same data trains the same model: the gate keeps the champion.
    retrained = _materialize(platform, GOOD, with_training_set=True)
    assert not retrained.success
    assert registry.get_alias(CHAMPION) == champion
    [rejected] = [v for v in registry.list_versions() if v.status == "rejected"]
    assert rejected.training_set_version == registry.get(champion).training_set_version
    # Every run of the loop is in Postgres.
    runs = platform.instance.get_run_records()
    assert {deployed.run_id, monitored.run_id, retrained.run_id} <= {
        r.dagster_run.run_id for r in runs
    }
