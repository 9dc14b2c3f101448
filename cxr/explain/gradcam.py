"""Grad-CAM (Selvaraju et al., ICCV 2017) for any finding of every registry model, and overlays to look at it.

Why Grad-CAM: it needs no change to the classifier (unlike CAM, which needs GAP straight into the output)
and works on whatever the last convolutional block is. For finding k, with A the last block's feature maps:

    alpha_c = mean over (i, j) of d score_k / d A_ij^c,   map = ReLU(sum_c alpha_c A^c)

then bilinear upsampling to the input size and division by each image's maximum (a map that is zero
everywhere stays zero: no evidence, not NaN). The score differentiated is the finding's logit (the input
of the sigmoid, layer "logits" in every `cxr.models` model), not its probability: a saturated sigmoid has a
vanishing gradient and would give empty maps for the most confident predictions. Models without a
"logits" layer are differentiated at their output.

The last block per model: small_cnn → "relu4"; the ImageNet backbones → the nested "backbone" model's
output (built with include_top=False, so its output IS the last conv block's activation). A nested model's
`.output` lives in its own graph, so we take the tensor it produced inside the outer model (its first call).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from cxr.explain.localization import Box

TARGET_LAYERS = {"small_cnn": "relu4"}  # model name -> layer; models with a "backbone" layer use it
BACKBONE = "backbone"
LOGITS = "logits"
CMAP = "inferno"  # dark → yellow: neither box colour (magenta, green) appears in it
PRED_COLOUR = (255, 0, 255)  # magenta: the box found from the heatmap
TRUE_COLOUR = (57, 255, 20)  # green: the ground-truth box
ALPHA = 0.5


def target_layer(model: keras.Model) -> str:
    """The name of the layer whose output is the last convolutional block (see module docstring)."""
    names = {layer.name for layer in model.layers}
    if BACKBONE in names:
        return BACKBONE
    if model.name in TARGET_LAYERS and TARGET_LAYERS[model.name] in names:
        return TARGET_LAYERS[model.name]
    spatial = [layer.name for layer in model.layers
               if not isinstance(layer, keras.layers.InputLayer) and len(_shape(layer)) == 4]
    if not spatial:
        raise ValueError(f"model {model.name!r} has no layer with a spatial [B, H, W, C] output for Grad-CAM")
    return spatial[-1]


def _shape(layer: keras.layers.Layer) -> tuple:
    try:
        return tuple(_outer_output(layer).shape)
    except (AttributeError, ValueError):
        return ()


def _outer_output(layer: keras.layers.Layer):
    """The tensor `layer` produced in the model that calls it: for a nested model, not its own graph's output."""
    if isinstance(layer, keras.Model):
        # keras.Operation.output is "the output of the first call": the outer graph's tensor.
        return keras.Operation.output.fget(layer)
    return layer.output


@dataclass(frozen=True)
class CamResult:
    heatmaps: np.ndarray  # float32 [B, S, S] in [0, 1] (or [F, B, S, S] for several findings)
    probabilities: np.ndarray  # float32 [B, 14]: the model's outputs for the same forward pass


class GradCam:
    """Grad-CAM for one model: builds the gradient model once, then explains batches for any findings."""

    def __init__(self, model: keras.Model, layer: str | None = None):
        self.model = model
        self.layer = layer or target_layer(model)
        features = _outer_output(model.get_layer(self.layer))
        names = {lay.name for lay in model.layers}
        scores = model.get_layer(LOGITS).output if LOGITS in names else model.output
        self.grad_model = keras.Model(model.inputs, [features, scores, model.output], name=f"{model.name}_gradcam")

    def __call__(self, images: np.ndarray, findings: int | Sequence[int]) -> CamResult:
        """images float32 [B, S, S, 1] in [0, 1] → heatmaps [B, S, S] (one finding) or [F, B, S, S] (a sequence)."""
        single = isinstance(findings, (int, np.integer))
        wanted = [int(findings)] if single else [int(k) for k in findings]
        x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
        if x.shape.rank != 4 or x.shape[-1] != 1:
            raise ValueError(f"images must be [B, S, S, 1], got {tuple(x.shape)}")
        with tf.GradientTape(persistent=len(wanted) > 1) as tape:
            features, scores, probs = self.grad_model(x, training=False)
            targets = [scores[:, k] for k in wanted]
        maps = [_cam(features, tape.gradient(t, features), x.shape[1:3]) for t in targets]
        del tape
        heatmaps = maps[0] if single else np.stack(maps)
        return CamResult(heatmaps, np.asarray(probs, dtype=np.float32))


def _cam(features: tf.Tensor, grads: tf.Tensor | None, size: tuple[int, int]) -> np.ndarray:
    """ReLU(sum_c mean(grad_c) A_c), upsampled bilinearly and divided by each map's max; zero stays zero."""
    feats = tf.cast(features, tf.float32)
    if grads is None:  # the score does not depend on these features at all
        return np.zeros((feats.shape[0], *size), dtype=np.float32)
    weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2))
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", feats, weights))
    cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
    cam = tf.where(tf.math.is_finite(cam), cam, 0.0)
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return np.asarray(tf.where(peak > 0, cam / tf.where(peak > 0, peak, 1.0), 0.0), dtype=np.float32)


