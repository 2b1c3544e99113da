"""Unfreezing: counts for none / all / fraction / from_stage on ResNet50 (expected values are
computed here by walking the layers), frozen BatchNorm stays in inference mode in a real
train step, bn_trainable=false, and ill specs that must raise."""
from __future__ import annotations

import logging
import re

import keras
import numpy as np
import pytest

from src.models.backbones import create_backbone
from src.models.unfreeze import count_params, parse_spec, set_trainable

SIZE = 32
MOVING = ("moving_mean", "moving_variance")


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("resnet50", (SIZE, SIZE, 3), weights=None)


def _n(v) -> int:
    return int(np.prod(v.shape))


def _learnable_params(layer) -> int:
    """Parameters a layer learns when trainable: everything but BatchNorm moving statistics."""
    return sum(_n(v) for v in layer.weights if not v.path.endswith(MOVING))


def _expect(bb, chosen):
    """Expected summary numbers when exactly the layers in `chosen` are trainable."""
    weighted = [lyr for lyr in bb.layers if lyr.weights]  # resnet: no nested models
    total = sum(_n(v) for lyr in weighted for v in lyr.weights)
    trainable = sum(_learnable_params(lyr) for lyr in chosen)
    return {"trainable_layers": len(chosen), "total_layers": len(weighted), "trainable_params": trainable,
            "non_trainable_params": total - trainable,
            "first_trainable_layer": chosen[0].name if chosen else None}


def _check(summary, expected):
    assert {k: summary[k] for k in expected} == expected


def test_counts_none_and_all(resnet):
    weighted = [lyr for lyr in resnet.layers if lyr.weights]
    assert len(weighted) == 106  # 53 conv + 53 batch norm in Keras' ResNet50 without top
    _check(set_trainable(resnet, {"mode": "none"}), _expect(resnet, []))
    assert resnet.trainable_weights == []
    s = set_trainable(resnet, {"mode": "all"})
    _check(s, _expect(resnet, weighted))
    assert s["trainable_params"] == 23_534_592  # keras' ResNet50(include_top=False) trainable count
    assert s["first_trainable_layer"] == "conv1_conv"


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_counts_fraction_counts_weight_bearing_layers_from_the_end(resnet, fraction):
    weighted = [lyr for lyr in resnet.layers if lyr.weights]
    k = int(round(fraction * len(weighted)))
    chosen = weighted[len(weighted) - k:] if k else []
    s = set_trainable(resnet, {"fraction": fraction})
    _check(s, _expect(resnet, chosen))
    if fraction == 0.3:
        assert s["trainable_layers"] == 32
    # weightless layers follow their position: everything after the first trainable layer
    names = [lyr.name for lyr in resnet.layers]
    if chosen:
        first = names.index(chosen[0].name)
        assert all(lyr.trainable for lyr in resnet.layers[first:])
        assert not any(lyr.trainable for lyr in resnet.layers[:first])


@pytest.mark.parametrize("stage, prefixes", [("conv4", ("conv4_", "conv5_")), ("conv5", ("conv5_",)),
                                             ("conv1", ("conv1_", "conv2_", "conv3_", "conv4_", "conv5_"))])
def test_counts_from_stage(resnet, stage, prefixes):
    weighted = [lyr for lyr in resnet.layers if lyr.weights]
    chosen = [lyr for lyr in weighted if lyr.name.startswith(prefixes)]
    s = set_trainable(resnet, {"from_stage": stage})
    _check(s, _expect(resnet, chosen))
    trainable_names = {v.path.split("/")[-2] for v in resnet.trainable_weights}
    assert trainable_names == {lyr.name for lyr in chosen}


def test_bn_trainable_false_freezes_every_batchnorm(resnet):
    weighted = [lyr for lyr in resnet.layers if lyr.weights]
    chosen = [lyr for lyr in weighted if lyr.name.startswith("conv5_")
              and not isinstance(lyr, keras.layers.BatchNormalization)]
    s = set_trainable(resnet, {"from_stage": "conv5", "bn_trainable": False})
    _check(s, _expect(resnet, chosen))
    assert not any(lyr.trainable for lyr in resnet.layers if isinstance(lyr, keras.layers.BatchNormalization))


def test_logs_one_line(resnet, caplog):
    with caplog.at_level(logging.INFO, logger="src.models.unfreeze"):
        s = set_trainable(resnet, {"fraction": 0.3})
    lines = [r.getMessage() for r in caplog.records if r.name == "src.models.unfreeze"]
    assert len(lines) == 1
    assert re.match(rf"unfreeze: 32/106 layers, {s['trainable_params']} trainable params", lines[0])


def test_count_params(resnet):
    set_trainable(resnet, {"from_stage": "conv5"})
    c = count_params(resnet)
    assert c["total"] == resnet.count_params() == c["trainable"] + c["non_trainable"]
    assert c["trainable"] == sum(_n(v) for v in resnet.trainable_weights)
    assert count_params(keras.Model(resnet.input, resnet.output)) == c  # a plain model over the same layers


