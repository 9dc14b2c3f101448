"""Ray as cxr runs it: the image's environment forms a multi-node cluster, and cxr's local mode stays on loopback.

Real processes throughout: `ray start` head and worker nodes inside a private network namespace, and cxr's local
mode in child processes whose sockets and lifetimes are read from /proc.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from conftest import ROOT, VENV_BIN, quiet_env, run_in_namespace
from test_k8s import dockerfile_env

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
    try:
        code, out = run_in_namespace(script, env, tmp_path, 150, "the two-node cluster")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert code == 0, f"a pod with the image's environment failed (exit {code}):\n{out[-4000:]}"
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    node_ids = [node_id for node_id, _ in result["nodes"]]
    assert len(node_ids) == 2, result
    assert {address for _, address in result["nodes"]} == {"127.0.0.1"}, result
    assert result["ran"] == {node_id: node_id for node_id in node_ids}, result


# ---------------------------------------------------------------------------------------- cxr's local mode

_LOCAL_DRIVER = """\
import json, os, sys
from cxr.cluster import init_ray
init_ray(num_cpus=1)
import ray
@ray.remote
def pid():
    return os.getpid()
ray.get(pid.remote())  # a worker process is up, and its core worker's server with it
node = ray.nodes()[0]
ports = {k: node[k] for k in ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
                              "RuntimeEnvAgentPort", "DashboardAgentListenPort") if node.get(k, -1) > 0}
print("READY " + json.dumps({"address": node["NodeManagerAddress"], "ports": ports,
                             "session": os.path.dirname(os.path.dirname(node["RayletSocketName"]))}), flush=True)
