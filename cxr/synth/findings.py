"""The 14 findings as painters: each adds (or removes) attenuation where the finding plausibly sits."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from cxr import labels
from cxr.synth.anatomy import Anatomy, Lung, diaphragm_p, heart_centre, rasterize_lung
from cxr.synth.draw import F32, Canvas, disk, gauss, noise, radial_lines, ramp, ridges


@dataclass
class Scene:
    """What finding painters read (canvas, anatomy, lungs) and may change (the vessel markings)."""

    c: Canvas
    a: Anatomy
    lungs: tuple[Lung, Lung]
    markings: np.ndarray
    heart: np.ndarray

    def lung(self, rng: np.random.Generator) -> Lung:
        return self.lungs[int(rng.integers(2))]


def _point_in_lung(lung: Lung, rng: np.random.Generator, t: tuple[float, float],
                   p: tuple[float, float]) -> tuple[float, float]:
    """A random anatomical point well inside the lung (above the diaphragm at that t)."""
    ti = rng.uniform(*t)
    top = float(diaphragm_p(np.float32(ti), lung.geom.dome)) - 0.12
    return lung.geom.at(ti, rng.uniform(p[0], min(p[1], top)))


def _atelectasis(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Plate/wedge atelectasis: an oblique dense band in the lower zone, thicker at its lateral end."""
    lung = s.lung(rng)
    c = lung.c
    x0, y0 = lung.geom.at(rng.uniform(0.4, 0.6), rng.uniform(0.58, 0.7))
    ang = math.radians(rng.uniform(-25, 10)) * -lung.geom.side
    length, wmax = rng.uniform(0.07, 0.1), rng.uniform(0.02, 0.026)
    dx, dy = c.x - F32(x0), c.y - F32(y0)
    along = (dx * F32(math.cos(ang)) + dy * F32(math.sin(ang))) * F32(lung.geom.side)
    across = -dx * F32(math.sin(ang)) + dy * F32(math.cos(ang))
    width = F32(wmax) * (F32(0.3) + F32(0.7) * np.clip((along * F32(1 / length) + 1) * F32(0.5), 0, 1))
    band = ramp(F32(length) - np.abs(along), c.soft(0.01)) * ramp(width - np.abs(across), c.soft(0.005))
    return c.paste(F32(0.45) * band * lung.mask)


