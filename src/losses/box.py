"""Box losses of the IoU family (IoU, GIoU, DIoU, CIoU), pure IoU functions and the dense box loss.

Conventions
-----------
* Boxes are normalised ``xyxy``: ``[x_min, y_min, x_max, y_max]``.
* The detector predicts one box per class slot: ``y_true`` / ``y_pred`` are ``[B, C, 4]``
  (slot ``k`` = class ``k``) and the per-slot sample weight ``[B, C]`` says which slots hold
  a known box. A slot with weight 0 contributes nothing, whatever it holds (zeros,
  garbage, even NaN in ``y_true``).
* Everything is computed in float32, also when the inputs are float16 / bfloat16.
* No ``tf.boolean_mask``: fixed shapes, masks as weights. Every division is a *safe*
  division with the "double where" trick (the denominator is replaced by 1 where it is
  too small *before* dividing), so neither the value nor the gradient can become NaN/inf
  for degenerate (zero-area) boxes.

Every loss here is a :class:`~src.losses.base.MaskedLoss` (masked-mean reduction, see
:mod:`src.losses.base`). The box metric (:class:`BoxMeanIoU`) lives with the training
metrics in :mod:`src.training.metrics`.
"""
from __future__ import annotations

import math

import keras
from keras import ops

from .base import MaskedLoss, check_choice, safe_divide

__all__ = [
    "BOX_MODES",
    "BoxIoULoss",
    "DenseBoxLoss",
    "cell_centres",
    "dense_boxes",
    "box_iou",
    "pairwise_iou",
]

BOX_MODES = ("iou", "giou", "diou", "ciou")


# --------------------------------------------------------------------------- IoU family
def _aspect_angle(w, h, eps):
    """``atan(w / h)`` for ``w, h >= 0``, finite (value and gradient) for ``h -> 0``."""
    ratio = safe_divide(w, h, eps)
    flat = ops.where(w > eps, ops.full_like(w, math.pi / 2.0), ops.zeros_like(w))
    return ops.where(h > eps, ops.arctan(ratio), flat)


def box_iou(a, b, mode: str = "iou", eps: float = 1e-7):
    """Elementwise IoU-family similarity of xyxy boxes ``a`` and ``b`` (broadcasting).

    Args:
        a, b: ``[..., 4]`` boxes (any float dtype, numpy or tensor); their leading
            dimensions broadcast against each other.
        mode: ``"iou"``, ``"giou"`` (Rezatofighi et al. 2019), ``"diou"`` or ``"ciou"``
            (Zheng et al. 2020).
        eps: denominators not larger than ``eps`` give a 0 ratio instead of a division.

    Returns:
        float32 tensor ``[...]``: IoU in [0, 1]; GIoU in (-1, 1]; DIoU in (-1, 1];
        CIoU in (-1.5, 1] (CIoU carries the aspect-ratio term ``alpha * v``, with
        ``alpha`` under ``stop_gradient`` as in the authors' implementation).

    Inverted boxes (``x_max < x_min``) count as zero-width. Two degenerate boxes give
    IoU 0, never NaN.
    """
    mode = check_choice(str(mode).lower(), BOX_MODES, "mode")
    a = ops.cast(ops.convert_to_tensor(a), "float32")
    b = ops.cast(ops.convert_to_tensor(b), "float32")
    ax1, ay1, ax2, ay2 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    bx1, by1, bx2, by2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]

    aw, ah = ops.relu(ax2 - ax1), ops.relu(ay2 - ay1)
    bw, bh = ops.relu(bx2 - bx1), ops.relu(by2 - by1)
    iw = ops.relu(ops.minimum(ax2, bx2) - ops.maximum(ax1, bx1))
    ih = ops.relu(ops.minimum(ay2, by2) - ops.maximum(ay1, by1))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    iou = safe_divide(inter, union, eps)
    if mode == "iou":
        return iou

    # smallest enclosing box
    cw = ops.relu(ops.maximum(ax2, bx2) - ops.minimum(ax1, bx1))
    ch = ops.relu(ops.maximum(ay2, by2) - ops.minimum(ay1, by1))
    if mode == "giou":
        c_area = cw * ch
        return iou - safe_divide(c_area - union, c_area, eps)

    # squared centre distance / squared enclosing diagonal
    rho2 = (ops.square(ax1 + ax2 - bx1 - bx2) + ops.square(ay1 + ay2 - by1 - by2)) / 4.0
    c2 = ops.square(cw) + ops.square(ch)
    diou = iou - safe_divide(rho2, c2, eps)
    if mode == "diou":
        return diou

    v = (4.0 / math.pi**2) * ops.square(_aspect_angle(aw, ah, eps) - _aspect_angle(bw, bh, eps))
    alpha = ops.stop_gradient(safe_divide(v, (1.0 - iou) + v, eps))
    return diou - alpha * v


