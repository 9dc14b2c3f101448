"""Operating points, AUPRC and calibration: what a reader of the test report needs beyond AUROC.

Thresholds are chosen on the validation split and applied unchanged to test, so test numbers are not tuned
on test. An image is called positive when its score is >= the threshold (scikit-learn's `roc_curve`
convention). A ratio whose denominator is zero (PPV when nothing is called positive, ...) is None.

Calibration uses the probability of the positive class of each sigmoid output, in `bins` equal-width bins on
[0, 1] placed exactly as `sklearn.calibration.calibration_curve(strategy="uniform")` places them (first bin
[0, 1/B], then (lo, hi]). Expected calibration error is the image-weighted mean over non-empty bins of
|observed fraction positive - mean predicted probability|: ECE = sum_b (n_b / N) |acc_b - conf_b|.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, confusion_matrix, roc_curve

from cxr.evaluation.bootstrap import finding_names, undefined_reason


def _binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and their scores, images with an unknown label (< 0, uncertain under `ignore`) left out."""
    y = np.asarray(y_true).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf: the model diverged or predictions were not gathered")
    known = y >= 0
    return y[known] > 0, s[known]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _columns(*arrays: ArrayLike) -> list[np.ndarray]:
    out = [np.asarray(a) for a in arrays]
    if any(a.ndim != 2 or a.shape[1] != out[0].shape[1] for a in out):
        raise ValueError(f"arrays {[a.shape for a in out]} must all be [N, findings] with the same findings")
    return out


def youden_threshold(y_true: ArrayLike, scores: ArrayLike) -> tuple[float, float] | None:
    """(threshold, J) maximising Youden's J = sensitivity + specificity - 1; the highest threshold on ties.

    Searched over every threshold of `roc_curve` (no points dropped); None without both classes.
    """
    y, s = _binary(y_true, scores)
    if undefined_reason(y) is not None:
        return None
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    j = tpr[1:] - fpr[1:]  # index 0 is the +inf threshold: nothing called positive
    best = int(np.argmax(j))
    return float(thresholds[1 + best]), float(j[best])


def sensitivity_threshold(y_true: ArrayLike, scores: ArrayLike, target: float = 0.9) -> float | None:
    """The highest threshold whose sensitivity is >= `target` (fewest false positives at that sensitivity)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _binary(y_true, scores)
    if undefined_reason(y) is not None:
        return None
    _, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    reached = np.flatnonzero(tpr[1:] >= target)  # tpr is non-decreasing; the last threshold has tpr 1
    return float(thresholds[1 + reached[0]])


@dataclass(frozen=True)
class Thresholds:
    """A finding's thresholds chosen on validation; None with a `reason` when validation cannot choose one."""

    finding: str
    youden: float | None
    youden_j: float | None
    sensitivity_target: float
    at_sensitivity: float | None
    reason: str | None = None


def choose_thresholds(
    y_val: ArrayLike, scores_val: ArrayLike, sensitivity: float = 0.9, names: Sequence[str] | None = None
) -> tuple[Thresholds, ...]:
    """Per finding of [N, K] validation labels/scores: the Youden threshold and the one reaching `sensitivity`."""
    y, s = _columns(y_val, scores_val)
    out = []
    for k, name in enumerate(finding_names(y.shape[1], names)):
        reason = undefined_reason(y[:, k])
        yj = youden_threshold(y[:, k], s[:, k]) if reason is None else None
        at = sensitivity_threshold(y[:, k], s[:, k], sensitivity) if reason is None else None
        out.append(Thresholds(name, yj[0] if yj else None, yj[1] if yj else None, sensitivity, at,
                              None if reason is None else f"validation has {reason.removesuffix(' in the split')}"))
    return tuple(out)


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates at one threshold; a rate is None when its denominator is zero."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    f1: float | None


