"""Phantoms in every published layout (issue 21 §5): CheXpert, MIMIC-CXR-JPG, PadChest and the `csv` template.

Why: a spec-read dataset (cxr.data.spec) is tested end to end only on files shaped like the real ones. The NIH
plan (`layout._plan`: patients, follow-ups, findings, the test split) is drawn once; each layout's labels come
from its phantom's NIH findings through `cxr.labelmap` (a label with an NIH equivalent is positive exactly when
the phantom shows it, so a model can learn it; a broader label when a finding it covers is shown, or at a low
rate; any other label at a low rate). `messy=True` plants the real files' quirks, each at a known count, and
`synth-quirks.json` records them with what `cxr inspect --dataset LAYOUT --scan-images` must then report.
`cxr.synth.tables` writes each layout's files.

synth-quirks.json (written by every non-NIH layout; `quirks` and `where` are empty without --messy):
  {"layout", "messy", "seed", "patients", "size", "files": [metadata CSVs, relative to OUT], "images_written",
   "quirks": {quirk: count}, "where": {quirk: [image paths relative to OUT]},
   "expected": {"rows", "usable_rows", "problem_counts": {kind: n}, "label_counts": {name: n},
                "uncertain_counts": {name: n}}}  (keys of `cxr inspect --json`, whose values they must equal)
Quirks: lateral_view (extra lateral rows → view_filtered), uncertain_label (a -1 cell), blank_label (a blank
cell where blank means uncertain: csv), unknown_sex, unparseable_labels (PadChest), missing_image (listed, not
written), png_12bit (PadChest: values < 4096 in a 16-bit PNG), monochrome1 (csv: an inverted DICOM).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from cxr import labelmap, labels
from cxr.data import spec
from cxr.synth import layout
from cxr.synth.phantom import render

LAYOUTS = ("nih", "chexpert", "mimic-cxr-jpg", "padchest", "csv")
QUIRKS_FILE = "synth-quirks.json"
OTHER_RATE = 0.05  # P(positive) of a label that no NIH finding decides
QUIRK_RATE = 0.05  # each quirk touches this share of the frontal rows (at least one)
NO_FINDING = "No Finding"
# Each layout's quirks with --messy. Row quirks fall on distinct frontal rows; lateral_view adds rows; cell
# quirks (uncertain_label, blank_label) and image quirks (png_12bit, monochrome1) fall on usable rows.
QUIRKS = {
    "chexpert": ("lateral_view", "uncertain_label", "unknown_sex", "missing_image"),
    "mimic-cxr-jpg": ("lateral_view", "uncertain_label", "missing_image"),
    "padchest": ("lateral_view", "unparseable_labels", "unknown_sex", "missing_image", "png_12bit"),
    "csv": ("lateral_view", "uncertain_label", "blank_label", "unknown_sex", "missing_image", "monochrome1"),
}
ROW_QUIRKS = ("unparseable_labels", "unknown_sex", "missing_image")
FATAL = {"lateral_view": "view_filtered", "unparseable_labels": "unparseable_labels", "missing_image": "missing_image"}
REPORTED = {**FATAL, "unknown_sex": "unknown_sex"}  # quirk → the problem kind inspect reports it as


@dataclass
class Entry:
    """One metadata row: the phantom it shows (`row`, drawn with RNG index `index`) and what the files say."""

    row: layout._Row
    index: int
    state: np.ndarray  # per label name: 1 positive, 0 negative, NaN uncertain
    lateral: bool = False
    quirks: set[str] = field(default_factory=set)
    blank: set[int] = field(default_factory=set)  # label positions written as a blank cell by a quirk
    image: str = ""  # path relative to the output root, set by the layout's writer
    kind: str = "jpeg"  # how the image is encoded: jpeg, png16, png12, dicom, dicom1

    @property
    def usable(self) -> bool:
        return not (self.lateral or self.quirks & set(FATAL))


def _states(rows: list[layout._Row], names: list[str], rng: np.random.Generator) -> np.ndarray:
    """Each row's label states in the layout's names, from its NIH findings (see the module docstring)."""
    y = np.stack([r.y for r in rows]).astype(bool)
    nih = dict(labelmap.shared(names, labels.FINDINGS))
    out = np.zeros((len(rows), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        if name in nih:
            out[:, j] = y[:, labels.INDEX[nih[name]]]
        elif name != NO_FINDING:
            covered = [labels.INDEX[f] for f in labelmap.covered_by(name) if f in labels.INDEX]
            shown = y[:, covered].any(axis=1) if covered else np.zeros(len(rows), dtype=bool)
            out[:, j] = shown | (rng.random(len(rows)) < OTHER_RATE)
    return out


def _plan(name: str, patients: int, seed: int, messy: bool, names: list[str]) -> tuple[list[Entry], dict]:
    """The layout's rows (frontal ones in NIH plan order, laterals after their frontal) and where quirks sit."""
    rows = layout._plan(patients, seed)
    states = _states(rows, names, np.random.default_rng(np.random.SeedSequence([seed, 4])))
    entries = [Entry(r, r.index, states[i].copy()) for i, r in enumerate(rows)]
    where: dict[str, list[Entry]] = {}
    if not messy:
        return entries, where
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    kinds = QUIRKS[name]
    k = max(1, round(QUIRK_RATE * len(entries)))
    victims = [entries[int(i)] for i in rng.permutation(len(entries))]
    rowq = [q for q in kinds if q in ROW_QUIRKS]
    if len(victims) < k * (len(rowq) + 1):
        raise ValueError(f"messy {name}: needs at least {k * (len(rowq) + 1)} images, got {len(victims)}")
    for q in rowq:
        where[q], victims = victims[:k], victims[k:]
        for e in where[q]:
            e.quirks.add(q)
    usable = [e for e in victims if e.usable]
    labelled = [j for j, n in enumerate(names) if n != NO_FINDING]
    for q in kinds:
        if q in ("uncertain_label", "blank_label"):
            cells = set()
            while len(cells) < k:
                e, j = usable[int(rng.integers(len(usable)))], labelled[int(rng.integers(len(labelled)))]
                if not np.isnan(e.state[j]) and (id(e), j) not in cells:
                    cells.add((id(e), j))
                    e.state[j] = np.nan
                    e.quirks.add(q)
                    if q == "blank_label":
                        e.blank.add(j)
                    where.setdefault(q, []).append(e)
        elif q in ("png_12bit", "monochrome1"):
            where[q] = [usable[int(i)] for i in rng.choice(len(usable), size=k, replace=False)]
            for e in where[q]:
                e.quirks.add(q)
    if "lateral_view" in kinds:
        originals = [entries[int(i)] for i in sorted(rng.choice(len(entries), size=k, replace=False))]
        laterals = [Entry(e.row, len(rows) + n, e.state.copy(), lateral=True) for n, e in enumerate(originals)]
        where["lateral_view"] = laterals
        for e, lat in zip(originals, laterals, strict=True):
            entries.insert(entries.index(e) + 1, lat)
    return entries, where


