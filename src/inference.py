"""Inference helpers shared by :mod:`src.evaluate` and :mod:`src.predict`.

* :func:`predict_with_tta` -- the model's outputs with optional test-time augmentation
  (``tta: flip``: the mean of the image's and its horizontal mirror's predictions, the
  mirror's spatial outputs flipped back first).
* :func:`mask_boxes` / :func:`slot_boxes_from_masks` -- boxes read off a predicted mask
  (the tight box of its largest connected component, or of each component), so a model
  with a mask head and no box head still reports boxes.

This module is the planned home of the shared inference code (loading a checkpoint,
preprocessing, mapping back to original pixels: today in :mod:`src.predict`).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

TTA_MODES = ("none", "flip")
BOX_MODES = ("largest", "components")

# outputs averaged as they are (probabilities / scores); every other output of rank 4
# ([B, H, W, C]: mask, recon, ...) is spatial and flipped back along the width first
CLASS_TYPE = ("class", "multilabel", "tumor", "subtype")


# ---------------------------------------------------------------------------------------
# test-time augmentation
# ---------------------------------------------------------------------------------------
def _off(value) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in
                                               ("none", "false", "off", ""))


def resolve_tta(mode) -> str:
    """``"none"`` or ``"flip"`` from a config value (``false`` / ``null`` / ``none`` = off);
    ``ValueError`` for anything else."""
    if _off(mode):
        return "none"
    if isinstance(mode, str) and mode.strip().lower() == "flip":
        return "flip"
    raise ValueError(f"tta must be false or flip, got {mode!r}")


def unflip_boxes(boxes):
    """Normalised xyxy boxes predicted on a horizontally flipped image -> boxes of the
    original image: ``x' = 1 - x`` with ``x_min`` / ``x_max`` swapped (any leading shape)."""
    from keras import ops

    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    return ops.stack([1.0 - x1, y0, 1.0 - x0, y1], axis=-1)


def merge_flip(out: Mapping, out_flipped: Mapping) -> dict:
    """Average the outputs of an image (``out``) and of its horizontal mirror
    (``out_flipped``), key by key: ``boxes`` are un-flipped (:func:`unflip_boxes`),
    spatial outputs (rank 4: masks, reconstructions) flipped back along the width, then
    everything is averaged; class-type heads are averaged as they are."""
    from keras import ops

    merged = {}
    for k, a in out.items():
        b = out_flipped[k]
        if k.startswith("boxes"):
            b = unflip_boxes(b)
        elif k not in CLASS_TYPE and len(a.shape) == 4:
            b = ops.flip(b, axis=2)
        merged[k] = (a + ops.cast(b, a.dtype)) * ops.cast(0.5, a.dtype)
    return merged


def predict_with_tta(model, x, mode="none"):
    """``model(x, training=False)`` with test-time augmentation ``mode``
    (:func:`resolve_tta`): ``none`` = one pass; ``flip`` = the mean of the pass on ``x`` and
    on ``x`` flipped along the width, see :func:`merge_flip`. Returns what the model returns
    (a dict keyed by head, as a copy; a single tensor for a single-output model). Works
    eagerly and inside ``tf.function``; ``x`` is ``[B, H, W, C]``."""
    from keras import ops

    mode = resolve_tta(mode)
    out = model(x, training=False)
    single = not isinstance(out, Mapping)
    if mode == "none":
        return out if single else dict(out)
    flipped = model(ops.flip(x, axis=2), training=False)
    if single:
        return merge_flip({"output": out}, {"output": flipped})["output"]
    return merge_flip(out, flipped)


# ---------------------------------------------------------------------------------------
# boxes from masks
# ---------------------------------------------------------------------------------------
def resolve_box_mode(mode) -> Optional[str]:
    """``"largest"``, ``"components"`` or None (``false`` / ``null`` / ``none`` = off)."""
    if _off(mode):
        return None
    if isinstance(mode, str) and mode.strip().lower() in BOX_MODES:
        return mode.strip().lower()
    raise ValueError(f"boxes_from_mask must be largest, components or false, got {mode!r}")


def mask_boxes(mask, threshold: float = 0.5, mode: str = "largest", min_area: int = 0) -> np.ndarray:
    """Boxes of a predicted mask: ``[K, 4]`` float pixel xyxy, pixel edges (``x_max`` = last
    foreground column + 1, as the data's boxes), largest component first.

    Args:
        mask: ``[H, W]`` or ``[H, W, 1]`` probabilities (or a 0/1 mask).
        threshold: foreground = ``mask >= threshold``.
        mode: ``largest`` (at most one box: the largest 8-connected component) or
            ``components`` (one box per 8-connected component).
        min_area: components with fewer pixels are ignored (specks); 0 keeps all.

    An empty mask (or one whose components are all under ``min_area``) gives ``[0, 4]``.
    """
    import cv2

    mode = resolve_box_mode(mode)
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W] or [H, W, 1], got shape {np.shape(mask)}")
    fg = np.ascontiguousarray(m >= threshold, dtype=np.uint8)
    if mode is None or not fg.any():
        return np.zeros((0, 4), np.float64)
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    st = stats[1:]
    keep = st[:, cv2.CC_STAT_AREA] >= max(int(min_area), 1)
    st = st[keep]
    order = np.argsort(-st[:, cv2.CC_STAT_AREA], kind="stable")
    st = st[order]
    if mode == "largest":
        st = st[:1]
    x, y = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP]
    return np.stack([x, y, x + st[:, cv2.CC_STAT_WIDTH], y + st[:, cv2.CC_STAT_HEIGHT]], axis=1).astype(np.float64)


def union_box(boxes: np.ndarray) -> Optional[np.ndarray]:
    """The smallest box holding every box of ``boxes [K, 4]`` (None when K = 0)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(b):
        return None
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def slot_boxes_from_masks(masks, num_slots: int, threshold: float = 0.5, mode: str = "largest",
                          min_area: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes [B, num_slots, 4], components [B])`` from predicted masks ``[B, H, W(, 1)]``.

    ``boxes``: normalised xyxy in the layout of a detector's box head (one box per class
    slot); every slot holds the image's mask box (``largest``: the largest component's;
    ``components``: the union box of the kept components); an empty mask gives zero boxes
    (IoU 0 with anything). ``components``: the number of kept components per image (0 = no
    box)."""
    mode = resolve_box_mode(mode)
    masks = np.asarray(masks)
    B = len(masks)
    out = np.zeros((B, int(num_slots), 4), np.float32)
    counts = np.zeros(B, np.int64)
    for i in range(B):
        m = masks[i]
        H, W = m.shape[:2]
        comps = mask_boxes(m, threshold, "components" if mode else None, min_area)
        counts[i] = len(comps)
        b = union_box(comps[:1] if mode == "largest" else comps)
        if b is not None:
            out[i, :] = b / np.array([W, H, W, H], np.float64)
    return out, counts
