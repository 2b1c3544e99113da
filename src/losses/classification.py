"""Classification losses: class-weighted BCE (multi-label), sparse focal / cross-entropy (softmax).

All losses compute in float32 (also under mixed precision), take a per-sample weight
``[B]`` (0 = unknown target, e.g. no subtype for a healthy slice) and share the
reduction semantics of :class:`src.losses.base.MaskedLoss`: by default
(``normalize="weights"``) the loss is the *masked mean* ``sum(w * l) / sum(w)``, and a
batch whose weights are all 0 gives exactly 0 with a zero gradient.
``normalize="batch"`` gives Keras' usual ``sum(w * l) / B``.
"""
from __future__ import annotations

import warnings

import numpy as np

import keras
from keras import ops

from .base import MaskedLoss

__all__ = [
    "WeightedBinaryCrossentropy",
    "SparseCategoricalFocalLoss",
    "MaskedSparseCategoricalCrossentropy",
    "class_weights_from_labels",
    "class_set_nll",
    "CLASS_WEIGHT_MODES",
]

CLASS_WEIGHT_MODES = ("balanced", "sqrt", "none")


def _float_list(values, what: str):
    """``None`` -> ``None``; a scalar or any iterable (list, ListConfig, ndarray) -> list of floats."""
    if values is None:
        return None
    if np.ndim(values) == 0:
        return [float(values)]
    out = [float(v) for v in np.asarray(list(values), dtype="float64").reshape(-1)]
    if not out:
        raise ValueError(f"{what} must not be empty")
    return out


def _per_class(values, n_classes):
    """A float32 constant broadcastable to ``[..., n_classes]`` (scalar lists broadcast)."""
    if values is None:
        return 1.0
    if len(values) not in (1, n_classes) and n_classes is not None:
        raise ValueError(f"got {len(values)} per-class weights for {n_classes} classes")
    return ops.convert_to_tensor(np.asarray(values, dtype="float32"))


