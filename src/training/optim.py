"""Optimizers, learning-rate schedules and weight averaging of the training engine.

* :class:`WarmupCosine`: linear warm-up from 0 to the peak rate, then cosine decay to
  ``alpha * peak``. Its length lives in a variable, so the time budget
  (:mod:`src.training.budget`) can set the epoch count after the first epoch and the
  schedule still completes exactly when the last planned step is taken (a Python
  number would be frozen into the traced train step).
* Weight EMA (``trainer.ema_weights``): Keras' optimizer EMA (``use_ema``: the averages
  are optimizer variables, so ``last.keras`` keeps them for a resume) with a warm-up of
  the decay, ``min(decay, (1 + t) / (10 + t))`` at step ``t > 0`` (as timm's ModelEmaV2 and
  TF's ``ExponentialMovingAverage(num_updates=)``): without it, the average of a short CPU
  run would still be mostly the random initial weights after the first epochs. Step 0
  copies the weights.
  :func:`swap_ema` exchanges the model's weights and their averages in place (validation
  and ``best.keras`` use the averages; training continues on the raw weights).
"""
from __future__ import annotations

import math
from typing import Mapping

import keras
from keras import ops

SCHEDULES = ("constant", "cosine", "plateau")
OPTIMIZERS = ("adam", "adamw", "sgd")


@keras.saving.register_keras_serializable(package="btmtl")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * t / warmup`` for ``t < warmup``, then a cosine from ``peak`` down to
    ``alpha * peak`` at ``total_steps`` (held there afterwards). ``cosine=False`` keeps
    the peak after the warm-up (a constant rate with warm-up).

    ``total_steps`` is a variable: :meth:`set_total_steps` changes the schedule's length
    after the train step was traced (the time budget does this after the first epoch).
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, alpha: float = 0.05,
                 cosine: bool = True):
        self.peak = float(peak)
        self.warmup_steps = int(max(0, warmup_steps))
        self.alpha = float(alpha)
        self.cosine = bool(cosine)
        self._total = keras.Variable(float(max(1, int(total_steps))), dtype="float32", trainable=False,
                                     name="schedule_total_steps")

    @property
    def total_steps(self) -> int:
        return int(round(float(ops.convert_to_numpy(self._total))))

    def set_total_steps(self, total_steps: int) -> None:
        self._total.assign(float(max(1, int(total_steps))))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = float(self.warmup_steps)
        peak = ops.convert_to_tensor(self.peak, "float32")
        if warm > 0:
            warm_lr = peak * (step + 1.0) / warm
        else:
            warm_lr = peak
        if self.cosine:
            span = ops.maximum(ops.convert_to_tensor(self._total) - warm, 1.0)
            frac = ops.clip((step - warm) / span, 0.0, 1.0)
            decayed = peak * (self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + ops.cos(math.pi * frac)))
        else:
            decayed = peak
        return ops.where(step < warm, warm_lr, decayed)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "alpha": self.alpha, "cosine": self.cosine}


class _FusedAdam:
    """Mixin: the Adam / AdamW step with TensorFlow's fused ``ResourceApplyAdam`` kernel
    (one op per variable instead of ~30) and the step's scalars (learning rate, the
    bias corrections, the decay factor) computed once per step instead of once per
    variable. Same arithmetic as Keras' Adam. Keras builds the update in a Python loop
    over the variables, so for a network of a few hundred small variables (BatchNorm,
    squeeze-excitation) the optimizer was two thirds of the traced train step (13,700 of
    20,300 ops for EfficientMTNet): the graph took seconds to trace and optimise and
    thousands of tiny ops to run every step.

    Falls back to Keras' own update (same result) outside the TensorFlow backend, with
    ``amsgrad``, sparse gradients, non-float32 variables or several replicas.
    """

    def _fused_ok(self) -> bool:
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return False
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync == 1

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None or not self._fused_ok():
            return super()._apply_weight_decay(variables)
        factor = ops.cast(self.learning_rate, "float32") * ops.cast(self.weight_decay, "float32")
        for v in variables:
            if self._use_weight_decay(v):
                v.assign_sub(v * ops.cast(factor, v.dtype))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._fused_ok():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        step = ops.cast(self.iterations + 1, "float32")
        b1, b2 = ops.cast(self.beta_1, "float32"), ops.cast(self.beta_2, "float32")
        self._fused_scalars = (ops.cast(learning_rate, "float32"), ops.power(b1, step), ops.power(b2, step), b1, b2,
                               ops.cast(self.epsilon, "float32"))
        try:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._fused_scalars = None

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        scalars = getattr(self, "_fused_scalars", None)
        if scalars is None or isinstance(gradient, tf.IndexedSlices) or variable.dtype != tf.float32:
            return super().update_step(gradient, variable, learning_rate)
        lr, b1p, b2p, b1, b2, eps = scalars
        i = self._get_variable_index(variable)
        m, v = self._momentums[i], self._velocities[i]
        handle = lambda t: (t.value if isinstance(t, keras.Variable) else t).handle  # noqa: E731
        tf.raw_ops.ResourceApplyAdam(var=handle(variable), m=handle(m), v=handle(v), beta1_power=b1p,
                                     beta2_power=b2p, lr=lr, beta1=b1, beta2=b2, epsilon=eps,
                                     grad=ops.cast(gradient, "float32"), use_locking=False)


class _EMAWarmup:
    """Mixin: Keras' optimizer EMA with the decay warmed up over the first steps."""

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        t = ops.cast(self.iterations, "float32")
        # the averages start at zero: the first step copies the weights (decay 0)
        decay = ops.minimum(ops.convert_to_tensor(self.ema_momentum, "float32"), (1.0 + t) / (10.0 + t))
        decay = ops.where(t > 0, decay, 0.0)
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is None:
                continue
            d = ops.cast(decay, var.dtype)
            average.assign(ops.add(ops.multiply(d, average), ops.multiply(ops.subtract(1, d), var)))


