"""DICOM reading: DICOMs written here with pydicom from the real NIH sample pixels give the PNG path's arrays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder

from cxr.data import images
from cxr.data.dicom import dicom_to_gray8, is_dicom

PNGS = sorted(SAMPLES.glob("*.png"))
needs_samples = pytest.mark.skipif(not PNGS, reason=f"no NIH sample PNGs at {SAMPLES} (the shared samples folder)")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    """A non-square crop of a real NIH image (uint8), small enough for the pure-Python RLE encoder."""
    if not PNGS:
        pytest.skip(f"no NIH sample PNGs at {SAMPLES} (the shared samples folder)")
    return images.decode(PNGS[0].read_bytes())[300:556, 200:520].copy()


def twelve_bit(p: np.ndarray) -> np.ndarray:
    """8-bit → 12-bit by bit replication (0 → 0, 255 → 4095), so the top bit is used and a PNG reads as 12-bit."""
    q = (p.astype(np.uint16) << 4) | (p.astype(np.uint16) >> 4)
    assert 2048 <= q.max() <= 4095
    return q


def write_dicom(words: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                high_bit: int | None = None, signed: bool = False, syntax: str = uid.ExplicitVRLittleEndian,
                preamble: bool = True, meta: bool = True, frames: int = 1, **elements) -> bytes:
    """A DX image from `words` (the pixel words exactly as stored: uint8/uint16/int16, [H, W] or [H, W, 3])."""
    ds = Dataset()
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = int(words.shape[0]), int(words.shape[1])
    ds.SamplesPerPixel = 3 if words.ndim == 3 else 1
    if words.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = words.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1 if high_bit is None else high_bit
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in elements.items():
        setattr(ds, key, value)
    little = words.astype(words.dtype.newbyteorder("<"))
    ds.PixelData = np.concatenate([little.ravel()] * frames).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    if meta:
        ds.save_as(buf, enforce_file_format=preamble)
    else:
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


@needs_samples
@pytest.mark.parametrize("path", PNGS, ids=[p.name for p in PNGS])
def test_8bit_monochrome2_equals_png_path(path: Path) -> None:
    expected = images.decode(path.read_bytes())  # today's PNG path, on the real file
    data = write_dicom(expected)
    assert is_dicom(data)
    got = dicom_to_gray8(data, "x.dcm")
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("high_bit", [11, 15], ids=["low-bits", "high-bits"])
def test_12bit_monochrome1_with_rescale_equals_16bit_png(sample: np.ndarray, high_bit: int) -> None:
    """Stored s = 4095 - q, MONOCHROME1, value = 2 s - 4096: what a viewer shows is q, i.e. the 16-bit PNG of q."""
    q = twelve_bit(sample)
    expected = images.decode(png_bytes(q))  # the 16-bit PNG path: rescale from its 12-bit depth
    s = 4095 - q
    # Garbage in the bits outside BitsStored (as old overlay planes left them): must be ignored.
    words = (s | 0xA000) if high_bit == 11 else ((s << 4) | 0x0005)
    data = write_dicom(words.astype(np.uint16), photometric="MONOCHROME1", bits_stored=12, high_bit=high_bit,
                       RescaleSlope="2", RescaleIntercept="-4096")
    np.testing.assert_array_equal(dicom_to_gray8(data, "mono1.dcm"), expected)


def test_signed_12bit_maps_its_full_range(sample: np.ndarray) -> None:
    q = twelve_bit(sample)
    v = q.astype(np.int16) - 2048  # -2048..2047: the signed 12-bit range maps to 0..255
    words = (v.view(np.uint16) & 0x0FFF) | 0x3000  # 12-bit two's complement; the top nibble is junk
    data = write_dicom(words.astype(np.uint16), bits_stored=12, signed=True)
    np.testing.assert_array_equal(dicom_to_gray8(data, "signed.dcm"), images.decode(png_bytes(q)))


@pytest.mark.parametrize(("function", "center", "width"), [("LINEAR", "2020.5", "2041"),
                                                             ("LINEAR_EXACT", "2020", "2040")])
def test_window_maps_to_0_255(sample: np.ndarray, function: str, center: str, width: str) -> None:
    """x = 8 p + 1000 under a window spanning exactly 1000..3040 shows p; values outside the window clip."""
    x = sample.astype(np.uint16) * 8 + 1000
    x[:3] = 0
    x[-3:] = 4095
    expected = sample.copy()
    expected[:3] = 0
    expected[-3:] = 255
    data = write_dicom(x, bits_stored=12, WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
    np.testing.assert_array_equal(dicom_to_gray8(data, "window.dcm"), expected)


def test_window_after_a_negative_rescale_slope(sample: np.ndarray) -> None:
    """value = 4095 - s = q; a window over 0..4095 then shows q (pydicom's "below" output is the larger number)."""
    q = twelve_bit(sample)
    data = write_dicom((4095 - q).astype(np.uint16), bits_stored=12, RescaleSlope="-1", RescaleIntercept="4095",
                       WindowCenter="2047.5", WindowWidth="4095", VOILUTFunction="LINEAR_EXACT")
    np.testing.assert_array_equal(dicom_to_gray8(data, "negative.dcm"), images.decode(png_bytes(q)))


def test_voi_lut_wins_over_window(sample: np.ndarray) -> None:
    q = twelve_bit(sample)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: 4096 entries from 0, 16 bits each
    item.add_new(0x00283006, "OW", (4095 - np.arange(4096, dtype="<u2")).tobytes())  # LUT Data: inverts
    data = write_dicom((4095 - q).astype(np.uint16), bits_stored=12, VOILUTSequence=[item],
                       WindowCenter="100", WindowWidth="10")  # the window alone would give a white image
    np.testing.assert_array_equal(dicom_to_gray8(data, "lut.dcm"), images.decode(png_bytes(q)))


def test_rle_lossless(sample: np.ndarray) -> None:
    """RLE Lossless: pydicom encodes and decodes it natively, so this runs everywhere."""
    q = twelve_bit(sample)
    ds = pydicom.dcmread(io.BytesIO(write_dicom(q, bits_stored=12)))
    ds.compress(uid.RLELossless, encoding_plugin="pydicom")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert pydicom.dcmread(io.BytesIO(buf.getvalue())).file_meta.TransferSyntaxUID == uid.RLELossless
    np.testing.assert_array_equal(dicom_to_gray8(buf.getvalue(), "rle.dcm"), images.decode(png_bytes(q)))


def test_jpeg2000_lossless(sample: np.ndarray) -> None:
    encoder = get_encoder(uid.JPEG2000Lossless)
    if not encoder.is_available:
        pytest.skip(f"no JPEG 2000 encoder installed ({'; '.join(encoder.missing_dependencies)})")
    q = twelve_bit(sample)
    ds = pydicom.dcmread(io.BytesIO(write_dicom(q, bits_stored=12)))
    ds.compress(uid.JPEG2000Lossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    np.testing.assert_array_equal(dicom_to_gray8(buf.getvalue(), "j2k.dcm"), images.decode(png_bytes(q)))


def test_rgb_becomes_luma_like_an_rgb_png(sample: np.ndarray) -> None:
    rgb = np.stack([sample, sample[::-1], sample // 2], axis=-1)
    np.testing.assert_array_equal(dicom_to_gray8(write_dicom(rgb, photometric="RGB"), "rgb.dcm"),
                                  images.decode(png_bytes(rgb)))


def test_files_without_preamble_or_meta(sample: np.ndarray) -> None:
    for label, data in (("no preamble", write_dicom(sample, preamble=False)),
                        ("bare implicit-VR dataset", write_dicom(sample, meta=False))):
        assert data[128:132] != b"DICM", label
        assert is_dicom(data), label
        np.testing.assert_array_equal(dicom_to_gray8(data, "bare.dcm"), sample, err_msg=label)


def test_is_dicom_rejects_other_images(sample: np.ndarray) -> None:
    jpeg = io.BytesIO()
    Image.fromarray(sample).save(jpeg, format="JPEG")
    for data in (png_bytes(sample), jpeg.getvalue(), b"", b"DICM" * 10):
        assert not is_dicom(data)
    with pytest.raises(ValueError, match=r"photo\.png: not a DICOM file"):
        dicom_to_gray8(png_bytes(sample), "photo.png")


def test_multiframe_refused(sample: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"cine\.dcm: multi-frame image \(2 frames\)"):
        dicom_to_gray8(write_dicom(sample, frames=2), "cine.dcm")


def test_no_pixel_data_refused(sample: np.ndarray) -> None:
    ds = pydicom.dcmread(io.BytesIO(write_dicom(sample)))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ValueError, match=r"report\.dcm: no Pixel Data"):
        dicom_to_gray8(buf.getvalue(), "report.dcm")


@pytest.mark.parametrize("cut", ["header", "pixels"])
def test_corrupt_bytes_name_the_file(sample: np.ndarray, cut: str) -> None:
    data = write_dicom(sample)
    if cut == "header":  # truncated before the pixel data: pydicom reads what is there without complaint
        bad, reason = data[:300], "no Pixel Data .* not an image, or truncated"
    else:
        bad, reason = data[:-1000], "pixel data in Explicit VR Little Endian .* could not be decoded"
    with pytest.raises(ValueError, match=rf"^broken\.dcm: {reason}"):
        dicom_to_gray8(bad, "broken.dcm")


def test_malformed_header_names_the_file(sample: np.ndarray) -> None:
    data = bytearray(write_dicom(sample))
    at = data.index(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR
    data[at + 4:at + 6] = b"Ul"  # a VR that does not exist: pydicom raises only when the element is used
    with pytest.raises(ValueError, match=r"^bad-vr\.dcm: malformed image header \(NotImplementedError"):
        dicom_to_gray8(bytes(data), "bad-vr.dcm")


def test_size_limit_checked_before_decoding() -> None:
    """A header claiming 60000 x 60000 pixels over 8 bytes of data is refused for its size, not its data."""
    tiny = np.zeros((2, 4), dtype=np.uint8)
    data = write_dicom(tiny)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = 60000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ValueError, match=r"huge\.dcm: image is 60000 x 60000 pixels, above the limit of 8192"):
        dicom_to_gray8(buf.getvalue(), "huge.dcm")
    with pytest.raises(ValueError, match="above the limit of 3"):
        dicom_to_gray8(data, "small.dcm", max_side=3)


def test_unsupported_transfer_syntax_names_uid(sample: np.ndarray) -> None:
    ds = pydicom.dcmread(io.BytesIO(write_dicom(sample)))
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # an MPEG-2 stream start: no decoder exists
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ValueError, match=r"video\.dcm: pixel data in .*MPEG2.*\(1\.2\.840\.10008\.1\.2\.4\.100\)"):
        dicom_to_gray8(buf.getvalue(), "video.dcm")


def test_palette_colour_refused(sample: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"pal\.dcm: photometric interpretation 'PALETTE COLOR'"):
        dicom_to_gray8(write_dicom(sample, photometric="PALETTE COLOR"), "pal.dcm")
