"""`cxr train` end to end: check → train on Ray → score the best checkpoint on test → record in MLflow.

Everything that can be checked without Ray or MLflow is checked first (data, sizes), then the cluster's
resources. The driver opens the MLflow run before training and rank 0 logs epochs into it live (an epoch
callback); after Ray Train returns, the driver scores the checkpoint Ray kept as best by validation mean
AUROC on the test split and adds what the run lacks (epochs not logged live come from the checkpointed
history). A re-submitted run (same `run.storage_path` + `run.name`) resumes training and logs into the same
MLflow run.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from cxr import config as cfgmod
from cxr.cluster import init_ray
from cxr.data import source as sources
from cxr.evaluation import figures, report
from cxr.evaluation.metrics import SCORE, auroc_summary
from cxr.evaluation.predict import predict_model
from cxr.labels import FINDINGS
from cxr.redact import redact
from cxr.tracking import runs
from cxr.tracking.handlers import EpochLogger
from cxr.tracking.models import log_model
from cxr.training import checkpoints, driver

log = logging.getLogger(__name__)


def run(cfg: cfgmod.Config, test_split: str = "test") -> dict[str, Any]:
    """Train, evaluate and track; returns the summary printed by `cxr train`.

    The MLflow run exists from the start: rank 0 fills in epochs as they end, and a run that dies is
    marked FAILED with the epochs it finished.
    """
    source = sources.for_config(cfg.data)
    plan = driver.plan_run(cfg, source)  # data, splits, sizes: wrong ones fail before Ray and MLflow start
    local = not os.environ.get("RAY_ADDRESS")
    init_ray()
    driver.require_resources(cfg, local)
    uri = cfg.tracking.tracking_uri or runs.default_uri(".")
    run_id = runs.open_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                           redact(driver.run_path(cfg)), runs.safe_params(cfg.model_dump(mode="json")))
    log.info("MLflow run %s at %s", run_id, redact(uri))
    try:
        result = driver.run_trainer(cfg, source, plan, callbacks=[EpochLogger(uri, run_id)])
        out = _score_and_record(cfg, source, result, test_split, uri, run_id)
    except BaseException as exc:
        runs.end_run(uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return out


def _val_column(metrics: dict[str, Any]) -> dict[str, float | None]:
    col: dict[str, float | None] = {}
    for name in FINDINGS:
        v = metrics.get(f"val_auroc/{name}")
        col[name] = None if v is None or not math.isfinite(float(v)) else float(v)
    col["mean"] = metrics.get(SCORE)
    return col


def _score_and_record(cfg: cfgmod.Config, source: sources.DataSource, result: Any, test_split: str, uri: str,
                      run_id: str) -> dict[str, Any]:
    """The best checkpoint on the test split, then everything the MLflow run lacks; ends it FINISHED."""
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
    batch = cfg.optim.eval_batch_size or 2 * cfg.optim.batch_size
    preds = predict_model(model, cfg.data, test_split, batch, source)
    probs, labels = preds.present()
    test = auroc_summary(labels, probs)
    val = _val_column(best_metrics)
    table = report.auroc_text({"val": val, test_split: test})

    client = MlflowClient(uri)
    on_record = runs.logged_epochs(client, run_id)
    for row in history:  # epochs rank 0 could not log live (server away, or a run from before)
        if int(row["epoch"]) not in on_record:
            runs.log_epoch(client, run_id, row)
    with runs.resume(uri, run_id):
        mlflow.log_metrics({f"{test_split}_auroc/{k}": v for k, v in test.items() if v is not None and k != "mean"},
                           step=best_epoch)
        mlflow.log_metrics({f"{test_split}_auroc_mean": test["mean"] if test["mean"] is not None else math.nan,
                            "best_epoch": float(best_epoch), "best_val_auroc_mean": float(best_metrics[SCORE])},
                           step=best_epoch)
        runs.log_text(cfgmod.to_yaml(cfg), "resolved.yaml")
        runs.log_text(table + "\n", "auroc.txt")
        if skipped or preds.missing:
            runs.log_text(_skipped_text(skipped, preds.missing, test_split), "skipped_images.txt")
        runs.log_figure(figures.roc_grid(labels, probs, f"{cfg.run.name}: {test_split} ROC (best epoch "
                                         f"{best_epoch})"), f"roc_{test_split}.png")
        if history:
            runs.log_figure(figures.learning_curves(history), "learning_curves.png")
        log_model(model, name=f"{cfg.run.name}-epoch{best_epoch}", step=best_epoch)
    return {**summary, "val": val, "test": test, "table": table, "tracking_uri": uri, "mlflow_run_id": run_id,
            "experiment": cfg.tracking.experiment, "history": history, "skipped_images": skipped,
            "test_images_skipped": preds.missing}


def _skipped_text(skipped: list[str], test_missing: int, test_split: str) -> str:
    lines = [f"{len(skipped)} training images could not be read and were skipped:", *skipped]
    if test_missing:
        lines.append(f"{test_missing} {test_split} images could not be read and were left out of its scores")
    return "\n".join(lines) + "\n"
