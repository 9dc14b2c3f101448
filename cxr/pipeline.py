"""The input pipeline: prepared shards (or raw PNGs) → shuffled, augmented float32 batches; one path for both.

Shape of the pipeline (big_vision style, read top to bottom in `make_dataset`):

    shard streams ──interleave──> records ──shuffle──> decode ──batch──> augment / resize ──prefetch──>

(uint8 shards swap decode and batch: their records are the pixels, so a batch becomes a tensor in one op.)

Reading. Only byte fetching is Python, because TF 2.21's tf.io.gfile has no s3:// and every object goes
through `cxr.storage` (fsspec: local paths, file://, s3://). Each stream has its own small thread pool that
fetches whole shard objects `readahead` shards ahead of the one being consumed, checks size and sha256
against the manifest, and walks the TFRecord framing (uint64 length, uint32 masked crc, data, uint32 crc;
the crcs are not rechecked, the sha256 already guards every byte). A stream yields one element per shard,
(blob, starts, lengths, positions); tf.strings.substr cuts the records out and tf.io.parse_example parses
them as one batch, both in C++. Nothing is downloaded up front, so peak memory is bounded by
streams × (readahead + 2) × shard size + the shuffle buffer + prefetched batches, whatever the dataset size.

Sharding across workers. Shard i of the (per-pass) shard order goes to worker i % num_workers, so each
image is read once per pass across workers. With fewer shards than workers every worker streams every
shard and keeps record k (its position in the split) where k % num_workers == worker_index; that costs
num_workers× the I/O and exists for small datasets only.

Order and determinism. Eval reads one pass in a fixed order (the worker's shards in manifest order, dealt
round-robin to the streams, whose records are interleaved deterministically); index = the image's position
in the split (shard offset + record position), the last partial batch is kept, nothing is augmented.
Training reads pass p in a shard order permuted by (seed, epoch + p) and repeats forever;
records pass a shuffle buffer seeded by (seed, epoch, worker) and batch n is augmented with stateless random
numbers seeded by (seed, epoch, worker, n), so the same (seed, epoch, worker) gives the same batches.

Corruption. A size or sha256 mismatch or broken framing raises CorruptShardError naming the shard URL
(raw mode: a PNG with a bad chunk CRC or no IEND raises CorruptImageError naming the file); with
on_corrupt="skip" the shard (image) is skipped instead, logged once and recorded in `Stats.skipped`. A
missing object is a configuration error, not corruption: it always raises (FileNotFoundError naming it).
Errors cross tf.data as errors (InvalidArgumentError/UnknownError carrying the message), never as a hang.

Augmentation (training only): rotation, scale, translation and optional horizontal flip as one affine map
per image, plus brightness/contrast jitter, applied to a whole batch in one call. The default kernel is an
XLA-compiled bilinear gather that computes the same transform as tf.raw_ops.ImageProjectiveTransformV3
(kernel="tf") at ~1/3 of its CPU cost (0.3-0.4 vs 1.1-1.3 ms per 224² image on this machine's cores), which
is most of the difference between feeding one H200 from two cores or not. The warp also does the resize
from the stored size, so training images are resampled once.

Raw mode (`make_raw_dataset`) feeds the same tail from a dataset root's PNGs: a thread pool reads files,
checks and decodes them (`cxr.png`: chunk CRCs, libdeflate, a numba unfilter) and box-filters them to
`raw_size` (like `cxr prepare --size`), mostly outside the GIL and with errors naming the file; batching and
augmentation are shared with shard mode, as for uint8 shards.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import tensorflow as tf

from cxr import labels, metadata, png, shards, storage

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

AUTOTUNE = tf.data.AUTOTUNE
ON_CORRUPT = ("raise", "skip")
RAW_CHUNK = 32  # raw images per generator element: amortises the Python→TF hand-off


class CorruptDataError(ValueError):
    """Bytes that cannot be trusted; the message names the object's URL."""


class CorruptShardError(CorruptDataError):
    """A shard whose size or sha256 does not match the manifest, or whose records cannot be framed."""


class CorruptImageError(CorruptDataError):
    """A raw image that is not a complete, intact PNG."""


