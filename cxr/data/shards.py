"""The shard writer: each raw image decoded once, in parallel Ray tasks, into compact TFRecord shards.

Training reads every image every epoch and a 1024² PNG costs milliseconds to decode where a 256² JPEG or
bare pixels cost a fraction of one, so images are preprocessed once (`cxr.data.images`, the one path) and
stored as `OUT_URI/{split}/shard-NNNNN-of-NNNNN.tfrecord`. Each shard is committed atomically with a small
receipt in `OUT_URI/_parts/`; a re-run skips shards that have both, so a crashed job resumes where it
stopped. The manifest that later stages trust is `cxr.data.manifest`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxr import labels, storage
from cxr.data import images, metadata
from cxr.data.manifest import CODECS
from cxr.data.png import LIMITS, ImageLimits
from cxr.data.tabular import TabularDataset

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
PARTS = "_parts"


@dataclass(frozen=True)
class Params:
    """Everything that determines a shard's bytes; a resumed run must use the same."""

    size: int = 256
    codec: str = "jpeg"
    quality: int = JPEG_QUALITY
    images_per_shard: int = 1000
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def as_dict(self) -> dict:
        return {
            "size": self.size, "codec": self.codec, "quality": self.quality if self.codec == "jpeg" else None,
            "images_per_shard": self.images_per_shard, "seed": self.seed, "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction, "grayscale_bits": 8,
            "aspect": "box-average then bilinear resize of the long side to size, aspect kept; short side padded, "
                      "centred, black",
        }


def encode(gray: np.ndarray, codec: str, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(gray, mode="L")
    if codec == "jpeg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif codec == "png":
        im.save(buf, format="PNG", compress_level=6)
    elif codec == "uint8":
        return np.ascontiguousarray(gray, dtype=np.uint8).tobytes()
    else:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    return buf.getvalue()


def convert(data: bytes, size: int, codec: str, quality: int = JPEG_QUALITY, limits: ImageLimits = LIMITS) -> bytes:
    """Raw image file bytes → encoded `size`² 8-bit grayscale image bytes; ValueError as `images.decode`."""
    return encode(images.preprocess(data, size, limits), codec, quality)


def example(image: bytes, y: np.ndarray, row: dict) -> bytes:
    """A serialized tf.train.Example; features documented in docs/data.md."""
    import tensorflow as tf

    def b(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: list[int]) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    age = row["age"]
    feats = {
        "image": b(image),
        "labels": i([int(v) for v in y]),
        "image_index": b(row["image"].encode()),
        "patient": i([int(row["patient"])]),
        "view": b(str(row["view"]).encode()),
        "sex": b(str(row["sex"]).encode()),
        "age": tf.train.Feature(float_list=tf.train.FloatList(value=[-1.0 if np.isnan(age) else float(age)])),
    }
    # deterministic=True fixes the order of the feature map, so a re-run writes byte-identical shards.
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


@dataclass(frozen=True)
class ShardSpec:
    """One shard's planned rows (image, path, patient, view, sex, age, y: the labels 1 / 0 / -1 uncertain).

    `findings` is None for NIH, whose receipts stay as they were; a spec's label set otherwise.
    """

    split: str
    index: int
    total: int
    rows: tuple[dict, ...]
    findings: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.total:05d}.tfrecord"

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"

    def labels_sha256(self) -> str:
        """sha256 of the label set and every planned row's labels: a spec's receipt keeps it, so a re-run after
        the labels (CSV or spec) changed rewrites the shard instead of keeping stale labels."""
        h = hashlib.sha256("\0".join(self.findings or ()).encode())
        for row in self.rows:
            h.update(np.asarray(row["y"], dtype=np.int8).tobytes())
        return h.hexdigest()


def patient_key(patient: str) -> int:
    """A spec's patient id (text, e.g. "patient00001") as the stable int64 the shards and the bootstrap use."""
    return int.from_bytes(hashlib.sha256(patient.encode()).digest()[:8], "big") >> 1


def _records(ds: metadata.Dataset | TabularDataset, split: str) -> list[dict]:
    """A split's rows in table order, each with its label vector `y` (int8: 1, 0, -1 uncertain)."""
    cols = ["image", "path", "patient", "view", "sex", "age"]
    if isinstance(ds, metadata.Dataset):
        part = ds.split(split)
        y = part[list(labels.FINDINGS)].to_numpy(dtype=np.int8)
        records = part[cols].to_dict("records")
    else:
        mask = (ds.table["split"] == split).to_numpy()
        part = ds.table[mask]
        y = np.nan_to_num(ds.y[mask], nan=-1.0).astype(np.int8)
        records = part.assign(path=[storage.join(ds.root, i) for i in part["image"]],
                              patient=part["patient"].map({p: patient_key(p) for p in part["patient"].unique()}),
                              )[cols].to_dict("records")
    for record, v in zip(records, y, strict=True):  # a row of y: no Python int per label
        record["y"] = v
    return records


def plan(ds: metadata.Dataset | TabularDataset, params: Params) -> list[ShardSpec]:
    """Deterministic shard contents: each split's rows in a seeded order, cut into equal runs."""
    specs: list[ShardSpec] = []
    findings = None if isinstance(ds, metadata.Dataset) else tuple(ds.spec.labels.names)
    for split in metadata.SPLITS:
        part = _records(ds, split)
        order = np.random.default_rng([params.seed, metadata.SPLITS.index(split)]).permutation(len(part))
        records = [part[i] for i in order]
        total = max(1, -(-len(records) // params.images_per_shard)) if records else 0
        for k in range(total):
            chunk = records[k * params.images_per_shard:(k + 1) * params.images_per_shard]
            specs.append(ShardSpec(split, k, total, tuple(chunk), findings))
    return specs


def write_shard(spec: ShardSpec, out_uri: str, params: Params) -> dict:
    """Convert one shard's images and commit shard + receipt. Undecodable images are quarantined.

    Only what goes wrong with bytes already read is the image's fault. A storage error (after the retries
    and deadline of `cxr.storage`) or a vanished object fails the whole shard, naming object and shard, so
    the shard is retried or the run fails: a healthy image is never quarantined for a transport reason.
    """
    import tensorflow as tf

    t0 = time.perf_counter()
    context = f"shard {spec.key}"
    quarantined: list[dict] = []
    notes: list[dict] = []  # converted, but worth a look (a JPEG named .png)
    records = 0
    k = labels.NUM_FINDINGS if spec.findings is None else len(spec.findings)
    label_counts = np.zeros(k, dtype=np.int64)
    uncertain = np.zeros(k, dtype=np.int64)
    no_finding = 0
    patients: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, spec.name)
        with tf.io.TFRecordWriter(local) as writer:
            for row in spec.rows:
                data = storage.read_bytes(row["path"], context=context)  # raises: not the image's fault
                try:
                    image = convert(data, params.size, params.codec, params.quality)
                except Exception as exc:  # noqa: BLE001 - the bytes are in memory: any failure is this image's
                    quarantined.append({"image": row["image"], "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                if (note := images.content_mismatch(row["path"], data)) is not None:
                    notes.append({"image": row["image"], "note": note})
                y = np.array(row["y"], dtype=np.int64)
                writer.write(example(image, y, row))
                records += 1
                label_counts += y == 1
                uncertain += y < 0
                no_finding += int(not y.any())
                patients.add(int(row["patient"]))
        with open(local, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        nbytes = os.path.getsize(local)
        storage.upload(local, storage.join(out_uri, spec.split, spec.name), context=context)
    receipt = {
        "split": spec.split, "name": spec.name, "records": records, "sha256": digest, "bytes": nbytes,
        "images": [r["image"] for r in spec.rows if r["image"] not in {q["image"] for q in quarantined}],
        "patients": sorted(patients), "label_counts": label_counts.tolist(), "no_finding": no_finding,
        "quarantine": quarantined, "notes": notes,
        "params": params.as_dict(), "seconds": round(time.perf_counter() - t0, 3),
    }
    if spec.findings is not None:  # NIH's receipts keep their keys: its labels are never uncertain
        receipt["uncertain_counts"] = uncertain.tolist()
        receipt["labels_sha256"] = spec.labels_sha256()
    storage.write_text(_receipt_url(out_uri, spec), json.dumps(receipt), context=context)
    return receipt


def _receipt_url(out_uri: str, spec: ShardSpec) -> str:
    return storage.join(out_uri, PARTS, f"{spec.split}-{spec.name}.json")


def committed_receipt(out_uri: str, spec: ShardSpec, params: Params) -> dict | None:
    """A shard counts as done only when its receipt exists, matches `params`, holds the images now planned for
    it (new data changes the plan), and its object's bytes hash to the receipt's sha256: a same-size
    corruption is caught here, not at training. A mismatch is logged and the shard written again."""
    url = _receipt_url(out_uri, spec)
    if not storage.exists(url):
        return None
    receipt = json.loads(storage.read_text(url))
    if receipt.get("params") != params.as_dict():
        raise ValueError(
            f"{out_uri} holds shards prepared with other parameters ({receipt.get('params')}); "
            "prepare into a new OUT_URI or delete it first")
    shard = storage.join(out_uri, spec.split, spec.name)
    quarantined = {q["image"] for q in receipt.get("quarantine", ())}
    if receipt.get("images") != [r["image"] for r in spec.rows if r["image"] not in quarantined]:
        log.info("%s: the dataset changed since it was written (other images planned); writing it again", shard)
        return None
    if spec.findings is not None and receipt.get("labels_sha256") != spec.labels_sha256():
        log.info("%s: the labels changed since it was written; writing it again", shard)
        return None
    if not storage.exists(shard):
        log.warning("%s: receipt without its shard; writing the shard again", shard)
        return None
    nbytes = storage.size(shard)
    if nbytes != receipt["bytes"]:
        log.warning("%s: %d bytes, its receipt says %d; writing the shard again",
                    shard, nbytes, receipt["bytes"])
        return None
    digest = object_sha256(shard, nbytes)
    if digest != receipt["sha256"]:
        log.warning("%s: sha256 %s, its receipt says %s; writing the shard again",
                    shard, digest, receipt["sha256"])
        return None
    return receipt


HASH_CHUNK = 8 << 20  # resume hashes committed shards in ranges of this size: bounded memory per thread


def object_sha256(url: str, nbytes: int) -> str:
    """sha256 of an object's first `nbytes`, read in HASH_CHUNK ranges."""
    h = hashlib.sha256()
    for start in range(0, nbytes, HASH_CHUNK):
        h.update(storage.read_bytes(url, start, min(start + HASH_CHUNK, nbytes)))
    return h.hexdigest()
