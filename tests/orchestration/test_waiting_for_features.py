"""A retraining asked for before the feature files exist waits for them, in words: the sensor
skips and the training_set asset fails with "waiting for features", not a DuckDB IO error."""

import json
from pathlib import Path

import dagster as dg
import polars as pl

from features.training_set import missing_feature_views, views_without_feature_files
from orchestration import feature_assets
from orchestration.retraining import RetrainPolicy, retrain_sensor
from tests.orchestration.conftest import Platform

BOTH = "waiting for features: card_stats_fv, merchant_stats_fv have no feature files yet"


def _feature_file(home: Path, view: str) -> None:
    folder = home / "features" / view
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"x": [1]}).write_parquet(folder / "b0001.parquet")


def _ask_for_retraining(platform: Platform) -> dg.SkipReason | dg.RunRequest:
    platform.settings.retrain_request.write_text(json.dumps({"reason": "test asks"}))
    context = dg.build_sensor_context(
        instance=platform.instance,
        resources={"storage": platform.storage, "retrain_policy": RetrainPolicy()},
    )
    return retrain_sensor(context)


def test_views_without_files_are_listed_in_the_services_order(tmp_path: Path) -> None:
    assert missing_feature_views(tmp_path) == ["card_stats_fv", "merchant_stats_fv"]
    (tmp_path / "features" / "merchant_stats_fv").mkdir(parents=True)  # a folder is not a file
    _feature_file(tmp_path, "card_stats_fv")
    assert missing_feature_views(tmp_path) == ["merchant_stats_fv"]
    assert views_without_feature_files(tmp_path, ["card_stats_fv"]) == []


def test_training_set_fails_with_waiting_for_features_before_reading_any(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "home")
    result = dg.materialize(
        [feature_assets.training_set],
        instance=platform.instance,
        resources=platform.resources,
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    assert BOTH in error.message
    assert "IO Error" not in error.message and "No files found" not in error.message


def test_retrain_sensor_skips_until_every_view_has_files_and_keeps_the_request(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home")
    skipped = _ask_for_retraining(platform)
    assert isinstance(skipped, dg.SkipReason)
    assert BOTH in skipped.skip_message
    assert platform.settings.retrain_request.exists()  # the request waits, it is not dropped

    _feature_file(platform.settings.lake, "card_stats_fv")
    skipped = _ask_for_retraining(platform)
    assert isinstance(skipped, dg.SkipReason)
    assert "waiting for features: merchant_stats_fv have no feature files yet" in (
        skipped.skip_message
    )

    _feature_file(platform.settings.lake, "merchant_stats_fv")
    started = _ask_for_retraining(platform)
    assert isinstance(started, dg.RunRequest)
    assert started.tags["loopline/trigger"] == "manual"
    assert not platform.settings.retrain_request.exists()
