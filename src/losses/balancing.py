"""Task-loss balancing for multi-task models (used by ``MultiTaskModel.compute_loss``).

Three modes, all with their state in Keras variables (so it is saved in checkpoints,
restored on resume and never reset between epochs):

* ``static``: ``L = sum_i w_i L_i`` with fixed per-head weights ``w_i``.
* ``ema``: ``L = sum_i w_i L_i / m_i`` where ``m_i`` is an exponential moving average of
  ``L_i`` (stop-gradient): ``m_i <- L_i`` on the first update, then
  ``m_i <- beta m_i + (1 - beta) L_i``. Updated only in training steps (never by
  ``evaluate``/validation). Each task then contributes about ``w_i`` regardless of its
  scale.
* ``uncertainty`` (Kendall, Gal & Cipolla 2018): learned log-variances ``s_i``,
  ``L = sum_i w_i (exp(-s_i) L_i + s_i)``.

The per-head weights ``w_i`` live in a non-trainable variable too, so a training phase
can change them (e.g. class weight 0 in the box-only phase) without rebuilding the model.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import keras
from keras import ops

BALANCING_MODES = ("static", "ema", "uncertainty")


@keras.saving.register_keras_serializable(package="btmtl")
class LossBalancer(keras.layers.Layer):
    """Combines per-head losses into one scalar; holds the balancing state."""

    def __init__(self, heads: Sequence[str], mode: str = "static", beta: float = 0.99,
                 weights: Mapping[str, float] | None = None, eps: float = 1e-8, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in BALANCING_MODES:
            raise ValueError(f"loss balancing must be one of {BALANCING_MODES}, got {mode!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.heads = list(heads)
        self.mode = mode
        self.beta = float(beta)
        self.eps = float(eps)
        init = weights or {}
        unknown = set(init) - set(self.heads)
        if unknown:
            raise ValueError(f"loss weights for unknown heads {sorted(unknown)}; heads are {self.heads}")
        n = len(self.heads)
        self.head_weights = self.add_weight(
            shape=(n,), initializer=keras.initializers.Constant([float(init.get(h, 1.0)) for h in self.heads]),
            trainable=False, name="head_weights", dtype="float32")
        # aggregation="mean": replicas of a distribution strategy update the running means together
        self.ema = self.add_weight(shape=(n,), initializer="zeros", trainable=False, name="ema", dtype="float32",
                                   aggregation="mean")
        self.ema_steps = self.add_weight(shape=(), initializer="zeros", trainable=False, name="ema_steps",
                                         dtype="float32", aggregation="mean")
        self.log_vars = self.add_weight(shape=(n,), initializer="zeros", trainable=mode == "uncertainty",
                                        name="log_vars", dtype="float32")

    # state access -------------------------------------------------------------------
    def set_weights_for(self, weights: Mapping[str, float]) -> None:
        """Set per-head loss weights (heads not named keep their value)."""
        current = dict(zip(self.heads, ops.convert_to_numpy(self.head_weights).tolist()))
        for h, w in weights.items():
            if h not in current:
                raise ValueError(f"loss weight for unknown head {h!r}; heads are {self.heads}")
            current[h] = float(w)
        self.head_weights.assign([current[h] for h in self.heads])

    def state(self) -> dict:
        """Per-head weights, running means and effective weights (for logging)."""
        w = ops.convert_to_numpy(self.head_weights)
        m = ops.convert_to_numpy(self.ema)
        s = ops.convert_to_numpy(self.log_vars)
        out = {}
        for i, h in enumerate(self.heads):
            eff = float(w[i])
            if self.mode == "ema":
                eff = float(w[i] / (m[i] + self.eps)) if m[i] > 0 else float(w[i])
            elif self.mode == "uncertainty":
                eff = float(w[i] * ops.convert_to_numpy(ops.exp(-s[i])))
            out[h] = {"weight": float(w[i]), "ema": float(m[i]), "log_var": float(s[i]), "effective_weight": eff}
        return out

    # combine ------------------------------------------------------------------------
    def call(self, losses: Mapping[str, "keras.KerasTensor"], training: bool = False):
        vec = ops.stack([ops.cast(losses[h], "float32") if h in losses else ops.zeros((), "float32")
                         for h in self.heads])
        present = ops.convert_to_tensor([1.0 if h in losses else 0.0 for h in self.heads], "float32")
        w = self.head_weights * present
        if self.mode == "static":
            return ops.sum(w * vec)
        if self.mode == "uncertainty":
            return ops.sum(w * (ops.exp(-self.log_vars) * vec + self.log_vars))
        # ema
        detached = ops.stop_gradient(vec)
        if training:
            first = ops.equal(self.ema_steps, 0.0)
            new = ops.where(first, detached, self.beta * self.ema + (1.0 - self.beta) * detached)
            new = ops.where(present > 0, new, self.ema)
            self.ema.assign(new)
            self.ema_steps.assign_add(1.0)
        m = ops.stop_gradient(self.ema)
        # before any training update (evaluate on a fresh model) the means are 0: weight 1
        denom = ops.where(m > 0, m + self.eps, ops.ones_like(m))
        return ops.sum(w * vec / denom)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(heads=list(self.heads), mode=self.mode, beta=self.beta, eps=self.eps,
                   weights=dict(zip(self.heads, ops.convert_to_numpy(self.head_weights).tolist())))
        return cfg
