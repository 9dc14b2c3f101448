"""Dataset specs on tiny files in each published layout: exact rows, patients, labels and problems per kind."""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from cxr import cli, labels
from cxr.data import metadata, spec, spec_summary, tabular

CHEXPERT = spec.load("chexpert")[0].labels.names


def _csv(path, header: list[str], rows: list[list[str]]) -> None:
    """A CSV as the real releases write them (quoted where needed); `.gz` paths are gzipped."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = buf.getvalue().encode()
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data) if str(path).endswith(".gz") else data)


def _observations(**values: str) -> list[str]:
    """CheXpert's 14 observation cells: blank unless given (keys with _ for spaces)."""
    given = {k.replace("_", " "): v for k, v in values.items()}
    return [given.get(name, "") for name in CHEXPERT]


def _counts(ds: tabular.TabularDataset) -> Counter:
    return Counter(p.kind for p in ds.problems)


@pytest.fixture
def chexpert_root(tmp_path):
    """ROOT = the parent of CheXpert-v1.0-small/; train.csv gzipped, valid.csv not."""
    small = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT]
    p = "CheXpert-v1.0-small/train/patient{:05d}/study{}/view{}_{}.jpg"
    train = [
        [p.format(1, 1, 1, "frontal"), "Female", "68", "Frontal", "AP",
         *_observations(Cardiomegaly="1.0", Edema="-1.0", Pleural_Effusion="1.0")],
        [p.format(1, 1, 2, "lateral"), "Female", "68", "Lateral", "", *_observations(Cardiomegaly="1.0")],
        [p.format(2, 1, 1, "frontal"), "Male", "55", "Frontal", "PA", *_observations(No_Finding="1.0")],
        [p.format(3, 1, 1, "frontal"), "Unknown", "", "Frontal", "AP", *_observations(Edema="2.0")],
        [p.format(4, 1, 1, "frontal"), "Male", "40", "Frontal", "AP", *_observations(Atelectasis="-1.0",
                                                                                      Pneumonia="0.0")],
        [p.format(5, 2, 1, "frontal"), "Female", "200", "Frontal", "PA", *_observations(Fracture="1")],
    ]
    v = "CheXpert-v1.0-small/valid/patient{:05d}/study1/view1_frontal.jpg"
    valid = [[v.format(64541), "Male", "73", "Frontal", "AP", *_observations(Cardiomegaly="1.0")],
             [v.format(64542), "Female", "70", "Frontal", "PA", *_observations(Pleural_Effusion="1.0")]]
    _csv(small / "train.csv.gz", header, train)
    _csv(small / "valid.csv", header, valid)
    return tmp_path


def test_chexpert_small_from_the_parent_folder_and_from_its_own(chexpert_root):
    sp = spec.load("chexpert")[0]
    ds = tabular.load(sp, str(chexpert_root))
    assert ds.files == ["CheXpert-v1.0-small/train.csv.gz", "CheXpert-v1.0-small/valid.csv"]
    assert (ds.rows_read, len(ds.table), ds.table["patient"].nunique()) == (8, 6, 6)
    assert _counts(ds) == {"view_filtered": 1, "unknown_label_value": 1, "unknown_sex": 1, "missing_age": 1,
                           "unknown_age": 1}
    bad = next(p for p in ds.problems if p.kind == "unknown_label_value")
    assert (bad.file, bad.line) == ("CheXpert-v1.0-small/train.csv.gz", 5) and "Edema = '2.0'" in bad.detail
    t = ds.table.set_index("image")
    first = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert t.loc[first, "patient"] == "patient00001" and t.loc[first, "study"] == "patient00001/study1"
    assert (t.loc[first, "sex"], t.loc[first, "age"], t.loc[first, "view"]) == ("F", 68, "AP")
    y = dict(zip(CHEXPERT, ds.y[ds.table.index[ds.table["image"] == first][0]], strict=True))
    assert y["Cardiomegaly"] == 1 and y["Pleural Effusion"] == 1 and np.isnan(y["Edema"]) and y["Fracture"] == 0
    s = spec_summary.summary(ds)
    assert s["label_counts"]["Cardiomegaly"] == 2 and s["label_counts"]["Pleural Effusion"] == 2
    assert s["uncertain_counts"] == {n: int(n in ("Edema", "Atelectasis")) for n in CHEXPERT}
    assert s["official_split"] and s["splits"]["test"]["images"] == 2 and s["patient_overlap"] == 0
    assert s["splits"]["train"]["images"] + s["splits"]["val"]["images"] == 4
    assert ds.table.loc[ds.table["age"].isna(), "patient"].tolist() == ["patient00005"]  # 200: unknown

    inner = tabular.load(sp, str(chexpert_root / "CheXpert-v1.0-small"))
    assert inner.table["image"].tolist() == [i.removeprefix("CheXpert-v1.0-small/") for i in ds.table["image"]]
    assert _counts(inner) == _counts(ds)


