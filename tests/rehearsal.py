"""Scheduled retraining, rehearsed on a real two-node Ray cluster: run by tests/test_rehearsal.py as

    unshare --net --pid --fork --mount-proc python tests/rehearsal.py WORK_DIR RESULT_JSON

Inside the private namespaces everything listens on 127.0.0.1 and only this cluster's processes exist: a
SeaweedFS S3 server (data, shards, checkpoints), an `mlflow server`, a Ray head and a worker node started as
KubeRay pods start them (the image's ENV, token auth). Three `ray job submit`s of `jobs/retrain.py`: a first
slot (its model becomes champion), a second slot with a worse configuration during which the worker node is
killed and replaced (Ray Train resumes from the checkpoint on S3; the champion stays), and the first slot
again (nothing to do). What happened, with timestamps, goes to RESULT_JSON for the test to check.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from conftest import VENV_BIN, MlflowServer  # noqa: E402
from s3server import S3Server, find_weed  # noqa: E402
from test_k8s import dockerfile_env  # noqa: E402

GCS, DASHBOARD = 6379, 8265
T0 = time.monotonic()
EVENTS: list[tuple[float, str]] = []


def mark(what: str) -> None:
    EVENTS.append((round(time.monotonic() - T0, 1), what))
    print(f"[{EVENTS[-1][0]:7.1f} s] {what}", flush=True)


def ray(env: dict, *args: str) -> None:
    subprocess.run([os.path.join(VENV_BIN, "ray"), *args], env=env, check=True, capture_output=True, timeout=180)


def api(token: str | None, path: str, data: dict | None = None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{DASHBOARD}{path}", headers={
        **({"Authorization": f"Bearer {token}"} if token else {}), "Content-Type": "application/json"},
        data=None if data is None else json.dumps(data).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def submit(env: dict, token: str, args: list[str]) -> str:
    cmd = [os.path.join(VENV_BIN, "ray"), "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD}",
           "--working-dir", str(ROOT), "--no-wait", "--", "python", "jobs/retrain.py", *args]
    for _ in range(60):  # the job agent comes up some seconds after `ray start` returns
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return next(w.strip("'") for w in out.stdout.split() if w.strip("'").startswith("raysubmit_"))
        if "No available agent" not in out.stdout + out.stderr:
            raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
        time.sleep(2)
    raise RuntimeError("the job agent never came up")


def wait(token: str, job: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = api(token, f"/api/jobs/{job}")
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            info["logs"] = api(token, f"/api/jobs/{job}/logs")["logs"]
            return info
        time.sleep(2)
    raise TimeoutError(f"job {job} still running after {timeout} s")


def kill_node(temp: str) -> int:
    """SIGKILL every process of the Ray node whose temp dir is `temp` (a pod lost with its node)."""
    mark_ = f"{temp}/".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                hit = mark_ in fh.read()
            hit = hit or any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(temp + "/")
                             for fd in os.listdir(f"/proc/{entry}/fd"))
            if hit:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    return killed


def main(work: Path, result_path: Path) -> None:
    if os.getpid() != 1:  # not the init of a namespace of its own: fixed ports, and other people's processes
        sys.exit("tests/rehearsal.py runs only as the first process of private namespaces: "
                 "unshare --net --pid --fork --mount-proc python tests/rehearsal.py WORK_DIR RESULT_JSON")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    result: dict = {"events": EVENTS}
    s3 = S3Server(find_weed(), work / "weed")
    os.environ.update(s3.env)
    s3.start()
    mlflow = MlflowServer(work / "mlflow-server")
    (work / "mlflow-server").mkdir()
    mlflow.start()
    mark("S3 and MLflow servers up")
    token = secrets.token_hex(24)
    home = work / "home"
    home.mkdir()
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           **dockerfile_env(), **s3.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "RAY_USAGE_STATS_ENABLED": "0"}
    import tempfile

    head, node = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rh", "rw"))  # Ray's socket paths: < 108 bytes
    try:
        ray(env, "start", "--head", f"--port={GCS}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD}", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={head}")
        ray(env, "start", f"--address=127.0.0.1:{GCS}", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={node}")
        mark("Ray head and worker node up")
        try:
            api(None, "/api/jobs/")
            result["unauthenticated"] = 200
        except urllib.error.HTTPError as exc:
            result["unauthenticated"] = exc.code
        subprocess.run([sys.executable, "-m", "cxr.cli", "synth", str(work / "root"), "--patients", "90", "--size",
                        "64", "--seed", "3"], env=env, check=True, capture_output=True, timeout=300)
        options = ["--config", "configs/demo.yaml", "--prepare", str(work / "root"), s3.url("shards"), "--size", "64",
                   "--images-per-shard", "40"]
        common = ["data.image_size=64", "optim.batch_size=16", "optim.steps_per_log=4",
                  "optim.early_stopping_patience=null", f"run.storage_path={s3.url('runs')}", "run.name=weekly",
                  "run.max_failures=2", f"tracking.tracking_uri={mlflow.url}", "tracking.experiment=rehearsal",
                  "tracking.registered_model=rehearsal", "scaling.num_workers=2"]
        first = submit(env, token, [*options, "--slot", "2026-11-24", *common, "optim.epochs=4"])
        mark(f"submitted slot 2026-11-24 ({first})")
        result["first"] = wait(token, first)
        mark(f"slot 2026-11-24 {result['first']['status']}")
        if result["first"]["status"] != "SUCCEEDED":
            raise RuntimeError("the first slot failed:\n" + result["first"]["logs"][-4000:])

        second = submit(env, token, [*options, "--slot", "2026-12-01", *common, "optim.epochs=5",
                                    "optim.lr=1.0e-7", "optim.min_lr=0.0"])  # a rate too small to learn
        mark(f"submitted slot 2026-12-01 with a worse configuration ({second})")
        from cxr import storage

        run_dir = s3.url("runs/weekly-2026-12-01")
        deadline = time.monotonic() + 400
        def checkpoint_dirs() -> list[str]:
            names = storage.listdir(run_dir)
            return sorted(n for n in names if n.startswith("checkpoint_") and not n.endswith(".json"))

        # Two on storage: the first is then registered with Ray Train (the newest may still be uploading).
        while len(checkpoint_dirs()) < 2:
            status = api(token, f"/api/jobs/{second}")["status"]
            if time.monotonic() > deadline or status not in ("PENDING", "RUNNING"):
                logs = api(token, f"/api/jobs/{second}/logs")["logs"]
                raise RuntimeError(f"the second job ({status}) never checkpointed an epoch:\n{logs[-4000:]}")
            time.sleep(1)
        mark(f"worker node killed ({kill_node(node)} processes) after {len(checkpoint_dirs())} checkpoints")
        ray(env, "start", f"--address=127.0.0.1:{GCS}", "--num-cpus=1", "--disable-usage-stats",
            f"--temp-dir={node}2")
        mark("replacement worker node up")
        result["second"] = wait(token, second)
        mark(f"slot 2026-12-01 {result['second']['status']}")
        latest = max((json.loads(storage.read_text(storage.join(run_dir, c, "state.json"))) for c in checkpoint_dirs()),
                     key=lambda s: s["epoch"])
        result["second_resumes"] = latest["resumes"]

        again = submit(env, token, [*options, "--slot", "2026-11-24", *common, "optim.epochs=4"])
        result["again"] = wait(token, again)
        mark(f"slot 2026-11-24 resubmitted: {result['again']['status']}")

        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow.url)
        versions = sorted(client.search_model_versions("name = 'rehearsal'"), key=lambda v: int(v.version))
        versions = [client.get_model_version("rehearsal", v.version) for v in versions]  # searches omit aliases
        result["versions"] = [{"version": v.version, "run_id": v.run_id, "aliases": list(v.aliases),
                               "tags": dict(v.tags)} for v in versions]
        result["runs"] = {r.info.run_name: {"tags": dict(r.data.tags), "status": r.info.status}
                          for r in client.search_runs([client.get_experiment_by_name("rehearsal").experiment_id])}
    finally:
        result_path.write_text(json.dumps(result, indent=1, default=str))
        for temp in (head, node, f"{node}2"):  # our nodes; what is left ends with this process, the namespace's init
            kill_node(temp)
        mlflow.stop()
        s3.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
