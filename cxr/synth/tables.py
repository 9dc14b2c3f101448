"""Each published layout's metadata files and image paths, for the rows `cxr.synth.layouts` planned.

Why one writer per layout: the file names, columns, label encodings, id formats and folder trees are what the
built-in specs (cxr/data/specs/*.yaml) read, and each dataset spells them its own way. A writer sets every
row's image path and encoding, writes the CSVs (gzipped where the dataset ships them so, with a fixed gzip
time so the bytes are deterministic) and returns their names relative to the output root.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Callable

import numpy as np

from cxr.synth.layouts import NO_FINDING, Entry

CHEXPERT_DIR = "CheXpert-v1.0-small"
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
PADCHEST_OTHER = ("COPD signs", "aortic elongation", "scoliosis", "chronic changes", "kyphosis")
VAL_RATE = 0.12  # share of the non-test patients in an official validation split


def write_csv(out_root: str, rel: str, header: list[str], rows: list[list[str]]) -> str:
    """A CSV as the releases write them (quoted where needed, LF); `.gz` names gzipped with mtime 0."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    path = os.path.join(out_root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data, mtime=0) if rel.endswith(".gz") else data)
    return rel


def _cell(e: Entry, j: int, negative: str, uncertain: str = "-1.0", positive: str = "1.0") -> str:
    """A label cell: a quirk's blank, else the code of the state (a negative may be written blank)."""
    value = e.state[j]
    if j in e.blank:
        return ""
    return uncertain if np.isnan(value) else positive if value == 1 else negative


def _no_finding(entries: list[Entry], names: list[str]) -> None:
    """CheXpert's No Finding: positive when no other label is positive or uncertain (else blank)."""
    j = names.index(NO_FINDING)
    for e in entries:
        others = np.delete(e.state, j)
        e.state[j] = float(not (np.isnan(others).any() or (others == 1).any()))


def _sex(e: Entry, male: str, female: str, unknown: str) -> str:
    return unknown if "unknown_sex" in e.quirks else male if e.row.sex == "M" else female


def _official_split(entries: list[Entry], rng: np.random.Generator) -> dict[int, str]:
    """patient → train / val / test: the NIH plan's test patients, a seeded share of the others for val."""
    patients = sorted({e.row.patient for e in entries if not e.row.test})
    val = {p for p in patients if rng.random() < VAL_RATE}
    return {e.row.patient: "test" if e.row.test else "val" if e.row.patient in val else "train" for e in entries}


def _negatives(entries: list[Entry], rng: np.random.Generator, blank_share: float) -> list[np.ndarray]:
    """Per row, which negative cells are written blank (CheXpert's labeller leaves unmentioned ones blank)."""
    return [rng.random(len(e.state)) < blank_share for e in entries]


def chexpert(out_root: str, entries: list[Entry], names: list[str], rng: np.random.Generator) -> list[str]:
    """CheXpert-v1.0-small/{train,valid}.csv, Path = CheXpert-v1.0-small/{train,valid}/patientP/studyS/viewV_x.jpg;
    the NIH test patients are valid.csv (no blanks there: its labels are radiologists', 0 or 1)."""
    _no_finding(entries, names)
    blanks = _negatives(entries, rng, 0.8)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *names]
    parts: dict[str, list[list[str]]] = {"train": [], "valid": []}
    views: dict[tuple[int, int], int] = {}
    for e, blank in zip(entries, blanks, strict=True):
        part = "valid" if e.row.test else "train"
        study = (e.row.patient, e.row.followup)
        views[study] = views.get(study, 0) + 1
        kind = "lateral" if e.lateral else "frontal"
        e.image = (f"{CHEXPERT_DIR}/{part}/patient{e.row.patient:05d}/study{e.row.followup + 1}/"
                   f"view{views[study]}_{kind}.jpg")
        cells = [_cell(e, j, "" if blank[j] and part == "train" else "0.0") for j in range(len(names))]
        parts[part].append([e.image, _sex(e, "Male", "Female", "Unknown"), str(e.row.age),
                            "Lateral" if e.lateral else "Frontal", "" if e.lateral else e.row.view, *cells])
    return [write_csv(out_root, f"{CHEXPERT_DIR}/{p}.csv", header, rows) for p, rows in parts.items()]


def _hex_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))


