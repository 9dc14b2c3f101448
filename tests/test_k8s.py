"""The Kubernetes deliverables, offline: each kustomize overlay renders; every ray.io object validates against the
KubeRay v1.7 CRDs and every core object against the Kubernetes OpenAPI schemas, unknown fields rejected; the
entrypoints name real jobs and configs whose overrides pass cxr's own validation; no credential is inline; every
Ray cluster uses token auth, every container has requests and limits, GPUs go to GPU groups only; every pod is
locked down; NetworkPolicies fence the Ray heads; the retrain schedulers start the same spec; the image is built
from a digest-pinned base, as a non-root user, with every install held to requirements.lock, from a minimal
context, and tagged with the project version.

Rendering: `kubectl kustomize` is the authority when kubectl is on PATH; the small renderer below (exactly the
kustomize features k8s/ uses) renders otherwise, and is held to kubectl's output whenever both are there.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cxr import cli, config, sweep

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
K8S = os.path.join(ROOT, "k8s")
# KubeRay v1.7's CRDs, as the operator installs them (beside the checkout; $CXR_KUBERAY_CRDS for a git worktree)
CRDS = os.environ.get("CXR_KUBERAY_CRDS") or os.path.join(ROOT, "..", "shared", "kuberay-crds")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
CLUSTER_DOC = os.path.join(ROOT, "docs", "cluster.md")

OVERLAYS = ("cpu-dev", "gpu")
# each overlay's stack, its one-off jobs and its RayCronJob (which exists only where it is turned on)
BUILDS = tuple(b for o in OVERLAYS for b in (o, f"{o}/jobs", f"{o}/schedule"))
# 1.30: the oldest Kubernetes these manifests are for (nothing newer-only may appear); 1.37: the newest schemas
# kubernetes-validate bundles (nothing removed since may appear).
KUBE_VERSIONS = ("1.30", "1.37")
IMAGE_REPO = "registry.example.org/cxr"  # what the overlays' `images:` make of the base's bare `cxr`
SUBMITTER_NAMESPACE = "cxr-submit"
OPERATOR_NAMESPACE = "kuberay-system"
DASHBOARD_PORT, GCS_PORT = 8265, 6379
GPU = "nvidia.com/gpu"


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


# ---------------------------------------------------------------------------------------- the Dockerfile


def dockerfile_instructions(path: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: backslash continuations joined, comment lines dropped, as Docker does."""
    instructions, pending = [], ""
    with open(path) as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if line.lstrip().startswith("#"):
                continue  # a comment, also inside a continued instruction
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.strip():
                keyword, _, args = line.strip().partition(" ")
                instructions.append((keyword.upper(), args.strip()))
    if pending.strip():
        raise ValueError(f"{path}: the last instruction ends with a line continuation")
    return instructions


def _substitute(value: str, env: dict[str, str]) -> str:
    """$NAME and ${NAME} from the ENV set so far (Docker's substitution, without the :- and :+ forms)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def dockerfile_env(path: str = DOCKERFILE) -> dict[str, str]:
    """The environment every ENV instruction of the Dockerfile gives its image: `K=V ...` and legacy `K V` forms."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(path):
        if keyword != "ENV":
            continue
        first = args.split(None, 1)[0]
        if "=" not in first:  # legacy form: ENV KEY the rest of the line
            key, _, value = args.partition(" ")
            env[key] = _substitute(value.strip(), env)
            continue
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            if not sep:
                raise ValueError(f"{path}: ENV {args!r} mixes KEY=VALUE and legacy forms")
            env[key] = _substitute(value, env)
    return env


def image_workdir() -> str:
    workdirs = [args for keyword, args in dockerfile_instructions() if keyword == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR: the manifests' /opt/cxr paths would point nowhere"
    return workdirs[-1]


def image_copies() -> dict[str, str]:
    """{path in the image: source in the repo} of every COPY into the WORKDIR (directories and files)."""
    copied = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY":
            *sources, dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:
                target = dest.rstrip("/") if len(sources) == 1 and not dest.endswith("/") else f"{dest}/{src}"
                copied[os.path.normpath(os.path.join(image_workdir(), target))] = src
    return copied


# ---------------------------------------------------------------------------------------- rendering

RENDERER_FEATURES = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "namespace", "images",
                     "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json_patch(doc: dict, ops: list[dict], where: str) -> None:
    """RFC 6902 add/replace/remove, in place: what kustomize's `patches` do with a JSON patch."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            index = int(last) if isinstance(node, list) else last
            if isinstance(node, dict) and last not in node:
                raise KeyError(f"{where}: replace {op['path']}: no such field")
            node[index] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise ValueError(f"{where}: JSON patch op {op['op']!r} is beyond the in-test renderer")


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    meta = doc["metadata"]
    if "group" in target and target["group"] != group or "version" in target and target["version"] != version:
        return False
    if "kind" in target and not re.fullmatch(target["kind"], doc["kind"]):
        return False
    if "name" in target and not re.fullmatch(target["name"], meta["name"]):
        return False
    for term in filter(None, target.get("labelSelector", "").split(",")):
        key, sep, value = term.partition("=")
        assert sep and "!" not in key, f"label selector {term!r} is beyond the in-test renderer"
        if meta.get("labels", {}).get(key) != value:
            return False
    return True


def _retag(node: object, images: list[dict]) -> None:
    """kustomize's `images:`: every containers/initContainers image whose name matches, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    ref = container.get("image", "")
                    name, at, digest = ref.partition("@")
                    slash = name.rfind("/")
                    colon = name.rfind(":")
                    name, tag = (name[:colon], name[colon + 1:]) if colon > slash else (name, "")
                    for image in images:
                        if image["name"] == name:
                            tag = image.get("newTag", tag)
                            name = image.get("newName", name)
                            container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if at else "")
            _retag(value, images)
    elif isinstance(node, list):
        for value in node:
            _retag(value, images)


def kustomize(directory: str, accumulated: list[dict] | None = None) -> list[dict]:
    """Render a Kustomization (or apply a Component to `accumulated`), in kustomize's order: resources,
    components, generators, then patches, namespace and images."""
    with open(os.path.join(directory, "kustomization.yaml")) as fh:
        k = yaml.safe_load(fh)
    beyond = set(k) - RENDERER_FEATURES
    assert not beyond, f"{directory}: {sorted(beyond)} are beyond the in-test renderer: extend it or use kubectl"
    docs = list(accumulated or [])
    for entry in k.get("resources", []):
        path = os.path.join(directory, entry)
        if os.path.isdir(path):
            docs += kustomize(path)
        else:
            with open(path) as fh:
                docs += [d for d in yaml.safe_load_all(fh) if d]
    for entry in k.get("components", []):
        docs = kustomize(os.path.join(directory, entry), docs)
    for generator in k.get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash") is True, f"{directory}: name-suffix hashes are beyond the renderer"
        data = {}
        for entry in generator.get("files", []):
            key, _, path = entry.rpartition("=")
            with open(os.path.join(directory, path)) as fh:
                data[key or os.path.basename(path)] = fh.read()
        meta = {"name": generator["name"], **({"labels": options["labels"]} if "labels" in options else {})}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for patch in k.get("patches", []):
        if "path" in patch:
            with open(os.path.join(directory, patch["path"])) as fh:
                ops = yaml.safe_load(fh)
        else:
            ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list) and "target" in patch, f"{directory}: only JSON patches with a target"
        for doc in docs:
            if _matches(doc, patch["target"]):
                _json_patch(doc, ops, f"{directory}: {doc['kind']}/{doc['metadata']['name']}")
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
            for subject in doc.get("subjects", []) if doc["kind"] in ("RoleBinding", "ClusterRoleBinding") else []:
                if subject["kind"] == "ServiceAccount" and subject.get("namespace", "default") == "default":
                    subject["namespace"] = k["namespace"]
    _retag(docs, k.get("images", []))
    return docs


