"""Segmentation losses for binary (tumour / background) masks: Dice, focal, Dice + focal.

Conventions (as every loss of :mod:`src.losses`, see :mod:`src.losses.base`):

* ``y_true``: ``[B, H, W, 1]`` 0/1 masks (any float dtype); ``y_pred``: ``[B, H, W, 1]``
  foreground *probabilities* (sigmoid outputs), or logits with ``from_logits=True``.
* Computed in float32, also under mixed precision.
* Per image first (``call`` returns ``[B]``), then a *masked mean* over the batch with the
  per-image sample weights ``[B]`` (0 = mask unknown for that image: it contributes
  nothing, whatever ``y_true`` holds). All weights 0 -> exactly 0 and a finite gradient.

Dice is computed *per image* and then averaged (not pooled over the batch), so a small
tumour counts as much as a large one, and an image with an empty true mask and an empty
prediction scores Dice 1 (loss 0) thanks to ``smooth`` instead of 0 / 0.

Why ``include_background=False`` is the default: on brain MRI slices the tumour covers a
few percent of the pixels, so the background Dice is ~0.98 even for a model that predicts
nothing at all. Averaging it in (as the published EfficientMTNet numbers did) lifts a
foreground Dice of 0.5 to ~0.74 and hides failures; the foreground-only Dice is the
number that says how well the tumour is outlined. ``include_background=True`` averages the
foreground and background Dice, for comparison with such numbers.
"""
from __future__ import annotations

import keras
from keras import ops

from .base import MaskedLoss

__all__ = ["DiceLoss", "BinaryFocalLoss", "DiceFocalLoss", "soft_dice", "soft_iou"]

_PROB_EPS = 1e-7


def _reduce_axes(x):
    return tuple(range(1, len(x.shape)))


def _probabilities(y_pred, from_logits: bool):
    return ops.sigmoid(y_pred) if from_logits else y_pred


def _overlap(y_true, y_pred, smooth: float, include_background: bool, iou: bool):
    axes = _reduce_axes(y_true)

    def score(t, p):
        inter = ops.sum(t * p, axis=axes)
        total = ops.sum(t, axis=axes) + ops.sum(p, axis=axes)
        num, den = (inter + smooth, total - inter + smooth) if iou else (2.0 * inter + smooth, total + smooth)
        if smooth > 0:
            return num / den
        # hard masks without smoothing: both empty -> 1 (nothing to find, nothing found)
        ok = den > 0
        return ops.where(ok, num / ops.where(ok, den, ops.ones_like(den)), ops.ones_like(num))

    fg = score(y_true, y_pred)
    if not include_background:
        return fg
    return 0.5 * (fg + score(1.0 - y_true, 1.0 - y_pred))


def soft_dice(y_true, y_pred, smooth: float = 1.0, include_background: bool = False):
    """Per-image soft Dice ``[B]`` of probabilities ``y_pred`` against 0/1 ``y_true``.

    Foreground: ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over every pixel
    (and channel) of an image. ``include_background``: the mean of that and the same for
    the background (``1 - p`` against ``1 - t``). ``smooth=0`` on thresholded masks is the
    hard Dice of the training metric (:class:`src.training.metrics.DiceScore`): an image
    whose true and predicted masks are both empty scores 1. This is the one graph Dice of
    the library; the numpy one (whole evaluation splits) is
    :func:`src.evaluation.metrics.dice_iou`.
    """
    return _overlap(y_true, y_pred, smooth, include_background, iou=False)


def soft_iou(y_true, y_pred, smooth: float = 1.0, include_background: bool = False):
    """Per-image soft IoU (Jaccard) ``[B]``: ``(sum(p t) + smooth) / (sum(p) + sum(t) - sum(p t) + smooth)``;
    otherwise as :func:`soft_dice`."""
    return _overlap(y_true, y_pred, smooth, include_background, iou=True)


