"""`cxr explain`: where a model looked, as Grad-CAM overlays, and how well that localizes, scored like Wang et al.

Two ways in. `--data ROOT` (a dataset root with NIH's `BBox_List_2017.csv`): every annotated image of the
chosen split is explained for the findings boxed on it, the heatmaps' boxes are scored against the truth
(`cxr.explain.localization`, beside a fixed centred box and Wang et al.'s published row), and overlays
show both boxes. `--images SPEC` (any PNG/JPEG/DICOM files, no ground truth): overlays for the findings
asked for, or each image's most probable one. Images are preprocessed as training saw them
(`cxr.data.images`), so the heatmap is of the model's own input; boxes are mapped back to each image's
pixels to be scored. The probabilities (and the top finding of an image with none named) come from the model's
replicas on the cluster (`cxr.inference`, as `cxr predict`'s); Grad-CAM's gradients are taken here, on the
images explained. An unreadable image never stops the run: it is listed in errors.csv and its boxes are
counted as not scored. Everything goes to `--out`; an annotated set's figures and scores also go to the model's
MLflow run (when it came from there), arbitrary files' overlays only with `--record` (they are not its evidence).
Overlays are drawn on the image at its own resolution (`cxr.explain.overlay`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr import labels, storage
from cxr.explain import localization as loc
from cxr.redact import redact

log = logging.getLogger(__name__)


@dataclass
class Target:
    """One image to explain: where it is, which findings, and its ground-truth boxes (image pixels) if known."""

    name: str
    path: str
    findings: tuple[str, ...]  # empty: its most probable finding
    truth: dict[str, list[loc.Box]] = field(default_factory=dict)
    view: str | None = None  # the dataset's view position (PA, AP, LL...): L/R markers for a frontal film


@dataclass
class Explanation:
    """What `explain` produced: the localization scores (with ground truth), overlays written, errors."""

    images: int
    explained: int
    errors: list[dict[str, str]]
    overlays: dict[str, list[str]]  # finding -> overlay files (relative to out)
    sheets: dict[str, str]  # finding -> contact sheet (relative to out)
    report: dict[str, Any] | None  # localization.json's content; None without ground truth
    table: str | None  # accuracy at T(IoBB) = 0.5 in Wang et al.'s layout (the full tables: localization.md)
    out: str
    seconds: float
    run_id: str | None  # the MLflow run the figures were logged to (None: not recorded)


def targets_from_data(root: str, split: str | None, findings: Sequence[str] | None) -> tuple[list[Target], list]:
    """The annotated images of `split` (None: all), with their boxes; and the annotated rows without an image."""
    from cxr.data import metadata

    ds = metadata.load(root)
    if ds.bboxes.empty:
        raise ValueError(f"{redact(root)}: no {metadata.BBOX_NAME} with usable rows: nothing to localize "
                         "(use --images for overlays without ground truth)")
    table = ds.table if split is None else ds.split(split)
    if split is not None and table.empty:
        raise ValueError(f"{redact(root)}: split {split!r} is empty (splits: {sorted(set(ds.table['split']))})")
    paths = dict(zip(table["image"], table["path"], strict=True))
    views = dict(zip(ds.table["image"], ds.table["view"], strict=True)) if "view" in ds.table else {}
    wanted = set(findings) if findings else None
    truth = loc.truth_boxes(ds.bboxes)
    per_image: dict[str, dict[str, list[loc.Box]]] = {}
    for (image, finding), boxes in truth.items():
        if wanted is None or finding in wanted:
            per_image.setdefault(image, {})[finding] = boxes
    in_split = set(table["image"]) if split is not None else set(ds.table["image"]) | set(ds.bboxes["image"])
    missing = [{"image": i, "error": "annotated but not usable: " + _why(ds, i)}
               for i in sorted(per_image) if i in in_split and not paths.get(i)]
    targets = [Target(i, paths[i], tuple(sorted(b)), b, _text(views.get(i)))
               for i, b in sorted(per_image.items()) if paths.get(i)]
    if not targets:
        raise ValueError(f"{redact(root)}: no annotated image in split {split!r}"
                         + (f" for {', '.join(sorted(wanted))}" if wanted else ""))
    return targets, missing


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _why(ds: Any, image: str) -> str:
    reasons = [f"{p.kind} ({p.detail})" for p in ds.problems if p.image == image]
    return "; ".join(reasons) or "no image file"


def targets_from_images(spec: str, findings: Sequence[str] | None) -> list[Target]:
    from cxr.predict import list_images

    paths = list_images(spec)
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) < len(names):  # the same file name in two folders: name them by their relative path
        common = os.path.commonpath([p.split("://", 1)[-1] for p in paths])
        names = [os.path.relpath(p.split("://", 1)[-1], common).replace("/", "__") for p in paths]
    return [Target(n, p, tuple(findings or ())) for n, p in zip(names, paths, strict=True)]


@dataclass(frozen=True)
class Read:
    """An image as explain uses it: the model's input, its own (h, w) for boxes, what the overlay draws."""

    model_input: np.ndarray  # uint8 [size, size]
    hw: tuple[int, int]
    shown: np.ndarray  # uint8, the image at the overlay's resolution (`overlay.display_image`)
    side: tuple[str, str] | None  # L/R at the image's left and right edges, where known


