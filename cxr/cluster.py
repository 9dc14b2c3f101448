"""Connecting to Ray: the cluster a job was submitted to, or a local one on loopback that dies with its driver.

Local mode's loopback rests on one Ray setting: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray keeps 127.0.0.1 as
the node address (otherwise ray.init swaps it for the host's), and every server it starts binds the node address
(GCS, raylet, core workers, both agents, the metrics exporter). Ray reads the variable once, when it is imported.

A reaper in its own session outlives a driver that is SIGKILLed: it holds the read end of a pipe from the driver,
and when the pipe closes it kills every process of the driver's Ray session. Ray's own fate sharing takes down the
GCS and raylet with the driver, but not the agents the raylet started, which linger for a minute or more.

Run as a script (`python cluster.py TEMP_DIR RAY_DIR`), this module is that reaper: standard library only. It
only kills; the local Ray's folder (`cxr-ray-*`: logs, sockets, spilled objects) is removed by `finish`, which the
`cxr` command calls when it ends, and kept for a failed command or `-v`.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)

SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
API_SERVER = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients go instead of searching the machine
TEMP_PREFIX = "cxr-ray-"
_reaper: subprocess.Popen | None = None
_temp_dir: str | None = None  # the folder of the local Ray this process started (None: none started)
_api_server: str | None = None  # the RAY_API_SERVER_ADDRESS this process set for its local Ray (unset at stop)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the job's cluster when there is one (RAY_ADDRESS, as `ray job submit` sets); else start one here.

    Joining leaves the environment alone: a cluster node's is the pod's. A local Ray listens on 127.0.0.1 only
    and is torn down at exit, or by the reaper if the driver dies.
    """
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=True)
            log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    _start_local(num_cpus)


def started_local() -> bool:
    """Whether the Ray this process is on is the local one it started (not a cluster it joined)."""
    return _reaper is not None


def _start_local(num_cpus: int | None) -> None:
    """ray.init on 127.0.0.1 in a private temp dir, with the reaper watching it from before the first process."""
    global _reaper, _temp_dir, _api_server
    loopback = "ray" not in sys.modules or os.environ.get(SINGLE_NODE) == "0"
    if "ray" not in sys.modules:
        os.environ[SINGLE_NODE] = "0"  # before the import: Ray reads it there (ray_constants.ENABLE_RAY_CLUSTER)
        _local_environment()  # likewise
    import ray

    if ray.is_initialized():
        return
    if not loopback:
        log.warning("ray was imported before cxr started its local Ray, without %s=0 in the environment, so Ray "
                    "gives this node the host's address and the local Ray listens beyond loopback. Set %s=0 "
                    "before importing ray, or leave the import to cxr.", SINGLE_NODE, SINGLE_NODE)
    stop_local()  # the reaper of an earlier local Ray that was shut down by ray.shutdown() alone
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # where Ray itself would go
    temp_dir = os.path.abspath(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))  # short: socket paths < 108 bytes
    _temp_dir = temp_dir
    _reaper = _spawn_reaper(temp_dir, os.path.dirname(ray.__file__))
    try:
        # The dashboard (on 127.0.0.1) serves Ray's State API, which Ray Train's placement-group cleaner polls.
        # Named to every process of this Ray (they inherit the variable): otherwise the cleaner looks for "the"
        # Ray of the machine, finds this one and any other (a second cxr command, a test's cluster), and dies
        # printing a traceback through the command's output ("Found multiple active Ray instances").
        port = _free_port()
        os.environ[API_SERVER] = _api_server = f"http://127.0.0.1:{port}"
        info = ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=True,
                        dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True,
                        _temp_dir=temp_dir, logging_level=logging.WARNING)
    except BaseException:
        stop_local()
        raise
    log.info("started a local Ray on %s with %s CPUs (dashboard http://%s, logs %s)", ray.util.get_node_ip_address(),
             ray.cluster_resources().get("CPU"), info.dashboard_url or "none", temp_dir)


def _local_environment() -> None:
    """What every process of the local Ray inherits (they are this process's children).

    Token authentication, with a token made here, even on loopback (other users of the machine); set
    explicitly, so Ray does not write one to the home directory or warn about choosing. No preemption watcher:
    one machine is never drained, and its actor only adds an error line at start-up.
    """
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_reaper(temp_dir: str, ray_dir: str) -> subprocess.Popen:
    """This file as a script, in a session of its own (no terminal signal reaches it), reading our pipe.

    -I: only the standard library is needed, and nothing from the environment or the working directory.
    """
    with open(os.path.join(temp_dir, "cxr-reaper.log"), "ab") as errors:
        return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), temp_dir, ray_dir],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
                                start_new_session=True)


