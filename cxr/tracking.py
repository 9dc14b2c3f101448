"""The tracking stage: one MLflow run per training run, resumed (same run id) when training resumes.

Only the rank-0 worker and the driver talk to MLflow. Parameters are the resolved config, flattened, with
URLs stripped of any user:password part and secret-looking keys dropped: credentials live in the
environment and must never reach a tracking server.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from cxr import storage

log = logging.getLogger(__name__)
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
        params[key] = storage.redact(text)[:6000]
    return params


@contextmanager
def run(tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None) -> Iterator[Any]:
    """Start (or, given `run_id`, resume) an MLflow run; yields the active run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if run_id is None:
        mlflow.set_experiment(experiment)
        active = mlflow.start_run(run_name=run_name)
    else:
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


def log_model(model: Any, name: str = "model") -> None:
    """Log a Keras 3 model with MLflow's Keras flavour (`mlflow.keras`)."""
    import mlflow

    mlflow.keras.log_model(model, name=name)


def log_local_dir(path: str, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(path, artifact_path=artifact_path)


def default_uri(base: str = ".") -> str:
    """The local default: a SQLite store beside the demo output (MLflow's UI reads it with `mlflow ui`)."""
    return f"sqlite:///{os.path.abspath(os.path.join(base, 'mlflow.db'))}"
