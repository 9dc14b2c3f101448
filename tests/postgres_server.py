"""A throwaway PostgreSQL cluster for tests: the MLflow backend store the gpu overlay deploys, made real here.

Debian's `postgresql` server (in the machine image; `.ci/run` installs it where missing). PostgreSQL refuses to
run as root, so as root initdb and the postmaster run as the package's `postgres` user, in a data directory under
/tmp that this class owns and deletes. The postmaster is our own child in its own process group (no pg_ctl), so
stopping it never depends on pid files. Clients log in with a random password over loopback TCP, as in the pod.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
BINARIES = ("initdb", "postgres")
# A test cluster: durability off (the data directory is deleted anyway), which saves seconds per start.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "listen_addresses": "127.0.0.1"}


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries (or no user to run them as root): the PG tests must fail, not skip."""


class PostgresError(RuntimeError):
    """The cluster did not come up; the message carries the tail of its log."""


def find_pg_bin() -> Path:
    """The directory holding initdb and postgres: $CXR_PG_BIN, PATH, or Debian's /usr/lib/postgresql/N/bin."""
    override = os.environ.get("CXR_PG_BIN")
    candidates = [Path(override)] if override else []
    if not override:
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
        debian = Path("/usr/lib/postgresql").glob("*/bin")
        candidates += sorted(debian, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0), reverse=True)
    for c in candidates:
        if all(os.access(c / b, os.X_OK) for b in BINARIES):
            return c
    where = f"at CXR_PG_BIN={override}" if override else "on PATH or in /usr/lib/postgresql/*/bin"
    raise PostgresNotFoundError(f"PostgreSQL server binaries ({', '.join(BINARIES)}) not found {where}; "
                                "install Debian's server: apt-get install -y postgresql (.ci/run does so)")


def _run_as() -> str | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root, then Debian's `postgres`."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresNotFoundError("running as root, and PostgreSQL refuses root, but there is no `postgres` "
                                    "user to run it as (Debian's postgresql package creates one)") from None
    return "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One postmaster on 127.0.0.1 with a database `mlflow` owned by a password-protected role `cxr`."""

    def __init__(self, bindir: Path, database: str = "mlflow", user: str = "cxr") -> None:
        self.bindir, self.database, self.user = Path(bindir), database, user
        self.os_user = _run_as()
        self.password = secrets.token_urlsafe(18)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Not pytest's tmp_path: its parents are root-only (0700), which the `postgres` user cannot traverse.
        self.base = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self.startup_s: float | None = None
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    @property
    def uri(self) -> str:
        """SQLAlchemy URI with psycopg2, the driver MLflow picks for postgresql:// (and the one the docs use)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def connect(self, database: str | None = None) -> Any:
        """A psycopg2 connection as the `cxr` role (autocommit), for set-up and for tests that inspect the store."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database or self.database, connect_timeout=2)
        conn.autocommit = True
        return conn

    def _spawn(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        user = {"user": self.os_user, "group": self.os_user, "extra_groups": []} if self.os_user else {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(self.base)}
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                cwd=self.base, env=env, **user, **kw)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> PostgresServer:
        """initdb (first time), start the postmaster, create the database; returns once it accepts logins."""
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        try:
            if not self.data.exists():
                self._initdb()
            opts = [f"-c{k}={v}" for k, v in {**FAST, "port": self.port, "unix_socket_directories": self.base}.items()]
            self.proc = self._spawn([str(self.bindir / "postgres"), "-D", str(self.data), *opts],
                                    start_new_session=True)
            self._wait_ready(t0 + timeout_s)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _initdb(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        try:
            code = self._spawn([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-E", "UTF8",
                                "--locale=C", "--no-sync", "--auth-local=scram-sha-256",
                                "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]).wait(timeout=START_TIMEOUT_S)
        finally:
            pwfile.unlink(missing_ok=True)
        if code != 0:
            raise PostgresError(f"initdb exited with code {code}\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> None:
        import psycopg2

        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise PostgresError(f"postgres exited with code {code} during start-up\n{self.log_tail()}")
            try:
                conn = self.connect(database="postgres")
            except psycopg2.OperationalError as exc:  # not accepting connections yet
                last = exc
                time.sleep(0.1)
                continue
            with contextlib.closing(conn), conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.database}"')
            return
        raise PostgresError(f"PostgreSQL on 127.0.0.1:{self.port} not ready within the timeout (last error: "
                            f"{last})\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), then SIGKILL whatever of its process group lingers."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # backends outliving the postmaster, if any
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop and delete the data directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)
