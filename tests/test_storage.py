"""cxr.storage on local paths and against a real SeaweedFS S3 server with authentication on.

Checkpoints, metrics and datasets all go through cxr.storage, so these tests pin the contract the rest of
cxr relies on: round trips, atomic local writes, FileNotFoundError vs StorageError, bounded failure
during an outage, and credentials that only ever come from the environment and never leak.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fs import S3FileSystem
from s3server import S3Server

from cxr import storage
from cxr.storage import StorageError, StorageUnavailable

OUTAGE_BOUND_S = 5.0


@pytest.fixture(params=["local", "file", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty root to write under: a plain path, a file:// URL, or a prefix in the S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path / 'root'}"
    s3: S3Server = request.getfixturevalue("s3")
    return s3.url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def fresh_clients() -> Iterator[None]:
    """New S3FileSystem instances, so env changes made by a test (credentials, retries) take effect.

    fsspec caches filesystems by their options, and env credentials/retry settings are not among them.
    """
    S3FileSystem.clear_instance_cache()
    yield
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def fast_failure(monkeypatch: pytest.MonkeyPatch, fresh_clients: None) -> None:
    """Give up on an outage after 1 s, as a user would with CXR_STORAGE_DEADLINE_S, with short backoff.

    AWS_MAX_ATTEMPTS=1 as well: cxr.storage already turns botocore's own retry loop off, and this keeps it off
    even where botocore would read the variable.
    """
    monkeypatch.setenv(storage.ENV_DEADLINE, "1")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.05)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


@contextlib.contextmanager
def outage(s3: S3Server) -> Iterator[None]:
    """The server is down inside the block and up again (same ports and data) after it."""
    s3.stop()
    try:
        yield
    finally:
        s3.start()


def _secrets(s3: S3Server) -> tuple[str, str]:
    return s3.secret_key, s3.access_key


def _full_text(exc: BaseException) -> str:
    """Message plus the whole cause chain, as a log handler with exc_info would print it."""
    return "".join(traceback.format_exception(exc))


def _assert_no_credentials(s3: S3Server, *texts: str) -> None:
    for text in texts:
        for secret in _secrets(s3):
            assert secret not in text


# --- the fixture itself --------------------------------------------------------------------------------


def test_fixture_exposes_loopback_endpoint_and_env(s3: S3Server) -> None:
    assert s3.endpoint == f"http://127.0.0.1:{s3.port}"
    assert s3.url("a/b.bin") == f"s3://{s3.bucket}/a/b.bin"
    assert s3.env["AWS_REGION"] == "us-east-1"
    assert {k: os.environ.get(k) for k in s3.env} == s3.env
    assert "AWS_ENDPOINT_URL_S3" not in os.environ  # would override AWS_ENDPOINT_URL in cxr.storage


def test_server_requires_credentials(s3: S3Server) -> None:
    """Auth is on: an unsigned request to the bucket is refused."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as ei:
        opener.open(f"{s3.endpoint}/{s3.bucket}/", timeout=5)
    assert ei.value.code == 403


def test_server_talks_only_to_loopback(s3: S3Server) -> None:
    cmd = s3.command()
    assert "-master.telemetry=false" in cmd and "-ip.bind=127.0.0.1" in cmd
    assert s3.non_loopback_sockets() == []
    assert s3.foreign_addresses_in_log() == []
    _assert_no_credentials(s3, s3.log_text())


def test_env_is_enough_for_a_subprocess(s3: S3Server, tmp_path: Path) -> None:
    url = s3.url(f"sub-{uuid.uuid4().hex[:8]}.txt")
    storage.write_text(url, "from parent")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env
    code = "import sys; from cxr import storage; print(storage.read_text(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True,
                         timeout=30, check=True)
    assert out.stdout.strip() == "from parent"


# --- round trips on every backend ------------------------------------------------------------------------


def test_round_trip(base: str, tmp_path: Path) -> None:
    d = storage.join(base, "dir")
    a, b = storage.join(d, "a.bin"), storage.join(d, "b.txt")
    payload = bytes(range(256)) * 4

    storage.write_bytes(a, payload)
    storage.write_text(b, "héllo, ✓")
    assert storage.read_bytes(a) == payload
    assert storage.read_bytes(a, 10, 300) == payload[10:300]  # ranges: resume hashes shards in pieces
    assert storage.read_text(b) == "héllo, ✓"
    assert storage.exists(a) and storage.exists(d)
    assert not storage.exists(storage.join(d, "nope.bin"))
    assert storage.size(a) == len(payload)

    src = tmp_path / "upload-src.bin"
    src.write_bytes(os.urandom(100_000))
    c = storage.join(d, "sub", "c.bin")
    storage.upload(str(src), c)
    assert storage.read_bytes(c) == src.read_bytes()
    assert storage.size(c) == 100_000

    assert storage.listdir(d) == ["a.bin", "b.txt", "sub"]
    assert storage.listdir(storage.join(d, "sub")) == ["c.bin"]
    assert storage.listdir(storage.join(base, "missing")) == []

    storage.write_bytes(a, b"v2")  # overwrite
    assert storage.read_bytes(a) == b"v2"
    assert storage.size(a) == 2