def pairwise_iou(a, b, mode: str = "iou", eps: float = 1e-7):
    """IoU-family similarity of every box in ``a`` ``[N, 4]`` with every box in ``b`` ``[M, 4]``: ``[N, M]``."""
    a = ops.convert_to_tensor(a)
    b = ops.convert_to_tensor(b)
    return box_iou(ops.expand_dims(a, -2), ops.expand_dims(b, -3), mode=mode, eps=eps)


@keras.saving.register_keras_serializable(package="btmtl")
class BoxIoULoss(MaskedLoss):
    """``1 - IoU``, ``1 - GIoU``, ``1 - DIoU`` or ``1 - CIoU`` per box (per class slot).

    ``call`` returns the per-slot loss ``[B, C]`` for ``[B, C, 4]`` inputs; call the loss as
    ``loss(y_true, y_pred, sample_weight=w)`` with ``w`` ``[B, C]`` (0 = no known box).

    Ranges: iou loss in [0, 1], giou/diou in [0, 2), ciou in [0, 2.5).

    Gradients: for boxes that do not overlap, plain ``"iou"`` has an exactly zero
    gradient (the intersection is clipped at 0): use giou/diou/ciou when predictions
    may start far from the target; their penalty terms pull the boxes together.

    Args:
        mode: ``"iou" | "giou" | "diou" | "ciou"``.
        eps: smallest denominator divided by (see :func:`box_iou`).
        normalize: ``"weights"`` (masked mean, default) or ``"batch"``; see the module doc.
        l1_weight: adds ``l1_weight * mean |y_true - y_pred|`` over the 4 coordinates (the
            DETR recipe): a dense, scale-aware signal that speeds up learning small boxes.
        name, reduction: as for any Keras loss.
    """

    def __init__(self, mode="iou", eps=1e-7, normalize="weights", name=None,
                 reduction="sum_over_batch_size", dtype=None, l1_weight=0.0):
        mode = check_choice(str(mode).lower(), BOX_MODES, "mode")
        super().__init__(normalize=normalize, name=name or f"{mode}_loss", reduction=reduction)
        self.mode = mode
        self.eps = float(eps)
        if l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {l1_weight}")
        self.l1_weight = float(l1_weight)

    def call(self, y_true, y_pred):
        loss = 1.0 - box_iou(y_true, y_pred, mode=self.mode, eps=self.eps)
        if self.l1_weight:
            loss = loss + self.l1_weight * ops.mean(ops.abs(ops.cast(y_true, "float32")
                                                            - ops.cast(y_pred, "float32")), axis=-1)
        return loss

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "eps": self.eps, "l1_weight": self.l1_weight})
        return config


# --------------------------------------------------------------------------- dense maps
def cell_centres(h: int, w: int):
    """``(cx, cy)``, each ``[h, w]``: the normalised centres of the cells of an ``h x w`` map."""
    cx = (ops.cast(ops.arange(w), "float32") + 0.5) / float(w)
    cy = (ops.cast(ops.arange(h), "float32") + 0.5) / float(h)
    return ops.meshgrid(cx, cy)  # "xy" indexing: [h, w] each


def dense_boxes(dist):
    """Every cell's box ``[B, h, w, 4]`` (normalised xyxy) from distance logits ``[B, h, w, 4]``:
    ``[cx - l, cy - t, cx + r, cy + b]`` with ``(l, t, r, b) = sigmoid(dist)``."""
    d = ops.sigmoid(ops.cast(dist, "float32"))
    cx, cy = cell_centres(int(d.shape[1]), int(d.shape[2]))
    return ops.stack([cx - d[..., 0], cy - d[..., 1], cx + d[..., 2], cy + d[..., 3]], axis=-1)


