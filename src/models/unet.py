"""A U-Net over any backbone pyramid: ``model=unet model.backbone=resnet18|resnet50|...``.

The encoder is a named backbone (:mod:`src.models.backbones`, nested as ``backbone``, so
``unfreeze`` by stage or fraction applies to it as to the classifier); the decoder (as the
segmentation libraries build it over an ImageNet encoder) starts at ``P5`` and at each of
``P4``, ``P3``, ``P2`` upsamples by 2 (bilinear), concatenates the level and applies two
3x3 convolution + BatchNorm + ReLU blocks; two more such blocks at strides 2 and 1 without a
skip bring it to the input size, and a 1x1 convolution + sigmoid gives ``mask``
``[B, H, W, 1]`` (foreground probability, float32). Channels per decoder block:
``decoder_channels`` (5 values, deepest first).

Heads: ``mask`` and, optionally, ``class`` (global average pooling of ``P5`` -> softmax),
so one network segments and classifies. It needs a backbone with all four levels ``P2``-``P5``
(every CNN and ``swin_tiny``; not a ViT, which has no stride-4 level).
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from .detector import _backbone_features
from .heads import class_head
from .layers import ResizeTo
from .registry import register_model

LEVELS = ("P5", "P4", "P3", "P2")


def _conv_block(x, channels: int, name: str, bn_momentum: float):
    for i in (1, 2):
        x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def _up(x, size, name: str):
    return ResizeTo(tuple(int(d) for d in size), name=name)(x)


@register_model("unet")
def unet(num_classes: int = 4, image_size=128, backbone: str = "resnet18", weights=None,
         decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), heads: Sequence[str] = ("mask",),
         dropout: float = 0.3, bn_momentum: float = 0.9) -> keras.Model:
    """See the module docstring; ``heads`` from ``mask`` and ``class``."""
    heads = list(heads)
    unknown = set(heads) - {"mask", "class"}
    if unknown or not heads:
        raise ValueError(f"model.heads: the unet has mask and class heads, got {heads}")
    decoder_channels = [int(c) for c in decoder_channels]
    if len(decoder_channels) != 5:
        raise ValueError(f"model.decoder_channels needs 5 values (P4, P3, P2, stride 2, stride 1), got "
                         f"{decoder_channels}")
    inputs, feats, bb = _backbone_features(backbone, image_size, weights)
    missing = [lv for lv in LEVELS if lv not in feats]
    if missing:
        raise ValueError(f"model.backbone={backbone}: the unet decoder needs levels P2-P5, the backbone has "
                         f"{sorted(feats)} (use a CNN or swin_tiny)")
    outputs = {}
    if "mask" in heads:
        x = feats["P5"]
        for i, lvl in enumerate(LEVELS[1:]):
            skip = feats[lvl]
            x = _up(x, skip.shape[1:3], f"decoder{i + 1}_up")
            x = layers.Concatenate(name=f"decoder{i + 1}_cat")([x, skip])
            x = _conv_block(x, decoder_channels[i], f"decoder{i + 1}", bn_momentum)
        full = tuple(int(d) for d in inputs.shape[1:3])
        half = ((full[0] + 1) // 2, (full[1] + 1) // 2)
        for j, size in enumerate((half, full), start=4):
            x = _up(x, size, f"decoder{j}_up")
            x = _conv_block(x, decoder_channels[j - 1], f"decoder{j}", bn_momentum)
        m = layers.Conv2D(1, 1, name="mask_logits")(x)
        outputs["mask"] = layers.Activation("sigmoid", dtype="float32", name="mask")(m)
    if "class" in heads:
        pooled = layers.GlobalAveragePooling2D(name="class_pool")(feats["P5"])
        outputs["class"] = class_head(pooled, num_classes, dropout=dropout, name="class")
    return keras.Model(inputs, outputs, name=f"{backbone}_unet")
