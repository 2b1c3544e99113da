"""src.evaluation.efficiency: parameter counts, graph FLOPs against hand counts, speed, memory, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

import keras

from src.evaluation.efficiency import count_flops, count_params, main, measure
from src.models import create_model
from src.models.efficient_mtnet import context_block

TINY = dict(ltd_channels=(8, 8, 8), widths=(8, 12, 16), blocks=(1, 1, 1), expansion=2, neck_channels=16,
            decoder_channels=(16, 8), ham_channels=8, ham_rank=4, attention_channels=4, class_hidden=8)


def test_params_equal_keras_count():
    net = create_model("efficient_mtnet", num_classes=3, image_size=32, **TINY)
    p = count_params(net)
    assert p["total"] == net.count_params()
    assert p["trainable"] == sum(int(np.prod(w.shape)) for w in net.trainable_weights)
    assert p["non_trainable"] > 0  # BatchNorm statistics and the fixed NMF bases


@pytest.mark.parametrize("kernel,stride", [(3, 1), (1, 1), (3, 2)])
def test_conv2d_flops_are_two_per_multiply_add(kernel, stride):
    h, w, cin, cout = 20, 24, 5, 7
    inp = keras.Input((h, w, cin))
    model = keras.Model(inp, keras.layers.Conv2D(cout, kernel, strides=stride, padding="same", use_bias=False)(inp))
    ho, wo = -(-h // stride), -(-w // stride)
    f = count_flops(model)
    assert f["flops"] == 2 * ho * wo * cin * cout * kernel * kernel
    assert f["gmacs"] * 1e9 == pytest.approx(ho * wo * cin * cout * kernel * kernel)
    # a bias adds one FLOP per output element
    inp = keras.Input((h, w, cin))
    biased = keras.Model(inp, keras.layers.Conv2D(cout, kernel, strides=stride, padding="same")(inp))
    assert count_flops(biased)["flops"] == f["flops"] + ho * wo * cout


def test_attention_matmuls_are_counted_and_cost_more_than_ham():
    h = w = 24
    c, d = 32, 16
    n = h * w

    def block(kind):
        inp = keras.Input((h, w, c))
        return keras.Model(inp, context_block(inp, kind, "ctx", ham_channels=c, ham_rank=8, attention_channels=d))

    att, ham = count_flops(block("attention")), count_flops(block("ham"))
    # Q K^T (N x d times d x N) and A V (N x N times N x d): 2 FLOPs per multiply-add
    assert att["by_op"]["BatchMatMulV2"] == 2 * n * n * d + 2 * n * n * d
    assert att["by_op"]["Softmax"] > 0
    assert att["flops"] > 2 * ham["flops"]
    # and in the whole (tiny) network at the same input size
    size = 128
    f_att = count_flops(create_model("efficient_mtnet", image_size=size, context="attention", **TINY))
    f_ham = count_flops(create_model("efficient_mtnet", image_size=size, context="ham", **TINY))
    assert f_att["flops"] > f_ham["flops"]


def test_measure_reports_speed_and_memory():
    net = create_model("small_cnn", num_classes=3, image_size=32, widths=(4, 8))
    res = measure(net, 32, batch=2, warmup=1, steps=2)
    assert res["input_shape"] == [32, 32, 3] and res["params"]["total"] == net.count_params()
    assert res["flops"]["flops"] > 0
    assert set(res["speed"]) == {"batch_1", "batch_2"}
    assert all(v["images_per_s"] > 0 for v in res["speed"].values())
    assert res["memory"]["batch"] == 2 and res["memory"]["peak_over_start_bytes"] >= 0 and res["memory"]["method"]


def test_cli_prints_json_for_the_exported_network(capsys):
    args = ["model=efficient_mtnet", "image_size=32", "batch=2", "warmup=1", "steps=1", "memory=false",
            *[f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()]]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "efficient_mtnet" and res["input_shape"] == [32, 32, 3]
    assert res["heads"] == ["class", "mask"]  # the aux heads are training-only
    assert res["params_with_aux_heads"]["total"] > res["params"]["total"]
    assert res["flops"]["gflops"] > 0 and res["model_config"]["context"] == "ham"
    assert main(["model=nope"]) == 2
