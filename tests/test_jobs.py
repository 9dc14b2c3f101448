"""The training job as users run it: `ray job submit` to a token-protected cluster, and a worker killed mid-run.

Real processes throughout: `ray start --head` on loopback, a real `mlflow server`, Ray Train workers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, VENV_BIN, free_port, quiet_env, tiny_run

pytestmark = pytest.mark.slow


def _mlflow_run(tracking_uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("cxr-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@pytest.fixture
def bystander():
    """A process `ray stop` would take for one of Ray's (its arguments name log_monitor.py), as a user's `make demo`
    beside the suite has many: the test's cluster must stop without it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "ray/_private/log_monitor.py"],
                            start_new_session=True)
    yield proc
    survived = proc.poll() is None
    proc.kill()
    proc.wait()
    assert survived, "stopping the test's Ray cluster killed a process outside it"


def _members(namespace: str) -> list[int]:
    """Processes in the pid namespace `namespace` (a /proc/PID/ns/pid link such as "pid:[4026532301]")."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with token authentication and the dashboard (job API) on.

    The head runs in a private pid namespace (the network stays the host's: the test submits over loopback): its
    init is a shell that waits on our pipe, and when that closes and the shell exits the kernel ends every process
    inside, the jobs' drivers and workers too, and nothing outside. `ray stop` would stop every Ray on the machine.
    """
    token = secrets.token_hex(24)
    dash, gcs, agent = free_port(), free_port(), free_port()
    env = quiet_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # The job agent's port too: its default, 52365, is taken by any other Ray on the machine with a dashboard (a
    # user's `make demo`), and without its agent the head answers every submission "No available agent".
    start = [os.path.join(VENV_BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={agent}", "--num-cpus=3", "--disable-usage-stats", f"--temp-dir={temp}"]
    log = os.path.join(temp, "ray-start.log")
    script = f"{shlex.join(start)} >{shlex.quote(log)} 2>&1 && echo up && read _"
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    namespace = ""
    try:
        up = proc.stdout.readline().strip() == "up"  # or "" when `ray start` failed and the shell exited
        if not up:
            said = open(log).read()[-3000:] if os.path.exists(log) else "(no output)"
            pytest.fail(f"ray start in a private pid namespace failed (exit {proc.wait(timeout=60)}):\n{said}")
        namespace = os.readlink(f"/proc/{proc.pid}/ns/pid_for_children")  # the one unshare made
        assert len(_members(namespace)) > 3, "Ray's processes are not in the private namespace"
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "token": token}
    finally:
        proc.stdin.close()  # the namespace's init returns from `read` and exits: every process inside ends
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # unshare and the init it forked share our new process group
            proc.wait()
        deadline = time.time() + 30
        while namespace and _members(namespace) and time.time() < deadline:
            time.sleep(0.5)  # the kernel's kills are asynchronous
        left = namespace and _members(namespace)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster outlived it: {left}"


def test_ray_job_submit_with_token(bystander, ray_head, phantom_shards, mlflow_server, tmp_path):
    address, env = ray_head["address"], ray_head["env"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token: refused
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    storage = str(tmp_path / "runs")
    cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/train.py", "--config", "configs/demo.yaml",
           *tiny_run(phantom_shards, storage, "submitted", mlflow_server)]
    for _ in range(30):  # the job agent may come up some seconds after `ray start` returns
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        text = out.stdout + out.stderr
        if "No available agent to submit job" not in text:
            break
        time.sleep(3)
    assert out.returncode == 0, text[-5000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", text), text[-3000:]
    assert "AUROC per finding" in text and "Cardiomegaly" in text

    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", text).group(1)
    request = urllib.request.Request(f"{address}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {ray_head['token']}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert json.load(r)["status"] == "SUCCEEDED"

    checkpoints = sorted(p for p in glob.glob(os.path.join(storage, "submitted", "checkpoint_*")) if os.path.isdir(p))
    assert checkpoints, os.listdir(os.path.join(storage, "submitted"))
    state = json.load(open(os.path.join(checkpoints[-1], "state.json")))
    assert state["epoch"] == 2 and 0.0 <= state["metrics"]["val_auroc_mean"] <= 1.0

    client, run = _mlflow_run(mlflow_server, "submitted")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "small_cnn" and run.data.params["scaling.num_workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "epoch/val_auroc/mean")
    assert [m.step for m in history] == [1, 2]  # epochs count from 1 everywhere
    assert 0.0 <= run.data.metrics["test_auroc_mean"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"auroc.txt", "resolved.yaml", "roc_test.png", "learning_curves.png"} <= artifacts
    assert client.search_logged_models([run.info.experiment_id]), "model not logged"


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid
        except OSError:
            return False
    return False


def _train_worker_pids(driver: int) -> list[int]:
    """Ray Train worker processes of our run only (descendants of our driver), never another run's.

    Only processes the raylet started: a child forked by a worker keeps the worker's title.
    """
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:] if len(line.split(None, 2)) == 3]
    title = {int(pid): args for pid, _, args in rows}
    return [int(pid) for pid, ppid, args in rows
            if args.startswith("ray::RayTrainWorker") and "raylet" in title.get(int(ppid), "")
            and _descends_from(int(pid), driver)]


def _epochs_checkpointed(run_dir: str) -> int:
    """Epochs covered by the newest checkpoint that Ray Train's controller has registered.

    A checkpoint is on disk (state.json and all) before the controller takes in its report; a worker killed in
    between makes Ray restart from the previous registered checkpoint, or from scratch if there is none (seen
    once in CI). The controller records what it registered in its run snapshot, so that is the trigger.
    """
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as fh:
            latest = json.load(fh)["latest_checkpoint_result"]
        return int(latest["metrics"]["epoch"]) if latest else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # not written yet, or being rewritten right now


def _train_and_kill_a_worker(tmp_path, manifest: str, tracking_uri: str, name: str, epochs: int,
                             max_failures: int) -> tuple[int, str, int]:
    """`cxr train`; SIGKILL one Ray Train worker once two epochs are checkpointed. (exit code, output, epochs
    checkpointed at the kill).

    The trigger is the controller's record of checkpoints, not the workers' log lines: Ray forwards those to the
    driver in batches, seconds late, and these epochs take about a second each (a late trigger killed a finished
    run).
    """
    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "cxr.cli", "train", "--config", os.path.join(ROOT, "configs/demo.yaml"),
           *tiny_run(manifest, str(storage), name, tracking_uri, epochs=epochs), f"run.max_failures={max_failures}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 600
        killed, done_at_kill = None, 0
        while time.time() < deadline and proc.poll() is None:
            done_at_kill = _epochs_checkpointed(str(storage / name))
            pids = _train_worker_pids(proc.pid) if done_at_kill >= 2 else []
            if pids:
                killed = pids[-1]
                snapshot = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,stat,etimes,args"], capture_output=True,
                                          text=True).stdout
                os.kill(killed, signal.SIGKILL)
                lines.append(f"[test] killed {killed} of {pids} after {done_at_kill} checkpointed epochs; ps:\n"
                             + "".join(ln + "\n" for ln in snapshot.splitlines() if "ray" in ln or "cxr" in ln))
                break
            time.sleep(0.1)
        assert killed, "never saw two checkpointed epochs and a live worker:\n" + "".join(lines[-60:])
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    return code, "".join(lines), done_at_kill


def test_killed_worker_resumes_from_checkpoint(phantom_shards, mlflow_server, tmp_path):
    """max_failures=1: the group restarts from the checkpoint, and MLflow shows each epoch once."""
    epochs = 8
    code, text, done_at_kill = _train_and_kill_a_worker(tmp_path, phantom_shards, mlflow_server, "killed", epochs,
                                                        max_failures=1)
    assert code == 0, text[-6000:]
    assert done_at_kill < epochs
    # from a checkpoint, not from scratch: the last checkpoint records each restore (log lines can be lost)
    latest = max(glob.glob(str(tmp_path / "runs" / "killed" / "checkpoint_*" / "state.json")),
                 key=lambda p: json.load(open(p))["epoch"])
    resumes = json.load(open(latest))["resumes"]
    kill_note = next((ln for ln in text.split("\n[test] ")[1:2]), "")
    assert len(resumes) == 1 and 1 <= resumes[0] < epochs, (resumes, kill_note + text[-4000:])
    client, run = _mlflow_run(mlflow_server, "killed")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "epoch/val_auroc/mean")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # each epoch once: continued, not restarted


def test_dead_run_is_on_record_as_failed_with_its_epochs(phantom_shards, mlflow_server, tmp_path):
    """max_failures=0: the run dies; the MLflow run says FAILED and holds the epochs logged live."""
    code, text, done_at_kill = _train_and_kill_a_worker(tmp_path, phantom_shards, mlflow_server, "dead", 8,
                                                        max_failures=0)
    assert code != 0, text[-4000:]
    client, run = _mlflow_run(mlflow_server, "dead")
    assert run.info.status == "FAILED"
    assert run.data.params["run.max_failures"] == "0"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_auroc/mean"))
    # rank 0 logs an epoch right after its checkpoint, so the last one on disk may have missed MLflow
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= done_at_kill - 1 >= 1, (steps, done_at_kill)
