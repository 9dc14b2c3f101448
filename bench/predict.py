"""Benchmark the replica pool (cxr/inference.py): img/s of files and of splits against the model's forward pass.

For each model and for 1 and 2 replicas (Ray Data actors), in one run:
  (i)   forward: `predict_on_batch` on in-memory tensors, batch 32, in as many processes as replicas, each with
        the intra-op threads a replica gets (`Pool.for_cluster`), timed over the same window: the ceiling;
  (ii)  files: `predict_files` (`cxr predict`, explain) over PNG files, reading and decoding included;
  (iii) split: a config's splits through the pool as `predict_splits` runs them (test scoring, evaluate,
        promote): read tasks read a part of the shards per replica through the input pipeline, the
        replicas predict the batches.
Rates (ii) and (iii) are steady rates within one run: the driver stamps each batch as it arrives, drops the
warm-up (until about one call's images per replica have arrived: Ray, the replicas loading the model, the
first traced call) and divides the images that arrived after it by the time they took. Ratio = (ii) or (iii)
over (i); goal >= 0.8. The steady window must last seconds (small_cnn: 32,768 files and the splits 4 times,
about 10 s each here): windows of 2-4 s gave ratios from 0.6 to 1.16 for the same code. Over the same
window the bench counts the CPU time of every process by role (replicas, read tasks and Ray's other
workers, the driver, Ray's services), and the cores (i) keeps busy: a replica predicts no faster per core
than (i), so where the same cores read and predict the ratio is at most the replicas' cores over (i)'s
("bound"). Models: the demo's small_cnn at 128 px (256² phantom PNGs of `cxr synth`, uint8 shards at
128 px) and DenseNet-121 at 224 px (copies of NIH's 1024² PNGs, uint8 shards at 224 px from the phantoms).
Random weights: the forward cost does not depend on them, and there are no downloads here.

    python bench/predict.py [--patients 1725] [--files 32768] [--split-repeats 4] [--densenet-files 768]
                            [--out bench-out/predict.json]
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
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "..", "shared", "samples", "nih-png")
BATCH = 32


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cxr.cli", *args], check=True, capture_output=True)


def log_model(name: str, size: int, tracking: str) -> str:
    """A randomly initialised model registered in a bench MLflow store; its models:/ URI."""
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


# ------------------------------------------------------------------------------------------- (i) forward


def forward_worker(model_uri: str, tracking: str, threads: int, seconds: float) -> None:
    """Child process: load the model as a replica does, warm up, say ready, wait for go, then predict in-memory
    batches for `seconds` (finishing the batch under way) and print the rate."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)  # as Predictor does, before the model
    from cxr.models import loading

    model = loading.load(model_uri, tracking).model
    size = int(model.input_shape[1])
    x = np.random.default_rng(0).random((BATCH, size, size, 1), dtype=np.float32)
    for _ in range(2):
        model.predict_on_batch(x)
    print("ready", flush=True)
    sys.stdin.readline()
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.predict_on_batch(x)
        images += BATCH
    print(json.dumps({"images": images, "seconds": time.perf_counter() - t0}), flush=True)


def forward(model_uri: str, tracking: str, processes: int, threads: int, seconds: float) -> dict:
    """Sum of the rates of `processes` forward workers running over the same window."""
    cmd = [sys.executable, os.path.abspath(__file__), "--forward-worker", model_uri, tracking, str(threads),
           str(seconds)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"forward worker failed: {p.wait()}")
    import psutil

    cpu = [psutil.Process(p.pid) for p in procs]
    before = [c.cpu_times() for c in cpu]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    got = [json.loads(p.stdout.readline()) for p in procs]
    busy = sum(a.user + a.system - b.user - b.system for a, b in zip((c.cpu_times() for c in cpu), before, strict=True))
    for p in procs:
        p.wait()
    return {"img_per_s": round(sum(g["images"] / g["seconds"] for g in got), 1), "threads": threads,
            "processes": processes, "cores": round(busy / max(g["seconds"] for g in got), 2),
            "load_avg": load_average()}


# ------------------------------------------------------------------------------ (ii) files, (iii) a split


def role(pid: int, cmdline: list[str]) -> str | None:
    """Which part of the pool a process is, by its command line (Ray names its workers `ray::<task>`)."""
    line = " ".join(cmdline)
    if pid == os.getpid():
        return "driver"
    if line.startswith("ray::"):
        return "replicas" if "Predictor" in line else "read tasks and Ray's other workers"
    return "Ray's services" if "/ray/" in line or "ray." in line else None


