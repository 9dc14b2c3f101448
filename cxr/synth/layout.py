"""The NIH layout writer: a dataset root exactly like the ChestX-ray14 release, filled with phantoms.

Rows, patients, follow-ups, label frequencies, the patient-disjoint test split, bounding boxes on test
images and (with `messy=True`) one of each of the release's real defects; the file names and CSV headers
are `cxr.metadata`'s, so the reader and the writer cannot drift apart.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image

from cxr import heap, labels
from cxr.data import metadata
from cxr.synth.phantom import BOXED, render

BBOX_SPELLING = {canonical: nih for nih, canonical in labels.ALIASES.items()}  # the BBox list says "Infiltrate"
DEFECTS = ("rgba_image", "16bit_image", "truncated_image", "missing_image", "impossible_age",
           "duplicate_image", "unknown_label")

NO_FINDING_RATE = 0.45
FINDINGS_PER_IMAGE = (0.35, 0.35, 0.30)  # P(1, 2, 3 findings) for an abnormal image
# Relative draw weights in FINDINGS order: skewed like NIH (Infiltration, Effusion, Atelectasis first,
# Hernia last) but flat enough that every finding stays above ~6% prevalence.
FINDING_WEIGHTS = (1.45, 0.92, 1.6, 2.0, 1.0, 1.05, 0.93, 1.0, 0.98, 0.93, 0.93, 0.92, 0.93, 0.88)
FOLLOWUPS = (0.2, 0.16, 0.15, 0.15, 0.15, 0.19)  # P(1..6 images per patient), mean ~3.5
TEST_FRACTION = 0.2
BOX_RATE = 0.5  # share of positive (test image, boxed finding) pairs that get a box
_NIH_NAME = re.compile(r"\d{8}_\d{3}\.png")


@dataclass
class _Row:
    """One image of the plan: everything the CSV says about it plus what to draw and box."""

    index: int
    name: str
    patient: int
    followup: int
    age: int
    sex: str
    view: str
    y: np.ndarray
    test: bool = False
    box: tuple[str, ...] = ()
    extra_label: str = ""
    defect: str = ""


def _sample_labels(rng: np.random.Generator) -> np.ndarray:
    y = np.zeros(labels.NUM_FINDINGS, dtype=np.uint8)
    if rng.random() >= NO_FINDING_RATE:
        k = rng.choice(len(FINDINGS_PER_IMAGE), p=FINDINGS_PER_IMAGE) + 1
        w = np.asarray(FINDING_WEIGHTS) / sum(FINDING_WEIGHTS)
        y[rng.choice(labels.NUM_FINDINGS, size=k, replace=False, p=w)] = 1
    return y


def _patient_rows(rng: np.random.Generator, patient: int, start: int) -> list[_Row]:
    """A patient's follow-ups: fixed sex, age creeping up between visits, PA or AP per film."""
    n = int(rng.choice(len(FOLLOWUPS), p=FOLLOWUPS)) + 1
    sex = "M" if rng.random() < 0.56 else "F"
    age = float(np.clip(rng.normal(48, 16), 3, 88))
    rows = []
    for f in range(n):
        age += rng.uniform(0, 1.2) if f else 0.0
        view = "PA" if rng.random() < 0.6 else "AP"
        rows.append(_Row(start + f, f"{patient:08d}_{f:03d}.png", patient, f, int(age), sex, view,
                         _sample_labels(rng)))
    return rows


def _plan(patients: int, seed: int) -> list[_Row]:
    """All rows in CSV order, the patient-disjoint test split and which test positives get boxes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    rows: list[_Row] = []
    for pid in range(1, patients + 1):
        rows += _patient_rows(rng, pid, len(rows))
    n_test = max(1, round(TEST_FRACTION * patients)) if patients > 1 else 0
    test = set((rng.permutation(patients)[:n_test] + 1).tolist())
    for r in rows:
        r.test = r.patient in test
        if r.test:
            r.box = tuple(f for f in BOXED if r.y[labels.INDEX[f]] and rng.random() < BOX_RATE)
    return rows


def _add_defects(rows: list[_Row], seed: int) -> dict[str, str]:
    """NIH's real defects, one each, on distinct train/val images; kind → image index."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    pool = [r for r in rows if not r.test]
    if len(pool) < len(DEFECTS):
        raise ValueError(f"messy=True needs at least {len(DEFECTS)} train/val images, got {len(pool)}")
    labelled = [r for r in pool if r.y.any()] or pool
    victim = labelled[int(rng.integers(len(labelled)))]
    victim.defect, victim.extra_label = "unknown_label", "Pneumonitis"
    rest = [r for r in pool if r is not victim]
    picks = rng.choice(len(rest), size=len(DEFECTS) - 1, replace=False)
    for kind, i in zip(DEFECTS[:-1], picks, strict=True):
        rest[int(i)].defect = kind
    defects = {r.defect: r.name for r in rows if r.defect}
    defects["not_in_csv"] = f"{max(r.patient for r in rows) + 1:08d}_000.png"
    defects["csv_variant"] = "2017"
    return defects


