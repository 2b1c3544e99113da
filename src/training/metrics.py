"""Training-time (compiled, graph) metrics per head: sparse-label wrappers Keras lacks,
the mean box IoU and hard mask Dice / IoU. The evaluation metrics (numpy, on whole
splits) are in :mod:`src.evaluation.metrics`."""
from __future__ import annotations

import keras
from keras import ops

from ..losses.base import align_weights, check_choice, safe_divide
from ..losses.box import BOX_MODES, box_iou
from ..losses.segmentation import soft_dice, soft_iou


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
    """Macro F1 from sparse labels (argmax predictions), averaged over the classes that
    occur in the labels seen so far (scikit-learn's ``labels=<classes present>``): a class
    without a labelled example (``no_tumor`` on figshare) is left out instead of counting
    as F1 = 0. Predicting such a class is still an error: it lowers the recall of the true
    class, as in :mod:`src.evaluation.metrics`."""

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

    def result(self):
        if self.average != "macro":
            return super().result()
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        eps = keras.backend.epsilon()
        precision = tp / (tp + fp + eps)
        recall = tp / (tp + fn + eps)
        f1 = 2.0 * precision * recall / (precision + recall + eps)
        present = ops.cast(tp + fn > 0, f1.dtype)
        return ops.sum(f1 * present) / ops.maximum(ops.sum(present), 1.0)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


# ---------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="btmtl")
class BoxMeanIoU(keras.metrics.Metric):
    """Running weighted mean of the IoU (or GIoU/DIoU/CIoU) between true and predicted boxes.

    ``update_state(y_true, y_pred, sample_weight)`` with ``[B, C, 4]`` boxes and ``[B, C]``
    slot weights (or ``[B]`` per-sample weights); slots with weight 0 are ignored. The
    result is ``sum(w * iou) / sum(w)`` over everything seen since the last reset, 0 when
    nothing has been seen. State variables are float32.
    """

    def __init__(self, mode="iou", eps=1e-7, name="box_mean_iou", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.mode = check_choice(str(mode).lower(), BOX_MODES, "mode")
        self.eps = float(eps)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        iou = box_iou(y_true, y_pred, mode=self.mode, eps=self.eps)
        if sample_weight is None:
            weights = ops.ones_like(iou)
        else:
            weights = align_weights(sample_weight, iou)
        iou = ops.where(weights != 0, iou, ops.zeros_like(iou))
        self.total.assign_add(ops.sum(iou * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return safe_divide(ops.convert_to_tensor(self.total), ops.convert_to_tensor(self.count), 0.0)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "eps": self.eps})
        return config


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def mask_overlap_per_image(y_true, y_pred, threshold: float = 0.5, include_background: bool = False):
    """Per-image hard Dice and IoU ``([B], [B])`` of ``[B, H, W, 1]`` masks.

    ``y_pred`` (probabilities) is thresholded at ``threshold`` (``>=``), ``y_true`` at 0.5.
    Foreground only by default; an image whose true and predicted masks are both empty
    scores 1 (nothing to find, nothing found). ``include_background``: the mean of the
    foreground and background scores (labelled ``*_with_bg``: on slices where the tumour
    is a few percent of the pixels the background term is ~1 and flatters the number).
    """
    t = ops.cast(ops.cast(y_true, "float32") >= 0.5, "float32")
    p = ops.cast(ops.cast(y_pred, "float32") >= threshold, "float32")
    return soft_dice(t, p, 0.0, include_background), soft_iou(t, p, 0.0, include_background)


class _MaskOverlap(keras.metrics.Metric):
    """Mean per-image mask overlap over the images whose mask is known (weight > 0).

    An image with an empty true mask (a known healthy slice) scores 1 when nothing is
    predicted and 0 otherwise, so an all-background model scores the share of empty
    masks; ``ignore_empty=True`` leaves those images out (the score on tumour slices).
    """

    _index = 0  # 0: Dice, 1: IoU

    def __init__(self, threshold: float = 0.5, include_background: bool = False, ignore_empty: bool = False,
                 name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.include_background = bool(include_background)
        self.ignore_empty = bool(ignore_empty)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float32")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        value = mask_overlap_per_image(y_true, y_pred, self.threshold, self.include_background)[self._index]
        if sample_weight is None:
            w = ops.ones_like(value)
        else:
            w = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
            w = ops.broadcast_to(w, ops.shape(value))
        if self.ignore_empty:
            axes = tuple(range(1, len(y_true.shape)))
            w = w * ops.cast(ops.sum(ops.cast(y_true, "float32"), axis=axes) > 0, "float32")
        value = ops.where(w > 0, value, ops.zeros_like(value))
        self.total.assign_add(ops.sum(value * w))
        self.count.assign_add(ops.sum(w))

    def result(self):
        return ops.where(self.count > 0, self.total / ops.maximum(self.count, 1e-12), 0.0)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "include_background": self.include_background,
                "ignore_empty": self.ignore_empty}


@keras.saving.register_keras_serializable(package="btmtl")
class DiceScore(_MaskOverlap):
    """Foreground Dice of thresholded masks, averaged over images with known masks.

    ``include_background=True`` averages in the background Dice (name ``dice_with_bg``:
    not comparable with the foreground number; see :func:`mask_overlap_per_image`).
    """

    _index = 0

    def __init__(self, threshold: float = 0.5, include_background: bool = False, ignore_empty: bool = False,
                 name=None, **kwargs):
        name = name or ("dice_with_bg" if include_background else "dice")
        super().__init__(threshold=threshold, include_background=include_background, ignore_empty=ignore_empty,
                         name=name, **kwargs)


@keras.saving.register_keras_serializable(package="btmtl")
class MaskIoU(_MaskOverlap):
    """Foreground IoU (Jaccard) of thresholded masks, averaged over images with known masks
    (``include_background=True``: name ``iou_with_bg``, foreground and background averaged)."""

    _index = 1

    def __init__(self, threshold: float = 0.5, include_background: bool = False, ignore_empty: bool = False,
                 name=None, **kwargs):
        name = name or ("iou_with_bg" if include_background else "iou")
        super().__init__(threshold=threshold, include_background=include_background, ignore_empty=ignore_empty,
                         name=name, **kwargs)


def head_metrics(heads, num_classes: int) -> dict:
    """Compile metrics keyed by head: accuracy/AUC/F1 for class heads, mean IoU for boxes,
    foreground Dice and IoU for masks."""
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
        elif h == "mask":
            out[h] = [DiceScore(), MaskIoU()]
    return out
