"""Time `cxr inspect` on a metadata-only root of NIH's full size (112,120 rows, 30,805 patients).

Rows are generated with NIH's per-finding prevalence so label parsing sees a realistic mix of label strings.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

from cxr import labels
from cxr.data import metadata

NIH_POSITIVES = [11559, 2776, 13317, 19894, 5782, 6331, 1431, 5302, 4667, 2303, 2516, 1686, 3385, 227]


def write_root(root: str, rows: int = 112_120, patients: int = 30_805, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pid = np.sort(rng.integers(1, patients + 1, rows))
    pid[:patients] = np.arange(1, patients + 1)
    pid.sort()
    p = np.array(NIH_POSITIVES) / 112_120
    y = rng.random((rows, 14)) < p
    lines = [metadata.HEADER + ","]  # the 2017 file's header, with its trailing comma
    follow: dict[int, int] = {}
    test, train_val = [], []
    for i in range(rows):
        f = follow.get(int(pid[i]), 0)
        follow[int(pid[i])] = f + 1
        name = f"{pid[i]:08d}_{f:03d}.png"
        (test if pid[i] % 10 < 2 else train_val).append(name)
        lines.append(f"{name},{labels.format_labels(y[i])},{f},{pid[i]},{rng.integers(1, 95)},M,PA,"
                     "2500,2048,0.171,0.171,")
    with open(os.path.join(root, "Data_Entry_2017.csv"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    for name, items in (("train_val_list.txt", train_val), ("test_list.txt", test)):
        with open(os.path.join(root, name), "w") as fh:
            fh.write("\n".join(items) + "\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        write_root(root)
        t0 = time.perf_counter()
        s = metadata.summary(metadata.load(root))
        dt = time.perf_counter() - t0
    out = {"rows": s["rows"], "patients": s["patients"], "seconds": round(dt, 2),
           "rows_per_second": round(s["rows"] / dt), "patient_overlap": s["patient_overlap"]}
    print(f"{'rows':>10} {'patients':>9} {'seconds':>8} {'rows/s':>10}")
    print(f"{out['rows']:>10,} {out['patients']:>9,} {out['seconds']:>8} {out['rows_per_second']:>10,}")
    json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "bench-inspect.json", "w"), indent=1)


if __name__ == "__main__":
    main()
