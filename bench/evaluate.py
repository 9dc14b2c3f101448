"""Time the patient bootstrap of `cxr evaluate` on synthetic predictions the size of NIH's official test split.

25,596 images of 2,797 patients (heavy-tailed follow-ups per patient, as in NIH), 14 findings at NIH's test-split
positive counts, labels and scores correlated within a patient; two models for the paired comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from cxr.evaluation import bootstrap
from cxr.labels import FINDINGS

TEST_IMAGES, TEST_PATIENTS = 25_596, 2_797
TEST_POSITIVES = [3279, 1069, 4658, 6112, 1748, 1623, 555, 2665, 1815, 925, 1093, 435, 1143, 86]  # FINDINGS order


def synthetic_test_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N, 14], scores of model a, scores of model b, patient ids [N]) shaped like the NIH test split."""
    rng = np.random.default_rng(seed)
    share = rng.lognormal(0.0, 1.2, TEST_PATIENTS)  # a few patients with dozens of follow-ups, most with few
    per_patient = 1 + rng.multinomial(TEST_IMAGES - TEST_PATIENTS, share / share.sum())
    pid = np.repeat(np.arange(TEST_PATIENTS), per_patient)
    effect = rng.normal(size=(TEST_PATIENTS, len(FINDINGS)))[pid]  # a patient's findings persist across images
    latent = effect + rng.normal(size=effect.shape)
    y = np.zeros(latent.shape, dtype=np.uint8)
    for k, positives in enumerate(TEST_POSITIVES):
        y[np.argsort(-latent[:, k])[:positives], k] = 1

    def model(signal: float) -> np.ndarray:
        logit = signal * y + 0.3 * effect + rng.normal(size=y.shape) - 2.0
        return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)  # float32 sigmoid outputs, as models write

    return y, model(0.9), model(1.0), pid


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    y, a, b, pid = synthetic_test_split(args.seed)
    rss_inputs = peak_rss_mb()
    t0 = time.perf_counter()
    bootstrap.patient_resamples(pid, args.resamples, args.seed)
    t_resamples = time.perf_counter() - t0
    t0 = time.perf_counter()
    ci = bootstrap.auroc_ci(y, a, pid, args.resamples, seed=args.seed)
    t_ci = time.perf_counter() - t0
    t0 = time.perf_counter()
    diff = bootstrap.paired_difference(y, a, b, pid, args.resamples, seed=args.seed)
    t_paired = time.perf_counter() - t0
    out = {
        "images": len(y), "patients": int(len(np.unique(pid))), "findings": y.shape[1],
        "max_images_per_patient": int(np.bincount(pid).max()), "resamples": args.resamples,
        "patient_resamples_seconds": round(t_resamples, 3), "auroc_ci_seconds": round(t_ci, 2),
        "paired_difference_seconds": round(t_paired, 2),
        "peak_rss_mb_before": round(rss_inputs), "peak_rss_mb": round(peak_rss_mb()),
        "mean_auroc": [ci.mean, ci.mean_low, ci.mean_high],
        "mean_difference": [diff.difference, diff.low, diff.high],
    }
    print(f"{out['images']:,} images, {out['patients']:,} patients (max {out['max_images_per_patient']} images), "
          f"{out['findings']} findings, {out['resamples']:,} resamples")
    print(f"patient_resamples  {t_resamples:7.3f} s")
    print(f"auroc_ci           {t_ci:7.2f} s   mean AUROC {ci.mean:.4f} [{ci.mean_low:.4f}, {ci.mean_high:.4f}]")
    print(f"paired_difference  {t_paired:7.2f} s   b - a {diff.difference:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]")
    print(f"peak RSS           {out['peak_rss_mb']} MB (after imports and inputs: {out['peak_rss_mb_before']} MB)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
