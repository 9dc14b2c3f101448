"""One image-preprocessing path, used by `cxr prepare`, raw mode and `cxr predict`: bytes → gray8 → size².

Decoding: every header is checked against `png.ImageLimits` before any pixel is decoded (dimensions, pixel
count, aspect ratio), so a few hundred bytes cannot claim gigabytes; beyond them it is `ImageRejected`.
8-bit grayscale PNGs (NIH's) go to `cxr.data.png`; DICOM to `cxr.data.dicom`; any other image to Pillow.
16-bit images are rescaled linearly from their bit depth (the smallest power of two above the maximum value)
to 8 bits; RGB(A), LA and palette images become 8-bit luma (alpha dropped: NIH's RGBA images are opaque),
a strip of rows at a time so that no full-size temporary is made. Every failure is a ValueError saying why,
in words that do not vary from run to run (quarantine reasons are compared across resumed runs).

Resizing (`fit`): the long side becomes `size`, aspect kept, and a non-square image is padded, centred, with
black (the radiograph background): anatomy is never stretched or cropped. The image is first averaged over
f×f blocks, f = ⌊long side / size⌋ (exact integer sums, a float32 mean rounded half to even: alias-free and
cheap, in a GIL-free numba kernel), then, where the blocks do not land on the target exactly, resized
bilinearly (half-pixel centres). For NIH's 1024² and 256 or 128 that is an exact 4×4 or 8×8 box filter.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr.data import png
from cxr.data.png import LIMITS, ImageLimits, ImageRejected

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel: rescaled, not converted
STRIP_PIXELS = 1 << 18  # to_gray8 converts this many pixels at a time: its temporaries stay ~1-2 MB


def decode(data: bytes, limits: ImageLimits = LIMITS, name: str = "image") -> np.ndarray:
    """Image file bytes (PNG, JPEG, DICOM, any format Pillow reads) → uint8 [h, w]; ValueError saying why not."""
    if data.startswith(png.SIGNATURE):
        return decode_png(png.parse(data, limits), data)
    from cxr.data import dicom

    if dicom.is_dicom(data):
        gray = dicom.dicom_to_gray8(data, name, max_side=limits.max_side)
        limits.check(gray.shape[1], gray.shape[0])
        return gray
    return _pillow(data, limits)


def decode_png(image: png.Png, data: bytes) -> np.ndarray:
    """A parsed PNG's pixels as 8-bit grayscale; for Pillow's kinds the image data's size is checked first."""
    if image.gray8:
        return image.pixels()
    image.check_size()
    return _pillow(data, None)  # `png.parse` checked the header against the caller's limits


def preprocess(data: bytes, size: int, limits: ImageLimits = LIMITS, name: str = "image") -> np.ndarray:
    """Image file bytes → uint8 [size, size]: what prepare stores and what raw mode and predict feed the model."""
    return fit(decode(data, limits, name), size)


