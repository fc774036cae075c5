"""A deployment's shadow replay reads the newest prediction-log files only, however long the log."""

from pathlib import Path
from types import SimpleNamespace

from orchestration.serving_assets import replay_requests
from serving import prediction_log
from serving.prediction_log import PredictionLog

FILES, PER_FILE = 50, 10


def _answered(i: int) -> dict:
    return {"status": 200, "transaction_id": f"t{i}", "request": {"transaction_id": f"t{i}"}}


def _log_history(log_dir: Path) -> None:
    """50 closed files of 10 customer requests, each with a shadow request and a refusal."""
    for f in range(FILES):
        log = PredictionLog(log_dir, max_file_age_s=3600.0).start()
        log.log_many(
            [_answered(f * PER_FILE + i) for i in range(PER_FILE)]
            + [
                {**_answered(-1), "transaction_id": f"shadow:{f}"},
                {"status": 400, "transaction_id": f"bad{f}", "request": {"transaction_id": "x"}},
            ]
        )
        log.close()
    assert len(prediction_log.closed_files(log_dir)) == FILES


def test_replay_takes_the_newest_customer_requests_from_the_newest_files_only(
    tmp_path, monkeypatch
):
    _log_history(tmp_path)
    opened: list[str] = []
    read = prediction_log.file_records

    def spy(path, stats=None):
        opened.append(Path(path).name)
        yield from read(path, stats)

    monkeypatch.setattr(prediction_log, "file_records", spy)
    config = SimpleNamespace(prediction_log_dir=tmp_path)

    replay, source = replay_requests(None, config, 25)

    assert source == "prediction log"
    total = FILES * PER_FILE
    assert [r["transaction_id"] for r in replay] == [f"t{i}" for i in range(total - 25, total)]
    newest = [p.name for p in prediction_log.closed_files(tmp_path)][-3:]
    assert sorted(opened) == newest  # 3 files hold the newest 25, not all 50

    opened.clear()
    everything, _ = replay_requests(None, config, 10_000)  # more than the log holds: all of it
    assert [r["transaction_id"] for r in everything] == [f"t{i}" for i in range(total)]
    assert len(opened) == FILES


def test_replay_skips_and_counts_a_torn_line(tmp_path):
    _log_history(tmp_path)
    newest = prediction_log.closed_files(tmp_path)[-1]
    lines = newest.read_bytes().splitlines(keepends=True)
    newest.write_bytes(lines[0][:20] + b"\n" + b"".join(lines[1:]))  # a kill mid-write
    stats = prediction_log.ReadStats()

    replay, _ = replay_requests(None, SimpleNamespace(prediction_log_dir=tmp_path), 25, stats)

    assert len(replay) == 25 and stats.torn_lines == 1
    assert f"t{(FILES - 1) * PER_FILE}" not in [r["transaction_id"] for r in replay]
