"""cxr.png against PNGs built here row by row (every filter type, NIH's Up/Paeth rhythm) and against Pillow."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

from cxr.data import images, png


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
          idat_chunks: int = 3, compression: int = 0, filtering: int = 0) -> bytes:
    """A PNG file around a zlib stream, the stream cut across several IDAT chunks as encoders do."""
    cut = np.linspace(0, len(stream), idat_chunks + 1).astype(int)
    idats = b"".join(chunk(b"IDAT", stream[cut[i]:cut[i + 1]]) for i in range(idat_chunks))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, compression, filtering, interlace))
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
    image = png.parse(data, png.ImageLimits(max_aspect=100))  # 1 × 7 … 64 × 6: shapes no radiograph has
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
    """16-bit, colour and interlaced PNGs are recognised as such and decoded by Pillow (`images.decode`)."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    image = png.parse(buf.getvalue())
    assert (image.colour, image.gray8) == (2, False)
    with pytest.raises(ValueError, match="colour type 2"):
        image.pixels()
    np.testing.assert_array_equal(images.decode(buf.getvalue()), pillow(buf.getvalue()))
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


def _reordered(data: bytes, order: list[int]) -> bytes:
    """The PNG with its chunks (0: IHDR, …, last: IEND) in another order; every CRC stays valid."""
    parts, off = [], len(png.SIGNATURE)
    while off < len(data):
        length = struct.unpack_from(">I", data, off)[0]
        parts.append(data[off:off + 12 + length])
        off += 12 + length
    return png.SIGNATURE + b"".join(parts[i] for i in order)


def _spec_invalid() -> dict[str, tuple[bytes, str]]:
    _, rows = _valid()
    stream = zlib.compress(rows)
    good = build(10, 12, stream)  # IHDR, tEXt, IDAT × 3, IEND
    return {
        "compression method 1": (build(10, 12, stream, compression=1), "IHDR compression method 1 "),
        "filter method 1": (build(10, 12, stream, filtering=1), "IHDR filter method 1 "),
        "IDAT before IHDR": (_reordered(good, [2, 0, 1, 3, 4, 5]), r"without IHDR as its first chunk \(IDAT chunk"),
        "IDATs split by tEXt": (_reordered(good, [0, 2, 1, 3, 4, 5]), "IDAT chunks must be consecutive"),
        "second IHDR": (_reordered(good, [0, 0, 1, 2, 3, 4, 5]), "a second IHDR chunk at byte 33"),
        "no IDAT": (_reordered(good, [0, 1, 5]), r"no IDAT chunk"),
        "bit depth 3": (build(10, 12, stream, depth=3), r"IHDR bit depth 3 with colour type 0"),
        "colour type 5": (build(10, 12, stream, colour=5), r"IHDR colour type 5 "),
        "interlace method 2": (build(10, 12, stream, interlace=2), r"IHDR interlace method 2 "),
    }


@pytest.mark.parametrize("case", sorted(_spec_invalid()))
def test_spec_invalid_headers_and_chunk_orders_are_refused_naming_the_problem(case):
    """Files libpng refuses; cxr.png used to decode most of them (IDATs in any order, any header method)."""
    data, message = _spec_invalid()[case]
    with pytest.raises(ValueError, match=message):
        png.parse(data)
    with pytest.raises(ValueError, match=message):
        images.decode(data)


@pytest.mark.parametrize("width,height,message", [
    (16384, 16384, "16384 × 16384 pixels exceeds the image limits: side 16384 > max_side 8192; 268,435,456 pixels "
                   "> max_pixels 67,108,864$"),  # Pillow refuses it as a decompression bomb
    (8193, 2100, "8193 × 2100 pixels exceeds the image limits: side 8193 > max_side 8192$"),
    (8192, 8193, "side 8193 > max_side 8192; 67,117,056 pixels > max_pixels 67,108,864$"),
    (3, 60000, "3 × 60000 pixels exceeds the image limits: side 60000 > max_side 8192; aspect ratio 60000:3 > "
               "max_aspect 4:1$"),
    (100000, 1, "aspect ratio 100000:1 > max_aspect 4:1$"),
    (4001, 1000, "4001 × 1000 pixels exceeds the image limits: aspect ratio 4001:1000 > max_aspect 4:1$"),
])
def test_dimensions_beyond_the_limits_are_rejected_from_the_header(width, height, message):
    """The IDAT stream is not even valid: nothing past IHDR is looked at, let alone inflated."""
    data = build(width, height, b"not a zlib stream")
    with pytest.raises(ValueError, match=message) as err:
        png.parse(data)
    assert type(err.value).__name__ == "ImageRejected" and isinstance(err.value, png.ImageRejected)
    assert png.parse(build(8192, 8192, b"")).width == 8192  # at the limits exactly: admitted
    assert png.parse(build(4000, 1000, b"")).width == 4000
    small = png.ImageLimits(max_side=100, max_pixels=5000, max_aspect=2)  # configurable
    assert png.parse(build(100, 50, b""), small).height == 50
    with pytest.raises(png.ImageRejected, match="101 × 50 pixels exceeds the image limits: side 101 > max_side "
                                                "100; 5,050 pixels > max_pixels 5,000; aspect ratio 101:50 > "
                                                "max_aspect 2:1$"):
        png.parse(build(101, 50, b""), small)


def test_empty_and_foreign_files_say_what_they_are():
    with pytest.raises(ValueError, match=r"^empty file \(0 bytes\)$"):
        images.decode(b"")
    with pytest.raises(ValueError, match=r"^not an image: unrecognised format \(first bytes 00 01 02 03 04 05 06 07 …"):
        images.decode(bytes(range(40)))
    with pytest.raises(ValueError, match=r"^not a PNG file \(first bytes 47 49 46 38\)$"):
        png.parse(b"GIF8")


def test_the_callers_limits_hold_on_every_decoding_path():
    """cxr.png's path, Pillow's PNG path (16-bit) and Pillow's other formats all check the limits they are given."""
    for im, fmt in ((Image.new("L", (100, 1)), "PNG"), (Image.new("I;16", (100, 1)), "PNG"),
                    (Image.new("RGB", (100, 1)), "PNG"), (Image.new("L", (100, 1)), "BMP")):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        with pytest.raises(ValueError, match="100 × 1 pixels exceeds the image limits: side 100 > max_side 99$"):
            images.decode(buf.getvalue(), png.ImageLimits(max_side=99, max_aspect=1000))
        assert images.decode(buf.getvalue(), png.ImageLimits(max_aspect=100)).shape == (1, 100)
