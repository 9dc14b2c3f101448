"""`cxr prepare` on real files: pixel conversion, manifest arithmetic, quarantine, kill-and-resume, S3."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import SAMPLES, quiet_env, user_env
from PIL import Image
from s3server import S3Server

from cxr import labels, storage, synth
from cxr.data import images, manifest, metadata, png, shards
from cxr.data.prepare import prepare

HEADER = metadata.HEADER
SAMPLE_ROWS = {
    "00000001_000.png": "Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000002_000.png": "No Finding,0,2,80,M,PA,2500,2048,0.171,0.171",
    "00000013_003.png": "Pleural_Thickening,28,13,60,M,AP,2996,2544,0.139,0.139",
}


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()


def make_root(root, n_patients: int = 12, per_patient: int = 3, size: int = 96, seed: int = 0) -> list[str]:
    """A small NIH-layout root with structured grayscale PNGs; returns the image names."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows, names = [HEADER], []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for p in range(1, n_patients + 1):
        for f in range(per_patient):
            name = f"{p:08d}_{f:03d}.png"
            y = (rng.random(labels.NUM_FINDINGS) < 0.2).astype(np.uint8)
            rows.append(f"{name},{labels.format_labels(y)},{f},{p},{40 + f},M,PA,{size},{size},0.5,0.5")
            img = 120 + 80 * np.sin(6 * xx + p) * np.cos(4 * yy + f) + rng.normal(0, 5, (size, size))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, "images", name))
            names.append(name)
    with open(os.path.join(root, "Data_Entry_2017_v2020.csv"), "w") as fh:
        fh.write("\n".join(rows) + "\n")
    return names


def read_records(url: str) -> list[dict]:
    """Parse a committed shard with TF's own reader, independent of cxr.data.pipeline."""
    data = storage.read_bytes(url)
    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cxr-test-{os.getpid()}.tfrecord")
    with open(local, "wb") as fh:
        fh.write(data)
    out = []
    for raw in tf.data.TFRecordDataset(local):
        ex = tf.train.Example.FromString(raw.numpy())
        f = ex.features.feature
        out.append({"image": f["image"].bytes_list.value[0], "labels": list(f["labels"].int64_list.value),
                    "image_index": f["image_index"].bytes_list.value[0].decode(),
                    "patient": f["patient"].int64_list.value[0], "age": f["age"].float_list.value[0]})
    os.remove(local)
    return out


def all_records(out: str, manifest: dict) -> dict[str, dict]:
    found = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            url = storage.join(out, split, shard["name"])
            assert hashlib.sha256(storage.read_bytes(url)).hexdigest() == shard["sha256"]
            recs = read_records(url)
            assert len(recs) == shard["records"]
            for r in recs:
                found[r["image_index"]] = {**r, "split": split}
    return found


def test_conversions_are_explicit():
    gray = (np.arange(40 * 60) % 256).astype(np.uint8).reshape(40, 60)
    rgba = Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1), mode="RGBA")
    assert np.array_equal(images.to_gray8(rgba), gray)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    assert np.array_equal(images.to_gray8(sixteen), gray)
    twelve = Image.fromarray((gray.astype(np.int32) * 16).astype(np.uint16))  # 12-bit data in a 16-bit file
    assert np.abs(images.to_gray8(twelve).astype(int) - gray).max() <= 1
    assert np.array_equal(images.to_gray8(Image.fromarray(gray).convert("P")), gray)
    square = images.fit(gray, 60)  # pad 40x60 to 60x60, centred, black
    assert square.shape == (60, 60) and (square[:10] == 0).all() and (square[50:] == 0).all()
    assert np.array_equal(square[10:50], gray)


def test_real_samples_through_prepare(tmp_path):
    root = tmp_path / "nih"
    os.makedirs(root / "images")
    lines = [HEADER]
    for name, rest in SAMPLE_ROWS.items():
        shutil.copy(os.path.join(SAMPLES, name), root / "images" / name)
        lines.append(f"{name},{rest}")
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "shards")
    summary = prepare(str(root), out, shards.Params(size=256, codec="png", images_per_shard=2), progress=False)
    assert summary["images"] == 3 and summary["quarantined"] == 0
    manifest = json.loads(storage.read_text(summary["manifest"]))
    recs = all_records(out, manifest)
    assert set(recs) == set(SAMPLE_ROWS)
    for name, rest in SAMPLE_ROWS.items():
        vec, _ = labels.parse(rest.split(",")[0])
        assert recs[name]["labels"] == vec.tolist()
        stored = np.asarray(Image.open(io.BytesIO(recs[name]["image"])))
        with Image.open(os.path.join(SAMPLES, name)) as im:  # the documented resize: an exact 4×4 box mean
            box = np.asarray(im, dtype=np.float32).reshape(256, 4, 256, 4).mean(axis=(1, 3))
        assert stored.shape == (256, 256) and stored.dtype == np.uint8
        assert np.array_equal(stored, np.rint(box).astype(np.uint8))  # lossless codec: exactly those pixels
    assert recs["00000013_003.png"]["patient"] == 13 and recs["00000001_000.png"]["age"] == 57


