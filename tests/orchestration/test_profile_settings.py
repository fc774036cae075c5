"""LOOPLINE_PROFILE: the one setting that picks local or scale, and what each profile writes.
(The scale profile against real Postgres and Redis: tests/scale.)"""

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from core.db import Postgres
from core.settings import ENV_VARS, Settings
from features.store import redis_online_store, repo_config
from orchestration.platform import instance_config

PG = "postgresql+psycopg2://loopline:s3cret@db:5432/loopline"
REDIS = "redis://:hunter2@cache:6380/1"


def scale_env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "LOOPLINE_HOME": str(home),
        "LOOPLINE_PROFILE": "scale",
        "LOOPLINE_POSTGRES_URL": PG,
        "LOOPLINE_REDIS_URL": REDIS,
        **extra,
    }


def test_local_is_the_default_and_needs_no_connection(tmp_path):
    settings = Settings.from_env({"LOOPLINE_HOME": str(tmp_path)})
    assert settings.profile == "local" and not settings.scale
    assert settings.serving_workers == 1 and settings.max_concurrent_runs == 2
    text = instance_config(settings)
    assert "postgres" not in text and "QueuedRunCoordinator" in text
    # Two slots for training, monitoring and features (one run of each at most), and one of
    # its own for ingestion: neither starves the other (decision 38).
    runs = yaml.safe_load(text)["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] == 3
    assert runs["tag_concurrency_limits"] == [
        {"key": "loopline/lane", "value": "ingest", "limit": 1},
        {"key": "loopline/pool", "limit": 2},
        {"key": "loopline/pool", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
    ]


def test_scale_profile_takes_its_connections_from_the_environment(tmp_path):
    settings = Settings.from_env(scale_env(tmp_path))
    assert settings.scale and settings.serving_workers == 2 and settings.max_concurrent_runs == 8
    assert settings.redis_url == REDIS and settings.postgres_url == PG
    # Secrets never show in a repr (logs, tracebacks, Dagster metadata).
    assert "s3cret" not in repr(settings) and "hunter2" not in repr(settings)
    tuned = Settings.from_env(
        scale_env(tmp_path, LOOPLINE_SERVING_WORKERS="4", LOOPLINE_MAX_CONCURRENT_RUNS="20")
    )
    assert tuned.serving_workers == 4 and tuned.max_concurrent_runs == 20
    assert set(ENV_VARS) >= set(scale_env(tmp_path)) | {
        "LOOPLINE_SERVING_WORKERS",
        "LOOPLINE_MAX_CONCURRENT_RUNS",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"LOOPLINE_PROFILE": "cluster"}, "expected one of"),
        ({"LOOPLINE_REDIS_URL": ""}, "needs LOOPLINE_REDIS_URL"),
        ({"LOOPLINE_POSTGRES_URL": ""}, "needs LOOPLINE_POSTGRES_URL"),
        (
            {"LOOPLINE_POSTGRES_URL": "postgresql://u@db/x"},
            r"must start with postgresql\+psycopg2://",
        ),
        ({"LOOPLINE_SERVING_WORKERS": "-1"}, ">= 1"),
        ({"LOOPLINE_SERVING_PORTS": "9000,9001"}, "three different ports"),
        ({"LOOPLINE_SERVING_PORTS": "9000,9000,9001"}, "three different ports"),
        ({"LOOPLINE_SERVING_PORTS": "9000;9001;9002"}, "inference,management,metrics"),
        ({"LOOPLINE_HEALTH_STALE_INTERVALS": "0"}, "must be > 0"),
    ],
)
def test_a_wrong_profile_setting_is_refused_with_its_reason(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(scale_env(tmp_path, **change))


def test_scale_profile_keeps_ledger_and_registry_in_postgres_per_use_case(tmp_path):
    """Locally the two stores are SQLite files in the home; at scale, schemas of the Postgres
    database, one pair per use case (several use cases share the database)."""
    local = Settings.from_env({"LOOPLINE_HOME": str(tmp_path)})
    assert (local.ledger_location, local.registry_location) == (
        local.ledger_path,
        local.registry_path,
    )
    fraud = Settings.from_env(scale_env(tmp_path, LOOPLINE_USECASE="usecases/fraud"))
    other = Settings.from_env(scale_env(tmp_path, LOOPLINE_USECASE="my-case"))
    assert fraud.ledger_location == Postgres(PG, "loopline_fraud_ledger")
    assert fraud.registry_location == Postgres(PG, "loopline_fraud_registry")
    assert other.ledger_location.schema == "loopline_my_case_ledger"
    assert "s3cret" not in f"{fraud.ledger_location} {fraud.registry_location!r}"
    with pytest.raises(ValueError, match="at most 63"):
        Settings.from_env(scale_env(tmp_path, LOOPLINE_USECASE="x" * 60))


def test_home_accepts_file_uris_and_refuses_object_storage(tmp_path):
    home = tmp_path / "a home"
    settings = Settings.from_env({"LOOPLINE_HOME": home.as_uri()})
    assert settings.home == home and settings.home_uri == home.as_uri()
    assert settings.lake == home  # batch and feature files live in the home by default
    assert settings.raw_file("transactions", "b1") == home / "raw" / "transactions" / "b1.parquet"
    # The home keeps SQLite files: object storage is for the lake, and the error says so.
    with pytest.raises(ValueError, match="LOOPLINE_LAKE"):
        Settings.from_env({"LOOPLINE_HOME": "s3://bucket/loopline"})


def test_the_lake_puts_batch_and_feature_files_on_object_storage(tmp_path):
    settings = Settings.from_env(
        {"LOOPLINE_HOME": str(tmp_path), "LOOPLINE_LAKE": "s3://bucket/loopline/"}
    )
    assert str(settings.raw_file("transactions", "b1")) == (
        "s3://bucket/loopline/raw/transactions/b1.parquet"
    )
    assert str(settings.validated) == "s3://bucket/loopline/validated"
    assert str(settings.training_sets) == "s3://bucket/loopline/training_sets"
    # State and the places people look at stay on the local disk.
    assert settings.landing == tmp_path / "landing" and settings.registry_path.is_relative_to(
        tmp_path
    )
    assert settings.quarantine == tmp_path / "quarantine"
    # A second local folder works as a lake too.
    local = Settings.from_env(
        {"LOOPLINE_HOME": str(tmp_path), "LOOPLINE_LAKE": str(tmp_path / "l")}
    )
    assert local.validated == tmp_path / "l" / "validated"
    with pytest.raises(ValueError, match="bucket"):
        Settings.from_env({"LOOPLINE_HOME": str(tmp_path), "LOOPLINE_LAKE": "s3:///no-bucket"})


def test_scale_instance_config_keeps_the_password_in_the_environment(tmp_path):
    config = yaml.safe_load(instance_config(Settings.from_env(scale_env(tmp_path))))
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "LOOPLINE_POSTGRES_URL"}}}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    runs = config["concurrency"]["runs"]
    assert runs["max_concurrent_runs"] == 8
    per_value = {"applyLimitPerUniqueValue": True}
    assert runs["tag_concurrency_limits"] == [
        {"key": "loopline/dataset", "value": per_value, "limit": 4},  # ingest runs per dataset
        {"key": "loopline/pool", "value": per_value, "limit": 1},  # one training, one monitoring
    ]


