"""The Kubernetes files of the scale profile parse, and say what the local scale profile says:
the variables Settings reads, the same run limits, the same TorchServe capacity settings."""

import re
from pathlib import Path

import pytest
import yaml

from core.settings import ENV_VARS, REPO_ROOT, Settings
from orchestration.platform import instance_config
from serving.config import ServingConfig, render_properties

K8S = REPO_ROOT / "orchestration" / "deploy" / "k8s"
FILES = sorted(K8S.glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in FILES for d in _docs(p) if "kind" in d}


def _properties(text: str) -> dict[str, str]:
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    return dict(x.split("=", 1) for x in lines)


def _scale_settings(tmp_path: Path, config: dict[str, str]) -> Settings:
    return Settings.from_env(
        {
            **config,
            "LOOPLINE_HOME": str(tmp_path),
            "LOOPLINE_POSTGRES_URL": "postgresql+psycopg2://u:p@db/x",
            "LOOPLINE_REDIS_URL": "redis://cache:6379/0",
        }
    )


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_file_parses_into_named_objects(path):
    docs = _docs(path)
    assert docs
    for doc in docs:
        if path.name == "dagster-values.yaml":  # Helm values, not a manifest
            assert {"runLauncher", "dagsterDaemon", "postgresql"} <= set(doc)
            continue
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def test_variables_are_the_ones_settings_reads(tmp_path):
    named = set()
    for path in FILES:
        named |= set(re.findall(r"\bLOOPLINE_[A-Z_]+\b", path.read_text()))
    unknown = named - set(ENV_VARS)
    assert not unknown, f"names Settings does not read: {sorted(unknown)}"
    config = _all_docs()["ConfigMap", "loopline-config"]["data"]
    # The ConfigMap plus the two secret URLs make a valid scale profile.
    settings = _scale_settings(tmp_path, config)
    assert settings.scale and settings.serving_workers == 2
    # Batch and feature files on object storage; the home (SQLite state) on the shared volume.
    assert str(settings.lake).startswith("s3://") and "LOOPLINE_LAKE" in config
    profile = {"LOOPLINE_PROFILE", "LOOPLINE_HOME", "LOOPLINE_SERVING_WORKERS"}
    assert profile | {"LOOPLINE_MAX_CONCURRENT_RUNS"} <= set(config)
    assert Settings.from_env(config | {"LOOPLINE_PROFILE": "local"}).home == Path("/data/loopline")
    # Secrets are referenced, never written: no URL with a password in any file.
    for path in FILES:
        assert not re.search(r"(postgresql\S*|redis)://[^\s:@]*:[^.\s@]+@", path.read_text())


def test_dagster_values_match_the_scale_instance(tmp_path):
    [values] = _docs(K8S / "dagster-values.yaml")
    config = _all_docs()["ConfigMap", "loopline-config"]["data"]
    local = yaml.safe_load(instance_config(_scale_settings(tmp_path, config)))["concurrency"]
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    assert queued["maxConcurrentRuns"] == local["runs"]["max_concurrent_runs"]
    assert queued["tagConcurrencyLimits"] == local["runs"]["tag_concurrency_limits"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    [code] = values["dagster-user-deployments"]["deployments"]
    assert code["dagsterApiGrpcArgs"] == ["--module-name", "orchestration.definitions"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for pod in (code, launcher):  # code server and run pods see the same settings and files
        assert pod["envConfigMaps"] == [{"name": "loopline-config"}]
        assert pod["envSecrets"] == [{"name": "loopline-secrets"}]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "loopline-home"


def test_torchserve_properties_are_the_librarys_with_pod_addresses(tmp_path):
    docs = _all_docs()
    workers = int(docs["ConfigMap", "loopline-config"]["data"]["LOOPLINE_SERVING_WORKERS"])
    k8s = _properties(docs["ConfigMap", "loopline-torchserve"]["data"]["config.properties"])
    home = Path("/data/loopline")
    library = _properties(
        render_properties(
            ServingConfig(
                serving_dir=home / "serving",
                model_store=home / "serving" / "model-store",
                home=home,
                workers_per_model=workers,
                inference_port=8085,
            ),
            champion="v0001",
        )
    )
    assert set(k8s) == set(library)
    pod_only = {"metrics_address", "enable_model_api", "disable_token_authorization"}
    assert {k for k in k8s if k8s[k] != library[k]} == pod_only
    assert k8s["default_workers_per_model"] == str(workers)

    deployment = docs["Deployment", "loopline-torchserve"]["spec"]["template"]["spec"]
    torchserve, gateway = deployment["containers"]
    assert {"configMapRef": {"name": "loopline-config"}} in torchserve["envFrom"]
    token = gateway["env"][0]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "loopline-serving-token", "key": "TS_GATEWAY_TOKEN"}
    template = docs["ConfigMap", "loopline-torchserve"]["data"]["gateway.conf.template"]
    assert "${TS_GATEWAY_TOKEN}" in template and "127.0.0.1:8085" in template
    service = docs["Service", "loopline-torchserve"]["spec"]
    assert service["selector"] == {"app.kubernetes.io/name": "loopline-torchserve"}