def expected(entries: list[Entry], names: list[str]) -> dict:
    """What `cxr inspect --dataset LAYOUT --scan-images` reports of these rows (its own keys)."""
    usable = [e for e in entries if e.usable]
    y = np.stack([e.state for e in usable]) if usable else np.zeros((0, len(names)))
    problems = Counter(REPORTED[q] for e in entries for q in e.quirks if q in REPORTED)
    problems.update("view_filtered" for e in entries if e.lateral)
    return {"rows": len(entries), "usable_rows": len(usable), "problem_counts": dict(sorted(problems.items())),
            "label_counts": {n: int((y[:, j] == 1).sum()) for j, n in enumerate(names)},
            "uncertain_counts": {n: int(np.isnan(y[:, j]).sum()) for j, n in enumerate(names)}}


# ------------------------------------------------------------------------------------------------ images


def twelve_bit(img: np.ndarray) -> np.ndarray:
    """8-bit → 12-bit by bit replication (0 → 0, 255 → 4095): the full 12-bit range, as a detector's."""
    return (img.astype(np.uint16) << 4) | (img.astype(np.uint16) >> 4)


def _dicom(img: np.ndarray, job: layout._Job) -> bytes:
    """A 12-bit DX file (16 bits allocated); MONOCHROME1 stores 4095 - value (white = low), as some CRs do."""
    values = twelve_bit(img)
    inverted = job.defect == "dicom1"
    ds = Dataset()
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid(entropy_srcs=[str(job.seed), str(job.index)])
    ds.Modality, ds.ViewPosition = "DX", job.view
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if inverted else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (4095 - values if inverted else values).astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def encode(img: np.ndarray, job: layout._Job) -> bytes:
    """The image file's bytes in the layout's format (`job.defect` names the encoding here)."""
    if job.defect in ("dicom", "dicom1"):
        return _dicom(img, job)
    buf = io.BytesIO()
    if job.defect == "jpeg":
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    else:  # PadChest's 16-bit PNGs: the full 16-bit range, or 12-bit values (< 4096) in 16 bits
        wide = twelve_bit(img) if job.defect == "png12" else img.astype(np.uint16) * np.uint16(257)
        Image.fromarray(wide).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def draw(job: layout._Job) -> tuple[int, dict]:
    """Worker: the phantom of NIH plan row `job.index` (its own RNG, as in the NIH layout), written encoded."""
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    img, _ = render(job.y, rng, job.size, job.view)
    os.makedirs(os.path.dirname(job.path), exist_ok=True)
    with open(job.path, "wb") as fh:
        fh.write(encode(img, job))
    return job.index, {}


