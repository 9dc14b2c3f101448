"""cxr.png against PNGs built here row by row (every filter type, NIH's Up/Paeth rhythm) and against Pillow."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr import png, shards

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "samples", "nih-png")


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The predictor as the PNG specification writes it (with branches), elementwise."""
    a, b, c = (v.astype(np.int32) for v in (a, b, c))
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_rows(pixels: np.ndarray, kinds: list[int]) -> bytes:
    """An encoder's side: each row filtered with its type, type byte first."""
    h, w = pixels.shape
    out = []
    for r in range(h):
        x = pixels[r].astype(np.int32)
        b = pixels[r - 1].astype(np.int32) if r else np.zeros(w, np.int32)
        a = np.concatenate([[0], x[:-1]])
        c = np.concatenate([[0], b[:-1]])
        pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2, 4: _paeth(a, b, c)}[kinds[r]]
        out.append(bytes([kinds[r]]) + ((x - pred) & 255).astype(np.uint8).tobytes())
    return b"".join(out)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def build(width: int, height: int, stream: bytes, depth: int = 8, colour: int = 0, interlace: int = 0,
          idat_chunks: int = 3) -> bytes:
    """A PNG file around a zlib stream, the stream cut across several IDAT chunks as encoders do."""
    cut = np.linspace(0, len(stream), idat_chunks + 1).astype(int)
    idats = b"".join(chunk(b"IDAT", stream[cut[i]:cut[i + 1]]) for i in range(idat_chunks))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
    return png.SIGNATURE + ihdr + chunk(b"tEXt", b"Comment\0built by a test") + idats + chunk(b"IEND", b"")


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


NIH_RHYTHM = [1] + [2, 4] * 40  # NIH's encoder: Sub, then Up and Paeth alternating


@pytest.mark.parametrize("width,height,kinds,levels", [
    (37, 23, "random", 256),  # every type, in any order
    (64, 81, NIH_RHYTHM[:81], 256),  # the Paeth-Up-Paeth path
    (64, 81, NIH_RHYTHM[:81], 3),  # few grey levels: Paeth's ties, where its rules are easiest to get wrong
    (40, 40, "random", 2),
    (64, 6, [4, 2, 4, 4, 2, 4], 256),  # that path from the first row, twice in a row
    (5, 4, [4, 2, 4, 3], 256),
    (1, 7, "random", 256),
    (9, 1, [4], 256),
    (9, 2, [4, 2], 256),
    (9, 3, [3, 1, 0], 256),
])
def test_decodes_every_filter_type_to_the_encoded_pixels(width, height, kinds, levels):
    rng = np.random.default_rng(width * 1000 + height + levels)
    pixels = rng.integers(0, levels, (height, width), dtype=np.uint8) * (255 // max(levels - 1, 1))
    pixels[0, ::3] = 255  # wrap-around on both sides of every predictor
    pixels[-1, ::2] = 0
    kinds = rng.integers(0, 5, height).tolist() if kinds == "random" else kinds
    data = build(width, height, zlib.compress(filter_rows(pixels, kinds), 6))
    image = png.parse(data)
    assert (image.width, image.height, image.gray8) == (width, height, True)
    decoded = image.pixels()
    assert decoded.dtype == np.uint8 and decoded.shape == (height, width)
    np.testing.assert_array_equal(decoded, pixels)
    np.testing.assert_array_equal(pillow(data), pixels)  # the test's encoder writes real PNGs


def test_real_nih_pngs_decode_to_pillows_pixels():
    for name in sorted(n for n in os.listdir(SAMPLES) if n.endswith(".png")):
        data = open(os.path.join(SAMPLES, name), "rb").read()
        image = png.parse(data)
        assert (image.width, image.height, image.gray8) == (1024, 1024, True)
        np.testing.assert_array_equal(image.pixels(), pillow(data))


def _valid(kinds: list[int] | None = None) -> tuple[np.ndarray, bytes]:
    pixels = np.random.default_rng(1).integers(0, 256, (12, 10), dtype=np.uint8)
    return pixels, filter_rows(pixels, kinds or NIH_RHYTHM[:12])


def test_a_bad_filter_type_names_the_row():
    _, rows = _valid()
    rows = bytearray(rows)
    rows[7 * 11] = 5
    with pytest.raises(ValueError, match="row 7 has filter type 5"):
        png.parse(build(10, 12, zlib.compress(bytes(rows)))).pixels()


@pytest.mark.parametrize("height", [11, 13])
def test_image_data_of_the_wrong_size_is_an_error(height):
    """The zlib stream holds 12 rows: an IHDR claiming 11 or 13 does not decode to shifted pixels."""
    _, rows = _valid()
    with pytest.raises(ValueError, match=f"undecodable PNG: the image data .*inflate.* {height} rows of 11"):
        png.parse(build(10, height, zlib.compress(rows))).pixels()


def test_damaged_image_data_behind_valid_crcs_is_an_error():
    """The chunk CRCs are recomputed over the damage, so only the zlib stream's own checks can catch it."""
    _, rows = _valid()
    stream = bytearray(zlib.compress(rows))
    stream[-1] ^= 1  # the Adler-32
    with pytest.raises(ValueError, match="does not inflate"):
        png.parse(build(10, 12, bytes(stream))).pixels()
    with pytest.raises(ValueError, match="does not inflate"):
        png.parse(build(10, 12, zlib.compress(rows)[:-9])).pixels()  # truncated stream


def test_structure_errors_say_what_is_wrong():
    pixels, rows = _valid()
    data = build(10, 12, zlib.compress(rows))
    np.testing.assert_array_equal(png.parse(data).pixels(), pixels)
    with pytest.raises(ValueError, match="not a PNG file"):
        png.parse(b"GIF89a" + data[6:])
    with pytest.raises(ValueError, match="truncated PNG"):
        png.parse(data[:-12])  # no IEND
    flipped = bytearray(data)
    idat = data.index(b"IDAT")
    flipped[idat + 6] ^= 0x40
    with pytest.raises(ValueError, match=f"CRC mismatch in IDAT chunk at byte {idat - 4}"):
        png.parse(bytes(flipped))
    with pytest.raises(ValueError, match="PNG without IHDR"):
        png.parse(png.SIGNATURE + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="IHDR chunk of 12 bytes"):
        png.parse(png.SIGNATURE + chunk(b"IHDR", bytes(12)) + chunk(b"IEND", b""))


def test_other_pngs_are_left_to_pillow():
    """16-bit, colour and interlaced PNGs are recognised as such and decoded by Pillow (`shards.decode`)."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    image = png.parse(buf.getvalue())
    assert (image.colour, image.gray8) == (2, False)
    with pytest.raises(ValueError, match="colour type 2"):
        image.pixels()
    np.testing.assert_array_equal(shards.decode(buf.getvalue()), pillow(buf.getvalue()))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(buf, format="PNG")
    assert (png.parse(buf.getvalue()).depth, png.parse(buf.getvalue()).gray8) == (16, False)
    _, rows = _valid()
    assert not png.parse(build(10, 12, zlib.compress(rows), interlace=1)).gray8


@pytest.mark.parametrize("width,height,message", [(0, 12, "0 × 12 pixels"), (70000, 70000, "70000 × 70000 pixels")])
def test_empty_or_bomb_dimensions_are_refused_before_inflating(width, height, message):
    """An IHDR of zero pixels, or of more than MAX_PIXELS (a decompression bomb), is an error, not an allocation."""
    _, rows = _valid()
    with pytest.raises(ValueError, match=message):
        png.parse(build(width, height, zlib.compress(rows)))
