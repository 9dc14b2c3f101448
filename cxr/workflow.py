"""`cxr train` end to end: validate → train on Ray → score the best checkpoint on test → record in MLflow.

The driver opens the MLflow run before training and rank 0 logs epochs into it live; after Ray Train
returns, the driver scores the checkpoint Ray kept as best by validation mean AUROC on the test split and
adds what the run lacks (epochs not logged live come from the checkpointed history). A re-submitted run
(same `run.storage_path` + `run.name`) resumes training and logs into the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from cxr import checkpoints, evaluate, report, tracking
from cxr import config as cfgmod
from cxr.cluster import init_ray
from cxr.labels import FINDINGS
from cxr.redact import redact

log = logging.getLogger(__name__)


def _history(result: Any) -> list[dict[str, float]]:
    """One dict per epoch, from the latest checkpoint: it carries the whole history across restarts
    (Ray's own metrics table starts afresh when a worker group is restarted)."""
    from cxr.checkpoints import STATE_FILE

    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as directory, open(os.path.join(directory, STATE_FILE)) as fh:
        history = json.load(fh).get("history", [])
    return [tracking.finite_numbers(rec) for rec in history]


def _val_column(metrics: dict[str, Any]) -> dict[str, float | None]:
    col: dict[str, float | None] = {}
    for name in FINDINGS:
        v = metrics.get(f"val_auroc/{name}")
        col[name] = None if v is None or not math.isfinite(float(v)) else float(v)
    col["mean"] = metrics.get("val_auroc_mean")
    return col


def _float32_model(cfg: cfgmod.Config, weights_file: str) -> Any:
    """The best model in float32 for the registry: servers and notebooks should not need bf16 kernels."""
    import keras

    from cxr.models import build_model

    keras.mixed_precision.set_global_policy("float32")
    model = build_model(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    model.load_weights(weights_file)
    return model


def run(cfg: cfgmod.Config, test_split: str = "test") -> dict[str, Any]:
    """Train, evaluate and track; returns the summary printed by `cxr train`.

    The MLflow run exists from the start: rank 0 fills in epochs as they end, and a run that dies is
    marked FAILED with the epochs it finished.
    """
    from cxr import train

    plan = train.plan_run(cfg, train.data_source())  # manifest, splits, sizes: wrong ones fail before Ray/MLflow
    local = not os.environ.get("RAY_ADDRESS")
    init_ray()
    train.require_resources(cfg, local)
    uri = cfg.tracking.tracking_uri or tracking.default_uri(".")
    run_id = tracking.open_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.run.name,
                               redact(train.run_path(cfg)),
                               tracking.safe_params(cfg.model_dump(mode="json")))
    log.info("MLflow run %s at %s", run_id, redact(uri))
    try:
        result = train.run_trainer(cfg, live_tracking={"uri": uri, "run_id": run_id}, plan=plan)
        out = _score_and_record(cfg, result, test_split, uri, run_id)
    except BaseException as exc:
        tracking.end_run(uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return out


def _score_and_record(cfg: cfgmod.Config, result: Any, test_split: str, uri: str, run_id: str) -> dict[str, Any]:
    """The best checkpoint on the test split, then everything the MLflow run lacks; ends it FINISHED."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cxr import train

    summary = train.summarize(result)
    history = _history(result)
    best = result.get_best_checkpoint(metric=train.SCORE, mode="max")
    if best is None:
        raise RuntimeError(f"run {cfg.run.name}: Ray Train reported no checkpoint")
    best_metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    with best.as_directory() as ckpt:
        probs, labels = evaluate.predict_split(ckpt, cfg, test_split)
        test = evaluate.score(probs, labels)
        model = _float32_model(cfg, os.path.join(ckpt, checkpoints.MODEL_FILE))
    val = _val_column(best_metrics)
    table = report.auroc_table({"val": val, test_split: test})

    client = MlflowClient(uri)
    on_record = tracking.logged_epochs(client, run_id)
    for row in history:  # epochs rank 0 could not log live (server away, or a run from before)
        if int(row["epoch"]) not in on_record:
            tracking.log_epoch(client, run_id, row)
    with tracking.resume(uri, run_id):
        mlflow.log_metrics({f"test_auroc.{k}": v for k, v in test.items() if v is not None and k != "mean"})
        mlflow.log_metrics({"test_auroc_mean": test["mean"] or float("nan"),
                            "best_epoch": float(best_metrics["epoch"]),
                            "best_val_auroc_mean": float(best_metrics[train.SCORE])})
        tracking.log_text(cfgmod.to_yaml(cfg), "resolved.yaml")
        tracking.log_text(table + "\n", "auroc.txt")
        tracking.log_figure(report.roc_grid(labels, probs, f"{cfg.run.name}: {test_split} ROC (best epoch "
                                            f"{int(best_metrics['epoch']) + 1})"), f"roc_{test_split}.png")
        if history:
            tracking.log_figure(report.learning_curves(history), "learning_curves.png")
        tracking.log_model(model, name="model")
    return {**summary, "val": val, "test": test, "table": table, "tracking_uri": uri, "mlflow_run_id": run_id,
            "experiment": cfg.tracking.experiment, "history": history}
