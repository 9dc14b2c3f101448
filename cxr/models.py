"""Keras 3 classifiers for 14 findings, chosen by name, and loading of user-given initial weights.

Every model takes grayscale images [S, S, 1] with values in [0, 1] (what the input pipeline yields)
and returns 14 sigmoid probabilities in float32: the last Dense and the sigmoid are float32 under any
mixed-precision policy, so the loss and AUROC never see bfloat16/float16 rounding.

The ImageNet backbones (keras.applications, always `weights=None`: nothing is downloaded) expect
3-channel input normalised the way they were trained. `GrayToImageNet` repeats the gray channel
three times and applies that normalisation inside the model, so an ImageNet weight file given by the
user fits without any preprocessing outside the model:

- mobilenet_v2 ("tf" mode): 2x - 1, i.e. [-1, 1].
- densenet121 ("torch" mode, CheXNet): (x - mean_c) / std_c with ImageNet mean/std per channel.
- efficientnet_b0: the backbone itself starts with Rescaling(1/255) and a Normalization layer whose
  statistics come with the weight file. Keras' ImageNet file stores mean_c and, as "variance",
  std_c (not its square; tensorflow/tensorflow#49930, cited in keras.applications.efficientnet),
  which is why Keras adds Rescaling(1/sqrt(std_c)) when it loads those weights itself. We cannot
  add a layer inside the backbone, so we feed 255 * (mean_c + (x - mean_c) / sqrt(std_c)): after
  the backbone's own layers this is (x - mean_c) / std_c, what Keras' ImageNet EfficientNetB0 computes.

Initial weights come only from a path the user gives (local or any fsspec URL): either a whole-model
weight file written by this module's models (e.g. a checkpoint's `model.weights.h5`), or a
backbone-only file such as keras.applications' `*_notop.h5`, which is loaded into the backbone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable, Iterator

import keras

from cxr import storage
from cxr.labels import NUM_FINDINGS
from cxr.redact import redact

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE = "backbone"


@keras.saving.register_keras_serializable(package="cxr")
class GrayToImageNet(keras.layers.Layer):
    """Gray [.., 1] in [0, 1] -> 3 channels, each `scale_c * x + offset_c` (the backbone's normalisation)."""

    def __init__(self, scale: list[float], offset: list[float], **kwargs):
        super().__init__(**kwargs)
        self.scale = [float(s) for s in scale]
        self.offset = [float(o) for o in offset]

    def call(self, x):
        rgb = keras.ops.concatenate([x, x, x], axis=-1)
        scale = keras.ops.convert_to_tensor(self.scale, dtype=rgb.dtype)
        offset = keras.ops.convert_to_tensor(self.offset, dtype=rgb.dtype)
        return rgb * scale + offset

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


def _torch_mode() -> tuple[list[float], list[float]]:
    return [1 / s for s in IMAGENET_STD], [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]


def _efficientnet_mode() -> tuple[list[float], list[float]]:
    roots = [math.sqrt(s) for s in IMAGENET_STD]
    scale = [255 / r for r in roots]
    offset = [255 * (m - m / r) for m, r in zip(IMAGENET_MEAN, roots, strict=True)]
    return scale, offset


# name -> (keras.applications constructor, per-channel (scale, offset) for inputs in [0, 1])
BACKBONES: dict[str, tuple[Callable[..., keras.Model], tuple[list[float], list[float]]]] = {
    "mobilenet_v2": (keras.applications.MobileNetV2, ([2.0] * 3, [-1.0] * 3)),
    "densenet121": (keras.applications.DenseNet121, _torch_mode()),
    "efficientnet_b0": (keras.applications.EfficientNetB0, _efficientnet_mode()),
}
MODEL_NAMES: tuple[str, ...] = ("small_cnn", *BACKBONES)
MIN_IMAGE_SIZE = 32


def _head(features, dropout: float):
    """Pooled features -> dropout -> 14 float32 sigmoid outputs."""
    if dropout > 0:
        features = keras.layers.Dropout(dropout, name="dropout")(features)
    logits = keras.layers.Dense(NUM_FINDINGS, dtype="float32", name="logits")(features)
    return keras.layers.Activation("sigmoid", dtype="float32", name="findings")(logits)


def small_cnn(image_size: int, dropout: float = 0.0, batch_norm: bool = True) -> keras.Model:
    """Five strided 3x3 conv blocks (conv, batch norm, ReLU), then average AND max pooling: fast on CPU at 128 px.

    Max pooling lets one small bright spot (a nodule is a few pixels at 128 px) drive an output that
    average pooling over the whole film would dilute.
    Batch norm is what makes it learn quickly: on the synthetic phantoms it reaches a far higher
    validation AUROC in the same number of steps than the same net without it. `batch_norm=False`
    gives a variant whose per-example gradients do not depend on the rest of the batch, so two
    workers with batch B compute exactly the update of one worker with batch 2B (used in tests).
    """
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32, 64, 128, 128)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=not batch_norm,
                                kernel_initializer="he_normal", name=f"conv{i}")(x)
        if batch_norm:
            # momentum 0.9, not 0.99: the moving statistics settle within tens of steps, so short
            # CPU epochs already validate with the statistics the weights were trained under.
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    pooled = keras.layers.Concatenate(name="pool")([keras.layers.GlobalAveragePooling2D(name="avg")(x),
                                                    keras.layers.GlobalMaxPooling2D(name="max")(x)])
    return keras.Model(inputs, _head(pooled, dropout), name="small_cnn")


