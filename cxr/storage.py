"""Every path cxr takes is an fsspec URL: a local path, file://, s3:// (s3fs), gs:// where gcsfs is installed.

TF 2.21's tf.io.gfile has no s3://, so all object-storage I/O goes through here. S3 endpoint and
credentials come only from the standard AWS environment variables; they are never part of a URL we
log or record. Transient errors (refused, reset, timed out) are retried with capped exponential backoff
until a deadline per operation, then raised as StorageUnavailable naming the object; the timeouts and the
deadline are set by CXR_STORAGE_* environment variables (see `limits`).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError

from cxr.redact import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

# Defaults of the limits below; each can be set per process with its environment variable (seconds).
CONNECT_TIMEOUT_S = 5.0  # CXR_STORAGE_CONNECT_TIMEOUT_S: a TCP/TLS connect that takes longer is a failed attempt
READ_TIMEOUT_S = 20.0  # CXR_STORAGE_READ_TIMEOUT_S: per socket read, not per transfer, so big objects are fine
DEADLINE_S = 60.0  # CXR_STORAGE_DEADLINE_S: how long one operation keeps retrying before it fails
BACKOFF_S = 0.25  # first wait between attempts; doubles up to MAX_BACKOFF_S
MAX_BACKOFF_S = 4.0
WRITE_RATE_FLOOR = 1 << 20  # bytes/s: a write attempt slower than this on top of the read timeout is cut
ENV_CONNECT_TIMEOUT = "CXR_STORAGE_CONNECT_TIMEOUT_S"
ENV_READ_TIMEOUT = "CXR_STORAGE_READ_TIMEOUT_S"
ENV_DEADLINE = "CXR_STORAGE_DEADLINE_S"
ENV_VARS = (ENV_CONNECT_TIMEOUT, ENV_READ_TIMEOUT, ENV_DEADLINE)

try:  # the S3 client's own error types for a refused, reset or garbled connection
    from aiohttp import ClientConnectionError, ClientPayloadError
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from botocore.parsers import ResponseParserError

    _S3_TRANSIENT: tuple[type[BaseException], ...] = (
        _BotoConnectionError, HTTPClientError, ResponseParserError, ClientConnectionError, ClientPayloadError)
except ImportError:  # pragma: no cover - s3fs is a dependency
    _S3_TRANSIENT = ()


class StorageError(OSError):
    """An object could not be read or written after retries; the message names it."""


class StorageUnavailable(StorageError):
    """Storage kept failing transiently (refused, reset, timed out) until the deadline: worth retrying later."""


@dataclass(frozen=True)
class Limits:
    """How long storage may take: per connect, per socket read, and per operation over all its attempts."""

    connect_timeout_s: float
    read_timeout_s: float
    deadline_s: float


def env_seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds from the environment variable `name`, else `default`."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return float(default)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={text!r} must be a positive, finite number of seconds")
    return value


def limits() -> Limits:
    """The limits in force, read from the environment on every call so child processes and tests can set them."""
    return Limits(env_seconds(ENV_CONNECT_TIMEOUT, CONNECT_TIMEOUT_S), env_seconds(ENV_READ_TIMEOUT, READ_TIMEOUT_S),
                  env_seconds(ENV_DEADLINE, DEADLINE_S))


def _storage_options(url: str) -> dict[str, Any]:
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    lim = limits()
    # One retry loop (ours, below), bounded timeouts, and no listing cache: other writers must be seen.
    opts: dict[str, Any] = {
        "use_listings_cache": False,
        "config_kwargs": {"connect_timeout": lim.connect_timeout_s, "read_timeout": lim.read_timeout_s,
                          "retries": {"mode": "standard", "total_max_attempts": 1}},
    }
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it."""
    fs, path = url_to_fs(url, **_storage_options(url))
    if hasattr(fs, "retries"):  # s3fs: a class attribute, not a constructor option
        fs.retries = 1
    return fs, path


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/' (object stores have no os.sep)."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(url, *parts)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError, http.client.HTTPException, *_S3_TRANSIENT))


