"""Benchmark training throughput: the real input pipeline vs in-memory tensors, and 1 vs 2 Ray workers.

(1) One process, the real train step (cxr.training.step.DistributedSteps) fed by cxr.data.pipeline from shards,
    against the same step fed one cached batch from memory, in alternating windows (goal: ratio >= 0.9, the
    pipeline is never the bottleneck); for uint8 shards (the demo's) and JPEG shards.
(2) `cxr.training.driver.run_trainer` with 1 and 2 Ray Train workers on the demo's shards: img/s in total.

    python bench/train.py [--patients 300] [--steps 40] [--rounds 5] [--out bench-out/train.json]
    python bench/train.py --manifest SHARDS/manifest.json --no-ray      # (1) only, on shards you have
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def timed_steps(step, it, skip: int, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of n steps drawn from `it`, after `skip` untimed ones (see `pipeline_vs_memory`)."""
    for _ in range(skip):
        step.train_step(*next(it)).numpy()
    cpu0, t0 = os.times(), time.perf_counter()
    out = None
    for _ in range(n):
        out = step.train_step(*next(it))
    out.numpy()
    wall, cpu1 = time.perf_counter() - t0, os.times()
    return wall, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)


def pipeline_vs_memory(manifest: str, size: int, batch: int, steps: int, rounds: int, precision: str) -> dict:
    """The same step fed by the real pipeline and by one batch held in memory, in alternating windows.

    Alternation puts both feeds on the same moments of a host whose speed drifts by a third within the hour.
    Each window starts with untimed steps: the pipeline's first batches after a pause were prepared while it
    was idle (free, so they would flatter it), and its refill right after the switch would slow the memory
    window's first steps (which would flatter it too).
    """
    import keras
    import tensorflow as tf

    from cxr.data import pipeline
    from cxr.losses import loss_from_counts
    from cxr.models import build_model
    from cxr.training import step as distributed

    keras.mixed_precision.set_global_policy(precision)
    strategy = tf.distribute.get_strategy()
    model = build_model("small_cnn", size)
    optimizer = distributed.make_optimizer(1e-3, precision)
    step = distributed.DistributedSteps(strategy, model, optimizer, loss_from_counts(False, None, None), batch)
    real = iter(pipeline.make_dataset(manifest, "train", batch, training=True, seed=0, image_size=size))
    memory = iter(tf.data.Dataset.from_tensors(next(real)).repeat())
    timed_steps(step, memory, 1, 1)  # trace and warm up
    per_round = []
    for _ in range(rounds):
        per_round.append((timed_steps(step, memory, 5, steps), timed_steps(step, real, 12, steps)))
    (t_memory, c_memory), (t_pipeline, c_pipeline) = (
        [sum(x) for x in zip(*window, strict=True)] for window in zip(*per_round, strict=True))
    images = rounds * steps * batch
    return {"img_per_s_memory": round(images / t_memory, 1), "img_per_s_pipeline": round(images / t_pipeline, 1),
            "pipeline_over_memory": round(t_memory / t_pipeline, 3),
            "cores_memory": round(c_memory / t_memory, 2), "cores_pipeline": round(c_pipeline / t_pipeline, 2),
            "cpu_ms_per_img_memory": round(c_memory / images * 1e3, 3),
            "cpu_ms_per_img_pipeline": round(c_pipeline / images * 1e3, 3),
            "per_round": [round(m[0] / p[0], 3) for m, p in per_round]}


def ray_workers(manifest: str, size: int, batch: int, workers: int, precision: str, storage: str) -> dict:
    from cxr import config
    from cxr.cluster import init_ray
    from cxr.data import source
    from cxr.training import driver

    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [
        f"data.manifest_uri={manifest}", f"data.image_size={size}", "optim.epochs=2", f"optim.batch_size={batch}",
        f"scaling.num_workers={workers}", f"scaling.precision={precision}", f"run.storage_path={storage}",
        f"run.name=bench-{workers}w"])
    init_ray()
    s = driver.summarize(driver.run_trainer(cfg, source.SHARDS, driver.plan_run(cfg, source.SHARDS)))
    m = s["metrics"]
    return {"workers": workers, "img_per_s_total": round(m["images_per_s_total"], 1),
            "img_per_s_worker": round(m["images_per_s_worker"], 1), "step_time_s": round(m["step_time_s"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per window")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of memory and pipeline windows")
    ap.add_argument("--precision", default="float32", help="the demo config's; bf16 is no faster on this CPU")
    ap.add_argument("--codecs", nargs="+", default=["uint8", "jpeg"], help="shard codecs to feed; the first is "
                    "the demo's and also feeds the Ray runs")
    ap.add_argument("--manifest", help="existing shards (prepared at --size) instead of synth + prepare")
    ap.add_argument("--no-ray", action="store_true", help="only the pipeline vs memory part")
    ap.add_argument("--out", default="bench-out/train.json")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as tmp:
        manifests = {"given": args.manifest} if args.manifest else {}
        if not manifests:
            cli = [sys.executable, "-m", "cxr.cli"]
            subprocess.run([*cli, "synth", f"{tmp}/raw", "--patients", str(args.patients), "--size", "256"],
                           check=True)
            for codec in args.codecs:
                subprocess.run([*cli, "prepare", f"{tmp}/raw", f"{tmp}/{codec}", "--size", str(args.size),
                                "--codec", codec, "--images-per-shard", "100"], check=True)
                manifests[codec] = f"{tmp}/{codec}/manifest.json"
        result = {"model": "small_cnn", "size": args.size, "batch_per_worker": args.batch,
                  "precision": args.precision,
                  "pipeline_vs_memory": {codec: pipeline_vs_memory(m, args.size, args.batch, args.steps, args.rounds,
                                                                   args.precision)
                                         for codec, m in manifests.items()}}
        if not args.no_ray:
            first = next(iter(manifests.values()))  # the demo's codec
            result["ray"] = [ray_workers(first, args.size, args.batch, w, args.precision, f"{tmp}/ray")
                             for w in (1, 2)]
            result["two_over_one_workers"] = round(result["ray"][1]["img_per_s_total"]
                                                   / result["ray"][0]["img_per_s_total"], 3)
    print(f"small_cnn, {args.size} px, batch {args.batch}, {args.precision}; {args.rounds} rounds × {args.steps} "
          "timed steps per feed")
    print(f"{'shards':<8}{'memory img/s':>14}{'pipeline img/s':>16}{'ratio':>7}{'cores mem/pipe':>16}"
          f"{'CPU ms/img mem/pipe':>22}  per round")
    for codec, r in result["pipeline_vs_memory"].items():
        print(f"{codec:<8}{r['img_per_s_memory']:>14}{r['img_per_s_pipeline']:>16}{r['pipeline_over_memory']:>7}"
              f"{r['cores_memory']:>9} / {r['cores_pipeline']:<4}{r['cpu_ms_per_img_memory']:>13} / "
              f"{r['cpu_ms_per_img_pipeline']:<6}  {r['per_round']}")
    for r in result.get("ray", []):
        print(f"Ray Train, {r['workers']} worker(s): {r['img_per_s_total']} img/s")
    if "two_over_one_workers" in result:
        print(f"2 / 1 workers: {result['two_over_one_workers']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
