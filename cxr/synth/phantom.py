"""One phantom radiograph: anatomy, then each finding's painter, then a film-like exposure to 8 bits.

Every image draws from its own RNG, and inside an image each finding has its own stream, so adding a
finding changes only that finding's pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from cxr import labels
from cxr.synth.anatomy import (
    Anatomy,
    anatomical_canvas,
    aortic_knob,
    body_layer,
    heart_mask,
    lung_geoms,
    lung_window,
    rasterize_lung,
    rib_layer,
    sample_anatomy,
    spine_layer,
    vessel_markings,
)
from cxr.synth.draw import F32, Canvas, noise, support_box
from cxr.synth.findings import PAINTERS, Scene, global_findings

# NIH's 8 findings that have boxes in BBox_List_2017.csv, as Data_Entry spells them.
BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax")
_STREAMS = 2 + labels.NUM_FINDINGS  # anatomy, markings, then one per finding


def _names(findings: Iterable[str] | np.ndarray) -> set[str]:
    if isinstance(findings, np.ndarray):
        return {labels.FINDINGS[i] for i in np.flatnonzero(findings)}
    unknown = set(findings) - set(labels.FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}")
    return set(findings)


def _expose(att: np.ndarray, a: Anatomy, c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Film response: attenuation → brightness through 1-exp, gamma, window, heel effect and quantum grain."""
    lit = F32(a.gain) * (att + F32(a.heel) * (c.x - F32(0.5)))
    img = (1 - np.exp(-lit)) * F32(1 / (1 - math.exp(-a.gain * 1.1)))
    img = np.clip(img, 0, 1) ** F32(a.gamma)
    lo, hi = a.window
    grain = rng.random(img.shape, dtype=F32) - F32(0.5)  # uniform: a third the cost of gaussian grain
    img = F32(lo) + F32(hi - lo) * img + F32(0.012 * math.sqrt(12)) * grain
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _anatomy_layers(c: Canvas, a: Anatomy, rng_vessels: np.random.Generator) -> Scene:
    """Lungs (hidden where the heart lies in front of them) and their vessel markings."""
    heart = heart_mask(c, a)
    solid = np.maximum(heart, aortic_knob(c, a))
    lungs = []
    for g in lung_geoms(a):
        lung = rasterize_lung(lung_window(c, g), g)
        lung.mask = lung.mask * (1 - lung.c.crop(solid))
        lungs.append(lung)
    markings = np.zeros_like(c.x)
    for lung in lungs:
        markings += lung.c.paste(vessel_markings(lung, rng_vessels, a.markings))
    return Scene(c, a, (lungs[0], lungs[1]), markings, heart)


def _air(s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """How much air each pixel sees through (less at the bases and periphery), and the plain lung mask."""
    air, in_lung = np.zeros_like(s.c.x), np.zeros_like(s.c.x)
    for lung in s.lungs:
        base = 1 - F32(0.3) * np.clip(lung.p, 0, 1) ** 2
        periphery = F32(0.7) + F32(0.3) * np.sin(F32(np.pi) * np.clip(lung.t, 0, 1))
        lung.c.crop(air)[...] += lung.mask * base * periphery
        lung.c.crop(in_lung)[...] += lung.mask
    return air, in_lung


def render(findings: Iterable[str] | np.ndarray, rng: np.random.Generator, size: int = 256,
           view: str = "PA") -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """One phantom (uint8 [size, size]) and a pixel box (x, y, w, h) for each boxed finding drawn.

    Anatomy, markings and each finding draw from their own streams split off `rng`, so the same rng
    state with and without a finding gives images that differ only where that finding is drawn.
    """
    present = _names(findings)
    streams = [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=_STREAMS)]
    a = global_findings(sample_anatomy(streams[0], view), present, streams)
    c = anatomical_canvas(a, size)
    scene = _anatomy_layers(c, a, streams[1])
    lesions, boxes = np.zeros_like(c.x), {}
    for name in labels.FINDINGS:
        if name in present and name in PAINTERS:
            rng_f = streams[2 + labels.INDEX[name]]
            delta = PAINTERS[name](scene, rng_f)
            lesions += delta
            if name in BOXED:
                boxes[name] = support_box(delta, rng_f)
    if "Cardiomegaly" in present:
        boxes["Cardiomegaly"] = support_box(scene.heart, streams[2 + labels.INDEX["Cardiomegaly"]], thr=0.05)
    lung_air, in_lung = _air(scene)
    att = (body_layer(c, a) + rib_layer(c, a, in_lung) + spine_layer(c, a) - F32(a.lucency) * lung_air
           + scene.markings + lesions + F32(0.025) * noise(streams[0], c, 12))
    return _expose(att, a, c, streams[0]), {k: v for k, v in boxes.items() if v is not None}