def test_read_missing_raises_file_not_found_naming_url(base: str) -> None:
    url = storage.join(base, "no", "such.bin")
    with pytest.raises(FileNotFoundError) as ei:
        storage.read_bytes(url)
    assert url in str(ei.value)
    with pytest.raises(FileNotFoundError, match="no such object" if base.startswith("s3://") else "no such file"):
        storage.size(url)  # a local path is a file to its user, a bucket's key an object


# --- local atomicity ---------------------------------------------------------------------------------------


def test_local_write_bytes_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new bytes are staged complete in a sibling and renamed over the target: no torn reads."""
    target = tmp_path / "ckpt" / "weights.bin"
    storage.write_bytes(str(target), b"old")

    renames: list[tuple[str, str, bytes, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append((src, dst, Path(src).read_bytes(), Path(dst).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", spy)
    with open(target, "rb") as reader_of_old:
        storage.write_bytes(str(target), b"new" * 10_000)
        assert reader_of_old.read() == b"old"  # a new inode replaced it; the old one was never touched

    [(src, dst, staged, before)] = renames
    assert dst == str(target) and Path(src).parent == target.parent  # same directory: rename is atomic
    assert staged == b"new" * 10_000 and before == b"old"
    assert target.read_bytes() == b"new" * 10_000
    assert os.listdir(target.parent) == ["weights.bin"]


def test_local_upload_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    target = tmp_path / "out" / "model.keras"
    storage.upload(str(src), str(target))
    storage.upload(str(src), f"file://{target}")
    assert target.read_bytes() == b"payload"
    assert os.listdir(target.parent) == ["model.keras"]


def test_local_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()  # a directory where the file should go: os.replace fails
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"x")
    assert os.listdir(tmp_path) == ["ckpt"]


# --- credentials ----------------------------------------------------------------------------------------------


def test_urls_never_carry_credentials(s3: S3Server) -> None:
    url = s3.url("creds/x.bin")
    fs, path = storage.filesystem(url)
    produced = [url, storage.join(s3.url(""), "a", "b.bin"), path, fs.unstrip_protocol(path),
                repr(storage._storage_options(url))]
    _assert_no_credentials(s3, *produced)


def test_credentials_come_only_from_environment(s3: S3Server, monkeypatch: pytest.MonkeyPatch,
                                                fresh_clients: None) -> None:
    url = s3.url("creds/only-env.bin")
    storage.write_bytes(url, b"1")

    S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="PermissionError") as ei:
        storage.read_bytes(url)
    assert str(ei.value).startswith(url)
    _assert_no_credentials(s3, _full_text(ei.value))

    S3FileSystem.clear_instance_cache()
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StorageError):
        storage.read_bytes(url)


# --- outages ----------------------------------------------------------------------------------------------------


def test_outage_fails_bounded_names_object_hides_credentials_and_recovers(
        s3: S3Server, fast_failure: None, caplog: pytest.LogCaptureFixture) -> None:
    url = s3.url("outage/x.bin")
    storage.write_bytes(url, b"before")
    caplog.set_level(logging.DEBUG, logger="cxr")

    with outage(s3):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            storage.read_bytes(url)
        elapsed = time.monotonic() - t0
        with pytest.raises(StorageError):
            storage.write_bytes(s3.url("outage/y.bin"), b"during")

    assert elapsed < OUTAGE_BOUND_S
    assert isinstance(ei.value, StorageUnavailable)
    assert str(ei.value).startswith(f"storage did not answer within 1 s reading {url}: ")
    _assert_no_credentials(s3, _full_text(ei.value), caplog.text,
                           *(r.getMessage() for r in caplog.records))
    assert storage.read_bytes(url) == b"before"  # the same client recovers after the restart
    storage.write_bytes(s3.url("outage/y.bin"), b"after")
    assert storage.read_text(s3.url("outage/y.bin")) == "after"


def test_refused_connection_is_retried_and_logged_without_credentials(
        s3: S3Server, fast_failure: None, caplog: pytest.LogCaptureFixture) -> None:
    url = s3.url("outage/retried.bin")
    storage.write_bytes(url, b"x")
    caplog.set_level(logging.DEBUG, logger="cxr")
    with outage(s3), pytest.raises(StorageError) as ei:
        storage.read_bytes(url)
    _assert_no_credentials(s3, _full_text(ei.value), caplog.text)
    retries = [r for r in caplog.records if r.name == "cxr.storage" and "transient error" in r.getMessage()]
    assert retries
    assert all(url in r.getMessage() for r in retries)


RIDDEN_OUT_S = 4.0  # longer than the old fixed retry budget (4 retries, 3.75 s of backoff), well inside the deadline


def test_read_rides_out_an_outage_shorter_than_the_deadline(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A read issued while the server is down returns the object once it is back, within the deadline."""
    monkeypatch.delenv(storage.ENV_DEADLINE, raising=False)  # the default deadline
    url = s3.url("outage/ridden-out.bin")
    storage.write_bytes(url, b"kept")
    caplog.set_level(logging.WARNING, logger="cxr")
    s3.stop()
    restart = threading.Thread(target=lambda: (time.sleep(RIDDEN_OUT_S), s3.start()))
    restart.start()
    try:
        t0 = time.monotonic()
        data = storage.read_bytes(url)
        elapsed = time.monotonic() - t0
    finally:
        restart.join()
        s3.start()  # a no-op unless the thread failed: later tests need the server
    assert data == b"kept"
    assert elapsed >= RIDDEN_OUT_S
    assert any("transient error reading" in r.getMessage() and url in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "inf", "nan"])