def test_gray8_pngs_decode_with_cxr_png_to_pillows_pixels():
    """The fast decoder for 8-bit grayscale PNGs (all of NIH's 8-bit ones) gives exactly Pillow's pixels."""
    for name in sorted(n for n in os.listdir(SAMPLES) if n.endswith(".png")):
        data = open(os.path.join(SAMPLES, name), "rb").read()
        assert png.parse(data).gray8
        with Image.open(io.BytesIO(data)) as im:
            expected = images.to_gray8(im)
        np.testing.assert_array_equal(images.decode(data), expected)
        lossless = shards.convert(data, 256, "png")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(lossless))),
                                      images.fit(expected, 256))
    with pytest.raises(ValueError, match="truncated PNG"):
        images.decode(data[: len(data) // 2])


def test_manifest_adds_up_and_quarantines(tmp_path):
    root = tmp_path / "raw"
    names = make_root(root, n_patients=10, per_patient=3)
    img = root / "images"
    Image.open(img / names[0]).convert("RGBA").save(img / names[0])
    data = (img / names[1]).read_bytes()
    (img / names[1]).write_bytes(data[: len(data) // 3])  # truncated: only found when decoding
    (img / names[2]).unlink()  # missing: found by metadata
    out = str(tmp_path / "out")
    s = prepare(str(root), out, shards.Params(size=64, images_per_shard=4), progress=False)
    m = json.loads(storage.read_text(s["manifest"]))
    assert [q["image"] for q in m["quarantine"]] == [names[1]]
    assert [e["image"] for e in m["excluded_by_metadata"]] == [names[2]]
    assert m["source"]["rows_read"] == 30 and m["source"]["usable_rows"] == 29
    total = sum(v["images"] for v in m["splits"].values())
    assert total == m["source"]["usable_rows"] - len(m["quarantine"]) == 28
    recs = all_records(out, m)
    assert len(recs) == 28 and names[0] in recs and names[1] not in recs
    for split, info in m["splits"].items():
        mine = [r for r in recs.values() if r["split"] == split]
        for j, finding in enumerate(labels.FINDINGS):
            assert info["label_counts"][finding] == sum(r["labels"][j] for r in mine)
        assert info["label_counts"][labels.NO_FINDING] == sum(1 for r in mine if not any(r["labels"]))
        assert info["patients"] == len({r["patient"] for r in mine})
    with pytest.raises(ValueError, match="other parameters"):
        prepare(str(root), out, shards.Params(size=32, images_per_shard=4), progress=False)


def _committed(parts) -> list[str]:
    return [n for n in os.listdir(parts) if n.endswith(".json") and not n.startswith(".tmp-")]


def _wait_until_session_ends(sid: int, timeout: float = 60) -> None:
    """Until no process of session `sid` is left: an orphaned Ray worker may still commit a shard meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["ps", "-eo", "sid="], capture_output=True, text=True).stdout
        if str(sid) not in out.split():
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} still alive {timeout} s after SIGKILL")


def test_killed_prepare_resumes_to_the_same_manifest(tmp_path):
    root = tmp_path / "raw"
    make_root(root, n_patients=30, per_patient=4, size=320)  # 120 images, 2 per shard: ~60 commits to interrupt
    out = tmp_path / "out"
    args = [sys.executable, "-m", "cxr.cli", "prepare", str(root), str(out), "--size", "64",
            "--images-per-shard", "2", "--num-workers", "1"]
    env = user_env()  # as a user runs it: cxr's local mode alone keeps Ray on loopback
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    parts = out / "_parts"
    deadline = time.time() + 180
    while time.time() < deadline and (not parts.exists() or not _committed(parts)):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_until_session_ends(proc.pid)  # Ray workers run in their own process groups and outlive the killpg
    done_before = len(_committed(parts))
    assert not (out / "manifest.json").exists()
    total_shards = 0
    for split in ("train", "val", "test"):
        if (out / split).exists():
            total_shards += len([n for n in os.listdir(out / split) if n.endswith(".tfrecord")])
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({done_before} kept from an earlier run)" in resumed.stdout
    assert "started a local Ray on 127.0.0.1" in resumed.stderr and "ray was imported before" not in resumed.stderr
    assert not [n for d, _, fs in os.walk(out) for n in fs if n.startswith(".tmp-")]
    clean = tmp_path / "clean"
    subprocess.run([*args[:5], str(clean), *args[6:]], env=env, check=True, capture_output=True, timeout=300)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert total_shards >= done_before


def test_new_data_rewrites_exactly_the_shards_whose_images_changed(tmp_path):
    """Prepare, add patients to the root, prepare into the same folder: the result is what a fresh prepare of the
    grown root gives (every image once), not old shards kept under their names."""
    root, out, clean = tmp_path / "raw", str(tmp_path / "out"), str(tmp_path / "clean")
    params = shards.Params(size=32, images_per_shard=4)
    make_root(root, n_patients=10, per_patient=2, size=48)
    first = prepare(str(root), out, params, progress=False)
    names = make_root(root, n_patients=14, per_patient=2, size=48)  # the same first 10 patients, and 4 more
    grown = prepare(str(root), out, params, progress=False)
    fresh = prepare(str(root), clean, params, progress=False)
    built = json.loads(storage.read_text(grown["manifest"]))
    assert sorted(all_records(out, built)) == sorted(names) and grown["images"] == len(names) > first["images"]
    assert storage.read_text(grown["manifest"]) == storage.read_text(fresh["manifest"])
    assert grown["shards_written"] + grown["shards_kept"] == fresh["shards_written"]


def test_prepare_into_s3(tmp_path, s3):
    import ray

    ray.shutdown()  # a local Ray started by an earlier test lacks the S3 credentials the fixture put in the env
    root = tmp_path / "raw"
    names = make_root(root, n_patients=6, per_patient=2)
    out = s3.url("prepared/run1")
    s = prepare(str(root), out, shards.Params(size=64, images_per_shard=5), progress=False)
    assert s["manifest"] == f"{out}/manifest.json"
    m = json.loads(storage.read_text(s["manifest"]))
    recs = all_records(out, m)
    assert sorted(recs) == sorted(names)
    text = json.dumps(m)
    assert s3.secret_key not in text and s3.access_key not in text
    again = prepare(str(root), out, shards.Params(size=64, images_per_shard=5), progress=False)
    assert again["shards_written"] == 0 and again["shards_kept"] == s["shards_written"]


def test_resume_rewrites_a_shard_whose_bytes_no_longer_match_its_receipt(tmp_path, caplog):
    root = tmp_path / "raw"
    make_root(root, n_patients=6, per_patient=2, size=64)
    out = tmp_path / "out"
    params = shards.Params(size=64, images_per_shard=5)
    first = prepare(str(root), str(out), params, progress=False)
    shard = out / "train" / sorted(os.listdir(out / "train"))[0]
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # same size: a size check cannot see it
    shard.write_bytes(bytes(flipped))

    caplog.set_level(logging.WARNING, logger="cxr")
    again = prepare(str(root), str(out), params, progress=False)
    assert again["shards_written"] == 1 and again["shards_kept"] == first["shards_written"] - 1
    assert any(str(shard) in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert shard.read_bytes() == good  # rewritten, and conversion is deterministic
    manifest = json.loads((out / "manifest.json").read_text())
    [entry] = [e for e in manifest["splits"]["train"]["shards"] if e["name"] == shard.name]
    assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_an_image_gone_after_listing_fails_its_shard_instead_of_being_quarantined(tmp_path):
    """Not an image defect: the shard fails naming object and shard, nothing is committed, and a re-run's
    metadata reports the image as missing."""
    root = tmp_path / "raw"
    make_root(root, n_patients=4, per_patient=2, size=64)
    params = shards.Params(size=64, images_per_shard=3)
    spec = shards.plan(metadata.load(str(root)), params)[0]
    gone = spec.rows[1]["path"]
    os.remove(gone)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(gone)}: no such file \(shard {spec.key}\)$"):
        shards.write_shard(spec, str(out), params)
    assert not (out / spec.split / spec.name).exists()
    assert shards.committed_receipt(str(out), spec, params) is None
    assert [p.kind for p in metadata.load(str(root)).problems] == ["missing_image"]


# --- storage faults during prepare, on the real SeaweedFS server ------------------------------------------

OUTAGE_S = 6.0
FROZEN_LIMITS = {"CXR_STORAGE_DEADLINE_S": "3", "CXR_STORAGE_READ_TIMEOUT_S": "1", "CXR_STORAGE_CONNECT_TIMEOUT_S": "1"}
FROZEN_BOUND_S = 45.0  # 4 runs of the shard task x (3 s deadline + 1 s read in flight) + Ray's re-scheduling


@pytest.fixture(scope="module")
def s3_raw_root(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """175 phantoms of 41 patients (NIH layout, 64²) uploaded to the bucket: the root's URL and image names."""
    local = tmp_path_factory.mktemp("synth") / "raw"
    synth.synthesize(str(local), patients=41, size=64, seed=0, workers=1, progress=False)
    url = s3.url(f"prepare-raw-{uuid.uuid4().hex[:8]}")
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda rel: storage.upload(str(local / rel), storage.join(url, rel)), files))
    return url, sorted(os.listdir(local / "images"))


def _receipt_counter(s3: S3Server, out: str) -> Callable[[], int]:
    """How many shards under `out` are committed, by a listing with a client of its own (made once: ~0.1 s)."""
    client, prefix = s3.client(), f"{out.removeprefix(f's3://{s3.bucket}/')}/{shards.PARTS}/"
    return lambda: client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("KeyCount", 0)


def _prepare_cmd(root: str, out: str) -> list[str]:
    return [sys.executable, "-m", "cxr.cli", "prepare", root, out, "--size", "64", "--images-per-shard", "4",
            "--num-workers", "1"]


@pytest.mark.slow
def test_storage_outage_mid_prepare_loses_no_image(s3: S3Server, s3_raw_root: tuple[str, list[str]]) -> None:
    """The server is stopped for ~6 s and restarted while prepare reads: every image still ends up in a shard."""
    import ray

    ray.shutdown()  # the local Ray of an earlier test may lack the S3 credentials
    root, names = s3_raw_root
    out = s3.url(f"prepare-outage-{uuid.uuid4().hex[:8]}")
    seen: dict[str, float] = {}
    finished = threading.Event()
    receipts = _receipt_counter(s3, out)

    def outage_after_first_commit() -> None:
        while not finished.is_set() and not receipts():
            time.sleep(0.02)
        if finished.is_set():
            return
        seen["committed"] = receipts()
        s3.stop()
        seen["down"] = time.monotonic()
        try:
            time.sleep(OUTAGE_S)
        finally:
            s3.start()
            seen["restarted"] = time.monotonic()

    fault = threading.Thread(target=outage_after_first_commit)
    fault.start()
    try:
        summary = prepare(root, out, shards.Params(size=64, images_per_shard=4), num_workers=1, progress=False)
        ended = time.monotonic()
    finally:
        finished.set()
        fault.join()
    # Prepare was still running when the server was gone. (Not "ended after start() returned": under load the
    # server serves again before its readiness wait ends, and a prepare may finish inside that wait.)
    assert "restarted" in seen and seen["down"] < ended, "the outage did not overlap the run"
    assert seen["committed"] < summary["shards_written"] / 2
    manifest = json.loads(storage.read_text(summary["manifest"]))
    assert manifest["quarantine"] == []
    assert summary["images"] == len(names) == 175
    assert sorted(all_records(out, manifest)) == names


@pytest.mark.slow
def test_frozen_storage_fails_prepare_in_bounded_time_naming_object_and_shard(
        s3: S3Server, s3_raw_root: tuple[str, list[str]], tmp_path: Path) -> None:
    """SIGSTOPped server (connects, never answers): a clear failure within the limits; after SIGCONT, a re-run
    completes with every image."""
    import ray

    root, names = s3_raw_root
    out = s3.url(f"prepare-frozen-{uuid.uuid4().hex[:8]}")
    log_path = tmp_path / "prepare.log"
    receipts = _receipt_counter(s3, out)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_prepare_cmd(root, out), env=quiet_env(**FROZEN_LIMITS), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not receipts():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.02)
        with s3.frozen():
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < FROZEN_BOUND_S:
                time.sleep(0.1)
            elapsed, hung = time.monotonic() - t0, proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert not hung, f"prepare still running {elapsed:.0f} s after the freeze\n{text[-3000:]}"
    assert proc.returncode != 0
    failure = re.search(r"StorageUnavailable: storage did not answer within 3 s (reading|writing) "
                        rf"{re.escape(s3.url(''))}\S+ \(shard (train|val|test)/shard-\d{{5}}-of-\d{{5}}\.tfrecord\)",
                        text)
    assert failure, text[-3000:]
    assert s3.secret_key not in text and s3.access_key not in text
    assert not storage.exists(storage.join(out, manifest.NAME))

    ray.shutdown()
    summary = prepare(root, out, shards.Params(size=64, images_per_shard=4), num_workers=1, progress=False)
    assert summary["shards_kept"] >= 1 and summary["quarantined"] == 0
    assert sorted(all_records(out, json.loads(storage.read_text(summary["manifest"])))) == names
