"""Subgroups of `cxr evaluate`: per-cell AUROC and counts as computed by hand or by sklearn on the cell, the gap
to the overall AUROC on the very resamples of the overall CI, unknown values counted, small cells said so."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr.evaluation import bootstrap, report, subgroups

# 12 images of 6 patients (two images each), one finding; sex per patient, one patient's sex unknown
Y = np.array([1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1])[:, None]
S = np.array([.9, .2, .4, .6, .3, .8, .7, .1, .5, .35, .65, .55])[:, None]
PID = np.repeat([10, 11, 12, 13, 14, 15], 2)
SEX = np.repeat(["F", "F", "M", "M", "", "M"], 2).astype(object)


def _stats(attributes, y=Y, s=S, pid=PID, resamples=300, min_count=1, seed=1):
    draws = bootstrap.patient_resamples(pid, resamples, seed)
    ci = bootstrap.auroc_ci(y, s, pid, resamples, seed=seed, draws=draws, names=["Finding"][:y.shape[1]]
                            if y.shape[1] == 1 else None)
    return subgroups.subgroup_stats(y, s, draws, ci, attributes, min_count=min_count), draws, ci


def test_cells_count_and_score_as_by_hand_and_by_sklearn():
    out, draws, ci = _stats({"sex": SEX})
    sex = out["attributes"]["sex"]
    assert list(sex) == ["F", "M", "unknown"]  # the unknown patient is a cell, not dropped
    assert [(c["images"], c["patients"]) for c in sex.values()] == [(4, 2), (6, 3), (2, 1)]
    f = sex["F"]["findings"]["Finding"]
    assert (f["positives"], f["negatives"]) == (2, 2)
    # F: positives .9, .4 against negatives .2, .6: .9 beats both, .4 beats .2 only -> 3 of 4 pairs
    assert f["auroc"] == pytest.approx(0.75, abs=1e-12)
    m = Y[:, 0][SEX == "M"], S[:, 0][SEX == "M"]
    assert sex["M"]["findings"]["Finding"]["auroc"] == pytest.approx(roc_auc_score(*m), abs=1e-12)
    assert sex["M"]["findings"]["Finding"]["gap"] == pytest.approx(roc_auc_score(*m) - roc_auc_score(Y, S),
                                                                   abs=1e-12)
    # the unknown cell (patient 14) has no positive: said so, not scored
    assert sex["unknown"]["findings"]["Finding"] == {
        "positives": 0, "negatives": 2, "auroc": None, "low": None, "high": None, "gap": None, "gap_low": None,
        "gap_high": None, "n_defined": 0, "reason": "no positive image"}
    # interval and gap interval: percentiles of the cell's AUROC under each of the overall CI's resamples
    inside = SEX == "M"
    weights = draws.weights()[:, inside]
    reps = bootstrap.weighted_auroc(Y[inside, 0], S[inside, 0], weights)
    ok = np.isfinite(reps)
    got = sex["M"]["findings"]["Finding"]
    assert got["n_defined"] == ok.sum() < 300  # some resamples draw no positive of M
    np.testing.assert_allclose([got["low"], got["high"]], np.quantile(reps[ok], [0.025, 0.975]), atol=1e-12)
    gaps = (reps - ci.replicates[:, 0])[ok]
    np.testing.assert_allclose([got["gap_low"], got["gap_high"]], np.quantile(gaps, [0.025, 0.975]), atol=1e-12)
    # the cell's size follows its patients through the same resamples
    sizes = draws.counts[:, np.unique(draws.image_patient[inside])].sum(axis=1) * 2
    np.testing.assert_allclose(sex["M"]["images_resampled"], np.quantile(sizes, [0.025, 0.975]))


def test_a_cell_that_is_the_whole_split_has_gap_exactly_zero():
    rng = np.random.default_rng(0)
    pid = np.repeat(np.arange(40), rng.integers(1, 6, 40))
    y = (rng.random((len(pid), 3)) < 0.3).astype(int)
    y[rng.random(y.shape) < 0.05] = -1  # uncertain labels are left out of the cell as out of the whole
    s = y * 0.5 + rng.random(y.shape)
    out, _, ci = _stats({"view": np.full(len(pid), "PA", dtype=object)}, y, s, pid, min_count=5)
    pa = out["attributes"]["view"]["PA"]
    assert out["attributes"]["view"]["unknown"]["images"] == 0
    for f, whole in zip(pa["findings"].values(), ci.findings, strict=True):
        assert (f["gap"], f["gap_low"], f["gap_high"]) == (0.0, 0.0, 0.0)
        assert f["auroc"] == pytest.approx(whole.auroc, abs=1e-12)
        assert (f["low"], f["high"], f["n_defined"]) == (whole.low, whole.high, whole.n_defined)
    assert (pa["mean"]["gap"], pa["mean"]["gap_low"], pa["mean"]["gap_high"]) == (0.0, 0.0, 0.0)
    assert pa["mean"]["findings"] == 3 and pa["mean"]["auroc"] == pytest.approx(ci.mean, abs=1e-12)


def test_small_cells_say_why_and_unknown_values_are_counted():
    age = np.array([5, 17, 18, 39.5, 40, 61, 79.9, 80, 95, np.nan, -1, 45], dtype=float)
    idx, names = subgroups.cells("age", age)
    assert names == ["0-17", "18-39", "40-59", "60-79", "80+", "unknown"]
    assert [names[i] for i in idx] == ["0-17", "0-17", "18-39", "18-39", "40-59", "60-79", "60-79", "80+", "80+",
                                       "unknown", "unknown", "40-59"]
    assert subgroups.cells("age", [30, 70], (40, 65))[1] == ["<40", "40-64", "65+", "unknown"]
    idx, names = subgroups.cells("sex", np.array(["M", " F", "", None, np.nan, "Unknown", "O"], dtype=object))
    assert names == ["F", "M", "O", "unknown"] and [names[i] for i in idx] == [
        "M", "F", "unknown", "unknown", "unknown", "unknown", "O"]
    out, _, _ = _stats({"sex": SEX, "age": np.repeat([30, 30, 50, 50, np.nan, 85], 2)}, min_count=3)
    sex, age = out["attributes"]["sex"], out["attributes"]["age"]
    assert sex["F"]["findings"]["Finding"]["reason"] == "2 positive images, fewer than 3"
    assert sex["M"]["findings"]["Finding"]["reason"] == "2 negative images, fewer than 3"  # 4 positives
    assert age["40-59"]["findings"]["Finding"]["auroc"] is None
    assert age["18-39"]["findings"]["Finding"]["positives"] == 2
    assert age["unknown"]["images"] == 2 and age["0-17"]["images"] == 0
    assert age["0-17"]["findings"]["Finding"]["reason"] == "no image in this cell"
    assert age["80+"]["findings"]["Finding"]["reason"] == "no negative image"
    assert age["0-17"]["mean"]["auroc"] is None and age["0-17"]["mean"]["findings"] == 0
    md = "\n".join(report.subgroup_tables({"subgroups": out, "auroc": {"confidence": 0.95,
                                                                       "findings": {"Finding": {}}}}))
    assert "### Sex" in md and "### Age" in md
    assert "| Finding | F | 2/2 | not scored: 2 positive images, fewer than 3 | – |" in md
    assert "unknown: 2 images of 1 patient." in md and "0-17: 0 images of 0 patients" in md
    assert "| all | 0-17 |" not in md and "| all | unknown |" in md  # an empty cell has no rows


def test_bad_requests_name_what_is_wrong_and_shared_draws_change_nothing():
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['race'\]"):
        subgroups.parse_attributes("sex,race")
    with pytest.raises(ValueError, match="strictly ascending"):
        subgroups.parse_bands("0,40,18")
    with pytest.raises(ValueError, match="whole years"):
        subgroups.parse_bands("0,eighteen")
    assert subgroups.parse_attributes("none") == () and subgroups.parse_attributes("auto") == "auto"
    assert subgroups.parse_attributes("view, sex") == ("view", "sex")
    with pytest.raises(ValueError, match=r"'sex': \(3,\) values for 12 images"):
        _stats({"sex": SEX[:3]})
    rng = np.random.default_rng(2)
    y, s = (rng.random((50, 2)) < 0.4).astype(int), rng.random((50, 2))
    pid = rng.integers(0, 15, 50)
    plain = bootstrap.auroc_ci(y, s, pid, 200, seed=4)
    shared = bootstrap.auroc_ci(y, s, pid, 200, seed=4, draws=bootstrap.patient_resamples(pid, 200, 4))
    assert plain == shared and np.array_equal(plain.replicates, shared.replicates, equal_nan=True)
    with pytest.raises(ValueError, match="do not fit"):
        bootstrap.auroc_ci(y, s, pid, 100, seed=4, draws=bootstrap.patient_resamples(pid, 200, 4))


def test_cxr_evaluate_refuses_a_bad_subgroup_request_before_touching_the_model(capsys, tmp_path):
    from cxr.cli import main

    missing = str(tmp_path / "no-such-model")  # were the model looked at first, this would fail differently
    assert main(["evaluate", "--model", missing, "--subgroups", "sex,race"]) == 2
    assert "unknown attribute(s) ['race']" in capsys.readouterr().err
    assert main(["evaluate", "--model", missing, "--age-bands", "0,60,40"]) == 2
    assert "--age-bands '0,60,40'" in capsys.readouterr().err


def test_the_figure_draws_each_scored_cell_at_its_auroc():
    from cxr.evaluation import figures

    out, _, ci = _stats({"sex": SEX, "age": np.repeat([30, 30, 50, 50, np.nan, 85], 2)})
    fig = figures.subgroup_grid({"subgroups": out, "auroc": ci.to_dict()}, "t")
    (ax,) = [a for a in fig.axes if a.get_visible() and a.axison]
    drawn = sorted(float(line.get_ydata()[0]) for line in ax.get_lines() if line.get_marker() == "o")
    want = sorted(f["auroc"] for a in out["attributes"].values() for c in a.values()
                  for f in c["findings"].values() if f["auroc"] is not None)
    assert drawn == pytest.approx(want) and len(want) >= 3
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]  # cells too small to score
    assert len(crosses) == 3  # sex unknown, age unknown, age 80+ (no negative); 0-17 and 60-79 are empty
    assert [t.get_text() for t in ax.get_xticklabels()] == ["F", "M", "unknown", "18-39", "40-59", "80+", "unknown"]
