"""`cxr train` end to end: check → train on Ray → score the best checkpoint on test → record → register.

Everything that can be checked without Ray or MLflow is checked first (data, sizes), then the cluster's
resources. The driver opens the MLflow run before training (params, tags naming the data, code and cluster,
the dataset inputs) and rank 0 logs epochs into it live (an epoch callback); after Ray Train returns, the
driver scores the checkpoint Ray kept as best by validation mean AUROC on the test split (on the workers, through
`cxr.inference`'s pool; the predictions are saved in the run for a promotion to reuse), adds what the run
lacks (epochs not logged live come from the checkpointed history) and logs the model at the best epoch's
step, registered under `tracking.registered_model`. With `promote`, the new version is then evaluated and
promoted by `cxr.tracking.promotion`'s rules. A re-submitted run (same `run.storage_path` + `run.name`)
resumes training and logs into the same MLflow run; a finished one says so and does nothing, unless its data or
config changed (then it is refused, naming what changed). Each run records the patients it trained and
validated on (`cxr.tracking.provenance`), so a promotion can score it only on patients it never saw.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np

from cxr import config as cfgmod
from cxr import storage
from cxr.cluster import init_ray
from cxr.data import source as sources
from cxr.evaluation import figures, report
from cxr.evaluation.metrics import SCORE, auroc_summary, metric_name
from cxr.inference import predict_splits
from cxr.redact import redact
from cxr.tracking import provenance, runs
from cxr.tracking.handlers import EpochLogger
from cxr.tracking.models import log_model
from cxr.training import checkpoints, driver

log = logging.getLogger(__name__)
FINISHED = "cxr-finished.json"  # written beside the checkpoints when a run is complete


def run(cfg: cfgmod.Config, test_split: str = "test", promote: bool = False) -> dict[str, Any]:
    """Train, evaluate, track and register; returns the summary printed by `cxr train`.

    The MLflow run exists from the start: rank 0 fills in epochs as they end, and a run that dies is
    marked FAILED with the epochs it finished.
    """
    fingerprint = sources.fingerprint(cfg.data)
    finished = _finished(cfg, fingerprint)
    if finished is not None:
        return finished
    source = sources.for_config(cfg.data)
    plan = driver.plan_run(cfg, source)  # data, splits, sizes: wrong ones fail before Ray and MLflow start
    local = not os.environ.get("RAY_ADDRESS")
    init_ray()
    driver.require_resources(cfg, local)
    uri = cfg.tracking.tracking_uri or runs.default_uri(".")
    tags = {**runs.run_tags(cfg, fingerprint), **runs.cluster_tags()}
    run_id = runs.open_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                           redact(driver.run_path(cfg)), runs.safe_params(cfg.model_dump(mode="json")),
                           runs.artifact_location(uri, cfg.tracking.artifact_location), tags)
    log.info("MLflow run %s at %s", run_id, redact(uri))
    from mlflow.tracking import MlflowClient

    sizes = {s: source.split_size(cfg.data, s) for s in (cfg.data.train_split, cfg.data.val_split, test_split)}
    runs.log_datasets(MlflowClient(uri), run_id, cfg, fingerprint, sizes)
    learned = provenance.record(MlflowClient(uri), run_id, fingerprint,
                                source.patient_ids(cfg.data, cfg.data.train_split),
                                source.patient_ids(cfg.data, cfg.data.val_split))
    with runs.resume(uri, run_id, system_metrics=cfg.tracking.system_metrics):
        result = driver.run_trainer(cfg, source, plan, callbacks=[EpochLogger(uri, run_id)])
        for key, value in runs.placement_tags().items():
            MlflowClient(uri).set_tag(run_id, key, value)
        out = _score_and_record(cfg, source, result, test_split, uri, run_id, fingerprint, learned)
    if promote:
        _promote(cfg, out, uri)
    storage.write_text(storage.join(driver.run_path(cfg), FINISHED), json.dumps(
        {**{k: out[k] for k in ("epochs_done", "stopped_early", "best_epoch", "best_val_auroc_mean", "test",
                                "mlflow_run_id", "model_name", "model_version", "experiment", "tracking_uri")},
         "fingerprint": fingerprint, "config": _identity(cfg)}, default=str))
    return out


def record(cfg: cfgmod.Config, result: Any, uri: str, run_id: str, promote: bool = False,
           test_split: str = "test") -> dict[str, Any]:
    """Score, record and register a Ray Train result trained elsewhere (a sweep's best trial) into MLflow run
    `run_id`, exactly as `cxr train` does its own; with `promote`, through `cxr promote`'s rules."""
    fingerprint = sources.fingerprint(cfg.data)
    source = sources.for_config(cfg.data)
    from mlflow.tracking import MlflowClient

    learned = provenance.record(MlflowClient(uri), run_id, fingerprint,
                                source.patient_ids(cfg.data, cfg.data.train_split),
                                source.patient_ids(cfg.data, cfg.data.val_split))
    with runs.resume(uri, run_id):
        out = _score_and_record(cfg, source, result, test_split, uri, run_id, fingerprint, learned)
    if promote:
        _promote(cfg, out, uri)
    return out


def _promote(cfg: cfgmod.Config, out: dict[str, Any], uri: str) -> None:
    """The new version through `cxr.tracking.promotion`'s rules; the decision goes into `out`."""
    if not out.get("model_version"):
        return
    from cxr.tracking.promotion import promote as decide

    decision = decide(cfg.tracking.model_name, out["model_version"], tracking_uri=uri)
    out["promotion"], out["decision"] = decision, decision.explain()


class RunConflict(ValueError):
    """A finished run's name re-submitted with other data or another config: it would not be the run it names."""


def _identity(cfg: cfgmod.Config) -> dict[str, str]:
    """The settings that make a run what it is: all of them but its name and place, and the epochs (which may
    be raised to continue it). Credentials never reach the record (URLs redacted, secret keys dropped)."""
    flat = runs.safe_params(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not k.startswith("run.") and k != "optim.epochs"}


def _finished(cfg: cfgmod.Config, fingerprint: str) -> dict[str, Any] | None:
    """The record of a run that already completed (same storage path and name), unless more epochs are asked.

    The same name with other data or another config is refused: "already finished" would be a wrong answer."""
    url = storage.join(driver.run_path(cfg), FINISHED)
    if not storage.exists(url):
        return None
    done = json.loads(storage.read_text(url))
    name = cfg.run.name
    if done.get("fingerprint") not in (None, fingerprint):
        raise RunConflict(
            f"run {name} already finished on data with fingerprint {done['fingerprint'][:16]}…, but "
            f"{redact(cfg.data.location)} now has fingerprint {fingerprint[:16]}…: the data changed. Give the new "
            f"run another run.name (the finished one's checkpoints are at {redact(driver.run_path(cfg))})")
    if done.get("config") is not None:
        now = _identity(cfg)
        changed = sorted(k for k in set(now) | set(done["config"]) if now.get(k) != done["config"].get(k))
        if changed:
            shown = "; ".join(f"{k}: {done['config'].get(k)!r} → {now.get(k)!r}" for k in changed[:6])
            raise RunConflict(f"run {name} already finished with another config ({shown}"
                              f"{' …' if len(changed) > 6 else ''}): give the new run another run.name")
    if int(done["epochs_done"]) < cfg.optim.epochs and not done.get("stopped_early"):
        return None
    log.warning("run %s already finished (%s epochs); nothing to train", name, done["epochs_done"])
    return {**done, "already_finished": True, "run_path": redact(driver.run_path(cfg))}


def _val_column(metrics: dict[str, Any], findings: tuple[str, ...]) -> dict[str, float | None]:
    col: dict[str, float | None] = {}
    for name in findings:
        v = metrics.get(f"val_auroc/{metric_name(name)}")
        col[name] = None if v is None or not math.isfinite(float(v)) else float(v)
    col["mean"] = metrics.get(SCORE)
    return col


def _score_and_record(cfg: cfgmod.Config, source: sources.DataSource, result: Any, test_split: str, uri: str,
                      run_id: str, fingerprint: str, learned: dict[str, str]) -> dict[str, Any]:
    """The best checkpoint on the test split, then everything the MLflow run lacks (it is the active run)."""
    import keras
    import mlflow
    from mlflow.tracking import MlflowClient

    summary = driver.summarize(result)
    history = [runs.finite_numbers(row) for row in checkpoints.history(result.checkpoint)]
    best, best_metrics = driver.best_checkpoint(result)
    if best is None:
        raise RuntimeError(f"run {cfg.run.name}: Ray Train reported no checkpoint")
    best_epoch = int(best_metrics["epoch"])
    keras.mixed_precision.set_global_policy("float32")  # the registry's model: no bf16/fp16 kernels needed
    with best.as_directory() as ckpt:
        model = checkpoints.load_model(ckpt, cfg.model.name, cfg.data.image_size, cfg.model.dropout)
        skipped = checkpoints.read_state(ckpt).get("skipped", [])
        findings = checkpoints.findings(ckpt)
    batch = cfg.optim.eval_batch_size or 2 * cfg.optim.batch_size
    preds = predict_splits(checkpoint_uri(cfg, best), cfg.data, [test_split], outputs=len(findings),
                           batch_size=batch)[test_split]
    probs, labels = preds.present()
    test = auroc_summary(labels, probs, findings)
    val = _val_column(best_metrics, findings)
    table = report.auroc_text({"val": val, test_split: test})

    client = MlflowClient(uri)
    runs.log_missing_epochs(client, run_id, history)  # epochs rank 0 could not log live (server away, an old run)
    mlflow.log_metrics({f"{test_split}_auroc/{metric_name(k)}": v for k, v in test.items()
                        if v is not None and k != "mean"}, step=best_epoch)
    mlflow.log_metrics({f"{test_split}_auroc_mean": test["mean"] if test["mean"] is not None else math.nan,
                        "best_epoch": float(best_epoch), "best_val_auroc_mean": float(best_metrics[SCORE])},
                       step=best_epoch)
    runs.log_text(cfgmod.to_yaml(cfg), "resolved.yaml")
    runs.log_text(table + "\n", "auroc.txt")
    if skipped or preds.missing:
        runs.log_text(_skipped_text(skipped, preds.missing, test_split), "skipped_images.txt")
    if history:  # the curves first, the test split's single values after them
        runs.log_figure(figures.learning_curves(history), "learning_curves.png")
    runs.log_figure(figures.roc_grid(labels, probs, f"{cfg.run.name}: {test_split} ROC (best epoch {best_epoch})",
                                     findings), f"roc_{test_split}.png")
    info = log_model(model, name=f"{cfg.run.name}-epoch{best_epoch}", step=best_epoch, findings=findings,
                     registered_model=cfg.tracking.model_name,
                     tags={**learned, "cxr.data.fingerprint": fingerprint, "best_epoch": str(best_epoch),
                           "val_auroc_mean": f"{best_metrics[SCORE]:.4f}",
                           f"{test_split}_auroc_mean": f"{test['mean']:.4f}" if test["mean"] is not None else "",
                           f"{test_split}_fingerprint": fingerprint})
    _save_predictions(cfg, source, preds, test_split, fingerprint, info.model_id, findings)
    version = str(info.registered_model_version) if info.registered_model_version is not None else None
    return {**summary, "val": val, "test": test, "table": table, "tracking_uri": redact(uri),
            "mlflow_run_id": run_id, "experiment": cfg.tracking.experiment, "history": history,
            "experiment_id": client.get_run(run_id).info.experiment_id,
            "skipped_images": skipped, "test_images_skipped": preds.missing, "model_uri": info.model_uri,
            "model_name": cfg.tracking.model_name, "model_version": version,
            "stopped_early": summary["stopped_early"]}


def checkpoint_uri(cfg: cfgmod.Config, checkpoint: Any) -> str:
    """The URI of a Ray checkpoint of this run that other processes can load: run.storage_path/run.name/<dir>."""
    return storage.join(driver.run_path(cfg), checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def _save_predictions(cfg: cfgmod.Config, source: sources.DataSource, preds: Any, split: str, fingerprint: str,
                      model_id: str, findings: tuple[str, ...]) -> None:
    """The test predictions into the run (evaluation/<split>/), keyed so a promotion can reuse them."""
    import tempfile

    import mlflow

    from cxr.evaluation import saved
    from cxr.evaluation.evaluate import preprocessing

    key = saved.Key(model_id, fingerprint, split, int(preds.seen.size), tuple(findings), preprocessing(cfg.data))
    probs, labels = preds.present()
    with tempfile.TemporaryDirectory(prefix="cxr-saved-") as local:
        path = os.path.join(local, saved.FILE)
        saved.write(path, probs, labels, source.patients(cfg.data, split)[preds.seen], np.flatnonzero(preds.seen),
                    fingerprint, key)
        mlflow.log_artifact(path, f"evaluation/{split}")


def _skipped_text(skipped: list[str], test_missing: int, test_split: str) -> str:
    lines = [f"{len(skipped)} training images could not be read and were skipped:", *skipped]
    if test_missing:
        lines.append(f"{test_missing} {test_split} images could not be read and were left out of its scores")
    return "\n".join(lines) + "\n"
