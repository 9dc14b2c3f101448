"""`cxr explain` end to end on real files: a synthetic NIH-shaped root with its BBox list (one annotated image
broken), the NIH sample PNGs and a DICOM of the same pixels, against a model logged in a real MLflow store."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import quiet_env, register_seeded_model
from PIL import Image
from test_dicom import PNGS, write_dicom

from cxr.data import metadata
from cxr.explain import localization as loc
from cxr.explain.gradcam import TRUE_COLOUR

pytestmark = pytest.mark.slow
SIZE = 64


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[str, str, str]:
    """(tracking URI, models:/ URI, run id) of a seeded small_cnn registered in a SQLite store."""
    return register_seeded_model(tmp_path_factory.mktemp("explain-model"), "tiny-explain", SIZE, 11)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("explain-data") / "root"
    subprocess.run([sys.executable, "-m", "cxr.cli", "synth", str(out), "--patients", "60", "--size", "96",
                    "--seed", "5"], check=True, capture_output=True, env=quiet_env(), timeout=300)
    return str(out)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.cli", "explain", *args], env=quiet_env(),
                          capture_output=True, text=True, timeout=600)


def test_explain_scores_every_annotated_image_and_lists_the_unreadable(logged, root, tmp_path):
    uri, model, run_id = logged
    boxes = pd.read_csv(f"{root}/{metadata.BBOX_NAME}")
    test_images = set(open(f"{root}/{metadata.TEST_LIST}").read().split())
    annotated = sorted(set(boxes.iloc[:, 0]) & test_images)
    assert len(annotated) >= 5
    broken = annotated[0]
    path = f"{root}/images/{broken}"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])  # an annotated image cut short, as a failed copy leaves it

    out = tmp_path / "explain"
    run = _cli("--model", model, "--tracking-uri", uri, "--data", root, "--out", str(out), "--max-overlays", "3")
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "localization.json").read_text())
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors["image"]) == [broken] and "truncated" in errors["error"][0]
    assert report["data"]["images"] == len(annotated) - 1  # every other annotated test image was scored
    assert f"explained {len(annotated) - 1} of {len(annotated)} images" in run.stdout
    assert f"1 could not be read, listed with why in {out}/errors.csv" in run.stdout

    scored = boxes[boxes.iloc[:, 0].isin(set(annotated) - {broken})]
    names = scored.iloc[:, 1].replace({"Infiltrate": "Infiltration"})
    scores = report["model_scores"]
    for finding, n in names.value_counts().items():  # each ground-truth box counted once, under NIH's names
        assert scores["counts"][finding]["boxes"] == n
    assert report["data"]["unscored_boxes"] == int((boxes.iloc[:, 0] == broken).sum())
    for metric in loc.METRICS:
        assert set(scores[metric]) == {str(t) for t in loc.T_VALUES}
        for t, row in scores[metric].items():
            for f in scores["findings"]:
                assert 0.0 <= row["acc"][f] <= 1.0 and row["afp"][f] >= 0.0, (metric, t, f)
        accs = [scores[metric][str(t)]["acc"]["mean"] for t in loc.T_VALUES]
        assert accs == sorted(accs, reverse=True)  # a stricter threshold never localizes more
    assert scores["published"]["IoBB"]["0.5"]["acc"]["mean"] == pytest.approx(0.330, abs=5e-4)
    md = (out / "localization.md").read_text()
    assert "## T(IoBB)" in md and "## T(IoU)" in md and "Wang et al. 2017 (ResNet-50)" in md
    assert "| 0.5 | Acc. Grad-CAM small_cnn |" in run.stdout and "Acc. centred box 0.5" in run.stdout

    overlays = sorted(out.glob("overlays/*/*.png"))
    assert overlays and all(len(list(d.glob("*.png"))) <= 3 for d in out.glob("overlays/*"))
    for f in {p.parent.name for p in overlays}:
        sheet = Image.open(out / "sheets" / f"{f}.png")
        assert sheet.size[0] > 200 and sheet.mode in ("RGB", "RGBA")
    first = np.asarray(Image.open(overlays[0]).convert("RGB"))
    assert min(first.shape[:2]) >= 512  # the 96 px image drawn at 512 px, not the model's 64
    green = (first == np.array(TRUE_COLOUR, np.uint8)).all(axis=-1)
    assert green[:-100].any()  # the ground-truth box is drawn on the image (the legend's swatch is below it)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    logged_files = {a.path for a in client.list_artifacts(run_id, "explain")}
    assert {"explain/localization.md", "explain/localization.json", "explain/sheets", "explain/overlays",
            "explain/errors.csv"} <= logged_files
    metric = client.get_run(run_id).data.metrics
    assert metric["localization_iobb_0.5_mean"] == pytest.approx(scores["IoBB"]["0.5"]["acc"]["mean"])


@pytest.mark.skipif(not PNGS, reason="no NIH sample PNGs in ../shared/samples")
def test_explain_images_without_ground_truth(logged, tmp_path):
    uri, model, _ = logged
    studies = tmp_path / "studies"
    studies.mkdir()
    nih = np.asarray(Image.open(PNGS[0]))
    (studies / "a.png").write_bytes(PNGS[0].read_bytes())
    (studies / "a.dcm").write_bytes(write_dicom(nih))
    (studies / "junk.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    run = _cli("--model", model, "--tracking-uri", uri, "--images", str(studies), "--out", str(out),
               "--findings", "Mass,Nodule", "--no-record")
    assert run.returncode == 0, run.stderr[-4000:]
    for f in ("Mass", "Nodule"):
        assert sorted(p.name for p in (out / "overlays" / f).iterdir()) == ["a.dcm.png", "a.png"]
        assert (out / "sheets" / f"{f}.png").exists()
    assert not (out / "localization.json").exists()  # no ground truth, no scores
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors["image"]) == ["junk.png"]
    assert "explained 2 of 3 images" in run.stdout


def test_explain_that_reads_no_image_exits_non_zero(logged, tmp_path):
    """Before: "explained 0 of 1 images …; overlays: OUT/overlays/ (0 for ); …", exit 0."""
    uri, model, _ = logged
    (tmp_path / "junk.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    run = _cli("--model", model, "--tracking-uri", uri, "--images", str(tmp_path / "junk.png"), "--out", str(out),
               "--no-record")
    for kept in re.findall(r"folder \(its logs\) is kept: (\S+)", run.stderr):  # a failure keeps it
        shutil.rmtree(kept)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "explained 0 of 1 images" in run.stdout and "overlays:" not in run.stdout
    assert "cxr explain: error: none of the 1 images could be read" in run.stderr
    assert list(pd.read_csv(out / "errors.csv")["image"]) == ["junk.png"]


def test_explain_refuses_unknown_findings_and_data_without_boxes(logged, root, tmp_path):
    uri, model, _ = logged
    bad = _cli("--model", model, "--tracking-uri", uri, "--data", root, "--out", str(tmp_path / "o"),
               "--findings", "Masss")
    assert bad.returncode == 2 and "unknown finding(s) Masss" in bad.stderr, bad.stderr[-2000:]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (metadata.DATA_ENTRY, metadata.TRAIN_VAL_LIST, metadata.TEST_LIST):
        (bare / name).write_bytes(open(f"{root}/{name}", "rb").read())
    none = _cli("--model", model, "--tracking-uri", uri, "--data", str(bare), "--out", str(tmp_path / "o"))
    assert none.returncode == 2 and "BBox_List_2017.csv" in none.stderr, none.stderr[-2000:]
    assert "Traceback" not in bad.stderr + none.stderr


def test_explain_images_logs_to_the_run_only_when_asked(logged, root, tmp_path):
    """Arbitrary files' overlays are not the model's evidence: they stay out of its MLflow run without --record
    (the annotated set's logging is checked above; `--record` asks for it on --images)."""
    from mlflow.tracking import MlflowClient

    from cxr.cli import parse

    uri, model, run_id = logged
    client = MlflowClient(uri)
    before = {a.path for a in client.list_artifacts(run_id, "explain/overlays/Mass")}
    studies = tmp_path / "studies"
    studies.mkdir()
    readable = [p for p in sorted((Path(root) / "images").glob("*.png")) if _opens(p)][:2]  # one may be cut short
    names = [f"study-{i}.png" for i in range(len(readable))]
    for name, p in zip(names, readable, strict=True):
        (studies / name).write_bytes(p.read_bytes())
    out = tmp_path / "plain"
    run = _cli("--model", model, "--tracking-uri", uri, "--images", str(studies), "--out", str(out),
               "--findings", "Mass")
    assert run.returncode == 0, run.stderr[-4000:]
    assert {a.path for a in client.list_artifacts(run_id, "explain/overlays/Mass")} == before
    assert "logged to MLflow run" not in run.stdout
    for n in names:
        with Image.open(out / "overlays" / "Mass" / n) as im:
            assert min(im.size) >= 512  # the 96 px image drawn at 512 px
    asked = parse(["explain", "--model", model, "--images", str(studies), "--out", str(out), "--record"])
    assert asked.record and not asked.no_record


def _opens(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False
