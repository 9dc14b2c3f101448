"""The input pipeline: a split's images → shuffled, augmented float32 batches, from shards or a raw root.

Read top to bottom (big_vision's shape), shard mode:

    shard streams ──interleave──> records ──shuffle──> decode ──batch──> augment / resize ──prefetch──>

uint8 shards swap decode and batch (their records are the pixels: a batch becomes a tensor in one op), and
raw mode replaces the first two steps with reading threads that decode and resize files (`cxr.data.raw`).
Everything after the records is one shared tail, so both modes give the same batches of the same images.

training=True: (images [B, S, S, 1] float32 in [0, 1], labels [B, K] float32), shuffled, augmented,
repeated forever, full batches only. training=False: (images, labels, index [B] int64) in a fixed order,
not augmented, the last partial batch kept, one pass; index is the image's position in the split.
Determinism: pass p reads in a (seed, epoch + p) order, the shuffle buffer is seeded by (seed, epoch,
worker) and batch n is augmented with stateless random numbers seeded by (seed, epoch, worker, n). Shard mode
shuffles within a pass: the buffer drains before the next pass starts, so the first images // batch_size
batches hold no image twice (a buffer spanning passes held back up to a buffer's worth of a pass at the end of
an epoch and put repeats from the next pass in their place). Errors
cross tf.data as errors (InvalidArgumentError/UnknownError carrying the message), never as a hang.
Labels: K findings (the manifest's, or the raw root's dataset spec's), 1 / 0 / -1 uncertain; `uncertain`
("ignore" keeps -1 for the loss and metrics to mask, "ones" / "zeros" replace it) applies in both modes.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from cxr import heap
from cxr.config import Augment
from cxr.data import augment as aug
from cxr.data import images, manifest, raw, roots
from cxr.data.reader import ShardAssignment, Stats, check_on_corrupt, shard_stream

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(manifest_uri: str, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
                 training: bool = False, seed: int = 0, epoch: int = 0, image_size: int = 224,
                 augment: Augment | None = None, on_corrupt: str = "raise", readahead: int = 2,
                 cycle_length: int = 2, shuffle_buffer: int = 4096, stats: Stats | None = None,
                 uncertain: str = "ignore", unit: bool = True) -> tf.data.Dataset:
    """Batches of a prepared split, streamed from `manifest_uri` (OUT_URI or its manifest.json; any fsspec URL).

    `cycle_length` shard streams run in parallel, each with `readahead` shards in flight. Counters (incl.
    shards skipped with on_corrupt="skip") go to `stats`, also reachable as the dataset's `.stats`.
    `unit=False` (evaluation only) stops before `augment.to_unit`: uint8 images at the stored size, a quarter
    of float32's bytes for a reader that hands them to another process, which applies `to_unit` itself.
    """
    check_on_corrupt(on_corrupt)
    check_uncertain(uncertain)
    m = manifest.load(manifest_uri)
    parse = _parser(len(m.findings))
    plan = ShardAssignment(tuple(m.shards(split)), worker_index, num_workers, training, seed, epoch)
    if training and plan.images() == 0:
        raise ValueError(f"worker {worker_index}/{num_workers} has no images of split {split!r} to train on")
    stats = stats if stats is not None else Stats()
    streams = plan.streams(cycle_length)
    signature = (tf.TensorSpec([], tf.string), *(tf.TensorSpec([None], tf.int64),) * 3)

    buffer = min(shuffle_buffer, plan.images())  # a pass never fills more

    def stream(s: tf.Tensor, p: tf.Tensor) -> tf.data.Dataset:
        gen = tf.data.Dataset.from_generator(
            lambda i, q: shard_stream(i, q, plan, streams, readahead, on_corrupt, stats), args=(s, p),
            output_signature=signature)
        return gen.map(parse).unbatch()

    def one_pass(p: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.Dataset.range(streams).interleave(
            lambda s: stream(s, p), cycle_length=streams, block_length=16, num_parallel_calls=streams,
            deterministic=True)
        if training and buffer > 1:
            records = records.shuffle(buffer, seed=aug.seed_of(seed, epoch, worker_index, 1))
        return records

    passes = tf.data.Dataset.counter() if training else tf.data.Dataset.range(1)
    decode, per_batch = _decoder(m.codec, m.size)
    ds = _tail(passes.flat_map(one_pass), decode, per_batch, batch_size, training, image_size, augment, seed, epoch,
               worker_index, uncertain, unit)
    ds.stats = stats
    return ds


def make_raw_dataset(data_root: str, split: str, batch_size: int, worker_index: int = 0, num_workers: int = 1,
                     training: bool = False, seed: int = 0, epoch: int = 0, image_size: int = 224,
                     augment: Augment | None = None, on_corrupt: str = "raise", readahead: int = 64,
                     io_threads: int = 8, raw_size: int = 256, split_seed: int = 0, val_fraction: float = 0.1,
                     test_fraction: float = 0.2, stats: Stats | None = None, dataset: str = "nih",
                     uncertain: str = "ignore", unit: bool = True) -> tf.data.Dataset:
    """The same batches as `make_dataset`, straight from a dataset root's image files (no prepare step).

    Rows and indices follow `cxr prepare`'s order for the same split_seed/val_fraction/test_fraction, so
    index k here is index k there. Workers take rows k % num_workers == worker_index. `io_threads` read and
    preprocess files to `raw_size`² (prepare's --size) with `readahead` images in flight. Training shuffles
    by permuting the file list. `dataset`: how the root is read (`cxr.data.roots`), as prepare's --dataset.
    """
    check_on_corrupt(on_corrupt)
    check_uncertain(uncertain)
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} not in [0, num_workers={num_workers})")
    heap.keep_top()
    images.warm_up()  # compile the kernels here, not in the first reading threads
    rows = [(url, y, k) for k, (url, y) in enumerate(raw.split_rows(data_root, split, split_seed, val_fraction,
                                                                   test_fraction, dataset))][worker_index::num_workers]
    if training and not rows:
        raise ValueError(f"worker {worker_index}/{num_workers} has no images of split {split!r} to train on")
    stats = stats if stats is not None else Stats()
    signature = (tf.TensorSpec([None, raw_size, raw_size, 1], tf.uint8),
                 tf.TensorSpec([None, len(roots.findings(dataset))], tf.float32), tf.TensorSpec([None], tf.int64))
    records = tf.data.Dataset.from_generator(
        lambda: raw.stream(rows, training, seed, epoch, raw_size, io_threads, readahead, on_corrupt, stats),
        output_signature=signature).unbatch()
    ds = _tail(records, lambda batch: batch, True, batch_size, training, image_size, augment, seed, epoch,
               worker_index, uncertain, unit)  # the reading threads decoded them
    ds.stats = stats
    return ds


def _tail(records: tf.data.Dataset, decode: Callable[[tf.Tensor], tf.Tensor], per_batch: bool, batch_size: int,
          training: bool, image_size: int, augment: Augment | None, seed: int, epoch: int,
          worker: int, uncertain: str = "ignore", unit: bool = True) -> tf.data.Dataset:
    """Everything after "records as (encoded image, labels, index)": the same for shard and raw modes.

    `decode` maps one encoded image to uint8 [S, S, 1]; with per_batch, a batch of them to [B, S, S, 1].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if training and not unit:
        raise ValueError("unit=False is for evaluation: training batches are augmented in float32")
    augment = augment or Augment()
    ds = records
    if per_batch:
        ds = ds.batch(batch_size, drop_remainder=training)
        ds = ds.map(lambda image, y, index: (decode(image), y, index))
    else:
        ds = ds.map(lambda image, y, index: (decode(image), y, index), num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=training)  # fused with the map: beats parallel batching
    if uncertain != "ignore":
        ds = ds.map(lambda x, y, index: (x, apply_uncertain(y, uncertain), index))
    if training:
        key = aug.seed_of(seed, epoch, worker, 2)
        ds = ds.enumerate().map(lambda step, b: (aug.augment_batch(b[0], step, key, augment, image_size), b[1]),
                                num_parallel_calls=AUTOTUNE)
    elif unit:
        ds = ds.map(lambda x, y, index: (aug.to_unit(x, image_size), y, index), num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return ds.prefetch(AUTOTUNE).with_options(options)


UNCERTAIN = ("ignore", "ones", "zeros")


def check_uncertain(policy: str) -> None:
    if policy not in UNCERTAIN:
        raise ValueError(f"uncertain must be one of {UNCERTAIN}, got {policy!r}")


def apply_uncertain(y: tf.Tensor, policy: str) -> tf.Tensor:
    """Labels [B, K] with uncertain (-1) made 1 (ones) or 0 (zeros); ignore keeps -1 for the loss to mask."""
    if policy == "ignore":
        return y
    return tf.where(y < 0, tf.constant(1.0 if policy == "ones" else 0.0, y.dtype), y)


def _parser(k: int) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """Records → (image bytes, labels float32 [K], position) for a manifest of K findings."""
    def parse(blob: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor,
              positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        records = tf.strings.substr(blob, starts, lengths)
        feats = tf.io.parse_example(records, {
            "image": tf.io.FixedLenFeature([], tf.string),
            "labels": tf.io.FixedLenFeature([k], tf.int64),
        })
        return feats["image"], tf.cast(feats["labels"], tf.float32), positions

    return parse


def _decoder(codec: str, size: int) -> tuple[Callable[[tf.Tensor], tf.Tensor], bool]:
    """(decode, per_batch): one image's decoder for jpeg/png; for uint8 a whole batch's (the bytes are the pixels)."""
    if codec == "uint8":
        def decode_batch(encoded: tf.Tensor) -> tf.Tensor:
            check = tf.debugging.assert_equal(tf.strings.length(encoded), size * size, message=(
                f"a uint8 shard record is not {size}×{size} bytes: the shards do not match manifest size {size}"))
            with tf.control_dependencies([check]):
                return tf.reshape(tf.io.decode_raw(encoded, tf.uint8), [-1, size, size, 1])

        return decode_batch, True

    def decode(image: tf.Tensor) -> tf.Tensor:
        if codec == "jpeg":  # TF's default IDCT is the fast, inexact one; accurate matches PIL/libjpeg
            img = tf.io.decode_jpeg(image, channels=1, dct_method="INTEGER_ACCURATE")
        else:
            img = tf.io.decode_png(image, channels=1)
        return tf.ensure_shape(img, [size, size, 1])

    return decode, False
