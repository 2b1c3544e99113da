"""ResNet-18 / ResNet-34 (basic blocks) and ResNeXt-50 32x4d (grouped bottlenecks), written in Keras.

``keras.applications`` has ResNet50/101/152 only; these are the torchvision / timm
networks (He et al. 2016; Xie et al. 2017, ResNet "v1.5": the stride sits on the 3x3
convolution of a bottleneck) with the Keras applications' layer names, so the ResNet stage
rule, the feature levels and Grad-CAM layer paths read the same as for ``resnet50``:

    conv1_pad, conv1_conv, conv1_bn, conv1_relu, pool1_pad, pool1_pool     (stem, stride 4)
    convS_blockB_{1,2[,3]}_{pad,conv,bn,relu}                               (main path)
    convS_blockB_0_{conv,bn}                                                (projection shortcut)
    convS_blockB_add, convS_blockB_out                                      (sum, ReLU)

for stages ``S`` = 2..5 and blocks ``B`` from 1. Padding is explicit (``ZeroPadding2D`` +
``valid``), as PyTorch pads, so a converted checkpoint gives the same numbers;
BatchNormalization uses PyTorch's epsilon (1e-5) and momentum 0.9 (PyTorch's 0.1).
ResNeXt's grouped 3 x 3 convolutions are :class:`~src.models.layers.GroupedConv2D`: the
weights of ``Conv2D(groups=32)``, computed group by group on a CPU, where TensorFlow's own
grouped kernel is about 100x slower (``benchmarks/bench_grouped_conv.py``).
The builders return the network without its classification top on the given input.
"""
from __future__ import annotations

import keras
from keras import layers

from .layers import GroupedConv2D

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

#: blocks per stage (conv2..conv5)
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnext50": (3, 4, 6, 3)}


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, groups: int = 1, relu: bool = True):
    if kernel > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    conv = GroupedConv2D if groups > 1 else layers.Conv2D  # grouped: fast on a CPU too
    x = conv(filters, kernel, strides=stride, padding="valid", use_bias=False, groups=groups,
             name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters: int, stride: int, name: str):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_0", relu=False)
    y = _conv_bn(x, filters, 3, stride, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _bottleneck(x, planes: int, stride: int, name: str, groups: int, base_width: int):
    width = int(planes * (base_width / 64.0)) * groups
    out = planes * 4
    shortcut = x
    if stride != 1 or x.shape[-1] != out:
        shortcut = _conv_bn(x, out, 1, stride, f"{name}_0", relu=False)
    y = _conv_bn(x, width, 1, 1, f"{name}_1")
    y = _conv_bn(y, width, 3, stride, f"{name}_2", groups=groups)
    y = _conv_bn(y, out, 1, 1, f"{name}_3", relu=False)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _stem(inputs):
    x = _conv_bn(inputs, 64, 7, 2, "conv1")
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)


def _resnet(inputs, arch: str, block, **block_kw) -> keras.Model:
    x = _stem(inputs)
    for s, (n, planes) in enumerate(zip(DEPTHS[arch], (64, 128, 256, 512)), start=2):
        for b in range(1, n + 1):
            x = block(x, planes, 2 if (b == 1 and s > 2) else 1, f"conv{s}_block{b}", **block_kw)
    return keras.Model(inputs, x, name=arch)


def resnet18(inputs) -> keras.Model:
    return _resnet(inputs, "resnet18", _basic_block)


def resnet34(inputs) -> keras.Model:
    return _resnet(inputs, "resnet34", _basic_block)


def resnext50(inputs) -> keras.Model:
    """ResNeXt-50 32x4d: cardinality 32, 4 channels per group at the first stage."""
    return _resnet(inputs, "resnext50", _bottleneck, groups=32, base_width=4)
