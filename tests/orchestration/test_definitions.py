"""The code location loads, and every job, sensor, schedule and asset check resolves."""

import dagster as dg
import yaml

from core.settings import REPO_ROOT
from orchestration.definitions import defs


def test_workspace_points_at_the_one_definitions_module():
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    [location] = workspace["load_from"]
    assert location["python_module"]["module_name"] == "orchestration.definitions"
    assert isinstance(defs, dg.Definitions)


def test_every_job_sensor_schedule_and_check_resolves():
    repo = defs.get_repository_def()
    jobs = {job.name for job in repo.get_all_jobs()}
    assert {"ingest", "reference_profile_job"} <= jobs
    for sensor in repo.sensor_defs:
        targets = {t.job_name for t in sensor.targets}
        assert targets <= jobs, f"{sensor.name} targets unknown jobs {targets - jobs}"
    for schedule in repo.schedule_defs:
        assert schedule.job_name in jobs
    graph = repo.asset_graph
    checks = {key.name for key in graph.asset_check_keys}
    assert {"readable", "contract", "distribution_skew"} <= checks
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, f"asset {key.to_user_string()} has no description for the UI"
    assert "landing_sensor" in {s.name for s in repo.sensor_defs}