@keras.saving.register_keras_serializable(package="btmtl")
class FusedAdam(_FusedAdam, keras.optimizers.Adam):
    """Keras' Adam with the fused per-variable step (see :class:`_FusedAdam`)."""


@keras.saving.register_keras_serializable(package="btmtl")
class FusedAdamW(_FusedAdam, keras.optimizers.AdamW):
    """Keras' AdamW with the fused per-variable step (see :class:`_FusedAdam`)."""


@keras.saving.register_keras_serializable(package="btmtl")
class AdamEMA(_EMAWarmup, _FusedAdam, keras.optimizers.Adam):
    """Fused Adam whose weight EMA warms up its decay (see the module doc)."""


@keras.saving.register_keras_serializable(package="btmtl")
class AdamWEMA(_EMAWarmup, _FusedAdam, keras.optimizers.AdamW):
    """Fused AdamW whose weight EMA warms up its decay (see the module doc)."""


@keras.saving.register_keras_serializable(package="btmtl")
class SGDEMA(_EMAWarmup, keras.optimizers.SGD):
    """SGD (momentum 0.9) whose weight EMA warms up its decay (see the module doc)."""


def make_optimizer(trainer: Mapping, learning_rate: float, total_steps: int, steps_per_epoch: int = 1):
    """The optimizer of ``trainer`` (``optimizer``, ``schedule``, ``warmup_epochs``,
    ``weight_decay``, ``clip_norm``, ``ema_weights``, ``ema_decay``) for a phase of
    ``total_steps`` steps."""
    schedule = trainer.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise ValueError(f"trainer.schedule must be one of {' | '.join(SCHEDULES)}, got {schedule!r}")
    warmup = int(round(float(trainer.get("warmup_epochs") or 0) * max(1, steps_per_epoch)))
    warmup = min(warmup, max(0, int(total_steps) - 1))
    lr = learning_rate
    if schedule == "cosine" or warmup:
        lr = WarmupCosine(learning_rate, total_steps, warmup_steps=warmup, cosine=schedule == "cosine")
    kw = {"learning_rate": lr}
    if trainer.get("clip_norm"):
        kw["global_clipnorm"] = float(trainer["clip_norm"])
    if trainer.get("ema_weights"):
        decay = float(trainer.get("ema_decay") or 0.998)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1), got {decay}")
        kw.update(use_ema=True, ema_momentum=decay)
    name = trainer.get("optimizer", "adamw")
    ema = bool(trainer.get("ema_weights"))
    if name == "adam":
        return (AdamEMA if ema else FusedAdam)(**kw)
    if name == "adamw":
        return (AdamWEMA if ema else FusedAdamW)(weight_decay=float(trainer.get("weight_decay") or 0.0),
                                                             **kw)
    if name == "sgd":
        return (SGDEMA if ema else keras.optimizers.SGD)(momentum=0.9, weight_decay=trainer.get("weight_decay") or None,
                                                         **kw)
    raise ValueError(f"trainer.optimizer must be one of {' | '.join(OPTIMIZERS)}, got {name!r}")


def schedule_of(optimizer):
    """The optimizer's :class:`WarmupCosine` (inside a LossScaleOptimizer too), or None."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = getattr(inner, "_learning_rate", None)
    return lr if isinstance(lr, WarmupCosine) else None


def set_peak_learning_rate(optimizer, lr: float) -> bool:
    """Give a restored optimizer a new peak rate (resuming a diverged run lower); returns
    whether it changed. Call before the train step is traced."""
    sched = schedule_of(optimizer)
    if sched is not None:
        if abs(sched.peak - float(lr)) <= 1e-12 * max(1.0, abs(lr)):
            return False
        sched.peak = float(lr)
        return True
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    current = float(ops.convert_to_numpy(inner.learning_rate))
    if abs(current - float(lr)) <= 1e-12 * max(1.0, abs(lr)):
        return False
    inner.learning_rate = float(lr)
    return True


def uses_ema(optimizer) -> bool:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return bool(getattr(inner, "use_ema", False)) and hasattr(inner, "_model_variables_moving_average")


def swap_ema(optimizer) -> None:
    """Exchange the model's trainable weights with their EMA in place (call twice to undo)."""
    import numpy as np

    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for var, avg in zip(inner._trainable_variables, inner._model_variables_moving_average):
        if avg is None:
            continue
        tmp = np.array(ops.convert_to_numpy(var))
        var.assign(avg)
        avg.assign(tmp)


class EMAValidation(keras.callbacks.Callback):
    """Validate (and predict) with the EMA weights, train with the raw ones.

    Swaps the averages in at ``on_test_begin`` and back at ``on_test_end``; at the end
    of ``fit`` Keras writes the averages into the model (``finalize_variable_values``).
    """

    def __init__(self):
        super().__init__()
        self._swapped = False

    def _swap(self, want: bool):
        if self._swapped != want and uses_ema(self.model.optimizer):
            swap_ema(self.model.optimizer)
            self._swapped = want

    def on_test_begin(self, logs=None):
        self._swap(True)

    def on_test_end(self, logs=None):
        self._swap(False)

    def on_train_end(self, logs=None):
        self._swap(False)


__all__ = ["WarmupCosine", "FusedAdam", "FusedAdamW", "set_peak_learning_rate", "AdamEMA", "AdamWEMA", "SGDEMA", "make_optimizer", "schedule_of", "uses_ema", "swap_ema",
           "EMAValidation"]
