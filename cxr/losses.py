"""The training objective: binary cross-entropy over the data's findings, optionally Wang-weighted, masked.

Positives are rare (Hernia is ~0.2% of NIH images), so unweighted BCE lets a model score well by
predicting "absent" everywhere. Wang et al. weight each finding's positive terms by
beta_P = (|P| + |N|) / |P| and its negative terms by beta_N = (|P| + |N|) / |N|, with |P| and |N|
counted on the training split. The loss is computed in float32 whatever the mixed-precision policy.

A label below 0 is not known (an uncertain label under the `ignore` policy, `data.uncertain`): its terms
are masked out, so the model is never pushed either way by it. The loss returns one value per example, the
sum of its labelled findings' terms over K (so with no masked label it is the plain mean over findings, as
before), which the distributed train step scales by the GLOBAL batch size (`tf.nn.compute_average_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

EPSILON = 1e-7

LossFn = Callable[[object, object], object]


def wang_weights(positives: Sequence[int] | np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(beta_P, beta_N) per finding from training-split positive counts and the split size.

    A finding with no positives (or no negatives) never produces that kind of term, so its weight
    is irrelevant; it is set to 1 rather than infinity.
    """
    pos = np.asarray(positives, dtype=np.float64)
    if total <= 0 or np.any(pos < 0) or np.any(pos > total):
        raise ValueError(f"positive counts {pos.tolist()} do not fit a split of {total} images")
    neg = total - pos
    beta_p = np.where(pos > 0, total / np.maximum(pos, 1), 1.0)
    beta_n = np.where(neg > 0, total / np.maximum(neg, 1), 1.0)
    return beta_p.astype(np.float32), beta_n.astype(np.float32)


def binary_crossentropy(
    beta_pos: np.ndarray | None = None, beta_neg: np.ndarray | None = None
) -> LossFn:
    """Per-example loss `fn(labels [B, K], probabilities [B, K]) -> [B]`, weighted if betas are given."""
    if (beta_pos is None) != (beta_neg is None):
        raise ValueError("give both beta_pos and beta_neg, or neither")

    def per_example(y_true, y_prob):
        y_true = ops.cast(y_true, "float32")
        known = ops.cast(y_true >= 0.0, "float32")  # -1: uncertain under the ignore policy, masked
        y_true = y_true * known
        y_prob = ops.clip(ops.cast(y_prob, "float32"), EPSILON, 1.0 - EPSILON)
        pos_term = -y_true * ops.log(y_prob)
        neg_term = -(known - y_true) * ops.log(1.0 - y_prob)
        if beta_pos is not None:
            pos_term = pos_term * ops.convert_to_tensor(beta_pos, "float32")
            neg_term = neg_term * ops.convert_to_tensor(beta_neg, "float32")
        return ops.mean(pos_term + neg_term, axis=-1)

    return per_example


def loss_from_counts(weighted: bool, positives: Sequence[int] | None, total: int | None) -> LossFn:
    """The training loss a config asks for; weighted needs the training split's label counts."""
    if not weighted:
        return binary_crossentropy()
    if positives is None or total is None:
        raise ValueError("weighted_loss needs the training split's positive counts and size")
    return binary_crossentropy(*wang_weights(positives, total))


def mean_loss(loss_fn: LossFn, y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean of `loss_fn` over a whole split held in memory (validation after the gather)."""
    per_example = loss_fn(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_prob))
    return float(keras.ops.convert_to_numpy(ops.mean(per_example)))
