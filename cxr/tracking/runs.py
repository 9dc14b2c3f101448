"""The tracking stage: one MLflow run per training run, resumed (same run id) when training resumes.

The driver opens the run before training (params, status RUNNING), rank 0 logs each epoch's metrics as
soon as its checkpoint is reported (so a long run can be watched, and a dead one is still on record), and
the driver finishes it: epochs not yet logged, test scores, plots, the model, and FINISHED or FAILED.
An epoch is logged once: a restarted worker group re-runs epochs after its checkpoint, and the first
value logged for an epoch stays. Only the rank-0 worker and the driver talk to MLflow.

Parameters are the resolved config, flattened, with URLs stripped of any user:password part and
secret-looking keys dropped: credentials live in the environment and must never reach a tracking server.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cxr.redact import redact

log = logging.getLogger(__name__)
RUN_TAG = "cxr.run"  # the run's storage path: a re-submitted run finds its MLflow run by it
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key)", re.IGNORECASE)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def safe_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config fit for MLflow params: no secret-looking keys, no credentials inside URLs."""
    params = {}
    for key, value in flatten(config).items():
        if SECRET_KEY.search(key):
            continue
        text = "" if value is None else str(value)
        params[key] = redact(text)[:6000]
    return params


def finite_numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite int/float entries of a metrics row as floats (flags, NaN AUROCs and text left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """An epoch's metrics as MLflow takes them: finite numbers only; "val_auroc/Mass" keeps its "/", by which
    the MLflow UI groups the per-finding charts into one section per split."""
    return {k: v for k, v in finite_numbers(row).items() if k != "epoch"}


def logged_epochs(client: Any, run_id: str) -> set[int]:
    """Epochs on record: every epoch logs the validation mean AUROC."""
    from cxr.evaluation.metrics import SCORE

    return {int(m.step) for m in client.get_metric_history(run_id, SCORE)}


def log_epoch(client: Any, run_id: str, row: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = int(row["epoch"])
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in epoch_metrics(row).items()])


def open_run(tracking_uri: str, experiment: str, run_name: str, key: str, params: Mapping[str, str]) -> str:
    """The MLflow run tagged `key` (status set back to RUNNING), or a new one with `params`; its id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        changed = sorted(k for k, v in params.items() if found[0].data.params.get(k, v) != v)
        if changed:  # MLflow params cannot change: the run keeps the values it started with
            log.warning("resuming MLflow run %s, whose params differ from this config in %s; the run keeps "
                        "its first values", run_id, ", ".join(changed[:10]) + (" …" if len(changed) > 10 else ""))
        client.update_run(run_id, status="RUNNING")
        return run_id
    run_id = client.create_run(exp_id, run_name=run_name, tags={RUN_TAG: key}).info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def resume(tracking_uri: str, run_id: str) -> Iterator[Any]:
    """Make the run `open_run` created the active MLflow run (for the fluent log_* calls); yields it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.start_run(run_id=run_id)
    try:
        yield active
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run()


def log_figure(fig: Any, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def default_uri(base: str = ".") -> str:
    """The local default: a SQLite store beside the demo output (MLflow's UI reads it with `mlflow ui`)."""
    return f"sqlite:///{os.path.abspath(os.path.join(base, 'mlflow.db'))}"
