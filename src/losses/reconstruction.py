"""Image reconstruction loss for autoencoder-style heads (``recon``).

:class:`ReconstructionLoss` (``mode: mse | l1``) compares a reconstruction with the input
image, both ``[B, H, W, C]`` in the same range (the pipeline's ``[0, 1]``). The per-sample
value is the mean over pixels and channels; the batch value is the masked mean over
samples (:class:`~src.losses.base.MaskedLoss`), float32 even under mixed precision.
"""
from __future__ import annotations

import keras
from keras import ops

from .base import MaskedLoss

RECON_MODES = ("mse", "l1")


@keras.saving.register_keras_serializable(package="btmtl")
class ReconstructionLoss(MaskedLoss):
    """Mean squared (``mse``) or absolute (``l1``) error per sample."""

    def __init__(self, mode: str = "mse", name=None, **kwargs):
        if mode not in RECON_MODES:
            raise ValueError(f"reconstruction loss mode must be one of {RECON_MODES}, got {mode!r}")
        super().__init__(name=name or f"recon_{mode}", **kwargs)
        self.mode = mode

    def call(self, y_true, y_pred):
        if y_true.shape[-1] != y_pred.shape[-1] and y_true.shape[-1] == 1:
            y_true = ops.repeat(y_true, y_pred.shape[-1], axis=-1)  # grey input, RGB reconstruction
        d = y_pred - y_true
        err = ops.square(d) if self.mode == "mse" else ops.abs(d)
        return ops.mean(ops.reshape(err, (ops.shape(err)[0], -1)), axis=-1)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
