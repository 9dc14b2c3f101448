"""Reading shards: which shards each worker reads, fetching them ahead over fsspec, verifying and framing them.

Only byte fetching is Python, because TF 2.21's tf.io.gfile has no s3:// and every object goes through
`cxr.storage` (local paths, file://, s3://). Each stream has a small thread pool fetching whole shard objects
`readahead` shards ahead of the one being consumed; each is checked against the manifest (size, sha256,
record count) and its TFRecord framing walked (uint64 length, uint32 masked crc, data, uint32 crc; the crcs
are not rechecked, the sha256 already guards every byte). A stream yields one element per shard: (blob,
starts, lengths, positions). Nothing is downloaded up front, so memory is bounded by
streams × (readahead + 2) × shard size, whatever the dataset size.

Sharding across workers. Eval: shard i (manifest order) goes to worker i % num_workers; with fewer shards
than workers every worker streams every shard and keeps record k (its position in the split) where
k % num_workers == worker_index (num_workers× the I/O, for small datasets only). Training pass p lays the
shards end to end in a (seed, epoch + p) permutation and cuts that run of records into num_workers contiguous
parts of equal length (±1): worker w reads part w, whole shards plus a piece of one at either end (a shard on
a boundary is fetched by both its workers: at most num_workers - 1 extra fetches a pass). Within a pass no
image is read twice, and every worker holds the same number of images, as the collective loop's equal step
counts need: an epoch of images // global batch steps leaves out fewer than one batch per worker (which
ones, the epoch's permutation and shuffle decide) and never wraps into the next pass. Whole shards per
worker could not balance: 78 shards on 4 workers, each epoch some workers repeated images, others left some out.

Corruption: a size or sha256 mismatch or broken framing raises CorruptShardError naming the shard; with
on_corrupt="skip" the shard is skipped instead, logged once and recorded in `Stats.skipped`. A missing object
is a configuration error, not corruption: it always raises (FileNotFoundError naming it).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from cxr import heap, storage
from cxr.data.manifest import Shard

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
ON_CORRUPT = ("raise", "skip")


class CorruptDataError(ValueError):
    """Bytes that cannot be trusted; the message names the object's URL."""


class CorruptShardError(CorruptDataError):
    """A shard whose size or sha256 does not match the manifest, or whose records cannot be framed."""


class CorruptImageError(CorruptDataError):
    """A raw image that cannot be decoded, or is refused by the image limits."""


def check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