@dataclass(frozen=True)
class Augment:
    """Training augmentation. Ranges are symmetric around identity; flips are off because the heart is on the left.

    kernel "xla" (default) is a fused bilinear gather; "tf" is tf.raw_ops.ImageProjectiveTransformV3, the
    same transform at ~3× the CPU cost (kept as the reference, and a fallback where XLA is unavailable).
    """

    rotate_deg: float = 7.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05  # fraction of the image side
    brightness: float = 0.1  # additive, fraction of full range
    contrast: float = 0.1  # gain in [1 - c, 1 + c] around each image's mean
    hflip: bool = False
    kernel: str = "xla"

    @classmethod
    def off(cls) -> Augment:
        """Identity augmentation: training images are then exactly eval images (but shuffled)."""
        return cls(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0)


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


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Shard:
    url: str
    offset: int  # position of the shard's first record in the split
    records: int
    sha256: str
    nbytes: int


def _manifest_url(manifest_uri: str) -> str:
    """Accept OUT_URI or OUT_URI/manifest.json."""
    return manifest_uri if manifest_uri.endswith(".json") else storage.join(manifest_uri, shards.MANIFEST)


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "://" in url else os.path.dirname(url)


def load_manifest(manifest_uri: str) -> dict:
    url = _manifest_url(manifest_uri)
    manifest = json.loads(storage.read_text(url))
    if manifest.get("format") != shards.FORMAT:
        raise ValueError(f"{url}: format {manifest.get('format')!r}, expected {shards.FORMAT!r}")
    return manifest


def split_shards(manifest: dict, manifest_uri: str, split: str) -> list[Shard]:
    """The split's shards in manifest order, each with the split position of its first record."""
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    base = _parent(_manifest_url(manifest_uri))
    out, offset = [], 0
    for s in manifest["splits"][split]["shards"]:
        out.append(Shard(storage.join(base, split, s["name"]), offset, s["records"], s["sha256"], s["bytes"]))
        offset += s["records"]
    return out


def split_size(manifest_uri: str, split: str, worker_index: int = 0, num_workers: int = 1) -> int:
    """Images in `split`; with num_workers > 1, the images that worker reads per pass (see sharding above)."""
    shards_ = tuple(split_shards(load_manifest(manifest_uri), manifest_uri, split))
    return _Plan(shards_, worker_index, num_workers).images()


