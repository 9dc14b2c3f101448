"""Figures for the test report: precision-recall, reliability and ROC-with-CI grids, one panel per finding.

Built on `matplotlib.figure.Figure` rather than pyplot, so no GUI backend or global figure registry is
involved (a long evaluation cannot leak open figures); `fig.savefig(path)` renders with Agg. Panels: a
4-wide grid, 11-point titles and 10-point labels at 100 dpi (readable at the PNG's own size), an undefined
finding says why. The evaluation's ROC marks the operating points chosen on validation (where on the test curve
its thresholds land); the reliability diagram writes each bin's image count (a bin of few images swings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve, roc_curve

from cxr.evaluation.bootstrap import AurocCI, finding_names
from cxr.evaluation.operating import auprc, calibration

COLUMNS = 4
TITLE, LABEL, TICK = 11, 10, 9  # font sizes (points)
POINTS = (("at_youden", "youden", "o", "tab:red"),  # (report key, threshold key, marker, colour)
          ("at_sensitivity", "at_sensitivity", "s", "tab:purple"))


def _grid(k: int, title: str) -> tuple[Figure, list[Axes]]:
    """A figure with one square-ish panel per finding, spare panels switched off."""
    rows = max(1, math.ceil(k / COLUMNS))
    fig = Figure(figsize=(16, 16 * rows / COLUMNS + 0.4), layout="constrained")  # makes room for suptitle
    axes = list(fig.subplots(rows, COLUMNS, squeeze=False).flat)
    for ax in axes[k:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=TITLE + 2)
    return fig, axes[:k]


def _frame(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel, fontsize=LABEL)
    ax.set_ylabel(ylabel, fontsize=LABEL)
    ax.tick_params(labelsize=TICK)


def _arrays(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must both be [N, findings]")
    return y, s


def _known(y: np.ndarray, s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column k's binary labels and scores without its unknown (< 0, uncertain) labels."""
    m = y[:, k] >= 0
    return y[m, k] > 0, s[m, k]


def pr_grid(y_true: ArrayLike, y_score: ArrayLike, title: str, names: Sequence[str] | None = None) -> Figure:
    """Precision-recall curve per finding with its AP; the dashed line is prevalence, a random model's precision."""
    y, s = _arrays(y_true, y_score)
    fig, axes = _grid(y.shape[1], title)
    for k, (ax, name) in enumerate(zip(axes, finding_names(y.shape[1], names), strict=True)):
        yk, sk = _known(y, s, k)
        ap = auprc(yk, sk)
        if ap is None:
            ax.set_title(f"{name}\nundefined: no positive image", fontsize=TITLE)
        else:
            precision, recall, _ = precision_recall_curve(yk, sk)
            prevalence = float(yk.mean())
            ax.step(recall, precision, where="post", lw=1.5)
            ax.axhline(prevalence, color="0.6", lw=1, ls="--")
            ax.set_title(f"{name}\nAP {ap:.3f}  (prevalence {prevalence:.3f})", fontsize=TITLE)
        _frame(ax, "recall", "precision")
    return fig


def reliability_grid(
    y_true: ArrayLike, y_prob: ArrayLike, title: str, bins: int = 10, names: Sequence[str] | None = None
) -> Figure:
    """Reliability diagram per finding: observed frequency per probability bin against the diagonal, with ECE."""
    y, p = _arrays(y_true, y_prob)
    fig, axes = _grid(y.shape[1], f"{title}   (number over a bar: its images)")
    for k, (ax, name) in enumerate(zip(axes, finding_names(y.shape[1], names), strict=True)):
        yk, pk = _known(y, p, k)
        cal = calibration(yk, pk, bins)
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        full = [b for b in cal.bins if b.count]
        if cal.ece is None:
            ax.set_title(f"{name}\nundefined: no image", fontsize=TITLE)
        else:
            ax.bar([b.lower for b in full], [b.observed for b in full], width=[b.upper - b.lower for b in full],
                   align="edge", color="tab:blue", alpha=0.35, edgecolor="tab:blue")
            ax.plot([b.confidence for b in full], [b.observed for b in full], marker="o", ms=3, lw=1, color="tab:blue")
            for b in full:  # the count behind each bar: a bin of a handful of images says little
                ax.text((b.lower + b.upper) / 2, min(b.observed, 0.9) + 0.02, f"{b.count}", ha="center",
                        va="bottom", fontsize=TICK - 1, color="0.25", gid="bin-count")
            note = "" if yk.any() else ", no positive image"
            ax.set_title(f"{name}\nECE {cal.ece:.3f}  (n={len(yk)}{note})", fontsize=TITLE)
        _frame(ax, "mean predicted probability", "fraction positive")
    return fig


