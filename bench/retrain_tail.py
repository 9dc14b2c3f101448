"""Benchmark the retrain tail: the test scoring of the best checkpoint after training, then the promotion.

Two code trees (--old, --new: a folder, or a git revision of this repository unpacked by `git archive`; by default
07fae6d, the commit before evaluation moved to the Ray actor pool, and this checkout), each
in a child process with PYTHONPATH at its tree, and two scenarios per tree, each in a fresh MLflow sqlite store:
`cxr train --config configs/demo.yaml --promote` twice (small_cnn at 128 px on phantoms, few epochs); the first
run becomes champion without an evaluation, the second is the candidate compared against it. The figures are of
the second run, timed in-process by wrapping (not changing) the functions both trees have:
`cxr.workflow._score_and_record` (test scoring, MLflow logging of metrics, figures and the model), inside it the
prediction call (`predict_model` in the driver before, `predict_splits` through the pool after), and
`cxr.tracking.promotion.promote` with the `cxr.evaluation.evaluate.evaluate` calls and predictions inside it.

Scenarios: "same data" (both runs on one prepared data set: the new code can reuse both models' saved test
predictions) and "new data" (the second run on the same phantoms prepared with another seed: another fingerprint,
so the champion is predicted again and only the candidate's predictions are reused: what a retrain on new data
does). Load average is sampled every 5 s while each child runs (the machine may be shared).

    python bench/retrain_tail.py [--old 07fae6d] [--new .] [--patients 400] [--epochs 2]
        [--out bench-out/retrain-tail.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS: list[dict[str, Any]] = []
RUN = [0]  # which `cxr train` of the child is running (1, 2)


def _images(out: Any) -> int:
    """Images predicted: one Predictions (driver path) or a dict of them by split (pool path)."""
    preds = out.values() if isinstance(out, dict) else [out]
    return sum(int(p.seen.sum()) for p in preds)


def _wrap(module: Any, attr: str, what: str, count: bool = False) -> None:
    """Time every call of module.attr (looked up at call time by its callers) into EVENTS."""
    fn = getattr(module, attr)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        EVENTS.append({"run": RUN[0], "what": what, "seconds": time.perf_counter() - t0,
                       "images": _images(out) if count else None, "arg": str(args[0]) if args else None})
        return out

    setattr(module, attr, timed)


def child(tree: str, data1: str, data2: str, work: str, epochs: int, out: str) -> None:
    """Two `cxr train --promote` runs of the code at `tree`, in-process, with the tail's functions timed."""
    import cxr

    if not os.path.abspath(cxr.__file__).startswith(os.path.abspath(tree) + os.sep):
        raise SystemExit(f"imported cxr from {cxr.__file__}, not from {tree}: set PYTHONPATH")
    from cxr import cli, workflow
    from cxr.evaluation import evaluate
    from cxr.tracking import promotion

    driver_path = hasattr(workflow, "predict_model")  # the old tree predicts in the driver
    predict = "predict_model" if driver_path else "predict_splits"
    _wrap(workflow, "run", "train_total")
    _wrap(workflow, "_score_and_record", "score_and_record")
    _wrap(workflow, predict, "test_predict", count=True)
    _wrap(promotion, "promote", "promote")
    _wrap(evaluate, "evaluate", "evaluate")
    _wrap(evaluate, predict, "promote_predict", count=True)
    store = f"sqlite:///{work}/mlflow.db"
    for run, manifest in ((1, data1), (2, data2)):
        RUN[0] = run
        code = cli.main(["train", "--config", os.path.join(tree, "configs", "demo.yaml"), "--promote",
                         f"data.manifest_uri={manifest}/manifest.json", f"optim.epochs={epochs}",
                         f"run.name=tail-{run}", f"run.storage_path={work}/ray", f"tracking.tracking_uri={store}"])
        if code:
            raise SystemExit(f"cxr train of run {run} exited {code}")
    with open(out, "w") as f:
        json.dump({"path": "driver" if driver_path else "pool", "events": EVENTS}, f)


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The second run's tail: seconds and images of each part."""
    two = [e for e in events if e["run"] == 2]

    def total(what: str) -> float:
        return round(sum(e["seconds"] for e in two if e["what"] == what), 2)

    def images(what: str) -> int:
        return sum(e["images"] or 0 for e in two if e["what"] == what)

    score, prom = total("score_and_record"), total("promote")
    return {"train_total_s": total("train_total"), "test_scoring_s": score, "test_predict_s": total("test_predict"),
            "test_images": images("test_predict"), "promotion_s": prom,
            "promotion_evaluations": sum(e["what"] == "evaluate" for e in two),
            "promotion_predict_s": total("promote_predict"), "promotion_images_predicted": images("promote_predict"),
            "tail_s": round(score + prom, 2)}