# ------------------------------------------------------------------------------------------------ the root


def synthesize(out_root: str, layout_name: str, patients: int, size: int = 256, seed: int = 0,
               messy: bool = False, workers: int | None = None, progress: bool = True) -> dict:
    """Write a dataset root in `layout_name` under the local folder `out_root`; `nih` is `layout.synthesize`.

    Other layouts also write OUT/synth-quirks.json: the quirks planted (counts and images) and `expected`,
    what `cxr inspect --dataset LAYOUT --scan-images` reports. Deterministic for the arguments.
    """
    if layout_name == "nih":
        return layout.synthesize(out_root, patients, size=size, seed=seed, messy=messy, workers=workers,
                                 progress=progress)
    if layout_name not in LAYOUTS:
        raise ValueError(f"layout {layout_name!r}: not one of {', '.join(LAYOUTS)}")
    if patients < 1 or size < 32:
        raise ValueError(f"need patients >= 1 and size >= 32, got patients={patients}, size={size}")
    from cxr.synth import tables

    started = time.perf_counter()
    names = spec.load(layout_name)[0].labels.names
    entries, where = _plan(layout_name, patients, seed, messy, names)
    os.makedirs(out_root, exist_ok=True)
    files = tables.WRITERS[layout_name](out_root, entries, names, np.random.default_rng([seed, 5]))
    jobs = [layout._Job(e.index, os.path.join(out_root, e.image), e.row.y, e.row.view, seed, size, e.kind)
            for e in entries if "missing_image" not in e.quirks]
    for e in where.get("missing_image", []):  # an earlier run into OUT may have written it
        if os.path.exists(os.path.join(out_root, e.image)):
            os.remove(os.path.join(out_root, e.image))
    layout._draw_all(jobs, workers or os.cpu_count() or 1, progress, draw)
    record = {
        "layout": layout_name, "messy": messy, "seed": seed, "patients": patients, "size": size, "files": files,
        "images_written": len(jobs),
        "quirks": {q: len(es) for q, es in where.items()},
        "where": {q: sorted({e.image for e in es}) for q, es in where.items()},
        "expected": expected(entries, names),
    }
    with open(os.path.join(out_root, QUIRKS_FILE), "w") as fh:
        json.dump(record, fh, indent=1)
    layout.mark_synthetic(out_root, {"layout": layout_name, "seed": seed, "patients": patients, "size": size})
    return {**record, "out_root": out_root, "images": len(jobs), "seconds": round(time.perf_counter() - started, 3)}
