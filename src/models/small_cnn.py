"""A small CNN with a class head and a per-class box head: a fast CPU baseline.

It trains in minutes on the phantom default on a 2-core CPU, which makes it the model
`make train` uses until heavier architectures are selected with ``model=...``.
"""
from __future__ import annotations

import keras
from keras import layers

from .heads import box_head, class_head
from .registry import register_model


@register_model("small_cnn")
def small_cnn(num_classes: int = 4, image_size: int = 128, widths=(32, 64, 128, 192),
              dropout: float = 0.2, heads=("class", "boxes"), **_ignored) -> keras.Model:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    inputs = keras.Input((*size, 3), name="image")
    x = inputs
    for i, w in enumerate(widths):
        x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"stage{i + 1}_conv1")(x)
        x = layers.BatchNormalization(name=f"stage{i + 1}_bn1")(x)
        x = layers.Activation("relu", name=f"stage{i + 1}_relu1")(x)
        x = layers.Conv2D(w, 3, strides=2, padding="same", use_bias=False, name=f"stage{i + 1}_conv2")(x)
        x = layers.BatchNormalization(name=f"stage{i + 1}_bn2")(x)
        x = layers.Activation("relu", name=f"stage{i + 1}_relu2")(x)
    feats = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = {}
    if "class" in heads:
        outputs["class"] = class_head(feats, num_classes, dropout=dropout)
    if "boxes" in heads:
        outputs["boxes"] = box_head(feats, num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name="small_cnn")