def _label_text(r: _Row) -> str:
    text = labels.format_labels(r.y)
    if r.extra_label:
        text = r.extra_label if text == labels.NO_FINDING else f"{text}|{r.extra_label}"
    return text


def _csv_line(r: _Row, size: int) -> str:
    spacing = f"{round(0.143 * 1024 / size, 6):g}"
    age = 414 if r.defect == "impossible_age" else r.age
    return (f"{r.name},{_label_text(r)},{r.followup},{r.patient},{age},{r.sex},{r.view},"
            f"{size},{size},{spacing},{spacing}")


def _data_entry_text(rows: list[_Row], size: int, variant: str) -> str:
    """The CSV; the 2017 variant has a trailing comma (an empty 12th column) on every line."""
    lines = [metadata.HEADER]
    for r in rows:
        lines.append(_csv_line(r, size))
        if r.defect == "duplicate_image":
            lines.append(lines[-1])
    end = "," if variant == "2017" else ""
    return "".join(line + end + "\n" for line in lines)


def _bbox_text(rows: list[_Row], boxes: dict[int, dict[str, tuple[float, ...]]]) -> tuple[str, int]:
    lines = [metadata.BBOX_HEADER]
    for r in rows:
        for f in r.box:
            if f in boxes.get(r.index, {}):
                x, y, w, h = boxes[r.index][f]
                lines.append(f"{r.name},{BBOX_SPELLING.get(f, f)},{x:.4f},{y:.4f},{w:.4f},{h:.4f},,,")
    return "".join(line + "\n" for line in lines), len(lines) - 1


def _list_texts(rows: list[_Row], defects: dict[str, str]) -> tuple[str, str]:
    train_val = [r.name for r in rows if not r.test]
    if "not_in_csv" in defects:
        train_val.append(defects["not_in_csv"])
    test = [r.name for r in rows if r.test]
    return "".join(n + "\n" for n in train_val), "".join(n + "\n" for n in test)


# ------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class _Job:
    """What a worker process needs to draw and save one image (picklable, small)."""

    index: int
    path: str
    y: np.ndarray
    view: str
    seed: int
    size: int
    defect: str


