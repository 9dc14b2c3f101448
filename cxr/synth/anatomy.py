"""Normal chest anatomy of a phantom: body, lungs, ribs, spine, heart and vessel markings, per image sampled."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxr.synth.draw import F32, Canvas, disk, gauss, noise, radial_lines, ramp


@dataclass(frozen=True)
class Anatomy:
    """Per-image geometry and exposure, in anatomical units (image width = 1 before jitter)."""

    view: str
    shift: tuple[float, float]
    scale: float
    angle: float
    mid: float  # midline
    gap: float  # half width of the mediastinum between the lungs
    lung_w: float  # width of one lung at its base
    top: float  # lung apices
    base: float  # costophrenic angles
    dome: float  # diaphragm dome height, as a fraction of lung height
    ctr: float  # cardiothoracic ratio
    heart_h: float
    clavicle_y: float
    lucency: float  # how much darker the lungs are than soft tissue
    markings: float  # vascular marking strength
    gain: float  # film exposure
    gamma: float
    window: tuple[float, float]
    heel: float  # left-right exposure gradient

    @property
    def thorax_w(self) -> float:
        return 2 * (self.gap + self.lung_w)


def sample_anatomy(rng: np.random.Generator, view: str) -> Anatomy:
    """Plausible normal anatomy; AP films are magnified and softer but never reach a cardiomegalic CTR."""
    ap = view == "AP"
    return Anatomy(
        view=view,
        shift=(rng.uniform(-0.025, 0.025), rng.uniform(-0.025, 0.025)),
        scale=rng.uniform(0.93, 1.04),
        angle=math.radians(rng.uniform(-3, 3)),
        mid=0.5 + rng.uniform(-0.01, 0.01),
        gap=rng.uniform(0.045, 0.06),
        lung_w=rng.uniform(0.28, 0.31),
        top=rng.uniform(0.11, 0.14) + (0.02 if ap else 0.0),
        base=rng.uniform(0.76, 0.80) - (0.02 if ap else 0.0),
        dome=rng.uniform(0.12, 0.17),
        ctr=rng.uniform(0.39, 0.46) * (1.05 if ap else 1.0),
        heart_h=rng.uniform(0.27, 0.3) * (1.03 if ap else 1.0),
        clavicle_y=rng.uniform(0.15, 0.18) - (0.035 if ap else 0.0),
        lucency=rng.uniform(0.44, 0.5),
        markings=rng.uniform(0.12, 0.16),
        gain=rng.uniform(0.9, 1.4) * (0.88 if ap else 1.0),
        gamma=rng.uniform(1.2, 1.6),
        window=(rng.uniform(0.0, 0.06), rng.uniform(0.9, 1.0)),
        heel=rng.uniform(-0.06, 0.06),
    )


def anatomical_canvas(a: Anatomy, size: int) -> Canvas:
    """Pixel centres mapped back through the per-image jitter into anatomical coordinates."""
    u = (np.arange(size, dtype=F32) + F32(0.5)) / F32(size)
    v, u = np.meshgrid(u, u, indexing="ij")
    du, dv = u - F32(0.5 + a.shift[0]), v - F32(0.5 + a.shift[1])
    cos, sin = F32(math.cos(a.angle)), F32(math.sin(a.angle))
    x = (cos * du + sin * dv) / F32(a.scale) + F32(0.5)
    y = (-sin * du + cos * dv) / F32(a.scale) + F32(0.5)
    return Canvas(size, x, y, 1.0 / (size * a.scale), (*a.shift, a.scale, a.angle))


@dataclass(frozen=True)
class LungGeom:
    side: int  # -1: image left (patient's right lung), +1: image right
    xm: float  # medial edge
    width: float
    top: float
    base: float
    dome: float

    def at(self, t: float, p: float) -> tuple[float, float]:
        """Anatomical point of lung coordinates t (0 medial .. 1 lateral), p (0 apex .. 1 base)."""
        return self.xm + self.side * t * self.width, self.top + p * (self.base - self.top)

    @property
    def height(self) -> float:
        return self.base - self.top


@dataclass
class Lung:
    """One lung rasterized on its own window: lung coordinates, soft mask, distance to the lateral wall."""

    geom: LungGeom
    c: Canvas
    t: np.ndarray
    p: np.ndarray
    mask: np.ndarray
    d_lat: np.ndarray


def diaphragm_p(t: np.ndarray, dome: float) -> np.ndarray:
    """Diaphragm height in lung coordinates: dome highest near the middle, deepest at the lateral angle."""
    return 1 - F32(dome) * (1 - ((np.clip(t, 0, 1.2) - F32(0.4)) * F32(1 / 0.6)) ** 2)


def lung_window(full: Canvas, g: LungGeom) -> Canvas:
    x0, x1 = sorted((g.xm - g.side * 0.02, g.xm + g.side * (g.width + 0.02)))
    return full.window(x0, g.top - 0.02, x1, g.base + 0.02)


def rasterize_lung(c: Canvas, g: LungGeom) -> Lung:
    t = (c.x - F32(g.xm)) * F32(g.side / g.width)
    p = (c.y - F32(g.top)) * F32(1 / g.height)
    pc = np.clip(p, 0, None)
    q = 1 - np.clip(pc * F32(1 / 0.8), 0, 1)
    t_lat = F32(0.4) + F32(0.6) * (1 - q * q * np.sqrt(q))  # rounded apex, convex lateral wall
    t_med = np.maximum(0, F32(0.4) - F32(0.4) * np.sqrt(pc * F32(1 / 0.15)))
    d_lat = (t_lat - t) * F32(g.width)
    mask = (ramp(d_lat, c.soft(0.014)) * ramp((t - t_med) * F32(g.width), c.soft(0.015))
            * ramp((diaphragm_p(t, g.dome) - p) * F32(g.height), c.soft(0.006))
            * ramp(p * F32(g.height), c.soft(0.01)))
    return Lung(g, c, t, p, mask, d_lat)


def lung_geoms(a: Anatomy) -> tuple[LungGeom, LungGeom]:
    """Right hemidiaphragm (image left) sits a little higher, as it does over the liver."""
    return tuple(  # type: ignore[return-value]
        LungGeom(side, a.mid + side * a.gap, a.lung_w, a.top, a.base - (0.02 if side < 0 else 0.0), a.dome)
        for side in (-1, 1)
    )


def body_layer(c: Canvas, a: Anatomy) -> np.ndarray:
    """Soft tissue: a cylinder-like thickness profile with neck and sloping shoulders."""
    dx = np.abs(c.x - F32(a.mid))
    thick = np.sqrt(np.clip(1 - (dx * F32(1 / 0.47)) ** 2, 0, 1))
    shoulder = F32(0.03) + F32(1.4) * np.clip(dx - F32(0.1), 0, None) ** 2
    neck = ramp(F32(0.085) + F32(0.25) * c.y - dx, 0.03)
    return F32(0.78) * thick * np.maximum(ramp(c.y - shoulder, 0.02), neck)


def _rib_set(c: Canvas, a: Anatomy, shape: np.ndarray, start: float, count: int, half: float) -> np.ndarray:
    """Curved bands following `shape(x)`, spaced wider further down, all drawn at once by phase."""
    u = np.abs(c.x - F32(a.mid))
    h = a.base - a.top
    depth = np.clip((c.y - shape - F32(start)) * F32(1 / h), 1e-3, None)
    stretched = depth ** F32(0.85)
    phase = F32(9.5) * stretched
    spacing = depth * F32(h / (9.5 * 0.85)) / stretched  # 1 / d(phase)/dy
    k = np.round(phase)
    band = ramp(F32(half) - np.abs(phase - k) * spacing, c.soft(0.006))
    inside = (k >= 0) & (k < count) & (u > 0.03)
    return band * inside * ramp(F32(a.thorax_w / 2 + 0.02) - u, 0.02)


def rib_layer(full: Canvas, a: Anatomy, in_lung: np.ndarray) -> np.ndarray:
    """Posterior ribs arching out from the spine, fainter anterior ribs sloping down medially, clavicles."""
    half = a.thorax_w / 2 + 0.05
    c = full.window(a.mid - half, a.clavicle_y - 0.09, a.mid + half, a.base + 0.15)
    u = np.abs(c.x - F32(a.mid))
    post = _rib_set(c, a, F32(-0.35) * u + F32(1.6) * u * u, a.top + 0.01, 10, 0.011)
    ant = _rib_set(c, a, F32(1.05) * (F32(0.36) - u) ** 2, a.top + 0.02, 6, 0.009)
    ant *= ramp(u - F32(0.1), 0.05)
    clav_y = F32(a.clavicle_y + 0.03) - F32(0.3) * (u - F32(0.05)) + F32(0.9) * (u - F32(0.2)) ** 2
    clav = (ramp(F32(0.011) - np.abs(c.y - clav_y), c.soft(0.005)) * ramp(F32(0.36) - u, 0.01)
            * ramp(u - F32(0.04), 0.01))
    in_lung = c.crop(in_lung)
    ribs = (F32(0.07) * post + F32(0.035) * ant) * (F32(0.45) + F32(0.55) * in_lung)
    return c.paste(ribs + F32(0.15) * clav)


def spine_layer(full: Canvas, a: Anatomy) -> np.ndarray:
    """Vertebral column faintly through the mediastinum, minus the air of the trachea."""
    c = full.window(a.mid - 0.06, -0.1, a.mid + 0.06, 1.1)
    dx = np.abs(c.x - F32(a.mid))
    seg = F32(0.88) + F32(0.12) * np.cos(c.y * F32(2 * np.pi / 0.055))
    trachea = ramp(F32(0.014) - dx, 0.006) * ramp(F32(a.top + 0.18) - c.y, 0.04)
    return c.paste(F32(0.1) * ramp(F32(0.035) - dx, 0.015) * seg - F32(0.16) * trachea)


def _heart_frame(a: Anatomy) -> tuple[float, float, float, float]:
    """Heart top, height, and its reach to the image's left and right of the midline (ctr of the thorax)."""
    width = a.ctr * a.thorax_w
    medial_dome = a.top + (a.base - a.top) * (1 - 0.556 * a.dome)
    top = medial_dome + 0.02 - 0.95 * a.heart_h
    return top, a.heart_h, 0.38 * width, 0.62 * width


