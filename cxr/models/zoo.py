"""The architectures: a small CNN for CPU runs, and keras.applications backbones, with one sigmoid per finding.

The last Dense and the sigmoid are float32 under any mixed-precision policy, so the loss and AUROC never see
bfloat16/float16 rounding. The ImageNet backbones (always `weights=None`: nothing is downloaded) expect
3-channel input normalised the way they were trained: the model itself repeats the gray channel three times
(`Concatenate`) and applies that normalisation (`Rescaling` with per-channel scale and offset), built-in
layers only, so a saved model loads in any Keras without cxr installed and an ImageNet weight file given by
the user fits without preprocessing outside the model:

- mobilenet_v2 ("tf" mode): 2x - 1, i.e. [-1, 1].
- densenet121 ("torch" mode, CheXNet): (x - mean_c) / std_c with ImageNet mean/std per channel.
- efficientnet_b0: the backbone itself starts with Rescaling(1/255) and a Normalization layer whose
  statistics come with the weight file. Keras' ImageNet file stores mean_c and, as "variance", std_c (not
  its square; tensorflow/tensorflow#49930, cited in keras.applications.efficientnet), which is why Keras adds
  Rescaling(1/sqrt(std_c)) when it loads those weights itself. We cannot add a layer inside the backbone, so
  we feed 255 * (mean_c + (x - mean_c) / sqrt(std_c)): after the backbone's own layers this is
  (x - mean_c) / std_c, what Keras' ImageNet EfficientNetB0 computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras

from cxr.labels import NUM_FINDINGS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE = "backbone"


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


def gray_to_imagenet(x, scale: list[float], offset: list[float]):
    """Gray [.., 1] in [0, 1] → 3 channels, each `scale_c * x + offset_c`, in float32 (bfloat16 would round
    away ~1 of 256 grey levels before the first conv)."""
    rgb = keras.layers.Concatenate(axis=-1, name="gray_to_rgb", dtype="float32")([x, x, x])
    return keras.layers.Rescaling(scale=scale, offset=offset, name="imagenet_norm", dtype="float32")(rgb)


HEAD = "logits"  # the one layer sized by the label set: fine-tuning onto another set rebuilds only it


def _head(features, dropout: float, findings: int):
    """Pooled features -> dropout -> one float32 sigmoid output per finding of the data's label set."""
    if dropout > 0:
        features = keras.layers.Dropout(dropout, name="dropout")(features)
    logits = keras.layers.Dense(findings, dtype="float32", name=HEAD)(features)
    return keras.layers.Activation("sigmoid", dtype="float32", name="findings")(logits)


def small_cnn(image_size: int, dropout: float = 0.0, batch_norm: bool = True,
              findings: int = NUM_FINDINGS) -> keras.Model:
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
    return keras.Model(inputs, _head(pooled, dropout, findings), name="small_cnn")


def imagenet_backbone_model(name: str, image_size: int, dropout: float = 0.0,
                            findings: int = NUM_FINDINGS) -> keras.Model:
    """keras.applications backbone (random init) + global average pooling + one sigmoid per finding."""
    constructor, (scale, offset) = BACKBONES[name]
    inputs = keras.Input((image_size, image_size, 1), name="image")
    backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3),
                           name=BACKBONE)
    x = backbone(gray_to_imagenet(inputs, scale, offset))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, _head(x, dropout, findings), name=name)


def mobilenet_v2(image_size: int, dropout: float = 0.0, findings: int = NUM_FINDINGS) -> keras.Model:
    return imagenet_backbone_model("mobilenet_v2", image_size, dropout, findings)


def densenet121(image_size: int, dropout: float = 0.0, findings: int = NUM_FINDINGS) -> keras.Model:
    return imagenet_backbone_model("densenet121", image_size, dropout, findings)


def efficientnet_b0(image_size: int, dropout: float = 0.0, findings: int = NUM_FINDINGS) -> keras.Model:
    return imagenet_backbone_model("efficientnet_b0", image_size, dropout, findings)
