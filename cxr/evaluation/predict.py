"""Predicting a split: the one routine behind validation (gathered across workers) and test scoring.

Workers may hold different numbers of batches, so no collective runs per batch: each process predicts its
part of the split into a zero [N + 1, K_out + K_labels + 1] array at the images' positions (probabilities, labels, a
count), and one reduction (an all-reduce SUM across workers, or nothing in one process) gives every process
all N rows. Every position must have been seen exactly once; row N collects positions outside 0..N-1, so a
bad index is reported by every worker after the one reduction instead of hanging the others. Raw mode may
skip unreadable images: then unseen rows are allowed, reported and left out of the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr.labels import NUM_FINDINGS

Reduce = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Predictions:
    """A split's probabilities and labels by position; `seen` marks the rows that were predicted."""

    probs: np.ndarray  # [N, model outputs] float32, NaN where unseen
    labels: np.ndarray  # [N, data findings] float32 (< 0: unknown, an uncertain label under `ignore`)
    seen: np.ndarray  # [N] bool

    @property
    def missing(self) -> int:
        return int((~self.seen).sum())

    def present(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) of the rows that were predicted: what metrics are computed on."""
        return self.probs[self.seen], self.labels[self.seen]


def predict_split(predict: Callable[[Any], Any], batches: Iterable[tuple[Any, Any, Any]], n: int,
                  reduce: Reduce | None = None, allow_missing: bool = False, outputs: int = NUM_FINDINGS,
                  label_count: int | None = None) -> Predictions:
    """Run `predict` over (images, labels, index) batches of an N-image split and gather every row.

    `outputs` is the model's, `label_count` the data's (default: the same); they differ when a model is
    scored on another dataset's label set (external validation maps the shared findings afterwards)."""
    k, kl = outputs, label_count if label_count is not None else outputs
    rows = np.zeros((n + 1, k + kl + 1), np.float32)
    for images, labels, index in batches:
        idx = np.asarray(index).astype(np.int64)
        idx = np.where((idx >= 0) & (idx < n), idx, n)
        block = np.concatenate([np.asarray(predict(images), np.float32), np.asarray(labels, np.float32),
                                np.ones((len(idx), 1), np.float32)], axis=1)
        np.add.at(rows, idx, block)
    if reduce is not None:
        rows = reduce(rows)
    counts = rows[:n, -1]
    stray, missing, repeated = int(rows[n, -1]), np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if stray or repeated.size or (missing.size and not allow_missing):
        raise RuntimeError(
            f"prediction must see each of {n} images exactly once: {missing.size} missing "
            f"(e.g. {missing[:5].tolist()}), {repeated.size} seen twice or more (e.g. {repeated[:5].tolist()}), "
            f"{stray} with an index outside 0..{n - 1}")
    seen = counts == 1
    probs = rows[:n, :k].copy()
    probs[~seen] = np.nan
    return Predictions(probs, rows[:n, k:k + kl].copy(), seen)


def predict_model(model: Any, data: Any, split: str, batch_size: int, source: Any = None) -> Predictions:
    """A Keras model's predictions on a whole split of a config's data (`cxr.config.Data`), in one process."""
    from cxr.data import source as sources

    source = source or sources.for_config(data)
    n = int(source.split_size(data, split))
    batches = source.make_dataset(data, split, batch_size, training=False)
    return predict_split(model.predict_on_batch, batches, n, allow_missing=source.may_skip,
                         outputs=int(model.output_shape[-1]), label_count=int(batches.element_spec[1].shape[-1]))
