"""Time `cxr inspect --dataset` on full-size metadata-only roots: CheXpert's 223,414-row train.csv, PadChest's
160,861-row CSV (gzipped, as distributed) and NIH's 112,120 rows (bench/inspect_metadata.py's root), each as a
subprocess, process start included (issue 21 §6: goal <= 5 s each).

Without --scan-images inspect reads metadata only, so no image is written. Rows follow each dataset's published
shape: CheXpert's lateral share, per-observation rates of 1.0 / 0.0 / -1.0 / blank from its paper; PadChest's
projection mix, Python-list label strings over a wide vocabulary, its 35 columns and report text.

    python bench/inspect_specs.py [--scale 1.0] [--out bench-out/inspect-specs.json]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import inspect_metadata  # noqa: E402  (NIH's metadata-only root, the same generator as its own bench)

CHEXPERT_ROWS, CHEXPERT_PATIENTS, CHEXPERT_VALID = 223_414, 64_540, 234
PADCHEST_ROWS, PADCHEST_PATIENTS = 160_861, 67_625
# CheXpert train.csv (Irvin et al. 2019, table 1): positive, negative, uncertain counts per observation.
CHEXPERT_COUNTS = {
    "No Finding": (22381, 0, 0), "Enlarged Cardiomediastinum": (10798, 21638, 12403),
    "Cardiomegaly": (27000, 11116, 8087), "Lung Opacity": (105581, 6599, 5598), "Lung Lesion": (9186, 1270, 1488),
    "Edema": (52246, 20726, 12984), "Consolidation": (14783, 28097, 27742), "Pneumonia": (6039, 2799, 18770),
    "Atelectasis": (33376, 1328, 33739), "Pneumothorax": (19448, 56341, 3145),
    "Pleural Effusion": (86187, 35396, 11628), "Pleural Other": (3523, 316, 2653), "Fracture": (9040, 2512, 642),
    "Support Devices": (116001, 6137, 1079)}
PADCHEST_PROJECTIONS = {"PA": 0.53, "L": 0.31, "AP_horizontal": 0.11, "AP": 0.03, "COSTAL": 0.005, "UNK": 0.015}
PADCHEST_LABELS = [
    "pleural effusion", "cardiomegaly", "atelectasis", "infiltrates", "mass", "nodule", "pneumonia", "pneumothorax",
    "consolidation", "pulmonary edema", "emphysema", "pulmonary fibrosis", "pleural thickening", "hiatal hernia",
    "COPD signs", "aortic elongation", "scoliosis", "chronic changes", "kyphosis", "calcified granuloma",
    "interstitial pattern", "laminar atelectasis", "fibrotic band", "apical pleural thickening",
    "aortic atheromatosis", "vertebral degenerative changes", "costophrenic angle blunting", "alveolar pattern",
    "hilar enlargement", "pseudonodule", "volume loss", "NSG tube", "endotracheal tube", "central venous catheter",
    "pacemaker", "sternotomy", "suture material", "bronchiectasis", "air trapping", "hemidiaphragm elevation",
    "goiter", "granuloma", "tracheal shift", "bullas", "osteopenia", "callus rib fracture", "heart insufficiency",
    "descendent aortic elongation", "mediastinic lipomatosis", "tuberculosis sequelae", "increased density",
    "exclude", "suboptimal study", "unchanged"]
PADCHEST_HEADER = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]


def _patients(rng: np.random.Generator, rows: int, patients: int) -> np.ndarray:
    """A sorted patient number per row, every patient present."""
    pid = np.sort(rng.integers(1, patients + 1, rows))
    pid[:patients] = np.arange(1, patients + 1)
    return np.sort(pid)


def _write(path: str, header: list[str], rows: list[list[str]]) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _chexpert_rows(rng: np.random.Generator, part: str, rows: int, first_patient: int, patients: int,
                   blanks: bool) -> list[list[str]]:
    pid = _patients(rng, rows, patients) + first_patient - 1
    lateral = (rng.random(rows) < 32_387 / CHEXPERT_ROWS) if blanks else np.zeros(rows, dtype=bool)
    cells = []
    for pos, neg, unc in CHEXPERT_COUNTS.values():
        p = np.array([pos, neg, unc, CHEXPERT_ROWS - pos - neg - unc]) / CHEXPERT_ROWS
        if not blanks:  # valid.csv: radiologists' 0 / 1
            p = np.array([p[0], 1 - p[0], 0, 0])
        cells.append(np.array(["1.0", "0.0", "-1.0", ""])[rng.choice(4, size=rows, p=p)])
    sex = np.where(rng.random(rows) < 0.59, "Male", "Female")
    sex[0] = "Unknown"
    age = rng.integers(18, 91, rows)
    out, study, view, last = [], 0, 0, -1
    for i in range(rows):  # a lateral shares the study of the image before it (same patient)
        same = pid[i] == last
        study, view = (study, view + 1) if same and lateral[i] else (study + 1 if same else 1, 1)
        last = pid[i]
        kind = "lateral" if lateral[i] else "frontal"
        out.append([f"CheXpert-v1.0-small/{part}/patient{pid[i]:05d}/study{study}/view{view}_{kind}.jpg", sex[i],
                    str(age[i]),
                    "Lateral" if lateral[i] else "Frontal", "" if lateral[i] else ("AP" if i % 5 else "PA"),
                    *(c[i] for c in cells)])
    return out


def write_chexpert(root: str, rows: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "CheXpert-v1.0-small")
    os.makedirs(folder)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COUNTS]
    patients = max(1, round(rows * CHEXPERT_PATIENTS / CHEXPERT_ROWS))
    _write(os.path.join(folder, "train.csv"), header, _chexpert_rows(rng, "train", rows, 1, patients, True))
    valid = _chexpert_rows(rng, "valid", CHEXPERT_VALID, patients + 1, 200, False)
    _write(os.path.join(folder, "valid.csv"), header, valid)
    return root


def _padchest_labels(rng: np.random.Generator, rows: int) -> list[str]:
    weights = 1 / np.arange(1, len(PADCHEST_LABELS) + 1)
    weights /= weights.sum()
    out = []
    for i, n in enumerate(rng.choice(5, size=rows, p=[0.33, 0.3, 0.2, 0.12, 0.05])):
        if i % 20_000 == 7:
            out.append("")  # the release's few label cells that are not a list
        else:
            tokens = rng.choice(len(PADCHEST_LABELS), size=n, replace=False, p=weights) if n else []
            out.append(repr([PADCHEST_LABELS[t] for t in tokens] or ["normal"]))
    return out


def write_padchest(root: str, rows: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    pid = _patients(rng, rows, max(1, round(rows * PADCHEST_PATIENTS / PADCHEST_ROWS)))
    projection = rng.choice(list(PADCHEST_PROJECTIONS), size=rows, p=list(PADCHEST_PROJECTIONS.values()))
    labels = _padchest_labels(rng, rows)
    sex = rng.choice(["M", "F", "O", ""], size=rows, p=[0.5, 0.4998, 0.0001, 0.0001])
    out = []
    for i in range(rows):
        image = f"{rng.integers(10**17, 10**18)}{i:020d}_{i % 997:03d}-{i % 89:03d}-{i % 31:03d}.png"
        study = f"{pid[i]:016d}{i // 2:016d}"
        out.append([image, str(i % 55), "20150612", study, f"{pid[i]:032d}", "1950.0", sex[i], "POSTEROANTERIOR",
                    projection[i], "Manual review of DICOM fields", "No", "CR", "PhilipsMedicalSystems",
                    "MONOCHROME2", "0", "[1, 1]", "0.139", "12", "2048.0", "4096.0", "2828", "2320", "320", "4",
                    "4000", "12", "", str(4000000 + i), " cardiomegalia . derrame pleural izquierdo . sin cambios .",
                    "Physician", labels[i], "['loc left']", "[['cardiomegaly'], ['pleural effusion', 'loc left']]",
                    "['C0018800']", "['C0443246']"])
    _write(os.path.join(root, "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"), PADCHEST_HEADER, out)
    return root


def time_inspect(root: str, dataset: str | None) -> dict:
    """`cxr inspect ROOT [--dataset NAME]` as a child process: wall seconds and the rows line it printed."""
    cmd = [sys.executable, "-m", "cxr.cli", "inspect", root] + (["--dataset", dataset] if dataset else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows_line = next(line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("rows "))
    return {"dataset": dataset or "nih", "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "summary": rows_line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the full row counts (a quick check)")
    ap.add_argument("--out", default="bench-out/inspect-specs.json")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"nih": os.path.join(tmp, "nih"), "chexpert": os.path.join(tmp, "chexpert"),
                 "padchest": os.path.join(tmp, "padchest")}
        for path in roots.values():
            os.makedirs(path)
        inspect_metadata.write_root(roots["nih"], rows=round(112_120 * args.scale),
                                    patients=max(1, round(30_805 * args.scale)))
        write_chexpert(roots["chexpert"], round(CHEXPERT_ROWS * args.scale))
        write_padchest(roots["padchest"], round(PADCHEST_ROWS * args.scale))
        subprocess.run([sys.executable, "-m", "cxr.cli", "--version"], check=True, capture_output=True)  # warm
        for name, root in roots.items():
            results.append(time_inspect(root, None if name == "nih" else name))
    load = os.getloadavg()[0]
    print(f"cxr inspect as a subprocess, process start included; goal <= 5 s wall (load average {load:.1f} "
          f"on {os.cpu_count()} CPUs: wall time waits for other processes, CPU time does not)")
    print(f"{'dataset':<10} {'wall s':>7} {'CPU s':>7}")
    for r in results:
        print(f"{r['dataset']:<10} {r['seconds']:>7} {r['cpu_seconds']:>7}  {r['summary']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"scale": args.scale, "load_average": load, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
