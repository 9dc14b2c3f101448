"""numba kernels of the image stage: GIL-free loops that numpy would need many passes (and the GIL) for.

Reading threads run them on every core at once. Compiled on first use and cached on disk (`cache=True`:
beside this file, or in the user's cache directory), so only the first process on a machine pays the
seconds of compiling. Imported lazily, where images are decoded or resized: numba itself is slow to import.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _paeth(a: int, b: int, c: int) -> int:
    """The PNG spec's predictor, without branches: left a, above b, above-left c."""
    da, db = a - c, b - c
    pa, pb, pc = abs(db), abs(da), abs(da + db)
    p = c if pc < pb else b
    return a if (pa <= pb) & (pa <= pc) else p


@numba.njit(nogil=True, cache=True)
def _one_row(kind: int, src: np.ndarray, above: np.ndarray, dst: np.ndarray) -> None:
    if kind == 0:  # None
        for x in range(dst.shape[0]):
            dst[x] = src[x]
    elif kind == 1:  # Sub
        a = np.int32(0)
        for x in range(dst.shape[0]):
            a = (np.int32(src[x]) + a) & 255
            dst[x] = a
    elif kind == 2:  # Up
        for x in range(dst.shape[0]):
            dst[x] = (np.int32(src[x]) + np.int32(above[x])) & 255
    elif kind == 3:  # Average
        a = np.int32(0)
        for x in range(dst.shape[0]):
            a = (np.int32(src[x]) + ((a + np.int32(above[x])) >> 1)) & 255
            dst[x] = a
    else:  # Paeth
        a = c = np.int32(0)
        for x in range(dst.shape[0]):
            b = np.int32(above[x])
            a = (np.int32(src[x]) + _paeth(a, b, c)) & 255
            dst[x] = a
            c = b


@numba.njit(nogil=True, cache=True)
def _paeth_up_paeth(s0: np.ndarray, s1: np.ndarray, s2: np.ndarray, above: np.ndarray, d0: np.ndarray,
                    d1: np.ndarray, d2: np.ndarray) -> None:
    """Rows Paeth, Up, Paeth in one walk (byte x of a row needs only bytes <= x of the rows above), so two
    Paeth chains are in flight at once."""
    a0 = c0 = a2 = c2 = np.int32(0)
    for x in range(d0.shape[0]):
        b0 = np.int32(above[x])
        a0 = (np.int32(s0[x]) + _paeth(a0, b0, c0)) & 255
        d0[x] = a0
        c0 = b0
        b2 = (np.int32(s1[x]) + a0) & 255
        d1[x] = b2
        a2 = (np.int32(s2[x]) + _paeth(a2, b2, c2)) & 255
        d2[x] = a2
        c2 = b2


@numba.njit(nogil=True, cache=True)
def unfilter(filtered: np.ndarray, out: np.ndarray) -> None:
    """PNG rows of one byte per pixel, filtered [h, w + 1] (type byte first, all 0-4) → pixels out [h, w]."""
    h = out.shape[0]
    zero = np.zeros(out.shape[1], np.uint8)  # the row above the first
    r = 0
    while r < h:
        above = out[r - 1] if r > 0 else zero
        if r + 2 < h and filtered[r, 0] == 4 and filtered[r + 1, 0] == 2 and filtered[r + 2, 0] == 4:
            _paeth_up_paeth(filtered[r, 1:], filtered[r + 1, 1:], filtered[r + 2, 1:], above, out[r], out[r + 1],
                            out[r + 2])
            r += 3
        else:
            _one_row(filtered[r, 0], filtered[r, 1:], above, out[r])
            r += 1


@numba.njit(nogil=True, cache=True)
def box_sums(x: np.ndarray, f: int, out: np.ndarray) -> np.ndarray:
    """The f×f block sums of x's top-left (mh·f)×(mw·f) corner into out [mh, mw] (its dtype), in one pass.

    One pass outside the GIL: the numpy passes it replaced each took the GIL back from the decoding threads.
    """
    mh, mw = out.shape
    col = np.empty(mw * f, out.dtype)
    for i in range(mh):
        col[:] = 0
        for r in range(i * f, i * f + f):  # rows first: contiguous, vectorised
            row = x[r]
            for j in range(mw * f):
                col[j] += row[j]
        o = out[i]
        o[:] = 0
        for k in range(f):
            for j in range(mw):
                o[j] += col[j * f + k]
    return out


@numba.njit(nogil=True, cache=True)
def box_means(x: np.ndarray, f: int, table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`box_sums` looked up in `table` (uint8 [mh, mw] = table[sums]): numpy's lookup would hold the GIL."""
    mh, mw = out.shape
    sums = box_sums(x, f, np.empty((mh, mw), np.uint32))
    for i in range(mh):
        for j in range(mw):
            out[i, j] = table[sums[i, j]]
    return out