def stop_local(timeout: float = 20.0) -> None:
    """Shut down the local Ray this process started and wait until the reaper has cleared its session."""
    global _reaper, _api_server
    reaper, _reaper = _reaper, None
    if _api_server is not None and os.environ.get(API_SERVER) == _api_server:  # children after this are not its
        del os.environ[API_SERVER]  # e.g. `ray job submit --address X` would go to the variable's address
    _api_server = None
    if reaper is None:
        return
    import ray

    try:
        ray.shutdown()
    finally:
        reaper.stdin.close()
        try:
            reaper.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the reaper of the local Ray (pid %d) is still clearing its session", reaper.pid)


atexit.register(stop_local)  # atexit runs last-registered first: this may come before or after Ray's own hook


def finish(keep: bool) -> None:
    """The end of a command: stop the local Ray, then remove its folder, or keep it (a failed command, `-v`, a
    process of its session still alive) and say where it is, in one line."""
    global _temp_dir
    temp_dir, _temp_dir = _temp_dir, None
    try:
        stop_local()
    except Exception as exc:  # noqa: BLE001 - the command's own outcome stands; its Ray's folder is kept to look at
        log.warning("stopping the local Ray failed: %s", exc)
        keep = True
    if temp_dir is None or not os.path.isdir(temp_dir):
        return
    import ray

    executables = (os.path.realpath(sys.executable), os.path.realpath(os.path.dirname(ray.__file__)) + os.sep)
    if keep or session_processes(temp_dir, executables, {os.getpid()}):
        log.info("the local Ray's folder (its logs) is kept: %s", temp_dir)
        return
    remove_temp_dir(temp_dir)


def remove_temp_dir(temp_dir: str) -> None:
    """Delete a local Ray's folder and nothing else: a real directory named cxr-ray-*, not a link to one; a link
    inside it is removed, never followed (shutil.rmtree's fd-based walk on Linux)."""
    if (not os.path.basename(temp_dir.rstrip(os.sep)).startswith(TEMP_PREFIX) or os.path.islink(temp_dir)
            or not shutil.rmtree.avoids_symlink_attacks):
        log.info("the local Ray's folder is kept: %s (not a cxr-ray-* folder this platform can remove safely)",
                 temp_dir)
        return
    try:
        shutil.rmtree(temp_dir)
    except OSError as exc:
        log.warning("could not remove the local Ray's folder %s: %s", temp_dir, exc)


# ------------------------------------------------------------------------------------------- the reaper


def session_processes(temp_dir: str, executables: tuple[str, ...], spare: set[int]) -> list[int]:
    """Live processes of a Ray session: a Ray binary or our Python, naming the session's directory in the command
    line or holding a file under it open (workers and agents retitle themselves, but keep their log files)."""
    mark, found = temp_dir.rstrip("/") + "/", []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spare:
            continue
        proc = f"/proc/{entry}"
        try:
            if not os.path.realpath(f"{proc}/exe").startswith(executables):
                continue
            with open(f"{proc}/cmdline", "rb") as fh:
                if mark.encode() in fh.read():
                    found.append(int(entry))
                    continue
            if any(os.readlink(f"{proc}/fd/{fd}").startswith(mark) for fd in os.listdir(f"{proc}/fd")):
                found.append(int(entry))
        except OSError:
            continue  # gone meanwhile, or not ours to inspect
    return found


def _reap(temp_dir: str, ray_dir: str, patience: float = 10.0) -> None:
    """Wait for EOF on stdin (the driver exited or died), then SIGKILL the session until nothing of it is left.

    The driver is spared: at a normal exit it waits for us, with its own Ray log files still open.
    """
    spare = {os.getpid(), os.getppid()}
    while sys.stdin.buffer.read(65536):
        pass
    if not os.path.isdir("/proc"):
        return  # not Linux: nothing to read the session's processes from
    executables = (os.path.realpath(sys.executable), os.path.realpath(ray_dir) + os.sep)
    deadline = time.monotonic() + patience
    while (pids := session_processes(temp_dir, executables, spare)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


if __name__ == "__main__":
    _reap(sys.argv[1], sys.argv[2])