def test_scan_reports_missing_images_only_when_asked(chexpert_root):
    sp = spec.load("chexpert")[0]
    ds = tabular.load(sp, str(chexpert_root))
    for image in ds.table["image"][1:]:  # all usable images but the first
        os.makedirs(os.path.dirname(chexpert_root / image), exist_ok=True)
        (chexpert_root / image).write_bytes(b"\xff\xd8")
    assert "missing_image" not in _counts(ds)
    scanned = tabular.load(sp, str(chexpert_root), scan_images=True)
    assert _counts(scanned)["missing_image"] == 1 and len(scanned.table) == 5
    assert next(p for p in scanned.problems if p.kind == "missing_image").image == ds.table["image"][0]


def test_padchest_python_lists_never_evaluated(tmp_path):
    header = ["ImageID", "ImageDir", "StudyID", "PatientID", "PatientSex_DICOM", "Projection", "Labels"]
    rows = [["i1.png", "0", "s1", "pA", "M", "PA", "['pleural effusion', 'cardiomegaly']"],
            ["i2.png", "0", "s2", "pA", "M", "L", "['cardiomegaly']"],
            ["i3.png", "1", "s3", "pB", "F", "AP_horizontal", "['normal']"],
            ["i4.png", "1", "s4", "pC", "", "PA", "['nodule', 'COPD signs']"],
            ["i5.png", "2", "s5", "pD", "O", "UNK", "['pneumonia'"],
            ["i6.png", "2", "s6", "pE", "F", "PA", "nan"],
            ["i7.png", "2", "s7", "pF", "F", "PA", "[' atelectasis', 'exclude']"],
            ["i8.png", "3", "s8", "pG", "M", "PA", "__import__('os').system('touch PWNED')"]]
    _csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", header, rows)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ds = tabular.load(spec.load("padchest")[0], str(tmp_path))
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()
    assert (ds.rows_read, len(ds.table), ds.table["patient"].nunique()) == (8, 4, 4)
    assert _counts(ds) == {"view_filtered": 2, "unparseable_labels": 3, "missing_sex": 1, "unknown_sex": 1}
    assert [p.line for p in ds.problems if p.kind == "unparseable_labels"] == [6, 7, 9]
    assert ds.table["image"].tolist() == ["0/i1.png", "1/i3.png", "1/i4.png", "2/i7.png"]
    s = spec_summary.summary(ds)
    assert {k: v for k, v in s["label_counts"].items() if v} == {"pleural effusion": 1, "cardiomegaly": 1,
                                                                 "nodule": 1, "atelectasis": 1}
    assert s["ignored_labels"] == {"COPD signs": 1} and not s["official_split"]
    assert s["patient_overlap"] == 0 and sum(p["images"] for p in s["splits"].values()) == 4