def test_malformed_limit_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(storage.ENV_DEADLINE, value)
    with pytest.raises(ValueError, match=f"{storage.ENV_DEADLINE}='{value}'"):
        storage.limits()


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in storage.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert storage.limits() == storage.Limits(storage.CONNECT_TIMEOUT_S, storage.READ_TIMEOUT_S, storage.DEADLINE_S)
    monkeypatch.setenv(storage.ENV_READ_TIMEOUT, "1.5")
    assert storage.limits().read_timeout_s == 1.5
    opts = storage._storage_options("s3://bucket/x")["config_kwargs"]
    assert (opts["connect_timeout"], opts["read_timeout"]) == (storage.CONNECT_TIMEOUT_S, 1.5)


def test_listdir_of_bucket_root_during_outage_raises(s3: S3Server, fast_failure: None) -> None:
    storage.write_bytes(s3.url("root-listing.bin"), b"x")
    S3FileSystem.clear_instance_cache()  # a process that has not listed the bucket yet
    with outage(s3), pytest.raises(StorageError):
        storage.listdir(f"s3://{s3.bucket}")


def test_sees_objects_written_by_other_processes(s3: S3Server, fresh_clients: None) -> None:
    prefix = f"shared-{uuid.uuid4().hex[:8]}"
    url = s3.url(f"{prefix}/ckpt.bin")
    storage.write_bytes(url, b"abc")
    assert storage.listdir(s3.url(prefix)) == ["ckpt.bin"]  # fills s3fs's listings cache

    other = s3.client()  # another worker/process writing the same prefix
    other.put_object(Bucket=s3.bucket, Key=f"{prefix}/ckpt.bin", Body=b"abcdef")
    other.put_object(Bucket=s3.bucket, Key=f"{prefix}/DONE", Body=b"")
    assert storage.size(url) == 6
    assert storage.exists(s3.url(f"{prefix}/DONE"))


_FROZEN_OPS = textwrap.dedent("""
    import os, sys, time
    from cxr import storage
    url, local = sys.argv[1], sys.argv[2]
    for op, call in [("reading", lambda: storage.read_bytes(url)),
                     ("writing", lambda: storage.write_bytes(url + ".w", b"w" * 2000)),
                     ("writing", lambda: storage.upload(local, url + ".u"))]:
        t0 = time.monotonic()
        try:
            call()
            print(f"{op} 0 returned")
        except storage.StorageError as exc:
            print(f"{op} {time.monotonic() - t0:.2f} {exc}")
""")


def test_unresponsive_server_fails_bounded(s3: S3Server, tmp_path: Path) -> None:
    """A hung (not down) server: TCP connects, nothing answers. Run in a subprocess so a hang is killable.

    Reads, small PUTs and uploads each fail within the limits: a PUT body waits for a `100 Continue`
    that never comes, and the socket read timeout does not cover that wait.
    """
    url = s3.url("frozen/x.bin")
    storage.write_bytes(url, b"x")
    local = tmp_path / "two-mb.bin"
    local.write_bytes(os.urandom(2 << 20))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env
    env |= {storage.ENV_DEADLINE: "2", storage.ENV_READ_TIMEOUT: "1", storage.ENV_CONNECT_TIMEOUT: "1"}
    with s3.frozen():
        out = subprocess.run([sys.executable, "-c", _FROZEN_OPS, url, str(local)], env=env, capture_output=True,
                             text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout
    for line, target in zip(lines, [url, f"{url}.w", f"{url}.u"], strict=True):
        doing, elapsed, message = line.split(" ", 2)
        # the deadline (2 s) plus at most one attempt in flight: 1 s read timeout, or 1 s + 2 s for 2 MiB
        assert float(elapsed) < OUTAGE_BOUND_S, line
        assert message.startswith(f"storage did not answer within 2 s {doing} {target}: "), line
    assert "ReadTimeoutError" in lines[0]
    _assert_no_credentials(s3, out.stdout, out.stderr)
    assert storage.read_bytes(url) == b"x"  # thawed: service resumes