def _read(path: str, size: int, view: str | None = None) -> Read:
    from cxr.data import images
    from cxr.explain import overlay

    data = storage.read_bytes(path)
    gray = images.decode(data, name=os.path.basename(path))
    side = overlay.dicom_orientation(data) or overlay.orientation(None, view)
    return Read(images.fit(gray, size), (int(gray.shape[0]), int(gray.shape[1])), overlay.display_image(gray), side)


def explain(model_uri: str, out: str, data: str | None = None, images: str | None = None,
            findings: Sequence[str] | None = None, split: str | None = "test", max_overlays: int = 12,
            batch_size: int = 16, thresholds: Sequence[float] = loc.THRESHOLDS, tracking_uri: str | None = None,
            record: bool | None = None, progress: bool = True) -> Explanation:
    """Grad-CAM overlays, contact sheets and (with --data) the localization table; see the module docstring.

    `record` None: log to the model's run for an annotated set (--data) only; arbitrary files' overlays stay
    out of the training run unless asked for (True)."""
    from tqdm import tqdm

    from cxr.data import roots
    from cxr.explain import overlay
    from cxr.models import loading

    record = data is not None if record is None else record

    if (data is None) == (images is None):
        raise ValueError("explain needs exactly one of --data (a dataset root with boxes) or --images")
    listed: list[Target] = []
    if images is not None:  # a path that is not there fails before TensorFlow and the model load
        listed = targets_from_images(images, findings)
    else:
        roots.require(data)
    from cxr.explain.gradcam import GradCam, SheetItem, contact_sheet

    loaded = loading.load(model_uri, tracking_uri)
    index = {f: i for i, f in enumerate(loaded.findings)}  # the model's own label set
    unknown = [f for f in findings or () if f not in index]
    if unknown:
        raise ValueError(f"unknown finding(s) {', '.join(unknown)}; the model's findings are "
                         f"{', '.join(loaded.findings)}")
    if data is not None and loaded.findings != labels.FINDINGS:
        raise ValueError(f"--data scores NIH's boxed findings against a model of NIH's 14; this model's are "
                         f"{', '.join(loaded.findings)}: use --images")
    size = loaded.image_size
    if data is not None:
        targets, errors = targets_from_data(data, split, findings)
    else:
        targets, errors = listed, []
    inputs = len(targets) + len(errors)  # annotated rows without a usable image are listed, not dropped
    scores = _scores(loaded, [t.path for t in targets], batch_size, tracking_uri)
    cam = GradCam(loaded.model)
    predictions: dict[loc.Key, list[loc.Box]] = {}
    frames: dict[str, tuple[int, int]] = {}
    sheet_items: dict[str, list[SheetItem]] = {}
    overlays: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-explain-") as local, \
            ThreadPoolExecutor(4, thread_name_prefix="cxr-explain") as pool, \
            tqdm(total=len(targets), unit="img", desc="explain", disable=not progress) as bar:
        for start in range(0, len(targets), batch_size):
            chunk = targets[start:start + batch_size]
            read = list(pool.map(lambda t: _safe_read(t.path, size, t.view), chunk))
            ok = [(t, r) for t, r in zip(chunk, read, strict=True) if not isinstance(r, str)]
            errors += [{"image": t.name, "error": r} for t, r in zip(chunk, read, strict=True) if isinstance(r, str)]
            if not ok:
                bar.update(len(chunk))
                continue
            x = np.stack([r.model_input for _, r in ok]).astype(np.float32)[..., None] / np.float32(255.0)
            probs = np.stack([scores[start + i] for i, r in enumerate(read) if not isinstance(r, str)])
            wanted = [t.findings or (loaded.findings[int(np.argmax(probs[b]))],) for b, (t, _) in enumerate(ok)]
            union = sorted({index[f] for fs in wanted for f in fs})
            maps = cam(x, union).heatmaps  # [F, B, S, S]
            for b, ((target, image), fs) in enumerate(zip(ok, wanted, strict=True)):
                hw = frames[target.name] = image.hw
                for f in fs:
                    heat = maps[union.index(index[f]), b]
                    boxes = loc.heatmap_boxes(heat, thresholds)
                    predictions[(target.name, f)] = [loc.to_image_frame(bx, size, hw) for bx in boxes]
                    items = sheet_items.setdefault(f, [])
                    if len(items) >= max_overlays:
                        continue
                    s = overlay.display_scale(hw)
                    shown_heat = overlay.heatmap_on_image(heat, image.shown.shape)
                    pred = overlay.scaled(predictions[(target.name, f)][:1], s)
                    true = overlay.scaled(target.truth.get(f, []), s)
                    p = float(probs[b, index[f]])
                    png_name = target.name if target.name.lower().endswith(".png") else f"{target.name}.png"
                    rel = f"overlays/{f}/{png_name}"
                    os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
                    with open(os.path.join(local, rel), "wb") as fh:
                        fh.write(overlay.figure_png(overlay.overlay_figure(
                            image.shown, shown_heat, f, p, target.name, pred, true, image.side)))
                    overlays.setdefault(f, []).append(rel)
                    t = min(1.0, overlay.SHEET_SIDE / max(image.shown.shape))
                    thumb = overlay.resized(image.shown, t)
                    items.append(SheetItem(target.name, thumb, overlay.heatmap_on_image(heat, thumb.shape), p,
                                           overlay.scaled(pred, t) or None, overlay.scaled(true, t) or None))
            bar.update(len(chunk))
        sheets = {}
        for f, items in sheet_items.items():
            sheets[f] = f"sheets/{f}.png"
            os.makedirs(os.path.join(local, "sheets"), exist_ok=True)
            with open(os.path.join(local, sheets[f]), "wb") as fh:
                fh.write(contact_sheet(items, f))
        report = table = None
        if data is not None:
            report, table = _score(targets, predictions, frames, errors, loaded, cam.layer, data, split,
                                   thresholds)
            with open(os.path.join(local, "localization.json"), "w") as fh:
                json.dump(report, fh, indent=1, allow_nan=False)
            with open(os.path.join(local, "localization.md"), "w") as fh:
                fh.write(report["markdown"])
        if errors:
            import pandas as pd

            pd.DataFrame(errors, columns=["image", "error"]).to_csv(os.path.join(local, "errors.csv"), index=False)
        for d, _, files in os.walk(local):
            for name in files:
                path = os.path.join(d, name)
                storage.upload(path, storage.join(out, os.path.relpath(path, local)))
        if record and loaded.run_id:
            _record(loaded, local, report, tracking_uri)
    return Explanation(inputs, len(frames), errors, overlays, sheets, report, table, out, time.perf_counter() - t0,
                       loaded.run_id if record else None)


