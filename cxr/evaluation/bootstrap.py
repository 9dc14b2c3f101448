"""Patient-level bootstrap confidence intervals for per-finding AUROC, and paired model comparisons.

Images of one patient are correlated (follow-ups of the same chest), so an interval that resamples images
pretends to know more than the split holds: we resample **patients** with replacement and let every image
of a drawn patient count once per draw. Intervals are percentile intervals of the resampled statistic.

Memory layout: a resample is stored as how many times each *patient* was drawn (`counts`, [R, patients],
the smallest unsigned dtype that can hold the number of patients), never as [R, images] weights. AUROC for
all resamples at once is a sparse product: per finding, a fixed matrix maps patients to "positive weight at
each distinct positive score" and "negative weight below / tied with it"; multiplied by a chunk of counts,
cumulative sums in score order give the Mann-Whitney numerator with ties counting one half, exactly the
area `sklearn.metrics.roc_auc_score(..., sample_weight=w)` computes. Chunks of resamples keep the dense
intermediates near `CHUNK_BYTES`.

Mean AUROC rule: in each resample the mean is taken over the findings defined *in that resample* (at least
one positive and one negative weight); a finding undefined on the whole split is never defined in a
resample. The point estimate is the mean over findings defined on the whole split (`cxr.metrics.mean_auroc`).

Drop rule (`PairedDifference.failures`, docs/promotion.md): a finding blocks a candidate only when a familywise
one-sided upper bound of its paired change b - a is below 0 (worse, with the comparison's confidence over all
findings scored together) and its point drop exceeds `max_drop`. The bounds are simultaneous max-t bounds: each
finding's change is scaled by its bootstrap standard error and the critical value is the `confidence` quantile
of the per-resample maximum, so it needs no extreme percentile (Bonferroni at 0.05/14 would rest on ~7 of 2,000
resamples) and it uses the findings' correlation instead of assuming the worst.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import sparse

from cxr.evaluation.metrics import auroc_per_finding, mean_auroc
from cxr.labels import FINDINGS

CHUNK_BYTES = 8 * 2**20  # target size of the dense per-chunk intermediates


@dataclass(frozen=True)
class Resamples:
    """Patient bootstrap resamples: `counts[r, p]` draws of patient p in resample r; images follow their patient."""

    counts: np.ndarray  # [n_resamples, n_patients], unsigned ints, each row sums to n_patients
    image_patient: np.ndarray  # [n_images] column of `counts` that each image belongs to
    patient_ids: np.ndarray  # [n_patients] the patient id of each column (sorted)

    @property
    def n_resamples(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.image_patient.shape[0])

    def weights(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Image weights [stop - start, n_images] of resamples start..stop: materialise only a chunk at a time."""
        return self.counts[start:stop][:, self.image_patient]