class CpuWindow:
    """CPU seconds of each role's processes between `start` (the end of the warm-up) and `stop`."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.started = 0.0

    @staticmethod
    def _times() -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                kind = role(p.info["pid"], p.info["cmdline"] or [])
                if kind:
                    t = p.cpu_times()
                    out[p.info["pid"]] = (kind, t.user + t.system)
            except psutil.Error:  # gone, or not ours to read
                continue
        return out

    def start(self) -> None:
        self.before = {pid: t for pid, (_, t) in self._times().items()}
        self.started = time.perf_counter()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.started
        cores: dict[str, float] = {}
        for pid, (kind, t) in self._times().items():
            cores[kind] = cores.get(kind, 0.0) + (t - self.before.get(pid, 0.0)) / wall
        return {"cores": {k: round(v, 2) for k, v in sorted(cores.items())},
                "cores_used": round(sum(cores.values()), 2)}


class Stamps:
    """Each batch's arrival (seconds since the call, images); the CPU window opens when the warm-up's images
    have arrived, where `steady` starts counting."""

    def __init__(self, warm_images: int) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.warm_images, self.total, self.t0, self.cpu = warm_images, 0, time.perf_counter(), CpuWindow()

    def stamp(self, images: int) -> None:
        self.arrivals.append((time.perf_counter() - self.t0, images))
        self.total += images
        if not self.cpu.started and self.total >= self.warm_images:
            self.cpu.start()

    def result(self) -> dict:
        return {**steady(self.arrivals, self.warm_images), "cpu": self.cpu.stop()}



def steady(arrivals: list[tuple[float, int]], warm_images: int) -> dict:
    """The steady rate from (seconds since the call, images) per arrived batch: the batches up to the one that
    brings the count to `warm_images` are the warm-up; rate = images after it / time from it to the last."""
    total, warm_at, warm_count = 0, None, 0
    for t, n in arrivals:
        total += n
        if warm_at is None and total >= warm_images:
            warm_at, warm_count = t, total
    counted = total - warm_count
    if warm_at is None or counted <= 0 or arrivals[-1][0] <= warm_at:
        raise SystemExit(f"too few batches after the warm-up ({len(arrivals)} batches, {total} images): "
                         "use more images")
    after = sum(1 for t, _ in arrivals if t > warm_at)
    return {"images": total, "batches": len(arrivals), "batches_after_warmup": after,
            "warmup_s": round(warm_at, 2), "whole_run_s": round(arrivals[-1][0], 2),
            "steady_img_per_s": round(counted / (arrivals[-1][0] - warm_at), 1)}


def through_files(model_uri: str, tracking: str, paths: list[str], size: int, replicas: int,
                  per_call: int) -> dict:
    """`predict_files` over `paths`, each batch stamped as it arrives; every file must be predicted."""
    from cxr.inference import predict_files

    stamps = Stamps(replicas * per_call)
    for batch in predict_files(model_uri, paths, size, tracking, BATCH, replicas, per_call=per_call):
        stamps.stamp(len(batch["index"]))
        assert not any(batch["error"]), [e for e in batch["error"] if e][:3]
    return {**stamps.result(), "files_per_call": per_call, "load_avg": load_average()}


def through_split(model_uri: str, tracking: str, data: Any, splits: list[str], replicas: int,
                  per_call: int, repeats: int) -> dict:
    """The splits, `repeats` times over, through the pool as `predict_splits` runs them (read tasks reading a part
    per replica, the replicas predicting), each batch stamped as it arrives; every image must come back exactly
    `repeats` times."""
    from cxr import inference
    from cxr.data import source as sources

    source = sources.for_config(data)
    sizes = {s: int(source.split_size(data, s)) for s in splits}
    pool = inference.Pool.for_cluster(replicas)
    seen = {s: np.zeros(n, np.int64) for s, n in sizes.items()}
    stamps = Stamps(pool.replicas * per_call)
    for batch in inference._split_rows(pool, model_uri, tracking, BATCH, data, list(sizes) * repeats, per_call):
        stamps.stamp(len(batch["index"]))
        assert np.isfinite(batch["probs"]).all()
        for s in sizes:
            np.add.at(seen[s], batch["index"][batch["split"] == s], 1)
    for s, counts in seen.items():
        if not (counts == repeats).all():
            raise SystemExit(f"split {s}: {int((counts != repeats).sum())} images not predicted {repeats} times")
    return {**stamps.result(), "splits": sizes, "repeats": repeats, "per_call": per_call,
            "load_avg": load_average()}


# ------------------------------------------------------------------------------------------------ main


def nih_copies(samples: str, n: int, folder: str) -> list[str]:
    sources = sorted(glob.glob(os.path.join(samples, "*.png")))
    if not sources:
        raise SystemExit(f"no NIH sample PNGs in {samples} (--nih-samples)")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i:06d}.png") for i in range(n)]
    for i, path in enumerate(paths):
        shutil.copyfile(sources[i % len(sources)], path)
    return paths


def rated(x: dict, ceiling: float, cores: float) -> dict:
    """A pool run with its ratio to the forward pass and its bound (the replicas' cores over the forward pass's)."""
    return {**x, "ratio": round(x["steady_img_per_s"] / ceiling, 3),
            "bound": round(x["cpu"]["cores"].get("replicas", 0.0) / cores, 3)}


def measure(name: str, uri: str, tracking: str, paths: list[str], size: int, data: Any, splits: list[str],
            per_call: int, seconds: float, repeats: int) -> dict:
    """(i), (ii), (iii) with 1 and 2 replicas; the forward pass before and after the pool runs of each count."""
    from cxr.inference import Pool

    row: dict[str, Any] = {"size": size, "files": len(paths)}
    for replicas in (1, 2):
        threads = Pool.for_cluster(replicas).threads
        before = forward(uri, tracking, replicas, threads, seconds)
        files = through_files(uri, tracking, paths, size, replicas, per_call)
        split = through_split(uri, tracking, data, splits, replicas, per_call, repeats)
        after = forward(uri, tracking, replicas, threads, seconds)
        ceiling = (before["img_per_s"] + after["img_per_s"]) / 2
        cores = (before["cores"] + after["cores"]) / 2
        row[f"{replicas}_replicas"] = {
            "forward": {"img_per_s": round(ceiling, 1), "cores": round(cores, 2), "before": before, "after": after},
            "files": rated(files, ceiling, cores), "split": rated(split, ceiling, cores)}
        print(json.dumps({name: {replicas: row[f"{replicas}_replicas"]}}), flush=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--forward-worker":
        forward_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=1725, help="phantom patients (cxr synth; the demo's count)")
    ap.add_argument("--files", type=int, default=32768, help="phantom file paths for small_cnn (the ~6,000 "
                    "phantoms, cycled)")
    ap.add_argument("--split-repeats", type=int, default=4, help="times small_cnn scores its splits in one run")
    ap.add_argument("--densenet-files", type=int, default=768, help="NIH PNG copies for DenseNet-121 (about 30 s "
                    "of it here)")
    ap.add_argument("--densenet-split", default="val", help="the phantom split DenseNet-121 scores")
    ap.add_argument("--nih-samples", default=SAMPLES, help="folder of NIH PNGs to copy")
    ap.add_argument("--models", nargs="+", default=["small_cnn", "densenet121"], help="which of the two")
    ap.add_argument("--out", default="bench-out/predict.json")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from cxr.config import Data

    results: dict[str, Any] = {"cpus": os.cpu_count(), "batch_size": BATCH, "load_avg_start": load_average(),
                               "models": {}}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-predict-") as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        raw = os.path.join(tmp, "raw")
        cli("synth", raw, "--patients", str(args.patients), "--size", "256", "--seed", "0")
        pngs = sorted(glob.glob(os.path.join(raw, "images", "*.png")))
        phantoms = [pngs[i % len(pngs)] for i in range(args.files)]
        nih = nih_copies(args.nih_samples, args.densenet_files, os.path.join(tmp, "nih"))
        # small_cnn: 256 files or split rows a call (as in production); DenseNet-121 (~28 img/s): 32, so that a
        # few minutes give a dozen timestamps.
        for name, size, paths, splits, per_call, seconds, repeats in (
                ("small_cnn", 128, phantoms, ["train", "val", "test"], 256, 4.0, args.split_repeats),
                ("densenet121", 224, nih, [args.densenet_split], 32, 8.0, 1)):
            if name not in args.models:
                continue
            shards = os.path.join(tmp, f"shards-{size}")
            cli("prepare", raw, shards, "--size", str(size), "--codec", "uint8", "--images-per-shard", "250")
            data = Data(manifest_uri=os.path.join(shards, "manifest.json"), image_size=size)
            uri = log_model(name, size, tracking)
            results["models"][name] = measure(name, uri, tracking, paths, size, data, splits, per_call, seconds,
                                              repeats)
    results["load_avg_end"] = load_average()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nload average (1, 5, 15 min) at start {results['load_avg_start']}, at end {results['load_avg_end']}")
    print(f"{'model':<12}{'replicas':>9}{'forward':>9}{'files':>9}{'ratio':>7}{'bound':>7}{'split':>9}{'ratio':>7}"
          f"{'bound':>7}{'window s':>12}   (steady img/s; bound: the replicas' cores over the forward pass's)")
    for name, r in results["models"].items():
        for replicas in (1, 2):
            x = r[f"{replicas}_replicas"]
            f, s = x["files"], x["split"]
            print(f"{name:<12}{replicas:>9}{x['forward']['img_per_s']:>9.1f}{f['steady_img_per_s']:>9.1f}"
                  f"{f['ratio']:>7.2f}{f['bound']:>7.2f}{s['steady_img_per_s']:>9.1f}"
                  f"{s['ratio']:>7.2f}{s['bound']:>7.2f}"
                  f"{f['whole_run_s'] - f['warmup_s']:>6.1f},{s['whole_run_s'] - s['warmup_s']:>5.1f}")


if __name__ == "__main__":
    main()