def roc_grid_ci(y_true: ArrayLike, y_score: ArrayLike, ci: AurocCI, title: str,
                operating: Mapping[str, Mapping[str, Any]] | None = None) -> Figure:
    """ROC curve per finding with its AUROC and bootstrap CI (from `auroc_ci` on the same predictions), and the
    operating points of `operating` (report.json's "findings": thresholds chosen on validation, applied here)."""
    y, s = _arrays(y_true, y_score)
    if len(ci.findings) != y.shape[1]:
        raise ValueError(f"CI for {len(ci.findings)} findings, predictions for {y.shape[1]}")
    fig, axes = _grid(y.shape[1], title)
    level = f"{100 * ci.confidence:g}%"
    for k, (ax, f) in enumerate(zip(axes, ci.findings, strict=True)):
        name = f.finding
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        if f.auroc is None:
            ax.set_title(f"{name}\nundefined: {f.reason}", fontsize=TITLE)
        else:
            fpr, tpr, _ = roc_curve(*_known(y, s, k))
            ax.plot(fpr, tpr, lw=1.5)
            band = "" if f.low is None else f"  {level} CI {f.low:.3f}–{f.high:.3f}"
            ax.set_title(f"{name}\nAUROC {f.auroc:.3f}{band}", fontsize=TITLE)
            if _mark_operating(ax, (operating or {}).get(name)):
                ax.legend(loc="lower right", fontsize=TICK - 1, handlelength=1, borderaxespad=0.3)
        _frame(ax, "1 - specificity", "sensitivity")
    if ci.mean is not None and ci.mean_low is not None:
        fig.suptitle(f"{title}   mean AUROC {ci.mean:.3f} ({level} CI {ci.mean_low:.3f}–{ci.mean_high:.3f}, "
                     f"patient bootstrap, {ci.resamples} resamples)", fontsize=TITLE + 2)
    return fig


def _mark_operating(ax: Axes, finding: Mapping[str, Any] | None) -> list[str]:
    """Each validation-chosen threshold's point on this test ROC, labelled; the labels drawn."""
    drawn: list[str] = []
    for key, th_key, marker, colour in POINTS:
        point = (finding or {}).get(key)
        if not point or point.get("sensitivity") is None or point.get("specificity") is None:
            continue
        what = "Youden on val" if th_key == "youden" else \
            f"sens. ≥ {finding['thresholds']['sensitivity_target']:g} on val"
        label = f"{what}: t = {point['threshold']:.3g}"
        ax.plot([1 - point["specificity"]], [point["sensitivity"]], marker=marker, ms=7, ls="none", color=colour,
                markeredgecolor="black", label=label, zorder=3, gid="operating-point")
        drawn.append(label)
    return drawn


def roc_grid(y_true: ArrayLike, y_score: ArrayLike, title: str, names: Sequence[str] | None = None) -> Figure:
    """One ROC curve per finding with its AUROC (a finding without both classes says so)."""
    from sklearn.metrics import roc_auc_score

    y, s = _arrays(y_true, y_score)
    fig, axes = _grid(y.shape[1], title)
    for k, (ax, name) in enumerate(zip(axes, finding_names(y.shape[1], names), strict=True)):
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        yk, sk = _known(y, s, k)
        if 0 < yk.sum() < len(yk):
            fpr, tpr, _ = roc_curve(yk, sk)
            ax.plot(fpr, tpr, lw=1.5)
            ax.set_title(f"{name}  AUROC {roc_auc_score(yk, sk):.3f}", fontsize=TITLE)
        else:
            ax.set_title(f"{name}  undefined: one class only", fontsize=TITLE)
        _frame(ax, "1 - specificity", "sensitivity")
    return fig


