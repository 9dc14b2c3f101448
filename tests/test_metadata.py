"""The metadata layer on real files: NIH's CSV variants and quirks, the real sample PNGs, splits, problems."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

from cxr import labels
from cxr.data import metadata

HEADER_2020 = metadata.HEADER
SAMPLE_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.14300000000000002,0.14300000000000002",
    "00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171",
    "00000013_003.png,Pleural_Thickening,28,13,60,M,AP,2996,2544,0.139,0.139",
]


def _rows(n_patients: int = 40, per_patient: int = 3, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        for f in range(per_patient):
            y = (rng.random(labels.NUM_FINDINGS) < 0.15).astype(np.uint8)
            rows.append(f"{p:08d}_{f:03d}.png,{labels.format_labels(y)},{f},{p},{30 + p % 50},F,PA,"
                        "1024,1024,0.143,0.143")
    return rows


def set_field(row: str, index: int, value: str) -> str:
    parts = row.split(",")
    parts[index] = value
    return ",".join(parts)


def write_csv(root, rows: list[str], variant: str = "2020") -> None:
    os.makedirs(root, exist_ok=True)
    if variant == "2020":
        text = "\n".join([HEADER_2020, *rows]) + "\n"
        name = "Data_Entry_2017_v2020.csv"
    else:  # NIH's original: same header plus a trailing comma on every line (an empty 12th column)
        text = "\n".join(line + "," for line in [HEADER_2020, *rows]) + "\n"
        name = "Data_Entry_2017.csv"
    with open(os.path.join(root, name), "w") as fh:
        fh.write(text)


def write_lists(root, train_val: list[str], test: list[str]) -> None:
    for name, items in (("train_val_list.txt", train_val), ("test_list.txt", test)):
        with open(os.path.join(root, name), "w") as fh:
            fh.write("\n".join(items) + "\n")


def _images(rows: list[str]) -> list[str]:
    return [r.split(",")[0] for r in rows]


def test_real_samples_decode_and_label(tmp_path):
    root = tmp_path / "nih"
    os.makedirs(root / "images")
    for name in _images(SAMPLE_ROWS):
        shutil.copy(os.path.join(SAMPLES, name), root / "images" / name)
    write_csv(root, SAMPLE_ROWS)
    ds = metadata.load(str(root), scan_images=True)
    assert ds.problems == []
    t = ds.table.set_index("image")
    assert t.loc["00000001_000.png", "Cardiomegaly"] == 1 and t.loc["00000001_000.png", labels.FINDINGS].sum() == 1
    assert t.loc["00000002_000.png", list(labels.FINDINGS)].sum() == 0
    assert t.loc["00000013_003.png", "Pleural_Thickening"] == 1
    assert t.loc["00000013_003.png", "followup"] == 28 and t.loc["00000013_003.png", "view"] == "AP"
    for name in t.index:
        with Image.open(t.loc[name, "path"]) as im:
            assert im.mode == "L" and im.size == (1024, 1024)
            px = np.asarray(im)
        assert px.std() > 10  # a real radiograph, decoded


def test_both_csv_variants_give_the_same_table(tmp_path):
    rows = _rows()
    write_csv(tmp_path / "a", rows, "2020")
    write_csv(tmp_path / "b", rows[:5] + [set_field(rows[5], 4, "414")] + rows[6:], "2017")
    a = metadata.load(str(tmp_path / "a"))
    b = metadata.load(str(tmp_path / "b"))
    assert a.csv_name == "Data_Entry_2017_v2020.csv" and b.csv_name == "Data_Entry_2017.csv"
    cols = ["image", "patient", "split", *labels.FINDINGS]
    assert a.table[cols].equals(b.table[cols])
    assert [p.kind for p in b.problems] == ["impossible_age"]
    assert "414" in b.problems[0].detail and b.problems[0].image == rows[5].split(",")[0]
    assert np.isnan(b.table.set_index("image").loc[rows[5].split(",")[0], "age"])
    assert metadata.summary(a)["label_counts"] == metadata.summary(b)["label_counts"]


def test_bbox_quirks(tmp_path):
    rows = _rows(10, 1)
    write_csv(tmp_path, rows)
    names = _images(rows)
    with open(tmp_path / "BBox_List_2017.csv", "w") as fh:
        fh.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        fh.write(f"{names[0]},Infiltrate,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n")
        fh.write(f"{names[1]},Atelectasis,10.5,20.25,30,40,,,\n")
        fh.write(f"{names[1]},Infiltrate,1,2,3,4,,,\n")
        fh.write(f"{names[2]},Pneumonitis,1,2,3,4,,,\n")
        fh.write("99999999_000.png,Mass,1,2,3,4,,,\n")
    ds = metadata.load(str(tmp_path))
    s = metadata.summary(ds)
    assert s["bboxes"]["total"] == 3 and s["bboxes"]["images"] == 2
    assert s["bboxes"]["per_finding"]["Infiltration"] == 2 and s["bboxes"]["per_finding"]["Atelectasis"] == 1
    assert ds.bboxes.loc[0, "x"] == pytest.approx(225.084745762712)
    kinds = {p.kind: p for p in ds.problems}
    assert kinds["unknown_bbox_label"].image == names[2] and "Pneumonitis" in kinds["unknown_bbox_label"].detail
    assert kinds["bbox_not_in_csv"].image == "99999999_000.png"


def test_unknown_label_is_reported_and_excluded(tmp_path):
    rows = _rows(5, 2)
    rows[3] = set_field(rows[3], 1, "Effusion|Pneumonitis")
    rows[4] = set_field(rows[4], 1, "No Finding|Mass")
    write_csv(tmp_path, rows)
    ds = metadata.load(str(tmp_path))
    bad = [p for p in ds.problems if p.kind == "unknown_label"]
    assert [p.image for p in bad] == [_images(rows)[3], _images(rows)[4]]
    assert "row 5" in bad[0].detail and "Pneumonitis" in bad[0].detail
    assert len(ds.table) == len(rows) - 2
    assert metadata.summary(ds)["excluded_rows"] == 2


def test_official_split_val_by_patient_deterministic(tmp_path):
    rows = _rows(60, 3)
    write_csv(tmp_path, rows)
    names = _images(rows)
    test_names = [n for n in names if int(n[:8]) <= 12]
    write_lists(tmp_path, [n for n in names if n not in test_names], test_names)
    a = metadata.load(str(tmp_path), seed=1, val_fraction=0.25)
    b = metadata.load(str(tmp_path), seed=1, val_fraction=0.25)
    c = metadata.load(str(tmp_path), seed=2, val_fraction=0.25)
    assert a.official_split
    assert a.table["split"].equals(b.table["split"])
    assert not a.table["split"].equals(c.table["split"])
    assert sorted(a.split("test")["image"]) == sorted(test_names)  # test is exactly test_list.txt
    assert a.split("val")["patient"].nunique() == 12  # 25% of 48 train_val patients
    s = metadata.summary(a)
    assert s["patient_overlap"] == 0
    assert sum(p["images"] for p in s["splits"].values()) == len(rows)
    for split in ("train", "val", "test"):
        others = set(a.table.loc[a.table["split"] != split, "patient"])
        assert not set(a.split(split)["patient"]) & others


def test_split_without_lists_is_patient_grouped(tmp_path):
    rows = _rows(50, 4)
    write_csv(tmp_path, rows)
    a = metadata.load(str(tmp_path), seed=3, val_fraction=0.1, test_fraction=0.2)
    assert not a.official_split
    s = metadata.summary(a)
    assert s["splits"]["test"]["patients"] == 10 and s["splits"]["val"]["patients"] == 4
    assert s["patient_overlap"] == 0
    assert a.table["split"].equals(metadata.load(str(tmp_path), seed=3).table["split"])


def test_patient_in_both_lists_and_list_errors(tmp_path):
    rows = _rows(10, 2)
    write_csv(tmp_path, rows)
    names = _images(rows)
    # patient 1 has one image in each list; one image is in no list; one listed image has no row
    write_lists(tmp_path, [names[0], *names[4:-1], "12345678_000.png"], [names[1], names[2], names[3]])
    ds = metadata.load(str(tmp_path))
    kinds = {(p.kind, p.image) for p in ds.problems}
    assert ("patient_in_both_lists", names[0]) in kinds
    assert ("not_in_split_list", names[-1]) in kinds
    assert ("not_in_csv", "12345678_000.png") in kinds
    assert metadata.summary(ds)["patient_overlap"] == 0
    assert names[0] not in set(ds.table["image"])


def test_metadata_only_root_flags_nothing_missing(tmp_path):
    write_csv(tmp_path, _rows(20, 2))
    ds = metadata.load(str(tmp_path), scan_images=True)
    assert not ds.images_present and ds.problems == []


def test_kaggle_layout_and_missing_image(tmp_path):
    rows = SAMPLE_ROWS
    write_csv(tmp_path, rows)
    names = _images(rows)
    for folder, name in (("images_001", names[0]), ("images_012", names[1])):
        os.makedirs(tmp_path / folder / "images", exist_ok=True)
        shutil.copy(os.path.join(SAMPLES, name), tmp_path / folder / "images" / name)
    ds = metadata.load(str(tmp_path))
    assert ds.images_present
    assert [(p.kind, p.image) for p in ds.problems] == [("missing_image", names[2])]
    assert ds.table.set_index("image").loc[names[1], "path"].endswith("images_012/images/" + names[1])


def test_duplicate_rows_and_bad_images(tmp_path):
    rows = _rows(6, 1)
    write_csv(tmp_path, rows + [rows[2]])
    os.makedirs(tmp_path / "images")
    names = _images(rows)
    gray = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    for n in names:
        Image.fromarray(gray).save(tmp_path / "images" / n)
    Image.fromarray(gray).convert("RGBA").save(tmp_path / "images" / names[0])
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "images" / names[1])
    data = (tmp_path / "images" / names[3]).read_bytes()
    (tmp_path / "images" / names[3]).write_bytes(data[: len(data) // 2])
    ds = metadata.load(str(tmp_path), scan_images=True)
    kinds = {p.kind: p.image for p in ds.problems}
    assert kinds == {"duplicate_image": names[2], "rgba_image": names[0], "16bit_image": names[1],
                     "unreadable_image": names[3]}
    assert sorted(ds.table["image"]) == sorted(set(names) - {names[3]})


def test_inspect_over_fsspec_memory_url(tmp_path):
    rows = _rows(8, 2)
    write_csv(tmp_path, rows)
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "Data_Entry_2017_v2020.csv"), "/nih/Data_Entry_2017_v2020.csv")
    fs.makedirs("/nih/images", exist_ok=True)
    fs.put(os.path.join(SAMPLES, "00000001_000.png"), f"/nih/images/{_images(rows)[0]}")
    ds = metadata.load("memory://nih", scan_images=True)
    local = metadata.load(str(tmp_path))
    assert ds.rows_read == local.rows_read == len(rows)
    assert sum(p.kind == "missing_image" for p in ds.problems) == len(rows) - 1
    assert list(ds.table["image"]) == [_images(rows)[0]]
    assert ds.table["path"][0] == f"memory://nih/images/{_images(rows)[0]}"
    cols = list(labels.FINDINGS)
    assert (ds.table[cols].to_numpy()[0] == local.table.set_index("image").loc[_images(rows)[0], cols]).all()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_json_contract_and_strict(tmp_path):
    rows = _rows(12, 2)
    write_csv(tmp_path, rows, "2017")
    out = _cli("inspect", f"file://{tmp_path}", "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    for key in ("rows", "patients", "label_counts", "splits", "patient_overlap", "bboxes", "problems"):
        assert key in s
    assert s["rows"] == len(rows) and s["patient_overlap"] == 0
    assert set(s["label_counts"]) == {*labels.FINDINGS, labels.NO_FINDING}
    assert set(s["splits"]) == {"train", "val", "test"}
    assert _cli("inspect", str(tmp_path), "--strict").returncode == 0
    write_csv(tmp_path, [set_field(rows[0], 4, "999")] + rows[1:], "2017")
    bad = _cli("inspect", str(tmp_path), "--strict")
    assert bad.returncode == 1 and "impossible_age" in bad.stdout
    missing = _cli("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2 and f"cxr inspect: error: no such folder: {tmp_path / 'nope'}" in missing.stderr
    (tmp_path / "empty").mkdir()
    assert "no metadata CSV" in _cli("inspect", str(tmp_path / "empty")).stderr


def test_non_utf8_byte_is_reported_by_file_line_and_column(tmp_path):
    rows = _rows(10, 2)
    write_csv(tmp_path, rows)
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    data = csv.read_bytes()
    at = data.index(rows[4].encode()) + len(rows[4]) - 2  # line 6 (header is line 1), inside the last field
    csv.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    ds = metadata.load(str(tmp_path))
    bad = [p for p in ds.problems if p.kind == "bad_encoding"]
    column = at - data.rindex(b"\n", 0, at)
    assert [(p.image, p.detail) for p in bad] == [
        ("Data_Entry_2017_v2020.csv",
         f"Data_Entry_2017_v2020.csv line 6, column {column}: byte 0xff is not UTF-8; read as U+FFFD")]
    assert len(ds.table) == len(rows)  # the byte sat in a field nothing reads: the row stays

    csv.write_bytes(b"Image \xe9ndex" + data[len("Image Index"):])  # latin-1 in the header: nothing to trust
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020\.csv: line 1, column 7: byte 0xe9 is not UTF-8"):
        metadata.load(str(tmp_path))


def test_excluded_rows_are_not_reported_again_as_missing_from_the_csv(tmp_path):
    rows = _rows(10, 2)
    rows[3] = set_field(rows[3], 1, "Cardiomegaly|Unicorn")  # unknown label: excluded for that reason
    rows[5] = set_field(rows[5], 3, "P-17")  # bad patient id
    write_csv(tmp_path, rows + [rows[7]])  # a duplicate: only the first row of an image is kept
    names = _images(rows)
    write_lists(tmp_path, names[:14], [*names[14:], "12345678_000.png"])
    ds = metadata.load(str(tmp_path))
    reported = sorted((p.kind, p.image) for p in ds.problems)
    assert reported == sorted([("unknown_label", names[3]), ("bad_patient_id", names[5]),
                               ("duplicate_image", names[7]), ("not_in_csv", "12345678_000.png")])
