"""`cxr synth --layout`: phantoms in each published layout, read back by the built-in spec of that name, every
planted quirk reported by `cxr inspect` at exactly the count synth-quirks.json records; NIH's output unchanged."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr import cli, labelmap, labels, synth
from cxr.data import images, spec, spec_summary
from cxr.data.manifest import SYNTHETIC
from cxr.synth import layout, layouts

SIZE = 64
PATIENTS = 12  # ~36 images
IMAGE_ENDINGS = (".jpg", ".png", ".dcm")


def _tree(root: str) -> dict[str, str]:
    """Every file under root → sha256 of its bytes."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_nih_layout_is_todays_output_byte_for_byte(tmp_path):
    """--layout nih, the default and synthesize_layout('nih') write what `cxr synth` wrote before layouts."""
    args = ["--patients", "4", "--size", "32", "--seed", "0", "--workers", "1"]
    assert cli.main(["synth", str(tmp_path / "flag"), "--layout", "nih", *args]) == 0
    assert cli.main(["synth", str(tmp_path / "default"), *args]) == 0
    synth.synthesize_layout(str(tmp_path / "api"), "nih", 4, size=32, seed=0, workers=1, progress=False)
    tree = _tree(str(tmp_path / "flag"))
    assert tree == _tree(str(tmp_path / "default")) == _tree(str(tmp_path / "api"))
    assert len(tree) == 5 + 23 and layouts.QUIRKS_FILE not in tree and SYNTHETIC in tree  # the phantoms' mark
    # sha256 of the text files as the code before `--layout` wrote them (same arguments)
    assert {k: v for k, v in tree.items() if not k.endswith(".png") and k != SYNTHETIC} == {
        "BBox_List_2017.csv": "db0a7e3c771884cbbcdb00ede4a9c3a7f6e08085b61d73bbb2408ca12ef8381b",
        "Data_Entry_2017_v2020.csv": "1f1ac89d979fb76ecce728788d204821934faeb70a6903dbfb59d53a2fe91c4b",
        "test_list.txt": "54d854d06d6fef01fbd793b401d2f10f646183843de9bc81946694721f7a8b69",
        "train_val_list.txt": "4c906ced67abae9a277f2e81bf86ec4a8b19a3a725f2368c09cfdc0a60f4cb6c"}


@pytest.fixture(scope="module", params=["chexpert", "mimic-cxr-jpg", "padchest", "csv"])
def messy(request, tmp_path_factory) -> tuple[str, str, dict]:
    root = str(tmp_path_factory.mktemp(request.param))
    synth.synthesize_layout(root, request.param, PATIENTS, size=SIZE, seed=7, messy=True, workers=1,
                            progress=False)
    with open(os.path.join(root, layouts.QUIRKS_FILE)) as fh:
        return request.param, root, json.load(fh)


def test_inspect_reports_exactly_the_recorded_quirks(messy):
    name, root, record = messy
    assert record["quirks"] == {q: 2 for q in layouts.QUIRKS[name]}  # 5% of ~36 rows, each quirk planted
    s = spec_summary.inspect(name, root, scan_images=True)
    for key, value in record["expected"].items():
        assert s[key] == value, key
    q, problems = record["quirks"], s["problem_counts"]
    assert problems.get("view_filtered") == q["lateral_view"] and problems["missing_image"] == q["missing_image"]
    assert problems.get("unknown_sex") == q.get("unknown_sex") and problems.get("unparseable_labels") == q.get(
        "unparseable_labels")
    assert sum(s["uncertain_counts"].values()) == q.get("uncertain_label", 0) + q.get("blank_label", 0)
    assert s["rows"] == s["usable_rows"] + q["lateral_view"] + q["missing_image"] + q.get("unparseable_labels", 0)
    missing = {p["image"] for p in s["problems"] if p["kind"] == "missing_image"}
    assert missing == set(record["where"]["missing_image"])


