"""Drawing primitives of the phantoms: anatomical coordinates on a pixel grid, soft shapes, smooth noise.

Shapes are soft-edged (never sharper than about a pixel) so the phantoms look alike at 64 and 1024 px.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

F32 = np.float32


@dataclass(frozen=True)
class Canvas:
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

    def window(self, x0: float, y0: float, x1: float, y1: float) -> Canvas:
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
        out = np.zeros((self.size, self.size), dtype=F32)
        out[self.rows, self.cols] = part
        return out


def ramp(d: np.ndarray | float, soft: float) -> np.ndarray:
    """Soft step of a signed distance (positive inside): 0 outside, 1 inside, linear over `soft`."""
    return np.clip(np.asarray(d, dtype=F32) * F32(1 / soft) + F32(0.5), F32(0), F32(1))


def disk(c: Canvas, cx: float, cy: float, rx: float, ry: float, soft: float,
          tilt: float = 0.0) -> np.ndarray:
    """Soft-edged ellipse mask, its x axis turned by `tilt` radians (clockwise on the image)."""
    dx, dy = c.x - F32(cx), c.y - F32(cy)
    if tilt:
        cos, sin = F32(math.cos(tilt)), F32(math.sin(tilt))
        dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
    r = np.sqrt((dx * F32(1 / rx)) ** 2 + (dy * F32(1 / ry)) ** 2)
    return ramp((1 - r) * F32(min(rx, ry)), c.soft(soft))


def gauss(c: Canvas, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((c.x - F32(cx)) * F32(1 / sx)) ** 2 + ((c.y - F32(cy)) * F32(1 / sy)) ** 2))


def noise(rng: np.random.Generator, c: Canvas, cells: int) -> np.ndarray:
    """Smooth unit-variance noise, `cells` features across the image at any pixel size, cropped to c."""
    low = rng.standard_normal((cells, cells)).astype(F32)
    rows, cols = c.rows.indices(c.size), c.cols.indices(c.size)
    k = cells / c.size  # resample only this canvas's window of the full-image noise
    box = (cols[0] * k, rows[0] * k, cols[1] * k, rows[1] * k)
    out = (cols[1] - cols[0], rows[1] - rows[0])
    if min(out) <= 0:
        return np.zeros((max(out[1], 0), max(out[0], 0)), dtype=F32)
    up = Image.fromarray(low).resize(out, Image.Resampling.BICUBIC, box=box)
    return np.asarray(up, dtype=F32) * F32(1.25)  # bicubic upsampling leaves ~0.8 of the unit std


def ridges(n: np.ndarray, width: float) -> np.ndarray:
    """Thin lines along the zero crossings of smooth noise: a closed net of curves."""
    return np.clip(1 - np.abs(n) * F32(1 / width), 0, 1)


def _periodic_interp(theta: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Linear interpolation of knots spread evenly over [-pi, pi), wrapping (np.interp is slow here)."""
    k = knots.size
    pos = (theta + F32(np.pi)) * F32(k / (2 * np.pi))
    i0 = np.floor(pos)
    frac = pos - i0
    i0 = i0.astype(np.int32) % k
    ext = np.append(knots, knots[0]).astype(F32)
    return np.take(ext, i0) * (1 - frac) + np.take(ext, i0 + 1) * frac


def radial_lines(c: Canvas, rng: np.random.Generator, centre: tuple[float, float], counts: Iterable[int],
                  widths: Iterable[float], warp: np.ndarray | None = None, taper: float = 0.0) -> np.ndarray:
    """Lines radiating from `centre` with constant physical width: vessels or bronchi fanning from a hilum.

    One set of lines per (count, width), the finer sets fainter. `warp` (smooth noise) bends the angle
    with position so the lines meander instead of forming spokes; past `taper` (anatomical units)
    from the centre the lines are a third as wide, as vessels thin towards the periphery.
    """
    dx, dy = c.x - F32(centre[0]), c.y - F32(centre[1])
    r = np.sqrt(dx * dx + dy * dy) + F32(1e-4)
    theta = np.arctan2(dy, dx)
    if warp is not None:
        theta = theta + warp * np.clip(r * F32(1 / 0.08), 0, 1)
    out = np.zeros_like(r)
    dist = r * (1 + F32(2) * np.clip(r * F32(1 / taper), 0, 1)) if taper else r
    for i, (count, width) in enumerate(zip(counts, widths, strict=True)):
        n = _periodic_interp(theta, rng.standard_normal(count * 2))
        slope = count * 2 / (2 * np.pi) * 1.2  # typical |dn/dtheta|: angular distance → physical width
        out = np.maximum(out, F32(0.6**i) * np.clip(1 - np.abs(n) * dist * F32(1 / (slope * width)), 0, 1))
    return out


def support_box(delta: np.ndarray, rng: np.random.Generator, thr: float = 0.01) -> tuple[float, ...] | None:
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
