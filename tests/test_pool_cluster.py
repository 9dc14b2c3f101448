"""Scoring runs on the workers: `cxr evaluate` on a two-node Ray whose head offers no CPU, as on Kubernetes.

A real cluster inside a private network and pid namespace (`ray start` head with `--num-cpus=0`, a worker node
with 2), and a DenseNet-121 at 224 px scored by `cxr evaluate` as a Ray job's driver would run it. The CPU time
of the driver process (its rusage) and of every process of the worker node (its raylet's tree, sampled from
/proc while the command runs) is measured: the model's work must be on the worker node.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile

import pytest
from conftest import VENV_BIN, run_in_namespace
from test_k8s import dockerfile_env

from cxr import config as cfgmod

_SCRIPT = """\
set -e
ip link set lo up
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port=6379 --num-cpus=0 --disable-usage-stats --temp-dir={temp}/head >/dev/null
ray start --address=127.0.0.1:6379 --num-cpus=2 --disable-usage-stats --temp-dir={temp}/worker >/dev/null
python {measure}
"""

_MEASURE = """\
import json, os, resource, subprocess, threading, time
import psutil

def worker_raylet():
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and any({worker!r} in part for part in p.info["cmdline"] or []):
            return p
    raise SystemExit("no raylet of the worker node")

# The raylet reaps its workers without accounting for them (no children times), so the node's processes are
# sampled while the command runs: each process's last reading counts (at most one interval lost at its exit).
raylet, seen, start, done = worker_raylet(), {{}}, {{}}, threading.Event()

def sample():
    for p in [raylet, *raylet.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seen[p.pid] = t.user + t.system
        start.setdefault(p.pid, seen[p.pid] if not started else 0.0)

started = False
sample()
started = True

def poll():
    while not done.wait(0.2):
        sample()

thread = threading.Thread(target=poll)
thread.start()
before = resource.getrusage(resource.RUSAGE_CHILDREN)
run = subprocess.run({command!r}, env=dict(os.environ, RAY_ADDRESS="127.0.0.1:6379"), capture_output=True, text=True)
after = resource.getrusage(resource.RUSAGE_CHILDREN)
done.set()
thread.join()
sample()
driver = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
worker = sum(cpu - start[pid] for pid, cpu in seen.items())
print("RESULT " + json.dumps({{"rc": run.returncode, "driver": driver, "worker": worker, "processes": len(seen),
                              "stdout": run.stdout[-3000:], "stderr": run.stderr[-3000:]}}))
"""


@pytest.mark.slow
def test_evaluate_spends_its_cpu_on_the_worker_node_not_the_driver(phantom_shards, tmp_path) -> None:
    import keras

    from cxr.models import build_model
    from cxr.training import checkpoints

    cfg = cfgmod.load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [
        f"data.manifest_uri={phantom_shards}", "data.image_size=224", "data.allow_upsample=true",
        "model.name=densenet121"])
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    keras.mixed_precision.set_global_policy("float32")
    build_model("densenet121", 224).save_weights(str(folder / checkpoints.MODEL_FILE))
    (folder / checkpoints.CONFIG_FILE).write_text(cfgmod.to_yaml(cfg))
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    command = [os.path.join(VENV_BIN, "cxr"), "evaluate", "--model", str(folder), "--split", "train",
               "--val-split", "val", "--resamples", "200", "--no-record", "--batch-size", "16"]
    measure = tmp_path / "measure.py"
    measure.write_text(_MEASURE.format(worker=f"{temp}/worker", command=command))
    home = tmp_path / "home"
    home.mkdir()
    # The image's environment, as a pod has it (nothing of this machine's, such as a local-mode setting).
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           **dockerfile_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        _, out = run_in_namespace(_SCRIPT.format(temp=temp, measure=measure), env, tmp_path, 400,
                                  "the evaluation on the two-node cluster")
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # the nodes' Ray session folders
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert line, out[-4000:]
    result = json.loads(line[len("RESULT "):])
    assert result["rc"] == 0, result["stderr"]
    assert "mean AUROC" in result["stdout"] or "mean" in result["stdout"], result["stdout"]
    print(f"driver {result['driver']:.1f} CPU s, worker node {result['worker']:.1f} CPU s", file=sys.stderr)
    # The driver imports, reads the manifest, gathers and bootstraps; the worker node loads DenseNet-121 and runs
    # it over ~250 images at 224 px (about 9 CPU-seconds of forward passes alone on this machine).
    assert result["worker"] > 2 * result["driver"], result
