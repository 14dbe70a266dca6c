"""cluster_configs/: the Ray cluster launcher YAMLs are valid for Ray's own schema and checks,
and the KubeRay manifests carry the fields KubeRay requires; all of them run examples/train.py
with checkpoints on object storage. Nothing here starts a cluster."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "cluster_configs"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
OBJECT_STORE_ROOT = re.compile(r"--ckpt-root (s3|gs)://")


def _load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((CONFIGS / name).read_text()) if doc]


def test_the_directory_holds_exactly_the_documented_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(LAUNCHER + KUBERAY)


# --- Ray cluster launcher ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_is_valid_for_rays_schema(name, ray_schema):
    (config,) = _load(name)
    jsonschema.validate(config, ray_schema)  # raises ValidationError naming the field


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_own_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _load(name)
    # what `ray up` does first: fill in the provider's defaults, then check the whole
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for node_type in types.values():
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", 0) <= (
            config["max_workers"]
        )


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_installs_ray_ckpt_and_documents_the_job(name):
    (config,) = _load(name)
    text = (CONFIGS / name).read_text()
    assert config["file_mounts"]["~/ray_ckpt"] == "."
    assert any("pip install" in c and "~/ray_ckpt" in c for c in config["setup_commands"])
    assert "ray job submit" in text and "examples/train.py" in text
    assert OBJECT_STORE_ROOT.search(text), "checkpoints go to object storage"
    assert "CHANGE" in text


def test_the_schema_check_can_fail(ray_schema):
    (config,) = _load("aws.yaml")
    config["provider"] = {"region": "us-west-2"}  # no type
    with pytest.raises(jsonschema.ValidationError, match="'type' is a required property"):
        jsonschema.validate(config, ray_schema)
    (config,) = _load("gcp.yaml")
    config["available_node_types"]["ray_worker_cpu"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema)


# --- KubeRay -------------------------------------------------------------------------------------


def _check_pod_template(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for container in containers:
        assert container["name"] and container["image"], f"{where}: a container needs both"
        for port in container.get("ports", []):
            assert isinstance(port["containerPort"], int), where
    return containers


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """What KubeRay's RayCluster CRD requires (ray.io/v1): a headGroupSpec with rayStartParams
    (string values) and a pod template with containers; worker groups with a unique groupName,
    replica bounds, rayStartParams and a pod template."""
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), where
    head_containers = _check_pod_template(head["template"], f"{where}.headGroupSpec")
    ports = {p["containerPort"] for c in head_containers for p in c.get("ports", [])}
    assert 8265 in ports, f"{where}: the head exposes the dashboard / job server"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: duplicate groupName"
    for group in groups:
        here = f"{where}.workerGroupSpecs[{group['groupName']}]"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], here
        assert isinstance(group["rayStartParams"], dict), here
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), here
        _check_pod_template(group["template"], here)


def _ray_object(name: str, kind: str) -> dict[str, Any]:
    (obj,) = [d for d in _load(name) if d["kind"] == kind]
    assert obj["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    return obj


def test_raycluster_has_what_kuberay_requires():
    cluster = _ray_object("kuberay-raycluster.yaml", "RayCluster")
    _check_cluster_spec(cluster["spec"], "RayCluster")


def test_rayjob_has_what_kuberay_requires_and_runs_the_example():
    job = _ray_object("kuberay-rayjob.yaml", "RayJob")
    spec = job["spec"]
    assert "examples/train.py" in spec["entrypoint"]
    assert OBJECT_STORE_ROOT.search(spec["entrypoint"]), "checkpoints go to object storage"
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pods_share_the_auth_token_and_a_service_account(name):
    docs = _load(name)
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    ray_obj = next(d for d in docs if d["apiVersion"] == "ray.io/v1")
    spec = ray_obj["spec"].get("rayClusterSpec", ray_obj["spec"])
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in
                                                        spec["workerGroupSpecs"]]
    for template in templates:
        assert template["spec"]["serviceAccountName"] == account
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-ckpt-auth"
