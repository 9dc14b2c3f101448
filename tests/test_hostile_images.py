"""Hostile images, built here: bombs refused from their header in bounded memory and time, truncated image data on
the Pillow path refused, files whose content is not their extension's converted but reported, deterministic reasons.

Sizes and costs of the issue's files (a 312-byte 3×60000 PNG, a 177-byte 100000×1 one, a 328 KB 16-bit 13000²
one) are measured in a child process, as peak RSS above a warmed-up baseline.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image
from test_png import chunk

from cxr.data import images, manifest, metadata, png, shards

NIH = sorted(p.name for p in SAMPLES.glob("*.png"))
HEADER = metadata.HEADER
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def zeros_stream(n: int, unit: int = 1 << 20) -> bytes:
    """A zlib stream of n zero bytes in a few ms: after a full flush every `unit` of zeros compresses to the same
    bytes, so one is repeated; the Adler-32 of n zeros is (n mod 65521) << 16 | 1."""
    if n < 2 * unit:
        return zlib.compress(bytes(n), 9)
    c = zlib.compressobj(9)
    head = c.compress(bytes(unit)) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(bytes(unit)) + c.flush(zlib.Z_FULL_FLUSH)
    k, rest = divmod(n, unit)
    body = head + piece * (k - 1) + c.compress(bytes(rest)) + c.flush()
    return body[:-4] + (((n % 65521) << 16) | 1).to_bytes(4, "big")


def png_file(width: int, height: int, stream: bytes, depth: int = 8, colour: int = 0, interlace: int = 0,
             before_idat: bytes = b"") -> bytes:
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
    return png.SIGNATURE + ihdr + before_idat + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def black_png(width: int, height: int, depth: int = 8) -> bytes:
    """A valid all-black grayscale PNG: every row filter type 0 and zeros."""
    return png_file(width, height, zeros_stream(height * (1 + width * depth // 8)), depth)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, off = [], 8
    while off < len(data):
        length, kind = struct.unpack_from(">I4s", data, off)
        out.append((kind, data[off + 8:off + 8 + length]))
        off += 12 + length
    return out


def restream(data: bytes, change) -> bytes:
    """The PNG with its image data inflated, changed by `change` (bytes → bytes) and deflated again, every CRC valid."""
    parts = chunks(data)
    first = next(i for i, (kind, _) in enumerate(parts) if kind == b"IDAT")
    raw = zlib.decompress(b"".join(body for kind, body in parts if kind == b"IDAT"))
    head = b"".join(chunk(kind, body) for kind, body in parts[:first])
    return png.SIGNATURE + head + chunk(b"IDAT", zlib.compress(change(raw))) + chunk(b"IEND", b"")


def split_idat() -> bytes:
    """A valid 10 × 10 image whose zlib stream is cut across two IDATs with a tEXt chunk between them."""
    stream = zlib.compress(bytes(10 * 11))
    whole = png_file(10, 10, stream)
    parts = chunk(b"IDAT", stream[:20]) + chunk(b"tEXt", b"a\0b") + chunk(b"IDAT", stream[20:])
    return whole[:33] + parts + whole[-12:]


def adam7(pixels: np.ndarray) -> bytes:
    """Adam7-interlaced rows (filter type 0) of uint8 [h, w, bytes per pixel]."""
    rows = []
    for x0, y0, dx, dy in ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.shape[0] and sub.shape[1]:
            rows.extend(b"\0" + row.tobytes() for row in sub)
    return b"".join(rows)


def pillow_png(im: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **options)
    return buf.getvalue()


def pillow_gray8(data: bytes) -> np.ndarray:
    """The reference: Pillow decodes the whole file, `to_gray8` converts it."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return images.to_gray8(im)


