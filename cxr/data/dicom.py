"""DICOM → the same 8-bit grayscale array the PNG path gives, so `cxr predict` can read scanner output directly.

Why its own module: a PNG's pixels are what is shown, but a DICOM's stored values go through a chain of
transformations (PS3.4 N.2) before they mean anything on screen. Applied here, in this order:

1. Stored values. pydicom decodes the pixel words (any transfer syntax it has a decoder for); we take
   the `BitsStored` bits that end at `HighBit` (shift right by `HighBit + 1 - BitsStored`, mask), and
   sign-extend them when `PixelRepresentation` is 1. Bits outside that field (old overlay bits) are dropped.
2. Modality LUT: the Modality LUT Sequence or else Rescale Slope/Intercept (`pydicom.pixels.apply_modality_lut`).
3. VOI: the VOI LUT Sequence (`pydicom.pixels.apply_voi`), or else Window Center/Width (`apply_windowing`,
   honouring VOI LUT Function). When a file has both, the LUT wins, as in pydicom's `apply_voi_lut` default
   (`prefer_lut=True`); the first LUT / first window is used.
4. Scaling to 8 bits, exactly: the output range [lo, hi] of the last stage that ran maps linearly to 0..255,
   `u8 = rint((v - lo) * (255 / (hi - lo)))`, where
   - with a window, [lo, hi] is what the windowing function outputs below and above the window (so the
     window spans 0..255 and values outside it clip);
   - with a VOI LUT, [lo, hi] is the range of the LUT's entries;
   - with neither, [lo, hi] is the modality stage applied to the whole stored range of `BitsStored`
     (e.g. 0..4095 for unsigned 12-bit), like the PNG path's "rescale from the bit depth". With no
     Rescale, an 8-bit image is unchanged and 12-bit value s becomes rint(s * 255 / 4095), the same float
     operations as `cxr.data.images.to_gray8`, so the result is bit-identical to that of a 16-bit PNG of the
     same values whose maximum is 2048..4095 (the PNG path infers its depth from the maximum, since a PNG
     has no BitsStored).
5. MONOCHROME1 (white = low values) is inverted after VOI: `u8 = rint((hi - v) * (255 / (hi - lo)))`.
   Presentation LUT Shape is ignored: DX requires INVERSE exactly when the image is MONOCHROME1, which
   step 5 already handles; applying it as well would invert twice.

RGB / YBR (8-bit) images become luma through Pillow, exactly as the PNG path converts RGB PNGs; other
colour models (PALETTE COLOR, 16-bit colour) are refused. Refused with a ValueError naming the file and the
reason: multi-frame images, no pixel data, transfer syntaxes pydicom cannot decode (naming the UID and the
package that would), and images larger than `max_side` (checked from Rows/Columns before any pixel is
decoded).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pydicom.uid
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array

from cxr.data.images import to_gray8

MAX_SIDE = 8192  # the largest radiographs (35x43 cm at 0.1 mm) are ~3500x4300; anything bigger is suspect
MAGIC_OFFSET = 128
MAGIC = b"DICM"
PREFER_VOI_LUT = True  # a file with both a VOI LUT Sequence and a window: the LUT wins
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_PREFIX_GROUPS = (0x0002, 0x0008)  # a file without preamble starts with its meta group or the dataset proper
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
        b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
        b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


class DicomError(ValueError):
    """A DICOM file this module refuses or cannot read; the message starts with the file's name."""


