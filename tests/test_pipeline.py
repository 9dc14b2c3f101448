"""The input pipeline on real files: shards written by the shard stage, raw PNGs, the real NIH samples, S3.

Shards are written in-process with `cxr.data.shards` (no Ray); images are small so the whole module runs in
well under a minute on two cores.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import shutil
import zlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import SAMPLES
from PIL import Image

from cxr import heap, labels, storage
from cxr.config import Augment
from cxr.data import augment, images, manifest, metadata, pipeline, png, raw, reader, shards

PX, STORED, PER_SHARD = 40, 32, 7
PARAMS = shards.Params(size=STORED, images_per_shard=PER_SHARD)


def phantom(rng: np.random.Generator, px: int) -> np.ndarray:
    """Smooth structure plus noise: compresses like an image, and every image differs."""
    yy, xx = np.mgrid[0:px, 0:px] / px
    f = rng.uniform(1, 4, size=4)
    img = 0.5 + 0.25 * np.sin(f[0] * 6 * xx + f[1]) * np.cos(f[2] * 6 * yy + f[3]) + rng.normal(0, 0.05, (px, px))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_root(root: str, patients: int = 30, per_patient: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """An NIH-shaped root; returns the multi-hot labels written to the CSV for each image."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows, truth = [], {}
    for p in range(1, patients + 1):
        for f in range(per_patient):
            name = f"{p:08d}_{f:03d}.png"
            y = (rng.random(labels.NUM_FINDINGS) < 0.2).astype(np.uint8)
            truth[name] = y
            rows.append(f"{name},{labels.format_labels(y)},{f},{p},{30 + p},M,PA,{PX},{PX},0.143,0.143")
            Image.fromarray(phantom(rng, PX)).save(os.path.join(root, "images", name))
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w") as fh:
        fh.write("\n".join([metadata.HEADER, *rows]) + "\n")
    return truth


def write_shards(root: str, out: str, params: shards.Params = PARAMS) -> dict:
    """What `cxr prepare` does, minus Ray."""
    ds = metadata.load(root, seed=params.seed, val_fraction=params.val_fraction, test_fraction=params.test_fraction)
    receipts = [shards.write_shard(spec, out, params) for spec in shards.plan(ds, params)]
    built = manifest.build(ds, params.as_dict(), receipts)
    manifest.write(out, built)
    return built


def split_size(uri: str, split: str, worker: int = 0, workers: int = 1) -> int:
    """Images a worker reads per pass of a split (all of them with one worker)."""
    return reader.ShardAssignment(tuple(manifest.load(uri).shards(split)), worker, workers).images()


def shard_records(out: str, built: dict, split: str) -> list[dict]:
    """Every record of a split in position order, parsed straight from the files (the ground truth)."""
    records = []
    for s in built["splits"][split]["shards"]:
        for record in tf.data.TFRecordDataset(os.path.join(out, split, s["name"])):
            ex = tf.train.Example.FromString(record.numpy()).features.feature
            records.append({"image": ex["image"].bytes_list.value[0],
                            "name": ex["image_index"].bytes_list.value[0].decode(),
                            "labels": np.array(ex["labels"].int64_list.value)})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("pipeline")
    root, out = str(base / "raw"), str(base / "shards")
    truth = write_root(root)
    built = write_shards(root, out)
    return {"root": root, "out": out, "truth": truth, "manifest": built, "base": base}