def test_mimic_joins_labels_and_the_official_split(tmp_path):
    meta = [["d1", "10000032", "50414267", "PA"], ["d2", "10000032", "50414267", "LATERAL"],
            ["d3", "10000033", "50000001", "AP"], ["d4", "10000034", "50000002", "PA"],
            ["d5", "10000035", "50000003", "PA"], ["d6", "10000036", "50000004", "PA"],
            ["d7", "10000036", "50000005", "AP"], ["d8", "10000037", "50000006", "PA"]]
    _csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta)
    lab = [["10000032", "50414267", *_observations(Pleural_Effusion="1.0", Edema="-1.0")],
           ["10000033", "50000001", *_observations(No_Finding="1.0")],
           ["10000035", "50000003", *_observations(Cardiomegaly="1.0")],
           ["10000036", "50000004", *_observations()],
           ["10000036", "50000005", *_observations(Cardiomegaly="1.0")],
           ["10000037", "50000006", *_observations()]]
    _csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT], lab)
    split = [[d, st, su, s] for (d, su, st, _), s in zip(meta, ["train", "train", "validate", "test", None, "train",
                                                                 "test", "bogus"], strict=True) if s]
    _csv(tmp_path / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split)
    ds = tabular.load(spec.load("mimic-cxr-jpg")[0], str(tmp_path))
    assert ds.files == ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz",
                        "mimic-cxr-2.0.0-split.csv"]
    assert _counts(ds) == {"view_filtered": 1, "missing_join": 1, "not_in_split": 1, "patient_in_two_splits": 1,
                           "unknown_split": 1}
    assert [p.line for p in ds.problems] == [3, 5, 6, 7, 9]  # d2, d4, d5, d6, d8
    kept = (("32", "50414267", "d1"), ("33", "50000001", "d3"), ("36", "50000005", "d7"))
    assert ds.table["image"].tolist() == [f"files/p10/p100000{p}/s{s}/{d}.jpg" for p, s, d in kept]
    assert ds.table["split"].tolist() == ["train", "val", "test"]
    s = spec_summary.summary(ds)
    assert {k: v for k, v in s["label_counts"].items() if v} == {"Pleural Effusion": 1, "No Finding": 1,
                                                                 "Cardiomegaly": 1}
    assert {k: v for k, v in s["uncertain_counts"].items() if v} == {"Edema": 1} and s["studies"] == 3

    os.remove(tmp_path / "mimic-cxr-2.0.0-split.csv")  # absent: said so, and the seeded patient split
    seeded = tabular.load(spec.load("mimic-cxr-jpg")[0], str(tmp_path))
    assert seeded.split_note == "no official split: mimic-cxr-2.0.0-split.csv absent" and not seeded.official_split
    assert _counts(seeded) == {"view_filtered": 1, "missing_join": 1} and len(seeded.table) == 6


def _hospital(root) -> None:
    names = ["Atelectasis", "Cardiomegaly", "Effusion", "Pneumothorax", "Edema", "Pneumonia"]
    rows = [["dicom/P1/S1/1.dcm", "P1", "S1", "PA", "F", "63", "0", "1", "-1", "", "0", "0"],
            ["dicom/P1/S2/2.dcm", "P1", "S2", "AP", "female", "64", "1", "0", "0", "0", "0", "0"],
            ["dicom/P2/S1/1.dcm", "P2", "S1", "LL", "M", "50", "0", "0", "0", "0", "0", "0"],
            ["dicom/P3/S1/1.dcm", "P3", "S1", "PA", "X", "abc", "0", "0", "0", "0", "0", "yes"],
            ["dicom/P4/S1/1.dcm", "", "S1", "PA", "M", "40", "0", "0", "0", "0", "0", "0"],
            ["dicom/P1/S1/1.dcm", "P1", "S1", "PA", "F", "63", "0", "0", "0", "0", "0", "0"],
            *[[f"dicom/P{k}/S1/1.dcm", f"P{k}", "S1", "PA", "M", "30", "0", "0", "0", "0", "1", "0"]
              for k in range(5, 10)]]
    _csv(root / "labels.csv", ["path", "patient_id", "study_id", "view", "sex", "age", *names], rows)
    with open(root / "labels.csv", "a") as fh:  # a blank line 13 (skipped), and line 14 with an unquoted comma
        fh.write("\ndicom/P10/S1/1,2.dcm,P10,S1,PA,M,30,0,0,0,0,0,0\n")