# --------------------------------------------------------------------------- multi-label
@keras.saving.register_keras_serializable(package="btmtl")
class WeightedBinaryCrossentropy(MaskedLoss):
    """Binary cross-entropy with per-class positive and negative weights (multi-label heads).

    Per sample: ``mean_c -(pos_weights[c] * y_c * log p_c + neg_weights[c] * (1 - y_c) * log(1 - p_c))``
    with ``p`` clipped to ``[eps, 1 - eps]`` (``eps = keras.config.epsilon()``) in float32,
    or computed with ``log_sigmoid`` when ``from_logits``. With both weight lists ``None``
    it equals ``keras.losses.BinaryCrossentropy`` (``"bce"`` in :func:`src.losses.get_loss`).

    Args:
        pos_weights, neg_weights: one float per class (or one float for all classes, or
            ``None`` for 1.0). Stored as plain lists in ``get_config`` so a saved model
            reloads without custom objects. See :func:`class_weights_from_labels`.
        from_logits: ``y_pred`` holds logits instead of probabilities.
        label_smoothing: ``y <- y * (1 - s) + s / 2``.
        normalize: ``"weights"`` (masked mean over samples, default) or ``"batch"``.
        name, reduction: as for any Keras loss.

    ``y_true``/``y_pred`` are ``[B, C]`` (a ``[B]`` pair is treated as one class);
    ``sample_weight`` is per sample ``[B]`` (``[B, 1]`` also accepted).
    """

    def __init__(self, pos_weights=None, neg_weights=None, from_logits=False, label_smoothing=0.0,
                 normalize="weights", name="weighted_bce", reduction="sum_over_batch_size", dtype=None):
        super().__init__(normalize=normalize, name=name, reduction=reduction)
        self.pos_weights = _float_list(pos_weights, "pos_weights")
        self.neg_weights = _float_list(neg_weights, "neg_weights")
        if self.pos_weights and self.neg_weights and len(self.pos_weights) != len(self.neg_weights) \
                and 1 not in (len(self.pos_weights), len(self.neg_weights)):
            raise ValueError(f"pos_weights has {len(self.pos_weights)} classes, neg_weights {len(self.neg_weights)}")
        if any(w < 0 for w in (self.pos_weights or []) + (self.neg_weights or [])):
            raise ValueError("class weights must be >= 0")
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if len(y_pred.shape) == 1:
            y_pred = ops.expand_dims(y_pred, -1)
        if len(y_true.shape) == len(y_pred.shape) - 1:
            y_true = ops.expand_dims(y_true, -1)
        n_classes = y_pred.shape[-1]
        if self.label_smoothing:
            y_true = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.from_logits:
            log_p = ops.log_sigmoid(y_pred)
            log_1mp = ops.log_sigmoid(-y_pred)
        else:
            eps = keras.config.epsilon()
            p = ops.clip(y_pred, eps, 1.0 - eps)
            log_p = ops.log(p)
            log_1mp = ops.log(1.0 - p)
        w_pos = _per_class(self.pos_weights, n_classes)
        w_neg = _per_class(self.neg_weights, n_classes)
        per_class = -(w_pos * y_true * log_p + w_neg * (1.0 - y_true) * log_1mp)
        return ops.mean(per_class, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update({
            "pos_weights": self.pos_weights,
            "neg_weights": self.neg_weights,
            "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing,
        })
        return config


def class_weights_from_labels(multi_hot, mode: str = "balanced", mask=None):
    """Per-class positive/negative weights for :class:`WeightedBinaryCrossentropy`.

    Compute them from the TRAINING labels only (never validation/test).

    ``mode="balanced"``: with ``N`` known rows, ``n_pos[c]`` positives and
    ``n_neg[c] = N - n_pos[c]`` negatives, ``w_pos[c] = N / (2 n_pos[c])`` and
    ``w_neg[c] = N / (2 n_neg[c])`` (sklearn's "balanced" rule applied to each class as a
    binary problem: both sides then carry the same total weight ``N / 2``).
    ``mode="sqrt"``: the square roots of the balanced weights (a milder correction).
    ``mode="none"``: all ones.

    Classes with no positives (or no negatives) in the training labels get weight 1.0
    for the absent side: that term never fires on the training data, so a neutral,
    finite weight is the only choice that neither divides by zero nor invents a prior;
    a ``UserWarning`` names those classes.

    Args:
        multi_hot: ``[N, C]`` array of 0/1 labels.
        mode: ``"balanced" | "sqrt" | "none"``.
        mask: optional ``[N]`` array; rows where it is 0/False (unknown labels) are ignored.

    Returns:
        ``(pos_weights, neg_weights)``: two lists of ``C`` Python floats.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {CLASS_WEIGHT_MODES}, got {mode!r}")
    y = np.asarray(multi_hot, dtype="float64")
    if y.ndim != 2:
        raise ValueError(f"multi_hot must be a 2-D [N, C] array, got shape {y.shape}")
    if mask is not None:
        mask = np.asarray(mask).reshape(-1)
        if mask.shape[0] != y.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} rows, multi_hot {y.shape[0]}")
        y = y[mask.astype(bool)]
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("multi_hot must hold only 0 and 1 (mask out unknown rows with `mask`)")
    n_rows, n_classes = y.shape
    if n_rows == 0:
        raise ValueError("class_weights_from_labels needs at least one known label row")
    if mode == "none":
        return [1.0] * n_classes, [1.0] * n_classes
    n_pos = y.sum(axis=0)
    n_neg = n_rows - n_pos
    w_pos = np.where(n_pos > 0, n_rows / (2.0 * np.maximum(n_pos, 1)), 1.0)
    w_neg = np.where(n_neg > 0, n_rows / (2.0 * np.maximum(n_neg, 1)), 1.0)
    missing = [c for c in range(n_classes) if n_pos[c] == 0 or n_neg[c] == 0]
    if missing:
        warnings.warn(f"class_weights_from_labels: classes {missing} have no positives or no negatives; "
                      "the absent side gets weight 1.0", UserWarning, stacklevel=2)
    if mode == "sqrt":
        w_pos, w_neg = np.sqrt(w_pos), np.sqrt(w_neg)
    return [float(v) for v in w_pos], [float(v) for v in w_neg]


# --------------------------------------------------------------------------- softmax heads
@keras.saving.register_keras_serializable(package="btmtl")
class SparseCategoricalFocalLoss(MaskedLoss):
    """Focal loss (Lin et al. 2017) for softmax heads with integer labels.

    Per sample: ``-alpha[y] * (1 - p_y) ** gamma * log p_y``. With ``gamma=0`` and no
    ``alpha`` it is the sparse categorical cross-entropy (equal to
    ``keras.losses.SparseCategoricalCrossentropy``). Probabilities (``from_logits=False``)
    are renormalised and clipped to ``[eps, 1 - eps]`` in float32, as Keras does;
    logits go through ``log_softmax``.

    Args:
        gamma: focusing parameter (>= 0).
        alpha: ``None`` (1), one float for all classes, or one float per class.
        from_logits: ``y_pred`` holds logits.
        normalize: ``"weights"`` (masked mean over samples, default) or ``"batch"``.
        label_smoothing: ``s`` in [0, 1): the target becomes ``(1 - s) * one_hot + s / K``
            (Szegedy et al. 2016); the focal factor still uses the true class.
        name, reduction: as for any Keras loss.

    ``y_true`` is ``[B]`` or ``[B, 1]`` integer labels, ``y_pred`` ``[B, K]``;
    ``sample_weight`` ``[B]``. Rows with an unknown label need weight 0; their label value
    does not matter (an out-of-range value such as -1 is harmless: its one-hot row is 0).
    """

    def __init__(self, gamma=2.0, alpha=None, from_logits=False, normalize="weights", label_smoothing=0.0,
                 name="sparse_categorical_focal_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(normalize=normalize, name=name, reduction=reduction)
        self.gamma = float(gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.label_smoothing = float(label_smoothing or 0.0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha = _float_list(alpha, "alpha")
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        labels = y_true
        if len(labels.shape) == len(y_pred.shape) and labels.shape[-1] == 1:
            labels = ops.squeeze(labels, axis=-1)
        labels = ops.cast(labels, "int32")
        n_classes = y_pred.shape[-1]
        if n_classes is None:
            raise ValueError("the class dimension of y_pred must be known statically")
        one_hot = ops.one_hot(labels, n_classes, dtype="float32")
        if self.from_logits:
            log_p = ops.log_softmax(y_pred, axis=-1)
        else:
            eps = keras.config.epsilon()
            p = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
            p = ops.clip(p, eps, 1.0 - eps)
            log_p = ops.log(p / ops.sum(p, axis=-1, keepdims=True))
        log_pt = ops.sum(one_hot * log_p, axis=-1)
        if self.label_smoothing:
            s = self.label_smoothing
            loss = -((1.0 - s) * log_pt + s * ops.mean(log_p, axis=-1))
        else:
            loss = -log_pt
        if self.gamma > 0:
            # max(., tiny): finite gradient of x ** gamma at x = 0 also for gamma < 1
            loss = loss * ops.power(ops.maximum(1.0 - ops.exp(log_pt), 1e-12), self.gamma)
        if self.alpha is not None:
            alpha = _per_class(self.alpha, n_classes)
            if len(self.alpha) == 1:
                loss = loss * alpha[0]
            else:
                loss = loss * ops.sum(one_hot * alpha, axis=-1)
        return loss

    def get_config(self):
        config = super().get_config()
        config.update({"gamma": self.gamma, "alpha": self.alpha, "from_logits": self.from_logits,
                       "label_smoothing": self.label_smoothing})
        return config


@keras.saving.register_keras_serializable(package="btmtl")
class MaskedSparseCategoricalCrossentropy(SparseCategoricalFocalLoss):
    """Sparse categorical cross-entropy with masked-mean reduction (``"ce"`` in :func:`get_loss`).

    ``SparseCategoricalFocalLoss`` with ``gamma=0``; ``class_weights`` (optional, one float
    per class) weights each sample by the weight of its true class.
    """

    def __init__(self, from_logits=False, class_weights=None, normalize="weights", label_smoothing=0.0,
                 name="masked_sparse_ce", reduction="sum_over_batch_size", dtype=None):
        super().__init__(gamma=0.0, alpha=class_weights, from_logits=from_logits, label_smoothing=label_smoothing,
                         normalize=normalize, name=name, reduction=reduction)

    def get_config(self):
        config = super().get_config()
        config.pop("gamma")
        config["class_weights"] = config.pop("alpha")
        return config


# --------------------------------------------------------------------------- set-valued labels
def class_set_nll(y_set, y_pred, from_logits: bool = False):
    """Per-sample ``-log sum_{c in set} p_c`` of a softmax head: the label is only known to lie
    in a set of classes (``y_set`` ``[B, C]`` multi-hot), e.g. a generic ``tumor`` is *some*
    tumour class. With the set = every class but ``no_tumor`` this is ``-log(1 - p(no_tumor))``,
    the tumour-vs-healthy cross-entropy: the mass on the set grows, and within the set each
    class's logit moves in proportion to its own probability, so no subtype is taught.
    Computed in float32; an empty set row gives a finite (unused) value."""
    y_set = ops.cast(y_set, "float32")
    y_pred = ops.cast(y_pred, "float32")
    if from_logits:
        log_p = ops.log_softmax(y_pred, axis=-1)
        masked = ops.where(y_set > 0, log_p, ops.full_like(log_p, -1e9))
        return -ops.logsumexp(masked, axis=-1)
    eps = keras.config.epsilon()
    p = y_pred / ops.maximum(ops.sum(y_pred, axis=-1, keepdims=True), eps)
    return -ops.log(ops.clip(ops.sum(y_set * p, axis=-1), eps, 1.0))
