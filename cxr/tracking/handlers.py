"""Rank 0's epoch handler: each epoch's metrics go into the driver's MLflow run as soon as it is checkpointed.

Attached to the training loop as an epoch callback (MONAI's handler idea; Ray's `setup_mlflow(rank_zero_only=
True)`), so the loop itself knows nothing of MLflow. Tracking is not worth a training run: if the server cannot
be reached, a warning says which epoch waits, and the driver logs it at the end from the checkpointed history.
An epoch already on record (a restarted worker group re-runs epochs after its checkpoint) is not logged again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cxr.redact import redact
from cxr.tracking.runs import log_epoch, logged_epochs

log = logging.getLogger(__name__)


class EpochLogger:
    """Logs every epoch once into MLflow run `run_id` at `tracking_uri`; created on the driver, used on rank 0."""

    rank_zero_only = True

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client: Any = None
        self.done: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:  # the client is made where the logger runs, not pickled to it
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "client": None, "done": set()}

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        try:
            self.done = logged_epochs(self.client, self.run_id)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            log.warning("MLflow unreachable; epochs are logged when the run ends: %s", redact(str(exc)))

    def on_epoch_end(self, metrics: Mapping[str, Any]) -> None:
        self.log(metrics)

    def log(self, row: Mapping[str, Any]) -> bool:
        """Log one epoch unless it is on record already; True if it is on record now."""
        if self.client is None:
            self._connect()
        epoch = int(row["epoch"])
        if epoch in self.done:
            return True
        try:
            log_epoch(self.client, self.run_id, row)
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            log.warning("MLflow: epoch %d not logged now (%s); it is logged when the run ends", epoch,
                        redact(str(exc)))
            return False
        self.done.add(epoch)
        return True
