"""Time `cxr evaluate`'s subgroups on synthetic predictions the size of NIH's official test split.

25,596 images of 2,797 patients (heavy-tailed follow-ups, `bench/evaluate.py`'s split), 14 findings, three
attributes as NIH has them: sex per patient (about 56% M, a few unknown), age per patient in years (NIH's
spread, a few unknown) in the default bands, view per image (about 60% PA, 40% AP). The overall CI and the
subgroups share one draw of the resamples, as in `cxr evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from evaluate import peak_rss_mb, synthetic_test_split  # noqa: E402  (bench/evaluate.py)

from cxr.evaluation import bootstrap, subgroups  # noqa: E402


def synthetic_attributes(pid: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Sex and age per patient, view per image, with a few unknown values of each."""
    rng = np.random.default_rng([seed, 1])
    patients = int(pid.max()) + 1
    sex = np.where(rng.random(patients) < 0.56, "M", "F").astype(object)
    sex[rng.random(patients) < 0.002] = ""
    age = np.clip(rng.normal(47, 17, patients), 1, 95).round()
    age[rng.random(patients) < 0.002] = np.nan
    view = np.where(rng.random(len(pid)) < 0.6, "PA", "AP").astype(object)
    view[rng.random(len(pid)) < 0.001] = ""
    return {"sex": sex[pid], "age": age[pid], "view": view}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    y, scores, _, pid = synthetic_test_split(args.seed)
    attributes = synthetic_attributes(pid, args.seed)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    draws = bootstrap.patient_resamples(pid, args.resamples, args.seed)
    ci = bootstrap.auroc_ci(y, scores, pid, args.resamples, seed=args.seed, draws=draws)
    t_overall = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    result = subgroups.subgroup_stats(y, scores, draws, ci, attributes)
    t_subgroups, c_subgroups = time.perf_counter() - t0, time.process_time() - c0
    load = max(load, os.getloadavg()[0])
    cells = {a: len(v) for a, v in result["attributes"].items()}
    scored = sum(f["auroc"] is not None for a in result["attributes"].values() for c in a.values()
                 for f in c["findings"].values())
    out = {"images": len(y), "patients": int(len(np.unique(pid))), "findings": y.shape[1],
           "resamples": args.resamples, "cells": cells, "scored_cell_findings": scored,
           "overall_ci_seconds": round(t_overall, 2), "subgroups_seconds": round(t_subgroups, 2),
           "subgroups_cpu_seconds": round(c_subgroups, 2),
           "load_average_1min": round(load, 2), "cpus": os.cpu_count(), "peak_rss_mb": round(peak_rss_mb())}
    print(f"{out['images']:,} images, {out['patients']:,} patients, {out['findings']} findings, "
          f"{out['resamples']:,} resamples; cells {cells} ({scored} cell x finding AUROCs scored)")
    print(f"overall CI (draws + auroc_ci)  {t_overall:7.2f} s")
    print(f"subgroups (3 attributes)       {t_subgroups:7.2f} s   ({c_subgroups:.2f} CPU s in this process)")
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs, peak RSS {out['peak_rss_mb']} MB")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
