"""The Kubernetes manifests validate against the KubeRay v1.7 CRDs (unknown fields are errors) and their
entrypoints name real jobs and configs whose overrides pass cxr's own validation."""

from __future__ import annotations

import copy
import functools
import os
import shlex

import jsonschema
import pytest
import yaml

from cxr import config

ROOT = os.path.join(os.path.dirname(__file__), "..")
CRDS = os.path.join(ROOT, "..", "shared", "kuberay-crds")
MANIFESTS = sorted(f for f in os.listdir(os.path.join(ROOT, "k8s")) if f.endswith(".yaml"))


def _strict(schema: dict) -> dict:
    """Forbid unknown fields wherever the schema lists properties, as KubeRay's kubeconform CI does."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    with open(os.path.join(CRDS, f"ray.io_{kind.lower()}s.yaml")) as fh:
        crd = yaml.safe_load(fh)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def ray_objects() -> list[tuple[str, dict]]:
    """Every ray.io object in k8s/, including RayJobs embedded in ConfigMaps for the CronJob."""
    found = []
    for name in MANIFESTS:
        with open(os.path.join(ROOT, "k8s", name)) as fh:
            for doc in yaml.safe_load_all(fh):
                if doc["apiVersion"].startswith("ray.io/"):
                    found.append((name, doc))
                elif doc["kind"] == "ConfigMap":
                    for key, text in doc["data"].items():
                        found.append((f"{name}:{key}", yaml.safe_load(text)))
    return found


@pytest.mark.parametrize("where,obj", ray_objects(), ids=[w for w, _ in ray_objects()])
def test_manifest_matches_kuberay_crd(where: str, obj: dict) -> None:
    jsonschema.validate(obj, crd_schema(obj["kind"]))


@pytest.mark.parametrize("where,obj", ray_objects(), ids=[w for w, _ in ray_objects()])
def test_entrypoint_runs_a_real_job_with_a_valid_config(where: str, obj: dict) -> None:
    argv = shlex.split(obj["spec"]["entrypoint"])
    assert argv[0] == "python" and os.path.exists(os.path.join(ROOT, argv[1])), argv
    if "--config" in argv:
        i = argv.index("--config")
        cfg = config.load(os.path.join(ROOT, argv[i + 1]), argv[i + 2:])
        assert cfg.run.storage_path.startswith("s3://") and cfg.data.manifest_uri.startswith("s3://")


def test_strict_schema_rejects_unknown_fields() -> None:
    _, obj = ray_objects()[0]
    bad = copy.deepcopy(obj)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.validate(bad, crd_schema(bad["kind"]))
    bad = copy.deepcopy(obj)
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema(bad["kind"]))