def test_redis_url_becomes_feasts_connection_string(tmp_path):
    # Keys expire after the longest TTL of the use case's online views (fraud: cards, 30
    # days): an entity no view wrote for that long is absent to every lookup anyway.
    assert redis_online_store(REDIS) == {
        "type": "redis",
        "connection_string": "cache:6380,db=1,password=hunter2",
        "key_ttl_seconds": 30 * 86400,
    }
    assert "key_ttl_seconds" not in redis_online_store(REDIS, key_ttl=timedelta(0))
    assert redis_online_store("rediss://cache")["connection_string"] == "cache:6379,ssl=true"
    with pytest.raises(ValueError):
        redis_online_store("http://cache:6379")
    config = repo_config(tmp_path, redis_online_store(REDIS))
    assert config.online_store.type == "redis"
    assert config.online_store.connection_string.startswith("cache:6380")
    # The registry and offline sources stay under the home whatever the online store.
    assert config.registry.path == str(tmp_path.resolve() / "feast" / "registry.db")


def test_torchserve_workers_follow_the_profile(tmp_path, monkeypatch):
    from orchestration.resources import LooplineStorage
    from orchestration.serving_assets import TorchServeResource

    storage = LooplineStorage(home=str(tmp_path))
    assert TorchServeResource().serving_config(storage).workers_per_model == 1
    for name, value in scale_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    assert TorchServeResource().serving_config(storage).workers_per_model == 2
    assert TorchServeResource(workers_per_model=3).serving_config(storage).workers_per_model == 3


def test_torchserve_ports_come_from_the_settings(tmp_path, monkeypatch):
    """`loopline run` and the deployment asset start TorchServe where LOOPLINE_SERVING_PORTS
    says (a second platform, a test), not on 8080 whatever holds it."""
    from orchestration.resources import LooplineStorage
    from orchestration.serving_assets import TorchServeResource

    storage = LooplineStorage(home=str(tmp_path))
    assert TorchServeResource().serving_config(storage).inference_port == 8080
    monkeypatch.setenv("LOOPLINE_SERVING_PORTS", "18090,18091,18092")
    config = TorchServeResource().serving_config(storage)
    assert (config.inference_port, config.management_port, config.metrics_port) == (
        18090,
        18091,
        18092,
    )
    assert TorchServeResource(inference_port=18095).serving_config(storage).inference_port == (
        18095
    )


def test_each_use_case_has_its_own_default_home(tmp_path):
    from core.settings import REPO_ROOT

    assert Settings.from_env({}).home == REPO_ROOT / ".loopline"
    assert Settings.from_env({"LOOPLINE_USECASE": "fraud"}).home == REPO_ROOT / ".loopline"
    shop = Settings.from_env({"LOOPLINE_USECASE": "shop"}).home
    assert shop == REPO_ROOT / ".loopline-shop"
    by_path = Settings.from_env({"LOOPLINE_USECASE": str(tmp_path / "shop") + "/"}).home
    assert by_path == shop  # a folder path names the same use case as its name
    chosen = Settings.from_env({"LOOPLINE_USECASE": "shop", "LOOPLINE_HOME": str(tmp_path)})
    assert chosen.home == tmp_path