def _head_model(bb):
    x = keras.layers.GlobalAveragePooling2D()(bb.output["P5"])
    return keras.Model(bb.input, keras.layers.Dense(1)(x))


def _snapshot(bb, names):
    return {n: [np.array(v) for v in bb.get_layer(n).weights] for n in names}


def _one_step(bb):
    model = _head_model(bb)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)  # compile after freezing
    rng = np.random.default_rng(0)
    x = rng.random((4, SIZE, SIZE, 3), dtype=np.float32) * 100
    model.train_on_batch(x, rng.random((4, 1), dtype=np.float32))


def test_frozen_batchnorm_keeps_its_statistics_in_a_train_step(resnet):
    set_trainable(resnet, {"from_stage": "conv5"})
    names = ["conv1_bn", "conv4_block6_3_bn", "conv5_block3_3_bn", "conv1_conv", "conv5_block3_3_conv"]
    before = _snapshot(resnet, names)
    _one_step(resnet)
    after = _snapshot(resnet, names)
    for frozen in ("conv1_bn", "conv4_block6_3_bn", "conv1_conv"):  # gamma, beta, moving mean/var; kernel
        for b, a in zip(before[frozen], after[frozen]):
            np.testing.assert_array_equal(a, b, err_msg=frozen)
    bn = resnet.get_layer("conv5_block3_3_bn")
    mm = [i for i, v in enumerate(bn.weights) if v.path.endswith("moving_mean")][0]
    assert not np.array_equal(before["conv5_block3_3_bn"][mm], after["conv5_block3_3_bn"][mm])
    assert not np.array_equal(before["conv5_block3_3_conv"][0], after["conv5_block3_3_conv"][0])


def test_bn_trainable_false_keeps_statistics_of_trainable_stages(resnet):
    set_trainable(resnet, {"from_stage": "conv5", "bn_trainable": False})
    names = ["conv5_block3_3_bn", "conv5_block3_3_conv"]
    before = _snapshot(resnet, names)
    _one_step(resnet)
    after = _snapshot(resnet, names)
    for b, a in zip(before["conv5_block3_3_bn"], after["conv5_block3_3_bn"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before["conv5_block3_3_conv"][0], after["conv5_block3_3_conv"][0])


def test_frozen_backbone_runs_in_inference_mode(resnet):
    set_trainable(resnet, {"mode": "none"})
    x = np.random.default_rng(1).random((2, SIZE, SIZE, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(resnet(x, training=True)["P5"]),
                               np.asarray(resnet(x, training=False)["P5"]), rtol=1e-5, atol=1e-6)


def test_nested_models_are_flattened():
    bb = create_backbone("convnext_tiny", (SIZE, SIZE, 3))
    s = set_trainable(bb, {"from_stage": "stage_3"})
    trainable = {v.path.split("/")[-2] for v in bb.trainable_weights}
    # the down-sampling block in front of stage 3 is a nested Sequential: its layers count
    assert {"convnext_tiny_downsampling_layernorm_2", "convnext_tiny_downsampling_conv_2"} <= trainable
    assert not any(n.startswith(("convnext_tiny_stage_2", "convnext_tiny_downsampling_layernorm_1")) for n in trainable)
    assert s["first_trainable_layer"] == "convnext_tiny_downsampling_layernorm_2"
    s1 = set_trainable(bb, {"fraction": 1.0})
    assert s1["trainable_layers"] == s1["total_layers"] and s1["non_trainable_params"] == 0


@pytest.mark.parametrize("spec, match", [
    ({"fraction": 1.5}, r"\[0, 1\]"),
    ({"fraction": 0.3, "from_stage": "conv4"}, "both"),
    ({"from_stage": "conv9"}, "unknown stage 'conv9'.*conv1"),
    ({"mode": "some"}, "mode must be one of"),
    ({"frac": 0.3}, "unknown unfreeze spec keys"),
    ({"mode": "none", "fraction": 0.3}, "takes no"),
    ({"mode": "fraction"}, "needs a value"),
    ({"mode": "from_stage", "fraction": 0.2}, "conflicts|needs"),
    ({}, "needs mode"),
    (3, "mapping"),
])
def test_bad_specs_raise(resnet, spec, match):
    with pytest.raises(ValueError, match=match):
        set_trainable(resnet, spec)


def test_parse_spec_accepts_config_shapes():
    assert parse_spec({"mode": None, "fraction": 0.3, "from_stage": None}) == ("fraction", 0.3, True)
    assert parse_spec({"mode": "from_stage", "from_stage": "conv4", "bn_trainable": False}) == \
        ("from_stage", "conv4", False)
    assert parse_spec("all") == ("all", None, True)
    assert parse_spec(False) == ("none", None, True)


def test_plain_model_supports_all_but_from_stage(resnet):
    plain = keras.Model(resnet.input, resnet.output)  # the same layers, no stages
    s = set_trainable(plain, {"fraction": 0.3})
    assert s["trainable_layers"] == 32
    with pytest.raises(ValueError, match="needs a Backbone"):
        set_trainable(plain, {"from_stage": "conv4"})
