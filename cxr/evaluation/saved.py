"""A split's predictions saved beside the model's run, and found again only when they are exactly reusable.

Test scoring after training and every recorded `cxr evaluate` log `evaluation/<split>/predictions.npz` into the
model's run: the scored images' probabilities, labels, patients and split positions, with what they depend on
(the LoggedModel id, the data's fingerprint, the split, its size, the label names and the preprocessing,
uncertain-label policy included). A promotion asks for them before predicting a model again: any difference
in those keys means the model is predicted afresh, never that stale numbers are compared.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr.inference import Predictions

log = logging.getLogger(__name__)
FILE = "predictions.npz"


@dataclass(frozen=True)
class Key:
    """What predictions depend on; saved ones are reused only when every field is equal."""

    model_id: str
    fingerprint: str
    split: str
    images: int  # the split's size
    findings: tuple[str, ...]  # the scored names (the model's and the data's label set)
    preprocessing: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "findings": list(self.findings)}, sort_keys=True)


def write(path: str, probs: np.ndarray, labels: np.ndarray, patients: np.ndarray, index: np.ndarray,
          fingerprint: str, key: Key | None = None) -> None:
    """The scored rows (probabilities and labels of the scored findings) and, when known, what they depend on."""
    np.savez(path, probs=probs, labels=labels, patients=patients, index=index, fingerprint=fingerprint,
             key=key.to_json() if key is not None else "")


def find(tracking_uri: str | None, run_id: str | None, key: Key) -> Predictions | None:
    """The run's saved predictions of `key.split` if they were made under exactly `key`; else None."""
    from mlflow.tracking import MlflowClient

    if not run_id or not key.model_id:
        return None
    client = MlflowClient(tracking_uri)
    artifact = f"evaluation/{key.split}/{FILE}"
    with tempfile.TemporaryDirectory(prefix="cxr-saved-") as tmp:
        try:
            local = client.download_artifacts(run_id, artifact, tmp)
        except Exception:  # noqa: BLE001 - absent (or unreadable): predict afresh
            return None
        with np.load(local) as saved:
            stored = str(saved["key"]) if "key" in saved.files else ""
            if stored != key.to_json():
                log.info("saved %s predictions of run %s are for other settings: predicting again", key.split,
                         run_id)
                return None
            probs, labels, index = saved["probs"], saved["labels"], saved["index"].astype(np.int64)
    return _spread(probs, labels, index, key.images)


def _spread(probs: np.ndarray, labels: np.ndarray, index: np.ndarray, n: int) -> Predictions:
    """Scored rows back at their split positions, unseen rows NaN, as `cxr.inference.predict_split` gives them."""
    full = np.full((n, probs.shape[1]), np.nan, np.float32)
    full_labels = np.zeros((n, labels.shape[1]), np.float32)
    seen = np.zeros(n, bool)
    full[index], full_labels[index], seen[index] = probs, labels, True
    return Predictions(full, full_labels, seen)
