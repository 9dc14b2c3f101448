"""The training checkpoint: what a restarted or re-submitted run needs to continue exactly.

A directory (Ray Train uploads it to `run.storage_path`) with the model weights, the optimizer's
variables by path, the training state as JSON (epoch, schedule, dropout draws, metric history, plan) and the
resolved config. `state.json` names its format so a future layout can refuse an old one clearly.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the file layout is read by drivers that never import Keras (`cxr.models.loading.describe`)
    import keras

CHECKPOINT_FORMAT = "cxr-train-checkpoint/1"
MODEL_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
CONFIG_FILE = "resolved.yaml"


def save_checkpoint(directory: str, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    state: dict[str, Any], config_yaml: str) -> None:
    """Model weights, optimizer variables (by path), training state and the resolved config."""
    model.save_weights(os.path.join(directory, MODEL_FILE))
    names = np.array([v.path for v in optimizer.variables])
    values = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    np.savez(os.path.join(directory, OPTIMIZER_FILE), names=names, **values)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"format": CHECKPOINT_FORMAT, **state}, f, indent=1)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_yaml)


def restore_checkpoint(directory: str, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> dict:
    """Load what `save_checkpoint` wrote into a built model and optimizer; returns the saved state."""
    state = read_state(directory)
    model.load_weights(os.path.join(directory, MODEL_FILE))
    with np.load(os.path.join(directory, OPTIMIZER_FILE), allow_pickle=False) as saved:
        names = saved["names"].tolist()
        current = [v.path for v in optimizer.variables]
        if names != current:
            raise ValueError(f"{directory}: optimizer state does not match ({len(names)} saved variables, "
                             f"{len(current)} expected; first saved {names[:3]}, expected {current[:3]})")
        for i, v in enumerate(optimizer.variables):
            v.assign(saved[f"v{i}"])
    return state


def read_state(directory: str) -> dict:
    """The training state of a checkpoint directory (epoch, schedule, metrics, history, plan), format-checked."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def history(checkpoint: Any) -> list[dict[str, Any]]:
    """Every epoch's metrics, from a Ray checkpoint (or None): the checkpoint carries the whole history across
    restarts, while Ray's own metrics table starts afresh when a worker group is restarted."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        return list(read_state(directory).get("history", []))


def findings(directory: str) -> tuple[str, ...]:
    """The label set the checkpoint's model was trained on (its plan); NIH's 14 for checkpoints before label sets
    (and for a folder of weights and config alone)."""
    from cxr.labels import FINDINGS

    if not os.path.exists(os.path.join(directory, STATE_FILE)):
        return FINDINGS
    return tuple(read_state(directory).get("plan", {}).get("findings") or FINDINGS)


def load_model(directory: str, model_name: str, image_size: int, dropout: float = 0.0) -> keras.Model:
    """The checkpoint's model, built under the current dtype policy with its weights loaded."""
    from cxr.models import build_model

    model = build_model(model_name, image_size, dropout, findings=findings(directory))
    model.load_weights(os.path.join(directory, MODEL_FILE))
    return model