def retry(what: str, fn: Callable[[], T], doing: str = "accessing", context: str = "") -> T:
    """Call fn until it succeeds, fails for good, or the deadline passes; then raise naming `what`.

    The deadline bounds the retrying, not a transfer: an attempt already running is bounded by the socket
    timeouts (and a write by `_bounded_write`), so a large object on a slow link still arrives while a
    dead or hung server fails.
    """
    deadline = limits().deadline_s
    what = redact(what)  # a presigned URL's signature must not reach a log or an error message
    where = f" ({context})" if context else ""
    t0 = time.monotonic()
    for attempt in itertools.count(1):
        try:
            return fn()
        except FileNotFoundError as exc:  # a local path is a file to its user; a bucket's key an object
            kind = "file" if "://" not in what or what.startswith("file://") else "object"
            raise FileNotFoundError(f"{what}: no such {kind}{where}") from exc
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _transient(exc):
                raise StorageError(redact(f"{what}: {type(exc).__name__}: {exc}{where}")) from exc
            elapsed = time.monotonic() - t0
            if elapsed >= deadline:
                attempts = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                raise StorageUnavailable(redact(
                    f"storage did not answer within {deadline:g} s {doing} {what}{where}: {attempts} in "
                    f"{elapsed:.1f} s, the last: {type(exc).__name__}: {exc} ({ENV_DEADLINE} sets the limit)"
                )) from exc
            # capped so that the last attempt starts at the deadline, not after it
            delay = min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S, deadline - elapsed)
            log.warning("transient error %s %s%s (attempt %d, %.1f s of %g), retrying in %.2fs: %s",
                        doing, what, where, attempt, elapsed, deadline, delay, redact(str(exc)))
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, start: int | None = None, end: int | None = None, context: str = "") -> bytes:
    """The object's bytes, or bytes [start, end) of it; `context` (e.g. the shard being written) goes into errors."""
    fs, path = filesystem(url)
    return retry(url, lambda: fs.cat_file(path, start=start, end=end), "reading", context)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def exists(url: str) -> bool:
    fs, path = filesystem(url)

    def probe() -> bool:  # fs.exists() swallows every error on a bucket root; info() does not
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True

    return retry(url, probe, "probing")


def listdir(url: str) -> list[str]:
    """Base names of the entries directly under `url` ([] if it does not exist)."""
    fs, path = filesystem(url)
    try:
        entries = retry(url, lambda: fs.ls(path, detail=False, refresh=True), "listing")
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(retry(url, lambda: fs.size(path), "probing"))


def write_bytes(url: str, data: bytes, context: str = "") -> None:
    """Write an object so that readers see all of it or none of it.

    Local files go to a temporary sibling and are renamed into place; object stores publish a PUT
    atomically, so the object is written directly.
    """
    fs, path = filesystem(url)
    if is_local(url):
        _replace_local(path, lambda tmp: _write_file(tmp, data))
        return
    retry(url, lambda: _bounded_write(fs, len(data), fs.pipe_file, path, data), "writing", context)


def write_text(url: str, text: str, context: str = "") -> None:
    write_bytes(url, text.encode("utf-8"), context)


def download(url: str, local_path: str, context: str = "") -> None:
    """Copy an object to a local file (read whole: weight files and checkpoints, not datasets)."""
    data = read_bytes(url, context=context)
    with open(local_path, "wb") as fh:
        fh.write(data)


def upload(local_path: str, url: str, context: str = "") -> None:
    """Copy a finished local file to `url`, atomically as in `write_bytes`."""
    fs, path = filesystem(url)
    if is_local(url):
        _replace_local(path, lambda tmp: fs.put_file(local_path, tmp))
        return
    nbytes = os.path.getsize(local_path)
    retry(url, lambda: _bounded_write(fs, nbytes, fs.put_file, local_path, path), "writing", context)


def _bounded_write(fs: fsspec.AbstractFileSystem, nbytes: int, put: Callable[..., Any], *args: Any) -> None:
    """One write attempt, cut after the read timeout plus 1 s per WRITE_RATE_FLOOR bytes.

    The socket read timeout does not cover writes: aiohttp arms it only once the request body is sent,
    and a hung server never sends the `100 Continue` botocore asks for before a PUT body, nor drains a
    full send buffer. fsspec's per-call timeout (async filesystems only) bounds the whole attempt.
    """
    if not getattr(fs, "async_impl", False):
        put(*args)
        return
    timeout = limits().read_timeout_s + nbytes / WRITE_RATE_FLOOR
    try:
        put(*args, timeout=timeout)
    except FSTimeoutError as exc:
        raise TimeoutError(f"writing {nbytes:,} bytes did not finish within {timeout:.1f} s") from exc


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


TEMP_PREFIX = ".tmp-"  # local atomic writes fill `.tmp-<uuid>-<name>` beside the target, then rename


def _replace_local(path: str, fill: Callable[[str], None]) -> None:
    """Fill a temporary sibling of `path`, then rename it into place; never leave the temporary behind."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def remove_partial_writes(url: str) -> list[str]:
    """Delete the temporaries of atomic writes a killed process left under a local `url`; their paths.

    Only a SIGKILL leaves them (the writer removes its own otherwise); object stores never expose a
    partial object, so there is nothing to do for them.
    """
    if not is_local(url):
        return []
    _, root = filesystem(url)
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed
