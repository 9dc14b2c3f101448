"""The shard stage: decode each raw image once, in parallel Ray tasks, into compact TFRecord shards.

A 1024² NIH PNG costs ~4.4 ms to decode on one core with libpng (~3 with `cxr.png`), a 256² JPEG 0.13 ms;
training reads every image every epoch, so images are converted once to
`OUT_URI/{split}/shard-NNNNN-of-NNNNN.tfrecord` and a `manifest.json` that later stages trust. Each shard
is committed atomically with a small receipt in `OUT_URI/_parts/`; a re-run skips shards that have both, so
a crashed job resumes where it stopped.

Image handling (the same for every source): every image's header is checked against `png.ImageLimits`
before it is decoded (dimensions, pixel count, aspect ratio), so a few hundred bytes cannot claim gigabytes;
beyond them it is `ImageRejected` (a ValueError). 16-bit images are rescaled linearly from their bit depth
(the smallest power of two above the maximum value) to 8 bits; RGB(A), LA and palette images become 8-bit
luma (alpha dropped: NIH's RGBA images are opaque), converted a strip of rows at a time so no full-size
temporary is made. Images are resized with Lanczos filtering so the long side is `size`, aspect kept, and a
non-square one is then padded, centred, with black (the radiograph background) to `size`²: anatomy is never
stretched or cropped, and no full-resolution square canvas is ever allocated.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr import labels, metadata, png, storage
from cxr.png import LIMITS, ImageLimits, ImageRejected

log = logging.getLogger(__name__)

FORMAT = "cxr-shards/1"
CODECS = ("jpeg", "png", "uint8")  # uint8: the pixels themselves, row-major, no header
JPEG_QUALITY = 95
MANIFEST = "manifest.json"
PARTS = "_parts"
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel: rescaled, not converted
STRIP_PIXELS = 1 << 18  # to_gray8 converts this many pixels at a time: its temporaries stay ~1-2 MB


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
            "aspect": "Lanczos resize of the long side to size, aspect kept; short side padded, centred, black",
        }


def _strips(im: Image.Image) -> Iterator[tuple[int, int, Image.Image]]:
    """(first row, end row, that strip of `im`) covering the image, STRIP_PIXELS at a time."""
    width, height = im.size
    step = max(1, STRIP_PIXELS // width)
    if step >= height:
        yield 0, height, im
        return
    for top in range(0, height, step):
        yield top, min(top + step, height), im.crop((0, top, width, min(top + step, height)))


def _rescale_table(full: float) -> np.ndarray:
    """uint8 [65536]: `_rescale` of every 16-bit value, so a 16-bit image costs one lookup per pixel."""
    return _rescale(np.arange(1 << 16, dtype=np.float64), full)


def _rescale(values: np.ndarray, full: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)


def _luma(strip: Image.Image) -> np.ndarray:
    """One strip of an 8-bit-per-channel image → uint8 luma (per-pixel conversions: strips give the whole's)."""
    if strip.mode == "PA":
        strip = strip.convert("RGBA")  # then RGBA → L, which is RGB → L: Pillow's luma ignores alpha
    elif strip.mode == "LA":
        strip = strip.getchannel("L")
    return np.asarray(strip if strip.mode == "L" else strip.convert("L"), dtype=np.uint8)


def to_gray8(im: Image.Image) -> np.ndarray:
    """Any PIL image → 8-bit grayscale array, converting modes explicitly (see module docstring).

    A strip at a time: besides Pillow's decoded image and the result, memory stays at a few strips.
    """
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8)
    out = np.empty((im.size[1], im.size[0]), np.uint8)
    if im.mode not in WIDE_MODES:
        for top, end, strip in _strips(im):
            out[top:end] = _luma(strip)
        return out
    lo, hi = np.inf, -np.inf
    for _, _, strip in _strips(im):
        values = np.asarray(strip)
        lo, hi = min(lo, values.min()), max(hi, values.max())
    full = 2.0 ** np.ceil(np.log2(max(float(hi), 1.0) + 1.0)) - 1.0
    table = _rescale_table(full) if im.mode != "F" and 0 <= lo and hi < 1 << 16 else None
    for top, end, strip in _strips(im):
        values = np.asarray(strip)
        out[top:end] = table[values] if table is not None else _rescale(values, full)
    return out


def _lanczos(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    im = Image.fromarray(gray, mode="L").resize((width, height), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8)


def square_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w] → [size, size]: Lanczos to a long side of `size`, aspect kept (the short side rounded, ≥ 1),
    then padded, centred, with black. A square image is resized as a whole, as it always was."""
    h, w = gray.shape
    if h == w:
        return gray if h == size else _lanczos(gray, size, size)
    long = max(h, w)
    rh, rw = (max(1, (side * size + long // 2) // long) for side in (h, w))
    small = gray if (rh, rw) == (h, w) else _lanczos(gray, rw, rh)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - rh) // 2, (size - rw) // 2
    out[top:top + rh, left:left + rw] = small
    return out


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


def decode(data: bytes, limits: ImageLimits = LIMITS) -> np.ndarray:
    """Raw image file bytes → 8-bit grayscale array: `cxr.png` for 8-bit grayscale PNGs (NIH's; 2-3× faster
    than libpng), Pillow and `to_gray8` for anything else. PNGs have every chunk CRC checked either way.

    Any file that cannot be decoded is a ValueError saying why (ImageRejected beyond `limits`, which are
    checked from the header before any pixel is decoded); the message never depends on the run.
    """
    if data.startswith(png.SIGNATURE):
        return decode_png(png.parse(data, limits), data)
    return _pillow(data, limits)


def decode_png(image: png.Png, data: bytes) -> np.ndarray:
    """A parsed PNG's pixels as 8-bit grayscale; for Pillow's kinds the image data's size is checked first."""
    if image.gray8:
        return image.pixels()
    image.check_size()
    return _pillow(data, None)  # `png.parse` checked the header against the caller's limits


def _pillow(data: bytes, limits: ImageLimits | None) -> np.ndarray:
    """Pillow's decode of any format it knows, the header checked against `limits` (None: already checked)
    and Pillow's own bomb guard applied; every failure a ValueError."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    kind = "image"
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: only the header is read here
            kind = f"{im.format} image"
            if limits is not None:
                limits.check(*im.size)
            im.load()
            return to_gray8(im)
    except (ImageRejected, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"{kind} refused by Pillow's decompression-bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ValueError(f"not an image: unrecognised format (first bytes {png.first_bytes(data)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types; all mean an undecodable file
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))  # no object addresses: reasons must not vary by run
        raise ValueError(f"undecodable {kind}: {type(exc).__name__}: {detail}") from exc


def content_mismatch(name: str, data: bytes) -> str | None:
    """A note when a decodable file's content is another format than its name's extension says, else None."""
    ext = os.path.splitext(name)[1].lower()
    if data.startswith(png.SIGNATURE):
        if ext == ".png":  # NIH's case, without asking Pillow
            return None
        found = "PNG"
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                found = im.format
        except Exception:  # noqa: BLE001 - not an image at all: decoding reports that, not this
            return None
    said = Image.registered_extensions().get(ext)
    if found == said:
        return None
    return (f"content is {found} (first bytes {png.first_bytes(data, 4)}), but the extension {ext or '(none)'} says "
            f"{said or 'no image format'}; converted all the same")


def convert(data: bytes, size: int, codec: str, quality: int = JPEG_QUALITY, limits: ImageLimits = LIMITS) -> bytes:
    """Raw image file bytes → encoded `size`² 8-bit grayscale image bytes; ValueError as `decode`."""
    return encode(square_resize(decode(data, limits), size), codec, quality)


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
    split: str
    index: int
    total: int
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.total:05d}.tfrecord"

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"


def plan(ds: metadata.Dataset, params: Params) -> list[ShardSpec]:
    """Deterministic shard contents: each split's rows in a seeded order, cut into equal runs."""
    specs: list[ShardSpec] = []
    cols = ["image", "path", "patient", "view", "sex", "age", *labels.FINDINGS]
    for split in metadata.SPLITS:
        part = ds.split(split)[cols]
        order = np.random.default_rng([params.seed, metadata.SPLITS.index(split)]).permutation(len(part))
        records = part.iloc[order].to_dict("records")
        total = max(1, -(-len(records) // params.images_per_shard)) if records else 0
        for k in range(total):
            chunk = records[k * params.images_per_shard:(k + 1) * params.images_per_shard]
            specs.append(ShardSpec(split, k, total, tuple(chunk)))
    return specs


def write_shard(spec: ShardSpec, out_uri: str, params: Params) -> dict:
    """Convert one shard's images and commit shard + receipt. Undecodable images are quarantined."""
    import tensorflow as tf

    t0 = time.perf_counter()
    quarantined: list[dict] = []
    notes: list[dict] = []  # converted, but worth a look (a JPEG named .png)
    records = 0
    label_counts = np.zeros(labels.NUM_FINDINGS, dtype=np.int64)
    no_finding = 0
    patients: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, spec.name)
        with tf.io.TFRecordWriter(local) as writer:
            for row in spec.rows:
                try:
                    data = storage.read_bytes(row["path"])
                    image = convert(data, params.size, params.codec, params.quality)
                except Exception as exc:  # noqa: BLE001 - any failure quarantines this one image
                    quarantined.append({"image": row["image"], "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                if (note := content_mismatch(row["path"], data)) is not None:
                    notes.append({"image": row["image"], "note": note})
                y = np.array([row[f] for f in labels.FINDINGS], dtype=np.int64)
                writer.write(example(image, y, row))
                records += 1
                label_counts += y
                no_finding += int(not y.any())
                patients.add(int(row["patient"]))
        with open(local, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        nbytes = os.path.getsize(local)
        storage.upload(local, storage.join(out_uri, spec.split, spec.name))
    receipt = {
        "split": spec.split, "name": spec.name, "records": records, "sha256": digest, "bytes": nbytes,
        "images": [r["image"] for r in spec.rows if r["image"] not in {q["image"] for q in quarantined}],
        "patients": sorted(patients), "label_counts": label_counts.tolist(), "no_finding": no_finding,
        "quarantine": quarantined, "notes": notes,
        "params": params.as_dict(), "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_text(_receipt_url(out_uri, spec), json.dumps(receipt))
    return receipt


def _receipt_url(out_uri: str, spec: ShardSpec) -> str:
    return storage.join(out_uri, PARTS, f"{spec.split}-{spec.name}.json")


def committed_receipt(out_uri: str, spec: ShardSpec, params: Params) -> dict | None:
    """A shard counts as done only when its receipt and its object both exist and match `params`."""
    url = _receipt_url(out_uri, spec)
    if not storage.exists(url):
        return None
    receipt = json.loads(storage.read_text(url))
    if receipt.get("params") != params.as_dict():
        raise ValueError(
            f"{out_uri} holds shards prepared with other parameters ({receipt.get('params')}); "
            "prepare into a new OUT_URI or delete it first")
    shard = storage.join(out_uri, spec.split, spec.name)
    if not storage.exists(shard) or storage.size(shard) != receipt["bytes"]:
        return None
    return receipt


def source_fingerprint(ds: metadata.Dataset) -> str:
    """sha256 over the metadata files that define the dataset (CSV, lists, boxes)."""
    h = hashlib.sha256()
    for name in (ds.csv_name, metadata.TRAIN_VAL_LIST, metadata.TEST_LIST, metadata.BBOX_NAME):
        url = storage.join(ds.root, name)
        if storage.exists(url):
            h.update(name.encode() + b"\0" + storage.read_bytes(url))
    return h.hexdigest()


def build_manifest(ds: metadata.Dataset, params: Params, receipts: list[dict]) -> dict:
    """The contract later stages read: vocabulary, preprocessing, source, per split and shard counts."""
    splits: dict[str, dict] = {}
    for split in metadata.SPLITS:
        mine = sorted((r for r in receipts if r["split"] == split), key=lambda r: r["name"])
        counts = np.sum([r["label_counts"] for r in mine], axis=0) if mine else np.zeros(labels.NUM_FINDINGS)
        label_counts = {name: int(c) for name, c in zip(labels.FINDINGS, counts, strict=True)}
        label_counts[labels.NO_FINDING] = sum(r["no_finding"] for r in mine)
        splits[split] = {
            "images": sum(r["records"] for r in mine),
            "patients": len({p for r in mine for p in r["patients"]}),
            "label_counts": label_counts,
            "shards": [{k: r[k] for k in ("name", "records", "sha256", "bytes")} for r in mine],
        }
    quarantine = sorted((q for r in receipts for q in r["quarantine"]), key=lambda q: q["image"])
    notes = sorted((n for r in receipts for n in r.get("notes", ())), key=lambda n: n["image"])
    return {
        "format": FORMAT,
        "labels": list(labels.FINDINGS),
        "preprocessing": params.as_dict(),
        "source": {
            "root": storage.redact(ds.root), "csv": ds.csv_name, "fingerprint": source_fingerprint(ds),
            "rows_read": ds.rows_read, "usable_rows": len(ds.table), "official_split": ds.official_split,
        },
        "splits": splits,
        "quarantine": quarantine,
        "notes": notes,
        "excluded_by_metadata": [{"image": p.image, "kind": p.kind, "detail": p.detail}
                                 for p in ds.problems if p.fatal],
    }
