"""Synthetic ChestX-ray14: NIH's exact file layout, filled with procedurally drawn chest-radiograph phantoms.

Why: the real release is 45 GB and cannot live in a test or a CI job, yet every stage (metadata, shards,
training, evaluation) must run end to end on data shaped exactly like it, quirks included (`messy=True`).
Each of the 14 findings has its own localized, visually distinct signature drawn where it plausibly sits,
so a small CNN can learn all of them and a pipeline bug shows up as a metric drop rather than noise.

Images are drawn as an attenuation map (bright = dense) in anatomical coordinates (0..1 across the
image before a small per-image shift/scale/rotation), then exposed through a film-like curve and
quantized to 8 bits. Every image draws from its own RNG derived from (seed, image index), and inside an
image each finding has its own stream, so adding a finding changes only that finding's pixels.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageFilter

from cxr import labels

# NIH's 8 findings that have boxes in BBox_List_2017.csv, as Data_Entry spells them.
BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
         "Pneumothorax")
_STREAMS = 2 + labels.NUM_FINDINGS  # anatomy, markings, then one per finding
_F32 = np.float32


# --------------------------------------------------------------------------------------------- primitives


@dataclass(frozen=True)
class _Canvas:
    """Anatomical coordinates of pixels; `px` is one pixel in anatomical units (for edge softness).

    The full canvas covers the image; `window` gives a sub-canvas over part of it, so local structures
    (lungs, vessels, lesions) are computed only where they are and pasted back, which is most of why
    2,000 images take well under a minute on two cores.
    """

    size: int
    x: np.ndarray
    y: np.ndarray
    px: float
    jitter: tuple[float, float, float, float]  # shift x, shift y, scale, angle
    rows: slice = field(default_factory=lambda: slice(None))
    cols: slice = field(default_factory=lambda: slice(None))

    def soft(self, width: float) -> float:
        """Edges are never sharper than ~one pixel, or shapes alias at small sizes."""
        return max(width, 1.2 * self.px)

    def _to_pixel(self, x: float, y: float) -> tuple[float, float]:
        sx, sy, scale, angle = self.jitter
        cos, sin = math.cos(angle), math.sin(angle)
        u = 0.5 + sx + scale * (cos * (x - 0.5) - sin * (y - 0.5))
        v = 0.5 + sy + scale * (sin * (x - 0.5) + cos * (y - 0.5))
        return u * self.size, v * self.size

    def window(self, x0: float, y0: float, x1: float, y1: float) -> _Canvas:
        """Sub-canvas over the anatomical box [x0, x1] x [y0, y1] (call on the full canvas only)."""
        corners = [self._to_pixel(x, y) for x in (x0, x1) for y in (y0, y1)]
        us, vs = [u for u, _ in corners], [v for _, v in corners]
        c0, c1 = max(0, math.floor(min(us)) - 1), min(self.size, math.ceil(max(us)) + 1)
        r0, r1 = max(0, math.floor(min(vs)) - 1), min(self.size, math.ceil(max(vs)) + 1)
        rows, cols = slice(r0, max(r0, r1)), slice(c0, max(c0, c1))
        return replace(self, x=self.x[rows, cols], y=self.y[rows, cols], rows=rows, cols=cols)

    def crop(self, full: np.ndarray) -> np.ndarray:
        return full[self.rows, self.cols]

    def paste(self, part: np.ndarray) -> np.ndarray:
        """A full-image layer that is `part` inside this window and zero elsewhere."""
        out = np.zeros((self.size, self.size), dtype=_F32)
        out[self.rows, self.cols] = part
        return out


def _ramp(d: np.ndarray | float, soft: float) -> np.ndarray:
    """Soft step of a signed distance (positive inside): 0 outside, 1 inside, linear over `soft`."""
    return np.clip(np.asarray(d, dtype=_F32) * _F32(1 / soft) + _F32(0.5), _F32(0), _F32(1))


def _disk(c: _Canvas, cx: float, cy: float, rx: float, ry: float, soft: float,
          tilt: float = 0.0) -> np.ndarray:
    """Soft-edged ellipse mask, its x axis turned by `tilt` radians (clockwise on the image)."""
    dx, dy = c.x - _F32(cx), c.y - _F32(cy)
    if tilt:
        cos, sin = _F32(math.cos(tilt)), _F32(math.sin(tilt))
        dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
    r = np.sqrt((dx * _F32(1 / rx)) ** 2 + (dy * _F32(1 / ry)) ** 2)
    return _ramp((1 - r) * _F32(min(rx, ry)), c.soft(soft))


def _gauss(c: _Canvas, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((c.x - _F32(cx)) * _F32(1 / sx)) ** 2 + ((c.y - _F32(cy)) * _F32(1 / sy)) ** 2))


def _noise(rng: np.random.Generator, c: _Canvas, cells: int) -> np.ndarray:
    """Smooth unit-variance noise, `cells` features across the image at any pixel size, cropped to c."""
    low = rng.standard_normal((cells, cells)).astype(_F32)
    rows, cols = c.rows.indices(c.size), c.cols.indices(c.size)
    k = cells / c.size  # resample only this canvas's window of the full-image noise
    box = (cols[0] * k, rows[0] * k, cols[1] * k, rows[1] * k)
    out = (cols[1] - cols[0], rows[1] - rows[0])
    if min(out) <= 0:
        return np.zeros((max(out[1], 0), max(out[0], 0)), dtype=_F32)
    up = Image.fromarray(low).resize(out, Image.Resampling.BICUBIC, box=box)
    return np.asarray(up, dtype=_F32) * _F32(1.25)  # bicubic upsampling leaves ~0.8 of the unit std


def _ridges(n: np.ndarray, width: float) -> np.ndarray:
    """Thin lines along the zero crossings of smooth noise: a closed net of curves."""
    return np.clip(1 - np.abs(n) * _F32(1 / width), 0, 1)


def _periodic_interp(theta: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Linear interpolation of knots spread evenly over [-pi, pi), wrapping (np.interp is slow here)."""
    k = knots.size
    pos = (theta + _F32(np.pi)) * _F32(k / (2 * np.pi))
    i0 = np.floor(pos)
    frac = pos - i0
    i0 = i0.astype(np.int32) % k
    ext = np.append(knots, knots[0]).astype(_F32)
    return np.take(ext, i0) * (1 - frac) + np.take(ext, i0 + 1) * frac


