"""Losses: a masked-loss base, the box IoU family, class-weighted BCE, focal / cross-entropy,
Dice / focal for masks, reconstruction, loss balancing, and a factory.

Every loss here computes in float32, takes masks as sample weights (0 = unknown target)
and by default reduces with a *masked mean* (``normalize="weights"``:
``sum(w * l) / sum(w)``, exactly 0 with a zero gradient when all weights are 0); see
:mod:`src.losses.base` for the full reduction semantics (:class:`MaskedLoss`, the base
of every loss here). The box metric ``BoxMeanIoU`` is a metric: :mod:`src.training.metrics`.

``get_loss(name, **kwargs)`` turns a config name into a loss instance::

    get_loss("ciou")                                   # BoxIoULoss(mode="ciou")
    get_loss("weighted_bce", pos_weights=[...], neg_weights=[...])
    get_loss("focal", gamma=2.0, alpha=[...], from_logits=True)

Other modules may add names with :func:`register_loss`.
"""
from __future__ import annotations

from typing import Callable, Dict

import keras

from .base import NORMALIZE_MODES, MaskedLoss, safe_divide
from .box import BOX_MODES, BoxIoULoss, DenseBoxLoss, box_iou, pairwise_iou
from .reconstruction import RECON_MODES, ReconstructionLoss
from .segmentation import BinaryFocalLoss, DiceFocalLoss, DiceLoss, soft_dice, soft_iou
from .classification import (
    CLASS_WEIGHT_MODES,
    MaskedSparseCategoricalCrossentropy,
    SparseCategoricalFocalLoss,
    WeightedBinaryCrossentropy,
    class_weights_from_labels,
)

__all__ = [
    "BOX_MODES",
    "NORMALIZE_MODES",
    "CLASS_WEIGHT_MODES",
    "MaskedLoss",
    "BoxIoULoss",
    "DenseBoxLoss",
    "box_iou",
    "pairwise_iou",
    "safe_divide",
    "WeightedBinaryCrossentropy",
    "SparseCategoricalFocalLoss",
    "MaskedSparseCategoricalCrossentropy",
    "class_weights_from_labels",
    "DiceLoss",
    "BinaryFocalLoss",
    "DiceFocalLoss",
    "soft_dice",
    "soft_iou",
    "ReconstructionLoss",
    "get_loss",
    "register_loss",
    "list_losses",
]


def _box(mode: str) -> Callable[..., keras.losses.Loss]:
    def make(**kwargs):
        kwargs.setdefault("name", f"{mode}_loss")
        return BoxIoULoss(mode=mode, **kwargs)

    return make


def _bce(**kwargs):
    kwargs.setdefault("name", "bce")
    return WeightedBinaryCrossentropy(**kwargs)


def _weighted_bce(**kwargs):
    if kwargs.get("pos_weights") is None or kwargs.get("neg_weights") is None:
        raise ValueError("weighted_bce needs pos_weights and neg_weights (one float per class); "
                         "compute them from the training labels with "
                         "src.losses.class_weights_from_labels, or use 'bce' for unweighted BCE")
    return WeightedBinaryCrossentropy(**kwargs)


def _ce(**kwargs):
    kwargs.setdefault("name", "ce")
    return MaskedSparseCategoricalCrossentropy(**kwargs)


def _dice(**kwargs):
    kwargs.setdefault("name", "dice_loss")
    return DiceLoss(**kwargs)


def _binary_focal(**kwargs):
    kwargs.setdefault("name", "binary_focal")
    return BinaryFocalLoss(**kwargs)


def _dice_focal(**kwargs):
    kwargs.setdefault("name", "dice_focal")
    return DiceFocalLoss(**kwargs)


def _focal(**kwargs):
    kwargs.setdefault("name", "focal")
    return SparseCategoricalFocalLoss(**kwargs)


_REGISTRY: Dict[str, Callable[..., keras.losses.Loss]] = {
    **{mode: _box(mode) for mode in BOX_MODES},
    "bce": _bce,
    "weighted_bce": _weighted_bce,
    "ce": _ce,
    "focal": _focal,
    "dice": _dice,
    "binary_focal": _binary_focal,
    "dice_focal": _dice_focal,
    "dense_box": lambda **kw: DenseBoxLoss(**kw),
    **{m: (lambda mode: (lambda **kw: ReconstructionLoss(mode=mode, **kw)))(m) for m in RECON_MODES},
}
_ALIASES = {
    "iou_loss": "iou", "giou_loss": "giou", "diou_loss": "diou", "ciou_loss": "ciou",
    "binary_crossentropy": "bce", "weighted_binary_crossentropy": "weighted_bce",
    "sparse_categorical_crossentropy": "ce", "crossentropy": "ce",
    "focal_loss": "focal", "sparse_categorical_focal": "focal",
    "mean_squared_error": "mse", "mae": "l1", "mean_absolute_error": "l1",
}


def register_loss(name: str, factory: Callable[..., keras.losses.Loss], overwrite: bool = False) -> None:
    """Make ``get_loss(name, **kwargs)`` return ``factory(**kwargs)``."""
    key = name.strip().lower()
    if not overwrite and (key in _REGISTRY or key in _ALIASES):
        raise ValueError(f"loss {name!r} is already registered")
    _REGISTRY[key] = factory


def list_losses() -> list:
    """The registered loss names (aliases not included)."""
    return sorted(_REGISTRY)


def get_loss(name, **kwargs) -> keras.losses.Loss:
    """A loss instance from a config name (case-insensitive) and keyword arguments.

    ``"iou" | "giou" | "diou" | "ciou"`` -> :class:`BoxIoULoss`;
    ``"bce"`` -> unweighted :class:`WeightedBinaryCrossentropy`;
    ``"weighted_bce"`` -> :class:`WeightedBinaryCrossentropy` (needs ``pos_weights`` and
    ``neg_weights``); ``"ce"`` -> :class:`MaskedSparseCategoricalCrossentropy`;
    ``"focal"`` -> :class:`SparseCategoricalFocalLoss`. A ``keras.losses.Loss`` instance
    is returned unchanged (``kwargs`` must then be empty).
    """
    if isinstance(name, keras.losses.Loss):
        if kwargs:
            raise ValueError("get_loss: keyword arguments given with a loss instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"get_loss: expected a loss name, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(list_losses())}")
    return _REGISTRY[key](**kwargs)