def _keyed(docs: list[dict]) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}": d for d in docs}


@functools.cache
def rendered(build: str) -> tuple[dict, ...]:
    """The documents `kubectl kustomize k8s/overlays/BUILD` gives (the in-test renderer's where kubectl is missing)."""
    path = os.path.join(K8S, "overlays", build)
    ours = kustomize(path)
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"kubectl kustomize {build}: {out.stderr}"
        theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
        mine, official = _keyed(ours), _keyed(theirs)
        assert mine.keys() == official.keys(), f"{build}: the in-test renderer's objects differ from kubectl's"
        differ = [key for key in mine if mine[key] != official[key]]
        assert not differ, f"{build}: the in-test renderer renders {differ} unlike kubectl kustomize"
        return tuple(theirs)
    return tuple(ours)


def objects(builds: tuple[str, ...] = BUILDS) -> list[tuple[str, dict]]:
    return [(f"{b}:{d['kind']}/{d['metadata']['name']}", d) for b in builds for d in rendered(b)]


def ray_objects() -> list[tuple[str, dict]]:
    return [(w, d) for w, d in objects() if d["apiVersion"].startswith("ray.io/")]


def core_objects() -> list[tuple[str, dict]]:
    return [(w, d) for w, d in objects() if not d["apiVersion"].startswith("ray.io/")]


def ids(pairs: list[tuple[str, object]]) -> list[str]:
    return [w for w, *_ in pairs]


