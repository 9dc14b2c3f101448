"""Per-finding AUROC, the metric ChestX-ray14 papers report, and its mean over findings.

scikit-learn's `roc_auc_score` does the arithmetic (ties included), so our numbers are comparable
with every paper that used it. A finding whose split has no positive (or no negative) image has no
ROC curve: it is reported as NaN, never as 0.5, and left out of the mean, so a small validation
split cannot make a model look better or worse than it is. A label below 0 is unknown (an uncertain label
under the `ignore` policy): that image is left out of that finding's AUROC only.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr.labels import FINDINGS

SCORE = "val_auroc_mean"  # validation mean AUROC: picks the best epoch; every history row has it


def auroc_per_finding(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """AUROC of each column of `y_score` [N, K] against binary `y_true` [N, K] (< 0: unknown, left out); NaN where
    undefined."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} must both be [N, findings]")
    if not np.all(np.isfinite(y_score)):
        raise ValueError("scores contain NaN or inf: the model diverged or predictions were not gathered")
    out = np.full(y_true.shape[1], np.nan)
    for k in range(y_true.shape[1]):
        known = y_true[:, k] >= 0
        positives = int(np.count_nonzero(y_true[known, k]))
        if 0 < positives < int(known.sum()):
            out[k] = roc_auc_score(y_true[known, k] > 0, y_score[known, k])
    return out


def mean_auroc(aurocs: np.ndarray) -> float:
    """Mean over the defined findings; NaN if none is defined."""
    defined = np.asarray(aurocs, dtype=np.float64)
    defined = defined[np.isfinite(defined)]
    return float(defined.mean()) if defined.size else math.nan


def by_finding(aurocs: np.ndarray, names: tuple[str, ...] = FINDINGS) -> dict[str, float | None]:
    """Finding name -> AUROC, None for undefined: the JSON-safe form for summaries and reports."""
    if len(aurocs) != len(names):
        raise ValueError(f"{len(aurocs)} AUROCs for {len(names)} findings")
    return {name: (float(a) if np.isfinite(a) else None) for name, a in zip(names, aurocs, strict=True)}


def auroc_summary(y_true: np.ndarray, y_score: np.ndarray,
                  names: tuple[str, ...] = FINDINGS) -> dict[str, float | None]:
    """Per-finding AUROC (None where undefined) and their mean under "mean": what a run reports per split."""
    aurocs = auroc_per_finding(y_true, y_score)
    out = by_finding(aurocs, names)
    mean = mean_auroc(aurocs)
    out["mean"] = None if math.isnan(mean) else mean
    return out


def auroc_metrics(y_true: np.ndarray, y_score: np.ndarray, prefix: str,
                  names: tuple[str, ...] = FINDINGS) -> dict[str, float]:
    """`{prefix}_auroc_mean` and `{prefix}_auroc/{finding}` (NaN where undefined): a split's keys in an epoch's
    metrics (MLflow gets them as `cxr.tracking.runs.epoch_name` says: epoch/val_auroc/mean, epoch/val_auroc/…)."""
    aurocs = auroc_per_finding(y_true, y_score)
    metrics = {f"{prefix}_auroc_mean": mean_auroc(aurocs)}
    metrics.update({f"{prefix}_auroc/{metric_name(name)}": float(a) for name, a in zip(names, aurocs, strict=True)})
    return metrics


def metric_name(finding: str) -> str:
    """A finding as an MLflow metric key part: MLflow allows letters, digits, `_ - . / :` and spaces only
    (PadChest's "COPD signs" is fine; "pleural effusion (left)" is not)."""
    return "".join(c if c.isalnum() or c in "_-. :" else "_" for c in finding)