def eval_pass(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    xs, ys, idx, sizes = [], [], [], []
    for x, y, i in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
        idx.append(i.numpy())
        sizes.append(int(x.shape[0]))
    if not sizes:
        return np.zeros((0,)), np.zeros((0, labels.NUM_FINDINGS)), np.zeros((0,), np.int64), []
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(idx), sizes


def take(ds: tf.data.Dataset, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_fixture_has_shard_and_record_sharding_cases(data):
    splits = data["manifest"]["splits"]
    assert len(splits["train"]["shards"]) >= 4  # shard-level sharding for 1..3 workers
    assert len(splits["val"]["shards"]) == 1  # fewer shards than workers: record-level fallback
    assert splits["train"]["images"] % 8 != 0  # a partial final batch exists


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_eval_reads_every_image_exactly_once_across_workers(data, split, workers):
    n = split_size(data["out"], split)
    assert n == data["manifest"]["splits"][split]["images"]
    seen = []
    for w in range(workers):
        _, _, idx, _ = eval_pass(pipeline.make_dataset(data["out"], split, 8, worker_index=w, num_workers=workers,
                                                       image_size=24))
        assert len(idx) == split_size(data["out"], split, w, workers)
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(n))


def test_eval_labels_and_indices_match_the_csv(data):
    records = shard_records(data["out"], data["manifest"], "train")
    _, y, idx, sizes = eval_pass(pipeline.make_dataset(data["out"], "train", 8, image_size=24))
    assert sorted(idx.tolist()) == list(range(len(records)))
    _, y_again, idx_again, _ = eval_pass(pipeline.make_dataset(data["out"], "train", 8, image_size=24))
    np.testing.assert_array_equal(idx_again, idx)  # deterministic order
    np.testing.assert_array_equal(y_again, y)
    for k, labels_k in zip(idx, y, strict=True):
        np.testing.assert_array_equal(labels_k, data["truth"][records[k]["name"]].astype(np.float32))
    assert sizes == [8] * (len(records) // 8) + [len(records) % 8]  # final partial batch kept


def test_eval_output_contract(data):
    x, y, i = next(iter(pipeline.make_dataset(data["out"], "train", 8, image_size=24)))
    assert x.dtype == tf.float32 and x.shape == (8, 24, 24, 1)
    assert y.dtype == tf.float32 and y.shape == (8, labels.NUM_FINDINGS)
    assert i.dtype == tf.int64 and i.shape == (8,)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


@pytest.mark.parametrize("mode", ["shards", "raw"])
def test_unit_false_stops_before_to_unit_and_to_unit_gives_the_eval_batches_bit_for_bit(data, mode):
    """The replicas get uint8 at the stored size and apply `to_unit` themselves: the same numbers as validation."""
    def read(**kw):
        if mode == "shards":
            return eval_pass(pipeline.make_dataset(data["out"], "test", 8, image_size=24, **kw))
        return eval_pass(pipeline.make_raw_dataset(data["root"], "test", 8, image_size=24, raw_size=STORED, **kw))

    x, y, i, sizes = read()
    pixels, y8, i8, sizes8 = read(unit=False)
    assert pixels.dtype == np.uint8 and pixels.shape == (len(i), STORED, STORED, 1) and STORED != 24
    np.testing.assert_array_equal(i8, i)
    np.testing.assert_array_equal(y8, y)
    assert sizes8 == sizes
    np.testing.assert_array_equal(augment.to_unit(pixels, 24).numpy(), x)
    with pytest.raises(ValueError, match="unit=False is for evaluation"):
        pipeline.make_dataset(data["out"], "train", 8, training=True, unit=False)


def test_decoded_pixels_equal_pil_decode_of_the_stored_jpeg(data):
    records = shard_records(data["out"], data["manifest"], "test")
    x, _, idx, _ = eval_pass(pipeline.make_dataset(data["out"], "test", 4, image_size=STORED))
    for k, img in zip(idx, x, strict=True):
        ref = np.asarray(Image.open(io.BytesIO(records[k]["image"])), dtype=np.float32) / 255.0
        assert np.abs(img[..., 0] - ref).max() <= 1 / 255 + 1e-6


def test_uint8_codec_gives_exactly_the_png_codec_batches(data):
    """Both codecs are lossless: raw pixels decoded per batch must equal PNGs decoded per image, bit for bit."""
    out = {c: str(data["base"] / f"codec-{c}") for c in ("png", "uint8")}
    for codec, url in out.items():
        write_shards(data["root"], url, shards.Params(size=STORED, images_per_shard=PER_SHARD, codec=codec))
    lossless, raw = (shard_records(out[c], json.loads(storage.read_text(storage.join(out[c], manifest.NAME))),
                                   "test") for c in ("png", "uint8"))
    for a, b in zip(lossless, raw, strict=True):
        assert b["image"] == np.asarray(Image.open(io.BytesIO(a["image"]))).tobytes()  # the stored pixels
    for split in ("train", "test"):  # test: a final partial batch, decoded per batch too
        x_png, y_png, i_png, sizes = eval_pass(pipeline.make_dataset(out["png"], split, 8, image_size=24))
        x_raw, y_raw, i_raw, sizes_raw = eval_pass(pipeline.make_dataset(out["uint8"], split, 8, image_size=24))
        assert sizes_raw == sizes and sizes[-1] != 8
        np.testing.assert_array_equal(i_raw, i_png)
        np.testing.assert_array_equal(y_raw, y_png)
        np.testing.assert_array_equal(x_raw, x_png)
    trained = [take(pipeline.make_dataset(out[c], "train", 8, training=True, image_size=24, seed=5), 6)
               for c in ("png", "uint8")]
    for (x1, y1), (x2, y2) in zip(*trained, strict=True):
        np.testing.assert_array_equal(x2, x1)
        np.testing.assert_array_equal(y2, y1)


def test_uint8_records_of_the_wrong_size_raise_a_clear_error(data, tmp_path):
    out = str(tmp_path / "u8")
    built = write_shards(data["root"], out, shards.Params(size=STORED, images_per_shard=PER_SHARD, codec="uint8"))
    built["preprocessing"]["size"] = STORED // 2  # a manifest that lies about the stored size
    manifest.write(out, built)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"not {STORED // 2}×{STORED // 2} bytes"):
        eval_pass(pipeline.make_dataset(out, "test", 8, image_size=24))


def test_training_contract_repeat_and_determinism(data):
    def batches(**kw) -> list[tuple[np.ndarray, np.ndarray]]:
        return take(pipeline.make_dataset(data["out"], "train", 8, training=True, image_size=24, **kw), 12)

    n = split_size(data["out"], "train")
    first = batches(seed=3, epoch=0)
    assert len(first) * 8 > 2 * n  # repeats past the end of a pass
    assert all(x.shape == (8, 24, 24, 1) and x.dtype == np.float32 and y.shape == (8, 14) for x, y in first)
    assert all(0.0 <= x.min() and x.max() <= 1.0 for x, _ in first)
    again = batches(seed=3, epoch=0)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other_epoch = batches(seed=3, epoch=1)
    assert not np.array_equal(np.stack([y for _, y in first]), np.stack([y for _, y in other_epoch]))
    other_worker = take(pipeline.make_dataset(data["out"], "train", 8, training=True, image_size=24, seed=3,
                                              worker_index=1, num_workers=2), 2)
    assert not np.array_equal(first[0][0], other_worker[0][0])


def test_an_epoch_trains_on_every_image_at_most_once_across_workers(data, tmp_path):
    """Two workers take an epoch's images // global batch batches each, as the loop does, on uint8 shards with
    uneven shard counts and a short last shard: no image twice, fewer than a batch per worker left out, other
    images left out each epoch. Images are told apart by their pixels (augmentation off, stored size)."""
    out = str(tmp_path / "u8")
    built = write_shards(data["root"], out, shards.Params(size=STORED, images_per_shard=5, codec="uint8"))
    n, workers, batch = built["splits"]["train"]["images"], 2, 4
    assert len(built["splits"]["train"]["shards"]) % workers and n % 5  # workers cannot get whole shards evenly
    x, _, idx, _ = eval_pass(pipeline.make_dataset(out, "train", 8, image_size=STORED))
    position = {img.tobytes(): int(k) for img, k in zip(np.round(x * 255).astype(np.uint8), idx, strict=True)}
    assert len(position) == n  # every image is unique
    steps = n // (workers * batch)
    left_out = []
    for epoch in (1, 2, 3):
        seen: collections.Counter = collections.Counter()
        for w in range(workers):
            ds = pipeline.make_dataset(out, "train", batch, worker_index=w, num_workers=workers, training=True,
                                       seed=1, epoch=epoch, image_size=STORED, augment=augment.OFF)
            for pixels, _ in ds.repeat().take(steps):
                seen.update(position[img.tobytes()] for img in np.round(pixels.numpy() * 255).astype(np.uint8))
        assert sum(seen.values()) == steps * workers * batch
        assert max(seen.values()) == 1, f"epoch {epoch}: {sum(c > 1 for c in seen.values())} images seen twice"
        never = set(range(n)) - set(seen)
        assert len(never) == n - steps * workers * batch < workers * batch
        left_out.append(frozenset(never))
    assert len(set(left_out)) == 3, left_out


def test_heap_is_trimmed_every_few_shards_not_every_shard(data, monkeypatch):
    """Trimming after every shard made the next batches fault their freed pages in again (4-13% on uint8)."""
    calls, real = [], heap.release
    monkeypatch.setattr(heap, "release", lambda: (calls.append(1), real()))
    ds = pipeline.make_dataset(data["out"], "train", 8, training=True, image_size=24)
    for _ in ds:
        if ds.stats.shards_read >= 4 * heap.TRIM_EVERY_SHARDS:
            break
    read = ds.stats.shards_read
    # streams fetch concurrently, so a trim point can be seen twice; never once per shard
    assert 1 <= len(calls) <= read // 2, (len(calls), read)


def _nearest_distance(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each image, the max abs pixel difference to the closest reference image."""
    d = np.abs(images[:, None] - reference[None]).reshape(len(images), len(reference), -1).max(axis=2)
    return d.min(axis=1)


def test_augmentation_is_training_only(data):
    evals, _, _, _ = eval_pass(pipeline.make_dataset(data["out"], "val", 8, image_size=24))
    plain = np.concatenate([x for x, _ in take(pipeline.make_dataset(
        data["out"], "val", 4, training=True, image_size=24, augment=augment.OFF), 3)])
    assert _nearest_distance(plain, evals).max() < 1e-5  # identity augmentation == eval images
    augmented = np.concatenate([x for x, _ in take(pipeline.make_dataset(
        data["out"], "val", 4, training=True, image_size=24), 3)])
    assert _nearest_distance(augmented, evals).min() > 0.02  # every training image was transformed


def test_xla_warp_equals_image_projective_transform():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (6, 48, 48, 1), dtype=np.uint8))
    strong = Augment(rotate_deg=30, scale=(0.6, 1.4), translate=0.2, hflip=True, brightness=0.0, contrast=0.0)
    u = tf.random.stateless_uniform([6, 7], seed=[1, 2], minval=-1.0, maxval=1.0)
    transforms = augment.affine_transforms(u, strong, 48, 40)
    ones, zeros = tf.ones([6]), tf.zeros([6])
    ours = augment.warp_bilinear(images, transforms, ones, zeros, 40)
    ref = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32) / 255.0, transforms=transforms, output_shape=[40, 40],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    assert float(tf.reduce_max(tf.abs(ours - ref))) < 1e-4
    identity = augment.affine_transforms(tf.zeros([6, 7]), strong, 48, 40)
    resized = augment.to_unit(images, 40)
    assert float(tf.reduce_max(tf.abs(augment.warp_bilinear(images, identity, ones, zeros, 40) - resized))) < 1e-4
    both = [augment.augment_batch(images, tf.constant(5, tf.int64), 9, Augment(kernel=k), 40) for k in ("xla", "tf")]
    assert float(tf.reduce_max(tf.abs(both[0] - both[1]))) < 1e-4


def corrupted_copy(data: dict, tmp_path, split: str = "train", shard: int = 1) -> tuple[str, str]:
    out = str(tmp_path / "shards")
    shutil.copytree(data["out"], out)
    name = data["manifest"]["splits"][split]["shards"][shard]["name"]
    return out, os.path.join(out, split, name)


def test_checksum_mismatch_raises_naming_the_shard(data, tmp_path):
    out, victim = corrupted_copy(data, tmp_path)
    blob = bytearray(open(victim, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(blob))
    with pytest.raises(tf.errors.OpError, match="sha256") as err:
        eval_pass(pipeline.make_dataset(out, "train", 8, image_size=24))
    assert victim in str(err.value)
    with pytest.raises(tf.errors.OpError, match=os.path.basename(victim)):
        take(pipeline.make_dataset(out, "train", 8, training=True, image_size=24), 20)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_skip_counts_and_logs_the_corrupt_shard(data, tmp_path, caplog, damage):
    out, victim = corrupted_copy(data, tmp_path)
    blob = bytearray(open(victim, "rb").read())
    if damage == "flip a byte":
        blob[100] ^= 0x01
    else:
        del blob[-100:]
    open(victim, "wb").write(bytes(blob))
    stats = reader.Stats()
    with caplog.at_level(logging.WARNING, logger="cxr.data.reader"):
        _, _, idx, _ = eval_pass(pipeline.make_dataset(out, "train", 8, image_size=24, on_corrupt="skip",
                                                       stats=stats))
    lost = data["manifest"]["splits"]["train"]["shards"][1]["records"]
    assert len(idx) == split_size(out, "train") - lost and len(set(idx.tolist())) == len(idx)
    assert stats.skipped_count == 1 and victim in stats.skipped
    assert any(victim in r.getMessage() for r in caplog.records)
    ds = pipeline.make_dataset(out, "train", 8, training=True, image_size=24, on_corrupt="skip")
    assert len(take(ds, 10)) == 10 and ds.stats.skipped_count == 1


def test_broken_framing_with_matching_checksum_is_caught(data, tmp_path):
    """A shard whose bytes match the manifest but whose last record is cut (a writer bug) still fails loudly."""
    out, victim = corrupted_copy(data, tmp_path)
    blob = open(victim, "rb").read()[:-10]
    open(victim, "wb").write(blob)
    built = json.loads(open(os.path.join(out, "manifest.json")).read())
    entry = built["splits"]["train"]["shards"][1]
    entry.update(bytes=len(blob), sha256=__import__("hashlib").sha256(blob).hexdigest())
    open(os.path.join(out, "manifest.json"), "w").write(json.dumps(built))
    with pytest.raises(tf.errors.OpError, match="claims"):
        eval_pass(pipeline.make_dataset(out, "train", 8, image_size=24))
    with pytest.raises(reader.CorruptShardError, match="truncated record header"):
        reader.frame_records(b"\x05\x00\x00", "mem://x")


def test_every_shard_corrupt_in_training_raises_instead_of_spinning(data, tmp_path):
    out, victim = corrupted_copy(data, tmp_path, split="val", shard=0)
    open(victim, "ab").write(b"junk")
    with pytest.raises(tf.errors.OpError, match="every shard"):
        take(pipeline.make_dataset(out, "val", 4, training=True, image_size=24, on_corrupt="skip"), 3)


def test_missing_shard_raises_naming_it_even_when_skipping(data, tmp_path):
    out, victim = corrupted_copy(data, tmp_path)
    os.remove(victim)
    for mode in ("raise", "skip"):
        with pytest.raises(tf.errors.OpError, match="no such file") as err:
            eval_pass(pipeline.make_dataset(out, "train", 8, image_size=24, on_corrupt=mode))
        assert victim in str(err.value)


def test_worker_without_records_cannot_train(data):
    n = split_size(data["out"], "val")
    with pytest.raises(ValueError, match="no images"):
        pipeline.make_dataset(data["out"], "val", 4, worker_index=n, num_workers=n + 1, training=True)
    _, _, idx, _ = eval_pass(pipeline.make_dataset(data["out"], "val", 4, worker_index=n, num_workers=n + 1))
    assert len(idx) == 0
    with pytest.raises(ValueError, match="worker_index"):
        pipeline.make_dataset(data["out"], "val", 4, worker_index=2, num_workers=2)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_raw_mode_yields_the_same_labels_and_indices_as_shards(data, split):
    _, y_shard, i_shard, _ = eval_pass(pipeline.make_dataset(data["out"], split, 8, image_size=24))
    _, y_raw, i_raw, sizes = eval_pass(pipeline.make_raw_dataset(data["root"], split, 8, image_size=24,
                                                                 raw_size=STORED))
    np.testing.assert_array_equal(np.sort(i_raw), np.sort(i_shard))
    np.testing.assert_array_equal(y_raw[np.argsort(i_raw)], y_shard[np.argsort(i_shard)])
    assert sizes == [8] * (len(i_raw) // 8) + ([len(i_raw) % 8] if len(i_raw) % 8 else [])
    seen = []
    for w in range(2):
        _, _, idx, _ = eval_pass(pipeline.make_raw_dataset(data["root"], split, 8, worker_index=w, num_workers=2,
                                                           image_size=24, raw_size=STORED))
        assert all(k % 2 == w for k in idx)
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(i_shard)))


def test_raw_mode_sees_exactly_the_pixels_prepare_stores(data, real_root, tmp_path):
    """One preprocessing path: uint8 shards hold the pixels raw mode feeds, bit for bit, for the phantoms and for
    the real NIH files with their 16-bit and RGBA variants (decoded by Pillow, not cxr.png)."""
    for root, size in ((data["root"], STORED), (real_root, 96)):
        out = str(tmp_path / f"u8-{size}")
        params = shards.Params(size=size, images_per_shard=PER_SHARD, codec="uint8", val_fraction=0.0,
                               test_fraction=0.0)
        write_shards(root, out, params)
        x_shard, _, i_shard, _ = eval_pass(pipeline.make_dataset(out, "train", 8, image_size=size))
        x_raw, _, i_raw, _ = eval_pass(pipeline.make_raw_dataset(root, "train", 8, image_size=size, raw_size=size,
                                                                 val_fraction=0.0, test_fraction=0.0))
        np.testing.assert_array_equal(np.sort(i_raw), np.sort(i_shard))
        np.testing.assert_array_equal(x_raw[np.argsort(i_raw)], x_shard[np.argsort(i_shard)])


def test_raw_mode_training_contract(data):
    ds = pipeline.make_raw_dataset(data["root"], "val", 4, training=True, image_size=24, raw_size=STORED, seed=1)
    got = take(ds, 4)  # val has 6 images: this crosses a pass boundary
    assert all(x.shape == (4, 24, 24, 1) and y.shape == (4, 14) for x, y in got)
    again = take(pipeline.make_raw_dataset(data["root"], "val", 4, training=True, image_size=24, raw_size=STORED,
                                           seed=1), 4)
    for (x1, y1), (x2, y2) in zip(got, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


@pytest.fixture(scope="module")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The three real NIH PNGs plus a 16-bit, an RGBA and a truncated variant of one of them."""
    root = tmp_path_factory.mktemp("real")
    os.makedirs(root / "images")
    names = sorted(n for n in os.listdir(SAMPLES) if n.endswith(".png"))
    for name in names:
        shutil.copy(os.path.join(SAMPLES, name), root / "images" / name)
    gray = np.asarray(Image.open(os.path.join(SAMPLES, names[0])))
    Image.fromarray(gray.astype(np.uint16) * 16).save(root / "images" / "00000100_000.png")  # 12-bit data
    Image.fromarray(gray).convert("RGBA").save(root / "images" / "00000101_000.png")
    rows = [f"{n},No Finding,0,{int(n[:8])},50,F,PA,1024,1024,0.143,0.143"
            for n in [*names, "00000100_000.png", "00000101_000.png"]]
    with open(root / "Data_Entry_2017_v2020.csv", "w") as fh:
        fh.write("\n".join([metadata.HEADER, *rows]) + "\n")
    return str(root)


def _raw_by_name(root: str, size: int, **kw) -> dict[str, np.ndarray]:
    rows = raw.split_rows(root, "train", val_fraction=0.0, test_fraction=0.0)
    x, _, idx, _ = eval_pass(pipeline.make_raw_dataset(root, "train", 2, image_size=size, raw_size=size,
                                                       val_fraction=0.0, test_fraction=0.0, **kw))
    return {os.path.basename(rows[k][0]): img[..., 0] for k, img in zip(idx, x, strict=True)}


def test_raw_mode_decodes_real_nih_pngs_like_prepare(real_root):
    out = _raw_by_name(real_root, 256)
    names = sorted(n for n in os.listdir(SAMPLES) if n.endswith(".png"))
    for name in names:  # 8-bit grayscale fast path: an exact 4×4 box filter of the 1024² original
        box = np.asarray(Image.open(os.path.join(SAMPLES, name)), dtype=np.float32).reshape(256, 4, 256, 4)
        assert np.abs(out[name] * 255 - box.mean(axis=(1, 3))).max() <= 0.5 + 1e-3
    for variant in ("00000100_000.png", "00000101_000.png"):  # converted exactly as the shard writer does
        with Image.open(os.path.join(real_root, "images", variant)) as im:
            expected = images.fit(images.to_gray8(im), 256).astype(np.float32) / 255.0
        assert np.abs(out[variant] - expected).max() <= 1 / 255 + 1e-6
    assert np.abs(out["00000100_000.png"] - out[names[0]]).mean() < 2 / 255  # 16-bit ≈ its 8-bit original


def test_raw_mode_corrupt_png_raises_naming_it_or_is_skipped(real_root, tmp_path):
    root = str(tmp_path / "root")
    shutil.copytree(real_root, root)
    victim = os.path.join(root, "images", "00000002_000.png")
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    with pytest.raises(tf.errors.OpError, match="truncated PNG") as err:
        _raw_by_name(root, 64)
    assert victim in str(err.value)
    stats = reader.Stats()
    out = _raw_by_name(root, 64, on_corrupt="skip", stats=stats)
    assert "00000002_000.png" not in out and len(out) == 4 and list(stats.skipped) == [victim]


def _tf_shrink(blob: bytes, size: int) -> np.ndarray:
    """The reference: TF's decoder, a float32 box mean, TF's bilinear resize, round half to even."""
    x = tf.cast(tf.io.decode_png(blob, channels=1)[..., 0], tf.float32)
    f = max(int(x.shape[0]) // size, 1)
    m = int(x.shape[0]) // f
    mean = tf.reduce_mean(tf.reshape(x[:m * f, :m * f], [m, f, m, f]), axis=[1, 3])
    if m != size:
        mean = tf.image.resize(mean[..., None], [size, size], method="bilinear")[..., 0]
    return tf.cast(tf.round(mean), tf.uint8).numpy()


@pytest.mark.parametrize("side,size", [(1024, 256), (1000, 256), (300, 128), (256, 256), (200, 256), (1100, 64),
                                       (1024, 100), ("nih", 256), ("nih", 128)])
def test_raw_decode_and_shrink_equal_tf_bit_for_bit(side, size):
    """cxr.png + the box filter give exactly what TF's PNG decoder and ops give (real NIH pixels: re-encoded by
    Pillow at other sides; NIH's own file, with NIH's Up/Paeth rows, as "nih"); 1100 → 64 is f = 17, whose
    block sums no longer fit 16 bits."""
    if side == "nih":
        blob = open(os.path.join(SAMPLES, "00000013_003.png"), "rb").read()
    else:
        with Image.open(os.path.join(SAMPLES, "00000001_000.png")) as im:
            gray = np.asarray(im.convert("L").resize((side, side), Image.Resampling.BILINEAR))
        buf = io.BytesIO()
        Image.fromarray(gray, mode="L").save(buf, format="PNG")
        blob = buf.getvalue()
    decoded = images.decode(blob)
    np.testing.assert_array_equal(decoded, tf.io.decode_png(blob, channels=1).numpy()[..., 0])
    expected = _tf_shrink(blob, size)
    out = images.fit(decoded, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_raw_mode_undecodable_png_with_valid_crcs_raises_naming_it(real_root, tmp_path):
    """Corrupt compressed data behind a correct chunk CRC gets past the structure check; the decoder's error
    still names the file."""
    root = str(tmp_path / "root")
    shutil.copytree(real_root, root)
    victim = os.path.join(root, "images", "00000013_003.png")
    data = bytearray(open(victim, "rb").read())
    length = int.from_bytes(data[33:37], "big")  # the first chunk after IHDR
    assert data[37:41] == b"IDAT"
    data[41 + length // 2: 41 + length // 2 + 64] = bytes(64)  # zeros inside the deflate stream
    data[41 + length: 45 + length] = zlib.crc32(bytes(data[37:41 + length])).to_bytes(4, "big")
    open(victim, "wb").write(bytes(data))
    png.parse(bytes(data))  # structurally sound: every CRC matches
    with pytest.raises(tf.errors.OpError, match="undecodable PNG") as err:
        _raw_by_name(root, 64)
    assert victim in str(err.value)
    stats = reader.Stats()
    out = _raw_by_name(root, 64, on_corrupt="skip", stats=stats)
    assert "00000013_003.png" not in out and list(stats.skipped) == [victim]


def test_streams_from_s3(data, s3):
    """Same pipeline over a real S3 server: nothing may assume a local path."""
    prefix = "pipeline-test/shards"
    for dirpath, _, files in os.walk(data["out"]):
        for f in files:
            path = os.path.join(dirpath, f)
            storage.upload(path, s3.url(f"{prefix}/{os.path.relpath(path, data['out'])}"))
    uri = s3.url(prefix)
    n = split_size(uri, "train")
    _, y, idx, _ = eval_pass(pipeline.make_dataset(uri, "train", 8, image_size=24))
    assert sorted(idx.tolist()) == list(range(n))
    _, y_local, _, _ = eval_pass(pipeline.make_dataset(data["out"], "train", 8, image_size=24))
    np.testing.assert_array_equal(y, y_local)
    assert len(take(pipeline.make_dataset(uri + "/manifest.json", "train", 8, training=True, image_size=24), 3)) == 3
    storage.filesystem(uri)[0].rm(uri.replace("s3://", ""), recursive=True)
    with pytest.raises(FileNotFoundError):
        pipeline.make_dataset(uri, "train", 8)
