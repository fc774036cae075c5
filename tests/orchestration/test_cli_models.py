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


def test_only_a_forced_promotion_with_a_reason_skips_the_gate_and_status_shows_it(tmp_path):
    from core.settings import Settings
    from orchestration import cli_loop, health

    home = tmp_path / "home"
    registry = stub_registry(tmp_path, 2, path=home / "registry" / "registry.sqlite")
    env = {"LOOPLINE_HOME": str(home), "COLUMNS": "300"}
    runner = CliRunner()
    assert runner.invoke(main, ["models", "promote", "v0001"], env=env).exit_code == 0
    # v0002 was judged against no champion; v0001 serves now: its pass no longer holds.
    refused = runner.invoke(main, ["models", "promote", "v0002"], env=env)
    assert refused.exit_code != 0 and "judged against no champion" in refused.output
    bare = runner.invoke(main, ["models", "promote", "v0002", "--force"], env=env)
    assert bare.exit_code == 2 and "--force needs --reason" in bare.output
    assert registry.get_alias(CHAMPION) == "v0001" and registry.overrides() == []

    forced = runner.invoke(
        main, ["models", "promote", "v0002", "--force", "--reason", "hotfix INC-42"], env=env
    )
    assert forced.exit_code == 0, forced.output
    assert "override recorded" in forced.output and registry.get_alias(CHAMPION) == "v0002"
    [override] = health.health_report(Settings.from_env(env), None)["overrides"]
    assert (override["version"], override["reason"]) == ("v0002", "hotfix INC-42")
    line = dict(cli_loop._health_lines({**_empty_health(), "overrides": [override]}))["override"]
    assert "v0002 forced to champion: hotfix INC-42 (the gate had said: v0002 was judged" in line


def _empty_health() -> dict:
    return {"disk_bytes": {}, "keys": None, "sensors": [], "pending_releases": []}
