"""The slot lease: at most one retraining round of a slot runs at a time, whoever starts the others.

Schedulers can start a slot twice (a RayCronJob replaying missed ticks, a hand-made round beside a scheduled
one, a KubeRay retry while the first attempt's driver still runs); two rounds of one slot would train, write
checkpoints to and register models from the same run at once. So a round first takes the slot's lease, a
small JSON object beside the runs (`<run.storage_path>/.leases/<run name>.json`), and keeps it fresh while it
works; a second round finds it held and stops with "slot S is already running".

What is guaranteed, per storage:
- local paths (one host, or a shared filesystem with working POSIX locks): every change is a compare-and-set
  under an exclusive `flock` of `<lease>.lock`, so two rounds can never both hold the lease;
- s3:// (AWS S3 and servers that implement conditional requests, e.g. SeaweedFS and MinIO): create is a PUT
  with `If-None-Match: *`, renewal and take-over are PUTs with `If-Match: <ETag>`, release a DELETE with
  `If-Match`; a server that ignores those headers gives no guarantee (the first acquire checks, and warns);
- other filesystems (gs://, ...): read-check-write, best effort, with a warning.

Stale leases: the holder renews every heartbeat (CXR_LEASE_HEARTBEAT_S, 60 s) and the lease expires TTL after
its last renewal (CXR_LEASE_TTL_S, 600 s). A lease is stale when it has expired, or at once when its holder
ran on this host and its process is gone. A lease not renewed for two of its heartbeats but not yet expired
(its holder may just have died: a KubeRay retry starts on a new cluster while the old driver's lease is still
fresh) is waited for: a renewal means the slot is running, expiry means it may be taken over. So a dead
holder delays the next round by at most the TTL and never blocks the schedule. A holder that cannot reach
storage for longer than the TTL may be overtaken; its next renewal then fails and it stops its round.
Expiry compares the holder's clock with the reader's: clocks must agree to well within TTL - heartbeat.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from cxr import storage
from cxr.redact import redact

log = logging.getLogger(__name__)

TTL_S = 600.0  # CXR_LEASE_TTL_S: a lease not renewed for this long is stale
HEARTBEAT_S = 60.0  # CXR_LEASE_HEARTBEAT_S: how often the holder renews it
ENV_TTL, ENV_HEARTBEAT = "CXR_LEASE_TTL_S", "CXR_LEASE_HEARTBEAT_S"
LEASE_DIR = ".leases"


class SlotBusy(RuntimeError):
    """Another live round holds the slot's lease."""


class LeaseLost(RuntimeError):
    """This round's lease was taken over (it could not renew it in time): it must stop."""


class _Conflict(Exception):
    """A compare-and-set found another version than the one expected."""


def lease_url(storage_path: str, run_name: str) -> str:
    return storage.join(storage_path, LEASE_DIR, f"{run_name}.json")


def _timing() -> tuple[float, float]:
    ttl, beat = storage.env_seconds(ENV_TTL, TTL_S), storage.env_seconds(ENV_HEARTBEAT, HEARTBEAT_S)
    if not beat * 2 < ttl:
        raise ValueError(f"{ENV_HEARTBEAT}={beat:g} must be below half of {ENV_TTL}={ttl:g}")
    return ttl, beat


class _PathStore:
    """A lease file on a filesystem: compare-and-set under flock (local), or read-check-write (others)."""

    def __init__(self, url: str) -> None:
        self.url, self.local = url, storage.is_local(url)
        if not self.local:
            log.warning("the slot lease at %s is best effort: this filesystem has no compare-and-set", url)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.local:
            yield
            return
        _, path = storage.filesystem(self.url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.url))
        except FileNotFoundError:
            return None

    def read(self) -> tuple[dict | None, str | None]:
        with self._locked():
            record = self._load()
        return record, record["token"] if record else None

    def put(self, record: dict, expect: str | None) -> str:
        with self._locked():
            current = self._load()
            if (current["token"] if current else None) != expect:
                raise _Conflict
            storage.write_text(self.url, json.dumps(record))
        return record["token"]

    def delete(self, expect: str) -> None:
        with self._locked():
            current = self._load()
            if current and current["token"] == expect:
                fs, path = storage.filesystem(self.url)
                storage.retry(self.url, lambda: fs.rm_file(path), "deleting")


def _is_conflict(exc: BaseException) -> bool:
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
        exc = exc.__cause__ or exc.__context__
    return False