def _radial_lines(c: _Canvas, rng: np.random.Generator, centre: tuple[float, float], counts: Iterable[int],
                  widths: Iterable[float], warp: np.ndarray | None = None, taper: float = 0.0) -> np.ndarray:
    """Lines radiating from `centre` with constant physical width: vessels or bronchi fanning from a hilum.

    One set of lines per (count, width), the finer sets fainter. `warp` (smooth noise) bends the angle
    with position so the lines meander instead of forming spokes; past `taper` (anatomical units)
    from the centre the lines are a third as wide, as vessels thin towards the periphery.
    """
    dx, dy = c.x - _F32(centre[0]), c.y - _F32(centre[1])
    r = np.sqrt(dx * dx + dy * dy) + _F32(1e-4)
    theta = np.arctan2(dy, dx)
    if warp is not None:
        theta = theta + warp * np.clip(r * _F32(1 / 0.08), 0, 1)
    out = np.zeros_like(r)
    dist = r * (1 + _F32(2) * np.clip(r * _F32(1 / taper), 0, 1)) if taper else r
    for i, (count, width) in enumerate(zip(counts, widths, strict=True)):
        n = _periodic_interp(theta, rng.standard_normal(count * 2))
        slope = count * 2 / (2 * np.pi) * 1.2  # typical |dn/dtheta|: angular distance → physical width
        out = np.maximum(out, _F32(0.6**i) * np.clip(1 - np.abs(n) * dist * _F32(1 / (slope * width)), 0, 1))
    return out


def _support_box(delta: np.ndarray, rng: np.random.Generator, thr: float = 0.01) -> tuple[float, ...] | None:
    """Pixel box (x, y, w, h) enclosing where a layer is drawn, with a small float margin like NIH's."""
    a = np.abs(delta)
    peak = float(a.max()) if a.size else 0.0
    if peak <= 0:
        return None
    hit = a > peak * thr
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    size = delta.shape[0]
    m = rng.integers(5000, 30001, size=4) / 1e4  # 0.5-3 px, exact in 4 decimals so x+w never passes the edge
    x0, y0 = max(0.0, cols[0] - m[0]), max(0.0, rows[0] - m[1])
    x1, y1 = min(float(size), cols[-1] + 1 + m[2]), min(float(size), rows[-1] + 1 + m[3])
    return (x0, y0, x1 - x0, y1 - y0)


# ----------------------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
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