def test_every_image_decodes_and_the_image_quirks_are_in_the_files(messy):
    name, root, record = messy
    found = [os.path.join(f, n) for f, _, ns in os.walk(root) for n in ns if n.endswith(IMAGE_ENDINGS)]
    assert len(found) == record["images_written"] == record["expected"]["rows"] - record["quirks"]["missing_image"]
    twelve, monochrome1 = 0, 0
    for path in found:
        with open(path, "rb") as fh:
            data = fh.read()
        assert images.decode(data, name=path).shape == (SIZE, SIZE)
        if path.endswith(".png"):
            with Image.open(path) as im:
                assert im.mode == "I;16"
                twelve += int(np.asarray(im).max() < 4096)
        if path.endswith(".dcm"):
            ds = pydicom.dcmread(path)
            assert (ds.BitsAllocated, ds.BitsStored) == (16, 12)
            monochrome1 += ds.PhotometricInterpretation == "MONOCHROME1"
    assert twelve == record["quirks"].get("png_12bit", 0)
    assert monochrome1 == record["quirks"].get("monochrome1", 0)


@pytest.mark.parametrize("name", ["chexpert", "padchest"])
def test_a_clean_root_labels_every_shared_finding_exactly_as_its_phantom_shows_it(name, tmp_path, capsys):
    synth.synthesize_layout(str(tmp_path), name, PATIENTS, size=32, seed=3, workers=1, progress=False)
    assert cli.main(["inspect", str(tmp_path), "--dataset", name, "--json", "--scan-images"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["problem_counts"] == {} and s["rows"] == s["usable_rows"] == s["images_checked"] * s["rows"]
    y = np.stack([r.y for r in layout._plan(PATIENTS, 3)])
    pairs = labelmap.shared(labels.FINDINGS, spec.load(name)[0].labels.names)
    assert len(pairs) == {"chexpert": 7, "padchest": 14}[name]
    for nih, theirs in pairs:
        assert s["label_counts"][theirs] == int(y[:, labels.INDEX[nih]].sum()), theirs
    if name == "chexpert":  # Lung Lesion covers Mass and Nodule: positive at least wherever they are
        lesion = y[:, [labels.INDEX["Mass"], labels.INDEX["Nodule"]]].any(axis=1).sum()
        assert s["label_counts"]["Lung Lesion"] >= lesion
        assert s["label_counts"]["No Finding"] <= int((y.sum(axis=1) == 0).sum())


@pytest.mark.parametrize("kind", ["jpeg", "png16", "png12", "dicom", "dicom1"])
def test_each_encoding_decodes_to_the_phantoms_pixels(kind):
    img = np.random.default_rng(0).integers(0, 256, size=(40, 48), dtype=np.uint8)
    img[:, :24] = np.linspace(0, 255, 24, dtype=np.uint8)  # a smooth half, for JPEG
    job = layout._Job(0, "x", np.zeros(labels.NUM_FINDINGS), "PA", 0, 48, kind)
    back = images.decode(layouts.encode(img, job)).astype(int)
    if kind == "jpeg":
        assert np.abs(back[:, :24] - img[:, :24]).mean() < 2
    else:  # MONOCHROME1 is stored inverted and decoded upright
        np.testing.assert_array_equal(back, img)


def test_an_unknown_layout_and_too_few_rows_for_the_quirks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layout 'vindr': not one of nih, chexpert"):
        synth.synthesize_layout(str(tmp_path), "vindr", 3)
    with pytest.raises(ValueError, match="messy padchest: needs at least"):
        synth.synthesize_layout(str(tmp_path), "padchest", 1, size=32, seed=1, messy=True, workers=1,
                                progress=False)  # 2 images, 3 row quirks


def test_a_messy_run_over_a_clean_root_removes_the_images_it_lists_as_missing(tmp_path):
    """csv paths repeat from run to run (dicom/PATIENT/STUDY/N.dcm): a missing image must not survive."""
    for messy in (False, True):
        synth.synthesize_layout(str(tmp_path), "csv", PATIENTS, size=32, seed=2, messy=messy, workers=1,
                                progress=False)
    record = json.loads((tmp_path / layouts.QUIRKS_FILE).read_text())
    assert not any(os.path.exists(tmp_path / image) for image in record["where"]["missing_image"])
    s = spec_summary.inspect("csv", str(tmp_path), scan_images=True)
    assert s["problem_counts"] == record["expected"]["problem_counts"] and s["problem_counts"]["missing_image"] == 2
