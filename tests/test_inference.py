"""`cxr predict` on real files: NIH PNGs, the same pixels as DICOMs (MONOCHROME1 12-bit included), JPEG, RGBA, and
files that cannot be read, through Ray Data, against a model registered in a real MLflow store; the one replica in
the driver (local mode) gives the pool's numbers, for files and for splits."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import quiet_env, register_seeded_model, user_env
from PIL import Image
from test_dicom import PNGS, png_bytes, twelve_bit, write_dicom

from cxr.labels import FINDINGS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not PNGS, reason="no NIH sample PNGs in ../shared/samples")]
SIZE = 64


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, models:/ URI) of a seeded small_cnn registered in a SQLite store."""
    uri, model, _ = register_seeded_model(tmp_path_factory.mktemp("predict-model"), "tiny", SIZE, 4,
                                          {"cxr.data.fingerprint": "f" * 64})
    return uri, model


def _files(folder) -> dict[str, str]:
    """name → what it is; written from the real NIH samples."""
    nih = np.asarray(Image.open(PNGS[0]))
    crop = nih[300:556, 200:520]
    q = twelve_bit(crop)
    files = {
        "a.png": PNGS[0].read_bytes(),
        "a.dcm": write_dicom(nih),  # the same pixels, MONOCHROME2 8-bit
        "b.png": png_bytes(q),  # 12-bit values in a 16-bit PNG
        "b.dcm": write_dicom((4095 - q).astype(np.uint16), photometric="MONOCHROME1", bits_stored=12,
                             RescaleSlope="2", RescaleIntercept="-4096"),  # what a viewer shows of it is q
        "rgba.png": png_bytes(np.dstack([crop, crop, crop, np.full_like(crop, 255)])),
        "broken.png": PNGS[1].read_bytes()[:5000],
        "notes.png": b"not an image at all",
        "cine.dcm": write_dicom(crop, frames=3),
    }
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=95)
    files["c.jpg"] = buf.getvalue()
    os.makedirs(folder / "sub", exist_ok=True)
    for name, data in files.items():
        (folder / ("sub" if name.startswith("b") else "") / name).write_bytes(data)
    return files


def test_predict_png_jpeg_dicom_and_unreadable_files(registered, tmp_path):
    uri, model = registered
    files = _files(tmp_path / "studies")
    out = tmp_path / "predictions.parquet"
    run = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", "--model", model, "--images",
                          str(tmp_path / "studies"), "--out", str(out), "--tracking-uri", uri, "--batch-size", "4",
                          "--num-workers", "1"],  # a replica count: the pool, on a local Ray
                         env=user_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "started a local Ray on 127.0.0.1" in run.stderr and "ray was imported before" not in run.stderr
    table = pd.read_parquet(out)
    errors = pd.read_csv(tmp_path / "predictions.errors.csv")
    assert len(table) + len(errors) == len(files)  # every input file is a row of one or the other
    name = {os.path.basename(p): i for i, p in enumerate(table["path"])}
    assert set(name) == {"a.png", "a.dcm", "b.png", "b.dcm", "rgba.png", "c.jpg"}
    assert list(table.columns) == ["path", *FINDINGS, "model_uri", "model_version", "training_fingerprint"]
    assert set(table["model_version"]) == {"1"} and set(table["training_fingerprint"]) == {"f" * 64}
    probs = table[list(FINDINGS)].to_numpy()
    for png, dcm in (("a.png", "a.dcm"), ("b.png", "b.dcm")):  # the same pixels give the same probabilities
        np.testing.assert_allclose(probs[name[dcm]], probs[name[png]], atol=1e-5, err_msg=dcm)
    reasons = dict(zip(errors["path"].map(os.path.basename), errors["error"], strict=True))
    assert set(reasons) == {"broken.png", "notes.png", "cine.dcm"}
    assert "truncated PNG" in reasons["broken.png"] and "not an image" in reasons["notes.png"]
    assert "frames" in reasons["cine.dcm"].lower()
    assert "predicted 6 of 9 images" in run.stdout and "3 could not be read" in run.stdout
    assert list(table["path"]) == sorted(table["path"])  # input order (the listing is sorted)

    from cxr.data import images
    from cxr.models import loading

    direct = loading.load(model, uri).model  # the same model on the same preprocessing, outside Ray
    x = images.preprocess(files["a.png"], SIZE).astype(np.float32)[None, ..., None] / 255
    np.testing.assert_allclose(probs[name["a.png"]], direct.predict(x, verbose=0)[0], atol=1e-5)

    from cxr.predict import predict

    ray_up = lambda: "ray" in sys.modules and sys.modules["ray"].is_initialized()  # noqa: E731
    before = ray_up()
    here = predict(model, str(tmp_path / "studies"), str(tmp_path / "here.csv"), batch_size=4, tracking_uri=uri,
                   progress=False)  # no replica count, no cluster: the replica is this process, Ray never starts
    assert (here.predicted, here.errors) == (6, 3) and ray_up() == before
    local = pd.read_csv(tmp_path / "here.csv")
    assert list(local["path"]) == list(table["path"])
    np.testing.assert_allclose(local[list(FINDINGS)].to_numpy(), probs, atol=5.1e-5)  # the CSV has 4 places
    assert pd.read_csv(tmp_path / "here.errors.csv").equals(errors)