def heart_mask(full: Canvas, a: Anatomy) -> np.ndarray:
    """Full-image mask of the cardiac silhouette.

    The heart widens the mediastinum: a long convex left border (image right) down to an apex on the
    diaphragm, and a shorter right-atrial bulge (image left), as on a PA film.
    """
    top, h, right, left = _heart_frame(a)
    c = full.window(a.mid - right - 0.02, top - 0.02, a.mid + left + 0.02, top + 1.15 * h)
    yl = (c.y - F32(top)) * F32(1 / h)
    below = 1 - ((yl - F32(0.75)) * F32(1 / 0.3)) ** 2
    f_left = np.sqrt(np.clip(np.where(yl < 0.75, yl * F32(1 / 0.75), below), 0, 1))
    f_right = np.sqrt(np.clip(np.sin(F32(np.pi) * np.clip((yl - F32(0.3)) * F32(1 / 0.8), 0, 1)), 0, 1))
    x_left = F32(a.mid + a.gap) + F32(left - a.gap) * f_left
    x_right = F32(a.mid - a.gap) - F32(right - a.gap) * f_right
    soft = c.soft(0.01)
    return c.paste(ramp(x_left - c.x, soft) * ramp(c.x - x_right, soft)
                   * ramp(yl * F32(h), soft) * ramp((F32(1.1) - yl) * F32(h), soft))