@keras.saving.register_keras_serializable(package="btmtl")
class DiceLoss(MaskedLoss):
    """``1 - Dice`` per image (soft Dice, see :func:`soft_dice`), masked mean over the batch.

    Args:
        smooth: added to numerator and denominator (an empty true mask with an empty
            prediction gives loss 0, not NaN; must be > 0).
        include_background: average in the background Dice (default False: the tumour
            only; see the module docstring for why).
        from_logits: ``y_pred`` are logits (a sigmoid is applied first).
    """

    def __init__(self, smooth: float = 1.0, include_background: bool = False, from_logits: bool = False,
                 name: str = "dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if not float(smooth) > 0:
            raise ValueError(f"smooth must be > 0 (an empty mask would give 0/0), got {smooth}")
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        p = _probabilities(y_pred, self.from_logits)
        return 1.0 - soft_dice(y_true, p, self.smooth, self.include_background)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth, "include_background": self.include_background,
                "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="btmtl")
class BinaryFocalLoss(MaskedLoss):
    """Per-pixel binary focal loss (Lin et al. 2017), mean over an image's pixels -> ``[B]``.

    ``-alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` on foreground pixels and ``1 - p``
    on background, ``alpha_t = alpha`` on foreground and ``1 - alpha`` on background
    (``alpha=None``: no class weighting). ``gamma=0, alpha=None`` is plain BCE.
    Probabilities are clipped to ``[1e-7, 1 - 1e-7]``; with ``from_logits=True`` the
    log-probabilities are computed stably from the logits instead.
    """

    def __init__(self, alpha=0.25, gamma: float = 2.0, from_logits: bool = False, name: str = "binary_focal",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        if float(gamma) < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)
        self.from_logits = bool(from_logits)

    def pixel_losses(self, y_true, y_pred):
        if self.from_logits:
            log_p = ops.log_sigmoid(y_pred)
            log_1mp = ops.log_sigmoid(-y_pred)
            p = ops.sigmoid(y_pred)
        else:
            p = ops.clip(y_pred, _PROB_EPS, 1.0 - _PROB_EPS)
            log_p, log_1mp = ops.log(p), ops.log(1.0 - p)
        p_t = y_true * p + (1.0 - y_true) * (1.0 - p)
        log_pt = y_true * log_p + (1.0 - y_true) * log_1mp
        loss = -ops.power(ops.maximum(1.0 - p_t, 0.0), self.gamma) * log_pt if self.gamma else -log_pt
        if self.alpha is not None:
            loss = loss * (y_true * self.alpha + (1.0 - y_true) * (1.0 - self.alpha))
        return loss

    def call(self, y_true, y_pred):
        return ops.mean(self.pixel_losses(y_true, y_pred), axis=_reduce_axes(y_true))

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="btmtl")
class DiceFocalLoss(MaskedLoss):
    """``dice_weight * (1 - Dice) + focal_weight * focal`` per image, masked mean over the batch.

    Dice (region overlap, insensitive to the tumour/background imbalance) plus focal
    (per-pixel, down-weights the many easy background pixels) as in EfficientMTNet
    (published weights 0.5 / 0.5, alpha 0.25, gamma 2). ``include_background`` applies to
    the Dice term (default False: tumour only; see the module docstring).
    """

    def __init__(self, dice_weight: float = 1.0, focal_weight: float = 1.0, include_background: bool = False,
                 smooth: float = 1.0, alpha=0.25, gamma: float = 2.0, from_logits: bool = False,
                 name: str = "dice_focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self.focal_weight = float(focal_weight)
        self._dice = DiceLoss(smooth=smooth, include_background=include_background, from_logits=from_logits)
        self._focal = BinaryFocalLoss(alpha=alpha, gamma=gamma, from_logits=from_logits)

    def call(self, y_true, y_pred):
        return (self.dice_weight * self._dice.call(y_true, y_pred)
                + self.focal_weight * self._focal.call(y_true, y_pred))

    def get_config(self):
        return {**super().get_config(), "dice_weight": self.dice_weight, "focal_weight": self.focal_weight,
                "include_background": self._dice.include_background, "smooth": self._dice.smooth,
                "alpha": self._focal.alpha, "gamma": self._focal.gamma, "from_logits": self._dice.from_logits}