@keras.saving.register_keras_serializable(package="btmtl")
class DenseBoxLoss(MaskedLoss):
    """Loss of the dense box maps of :func:`src.models.heads.dense_box_head` (``boxes_aux1``).

    ``y_true`` ``[B, K, 4]`` slot boxes with slot weights ``[B, K]`` (the ``boxes`` target);
    ``y_pred`` ``[B, h, w, Kh + 4]``: ``Kh`` heat logits (1 = shared by every slot) and 4
    distance logits. For every known slot, a target distribution over the cells, ``q``, is a
    Gaussian around the true box centre (standard deviation ``sigma`` x the box size, at
    least half a cell), normalised to sum 1. Per slot:

    * heat: ``KL(q || softmax(heat))`` over the cells, which puts the soft arg-max of the
      decoder on the box centre;
    * boxes: ``sum_cells q * (1 - GIoU(cell box, true box) + l1_weight * mean |diff|)``,
      so every cell near the centre learns to predict the whole box (FCOS-style dense
      supervision instead of one gradient through the average).

    ``heat_weight * heat + box_weight * boxes``, reduced over the known slots like every
    :class:`MaskedLoss`.
    """

    def __init__(self, heat_weight: float = 1.0, box_weight: float = 1.0, l1_weight: float = 1.0,
                 mode: str = "giou", sigma: float = 0.15, normalize="weights", name="dense_box",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(normalize=normalize, name=name, reduction=reduction)
        self.heat_weight, self.box_weight, self.l1_weight = float(heat_weight), float(box_weight), float(l1_weight)
        self.mode = check_choice(str(mode).lower(), BOX_MODES, "mode")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            y_true = ops.cast(y_true, "float32")
            y_pred = ops.cast(y_pred, "float32")
            if sample_weight is None:
                sample_weight = ops.ones(ops.shape(y_true)[:2], "float32")
            w = ops.cast(sample_weight, "float32")
            # unknown slots may hold anything: a harmless unit box instead
            unit = ops.convert_to_tensor([0.25, 0.25, 0.75, 0.75], "float32")
            y_true = ops.where(ops.expand_dims(w != 0, -1), y_true, ops.zeros_like(y_true) + unit)
            return self.reduce(self.call(y_true, y_pred), w)

    def call(self, y_true, y_pred):
        h, w_ = int(y_pred.shape[1]), int(y_pred.shape[2])
        kh = int(y_pred.shape[-1]) - 4
        heat, dist = y_pred[..., :kh], y_pred[..., kh:]
        b = ops.shape(y_pred)[0]
        logp = ops.log_softmax(ops.reshape(heat, (b, h * w_, kh)), axis=1)        # [B, N, Kh]
        cx, cy = cell_centres(h, w_)
        cx, cy = ops.reshape(cx, (1, -1, 1)), ops.reshape(cy, (1, -1, 1))          # [1, N, 1]
        tx = (y_true[..., 0] + y_true[..., 2]) / 2.0                              # [B, K]
        ty = (y_true[..., 1] + y_true[..., 3]) / 2.0
        sx = ops.maximum(self.sigma * ops.relu(y_true[..., 2] - y_true[..., 0]), 0.5 / w_)
        sy = ops.maximum(self.sigma * ops.relu(y_true[..., 3] - y_true[..., 1]), 0.5 / h)
        e = (ops.square(cx - tx[:, None, :]) / (2.0 * ops.square(sx[:, None, :]))
             + ops.square(cy - ty[:, None, :]) / (2.0 * ops.square(sy[:, None, :])))  # [B, N, K]
        logq = -e - ops.logsumexp(-e, axis=1, keepdims=True)
        q = ops.exp(logq)
        heat_loss = ops.sum(q * (logq - logp), axis=1)                              # [B, K] (Kh = 1 broadcasts)
        cells = ops.reshape(dense_boxes(dist), (b, h * w_, 1, 4))                   # [B, N, 1, 4]
        per_cell = 1.0 - box_iou(cells, y_true[:, None, :, :], mode=self.mode)      # [B, N, K]
        if self.l1_weight:
            per_cell = per_cell + self.l1_weight * ops.mean(ops.abs(cells - y_true[:, None, :, :]), axis=-1)
        box_loss = ops.sum(q * per_cell, axis=1)
        return self.heat_weight * heat_loss + self.box_weight * box_loss

    def get_config(self):
        config = super().get_config()
        config.update({"heat_weight": self.heat_weight, "box_weight": self.box_weight, "l1_weight": self.l1_weight,
                       "mode": self.mode, "sigma": self.sigma})
        return config
