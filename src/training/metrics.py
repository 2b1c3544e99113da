"""Training-time metrics per head (sparse-label wrappers Keras lacks)."""
from __future__ import annotations

import keras
from keras import ops

from ..losses import BoxMeanIoU


def _one_hot(y_true, num_classes):
    y = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    y = ops.where(y < 0, ops.zeros_like(y), y)  # unknown rows carry weight 0 anyway
    return ops.one_hot(y, num_classes)


@keras.saving.register_keras_serializable(package="btmtl")
class SparseAUC(keras.metrics.AUC):
    """One-vs-rest ROC-AUC from sparse labels (micro-averaged over classes)."""

    def __init__(self, num_classes: int, name="auc", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y = _one_hot(y_true, self.num_classes)
        if sample_weight is not None:
            sample_weight = ops.broadcast_to(ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1)),
                                             ops.shape(y))
        return super().update_state(y, ops.cast(y_pred, "float32"), sample_weight)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="btmtl")
class SparseMacroF1(keras.metrics.F1Score):
    """Macro F1 from sparse labels (argmax predictions)."""

    def __init__(self, num_classes: int, name="f1", **kwargs):
        kwargs.setdefault("average", "macro")
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y = _one_hot(y_true, self.num_classes)
        pred = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes)
        if sample_weight is not None:
            sample_weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        return super().update_state(y, pred, sample_weight)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def head_metrics(heads, num_classes: int) -> dict:
    """Compile metrics keyed by head: accuracy/AUC/F1 for class heads, mean IoU for boxes."""
    out = {}
    for h in heads:
        if h == "class":
            out[h] = [keras.metrics.SparseCategoricalAccuracy(name="acc"), SparseAUC(num_classes),
                      SparseMacroF1(num_classes)]
        elif h == "multilabel":
            out[h] = [keras.metrics.BinaryAccuracy(name="acc"), keras.metrics.AUC(name="auc", multi_label=True)]
        elif h == "boxes":
            out[h] = [BoxMeanIoU(name="iou")]
        elif h in ("tumor",):
            out[h] = [keras.metrics.BinaryAccuracy(name="acc"), keras.metrics.AUC(name="auc")]
        elif h == "subtype":
            out[h] = [keras.metrics.SparseCategoricalAccuracy(name="acc")]
    return out