def learning_curves(history: Sequence[dict[str, float]]) -> Figure:
    """Train/val loss, val mean AUROC and each finding's val AUROC per epoch (the numbers behind early stopping
    and the LR plateau, and which findings drive them)."""
    from cxr.evaluation.metrics import SCORE

    epochs = [h["epoch"] for h in history]
    findings = sorted({k for h in history for k in h if k.startswith("val_auroc/")})
    fig = Figure(figsize=(17, 5), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    for key in ("train_loss", "val_loss"):
        a.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    a.set_title("loss", fontsize=TITLE)
    a.legend(fontsize=TICK)
    b.plot(epochs, [h.get(SCORE, np.nan) for h in history], marker="o", color="tab:green")
    b.set_title("validation mean AUROC", fontsize=TITLE)
    colours = [*colormaps["tab20"].colors]
    for i, key in enumerate(findings):
        c.plot(epochs, [h.get(key, np.nan) for h in history], marker=".", lw=1.2, color=colours[i % len(colours)],
               label=key.split("/", 1)[1])
    c.set_title("validation AUROC per finding", fontsize=TITLE)
    if findings:
        c.legend(fontsize=TICK - 2, ncol=2, loc="lower right")
    for ax in (a, b, c):
        ax.set_xlabel("epoch", fontsize=LABEL)
        ax.tick_params(labelsize=TICK)
    return fig


def subgroup_grid(rep: dict, title: str) -> Figure:
    """AUROC per subgroup cell with its CI, one panel per finding (report.json's "subgroups"): cells grouped by
    attribute, the dashed line the overall AUROC; a cell too small to score a finding is a grey x at the bottom,
    a cell without images is left out."""
    sub, overall = rep["subgroups"], rep["auroc"]["findings"]
    names = list(overall)
    fig, axes = _grid(len(names), f"{title}   (x: too few positive or negative images to score)")
    colours = dict(zip(sub["attributes"], ("tab:blue", "tab:orange", "tab:green", "tab:purple"), strict=False))
    held = {a: [cell for cell, c in cells.items() if c["images"]] for a, cells in sub["attributes"].items()}
    ticks = [(attribute, cell) for attribute, cells in held.items() for cell in cells]
    xs = np.arange(len(ticks)) + np.repeat(np.arange(len(held)), [len(c) for c in held.values()])  # attribute gaps
    for ax, name in zip(axes, names, strict=True):
        whole = overall[name]
        lowest = [whole["auroc"]] if whole["auroc"] is not None else []
        if whole["auroc"] is not None:
            ax.axhline(whole["auroc"], color="0.5", lw=1, ls="--")
        for x, (attribute, cell) in zip(xs, ticks, strict=True):
            f = sub["attributes"][attribute][cell]["findings"][name]
            if f["auroc"] is not None:
                err = None if f["low"] is None else [[f["auroc"] - f["low"]], [f["high"] - f["auroc"]]]
                ax.errorbar([x], [f["auroc"]], yerr=err, fmt="o", ms=3, lw=1, capsize=2,
                            color=colours[attribute], label=attribute)
                lowest.append(f["auroc"] if f["low"] is None else f["low"])
            else:  # at the foot of the panel whatever its scale
                ax.plot([x], [0.03], marker="x", ms=4, color="0.6", ls="none", transform=ax.get_xaxis_transform())
        ax.set_xticks(xs, [cell for _, cell in ticks], rotation=90, fontsize=6)
        ax.set_xlim(xs[0] - 0.7, xs[-1] + 0.7)
        ax.set_ylim(max(0.0, math.floor(20 * min(lowest, default=0.0)) / 20 - 0.05), 1.01)  # zoomed on the points
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("AUROC", fontsize=7)
        head = "undefined" if whole["auroc"] is None else f"overall {whole['auroc']:.3f} (dashed)"
        ax.set_title(f"{name}\n{head}", fontsize=9)
    if axes:
        handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
        if handles:
            axes[0].legend(list(handles.values()), list(handles), fontsize=6, loc="lower left")
    return fig
