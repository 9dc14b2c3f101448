"""Benchmark training throughput: the real input pipeline vs in-memory tensors, and 1 vs 2 Ray workers.

(1) One process, the real train step (cxr.distributed.DistributedSteps) fed by cxr.pipeline from prepared shards,
    against the same step fed one cached batch from memory (goal: ratio >= 0.9, the pipeline is never the
    bottleneck). (2) `cxr.train.fit` with 1 and 2 Ray Train workers on the same shards: img/s in total.

    python bench/train.py [--patients 300] [--steps 60] [--out bench-out/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def steps_per_second(steps_obj, batches, n: int) -> float:
    it = iter(batches)
    images, labels = next(it)
    steps_obj.train_step(images, labels).numpy()  # trace + warm up
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        images, labels = next(it)
        out = steps_obj.train_step(images, labels)
    out.numpy()
    return n / (time.perf_counter() - t0)


def pipeline_vs_memory(manifest: str, size: int, batch: int, steps: int, precision: str) -> dict:
    import keras
    import tensorflow as tf

    from cxr import distributed, pipeline
    from cxr.losses import loss_from_counts
    from cxr.models import build_model

    keras.mixed_precision.set_global_policy(precision)
    strategy = tf.distribute.get_strategy()
    model = build_model("small_cnn", size)
    optimizer = distributed.make_optimizer(1e-3, precision)
    step = distributed.DistributedSteps(strategy, model, optimizer, loss_from_counts(False, None, None), batch)
    real = pipeline.make_dataset(manifest, "train", batch, training=True, seed=0, image_size=size).repeat()
    first = next(iter(real))
    memory = tf.data.Dataset.from_tensors(first).repeat()
    rate_memory = steps_per_second(step, memory, steps) * batch
    rate_pipeline = steps_per_second(step, real, steps) * batch
    return {"img_per_s_memory": round(rate_memory, 1), "img_per_s_pipeline": round(rate_pipeline, 1),
            "pipeline_over_memory": round(rate_pipeline / rate_memory, 3)}


def ray_workers(manifest: str, size: int, batch: int, workers: int, precision: str, storage: str) -> dict:
    from cxr import config, train
    from cxr.cluster import init_ray

    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [
        f"data.manifest_uri={manifest}", f"data.image_size={size}", "optim.epochs=2", f"optim.batch_size={batch}",
        f"scaling.num_workers={workers}", f"scaling.precision={precision}", f"run.storage_path={storage}",
        f"run.name=bench-{workers}w"])
    init_ray()
    s = train.summarize(train.run_trainer(cfg))
    m = s["metrics"]
    return {"workers": workers, "img_per_s_total": round(m["images_per_s_total"], 1),
            "img_per_s_worker": round(m["images_per_s_worker"], 1), "step_time_s": round(m["step_time_s"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--precision", default="float32", help="the demo config's; bf16 is no faster on this CPU")
    ap.add_argument("--out", default="bench-out/train.json")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "cxr.cli"]
        subprocess.run([*cli, "synth", f"{tmp}/raw", "--patients", str(args.patients), "--size", "256"], check=True)
        subprocess.run([*cli, "prepare", f"{tmp}/raw", f"{tmp}/shards", "--size", str(args.size),
                        "--images-per-shard", "100"], check=True)
        manifest = f"{tmp}/shards/manifest.json"
        result = {"model": "small_cnn", "size": args.size, "batch_per_worker": args.batch,
                  "precision": args.precision,
                  **pipeline_vs_memory(manifest, args.size, args.batch, args.steps, args.precision)}
        result["ray"] = [ray_workers(manifest, args.size, args.batch, w, args.precision, f"{tmp}/ray") for w in (1, 2)]
    result["two_over_one_workers"] = round(result["ray"][1]["img_per_s_total"] / result["ray"][0]["img_per_s_total"], 3)
    print(f"{'what':<28}{'value':>12}")
    for k, v in result.items():
        if k != "ray":
            print(f"{k:<28}{v:>12}")
    for r in result["ray"]:
        print(f"{str(r['workers']) + ' Ray worker(s) img/s':<28}{r['img_per_s_total']:>12}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