def _sample_anatomy(rng: np.random.Generator, view: str) -> _Anatomy:
    """Plausible normal anatomy; AP films are magnified and softer but never reach a cardiomegalic CTR."""
    ap = view == "AP"
    return _Anatomy(
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


def _canvas(a: _Anatomy, size: int) -> _Canvas:
    """Pixel centres mapped back through the per-image jitter into anatomical coordinates."""
    u = (np.arange(size, dtype=_F32) + _F32(0.5)) / _F32(size)
    v, u = np.meshgrid(u, u, indexing="ij")
    du, dv = u - _F32(0.5 + a.shift[0]), v - _F32(0.5 + a.shift[1])
    cos, sin = _F32(math.cos(a.angle)), _F32(math.sin(a.angle))
    x = (cos * du + sin * dv) / _F32(a.scale) + _F32(0.5)
    y = (-sin * du + cos * dv) / _F32(a.scale) + _F32(0.5)
    return _Canvas(size, x, y, 1.0 / (size * a.scale), (*a.shift, a.scale, a.angle))


@dataclass(frozen=True)
class _LungGeom:
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
class _Lung:
    """One lung rasterized on its own window: lung coordinates, soft mask, distance to the lateral wall."""

    geom: _LungGeom
    c: _Canvas
    t: np.ndarray
    p: np.ndarray
    mask: np.ndarray
    d_lat: np.ndarray


def _diaphragm_p(t: np.ndarray, dome: float) -> np.ndarray:
    """Diaphragm height in lung coordinates: dome highest near the middle, deepest at the lateral angle."""
    return 1 - _F32(dome) * (1 - ((np.clip(t, 0, 1.2) - _F32(0.4)) * _F32(1 / 0.6)) ** 2)


def _lung_window(full: _Canvas, g: _LungGeom) -> _Canvas:
    x0, x1 = sorted((g.xm - g.side * 0.02, g.xm + g.side * (g.width + 0.02)))
    return full.window(x0, g.top - 0.02, x1, g.base + 0.02)


def _rasterize_lung(c: _Canvas, g: _LungGeom) -> _Lung:
    t = (c.x - _F32(g.xm)) * _F32(g.side / g.width)
    p = (c.y - _F32(g.top)) * _F32(1 / g.height)
    pc = np.clip(p, 0, None)
    q = 1 - np.clip(pc * _F32(1 / 0.8), 0, 1)
    t_lat = _F32(0.4) + _F32(0.6) * (1 - q * q * np.sqrt(q))  # rounded apex, convex lateral wall
    t_med = np.maximum(0, _F32(0.4) - _F32(0.4) * np.sqrt(pc * _F32(1 / 0.15)))
    d_lat = (t_lat - t) * _F32(g.width)
    mask = (_ramp(d_lat, c.soft(0.014)) * _ramp((t - t_med) * _F32(g.width), c.soft(0.015))
            * _ramp((_diaphragm_p(t, g.dome) - p) * _F32(g.height), c.soft(0.006))
            * _ramp(p * _F32(g.height), c.soft(0.01)))
    return _Lung(g, c, t, p, mask, d_lat)


def _lung_geoms(a: _Anatomy) -> tuple[_LungGeom, _LungGeom]:
    """Right hemidiaphragm (image left) sits a little higher, as it does over the liver."""
    return tuple(  # type: ignore[return-value]
        _LungGeom(side, a.mid + side * a.gap, a.lung_w, a.top, a.base - (0.02 if side < 0 else 0.0), a.dome)
        for side in (-1, 1)
    )


def _body(c: _Canvas, a: _Anatomy) -> np.ndarray:
    """Soft tissue: a cylinder-like thickness profile with neck and sloping shoulders."""
    dx = np.abs(c.x - _F32(a.mid))
    thick = np.sqrt(np.clip(1 - (dx * _F32(1 / 0.47)) ** 2, 0, 1))
    shoulder = _F32(0.03) + _F32(1.4) * np.clip(dx - _F32(0.1), 0, None) ** 2
    neck = _ramp(_F32(0.085) + _F32(0.25) * c.y - dx, 0.03)
    return _F32(0.78) * thick * np.maximum(_ramp(c.y - shoulder, 0.02), neck)


def _rib_set(c: _Canvas, a: _Anatomy, shape: np.ndarray, start: float, count: int, half: float) -> np.ndarray:
    """Curved bands following `shape(x)`, spaced wider further down, all drawn at once by phase."""
    u = np.abs(c.x - _F32(a.mid))
    h = a.base - a.top
    depth = np.clip((c.y - shape - _F32(start)) * _F32(1 / h), 1e-3, None)
    stretched = depth ** _F32(0.85)
    phase = _F32(9.5) * stretched
    spacing = depth * _F32(h / (9.5 * 0.85)) / stretched  # 1 / d(phase)/dy
    k = np.round(phase)
    band = _ramp(_F32(half) - np.abs(phase - k) * spacing, c.soft(0.006))
    inside = (k >= 0) & (k < count) & (u > 0.03)
    return band * inside * _ramp(_F32(a.thorax_w / 2 + 0.02) - u, 0.02)


def _ribs(full: _Canvas, a: _Anatomy, in_lung: np.ndarray) -> np.ndarray:
    """Posterior ribs arching out from the spine, fainter anterior ribs sloping down medially, clavicles."""
    half = a.thorax_w / 2 + 0.05
    c = full.window(a.mid - half, a.clavicle_y - 0.09, a.mid + half, a.base + 0.15)
    u = np.abs(c.x - _F32(a.mid))
    post = _rib_set(c, a, _F32(-0.35) * u + _F32(1.6) * u * u, a.top + 0.01, 10, 0.011)
    ant = _rib_set(c, a, _F32(1.05) * (_F32(0.36) - u) ** 2, a.top + 0.02, 6, 0.009)
    ant *= _ramp(u - _F32(0.1), 0.05)
    clav_y = _F32(a.clavicle_y + 0.03) - _F32(0.3) * (u - _F32(0.05)) + _F32(0.9) * (u - _F32(0.2)) ** 2
    clav = (_ramp(_F32(0.011) - np.abs(c.y - clav_y), c.soft(0.005)) * _ramp(_F32(0.36) - u, 0.01)
            * _ramp(u - _F32(0.04), 0.01))
    in_lung = c.crop(in_lung)
    ribs = (_F32(0.07) * post + _F32(0.035) * ant) * (_F32(0.45) + _F32(0.55) * in_lung)
    return c.paste(ribs + _F32(0.15) * clav)


def _spine(full: _Canvas, a: _Anatomy) -> np.ndarray:
    """Vertebral column faintly through the mediastinum, minus the air of the trachea."""
    c = full.window(a.mid - 0.06, -0.1, a.mid + 0.06, 1.1)
    dx = np.abs(c.x - _F32(a.mid))
    seg = _F32(0.88) + _F32(0.12) * np.cos(c.y * _F32(2 * np.pi / 0.055))
    trachea = _ramp(_F32(0.014) - dx, 0.006) * _ramp(_F32(a.top + 0.18) - c.y, 0.04)
    return c.paste(_F32(0.1) * _ramp(_F32(0.035) - dx, 0.015) * seg - _F32(0.16) * trachea)


def _heart_frame(a: _Anatomy) -> tuple[float, float, float, float]:
    """Heart top, height, and its reach to the image's left and right of the midline (ctr of the thorax)."""
    width = a.ctr * a.thorax_w
    medial_dome = a.top + (a.base - a.top) * (1 - 0.556 * a.dome)
    top = medial_dome + 0.02 - 0.95 * a.heart_h
    return top, a.heart_h, 0.38 * width, 0.62 * width


def _heart(full: _Canvas, a: _Anatomy) -> np.ndarray:
    """Full-image mask of the cardiac silhouette.

    The heart widens the mediastinum: a long convex left border (image right) down to an apex on the
    diaphragm, and a shorter right-atrial bulge (image left), as on a PA film.
    """
    top, h, right, left = _heart_frame(a)
    c = full.window(a.mid - right - 0.02, top - 0.02, a.mid + left + 0.02, top + 1.15 * h)
    yl = (c.y - _F32(top)) * _F32(1 / h)
    below = 1 - ((yl - _F32(0.75)) * _F32(1 / 0.3)) ** 2
    f_left = np.sqrt(np.clip(np.where(yl < 0.75, yl * _F32(1 / 0.75), below), 0, 1))
    f_right = np.sqrt(np.clip(np.sin(_F32(np.pi) * np.clip((yl - _F32(0.3)) * _F32(1 / 0.8), 0, 1)), 0, 1))
    x_left = _F32(a.mid + a.gap) + _F32(left - a.gap) * f_left
    x_right = _F32(a.mid - a.gap) - _F32(right - a.gap) * f_right
    soft = c.soft(0.01)
    return c.paste(_ramp(x_left - c.x, soft) * _ramp(c.x - x_right, soft)
                   * _ramp(yl * _F32(h), soft) * _ramp((_F32(1.1) - yl) * _F32(h), soft))


def _aortic_knob(full: _Canvas, a: _Anatomy) -> np.ndarray:
    """A bump on the left upper mediastinal contour (not a free disk, which would read as a nodule)."""
    kx, ky = a.mid + a.gap - 0.02, a.top + 0.2
    c = full.window(kx - 0.06, ky - 0.06, kx + 0.06, ky + 0.06)
    return c.paste(_disk(c, kx, ky, 0.038, 0.05, 0.015))


def _heart_centre(a: _Anatomy) -> tuple[float, float, float]:
    """Centre and half-height of the heart, for findings placed relative to it."""
    top, h, right, left = _heart_frame(a)
    return a.mid + (left - right) / 2, top + 0.55 * h, h / 2


def _markings(lung: _Lung, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Meandering vessels fanning out of the hilum, tapering towards the periphery, plus the hilar shadow."""
    c = lung.c
    hx, hy = lung.geom.at(0.05, 0.48)
    r = np.sqrt((c.x - _F32(hx)) ** 2 + (c.y - _F32(hy)) ** 2)
    fade = np.exp(r * _F32(-1 / 0.18)) * _F32(1.2)
    warp = _F32(0.15) * _noise(rng, c, 8)
    lines = _radial_lines(c, rng, (hx, hy), (16, 32), (0.007, 0.0045), warp, taper=0.3)
    hilum = _gauss(c, hx + lung.geom.side * 0.01, hy, 0.02, 0.05)
    return _F32(strength) * (lines * fade + _F32(0.6) * hilum) * lung.mask


# ---------------------------------------------------------------------------------------------- findings


@dataclass
class _Scene:
    """What finding painters read (canvas, anatomy, lungs) and may change (the vessel markings)."""

    c: _Canvas
    a: _Anatomy
    lungs: tuple[_Lung, _Lung]
    markings: np.ndarray
    heart: np.ndarray

    def lung(self, rng: np.random.Generator) -> _Lung:
        return self.lungs[int(rng.integers(2))]


def _point_in_lung(lung: _Lung, rng: np.random.Generator, t: tuple[float, float],
                   p: tuple[float, float]) -> tuple[float, float]:
    """A random anatomical point well inside the lung (above the diaphragm at that t)."""
    ti = rng.uniform(*t)
    top = float(_diaphragm_p(np.float32(ti), lung.geom.dome)) - 0.12
    return lung.geom.at(ti, rng.uniform(p[0], min(p[1], top)))


def _atelectasis(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Plate/wedge atelectasis: an oblique dense band in the lower zone, thicker at its lateral end."""
    lung = s.lung(rng)
    c = lung.c
    x0, y0 = lung.geom.at(rng.uniform(0.4, 0.6), rng.uniform(0.58, 0.7))
    ang = math.radians(rng.uniform(-25, 10)) * -lung.geom.side
    length, wmax = rng.uniform(0.07, 0.1), rng.uniform(0.02, 0.026)
    dx, dy = c.x - _F32(x0), c.y - _F32(y0)
    along = (dx * _F32(math.cos(ang)) + dy * _F32(math.sin(ang))) * _F32(lung.geom.side)
    across = -dx * _F32(math.sin(ang)) + dy * _F32(math.cos(ang))
    width = _F32(wmax) * (_F32(0.3) + _F32(0.7) * np.clip((along * _F32(1 / length) + 1) * _F32(0.5), 0, 1))
    band = _ramp(_F32(length) - np.abs(along), c.soft(0.01)) * _ramp(width - np.abs(across), c.soft(0.005))
    return c.paste(_F32(0.45) * band * lung.mask)


def _effusion(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Fluid filling the costophrenic angle up to a meniscus that climbs the lateral wall."""
    lung = s.lung(rng)
    level = _F32(1 - rng.uniform(0.14, 0.28)) - _F32(rng.uniform(0.2, 0.3)) * np.clip(lung.t, 0, 1) ** 3
    fluid = _ramp((lung.p - level) * _F32(lung.geom.height), lung.c.soft(0.012))
    return lung.c.paste(_F32(s.a.lucency * 1.05) * fluid * lung.mask)


def _infiltration(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Patchy, ill-defined, mottled opacities scattered through the mid zone of one or both lungs."""
    out = np.zeros_like(s.c.x)
    lungs = s.lungs if rng.random() < 0.3 else (s.lung(rng),)
    for lung in lungs:
        c = lung.c
        patches = np.zeros_like(c.x)
        for _ in range(int(rng.integers(7, 11))):
            x, y = _point_in_lung(lung, rng, (0.25, 0.9), (0.25, 0.7))
            sx = rng.uniform(0.014, 0.026)
            patches = np.maximum(patches, _gauss(c, x, y, sx, sx * rng.uniform(0.8, 1.3)))
        tex = _F32(0.55) + _F32(0.45) * np.clip(_noise(rng, c, 40), -1, 1)
        out += c.paste(_F32(0.5) * patches * lung.mask * tex)
    return out


def _round_lesion(s: _Scene, rng: np.random.Generator, radius: float, lobulation: float) -> np.ndarray:
    """A dense, well-circumscribed round opacity with a slightly lobulated edge, inside a lung."""
    lung = s.lung(rng)
    x, y = _point_in_lung(lung, rng, (0.3, 0.8), (0.2, 0.72))
    m = radius * 1.5
    c = s.c.window(x - m, y - m, x + m, y + m)
    dx, dy = c.x - _F32(x), c.y - _F32(y)
    th = np.arctan2(dy, dx)
    edge = _F32(radius) * (1 + _F32(lobulation) * np.sin(3 * th + _F32(rng.uniform(0, 6)))
                           + _F32(lobulation * 0.6) * np.sin(5 * th + _F32(rng.uniform(0, 6))))
    d = np.sqrt(dx * dx + dy * dy)
    core = _F32(0.85) + _F32(0.15) * np.clip(1 - (d * _F32(1 / radius)) ** 2, 0, 1)
    return c.paste(_ramp(edge - d, c.soft(0.004)) * core)


def _mass(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Mass: 6-11% of the image width across."""
    return _F32(0.5) * _round_lesion(s, rng, rng.uniform(0.03, 0.055), 0.07)


def _nodule(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Nodule: one or two small (2-3% of width) dense disks, denser than a rib crossing."""
    out = _round_lesion(s, rng, rng.uniform(0.012, 0.016), 0.03)
    if rng.random() < 0.3:
        out = np.maximum(out, _round_lesion(s, rng, rng.uniform(0.011, 0.014), 0.03))
    return _F32(0.75) * out


def _pneumonia(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Lobar pneumonia: lower-zone opacity under a sharp fissure, fading above the dome, air bronchograms."""
    lung = s.lung(rng)
    c, g = lung.c, lung.geom
    fissure = _F32(rng.uniform(0.42, 0.52)) + _F32(rng.uniform(-0.08, 0.08)) * lung.t
    lobe = (_ramp((lung.p - fissure) * _F32(g.height), c.soft(0.006))
            * _ramp((_diaphragm_p(lung.t, g.dome) - _F32(0.07) - lung.p) * _F32(g.height), 0.05)
            * np.clip((lung.t - _F32(rng.uniform(0.0, 0.15))) * _F32(1 / 0.25), 0, 1))
    bronchi = _radial_lines(c, rng, g.at(0.05, 0.45), (16,), (0.005,), _F32(0.12) * _noise(rng, c, 8))
    tex = _F32(0.92) + _F32(0.08) * _noise(rng, c, 50)
    return c.paste(_F32(0.45) * lobe * lung.mask * (tex - _F32(0.6) * bronchi))


def _pneumothorax(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Air between lung and chest wall: a lucent apical/lateral rim without markings, a thin pleural line."""
    lung = s.lung(rng)
    g = lung.geom
    shrink = rng.uniform(0.6, 0.75)
    cg = replace(g, width=g.width * shrink, top=g.top + (1 - shrink) * g.height * 0.7)
    collapsed = _rasterize_lung(lung.c, cg).mask
    rim = np.clip(lung.mask - collapsed, 0, 1)
    near_rim = np.asarray(Image.fromarray(rim).filter(ImageFilter.MaxFilter(s.c.size // 80 * 2 + 3)))
    line = _F32(4) * collapsed * (1 - collapsed) * near_rim  # only where the lung has come off the wall
    lung.c.crop(s.markings)[...] *= 1 - rim
    return lung.c.paste(_F32(0.22) * line - _F32(0.2) * rim)


def _consolidation(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Dense, homogeneous upper-zone airspace opacity bounded below by a sharp fissure."""
    lung = s.lung(rng)
    c, g = lung.c, lung.geom
    lower = _F32(rng.uniform(0.3, 0.42)) + _F32(rng.uniform(-0.06, 0.06)) * lung.t
    upper = rng.uniform(0.03, 0.12)
    area = (_ramp((lower - lung.p) * _F32(g.height), c.soft(0.005))
            * _ramp((lung.p - _F32(upper)) * _F32(g.height), 0.03)
            * np.clip((lung.t - _F32(rng.uniform(0.0, 0.2))) * _F32(1 / 0.25), 0, 1))
    return c.paste(_F32(0.5) * area * lung.mask)


def _edema(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Bilateral, symmetric perihilar 'bat-wing' haze with Kerley B lines at the lateral bases."""
    spread = rng.uniform(0.9, 1.1)
    out = np.zeros_like(s.c.x)
    for lung in s.lungs:
        c, g = lung.c, lung.geom
        hx, hy = g.at(0.1, 0.48)
        haze = _gauss(c, hx, hy, 0.55 * g.width * spread, 0.3 * g.height * spread)
        tex = _F32(0.8) + _F32(0.2) * _noise(rng, c, 24)
        stripes = np.abs((c.y * _F32(1 / 0.022)) % 1 - _F32(0.5)) * _F32(0.022)
        lines = _ramp(_F32(0.0035) - stripes, c.soft(0.002))
        kerley = (lines * _ramp((lung.t - _F32(0.8)) * _F32(g.width), 0.01)
                  * _ramp((lung.p - _F32(0.65)) * _F32(g.height), 0.02))
        out += c.paste((_F32(0.32) * haze * tex + _F32(0.18) * kerley) * lung.mask)
    return out


def _fibrosis(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Reticular net of fine lines, basal and peripheral, usually both lungs."""
    net = _ridges(_noise(rng, s.c, 30), 0.42)
    lungs = s.lungs if rng.random() < 0.7 else (s.lung(rng),)
    where = np.zeros_like(s.c.x)
    for lung in lungs:
        basal = np.clip((lung.p - _F32(0.3)) * _F32(1 / 0.3), 0, 1)
        peripheral = np.clip((lung.t - _F32(0.3)) * _F32(1 / 0.3), 0, 1)
        where += lung.c.paste(basal * peripheral * lung.mask)
    return _F32(0.55) * net * where


def _pleural_thickening(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """A smooth soft-tissue band along the lateral chest wall of the mid/upper zone."""
    lung = s.lung(rng)
    c, g = lung.c, lung.geom
    thick = _F32(rng.uniform(0.022, 0.032)) * (1 + _F32(0.15) * np.sin(lung.p * _F32(rng.uniform(8, 14))))
    band = (_ramp(thick - lung.d_lat, c.soft(0.006))
            * _ramp((lung.p - _F32(rng.uniform(0.08, 0.2))) * _F32(g.height), 0.02)
            * _ramp((_F32(rng.uniform(0.55, 0.75)) - lung.p) * _F32(g.height), 0.03))
    return c.paste(_F32(0.55) * band * lung.mask)


def _hernia(s: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Hiatus hernia: a round retrocardiac mass at the base with an air-fluid level (dark cap, flat floor)."""
    _, hy, hh = _heart_centre(s.a)
    r = rng.uniform(0.055, 0.075)
    cx, cy = s.a.mid + rng.uniform(-0.01, 0.04), hy + hh * rng.uniform(0.2, 0.45)
    c = s.c.window(cx - r - 0.02, cy - r - 0.02, cx + r + 0.02, cy + r + 0.02)
    sac = _disk(c, cx, cy, r, r * rng.uniform(0.8, 0.95), 0.006)
    wall = sac - _disk(c, cx, cy, r - 0.006, (r - 0.006) * 0.9, 0.004)
    level = cy + r * rng.uniform(-0.1, 0.25)
    air = sac * _ramp(_F32(level) - c.y, c.soft(0.002))
    return c.paste(_F32(0.15) * wall + _F32(0.12) * sac - _F32(0.5) * air)


_PAINTERS = {
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


def _global_findings(a: _Anatomy, present: set[str], streams: list[np.random.Generator]) -> _Anatomy:
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


# ------------------------------------------------------------------------------------------------ render


def _names(findings: Iterable[str] | np.ndarray) -> set[str]:
    if isinstance(findings, np.ndarray):
        return {labels.FINDINGS[i] for i in np.flatnonzero(findings)}
    unknown = set(findings) - set(labels.FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}")
    return set(findings)


def _expose(att: np.ndarray, a: _Anatomy, c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Film response: attenuation → brightness through 1-exp, gamma, window, heel effect and quantum grain."""
    lit = _F32(a.gain) * (att + _F32(a.heel) * (c.x - _F32(0.5)))
    img = (1 - np.exp(-lit)) * _F32(1 / (1 - math.exp(-a.gain * 1.1)))
    img = np.clip(img, 0, 1) ** _F32(a.gamma)
    lo, hi = a.window
    grain = rng.random(img.shape, dtype=_F32) - _F32(0.5)  # uniform: a third the cost of gaussian grain
    img = _F32(lo) + _F32(hi - lo) * img + _F32(0.012 * math.sqrt(12)) * grain
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _anatomy_layers(c: _Canvas, a: _Anatomy, rng_vessels: np.random.Generator) -> _Scene:
    """Lungs (hidden where the heart lies in front of them) and their vessel markings."""
    heart = _heart(c, a)
    solid = np.maximum(heart, _aortic_knob(c, a))
    lungs = []
    for g in _lung_geoms(a):
        lung = _rasterize_lung(_lung_window(c, g), g)
        lung.mask = lung.mask * (1 - lung.c.crop(solid))
        lungs.append(lung)
    markings = np.zeros_like(c.x)
    for lung in lungs:
        markings += lung.c.paste(_markings(lung, rng_vessels, a.markings))
    return _Scene(c, a, (lungs[0], lungs[1]), markings, heart)


def _air(s: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """How much air each pixel sees through (less at the bases and periphery), and the plain lung mask."""
    air, in_lung = np.zeros_like(s.c.x), np.zeros_like(s.c.x)
    for lung in s.lungs:
        base = 1 - _F32(0.3) * np.clip(lung.p, 0, 1) ** 2
        periphery = _F32(0.7) + _F32(0.3) * np.sin(_F32(np.pi) * np.clip(lung.t, 0, 1))
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
    a = _global_findings(_sample_anatomy(streams[0], view), present, streams)
    c = _canvas(a, size)
    scene = _anatomy_layers(c, a, streams[1])
    lesions, boxes = np.zeros_like(c.x), {}
    for name in labels.FINDINGS:
        if name in present and name in _PAINTERS:
            rng_f = streams[2 + labels.INDEX[name]]
            delta = _PAINTERS[name](scene, rng_f)
            lesions += delta
            if name in BOXED:
                boxes[name] = _support_box(delta, rng_f)
    if "Cardiomegaly" in present:
        boxes["Cardiomegaly"] = _support_box(scene.heart, streams[2 + labels.INDEX["Cardiomegaly"]], thr=0.05)
    lung_air, in_lung = _air(scene)
    att = (_body(c, a) + _ribs(c, a, in_lung) + _spine(c, a) - _F32(a.lucency) * lung_air
           + scene.markings + lesions + _F32(0.025) * _noise(streams[0], c, 12))
    return _expose(att, a, c, streams[0]), {k: v for k, v in boxes.items() if v is not None}


# ---------------------------------------------------------------------------------------------- metadata

DATA_ENTRY = "Data_Entry_2017_v2020.csv"
DATA_ENTRY_2017 = "Data_Entry_2017.csv"
BBOX_LIST = "BBox_List_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BBOX_SPELLING = {"Infiltration": "Infiltrate"}
DEFECTS = ("rgba_image", "16bit_image", "truncated_image", "missing_image", "impossible_age",
           "duplicate_image", "unknown_label")

NO_FINDING_RATE = 0.45
FINDINGS_PER_IMAGE = (0.35, 0.35, 0.30)  # P(1, 2, 3 findings) for an abnormal image
# Relative draw weights in FINDINGS order: skewed like NIH (Infiltration, Effusion, Atelectasis first,
# Hernia last) but flat enough that every finding stays above ~6% prevalence.
FINDING_WEIGHTS = (1.45, 0.92, 1.6, 2.0, 1.0, 1.05, 0.93, 1.0, 0.98, 0.93, 0.93, 0.92, 0.93, 0.88)
FOLLOWUPS = (0.2, 0.16, 0.15, 0.15, 0.15, 0.19)  # P(1..6 images per patient), mean ~3.5
TEST_FRACTION = 0.2
BOX_RATE = 0.5  # share of positive (test image, boxed finding) pairs that get a box
_NIH_NAME = re.compile(r"\d{8}_\d{3}\.png")


@dataclass
class _Row:
    """One image of the plan: everything the CSV says about it plus what to draw and box."""

    index: int
    name: str
    patient: int
    followup: int
    age: int
    sex: str
    view: str
    y: np.ndarray
    test: bool = False
    box: tuple[str, ...] = ()
    extra_label: str = ""
    defect: str = ""


def _sample_labels(rng: np.random.Generator) -> np.ndarray:
    y = np.zeros(labels.NUM_FINDINGS, dtype=np.uint8)
    if rng.random() >= NO_FINDING_RATE:
        k = rng.choice(len(FINDINGS_PER_IMAGE), p=FINDINGS_PER_IMAGE) + 1
        w = np.asarray(FINDING_WEIGHTS) / sum(FINDING_WEIGHTS)
        y[rng.choice(labels.NUM_FINDINGS, size=k, replace=False, p=w)] = 1
    return y


def _patient_rows(rng: np.random.Generator, patient: int, start: int) -> list[_Row]:
    """A patient's follow-ups: fixed sex, age creeping up between visits, PA or AP per film."""
    n = int(rng.choice(len(FOLLOWUPS), p=FOLLOWUPS)) + 1
    sex = "M" if rng.random() < 0.56 else "F"
    age = float(np.clip(rng.normal(48, 16), 3, 88))
    rows = []
    for f in range(n):
        age += rng.uniform(0, 1.2) if f else 0.0
        view = "PA" if rng.random() < 0.6 else "AP"
        rows.append(_Row(start + f, f"{patient:08d}_{f:03d}.png", patient, f, int(age), sex, view,
                         _sample_labels(rng)))
    return rows


def _plan(patients: int, seed: int) -> list[_Row]:
    """All rows in CSV order, the patient-disjoint test split and which test positives get boxes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    rows: list[_Row] = []
    for pid in range(1, patients + 1):
        rows += _patient_rows(rng, pid, len(rows))
    n_test = max(1, round(TEST_FRACTION * patients)) if patients > 1 else 0
    test = set((rng.permutation(patients)[:n_test] + 1).tolist())
    for r in rows:
        r.test = r.patient in test
        if r.test:
            r.box = tuple(f for f in BOXED if r.y[labels.INDEX[f]] and rng.random() < BOX_RATE)
    return rows


def _add_defects(rows: list[_Row], seed: int) -> dict[str, str]:
    """NIH's real defects, one each, on distinct train/val images; kind → image index."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    pool = [r for r in rows if not r.test]
    if len(pool) < len(DEFECTS):
        raise ValueError(f"messy=True needs at least {len(DEFECTS)} train/val images, got {len(pool)}")
    labelled = [r for r in pool if r.y.any()] or pool
    victim = labelled[int(rng.integers(len(labelled)))]
    victim.defect, victim.extra_label = "unknown_label", "Pneumonitis"
    rest = [r for r in pool if r is not victim]
    picks = rng.choice(len(rest), size=len(DEFECTS) - 1, replace=False)
    for kind, i in zip(DEFECTS[:-1], picks, strict=True):
        rest[int(i)].defect = kind
    defects = {r.defect: r.name for r in rows if r.defect}
    defects["not_in_csv"] = f"{max(r.patient for r in rows) + 1:08d}_000.png"
    defects["csv_variant"] = "2017"
    return defects


def _label_text(r: _Row) -> str:
    text = labels.format_labels(r.y)
    if r.extra_label:
        text = r.extra_label if text == labels.NO_FINDING else f"{text}|{r.extra_label}"
    return text


def _csv_line(r: _Row, size: int) -> str:
    spacing = f"{round(0.143 * 1024 / size, 6):g}"
    age = 414 if r.defect == "impossible_age" else r.age
    return (f"{r.name},{_label_text(r)},{r.followup},{r.patient},{age},{r.sex},{r.view},"
            f"{size},{size},{spacing},{spacing}")


def _data_entry_text(rows: list[_Row], size: int, variant: str) -> str:
    """The CSV; the 2017 variant has a trailing comma (an empty 12th column) on every line."""
    lines = [HEADER]
    for r in rows:
        lines.append(_csv_line(r, size))
        if r.defect == "duplicate_image":
            lines.append(lines[-1])
    end = "," if variant == "2017" else ""
    return "".join(line + end + "\n" for line in lines)


def _bbox_text(rows: list[_Row], boxes: dict[int, dict[str, tuple[float, ...]]]) -> tuple[str, int]:
    lines = [BBOX_HEADER]
    for r in rows:
        for f in r.box:
            if f in boxes.get(r.index, {}):
                x, y, w, h = boxes[r.index][f]
                lines.append(f"{r.name},{BBOX_SPELLING.get(f, f)},{x:.4f},{y:.4f},{w:.4f},{h:.4f},,,")
    return "".join(line + "\n" for line in lines), len(lines) - 1


def _list_texts(rows: list[_Row], defects: dict[str, str]) -> tuple[str, str]:
    train_val = [r.name for r in rows if not r.test]
    if "not_in_csv" in defects:
        train_val.append(defects["not_in_csv"])
    test = [r.name for r in rows if r.test]
    return "".join(n + "\n" for n in train_val), "".join(n + "\n" for n in test)


# ------------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class _Job:
    """What a worker process needs to draw and save one image (picklable, small)."""

    index: int
    path: str
    y: np.ndarray
    view: str
    seed: int
    size: int
    defect: str


def _encode(img: np.ndarray, defect: str) -> bytes:
    """PNG bytes, as NIH's odd files are where a defect asks for it."""
    if defect == "rgba_image":
        im = Image.fromarray(np.dstack([img, img, img, np.full_like(img, 255)]))
    elif defect == "16bit_image":
        im = Image.fromarray(img.astype(np.uint16) * np.uint16(257))
    else:
        im = Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # zlib at 6 would cost more than drawing
    data = buf.getvalue()
    return data[: len(data) // 2] if defect == "truncated_image" else data


def _draw(job: _Job) -> tuple[int, dict[str, tuple[float, ...]]]:
    """Worker: render with the image's own RNG (seed, index), write the file, return its boxes."""
    if job.defect == "missing_image":  # listed in the CSV, never written (a stale copy was removed)
        return job.index, {}
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index]))
    img, boxes = render(job.y, rng, job.size, job.view)
    with open(job.path, "wb") as fh:
        fh.write(_encode(img, job.defect))
    return job.index, boxes


def _tune_malloc() -> None:
    """Worker initializer: keep freed image-sized buffers in the heap rather than unmapping them.

    glibc returns every freed 256 KB array to the kernel and page-faults it back on the next one,
    which cost ~30% of the drawing time. Best effort, glibc only; never done to the caller's process.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _draw_all(jobs: list[_Job], workers: int, progress: bool) -> dict[int, dict[str, tuple[float, ...]]]:
    """Draw every image, in worker processes when there is more than one worker."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synth images", unit="img", disable=not progress, file=sys.stderr)
    boxes: dict[int, dict[str, tuple[float, ...]]] = {}
    try:
        if workers <= 1 or len(jobs) < 2:
            results: Iterable[tuple[int, dict]] = map(_draw, jobs)
            for index, b in results:
                boxes[index] = b
                bar.update()
            return boxes
        # spawn, not fork: the caller may hold threads (TensorFlow, Ray) that fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_tune_malloc) as pool:
            chunk = max(1, min(32, len(jobs) // (workers * 8)))
            for index, b in pool.map(_draw, jobs, chunksize=chunk):
                boxes[index] = b
                bar.update()
    finally:
        bar.close()
    return boxes


def _remove_stale(images_dir: str, keep: set[str]) -> None:
    """Drop NIH-named PNGs a previous run left behind, so the root holds exactly this dataset."""
    for name in os.listdir(images_dir):
        if _NIH_NAME.fullmatch(name) and name not in keep:
            os.remove(os.path.join(images_dir, name))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", newline="") as fh:
        fh.write(text)


def _write_metadata(out_root: str, rows: list[_Row], boxes: dict[int, dict[str, tuple[float, ...]]],
                    defects: dict[str, str], size: int) -> tuple[str, int]:
    """The CSV (2020 name, or the 2017 variant when messy), BBox list and split lists; (csv name, boxes)."""
    variant = defects.get("csv_variant", "2020")
    csv_name, other = (DATA_ENTRY_2017, DATA_ENTRY) if variant == "2017" else (DATA_ENTRY, DATA_ENTRY_2017)
    if os.path.exists(os.path.join(out_root, other)):  # a previous run's other variant would shadow ours
        os.remove(os.path.join(out_root, other))
    _write_text(os.path.join(out_root, csv_name), _data_entry_text(rows, size, variant))
    bbox_text, n_boxes = _bbox_text(rows, boxes)
    _write_text(os.path.join(out_root, BBOX_LIST), bbox_text)
    train_val, test = _list_texts(rows, defects)
    _write_text(os.path.join(out_root, TRAIN_VAL_LIST), train_val)
    _write_text(os.path.join(out_root, TEST_LIST), test)
    return csv_name, n_boxes


def synthesize(out_root: str, patients: int, size: int = 256, seed: int = 0, messy: bool = False,
               workers: int | None = None, progress: bool = True) -> dict:
    """Write an NIH ChestX-ray14-shaped dataset of phantoms under the local directory `out_root`.

    Deterministic for (patients, size, seed, messy): the CSVs and lists are byte-identical and every
    image's pixels identical whatever `workers` is. `messy=True` adds one of each of NIH's defects,
    reported under `defects` (kind → image index) in the returned summary. Images are drawn in
    `workers` spawned processes (default: one per CPU), so a calling script needs the usual
    `if __name__ == "__main__":` guard.
    """
    if patients < 1 or size < 32:
        raise ValueError(f"need patients >= 1 and size >= 32, got patients={patients}, size={size}")
    started = time.perf_counter()
    rows = _plan(patients, seed)
    defects = _add_defects(rows, seed) if messy else {}
    images_dir = os.path.join(out_root, "images")
    os.makedirs(images_dir, exist_ok=True)
    _remove_stale(images_dir, {r.name for r in rows if r.defect != "missing_image"})
    jobs = [_Job(r.index, os.path.join(images_dir, r.name), r.y, r.view, seed, size, r.defect) for r in rows]
    boxes = _draw_all(jobs, workers or os.cpu_count() or 1, progress)
    csv_name, n_boxes = _write_metadata(out_root, rows, boxes, defects, size)
    y = np.stack([r.y for r in rows])
    summary = {
        "out_root": out_root,
        "csv": csv_name,
        "images": len(rows),
        "patients": patients,
        "size": size,
        "seed": seed,
        "train_val": sum(not r.test for r in rows),
        "test": sum(r.test for r in rows),
        "label_counts": {f: int(y[:, i].sum()) for i, f in enumerate(labels.FINDINGS)},
        "no_finding": int((y.sum(axis=1) == 0).sum()),
        "bboxes": n_boxes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if messy:
        summary["defects"] = defects
    return summary
