"""Model builders: shapes and float32 outputs under mixed precision, input normalisation, weight files."""

from __future__ import annotations

import fsspec
import keras
import numpy as np
import pytest

from cxr import models
from cxr.labels import NUM_FINDINGS
from cxr.models import zoo

SIZES = {"small_cnn": 64, "mobilenet_v2": 32, "densenet121": 32, "efficientnet_b0": 32}


@pytest.fixture
def bf16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_builds_with_float32_sigmoid_outputs_under_bf16(name, bf16):
    size = SIZES[name]
    model = models.build_model(name, size, dropout=0.2)
    x = np.random.default_rng(0).random((2, size, size, 1), dtype=np.float32)
    y = model(x, training=False)
    assert tuple(y.shape) == (2, NUM_FINDINGS)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    assert np.all((np.asarray(y) > 0) & (np.asarray(y) < 1))
    assert model.get_layer("logits").dtype_policy.compute_dtype == "float32"
    assert model.get_layer("findings").dtype_policy.compute_dtype == "float32"
    convs = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(v.dtype == "float32" for v in model.trainable_variables)  # weights stay float32


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield from _all_layers(layer) if isinstance(layer, keras.Model) else [layer]


def test_unknown_name_and_tiny_images_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.build_model("resnet", 64)
    with pytest.raises(ValueError, match="minimum"):
        models.build_model("small_cnn", 16)


def test_gray_input_becomes_what_each_imagenet_backbone_expects():
    x = np.linspace(0, 1, 11, dtype=np.float32).reshape(1, 1, 11, 1)
    rgb255 = np.repeat(x, 3, axis=-1) * 255.0
    mean, std = np.array(zoo.IMAGENET_MEAN), np.array(zoo.IMAGENET_STD)

    def mapped(name):
        scale, offset = zoo.BACKBONES[name][1]
        inputs = keras.Input((1, 11, 1))
        return np.asarray(keras.Model(inputs, zoo.gray_to_imagenet(inputs, scale, offset))(x))

    # keras.applications' own preprocessing of 0..255 RGB images
    np.testing.assert_allclose(mapped("mobilenet_v2"),
                               keras.applications.mobilenet_v2.preprocess_input(rgb255.copy()), atol=1e-5)
    np.testing.assert_allclose(mapped("densenet121"),
                               keras.applications.densenet.preprocess_input(rgb255.copy()), atol=1e-5)
    # EfficientNet normalises inside: Rescaling(1/255), then Normalization with the ImageNet file's
    # statistics (mean, and std stored as variance); the result must be (x - mean) / std.
    rescale = keras.layers.Rescaling(1 / 255)
    normalize = keras.layers.Normalization(mean=list(mean), variance=list(std))
    inside = np.asarray(normalize(rescale(mapped("efficientnet_b0"))))
    np.testing.assert_allclose(inside, (np.repeat(x, 3, axis=-1) - mean) / std, atol=1e-4)


def test_whole_model_weights_round_trip_local_file_and_url(tmp_path):
    source = models.build_model("small_cnn", 64, dropout=0.1)
    path = str(tmp_path / "small.weights.h5")
    source.save_weights(path)
    with open(path, "rb") as f:
        with fsspec.open("memory://cxr-test/small.weights.h5", "wb") as g:
            g.write(f.read())
    for url in (path, f"file://{path}", "memory://cxr-test/small.weights.h5"):
        loaded = models.build_model("small_cnn", 64, weights=url)
        for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def _assert_loads_into_backbone(source, path: str, name: str) -> None:
    """`source`'s weights saved to `path` end up, unchanged, in the backbone of model `name` at 32 px."""
    source.save_weights(path)
    model = models.build_model(name, 32, weights=path)
    for a, b in zip(source.get_weights(), model.get_layer(zoo.BACKBONE).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_backbone_only_imagenet_style_file_loads_into_the_backbone(tmp_path):
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    _assert_loads_into_backbone(backbone, str(tmp_path / "mobilenet_v2_notop.weights.h5"), "mobilenet_v2")


def test_missing_or_mismatched_weight_file_fails_clearly(tmp_path):
    missing = str(tmp_path / "nope.weights.h5")
    with pytest.raises(FileNotFoundError, match="nope.weights.h5.*no such file"):
        models.build_model("small_cnn", 64, weights=missing)
    other = str(tmp_path / "small.weights.h5")
    models.build_model("small_cnn", 64).save_weights(other)
    with pytest.raises(ValueError, match="do not match model 'mobilenet_v2'"):
        models.build_model("mobilenet_v2", 32, weights=other)


def test_legacy_keras_applications_notop_h5_loads_into_the_backbone(tmp_path):
    """The format of Keras' published `*_notop.h5` ImageNet files (written by Keras 2)."""
    tf_keras = pytest.importorskip("tf_keras")
    legacy = tf_keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    _assert_loads_into_backbone(legacy, str(tmp_path / "densenet121_notop.h5"), "densenet121")
