"""Evaluation statistics against scikit-learn and hand-computed numbers: bootstrap CIs, operating points, ECE."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr.evaluation import bootstrap, figures, operating
from cxr.labels import FINDINGS, NUM_FINDINGS


def synthetic(patients: int, k: int = 3, seed: int = 0, signal: float = 1.0):
    """1-5 images per patient, independent labels at 30% prevalence, scores shifted up by `signal` for positives."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(patients), rng.integers(1, 6, patients))
    y = rng.random((len(pid), k)) < 0.3
    return y, rng.normal(size=y.shape) + signal * y, pid


def correlated(patients: int = 300, images: int = 8, seed: int = 0):
    """Every image of a patient shares its label and most of its score: the case image resampling gets wrong."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(patients), images)
    yp = rng.random((patients, 1)) < 0.4
    effect = rng.normal(size=(patients, 1)) + yp
    return yp[pid], effect[pid] + 0.1 * rng.normal(size=(len(pid), 1)), pid


def width(f) -> float:
    return f.high - f.low


# --- resamples and the weighted AUROC -------------------------------------------------------------------------


def test_patient_resamples_draw_whole_patients():
    pid = np.array(["p7", "p2", "p7", "p9", "p2", "p7"])
    rs = bootstrap.patient_resamples(pid, 50, seed=3)
    assert list(rs.patient_ids) == ["p2", "p7", "p9"] and rs.counts.shape == (50, 3)
    assert np.all(rs.counts.sum(axis=1) == 3)  # as many draws as patients
    w = rs.weights()
    assert w.shape == (50, 6)
    np.testing.assert_array_equal(w[:, 0], w[:, 2])  # p7's images always together
    np.testing.assert_array_equal(w[:, 0], w[:, 5])
    np.testing.assert_array_equal(w[:, 1], w[:, 4])
    np.testing.assert_array_equal(w.sum(axis=1), rs.counts @ np.array([2, 3, 1]))
    np.testing.assert_array_equal(rs.weights(10, 20), w[10:20])
    assert rs.counts.dtype.itemsize <= 2
    np.testing.assert_array_equal(bootstrap.patient_resamples(pid, 50, seed=3).counts, rs.counts)
    assert not np.array_equal(bootstrap.patient_resamples(pid, 50, seed=4).counts, rs.counts)


def test_patient_resamples_are_uniform_over_patients():
    rs = bootstrap.patient_resamples(np.arange(20), 4000, seed=0)
    np.testing.assert_allclose(rs.counts.mean(axis=0), 1.0, atol=0.06)  # each patient drawn once on average
    np.testing.assert_allclose(rs.counts.var(axis=0), 1 - 1 / 20, atol=0.1)  # binomial(20, 1/20) variance


def test_weighted_auroc_hand_computed_with_tie():
    # positives: 0.9 (w1), 0.4 (w2); negatives: 0.3 (w1), 0.4 (w3, tied with a positive).
    # pairs: 1*1 + 1*3 + 2*1 + 0.5*2*3 = 9 of (1+2)*(1+3) = 12.
    assert bootstrap.weighted_auroc([1, 0, 1, 0], [0.9, 0.3, 0.4, 0.4], [1, 1, 2, 3])[0] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(6))
def test_weighted_auroc_equals_sklearn_with_ties_and_weights(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.random(n) < rng.uniform(0.05, 0.7)
    y[:2] = [True, False]
    s = np.round(rng.random(n) + 0.3 * y, 1)  # one decimal: many ties, some across classes
    ints = rng.integers(0, 4, (8, n)).astype(float)
    floats = rng.random((8, n)) * (rng.random((8, n)) < 0.8)
    for w in (ints, floats):
        got = bootstrap.weighted_auroc(y, s, w)
        for r in range(len(w)):
            if (w[r] * y).sum() > 0 and (w[r] * ~y).sum() > 0:
                assert got[r] == pytest.approx(roc_auc_score(y, s, sample_weight=w[r]), abs=1e-12)
            else:
                assert math.isnan(got[r])
    ones = bootstrap.weighted_auroc(y, s, np.ones(n))
    assert ones[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_weighted_auroc_rejects_negative_weights():
    with pytest.raises(ValueError, match="non-negative"):
        bootstrap.weighted_auroc([0, 1], [0.1, 0.2], [1, -1])


def test_replicates_equal_sklearn_on_the_drawn_patient_weights(monkeypatch: pytest.MonkeyPatch):
    y, s, pid = synthetic(60, k=2, seed=5)
    s = np.round(s, 1)
    monkeypatch.setattr(bootstrap, "CHUNK_BYTES", 8 * 400)  # many chunks of a few resamples each
    ci = bootstrap.auroc_ci(y, s, pid, resamples=40, seed=9)
    w = bootstrap.patient_resamples(pid, 40, seed=9).weights()
    for r in range(40):
        for k in range(2):
            assert ci.replicates[r, k] == pytest.approx(roc_auc_score(y[:, k], s[:, k], sample_weight=w[r]), abs=1e-12)
    monkeypatch.undo()
    np.testing.assert_array_equal(bootstrap.auroc_ci(y, s, pid, resamples=40, seed=9).replicates, ci.replicates)


# --- auroc_ci ------------------------------------------------------------------------------------------------


def test_point_estimates_equal_sklearn_and_cis_cover_them():
    y, s, pid = synthetic(400, k=NUM_FINDINGS, seed=1)
    ci = bootstrap.auroc_ci(y, s, pid, resamples=1000, seed=0)
    assert [f.finding for f in ci.findings] == list(FINDINGS)
    for k, f in enumerate(ci.findings):
        assert f.auroc == pytest.approx(roc_auc_score(y[:, k], s[:, k]), abs=1e-12)
        assert f.low < f.auroc < f.high and f.n_defined == 1000 and f.reason is None
    expected_mean = np.mean([roc_auc_score(y[:, k], s[:, k]) for k in range(NUM_FINDINGS)])
    assert ci.mean == pytest.approx(expected_mean, abs=1e-12)
    assert ci.mean_low < ci.mean < ci.mean_high
    assert width(ci.findings[0]) > ci.mean_high - ci.mean_low  # averaging 14 findings narrows the interval


def test_ci_narrows_with_more_patients():
    small = bootstrap.auroc_ci(*synthetic(200, seed=2), resamples=1000)
    large = bootstrap.auroc_ci(*synthetic(5000, seed=2), resamples=1000)
    for a, b in zip(small.findings, large.findings, strict=True):
        assert width(b) < 0.4 * width(a)  # ~ sqrt(200 / 5000) = 0.2


def test_patient_resampling_is_wider_than_image_resampling_for_correlated_images():
    y, s, pid = correlated()
    by_patient = bootstrap.auroc_ci(y, s, pid, resamples=1000).findings[0]
    by_image = bootstrap.auroc_ci(y, s, np.arange(len(pid)), resamples=1000).findings[0]
    assert by_patient.auroc == by_image.auroc
    assert width(by_patient) > 2 * width(by_image)  # ~ sqrt(8 images per patient)


def test_deterministic_for_a_seed():
    y, s, pid = synthetic(100, seed=3)
    a = bootstrap.auroc_ci(y, s, pid, resamples=500, seed=11)
    b = bootstrap.auroc_ci(y, s, pid, resamples=500, seed=11)
    assert a == b
    np.testing.assert_array_equal(a.replicates, b.replicates)
    assert a.to_dict() == b.to_dict()
    c = bootstrap.auroc_ci(y, s, pid, resamples=500, seed=12)
    assert not np.array_equal(a.replicates, c.replicates)


def test_finding_without_positives_is_undefined_with_a_reason_and_left_out_of_the_mean():
    y, s, pid = synthetic(150, k=4, seed=4)
    y[:, 1] = False
    y[:, 3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ci = bootstrap.auroc_ci(y, s, pid, resamples=500)
    for k, why in ((1, "no positive"), (3, "no negative")):
        f = ci.findings[k]
        assert f.auroc is None and f.low is None and f.high is None and f.n_defined == 0 and why in f.reason
    assert ci.mean == pytest.approx(np.mean([roc_auc_score(y[:, k], s[:, k]) for k in (0, 2)]), abs=1e-12)
    assert np.all(np.isnan(ci.replicates[:, [1, 3]]))
    d = ci.to_dict()
    assert d["findings"]["finding 1"]["auroc"] is None and d["unit"] == "patient"


def test_all_findings_undefined_gives_no_mean_not_a_half():
    y = np.zeros((20, 2), bool)
    ci = bootstrap.auroc_ci(y, np.random.default_rng(0).random((20, 2)), np.arange(20), resamples=100)
    assert ci.mean is None and ci.mean_low is None and ci.mean_n_defined == 0


def test_mean_ci_uses_the_findings_defined_in_each_resample():
    y, s, pid = synthetic(60, k=2, seed=6)
    y[:, 1] = False
    y[pid == 0, 1] = True  # a rare finding: one positive patient, missing from ~37% of resamples
    ci = bootstrap.auroc_ci(y, s, pid, resamples=2000)
    rare = ci.findings[1]
    assert rare.auroc is not None and 1000 < rare.n_defined < 1600
    per_resample = np.nanmean(ci.replicates, axis=1)
    assert (ci.mean_low, ci.mean_high) == pytest.approx(tuple(np.quantile(per_resample, [0.025, 0.975])))


def test_rejects_bad_inputs():
    y, s, pid = synthetic(20, seed=0)
    with pytest.raises(ValueError, match="must both be"):
        bootstrap.auroc_ci(y, s[:, :2], pid)
    with pytest.raises(ValueError, match="one id per image"):
        bootstrap.auroc_ci(y, s, pid[:-1])
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bootstrap.auroc_ci(y, s, pid)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap.auroc_ci(y, np.zeros_like(s), pid, confidence=95)


# --- paired_difference ---------------------------------------------------------------------------------------


def test_model_against_itself_differs_by_exactly_zero():
    y, s, pid = synthetic(200, k=5, seed=7)
    d = bootstrap.paired_difference(y, s, s.copy(), pid, resamples=1000)
    assert d.difference == 0.0 and d.low == 0.0 and d.high == 0.0
    assert all(f.difference == 0.0 and f.low == 0.0 and f.high == 0.0 for f in d.findings)
    assert d.failures(min_gain=0.0) == ["mean-AUROC gain lower bound +0.0000 is not above +0.0000"]


def test_clearly_better_model_has_a_difference_ci_above_zero():
    y, s, pid = synthetic(300, k=4, seed=8)
    better = y + 0.3 * np.random.default_rng(0).normal(size=y.shape)
    d = bootstrap.paired_difference(y, s, better, pid, resamples=1000)
    a = np.mean([roc_auc_score(y[:, k], s[:, k]) for k in range(4)])
    b = np.mean([roc_auc_score(y[:, k], better[:, k]) for k in range(4)])
    assert (d.a, d.b, d.difference) == pytest.approx((a, b, b - a), abs=1e-12)
    assert 0 < d.low < d.difference < d.high
    assert all(f.low > 0 for f in d.findings)
    assert d.failures(min_gain=0.01, max_drop=0.0) == []


def test_paired_resamples_are_shared_and_drops_are_reported():
    y, s, pid = synthetic(200, k=3, seed=9)
    rng = np.random.default_rng(1)
    b = y + 0.5 * rng.normal(size=y.shape)
    b[:, 2] = rng.normal(size=len(y))  # finding 2 becomes noise
    d = bootstrap.paired_difference(y, s, b, pid, resamples=800, seed=5)
    reps_a = bootstrap.auroc_ci(y, s, pid, resamples=800, seed=5).replicates
    reps_b = bootstrap.auroc_ci(y, b, pid, resamples=800, seed=5).replicates
    np.testing.assert_array_equal(d.replicates, reps_b - reps_a)
    drop = d.findings[2]
    assert drop.difference == pytest.approx(roc_auc_score(y[:, 2], b[:, 2]) - roc_auc_score(y[:, 2], s[:, 2]))
    assert drop.high < 0
    failures = d.failures(min_gain=-1.0, max_drop=0.05)
    assert len(failures) == 1 and failures[0].startswith("finding 2 drops by")
    assert drop.familywise_high < 0 and f"worse by at least {-drop.familywise_high:.4f}" in failures[0]


# --- operating points ----------------------------------------------------------------------------------------

# Six images counted by hand: positives score 0.9, 0.8, 0.3; negatives 0.6, 0.7, 0.1.
Y6 = np.array([1, 1, 1, 0, 0, 0])
S6 = np.array([0.9, 0.8, 0.3, 0.6, 0.7, 0.1])


def test_operating_point_counted_by_hand():
    p = operating.operating_point(Y6, S6, 0.5)  # called positive: 0.9, 0.8 (TP), 0.6, 0.7 (FP)
    assert (p.tp, p.fp, p.tn, p.fn) == (2, 2, 1, 1)
    assert (p.sensitivity, p.specificity, p.ppv, p.npv, p.f1) == pytest.approx((2 / 3, 1 / 3, 1 / 2, 1 / 2, 4 / 7))
    at = operating.operating_point(Y6, S6, 0.8)  # a score equal to the threshold is called positive
    assert (at.tp, at.fp, at.specificity, at.ppv) == (2, 0, 1.0, 1.0)


def test_thresholds_counted_by_hand():
    # J by threshold: .9 -> 1/3, .8 -> 2/3, .7 -> 1/3, .6 -> 0, .3 -> 1/3, .1 -> 0
    assert operating.youden_threshold(Y6, S6) == pytest.approx((0.8, 2 / 3))
    assert operating.sensitivity_threshold(Y6, S6, 0.9) == 0.3  # needs all 3 positives
    assert operating.sensitivity_threshold(Y6, S6, 2 / 3) == 0.8
    assert operating.sensitivity_threshold(Y6, S6, 0.3) == 0.9


def test_undefined_rates_are_none_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none_called = operating.operating_point(Y6, S6, 0.95)
        assert none_called.ppv is None and none_called.f1 == 0.0 and none_called.npv == 0.5
        quiet = operating.operating_point(np.zeros(4), [0.1, 0.2, 0.3, 0.4], 0.5)  # no positive, none called
        assert quiet.sensitivity is None and quiet.ppv is None and quiet.f1 is None and quiet.specificity == 1.0
        noisy = operating.operating_point(np.zeros(4), [0.1, 0.2, 0.3, 0.4], 0.25)  # no positive, 2 called
        assert noisy.sensitivity is None and noisy.ppv == 0.0 and noisy.f1 == 0.0 and noisy.specificity == 0.5
        assert operating.youden_threshold(np.zeros(4), [0.1, 0.2, 0.3, 0.4]) is None
        assert operating.sensitivity_threshold(np.ones(4), [0.1, 0.2, 0.3, 0.4]) is None
        th = operating.choose_thresholds(np.column_stack([Y6, np.zeros(6)]), np.column_stack([S6, S6]))
    assert th[0].youden == pytest.approx(0.8) and th[0].at_sensitivity == 0.3 and th[0].reason is None
    assert th[1].youden is None and th[1].at_sensitivity is None and "no positive" in th[1].reason


def test_thresholds_come_from_validation_and_apply_to_test():
    rng = np.random.default_rng(0)
    y_test = rng.random((50, 2)) < 0.4
    s_test = rng.random((50, 2))
    y_val = np.column_stack([Y6, Y6])
    y_val[:, 1] = 0
    report = operating.evaluate_operating(y_val, np.column_stack([S6, S6]), y_test, s_test, names=("A", "B"))
    a, b = report
    assert a.thresholds.youden == pytest.approx(0.8)
    assert a.at_youden == operating.operating_point(y_test[:, 0], s_test[:, 0], 0.8)
    assert a.at_sensitivity == operating.operating_point(y_test[:, 0], s_test[:, 0], 0.3)
    assert a.auprc == pytest.approx(average_precision_score(y_test[:, 0], s_test[:, 0]))
    assert a.prevalence == pytest.approx(y_test[:, 0].mean())
    assert b.at_youden is None and b.at_sensitivity is None and "validation has no positive" in b.thresholds.reason
    assert b.calibration.ece is not None and b.to_dict()["at_youden"] is None


def test_auprc_equals_sklearn_and_by_hand():
    assert operating.auprc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    y, s, _ = synthetic(100, k=NUM_FINDINGS, seed=10)
    y[:, 5] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = operating.auprc_per_finding(y, s)
    for k in range(NUM_FINDINGS):
        if k == 5:
            assert math.isnan(got[k])
        else:
            assert got[k] == pytest.approx(average_precision_score(y[:, k], s[:, k]), abs=1e-12)


# --- calibration ---------------------------------------------------------------------------------------------


def test_ece_computed_by_hand():
    # bin [0, .1]: .05 vs 0 (gap .05, 1 image); (.1, .2]: .15 vs 1/2 (gap .35, 2); (.8, .9]: .85 vs 1 (gap .15, 1);
    # (.9, 1]: .95 vs 1/2 (gap .45, 2). ECE = (.05 + 2 * .35 + .15 + 2 * .45) / 6 = 0.3
    cal = operating.calibration([0, 0, 1, 1, 1, 0], [0.05, 0.15, 0.15, 0.85, 0.95, 0.95])
    assert cal.ece == pytest.approx(0.3)
    assert [b.count for b in cal.bins] == [1, 2, 0, 0, 0, 0, 0, 0, 1, 2]
    assert cal.bins[1].confidence == pytest.approx(0.15) and cal.bins[1].observed == 0.5
    assert cal.bins[2].confidence is None and cal.bins[2].observed is None
    assert (cal.bins[9].lower, cal.bins[9].upper) == pytest.approx((0.9, 1.0))
    assert operating.calibration([1, 0, 0, 0], [0.25] * 4).ece == pytest.approx(0.0)  # 1 in 4 at 0.25
    assert operating.calibration([1, 0, 1, 0], [0.3] * 4, bins=1).ece == pytest.approx(0.2)


def test_reliability_table_equals_sklearn_calibration_curve_edges_included():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(500), np.linspace(0, 1, 11), [0.0, 1.0]])  # bin edges exactly, too
    y = rng.random(len(p)) < p
    for bins in (5, 10, 15):
        cal = operating.calibration(y, p, bins)
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
        full = [b for b in cal.bins if b.count]
        np.testing.assert_allclose([b.observed for b in full], observed, atol=1e-12)
        np.testing.assert_allclose([b.confidence for b in full], predicted, atol=1e-12)
        assert sum(b.count for b in cal.bins) == len(p)


def test_calibration_rejects_logits():
    with pytest.raises(ValueError, match="logits"):
        operating.calibration([0, 1], [-2.0, 3.0])


# --- figures -------------------------------------------------------------------------------------------------


def test_figures_write_pngs_and_say_undefined(tmp_path):
    y, s, pid = synthetic(80, k=NUM_FINDINGS, seed=11)
    p = 1 / (1 + np.exp(-s))
    y[:, 1] = False
    ci = bootstrap.auroc_ci(y, p, pid, resamples=200)
    built = {
        "pr": figures.pr_grid(y, p, "test PR"),
        "reliability": figures.reliability_grid(y, p, "test calibration"),
        "roc": figures.roc_grid_ci(y, p, ci, "test ROC"),
    }
    for name, fig in built.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path, dpi=50)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[0].startswith(FINDINGS[0]) and titles[1].startswith(FINDINGS[1])
        assert sum(not ax.axison for ax in fig.axes) == 2  # 4 x 4 grid, 14 panels used
    assert "undefined" in built["pr"].axes[1].get_title() and "undefined" in built["roc"].axes[1].get_title()
    assert "no positive" in built["reliability"].axes[1].get_title()
    assert f"{ci.findings[0].low:.3f}" in built["roc"].axes[0].get_title()
    assert f"AP {average_precision_score(y[:, 0], p[:, 0]):.3f}" in built["pr"].axes[0].get_title()


def test_roc_marks_the_validation_operating_points_and_reliability_counts_its_bins():
    yv, sv, _ = synthetic(120, k=3, seed=3)
    yt, st, pid = synthetic(150, k=3, seed=4)
    pt = 1 / (1 + np.exp(-st))
    ops = {f.finding: f.to_dict() for f in operating.evaluate_operating(yv, 1 / (1 + np.exp(-sv)), yt, pt)}
    ci = bootstrap.auroc_ci(yt, pt, pid, resamples=50)
    roc = figures.roc_grid_ci(yt, pt, ci, "test ROC", ops)
    for ax, (name, op) in zip(roc.axes, ops.items(), strict=False):
        marks = {line.get_label(): (line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()
                 if line.get_gid() == "operating-point"}
        youden, sens = op["at_youden"], op["at_sensitivity"]
        assert marks == {
            f"Youden on val: t = {youden['threshold']:.3g}": pytest.approx((1 - youden["specificity"],
                                                                            youden["sensitivity"])),
            f"sens. ≥ 0.9 on val: t = {sens['threshold']:.3g}": pytest.approx((1 - sens["specificity"],
                                                                               sens["sensitivity"]))}, name
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(marks)
    assert not [line for line in figures.roc_grid_ci(yt, pt, ci, "no ops").axes[0].get_lines()
                if line.get_gid() == "operating-point"]
    rel = figures.reliability_grid(yt, pt, "calibration")
    cal = operating.calibration(yt[:, 0], pt[:, 0])
    counts = [int(t.get_text()) for t in rel.axes[0].texts if t.get_gid() == "bin-count"]
    assert counts == [b.count for b in cal.bins if b.count] and sum(counts) == len(yt)
    assert min(t.get_fontsize() for ax in roc.axes for t in (ax.title, ax.xaxis.label)) >= 10