def patient_resamples(patients: ArrayLike, n: int, seed: int) -> Resamples:
    """`n` resamples drawing as many patients as the split has, with replacement; deterministic for `seed`.

    `patients` gives each image's patient id (any sortable dtype); `np.arange(n_images)` resamples images.
    """
    patients = np.asarray(patients)
    if patients.ndim != 1 or patients.size == 0:
        raise ValueError(f"patients must be a non-empty 1-D array of ids, got shape {patients.shape}")
    if n < 1:
        raise ValueError(f"need at least one resample, got {n}")
    ids, image_patient = np.unique(patients, return_inverse=True)
    p = len(ids)
    rng = np.random.default_rng(seed)
    counts = np.empty((n, p), dtype=np.min_scalar_type(p))
    rows = max(1, (4 * 2**20) // (8 * p))  # draw in chunks: the int64 draws are 8 bytes each
    for r0 in range(0, n, rows):
        k = min(rows, n - r0)
        draws = rng.integers(0, p, size=(k, p)) + (np.arange(k) * p)[:, None]
        counts[r0 : r0 + k] = np.bincount(draws.ravel(), minlength=k * p).reshape(k, p)
    return Resamples(counts=counts, image_patient=image_patient.astype(np.intp), patient_ids=ids)


@dataclass(frozen=True)
class _Operator:
    """One finding's sparse map from per-column weights to the sums the AUROC needs (rows below)."""

    matrix: sparse.csr_matrix  # [3m + 1, n_cols]: positive weight per distinct positive score (m rows), negative
    m: int  # weight just above the previous distinct positive score (m rows), tied with it (m), all negatives (1)


def _operator(positive: np.ndarray, score: np.ndarray, member: np.ndarray, n_cols: int) -> _Operator | None:
    """The finding's operator, or None when the split has no positive or no negative image (never defined)."""
    if positive.all() or not positive.any():
        return None
    pos_scores = score[positive]
    distinct = np.unique(pos_scores)
    m = len(distinct)
    neg_scores, neg_cols = score[~positive], member[~positive]
    below = np.searchsorted(distinct, neg_scores, side="left")  # distinct positive scores strictly below
    tied = below < m
    tied[tied] = distinct[below[tied]] == neg_scores[tied]
    first_full = below + tied  # first positive group that beats this negative outright
    beaten = first_full < m
    rows = np.concatenate([
        np.searchsorted(distinct, pos_scores),
        m + first_full[beaten],
        2 * m + below[tied],
        np.full(len(neg_cols), 3 * m),
    ])
    cols = np.concatenate([member[positive], neg_cols[beaten], neg_cols[tied], neg_cols])
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(3 * m + 1, n_cols))
    matrix.sum_duplicates()
    return _Operator(matrix=matrix, m=m)


def _apply(op: _Operator, x: np.ndarray) -> np.ndarray:
    """AUROC for each column of the per-column weights `x` [n_cols, r]; NaN where a class has zero weight."""
    m = op.m
    y = op.matrix @ x  # [3m + 1, r]
    pos, full, tie = y[:m], y[m : 2 * m], y[2 * m : 3 * m]
    np.cumsum(full, axis=0, out=full)  # negative weight strictly below each positive group
    tie *= 0.5
    full += tie
    full *= pos
    numerator = full.sum(axis=0)
    denominator = pos.sum(axis=0) * y[3 * m]
    out = np.full(x.shape[1], np.nan)
    ok = denominator > 0
    out[ok] = numerator[ok] / denominator[ok]
    return out