sys.stdin.read()  # until the test closes stdin: then a normal exit
"""


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a live process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[19]), fields[0])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ray_processes(driver: int, session: str) -> dict[int, int]:
    """pid -> start time of the driver's descendants and of every process naming the Ray session in its cmdline."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p)))}
    found = {pid for pid in stats if session in _cmdline(pid)} | ({driver} & set(stats))
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in stats.items() if ppid in frontier} - found
        found |= frontier
    found.discard(driver)
    return {pid: stats[pid][1] for pid in found if pid != os.getpid()}


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket the processes hold (IPv4 and IPv6)."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue  # exited meanwhile
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as fh:
            for row in fh.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: TCP_LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, len(hexaddr), 8))
                ip = ipaddress.ip_address(raw)
                shown = f"::ffff:{ip.ipv4_mapped}" if getattr(ip, "ipv4_mapped", None) else str(ip)
                found.append((shown, int(hexport, 16), inodes[cols[9]]))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _start_local_driver(tmp_path) -> tuple[subprocess.Popen, dict]:
    """A child process in cxr's local mode, without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER in its environment."""
    env = quiet_env(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # cxr must arrange loopback itself
    proc = subprocess.Popen([sys.executable, "-c", _LOCAL_DRIVER], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("READY ") or time.time() > deadline:
            break
    if not lines or not lines[-1].startswith("READY "):
        proc.kill()
        pytest.fail("cxr's local mode did not come up:\n" + "".join(lines)[-4000:])
    return proc, json.loads(lines[-1][len("READY "):])


def _wait_gone(procs: dict[int, int], seconds: float) -> dict[int, str]:
    """The processes (same pid and start time) still alive after up to `seconds`, with their cmdlines."""
    deadline = time.time() + seconds
    while True:
        alive = {pid: _cmdline(pid) for pid, start in procs.items() if (s := _stat(pid)) and s[1] == start}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def _kill_leftovers(procs: dict[int, int]) -> None:
    for pid, start in procs.items():
        if (s := _stat(pid)) and s[1] == start:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_local_mode_listens_on_loopback_only(tmp_path) -> None:
    """Every TCP socket of the local Ray (GCS, raylet, agents, metrics, core workers) is on 127.0.0.1; a normal
    exit leaves none of its processes behind."""
    proc, info = _start_local_driver(tmp_path)
    procs = {}
    try:
        procs = _ray_processes(proc.pid, info["session"])
        sockets = _listening(set(procs))
        described = "\n".join(f"{a}:{port} {_cmdline(pid)[:100]}" for a, port, pid in sockets)
        assert not [s for s in sockets if not _is_loopback(s[0])], f"listening beyond loopback:\n{described}"
        assert info["address"] == "127.0.0.1", f"the local node registered as {info['address']}"
        assert set(info["ports"].values()) <= {port for _, port, _ in sockets}, (info["ports"], described)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stdout.read()[-3000:]
        left = _wait_gone(procs, 20)
        assert not left, f"still running after a normal exit: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(procs)


@pytest.mark.slow
def test_local_mode_dies_with_a_killed_driver(tmp_path) -> None:
    """SIGKILL of the driver: within 20 s no process of its Ray session remains (agents used to linger)."""
    proc, info = _start_local_driver(tmp_path)
    procs = {}
    try:
        procs = _ray_processes(proc.pid, info["session"])
        assert len(procs) >= 4, procs  # gcs, raylet, agents, a worker: the test sees them
        proc.kill()
        proc.wait(timeout=30)
        left = _wait_gone({**procs, **_ray_processes(proc.pid, info["session"])}, 20)
        assert not left, f"still running 20 s after the driver's SIGKILL: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(procs)


# ------------------------------------------------------------------------------- the local Ray's folder


def test_removing_the_local_rays_folder_never_reaches_outside_it(tmp_path) -> None:
    """Links inside the folder are removed, not followed; a link named like the folder, or another folder, is kept."""
    from cxr.cluster import remove_temp_dir

    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "keep.txt").write_text("mine")
    folder = tmp_path / "cxr-ray-abc123"
    (folder / "session_1" / "logs").mkdir(parents=True)
    (folder / "session_1" / "logs" / "raylet.out").write_text("log")
    (folder / "session_latest").symlink_to(folder / "session_1")
    (folder / "session_1" / "data").symlink_to(outside)
    (folder / "note").symlink_to(outside / "deep" / "keep.txt")
    alias = tmp_path / "cxr-ray-alias"
    alias.symlink_to(outside)
    other = tmp_path / "not-ray"
    other.mkdir()
    for path in (folder, alias, other):
        remove_temp_dir(str(path))
    assert not folder.exists() and not folder.is_symlink()
    assert (outside / "deep" / "keep.txt").read_text() == "mine" and alias.is_symlink() and other.is_dir()


@pytest.mark.slow
def test_a_commands_local_ray_folder_goes_unless_it_failed_or_ran_verbose(tmp_path) -> None:
    """`cxr prepare` (which starts a local Ray) leaves no cxr-ray-* folder when it succeeds; with -v, or when it
    fails (here writing its manifest onto a folder), the folder stays and a log line says where."""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = quiet_env(TMPDIR=temp)
    env.pop("RAY_TMPDIR", None)
    cxr = [sys.executable, "-m", "cxr.cli"]
    prepare = ["prepare", "raw", "out", "--size", "32", "--num-workers", "1"]

    def run(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        out = subprocess.run([*cxr, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return out, sorted(n for n in os.listdir(temp) if n.startswith("cxr-ray-"))

    try:
        subprocess.run([*cxr, "synth", "raw", "--patients", "6", "--size", "32", "--workers", "1"], env=env,
                       cwd=tmp_path, check=True, capture_output=True, timeout=120)
        ok, left = run(*prepare)
        assert ok.returncode == 0 and "started a local Ray" in ok.stderr, ok.stderr[-3000:]
        assert left == [], left
        verbose, left = run("-v", *prepare)  # every shard is written already: Ray starts, the manifest is rewritten
        assert verbose.returncode == 0 and len(left) == 1, (left, verbose.stderr[-3000:])
        assert f"the local Ray's folder (its logs) is kept: {temp}/{left[0]}" in verbose.stderr
        shutil.rmtree(os.path.join(temp, left[0]))
        (tmp_path / "out" / "manifest.json").unlink()
        (tmp_path / "out" / "manifest.json").mkdir()
        failed, left = run(*prepare)
        assert failed.returncode != 0 and len(left) == 1, (left, failed.stderr[-3000:])
        assert f"the local Ray's folder (its logs) is kept: {temp}/{left[0]}" in failed.stderr
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_local_rays_state_api_is_its_own_beside_another_ray(tmp_path) -> None:
    """With another Ray on the machine, the local Ray's processes reach its own State API (what Ray Train's
    placement-group cleaner polls) instead of searching the machine, finding two and dying with a traceback."""
    script = textwrap.dedent("""
        import json, os, ray
        from cxr.cluster import init_ray
        init_ray(num_cpus=1)

        @ray.remote(num_cpus=0)
        def where():
            from ray.dashboard.utils import get_address_for_submission_client
            from ray.util.state import list_nodes
            return get_address_for_submission_client(None), len(list_nodes())

        ours = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
        print(json.dumps({"dashboard": ours, "seen": ray.get(where.remote())}))
    """)
    (tmp_path / "probe.py").write_text(script)
    env = quiet_env(PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    ray_bin, other = os.path.join(VENV_BIN, "ray"), tempfile.mkdtemp(prefix="r", dir="/tmp")  # socket paths short
    try:
        code, out = run_in_namespace(
            f"ip link set lo up && {ray_bin} start --head --port=6390 --num-cpus=0 --include-dashboard=false "
            f"--temp-dir={other} --disable-usage-stats >/dev/null 2>&1 && {sys.executable} probe.py",
            env, tmp_path, 180, "a local Ray beside another")
    finally:
        shutil.rmtree(other, ignore_errors=True)
    assert code == 0, out[-3000:]
    found = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert found["seen"][0] == found["dashboard"] and found["seen"][1] == 1, found  # ours, and only our node