def test_csv_spec_for_a_dicom_export(tmp_path):
    _hospital(tmp_path)
    ds = tabular.load(spec.load("csv")[0], str(tmp_path))
    assert (ds.rows_read, len(ds.table), ds.table["patient"].nunique()) == (12, 7, 6)
    assert _counts(ds) == {"view_filtered": 1, "unknown_sex": 1, "unknown_age": 1, "unknown_label_value": 1,
                           "bad_patient_id": 1, "duplicate_image": 1, "bad_csv_row": 1}
    assert [(p.line, p.kind) for p in ds.problems][-2:] == [(7, "duplicate_image"), (14, "bad_csv_row")]
    assert all(p.endswith(".dcm") for p in ds.table["image"])
    assert ds.split_note == "no official split: no column split" and not ds.official_split
    first = ds.y[0]  # blank = uncertain in this spec, like -1
    assert first[1] == 1 and np.isnan(first[2]) and np.isnan(first[3]) and np.nansum(first) == 1
    assert ds.table["sex"].tolist()[:2] == ["F", "F"]
    assert ds.table.groupby("patient")["split"].nunique().max() == 1
    assert set(ds.table["split"]) == {"train", "val", "test"}


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_spec_files_name_the_file_and_the_key(tmp_path):
    typo = _write(tmp_path / "typo.yaml", "name: x\nmetadata: [{file: a.csv}]\nimage: {column: p}\n"
                  "patient: {column: q}\nlables: {names: [A], encoding: columns}\n")
    with pytest.raises(spec.SpecError) as e:
        spec.load(typo)
    assert str(e.value).startswith(typo) and "lables: unknown key (did you mean labels?)" in str(e.value)
    assert "labels: required but missing" in str(e.value)
    no_column = _write(tmp_path / "nocol.yaml", "name: x\nmetadata: [{file: a.csv}]\nimage: {column: p}\n"
                       "patient: {column: q}\nlabels: {names: [A, B], encoding: python_list}\n")
    with pytest.raises(spec.SpecError, match=r"nocol\.yaml: invalid dataset spec:\n  labels\.column: "
                       "required with encoding python_list"):
        spec.load(no_column)
    no_keep = _write(tmp_path / "nokeep.yaml", "name: x\nmetadata: [{file: a.csv}]\nimage: {column: p}\n"
                     "patient: {column: q}\nfilters: [{column: F}]\nlabels: {names: [A], encoding: columns}\n")
    with pytest.raises(spec.SpecError, match=r"nokeep\.yaml: invalid dataset spec:\n  filters\.0\.keep: list"):
        spec.load(no_keep)
    with pytest.raises(spec.SpecError, match=r"'chexpurt' is not a built-in spec .* \(did you mean "
                       r"chexpert\?\)"):
        spec.load("chexpurt")

    # a valid spec whose label column is not in the CSV: the error names the spec file, the key and the CSV
    _hospital(tmp_path)
    text = spec.resources.files("cxr.data").joinpath("specs", "csv.yaml").read_text().replace("Pneumonia]",
                                                                                               "Pneumonia, Mass]")
    mine = _write(tmp_path / "mine.yaml", text)
    with pytest.raises(spec.SpecError) as e:
        tabular.load(*spec.load(mine)[:1], str(tmp_path), source=mine)
    assert str(e.value).startswith(f"{mine}: labels.columns[Mass]: column 'Mass' not in labels.csv")


def _nih_root(root) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(1, 31):
        for f in range(2):
            y = (rng.random(labels.NUM_FINDINGS) < 0.2).astype(np.uint8)
            rows.append(f"{p:08d}_{f:03d}.png,{labels.format_labels(y)},{f},{p},{30 + p},F,PA,1024,1024,0.14,0.14")
    rows.append("00000031_000.png,Pneumonitis,0,31,40,M,AP,1024,1024,0.14,0.14")
    os.makedirs(root, exist_ok=True)
    (root / metadata.DATA_ENTRY).write_text("\n".join([metadata.HEADER, *rows]) + "\n")


def test_nih_inspect_output_is_unchanged_by_dataset_nih(tmp_path, capsys):
    _nih_root(tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    before = capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path), "--dataset", "nih"]) == 0
    assert capsys.readouterr().out == before
    assert "(Data_Entry_2017_v2020.csv)" in before and "Pleural_Thickening" in before and "unknown_label" in before

    # the nih spec describes the same mapping: the generic reader agrees on rows, patients and labels
    ds, s = metadata.load(str(tmp_path)), None
    generic = tabular.load(spec.load("nih")[0], str(tmp_path))
    s = spec_summary.summary(generic)
    assert (len(generic.table), s["patients"], s["problem_counts"]) == (len(ds.table), 30, {"unknown_label": 1})
    assert s["label_counts"] == {k: v for k, v in metadata.summary(ds)["label_counts"].items() if k in s["findings"]}