def _replicates(y_true: np.ndarray, scores: np.ndarray, counts: np.ndarray, member: np.ndarray) -> np.ndarray:
    """AUROC [R, K] of every finding under every row of per-column weights `counts` [R, n_cols]; an image whose
    label is < 0 (unknown) is left out of that finding."""
    n_cols = counts.shape[1]
    known = [y_true[:, k] >= 0 for k in range(y_true.shape[1])]
    ops = [_operator(y_true[m, k] > 0, scores[m, k], member[m], n_cols) for k, m in enumerate(known)]
    out = np.full((counts.shape[0], y_true.shape[1]), np.nan)
    tallest = max([n_cols] + [3 * op.m + 1 for op in ops if op is not None])
    rows = max(1, CHUNK_BYTES // (8 * tallest))
    for r0 in range(0, counts.shape[0], rows):
        x = np.ascontiguousarray(counts[r0 : r0 + rows].T, dtype=np.float64)
        for k, op in enumerate(ops):
            if op is not None:
                out[r0 : r0 + x.shape[1], k] = _apply(op, x)
    return out


def weighted_auroc(y_true: ArrayLike, scores: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """AUROC of one finding under each row of `weights` [R, N] (or one row [N]): `roc_auc_score` with weights."""
    y = np.asarray(y_true).reshape(-1, 1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != len(y) or len(s) != len(y):
        raise ValueError(f"labels {len(y)}, scores {len(s)} and weights {w.shape} disagree on the number of images")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and non-negative")
    return _replicates(y, s, w, np.arange(len(y)))[:, 0]


def finding_names(k: int, names: Sequence[str] | None = None) -> tuple[str, ...]:
    """`names`, checked against K; the canonical FINDINGS for 14 columns; "finding i" otherwise."""
    if names is None:
        return FINDINGS if k == len(FINDINGS) else tuple(f"finding {i}" for i in range(k))
    if len(names) != k:
        raise ValueError(f"{len(names)} names for {k} findings")
    return tuple(names)


def _checked(y_true: ArrayLike, scores: Sequence[ArrayLike], patients: ArrayLike) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true)
    out = [np.asarray(s, dtype=np.float64) for s in scores]
    p = np.asarray(patients)
    for s in out:
        if s.shape != y.shape or y.ndim != 2:
            raise ValueError(f"labels {y.shape} and scores {s.shape} must both be [N, findings]")
        if not np.all(np.isfinite(s)):
            raise ValueError("scores contain NaN or inf: the model diverged or predictions were not gathered")
    if p.shape != (len(y),):
        raise ValueError(f"patients {p.shape} must give one id per image ({len(y)})")
    return (np.where(y < 0, -1, y > 0).astype(np.int8), *out, p)


def undefined_reason(y: np.ndarray) -> str | None:
    """Why a finding's labels `y` (1, 0, < 0 unknown) have no ROC curve, or None if they have one."""
    y = np.asarray(y)
    known = y[y >= 0]
    positives = int(np.count_nonzero(known))
    if positives == 0:
        return "no positive image in the split" + (" (the others are uncertain)" if len(known) < len(y) else "")
    if positives == len(known):
        return "no negative image in the split" + (" (the others are uncertain)" if len(known) < len(y) else "")
    return None


def _interval(values: np.ndarray, confidence: float) -> tuple[float | None, float | None, int]:
    """Percentile interval of the finite values (None, None when there are none) and how many there were."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None, None, 0
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(v, [alpha, 1.0 - alpha])
    return float(low), float(high), int(v.size)


def _row_means(reps: np.ndarray) -> np.ndarray:
    """Per resample, the mean over the findings defined in it (NaN when none is), without a RuntimeWarning."""
    defined = np.isfinite(reps)
    n = defined.sum(axis=1)
    total = np.where(defined, reps, 0.0).sum(axis=1)
    return np.divide(total, n, out=np.full(len(reps), np.nan), where=n > 0)


def _opt(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class FindingCI:
    """One finding's AUROC and its percentile interval; all None with a `reason` when undefined."""

    finding: str
    auroc: float | None
    low: float | None
    high: float | None
    n_defined: int  # resamples in which the finding had a positive and a negative
    reason: str | None = None


@dataclass(frozen=True)
class AurocCI:
    """Per-finding AUROC with CIs and the mean over defined findings with its CI (rule in the module docstring)."""

    findings: tuple[FindingCI, ...]
    mean: float | None
    mean_low: float | None
    mean_high: float | None
    mean_n_defined: int  # resamples with at least one defined finding
    resamples: int
    confidence: float
    seed: int
    replicates: np.ndarray = field(repr=False, compare=False)  # [resamples, findings] AUROC, NaN where undefined

    def to_dict(self) -> dict:
        """JSON-safe form (None for undefined), without the replicates."""
        return {
            "findings": {f.finding: {k: v for k, v in vars(f).items() if k != "finding"} for f in self.findings},
            "mean": {"auroc": self.mean, "low": self.mean_low, "high": self.mean_high,
                     "n_defined": self.mean_n_defined},
            "resamples": self.resamples, "confidence": self.confidence, "seed": self.seed, "unit": "patient",
        }


def auroc_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    patients: ArrayLike,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    names: Sequence[str] | None = None,
    draws: Resamples | None = None,
) -> AurocCI:
    """Per-finding AUROC of `scores` [N, K] against `y_true` [N, K] with patient-bootstrap percentile CIs.

    `draws`: resamples already drawn (`patient_resamples(patients, resamples, seed)`), so that other statistics
    (subgroups) can be paired with this one on the very same resamples; drawn here when None."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, s, p = _checked(y_true, [scores], patients)
    labels = finding_names(y.shape[1], names)
    point = auroc_per_finding(y, s)
    if draws is not None and (draws.n_images != len(y) or draws.n_resamples != resamples):
        raise ValueError(f"draws of {draws.n_resamples} resamples over {draws.n_images} images do not fit "
                         f"{resamples} resamples over {len(y)} images")
    rs = patient_resamples(p, resamples, seed) if draws is None else draws
    reps = _replicates(y, s, rs.counts, rs.image_patient)
    findings = []
    for k, name in enumerate(labels):
        reason = undefined_reason(y[:, k])
        low, high, n = _interval(reps[:, k], confidence)
        if reason is None and n == 0:
            reason = "undefined in every resample"
        findings.append(FindingCI(name, _opt(point[k]), low, high, n, reason))
    mean_low, mean_high, mean_n = _interval(_row_means(reps), confidence)
    return AurocCI(tuple(findings), _opt(mean_auroc(point)), mean_low, mean_high, mean_n,
                   resamples, confidence, seed, reps)


@dataclass(frozen=True)
class FindingDifference:
    """One finding's AUROC of both models and the paired difference b - a with its percentile interval."""

    finding: str
    a: float | None
    b: float | None
    difference: float | None
    low: float | None
    high: float | None
    n_defined: int
    reason: str | None = None
    familywise_high: float | None = None  # simultaneous one-sided upper bound of b - a (module docstring)


def familywise_bounds(diff: np.ndarray, point: np.ndarray, confidence: float) -> tuple[np.ndarray, float | None]:
    """Upper bounds of b - a holding for all findings together with `confidence`, and the max-t critical value.

    `diff` [R, K] are the paired replicates (NaN where undefined), `point` [K] the point changes (NaN: not
    scored). A finding whose replicates do not vary (the same model) gets its point change as bound.
    """
    se = np.full(len(point), np.nan)
    for j in np.flatnonzero(np.isfinite(point)):
        v = diff[np.isfinite(diff[:, j]), j]
        if v.size >= 2:
            se[j] = v.std(ddof=1)
    bound = np.where(se == 0, point, np.nan)  # no replicates, no bound: nothing is shown
    varies = se > 0
    if not varies.any():
        return bound, None
    t = (point[varies] - diff[:, varies]) / se[varies]  # how far each resample falls below the estimate, in SEs
    t = t[np.isfinite(t).any(axis=1)]
    if len(t) == 0:
        return bound, None
    critical = float(np.quantile(np.nanmax(t, axis=1), confidence))
    bound[varies] = point[varies] + critical * se[varies]
    return bound, critical


@dataclass(frozen=True)
class PairedDifference:
    """Mean-AUROC difference b - a (candidate - champion) on the same images and resamples, with CIs."""

    a: float | None  # mean AUROC of each model over the defined findings
    b: float | None
    difference: float | None
    low: float | None
    high: float | None
    n_defined: int
    findings: tuple[FindingDifference, ...]
    resamples: int
    confidence: float
    seed: int
    replicates: np.ndarray = field(repr=False, compare=False)  # [resamples, findings] b - a, NaN where undefined
    critical: float | None = None  # max-t critical value of the familywise bounds at `confidence`

    @property
    def scored(self) -> int:
        """How many findings the familywise bounds hold over together (those with a point change)."""
        return sum(f.difference is not None for f in self.findings)

    def _bounds(self, confidence: float | None) -> list[float | None]:
        if confidence is None or confidence == self.confidence:
            return [f.familywise_high for f in self.findings]
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"familywise confidence must be in (0, 1), got {confidence}")
        point = np.array([np.nan if f.difference is None else f.difference for f in self.findings])
        return [_opt(x) for x in familywise_bounds(self.replicates, point, confidence)[0]]

    def failures(self, min_gain: float = 0.0, max_drop: float = math.inf, *,
                 familywise: float | None = None) -> list[str]:
        """Why b may not replace a: the mean gain's CI lower bound is not above `min_gain`, or a finding is shown
        worse (familywise bound of b - a below 0, at `familywise` confidence, default the comparison's) with a
        point drop over `max_drop`. Drops that are not shown never block: noise must not refuse an equal model."""
        out = []
        if self.low is None:
            out.append("mean-AUROC difference undefined: no finding has a positive and a negative image")
        elif not self.low > min_gain:
            out.append(f"mean-AUROC gain lower bound {self.low:+.4f} is not above {min_gain:+.4f}")
        level = f"{100 * (familywise or self.confidence):g}%"
        for f, high in zip(self.findings, self._bounds(familywise), strict=True):
            if f.difference is not None and high is not None and high < 0 and f.difference < -max_drop:
                out.append(f"{f.finding} drops by {-f.difference:.4f} (AUROC {f.a:.4f} -> {f.b:.4f}), more than "
                           f"{max_drop:.4f}; with {level} confidence over {self.scored} findings together it is worse "
                           f"by at least {-high:.4f}")
        return out

    def passed(self, min_gain: float, max_drop: float, *, familywise: float | None = None) -> str:
        """What a promotion established when `failures` is empty (no more: unshown drops are named, not denied)."""
        level = f"{100 * (familywise or self.confidence):g}%"
        text = (f"mean-AUROC gain lower bound {self.low:+.4f} is above {min_gain:+.4f}, and no finding is shown "
                f"worse ({level} familywise over {self.scored} findings) with a point drop over {max_drop:.4f}")
        unshown = self.unshown_drops(max_drop, familywise=familywise)
        return text + ("; not shown either way: " + "; ".join(unshown) if unshown else "")

    def unshown_drops(self, max_drop: float, *, familywise: float | None = None) -> list[str]:
        """Point drops over `max_drop` that the familywise bounds do not show: recorded, but they do not block."""
        out = []
        for f, high in zip(self.findings, self._bounds(familywise), strict=True):
            if f.difference is not None and f.difference < -max_drop and not (high is not None and high < 0):
                bound = "none" if high is None else f"{high:+.4f}"
                out.append(f"{f.finding}: point drop {-f.difference:.4f} over {max_drop:.4f}, not shown (familywise "
                           f"upper bound of the change {bound}, not below 0)")
        return out

    def to_dict(self) -> dict:
        """JSON-safe form (None for undefined), without the replicates."""
        return {
            "mean": {"a": self.a, "b": self.b, "difference": self.difference, "low": self.low, "high": self.high,
                     "n_defined": self.n_defined},
            "findings": {f.finding: {k: v for k, v in vars(f).items() if k != "finding"} for f in self.findings},
            "resamples": self.resamples, "confidence": self.confidence, "seed": self.seed, "unit": "patient",
            "familywise": {"confidence": self.confidence, "findings": self.scored, "critical": self.critical,
                           "bound": "one-sided upper bound of candidate - champion, max-t over the findings"},
        }


