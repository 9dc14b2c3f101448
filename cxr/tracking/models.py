"""Models into MLflow: the run's best model logged with MLflow's Keras flavour, at the best epoch's step."""

from __future__ import annotations

from typing import Any


def log_model(model: Any, name: str, step: int | None = None) -> Any:
    """Log a Keras 3 model (`mlflow.keras`) into the active run; the LoggedModel links the metrics of `step`."""
    import mlflow

    return mlflow.keras.log_model(model, name=name, step=step or 0)
