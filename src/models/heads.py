"""Small reusable heads. Final activations run in float32 under mixed precision."""
from __future__ import annotations

import keras
from keras import layers, ops


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
    import math

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