def pillow_path_pngs() -> dict[str, bytes]:
    """One complete PNG of each kind `cxr.png` leaves to Pillow, odd sizes, sub-byte depths, Adam7 included."""
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (37, 35), dtype=np.uint8)
    rgb = rng.integers(0, 256, (37, 35, 3), dtype=np.uint8)
    files = {
        "gray16": pillow_png(Image.fromarray(rng.integers(0, 4096, (37, 35), dtype=np.uint16))),
        "rgb8": pillow_png(Image.fromarray(rgb)),
        "rgba8": pillow_png(Image.fromarray(rng.integers(0, 256, (37, 35, 4), dtype=np.uint8))),
        "gray_alpha8": pillow_png(Image.fromarray(gray).convert("LA")),
        "palette8": pillow_png(Image.fromarray(rgb).quantize(200)),
        "palette4": pillow_png(Image.fromarray(rgb).quantize(16), bits=4),
        "palette2": pillow_png(Image.fromarray(rgb).quantize(4), bits=2),
        "bilevel": pillow_png(Image.fromarray(gray).convert("1")),
    }
    for h, w in ((1, 1), (2, 3), (7, 13), (17, 33)):
        files[f"adam7_gray8_{h}x{w}"] = png_file(w, h, zlib.compress(adam7(gray[:h, :w, None])), interlace=1)
        files[f"adam7_rgb8_{h}x{w}"] = png_file(w, h, zlib.compress(adam7(rgb[:h, :w])), colour=2, interlace=1)
    big_endian = rng.integers(0, 65536, (17, 33), dtype=np.uint16).astype(">u2").view(np.uint8).reshape(17, 33, 2)
    files["adam7_gray16_17x33"] = png_file(33, 17, zlib.compress(adam7(big_endian)), depth=16, interlace=1)
    return files


