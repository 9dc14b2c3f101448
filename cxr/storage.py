"""Every path cxr takes is an fsspec URL: a local path, file://, s3:// (s3fs), gs:// where gcsfs is installed.

TF 2.21's tf.io.gfile has no s3://, so all object-storage I/O goes through here. S3 endpoint and
credentials come only from the standard AWS environment variables; they are never part of a URL we
log or record. Transient errors are retried with bounded backoff, then raised naming the object.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = 4
BACKOFF_S = 0.25


class StorageError(OSError):
    """An object could not be read or written after retries; the message names it."""


def _storage_options(url: str) -> dict[str, Any]:
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it."""
    return url_to_fs(url, **_storage_options(url))


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
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def retry(what: str, fn: Callable[[], T], retries: int = RETRIES) -> T:
    """Call fn, retrying transient I/O errors with exponential backoff; then fail naming `what`."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{what}: no such object") from exc
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _transient(exc) or attempt == retries:
                raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc
            delay = BACKOFF_S * 2**attempt
            log.warning("transient error on %s (attempt %d/%d), retrying in %.2fs: %s",
                        what, attempt + 1, retries + 1, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retry(url, lambda: fs.cat_file(path))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(url, lambda: fs.exists(path))


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(url, lambda: fs.isdir(path))


def listdir(url: str) -> list[str]:
    """Base names of the entries directly under `url` ([] if it does not exist)."""
    fs, path = filesystem(url)
    if not retry(url, lambda: fs.exists(path)):
        return []
    entries = retry(url, lambda: fs.ls(path, detail=False, refresh=True))
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(retry(url, lambda: fs.size(path)))


def write_bytes(url: str, data: bytes) -> None:
    """Write an object so that readers see all of it or none of it.

    Local files go to a temporary sibling and are renamed into place; object stores publish a PUT
    atomically, so the object is written directly.
    """
    fs, path = filesystem(url)
    if is_local(url):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    retry(url, lambda: fs.pipe_file(path, data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def upload(local_path: str, url: str) -> None:
    """Copy a finished local file to `url`, atomically as in `write_bytes`."""
    fs, path = filesystem(url)
    if is_local(url):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        fs.put_file(local_path, tmp)
        os.replace(tmp, path)
        return
    retry(url, lambda: fs.put_file(local_path, path))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(path, exist_ok=True)


def redact(url: str) -> str:
    """Drop any user:password@ part of a URL before it is logged or recorded."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return url
