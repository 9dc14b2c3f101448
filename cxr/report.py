"""What a person looks at after a run: the per-finding AUROC table, ROC curves and learning curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cxr import labels
from cxr.metrics import SCORE


def auroc_table(columns: Mapping[str, Mapping[str, float | None]]) -> str:
    """A fixed-width table, one row per finding and one column per split (e.g. val, test), plus the mean."""
    names = list(columns)
    lines = [f"{'finding':<20}" + "".join(f"{n:>10}" for n in names)]
    for finding in [*labels.FINDINGS, "mean"]:
        cells = []
        for n in names:
            v = columns[n].get(finding)
            cells.append(f"{'undef':>10}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>10.4f}")
        lines.append(f"{finding:<20}" + "".join(cells))
    return "\n".join(lines)


def roc_grid(y_true: np.ndarray, y_score: np.ndarray, title: str):
    """One ROC curve per finding with its AUROC, in a 4×4 grid (findings without both classes say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = plt.subplots(4, 4, figsize=(13, 13))
    for j, ax in enumerate(axes.flat):
        if j >= labels.NUM_FINDINGS:
            ax.axis("off")
            continue
        t = y_true[:, j]
        ax.plot([0, 1], [0, 1], color="0.8", lw=1)
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = roc_curve(t, y_score[:, j])
            ax.plot(fpr, tpr, lw=1.5)
            ax.set_title(f"{labels.FINDINGS[j]}  AUROC {roc_auc_score(t, y_score[:, j]):.3f}", fontsize=9)
        else:
            ax.set_title(f"{labels.FINDINGS[j]}  undefined", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(history: Sequence[Mapping[str, float]]):
    """Train/val loss and val mean AUROC per epoch (the numbers behind early stopping and the LR plateau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        a.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    a.set_xlabel("epoch")
    a.set_title("loss")
    a.legend()
    b.plot(epochs, [h.get(SCORE, np.nan) for h in history], marker="o", color="tab:green")
    b.set_xlabel("epoch")
    b.set_title("validation mean AUROC")
    fig.tight_layout()
    return fig
