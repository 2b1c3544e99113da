"""A small CNN with a class head and a per-class box head: a fast CPU baseline.

It trains in minutes on the phantom default on a 2-core CPU, which makes it the model
`make train` uses (heavier architectures are one ``model=...`` away). The box head is
dense by default (heat + box maps over the stride-8 and stride-16 stages, decoded to one
box per class slot: :func:`src.models.heads.dense_box_head`); ``box_head: flat`` is the
seed design. The class head (and the flat box head) see a flattened low-resolution
feature map besides the pooled features, so *where* something is (midline, skull
boundary) is available to them, not only *what* it looks like.
BatchNormalization uses momentum 0.9 so its moving statistics settle within the few
hundred steps of a CPU run.
"""
from __future__ import annotations

import keras
from keras import layers

from .heads import box_head as flat_box_head, class_head, dense_box_head
from .registry import register_model


@register_model("small_cnn")
def small_cnn(num_classes: int = 4, image_size: int = 128, widths=(32, 64, 128, 192), dropout: float = 0.2,
              spatial_channels: int = 16, hidden: int = 128, heads=("class", "boxes"),
              bn_momentum: float = 0.9, box_head: str = "dense", box_channels: int = 64,
              box_heatmaps: str = "shared", box_levels=None) -> keras.Model:
    """``box_head``: ``dense`` (dense maps over the stages ``box_levels``, 1-based, merged
    top-down; default: the last two; see :func:`src.models.heads.dense_box_head`) or
    ``flat`` (the seed design: one box per slot from the pooled + flattened features)."""
    if box_head not in ("dense", "flat"):
        raise ValueError(f"model.box_head must be 'dense' or 'flat', got {box_head!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    inputs = keras.Input((*size, 3), name="image")
    x = inputs
    stages = []
    for i, w in enumerate(widths):
        x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"stage{i + 1}_conv1")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"stage{i + 1}_bn1")(x)
        x = layers.Activation("relu", name=f"stage{i + 1}_relu1")(x)
        x = layers.Conv2D(w, 3, strides=2, padding="same", use_bias=False, name=f"stage{i + 1}_conv2")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"stage{i + 1}_bn2")(x)
        x = layers.Activation("relu", name=f"stage{i + 1}_relu2")(x)
        stages.append(x)
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
    if "boxes" in heads and box_head == "flat":
        outputs["boxes"] = flat_box_head(feats, num_classes, dropout=dropout)
    elif "boxes" in heads:
        levels = [int(v) for v in box_levels] if box_levels else list(range(max(1, len(stages) - 1), len(stages) + 1))
        if not levels or min(levels) < 1 or max(levels) > len(stages):
            raise ValueError(f"model.box_levels must name stages 1..{len(stages)}, got {list(box_levels)}")
        outputs["boxes"], outputs["boxes_aux1"] = dense_box_head(
            [stages[i - 1] for i in sorted(levels)], num_classes, channels=box_channels, heatmaps=box_heatmaps,
            bn_momentum=bn_momentum)
    return keras.Model(inputs, outputs, name="small_cnn")
