"""Shared layers: the Preprocess layer against keras.applications' preprocess_input, for
every mode of the one preprocessing vocabulary."""
from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest

from src.models.layers import PREPROCESS_MODES, GroupedConv2D, Preprocess

# a keras.applications module whose preprocess_input each mode reproduces (on 0..255 pixels)
KERAS_MODULE = {"raw255": "efficientnet", "caffe": "resnet", "tf": "mobilenet_v2", "torch": "densenet"}


@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_preprocess_matches_keras_preprocess_input(mode, tmp_path):
    x01 = np.random.default_rng(0).random((2, 5, 7, 3), dtype=np.float32)
    got = np.asarray(Preprocess(mode)(x01))
    if mode == "none":
        want = x01
    else:
        mod = importlib.import_module(f"keras.src.applications.{KERAS_MODULE[mode]}")
        want = np.asarray(mod.preprocess_input(x01 * 255.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # serialisable: the mode travels with the model
    inputs = keras.Input((5, 7, 3))
    model = keras.Model(inputs, Preprocess(mode, name="preprocess")(inputs))
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    assert back.get_layer("preprocess").mode == mode


def test_unknown_mode_names_the_vocabulary():
    with pytest.raises(ValueError, match="raw255"):
        Preprocess("imagenet")


@pytest.mark.parametrize("stride, padding", [(1, "same"), (2, "valid")])
def test_grouped_conv_equals_keras_grouped_conv_in_outputs_and_gradients(stride, padding):
    import tensorflow as tf

    x = tf.random.stateless_normal((2, 9, 9, 16), seed=(1, 2))
    ref = keras.layers.Conv2D(24, 3, strides=stride, padding=padding, groups=4, use_bias=True)
    ours = GroupedConv2D(24, 3, strides=stride, padding=padding, groups=4, use_bias=True)
    ref.build(x.shape)
    ours.build(x.shape)
    assert [w.shape for w in ours.weights] == [w.shape for w in ref.weights]
    ref.set_weights([np.random.default_rng(0).normal(size=w.shape).astype("float32") for w in ref.weights])
    ours.set_weights(ref.get_weights())

    def run(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    (y_ref, g_ref), (y_ours, g_ours) = run(ref), run(ours)
    np.testing.assert_allclose(y_ours.numpy(), y_ref.numpy(), rtol=1e-4, atol=1e-4)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-3)


def test_grouped_conv_survives_save_and_load(tmp_path):
    inp = keras.Input((8, 8, 8))
    model = keras.Model(inp, GroupedConv2D(8, 3, padding="same", groups=4, name="g")(inp))
    x = np.random.default_rng(1).random((1, 8, 8, 8)).astype("float32")
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(back.get_layer("g"), GroupedConv2D) and back.get_layer("g").groups == 4
    np.testing.assert_allclose(back.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_grouped_conv_runs_one_ordinary_convolution_per_group_on_a_cpu():
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible: the layer calls the native grouped kernel there")
    layer = GroupedConv2D(16, 3, padding="same", groups=4, use_bias=False)
    layer.build((None, 8, 8, 8))
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec((1, 8, 8, 8), tf.float32)).graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    # 4 convolutions over 2 channels each, not one grouped op (TensorFlow's slow CPU kernel)
    assert len(convs) == 4 and all(op.inputs[1].shape[2] == 2 for op in convs)


def test_resnext_uses_the_grouped_layer():
    from src.models.backbones import create_backbone

    bb = create_backbone("resnext50", (32, 32, 3), weights=None)
    layer = bb.get_layer("conv2_block1_2_conv")
    assert isinstance(layer, GroupedConv2D) and layer.groups == 32
