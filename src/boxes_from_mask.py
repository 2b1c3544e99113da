"""Boxes read off a predicted mask (the ``boxes_from_mask`` setting), pure numpy + OpenCV.

:func:`resolve_box_mode` reads the setting (``largest``, ``components``, or off);
:func:`mask_boxes` gives the pixel boxes of a mask's 8-connected components (largest
first), :func:`union_box` the box holding several, and :func:`slot_boxes_from_masks` a
batch of masks as a detector's box head lays its boxes out. So a model with a mask head and
no box head still reports boxes: :class:`src.inference.Predictor` (at the original size)
and :mod:`src.evaluation.collect` (scored against the data's boxes) use it. ``_off`` (a
config value meaning off) also serves :func:`src.inference.resolve_tta`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

BOX_MODES = ("largest", "components")


def _off(value) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in
                                               ("none", "false", "off", ""))


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