def imagenet_backbone_model(name: str, image_size: int, dropout: float = 0.0) -> keras.Model:
    """keras.applications backbone (random init) + global average pooling + 14 sigmoids."""
    constructor, (scale, offset) = BACKBONES[name]
    inputs = keras.Input((image_size, image_size, 1), name="image")
    # float32: normalising in bfloat16 would round away ~1 of 256 grey levels before the first conv.
    x = GrayToImageNet(scale, offset, name="gray_to_imagenet", dtype="float32")(inputs)
    backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3),
                           name=BACKBONE)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, _head(x, dropout), name=name)


def build_model(name: str, image_size: int, dropout: float = 0.0, weights: str | None = None) -> keras.Model:
    """The named model under the current dtype policy, with initial weights from `weights` if given."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is below the minimum of {MIN_IMAGE_SIZE}")
    if name == "small_cnn":
        model = small_cnn(image_size, dropout)
    else:
        model = imagenet_backbone_model(name, image_size, dropout)
    if weights:
        load_initial_weights(model, weights)
    return model


def load_initial_weights(model: keras.Model, url: str) -> None:
    """Load a whole-model or backbone-only weight file from a local path or fsspec URL.

    Raises FileNotFoundError if there is no such file, ValueError if it fits neither the model nor
    its backbone.
    """
    if not storage.exists(url):
        raise FileNotFoundError(f"initial weights {redact(url)!r}: no such file")
    with _local_copy(url) as path:
        errors = [_try_load(model, path)]
        if errors[0] is None:
            log.info("loaded model weights from %s", redact(url))
            return
        if _has_backbone(model):
            errors.append(_try_load(model.get_layer(BACKBONE), path))
            if errors[1] is None:
                log.info("loaded backbone weights from %s", redact(url))
                return
    details = "; ".join(f"{what}: {err}" for what, err in zip(("model", "backbone"), errors, strict=False))
    raise ValueError(f"initial weights {redact(url)!r} do not match model {model.name!r} ({details})")


def _has_backbone(model: keras.Model) -> bool:
    return any(layer.name == BACKBONE for layer in model.layers)


def _try_load(target: keras.Model, path: str) -> str | None:
    """None if the file loaded into `target`, else the reason it did not.

    A failed attempt floods Keras warnings (one per unmatched layer), which say nothing the error
    does not; warnings from a load that succeeded are passed on, since they may mean a partial load.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            target.load_weights(path)
        except Exception as exc:  # noqa: BLE001 - Keras raises several types for a mismatched file
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for w in caught:
        log.warning("loading %s into %s: %s", path, target.name, w.message)
    return None


@contextlib.contextmanager
def _local_copy(url: str) -> Iterator[str]:
    """A local path for `url`: the file itself, or an object-store file downloaded to a temp dir."""
    if storage.is_local(url):
        yield storage.filesystem(url)[1]
        return
    with tempfile.TemporaryDirectory(prefix="cxr-weights-") as tmp:
        # Keras picks the loader from the suffix (.weights.h5, legacy .h5), so keep the name (not a presigned
        # URL's query string).
        path = os.path.join(tmp, posixpath.basename(urllib.parse.urlsplit(url).path.rstrip("/")))
        with open(path, "wb") as f:
            f.write(storage.read_bytes(url))
        yield path
