"""8-bit grayscale PNGs (NIH's kind) checked and decoded about twice as fast as the fastest library decoder.

Why: raw mode and `cxr prepare` spend most of their CPU decoding 1024² PNGs. An NIH PNG is ~175 KB of zlib
data that inflates to 1024 filtered rows (a filter-type byte, then 1024 bytes). Inflating is most of a full
decoder's time, and libdeflate (the `deflate` package) is the fastest inflater measured, so it inflates, and
a numba kernel undoes the row filters; both release the GIL, so reading threads decode on every core. The
figures are in docs/benchmarks.md.

The filters. NIH's encoder alternates Up rows (each byte adds the byte above: vectorised) and Paeth rows.
With one byte per pixel, Paeth is a serial chain along the row: each byte needs its left neighbour after a
~8-cycle predictor. So where a Paeth row, an Up row and a Paeth row follow each other the kernel walks the
three side by side, two independent chains in flight; other sequences go row by row.

Checks: every chunk's CRC (Wuffs ignores them); IHDR first, once, with valid fields (compression and filter
method 0, a bit depth its colour type allows); IDAT chunks consecutive; IEND reached; the dimensions within
`ImageLimits`, checked at IHDR, before anything is inflated or allocated. For 8-bit grayscale: the zlib
stream's Adler-32, an inflated size of exactly height × (width + 1), filter types 0-4. A damaged file is a
ValueError saying what is wrong, never quietly wrong pixels. Other PNGs (16-bit, colour, palette,
interlaced) are left to Pillow, after `Png.check_size` has inflated their stream once, in bounded memory, to
the exact size their IHDR implies: Pillow zero-fills missing rows silently.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import deflate
import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type → bit depths
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's seven passes: first column and row, column and row steps
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
INFLATE_PIECE = 1 << 20  # bytes inflated at a time by `Png.check_size`, then dropped


class ImageRejected(ValueError):
    """An image whose header is valid but whose dimensions exceed `ImageLimits`: refused before decoding."""


@dataclass(frozen=True)
class ImageLimits:
    """What an image's header may claim before any pixel is decoded; beyond it an image is `ImageRejected`.

    The defaults admit every chest radiograph with wide margin (NIH's are 1024²; the largest detectors give
    ~4300 per side; chest films are 0.8-1.25 wide for their height, stitched spine/leg films up to ~3) while a
    64 Mpixel image stays 64 MB at 8 bits (256 MB as Pillow's RGBA) however few bytes its file has.
    """

    max_side: int = 8192
    max_pixels: int = 1 << 26  # 8192², below Pillow's own bomb warning (89 M) and error (179 M)
    max_aspect: float = 4.0  # long side / short side

    def __post_init__(self) -> None:
        if self.max_side < 1 or self.max_pixels < 1 or self.max_aspect < 1:
            raise ValueError(f"ImageLimits need max_side, max_pixels ≥ 1 and max_aspect ≥ 1, got {self}")

    def check(self, width: int, height: int) -> None:
        """ImageRejected naming every limit a width × height image exceeds (ValueError if it has no pixels)."""
        if width < 1 or height < 1:
            raise ValueError(f"image of {width} × {height} pixels: no pixels")
        over = []
        if max(width, height) > self.max_side:
            over.append(f"side {max(width, height)} > max_side {self.max_side}")
        if width * height > self.max_pixels:
            over.append(f"{width * height:,} pixels > max_pixels {self.max_pixels:,}")
        if max(width, height) > self.max_aspect * min(width, height):
            over.append(f"aspect ratio {max(width, height)}:{min(width, height)} > max_aspect {self.max_aspect:g}:1")
        if over:
            raise ImageRejected(f"image of {width} × {height} pixels exceeds the image limits: {'; '.join(over)}")


LIMITS = ImageLimits()


def first_bytes(data: bytes, n: int = 8) -> str:
    """The first bytes in hex, for messages about content that is not what it should be."""
    return " ".join(f"{b:02x}" for b in data[:n]) + (" …" if len(data) > n else "")


@dataclass(frozen=True)
class Png:
    """A PNG's header fields and its zlib stream (the IDAT chunks joined), as `parse` found them."""

    width: int
    height: int
    depth: int
    colour: int  # PNG colour type: 0 grayscale, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA
    interlace: int
    idat: bytes

    @property
    def gray8(self) -> bool:
        """8-bit grayscale, not interlaced: what `pixels` decodes."""
        return self.depth == 8 and self.colour == 0 and self.interlace == 0

    def filtered(self) -> np.ndarray:
        """uint8 [height, width + 1]: the inflated rows, each filter-type byte first and checked (0-4).

        ValueError if the data is damaged or not an 8-bit grayscale, non-interlaced image.
        """
        if not self.gray8:
            raise ValueError(f"not an 8-bit grayscale, non-interlaced PNG (bit depth {self.depth}, colour type "
                             f"{self.colour}, interlace {self.interlace})")
        stride = self.width + 1
        try:
            raw = deflate.zlib_decompress(self.idat, self.height * stride)
        except deflate.DeflateError as exc:
            raise ValueError(f"undecodable PNG: the image data does not inflate to {self.height} rows of "
                             f"{stride} bytes ({exc})") from None
        if len(raw) != self.height * stride:
            raise ValueError(f"undecodable PNG: the image data inflates to {len(raw)} bytes, not {self.height} "
                             f"rows of {stride}")
        rows = np.frombuffer(raw, np.uint8).reshape(self.height, stride)
        bad = np.flatnonzero(rows[:, 0] > 4)
        if len(bad):
            raise ValueError(f"undecodable PNG: row {bad[0]} has filter type {rows[bad[0], 0]} (0-4 exist)")
        return rows

    def pixels(self) -> np.ndarray:
        """uint8 [height, width]: the image's pixels (exactly libpng's). ValueError as `filtered`."""
        from cxr.data import kernels  # numba: imported only where PNGs are decoded

        out = np.empty((self.height, self.width), np.uint8)
        kernels.unfilter(self.filtered(), out)
        return out

    @property
    def inflated_size(self) -> int:
        """Bytes the zlib stream must inflate to: the filtered rows (a type byte each) of every Adam7 pass."""
        bits = self.depth * CHANNELS[self.colour]
        passes = ADAM7 if self.interlace else ((0, 0, 1, 1),)
        total = 0
        for x0, y0, dx, dy in passes:
            w, h = max(0, -(-(self.width - x0) // dx)), max(0, -(-(self.height - y0) // dy))
            if w and h:  # an empty pass has no rows, not even type bytes
                total += h * (1 + (w * bits + 7) // 8)
        return total

    def check_size(self) -> None:
        """ValueError unless the zlib stream is whole and inflates to exactly `inflated_size` bytes.

        For the PNGs left to Pillow, which fills missing rows with zeros silently. Inflates INFLATE_PIECE
        bytes at a time and keeps none: bounded memory whatever the image, and it stops past the size.
        """
        want, got, tail = self.inflated_size, 0, self.idat
        stream = zlib.decompressobj()
        try:
            while not stream.eof and got <= want:
                piece = stream.decompress(tail, INFLATE_PIECE)
                got, tail = got + len(piece), stream.unconsumed_tail
                if not piece and not tail:
                    break
        except zlib.error as exc:
            raise ValueError(f"undecodable PNG: the image data does not inflate ({exc})") from None
        what = (f"{self.width} × {self.height} at bit depth {self.depth}, colour type {self.colour}"
                f"{', Adam7-interlaced' if self.interlace else ''}")
        if got > want:
            raise ValueError(f"undecodable PNG: the image data inflates to more than the {want} bytes {what} needs")
        if not stream.eof:
            raise ValueError(f"undecodable PNG: the image data's zlib stream ends early ({got} of {want} bytes)")
        if got < want:
            raise ValueError(f"undecodable PNG: the image data inflates to {got} bytes, not the {want} {what} "
                             "needs (rows missing)")


def _header(data: bytes, off: int, length: int, limits: ImageLimits) -> tuple[int, ...]:
    """IHDR's fields, checked: ValueError for values the PNG specification does not define, ImageRejected beyond
    `limits`."""
    if length != 13:
        raise ValueError(f"IHDR chunk of {length} bytes, 13 expected")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, off + 8)
    if width == 0 or height == 0:
        raise ValueError(f"IHDR says {width} × {height} pixels: no pixels")
    if colour not in DEPTHS:
        raise ValueError(f"IHDR colour type {colour} (0, 2, 3, 4 and 6 exist)")
    if depth not in DEPTHS[colour]:
        raise ValueError(f"IHDR bit depth {depth} with colour type {colour} (allowed: {DEPTHS[colour]})")
    if compression != 0:
        raise ValueError(f"IHDR compression method {compression} (only 0, deflate, exists)")
    if filtering != 0:
        raise ValueError(f"IHDR filter method {filtering} (only 0, adaptive filtering, exists)")
    if interlace not in (0, 1):
        raise ValueError(f"IHDR interlace method {interlace} (0 none and 1 Adam7 exist)")
    limits.check(width, height)
    return width, height, depth, colour, interlace


def parse(data: bytes, limits: ImageLimits = LIMITS) -> Png:
    """Walk the chunks, checking every CRC and the chunk order; ValueError naming the chunk and its byte offset
    if one is wrong. The header is checked against `limits` first, so a bomb is refused before any allocation."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    if not data.startswith(SIGNATURE):
        raise ValueError(f"not a PNG file (first bytes {first_bytes(data)})")
    header, idat, off, view = None, [], len(SIGNATURE), memoryview(data)
    after_idat = None  # the first chunk after the IDATs: no IDAT may follow it
    while off + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, off)
        name = kind.decode("latin-1")
        end = off + 8 + length
        if end + 4 > len(data):
            break
        if deflate.crc32(view[off + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            raise ValueError(f"CRC mismatch in {name} chunk at byte {off}")
        if header is None and kind != b"IHDR":
            raise ValueError(f"PNG without IHDR as its first chunk ({name} chunk at byte {off} comes first)")
        if kind == b"IHDR":
            if header is not None:
                raise ValueError(f"a second IHDR chunk at byte {off}")
            header = _header(data, off, length, limits)
        elif kind == b"IDAT":
            if after_idat is not None:
                raise ValueError(f"IDAT chunk at byte {off} after {after_idat}: IDAT chunks must be consecutive")
            idat.append(view[off + 8:end])
        elif kind == b"IEND":
            if not idat:
                raise ValueError("PNG without image data (no IDAT chunk)")
            return Png(*header, b"".join(idat))
        elif idat and after_idat is None:
            after_idat = f"a {name} chunk at byte {off}"
        off = end + 4
    raise ValueError("truncated PNG (no IEND chunk)")


def warm_up() -> None:
    """Compile the decoder's kernels (or load them from numba's disk cache) now, before threads need them."""
    import zlib

    Png(width=1, height=3, depth=8, colour=0, interlace=0, idat=zlib.compress(bytes(6))).pixels()
