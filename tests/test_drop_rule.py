"""Promotion's per-finding drop rule (issue 19 §3): a finding blocks only when the paired bootstrap shows it worse
with familywise confidence over all scored findings, simulated at NIH official-test counts (tests/dropsim.py).

Replicates and resamples are few here to stay fast; bench/drop_rule.py measures the same rule at scale.
"""

from __future__ import annotations

import numpy as np
import pytest
from dropsim import old_rule, replicate
from scipy.stats import norm

from cxr.evaluation import bootstrap
from cxr.labels import FINDINGS

HERNIA, EFFUSION = FINDINGS.index("Hernia"), FINDINGS.index("Effusion")


def _blocked(d: bootstrap.PairedDifference, max_drop: float, familywise: float | None = None) -> set[str]:
    """Findings `failures` names (the mean-gain clause is switched off with min_gain=-1)."""
    return {r.split(" drops by ")[0] for r in d.failures(min_gain=-1.0, max_drop=max_drop, familywise=familywise)}


def test_equal_models_are_refused_at_most_5_percent_over_all_findings_and_the_old_rule_is_not():
    # 30 fresh official-size splits, two equally good models (noise correlated 0.8), 200 resamples each.
    # A true familywise rate of 5% gives more than 4 of 30 refusals with probability 1.6%.
    new = {0.0: 0, 0.02: 0}
    old = {0.01: 0, 0.02: 0}
    for seed in range(30):
        y, a, b, pid = replicate(seed)
        d = bootstrap.paired_difference(y, a, b, pid, resamples=200, seed=seed)
        assert d.scored == len(FINDINGS) and 2.0 < d.critical < 3.6  # between one finding's 1.64 and 14 at worst
        for max_drop in new:
            new[max_drop] += bool(_blocked(d, max_drop))
        point = np.array([f.difference for f in d.findings])
        for max_drop in old:
            old[max_drop] += bool(old_rule(point, max_drop).any())
    assert new[0.0] <= 4 and new[0.02] <= new[0.0], new  # max_drop=0: the interval alone decides
    assert old[0.01] > 4, old  # the point-estimate rule refuses equal models far more often: this test can fail
    assert old[0.02] >= new[0.02], old


def test_a_clear_drop_on_a_common_finding_blocks_and_the_reason_says_what_was_shown():
    # Effusion (4,658 positives) loses 0.05 AUROC; Hernia (86 positives) 0.03, which these counts seldom show.
    hernia_shown = 0
    for seed in range(100, 104):
        y, a, b, pid = replicate(seed, drops={"Effusion": 0.05, "Hernia": 0.03})
        d = bootstrap.paired_difference(y, a, b, pid, resamples=200, seed=seed)
        eff = d.findings[EFFUSION]
        reasons = {r.split(" drops by ")[0]: r for r in d.failures(min_gain=-1.0, max_drop=0.02)}
        assert reasons["Effusion"] == (
            f"Effusion drops by {-eff.difference:.4f} (AUROC {eff.a:.4f} -> {eff.b:.4f}), more than 0.0200; with 95% "
            f"confidence over 14 findings together it is worse by at least {-eff.familywise_high:.4f}"), reasons
        assert 0 < -eff.familywise_high < -eff.difference
        hernia = d.findings[HERNIA]
        shown = hernia.familywise_high < 0 and hernia.difference < -0.02
        assert ("Hernia" in reasons) == shown
        unshown = [u.split(":")[0] for u in d.unshown_drops(0.02)]
        assert ("Hernia" in unshown) == (hernia.difference < -0.02 and not shown)
        assert all(f.familywise_high >= 0 for f in d.findings if f.finding in unshown)
        hernia_shown += shown
    assert hernia_shown < 4, "a 0.03 drop on 86 positives in ~50 patients is shown only some of the time"


