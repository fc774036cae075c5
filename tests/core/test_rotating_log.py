"""Copy-truncate rotation: backups shift, the oldest drops, and a rotation that fails loses
nothing."""

from core.rotating_log import LogRotator, backup_path, rotate


def test_rotate_copies_and_truncates_in_place(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"a" * 50)
    assert not rotate(log, 100, 2)
    for fill in (b"b", b"c", b"d"):
        with open(log, "ab") as fh:
            fh.write(fill * 200)
        assert rotate(log, 100, 2)
    assert log.stat().st_size == 0
    assert backup_path(log, 1).read_bytes() == b"d" * 200
    assert backup_path(log, 2).read_bytes() == b"c" * 200
    assert not backup_path(log, 3).exists()


def test_a_failing_rotation_is_counted_and_the_child_goes_on(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"a" * 200)
    (tmp_path / "x.log.1").mkdir()  # the backup cannot be replaced: every rotation fails
    (tmp_path / "x.log.1" / "f").write_text("")
    rotator = LogRotator(log, 100, 1)
    assert not rotator.check() and rotator.failures == 1 and "x.log.1" in rotator.last_error
    assert log.stat().st_size == 200
