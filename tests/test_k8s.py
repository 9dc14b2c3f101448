"""The Kubernetes manifests validate against the KubeRay v1.7 CRDs (unknown fields are errors) and their
entrypoints name real jobs and configs whose overrides pass cxr's own validation; every pod is locked down; the
image is built from a digest-pinned base with every install held to requirements.lock, from a minimal context."""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import textwrap
import tomllib

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cxr import config

ROOT = os.path.join(os.path.dirname(__file__), "..")
CRDS = os.path.join(ROOT, "..", "shared", "kuberay-crds")
MANIFESTS = sorted(f for f in os.listdir(os.path.join(ROOT, "k8s")) if f.endswith(".yaml"))

DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
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


def test_dockerfile_env_parser_reads_every_form(tmp_path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(textwrap.dedent("""\
        FROM scratch
        ENV A=1 B="two words" \\
        # a comment inside the continuation
            C=${A}x
        env LEGACY value with spaces
        ENV D=$B
        RUN echo ENV=notenv
        """))
    assert dockerfile_env(str(path)) == {"A": "1", "B": "two words", "C": "1x", "LEGACY": "value with spaces",
                                         "D": "two words"}


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


# ---------------------------------------------------------------------------------------- pods

IMAGE_UID = 1000
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
                "seccompProfile": {"type": "RuntimeDefault"}}


def manifest_documents() -> list[tuple[str, dict]]:
    """Every document of k8s/, and every YAML document a ConfigMap carries (the CronJob's RayJob)."""
    found = []
    for name in MANIFESTS:
        with open(os.path.join(ROOT, "k8s", name)) as fh:
            for doc in yaml.safe_load_all(fh):
                found.append((f"{name}:{doc['kind']}", doc))
                if doc["kind"] == "ConfigMap":
                    found += [(f"{name}:{key}", yaml.safe_load(text)) for key, text in doc["data"].items()]
    return found


def pod_specs() -> list[tuple[str, dict]]:
    """Every PodSpec (a mapping with `containers`) anywhere in the manifests, named by where it sits."""
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

    for where, doc in manifest_documents():
        walk(doc, where)
    return found


def test_every_pod_of_the_manifests_is_found() -> None:
    """Head, worker group and submitter of each RayJob (the ConfigMap's too), and the CronJob's pod."""
    where = [w for w, _ in pod_specs()]
    rayjobs = [w for w, doc in manifest_documents() if doc.get("kind") == "RayJob"]
    assert len(rayjobs) == 3, rayjobs
    for part in ("headGroupSpec.template.spec", "workerGroupSpecs[0].template.spec", "submitterPodTemplate.spec"):
        assert len([w for w in where if w.endswith(part)]) == 3, (part, where)  # KubeRay's default submitter
    assert [w for w in where if "CronJob" in w] == ["retrain-cronjob.yaml:CronJob.spec.jobTemplate.spec.template.spec"]
    assert len(where) == 10, where


@pytest.mark.parametrize("where,spec", pod_specs(), ids=[w for w, _ in pod_specs()])
def test_pod_runs_unprivileged_on_a_read_only_root(where: str, spec: dict) -> None:
    pod = spec.get("securityContext", {})
    assert {k: pod.get(k) for k in POD_SECURITY} == POD_SECURITY, f"{where}: pod securityContext {pod}"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in spec["containers"] + spec.get("initContainers", []):
        name, sc = container["name"], container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, f"{where} {name}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where} {name}: capabilities {sc}"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where} {name}: readOnlyRootFilesystem"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        # Ray keeps sessions, logs and spilled objects in /tmp/ray; numba, Keras and matplotlib cache under HOME
        writable = ["/tmp", "/home/ray"] if container["image"].startswith("registry.example.org/cxr") else ["/tmp"]
        for path in writable:
            assert "emptyDir" in volumes.get(mounts.get(path), {}), f"{where} {name}: no emptyDir at {path}"


def test_image_user_is_the_pods_non_root_uid() -> None:
    """The image's last USER is created with the uid every pod's runAsUser names, and it is not root."""
    instructions = dockerfile_instructions(DOCKERFILE)
    users = [args.split(":")[0] for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}, f"the image runs as {users[-1] if users else 'root'}"
    created = [args for keyword, args in instructions if keyword == "RUN" and "useradd" in args]
    assert any(re.search(rf"--uid[ =]{IMAGE_UID}\b.*\b{users[-1]}\s*$", args) for args in created), created
    run_as = {where: spec.get("securityContext", {}).get("runAsUser") for where, spec in pod_specs()}
    assert set(run_as.values()) == {IMAGE_UID}, run_as


# ---------------------------------------------------------------------------------------- image


def test_image_environment_never_forces_single_node_ray() -> None:
    """RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the image would make every worker pod's `ray start` abort."""
    env = dockerfile_env()
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env, env
    setting = [f"{k} {a}" for k, a in dockerfile_instructions(DOCKERFILE) if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in a]
    assert not setting, setting  # nor as an ARG, or exported in a RUN


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
    instructions = dockerfile_instructions(DOCKERFILE)
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


def test_dockerignore_matcher_follows_docker() -> None:
    patterns = ["*", "!cxr", "**/__pycache__", "docs/*.md"]
    assert dockerignore_excludes(".git/HEAD", patterns) and dockerignore_excludes("tests/x.py", patterns)
    assert not dockerignore_excludes("cxr/cli.py", patterns)
    assert dockerignore_excludes("cxr/__pycache__/cli.cpython-311.pyc", patterns)
    assert not dockerignore_excludes("docs/a.md", ["docs/*.md", "!docs/a.md"])
    assert dockerignore_excludes("docs/sub/a.md", ["docs/**"]) and not dockerignore_excludes("doc", ["docs/**"])


def test_build_context_holds_what_the_image_copies_and_nothing_else() -> None:
    path = os.path.join(ROOT, ".dockerignore")
    assert os.path.exists(path), "no .dockerignore: the whole tree (.git, .venv, outputs) is the build context"
    with open(path) as fh:
        patterns = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    for path in (".git/HEAD", ".venv/bin/python", "demo-out/shards/manifest.json", "bench-out/train.json",
                 ".pytest_cache/v/cache", ".ruff_cache/x", "tests/test_k8s.py", "cxr/__pycache__/cli.cpython-311.pyc",
                 ".env", "mlruns/0/meta.yaml"):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the image build"
    sources = [src for keyword, args in dockerfile_instructions(DOCKERFILE) if keyword == "COPY"
               for src in args.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "requirements.lock", "cxr", "jobs", "configs"} <= set(sources), sources
    for src in sources:
        top = os.path.join(ROOT, src)
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(top) for f in fs
                 if "__pycache__" not in d] if os.path.isdir(top) else [src]
        assert files, f"COPY {src}: nothing there"
        assert not [f for f in files if dockerignore_excludes(f, patterns)], f"COPY {src}: excluded by .dockerignore"
