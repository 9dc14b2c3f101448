"""Each published layout end to end on synthetic phantoms, then transfer between them (issue 21's closing table).

For nih, chexpert, mimic-cxr-jpg, padchest and csv: `cxr synth --messy` → prepare → train a few epochs → evaluate
(test mean AUROC with its patient-bootstrap 95% CI). Then the NIH model, registered as champion, is fine-tuned on
the CheXpert layout (compared with the CheXpert layout trained from scratch for as many epochs) and validated
externally on the PadChest and CheXpert layouts over the findings the label sets share. One process, one local Ray.

    python bench/layouts.py --patients 300 --size 64 --epochs 3 --out layouts.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

LAYOUTS = ("nih", "chexpert", "mimic-cxr-jpg", "padchest", "csv")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _train(base: str, name: str, manifest_uri: str, uri: str, args: argparse.Namespace, *extra: str) -> dict:
    from cxr import config as cfgmod
    from cxr import workflow

    overrides = [f"data.manifest_uri={manifest_uri}", f"data.image_size={args.size}", f"optim.epochs={args.epochs}",
                 f"optim.batch_size={args.batch_size}", "optim.steps_per_log=1000", "scaling.num_workers=1",
                 f"run.storage_path={base}/runs", f"run.name={name}", f"tracking.tracking_uri={uri}",
                 "tracking.experiment=bench-layouts", f"tracking.run_name={name}",
                 f"tracking.registered_model=bench-{name}", *extra]
    return workflow.run(cfgmod.with_absolute_paths(cfgmod.load(CONFIG, overrides)))


def _mean(ev: Any) -> dict:
    m = ev.report["auroc"]["mean"]
    return {"auroc": m["auroc"], "low": m["low"], "high": m["high"], "scored": len(ev.report["auroc"]["findings"])}


def layout_run(base: str, name: str, uri: str, args: argparse.Namespace, seed: int) -> dict:
    """synth → prepare → train → evaluate one layout; the row of the table."""
    from cxr import synth
    from cxr.data import manifest
    from cxr.data.prepare import prepare
    from cxr.data.shards import Params
    from cxr.evaluation.evaluate import evaluate

    start = time.perf_counter()
    root = os.path.join(base, name)
    synth.synthesize_layout(root, name, args.patients, size=args.size, seed=seed, messy=True, workers=1,
                            progress=False)
    prepared = prepare(root, os.path.join(base, f"{name}-shards"), Params(size=args.size, images_per_shard=500),
                       dataset=name)
    m = manifest.load(prepared["manifest"])
    trained = _train(base, name, prepared["manifest"], uri, args)
    ev = evaluate(trained["model_uri"], prepared["manifest"], resamples=args.resamples, tracking_uri=uri,
                  record=False)
    return {"layout": name, "manifest": prepared["manifest"], "model_uri": trained["model_uri"],
            "model_version": trained["model_version"],
            "images": {s: m.images(s) for s in ("train", "val", "test")}, "findings": len(m.findings),
            "uncertain": int(sum(sum(m.uncertain_counts(s)) for s in m.splits)),
            "excluded": prepared["excluded_by_metadata"], "val_auroc": trained["val"]["mean"],
            "test": _mean(ev), "seconds": round(time.perf_counter() - start, 1)}


def transfer(base: str, rows: dict, uri: str, args: argparse.Namespace) -> dict:
    """The NIH model as champion: fine-tuned on CheXpert (vs. scratch), and validated on PadChest and CheXpert."""
    from mlflow.tracking import MlflowClient

    from cxr.evaluation.evaluate import evaluate

    MlflowClient(uri).set_registered_model_alias("bench-nih", "champion", rows["nih"]["model_version"])
    champion = "models:/bench-nih@champion"
    start = time.perf_counter()
    tuned = _train(base, "chexpert-finetuned", rows["chexpert"]["manifest"], uri, args, f"model.weights={champion}")
    ev = evaluate(tuned["model_uri"], rows["chexpert"]["manifest"], resamples=args.resamples, tracking_uri=uri,
                  record=False)
    out = {"fine_tune": {"from": champion, "epochs": args.epochs, "val_auroc": tuned["val"]["mean"],
                         "test": _mean(ev), "seconds": round(time.perf_counter() - start, 1),
                         "scratch": {"val_auroc": rows["chexpert"]["val_auroc"], "test": rows["chexpert"]["test"]}},
           "external": {}}
    for name in ("padchest", "chexpert"):
        ev = evaluate(champion, rows[name]["manifest"], resamples=args.resamples, tracking_uri=uri, record=False)
        out["external"][name] = {**_mean(ev), "unscored": [u["finding"] for u in ev.report["unscored"]
                                                          if u["side"] == "model"],
                                 "data_only": [u["finding"] for u in ev.report["unscored"] if u["side"] == "data"]}
    return out


def _ci(t: dict) -> str:
    if t["auroc"] is None:
        return "undefined"
    return f"{t['auroc']:.3f} [{t['low']:.3f}, {t['high']:.3f}]"


def render(rows: dict, tr: dict, args: argparse.Namespace) -> str:
    lines = [f"{args.patients} patients per layout, {args.size} px, {args.epochs} epochs, small_cnn, 1 worker",
             f"{'layout':<14}{'train/val/test':>18}{'findings':>9}{'uncertain':>10}{'excluded':>9}"
             f"{'val AUROC':>10}  {'test mean AUROC [95% CI]':<26}{'seconds':>8}"]
    for r in rows.values():
        i = r["images"]
        val = "–" if r["val_auroc"] is None else f"{r['val_auroc']:.3f}"
        lines.append(f"{r['layout']:<14}{i['train']:>8}/{i['val']}/{i['test']:<5}{r['findings']:>9}{r['uncertain']:>10}"
                     f"{r['excluded']:>9}{val:>10}  {_ci(r['test']):<26}{r['seconds']:>8}")
    ft = tr["fine_tune"]
    lines += ["", f"fine-tune {ft['from']} -> chexpert layout, {ft['epochs']} epochs: test {_ci(ft['test'])} "
              f"(val {ft['val_auroc']:.3f}); from scratch: test {_ci(ft['scratch']['test'])} "
              f"(val {ft['scratch']['val_auroc']:.3f})"]
    for name, e in tr["external"].items():
        lines.append(f"NIH model on {name} layout: mean AUROC over {e['scored']} shared findings {_ci(e)}; "
                     f"unscored NIH findings: {', '.join(e['unscored']) or 'none'}; data-only: "
                     f"{', '.join(e['data_only']) or 'none'}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resamples", type=int, default=500)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    from cxr import quiet

    quiet.install()
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as base:
        uri = f"sqlite:///{base}/mlflow.db"
        rows = {name: layout_run(base, name, uri, args, seed=i) for i, name in enumerate(LAYOUTS)}
        tr = transfer(base, rows, uri, args)
    print(render(rows, tr, args))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "layouts": rows, **tr}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
