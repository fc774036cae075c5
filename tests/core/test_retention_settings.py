"""Retention's settings: each store's limits from LOOPLINE_RETAIN_<STORE>, defaults that bound
every store, and a clear error for a value Loopline cannot read."""

from datetime import timedelta

import pytest

from core.retention import Limits
from core.settings import ENV_VARS, RETENTION_DEFAULTS, Settings


def test_every_store_is_bounded_by_default(tmp_path):
    settings = Settings.from_env({"LOOPLINE_HOME": str(tmp_path)})
    assert set(settings.retention) == set(RETENTION_DEFAULTS)
    assert all(limits != Limits() for limits in settings.retention.values())
    assert settings.retention["validated"].max_age == timedelta(days=90)
    assert settings.rollback_depth == 3 and settings.retention_grace_min == 30
    assert settings.log_max_bytes == 16 << 20 and settings.log_backups == 3


def test_the_environment_sets_each_store_and_the_log_bound(tmp_path):
    env = {
        "LOOPLINE_HOME": str(tmp_path),
        "LOOPLINE_RETAIN_VALIDATED": "days=7",
        "LOOPLINE_RETAIN_MAR": "count=3,bytes=1G",
        "LOOPLINE_RETAIN_QUARANTINE": "off",
        "LOOPLINE_RETAIN_GRACE_MINUTES": "2",
        "LOOPLINE_RETAIN_ROLLBACK_DEPTH": "5",
        "LOOPLINE_LOG_MAX_BYTES": "1M",
        "LOOPLINE_LOG_BACKUPS": "2",
    }
    settings = Settings.from_env(env)
    assert settings.retention["validated"] == Limits(max_age=timedelta(days=7))
    assert settings.retention["mar"] == Limits(max_count=3, max_bytes=1 << 30)
    assert settings.retention["quarantine"] == Limits()
    assert settings.retention["raw"] == RETENTION_DEFAULTS["raw"]
    assert (settings.retention_grace_min, settings.rollback_depth) == (2, 5)
    assert (settings.log_max_bytes, settings.log_backups) == (1 << 20, 2)
    assert set(env) <= set(ENV_VARS)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LOOPLINE_RETAIN_RAW", "90", "expected days=N"),
        ("LOOPLINE_RETAIN_ROLLBACK_DEPTH", "0", "ROLLBACK_DEPTH"),
        ("LOOPLINE_LOG_MAX_BYTES", "big", "not a size"),
    ],
)
def test_a_bad_value_names_what_is_wrong(tmp_path, name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"LOOPLINE_HOME": str(tmp_path), name: value})