def gradcam(model: keras.Model, images: np.ndarray, finding_index: int, layer: str | None = None) -> np.ndarray:
    """Heatmaps [B, S, S] in [0, 1] for one finding (build a `GradCam` to explain many batches)."""
    return GradCam(model, layer)(images, finding_index).heatmaps


BoxArg = Box | Sequence[Box] | Sequence[float] | None


def _boxes(arg: BoxArg) -> list[Box]:
    if arg is None:
        return []
    if len(arg) == 4 and all(isinstance(v, (int, float, np.floating, np.integer)) for v in arg):
        return [Box(*(float(v) for v in arg))]
    return [Box(*(float(v) for v in b)) for b in arg]


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
    if a.ndim != 2:
        raise ValueError(f"overlay needs a grayscale image [H, W], got {a.shape}")
    if a.dtype == np.uint8:
        return a
    return np.clip(np.rint(a.astype(np.float64) * 255), 0, 255).astype(np.uint8)  # floats in [0, 1]


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, pred_box: BoxArg = None, true_box: BoxArg = None,
                alpha: float = ALPHA) -> np.ndarray:
    """uint8 [H, W, 3]: the image in gray, the heatmap (resized to it) coloured with per-pixel alpha, the boxes.

    Boxes are in the image's pixels (x, y, w, h); the heatmap's alpha is `alpha * heat`, so cold regions show
    the radiograph untouched.
    """
    from matplotlib import colormaps

    gray = _gray_uint8(image)
    h, w = gray.shape
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0, 1)
    if heat.shape != gray.shape:
        heat = np.asarray(Image.fromarray(heat).resize((w, h), Image.Resampling.BILINEAR))
    colour = colormaps[CMAP](heat)[..., :3] * 255
    a = (alpha * heat)[..., None]
    rgb = np.rint(gray[..., None] * (1 - a) + colour * a).astype(np.uint8)
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(h, w) / 256))
    for boxes, colour_ in ((_boxes(true_box), TRUE_COLOUR), (_boxes(pred_box), PRED_COLOUR)):
        for b in boxes:
            if b.w > 0 and b.h > 0:
                draw.rectangle([b.x, b.y, b.x + b.w - 1, b.y + b.h - 1], outline=colour_, width=width)
    return np.asarray(canvas)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, pred_box: BoxArg = None, true_box: BoxArg = None,
                alpha: float = ALPHA) -> bytes:
    """`overlay_rgb` as PNG bytes: magenta the predicted box, green the true one."""
    buf = io.BytesIO()
    Image.fromarray(overlay_rgb(image, heatmap, pred_box, true_box, alpha)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class SheetItem:
    """One tile of a contact sheet: an image, its heatmap for the sheet's finding, and what to title it with."""

    name: str
    image: np.ndarray
    heatmap: np.ndarray
    probability: float
    pred_box: BoxArg = None
    true_box: BoxArg = None


def contact_sheet(items: Sequence[SheetItem], finding: str, columns: int = 4, tile_inches: float = 2.6,
                  dpi: int = 100) -> bytes:
    """A PNG grid of overlays for one finding, each titled with its image name and probability."""
    buf = io.BytesIO()
    sheet_figure(items, finding, columns, tile_inches, dpi).savefig(buf, format="png")
    return buf.getvalue()


def sheet_figure(items: Sequence[SheetItem], finding: str, columns: int = 4, tile_inches: float = 2.6,
                 dpi: int = 100) -> Any:
    """`contact_sheet`'s matplotlib Figure (constrained layout: the wrapped title always fits)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not items:
        raise ValueError(f"contact sheet for {finding}: no images")
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    width = max(columns * tile_inches, 4.0)  # one tile is too narrow for the title
    fig = Figure(figsize=(width, rows * (tile_inches + 0.35) + 0.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(sheet_title(items, finding, width), fontsize=10)
    for i in range(rows * columns):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.set_axis_off()
        if i >= len(items):
            continue
        item = items[i]
        ax.imshow(overlay_rgb(item.image, item.heatmap, item.pred_box, item.true_box), interpolation="antialiased")
        ax.set_title(f"{item.name}\np = {item.probability:.3f}", fontsize=8)
    return fig


def sheet_title(items: Sequence[SheetItem], finding: str, width_inches: float) -> str:
    """The sheet's title: names only the boxes drawn on it, wrapped to the figure's width (never clipped)."""
    import textwrap

    keys = [k for k, present in (("magenta: box from the heatmap", any(_boxes(i.pred_box) for i in items)),
                                 ("green: ground truth", any(_boxes(i.true_box) for i in items))) if present]
    title = f"{finding}: Grad-CAM" + (f" ({', '.join(keys)})" if keys else "")
    return "\n".join(textwrap.wrap(title, max(20, int(width_inches * 12))))
