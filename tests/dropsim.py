"""Two models scored on a synthetic NIH official test split, with a chosen true AUROC per finding: the drop rule's
simulation (tests/test_drop_rule.py, bench/drop_rule.py).

Split: 25,596 images of 2,797 patients, follow-ups per patient heavy-tailed as in NIH (most patients 1-3 images,
a few over 50), 14 findings at the official test list's positive counts, labels persisting within a patient.
Scores are binormal: a model's score is `mu * label + noise`, noise N(0, 1), so its population AUROC is
Phi(mu / sqrt(2)) whatever the clustering. The noise is half patient-level (a patient's images err together)
and correlated `rho` between the two models (both learnt from the same data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import norm

from cxr.labels import FINDINGS

TEST_IMAGES, TEST_PATIENTS = 25_596, 2_797
TEST_POSITIVES = dict(zip(FINDINGS, (3279, 1069, 4658, 6112, 1748, 1623, 555, 2665, 1815, 925, 1093, 435, 1143, 86),
                          strict=True))
# Per-finding AUROC of a good DenseNet-121 on the official split (rounded, the level CheXNet-type models report).
AUROC = dict(zip(FINDINGS, (0.81, 0.91, 0.88, 0.71, 0.85, 0.78, 0.76, 0.89, 0.79, 0.88, 0.93, 0.80, 0.80, 0.92),
                 strict=True))


def split(rng: np.random.Generator, images: int = TEST_IMAGES, patients: int = TEST_PATIENTS,
          positives: Sequence[int] = tuple(TEST_POSITIVES.values())) -> tuple[np.ndarray, np.ndarray]:
    """(labels [images, K] bool, patient id per image): exact positive counts, images grouped in patients."""
    share = rng.lognormal(0.0, 1.2, patients)  # a few patients with dozens of follow-ups, most with few
    per_patient = 1 + rng.multinomial(images - patients, share / share.sum())
    pid = np.repeat(np.arange(patients), per_patient)
    latent = rng.normal(size=(patients, len(positives)))[pid] + rng.normal(size=(images, len(positives)))
    y = np.zeros(latent.shape, dtype=bool)
    for k, n in enumerate(positives):
        y[np.argpartition(-latent[:, k], n - 1)[:n], k] = True
    return y, pid


def mu(auroc: np.ndarray) -> np.ndarray:
    """Binormal separation giving `auroc` with unit-variance noise in both classes."""
    return np.sqrt(2.0) * norm.ppf(auroc)


def scores(rng: np.random.Generator, y: np.ndarray, pid: np.ndarray, auroc_a: np.ndarray, auroc_b: np.ndarray,
           rho: float = 0.8, patient_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the champion (a) and the candidate (b) with true AUROCs `auroc_a`, `auroc_b` [K]."""
    n_patients = int(pid.max()) + 1

    def noise() -> np.ndarray:
        per_patient = rng.normal(size=(n_patients, y.shape[1]))[pid]
        return np.sqrt(patient_share) * per_patient + np.sqrt(1 - patient_share) * rng.normal(size=y.shape)

    shared = noise()
    a = mu(np.asarray(auroc_a)) * y + np.sqrt(rho) * shared + np.sqrt(1 - rho) * noise()
    b = mu(np.asarray(auroc_b)) * y + np.sqrt(rho) * shared + np.sqrt(1 - rho) * noise()
    return a.astype(np.float32), b.astype(np.float32)


def replicate(seed: int, drops: Mapping[str, float] | None = None, rho: float = 0.8
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One simulated test split and two models: (labels, scores a, scores b, patients); b's true AUROC is a's
    minus `drops[finding]` (0 elsewhere)."""
    rng = np.random.default_rng(seed)
    y, pid = split(rng)
    auroc_a = np.array([AUROC[f] for f in FINDINGS])
    auroc_b = auroc_a - np.array([(drops or {}).get(f, 0.0) for f in FINDINGS])
    a, b = scores(rng, y, pid, auroc_a, auroc_b, rho)
    return y, a, b, pid


def old_rule(point_change: np.ndarray, max_drop: float) -> np.ndarray:
    """The rule before issue 19: a finding blocks when its point change is below -max_drop."""
    return np.nan_to_num(point_change, nan=0.0) < -max_drop
