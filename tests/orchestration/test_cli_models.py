"""`loopline models` with TorchServe stopped: a promotion is recorded as pending and
`loopline models reconcile` says what is left to apply."""

from click.testing import CliRunner

from models.registry import CHAMPION
from orchestration.cli import main
from tests.serving.fakes import stub_registry


def test_a_promotion_while_torchserve_is_stopped_stays_pending_until_reconciled(tmp_path):
    home = tmp_path / "home"
    registry = stub_registry(tmp_path, 1, path=home / "registry" / "registry.sqlite")
    env = {"LOOPLINE_HOME": str(home), "COLUMNS": "200"}
    runner = CliRunner()

    promoted = runner.invoke(main, ["models", "promote", "v0001", "--reason", "first"], env=env)
    assert promoted.exit_code == 0, promoted.output
    assert "TorchServe is not running" in promoted.output
    assert registry.get_alias(CHAMPION) == "v0001"

    pending = runner.invoke(main, ["models", "reconcile"], env=env)
    assert pending.exit_code == 0, pending.output
    assert "pending: promote none -> v0001 (first)" in pending.output
    assert "TorchServe is not running" in pending.output
