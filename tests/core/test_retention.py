"""Retention's decision alone: protected items survive, the rest go oldest first until the store
is within its limits, and what was removed and kept is counted."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.retention import Item, Limits, delete, parse_size, plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _items(n: int, size: int = 100, protected: dict[int, str] | None = None) -> list[Item]:
    protected = protected or {}
    return [
        Item(
            f"b{i:02d}",
            (Path(f"/nowhere/b{i:02d}"),),
            size,
            T0 + timedelta(hours=i),
            age=timedelta(days=n - 1 - i),
            protected=protected.get(i),
        )
        for i in range(n)
    ]


def test_count_limit_deletes_the_oldest_unprotected_first():
    decided = plan("raw", _items(10, protected={0: "champion v0001"}), Limits(max_count=4))
    assert [i.name for i in decided.delete] == ["b01", "b02", "b03", "b04", "b05", "b06"]
    assert [i.name for i in decided.keep] == ["b00", "b07", "b08", "b09"]
    summary = decided.summary()
    assert summary["removed_items"] == 6 and summary["removed_bytes"] == 600
    assert summary["kept_bytes"] == 400 and summary["oldest_kept"] == "b00"
    assert summary["protected"] == {"champion v0001": 1} and summary["over_limit"] == []


def test_bytes_limit_counts_protected_items_but_never_deletes_them():
    items = _items(5, protected={i: "training window" for i in range(4)})
    decided = plan("validated", items, Limits(max_bytes=150))
    assert [i.name for i in decided.delete] == ["b04"]
    assert decided.over_limit == ["bytes 400 > 150"]


def test_age_limit_removes_every_unprotected_item_older_than_it():
    decided = plan(
        "validated", _items(10, protected={1: "reference data"}), Limits(max_age=timedelta(days=3))
    )
    # ages are 9..0 days: b00..b05 are older than 3 days, b01 is protected
    assert [i.name for i in decided.delete] == ["b00", "b02", "b03", "b04", "b05"]
    assert decided.over_limit == ["1 items older than 3 days, 0:00:00"]


def test_within_limits_nothing_goes():
    assert plan("mar", _items(3), Limits(max_count=3, max_bytes=300)).delete == []
    assert plan("mar", _items(3), Limits()).delete == []


def test_limits_parse_and_refuse_with_the_reason():
    assert Limits.parse("days=1.5,count=20,bytes=2GiB") == Limits(timedelta(days=1.5), 20, 2 << 30)
    assert Limits.parse("off") == Limits()
    assert parse_size("512M") == 512 << 20 and parse_size("100") == 100
    for bad in ("days=x", "weeks=2", "count=-1", "bytes=lots", "count=1,count=2"):
        with pytest.raises(ValueError, match="retention limits"):
            Limits.parse(bad)


def test_delete_removes_files_and_folders(tmp_path):
    folder = tmp_path / "run" / "candidate"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x" * 10)
    file = tmp_path / "a.parquet"
    file.write_bytes(b"y" * 5)
    items = [
        Item("run", (tmp_path / "run",), 10, T0),
        Item("a", (file, tmp_path / "gone.json"), 5, T0),
    ]
    assert delete(items) == 15
    assert not (tmp_path / "run").exists() and not file.exists()
