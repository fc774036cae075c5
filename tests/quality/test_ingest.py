import builtins
import io
from datetime import UTC, datetime

import polars as pl
import pytest

from quality.ingest import (
    UnreadableBatch,
    batch_id_of,
    content_id,
    quarantine,
    read_batch,
    scan_landing,
)
from usecases.fraud.simulator import SCHEMAS


@pytest.fixture
def opened(monkeypatch) -> list:
    """Every file opened through Python while the test runs."""
    seen: list = []
    real = builtins.open

    def spy(file, *args, **kwargs):
        seen.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return seen


def _tx(n: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(n)],
            "card_id": ["c1"] * n,
            "merchant_id": ["m1"] * n,
            "amount": [10.5] * n,
            "channel": ["pos"] * n,
            "country": ["US"] * n,
            "event_timestamp": [datetime(2026, 11, 1, 12, tzinfo=UTC)] * n,
        },
        schema=SCHEMAS["transactions"],
    )


def test_batch_id_comes_from_the_file_not_its_bytes_and_content_id_from_its_bytes(tmp_path):
    a, b = tmp_path / "transactions-a.parquet", tmp_path / "transactions-b.parquet"
    _tx().write_parquet(a)
    b.write_bytes(a.read_bytes())
    # The same file keeps its id; a copy is another landing (its bytes tell it is a copy).
    assert batch_id_of(a) == batch_id_of(a) != batch_id_of(b)
    assert content_id(a) == content_id(b)
    # The same name written again (another inode, size or time) is a new batch.
    first = batch_id_of(a)
    a.unlink()
    _tx(4).write_parquet(a)
    assert batch_id_of(a) != first and content_id(a) != content_id(b)


def test_scan_reads_no_file_body_and_refuses_a_file_over_the_size_limit(tmp_path, opened):
    _tx().write_parquet(tmp_path / "transactions-1.parquet")
    huge = tmp_path / "transactions-huge.parquet"
    with huge.open("wb") as fh:
        fh.truncate(2 * 1024**3)  # sparse: 2 GB long, no disk used
    opened.clear()
    found = {f.path.name: f for f in scan_landing(tmp_path, max_bytes=1024**3)}
    assert [f for f in opened if str(tmp_path) in str(f)] == []  # metadata only
    assert found["transactions-1.parquet"].problem is None
    assert "file too large: 2147483648 bytes" in found[huge.name].problem
    assert "LOOPLINE_MAX_LANDING_BYTES" in found[huge.name].problem
    assert found[huge.name].size == 2 * 1024**3


def test_scan_skips_hidden_and_temporary_files_and_flags_bad_names(tmp_path):
    _tx().write_parquet(tmp_path / "transactions-1.parquet")
    _tx().write_parquet(tmp_path / ".transactions-2.parquet.tmp")
    (tmp_path / "orders-1.parquet").write_bytes(b"x")
    (tmp_path / "transactions-3.json").write_bytes(b"{}")
    (tmp_path / "transactions- $(rm -rf).csv").write_bytes(b"x")
    found = {f.path.name: f for f in scan_landing(tmp_path)}
    assert ".transactions-2.parquet.tmp" not in found
    assert found["transactions-1.parquet"].problem is None
    assert found["transactions-1.parquet"].dataset == "transactions"
    assert "unknown dataset" in found["orders-1.parquet"].problem
    assert "unsupported file type" in found["transactions-3.json"].problem
    assert "unsafe file name" in found["transactions- $(rm -rf).csv"].problem


def test_csv_batch_is_parsed_to_the_declared_types(tmp_path):
    path = tmp_path / "transactions-1.csv"
    _tx().write_csv(path)
    df = read_batch(path, "transactions")
    assert df.schema == pl.Schema(SCHEMAS["transactions"])
    assert df["event_timestamp"][0] == datetime(2026, 11, 1, 12, tzinfo=UTC)


def test_csv_column_that_does_not_parse_stays_text_for_the_contract(tmp_path):
    path = tmp_path / "transactions-1.csv"
    _tx().with_columns(pl.lit("ten").alias("amount")).write_csv(path)
    df = read_batch(path, "transactions")
    assert df.schema["amount"] == pl.String


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"PAR1 this is not parquet", "cannot read parquet")],
)
def test_unreadable_files_raise_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "transactions-1.parquet"
    path.write_bytes(content)
    with pytest.raises(UnreadableBatch, match=reason):
        read_batch(path, "transactions")


def test_zero_row_batch_is_unreadable(tmp_path):
    path = tmp_path / "transactions-1.parquet"
    _tx(0).write_parquet(path)
    with pytest.raises(UnreadableBatch, match="no rows"):
        read_batch(path, "transactions")


def test_quarantine_keeps_the_file_and_its_reasons(tmp_path):
    src = tmp_path / "transactions-1.parquet"
    src.write_bytes(b"garbage")
    where = quarantine(
        tmp_path / "q", batch_id="abc", dataset="transactions", source=src, reasons=["corrupt"]
    )
    assert (where / src.name).read_bytes() == b"garbage"
    assert '"corrupt"' in (where / "reason.json").read_text()
    assert src.exists()


def test_quarantine_by_move_renames_the_file_in_without_reading_it(tmp_path, opened):
    src = tmp_path / "transactions-1.parquet"
    with src.open("wb") as fh:
        fh.truncate(2 * 1024**3)
    inode = src.stat().st_ino
    opened.clear()
    where = quarantine(
        tmp_path / "q",
        batch_id="abc",
        dataset="transactions",
        source=src,
        reasons=["too large"],
        move=True,
    )
    assert not src.exists() and (where / src.name).stat().st_ino == inode  # renamed, not copied
    assert [f for f in opened if str(f).endswith(".parquet")] == []
    assert '"too large"' in (where / "reason.json").read_text()


def test_quarantine_of_a_file_that_is_gone_keeps_its_reasons(tmp_path):
    where = quarantine(
        tmp_path / "q", batch_id="abc", dataset="transactions", source=None, reasons=["gone"]
    )
    assert '"gone"' in (where / "reason.json").read_text()
