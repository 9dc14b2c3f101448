"""Refusal rates of promotion's per-finding drop rule, simulated at NIH official-test counts (docs/promotion.md).

Each replicate draws a fresh split (tests/dropsim.py: 25,596 images of 2,797 patients, NIH's positives per
finding), two models with noise correlated 0.8 and chosen true AUROCs, and runs the real `paired_difference`.
Scenario "equal": both models equally good on every finding; the others give some findings a true drop. For
each rule the fraction of replicates in which a finding blocks promotion is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import dropsim  # noqa: E402  (tests/dropsim.py: the simulation the test uses too)

from cxr.evaluation import bootstrap  # noqa: E402
from cxr.labels import FINDINGS  # noqa: E402

SCENARIOS = {  # true AUROC drop of the candidate per finding; every other finding equal
    "equal": {},
    "A": {"Effusion": 0.03, "Infiltration": 0.05, "Pneumonia": 0.03, "Hernia": 0.05},
    "B": {"Effusion": 0.05, "Infiltration": 0.03, "Pneumonia": 0.05, "Hernia": 0.03},
    "C": {"Effusion": 0.02, "Infiltration": 0.02, "Pneumonia": 0.08, "Hernia": 0.08},
    "D": {"Effusion": 0.01, "Infiltration": 0.01, "Pneumonia": 0.10, "Hernia": 0.10},
}


def rules(d: bootstrap.PairedDifference, max_drop: float) -> dict[str, np.ndarray]:
    """Which findings block under each rule compared (the first is the one `failures` applies)."""
    point = np.array([f.difference for f in d.findings], dtype=float)
    fw = np.array([f.familywise_high for f in d.findings], dtype=float)
    alpha, k = 1 - d.confidence, d.scored
    bonferroni = np.nanquantile(d.replicates, 1 - alpha / k, axis=0)  # one-sided percentile bound at alpha / k
    shown = np.nan_to_num(fw, nan=np.inf) < 0
    return {
        "familywise_maxt": shown & (point < -max_drop),
        "familywise_maxt_no_tolerance": shown,
        "familywise_maxt_below_minus_max_drop": np.nan_to_num(fw, nan=np.inf) < -max_drop,
        "bonferroni_percentile": (bonferroni < 0) & (point < -max_drop),
        "old_point_estimate": dropsim.old_rule(point, max_drop),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=100, help="per drop scenario")
    parser.add_argument("--equal-replicates", type=int, default=200, help="for the equal-models scenario")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--max-drop", type=float, default=0.02)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    out = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "resamples": args.resamples,
           "max_drop": args.max_drop, "confidence": 0.95, "rho": 0.8, "scenarios": {}}
    started = time.perf_counter()
    for name in args.scenarios.split(","):
        drops = SCENARIOS[name]
        n = args.equal_replicates if name == "equal" else args.replicates
        blocked: dict[str, np.ndarray] = {}
        seconds, margins, critical = [], [], []
        for i in range(n):
            y, a, b, pid = dropsim.replicate(seed=1000 * (1 + list(SCENARIOS).index(name)) + i, drops=drops)
            t0 = time.perf_counter()
            d = bootstrap.paired_difference(y, a, b, pid, resamples=args.resamples, seed=i)
            seconds.append(time.perf_counter() - t0)
            critical.append(d.critical)
            margins.append([f.familywise_high - f.difference for f in d.findings])  # how far a drop must be shown
            for rule, hit in rules(d, args.max_drop).items():
                blocked.setdefault(rule, np.zeros((n, len(FINDINGS)), bool))[i] = hit
        res = {"drops": drops, "replicates": n, "paired_difference_seconds": round(float(np.median(seconds)), 2),
               "critical_median": round(float(np.median(critical)), 3),
               "familywise_margin_median": {f: round(float(m), 4) for f, m in
                                            zip(FINDINGS, np.median(margins, axis=0), strict=True)},
               "rules": {}}
        for rule, hits in blocked.items():
            equal = [j for j, f in enumerate(FINDINGS) if f not in drops]
            res["rules"][rule] = {
                "any_equal_finding": float(hits[:, equal].any(axis=1).mean()),  # false refusals
                "per_finding": {f: float(hits[:, j].mean()) for j, f in enumerate(FINDINGS)},
            }
        out["scenarios"][name] = res
        print(f"scenario {name} ({n} replicates, {res['paired_difference_seconds']} s per paired_difference), "
              f"true drops {drops or 'none'}; max-t critical value {res['critical_median']}, familywise margin "
              + ", ".join(f"{f} {res['familywise_margin_median'][f]:.4f}" for f in ("Effusion", "Hernia")))
        for rule, r in res["rules"].items():
            shown = ", ".join(f"{f} {r['per_finding'][f]:.2f}" for f in drops)
            print(f"  {rule:38s} equal findings refused {r['any_equal_finding']:.3f}" + (f"; {shown}" if shown else ""))
        sys.stdout.flush()
        out["seconds"] = round(time.perf_counter() - started)
        if args.out:  # after every scenario: a long run stopped early keeps what it measured
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