def mimic(out_root: str, entries: list[Entry], names: list[str], rng: np.random.Generator) -> list[str]:
    """mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz and files/p1X/pSUBJECT/sSTUDY/DICOM_ID.jpg; labels per
    study (its frontal image's), the label CSV's columns alphabetical as in the release."""
    _no_finding(entries, names)
    split = {p: {"val": "validate"}.get(s, s) for p, s in _official_split(entries, rng).items()}
    blanks = _negatives(entries, rng, 0.85)
    meta, labels_rows, split_rows, studies = [], [], [], set()
    order = sorted(range(len(names)), key=lambda j: names[j])
    for e, blank in zip(entries, blanks, strict=True):
        subject, study = 10_000_000 + e.row.patient, 50_000_000 + 100 * e.row.patient + e.row.followup
        dicom_id = _hex_id(rng)
        e.image = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
        view = "LATERAL" if e.lateral else e.row.view
        orientation = "Erect" if view == "PA" else "Recumbent"
        meta.append([dicom_id, str(subject), str(study), "CHEST (PA AND LAT)", view, "3056", "2544",
                     f"2180{e.row.followup % 10:02d}15", "101010.000", "CHEST (PA AND LAT)",
                     "lateral" if e.lateral else "postero-anterior" if view == "PA" else "antero-posterior",
                     orientation])
        split_rows.append([dicom_id, str(study), str(subject), split[e.row.patient]])
        if not e.lateral and (subject, study) not in studies:
            studies.add((subject, study))
            labels_rows.append([str(subject), str(study),
                                *(_cell(e, j, "" if blank[j] else "0.0") for j in order)])
    meta_header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
    return [write_csv(out_root, "mimic-cxr-2.0.0-metadata.csv.gz", meta_header, meta),
            write_csv(out_root, "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id",
                                                                    *(names[j] for j in order)], labels_rows),
            write_csv(out_root, "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                      split_rows)]


def _padchest_labels(e: Entry, names: list[str], rng: np.random.Generator) -> str:
    """The Labels cell: a Python-list string of the findings (and now and then another PadChest label)."""
    if "unparseable_labels" in e.quirks:
        return "['pneumonia', 'nodule'"  # cut short, as some rows of the release are
    tokens = [n for j, n in enumerate(names) if e.state[j] == 1]
    if rng.random() < 0.1:
        tokens.append(PADCHEST_OTHER[int(rng.integers(len(PADCHEST_OTHER)))])
    return repr(tokens or ["normal"])


def padchest(out_root: str, entries: list[Entry], names: list[str], rng: np.random.Generator) -> list[str]:
    """PADCHEST_..._01.02.19.csv.gz (a subset of its 35 columns) and ImageDir folders 0-54 of 16-bit PNGs."""
    header = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
              "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM",
              "BitsStored_DICOM", "Rows_DICOM", "Columns_DICOM", "ReportID", "MethodLabel", "Labels"]
    patient_ids: dict[int, str] = {}
    rows = []
    for n, e in enumerate(entries):
        pid = patient_ids.setdefault(e.row.patient, "".join(str(d) for d in rng.integers(0, 10, size=36)))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=38))
        image_id = f"{digits}_{''.join(chr(97 + int(c)) for c in rng.integers(0, 26, size=6))}.png"
        directory = str(n % 55)
        e.image = f"{directory}/{image_id}"
        e.kind = "png12" if "png_12bit" in e.quirks else "png16"
        projection = "L" if e.lateral else "AP_horizontal" if e.row.view == "AP" and n % 3 == 0 else e.row.view
        position = {"L": "LATERAL", "PA": "POSTEROANTERIOR"}.get(projection, "ANTEROPOSTERIOR")
        study = f"{e.row.patient:08d}{e.row.followup:03d}"
        rows.append([image_id, directory, f"20{10 + e.row.followup % 8}0612", study, pid, f"{2014 - e.row.age}.0",
                     _sex(e, "M", "F", "O"), position, projection,
                     "Manual review of DICOM fields", "No", "CR", "12" if e.kind == "png12" else "16", "2000", "2000",
                     str(400000 + n), "Physician", _padchest_labels(e, names, rng)])
    return [write_csv(out_root, PADCHEST_CSV, header, rows)]


def hospital(out_root: str, entries: list[Entry], names: list[str], rng: np.random.Generator) -> list[str]:
    """The `csv` template: labels.csv of dicom/PATIENT/STUDY/N.dcm paths, 1/0/-1/blank cells, a split column."""
    split = _official_split(entries, rng)
    rows = []
    for e in entries:
        patient, study = f"P{e.row.patient:04d}", f"S{e.row.followup + 1:02d}"
        e.image = f"dicom/{patient}/{study}/{2 if e.lateral else 1}.dcm"
        e.kind = "dicom1" if "monochrome1" in e.quirks else "dicom"
        view = "LL" if e.lateral else e.row.view
        rows.append([e.image, patient, f"{patient}-{study}", view, _sex(e, "M", "F", "U"), str(e.row.age),
                     split[e.row.patient], *(_cell(e, j, "0", "-1", "1") for j in range(len(names)))])
    header = ["path", "patient_id", "study_id", "view", "sex", "age", "split", *names]
    return [write_csv(out_root, "labels.csv", header, rows)]


WRITERS: dict[str, Callable[[str, list[Entry], list[str], np.random.Generator], list[str]]] = {
    "chexpert": chexpert, "mimic-cxr-jpg": mimic, "padchest": padchest, "csv": hospital}
