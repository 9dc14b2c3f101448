"""Training augmentation, a whole batch per call: one affine map per image, then brightness/contrast jitter.

Rotation, scale, translation and an optional horizontal flip form one map, so each training image is
resampled once, and the same warp resizes from the stored size to the training size. The settings are the
config's `data.augment` (`cxr.config.Augment`), declared there only. The default kernel is an XLA-compiled
bilinear gather computing the same transform as tf.raw_ops.ImageProjectiveTransformV3 (kernel "tf", kept as
the reference) at about a third of its CPU cost: on a CPU-only host that is most of what feeding a GPU costs.
Random numbers are stateless, seeded by (key, batch number), so a batch's augmentation is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from cxr.config import Augment

KERNELS = ("xla", "tf")
OFF = Augment(enabled=False)


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def affine_transforms(u: tf.Tensor, aug: Augment, in_size: int, out_size: int) -> tf.Tensor:
    """Per-image [B, 8] ImageProjectiveTransform matrices (output pixel → input pixel) from uniforms u ∈ [-1, 1).

    The inverse map is input = c_in + (r / scale) · F · R(-θ) · (output + ½ - c_out - t) - ½ with r the
    input/output size ratio, so the identity augmentation is exactly a half-pixel bilinear resize.
    """
    on = 1.0 if aug.enabled else 0.0
    theta = u[:, 0] * (on * aug.rotate_deg * math.pi / 180.0)
    lo, hi = aug.scale if aug.enabled else (1.0, 1.0)
    k = (in_size / out_size) / (lo + (u[:, 1] + 1.0) * 0.5 * (hi - lo))
    tx, ty = u[:, 2] * (on * aug.translate * out_size), u[:, 3] * (on * aug.translate * out_size)
    flip = tf.where(u[:, 6] < 0.0, -1.0, 1.0) if aug.enabled and aug.hflip else tf.ones_like(theta)
    cos, sin = tf.cos(theta), tf.sin(theta)
    a00, a01, a10, a11 = k * flip * cos, k * flip * sin, -k * sin, k * cos
    dx, dy = 0.5 - out_size / 2 - tx, 0.5 - out_size / 2 - ty
    a02 = a00 * dx + a01 * dy + in_size / 2 - 0.5
    a12 = a10 * dx + a11 * dy + in_size / 2 - 0.5
    zero = tf.zeros_like(theta)
    return tf.stack([a00, a01, a02, a10, a11, a12, zero, zero], axis=1)


def _photometric(x: tf.Tensor, mean: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """Contrast around `mean` ([B]), then brightness; x in [0, 1] of shape [B, H, W, 1]."""
    mean = mean[:, None, None, None]
    x = (x - mean) * gain[:, None, None, None] + mean + bias[:, None, None, None]
    return tf.clip_by_value(x, 0.0, 1.0)


def _source_mean(images: tf.Tensor) -> tf.Tensor:
    """Each uint8 source image's mean in [0, 1], the contrast pivot.

    Taken from the source, not the warped output, so that XLA does not fuse the warp into a reduction (which
    recomputes the gathers); outside XLA, whose CPU reductions are slower than TF's, and over every pixel,
    which is cheaper than a strided subsample.
    """
    return tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2, 3]) / 255.0


@tf.function(jit_compile=True)
def _warp_padded(padded: tf.Tensor, transforms: tf.Tensor, mean: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor,
                 size: int) -> tf.Tensor:
    """The warp and jitter proper, on a source with a zero border of 1 px top/left and 2 px bottom/right.

    Sample points are clamped into the border, so every out-of-image neighbour reads a zero and the four
    gathers need no bounds masks. Static shapes (training batches) become constants, which XLA likes.
    """
    n, h, w = (d if d is not None else tf.shape(padded)[i] for i, d in enumerate(padded.shape))
    flat = tf.reshape(padded, [-1])
    grid = tf.range(size, dtype=tf.float32)
    x, y = grid[None, None, :], grid[None, :, None]
    t = transforms[:, :, None, None]
    xs = tf.clip_by_value(t[:, 0] * x + t[:, 1] * y + t[:, 2] + 1.0, 0.0, tf.cast(w - 2, tf.float32))
    ys = tf.clip_by_value(t[:, 3] * x + t[:, 4] * y + t[:, 5] + 1.0, 0.0, tf.cast(h - 2, tf.float32))
    x0, y0 = tf.floor(xs), tf.floor(ys)
    fx, fy = xs - x0, ys - y0
    i00 = (tf.range(n) * (h * w))[:, None, None] + tf.cast(y0, tf.int32) * w + tf.cast(x0, tf.int32)

    def pixel(index: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.gather(flat, index), tf.float32)

    top = pixel(i00) * (1.0 - fx) + pixel(i00 + 1) * fx
    bottom = pixel(i00 + w) * (1.0 - fx) + pixel(i00 + w + 1) * fx
    out = (top * (1.0 - fy) + bottom * fy)[..., None] / 255.0
    return _photometric(out, mean, gain, bias)


def warp_bilinear(images: tf.Tensor, transforms: tf.Tensor, gain: tf.Tensor, bias: tf.Tensor,
                  size: int) -> tf.Tensor:
    """uint8 [B, H, W, 1] → float32 [B, size, size, 1] in [0, 1]: the projective warp, black fill, then jitter.

    Same result as ImageProjectiveTransformV3(BILINEAR, CONSTANT 0) at ~1/3 of its CPU time. The border is
    padded outside XLA: inside, the pad would be re-evaluated by every gather.
    """
    padded = tf.pad(images[..., 0], [[0, 0], [1, 2], [1, 2]])
    return _warp_padded(padded, transforms, _source_mean(images), gain, bias, size)


def augment_batch(images: tf.Tensor, step: tf.Tensor, key: int, aug: Augment, size: int) -> tf.Tensor:
    """One batch: uint8 [B, S0, S0, 1] → augmented float32 [B, size, size, 1], seeded by (key, step)."""
    if aug.kernel not in KERNELS:
        raise ValueError(f"augment kernel must be one of {KERNELS}, got {aug.kernel!r}")
    u = tf.random.stateless_uniform([tf.shape(images)[0], 7], seed=tf.stack([tf.constant(key, tf.int64), step]),
                                    minval=-1.0, maxval=1.0)
    transforms = affine_transforms(u, aug, images.shape[1], size)
    on = 1.0 if aug.enabled else 0.0
    gain, bias = 1.0 + on * aug.contrast * u[:, 5], on * aug.brightness * u[:, 4]
    if aug.kernel == "xla":
        return warp_bilinear(images, transforms, gain, bias, size)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32) / 255.0, transforms=transforms, output_shape=[size, size],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return _photometric(out, _source_mean(images), gain, bias)


def to_unit(images: tf.Tensor, size: int) -> tf.Tensor:
    """Eval: uint8 → float32 in [0, 1], half-pixel bilinear resize only when the size differs."""
    x = tf.cast(images, tf.float32) / 255.0
    return x if images.shape[1] == size else tf.image.resize(x, [size, size], method="bilinear")
