"""Benchmark `cxr predict`: img/s from files on disk against the model's own forward pass on in-memory tensors.

For each model, in one run: (1) the forward pass alone, `predict_on_batch` over batches already in memory
(the ceiling), then (2) `cxr.inference.predict` over image files with 1 and with 2 model replicas (Ray Data
actors): listing, reading, decoding, preprocessing and writing the table included. Each is timed over n and
over 3n files; the steady rate is 2n / (t(3n) - t(n)), so the start-up (Ray, the replicas loading the model)
cancels out and is reported apart as t(n) - n / rate. Ratio = steady (2) / (1) at the same batch size; goal
>= 0.8. Models: the demo's small_cnn at 128 px on 256² phantom PNGs
(what `make demo` scores) and DenseNet-121 at 224 px on NIH's full-size 1024² PNGs. Random weights: the
forward cost does not depend on them, and there are no downloads here.

    python bench/predict.py [--images 2048] [--densenet-images 96] [--out bench-out/predict.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "..", "shared", "samples", "nih-png")


def make_files(kind: str, n: int, folder: str) -> None:
    """n PNG files: 256² phantoms (cxr synth) or copies of the NIH samples (1024²); `folder`-first holds the
    first third of them (hard links)."""
    os.makedirs(folder, exist_ok=True)
    os.makedirs(folder + "-first", exist_ok=True)
    if kind == "phantom":
        raw = os.path.join(folder, "..", "synth")
        subprocess.run([sys.executable, "-m", "cxr.cli", "synth", raw, "--patients", "120", "--size", "256"],
                       check=True, capture_output=True)
        sources = sorted(glob.glob(os.path.join(raw, "images", "*.png")))
    else:
        sources = sorted(glob.glob(os.path.join(SAMPLES, "*.png")))
        if not sources:
            raise SystemExit(f"no NIH sample PNGs in {SAMPLES}")
    for i in range(n):
        shutil.copyfile(sources[i % len(sources)], os.path.join(folder, f"{i:06d}.png"))
        if i < n // 3:
            os.link(os.path.join(folder, f"{i:06d}.png"), os.path.join(folder + "-first", f"{i:06d}.png"))


def log_model(name: str, size: int, tracking: str) -> str:
    import keras
    import mlflow

    from cxr.models import build_model
    from cxr.tracking.models import log_model as log
    from cxr.tracking.runs import artifact_location, experiment_id

    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(tracking), "bench-predict",
                                                      artifact_location(tracking)))  # not ./mlruns
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    with mlflow.start_run():
        log(build_model(name, size), name=name, step=1, registered_model=f"bench-{name}")
    return f"models:/bench-{name}/1"


def forward_only(model_uri: str, tracking: str, n: int, batch: int) -> float:
    """img/s of predict_on_batch over in-memory float batches of the model's input, after one warm-up batch."""
    from cxr.models import loading

    model = loading.load(model_uri, tracking).model
    size = int(model.input_shape[1])
    x = np.random.default_rng(0).random((batch, size, size, 1), dtype=np.float32)
    model.predict_on_batch(x)
    t0 = time.perf_counter()
    for _ in range(-(-n // batch)):
        model.predict_on_batch(x)
    return -(-n // batch) * batch / (time.perf_counter() - t0)


def through_predict(model_uri: str, tracking: str, folder: str, workers: int, batch: int, out: str) -> dict:
    """Seconds of `cxr predict` over the first third of the files and over all of them; the steady rate."""
    from cxr.predict import predict

    seconds = {}
    for label, spec in (("n", folder + "-first"), ("3n", folder)):
        summary = predict(model_uri, spec, out, num_workers=workers, batch_size=batch, tracking_uri=tracking,
                          progress=False)
        assert summary.errors == 0 and summary.predicted == summary.inputs, summary
        seconds[label] = (summary.inputs, summary.seconds)
    (n, t1), (n3, t3) = seconds["n"], seconds["3n"]
    rate = (n3 - n) / (t3 - t1)
    return {"images": [n, n3], "seconds": [round(t1, 2), round(t3, 2)], "startup_s": round(t1 - n / rate, 2),
            "steady_img_per_s": round(rate, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048, help="n, files for the demo model (3n are read too)")
    ap.add_argument("--densenet-images", type=int, default=96, help="n, files for DenseNet-121")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="bench-out/predict.json")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = {"cpus": os.cpu_count(), "batch_size": args.batch_size, "models": {}}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-predict-") as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        for name, size, kind, n in (("small_cnn", 128, "phantom", args.images),
                                    ("densenet121", 224, "nih", args.densenet_images)):
            folder = os.path.join(tmp, f"{kind}-files", "images")
            make_files(kind, 3 * n, folder)
            uri = log_model(name, size, tracking)
            forward = forward_only(uri, tracking, n, args.batch_size)
            row = {"size": size, "files": kind, "forward_img_per_s": round(forward, 1)}
            for workers in (1, 2):
                got = through_predict(uri, tracking, folder, workers, args.batch_size,
                                      os.path.join(tmp, f"{name}-{workers}.parquet"))
                row[f"predict_{workers}_workers"] = {**got, "ratio": round(got["steady_img_per_s"] / forward, 3)}
            row["scaling_2_over_1"] = round(row["predict_2_workers"]["steady_img_per_s"]
                                            / row["predict_1_workers"]["steady_img_per_s"], 3)
            results["models"][name] = row
            print(json.dumps({name: row}), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\n{'model':<12}{'forward':>9}{'1 worker':>10}{'ratio':>7}{'start s':>9}{'2 workers':>11}{'ratio':>7}"
          f"{'start s':>9}{'2/1':>6}   (steady img/s)")
    for name, r in results["models"].items():
        one, two = r["predict_1_workers"], r["predict_2_workers"]
        print(f"{name:<12}{r['forward_img_per_s']:>9.1f}{one['steady_img_per_s']:>10.1f}{one['ratio']:>7.2f}"
              f"{one['startup_s']:>9.1f}{two['steady_img_per_s']:>11.1f}{two['ratio']:>7.2f}{two['startup_s']:>9.1f}"
              f"{r['scaling_2_over_1']:>6.2f}")


if __name__ == "__main__":
    main()