def is_dicom(data: bytes) -> bool:
    """Cheap sniff: "DICM" at offset 128, or (no preamble) a group 0002/0008 tag at offset 0.

    The second form is what pydicom can still read with `force=True`: a file meta group or a bare dataset
    written without the 128-byte preamble. Its first tag must be little-endian group 0002 or 0008 followed
    by an explicit VR or a plausible implicit-VR length, which no PNG or JPEG starts with.
    """
    if data[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC:
        return True
    if len(data) < 8:
        return False
    group, _element = struct.unpack_from("<HH", data, 0)
    if group not in _PREFIX_GROUPS:
        return False
    if data[4:6] in _VRS:
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length <= len(data) - 8


def dicom_to_gray8(data: bytes, name: str, max_side: int = MAX_SIDE) -> np.ndarray:
    """DICOM file bytes → uint8 [H, W] shown as a viewer would (see the module docstring for every step)."""
    ds = read_dataset(data, name, max_side)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    raw = _decode(ds, name)
    if photometric in COLOUR:
        return _colour_to_gray8(raw, ds, name)
    stored = stored_values(raw, ds)
    try:
        values, lo, hi = _display_values(stored, ds)
    except Exception as exc:  # noqa: BLE001 - malformed LUTs or windows raise several types inside pydicom
        raise DicomError(f"{name}: cannot apply its Modality/VOI transformation ({type(exc).__name__}: {exc})") from exc
    return _to_uint8(values, lo, hi, invert=photometric == "MONOCHROME1")


def read_dataset(data: bytes, name: str, max_side: int = MAX_SIDE) -> Dataset:
    """Parse and check everything that can be refused before pixels are decoded (header only, no decoding)."""
    if not is_dicom(data):
        raise DicomError(f"{name}: not a DICOM file (no 'DICM' at offset 128 and no DICOM tag at offset 0)")
    with_preamble = data[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not with_preamble)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types (EOFError, struct.error, ...) on bad bytes
        raise DicomError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    try:
        _check_header(ds, name, max_side)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom converts elements lazily: a bad VR or value raises here
        raise DicomError(f"{name}: malformed image header ({type(exc).__name__}: {exc})") from exc
    return ds


def _check_header(ds: Dataset, name: str, max_side: int) -> None:
    """The refusals: no pixels, several frames, too large, a pixel layout or colour model we do not convert."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        detail = f" (only {other[0]}, which radiographs do not use)" if other else ""
        raise DicomError(f"{name}: no Pixel Data (7FE0,0010) element{detail}: not an image, or truncated")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(f"{name}: multi-frame image ({frames} frames); only single-frame radiographs are read")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if ds.get(k) is None]
    if missing:
        raise DicomError(f"{name}: missing required element(s) {', '.join(missing)}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1:
        raise DicomError(f"{name}: empty image ({rows} x {cols})")
    if max(rows, cols) > max_side:
        raise DicomError(f"{name}: image is {rows} x {cols} pixels, above the limit of {max_side} per side")
    allocated = int(ds.BitsAllocated)
    stored = int(ds.get("BitsStored") or allocated)
    high = int(ds.get("HighBit") if ds.get("HighBit") is not None else stored - 1)
    if allocated not in (8, 16):
        raise DicomError(f"{name}: BitsAllocated {allocated} is not supported (8 or 16)")
    if not (1 <= stored <= allocated and stored - 1 <= high < allocated):
        raise DicomError(f"{name}: inconsistent BitsStored {stored} / HighBit {high} / BitsAllocated {allocated}")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric in MONOCHROME and samples == 1:
        return
    if photometric in COLOUR and samples == 3 and allocated == 8:
        return
    raise DicomError(f"{name}: photometric interpretation {photometric!r} with {samples} sample(s) of "
                     f"{allocated} bits is not supported (MONOCHROME1/2, or 8-bit RGB/YBR)")


def transfer_syntax(ds: Dataset) -> pydicom.uid.UID:
    """The file's transfer syntax; for a bare dataset without file meta, the encoding pydicom read it in."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return pydicom.uid.UID(str(uid))
    implicit, little = ds.original_encoding
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian


def _decode(ds: Dataset, name: str) -> np.ndarray:
    """The decoded pixel words, unmasked (we apply BitsStored/HighBit ourselves), or a ValueError saying why not."""
    uid = transfer_syntax(ds)
    label = f"{uid.name} ({uid})" if uid.is_transfer_syntax else f"transfer syntax {uid}"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DicomError(f"{name}: pixel data in {label}, which pydicom cannot decode with any plugin") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "no known plugin"
        raise DicomError(f"{name}: pixel data in {label} needs a decoder that is not installed ({needs})")
    if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = FileMetaDataset(getattr(ds, "file_meta", None) or Dataset())
        ds.file_meta.TransferSyntaxUID = uid
    try:
        return pixel_array(ds, correct_unused_bits=False)
    except Exception as exc:  # noqa: BLE001 - codecs raise anything from ValueError to RuntimeError on bad data
        raise DicomError(f"{name}: pixel data in {label} could not be decoded ({type(exc).__name__}: {exc})") from exc


def stored_values(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Pixel words → stored values (int64): the BitsStored bits ending at HighBit, sign-extended if signed."""
    allocated = int(ds.BitsAllocated)
    stored = int(ds.get("BitsStored") or allocated)
    high = int(ds.get("HighBit") if ds.get("HighBit") is not None else stored - 1)
    words = raw.astype(np.int64) & ((1 << allocated) - 1)  # two's complement words as unsigned
    values = (words >> (high + 1 - stored)) & ((1 << stored) - 1)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        values = np.where(values >= 1 << (stored - 1), values - (1 << stored), values)
    return values


def stored_range(ds: Dataset) -> tuple[int, int]:
    """The smallest and largest value BitsStored can hold (signed if PixelRepresentation is 1)."""
    stored = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    return 0, (1 << stored) - 1


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _display_values(stored: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """Modality then VOI; returns the values and the output range [lo, hi] that maps to 0..255 (see module doc)."""
    smin, smax = stored_range(ds)
    every = np.arange(smin, smax + 1, dtype=np.int64)  # at most 65536 values: the exact reachable range
    modality = apply_modality_lut(stored, ds)
    reach = apply_modality_lut(every, ds)
    lo, hi = float(np.min(reach)), float(np.max(reach))
    if _has_voi_lut(ds) and (PREFER_VOI_LUT or not _has_window(ds)):
        # pydicom indexes the LUT with the input; rounding a float modality output is what a viewer does.
        values = apply_voi(_as_lut_input(modality), ds)
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries = apply_voi(np.arange(int(descriptor[1]), int(descriptor[1]) + (int(descriptor[0]) or 65536)), ds)
        return values.astype(np.float64), float(entries.min()), float(entries.max())
    if _has_window(ds):
        lo, hi = _window_output_range(ds)
        return apply_windowing(modality, ds), lo, hi
    return np.asarray(modality, dtype=np.float64), lo, hi


def _as_lut_input(values: np.ndarray) -> np.ndarray:
    return values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """What pydicom's windowing outputs far below and far above the window: those two values are 0 and 255.

    Asking the function itself keeps us exact for LINEAR, LINEAR_EXACT and SIGMOID and for a negative
    Rescale Slope (where pydicom's "below" value is the larger number) without restating its formulas.
    """
    def first(value) -> float:
        return float(value[0] if isinstance(value, MultiValue) else value)

    center, width = first(ds.WindowCenter), abs(first(ds.WindowWidth))
    far = 1e6 * (width + 1.0) + abs(center)
    with np.errstate(over="ignore"):  # SIGMOID's exp overflows to inf far from the window: the limit we want
        below, above = apply_windowing(np.array([center - far, center + far]), ds)
    return float(below), float(above)


def _to_uint8(values: np.ndarray, lo: float, hi: float, invert: bool) -> np.ndarray:
    """[lo, hi] → 0..255 linearly (hi → 0 when inverted); a degenerate range gives black."""
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    offset = (hi - values) if invert else (values - lo)
    return np.clip(np.rint(offset * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _colour_to_gray8(raw: np.ndarray, ds: Dataset, name: str) -> np.ndarray:
    """8-bit RGB (pydicom has already converted YBR to RGB) → luma via Pillow, exactly like an RGB PNG."""
    if raw.ndim != 3 or raw.shape[-1] != 3:
        raise DicomError(f"{name}: expected RGB pixels [rows, columns, 3], decoded {raw.shape}")
    return to_gray8(Image.fromarray(np.ascontiguousarray(raw, dtype=np.uint8)))  # [H, W, 3] uint8: mode RGB