def _encode(img: np.ndarray, defect: str) -> bytes:
    """PNG bytes, as NIH's odd files are where a defect asks for it."""
    if defect == "rgba_image":
        im = Image.fromarray(np.dstack([img, img, img, np.full_like(img, 255)]))
    elif defect == "16bit_image":
        im = Image.fromarray(img.astype(np.uint16) * np.uint16(257))
    else:
        im = Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # zlib at 6 would cost more than drawing
    data = buf.getvalue()
    return data[: len(data) // 2] if defect == "truncated_image" else data


def _draw(job: _Job) -> tuple[int, dict[str, tuple[float, ...]]]:
    """Worker: render with the image's own RNG (seed, index), write the file, return its boxes."""
    if job.defect == "missing_image":  # listed in the CSV, never written (a stale copy was removed)
        return job.index, {}
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    img, boxes = render(job.y, rng, job.size, job.view)
    with open(job.path, "wb") as fh:
        fh.write(_encode(img, job.defect))
    return job.index, boxes


def _draw_all(jobs: list[_Job], workers: int, progress: bool,
              draw: Callable[[_Job], tuple[int, dict]] = _draw) -> dict[int, dict[str, tuple[float, ...]]]:
    """Draw every image with `draw` (a module-level function), in worker processes when there are workers."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synth images", unit="img", disable=not progress, file=sys.stderr)
    boxes: dict[int, dict[str, tuple[float, ...]]] = {}
    try:
        if workers <= 1 or len(jobs) < 2:
            results: Iterable[tuple[int, dict]] = map(draw, jobs)
            for index, b in results:
                boxes[index] = b
                bar.update()
            return boxes
        # spawn, not fork: the caller may hold threads (TensorFlow, Ray) that fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=heap.for_drawing) as pool:
            chunk = max(1, min(32, len(jobs) // (workers * 8)))
            for index, b in pool.map(draw, jobs, chunksize=chunk):
                boxes[index] = b
                bar.update()
    finally:
        bar.close()
    return boxes


def _remove_stale(images_dir: str, keep: set[str]) -> None:
    """Drop NIH-named PNGs a previous run left behind, so the root holds exactly this dataset."""
    for name in os.listdir(images_dir):
        if _NIH_NAME.fullmatch(name) and name not in keep:
            os.remove(os.path.join(images_dir, name))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", newline="") as fh:
        fh.write(text)


def _write_metadata(out_root: str, rows: list[_Row], boxes: dict[int, dict[str, tuple[float, ...]]],
                    defects: dict[str, str], size: int) -> tuple[str, int]:
    """The CSV (2020 name, or the 2017 variant when messy), BBox list and split lists; (csv name, boxes)."""
    variant = defects.get("csv_variant", "2020")
    csv_name, other = (metadata.DATA_ENTRY_2017, metadata.DATA_ENTRY) if variant == "2017" else (
        metadata.DATA_ENTRY, metadata.DATA_ENTRY_2017)
    if os.path.exists(os.path.join(out_root, other)):  # a previous run's other variant would shadow ours
        os.remove(os.path.join(out_root, other))
    _write_text(os.path.join(out_root, csv_name), _data_entry_text(rows, size, variant))
    bbox_text, n_boxes = _bbox_text(rows, boxes)
    _write_text(os.path.join(out_root, metadata.BBOX_NAME), bbox_text)
    train_val, test = _list_texts(rows, defects)
    _write_text(os.path.join(out_root, metadata.TRAIN_VAL_LIST), train_val)
    _write_text(os.path.join(out_root, metadata.TEST_LIST), test)
    return csv_name, n_boxes


def mark_synthetic(out_root: str, what: dict) -> None:
    """The root's mark (`cxr.data.manifest.SYNTHETIC`): prepare records it, training tags the run, predict warns."""
    import json

    from cxr.data.manifest import SYNTHETIC

    with open(os.path.join(out_root, SYNTHETIC), "w") as fh:
        json.dump({"generator": "cxr synth", **what}, fh, indent=1)


def synthesize(out_root: str, patients: int, size: int = 256, seed: int = 0, messy: bool = False,
               workers: int | None = None, progress: bool = True) -> dict:
    """Write an NIH ChestX-ray14-shaped dataset of phantoms under the local directory `out_root`.

    Deterministic for (patients, size, seed, messy): the CSVs and lists are byte-identical and every
    image's pixels identical whatever `workers` is. `messy=True` adds one of each of NIH's defects,
    reported under `defects` (kind → image index) in the returned summary. Images are drawn in
    `workers` spawned processes (default: one per CPU), so a calling script needs the usual
    `if __name__ == "__main__":` guard.
    """
    if patients < 1 or size < 32:
        raise ValueError(f"need patients >= 1 and size >= 32, got patients={patients}, size={size}")
    started = time.perf_counter()
    rows = _plan(patients, seed)
    defects = _add_defects(rows, seed) if messy else {}
    images_dir = os.path.join(out_root, "images")
    os.makedirs(images_dir, exist_ok=True)
    _remove_stale(images_dir, {r.name for r in rows if r.defect != "missing_image"})
    jobs = [_Job(r.index, os.path.join(images_dir, r.name), r.y, r.view, seed, size, r.defect) for r in rows]
    boxes = _draw_all(jobs, workers or os.cpu_count() or 1, progress)
    csv_name, n_boxes = _write_metadata(out_root, rows, boxes, defects, size)
    mark_synthetic(out_root, {"layout": "nih", "seed": seed, "patients": patients, "size": size})
    y = np.stack([r.y for r in rows])
    summary = {
        "out_root": out_root,
        "csv": csv_name,
        "images": len(rows),
        "patients": patients,
        "size": size,
        "seed": seed,
        "train_val": sum(not r.test for r in rows),
        "test": sum(r.test for r in rows),
        "label_counts": {f: int(y[:, i].sum()) for i, f in enumerate(labels.FINDINGS)},
        "no_finding": int((y.sum(axis=1) == 0).sum()),
        "bboxes": n_boxes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if messy:
        summary["defects"] = defects
    return summary
