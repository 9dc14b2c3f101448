"""The synthetic NIH-shaped dataset: exact layout, determinism, splits, boxes, NIH's defects, and phantoms
whose findings are localized and distinct (what a CNN trained on them has to rely on)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from cxr import labels, synth
from cxr.data import metadata
from cxr.synth import anatomy, findings

SIZE = 64
PATIENTS = 90  # ~300 images
ROW = re.compile(r"^(\d{8})_(\d{3})\.png,([A-Za-z_| ]+),(\d+),(\d+),(\d+),([MF]),(PA|AP),(\d+),(\d+),"
                 r"([0-9.]+),([0-9.]+)$")
BBOX_ROW = re.compile(r"^(\d{8}_\d{3}\.png),([A-Za-z_]+),(\d+\.\d+),(\d+\.\d+),(\d+\.\d+),(\d+\.\d+),,,$")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("clean"))
    return root, synth.synthesize(root, patients=PATIENTS, size=SIZE, seed=3, workers=2, progress=False)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("messy"))
    return root, synth.synthesize(root, patients=40, size=SIZE, seed=5, messy=True, workers=1, progress=False)


def read(root: str, name: str) -> bytes:
    with open(os.path.join(root, name), "rb") as fh:
        return fh.read()


def lines(root: str, name: str) -> list[str]:
    return read(root, name).decode().splitlines()


def pixels(root: str, image: str) -> np.ndarray:
    with Image.open(os.path.join(root, "images", image)) as im:
        return np.asarray(im)


def csv_rows(root: str, name: str = metadata.DATA_ENTRY) -> list[list[str]]:
    """Data rows split on commas, the two bracketed header columns being plain numbers in rows."""
    return [line.split(",") for line in lines(root, name)[1:]]


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_pixels_whatever_the_workers(clean, tmp_path):
    root, summary = clean
    again = synth.synthesize(str(tmp_path), patients=PATIENTS, size=SIZE, seed=3, workers=1, progress=False)
    for name in (metadata.DATA_ENTRY, metadata.BBOX_NAME, metadata.TRAIN_VAL_LIST, metadata.TEST_LIST):
        assert read(root, name) == read(str(tmp_path), name), name
    images = [r[0] for r in csv_rows(root)]
    for image in images[:: max(1, len(images) // 12)]:
        np.testing.assert_array_equal(pixels(root, image), pixels(str(tmp_path), image))
    assert {k: v for k, v in again.items() if k not in ("seconds", "out_root")} == \
        {k: v for k, v in summary.items() if k not in ("seconds", "out_root")}


def test_a_rerun_into_the_same_root_leaves_exactly_the_new_dataset(tmp_path):
    synth.synthesize(str(tmp_path), patients=6, size=32, seed=0, workers=1, progress=False)
    synth.synthesize(str(tmp_path), patients=2, size=32, seed=0, messy=False, workers=1, progress=False)
    assert sorted(os.listdir(tmp_path / "images")) == sorted(r[0] for r in csv_rows(str(tmp_path)))


def test_different_seed_differs(clean, tmp_path):
    root, _ = clean
    synth.synthesize(str(tmp_path), patients=PATIENTS, size=SIZE, seed=4, workers=1, progress=False)
    assert read(root, metadata.DATA_ENTRY) != read(str(tmp_path), metadata.DATA_ENTRY)
    assert not np.array_equal(pixels(root, "00000001_000.png"), pixels(str(tmp_path), "00000001_000.png"))


def test_render_is_a_function_of_the_rng_state():
    a, boxes_a = synth.render(["Mass", "Effusion"], np.random.default_rng(7), 96)
    b, boxes_b = synth.render(["Effusion", "Mass"], np.random.default_rng(7), 96)
    np.testing.assert_array_equal(a, b)
    assert boxes_a == boxes_b and set(boxes_a) == {"Mass", "Effusion"}
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    with pytest.raises(ValueError, match="Pneumonitis"):
        synth.render(["Pneumonitis"], np.random.default_rng(0), 64)


# ------------------------------------------------------------------------------------------------ layout


def test_data_entry_header_and_rows_are_nih_shaped(clean):
    root, summary = clean
    text = lines(root, metadata.DATA_ENTRY)
    assert text[0] == metadata.HEADER
    assert not os.path.exists(os.path.join(root, "Data_Entry_2017.csv"))
    patients: dict[int, list[tuple[int, int]]] = {}
    views = []
    for line in text[1:]:
        m = ROW.match(line)
        assert m, line
        pid_text, fu_text, label_text, followup, pid, age, _, view, w, h, sx, sy = m.groups()
        assert int(pid_text) == int(pid) and int(fu_text) == int(followup)
        vec, unknown = labels.parse(label_text)
        assert not unknown and labels.format_labels(vec) == label_text  # canonical order, or "No Finding"
        assert 1 <= int(age) <= 100
        assert (int(w), int(h)) == (SIZE, SIZE)
        assert sx == sy and float(sx) == pytest.approx(0.143 * 1024 / SIZE, rel=1e-4)
        patients.setdefault(int(pid), []).append((int(followup), int(age)))
        views.append(view)
    assert sorted(patients) == list(range(1, PATIENTS + 1))
    for visits in patients.values():
        assert [f for f, _ in visits] == list(range(len(visits)))
        assert [a for _, a in visits] == sorted(a for _, a in visits)  # ages never go down
    assert 2.5 <= len(text[1:]) / PATIENTS <= 4.5
    assert 0.45 <= views.count("PA") / len(views) <= 0.75
    assert summary["images"] == len(text) - 1 and summary["patients"] == PATIENTS


def test_every_finding_has_positives_and_no_finding_is_common(clean):
    root, summary = clean
    y = np.stack([labels.parse(r[1])[0] for r in csv_rows(root)])
    counts = dict(zip(labels.FINDINGS, y.sum(axis=0).tolist(), strict=True))
    assert counts == summary["label_counts"]
    assert min(counts.values()) >= 8, counts
    assert 0.3 <= (y.sum(axis=1) == 0).mean() <= 0.6
    assert y.sum(axis=1).max() <= 3
    assert counts["Infiltration"] > counts["Hernia"]


def test_split_lists_are_patient_disjoint_and_cover_every_row(clean):
    root, summary = clean
    train_val, test = lines(root, metadata.TRAIN_VAL_LIST), lines(root, metadata.TEST_LIST)
    images = [r[0] for r in csv_rows(root)]
    assert sorted(train_val + test) == sorted(images)
    assert not set(train_val) & set(test)
    patient = {name: name.split("_")[0] for name in images}
    assert not {patient[n] for n in train_val} & {patient[n] for n in test}
    n_test_patients = len({patient[n] for n in test})
    assert 0.12 * PATIENTS <= n_test_patients <= 0.28 * PATIENTS
    assert (summary["train_val"], summary["test"]) == (len(train_val), len(test))


def test_bbox_list_is_nih_shaped_and_boxes_only_test_positives(clean):
    root, summary = clean
    text = lines(root, metadata.BBOX_NAME)
    assert text[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    rows = {r[0]: labels.parse(r[1])[0] for r in csv_rows(root)}
    test = set(lines(root, metadata.TEST_LIST))
    seen = set()
    for line in text[1:]:
        m = BBOX_ROW.match(line)
        assert m, line
        image, label = m.group(1), m.group(2)
        x, y, w, h = map(float, m.groups()[2:])
        assert label != "Infiltration"  # NIH spells it "Infiltrate" in this file
        finding = labels.canonical(label)
        assert finding in synth.BOXED
        assert image in test and rows[image][labels.INDEX[finding]] == 1
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        assert (image, finding) not in seen
        seen.add((image, finding))
    positives = sum(int(rows[i][labels.INDEX[f]]) for i in test for f in synth.BOXED)
    assert 0 < len(seen) == summary["bboxes"] < positives


def test_images_are_8bit_grayscale_of_the_requested_size(clean):
    root, _ = clean
    names = sorted(os.listdir(os.path.join(root, "images")))
    assert names == sorted(r[0] for r in csv_rows(root))
    for name in names[::25]:
        with Image.open(os.path.join(root, "images", name)) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (SIZE, SIZE)
            assert np.asarray(im).std() > 10  # an actual picture, not a blank


def test_the_metadata_stage_reads_a_clean_root_without_problems(clean):
    root, summary = clean
    ds = metadata.load(root, scan_images=True, workers=2)
    assert ds.problems == [] and ds.official_split
    assert len(ds.table) == summary["images"] and len(ds.bboxes) == summary["bboxes"]


# ------------------------------------------------------------------------------------------------- messy


def test_messy_records_one_of_each_defect_on_distinct_train_val_images(messy):
    root, summary = messy
    d = summary["defects"]
    kinds = {"rgba_image", "16bit_image", "truncated_image", "missing_image", "impossible_age",
             "duplicate_image", "not_in_csv", "unknown_label"}
    assert set(d) == kinds | {"csv_variant"} and d["csv_variant"] == "2017"
    images = [d[k] for k in kinds]
    assert len(set(images)) == len(images)
    assert set(images) <= set(lines(root, metadata.TRAIN_VAL_LIST))


def test_messy_csv_is_the_2017_variant_with_its_row_defects(messy):
    root, summary = messy
    d = summary["defects"]
    assert not os.path.exists(os.path.join(root, metadata.DATA_ENTRY))
    text = lines(root, "Data_Entry_2017.csv")
    assert text[0] == metadata.HEADER + "," and all(line.endswith(",") for line in text)
    by_image: dict[str, list[str]] = {}
    for line in text[1:]:
        by_image.setdefault(line.split(",")[0], []).append(line)
    assert len(text) - 1 == summary["images"] + 1  # the duplicate row is extra
    assert [len(v) for k, v in by_image.items() if len(v) > 1] == [2]
    dup = by_image[d["duplicate_image"]]
    assert dup[0] == dup[1] and text.index(dup[0]) + 1 == text.index(dup[0], text.index(dup[0]) + 1)
    assert by_image[d["impossible_age"]][0].split(",")[4] == "414"
    unknown = by_image[d["unknown_label"]][0].split(",")[1]
    vec, bad = labels.parse(unknown)
    assert bad == ["Pneumonitis"] and unknown.endswith("Pneumonitis")
    assert d["not_in_csv"] not in by_image
    assert d["missing_image"] in by_image


def test_messy_image_files_have_nih_defects(messy):
    root, summary = messy
    d = summary["defects"]
    path = os.path.join(root, "images")
    with Image.open(os.path.join(path, d["rgba_image"])) as im:
        assert im.mode == "RGBA"
        px = np.asarray(im)
        assert (px[..., 3] == 255).all()
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    with Image.open(os.path.join(path, d["16bit_image"])) as im:
        assert im.mode == "I;16"
        px = np.asarray(im).astype(np.int64)
        assert (px % 257 == 0).all() and px.max() > 255
    with pytest.raises(OSError), Image.open(os.path.join(path, d["truncated_image"])) as im:
        im.load()
    assert not os.path.exists(os.path.join(path, d["missing_image"]))
    assert not os.path.exists(os.path.join(path, d["not_in_csv"]))
    others = set(os.listdir(path)) - {d[k] for k in ("rgba_image", "16bit_image", "truncated_image")}
    for name in sorted(others)[::10]:
        with Image.open(os.path.join(path, name)) as im:
            assert im.mode == "L"


def test_the_metadata_stage_finds_every_messy_defect(messy):
    root, summary = messy
    ds = metadata.load(root, scan_images=True, workers=2)
    found = {(p.kind, p.image) for p in ds.problems}
    d = summary["defects"]
    for kind in ("rgba_image", "16bit_image", "missing_image", "impossible_age", "duplicate_image",
                 "not_in_csv", "unknown_label"):
        assert (kind, d[kind]) in found, kind
    assert ("unreadable_image", d["truncated_image"]) in found
    assert ds.csv_name == "Data_Entry_2017.csv"


# ------------------------------------------------------------------------------------------- phantoms


def finding_diff(finding: str, seed: int = 11, size: int = 128, view: str = "PA"):
    """The same phantom with and without one finding: signed pixel difference and the finding's boxes."""
    with_it, boxes = synth.render([finding], np.random.default_rng(seed), size, view)
    without, _ = synth.render([], np.random.default_rng(seed), size, view)
    return with_it.astype(np.int16) - without.astype(np.int16), boxes


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]