def test_a_split_scored_in_the_driver_equals_the_pool(registered, phantom_shards):
    """Both parts of the pool (2 replicas on a local Ray) and the driver's one replica give every image of the test
    and val splits the same probabilities, and the labels the split has."""
    from cxr import cluster
    from cxr.data import source as sources
    from cxr.inference import predict_splits

    uri, model = registered
    data = sources.data_config(phantom_shards, SIZE)
    here = predict_splits(model, data, ["test", "val"], outputs=len(FINDINGS), batch_size=8, tracking_uri=uri,
                          progress=False)
    try:
        pool = predict_splits(model, data, ["test", "val"], outputs=len(FINDINGS), batch_size=8, tracking_uri=uri,
                              replicas=2, progress=False)
    finally:
        cluster.stop_local()
    for split in ("test", "val"):
        assert here[split].missing == 0 and len(here[split].seen) == sources.for_config(data).split_size(data, split)
        np.testing.assert_allclose(pool[split].probs, here[split].probs, atol=1e-6, err_msg=split)
        np.testing.assert_array_equal(pool[split].labels, here[split].labels)


def test_predict_refuses_a_wrong_model_or_nothing_to_read(registered, tmp_path):
    uri, _ = registered
    (tmp_path / "empty").mkdir()
    args = [sys.executable, "-m", "cxr.cli", "predict", "--tracking-uri", uri, "--out", str(tmp_path / "p.csv")]
    nothing = subprocess.run([*args, "--model", "models:/tiny/1", "--images", str(tmp_path / "empty")],
                             env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert nothing.returncode == 2 and "no image files" in nothing.stderr
    (tmp_path / "x.png").write_bytes(PNGS[0].read_bytes())
    wrong = subprocess.run([*args, "--model", "models:/tiny/7", "--images", str(tmp_path / "x.png")],
                           env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr and "tiny" in wrong.stderr, wrong.stderr[-2000:]


def test_predict_says_yes_or_no_at_the_recorded_thresholds_and_warns_of_phantoms(registered, phantom_shards, tmp_path,
                                                                                  caplog):
    """After a recorded `cxr evaluate` of the registered version, `cxr predict` adds a yes/no column per finding at
    the thresholds chosen on validation (at sensitivity 0.9, or Youden's J) and says so in the table's metadata; a
    model whose run was trained on `cxr synth` phantoms is warned about in the log and the metadata."""
    import json
    import logging

    import mlflow
    import pyarrow.parquet as pq

    from cxr import config as cfgmod
    from cxr.data import source as sources
    from cxr.evaluation.evaluate import evaluate
    from cxr.predict import predict
    from cxr.tracking.runs import run_tags

    uri, model = registered
    folder = tmp_path / "films"
    folder.mkdir()
    for png in PNGS:
        (folder / png.name).write_bytes(png.read_bytes())
    before = predict(model, str(folder), str(tmp_path / "before.csv"), tracking_uri=uri, progress=False)
    assert before.thresholds is None and not [c for c in pd.read_csv(tmp_path / "before.csv") if "positive" in c]

    rep = evaluate(model, data_uri=phantom_shards, tracking_uri=uri, resamples=20).report  # records: thresholds
    cfg = cfgmod.load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"),
                      [f"data.manifest_uri={phantom_shards}"])
    assert sources.synthetic(cfg.data) and run_tags(cfg, "f" * 64)["cxr.data.synthetic"] == "true"
    client = mlflow.MlflowClient(uri)
    client.set_tag(client.get_model_version("tiny", "1").run_id, "cxr.data.synthetic", "true")  # as training tags

    with caplog.at_level(logging.WARNING, logger="cxr.predict"):
        s = predict(model, str(folder), str(tmp_path / "p.csv"), tracking_uri=uri, progress=False)
    assert "phantoms" in caplog.text and s.thresholds and "sensitivity 0.9 on the val split" in s.thresholds
    table = pd.read_csv(tmp_path / "p.csv", dtype=str)
    meta = json.loads((tmp_path / "p.meta.json").read_text())
    assert meta["synthetic_training_data"] and meta["operating_point"] == "sensitivity"
    probs = table[list(FINDINGS)]
    assert all(len(v.split(".")[1]) <= 4 for v in probs.to_numpy().ravel())  # 4 places in a table for reading
    for f in FINDINGS:
        t = rep["findings"][f]["thresholds"]["at_sensitivity"]
        assert meta["thresholds"][f] == t
        got = list(table[f"{f} positive"].fillna(""))
        for p, said in zip(probs[f].astype(float), got, strict=True):  # 4 places: a tie within 1e-4 may go either way
            assert said == "" if t is None else abs(p - t) < 1e-4 or said == ("yes" if p >= t else "no"), (f, p, t)
    assert table.columns.get_loc(f"{FINDINGS[0]} positive") == len(FINDINGS) + 1  # after the probabilities

    youden = predict(model, str(folder), str(tmp_path / "y.parquet"), tracking_uri=uri, progress=False,
                     operating_point="youden")
    stored = json.loads(pq.read_schema(tmp_path / "y.parquet").metadata[b"cxr"])
    assert "Youden" in youden.thresholds and stored["thresholds"] == {
        f: rep["findings"][f]["thresholds"]["youden"] for f in FINDINGS}


def test_predict_that_reads_no_image_exits_non_zero_with_the_errors_listed(registered, tmp_path):
    """Before: "predicted 0 of 1 images", exit 0."""
    uri, model = registered
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    run = subprocess.run([sys.executable, "-m", "cxr.cli", "predict", "--model", model, "--tracking-uri", uri,
                          "--images", str(tmp_path / "notes.png"), "--out", str(tmp_path / "p.csv")],
                         env=quiet_env(), capture_output=True, text=True, timeout=600)
    for kept in re.findall(r"folder \(its logs\) is kept: (\S+)", run.stderr):  # a failure keeps it
        shutil.rmtree(kept)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "predicted 0 of 1 images" in run.stdout
    assert "cxr predict: error: none of the 1 images could be read" in run.stderr
    errors = pd.read_csv(tmp_path / "p.errors.csv")
    assert list(errors["path"]) == [str(tmp_path / "notes.png")] and "not an image" in errors["error"][0]
