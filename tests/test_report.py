"""The plots logged to MLflow draw the numbers the run produced."""

from __future__ import annotations

import numpy as np

from cxr.evaluation import figures


def test_learning_curves_draw_losses_and_validation_mean_auroc():
    # history rows as the training loop writes them (train_loss, val_loss, val_auroc_mean, ...)
    history = [{"epoch": 1.0, "train_loss": 0.6, "val_loss": 0.5, "val_auroc_mean": 0.71},
               {"epoch": 2.0, "train_loss": 0.4, "val_loss": 0.45, "val_auroc_mean": 0.83}]
    fig = figures.learning_curves(history)
    loss, auroc = fig.axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in loss.get_lines()}
    assert drawn == {"train_loss": [0.6, 0.4], "val_loss": [0.5, 0.45]}
    (curve,) = auroc.get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), [1.0, 2.0])
    np.testing.assert_array_equal(curve.get_ydata(), [0.71, 0.83])