@pytest.mark.parametrize("finding", labels.FINDINGS)
def test_each_finding_changes_only_a_region_and_its_box_encloses_it(finding):
    for seed in (11, 12, 13):
        diff, boxes = finding_diff(finding, seed)
        changed = np.abs(diff) > 12
        assert changed.sum() >= 3, (finding, seed)
        if finding != "Emphysema":  # the only finding that reshapes both whole lungs
            assert (diff != 0).mean() < 0.3, (finding, seed)
        if finding in synth.BOXED:
            x, y, w, h = boxes[finding]
            ys, xs = np.nonzero(changed)
            assert x <= xs.min() and xs.max() + 1 <= x + w, finding
            assert y <= ys.min() and ys.max() + 1 <= y + h, finding
        else:
            assert finding not in boxes


def test_findings_sit_where_they_plausibly_are():
    def where(finding: str, seed: int) -> tuple[float, float]:
        return centroid(np.abs(finding_diff(finding, seed)[0]) > 12)

    for seed in range(20, 26):
        cx, cy = where("Cardiomegaly", seed)
        assert 0.4 <= cx <= 0.75 and 0.45 <= cy <= 0.85
        assert where("Effusion", seed)[1] > 0.55
        assert where("Consolidation", seed)[1] < 0.5
        assert where("Pneumonia", seed)[1] > 0.45
        cx, cy = where("Hernia", seed)
        assert 0.4 <= cx <= 0.62 and cy > 0.5
        edema = np.abs(finding_diff("Edema", seed)[0]) > 12
        assert edema[:, :64].sum() > 20 and edema[:, 64:].sum() > 20  # bilateral


