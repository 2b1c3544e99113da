"""The masked-loss base every loss of :mod:`src.losses` derives from, and its helpers.

Conventions
-----------
* Masks are sample weights: 0 = unknown target. A masked element contributes nothing,
  whatever it holds (zeros, garbage, even NaN).
* Everything is computed in float32, also when the inputs are float16 / bfloat16.
* No ``tf.boolean_mask``: fixed shapes, masks as weights, so an empty batch gives 0, not
  NaN. Divisions are *safe* (:func:`safe_divide`: the "double where" trick), so neither
  the value nor the gradient can become NaN/inf.

Reduction semantics (:class:`MaskedLoss`)
-----------------------------------------
Keras' ``"sum_over_batch_size"`` divides the weighted sum by the number of elements,
so masked-out slots dilute the loss. Our losses take ``normalize``:

* ``normalize="weights"`` (default): *masked mean*, ``sum(w * l) / sum(w)``; a batch
  whose weights are all 0 gives exactly 0 and a zero (finite) gradient.
* ``normalize="batch"``: the plain Keras behaviour, ``sum(w * l) / number of elements``.

``normalize`` only changes the averaging reductions (``"sum_over_batch_size"``,
``"mean"``); ``reduction="sum"`` returns the weighted sum and ``reduction="none"``/``None``
the weighted per-element values. ``reduction="mean_with_sample_weight"`` always divides
by the sum of weights (safely). As with Keras' own losses, the mean is scaled by
``1 / num_replicas`` under a ``tf.distribute`` strategy, so with several replicas the
result is the mean of the per-replica masked means.
"""
from __future__ import annotations

import keras
from keras import ops

__all__ = ["NORMALIZE_MODES", "MaskedLoss", "safe_divide", "align_weights", "check_choice"]

NORMALIZE_MODES = ("weights", "batch")


# --------------------------------------------------------------------------- helpers
def safe_divide(num, den, eps: float = 0.0):
    """``num / den`` where ``den > eps``, else 0 -- with finite gradients everywhere.

    "Double where": the denominator is replaced by 1 where it is too small *before* the
    division, so the unused branch never produces inf/NaN that a zero upstream gradient
    would turn into NaN (``0 * inf = NaN``).
    """
    ok = den > eps
    safe_den = ops.where(ok, den, ops.ones_like(den))
    return ops.where(ok, num / safe_den, ops.zeros_like(num))


def _scale_for_distribution(value):
    """Scale a per-replica mean by ``1 / num_replicas`` as Keras does for its own losses."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * ops.cast(1.0 / replicas, value.dtype)
    return value


def align_weights(weights, values):
    """Cast ``weights`` to float32 and broadcast them to the shape of ``values``.

    ``[B]`` weights with ``[B, C]`` values apply to whole rows; ``[..., 1]`` weights are
    squeezed when the values have one dimension less.
    """
    w = ops.cast(weights, "float32")
    v_rank, w_rank = len(values.shape), len(w.shape)
    if w_rank == v_rank + 1 and w.shape[-1] == 1:
        w = ops.squeeze(w, axis=-1)
        w_rank -= 1
    if w_rank > v_rank:
        raise ValueError(f"sample_weight of shape {tuple(w.shape)} does not fit the per-element losses of "
                         f"shape {tuple(values.shape)} (per-slot [B, C] for boxes, per-sample [B] otherwise)")
    while w_rank < v_rank:
        w = ops.expand_dims(w, axis=-1)
        w_rank += 1
    return ops.broadcast_to(w, ops.shape(values))


def _zero_where_masked(x, weights):
    """``x`` with the entries whose weight is 0 replaced by 0.

    ``weights`` (``[B]``, ``[B, C]``, ...) is broadcast over the trailing dimensions of
    ``x`` (``[B, C, 4]`` boxes, ``[B, K]`` scores); when it has more dimensions than ``x``
    (e.g. ``[B, 1]`` weights with ``[B]`` integer labels) ``x`` is returned unchanged.
    """
    w = ops.convert_to_tensor(weights)
    w_rank, x_rank = len(w.shape), len(x.shape)
    if w_rank > x_rank:
        return x
    keep = w != 0
    for _ in range(x_rank - w_rank):
        keep = ops.expand_dims(keep, -1)
    return ops.where(keep, x, ops.zeros_like(x))


def check_choice(value, allowed, what):
    """``value`` if it is one of ``allowed``, else a ValueError naming ``what``."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


# --------------------------------------------------------------------------- base loss
class MaskedLoss(keras.losses.Loss):
    """Base class: float32 computation and masked-mean reduction (see the module doc).

    Subclasses implement ``call(y_true, y_pred)`` returning per-element losses (per
    sample ``[B]`` or per slot ``[B, C]``); ``__call__`` applies the sample weights and
    the reduction. Values of elements whose weight is 0 are replaced by 0 *before*
    weighting (``NaN * 0`` would be NaN).

    Args:
        normalize: ``"weights"`` (masked mean, default) or ``"batch"`` (Keras' mean over
            all elements).
        name: loss name.
        reduction: any Keras reduction (default ``"sum_over_batch_size"``).
        dtype: accepted for API compatibility and ignored: these losses always compute
            in float32.
    """

    def __init__(self, normalize="weights", name=None, reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.normalize = check_choice(normalize, NORMALIZE_MODES, "normalize")

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            y_pred = ops.cast(y_pred, "float32")
            y_true = ops.cast(y_true, "float32")
            if sample_weight is not None:
                # Masked elements may hold anything (zeros, garbage, NaN): replace them by
                # zeros *before* the computation, so that no NaN can reach the value or,
                # through a zero upstream gradient (0 * NaN = NaN), the gradient.
                y_true = _zero_where_masked(y_true, sample_weight)
                y_pred = _zero_where_masked(y_pred, sample_weight)
            values = ops.cast(self.call(y_true, y_pred), "float32")
            return self.reduce(values, sample_weight)

    def reduce(self, values, sample_weight=None):
        """Weight and reduce per-element ``values`` following ``reduction``/``normalize``."""
        if sample_weight is None:
            weights = ops.ones_like(values)
        else:
            weights = align_weights(sample_weight, values)
        # Sanitise before weighting: masked elements may hold NaN/inf (NaN * 0 = NaN).
        weighted = ops.where(weights != 0, values, ops.zeros_like(values)) * weights
        if self.reduction is None or self.reduction == "none":
            return weighted
        total = ops.sum(weighted)
        if self.reduction == "sum":
            return total
        if self.normalize == "weights" or self.reduction == "mean_with_sample_weight":
            denom = ops.sum(weights)
        else:
            denom = ops.cast(ops.size(values), "float32")
        return _scale_for_distribution(safe_divide(total, denom, 0.0))

    def get_config(self):
        config = super().get_config()
        config.update({"normalize": self.normalize})
        return config