def _scores(loaded: Any, paths: list[str], batch_size: int, tracking_uri: str | None) -> np.ndarray:
    """Each file's probabilities [N, findings] from the pool (NaN for a file it could not read)."""
    from cxr.inference import predict_files

    out = np.full((len(paths), len(loaded.findings)), np.nan, np.float32)
    for batch in predict_files(loaded.pinned, paths, loaded.image_size, tracking_uri, batch_size):
        out[batch["index"].astype(np.int64)] = batch["probs"]
    return out


def _safe_read(path: str, size: int, view: str | None = None) -> Read | str:
    try:
        return _read(path, size, view)
    except Exception as exc:  # noqa: BLE001 - any failure is this image's: listed with its reason
        return redact(f"{type(exc).__name__}: {exc}")


def _score(targets: list[Target], predictions: dict, frames: dict, errors: list, loaded: Any, layer: str,
           data: str, split: str | None, thresholds: Sequence[float]) -> tuple[dict, str]:
    """Wang et al.'s tables for the model and the centred box over the images that could be read."""
    truth = {(t.name, f): b for t in targets if t.name in frames for f, b in t.truth.items()}
    present = tuple(f for f in loc.FINDINGS if any(g == f for _, g in truth))
    name = f"Grad-CAM {loaded.model.name}"
    ours = loc.evaluate(predictions, truth, name, present)
    base = loc.evaluate(loc.centred_predictions(truth, frames), truth, f"centred box {loc.CENTRED_FRACTION:g}",
                        present)
    unscored = sum(len(b) for t in targets if t.name not in frames for b in t.truth.values())
    iobb = loc.format_table([ours, base], "IoBB")
    iou = loc.format_table([ours, base], "IoU", published=False)
    notes = (f"Boxes: Grad-CAM of layer `{layer}` at {loaded.image_size} px, normalised to "
             f"[0, 255], thresholded at {', '.join(f'{t:g}' for t in thresholds)}, the box around the largest "
             f"8-connected region per threshold. Images: {len(frames)} annotated images of "
             f"{'every split' if split is None else f'split {split}'} ({len(errors)} unreadable or unusable, "
             f"{unscored} of their boxes not scored).")
    md = "\n".join([f"# Localization of {redact(loaded.uri)}", "", notes, "", "## T(IoBB)", "", iobb, "",
                    "## T(IoU)", "", iou, ""])
    report = {"model": {"uri": redact(loaded.uri), "run_id": loaded.run_id,
                        "registered": list(loaded.registered) if loaded.registered else None},
              "data": {"uri": redact(data), "split": split, "images": len(frames), "unscored_boxes": unscored,
                       "errors": len(errors)},
              "thresholds": list(thresholds), "model_scores": ours.to_dict(published=True),
              "centred_box": base.to_dict(published=False), "markdown": md}
    return report, loc.format_table([ours, base], "IoBB", t_values=(0.5,), kinds=("acc",))


def _record(loaded: Any, local: str, report: dict | None, tracking_uri: str | None) -> None:
    """Overlays, sheets and the table into the model's run under explain/; the T(IoBB)=0.5 accuracies as metrics."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.log_artifacts(loaded.run_id, local, artifact_path="explain")
    if report is None:
        return
    now = int(time.time() * 1000)
    acc = report["model_scores"]["IoBB"]["0.5"]["acc"]
    metrics = [Metric(f"localization_iobb_0.5/{f}", float(v), now, 0) for f, v in acc.items()
               if v is not None and f != "mean"]
    if acc.get("mean") is not None:
        metrics.append(Metric("localization_iobb_0.5_mean", float(acc["mean"]), now, 0))
    client.log_batch(loaded.run_id, metrics=metrics)