@pytest.mark.parametrize("kind", sorted(pillow_path_pngs()))
def test_pillow_path_pngs_with_missing_or_extra_rows_are_refused(kind):
    """Pillow zero-fills image data that ends early (its CRCs and Adler-32 all valid) without a word; the exact size
    of the inflated data, from the IHDR (bit depth, colour type, width, height, the seven Adam7 passes), catches it."""
    data = pillow_path_pngs()[kind]
    assert not png.parse(data).gray8
    np.testing.assert_array_equal(images.decode(data), pillow_gray8(data))  # a whole file passes the size check
    raw_size = len(zlib.decompress(b"".join(b for k, b in chunks(data) if k == b"IDAT")))
    short = restream(data, lambda raw: raw[:raw_size * 3 // 5])
    with pytest.raises(ValueError, match=r"inflates to \d+ bytes, not the \d+ .* needs \(rows missing\)"):
        images.decode(short)
    if raw_size > 1:
        with pytest.raises(ValueError, match="rows missing"):
            images.decode(restream(data, lambda raw: raw[:-1]))
    with pytest.raises(ValueError, match="inflates to more than the"):
        images.decode(restream(data, lambda raw: raw + bytes(7)))


def test_a_truncated_zlib_stream_on_the_pillow_path_is_refused():
    data = pillow_path_pngs()["gray16"]
    stream = b"".join(b for k, b in chunks(data) if k == b"IDAT")
    cut = png_file(35, 37, stream[:len(stream) // 2], depth=16)
    with pytest.raises(ValueError, match="zlib stream ends early"):
        images.decode(cut)


# ---------------------------------------------------------------------------------------------- cost


CHILD = textwrap.dedent("""
    import ctypes, gc, json, os, resource, sys, time
    from cxr.data import shards

    def status(key):
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith(key)).split()[1]) * 1024

    shards.convert(open(sys.argv[1], "rb").read(), 256, "jpeg")  # warm: numba kernels and Pillow plugins loaded,
    from cxr.data import images
    images.fit(__import__("numpy").zeros((300, 200), "uint8"), 256)  # and TF's resize
    room = status("VmSize") + (3 << 29)  # 1.5 GiB more address space: today's costs fail fast, not swap the host
    resource.setrlimit(resource.RLIMIT_AS, (room, room))
    out = {}
    for path in sys.argv[2:]:
        data = open(path, "rb").read()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: reusing it must show in RSS again
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # peak RSS := current RSS (Linux)
        base, t0 = status("VmHWM"), time.perf_counter()
        try:
            shards.convert(data, 256, "jpeg")
            outcome = ["converted", ""]
        except BaseException as exc:
            outcome = [type(exc).__name__, str(exc)]
        out[os.path.basename(path)] = [*outcome, time.perf_counter() - t0, status("VmHWM") - base]
    print(json.dumps(out))
""")


def _costs(tmp_path, files: dict[str, bytes]) -> dict[str, tuple[str, str, float, int]]:
    """{name: (outcome, message, seconds, peak RSS bytes above the baseline)} of shards.convert in a child process
    importing the same cxr as this one."""
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    tree = os.path.dirname(os.path.dirname(os.path.abspath(shards.__file__)))
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run([sys.executable, "-c", CHILD, os.path.join(SAMPLES, NIH[0]), *paths], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="JPEG")
    return buf.getvalue()


def test_bombs_are_refused_from_their_header_in_bounded_memory_and_time(tmp_path):
    bombs = {  # name: (file, the limit its message must name)
        "3x60000.png": (black_png(3, 60000), "max_side 8192; aspect ratio 60000:3 > max_aspect 4:1"),
        "100000x1.png": (black_png(100000, 1), "aspect ratio 100000:1 > max_aspect 4:1"),
        "13000x13000-16bit.png": (black_png(13000, 13000, 16), "169,000,000 pixels > max_pixels 67,108,864"),
        "16384x16384.png": (black_png(16384, 16384), "268,435,456 pixels > max_pixels 67,108,864"),
        "3x60000.jpg": (_jpeg(3, 60000), "side 60000 > max_side 8192"),
    }
    assert len(bombs["3x60000.png"][0]) < 400 and len(bombs["100000x1.png"][0]) < 250
    assert len(bombs["13000x13000-16bit.png"][0]) < 400_000
    costs = _costs(tmp_path, {name: data for name, (data, _) in bombs.items()})
    for name, (_, limit) in bombs.items():
        outcome, message, seconds, rss = costs[name]
        dims = name.split(".")[0].split("-")[0].replace("x", " × ")
        assert (outcome, name) == ("ImageRejected", name), message
        assert message.startswith(f"image of {dims} pixels exceeds the image limits: ") and limit in message
        assert seconds < 0.5 and rss < 32 << 20, (name, seconds, rss)


def test_admitted_images_cost_a_few_times_their_8bit_size(tmp_path):
    """Peak memory above the file's bytes: ~2× the 8-bit pixels for 8-bit gray, ~3× for 16-bit (Pillow's 16-bit
    image, then the result), ~5.5× for colour (Pillow stores RGB(A) in 4 bytes a pixel)."""
    yy, xx = np.mgrid[0:2048, 0:2048]
    sixteen = np.tile(((xx * 16 + yy) % 65536).astype(np.uint16), (2, 2))  # 4096², every value used
    rgba = np.stack([xx % 256, yy % 256, (xx + yy) % 256, np.full_like(xx, 255)], -1).astype(np.uint8)
    files = {"4096x4096-16bit.png": (pillow_png(Image.fromarray(sixteen)), 4.0),
             "2048x8000.png": (black_png(2048, 8000), 3.0),
             "2048x2048-rgba.png": (pillow_png(Image.fromarray(rgba)), 6.5)}
    costs = _costs(tmp_path, {name: data for name, (data, _) in files.items()})
    for name, (_, bound) in files.items():
        outcome, message, seconds, rss = costs[name]
        w, h = map(int, name.split("-")[0].split(".")[0].split("x"))
        assert outcome == "converted", message
        assert rss < bound * w * h + (4 << 20) and seconds < 10, (name, rss / (w * h), seconds)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A 16 × 16 JPEG whose frame header claims width × height."""
    data = bytearray(_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_non_png_headers_are_checked_and_pillows_bomb_guard_is_an_image_rejection():
    """Pillow's lazy open gives the dimensions to check; limits set above Pillow's own guard (179 M pixels) still
    stop at it, as an ImageRejected."""
    with pytest.raises(ValueError, match="image of 9000 × 8000 pixels exceeds the image limits: side 9000") as err:
        images.decode(_jpeg_claiming(9000, 8000))
    assert isinstance(err.value, png.ImageRejected)
    with pytest.raises(ValueError, match="decompression-bomb guard: Image size \\(225000000 pixels\\)") as err:
        images.decode(_jpeg_claiming(15000, 15000), png.ImageLimits(max_side=20000, max_pixels=1 << 30))
    assert isinstance(err.value, png.ImageRejected)


# ---------------------------------------------------------------------------------------------- conversions


def reference_fit(gray: np.ndarray, size: int) -> np.ndarray:
    """The preprocessing rule written plainly: f×f block means (numpy), TF's bilinear resize, rint, centred pad."""
    import tensorflow as tf

    h, w = gray.shape
    long = max(h, w)
    th, tw = (max(1, (side * size + long // 2) // long) for side in (h, w))
    f = max(long // size, 1)
    mh, mw = max(h // f, 1), max(w // f, 1)
    mean = gray[:mh * f, :mw * f].astype(np.float32).reshape(mh, f, mw, f).sum(axis=(1, 3)) / np.float32(f * f)
    if (mh, mw) != (th, tw):
        mean = tf.image.resize(mean[..., None], [th, tw], method="bilinear").numpy()[..., 0]
    out = np.zeros((size, size), np.uint8)
    top, left = (size - th) // 2, (size - tw) // 2
    out[top:top + th, left:left + tw] = np.rint(mean).astype(np.uint8)
    return out


def test_resize_follows_the_rule_and_needs_no_square_canvas():
    rng = np.random.default_rng(7)
    with Image.open(os.path.join(SAMPLES, NIH[0])) as im:
        nih = np.asarray(im)
    shapes = ((1024, 1024, 256), (1024, 1024, 224), (1000, 1000, 256), (300, 300, 512), (256, 256, 256),
              (97, 97, 64), (4000, 1001, 256), (40, 60, 60), (5, 19, 8), (2048, 2500, 224), (700, 300, 128))
    for h, w, size in shapes:
        gray = nih if (h, w) == (1024, 1024) else rng.integers(0, 256, (h, w), dtype=np.uint8)
        np.testing.assert_array_equal(images.fit(gray, size), reference_fit(gray, size), err_msg=f"{h}x{w}→{size}")
    tall = rng.integers(1, 256, (4000, 1001), dtype=np.uint8)  # 4000 × 1001 → 256 × 64, padded left and right
    images.fit(tall, 256)  # compiled, warm
    tracemalloc.start()
    out = images.fit(tall, 256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # a square canvas would be 4000² = 16 MB
    assert out[:, 96:160].all() and not out[:, :96].any() and not out[:, 160:].any()
    wide = rng.integers(0, 256, (40, 60), dtype=np.uint8)  # the long side is already `size`: only padded
    np.testing.assert_array_equal(images.fit(wide, 60)[10:50], wide)


def old_to_gray8_wide(im: Image.Image) -> np.ndarray:
    """The rescaling before, in float64 over the whole image."""
    arr = np.asarray(im, dtype=np.float64)
    top = max(float(arr.max()), 1.0)
    full = 2.0 ** np.ceil(np.log2(top + 1.0)) - 1.0
    return np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)


def test_16bit_rescaling_equals_the_float_formula_without_full_size_float_copies():
    rng = np.random.default_rng(11)
    for top in (0, 1, 2, 255, 256, 1023, 4095, 4096, 40000, 65535):
        values = rng.integers(0, top + 1, (33, 47), dtype=np.uint16)
        values[0, 0] = top
        im = Image.fromarray(values)
        assert im.mode == "I;16"
        np.testing.assert_array_equal(images.to_gray8(im), old_to_gray8_wide(im))
    wider = rng.integers(-5000, 300000, (21, 13)).astype(np.int32)
    for arr in (wider, rng.normal(900, 400, (21, 13)).astype(np.float32)):
        im = Image.fromarray(arr)  # "I" beyond 16 bits and "F": the formula strip by strip
        np.testing.assert_array_equal(images.to_gray8(im), old_to_gray8_wide(im))
    big = Image.fromarray(rng.integers(0, 4096, (1024, 4096), dtype=np.uint16))  # 16 strips
    tracemalloc.start()
    out = images.to_gray8(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(out, old_to_gray8_wide(big))
    assert peak < out.nbytes + (6 << 20), peak  # the result and a few strips; float64 copies were 32 MB each


def test_colour_and_palette_conversions_equal_the_whole_image_ones():
    """Strip by strip gives what converting the whole image gave (the conversions are per pixel)."""
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (1500, 700, 4), dtype=np.uint8))  # 5 strips
    palette = rgba.convert("RGB").quantize(60)
    pa = Image.frombytes("PA", palette.size, np.stack([np.asarray(palette), np.asarray(rgba)[..., 3]], -1).tobytes())
    pa.putpalette(palette.getpalette())
    cmyk = rgba.convert("CMYK")
    for im, old in ((rgba, rgba.convert("RGBA").convert("RGB").convert("L")), (palette, palette.convert("L")),
                    (pa, pa.convert("RGBA").convert("RGB").convert("L")), (rgba.convert("LA"), rgba.convert("L")),
                    (rgba.convert("RGB"), rgba.convert("L")), (cmyk, cmyk.convert("L"))):
        np.testing.assert_array_equal(images.to_gray8(im), np.asarray(old), err_msg=im.mode)


# ---------------------------------------------------------------------------------------------- datasets


def _root(tmp_path, files: dict[str, bytes]) -> str:
    """An NIH-shaped root: the real samples plus `files`, one patient each."""
    root = tmp_path / "root"
    os.makedirs(root / "images")
    for name in NIH:
        shutil.copy(os.path.join(SAMPLES, name), root / "images" / name)
    for name, data in files.items():
        (root / "images" / name).write_bytes(data)
    rows = [f"{n},No Finding,0,{int(n[:8])},50,F,PA,1024,1024,0.143,0.143" for n in [*NIH, *files]]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return str(root)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, format="GIF")
    return buf.getvalue()


HOSTILE = {
    "00000100_000.png": _jpeg(64, 64),  # a JPEG named .png: converted, reported
    "00000101_000.png": _gif(),  # a GIF named .png: likewise
    "00000102_000.png": b"",
    "00000103_000.png": bytes(range(200)),
    "00000104_000.png": black_png(3, 60000),
    "00000105_000.png": restream(pillow_png(Image.fromarray(np.full((40, 40), 3000, np.uint16))),
                                 lambda raw: raw[:len(raw) // 2]),  # 16-bit, the bottom half missing
    "00000106_000.png": split_idat(),
}
REASONS = {
    "00000102_000.png": "ValueError: empty file (0 bytes)",
    "00000103_000.png": "ValueError: not an image: unrecognised format (first bytes 00 01 02 03 04 05 06 07 …)",
    "00000104_000.png": "ImageRejected: image of 3 × 60000 pixels exceeds the image limits: side 60000 > max_side "
                        "8192; aspect ratio 60000:3 > max_aspect 4:1",
    "00000105_000.png": "ValueError: undecodable PNG: the image data inflates to 1620 bytes, not the 3240 40 × 40 "
                        "at bit depth 16, colour type 0 needs (rows missing)",
    "00000106_000.png": f"ValueError: IDAT chunk at byte {split_idat().rindex(b'IDAT') - 4} after a tEXt chunk at "
                        f"byte {split_idat().index(b'tEXt') - 4}: IDAT chunks must be consecutive",
}
NOTES = {
    "00000100_000.png": "content is JPEG (first bytes ff d8 ff e0 …), but the extension .png says PNG; "
                        "converted all the same",
    "00000101_000.png": "content is GIF (first bytes 47 49 46 38 …), but the extension .png says PNG; "
                        "converted all the same",
}


def test_prepare_quarantines_with_deterministic_reasons_and_lists_mismatched_content(tmp_path):
    root = _root(tmp_path, HOSTILE)
    params = shards.Params(size=64, codec="png", images_per_shard=100, val_fraction=0.0, test_fraction=0.0)
    ds = metadata.load(root, val_fraction=0.0, test_fraction=0.0)
    (spec,) = shards.plan(ds, params)
    receipt = shards.write_shard(spec, str(tmp_path / "out"), params)
    assert {q["image"]: q["reason"] for q in receipt["quarantine"]} == REASONS
    assert receipt["records"] == len(NIH) + len(NOTES)
    built = manifest.build(ds, params.as_dict(), [receipt])
    assert built["notes"] == [{"image": name, "note": note} for name, note in sorted(NOTES.items())]
    again = shards.write_shard(spec, str(tmp_path / "again"), params)
    assert json.dumps(manifest.build(ds, params.as_dict(), [again])) == json.dumps(built)


def test_inspect_scan_reports_what_prepare_will_quarantine_and_mismatched_content(tmp_path):
    root = _root(tmp_path, HOSTILE)
    ds = metadata.load(root, scan_images=True)
    found = {(p.image, p.kind): p.detail for p in ds.problems}
    for name, reason in REASONS.items():
        url = os.path.join(root, "images", name)
        assert found.pop((name, "unreadable_image")) == f"{url}: {reason}"
    for name, note in NOTES.items():
        assert found.pop((name, "extension_mismatch")) == note
    assert found == {("00000101_000.png", "unusual_mode"): "mode P; converted to 8-bit grayscale when prepared"}
    assert sorted(ds.table["image"]) == sorted([*NIH, *NOTES])  # a mismatch is not fatal


def test_raw_mode_skips_or_names_an_image_beyond_the_limits(tmp_path):
    import tensorflow as tf

    from cxr.data import pipeline, reader

    root = _root(tmp_path, {"00000100_000.png": black_png(1 << 20, 1)})
    victim = os.path.join(root, "images", "00000100_000.png")
    kw = {"image_size": 64, "raw_size": 64, "val_fraction": 0.0, "test_fraction": 0.0}
    with pytest.raises(tf.errors.OpError, match="1048576 × 1 pixels exceeds the image limits: side 1048576") as err:
        list(pipeline.make_raw_dataset(root, "train", 2, **kw))
    assert victim in str(err.value)
    stats = reader.Stats()
    batches = list(pipeline.make_raw_dataset(root, "train", 2, on_corrupt="skip", stats=stats, **kw))
    assert sum(int(x.shape[0]) for x, _, _ in batches) == len(NIH)
    assert list(stats.skipped) == [victim] and "max_side 8192" in stats.skipped[victim]
