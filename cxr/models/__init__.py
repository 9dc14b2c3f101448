"""The model registry: every name `model.name` may take, what builds it, and where Grad-CAM looks.

Every model takes grayscale images [S, S, 1] with values in [0, 1] (what the input pipeline yields) and
returns one float32 sigmoid probability per finding of its label set (NIH's 14 by default). This module
imports no Keras: the config validates model names against `MODELS` before anything heavy is loaded, and a
builder's module is imported when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    """How to build a model, and the layer whose output is its last convolutional block (for Grad-CAM)."""

    builder: str  # "module:function"
    cam_layer: str


MODELS: dict[str, Spec] = {
    "small_cnn": Spec("cxr.models.zoo:small_cnn", "relu4"),
    # keras.applications backbones (include_top=False): the backbone's output is its last conv block's.
    "mobilenet_v2": Spec("cxr.models.zoo:mobilenet_v2", "backbone"),
    "densenet121": Spec("cxr.models.zoo:densenet121", "backbone"),
    "efficientnet_b0": Spec("cxr.models.zoo:efficientnet_b0", "backbone"),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
MIN_IMAGE_SIZE = 32


def spec(name: str) -> Spec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[name]


def build_model(name: str, image_size: int, dropout: float = 0.0, weights: str | None = None,
                findings: Sequence[str] | None = None, tracking_uri: str | None = None) -> Any:
    """The named Keras model with one output per finding (NIH's 14 by default) under the current dtype policy,
    with initial weights from `weights` if given (a weight file, a checkpoint folder or an MLflow model URI)."""
    from cxr.labels import FINDINGS

    findings = tuple(findings or FINDINGS)
    module, function = spec(name).builder.split(":")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is below the minimum of {MIN_IMAGE_SIZE}")
    model = getattr(importlib.import_module(module), function)(image_size, dropout, findings=len(findings))
    if weights:
        from cxr.models.weights import load_initial_weights

        load_initial_weights(model, weights, findings, tracking_uri)
    return model
