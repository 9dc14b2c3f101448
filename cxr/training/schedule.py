"""The learning-rate schedule (CheXNet's plateau ÷10, or a cosine decay), early stopping and the best epoch.

"plateau" divides the learning rate by `factor` when validation mean AUROC has not improved for `patience`
epochs. "cosine" trains epoch e of `epochs` at min_lr + (lr - min_lr)(1 + cos(π(e - 1)/epochs))/2 whatever the
scores: short runs keep learning where a plateau would cut the rate on one noisy epoch. Either way training
stops after `stop_patience` epochs without improvement, and the best epoch is the one with the highest
validation mean AUROC. Its state is plain data so a checkpoint can carry it and a resumed run makes exactly
the decisions the original would have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("plateau", "cosine")
SETTINGS = ("kind", "epochs", "peak_lr", "patience", "factor", "min_lr", "stop_patience")


@dataclass
class Schedule:
    """Plateau or cosine lr + early stopping + best epoch, driven by one score per epoch (higher is better).

    `lr` is the rate the next epoch trains at; `peak_lr` (default: the first `lr`) is where a cosine starts.
    """

    lr: float
    kind: str = "plateau"
    epochs: int | None = None  # cosine: the epochs the rate decays over
    peak_lr: float | None = None
    patience: int = 1
    factor: float = 0.1
    min_lr: float = 0.0
    stop_patience: int | None = None
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    epochs_since_lr_change: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr schedule must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.peak_lr is None:
            self.peak_lr = self.lr
        if self.kind == "cosine" and (self.epochs is None or self.epochs < 1):
            raise ValueError(f"a cosine schedule needs the number of epochs it decays over (>= 1), got {self.epochs}")

    def lr_at(self, epoch: int) -> float:
        """The rate epoch `epoch` (1-based) trains at under the cosine; min_lr after the last epoch."""
        assert self.epochs is not None and self.peak_lr is not None
        progress = min(max(epoch - 1, 0) / self.epochs, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch`'s score; set the next epoch's lr and the stop flag. True if this epoch is the best.

        An undefined score (NaN: no finding had both classes) never counts as an improvement.
        """
        if self.kind == "cosine":
            self.lr = self.lr_at(epoch + 1)
        improved = math.isfinite(score) and score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, epoch
            self.epochs_since_best = self.epochs_since_lr_change = 0
            return True
        self.epochs_since_best += 1
        self.epochs_since_lr_change += 1
        if self.kind == "plateau" and self.epochs_since_lr_change >= self.patience and self.lr > self.min_lr:
            self.lr = max(self.lr * self.factor, self.min_lr)
            self.epochs_since_lr_change = 0
        if self.stop_patience is not None and self.epochs_since_best >= self.stop_patience:
            self.stopped = True
        return False

    def state(self) -> dict[str, Any]:
        """What changes during training; the settings (kind, patience, factor, ...) come from the config."""
        return {k: v for k, v in asdict(self).items() if k not in SETTINGS}

    def restored(self, state: dict[str, Any]) -> Schedule:
        """This schedule's settings with the progress saved by `state()` (a resumed run)."""
        return Schedule(**{**asdict(self), **state})