def operating_point(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity, PPV, NPV and F1 of calling `scores >= threshold` positive."""
    y, s = _binary(y_true, scores)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, s >= threshold, labels=[False, True]).ravel())
    return OperatingPoint(
        threshold=float(threshold), tp=tp, fp=fp, tn=tn, fn=fn,
        sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp), npv=_ratio(tn, tn + fn), f1=_ratio(2 * tp, 2 * tp + fp + fn),
    )


def auprc(y_true: ArrayLike, scores: ArrayLike) -> float | None:
    """Average precision (`sklearn.metrics.average_precision_score`); None without a positive image."""
    y, s = _binary(y_true, scores)
    return float(average_precision_score(y, s)) if y.any() else None


def auprc_per_finding(y_true: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """AUPRC of each column of [N, K] scores; NaN where the column has no positive image."""
    y, s = _columns(y_true, scores)
    return np.array([np.nan if (a := auprc(y[:, k], s[:, k])) is None else a for k in range(y.shape[1])])


@dataclass(frozen=True)
class CalibrationBin:
    """One reliability-diagram bin: its edges, image count, mean predicted probability and observed frequency."""

    lower: float
    upper: float
    count: int
    confidence: float | None  # mean predicted probability; None for an empty bin
    observed: float | None  # fraction of positive images; None for an empty bin


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error (module docstring) and the per-bin table behind the reliability diagram."""

    ece: float | None  # None for an empty split
    bins: tuple[CalibrationBin, ...]


def calibration(y_true: ArrayLike, probabilities: ArrayLike, bins: int = 10) -> Calibration:
    """ECE over `bins` equal-width bins of the predicted probability of the positive class."""
    if bins < 1:
        raise ValueError(f"need at least one bin, got {bins}")
    y, p = _binary(y_true, probabilities)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("calibration needs probabilities in [0, 1] (sigmoid outputs), not logits")
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # calibration_curve's binning, edges included
    count = np.bincount(ids, minlength=bins)
    conf_sum = np.bincount(ids, weights=p, minlength=bins)
    pos_sum = np.bincount(ids, weights=y.astype(np.float64), minlength=bins)
    table = tuple(
        CalibrationBin(float(edges[b]), float(edges[b + 1]), int(count[b]),
                       float(conf_sum[b] / count[b]) if count[b] else None,
                       float(pos_sum[b] / count[b]) if count[b] else None)
        for b in range(bins)
    )
    if not len(p):
        return Calibration(None, table)
    ece = float(np.abs(pos_sum - conf_sum).sum() / len(p))  # n_b/N * |acc_b - conf_b| = |pos_b - conf_sum_b| / N
    return Calibration(ece, table)


@dataclass(frozen=True)
class FindingOperating:
    """Everything per finding beyond AUROC: prevalence, AUPRC, validation thresholds, test operating points, ECE."""

    finding: str
    prevalence: float | None
    auprc: float | None
    auprc_reason: str | None
    thresholds: Thresholds
    at_youden: OperatingPoint | None
    at_sensitivity: OperatingPoint | None
    calibration: Calibration

    def to_dict(self) -> dict:
        """JSON-safe form: nested dicts and lists, None for undefined."""
        return asdict(self)


def evaluate_operating(
    y_val: ArrayLike,
    scores_val: ArrayLike,
    y_test: ArrayLike,
    scores_test: ArrayLike,
    sensitivity: float = 0.9,
    bins: int = 10,
    names: Sequence[str] | None = None,
) -> tuple[FindingOperating, ...]:
    """Per finding: thresholds from validation, applied to test; AUPRC and calibration on test."""
    yv, sv, yt, st = _columns(y_val, scores_val, y_test, scores_test)
    labels = finding_names(yt.shape[1], names)
    chosen = choose_thresholds(yv, sv, sensitivity, labels)
    out = []
    for k, name in enumerate(labels):
        y, s = yt[:, k], st[:, k]
        known = y[y >= 0] > 0
        th = chosen[k]
        out.append(FindingOperating(
            finding=name,
            prevalence=float(known.mean()) if len(known) else None,
            auprc=auprc(y, s),
            auprc_reason=None if known.any() else "no positive image in the split",
            thresholds=th,
            at_youden=None if th.youden is None else operating_point(y, s, th.youden),
            at_sensitivity=None if th.at_sensitivity is None else operating_point(y, s, th.at_sensitivity),
            calibration=calibration(y, s, bins),
        ))
    return tuple(out)