class LoadSampler(threading.Thread):
    """The 1-minute load average every 5 s while a child runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop.wait(5.0)


def _cli(tree: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": tree}
    subprocess.run([sys.executable, "-m", "cxr.cli", *args], check=True, cwd=tree, env=env, capture_output=True)


def _tree(where: str, tmp: str) -> str:
    """A code tree: `where` if it is a folder, else that git revision of this repository unpacked under tmp."""
    if os.path.isdir(where):
        return os.path.abspath(where)
    out = os.path.join(tmp, f"tree-{where}")
    os.makedirs(out)
    archive = subprocess.run(["git", "-C", ROOT, "archive", where], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default="07fae6d", help="the code before: a folder or a git revision")
    p.add_argument("--new", default=ROOT, help="the code after: a folder or a git revision")
    p.add_argument("--patients", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="bench-out/retrain-tail.json")
    p.add_argument("--child", nargs=5, metavar=("TREE", "DATA1", "DATA2", "WORK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        tree, data1, data2, work, out = args.child
        child(tree, data1, data2, work, args.epochs, out)
        return
    with tempfile.TemporaryDirectory(prefix="cxr-tail-") as tmp:
        trees = {"old": _tree(args.old, tmp), "new": _tree(args.new, tmp)}
        results: dict[str, Any] = {"patients": args.patients, "epochs": args.epochs, "cpus": os.cpu_count(),
                                   "trees": {"old": args.old, "new": args.new}, "runs": []}
        raw, a, b = (os.path.join(tmp, n) for n in ("raw", "shards-a", "shards-b"))
        _cli(trees["new"], "synth", raw, "--patients", str(args.patients), "--size", "256", "--seed", "0")
        for out, seed in ((a, "0"), (b, "1")):  # the same phantoms, shards and val split drawn by another seed
            _cli(trees["new"], "prepare", raw, out, "--size", "128", "--codec", "uint8", "--images-per-shard", "250",
                 "--seed", seed)
        for scenario, second in (("same data", a), ("new data", b)):
            for version, tree in trees.items():
                work = os.path.join(tmp, f"{version}-{scenario.replace(' ', '-')}")
                os.makedirs(work)
                out = os.path.join(work, "events.json")
                sampler = LoadSampler()
                sampler.start()
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--epochs", str(args.epochs),
                                       "--child", tree, a, second, work, out], cwd=tree,
                                      env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True)
                sampler.stop.set()
                sampler.join()
                if proc.returncode:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    raise SystemExit(f"{version} / {scenario}: child exited {proc.returncode}")
                with open(out) as f:
                    got = json.load(f)
                row = {"version": version, "scenario": scenario, "path": got["path"], **summarize(got["events"]),
                       "child_wall_s": round(time.perf_counter() - t0, 1),
                       "load_avg_1m": {"mean": round(sum(sampler.samples) / len(sampler.samples), 2),
                                       "max": round(max(sampler.samples), 2)},
                       "events": got["events"]}
                results["runs"].append(row)
                print(f"{scenario:9s} {version:3s} ({row['path']}): test scoring {row['test_scoring_s']:6.2f} s "
                      f"(predict {row['test_predict_s']:5.2f} s, {row['test_images']} img), promotion "
                      f"{row['promotion_s']:6.2f} s ({row['promotion_evaluations']} evaluations, "
                      f"{row['promotion_images_predicted']} img predicted in {row['promotion_predict_s']:.2f} s), "
                      f"tail {row['tail_s']:6.2f} s; load {row['load_avg_1m']['mean']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'scenario':10s} {'code':4s} {'test scoring':>12s} {'promotion':>10s} {'tail':>7s}  images predicted")
    for r in results["runs"]:
        print(f"{r['scenario']:10s} {r['version']:4s} {r['test_scoring_s']:11.2f}s {r['promotion_s']:9.2f}s "
              f"{r['tail_s']:6.2f}s  {r['test_images']} + {r['promotion_images_predicted']}")


if __name__ == "__main__":
    main()
