"""The overlay a radiologist reads: drawn at the image's resolution (at least 512 px), the heatmap under the
anatomy it came from, a colour scale, the finding and probability, L/R only where known, a legend naming only
the boxes drawn; a one-image contact sheet's title inside the figure."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from test_dicom import write_dicom

from cxr.data.images import fit
from cxr.explain import overlay
from cxr.explain.gradcam import SheetItem, sheet_figure
from cxr.explain.localization import Box


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_overlay_is_at_least_512_px_with_a_colour_scale_and_a_legend_of_the_boxes_drawn() -> None:
    gray = (np.arange(80 * 120) % 251).reshape(80, 120).astype(np.uint8)  # a small, non-square image
    shown = overlay.display_image(gray)
    assert shown.shape == (341, 512)  # long side enlarged to 512, aspect kept
    heat = np.zeros((64, 64), np.float32)
    s = overlay.display_scale(gray.shape)
    with_truth = overlay.overlay_figure(shown, overlay.heatmap_on_image(heat, shown.shape), "Mass", 0.8731,
                                        "a.png", overlay.scaled([Box(10, 10, 20, 20)], s),
                                        overlay.scaled([Box(50, 30, 30, 30)], s), ("R", "L"))
    bare = overlay.overlay_figure(shown, overlay.heatmap_on_image(heat, shown.shape), "Mass", 0.8731, "a.png",
                                  overlay.scaled([Box(10, 10, 20, 20)], s))
    for fig in (with_truth, bare):
        with Image.open(io.BytesIO(overlay.figure_png(fig))) as im:
            assert im.size[0] >= 512 + 100 and im.size[1] >= 341 + 100
        image_ax, colour_ax = fig.axes
        assert image_ax.get_title(loc="left").startswith("Mass:  p = 0.873")
        assert "Grad-CAM" in colour_ax.get_ylabel() and colour_ax.get_ylim() == (0.0, 1.0)
        bbox = image_ax.get_window_extent()
        assert (round(bbox.width), round(bbox.height)) == (512, 341)  # one figure pixel per drawn image pixel
    assert [t.get_text() for t in with_truth.legends[0].get_texts()] == [overlay.PRED_LABEL, overlay.TRUE_LABEL]
    assert [t.get_text() for t in bare.legends[0].get_texts()] == [overlay.PRED_LABEL]
    assert _texts(with_truth) == ["R", "L"] and _texts(bare) == []  # no marker where the side is unknown


def test_heatmap_lands_on_the_anatomy_of_a_non_square_image() -> None:
    h, w, size = 60, 120, 64
    gray = np.zeros((h, w), np.uint8)
    gray[:15, :30] = 255  # a bright top-left quarter
    heat = (fit(gray, size) > 128).astype(np.float32)  # hot where the model saw it, padding included
    mapped = overlay.heatmap_on_image(heat, (h, w))
    assert mapped.shape == (h, w)
    assert mapped[:13, :28].min() > 0.9 and mapped[20:, 40:].max() < 0.1


def test_orientation_only_where_known() -> None:
    assert overlay.orientation(["L", "F"]) == ("R", "L")  # rows run towards the patient's left
    assert overlay.orientation("R\\F") == ("L", "R")
    assert overlay.orientation(["A", "F"], "LL") is None  # a lateral view: no L/R across the image
    assert overlay.orientation(None, "PA") == ("R", "L") and overlay.orientation(None, " ap ") == ("R", "L")
    assert overlay.orientation(None, None) is None and overlay.orientation(None, "LL") is None
    pixels = np.full((16, 16), 100, np.uint8)
    assert overlay.dicom_orientation(write_dicom(pixels, PatientOrientation=["R", "F"])) == ("L", "R")
    assert overlay.dicom_orientation(write_dicom(pixels, ViewPosition="AP")) == ("R", "L")
    assert overlay.dicom_orientation(write_dicom(pixels)) is None
    assert overlay.dicom_orientation(b"\x89PNG\r\n\x1a\n") is None


def test_one_image_contact_sheet_title_fits_and_names_only_the_drawn_boxes() -> None:
    image = np.full((96, 96), 90, np.uint8)
    heat = np.zeros((96, 96), np.float32)
    for truth in (None, [Box(5, 5, 20, 20)]):
        fig = sheet_figure([SheetItem("00000001_000.png", image, heat, 0.42, [Box(1, 1, 10, 10)], truth)],
                           "Pleural_Thickening")
        fig.canvas.draw()
        title = fig._suptitle
        box, frame = title.get_window_extent(), fig.bbox
        assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1, (box, frame)
        assert ("ground truth" in " ".join(title.get_text().split())) == (truth is not None)
        assert "magenta" in title.get_text()
