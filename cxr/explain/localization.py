"""Boxes from heatmaps and Wang et al.'s localization scores, so our heatmaps compare with ChestX-ray8's Table 4.

Reference: X. Wang, Y. Peng, L. Lu, Z. Lu, M. Bagheri, R. M. Summers, "ChestX-ray8: Hospital-scale Chest
X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax
Diseases", CVPR 2017.

- Boxes (Sec. 3.2, paragraph "Bounding Box Generation", of the arXiv text 1705.02315): "The intensities in
  heatmaps are first normalized to [0, 255] and then thresholded by {60, 180} individually. Finally, B-Boxes
  are generated to cover the isolated regions in the resulting binary maps." We use `THRESHOLDS = (60, 180)`
  (configurable): min-max normalise to [0, 255], keep pixels >= t, and for each threshold take the box around
  the largest 8-connected region (`scipy.ndimage.label`); the same box from both thresholds counts once.
- Scores (their Sec. 4, "Disease Localization", Table 4): a ground-truth box is correctly localized when
  some predicted box of its finding on its image has IoBB > T(IoBB) (intersection over the detected box's
  area) or, in the IoU table, IoU > T(IoU); T in {0.1, 0.25, 0.5, 0.75, 0.9}. Accuracy per finding = the
  fraction of that finding's ground-truth boxes correctly localized.
- AFP: the paper reports an "Average False Positive number" per finding (Table 4) without a formula. We
  define it as: per finding, the predicted boxes on the images annotated with that finding that localize
  none of its ground-truth boxes there (at the same T), divided by the number of those images. Predictions
  for (image, finding) pairs without a ground-truth box are not scored, as only annotated images were.
- The mean column is the unweighted mean over the findings that have ground truth (Wang et al.'s 8 findings:
  their ResNet-50 row at T(IoBB) = 0.5 averages to .330).
- Their numbers are beside ours for orientation, not as a like-for-like comparison: they scored 1,600 boxes
  on 983 images, the public BBox_List_2017.csv has 984 boxes on 880, and their heatmaps were 32² (CAM from a
  transition layer), not Grad-CAM.

Boxes are (x, y, w, h) in pixels of the ground truth's frame: 1024² for NIH's BBox list, the phantom's own
size for `cxr.synth`; boxes found on a model-input-sized heatmap are mapped back with `to_image_frame`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr import labels
from cxr.data.images import fit, target_shape

FINDINGS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                             "Pneumonia", "Pneumothorax")  # NIH's 8 boxed findings, in Wang et al.'s column order
THRESHOLDS: tuple[int, ...] = (60, 180)  # Wang et al. 2017, Sec. 3.2 "Bounding Box Generation"
T_VALUES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)  # Wang et al. 2017, Table 4
METRICS = ("IoBB", "IoU")
CENTRED_FRACTION = 0.5  # the baseline box: half the image's width and height, centred
NIH_FRAME = (1024, 1024)

# Wang et al. 2017, Table 4 (ResNet-50): localization accuracy and AFP, in FINDINGS order.
PUBLISHED_NAME = "Wang et al. 2017 (ResNet-50)"
PUBLISHED: dict[str, dict[float, dict[str, tuple[float, ...]]]] = {"IoBB": {
    0.1: {"acc": (.7277, .9931, .7124, .7886, .4352, .1645, .7500, .4591),
          "afp": (.8323, .3506, .7998, .5589, .6423, .6047, .9055, .4776)},
    0.25: {"acc": (.5500, .9794, .5424, .5772, .2823, .0506, .5583, .3469),
           "afp": (.9167, .4553, .8598, .6077, .6707, .6158, .9614, .5000)},
    0.5: {"acc": (.2833, .8767, .3333, .4227, .1411, .0126, .3833, .1836),
          "afp": (1.0203, .5630, .9268, .6585, .6941, .6189, 1.0132, .5285)},
    0.75: {"acc": (.1666, .7260, .2418, .3252, .1176, .0126, .2583, .1020),
           "afp": (1.0619, .6616, .9603, .6921, .7043, .6199, 1.0569, .5396)},
    0.9: {"acc": (.1333, .6849, .2091, .2520, .0588, .0126, .2416, .0816),
          "afp": (1.0752, .7226, .9797, .7124, .7144, .6199, 1.0732, .5437)},
}}  # their T(IoU) table is only in the supplementary material, not reproduced here

Key = tuple[str, str]  # (image, finding)
HeatmapFn = Callable[[np.ndarray, int], np.ndarray]  # (images [B,S,S,1] in [0,1], finding index) -> [B,S,S]


class Box(NamedTuple):
    """An axis-aligned box in pixels: (x, y) the top-left corner, w and h its size (NIH's layout)."""

    x: float
    y: float
    w: float
    h: float

    @property
    def area(self) -> float:
        return max(self.w, 0.0) * max(self.h, 0.0)


def intersection(a: Box, b: Box) -> float:
    w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    return max(w, 0.0) * max(h, 0.0)


def iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 for two empty boxes."""
    inter = intersection(a, b)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def iobb(pred: Box, truth: Box) -> float:
    """Intersection over the detected (predicted) box's area: Wang et al.'s IoBB, forgiving large ground truth."""
    return intersection(pred, truth) / pred.area if pred.area > 0 else 0.0


def normalise_255(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 255] (float); a constant map (no evidence anywhere) becomes all zeros."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float64))
    lo, hi = float(h.min()), float(h.max())
    return np.zeros_like(h) if hi <= lo else (h - lo) * (255.0 / (hi - lo))


def largest_region_box(mask: np.ndarray) -> Box | None:
    """The box around the largest 8-connected region of a binary map (ties: the first in raster order)."""
    regions, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(regions.ravel())[1:]
    rows, cols = np.nonzero(regions == 1 + int(np.argmax(sizes)))
    return Box(float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()),
               float(rows.max() + 1 - rows.min()))


def region_boxes(mask: np.ndarray) -> list[Box]:
    """A box around every 8-connected region of a binary map, largest region first."""
    regions, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(regions)
    boxes = []
    for i in np.argsort(-sizes, kind="stable"):
        rows, cols = slices[i]
        boxes.append(Box(float(cols.start), float(rows.start), float(cols.stop - cols.start),
                         float(rows.stop - rows.start)))
    return boxes


def heatmap_boxes(heatmap: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
                  all_regions: bool = False) -> list[Box]:
    """Wang et al.'s boxes: per threshold on the [0, 255]-normalised map, the largest region's box (deduplicated).

    `all_regions=True` keeps a box for every isolated region instead (the paper's wording; more false positives).
    """
    h = normalise_255(heatmap)
    boxes: list[Box] = []
    if h.max() <= 0:
        return boxes
    for t in thresholds:
        found = region_boxes(h >= t) if all_regions else [b for b in [largest_region_box(h >= t)] if b is not None]
        boxes.extend(b for b in found if b not in boxes)
    return boxes


def to_image_frame(box: Box, input_size: int, image_hw: tuple[int, int]) -> Box:
    """A box on the model's input (the image padded to a square, centred, then resized) → the image's own pixels.

    Inverts `cxr.data.images.fit`, so it holds for non-square (e.g. DICOM) images too; clipped to the image.
    """
    h, w = image_hw
    th, tw = target_shape(h, w, input_size)
    top, left = (input_size - th) // 2, (input_size - tw) // 2
    sy, sx = h / th, w / tw
    x0, y0 = max((box.x - left) * sx, 0.0), max((box.y - top) * sy, 0.0)
    x1, y1 = min((box.x + box.w - left) * sx, float(w)), min((box.y + box.h - top) * sy, float(h))
    return Box(x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0))


def to_input_frame(box: Box, input_size: int, image_hw: tuple[int, int]) -> Box:
    """The inverse of `to_image_frame`: a box in the image's pixels → on the model's input (to draw it there)."""
    h, w = image_hw
    th, tw = target_shape(h, w, input_size)
    top, left = (input_size - th) // 2, (input_size - tw) // 2
    sy, sx = th / h, tw / w
    return Box(box.x * sx + left, box.y * sy + top, box.w * sx, box.h * sy)


def centred_box(image_hw: tuple[int, int], fraction: float = CENTRED_FRACTION) -> Box:
    """The baseline: a box `fraction` of the image's width and height, centred (what "no localization" scores)."""
    h, w = image_hw
    return Box(w * (1 - fraction) / 2, h * (1 - fraction) / 2, w * fraction, h * fraction)


def truth_boxes(records: Any) -> dict[Key, list[Box]]:
    """Ground truth keyed (image, finding): from `cxr.metadata`'s BBox frame (image, finding, x, y, w, h) or rows.

    Finding names are made canonical ("Infiltrate" → "Infiltration"); unknown ones raise a ValueError.
    """
    rows = records.itertuples(index=False) if hasattr(records, "itertuples") else records
    out: dict[Key, list[Box]] = {}
    for image, finding, x, y, w, h in ((r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows):
        name = labels.canonical(str(finding))
        if name is None:
            raise ValueError(f"ground-truth box for {image!r}: unknown finding {finding!r}")
        out.setdefault((str(image), name), []).append(Box(float(x), float(y), float(w), float(h)))
    return out


def _frame_of(frames: tuple[int, int] | Mapping[str, tuple[int, int]], image: str) -> tuple[int, int]:
    if isinstance(frames, Mapping):
        if image not in frames:
            raise ValueError(f"no image size given for {image!r}")
        return frames[image]
    return frames


def boxes_from_heatmaps(heatmaps: Mapping[Key, np.ndarray],
                        frames: tuple[int, int] | Mapping[str, tuple[int, int]] = NIH_FRAME,
                        thresholds: Sequence[float] = THRESHOLDS) -> dict[Key, list[Box]]:
    """Square model-input heatmaps keyed (image, finding) → predicted boxes in each image's frame (H, W)."""
    out: dict[Key, list[Box]] = {}
    for (image, finding), heat in heatmaps.items():
        frame = _frame_of(frames, image)
        out[(image, finding)] = [to_image_frame(b, heat.shape[0], frame) for b in heatmap_boxes(heat, thresholds)]
    return out


def centred_predictions(truth: Mapping[Key, list[Box]],
                        frames: tuple[int, int] | Mapping[str, tuple[int, int]] = NIH_FRAME,
                        fraction: float = CENTRED_FRACTION) -> dict[Key, list[Box]]:
    """The fixed centred box for every annotated (image, finding): the baseline scored like any model."""
    return {key: [centred_box(_frame_of(frames, key[0]), fraction)] for key in truth}


@dataclass
class LocalizationReport:
    """Accuracy and AFP per finding, per metric and threshold; `to_dict` for JSON, `to_markdown` for people."""

    name: str
    findings: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # finding -> {"boxes": ground-truth boxes, "images": annotated images}
    scores: dict[str, dict[float, dict[str, dict[str, float | None]]]] = field(default_factory=dict)
    # scores[metric][T]["acc" | "afp"][finding or "mean"]

    def acc(self, metric: str = "IoBB", t: float = 0.5) -> dict[str, float | None]:
        return self.scores[metric][t]["acc"]

    def afp(self, metric: str = "IoBB", t: float = 0.5) -> dict[str, float | None]:
        return self.scores[metric][t]["afp"]

    def to_dict(self, published: bool = True) -> dict:
        """JSON-able: scores[metric][str(T)]["acc" | "afp"][finding | "mean"], and Wang et al.'s rows if asked."""
        out = {"name": self.name, "findings": list(self.findings), "counts": self.counts,
               **{m: {str(t): v for t, v in by_t.items()} for m, by_t in self.scores.items()}}
        if published:
            out["published"] = {"name": PUBLISHED_NAME, **{m: {str(t): published_row(m, t) for t in by_t}
                                                            for m, by_t in PUBLISHED.items()}}
        return out

    def to_json(self, published: bool = True) -> str:
        return json.dumps(self.to_dict(published), indent=2, allow_nan=False)

    def to_markdown(self, metric: str = "IoBB", published: bool = True) -> str:
        return format_table([self], metric, published)


def evaluate(predictions: Mapping[Key, Sequence[Box]], truth: Mapping[Key, Sequence[Box]], name: str = "model",
             findings: Sequence[str] = FINDINGS, t_values: Sequence[float] = T_VALUES) -> LocalizationReport:
    """Score predicted boxes against ground truth as Wang et al. did (see the module docstring for every rule)."""
    counts = {f: {"boxes": sum(len(b) for (_, g), b in truth.items() if g == f),
                  "images": sum(1 for (_, g), b in truth.items() if g == f and b)} for f in findings}
    report = LocalizationReport(name, tuple(findings), counts)
    for metric, score in (("IoBB", iobb), ("IoU", iou)):
        report.scores[metric] = {}
        for t in t_values:
            hits = dict.fromkeys(findings, 0)
            false_pos = dict.fromkeys(findings, 0)
            for (image, finding), gts in truth.items():
                if finding not in hits:
                    continue
                preds = predictions.get((image, finding), ())
                good = np.array([[score(p, g) > t for g in gts] for p in preds], dtype=bool).reshape(len(preds),
                                                                                                    len(gts))
                hits[finding] += int(good.any(axis=0).sum())
                false_pos[finding] += int((~good.any(axis=1)).sum())
            acc = {f: hits[f] / counts[f]["boxes"] if counts[f]["boxes"] else None for f in findings}
            afp = {f: false_pos[f] / counts[f]["images"] if counts[f]["images"] else None for f in findings}
            report.scores[metric][t] = {"acc": _with_mean(acc), "afp": _with_mean(afp)}
    return report


def _with_mean(values: dict[str, float | None]) -> dict[str, float | None]:
    present = [v for v in values.values() if v is not None]
    return {**values, "mean": float(np.mean(present)) if present else None}


def published_row(metric: str, t: float) -> dict[str, dict[str, float | None]] | None:
    """Wang et al.'s Table 4 row (ResNet-50) at this threshold, keyed like a report's, or None if unpublished."""
    row = PUBLISHED.get(metric, {}).get(t)
    if row is None:
        return None
    return {kind: _with_mean(dict(zip(FINDINGS, vals, strict=True))) for kind, vals in row.items()}


def format_table(reports: Sequence[LocalizationReport], metric: str = "IoBB", published: bool = True,
                 t_values: Sequence[float] | None = None, kinds: Sequence[str] = ("acc", "afp")) -> str:
    """Markdown in Wang et al.'s layout: a block per T, Acc. and AFP rows per report, their row beside ours."""
    if not reports:
        raise ValueError("format_table needs at least one report")
    findings = reports[0].findings
    lines = [f"| T({metric}) | | " + " | ".join(findings) + " | Mean |",
             "|---|---|" + "---:|" * (len(findings) + 1)]
    for t in t_values or reports[0].scores[metric]:
        rows = [(r.name, r.scores[metric][t]) for r in reports]
        theirs = published_row(metric, t) if published else None
        if theirs is not None:
            rows.append((PUBLISHED_NAME, theirs))
        for i, (name, row) in enumerate(rows):
            for kind, label in ((k, {"acc": "Acc.", "afp": "AFP"}[k]) for k in kinds):
                cells = [_cell(row[kind].get(f)) for f in (*findings, "mean")]
                first = f"{t:g}" if i == 0 and kind == kinds[0] else ""
                lines.append(f"| {first} | {label} {name} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{f} {reports[0].counts[f]['boxes']}" for f in findings)
    return "\n".join([*lines, "", f"Ground-truth boxes: {counts}."])


def _cell(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


@dataclass(frozen=True)
class PhantomSet:
    """Synthetic radiographs with exactly one boxed finding each, its box and its own pixel mask."""

    images: np.ndarray  # uint8 [N, S, S]
    findings: tuple[str, ...]  # the finding drawn on each image
    boxes: tuple[Box, ...]  # its ground-truth box (cxr.synth's, in pixels of the S² image)
    masks: np.ndarray  # bool [N, S, S]: where the image differs from the same phantom without the finding

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"phantom-{i:03d}" for i in range(len(self.images)))

    def of(self, finding: str) -> np.ndarray:
        """Indices of the images showing `finding`, in the order `score_model_on_phantoms` passes them."""
        return np.array([i for i, f in enumerate(self.findings) if f == finding], dtype=np.int64)

    def truth(self) -> dict[Key, list[Box]]:
        return {(n, f): [b] for n, f, b in zip(self.names, self.findings, self.boxes, strict=True)}

    def oracle(self, images: np.ndarray, finding_index: int) -> np.ndarray:
        """A perfect heatmap (the lesion's own mask) in the HeatmapFn signature: the ceiling any model can reach."""
        masks = self.masks[self.of(labels.FINDINGS[finding_index])].astype(np.float32)
        return np.stack([_resize(m, images.shape[1]) for m in masks]) if len(masks) else masks


def render_phantoms(findings: Sequence[str] = ("Mass", "Nodule", "Effusion"), per_finding: int = 4,
                    size: int = 128, seed: int = 0) -> PhantomSet:
    """`per_finding` phantoms per finding; each mask is the pixels that change when only that finding is drawn."""
    from cxr.synth import BOXED, render

    unknown = [f for f in findings if f not in BOXED]
    if unknown:
        raise ValueError(f"phantoms have boxes only for {', '.join(BOXED)}; not for {', '.join(unknown)}")
    images, names, boxes, masks = [], [], [], []
    for f in findings:
        drawn, attempt = 0, 0
        while drawn < per_finding:
            stream = [seed, labels.INDEX[f], attempt]
            attempt += 1
            image, box = render([f], np.random.default_rng(stream), size)
            plain, _ = render([], np.random.default_rng(stream), size)
            mask = image != plain
            if f not in box or not mask.any():
                if attempt > 10 * per_finding:
                    raise RuntimeError(f"cxr.synth drew no {f} in {attempt} attempts")
                continue
            images.append(image)
            names.append(f)
            boxes.append(Box(*(float(v) for v in box[f])))
            masks.append(mask)
            drawn += 1
    return PhantomSet(np.stack(images), tuple(names), tuple(boxes), np.stack(masks))


@dataclass(frozen=True)
class PhantomScore:
    """A heatmap method's report on phantoms beside the centred-box baseline's."""

    model: LocalizationReport
    baseline: LocalizationReport

    def beats_baseline(self, metric: str = "IoBB", t: float = 0.5) -> bool:
        ours, theirs = self.model.acc(metric, t)["mean"], self.baseline.acc(metric, t)["mean"]
        return ours is not None and theirs is not None and ours > theirs

    def to_markdown(self, metric: str = "IoBB") -> str:
        return format_table([self.model, self.baseline], metric, published=False)


def score_model_on_phantoms(model_or_fn: Any, phantoms: PhantomSet | None = None, input_size: int | None = None,
                            thresholds: Sequence[float] = THRESHOLDS, fraction: float = CENTRED_FRACTION,
                            batch_size: int = 16, name: str | None = None) -> PhantomScore:
    """Grad-CAM boxes of a Keras model (or any HeatmapFn) on phantoms, scored beside the centred box.

    The real check of a trained model: its heatmaps should beat the centred box. A HeatmapFn is called once
    per finding (and batch) with that finding's phantoms in `PhantomSet.of` order, resized to `input_size`
    (default: the model's input size, else the phantoms' size); boxes are mapped back to the phantom's frame.
    """
    if phantoms is None:
        phantoms = render_phantoms()
    if callable(getattr(model_or_fn, "get_layer", None)):
        from cxr.explain.gradcam import GradCam

        cam = GradCam(model_or_fn)
        input_size = input_size or int(model_or_fn.input_shape[1])
        fn: HeatmapFn = lambda x, k: cam(x, k).heatmaps  # noqa: E731 - a one-line adapter
        name = name or f"Grad-CAM {model_or_fn.name}"
    else:
        fn, name = model_or_fn, name or getattr(model_or_fn, "__name__", "heatmaps")
    size = input_size or phantoms.size
    heatmaps: dict[Key, np.ndarray] = {}
    for finding in dict.fromkeys(phantoms.findings):
        idx = phantoms.of(finding)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            # the one preprocessing path, so a model sees phantoms as it saw its training data
            x = np.stack([fit(phantoms.images[i], size) for i in chunk]).astype(np.float32)[..., None] / 255
            maps = np.asarray(fn(x, labels.INDEX[finding]), dtype=np.float32)
            if maps.shape != (len(chunk), size, size):
                raise ValueError(f"{name}: heatmaps of shape {maps.shape}, expected {(len(chunk), size, size)}")
            heatmaps.update({(phantoms.names[i], finding): m for i, m in zip(chunk, maps, strict=True)})
    truth = phantoms.truth()
    frame = (phantoms.size, phantoms.size)
    predictions = boxes_from_heatmaps(heatmaps, frame, thresholds)
    findings = tuple(f for f in FINDINGS if f in phantoms.findings)
    return PhantomScore(evaluate(predictions, truth, name, findings),
                        evaluate(centred_predictions(truth, frame, fraction), truth, f"centred box {fraction:g}",
                                 findings))


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """A float map to size² (bilinear); unchanged when already that size."""
    if a.shape[0] == size and a.shape[1] == size:
        return a.astype(np.float32)
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
