"""Small reusable heads. Final activations run in float32 under mixed precision.

Box heads (one box per class slot, ``[B, C, 4]`` normalised xyxy, valid by construction):

* :func:`dense_box_head` (``box_head: dense``, the default): dense prediction over a
  feature pyramid, as anchor-free detectors do. At every cell of a stride-``s`` map it
  predicts a centre-heat logit (one map shared by every slot, or one per slot) and the
  distances from the cell's centre to the four box edges (FCOS). A slot's box is decoded
  by a soft arg-max: the softmax of its heat map over the cells weights the cells' boxes.
  Everything is differentiable, so the slot box trains with the usual IoU-family loss;
  the raw maps are also emitted as the training-only output ``boxes_aux1``, whose loss
  (:class:`src.losses.box.DenseBoxLoss`) puts the heat on the true box centre and
  trains every cell near it to predict the box.
* :func:`box_head` (``box_head: flat``): the seed detector's design, one box per slot
  regressed from pooled / flattened features by dense layers. It barely localises on
  real slices (mean IoU 0.19 on held-out figshare patients); kept for that recipe.
"""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from ..losses.box import dense_boxes
from .layers import ResizeTo


@keras.saving.register_keras_serializable(package="btmtl")
class BoxFromCentreSize(layers.Layer):
    """Turns raw logits [..., 4] into valid normalised xyxy boxes.

    Centre = sigmoid(logits[:2]) in [0, 1], size = min_size + (1 - min_size) *
    sigmoid(logits[2:]); corners are clipped to the image. With size >= min_size > 0 and
    the centre inside [0, 1], x_max - x_min >= min_size / 2 > 0 even for saturated logits
    in float32: a predicted box can never be empty or inverted.
    """

    def __init__(self, min_size: float = 1e-3, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not 0 < min_size < 1:
            raise ValueError(f"min_size must be in (0, 1), got {min_size}")
        self.min_size = float(min_size)

    def get_config(self):
        return {**super().get_config(), "min_size": self.min_size}

    def call(self, logits):
        logits = ops.cast(logits, "float32")
        centre = ops.sigmoid(logits[..., :2])
        size = self.min_size + (1.0 - self.min_size) * ops.sigmoid(logits[..., 2:])
        lo = ops.clip(centre - size / 2.0, 0.0, 1.0)
        hi = ops.clip(centre + size / 2.0, 0.0, 1.0)
        return ops.concatenate([lo, hi], axis=-1)


def box_head(features, num_slots: int, hidden: int = 128, dropout: float = 0.0, name: str = "boxes",
             initial_size: float = 0.15):
    """One box per class slot: [B, num_slots, 4] valid xyxy boxes.

    The size logits start at ``logit(initial_size)`` so first predictions are
    tumour-sized boxes at the centre rather than half the image.
    """
    x = layers.Dense(hidden, activation="relu", name=f"{name}_hidden")(features)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    size_logit = math.log(initial_size / (1.0 - initial_size))
    bias = [0.0, 0.0, size_logit, size_logit] * num_slots
    x = layers.Dense(num_slots * 4, bias_initializer=keras.initializers.Constant(bias), name=f"{name}_logits")(x)
    x = layers.Reshape((num_slots, 4), name=f"{name}_reshape")(x)
    return BoxFromCentreSize(name=name)(x)


def class_head(features, num_classes: int, multilabel: bool = False, hidden: int = 0,
               dropout: float = 0.0, name: str = "class"):
    """Softmax (single-label) or sigmoid (multi-label) class probabilities in float32."""
    x = features
    if hidden:
        x = layers.Dense(hidden, activation="relu", name=f"{name}_hidden")(x)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = layers.Dense(num_classes, name=f"{name}_logits")(x)
    return layers.Activation("sigmoid" if multilabel else "softmax", dtype="float32", name=name)(x)


@keras.saving.register_keras_serializable(package="btmtl")
class DenseBoxDecode(layers.Layer):
    """Soft arg-max decoding of dense box maps into one box per slot.

    Inputs ``[heat, dist]``: heat logits ``[B, h, w, K]`` (``K`` = 1: one map shared by
    every slot) and distance logits ``[B, h, w, 4]``. The box of a cell with centre
    ``(cx, cy)`` is ``[cx - l, cy - t, cx + r, cy + b]`` with ``(l, t, r, b) =
    sigmoid(dist)`` (normalised to the image); slot ``k``'s box is the average of the
    cells' boxes weighted by ``softmax(heat[..., k])`` over the cells, clipped to the
    image. An average of boxes with positive extents has positive extents, so the box is
    never empty or inverted. Output ``[B, num_slots, 4]`` float32.
    """

    def __init__(self, num_slots: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_slots = int(num_slots)

    def call(self, inputs):
        heat, dist = inputs
        heat = ops.cast(heat, "float32")
        boxes = dense_boxes(dist)                                     # [B, h, w, 4]
        shape = ops.shape(heat)
        k = heat.shape[-1]
        attn = ops.softmax(ops.reshape(heat, (shape[0], -1, k)), axis=1)  # [B, hw, K]
        flat = ops.reshape(boxes, (shape[0], -1, 4))                      # [B, hw, 4]
        out = ops.einsum("bnk,bnc->bkc", attn, flat)                      # [B, K, 4]
        if k == 1 and self.num_slots != 1:
            out = ops.repeat(out, self.num_slots, axis=1)
        return ops.clip(out, 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_slots, 4)

    def get_config(self):
        return {**super().get_config(), "num_slots": self.num_slots}


def dense_box_head(features, num_slots: int, channels: int = 64, heatmaps: str = "shared", name: str = "boxes",
                   bn_momentum: float = 0.9, initial_size: float = 0.15):
    """Dense box prediction over ``features`` (feature maps, finest first; coarser ones are
    merged top-down into the finest as in an FPN). Returns ``(boxes, aux)``: the decoded
    ``[B, num_slots, 4]`` boxes (named ``name``) and the raw ``[B, h, w, K + 4]`` maps
    (named ``<name>_aux1``, training only). ``heatmaps``: ``shared`` (one heat map for
    every slot: each image teaches it, whatever its class) or ``per_slot``.
    """
    if heatmaps not in ("shared", "per_slot"):
        raise ValueError(f"heatmaps must be 'shared' or 'per_slot', got {heatmaps!r}")
    feats = list(features)
    x = layers.Conv2D(channels, 1, name=f"{name}_lateral{len(feats) - 1}")(feats[-1])
    for i in range(len(feats) - 2, -1, -1):
        up = ResizeTo(tuple(int(d) for d in feats[i].shape[1:3]), interpolation="nearest",
                      name=f"{name}_up{i}")(x)
        x = layers.Add(name=f"{name}_merge{i}")([up, layers.Conv2D(channels, 1, name=f"{name}_lateral{i}")(feats[i])])
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_neck_conv")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_neck_bn")(x)
    x = layers.Activation("relu", name=f"{name}_neck_relu")(x)
    k = 1 if heatmaps == "shared" else int(num_slots)
    heat = layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"{name}_heat_conv")(x)
    heat = layers.Conv2D(k, 1, name=f"{name}_heat")(heat)
    dist = layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"{name}_dist_conv")(x)
    half = initial_size / 2.0
    dist = layers.Conv2D(4, 1, bias_initializer=keras.initializers.Constant(math.log(half / (1.0 - half))),
                         name=f"{name}_dist")(dist)
    boxes = DenseBoxDecode(num_slots, name=name)([heat, dist])
    aux = layers.Concatenate(dtype="float32", name=f"{name}_aux1")([heat, dist])
    return boxes, aux
