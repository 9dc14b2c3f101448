"""Shared fixtures: a real, authenticated SeaweedFS S3 server on loopback for the whole session."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_server import PostgresError, PostgresNotFoundError, PostgresServer, find_pg_bin
from s3server import S3Server, WeedNotFoundError, find_weed

# Variables that would send S3 traffic elsewhere or supply other credentials than the fixture's.
_FOREIGN_AWS_VARS = (
    "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def _weed_or_fail() -> str:
    try:
        return find_weed()
    except WeedNotFoundError as exc:
        message = f"the S3 tests are required and need SeaweedFS: {exc}"
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback noise


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A started server with bucket `s3.bucket`; its credentials/endpoint are in os.environ meanwhile.

    Fails (never skips) without `weed`: the S3 tests are part of the required suite.
    """
    weed = _weed_or_fail()
    workdir = tmp_path_factory.mktemp("seaweedfs")
    server = S3Server(weed, workdir)
    mp = pytest.MonkeyPatch()
    try:
        # Environment first: the readiness probe in start() must not go through an HTTP(S)_PROXY either.
        for name in _FOREIGN_AWS_VARS:
            mp.delenv(name, raising=False)
        # No ~/.aws files either: they could carry endpoints, profiles or credential processes.
        mp.setenv("AWS_CONFIG_FILE", str(workdir / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-aws-credentials"))
        # An HTTP(S)_PROXY in the environment must not capture loopback traffic.
        for var in ("NO_PROXY", "no_proxy"):
            mp.setenv(var, ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get(var)])))
        for name, value in server.env.items():
            mp.setenv(name, value)
        server.start()
        yield server
    finally:
        mp.undo()
        server.close()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = Path(ROOT).parent / "shared" / "samples" / "nih-png"  # three real NIH PNGs beside the project
VENV_BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: venv first on PATH, loopback-only Ray, quiet TensorFlow."""
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}  # this process's own Ray
    return {**inherited, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "3",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture(scope="session", autouse=True)
def _no_mlflow_store_in_the_checkout() -> Iterator[None]:
    """MLflow's defaults (./mlruns, ./mlflow.db) land in the working directory: no test may leave one here."""
    strays = ("mlruns", "mlartifacts", "mlflow.db")
    before = {n for n in strays if os.path.exists(os.path.join(ROOT, n))}
    yield
    left = {n for n in strays if os.path.exists(os.path.join(ROOT, n))} - before
    assert not left, f"tests wrote {sorted(left)} into the checkout {ROOT}"


def user_env(**extra: str) -> dict[str, str]:
    """As a user's shell has it: without the single-node switch, which cxr's local mode must set by itself."""
    env = quiet_env(**extra)
    del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    return env


def tiny_run(manifest: str, storage: str, name: str, tracking_uri: str, epochs: int = 2) -> list[str]:
    """Overrides that shrink configs/demo.yaml to a run of seconds per epoch on 64 px phantoms."""
    return [f"data.manifest_uri={manifest}", "data.image_size=64", f"optim.epochs={epochs}",
            "optim.batch_size=16", "optim.steps_per_log=2", "optim.early_stopping_patience=null",
            f"run.storage_path={storage}", f"run.name={name}", f"tracking.tracking_uri={tracking_uri}",
            "tracking.experiment=cxr-tests", f"tracking.run_name={name}"]


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small prepared phantom dataset (synth → prepare in child processes); returns manifest.json's path."""
    base = tmp_path_factory.mktemp("phantoms")
    raw, out = base / "raw", base / "shards"
    run = [sys.executable, "-m", "cxr.cli"]
    subprocess.run([*run, "synth", str(raw), "--patients", "90", "--size", "64", "--seed", "3"],
                   check=True, capture_output=True, env=quiet_env(), timeout=300)
    subprocess.run([*run, "prepare", str(raw), str(out), "--size", "64", "--images-per-shard", "40"],
                   check=True, capture_output=True, env=quiet_env(), timeout=300)
    return str(out / "manifest.json")


class MlflowServer:
    """A real `mlflow server` on loopback with proxied artifacts and a SQLite store (or `backend_uri`, e.g. a
    PostgresServer's), which a test may stop and start again on the same port and store (an outage)."""

    def __init__(self, base, backend_uri: str | None = None, workers: int = 1) -> None:
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = backend_uri or f"sqlite:///{base}/mlflow.db"
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        cmd = [os.path.join(VENV_BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--artifacts-destination", str(self.base / "artifacts"), "--workers", str(self.workers)]
        log = open(self.base / "server.log", "a")
        # The store URI by environment, as the pods pass it: a database password stays out of `ps`.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=quiet_env(MLFLOW_BACKEND_STORE_URI=self.backend_uri),
                                     start_new_session=True)
        log.close()
        deadline = time.time() + 180
        while time.time() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not start: {(self.base / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)  # its workers linger past SIGTERM; the store is a database either way
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` for the session; yields its URL."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server.url
    server.stop()


def _postgres_or_fail() -> PostgresServer:
    try:
        return PostgresServer(find_pg_bin()).start()
    except (PostgresNotFoundError, PostgresError) as exc:
        message = f"the MLflow-on-PostgreSQL tests are required and need PostgreSQL: {exc}"
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback noise


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the session (Debian's server): `.uri` is its SQLAlchemy URI, `.connect()` gives a
    psycopg2 connection. Fails, never skips, where PostgreSQL cannot be had: these tests are required."""
    server = _postgres_or_fail()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mlflow_pg_server(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on the `postgres` cluster (the gpu overlay's store); yields its URL. One worker (its
    requests still run concurrently): a second doubles the start-up on two cores."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-pg"), backend_uri=postgres.uri).start()
    yield server.url
    server.stop()


def register_seeded_model(base, name: str, size: int, seed: int, tags: dict | None = None,
                          tracking_uri: str | None = None) -> tuple[str, str, str]:
    """(tracking URI, models:/NAME/VERSION, run id): a seeded untrained small_cnn logged and registered in SQLite
    under `base`, or on the server at `tracking_uri` (which keeps the artifacts)."""
    import keras
    import mlflow

    from cxr.models import build_model
    from cxr.tracking.models import log_model
    from cxr.tracking.runs import artifact_location, experiment_id

    uri = tracking_uri or f"sqlite:///{base}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), name, artifact_location(uri)))
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(seed)
    with mlflow.start_run(tags=tags) as run:
        info = log_model(build_model("small_cnn", size), name="tiny", step=1, registered_model=name)
    return uri, f"models:/{name}/{info.registered_model_version}", run.info.run_id


def run_in_namespace(script: str, env: dict[str, str], cwd, timeout: float, what: str) -> tuple[int, str]:
    """`sh -c script` in a private network and pid namespace (loopback only, `ray stop` sees only its processes);
    (exit code, output). On timeout the whole namespace is killed (its init dies, and everything inside)."""
    proc = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", script], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout:g} s:\n{out[-4000:]}")
    return proc.returncode, out
