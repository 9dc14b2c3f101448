"""Epoch coverage of shard-mode training: how many images an epoch's steps see once, never, twice.

Writes N tiny uint8 shard records (4x4 px, `--per-shard` per shard, the last one short) whose first label is
the image's split position, then runs the real training pipeline of each of W workers (augmentation off,
stored size) for images // (W x batch) batches, as the training loop takes an epoch, and counts positions.
No model, no decode cost: ~30 s for 77,900 images on 4 and 2 workers.

    PYTHONPATH=$PWD .venv/bin/python bench/epoch_coverage.py --images 77900 --workers 4 2
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import tempfile

import numpy as np
import tensorflow as tf

from cxr import labels
from cxr.data import augment, manifest, pipeline


def write(out: str, n: int, per_shard: int) -> None:
    """A manifest and shards of n records; record k's first label is k."""
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    entries, total = [], -(-n // per_shard)
    for k in range(total):
        name = f"shard-{k:05d}-of-{total:05d}.tfrecord"
        path = os.path.join(out, "train", name)
        ids = range(k * per_shard, min(n, (k + 1) * per_shard))
        with tf.io.TFRecordWriter(path) as writer:
            for i in ids:
                feats = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(16)])),
                         "labels": tf.train.Feature(int64_list=tf.train.Int64List(
                             value=[i] + [0] * (labels.NUM_FINDINGS - 1)))}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
        with open(path, "rb") as f:
            blob = f.read()
        entries.append({"name": name, "records": len(ids), "sha256": hashlib.sha256(blob).hexdigest(),
                        "bytes": len(blob)})
    data = {"format": manifest.FORMAT, "preprocessing": {"size": 4, "codec": "uint8"},
            "splits": {"train": {"images": n, "shards": entries}}}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(data, f)


def epoch_counts(out: str, n: int, workers: int, batch: int, epoch: int) -> collections.Counter:
    """How often each position is drawn in one epoch, over all workers."""
    steps = n // (batch * workers)
    seen: collections.Counter = collections.Counter()
    for w in range(workers):
        ds = pipeline.make_dataset(out, "train", batch, worker_index=w, num_workers=workers, training=True,
                                   epoch=epoch, image_size=4, augment=augment.OFF)
        for _, y in ds.repeat().take(steps):
            seen.update(y.numpy()[:, 0].astype(np.int64).tolist())
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=77_900)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        write(out, a.images, a.per_shard)
        for workers in a.workers:
            left_out = []
            for epoch in range(1, a.epochs + 1):
                seen = epoch_counts(out, a.images, workers, a.batch, epoch)
                left_out.append(set(range(a.images)) - set(seen))
                print(f"{a.images} images, {workers} workers, batch {a.batch}, epoch {epoch}: "
                      f"{len(seen) / a.images:.2%} seen, {a.images - len(seen)} never, "
                      f"{sum(c > 1 for c in seen.values())} twice or more")
            if len(left_out) > 1:
                print(f"  left out in both epoch 1 and 2: {len(left_out[0] & left_out[1])}")


if __name__ == "__main__":
    main()
