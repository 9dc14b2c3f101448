"""`cxr predict` on real files: NIH PNGs, the same pixels as DICOMs (MONOCHROME1 12-bit included), JPEG, RGBA, and
files that cannot be read, through Ray Data, against a model registered in a real MLflow store."""

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
                          str(tmp_path / "studies"), "--out", str(out), "--tracking-uri", uri, "--batch-size", "4"],
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