@dataclass
class Stats:
    """Counters of one pipeline, updated by its reader threads; pass one in or read `dataset.stats`."""

    shards_read: int = 0
    images_read: int = 0
    bytes_read: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # URL → reason, for shards or raw images
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def read(self, shards_: int = 0, images: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.shards_read += shards_
            self.images_read += images
            self.bytes_read += nbytes

    def skip(self, url: str, reason: str) -> None:
        with self._lock:
            first = url not in self.skipped
            self.skipped[url] = reason
        if first:
            log.warning("skipping corrupt %s (on_corrupt='skip'): %s", url, reason)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int) -> Iterator[R]:
    """fn over items on `threads` threads, in input order, with at most `ahead` results beyond the current.

    Exceptions surface when their result is reached. Closing the generator cancels what has not started.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cxr-read")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Piece:
    """Records [lo, hi) of one shard (indices within the shard): what a worker reads of it in one pass."""

    shard: Shard
    lo: int
    hi: int


@dataclass(frozen=True)
class ShardAssignment:
    """Which shards, and which of their records, one worker reads in each pass."""

    shards: tuple[Shard, ...]
    worker: int
    workers: int
    training: bool = False
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker_index {self.worker} not in [0, num_workers={self.workers})")

    @property
    def by_record(self) -> bool:
        """Eval with fewer shards than workers: every worker streams every shard and keeps its records."""
        return not self.training and len(self.shards) < self.workers

    def streams(self, cycle_length: int) -> int:
        """Parallel shard streams; each gets ≥ 1 shard every pass. Record sharding uses one (small data)."""
        if self.by_record:
            return 1
        return max(1, min(cycle_length, len(self.shards) // self.workers))

    def span(self) -> tuple[int, int]:
        """Training: [start, stop) of this worker's run in a pass's sequence of records; lower ranks get the ±1."""
        q, r = divmod(sum(s.records for s in self.shards), self.workers)
        start = self.worker * q + min(self.worker, r)
        return start, start + q + (self.worker < r)

    def order(self, p: int) -> list[Piece]:
        """What this worker reads in pass p: manifest-order shards for eval, its run of a permutation in training."""
        if not self.training:
            mine = self.shards if self.by_record else self.shards[self.worker::self.workers]
            return [Piece(s, 0, s.records) for s in mine]
        perm = np.random.default_rng([self.seed, self.epoch + p]).permutation(len(self.shards))
        start, stop = self.span()
        pieces, at = [], 0
        for shard in (self.shards[i] for i in perm):
            lo, hi = max(start - at, 0), min(stop - at, shard.records)
            if lo < hi:
                pieces.append(Piece(shard, lo, hi))
            at += shard.records
        return pieces

    def images(self) -> int:
        """Images this worker reads per pass (the same every pass)."""
        if self.training:
            start, stop = self.span()
            return stop - start
        if self.by_record:
            return len(range(self.worker, sum(s.records for s in self.shards), self.workers))
        return sum(s.records for s in self.shards[self.worker::self.workers])

    def keep(self, positions: np.ndarray) -> np.ndarray:
        if not self.by_record:
            return np.ones(len(positions), dtype=bool)
        return positions % self.workers == self.worker


def frame_records(blob: bytes, url: str) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths of the records in a TFRecord file's bytes; raises on broken framing."""
    starts, lengths = [], []
    off, end = 0, len(blob)
    while off < end:
        if off + 12 > end:
            raise CorruptShardError(f"{url}: truncated record header at byte {off}")
        (length,) = struct.unpack_from("<Q", blob, off)
        if off + 12 + length + 4 > end:
            raise CorruptShardError(f"{url}: record at byte {off} claims {length} bytes, file ends at {end}")
        starts.append(off + 12)
        lengths.append(length)
        off += 12 + length + 4
    return np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


@dataclass
class Loaded:
    """A fetched, verified shard: its bytes and where each record starts and ends."""

    shard: Shard
    blob: bytes
    starts: np.ndarray
    lengths: np.ndarray


def fetch_shard(shard: Shard) -> Loaded:
    """Read one whole shard object and verify it against the manifest (size, sha256, framing, record count)."""
    blob = storage.read_bytes(shard.url)
    if len(blob) != shard.nbytes:
        raise CorruptShardError(f"{shard.url}: {len(blob)} bytes, manifest says {shard.nbytes} (truncated?)")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != shard.sha256:
        raise CorruptShardError(f"{shard.url}: sha256 {digest[:16]}… does not match manifest {shard.sha256[:16]}…")
    starts, lengths = frame_records(blob, shard.url)
    if len(starts) != shard.records:
        raise CorruptShardError(f"{shard.url}: {len(starts)} records, manifest says {shard.records}")
    return Loaded(shard, blob, starts, lengths)


def _fetch_or_skip(piece: Piece, on_corrupt: str, stats: Stats) -> tuple[Piece, Loaded | None]:
    shard = piece.shard
    if shard.url in stats.skipped:  # known bad from an earlier pass: don't fetch it again
        return piece, None
    if stats.shards_read % heap.TRIM_EVERY_SHARDS == 0:
        heap.release()
    try:
        loaded = fetch_shard(shard)
    except CorruptShardError as exc:
        if on_corrupt == "raise":
            raise
        stats.skip(shard.url, str(exc))
        return piece, None
    stats.read(shards_=1, nbytes=len(loaded.blob))
    return piece, loaded


def shard_stream(stream: int, p: int, plan: ShardAssignment, streams: int, readahead: int, on_corrupt: str,
                 stats: Stats) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
    """One interleave slot of pass p: pieces order(p)[stream::streams] as (blob, starts, lengths, positions)."""
    pieces = plan.order(int(p))[int(stream)::streams]
    fetched = ordered_map(lambda piece: _fetch_or_skip(piece, on_corrupt, stats), pieces, readahead, readahead)
    produced = 0
    for piece, loaded in fetched:
        if loaded is None:
            continue
        positions = loaded.shard.offset + np.arange(piece.lo, piece.hi, dtype=np.int64)
        keep = plan.keep(positions)
        produced += int(keep.sum())
        stats.read(images=int(keep.sum()))
        starts, lengths = loaded.starts[piece.lo:piece.hi], loaded.lengths[piece.lo:piece.hi]
        yield loaded.blob, starts[keep], lengths[keep], positions[keep]
    if plan.training:
        _check_pass(plan, int(p), produced, stats)


