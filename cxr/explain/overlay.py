"""The overlay a radiologist reads: the radiograph at its own resolution, the heatmap on it, a colour scale.

The heatmap is computed on the model's input (the image padded to a square, then resized: `cxr.data.images.fit`),
so it is mapped back by cropping the padding and resizing to the drawn image: a non-square DICOM keeps its
anatomy under the heat. The image is drawn at its stored size, its long side clamped to [MIN_SIDE, MAX_SIDE]
pixels (a 96 px phantom is enlarged to 512, a 3,000 px DICOM reduced to 2,048: a PNG a viewer opens quickly).

L/R markers only where the orientation is known: DICOM's Patient Orientation (0020,0020), whose first value
is the patient direction of the image's rows (towards increasing column), or a frontal view (PA/AP, DICOM's
View Position or NIH's "View Position" column) of a film stored as radiographs are displayed, the patient's
right on the viewer's left. A lateral or unknown view gets no marker.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from cxr.data.images import target_shape
from cxr.explain.localization import Box

MIN_SIDE = 512
MAX_SIDE = 2048
SHEET_SIDE = 384  # a contact sheet's tiles are ~260 px: its images are kept this small
DPI = 100
FRONTAL = ("PA", "AP")
PRED_LABEL = "magenta: box around the heatmap's largest hot region"
TRUE_LABEL = "green: ground-truth box"
Orientation = tuple[str, str] | None  # (patient side at the image's left edge, at its right edge)


def display_scale(hw: tuple[int, int]) -> float:
    """Factor from the image's stored pixels to the drawn ones (long side clamped to [MIN_SIDE, MAX_SIDE])."""
    long = max(hw)
    return min(max(long, MIN_SIDE), MAX_SIDE) / long


def display_image(gray: np.ndarray) -> np.ndarray:
    """uint8 [H, W] at the drawn size (`display_scale`)."""
    return resized(gray, display_scale(gray.shape))


def resized(gray: np.ndarray, s: float) -> np.ndarray:
    """uint8 [H, W] scaled by `s` (Lanczos when reduced, bicubic when enlarged)."""
    if s == 1.0:
        return gray
    size = (max(1, round(gray.shape[1] * s)), max(1, round(gray.shape[0] * s)))
    method = Image.Resampling.LANCZOS if s < 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(gray).resize(size, method))


def heatmap_on_image(heat: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A square model-input heatmap → float32 [h, w] over the image itself: padding cropped, bilinear resize."""
    size = heat.shape[0]
    h, w = hw
    th, tw = target_shape(h, w, size)
    top, left = (size - th) // 2, (size - tw) // 2
    inner = np.ascontiguousarray(np.asarray(heat, dtype=np.float32)[top:top + th, left:left + tw])
    return np.asarray(Image.fromarray(inner).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def scaled(boxes: Sequence[Box], s: float) -> list[Box]:
    return [Box(b.x * s, b.y * s, b.w * s, b.h * s) for b in boxes]


def orientation(patient_orientation: object = None, view: str | None = None) -> Orientation:
    """(left edge, right edge) patient sides, from DICOM's Patient Orientation, else a frontal view; else None."""
    po = patient_orientation
    values = po.replace("\\", " ").split() if isinstance(po, str) else [str(v) for v in (po or [])]
    values = [v.strip().upper() for v in values]
    if values and values[0][:1] in ("L", "R"):
        right = values[0][0]
        return ("R" if right == "L" else "L", right)
    if view is not None and str(view).strip().upper() in FRONTAL:
        return ("R", "L")
    return None


def dicom_orientation(data: bytes) -> Orientation:
    """The orientation a DICOM file's header states (None for other files or when it states none)."""
    from cxr.data import dicom

    if not dicom.is_dicom(data):
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return orientation(ds.get("PatientOrientation"), ds.get("ViewPosition"))
    except Exception:  # noqa: BLE001 - a header pydicom cannot read has no orientation to show
        return None


def overlay_figure(image: np.ndarray, heatmap: np.ndarray, finding: str, probability: float | None,
                   name: str = "", pred_box: Sequence[Box] = (), true_box: Sequence[Box] = (),
                   side: Orientation = None) -> Figure:
    """The image (drawn pixel for pixel), the heatmap, the boxes, a colour bar, the finding and its probability.

    `image` and `heatmap` share a frame (use `display_image` and `heatmap_on_image`); boxes are in it too.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    from cxr.explain.gradcam import ALPHA, CMAP, PRED_COLOUR, TRUE_COLOUR, overlay_rgb

    h, w = image.shape[:2]
    rgb = overlay_rgb(image, heatmap, list(pred_box) or None, list(true_box) or None)
    pad_l, pad_r, pad_t, pad_b = 20, 130, 90, 30 + 22 * (bool(pred_box) + bool(true_box))
    fig = Figure(figsize=((w + pad_l + pad_r) / DPI, (h + pad_t + pad_b) / DPI), dpi=DPI)
    W, H = w + pad_l + pad_r, h + pad_t + pad_b
    ax = fig.add_axes((pad_l / W, pad_b / H, w / W, h / H))
    ax.imshow(rgb, interpolation="none")
    ax.set_axis_off()
    p = "" if probability is None or not np.isfinite(probability) else f":  p = {probability:.3f}"
    ax.set_title(f"{finding}{p}\n{name}", fontsize=13, loc="left")
    if side is not None:
        for x, label, ha in ((0.015, side[0], "left"), (0.985, side[1], "right")):
            ax.text(x, 0.985, label, transform=ax.transAxes, ha=ha, va="top", fontsize=16, fontweight="bold",
                    color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"})
    cax = fig.add_axes(((pad_l + w + 25) / W, pad_b / H, 18 / W, h / H))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[CMAP]), cax=cax)
    bar.set_label(f"Grad-CAM (1 = this image's maximum; opacity {ALPHA:g} × value)", fontsize=10)
    bar.ax.tick_params(labelsize=9)
    handles = [Line2D([], [], color=np.array(c) / 255, lw=2, label=label)
               for boxes, c, label in ((pred_box, PRED_COLOUR, PRED_LABEL), (true_box, TRUE_COLOUR, TRUE_LABEL))
               if boxes]
    if handles:
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(pad_l / W, 0), fontsize=10, frameon=False)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes at its own DPI (so the image axes keep one pixel per image pixel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