# ---------------------------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class _Plan:
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
        return len(self.shards) < self.workers

    def streams(self, cycle_length: int) -> int:
        """Parallel shard streams; each gets ≥ 1 shard every pass. Record sharding uses one (small data)."""
        if self.by_record:
            return 1
        return max(1, min(cycle_length, len(self.shards) // self.workers))

    def passes(self) -> Iterable[int]:
        return itertools.count() if self.training else (0,)

    def order(self, p: int) -> list[Shard]:
        """This worker's shards in pass p: manifest order for eval, a (seed, epoch + p) permutation for training."""
        order = list(self.shards)
        if self.training:
            perm = np.random.default_rng([self.seed, self.epoch + p]).permutation(len(order))
            order = [order[i] for i in perm]
        return order if self.by_record else order[self.worker::self.workers]

    def images(self) -> int:
        """Images this worker reads per pass (the same every pass in eval; in training ± one shard)."""
        if self.by_record:
            return len(range(self.worker, sum(s.records for s in self.shards), self.workers))
        return sum(s.records for s in self.shards[self.worker::self.workers])

    def keep(self, positions: np.ndarray) -> np.ndarray:
        if not self.by_record:
            return np.ones(len(positions), dtype=bool)
        return positions % self.workers == self.worker


# ---------------------------------------------------------------------------------------------- reading


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
class _Loaded:
    shard: Shard
    blob: bytes
    starts: np.ndarray
    lengths: np.ndarray


def fetch_shard(shard: Shard) -> _Loaded:
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
    return _Loaded(shard, blob, starts, lengths)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_LIBC = _load_libc()


TRIM_EVERY_SHARDS = 8


def release_free_heap() -> None:
    """Give freed heap back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Shard-sized blocks are allocated and freed by many threads; glibc keeps what each thread frees in that
    thread's arena, so without this RSS creeps up with the shards read (+130 MB over 120 shards measured).
    Called every TRIM_EVERY_SHARDS shards, not every shard: each trim also hands back the free pages that
    the next batches would reuse, and faulting them in again cost 5-12% of the CPU per image on uint8 shards
    over S3 (A/B runs); every 8th shard costs +35-75 MB of peak RSS, flat over 2,000 batches (256 shards).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_heap_top(nbytes: int = 16 << 20) -> None:
    """Have glibc keep `nbytes` of free memory at the top of each heap instead of handing it back at once.

    Raw mode allocates and frees ~1 MB image buffers for every decode, in several threads; without this each
    decode faults in fresh zeroed pages: 1.3-1.5 ms of kernel time per 1024² image measured, 0.1-0.2 with it.
    Process-wide (mallopt M_TOP_PAD), bounded per heap; a no-op elsewhere than glibc.
    """
    if _LIBC is not None:
        _LIBC.mallopt(-2, nbytes)  # -2: M_TOP_PAD


def _fetch_or_skip(item: tuple[int, Shard], on_corrupt: str, stats: Stats) -> tuple[int, _Loaded | None]:
    p, shard = item
    if shard.url in stats.skipped:  # known bad from an earlier pass: don't fetch it again
        return p, None
    if stats.shards_read % TRIM_EVERY_SHARDS == 0:
        release_free_heap()
    try:
        loaded = fetch_shard(shard)
    except CorruptShardError as exc:
        if on_corrupt == "raise":
            raise
        stats.skip(shard.url, str(exc))
        return p, None
    stats.read(shards_=1, nbytes=len(loaded.blob))
    return p, loaded


def _shard_stream(stream: int, plan: _Plan, streams: int, readahead: int, on_corrupt: str,
                  stats: Stats) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
    """One interleave slot: shards order(p)[stream::streams] of every pass, as (blob, starts, lengths, positions)."""
    items = ((p, s) for p in plan.passes() for s in plan.order(p)[int(stream)::streams])
    fetched = ordered_map(lambda it: _fetch_or_skip(it, on_corrupt, stats), items, readahead, readahead)
    current, produced = 0, 0
    for p, loaded in fetched:
        if p != current:
            _check_pass(plan, current, produced, stats)
            current, produced = p, 0
        if loaded is None:
            continue
        positions = loaded.shard.offset + np.arange(len(loaded.starts), dtype=np.int64)
        keep = plan.keep(positions)
        produced += int(keep.sum())
        stats.read(images=int(keep.sum()))
        yield loaded.blob, loaded.starts[keep], loaded.lengths[keep], positions[keep]


def _check_pass(plan: _Plan, p: int, produced: int, stats: Stats) -> None:
    """A training pass that produced nothing would spin forever if every shard of this worker is unusable."""
    if produced == 0 and all(s.records == 0 or s.url in stats.skipped for s in plan.order(p)):
        raise RuntimeError(f"worker {plan.worker}/{plan.workers}: every shard of the split is empty or skipped "
                           f"as corrupt ({stats.skipped_count} skipped); nothing to train on")


# ---------------------------------------------------------------------------------------------- augmentation


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def affine_transforms(u: tf.Tensor, aug: Augment, in_size: int, out_size: int) -> tf.Tensor:
    """Per-image [B, 8] ImageProjectiveTransform matrices (output pixel → input pixel) from uniforms u ∈ [-1, 1).

    The inverse map is input = c_in + (r / scale) · F · R(-θ) · (output + ½ - c_out - t) - ½ with r the
    input/output size ratio, so the identity augmentation is exactly a half-pixel bilinear resize.
    """
    theta = u[:, 0] * (aug.rotate_deg * math.pi / 180.0)
    lo, hi = aug.scale
    k = (in_size / out_size) / (lo + (u[:, 1] + 1.0) * 0.5 * (hi - lo))
    tx, ty = u[:, 2] * (aug.translate * out_size), u[:, 3] * (aug.translate * out_size)
    flip = tf.where(u[:, 6] < 0.0, -1.0, 1.0) if aug.hflip else tf.ones_like(theta)
    cos, sin = tf.cos(theta), tf.sin(theta)
    a00, a01, a10, a11 = k * flip * cos, k * flip * sin, -k * sin, k * cos
    dx, dy = 0.5 - out_size / 2 - tx, 0.5 - out_size / 2 - ty
    a02 = a00 * dx + a01 * dy + in_size / 2 - 0.5
    a12 = a10 * dx + a11 * dy + in_size / 2 - 0.5
    zero = tf.zeros_like(theta)
    return tf.stack([a00, a01, a02, a10, a11, a12, zero, zero], axis=1)


def _photometric(x: tf.Tensor, mean: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """Contrast around `mean` ([B]), then brightness; x in [0, 1] of shape [B, H, W, 1]."""
    mean = mean[:, None, None, None]
    x = (x - mean) * gain[:, None, None, None] + mean + bias[:, None, None, None]
    return tf.clip_by_value(x, 0.0, 1.0)


def _source_mean(images: tf.Tensor) -> tf.Tensor:
    """Each uint8 source image's mean in [0, 1], the contrast pivot.

    Taken from the source, not the warped output, so that XLA does not fuse the warp into a reduction
    (which recomputes the gathers); outside XLA, whose CPU reductions are ~2.5× slower than TF's, and over
    every pixel, which measured half the cost of a strided subsample (0.03 vs 0.06 ms per 256² image).
    """
    return tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2, 3]) / 255.0


@tf.function(jit_compile=True)
def _warp_padded(padded: tf.Tensor, transforms: tf.Tensor, mean: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor,
                 size: int) -> tf.Tensor:
    """The warp and jitter proper, on a source with a zero border of 1 px top/left and 2 px bottom/right.

    Sample points are clamped into the border, so every out-of-image neighbour reads a zero and the four
    gathers need no bounds masks. Static shapes (training batches) become constants, which XLA likes.
    """
    n, h, w = (d if d is not None else tf.shape(padded)[i] for i, d in enumerate(padded.shape))
    flat = tf.reshape(padded, [-1])
    grid = tf.range(size, dtype=tf.float32)
    x, y = grid[None, None, :], grid[None, :, None]
    t = transforms[:, :, None, None]
    xs = tf.clip_by_value(t[:, 0] * x + t[:, 1] * y + t[:, 2] + 1.0, 0.0, tf.cast(w - 2, tf.float32))
    ys = tf.clip_by_value(t[:, 3] * x + t[:, 4] * y + t[:, 5] + 1.0, 0.0, tf.cast(h - 2, tf.float32))
    x0, y0 = tf.floor(xs), tf.floor(ys)
    fx, fy = xs - x0, ys - y0
    i00 = (tf.range(n) * (h * w))[:, None, None] + tf.cast(y0, tf.int32) * w + tf.cast(x0, tf.int32)

    def pixel(index: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.gather(flat, index), tf.float32)

    top = pixel(i00) * (1.0 - fx) + pixel(i00 + 1) * fx
    bottom = pixel(i00 + w) * (1.0 - fx) + pixel(i00 + w + 1) * fx
    out = (top * (1.0 - fy) + bottom * fy)[..., None] / 255.0
    return _photometric(out, mean, gain, bias)


def warp_bilinear(images: tf.Tensor, transforms: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor,
                  size: int) -> tf.Tensor:
    """uint8 [B, H, W, 1] → float32 [B, size, size, 1] in [0, 1]: the projective warp, black fill, then jitter.

    Same result as ImageProjectiveTransformV3(BILINEAR, CONSTANT 0) at ~1/3 of its CPU time. The border is
    padded outside XLA: inside, the pad would be re-evaluated by every gather.
    """
    padded = tf.pad(images[..., 0], [[0, 0], [1, 2], [1, 2]])
    return _warp_padded(padded, transforms, _source_mean(images), gain, bias, size)


def augment_batch(images: tf.Tensor, step: tf.Tensor, key: int, aug: Augment, size: int) -> tf.Tensor:
    """One batch: uint8 [B, S0, S0, 1] → augmented float32 [B, size, size, 1], seeded by (key, step)."""
    u = tf.random.stateless_uniform([tf.shape(images)[0], 7], seed=tf.stack([tf.constant(key, tf.int64), step]),
                                    minval=-1.0, maxval=1.0)
    transforms = affine_transforms(u, aug, images.shape[1], size)
    gain, bias = 1.0 + aug.contrast * u[:, 5], aug.brightness * u[:, 4]
    if aug.kernel == "xla":
        return warp_bilinear(images, transforms, gain, bias, size)
    if aug.kernel != "tf":
        raise ValueError(f"Augment.kernel must be 'xla' or 'tf', got {aug.kernel!r}")
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32) / 255.0, transforms=transforms, output_shape=[size, size],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return _photometric(out, _source_mean(images), gain, bias)


def to_unit(images: tf.Tensor, size: int) -> tf.Tensor:
    """Eval: uint8 → float32 in [0, 1], half-pixel bilinear resize only when the size differs."""
    x = tf.cast(images, tf.float32) / 255.0
    return x if images.shape[1] == size else tf.image.resize(x, [size, size], method="bilinear")


# ---------------------------------------------------------------------------------------------- shared tail


@dataclass(frozen=True)
class _Tail:
    """Everything after 'records as (encoded image, labels, index)': identical for shard and raw modes."""

    batch_size: int
    training: bool
    image_size: int
    augment: Augment
    shuffle_buffer: int
    shuffle_seed: int
    augment_key: int

    def apply(self, ds: tf.data.Dataset, decode: Callable[[tf.Tensor], tf.Tensor],
              per_batch: bool = False) -> tf.data.Dataset:
        """`decode` maps one encoded image to uint8 [S, S, 1]; with per_batch, a batch of them to [B, S, S, 1]."""
        if self.training and self.shuffle_buffer > 1:
            ds = ds.shuffle(self.shuffle_buffer, seed=self.shuffle_seed)
        if per_batch:
            ds = ds.batch(self.batch_size, drop_remainder=self.training)
            ds = ds.map(lambda image, y, index: (decode(image), y, index))
        else:
            ds = ds.map(lambda image, y, index: (decode(image), y, index), num_parallel_calls=AUTOTUNE)
            ds = ds.batch(self.batch_size, drop_remainder=self.training)  # fused with the map: beats parallel
        if self.training:
            ds = ds.enumerate().map(
                lambda step, b: (augment_batch(b[0], step, self.augment_key, self.augment, self.image_size), b[1]),
                num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda x, y, index: (to_unit(x, self.image_size), y, index), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(_options())


def _tail(batch_size: int, training: bool, image_size: int, augment: Augment | None, shuffle_buffer: int,
          seed: int, epoch: int, worker: int) -> _Tail:
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return _Tail(batch_size, training, image_size, augment or Augment(), shuffle_buffer,
                 _seed(seed, epoch, worker, 1), _seed(seed, epoch, worker, 2))


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.autotune.enabled = True
    return opts


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


# ---------------------------------------------------------------------------------------------- shard mode


def _parse(blob: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor,
           positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    records = tf.strings.substr(blob, starts, lengths)
    feats = tf.io.parse_example(records, {
        "image": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.FixedLenFeature([labels.NUM_FINDINGS], tf.int64),
    })
    return feats["image"], tf.cast(feats["labels"], tf.float32), positions


def _decoder(codec: str, size: int) -> tuple[Callable[[tf.Tensor], tf.Tensor], bool]:
    """(decode, per_batch): one image's decoder for jpeg/png; for uint8 a whole batch's (the bytes are the pixels)."""
    if codec not in shards.CODECS:
        raise ValueError(f"manifest codec {codec!r} is not one of {shards.CODECS}")
    if codec == "uint8":
        def decode_batch(images: tf.Tensor) -> tf.Tensor:
            check = tf.debugging.assert_equal(tf.strings.length(images), size * size, message=(
                f"a uint8 shard record is not {size}×{size} bytes: the shards do not match manifest size {size}"))
            with tf.control_dependencies([check]):
                return tf.reshape(tf.io.decode_raw(images, tf.uint8), [-1, size, size, 1])

        return decode_batch, True

    def decode(image: tf.Tensor) -> tf.Tensor:
        if codec == "jpeg":  # TF's default IDCT is the fast, inexact one; accurate matches PIL/libjpeg
            img = tf.io.decode_jpeg(image, channels=1, dct_method="INTEGER_ACCURATE")
        else:
            img = tf.io.decode_png(image, channels=1)
        return tf.ensure_shape(img, [size, size, 1])

    return decode, False


def make_dataset(manifest_uri: str, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
                 training: bool = False, seed: int = 0, epoch: int = 0, image_size: int = 224,
                 augment: Augment | None = None, on_corrupt: str = "raise", readahead: int = 2,
                 cycle_length: int = 2, shuffle_buffer: int = 4096, stats: Stats | None = None) -> tf.data.Dataset:
    """Batches of a prepared split, streamed from `manifest_uri` (OUT_URI or its manifest.json; any fsspec URL).

    training=True: (images [B, S, S, 1] float32 in [0, 1], labels [B, 14] float32), shuffled, augmented
    (`augment`, default Augment()), repeated forever, full batches only. training=False: (images, labels,
    index [B] int64), a fixed order, no augmentation, last partial batch kept, one pass. `cycle_length`
    shard streams run in parallel, each with `readahead` shards in flight. Counters (incl. shards skipped
    with on_corrupt="skip") go to `stats`, also reachable as the returned dataset's `.stats`.
    """
    _check_on_corrupt(on_corrupt)
    manifest = load_manifest(manifest_uri)
    plan = _Plan(tuple(split_shards(manifest, manifest_uri, split)), worker_index, num_workers, training, seed, epoch)
    if training and plan.images() == 0:
        raise ValueError(f"worker {worker_index}/{num_workers} has no images of split {split!r} to train on")
    stats = stats if stats is not None else Stats()
    streams = plan.streams(cycle_length)
    signature = (tf.TensorSpec([], tf.string), *(tf.TensorSpec([None], tf.int64),) * 3)

    def stream(s: tf.Tensor) -> tf.data.Dataset:
        gen = tf.data.Dataset.from_generator(
            lambda i: _shard_stream(i, plan, streams, readahead, on_corrupt, stats),
            args=(s,), output_signature=signature)
        return gen.map(_parse).unbatch()

    records = tf.data.Dataset.range(streams).interleave(
        stream, cycle_length=streams, block_length=16, num_parallel_calls=streams, deterministic=True)
    pre = manifest["preprocessing"]
    buffer = min(shuffle_buffer, plan.images())  # more would only mix passes
    tail = _tail(batch_size, training, image_size, augment, buffer, seed, epoch, worker_index)
    decode, per_batch = _decoder(pre["codec"], int(pre["size"]))
    ds = tail.apply(records, decode, per_batch=per_batch)
    ds.stats = stats
    return ds


# ---------------------------------------------------------------------------------------------- raw mode


@functools.cache
def _rounded_means(f: int) -> np.ndarray:
    """uint8 of every possible f×f block sum's float32 mean, rounded half to even (TF's and numpy's rint)."""
    return np.rint(np.arange(255 * f * f + 1, dtype=np.float32) / np.float32(f * f)).astype(np.uint8)


def shrink(image: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 [s, s] → [size, size]: box average by f = ⌊s/size⌋ (alias-free, cheap), then bilinear.

    For NIH's 1024² and size 256 it is an exact 4×4 box filter and the resize is skipped. The sums are exact
    integers, the mean is float32 and rounds half to even: the same pixels as TF ops would give.
    """
    from cxr import kernels  # numba: imported only in raw mode

    f = max(image.shape[0] // size, 1)
    m = image.shape[0] // f
    image = np.ascontiguousarray(image)
    if m == size:
        return kernels.box_means(image, f, _rounded_means(f), np.empty((m, m), np.uint8))
    wide = np.uint16 if f <= 16 else np.uint32  # f² · 255 fits
    sums = kernels.box_sums(image, f, np.empty((m, m), wide))
    mean = sums.astype(np.float32) / np.float32(f * f)
    mean = tf.image.resize(mean[..., None], [size, size], method="bilinear").numpy()[..., 0]
    return np.rint(mean).astype(np.uint8)


def read_raw_image(url: str, size: int, limits: png.ImageLimits = png.LIMITS) -> tuple[np.ndarray, int]:
    """A raw PNG as uint8 [size, size], checked (errors name the file), and the file's size in bytes.

    Square 8-bit grayscale images (NIH's) are box-filtered; any other (16-bit, colour, palette, non-square)
    is converted exactly as `cxr prepare` converts it. Every decoding failure, including an image beyond
    `limits` (refused from its header, before any allocation), is a CorruptImageError naming the file.
    """
    data = storage.read_bytes(url)
    try:
        image = png.parse(data, limits)
        gray = shards.decode_png(image, data)  # parsed once
    except ValueError as exc:  # cxr.png and shards.decode say what is wrong
        raise CorruptImageError(f"{url}: {exc}") from exc
    if image.gray8 and image.width == image.height:
        return shrink(gray, size), len(data)
    return shards.square_resize(gray, size), len(data)


def raw_rows(data_root: str, split: str, split_seed: int = 0, val_fraction: float = 0.1,
             test_fraction: float = 0.2) -> list[tuple[str, np.ndarray]]:
    """(url, labels) of a split in position order: the order `cxr prepare` with the same seed writes shards in."""
    if split not in metadata.SPLITS:
        raise ValueError(f"split must be one of {metadata.SPLITS}, got {split!r}")
    ds = metadata.load(data_root, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
    if not ds.images_present:
        raise FileNotFoundError(f"{data_root}: no images/ or images_0NN/images/ folder")
    params = shards.Params(seed=split_seed, images_per_shard=max(1, len(ds.table)))
    rows = next((spec.rows for spec in shards.plan(ds, params) if spec.split == split), ())
    return [(r["path"], np.array([r[f] for f in labels.FINDINGS], dtype=np.float32)) for r in rows]


def _read_or_skip(item: tuple[str, np.ndarray, int], size: int, on_corrupt: str,
                  stats: Stats) -> tuple[np.ndarray | None, np.ndarray, int]:
    url, y, index = item
    if url in stats.skipped:  # known bad from an earlier pass
        return None, y, index
    try:
        image, nbytes = read_raw_image(url, size)
    except CorruptImageError as exc:
        if on_corrupt == "raise":
            raise
        stats.skip(url, str(exc))
        return None, y, index
    stats.read(images=1, nbytes=nbytes)
    return image, y, index


def _raw_stream(rows: list[tuple[str, np.ndarray, int]], training: bool, seed: int, epoch: int, size: int,
                threads: int, ahead: int, on_corrupt: str,
                stats: Stats) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This worker's images, pass after pass (training: each pass a (seed, epoch + p) permutation), in chunks."""
    def items() -> Iterator[tuple[str, np.ndarray, int]]:
        for p in itertools.count() if training else (0,):
            order = np.random.default_rng([seed, epoch + p]).permutation(len(rows)) if training else range(len(rows))
            for i in order:
                yield rows[i]
            if training and all(url in stats.skipped for url, _, _ in rows):
                raise RuntimeError(f"every image of this worker was skipped as corrupt ({stats.skipped_count})")

    chunk: list[tuple[np.ndarray, np.ndarray, int]] = []
    for image, y, index in ordered_map(lambda it: _read_or_skip(it, size, on_corrupt, stats), items(), threads,
                                       ahead):
        if image is not None:
            chunk.append((image, y, index))
        if len(chunk) == RAW_CHUNK:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.stack([c[0] for c in chunk])[..., None], np.stack([c[1] for c in chunk]),
            np.array([c[2] for c in chunk], dtype=np.int64))


def _warm_up() -> None:
    """Compile (or load from numba's cache) raw mode's kernels now, not in the first reading threads."""
    png.warm_up()
    shrink(np.zeros((2, 2), np.uint8), 2)


def make_raw_dataset(data_root: str, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
                     training: bool = False, seed: int = 0, epoch: int = 0, image_size: int = 224,
                     augment: Augment | None = None, on_corrupt: str = "raise", readahead: int = 64,
                     io_threads: int = 8, raw_size: int = 256, split_seed: int = 0, val_fraction: float = 0.1,
                     test_fraction: float = 0.2, stats: Stats | None = None) -> tf.data.Dataset:
    """The same batches as `make_dataset`, straight from a dataset root's PNGs (no prepare step; small data).

    Rows and indices follow `cxr prepare`'s order for the same split_seed/val_fraction/test_fraction, so
    index k here is index k there. Workers take rows k % num_workers == worker_index. `io_threads` read,
    decode and box-filter files to `raw_size`² (prepare's --size) with `readahead` images in flight, before
    the shared batch/augment tail. Training shuffles by permuting the file list.
    """
    _check_on_corrupt(on_corrupt)
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} not in [0, num_workers={num_workers})")
    keep_heap_top()
    _warm_up()
    rows = [(url, y, k) for k, (url, y) in enumerate(raw_rows(data_root, split, split_seed, val_fraction,
                                                             test_fraction))][worker_index::num_workers]
    if training and not rows:
        raise ValueError(f"worker {worker_index}/{num_workers} has no images of split {split!r} to train on")
    stats = stats if stats is not None else Stats()
    signature = (tf.TensorSpec([None, raw_size, raw_size, 1], tf.uint8),
                 tf.TensorSpec([None, labels.NUM_FINDINGS], tf.float32), tf.TensorSpec([None], tf.int64))
    records = tf.data.Dataset.from_generator(
        lambda: _raw_stream(rows, training, seed, epoch, raw_size, io_threads, readahead, on_corrupt, stats),
        output_signature=signature).unbatch()
    tail = _tail(batch_size, training, image_size, augment, 0, seed, epoch, worker_index)
    ds = tail.apply(records, lambda images: images, per_batch=True)  # the reading threads decoded them
    ds.stats = stats
    return ds