def split_patients(shards: list[Shard]) -> np.ndarray:
    """Each image's patient id, by position in the split (one read of the split's shards, verified)."""
    import tensorflow as tf

    out = np.zeros(sum(s.records for s in shards), np.int64)
    for loaded in ordered_map(fetch_shard, shards, 4, 4):
        records = tf.strings.substr(loaded.blob, loaded.starts, loaded.lengths)
        patients = tf.io.parse_example(records, {"patient": tf.io.FixedLenFeature([1], tf.int64)})["patient"]
        out[loaded.shard.offset:loaded.shard.offset + loaded.shard.records] = patients.numpy()[:, 0]
    return out


def split_images(shards: list[Shard]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Each image's name, labels (1, 0, -1 uncertain) and patient id by position in the split, as prepare stored
    them: what a table of predictions made elsewhere is joined on (`cxr.evaluation.tables`)."""
    import tensorflow as tf

    names: list[str] = [""] * sum(s.records for s in shards)
    labels: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(shards)
    patients = np.zeros(len(names), np.int64)
    for k, loaded in enumerate(ordered_map(fetch_shard, shards, 4, 4)):
        records = tf.strings.substr(loaded.blob, loaded.starts, loaded.lengths)
        parsed = tf.io.parse_example(records, {"image_index": tf.io.FixedLenFeature([1], tf.string),
                                               "labels": tf.io.VarLenFeature(tf.int64),
                                               "patient": tf.io.FixedLenFeature([1], tf.int64)})
        at = slice(loaded.shard.offset, loaded.shard.offset + loaded.shard.records)
        names[at] = [v.decode("utf-8", "replace") for v in parsed["image_index"].numpy()[:, 0]]
        labels[k] = tf.sparse.to_dense(parsed["labels"]).numpy().astype(np.float32)
        patients[at] = parsed["patient"].numpy()[:, 0]
    y = np.concatenate(labels) if shards else np.zeros((0, 0), np.float32)
    return names, y, patients


def split_attributes(shards: list[Shard]) -> dict[str, np.ndarray]:
    """Each image's sex, age and view by position in the split, as prepare stored them (what subgroups group by).

    Unknown stays unknown: "" for sex and view, NaN for age (stored as -1); a shard without the feature reads so.
    """
    import tensorflow as tf

    n = sum(s.records for s in shards)
    out = {"sex": np.full(n, "", dtype=object), "age": np.full(n, np.nan), "view": np.full(n, "", dtype=object)}
    spec = {"sex": tf.io.FixedLenFeature([1], tf.string, default_value=[b""]),
            "view": tf.io.FixedLenFeature([1], tf.string, default_value=[b""]),
            "age": tf.io.FixedLenFeature([1], tf.float32, default_value=[-1.0])}
    for loaded in ordered_map(fetch_shard, shards, 4, 4):
        records = tf.strings.substr(loaded.blob, loaded.starts, loaded.lengths)
        parsed = tf.io.parse_example(records, spec)
        at = slice(loaded.shard.offset, loaded.shard.offset + loaded.shard.records)
        for key in ("sex", "view"):
            out[key][at] = [v.decode("utf-8", "replace").strip() for v in parsed[key].numpy()[:, 0]]
        age = parsed["age"].numpy()[:, 0].astype(np.float64)
        out["age"][at] = np.where(age < 0, np.nan, age)
    return out


def _check_pass(plan: ShardAssignment, p: int, produced: int, stats: Stats) -> None:
    """A training pass that produced nothing would spin forever if every shard of this worker is unusable."""
    if produced == 0 and all(piece.shard.url in stats.skipped for piece in plan.order(p)):
        raise RuntimeError(f"worker {plan.worker}/{plan.workers}: every shard of the split is empty or skipped "
                           f"as corrupt ({stats.skipped_count} skipped); nothing to train on")