def paired_difference(
    y_true: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    patients: ArrayLike,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> PairedDifference:
    """Paired patient bootstrap of AUROC(b) - AUROC(a): both models see the same resamples, so shared noise cancels."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, sa, sb, p = _checked(y_true, [scores_a, scores_b], patients)
    k = y.shape[1]
    labels = finding_names(k, names)
    point_a, point_b = auroc_per_finding(y, sa), auroc_per_finding(y, sb)
    rs = patient_resamples(p, resamples, seed)
    reps = _replicates(np.hstack([y, y]), np.hstack([sa, sb]), rs.counts, rs.image_patient)
    reps_a, reps_b = reps[:, :k], reps[:, k:]
    diff = reps_b - reps_a  # NaN in the same places for both: definedness depends on labels and weights only
    bounds, critical = familywise_bounds(diff, point_b - point_a, confidence)
    findings = []
    for j, name in enumerate(labels):
        reason = undefined_reason(y[:, j])
        low, high, n = _interval(diff[:, j], confidence)
        if reason is None and n == 0:
            reason = "undefined in every resample"
        findings.append(FindingDifference(name, _opt(point_a[j]), _opt(point_b[j]),
                                          _opt(point_b[j] - point_a[j]), low, high, n, reason, _opt(bounds[j])))
    mean_a, mean_b = mean_auroc(point_a), mean_auroc(point_b)
    low, high, n = _interval(_row_means(reps_b) - _row_means(reps_a), confidence)
    return PairedDifference(_opt(mean_a), _opt(mean_b), _opt(mean_b - mean_a), low, high, n, tuple(findings),
                            resamples, confidence, seed, diff, critical)