def job_specs(builds: tuple[str, ...] = BUILDS) -> list[tuple[str, dict]]:
    """Every RayJob spec: the RayJobs' own and each RayCronJob's jobTemplate."""
    found = []
    for where, doc in objects(builds):
        if doc["kind"] == "RayJob":
            found.append((where, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            found.append((f"{where}.jobTemplate", doc["spec"]["jobTemplate"]))
    return found


def scheduler(overlay: str) -> types.ModuleType:
    """The scheduler script exactly as the overlay's ConfigMap ships it, loaded as a module."""
    cm = next(d for d in rendered(overlay) if d["kind"] == "ConfigMap")
    module = types.ModuleType("retrain_scheduler")
    exec(compile(cm["data"]["retrain_scheduler.py"], "retrain_scheduler.py", "exec"), module.__dict__)
    return module


def scheduler_args(overlay: str) -> dict[str, str]:
    """--key=value arguments of the CronJob's scheduler container."""
    cronjob = next(d for d in rendered(overlay) if d["kind"] == "CronJob")
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


def scheduled_round(overlay: str, slot: str = "2026-12-06") -> dict:
    """The RayJob the CronJob's scheduler creates for `slot`, from the overlay's template and its arguments."""
    args = scheduler_args(overlay)
    template = next(copy.deepcopy(d) for d in rendered(overlay) if d["kind"] == "RayJob"
                    and d["metadata"]["name"] == args["template"])
    return scheduler(overlay).rayjob_for_slot(template, args["name"], slot, int(args["backoff-limit"]),
                                              int(args["keep-days"]))


def scheduled_rounds() -> list[tuple[str, dict]]:
    return [(f"{o}:CronJob/cxr-retrain's round", scheduled_round(o)["spec"]) for o in OVERLAYS]


def round_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec that runs: job_specs() but the suspended template, plus the rounds the scheduler makes."""
    return [(w, s) for w, s in job_specs() if not s.get("suspend")] + scheduled_rounds()


def cluster_specs(builds: tuple[str, ...] = BUILDS) -> list[tuple[str, dict]]:
    """Every RayClusterSpec: the RayClusters' own and those inside RayJobs and RayCronJobs."""
    found = [(w, d["spec"]) for w, d in objects(builds) if d["kind"] == "RayCluster"]
    return found + [(f"{w}.rayClusterSpec", s["rayClusterSpec"]) for w, s in job_specs(builds)]


def pod_specs(builds: tuple[str, ...] = BUILDS) -> list[tuple[str, dict]]:
    """Every PodSpec (a mapping with `containers`) anywhere in the rendered manifests, named by where it sits."""
    found = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.append((where, node))
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for where, doc in objects(builds):
        walk(doc, where)
    return found


def containers(builds: tuple[str, ...] = BUILDS) -> Iterator[tuple[str, dict]]:
    """Every container, and the autoscaler sidecar KubeRay adds from autoscalerOptions."""
    for where, spec in pod_specs(builds):
        for container in spec["containers"] + spec.get("initContainers", []):
            yield f"{where}:{container['name']}", container
    for where, spec in cluster_specs(builds):
        if spec.get("enableInTreeAutoscaling"):
            yield f"{where}:autoscaler", spec.get("autoscalerOptions", {})


# ---------------------------------------------------------------------------------------- schemas


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
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The v1 schema of KubeRay's CRD for `kind`, strict. Built once: jsonschema.validate would re-check the
    (controller-generated, 1 MB) schema on every call."""
    with open(os.path.join(CRDS, f"ray.io_{kind.lower()}s.yaml")) as fh:
        crd = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 7x faster here
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.validators.validator_for(schema)(schema)


EXPECTED_KINDS = {
    "cpu-dev": {"RayCluster": 1, "RayJob": 1, "ServiceAccount": 1, "Role": 1, "RoleBinding": 1,
                "ConfigMap": 1, "CronJob": 1, "Deployment": 1, "Service": 1, "PersistentVolumeClaim": 1,
                "NetworkPolicy": 3},
    "gpu": {"RayCluster": 1, "RayJob": 1, "ServiceAccount": 1, "Role": 1, "RoleBinding": 1,
            "ConfigMap": 1, "CronJob": 1, "Deployment": 1, "StatefulSet": 1, "Service": 2, "NetworkPolicy": 4},
    "cpu-dev/jobs": {"RayJob": 4},
    "gpu/jobs": {"RayJob": 4},
    "cpu-dev/schedule": {"RayCronJob": 1},
    "gpu/schedule": {"RayCronJob": 1},
}


@pytest.mark.parametrize("build", BUILDS)
def test_overlay_renders_the_expected_objects(build: str) -> None:
    docs = rendered(build)
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    ray = sum(n for kind, n in kinds.items() if kind.startswith("Ray"))
    print(f"{build}: {ray} ray.io objects, {len(docs) - ray} core objects ({', '.join(sorted(kinds))})")
    assert kinds == EXPECTED_KINDS[build]
    assert not [d for d in docs if d["kind"] == "RayJob" and build in OVERLAYS and not d["spec"].get("suspend")], \
        f"applying {build} would start a job: only the schedulers' suspended template belongs in the stack"


@pytest.mark.parametrize("where,obj", ray_objects(), ids=ids(ray_objects()))
def test_ray_object_matches_kuberay_crd(where: str, obj: dict) -> None:
    crd_validator(obj["kind"]).validate(obj)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("where,obj", core_objects(), ids=ids(core_objects()))
def test_core_object_matches_kubernetes_openapi(where: str, obj: dict, version: str) -> None:
    """Strict: unknown fields are errors. Every core object must have a schema (none is skipped as a CRD)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")


def test_strict_schemas_reject_unknown_fields() -> None:
    rayjob = next(d for _, d in objects(("gpu/jobs",)) if d["kind"] == "RayJob")
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        crd_validator(bad["kind"]).validate(bad)
    bad = copy.deepcopy(rayjob)
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(bad["kind"]).validate(bad)
    deployment = next(d for _, d in objects(("gpu",)) if d["kind"] == "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------------- entrypoints


def mlflow_uri(build: str) -> str:
    """The tracking URI of the namespace's MLflow Service (the stack's, also for the jobs of its overlay)."""
    stack = build.split("/")[0]
    service = next(d for d in rendered(stack) if d["kind"] == "Service"
                   and d["metadata"]["labels"].get("app.kubernetes.io/component") == "mlflow")
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def repo_path(image_path: str) -> str:
    """The repo file an absolute path in the image comes from (via the Dockerfile's COPYs), or ''."""
    for dest, src in image_copies().items():
        if image_path == dest or image_path.startswith(dest + "/"):
            return os.path.normpath(os.path.join(ROOT, src, os.path.relpath(image_path, dest)))
    return ""


SLOT = "$(date -u +%F)"  # a hand-made round: the submitter's date
ROUND = "$CXR_ROUND"  # a RayCronJob's round: its RayJob's name (the submitter pod's label, via the downward API)
SAMPLE = {SLOT: "2026-01-04", ROUND: "cxr-retrain-weekly-29452440"}  # what the submitter's shell makes of them


def parse_entrypoint(entrypoint: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """(job script, {flag: values}, key=value overrides) of `python /opt/cxr/jobs/X.py ...`."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and len(argv) > 1, argv
    arity = {"--config": 1, "--prepare": 2, "--slot": 1, "--promote": 0, "--size": 1, "--codec": 1,
             "--images-per-shard": 1, "--space": 1, "--trials": 1, "--max-concurrent": 1}
    flags: dict[str, list[str]] = {}
    overrides, positional = [], []
    i = 2
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            assert token in arity, f"{token}: not an option the jobs take ({entrypoint})"
            flags[token] = argv[i + 1:i + 1 + arity[token]]
            i += 1 + arity[token]
        else:
            (overrides if "=" in token and not token.startswith("s3://") else positional).append(token)
            i += 1
    flags["positional"] = positional
    return argv[1], flags, overrides


@pytest.mark.parametrize("where,spec", job_specs(), ids=ids(job_specs()))
def test_entrypoint_runs_a_real_job_with_a_valid_config(where: str, spec: dict) -> None:
    """The job script and config are in the repo and copied into the image; the overrides pass cxr's validation;
    data and runs live in S3; results go to this namespace's MLflow; the CLI accepts the arguments."""
    script, flags, overrides = parse_entrypoint(spec["entrypoint"])
    source = repo_path(script)
    assert source and os.path.isfile(source), f"{where}: {script} is not a file the image gets from the repo"
    with open(source) as fh:
        command = re.search(r'main\(\["(\w+)"', fh.read())
    if command:  # a thin wrapper of `cxr COMMAND`: its parser must accept the arguments
        argv = shlex.split(spec["entrypoint"])[2:]
        cli.build_parser().parse_args([command.group(1), *[SAMPLE.get(a, a) for a in argv]])
    if "--config" in flags:
        path = repo_path(flags["--config"][0])
        assert path and os.path.isfile(path), f"{where}: {flags['--config'][0]} is not a config the image gets"
        cfg = config.load(path, overrides)
        assert cfg.run.storage_path.startswith("s3://") and cfg.data.manifest_uri.startswith("s3://"), where
        assert cfg.tracking.tracking_uri == mlflow_uri(where.split(":")[0]), f"{where}: {cfg.tracking.tracking_uri}"
        assert cfg.tracking.registered_model, f"{where}: name the registered model the champion alias lives on"
    if "--space" in flags:  # a sweep: its SPACE.yaml is in the image and passes `cxr sweep`'s checks on this config
        space = repo_path(flags["--space"][0])
        assert space and os.path.isfile(space), f"{where}: {flags['--space'][0]} is not a file the image gets"
        sweep.load(space, cfg.model_dump(mode="json"))
    if script.endswith("/retrain.py"):
        assert flags.get("--slot") in ([SLOT], [ROUND]), f"{where}: a round must pass --slot \"{SLOT}\" or \"{ROUND}\""
        assert len(flags.get("--prepare", [])) == 2 and all(u.startswith("s3://") for u in flags["--prepare"]), where
        manifest = flags["--prepare"][1].rstrip("/") + "/manifest.json"
        assert cfg.data.manifest_uri == manifest, f"{where}: trains on {cfg.data.manifest_uri}, prepares {manifest}"
    if script.endswith("/prepare.py"):
        assert len(flags["positional"]) == 2 and all(u.startswith("s3://") for u in flags["positional"]), where


# ---------------------------------------------------------------------------------------- credentials

CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL|USERNAME|_KEY$", re.IGNORECASE)
USERINFO_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def _strings(node: object, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


@pytest.mark.parametrize("build", BUILDS)
def test_no_credential_is_inline(build: str) -> None:
    """No Secret objects (the platform team creates them, docs/cluster.md), no credential-named env var with a
    literal value, and no URL with a password anywhere."""
    docs = rendered(build)
    assert not [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"], f"{build}: a Secret with values"
    for where, container in containers((build,)):
        for env in container.get("env", []):
            if CREDENTIAL_NAME.search(env["name"]):
                assert "value" not in env and "valueFrom" in env, f"{where}: {env['name']} has a literal value"
    for where, text in _strings(list(docs), build):
        assert not USERINFO_URI.search(text), f"{where}: a URL with credentials"


def secret_references(builds: tuple[str, ...] = BUILDS) -> dict[str, set[str]]:
    """{Secret name: keys (or '*' for a whole envFrom)} every manifest reads."""
    refs: dict[str, set[str]] = {}
    for _, container in containers(builds):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                refs.setdefault(source["secretRef"]["name"], set()).add("*")
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.setdefault(ref["name"], set()).add(ref["key"])
    for _, spec in cluster_specs(builds):
        if spec.get("authOptions", {}).get("secretName"):
            refs.setdefault(spec["authOptions"]["secretName"], set()).add("auth_token")
    return refs


def test_every_secret_the_manifests_read_is_documented() -> None:
    """docs/cluster.md tells the platform team each Secret to create, with the keys the pods read."""
    with open(CLUSTER_DOC) as fh:
        doc = fh.read()
    refs = secret_references()
    assert {"cxr-s3", "cxr-ray-token", "cxr-mlflow-backend"} <= refs.keys(), refs
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.-]+)`[^|]*\|([^|]*)\|", doc, re.MULTILINE)}
    for name, keys in refs.items():
        assert name in rows, f"docs/cluster.md's Secrets table has no row for {name}"
        for key in keys - {"*"}:
            assert f"`{key}`" in rows[name], f"docs/cluster.md: the Secret {name} needs the key {key}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        assert f"`{key}`" in rows["cxr-s3"], f"docs/cluster.md: cxr-s3's key {key}"


# ---------------------------------------------------------------------------------------- Ray clusters


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=ids(cluster_specs()))
def test_every_ray_cluster_uses_token_auth(where: str, spec: dict) -> None:
    """Token auth needs Ray >= 2.52 (KubeRay checks rayVersion); the long-lived cluster's token is a Secret the
    platform owns, a job cluster's one KubeRay generates (Kubernetes-delegated auth is unsupported for RayJobs)."""
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token", f"{where}: authOptions {auth}"
    assert Version(spec["rayVersion"]) >= Version("2.52"), f"{where}: rayVersion {spec['rayVersion']}"
    assert not auth.get("enableK8sTokenAuth"), where
    if ".rayClusterSpec" not in where:
        assert auth.get("secretName"), f"{where}: submitters need a token that outlives the cluster"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: dashboard exposed"


@pytest.mark.parametrize("where,container", list(containers()), ids=ids(list(containers())))
def test_every_container_has_requests_and_limits(where: str, container: dict) -> None:
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources.get(kind, {}).keys(), f"{where}: {kind} {resources.get(kind)}"
    assert resources["requests"].get(GPU) == resources["limits"].get(GPU), f"{where}: GPU requests != limits"


def _quantity(text: str | int) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=ids(cluster_specs()))
def test_gpus_go_to_gpu_groups_only(where: str, spec: dict) -> None:
    """The head asks for no GPU and no Ray CPU (no training lands there); a group with GPUs tolerates the GPU
    taint and runs the GPU image; cpu-dev has no GPU anywhere; gpu's training clusters have a GPU group."""
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head offers CPUs to tasks"
    assert head["rayStartParams"].get("num-gpus", "0") == "0", where
    for container in head["template"]["spec"]["containers"]:
        assert GPU not in json.dumps(container.get("resources", {})), f"{where}: the head asks for a GPU"
    build = where.split(":")[0]
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], f"{where}: {group}"
        pod = group["template"]["spec"]
        gpus = [c for c in pod["containers"] if GPU in c.get("resources", {}).get("limits", {})]
        if gpus:
            gpu_groups.append(group["groupName"])
            assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in pod.get("tolerations", [])), \
                f"{where}: group {group['groupName']} does not tolerate the GPU nodes' taint"
            assert all(c["image"].endswith("-gpu") for c in gpus), f"{where}: GPU workers without the GPU image"
    if build.startswith("cpu-dev"):
        assert not gpu_groups, f"{where}: cpu-dev asks for GPUs"
    elif "cxr-prepare" not in where:
        assert gpu_groups, f"{where}: the gpu overlay's training cluster has no GPU group"


@pytest.mark.parametrize("where,spec", [p for p in job_specs() if re.search(r"/(re)?train\.py|/sweep\.py",
                                                                          p[1]["entrypoint"])],
                         ids=ids([p for p in job_specs() if re.search(r"/(re)?train\.py|/sweep\.py",
                                                                      p[1]["entrypoint"])]))
def test_training_workers_fit_the_job_cluster(where: str, spec: dict) -> None:
    """scaling.num_workers x resources_per_worker (the config with the entrypoint's overrides) fits the job
    cluster's worker pods, one Ray Train worker per pod slot; GPU training has GPU pods to run on."""
    _, flags, overrides = parse_entrypoint(spec["entrypoint"])
    cfg = config.load(repo_path(flags["--config"][0]), overrides)
    need = {k: float(v) for k, v in cfg.scaling.resources_per_worker.items()}
    if cfg.scaling.use_gpu:
        need.setdefault("GPU", 1.0)
    slots = 0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        offer = {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits.get(GPU, 0))}
        per_pod = min(int(offer.get(k, 0) // v) for k, v in need.items() if v)
        slots += per_pod * group["maxReplicas"]
    assert slots >= cfg.scaling.num_workers, f"{where}: {cfg.scaling.num_workers} workers of {need}, room for {slots}"


@pytest.mark.parametrize("where,spec", job_specs() + scheduled_rounds(), ids=ids(job_specs() + scheduled_rounds()))
def test_rayjob_cleans_up_and_gives_up(where: str, spec: dict) -> None:
    """The cluster goes soon after the end: by shutdownAfterJobFinishes + TTL (one-off RayJobs, at most one of each,
    and the suspended template, which KubeRay refuses without it) or by deletionRules (scheduled rounds)."""
    assert spec.get("submissionMode") == "K8sJobMode", where
    if "deletionStrategy" in spec:
        assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec, \
            f"{where}: KubeRay refuses deletionRules with shutdownAfterJobFinishes (validation.go)"
    else:
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: the cluster would outlive the job"
        assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] > 0, where
    assert isinstance(spec.get("activeDeadlineSeconds"), int) and spec["activeDeadlineSeconds"] > 0, where
    assert isinstance(spec.get("backoffLimit"), int) and 0 <= spec["backoffLimit"] <= 3, f"{where}: backoffLimit"
    assert "submitterPodTemplate" in spec, f"{where}: KubeRay's default submitter has no securityContext"
    if spec.get("suspend"):
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: KubeRay refuses a suspended RayJob without it"


# ---------------------------------------------------------------------------------------- pods

IMAGE_UID = 1000
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_every_pod_of_the_manifests_is_found() -> None:
    """Per stack: the long-lived head and worker groups, the template RayJob's head, workers and submitter, the
    scheduler's pod, MLflow (and PostgreSQL in gpu); per jobs build: four RayJobs; per schedule: the RayCronJob's
    head, workers and submitter."""
    for build, expected in (("cpu-dev", 7), ("gpu", 9), ("cpu-dev/jobs", 12), ("gpu/jobs", 12), ("cpu-dev/schedule", 3),
                            ("gpu/schedule", 3)):
        where = [w for w, _ in pod_specs((build,))]
        assert len(where) == expected, (build, where)
        if build.endswith("jobs"):
            for part in ("headGroupSpec.template.spec", "workerGroupSpecs[0].template.spec",
                         "submitterPodTemplate.spec"):
                assert len([w for w in where if w.endswith(part)]) == 4, (part, where)


def cxr_image(container: dict) -> bool:
    return container.get("image", "").startswith(IMAGE_REPO + ":")


@pytest.mark.parametrize("where,spec", pod_specs(), ids=ids(pod_specs()))
def test_pod_runs_unprivileged_on_a_read_only_root(where: str, spec: dict) -> None:
    pod = spec.get("securityContext", {})
    assert {k: pod.get(k) for k in POD_SECURITY} == POD_SECURITY, f"{where}: pod securityContext {pod}"
    assert all(pod.get(k, 0) > 0 for k in ("runAsUser", "runAsGroup", "fsGroup")), f"{where}: root ids {pod}"
    if any(cxr_image(c) for c in spec["containers"]):
        assert pod["runAsUser"] == IMAGE_UID, f"{where}: the cxr image's user is uid {IMAGE_UID}"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    home = dockerfile_env().get("HOME")
    for container in spec["containers"] + spec.get("initContainers", []):
        name, sc = container["name"], container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, f"{where} {name}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where} {name}: capabilities {sc}"
        assert not sc.get("capabilities", {}).get("add"), f"{where} {name}: capabilities added"
        assert sc.get("privileged") is not True and sc.get("runAsUser", 1) != 0, f"{where} {name}: privileged"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where} {name}: readOnlyRootFilesystem"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        # Ray keeps sessions, logs and spilled objects in /tmp/ray; numba, Keras and matplotlib cache under HOME
        writable = ["/tmp", home] if cxr_image(container) else ["/tmp"]
        for path in writable:
            assert "emptyDir" in volumes.get(mounts.get(path), {}), f"{where} {name}: no emptyDir at {path}"


@pytest.mark.parametrize("where,spec", [p for p in cluster_specs() if p[1].get("enableInTreeAutoscaling")],
                         ids=ids([p for p in cluster_specs() if p[1].get("enableInTreeAutoscaling")]))
def test_autoscaler_is_v2_and_locked_down(where: str, spec: dict) -> None:
    """KubeRay adds the autoscaler to the head pod from autoscalerOptions: it gets the containers' lock-down."""
    options = spec["autoscalerOptions"]
    assert options.get("version") == "v2", where
    sc = options.get("securityContext", {})
    assert sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
    head = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in options.get("volumeMounts", [])}
    for path in ("/tmp", dockerfile_env().get("HOME")):
        assert "emptyDir" in volumes.get(mounts.get(path), {}), f"{where}: the autoscaler has no emptyDir at {path}"


def test_image_user_is_the_pods_non_root_uid() -> None:
    """The image's last USER is numeric, uid:gid (under runAsNonRoot the kubelet rejects a named USER in any pod
    without its own runAsUser), created with those ids, not root, and every cxr pod's runAsUser/runAsGroup."""
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    match = re.fullmatch(r"(\d+):(\d+)", users[-1]) if users else None
    assert match, f"USER {users[-1] if users else '(none: root)'}: not a numeric uid:gid"
    uid, gid = int(match.group(1)), int(match.group(2))
    assert uid == IMAGE_UID and uid != 0 and gid != 0, (uid, gid)
    created = " && ".join(args for keyword, args in instructions if keyword == "RUN" and "useradd" in args)
    assert re.search(rf"useradd\b[^&]*--uid[ =]{uid}\b", created) and re.search(rf"--gid[ =]{gid}\b", created), created
    ids_ = {where: (spec["securityContext"].get("runAsUser"), spec["securityContext"].get("runAsGroup"))
            for where, spec in pod_specs() if any(cxr_image(c) for c in spec["containers"])}
    assert ids_ and set(ids_.values()) == {(uid, gid)}, ids_


# ---------------------------------------------------------------------------------------- network


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: only matchLabels are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ray_pod_labels(spec: dict) -> list[tuple[str, dict]]:
    """(node type, labels) of a RayClusterSpec's pods as KubeRay creates them (template labels + ray.io/*)."""
    found = [("head", {**spec["headGroupSpec"]["template"]["metadata"].get("labels", {}),
                       "ray.io/node-type": "head"})]
    for group in spec["workerGroupSpecs"]:
        found.append(("worker", {**group["template"]["metadata"].get("labels", {}), "ray.io/node-type": "worker"}))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_fence_every_ray_pod(overlay: str) -> None:
    """Each Ray pod of the overlay's namespace (long-lived cluster and job clusters) is selected by an Ingress
    policy; the heads' dashboard and GCS admit only Ray pods, submitters, the submitter namespace and the KubeRay
    operator; no rule admits everyone or an address block."""
    policies = [d for d in rendered(overlay) if d["kind"] == "NetworkPolicy"]
    for where, spec in cluster_specs((overlay, f"{overlay}/jobs")):
        for node_type, labels in ray_pod_labels(spec):
            selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)
                         and "Ingress" in p["spec"].get("policyTypes", [])]
            assert selecting, f"{where}: no NetworkPolicy selects its {node_type} pods ({labels})"
            for policy in selecting:
                name = policy["metadata"]["name"]
                for rule in policy["spec"].get("ingress", []):
                    peers, ports = rule.get("from", []), {p["port"] for p in rule.get("ports", [])}
                    assert peers, f"{name}: a rule without `from` admits every pod"
                    for peer in peers:
                        assert "ipBlock" not in peer, f"{name}: admits addresses {peer}"
                        namespace = peer.get("namespaceSelector")
                        pods = peer.get("podSelector", {}).get("matchLabels", {})
                        if namespace is not None:
                            ns = namespace.get("matchLabels", {}).get("kubernetes.io/metadata.name")
                            assert ns in {SUBMITTER_NAMESPACE, OPERATOR_NAMESPACE}, f"{name}: admits {namespace}"
                            if ns == OPERATOR_NAMESPACE:
                                assert pods.get("app.kubernetes.io/name") == "kuberay-operator", f"{name}: {peer}"
                        ray_pods = namespace is None and pods.get("app.kubernetes.io/component") == "ray"
                        assert ray_pods or node_type == "head", f"{name}: workers admit non-Ray pods {peer}"
                        assert ray_pods or ports and ports <= {DASHBOARD_PORT, GCS_PORT}, \
                            f"{name}: {peer} reaches {sorted(ports) or 'every port'}, not only the dashboard/GCS"
            if node_type == "head":  # and those who must reach it can: else RayJobs and submitters hang
                admitted = [(json.dumps(peer, sort_keys=True), {p["port"] for p in rule.get("ports", [])})
                            for policy in selecting for rule in policy["spec"]["ingress"] for peer in rule["from"]]
                for needed in ('"app.kubernetes.io/name": "kuberay-operator"', SUBMITTER_NAMESPACE,
                               '"app.kubernetes.io/component": "ray-submitter"'):
                    assert any(needed in peer and DASHBOARD_PORT in ports for peer, ports in admitted), \
                        f"{where}: {needed} cannot reach the head's dashboard"
                assert any('"app.kubernetes.io/component": "ray"' in peer and not ports for peer, ports in admitted), \
                    f"{where}: the workers cannot reach their head"
    database = [d for d in rendered(overlay) if d["kind"] == "StatefulSet"]
    for db in database:
        labels = db["spec"]["template"]["metadata"]["labels"]
        fences = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert fences and all(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                              == "mlflow" for p in fences for r in p["spec"]["ingress"] for peer in r["from"]), \
            f"{db['metadata']['name']}: reachable by more than the MLflow server"


@pytest.mark.parametrize("build", BUILDS)
def test_nothing_is_exposed_outside_the_cluster(build: str) -> None:
    for doc in rendered(build):
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), f"{build}: {doc['kind']}"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{build}: {doc['metadata']['name']}"


# ---------------------------------------------------------------------------------------- MLflow


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_proxies_artifacts_and_reads_its_store_from_a_secret_or_a_volume(overlay: str) -> None:
    docs = rendered(overlay)
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["labels"]["app.kubernetes.io/component"] == "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] in mlflow_uri(overlay))
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in server["ports"]} | {5000}
    args = server.get("command", []) + server.get("args", [])
    assert any(a.startswith("--artifacts-destination=s3://") for a in args), f"{overlay}: artifacts not proxied {args}"
    assert "--no-serve-artifacts" not in args
    host = mlflow_uri(overlay).split("//")[1]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert host in allowed, f"{overlay}: MLflow would refuse requests for {host} (DNS rebinding check)"
    for probe in ("readinessProbe", "livenessProbe"):
        assert server.get(probe, {}).get("httpGet", {}).get("path") == "/health", f"{overlay}: {probe}"
    store = next(e for e in server["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    if overlay == "cpu-dev":
        path = store["value"].removeprefix("sqlite:///")
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        claims = {v["name"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert store["value"].startswith("sqlite:////") and mounts.get(os.path.dirname(path)) in claims, store
    else:
        ref = store["valueFrom"]["secretKeyRef"]
        db = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        password = next(e for e in db["env"] if e["name"] == "POSTGRES_PASSWORD")["valueFrom"]["secretKeyRef"]
        assert password["name"] == ref["name"], "the database's password and MLflow's URI come from one Secret"


def lock_pins() -> dict[str, str]:
    """requirements.lock as {canonical name: version}; every line is NAME==VERSION (or a comment)."""
    pins: dict[str, str] = {}
    path = os.path.join(ROOT, "requirements.lock")
    assert os.path.exists(path), "no requirements.lock: the image's installs are not pinned"
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;,]*)", line)
            assert match, f"requirements.lock:{n}: {line!r} is not NAME==VERSION"
            name = canonicalize_name(match.group(1))
            assert name not in pins, f"requirements.lock:{n}: {name} pinned twice"
            pins[name] = match.group(2)
    return pins


@pytest.mark.parametrize("build", BUILDS)
def test_images_carry_the_project_version(build: str) -> None:
    """cxr's images are tagged with pyproject's version (-gpu for the GPU variant, in the gpu overlay only), and
    the MLflow server is the version of the client the image pins."""
    version = project_version()
    expected = f"{IMAGE_REPO}:{version}-gpu" if build.startswith("gpu") else f"{IMAGE_REPO}:{version}"
    images = {c.get("image") for _, c in containers((build,)) if c.get("image")}
    ours = {i for i in images if i.split(":")[0].split("@")[0].rsplit("/", 1)[-1] == "cxr"}
    assert ours == {expected}, f"{build}: {ours} (kustomize `images:` must map the base's cxr to {expected})"
    for image in images - ours:
        if "mlflow/mlflow" in image:
            tag = image.rsplit(":", 1)[1]
            assert tag.removeprefix("v").split("-")[0] == lock_pins()["mlflow"], f"{build}: {image}"


# ---------------------------------------------------------------------------------------- scheduled retraining
# What KubeRay v1.7 does (ray-operator/controllers/ray/): a RayCronJob counts ticks from its creation, or from
# its last scheduled tick, and creates a RayJob for every tick missed, named <name>-<tick in minutes> and
# labelled only ray.io/cronjob-name (raycronjob_controller.go); a retry of a RayJob deletes its cluster and
# submitter, and restarts its activeDeadlineSeconds clock (rayjob_controller.go, initRayJobStatusIfNeed); the
# submitter Job gives up after submitterConfig.backoffLimit failed pods, 2 by default (createNewK8sJob).

WEEK_S = 7 * 86400
SUBMITTER_RETRIES = 5  # dropped `ray job logs --follow` streams a healthy round survives, at least
TICK_LABEL = "ray.io/cronjob-name"
ROUND_NAME_LABEL = "ray.io/originated-from-cr-name"  # KubeRay's label on a RayJob's submitter pods


def _without_slot_source(spec: dict) -> dict:
    """A round's spec without what legitimately differs between the retrain paths: where the slot comes from
    (with the retries that depend on it), suspension and the cleanup mechanism."""
    spec = copy.deepcopy(spec)
    for key in ("suspend", "backoffLimit", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "deletionStrategy"):
        spec.pop(key, None)
    spec["entrypoint"] = re.sub(r'--slot ("\$\(date -u \+%F\)"|"\$CXR_ROUND"|\S+)', "--slot S", spec["entrypoint"])
    for container in spec["submitterPodTemplate"]["spec"]["containers"]:
        container["env"] = [e for e in container.get("env", []) if e["name"] != "CXR_ROUND"]
        if not container["env"]:
            del container["env"]
    return spec


def raycronjob(overlay: str) -> dict:
    return next(d for d in rendered(f"{overlay}/schedule") if d["kind"] == "RayCronJob")


def raycronjob_child(cron: dict, tick: datetime.datetime) -> dict:
    """The RayJob KubeRay's RayCronJob controller creates for `tick` (constructRayJob, getRayJobName)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"{cron['metadata']['name']}-{int(tick.timestamp()) // 60}",
                         "labels": {TICK_LABEL: cron["metadata"]["name"]},
                         "annotations": {"ray.io/cronjob-scheduled-timestamp": tick.strftime("%Y-%m-%dT%H:%M:%SZ")}},
            "spec": copy.deepcopy(cron["spec"]["jobTemplate"])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_retrain_path_runs_the_same_spec(overlay: str) -> None:
    """The one-off RayJob, the CronJob's template and round, and the RayCronJob's jobTemplate are one spec, but for
    the slot's source (and the retries it allows), suspension and cleanup."""
    stack, jobs = rendered(overlay), rendered(f"{overlay}/jobs")
    template = next(d for d in stack if d["kind"] == "RayJob")
    one_off = next(d for d in jobs if d["kind"] == "RayJob" and d["metadata"]["labels"].get("cxr.io/job") == "retrain")
    assert template["spec"].get("suspend") is True, "the template must never run by itself"
    assert {k: v for k, v in template["spec"].items() if k != "suspend"} == one_off["spec"], \
        "the template differs from the one-off RayJob"
    expected = _without_slot_source(one_off["spec"])
    assert _without_slot_source(raycronjob(overlay)["spec"]["jobTemplate"]) == expected, "the RayCronJob differs"
    assert _without_slot_source(scheduled_round(overlay)["spec"]) == expected, "the CronJob's round differs"


def test_no_raycronjob_is_ever_shipped_suspended() -> None:
    """A suspended RayCronJob, resumed, creates one round per tick it missed (from its creation or last tick), all
    at once: no base, component or overlay ships one (nor patches `suspend` in); no stack contains the
    RayCronJob at all, only its own build (applying that is turning it on)."""
    for folder, _, files in os.walk(K8S):
        for name in files:
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(folder, name)
            with open(path) as fh:
                docs = [d for d in yaml.safe_load_all(fh) if d]
            for doc in docs:
                if isinstance(doc, dict) and doc.get("kind") == "RayCronJob":
                    assert "suspend" not in doc.get("spec", {}), f"{path}: a suspended RayCronJob"
                for patch in doc.get("patches", []) if isinstance(doc, dict) else []:
                    if patch.get("target", {}).get("kind") == "RayCronJob":
                        assert "/spec/suspend" not in patch.get("patch", "") + json.dumps(patch), f"{path}: {patch}"
    for build in BUILDS:
        crons = [d for d in rendered(build) if d["kind"] == "RayCronJob"]
        assert all("suspend" not in d["spec"] for d in crons), build
        assert not crons or build.endswith("/schedule"), f"{build}: the RayCronJob belongs in its own build only"
    with open(CLUSTER_DOC) as fh:
        doc = " ".join(fh.read().split())
    assert "never un-suspend" in doc and "--cascade=orphan" in doc, "docs/cluster.md: how to turn it off and on"


@pytest.mark.parametrize("where,spec", round_specs(), ids=ids(round_specs()))
def test_every_rayjob_survives_dropped_log_streams_and_gives_up_waiting_for_nodes(where: str, spec: dict) -> None:
    """submitterConfig.backoffLimit: KubeRay's default of 2 fails a healthy run on the third dropped `ray job logs
    --follow` (kuberay#4921); preRunningDeadlineSeconds: a RayJob without nodes fails (retryably) instead of
    waiting until its activeDeadlineSeconds."""
    assert spec.get("submitterConfig", {}).get("backoffLimit", 2) >= SUBMITTER_RETRIES, f"{where}: submitterConfig"
    pre = spec.get("preRunningDeadlineSeconds")
    assert isinstance(pre, int) and 0 < pre <= 3 * 3600, f"{where}: preRunningDeadlineSeconds {pre}"
    assert pre < spec["activeDeadlineSeconds"], f"{where}: both count from the attempt's start"


@pytest.mark.parametrize("where,spec", round_specs(), ids=ids(round_specs()))
def test_no_retried_round_takes_its_slot_from_the_clock(where: str, spec: dict) -> None:
    """A retry is a new submitter whose shell expands the entrypoint again: a slot from `date` may then be another
    day, so such a RayJob must not retry. A slot from $CXR_ROUND is the RayJob's own name, set from KubeRay's label
    on the submitter pod."""
    entrypoint = spec["entrypoint"]
    if "$(" in entrypoint or "`" in entrypoint or "date" in entrypoint:
        assert spec["backoffLimit"] == 0, f"{where}: the slot comes from the clock, but a retry would re-read it"
    if ROUND in entrypoint:
        env = {e["name"]: e for c in spec["submitterPodTemplate"]["spec"]["containers"] for e in c.get("env", [])}
        assert env["CXR_ROUND"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{ROUND_NAME_LABEL}']"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_raycronjob_slot_is_its_tick(overlay: str) -> None:
    """The RayJob KubeRay makes for a tick resolves, through $CXR_ROUND, to the tick's UTC date, in every retry."""
    from cxr.retrain import resolve_slot

    cron = raycronjob(overlay)
    for tick in (datetime.datetime(2026, 12, 6, 2, 0, tzinfo=datetime.UTC),
                 datetime.datetime(2027, 1, 3, 2, 0, tzinfo=datetime.UTC)):
        child = raycronjob_child(cron, tick)
        crd_validator("RayJob").validate(child)
        assert resolve_slot(child["metadata"]["name"]) == tick.strftime("%Y-%m-%d")
        _, flags, _ = parse_entrypoint(child["spec"]["entrypoint"])
        assert flags["--slot"] == [ROUND], child["spec"]["entrypoint"]


def _comment_arithmetic(path: str, field: str) -> tuple[int, list[int]]:
    """The value of `field:` in the YAML source and the `V = A x B + C` stated in the comment just above it."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field}:"))
    value = int(lines[n].split(":", 1)[1].split("#")[0])
    comment = " ".join(line.strip() for line in lines[max(0, n - 4):n + 1] if "#" in line)
    m = re.search(r"(\d+) = (\d+) x (\d+) \+ (\d+)", comment)
    assert m, f"{path}: no `{value} = ATTEMPTS x DEADLINE + MARGIN` in the comment above {field}"
    return value, [int(g) for g in m.groups()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deadlines_nest(overlay: str) -> None:
    """The CronJob's Job outlives every attempt of its round (KubeRay restarts a RayJob's activeDeadlineSeconds per
    retry), with the arithmetic stated in the YAML; and no round of either scheduler can reach the next tick."""
    docs = rendered(overlay)
    cronjob = next(d for d in docs if d["kind"] == "CronJob")
    job_deadline = cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    round_ = scheduled_round(overlay)["spec"]
    attempts, deadline = 1 + round_["backoffLimit"], round_["activeDeadlineSeconds"]
    value, (stated, stated_attempts, stated_deadline, margin) = _comment_arithmetic(
        os.path.join(K8S, "base", "retrain-cronjob.yaml"), "activeDeadlineSeconds")
    assert value == stated == job_deadline == stated_attempts * stated_deadline + margin, (value, stated, margin)
    assert (stated_attempts, stated_deadline) == (attempts, deadline), "the comment's numbers are not the round's"
    assert margin >= 1800, "time to tear down and re-create the cluster between attempts"
    assert job_deadline > attempts * deadline and job_deadline < WEEK_S, job_deadline
    assert cronjob["spec"]["schedule"] == raycronjob(overlay)["spec"]["schedule"] == "0 2 * * 0"  # weekly
    template = raycronjob(overlay)["spec"]["jobTemplate"]
    assert (1 + template["backoffLimit"]) * template["activeDeadlineSeconds"] + margin < WEEK_S, \
        "a RayCronJob round (it has no concurrencyPolicy) could overlap the next one"


@pytest.mark.parametrize("where,spec", [(w, s) for w, s in round_specs() if "retrain.py" in s["entrypoint"]],
                         ids=ids([(w, s) for w, s in round_specs() if "retrain.py" in s["entrypoint"]]))
def test_scheduled_rounds_do_not_pile_up(where: str, spec: dict) -> None:
    """Every round a scheduler creates deletes its cluster soon after its end and itself (with its submitter Job and
    pod) after some days, on success and on every failure; KubeRay's own rules hold (validation.go)."""
    if "/jobs:" in where:
        return  # the one-off: one fixed name, re-created by hand
    rules = spec.get("deletionStrategy", {}).get("deletionRules")
    assert rules, f"{where}: no deletionRules: ~52 finished RayJobs a year"
    assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec, where
    by_end: dict[str, dict[str, int]] = {}
    for rule in rules:
        condition = {k: v for k, v in rule["condition"].items() if k != "ttlSeconds"}
        assert len(condition) == 1, rule
        by_end.setdefault(json.dumps(condition), {})[rule["policy"]] = rule["condition"]["ttlSeconds"]
    assert set(by_end) == {'{"jobStatus": "SUCCEEDED"}', '{"jobDeploymentStatus": "Failed"}'}, by_end
    for end, ttl in by_end.items():
        assert set(ttl) == {"DeleteCluster", "DeleteSelf"}, (where, end)
        assert ttl["DeleteCluster"] <= 3600 and 86400 <= ttl["DeleteSelf"] <= 60 * 86400, (where, end, ttl)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_schedulers_are_safe_to_enable(overlay: str) -> None:
    """The CronJob forbids overlap, skips stale starts, runs in UTC under a ServiceAccount that may only create, get
    and list RayJobs, copies a template that exists, and counts the RayCronJob's rounds by the label they carry;
    the RayCronJob's own name keeps its RayJobs' names apart from the CronJob's."""
    docs = rendered(overlay)
    cronjob = next(d for d in docs if d["kind"] == "CronJob")
    cron = raycronjob(overlay)
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0, spec
    assert spec.get("timeZone") == "Etc/UTC" and cron["spec"].get("timeZone") == "Etc/UTC", "the slot is a UTC date"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    bindings = [b for b in docs if b["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
    assert bindings, f"no RoleBinding for {account}"
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role", f"{binding['metadata']['name']}: binds a ClusterRole"
        role = next(r for r in docs if r["kind"] == "Role" and r["metadata"]["name"] == binding["roleRef"]["name"])
        assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                  "verbs": ["create", "get", "list"]}], role["rules"]
    args = scheduler_args(overlay)
    template = next(d for d in docs if d["kind"] == "RayJob")
    assert args["template"] == template["metadata"]["name"], args
    assert args["cronjob"] == cron["metadata"]["name"], "the scheduler would not see the RayCronJob's rounds"
    # Child names: the CronJob's NAME-YYYY-MM-DD, the RayCronJob's CRON-<minutes>: never equal, either way round.
    assert not cron["metadata"]["name"].startswith(args["name"] + "-2") and cron["metadata"]["name"] != args["name"]
    assert len(cron["metadata"]["name"]) <= 36, "KubeRay's MaxRayCronJobNameLength (its children's names fit)"
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    scripts = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] in mounted]
    assert [os.path.basename(pod["containers"][0]["command"][1])] == [k for d in scripts for k in d["data"]]
    with open(CLUSTER_DOC) as fh:
        doc = fh.read()
    assert f"-l {TICK_LABEL}={cron['metadata']['name']}" in doc, "docs/cluster.md: how to list the RayCronJob's rounds"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_pod_runs_a_small_pinned_python_image(overlay: str) -> None:
    """The scheduler is a standard-library script: it runs in python:*-slim pinned by digest (the Dockerfile's own
    base, so cxr's nodes have its layers), not the multi-GB (GPU) cxr image."""
    cronjob = next(d for d in rendered(overlay) if d["kind"] == "CronJob")
    image = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"python:3\.\d+-(slim|alpine)@sha256:[0-9a-f]{64}", image), image
    base = next(args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "FROM")
    assert image == base, f"{image}: not the Dockerfile's base {base}"
    cm = next(d for d in rendered(overlay) if d["kind"] == "ConfigMap")
    modules = re.findall(r"^(?:from|import) ([\w.]+)", cm["data"]["retrain_scheduler.py"], re.MULTILINE)
    assert modules and {m.split(".")[0] for m in modules} <= set(sys.stdlib_module_names) | {"__future__"}, modules


def test_docs_admit_what_the_network_policies_do_not_cover() -> None:
    """With the operator's useKubernetesProxy its dashboard requests come from the API server, not its pod."""
    with open(CLUSTER_DOC) as fh:
        doc = " ".join(fh.read().split())
    assert "useKubernetesProxy" in doc and "API server" in doc


class FakeApi:
    """The few Kubernetes API calls the scheduler makes, over an in-memory set of RayJobs."""

    def __init__(self, module: types.ModuleType, rayjobs: list[dict], finish: dict | None) -> None:
        self.module, self.rayjobs, self.finish, self.calls = module, {j["metadata"]["name"]: j for j in rayjobs}, \
            finish, []

    def __call__(self, method: str, path: str, body: dict | None) -> dict:
        self.calls.append((method, path))
        name = path.rsplit("/", 1)[1]
        if method == "POST":
            if body["metadata"]["name"] in self.rayjobs:
                raise self.module.ApiError(409, "AlreadyExists")
            self.rayjobs[body["metadata"]["name"]] = {**body, "status": {}}
            return body
        if name == "rayjobs":
            return {"items": list(self.rayjobs.values())}
        if name not in self.rayjobs:
            raise self.module.ApiError(404, "NotFound")
        job = self.rayjobs[name]
        if self.finish and len([c for c in self.calls if c == ("GET", path)]) > 1:
            job["status"] = self.finish  # the round ends after the first poll
        return job


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_starts_the_slot_once_and_reports_its_end(overlay: str, capsys: pytest.CaptureFixture) -> None:
    module = scheduler(overlay)
    template = next(copy.deepcopy(d) for d in rendered(overlay) if d["kind"] == "RayJob")
    job = scheduled_round(overlay, "2026-12-06")
    crd_validator("RayJob").validate(job)
    assert job["metadata"]["name"] == "cxr-retrain-2026-12-06" and "suspend" not in job["spec"]
    assert job["metadata"]["labels"]["cxr.io/job"] == "retrain" and "cxr.io/template" not in job["metadata"]["labels"]
    _, flags, _ = parse_entrypoint(job["spec"]["entrypoint"])
    assert flags["--slot"] == ["2026-12-06"], job["spec"]["entrypoint"]  # every retry of the RayJob: one slot
    assert job["spec"]["backoffLimit"] == 1 and "shutdownAfterJobFinishes" not in job["spec"]
    with pytest.raises(ValueError):
        module.slot_of("2026-13-01")
    args = scheduler_args(overlay)
    run_args = {"backoff_limit": int(args["backoff-limit"]), "keep_days": int(args["keep-days"]),
                "cronjob": args["cronjob"], "sleep": lambda s: None}

    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "promoted"}
    api = FakeApi(module, [template], done)
    assert module.run(api, "cxr", template["metadata"]["name"], "cxr-retrain", "2026-12-06", **run_args) == 0
    assert [c for c in api.calls if c[0] == "POST"] == [("POST", "/apis/ray.io/v1/namespaces/cxr/rayjobs")]
    assert api.rayjobs["cxr-retrain-2026-12-06"]["spec"] == job["spec"]
    assert "cxr-retrain-2026-12-06: Complete, Ray job SUCCEEDED (promoted)" in capsys.readouterr().out

    # A re-run of the slot follows the RayJob that exists; a failed round fails the CronJob's Job.
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    api = FakeApi(module, [template, {**job, "status": failed}], None)
    assert module.run(api, "cxr", template["metadata"]["name"], "cxr-retrain", "2026-12-06", **run_args) == 1
    assert "exists already" in capsys.readouterr().out

    # Another round still running, the CronJob's or the RayCronJob's (labelled only ray.io/cronjob-name):
    # this slot is skipped, nothing is created.
    running = copy.deepcopy(job)
    running["metadata"]["name"], running["status"] = "cxr-retrain-2026-11-29", {"jobDeploymentStatus": "Running"}
    child = raycronjob_child(raycronjob(overlay), datetime.datetime(2026, 11, 29, 2, 0, tzinfo=datetime.UTC))
    child["status"] = {"jobDeploymentStatus": "Initializing"}
    for other in (running, child):
        api = FakeApi(module, [template, other], done)
        assert module.run(api, "cxr", template["metadata"]["name"], "cxr-retrain", "2026-12-06", **run_args) == 1
        assert not [c for c in api.calls if c[0] == "POST"]
        assert f"skipped, another retraining round is still active: {other['metadata']['name']}" in \
            capsys.readouterr().out
    # Finished rounds of either kind do not block.
    child["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    api = FakeApi(module, [template, child], done)
    assert module.run(api, "cxr", template["metadata"]["name"], "cxr-retrain", "2026-12-06", **run_args) == 0


# ---------------------------------------------------------------------------------------- the image


def test_image_environment_never_forces_single_node_ray() -> None:
    """RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the image would make every worker pod's `ray start` abort."""
    env = dockerfile_env()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env, env
    setting = [f"{k} {a}" for k, a in dockerfile_instructions() if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in a]
    assert not setting, setting  # nor as an ARG, or exported in a RUN
    pods = [w for w, c in containers() if any(e["name"] == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
                                              for e in c.get("env", []))]
    assert not pods, pods  # nor in a pod


def test_base_image_is_pinned_by_digest() -> None:
    with open(DOCKERFILE) as fh:
        lines = fh.read().splitlines()
    froms = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    assert froms, "no FROM"
    for i in froms:
        args = [a for a in lines[i].split()[1:] if not a.startswith("--")]
        assert len(args) in (1, 3), f"FROM {args}: only IMAGE [AS NAME] (a '#' there is no comment but an argument)"
        match = re.fullmatch(r"([\w./-]+:[\w.-]+)@sha256:[0-9a-f]{64}", args[0])
        assert match, f"line {i + 1}: {args[0]} is not pinned by digest (NAME:TAG@sha256:...)"
        comment = " ".join(line for line in reversed(lines[:i]) if line.startswith("#"))
        assert match.group(1) in comment, f"line {i + 1}: no comment above names the tag {match.group(1)}"


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: split at ;, &&, ||, | and the if/then/else/fi/do/done words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in {";", "&&", "||", "|", "&", "then", "else", "elif", "do"}:
            commands.append(current)
            current = []
        elif not (token in {"if", "fi", "done", "while", "until"} and not current):
            current.append(token)
    return [c for c in commands + [current] if c]


def test_every_pip_install_is_held_to_the_lock() -> None:
    instructions = dockerfile_instructions()
    installs = []
    for n, (keyword, args) in enumerate(instructions):
        for argv in _commands(args) if keyword == "RUN" else []:
            pip = argv[:1] in (["pip"], ["pip3"]) or argv[1:3] == ["-m", "pip"]
            if pip and "install" in argv:
                installs.append(argv)
                flags = [f"{a}={b}" for a, b in zip(argv, argv[1:], strict=False) if a in ("-c", "--constraint")]
                flags += [a for a in argv if a.startswith("--constraint=")]
                assert any(f.endswith("=requirements.lock") for f in flags), f"not constrained: {shlex.join(argv)}"
                copied = [a for k, a in instructions[:n] if k in ("COPY", "ADD") and "requirements.lock" in a.split()]
                assert copied, "requirements.lock is not copied into the image before it is used"
    assert len(installs) >= 2, installs  # the package, and TensorFlow's CUDA extra


def test_gpu_variant_is_a_build_arg_of_the_same_image() -> None:
    """One Dockerfile: TF_EXTRA=and-cuda adds TensorFlow's CUDA wheels, which the lock pins too."""
    instructions = dockerfile_instructions()
    assert ("ARG", 'TF_EXTRA=""') in instructions, "no TF_EXTRA build argument (the GPU variant)"
    assert any("tensorflow[$TF_EXTRA]" in args for k, args in instructions if k == "RUN")
    with open(os.path.join(ROOT, "requirements.lock")) as fh:
        gpu_block = fh.read().partition("# GPU image only")[2]
    assert re.search(r"^nvidia-[\w-]+==", gpu_block, re.MULTILINE), "the lock pins no CUDA wheel for the GPU image"


def test_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        deps = [Requirement(d) for d in tomllib.load(fh)["project"]["dependencies"]]
    pins = lock_pins()
    assert deps
    for req in deps:
        pin = pins.get(canonicalize_name(req.name))
        assert pin, f"{req.name} (pyproject.toml) has no pin in requirements.lock"
        assert req.specifier.contains(pin, prereleases=True), f"requirements.lock pins {req.name}=={pin}: not {req}"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides; `!` re-includes;
    `*` and `?` stay within a path element, `**` spans any number of them."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] in "*?":
                out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!").strip("/")).match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_image_copies_and_nothing_else() -> None:
    path = os.path.join(ROOT, ".dockerignore")
    assert os.path.exists(path), "no .dockerignore: the whole tree (.git, .venv, outputs) is the build context"
    with open(path) as fh:
        patterns = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    for path in (".git/HEAD", ".venv/bin/python", "demo-out/shards/manifest.json", "bench-out/train.json",
                 ".pytest_cache/v/cache", ".ruff_cache/x", "tests/test_k8s.py", "cxr/__pycache__/cli.cpython-311.pyc",
                 ".env", "configs/.env", "mlruns/0/meta.yaml", "k8s/base/kustomization.yaml", "docs/cluster.md"):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the image build"
    sources = [src for keyword, args in dockerfile_instructions() if keyword == "COPY"
               for src in args.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "requirements.lock", "cxr", "jobs", "configs"} <= set(sources), sources
    for src in sources:
        top = os.path.join(ROOT, src)
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(top) for f in fs
                 if "__pycache__" not in d] if os.path.isdir(top) else [src]
        assert files, f"COPY {src}: nothing there"
        assert not [f for f in files if dockerignore_excludes(f, patterns)], f"COPY {src}: excluded by .dockerignore"
