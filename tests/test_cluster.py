"""Ray as cxr runs it: the image's environment forms a multi-node cluster, and cxr's local mode stays on loopback.

Real processes throughout: `ray start` head and worker nodes inside a private network namespace, and cxr's local
mode in child processes whose sockets and lifetimes are read from /proc.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap

import pytest
from conftest import ROOT, VENV_BIN

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


# A KubeRay pod runs `ray start --head ...` or `ray start --address=<head>:6379 ...` with the image's environment
# (ray-operator/controllers/ray/common/pod.go, concatenateContainerCommand). Inside a private network and pid
# namespace both nodes can only use 127.0.0.1, and `ray stop` can only see and stop this cluster's processes.
_POD_SCRIPT = """\
set -e
ip link set lo up
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port=6379 --num-cpus=1 --disable-usage-stats --temp-dir={temp}/head
ray start --address=127.0.0.1:6379 --num-cpus=1 --disable-usage-stats --temp-dir={temp}/worker
python {driver}
"""

_DRIVER = """\
import json
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address="127.0.0.1:6379")
deadline = time.time() + 60
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(0.5)
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

ran = {n["NodeID"]: ray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                            .remote(), timeout=60) for n in nodes}
print("RESULT " + json.dumps({"nodes": [[n["NodeID"], n["NodeManagerAddress"]] for n in nodes], "ran": ran}))
"""


@pytest.mark.slow
def test_image_environment_forms_a_multi_node_cluster(tmp_path) -> None:
    """Head and worker started with exactly the image's ENV: both join, and each runs a task pinned to it."""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    home = tmp_path / "home"
    home.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    # Nothing of this machine's environment: the image's ENV over what the base image and KubeRay provide.
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           **dockerfile_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24)}
    script = _POD_SCRIPT.format(temp=temp, driver=driver)
    proc = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", script], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the namespace's init dies with it, and every process inside with it
        out, _ = proc.communicate()
        pytest.fail(f"the two-node cluster did not finish in 150 s:\n{out[-4000:]}")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, f"a pod with the image's environment failed (exit {proc.returncode}):\n{out[-4000:]}"
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    node_ids = [node_id for node_id, _ in result["nodes"]]
    assert len(node_ids) == 2, result
    assert {address for _, address in result["nodes"]} == {"127.0.0.1"}, result
    assert result["ran"] == {node_id: node_id for node_id in node_ids}, result
