"""The learning-rate schedule, CheXNet's: ÷10 when validation mean AUROC plateaus, early stopping, best epoch.

The learning rate is divided by `factor` when validation mean AUROC has not improved for `patience` epochs,
training stops after `stop_patience` epochs without improvement, and the best epoch is the one with the
highest validation mean AUROC. Its state is plain data so a checkpoint can carry it and a resumed run makes
exactly the decisions the original would have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Schedule:
    """Reduce-on-plateau + early stopping + best epoch, driven by one score per epoch (higher is better)."""

    lr: float
    patience: int = 1
    factor: float = 0.1
    min_lr: float = 0.0
    stop_patience: int | None = None
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    epochs_since_lr_change: int = 0
    stopped: bool = False

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch`'s score; adjust lr / stop flag. True if this epoch is the new best.

        An undefined score (NaN: no finding had both classes) never counts as an improvement.
        """
        improved = math.isfinite(score) and score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, epoch
            self.epochs_since_best = self.epochs_since_lr_change = 0
            return True
        self.epochs_since_best += 1
        self.epochs_since_lr_change += 1
        if self.epochs_since_lr_change >= self.patience and self.lr > self.min_lr:
            self.lr = max(self.lr * self.factor, self.min_lr)
            self.epochs_since_lr_change = 0
        if self.stop_patience is not None and self.epochs_since_best >= self.stop_patience:
            self.stopped = True
        return False

    def state(self) -> dict[str, Any]:
        """What changes during training; the settings (patience, factor, ...) come from the config."""
        settings = ("patience", "factor", "min_lr", "stop_patience")
        return {k: v for k, v in asdict(self).items() if k not in settings}

    def restored(self, state: dict[str, Any]) -> Schedule:
        """This schedule's settings with the progress saved by `state()` (a resumed run)."""
        return Schedule(**{**asdict(self), **state})