def test_cli_inspect_dataset_text_json_and_prepare_without_images_says_why(chexpert_root, tmp_path, capsys):
    assert cli.main(["inspect", str(chexpert_root), "--dataset", "chexpert"]) == 0
    out = capsys.readouterr().out
    assert "(dataset chexpert: CheXpert-v1.0-small/train.csv.gz, CheXpert-v1.0-small/valid.csv)" in out
    assert "rows 8  usable 6  excluded 2  patients 6  studies 6" in out
    assert "\n  Enlarged Cardiomediastinum " in out and "\n  Effusion " not in out and "Pleural_Thickening" not in out
    assert ("problems: 5 (missing_age 1, unknown_age 1, unknown_label_value 1, unknown_sex 1, view_filtered 1)"
            in out)
    assert cli.main(["inspect", str(chexpert_root), "--dataset", "chexpert", "--json", "--strict"]) == 1
    s = json.loads(capsys.readouterr().out)
    assert s["usable_rows"] == 6 and len(s["problems"]) == 5 and s["findings"] == list(CHEXPERT)

    out_dir = tmp_path / "shards"
    assert cli.main(["prepare", str(chexpert_root), str(out_dir), "--dataset", "chexpert"]) == 2
    err = capsys.readouterr().err
    assert ("no usable rows in CheXpert-v1.0-small/train.csv.gz + CheXpert-v1.0-small/valid.csv with built-in spec "
            "chexpert (cxr/data/specs/chexpert.yaml) (missing_image 6, unknown_label_value 1, view_filtered 1); "
            "nothing to read") in err
    assert not out_dir.exists()


PYTHON_LIST_CELLS = ["['a', 'b']", "[]", "['', ' ']", "[' atelectasis', 'exclude']", '["it\'s", \'say "hi"\']',
                     "['a',]", "['a' 'b']", "[u'a']", "['a\\\\nb']", "['a',\xa0'b']", "['a\x00']", "('a', 'b')",
                     "['pneumonia'", "nan", "", " ['a']", "['a'] ", "[1]"]


@pytest.mark.parametrize("cell", PYTHON_LIST_CELLS)
def test_python_list_cells_read_without_ast_exactly_as_literal_eval_reads_them(cell):
    """The fast path for plain lists of string literals gives what ast.literal_eval gives, errors included."""
    try:
        value = ast.literal_eval(cell)
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        want = ([t.strip() for t in value if t.strip()] or "no labels") if ok else "not a list of strings"
    except (ValueError, SyntaxError):
        want = "not a Python list literal"
    assert tabular._tokens(cell, "python_list", "|") == want


def test_image_pattern_by_columns_equals_str_format_row_by_row():
    df = pd.DataFrame({"subject_id": [" 10000032", "19999987"], "study_id": ["50414267", "5"], "dicom_id": ["a", "b"],
                       "x": ["{y}", "z"]})
    pattern = "files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg{{1}}{x}"
    want = [pattern.format(**{k: v.strip() for k, v in row.items()}) for row in df.to_dict("records")]
    assert tabular._format(pattern, df).tolist() == want
    assert tabular._format("{subject_id!s:>9}", df).tolist() == [" 10000032", " 19999987"]  # row by row


def test_a_study_date_column_is_kept_as_text_and_a_missing_one_named(tmp_path):
    _csv(tmp_path / "labels.csv", ["path", "patient_id", "study_date", "Effusion"],
         [["a.png", "P1", "2019-03-04", "1"], ["b.png", "P2", "20190305", "0"]])
    text = ("name: dated\nmetadata: [{file: labels.csv}]\nimage: {column: path}\npatient: {column: patient_id}\n"
            "date: {column: COLUMN}\nlabels: {encoding: columns, names: [Effusion]}\n")
    ds = tabular.load(spec.parse(text.replace("COLUMN", "study_date"), "dated.yaml"), str(tmp_path))
    assert ds.table["date"].tolist() == ["2019-03-04", "20190305"]
    with pytest.raises(spec.SpecError, match="date.column"):
        tabular.load(spec.parse(text.replace("COLUMN", "StudyDate"), "dated.yaml"), str(tmp_path))
