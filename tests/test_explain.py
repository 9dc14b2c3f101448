"""Grad-CAM, overlays, heatmap boxes and Wang et al.'s localization scores, on models and phantoms built here."""

from __future__ import annotations

import io
import json

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLES
from PIL import Image

from cxr.data import images
from cxr.explain.gradcam import (
    PRED_COLOUR,
    TRUE_COLOUR,
    GradCam,
    SheetItem,
    contact_sheet,
    gradcam,
    overlay_rgb,
    target_layer,
)
from cxr.explain.localization import (
    Box,
    centred_box,
    centred_predictions,
    evaluate,
    format_table,
    heatmap_boxes,
    iobb,
    iou,
    published_row,
    render_phantoms,
    score_model_on_phantoms,
    to_image_frame,
    truth_boxes,
)
from cxr.labels import NUM_FINDINGS
from cxr.models import MODEL_NAMES, build_model

S = 64
# Regions (rows, cols) on the tiny model's 32x32 feature grid, one per finding; the rest share the last one.
REGIONS = [(slice(2, 8), slice(20, 30)), (slice(18, 28), slice(3, 9)), (slice(12, 16), slice(12, 16))]


class RegionMasks(keras.layers.Layer):
    """Multiplies feature channel k by the 0/1 mask of region k, so channel k is zero outside it."""

    def __init__(self, masks: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.masks = masks.astype("float32")

    def call(self, x):
        return x * keras.ops.convert_to_tensor(self.masks)


def region_model() -> tuple[keras.Model, np.ndarray]:
    """Output k = the mean of the input over region k (in input pixels), by construction; last conv = "masked"."""
    grid = S // 2
    masks = np.zeros((grid, grid, NUM_FINDINGS), dtype=np.float32)
    for k in range(NUM_FINDINGS):
        rows, cols = REGIONS[min(k, len(REGIONS) - 1)]
        masks[rows, cols, k] = 1
    inputs = keras.Input((S, S, 1), name="image")
    # each channel is the 2x2 mean of the input: a stride-2 conv whose kernel is 1/4 everywhere
    x = keras.layers.Conv2D(NUM_FINDINGS, 2, strides=2, use_bias=False, name="conv",
                            kernel_initializer=keras.initializers.Constant(0.25))(inputs)
    x = RegionMasks(masks, name="masked")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg")(x)  # sum over region k / grid²
    head = keras.layers.Dense(NUM_FINDINGS, name="logits")
    outputs = head(x)
    head.set_weights([np.diag(grid * grid / masks.sum(axis=(0, 1))).astype(np.float32), np.zeros(NUM_FINDINGS)])
    return keras.Model(inputs, outputs, name="region_model"), masks


def in_input_pixels(k: int) -> tuple[slice, slice]:
    rows, cols = REGIONS[k]
    return slice(2 * rows.start, 2 * rows.stop), slice(2 * cols.start, 2 * cols.stop)


def test_gradcam_peaks_in_the_region_that_drives_the_output() -> None:
    model, _ = region_model()
    assert target_layer(model) == "masked"  # the last layer with a spatial output
    x = np.random.default_rng(0).uniform(0.1, 1.0, size=(3, S, S, 1)).astype(np.float32)
    out = np.asarray(model(x))
    for k in range(len(REGIONS)):
        rows, cols = in_input_pixels(k)
        np.testing.assert_allclose(out[:, k], x[:, rows, cols, 0].mean(axis=(1, 2)), rtol=1e-5)
        maps = gradcam(model, x, k)
        assert maps.shape == (3, S, S) and maps.dtype == np.float32
        for m in maps:
            peak = np.unravel_index(np.argmax(m), m.shape)
            assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
            inside = m[rows, cols].sum() / m.sum()
            assert inside > 0.8, f"finding {k}: only {inside:.2f} of the heat inside its region"
            ring = np.ones_like(m, dtype=bool)  # bilinear upsampling reaches 1 input pixel past the edge, no further
            ring[rows.start - 1:rows.stop + 1, cols.start - 1:cols.stop + 1] = False
            assert not m[ring].any()
            assert m.max() == pytest.approx(1.0)


def test_gradcam_differentiates_the_logit_not_a_saturated_probability() -> None:
    """p = sigmoid(1000 * mean) is exactly 1.0 in float32: its gradient is 0, the logit's is not."""
    base, _ = region_model()
    logits = keras.layers.Rescaling(1000.0, name="logits")(base.get_layer("avg").output @ base.get_layer(
        "logits").kernel)
    model = keras.Model(base.input, keras.layers.Activation("sigmoid", name="findings")(logits))
    x = np.random.default_rng(3).uniform(0.1, 1.0, size=(1, S, S, 1)).astype(np.float32)
    assert np.asarray(model(x))[0, 0] == 1.0
    rows, cols = in_input_pixels(0)
    heat = gradcam(model, x, 0)[0]
    assert heat.max() == pytest.approx(1.0) and heat[rows, cols].sum() / heat.sum() > 0.8


def test_gradcam_of_nothing_is_zero_not_nan() -> None:
    model, _ = region_model()
    maps = GradCam(model)(np.zeros((2, S, S, 1), np.float32), [0, 1]).heatmaps
    assert maps.shape == (2, 2, S, S)
    assert np.isfinite(maps).all() and not maps.any()


@pytest.fixture(scope="module")
def registry() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {name: build_model(name, S) for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradcam_on_every_registry_model(registry: dict[str, keras.Model], name: str) -> None:
    model = registry[name]
    assert target_layer(model) == ("relu4" if name == "small_cnn" else "backbone")
    x = np.random.default_rng(1).random((2, S, S, 1), dtype=np.float32)
    result = GradCam(model)(x, [0, 4, 13])
    assert result.heatmaps.shape == (3, 2, S, S)
    assert np.isfinite(result.heatmaps).all()
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1
    peaks = result.heatmaps.max(axis=(2, 3))
    assert np.all((peaks == 0) | np.isclose(peaks, 1.0))
    np.testing.assert_allclose(result.probabilities, np.asarray(model(x, training=False)), rtol=1e-5, atol=1e-6)


def test_nested_backbone_maps_match_a_hand_built_pass(registry: dict[str, keras.Model]) -> None:
    """The backbone tensor Grad-CAM differentiates is the outer graph's: recompute it layer by layer."""
    import tensorflow as tf

    model = registry["mobilenet_v2"]
    x = tf.convert_to_tensor(np.random.default_rng(2).random((2, S, S, 1), dtype=np.float32))
    with tf.GradientTape() as tape:
        rgb = model.get_layer("imagenet_norm")(model.get_layer("gray_to_rgb")([x, x, x]))
        feats = model.get_layer("backbone")(rgb, training=False)
        tape.watch(feats)
        logit = model.get_layer("logits")(model.get_layer("pool")(feats))[:, 2]
    weights = tf.reduce_mean(tape.gradient(logit, feats), axis=(1, 2))
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", feats, weights))
    cam = tf.image.resize(cam[..., None], (S, S), method="bilinear")[..., 0].numpy()
    cam = cam / np.where(cam.max(axis=(1, 2), keepdims=True) > 0, cam.max(axis=(1, 2), keepdims=True), 1)
    np.testing.assert_allclose(gradcam(model, x.numpy(), 2), cam, atol=1e-5)


def test_overlay_draws_both_boxes_over_the_image() -> None:
    image = (np.arange(128 * 96) % 200).reshape(96, 128).astype(np.uint8)
    heat = np.zeros((S, S), np.float32)
    heat[40:60, 40:60] = 1.0  # hot only in the lower right
    rgb = overlay_rgb(image, heat, pred_box=Box(10, 10, 30, 20), true_box=(60, 5, 40, 40))
    assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[10, 20]) == PRED_COLOUR  # top edge of the predicted box
    assert tuple(rgb[5, 80]) == TRUE_COLOUR  # top edge of the true box
    assert np.array_equal(rgb[30, 5], [image[30, 5]] * 3)  # cold and outside the boxes: the image itself
    assert not np.array_equal(rgb[90, 120], [image[90, 120]] * 3)  # hot: coloured


def test_overlay_on_a_real_radiograph_and_contact_sheet() -> None:
    pngs = sorted(SAMPLES.glob("*.png"))
    if not pngs:
        pytest.skip(f"no NIH sample PNGs at {SAMPLES} (the shared samples folder)")
    grays = [images.decode(p.read_bytes()) for p in pngs]
    heat = np.outer(np.hanning(S), np.hanning(S)).astype(np.float32)
    box = to_image_frame(heatmap_boxes(heat)[0], S, grays[0].shape)
    assert overlay_rgb(grays[0], heat, box).shape == (1024, 1024, 3)
    items = [SheetItem(p.name, img, heat, 0.5 + i / 10, box, (100, 100, 200, 200))
             for i, (p, img) in enumerate(zip(pngs, grays, strict=True))]
    with Image.open(io.BytesIO(contact_sheet(items, "Cardiomegaly", columns=2))) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    with pytest.raises(ValueError, match="no images"):
        contact_sheet([], "Mass")


def test_iou_and_iobb_by_hand() -> None:
    a, b = Box(0, 0, 10, 10), Box(5, 5, 10, 10)
    assert iou(a, b) == pytest.approx(25 / 175)
    assert iobb(a, b) == pytest.approx(25 / 100)
    big, small = Box(0, 0, 20, 20), Box(5, 5, 4, 5)
    assert iobb(small, big) == 1.0 and iobb(big, small) == pytest.approx(20 / 400)
    assert iou(small, big) == pytest.approx(20 / 400)
    assert iou(a, Box(10, 0, 5, 5)) == 0.0  # touching edges do not overlap
    assert iobb(Box(3, 3, 0, 0), a) == 0.0  # an empty detection localises nothing


def test_heatmap_boxes_follow_wangs_thresholds() -> None:
    heat = np.zeros((S, S), np.float32)
    heat[5:10, 5:10] = 1.0  # small and bright: 255 after normalising
    heat[30:45, 20:40] = 0.5  # large and dim: 127.5, above 60 but below 180
    assert heatmap_boxes(heat) == [Box(20, 30, 20, 15), Box(5, 5, 5, 5)]  # largest at 60, largest at 180
    heat[30:45, 20:40] = 0.8  # now both above 180: the larger wins at both thresholds, counted once
    assert heatmap_boxes(heat) == [Box(20, 30, 20, 15)]
    assert heatmap_boxes(heat, thresholds=(250,)) == [Box(5, 5, 5, 5)]
    assert heatmap_boxes(heat, thresholds=(60,), all_regions=True) == [Box(20, 30, 20, 15), Box(5, 5, 5, 5)]
    heat[20, 40] = heat[21, 41] = 1.0  # two pixels touching only diagonally: one 8-connected region
    assert Box(40, 20, 2, 2) in heatmap_boxes(heat, thresholds=(60,), all_regions=True)
    assert heatmap_boxes(np.zeros((S, S))) == [] and heatmap_boxes(np.full((S, S), 0.3)) == []


def test_boxes_map_back_to_the_image_frame() -> None:
    assert to_image_frame(Box(10, 20, 30, 40), 256, (1024, 1024)) == Box(40, 80, 120, 160)
    # 600 x 800 padded to 800² (100 px of black above and below), model input 200²
    assert to_image_frame(Box(0, 25, 200, 150), 200, (600, 800)) == Box(0, 0, 800, 600)
    assert to_image_frame(Box(0, 0, 200, 200), 200, (600, 800)) == Box(0, 0, 800, 600)  # clipped
    assert centred_box((100, 200), 0.5) == Box(50, 25, 100, 50)


def test_accuracy_and_afp_on_a_hand_made_set() -> None:
    truth = truth_boxes(pd.DataFrame({
        "image": ["a.png", "a.png", "b.png", "b.png"], "finding": ["Mass", "Nodule", "Mass", "Mass"],
        "x": [0, 50, 20, 60], "y": [0, 50, 20, 60], "w": [10, 4, 10, 10], "h": [10, 4, 10, 10]}))
    preds = {("a.png", "Mass"): [Box(0, 0, 10, 10), Box(80, 80, 5, 5)],  # exact, and a false positive
             ("a.png", "Nodule"): [Box(40, 40, 20, 20)],  # IoBB 16/400 = 0.04
             ("b.png", "Mass"): [Box(20, 20, 20, 20)],  # IoBB 0.25 and IoU 0.25 with the first box
             ("c.png", "Mass"): [Box(0, 0, 1, 1)]}  # an image without ground truth: not scored
    r = evaluate(preds, truth, "hand")
    assert r.counts["Mass"] == {"boxes": 3, "images": 2} and r.counts["Nodule"] == {"boxes": 1, "images": 1}
    assert r.acc("IoBB", 0.1)["Mass"] == pytest.approx(2 / 3) and r.afp("IoBB", 0.1)["Mass"] == 0.5
    assert r.acc("IoBB", 0.1)["Nodule"] == 0 and r.afp("IoBB", 0.1)["Nodule"] == 1
    assert r.acc("IoBB", 0.25)["Mass"] == pytest.approx(1 / 3) and r.afp("IoBB", 0.25)["Mass"] == 1.0  # strict >
    assert r.acc("IoU", 0.1)["Mass"] == pytest.approx(2 / 3) and r.acc("IoU", 0.5)["Mass"] == pytest.approx(1 / 3)
    assert r.acc("IoBB", 0.1)["mean"] == pytest.approx(1 / 3) and r.acc("IoBB", 0.1)["Cardiomegaly"] is None
    as_json = json.loads(r.to_json())
    assert as_json["IoBB"]["0.1"]["acc"]["Mass"] == pytest.approx(2 / 3)
    assert as_json["published"]["IoBB"]["0.5"]["acc"]["Cardiomegaly"] == 0.8767
    base = evaluate(centred_predictions(truth, (100, 100), 0.5), truth, "centred")
    assert base.acc("IoBB", 0.1)["Mass"] == 0  # (25, 25, 50, 50) misses every box by IoBB
    text = format_table([r, base])
    assert "| 0.5 | Acc. hand |" in text and "Acc. Wang et al. 2017 (ResNet-50) | 0.283 | 0.877" in text
    assert "| – |" in text  # findings without ground truth


def test_published_row_mean() -> None:
    row = published_row("IoBB", 0.5)
    assert row is not None and round(row["acc"]["mean"], 3) == 0.330 and row["acc"]["Cardiomegaly"] == 0.8767
    assert published_row("IoU", 0.5) is None


def test_truth_boxes_canonical_names() -> None:
    truth = truth_boxes([("x.png", "Infiltrate", 1, 2, 3, 4)])
    assert truth == {("x.png", "Infiltration"): [Box(1, 2, 3, 4)]}
    with pytest.raises(ValueError, match="unknown finding 'Tumour'"):
        truth_boxes([("x.png", "Tumour", 1, 2, 3, 4)])


@pytest.fixture(scope="module")
def phantoms():
    return render_phantoms(("Mass", "Nodule", "Effusion"), per_finding=3, size=128, seed=0)


def test_oracle_heatmaps_localise_every_phantom_lesion(phantoms) -> None:
    assert phantoms.images.shape == (9, 128, 128) and phantoms.masks.any(axis=(1, 2)).all()
    for mask, box in zip(phantoms.masks, phantoms.boxes, strict=True):  # each mask lies in its own box
        rows, cols = np.nonzero(mask)
        assert box.x <= cols.min() and cols.max() + 1 <= box.x + box.w
        assert box.y <= rows.min() and rows.max() + 1 <= box.y + box.h
    score = score_model_on_phantoms(phantoms.oracle, phantoms, input_size=64, name="oracle")
    acc = score.model.acc("IoBB", 0.5)
    assert [acc[f] for f in ("Mass", "Nodule", "Effusion", "mean")] == [1.0, 1.0, 1.0, 1.0]
    assert score.model.afp("IoBB", 0.5)["mean"] == 0.0
    assert score.baseline.acc("IoBB", 0.5)["mean"] < 1.0 and score.beats_baseline("IoBB", 0.5)
    assert "centred box 0.5" in score.to_markdown()


def test_score_model_on_phantoms_runs_gradcam(phantoms, registry: dict[str, keras.Model]) -> None:
    """The ready-made check for a trained model; an untrained one only has to run and give a full report."""
    score = score_model_on_phantoms(registry["small_cnn"], phantoms)
    assert score.model.name == "Grad-CAM small_cnn" and score.model.findings == ("Effusion", "Mass", "Nodule")
    for t, row in score.model.scores["IoBB"].items():
        assert all(0 <= v <= 1 for v in row["acc"].values()), t