class _S3Store:
    """A lease object on S3, changed only by conditional requests (the ETag is the version)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, path = storage.filesystem(url)
        self.bucket, self.key = path.split("/", 1)

    def _call(self, method: str, doing: str, **kwargs: Any) -> dict:
        def attempt() -> dict:
            try:
                return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
            except Exception as exc:
                if _is_conflict(exc):
                    raise _Conflict from None
                raise

        try:
            return storage.retry(self.url, attempt, doing)
        except storage.StorageError as exc:
            if isinstance(exc.__cause__, _Conflict):
                raise _Conflict from None
            raise

    def read(self) -> tuple[dict | None, str | None]:
        try:  # the ETag first: if the object changes before the body is read, a put with this ETag fails
            etag = self._call("head_object", "probing")["ETag"]
            return json.loads(storage.read_text(self.url)), etag
        except FileNotFoundError:
            return None, None

    def put(self, record: dict, expect: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        body = json.dumps(record).encode()
        return self._call("put_object", "writing", Body=body, ContentType="application/json", **condition)["ETag"]

    def delete(self, expect: str) -> None:
        with contextlib.suppress(_Conflict, FileNotFoundError):
            self._call("delete_object", "deleting", IfMatch=expect)

    def check_conditional(self, record: dict) -> None:
        """Warn if the server ignores If-None-Match: then the lease guarantees nothing."""
        try:
            self.put(record, None)
        except _Conflict:
            return
        log.warning("the S3 server behind %s ignores conditional writes (If-None-Match): the slot lease is best "
                    "effort there", redact(self.url))


def _alive_here(holder: dict) -> bool:
    """False only when the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError):
        return True
    return True


class SlotLease:
    """Take with acquire(), hold with `with lease:` (a heartbeat renews it), give back on leaving the block."""

    def __init__(self, url: str, slot: str) -> None:
        self.url, self.slot = url, slot
        self.ttl_s, self.heartbeat_s = _timing()
        self.store = _S3Store(url) if url.startswith(("s3://", "s3a://")) else _PathStore(url)
        self.token, self.version = uuid.uuid4().hex, None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"token": self.token, "slot": self.slot, "renewed_at": time.time(), "ttl_s": self.ttl_s,
                "heartbeat_s": self.heartbeat_s, "holder": {"host": socket.gethostname(), "pid": os.getpid()}}

    def _describe(self, record: dict, now: float) -> str:
        holder = record.get("holder", {})
        return (f"held by pid {holder.get('pid')} on {holder.get('host')}, renewed "
                f"{now - record['renewed_at']:.0f} s ago, stale after {record['ttl_s']:g} s without renewal")

    def _ours(self) -> bool:
        record, version = self.store.read()
        if record and record["token"] == self.token:  # our own write, whose answer was lost
            self.version = version
            return True
        return False

    def acquire(self) -> None:
        """Take the lease, taking over a stale one; raise SlotBusy if a live round holds it."""
        give_up = time.monotonic() + self.ttl_s + self.heartbeat_s
        first = True
        while True:
            record, version = self.store.read()
            now = time.time()
            try:
                if record is None:
                    self.version = self.store.put(self._record(), None)
                elif now - record["renewed_at"] > record["ttl_s"] or not _alive_here(record.get("holder", {})):
                    log.warning("slot %s: taking over a stale lease (%s)", self.slot, self._describe(record, now))
                    self.version = self.store.put(self._record(), version)
                elif (now - record["renewed_at"] < 2 * record.get("heartbeat_s", self.heartbeat_s)
                      or time.monotonic() > give_up):
                    raise SlotBusy(f"slot {self.slot} is already running ({self._describe(record, now)})")
                else:  # silent but not expired: its holder may be gone; wait for a renewal or for expiry
                    if first:
                        log.info("slot %s: its lease is silent (%s); waiting", self.slot, self._describe(record, now))
                    first = False
                    time.sleep(min(self.heartbeat_s, max(0.05, record["renewed_at"] + record["ttl_s"] - now)))
                    continue
            except _Conflict:
                if self._ours():
                    break
                continue  # someone else changed it meanwhile: look again
            break
        if isinstance(self.store, _S3Store) and record is None:
            self.store.check_conditional(self._record())

    def renew(self) -> None:
        try:
            self.version = self.store.put(self._record(), self.version)
        except _Conflict:
            if not self._ours():
                self.lost = True
                raise LeaseLost(f"slot {self.slot}: the lease was taken over by another round") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s: stopping this round", exc)
                _thread.interrupt_main()  # the round's main thread stops with KeyboardInterrupt
                return
            except Exception as exc:  # noqa: BLE001 - storage may come back before the lease expires
                log.warning("slot %s: could not renew the lease: %s", self.slot, redact(str(exc)))

    def __enter__(self) -> SlotLease:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.slot}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and self.version is not None:
            try:
                self.store.delete(self.version)
            except Exception as error:  # noqa: BLE001 - it expires anyway
                log.warning("slot %s: could not release the lease: %s", self.slot, redact(str(error)))
