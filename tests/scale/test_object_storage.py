"""Batch and feature files on object storage (``LOOPLINE_LAKE=s3://...``), against an S3 API on
loopback (moto's server): the same code writes and reads them, and what it computes from them
equals what it computes from a local lake. The whole chain on an S3 lake is in
test_scale_profile.py."""

import hashlib
import json
from datetime import timedelta

import boto3
import duckdb
import polars as pl
import pytest

from core.storage import (
    copy_atomic,
    data_root,
    duckdb_uri,
    is_remote,
    register_filesystems,
    sha256_file,
    uri,
    write_json_atomic,
    write_parquet_atomic,
)
from features.incremental import sync_online, unloaded_files
from features.store import apply_definitions, feature_store, online_features
from features.training_set import build_training_set, write_training_set
from features.views import read_validated, write_feature_file
from quality.contracts import run_contract
from tests.features.test_training_set import CARDS, CREATED, MERCHANTS, T0, _labels, _tx
from tests.scale.test_scale_profile import request_columns
from usecases.fraud.features import CARD_VIEW, MERCHANT_VIEW, card_features, merchant_features


def _keys(bucket: str, prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_writers_and_readers_work_on_object_storage(s3_bucket, tmp_path):
    root = data_root(f"{s3_bucket}/unit/")
    assert is_remote(root) and str(root) == f"{s3_bucket}/unit"
    assert not is_remote(data_root(tmp_path.as_uri())) and data_root(tmp_path.as_uri()) == tmp_path
    frame = _tx(50)
    path = write_parquet_atomic(frame, root / "raw" / "transactions" / "b1.parquet")
    write_parquet_atomic(frame.head(10), root / "raw" / "transactions" / "b2.parquet")
    write_json_atomic({"reasons": ["x"]}, root / "quarantine" / "reason.json")

    # One object per file, under its final name: no temporary objects left behind.
    assert _keys(s3_bucket, "unit/") == [
        "unit/quarantine/reason.json",
        "unit/raw/transactions/b1.parquet",
        "unit/raw/transactions/b2.parquet",
    ]
    assert pl.read_parquet(uri(path)).equals(frame)
    assert json.loads((root / "quarantine" / "reason.json").read_text()) == {"reasons": ["x"]}
    local = copy_atomic(path, tmp_path / "copy.parquet")
    assert sha256_file(path) == sha256_file(local) == hashlib.sha256(path.read_bytes()).hexdigest()

    # DuckDB reads the objects through the registered fsspec filesystem (no httpfs download).
    glob = duckdb_uri(root / "raw" / "transactions" / "*.parquet")
    assert glob.startswith("s3a://")
    con = duckdb.connect()
    register_filesystems(con, [glob])
    register_filesystems(con, [glob])  # registering twice is harmless
    assert con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone() == (60,)


def test_contract_reads_a_batch_on_object_storage_like_a_local_one(s3_bucket, tmp_path):
    bad = _tx(80).with_columns(
        pl.when(pl.col("transaction_id") == "t0007")
        .then(-5.0)
        .otherwise(pl.col("amount"))
        .alias("amount")
    )
    remote = write_parquet_atomic(bad, data_root(f"{s3_bucket}/contract") / "b.parquet")
    local = write_parquet_atomic(bad, tmp_path / "b.parquet")
    now = T0 + timedelta(days=31)
    on_s3 = run_contract("transactions", remote, now=now)
    on_disk = run_contract("transactions", local, now=now)
    assert not on_s3.passed and on_s3.reasons == on_disk.reasons
    assert any("amount" in reason for reason in on_s3.reasons)


@pytest.fixture(scope="module")
def lakes(s3_bucket, tmp_path_factory):
    """The same feature files, training set and online load in a local lake and an S3 lake."""
    tx, labels = _tx(400), _labels(_tx(400))
    out = {}
    for name in ("local", "s3"):
        home = tmp_path_factory.mktemp(name) / "home"
        lake = home if name == "local" else data_root(f"{s3_bucket}/pit")
        for dataset, rows in (("transactions", tx), ("labels", labels)):
            write_parquet_atomic(rows, lake / "validated" / dataset / "b1.parquet")
        write_feature_file(lake, CARD_VIEW, "b1", card_features(tx, CARDS, created_at=CREATED))
        write_feature_file(
            lake, MERCHANT_VIEW, "b1", merchant_features(tx, labels, MERCHANTS, created_at=CREATED)
        )
        store = feature_store(home)
        apply_definitions(store, lake)
        waiting = unloaded_files(home, lake)
        sync = sync_online(store, home, lake=lake, end=T0 + timedelta(days=40))
        built = build_training_set(
            store,
            read_validated(lake, "transactions"),
            read_validated(lake, "labels"),
            label_maturity=timedelta(0),
        )
        ref = write_training_set(lake, built, ("b1",))
        rows = tx.tail(40).select(*request_columns())
        online = online_features(store, rows, at=T0 + timedelta(days=31))
        out[name] = {
            "store": store,
            "waiting": waiting,
            "sync": sync,
            "built": built,
            "ref": ref,
            "online": online,
            "left": unloaded_files(home, lake),
        }
    return out


def test_feature_sources_point_at_the_lake(lakes, s3_bucket):
    sources = {v.name: v.batch_source.path for v in lakes["s3"]["store"].list_feature_views()}
    assert sources == {
        view: f"{s3_bucket.replace('s3://', 's3a://')}/pit/features/{view}/*.parquet"
        for view in (CARD_VIEW, MERCHANT_VIEW)
    }
    assert _keys(s3_bucket, "pit/features/") == [
        f"pit/features/{view}/b1.parquet" for view in (CARD_VIEW, MERCHANT_VIEW)
    ]


def test_an_s3_lake_gives_the_same_training_set_and_online_features(lakes, s3_bucket):
    local, s3 = lakes["local"], lakes["s3"]
    assert s3["built"].version == local["built"].version
    assert s3["built"].frame.equals(local["built"].frame)
    assert s3["ref"].path == f"{s3_bucket}/pit/training_sets/{local['built'].version}.parquet"
    assert pl.read_parquet(s3["ref"].path).equals(local["built"].frame)

    # The online store was loaded from the objects by Feast's own materialization.
    assert s3["waiting"] == local["waiting"] and len(s3["waiting"]) == 2
    assert s3["sync"].rows == local["sync"].rows > 0 and s3["left"] == local["left"] == []
    features = [c for c in local["online"].columns if c.startswith(("card_", "merchant_"))]
    assert local["online"].select(pl.col(features[0]).is_not_null().sum()).item() > 0
    assert s3["online"].equals(local["online"])