def test_decisions_are_reproducible_for_a_seed():
    y, a, b, pid = replicate(7, drops={"Effusion": 0.03})
    one = bootstrap.paired_difference(y, a, b, pid, resamples=150, seed=3)
    two = bootstrap.paired_difference(y, a, b, pid, resamples=150, seed=3)
    assert one.to_dict() == two.to_dict() and one.failures(0.0, 0.02) == two.failures(0.0, 0.02)
    assert one.to_dict()["findings"]["Effusion"]["familywise_high"] == one.findings[EFFUSION].familywise_high
    assert one.to_dict()["familywise"]["critical"] == one.critical
    other = bootstrap.paired_difference(y, a, b, pid, resamples=150, seed=4)
    assert other.critical != one.critical


def test_familywise_bounds_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 1))
    point = np.array([-0.01])
    one, c1 = bootstrap.familywise_bounds(point + 0.01 * z, point, 0.95)
    t = (point - (point + 0.01 * z)) / (0.01 * z).std(ddof=1)
    assert c1 == pytest.approx(np.quantile(t, 0.95)) and c1 == pytest.approx(norm.ppf(0.95), abs=0.08)
    assert one[0] == pytest.approx(-0.01 + c1 * (0.01 * z).std(ddof=1))
    # Findings that move together need no more than one does; independent ones need Sidak's ~2.69 for 14.
    same, c_same = bootstrap.familywise_bounds(np.hstack([z, 2 * z]) * 0.01, np.zeros(2), 0.95)
    assert c_same == pytest.approx(c1, abs=1e-9)
    _, c14 = bootstrap.familywise_bounds(rng.normal(size=(4000, 14)), np.zeros(14), 0.95)
    assert c14 == pytest.approx(norm.ppf(0.95 ** (1 / 14)), abs=0.12)
    # Not scored (NaN point), never resampled (all NaN), and not varying (the same model) findings.
    diff = np.hstack([z, np.full((4000, 1), np.nan), np.zeros((4000, 1)), z])
    bound, c = bootstrap.familywise_bounds(diff, np.array([np.nan, -0.5, 0.0, 0.0]), 0.95)
    assert np.isnan(bound[0]) and np.isnan(bound[1]) and bound[2] == 0.0
    assert c == pytest.approx(c1, abs=1e-9) and bound[3] == pytest.approx(c1 * z.std(ddof=1))


def test_a_lower_familywise_confidence_shows_smaller_drops():
    y, a, b, pid = replicate(14, drops={"Hernia": 0.05})
    d = bootstrap.paired_difference(y, a, b, pid, resamples=200, seed=0)
    hernia = d.findings[HERNIA]
    loose = d._bounds(0.5)
    assert loose[HERNIA] < hernia.familywise_high
    expected = bootstrap.familywise_bounds(d.replicates, np.array([f.difference for f in d.findings]), 0.5)[0]
    np.testing.assert_allclose(np.array(loose, dtype=float), expected)
    strict, loose_blocked = _blocked(d, 0.0), _blocked(d, 0.0, familywise=0.5)
    assert strict < loose_blocked and "Hernia" in loose_blocked, (strict, loose_blocked)
    assert all("with 50% confidence" in r for r in d.failures(-1.0, 0.0, familywise=0.5))
    with pytest.raises(ValueError, match="familywise confidence"):
        d.failures(0.0, 0.02, familywise=95)


def test_passed_names_what_was_not_shown():
    y, a, b, pid = replicate(16, drops={"Hernia": 0.03})
    d = bootstrap.paired_difference(y, a, b, pid, resamples=200, seed=0)
    assert d.failures(min_gain=-1.0, max_drop=0.02) == []  # this seed's Hernia drop is not shown
    text = d.passed(-1.0, 0.02)
    assert text.startswith(f"mean-AUROC gain lower bound {d.low:+.4f} is above -1.0000, and no finding is shown worse "
                           "(95% familywise over 14 findings) with a point drop over 0.0200")
    unshown = [f.finding for f in d.findings if f.difference < -0.02]
    assert "Hernia" in unshown and text.endswith("; not shown either way: " + "; ".join(d.unshown_drops(0.02)))
    assert all(f"{name}: point drop" in text for name in unshown)
    assert d.passed(-1.0, 1.0).endswith("with a point drop over 1.0000")  # nothing over the tolerance to name
