"""A small CNN with a class head and a per-class box head: a fast CPU baseline.

It trains in minutes on the phantom default on a 2-core CPU, which makes it the model
`make train` uses (heavier architectures are one ``model=...`` away). Both heads see a
flattened low-resolution feature map besides the pooled features, so *where* something
is (midline, skull boundary) is available to them, not only *what* it looks like.
BatchNormalization uses momentum 0.9 so its moving statistics settle within the few
hundred steps of a CPU run.
"""
from __future__ import annotations

import keras
from keras import layers

from .heads import box_head, class_head
from .registry import register_model


@register_model("small_cnn")
def small_cnn(num_classes: int = 4, image_size: int = 128, widths=(32, 64, 128, 192), dropout: float = 0.2,
              spatial_channels: int = 16, hidden: int = 128, heads=("class", "boxes"),
              bn_momentum: float = 0.9, **_ignored) -> keras.Model:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    inputs = keras.Input((*size, 3), name="image")
    x = inputs
    for i, w in enumerate(widths):
        x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"stage{i + 1}_conv1")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"stage{i + 1}_bn1")(x)
        x = layers.Activation("relu", name=f"stage{i + 1}_relu1")(x)
        x = layers.Conv2D(w, 3, strides=2, padding="same", use_bias=False, name=f"stage{i + 1}_conv2")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"stage{i + 1}_bn2")(x)
        x = layers.Activation("relu", name=f"stage{i + 1}_relu2")(x)
    pooled = layers.GlobalAveragePooling2D(name="pool")(x)
    feats = pooled
    if spatial_channels:
        s = layers.Conv2D(spatial_channels, 1, activation="relu", name="spatial_reduce")(x)
        s = layers.Flatten(name="spatial_flatten")(s)
        feats = layers.Concatenate(name="features")([pooled, s])
    feats = layers.Dense(hidden, activation="relu", name="shared_dense")(feats)
    outputs = {}
    if "class" in heads:
        outputs["class"] = class_head(feats, num_classes, dropout=dropout)
    if "boxes" in heads:
        outputs["boxes"] = box_head(feats, num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name="small_cnn")