def _effusion(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Fluid filling the costophrenic angle up to a meniscus that climbs the lateral wall."""
    lung = s.lung(rng)
    level = F32(1 - rng.uniform(0.14, 0.28)) - F32(rng.uniform(0.2, 0.3)) * np.clip(lung.t, 0, 1) ** 3
    fluid = ramp((lung.p - level) * F32(lung.geom.height), lung.c.soft(0.012))
    return lung.c.paste(F32(s.a.lucency * 1.05) * fluid * lung.mask)


def _infiltration(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Patchy, ill-defined, mottled opacities scattered through the mid zone of one or both lungs."""
    out = np.zeros_like(s.c.x)
    lungs = s.lungs if rng.random() < 0.3 else (s.lung(rng),)
    for lung in lungs:
        c = lung.c
        patches = np.zeros_like(c.x)
        for _ in range(int(rng.integers(7, 11))):
            x, y = _point_in_lung(lung, rng, (0.25, 0.9), (0.25, 0.7))
            sx = rng.uniform(0.014, 0.026)
            patches = np.maximum(patches, gauss(c, x, y, sx, sx * rng.uniform(0.8, 1.3)))
        tex = F32(0.55) + F32(0.45) * np.clip(noise(rng, c, 40), -1, 1)
        out += c.paste(F32(0.5) * patches * lung.mask * tex)
    return out


def _round_lesion(s: Scene, rng: np.random.Generator, radius: float, lobulation: float) -> np.ndarray:
    """A dense, well-circumscribed round opacity with a slightly lobulated edge, inside a lung."""
    lung = s.lung(rng)
    x, y = _point_in_lung(lung, rng, (0.3, 0.8), (0.2, 0.72))
    m = radius * 1.5
    c = s.c.window(x - m, y - m, x + m, y + m)
    dx, dy = c.x - F32(x), c.y - F32(y)
    th = np.arctan2(dy, dx)
    edge = F32(radius) * (1 + F32(lobulation) * np.sin(3 * th + F32(rng.uniform(0, 6)))
                           + F32(lobulation * 0.6) * np.sin(5 * th + F32(rng.uniform(0, 6))))
    d = np.sqrt(dx * dx + dy * dy)
    core = F32(0.85) + F32(0.15) * np.clip(1 - (d * F32(1 / radius)) ** 2, 0, 1)
    return c.paste(ramp(edge - d, c.soft(0.004)) * core)


def _mass(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Mass: 6-11% of the image width across."""
    return F32(0.5) * _round_lesion(s, rng, rng.uniform(0.03, 0.055), 0.07)


def _nodule(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Nodule: one or two small (2-3% of width) dense disks, denser than a rib crossing."""
    out = _round_lesion(s, rng, rng.uniform(0.012, 0.016), 0.03)
    if rng.random() < 0.3:
        out = np.maximum(out, _round_lesion(s, rng, rng.uniform(0.011, 0.014), 0.03))
    return F32(0.75) * out


def _pneumonia(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Lobar pneumonia: lower-zone opacity under a sharp fissure, fading above the dome, air bronchograms."""
    lung = s.lung(rng)
    c, g = lung.c, lung.geom
    fissure = F32(rng.uniform(0.42, 0.52)) + F32(rng.uniform(-0.08, 0.08)) * lung.t
    lobe = (ramp((lung.p - fissure) * F32(g.height), c.soft(0.006))
            * ramp((diaphragm_p(lung.t, g.dome) - F32(0.07) - lung.p) * F32(g.height), 0.05)
            * np.clip((lung.t - F32(rng.uniform(0.0, 0.15))) * F32(1 / 0.25), 0, 1))
    bronchi = radial_lines(c, rng, g.at(0.05, 0.45), (16,), (0.005,), F32(0.12) * noise(rng, c, 8))
    tex = F32(0.92) + F32(0.08) * noise(rng, c, 50)
    return c.paste(F32(0.45) * lobe * lung.mask * (tex - F32(0.6) * bronchi))


def _pneumothorax(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Air between lung and chest wall: a lucent apical/lateral rim without markings, a thin pleural line."""
    lung = s.lung(rng)
    g = lung.geom
    shrink = rng.uniform(0.6, 0.75)
    cg = replace(g, width=g.width * shrink, top=g.top + (1 - shrink) * g.height * 0.7)
    collapsed = rasterize_lung(lung.c, cg).mask
    rim = np.clip(lung.mask - collapsed, 0, 1)
    near_rim = np.asarray(Image.fromarray(rim).filter(ImageFilter.MaxFilter(s.c.size // 80 * 2 + 3)))
    line = F32(4) * collapsed * (1 - collapsed) * near_rim  # only where the lung has come off the wall
    lung.c.crop(s.markings)[...] *= 1 - rim
    return lung.c.paste(F32(0.22) * line - F32(0.2) * rim)


def _consolidation(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Dense, homogeneous upper-zone airspace opacity bounded below by a sharp fissure."""
    lung = s.lung(rng)
    c, g = lung.c, lung.geom
    lower = F32(rng.uniform(0.3, 0.42)) + F32(rng.uniform(-0.06, 0.06)) * lung.t
    upper = rng.uniform(0.03, 0.12)
    area = (ramp((lower - lung.p) * F32(g.height), c.soft(0.005))
            * ramp((lung.p - F32(upper)) * F32(g.height), 0.03)
            * np.clip((lung.t - F32(rng.uniform(0.0, 0.2))) * F32(1 / 0.25), 0, 1))
    return c.paste(F32(0.5) * area * lung.mask)


def _edema(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Bilateral, symmetric perihilar 'bat-wing' haze with Kerley B lines at the lateral bases."""
    spread = rng.uniform(0.9, 1.1)
    out = np.zeros_like(s.c.x)
    for lung in s.lungs:
        c, g = lung.c, lung.geom
        hx, hy = g.at(0.1, 0.48)
        haze = gauss(c, hx, hy, 0.55 * g.width * spread, 0.3 * g.height * spread)
        tex = F32(0.8) + F32(0.2) * noise(rng, c, 24)
        stripes = np.abs((c.y * F32(1 / 0.022)) % 1 - F32(0.5)) * F32(0.022)
        lines = ramp(F32(0.0035) - stripes, c.soft(0.002))
        kerley = (lines * ramp((lung.t - F32(0.8)) * F32(g.width), 0.01)
                  * ramp((lung.p - F32(0.65)) * F32(g.height), 0.02))
        out += c.paste((F32(0.32) * haze * tex + F32(0.18) * kerley) * lung.mask)
    return out


def _fibrosis(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Reticular net of fine lines, basal and peripheral, usually both lungs."""
    net = ridges(noise(rng, s.c, 30), 0.42)
    lungs = s.lungs if rng.random() < 0.7 else (s.lung(rng),)
    where = np.zeros_like(s.c.x)
    for lung in lungs:
        basal = np.clip((lung.p - F32(0.3)) * F32(1 / 0.3), 0, 1)
        peripheral = np.clip((lung.t - F32(0.3)) * F32(1 / 0.3), 0, 1)
        where += lung.c.paste(basal * peripheral * lung.mask)
    return F32(0.55) * net * where


def _pleural_thickening(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """A smooth soft-tissue band along the lateral chest wall of the mid/upper zone."""
    lung = s.lung(rng)
    c, g = lung.c, lung.geom
    thick = F32(rng.uniform(0.022, 0.032)) * (1 + F32(0.15) * np.sin(lung.p * F32(rng.uniform(8, 14))))
    band = (ramp(thick - lung.d_lat, c.soft(0.006))
            * ramp((lung.p - F32(rng.uniform(0.08, 0.2))) * F32(g.height), 0.02)
            * ramp((F32(rng.uniform(0.55, 0.75)) - lung.p) * F32(g.height), 0.03))
    return c.paste(F32(0.55) * band * lung.mask)


def _hernia(s: Scene, rng: np.random.Generator) -> np.ndarray:
    """Hiatus hernia: a round retrocardiac mass at the base with an air-fluid level (dark cap, flat floor)."""
    _, hy, hh = heart_centre(s.a)
    r = rng.uniform(0.055, 0.075)
    cx, cy = s.a.mid + rng.uniform(-0.01, 0.04), hy + hh * rng.uniform(0.2, 0.45)
    c = s.c.window(cx - r - 0.02, cy - r - 0.02, cx + r + 0.02, cy + r + 0.02)
    sac = disk(c, cx, cy, r, r * rng.uniform(0.8, 0.95), 0.006)
    wall = sac - disk(c, cx, cy, r - 0.006, (r - 0.006) * 0.9, 0.004)
    level = cy + r * rng.uniform(-0.1, 0.25)
    air = sac * ramp(F32(level) - c.y, c.soft(0.002))
    return c.paste(F32(0.15) * wall + F32(0.12) * sac - F32(0.5) * air)


PAINTERS = {
    "Atelectasis": _atelectasis,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


def global_findings(a: Anatomy, present: set[str], streams: list[np.random.Generator]) -> Anatomy:
    """Findings that change the anatomy itself rather than adding an opacity."""
    if "Emphysema" in present:
        rng = streams[2 + labels.INDEX["Emphysema"]]
        a = replace(a, base=a.base + rng.uniform(0.055, 0.075), dome=a.dome * rng.uniform(0.15, 0.35),
                    lung_w=a.lung_w + 0.012, ctr=a.ctr * 0.88, lucency=a.lucency + rng.uniform(0.12, 0.16),
                    markings=a.markings * 0.4)
    if "Cardiomegaly" in present:
        rng = streams[2 + labels.INDEX["Cardiomegaly"]]
        a = replace(a, ctr=rng.uniform(0.56, 0.66), heart_h=a.heart_h * rng.uniform(1.08, 1.15))
    return a