def aortic_knob(full: Canvas, a: Anatomy) -> np.ndarray:
    """A bump on the left upper mediastinal contour (not a free disk, which would read as a nodule)."""
    kx, ky = a.mid + a.gap - 0.02, a.top + 0.2
    c = full.window(kx - 0.06, ky - 0.06, kx + 0.06, ky + 0.06)
    return c.paste(disk(c, kx, ky, 0.038, 0.05, 0.015))


def heart_centre(a: Anatomy) -> tuple[float, float, float]:
    """Centre and half-height of the heart, for findings placed relative to it."""
    top, h, right, left = _heart_frame(a)
    return a.mid + (left - right) / 2, top + 0.55 * h, h / 2


def vessel_markings(lung: Lung, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Meandering vessels fanning out of the hilum, tapering towards the periphery, plus the hilar shadow."""
    c = lung.c
    hx, hy = lung.geom.at(0.05, 0.48)
    r = np.sqrt((c.x - F32(hx)) ** 2 + (c.y - F32(hy)) ** 2)
    fade = np.exp(r * F32(-1 / 0.18)) * F32(1.2)
    warp = F32(0.15) * noise(rng, c, 8)
    lines = radial_lines(c, rng, (hx, hy), (16, 32), (0.007, 0.0045), warp, taper=0.3)
    hilum = gauss(c, hx + lung.geom.side * 0.01, hy, 0.02, 0.05)
    return F32(strength) * (lines * fade + F32(0.6) * hilum) * lung.mask
