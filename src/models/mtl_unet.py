"""Hierarchical multi-task U-Net: reconstruction, tumour vs healthy, subtype, segmentation.

``model=mtl_unet``. A U-Net encoder (a stem block and 4 downsampling blocks; widths
``64 -> 1024`` as published with ``preset: published``, ``8 -> 128`` with the default
``preset: cpu``) feeds:

* ``recon`` -- a decoder that reconstructs the input image (sigmoid, ``[B, H, W, 3]``;
  loss MSE or L1 against ``x`` itself). ``recon_skips: false`` is the **default**: with
  the U-Net's skip connections the decoder can copy the image through the first skip and
  learn (almost) the identity, which forces nothing through the bottleneck and teaches
  the encoder little. Without skips everything the decoder draws must pass through the
  latent, which is what the classification heads read. ``recon_skips: true`` gives the
  published variant.
* ``tumor`` -- tumour vs healthy (sigmoid probability, ``[B]``) from the bottleneck
  latent (global average pooling + dense).
* ``subtype`` -- the tumour classes (softmax over ``classes`` minus ``no_tumor``) from
  the same latent. Its sample weight is 0 for healthy and generic-``tumor`` slices (the
  pipeline's ``subtype`` weights), so a batch of only healthy slices gives subtype loss
  0, not NaN.
* ``mask`` (optional, ``heads`` includes ``mask``) -- foreground probability
  ``[B, H, W, 1]`` from a segmentation decoder **with** skips (a mask is not the input,
  so skips cannot short-cut it, and fine boundaries need them).
* ``class`` -- not trained: the 4-class distribution composed from the two heads,
  ``P(no_tumor) = 1 - p``, ``P(k) = p * P(subtype k)``, so class metrics (accuracy, AUC,
  F1) are reported during training. The hard 4-class *prediction* of the tool is
  :func:`four_class_prediction`: ``no_tumor`` if ``p < threshold`` else the subtype
  argmax (``model.threshold``, used by evaluation and prediction).
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
from keras import layers, ops

from .registry import register_model

PRESETS = {"cpu": (8, 16, 32, 64, 128), "mid": (16, 32, 64, 128, 256), "published": (64, 128, 256, 512, 1024)}
NO_TUMOR = "no_tumor"


@keras.saving.register_keras_serializable(package="btmtl")
class SqueezeLast(layers.Layer):
    """``[B, 1] -> [B]`` (a binary head whose target is one number per sample)."""

    def call(self, x):
        return ops.squeeze(x, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])


@keras.saving.register_keras_serializable(package="btmtl")
class AlwaysTumour(layers.Layer):
    """``[B, ...] -> [B]`` ones: p(tumour) = 1 when the model has no tumour head."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, x):
        return ops.ones((ops.shape(x)[0],), "float32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)


@keras.saving.register_keras_serializable(package="btmtl")
class ComposeFourClass(layers.Layer):
    """``(p_tumour [B], subtype probs [B, S]) -> [B, S + 1]`` class probabilities.

    ``no_position`` is where ``no_tumor`` sits among the classes (the others keep the
    subtype order). A proper distribution: ``1 - p`` and ``p * s_k`` sum to 1.
    """

    def __init__(self, no_position: int = 3, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.no_position = int(no_position)

    def call(self, p, s):
        p = ops.cast(ops.expand_dims(p, -1), "float32")
        s = ops.cast(s, "float32")
        tum = p * s
        parts = [tum[:, :self.no_position], 1.0 - p, tum[:, self.no_position:]]
        return ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, p_shape, s_shape):
        return (s_shape[0], s_shape[-1] + 1)

    def get_config(self):
        return {**super().get_config(), "no_position": self.no_position}


def four_class_prediction(p_tumor, subtype_probs, classes: Sequence[str], threshold: float = 0.5) -> np.ndarray:
    """Hard 4-class ids: ``no_tumor`` if ``p_tumor < threshold``, else the subtype argmax.

    ``classes``: the model's class list (with ``no_tumor``); subtypes are the others in order.
    """
    classes = list(classes)
    if NO_TUMOR not in classes:
        raise ValueError(f"four_class_prediction needs {NO_TUMOR!r} among the classes, got {classes}")
    subtypes = [i for i, c in enumerate(classes) if c != NO_TUMOR]
    p = np.asarray(p_tumor, np.float32).reshape(-1)
    s = np.asarray(subtype_probs, np.float32)
    out = np.asarray(subtypes)[np.argmax(s, axis=-1)]
    return np.where(p < threshold, classes.index(NO_TUMOR), out).astype(np.int64)


def _block(x, width: int, name: str, bn_momentum: float):
    for i in (1, 2):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def _decoder(x, skips: Optional[list], widths: Sequence[int], name: str, bn_momentum: float):
    """Four upsampling blocks; ``skips`` (deepest first) are concatenated when given."""
    for i, w in enumerate(widths):
        x = layers.Conv2DTranspose(w, 2, strides=2, padding="same", name=f"{name}_up{i + 1}")(x)
        if skips is not None:
            x = layers.Concatenate(name=f"{name}_cat{i + 1}")([x, skips[i]])
        x = _block(x, w, f"{name}_dec{i + 1}", bn_momentum)
    return x


@register_model("mtl_unet")
def mtl_unet(num_classes: int = 4, image_size=128, class_names: Optional[Sequence[str]] = None,
             preset: str = "cpu", widths: Optional[Sequence[int]] = None,
             heads: Sequence[str] = ("tumor", "subtype", "recon"), recon_skips: bool = False,
             latent_dim: int = 128, dropout: float = 0.3, seg_width_factor: float = 0.5,
             bn_momentum: float = 0.9) -> keras.Model:
    """Build the U-Net; see the module docstring. ``image_size`` must be divisible by 16."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if size[0] % 16 or size[1] % 16:
        raise ValueError(f"mtl_unet: image size {size} must be divisible by 16 (4 downsamplings)")
    if widths is None:
        if preset not in PRESETS:
            raise ValueError(f"mtl_unet: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        widths = PRESETS[preset]
    widths = [int(w) for w in widths]
    if len(widths) != 5:
        raise ValueError(f"mtl_unet: widths needs 5 values (stem + 4 downsampling blocks), got {widths}")
    heads = list(heads)
    unknown = set(heads) - {"tumor", "subtype", "recon", "mask", "class"}
    if unknown:
        raise ValueError(f"mtl_unet: unknown heads {sorted(unknown)}; it has tumor, subtype, recon, mask, class")
    names = list(class_names) if class_names is not None else \
        (["glioma", "meningioma", "pituitary", NO_TUMOR] if num_classes == 4 else [f"c{i}" for i in range(num_classes)])
    if len(names) != num_classes:
        raise ValueError(f"mtl_unet: {len(names)} class names for num_classes={num_classes}")
    n_sub = sum(c != NO_TUMOR for c in names)

    inputs = keras.Input((*size, 3), name="image")
    x = inputs
    skips = []
    for i, w in enumerate(widths[:-1]):
        x = _block(x, w, f"enc{i + 1}", bn_momentum)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{i + 1}_pool")(x)
    bottleneck = _block(x, widths[-1], "bottleneck", bn_momentum)
    skips = skips[::-1]  # deepest first

    latent = layers.GlobalAveragePooling2D(name="latent_pool")(bottleneck)
    latent = layers.Dense(latent_dim, activation="relu", name="latent")(latent)
    if dropout:
        latent = layers.Dropout(dropout, name="latent_dropout")(latent)
    outputs = {}
    want_cls = any(h in heads for h in ("tumor", "subtype", "class"))
    if want_cls and "tumor" not in heads:
        # no tumour head (data without healthy slices): every slice has a tumour, p = 1
        p_tumor = AlwaysTumour(name="tumor_always")(latent)
    elif want_cls:
        t = layers.Dense(1, name="tumor_logit")(latent)
        t = layers.Activation("sigmoid", dtype="float32", name="tumor_prob")(t)
        p_tumor = SqueezeLast(dtype="float32", name="tumor")(t)
    if want_cls:
        if "tumor" in heads or "class" in heads:
            outputs["tumor"] = p_tumor
        if n_sub and ("subtype" in heads or "class" in heads):
            s = layers.Dense(n_sub, name="subtype_logits")(latent)
            s = layers.Activation("softmax", dtype="float32", name="subtype")(s)
            outputs["subtype"] = s
            if NO_TUMOR in names:
                outputs["class"] = ComposeFourClass(names.index(NO_TUMOR), name="class")(p_tumor, s)
    if "recon" in heads:
        r = _decoder(bottleneck, skips if recon_skips else None, widths[-2::-1], "recon", bn_momentum)
        r = layers.Conv2D(3, 1, name="recon_out")(r)
        outputs["recon"] = layers.Activation("sigmoid", dtype="float32", name="recon")(r)
    if "mask" in heads:
        seg_widths = [max(4, int(round(w * seg_width_factor))) for w in widths[-2::-1]]
        m = _decoder(bottleneck, skips, seg_widths, "mask", bn_momentum)
        m = layers.Conv2D(1, 1, name="mask_logits")(m)
        outputs["mask"] = layers.Activation("sigmoid", dtype="float32", name="mask")(m)
    if not outputs:
        raise ValueError(f"mtl_unet: heads {heads} give no outputs")
    return keras.Model(inputs, outputs, name="mtl_unet")
