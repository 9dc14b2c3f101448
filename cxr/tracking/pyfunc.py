"""The pyfunc face of a logged cxr model: images in, a table of the 14 findings' probabilities out.

Shipped inside every logged model (as `code/cxr_pyfunc.py`) and imported by `mlflow.pyfunc.load_model`, so
it must stand alone: numpy, pandas and keras only, never `cxr`. The Keras model itself is the Keras flavour's
`data/model.keras`, built from stock layers, so `mlflow.keras.load_model` needs no code at all.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FINDINGS_FILE = "findings.json"  # beside model.keras: the output columns, in the model's order


class CxrModel:
    """What `mlflow.pyfunc.load_model(...)` returns the predictions of: probabilities per named finding."""

    def __init__(self, model: Any, findings: list[str]):
        self.model, self.findings = model, findings
        self.size = int(model.input_shape[1])

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """uint8 images [N, S, S, 1] (0..255) or float ones (0..1), or a DataFrame with an "image" column of them."""
        import pandas as pd

        images = _images(model_input, self.size)
        probs = np.asarray(self.model.predict(images, verbose=0), np.float64)
        return pd.DataFrame(probs, columns=self.findings)


def _images(model_input: Any, size: int) -> np.ndarray:
    """The batch as float32 [N, size, size, 1] in [0, 1]; ValueError saying what was expected otherwise."""
    expected = (f"images of shape [N, {size}, {size}, 1] (uint8 0-255, or float 0-1), or a DataFrame with an "
                f"'image' column holding such [{size}, {size}] or [{size}, {size}, 1] arrays")
    if hasattr(model_input, "columns"):  # a DataFrame
        if "image" not in model_input.columns:
            raise ValueError(f"cxr model input: expected {expected}; got a DataFrame with columns "
                             f"{list(model_input.columns)[:8]}")
        model_input = np.stack([np.asarray(v).reshape(size, size, 1) for v in model_input["image"]])
    elif isinstance(model_input, dict):
        model_input = model_input.get("image", next(iter(model_input.values()), None))
    x = np.asarray(model_input)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (size, size, 1):
        raise ValueError(f"cxr model input: expected {expected}; got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def _load_pyfunc(data_path: str) -> CxrModel:
    """mlflow.pyfunc's entry point: `data_path` is the Keras flavour's data folder."""
    import keras

    with open(os.path.join(data_path, FINDINGS_FILE)) as fh:
        findings = json.load(fh)
    return CxrModel(keras.saving.load_model(os.path.join(data_path, "model.keras"), compile=False), findings)