def _pillow(data: bytes, limits: ImageLimits | None) -> np.ndarray:
    """Pillow's decode of any format it knows, the header checked against `limits` (None: already checked)
    and Pillow's own bomb guard applied; every failure a ValueError."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    kind = "image"
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: only the header is read here
            kind = f"{im.format} image"
            if limits is not None:
                limits.check(*im.size)
            im.load()
            return to_gray8(im)
    except (ImageRejected, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"{kind} refused by Pillow's decompression-bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ValueError(f"not an image: unrecognised format (first bytes {png.first_bytes(data)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types; all mean an undecodable file
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))  # no object addresses: reasons must not vary by run
        raise ValueError(f"undecodable {kind}: {type(exc).__name__}: {detail}") from exc


def content_mismatch(name: str, data: bytes) -> str | None:
    """A note when a decodable file's content is another format than its name's extension says, else None."""
    ext = os.path.splitext(name)[1].lower()
    if data.startswith(png.SIGNATURE):
        if ext == ".png":  # NIH's case, without asking Pillow
            return None
        found = "PNG"
    else:
        from cxr.data import dicom

        if dicom.is_dicom(data):
            if ext in ("", ".dcm", ".dicom"):
                return None
            found = "DICOM"
        else:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    found = im.format
            except Exception:  # noqa: BLE001 - not an image at all: decoding reports that, not this
                return None
    said = Image.registered_extensions().get(ext) or ("DICOM" if ext in (".dcm", ".dicom") else None)
    if found == said:
        return None
    return (f"content is {found} (first bytes {png.first_bytes(data, 4)}), but the extension {ext or '(none)'} says "
            f"{said or 'no image format'}; converted all the same")


# ------------------------------------------------------------------------------------------ to 8-bit gray


def _strips(im: Image.Image) -> Iterator[tuple[int, int, Image.Image]]:
    """(first row, end row, that strip of `im`) covering the image, STRIP_PIXELS at a time."""
    width, height = im.size
    step = max(1, STRIP_PIXELS // width)
    if step >= height:
        yield 0, height, im
        return
    for top in range(0, height, step):
        yield top, min(top + step, height), im.crop((0, top, width, min(top + step, height)))


def rescale_table(full: float) -> np.ndarray:
    """uint8 [65536]: `rescale` of every 16-bit value, so a 16-bit image costs one lookup per pixel."""
    return rescale(np.arange(1 << 16, dtype=np.float64), full)


def rescale(values: np.ndarray, full: float) -> np.ndarray:
    """0..full → 0..255, rounded half to even: how every wide image (16-bit PNG, DICOM) becomes 8-bit."""
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)


def _luma(strip: Image.Image) -> np.ndarray:
    """One strip of an 8-bit-per-channel image → uint8 luma (per-pixel conversions: strips give the whole's)."""
    if strip.mode == "PA":
        strip = strip.convert("RGBA")  # then RGBA → L, which is RGB → L: Pillow's luma ignores alpha
    elif strip.mode == "LA":
        strip = strip.getchannel("L")
    return np.asarray(strip if strip.mode == "L" else strip.convert("L"), dtype=np.uint8)


def to_gray8(im: Image.Image) -> np.ndarray:
    """Any PIL image → 8-bit grayscale array, converting modes explicitly (see the module docstring).

    A strip at a time: besides Pillow's decoded image and the result, memory stays at a few strips.
    """
    if im.mode == "L":
        return np.asarray(im, dtype=np.uint8)
    out = np.empty((im.size[1], im.size[0]), np.uint8)
    if im.mode not in WIDE_MODES:
        for top, end, strip in _strips(im):
            out[top:end] = _luma(strip)
        return out
    lo, hi = np.inf, -np.inf
    for _, _, strip in _strips(im):
        values = np.asarray(strip)
        lo, hi = min(lo, values.min()), max(hi, values.max())
    full = 2.0 ** np.ceil(np.log2(max(float(hi), 1.0) + 1.0)) - 1.0
    table = rescale_table(full) if im.mode != "F" and 0 <= lo and hi < 1 << 16 else None
    for top, end, strip in _strips(im):
        values = np.asarray(strip)
        out[top:end] = table[values] if table is not None else rescale(values, full)
    return out


# ------------------------------------------------------------------------------------------------- resize


@functools.cache
def _rounded_means(f: int) -> np.ndarray:
    """uint8 of every possible f×f block sum's float32 mean, rounded half to even (TF's and numpy's rint)."""
    return np.rint(np.arange(255 * f * f + 1, dtype=np.float32) / np.float32(f * f)).astype(np.uint8)


def target_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(rows, cols) of an h × w image with its long side at `size`, aspect kept, the short side ≥ 1."""
    long = max(h, w)
    return tuple(max(1, (side * size + long // 2) // long) for side in (h, w))  # type: ignore[return-value]


def fit(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w] → uint8 [size, size]: box average, bilinear where needed, padding (the module docstring)."""
    from cxr.data import kernels  # numba: imported only where images are preprocessed

    h, w = gray.shape
    th, tw = target_shape(h, w, size)
    f = max(max(h, w) // size, 1)
    mh, mw = max(h // f, 1), max(w // f, 1)
    gray = np.ascontiguousarray(gray)
    if (mh, mw) == (th, tw):
        small = gray if f == 1 else kernels.box_means(gray, f, _rounded_means(f), np.empty((mh, mw), np.uint8))
    else:
        import tensorflow as tf  # the bilinear step matches TF's resize, as the training pipeline's does

        wide = np.uint16 if f <= 16 else np.uint32  # f² · 255 fits
        sums = kernels.box_sums(gray, f, np.empty((mh, mw), wide)) if f > 1 else gray
        mean = sums.astype(np.float32) / np.float32(f * f)
        mean = tf.image.resize(mean[..., None], [th, tw], method="bilinear").numpy()[..., 0]
        small = np.rint(mean).astype(np.uint8)
    if (th, tw) == (size, size):
        return small
    out = np.zeros((size, size), np.uint8)
    top, left = (size - th) // 2, (size - tw) // 2
    out[top:top + th, left:left + tw] = small
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the decoding and resizing kernels now, not in reading threads."""
    png.warm_up()
    fit(np.zeros((2, 2), np.uint8), 1)
