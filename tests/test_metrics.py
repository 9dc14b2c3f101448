"""Per-finding AUROC equals scikit-learn's; undefined findings are NaN/None and never averaged in."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.evaluation import metrics
from cxr.labels import FINDINGS, NUM_FINDINGS


def sample(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, NUM_FINDINGS)) < 0.2).astype(np.float32)
    score = np.clip(0.3 * y + rng.random((n, NUM_FINDINGS)), 0, 1)
    return y, np.round(score, 1).astype(np.float32)  # one decimal: many tied scores


def test_hand_computed_aurocs_with_a_tie():
    """3 negatives, 2 positives: of the 6 (positive, negative) pairs 5 are ordered right and 1 is tied → 5.5/6."""
    y = np.zeros((5, NUM_FINDINGS), np.float32)
    y[[1, 4]] = 1.0
    score = np.tile(np.array([[0.1], [0.4], [0.4], [0.3], [0.8]], np.float32), (1, NUM_FINDINGS))
    score[:, 1] = [0.9, 0.1, 0.8, 0.7, 0.2]  # finding 1: every positive below every negative → 0
    got = metrics.auroc_per_finding(y, score)
    assert got[0] == pytest.approx(5.5 / 6) and got[1] == 0.0
    assert metrics.mean_auroc(got) == pytest.approx((13 * 5.5 / 6) / 14)


def test_finding_without_positives_or_negatives_is_undefined_and_left_out():
    y, score = sample()
    y[:, 3] = 0  # no positives
    y[:, 13] = 1  # no negatives
    got = metrics.auroc_per_finding(y, score)
    assert math.isnan(got[3]) and math.isnan(got[13])
    defined = [roc_auc_score(y[:, k], score[:, k]) for k in range(NUM_FINDINGS) if k not in (3, 13)]
    assert metrics.mean_auroc(got) == pytest.approx(np.mean(defined), abs=1e-6)
    table = metrics.by_finding(got)
    assert list(table) == list(FINDINGS)
    assert table[FINDINGS[3]] is None and table[FINDINGS[13]] is None
    assert table[FINDINGS[0]] == pytest.approx(got[0])


def test_all_undefined_mean_is_nan_not_half():
    y = np.zeros((5, NUM_FINDINGS), np.float32)
    got = metrics.auroc_per_finding(y, np.full_like(y, 0.5))
    assert np.all(np.isnan(got))
    assert math.isnan(metrics.mean_auroc(got))


def test_perfect_and_inverted_rankings():
    y = np.tile(np.array([[0.0], [1.0], [0.0], [1.0]], np.float32), (1, NUM_FINDINGS))
    assert np.all(metrics.auroc_per_finding(y, y) == 1.0)
    assert np.all(metrics.auroc_per_finding(y, 1 - y) == 0.0)


def test_rejects_bad_shapes_and_non_finite_scores():
    y, score = sample(10)
    with pytest.raises(ValueError, match="must both be"):
        metrics.auroc_per_finding(y, score[:, :5])
    score[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc_per_finding(y, score)
    with pytest.raises(ValueError, match="findings"):
        metrics.by_finding(np.zeros(3))
