"""Subgroups of `cxr evaluate`: does the model work as well for women as for men, for the elderly, for AP films?

Per attribute (sex, age in bands, view) and per cell of it, per finding: AUROC with a patient-bootstrap
percentile CI, and its gap to the overall AUROC with a CI, both on the SAME patient resamples as the overall
CI (drawn once by `cxr evaluate`, `bootstrap.patient_resamples`). A patient drawn twice brings all of its images
in every cell twice, so a cell's size varies across resamples as it would across repeated studies, and the gap
is paired: a cell that is the whole split has gap 0 with CI [0, 0].

Unknown values are a cell of their own ("unknown"), never dropped. A (cell, finding) with fewer than `min_count`
positive or negative images is not scored and says why. Vectorised: per attribute, every scorable (cell,
finding) pair is one column of a label matrix in which the images outside the cell are unknown (-1), so one pass
of the bootstrap's sparse AUROC scores all of them under every resample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cxr.evaluation.bootstrap import AurocCI, Resamples, _checked, _interval, _opt, _replicates, _row_means

ATTRIBUTES = ("sex", "age", "view")
AGE_BANDS = (0, 18, 40, 60, 80)  # lower edges, in years
UNKNOWN = "unknown"
MIN_COUNT = 5  # a cell needs this many positive and negative images of a finding to be scored


def parse_attributes(text: str | Sequence[str] | None) -> tuple[str, ...] | str:
    """`--subgroups`: "auto" (every attribute the data has), "none" / "" / None (skip), or e.g. "sex,age,view"."""
    if text is None:
        return ()
    if isinstance(text, str):
        if text.strip().lower() == "auto":
            return "auto"
        if text.strip().lower() in ("none", ""):
            return ()
        text = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in text if t not in ATTRIBUTES]
    if bad:
        raise ValueError(f"--subgroups: unknown attribute(s) {bad}; choose from {', '.join(ATTRIBUTES)}, "
                         "'auto' or 'none'")
    return tuple(dict.fromkeys(text))


def parse_bands(text: str | Sequence[int]) -> tuple[int, ...]:
    """`--age-bands 0,18,40,60,80`: ascending whole-year lower edges; the last band is open-ended."""
    try:
        bands = tuple(int(t) for t in (text.split(",") if isinstance(text, str) else text))
    except ValueError as exc:
        raise ValueError(f"--age-bands {text!r}: give whole years separated by commas, e.g. 0,18,40,60,80") from exc
    if not bands or any(b < 0 for b in bands) or any(b >= c for b, c in zip(bands[:-1], bands[1:], strict=True)):
        raise ValueError(f"--age-bands {text!r}: need at least one edge, non-negative and strictly ascending")
    return bands


def band_names(bands: Sequence[int]) -> list[str]:
    """The age cells of `bands` in order: "0-17", ..., "80+" (and "<b" when the first edge is above 0)."""
    names = [f"{a}-{b - 1}" for a, b in zip(bands[:-1], bands[1:], strict=True)] + [f"{bands[-1]}+"]
    return ([f"<{bands[0]}"] if bands[0] > 0 else []) + names


def cells(attribute: str, values: ArrayLike, bands: Sequence[int] = AGE_BANDS) -> tuple[np.ndarray, list[str]]:
    """Each image's cell index and the cell names in display order, "unknown" last (missing, blank, NaN, < 0)."""
    if attribute == "age":
        age = np.asarray(values, dtype=np.float64)
        names = band_names(bands)
        offset = 1 if bands[0] > 0 else 0
        known = np.isfinite(age) & (age >= 0)
        idx = np.full(len(age), len(names), dtype=np.intp)
        idx[known] = np.searchsorted(np.asarray(bands, np.float64), age[known], side="right") - 1 + offset
        return idx, [*names, UNKNOWN]
    if attribute not in ("sex", "view"):
        raise ValueError(f"unknown subgroup attribute {attribute!r}; choose from {', '.join(ATTRIBUTES)}")
    text = np.array(["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip() for v in values],
                    dtype=object)
    text[np.char.lower(text.astype(str)) == UNKNOWN] = ""
    names, idx = np.unique(text, return_inverse=True)
    known = [str(n) for n in names if n != ""]
    order = {n: i for i, n in enumerate(known)}
    lookup = np.array([order.get(str(n), len(known)) for n in names], dtype=np.intp)
    return lookup[idx.reshape(-1)], [*known, UNKNOWN]


def too_small(positives: int, negatives: int, images: int, min_count: int) -> str | None:
    """Why a cell cannot score a finding, or None when it can."""
    if images == 0:
        return "no image in this cell"
    if positives == 0:
        return "no positive image"
    if negatives == 0:
        return "no negative image"
    if positives < min_count:
        return f"{positives} positive image{'s' if positives > 1 else ''}, fewer than {min_count}"
    if negatives < min_count:
        return f"{negatives} negative image{'s' if negatives > 1 else ''}, fewer than {min_count}"
    return None


def _entry(point: float, reps: np.ndarray, gap_point: float, gap_reps: np.ndarray, confidence: float) -> dict:
    low, high, n = _interval(reps, confidence)
    gap_low, gap_high, _ = _interval(gap_reps, confidence)
    return {"auroc": _opt(point), "low": low, "high": high, "gap": _opt(gap_point), "gap_low": gap_low,
            "gap_high": gap_high, "n_defined": n}


def _attribute(y: np.ndarray, s: np.ndarray, draws: Resamples, overall: np.ndarray, overall_reps: np.ndarray,
               idx: np.ndarray, names: list[str], labels: Sequence[str], min_count: int,
               confidence: float) -> dict[str, Any]:
    """One attribute's cells: counts, and every scorable (cell, finding) scored in one pass over the resamples."""
    n, k = y.shape
    c = len(names)
    onehot = np.zeros((n, c), dtype=np.int64)
    onehot[np.arange(n), idx] = 1
    images = onehot.sum(axis=0)
    positives = onehot.T @ (y == 1).astype(np.int64)  # [C, K], known labels only
    negatives = onehot.T @ (y == 0).astype(np.int64)
    member = draws.image_patient
    pairs, reasons = [], {}
    for ci in range(c):
        for kk in range(k):
            why = too_small(int(positives[ci, kk]), int(negatives[ci, kk]), int(images[ci]), min_count)
            if why is None:
                pairs.append((ci, kk))
            else:
                reasons[ci, kk] = why
    y_big = np.full((n, len(pairs)), -1, dtype=np.int8)
    s_big = np.empty((n, len(pairs)))
    for j, (ci, kk) in enumerate(pairs):
        inside = idx == ci
        y_big[inside, j] = y[inside, kk]
        s_big[:, j] = s[:, kk]
    if pairs:  # row 0 weighs every patient once: the point estimates, from the same arithmetic as the replicates
        both = _replicates(y_big, s_big, np.vstack([np.ones((1, draws.counts.shape[1]), draws.counts.dtype),
                                                    draws.counts]), member)
        point, reps = both[0], both[1:]
    column = {pair: j for j, pair in enumerate(pairs)}
    out = {}
    for ci, cell in enumerate(names):
        inside = idx == ci
        per_patient = np.bincount(member[inside], minlength=draws.counts.shape[1])
        sizes = (draws.counts @ per_patient).astype(np.float64)  # the cell's images in each resample
        size_low, size_high, _ = _interval(sizes, confidence)
        findings, js, ks = {}, [], []
        for kk, name in enumerate(labels):
            entry = {"positives": int(positives[ci, kk]), "negatives": int(negatives[ci, kk])}
            j = column.get((ci, kk))
            if j is None:
                entry.update({"auroc": None, "low": None, "high": None, "gap": None, "gap_low": None,
                              "gap_high": None, "n_defined": 0, "reason": reasons[ci, kk]})
            else:
                js.append(j)
                ks.append(kk)
                entry.update(_entry(point[j], reps[:, j], point[j] - overall[kk], reps[:, j] - overall_reps[:, kk],
                                    confidence))
                entry["reason"] = None if entry["n_defined"] else "undefined in every resample"
            findings[name] = entry
        if js:
            gaps = reps[:, js] - overall_reps[:, ks]  # defined where the cell is: its weights are the overall's
            mean = _entry(float(np.mean(point[js])), _row_means(reps[:, js]),
                          float(np.mean(point[js] - overall[ks])), _row_means(gaps), confidence)
        else:
            mean = {"auroc": None, "low": None, "high": None, "gap": None, "gap_low": None, "gap_high": None,
                    "n_defined": 0}
        mean["findings"] = len(js)
        out[cell] = {"images": int(images[ci]), "patients": int(len(np.unique(member[inside]))),
                     "images_resampled": [size_low, size_high], "mean": mean, "findings": findings}
    return out


def subgroup_stats(y_true: ArrayLike, scores: ArrayLike, draws: Resamples, overall: AurocCI,
                   attributes: Mapping[str, ArrayLike], bands: Sequence[int] = AGE_BANDS,
                   min_count: int = MIN_COUNT) -> dict[str, Any]:
    """Per attribute, per cell, per finding: AUROC [CI] and gap to `overall` [CI] on `overall`'s resamples `draws`.

    `overall` is `auroc_ci(y_true, scores, ..., draws=draws)`; `attributes` maps "sex" / "age" / "view" to one
    value per image (sex and view as the data says, "" or None unknown; age in years, NaN or < 0 unknown).
    JSON-safe; a cell's "mean" is over the findings it scores, its gap against the overall AUROC of those findings.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    y, s, _ = _checked(y_true, [scores], draws.image_patient)
    n, k = y.shape
    if draws.n_images != n or overall.replicates.shape != (draws.n_resamples, k):
        raise ValueError(f"the overall CI ({overall.replicates.shape} replicates) and the draws ({draws.n_resamples} "
                         f"resamples of {draws.n_images} images) do not fit {n} images of {k} findings")
    labels = [f.finding for f in overall.findings]
    # the overall point estimate by the replicates' arithmetic too (equal to sklearn's to rounding): a cell that
    # is the whole split then has a point gap of exactly 0, as its replicate gaps are
    point = _replicates(y, s, np.ones((1, draws.counts.shape[1])), draws.image_patient)[0]
    out: dict[str, Any] = {}
    for attribute, values in attributes.items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"subgroup attribute {attribute!r}: {values.shape} values for {n} images")
        idx, names = cells(attribute, values, bands)
        out[attribute] = _attribute(y, s, draws, point, overall.replicates, idx, names, labels, min_count,
                                    overall.confidence)
    return {"attributes": out, "age_bands": band_names(bands), "min_count": min_count,
            "resamples": draws.n_resamples, "confidence": overall.confidence, "seed": overall.seed, "unit": "patient",
            "gap": "cell AUROC - overall AUROC, paired on the overall CI's patient resamples"}


def for_values(values: dict[str, np.ndarray] | None, where: str, y_true: np.ndarray, scores: np.ndarray,
               draws: Resamples, overall: AurocCI, wanted: str | Sequence[str], bands: Sequence[int] = AGE_BANDS,
               min_count: int = MIN_COUNT) -> dict[str, Any] | None:
    """`cxr evaluate`'s subgroups of the scored images, whose sex / age / view are `values` (None: the data
    records none): "auto" takes every attribute that has a known value; an attribute without any is skipped and
    said so, `where` naming the images ("the test split"). None when none was asked for."""
    wanted, bands = parse_attributes(wanted), parse_bands(bands)
    if not wanted:
        return None
    names = ATTRIBUTES if wanted == "auto" else tuple(wanted)
    if values is None:
        return {"attributes": {}, "skipped": {a: "the data source records no per-image attributes" for a in names}}
    chosen, skipped = {}, {}
    for a in names:
        idx, cell_names = cells(a, values[a], bands)
        if (idx == len(cell_names) - 1).all():
            skipped[a] = f"no image of {where} has a known {a}"
        else:
            chosen[a] = values[a]
    out = subgroup_stats(y_true, scores, draws, overall, chosen, bands, min_count)
    out["skipped"] = skipped
    return out