def test_nodule_is_small_and_mass_is_larger():
    nodule = [(np.abs(finding_diff("Nodule", s)[0]) > 20).mean() for s in range(30, 36)]
    mass = [(np.abs(finding_diff("Mass", s)[0]) > 20).mean() for s in range(30, 36)]
    # a nodule (or two) covers well under 0.25% of the image; a mass 6-11% across covers 0.3-1.5%
    assert max(nodule) < 0.0025 < 0.003 < min(mass)
    assert max(mass) < 0.02 and np.median(mass) > 3 * np.median(nodule)


def test_lucent_findings_darken_and_opacities_brighten():
    for seed in (40, 41, 42):
        assert finding_diff("Emphysema", seed)[0].mean() < 0
        ptx = finding_diff("Pneumothorax", seed)[0]
        assert (ptx < -12).sum() > (ptx > 12).sum()
        for finding in ("Consolidation", "Effusion", "Mass", "Pleural_Thickening"):
            assert finding_diff(finding, seed)[0].mean() > 0, finding


def test_ap_films_never_reach_a_cardiomegalic_heart():
    """AP magnifies the heart a little; the cardiothoracic ratio stays clearly apart from Cardiomegaly's."""
    def ctr(view: str, present: set[str], seed: int) -> float:
        streams = [np.random.default_rng([seed, i]) for i in range(2 + labels.NUM_FINDINGS)]
        a = findings.global_findings(anatomy.sample_anatomy(streams[0], view), present, streams)
        return a.ctr

    normal = [ctr(v, set(), s) for v in ("PA", "AP") for s in range(200)]
    enlarged = [ctr(v, {"Cardiomegaly"}, s) for v in ("PA", "AP") for s in range(200)]
    emphysema = [ctr("AP", {"Emphysema", "Cardiomegaly"}, s) for s in range(50)]
    assert max(normal) < 0.5 < 0.55 < min(enlarged + emphysema)
