"""The pipeline's targets and sample weights, computed once per record in NumPy when a
dataset is built (boxes already moved into the resized / letterboxed frame); their keys,
meanings and weights are tabled in :mod:`src.data.pipeline`'s docstring."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..heads import CLASS_SET
from .records import NO_TUMOR, TUMOR, ClassMap, DataError, Record


TARGET_KEYS: tuple[str, ...] = ("class", "multilabel", "tumor", "subtype", "boxes",
                                "boxes_all", "boxes_all_classes", "boxes_all_count", "mask")

_BOXES_ALL = ("boxes_all", "boxes_all_classes", "boxes_all_count")


def _frame_boxes(b: np.ndarray, geo, size) -> np.ndarray:
    """Normalised image boxes -> normalised boxes in the (letterboxed) target frame."""
    nh, nw, top, left = geo
    H, W = size
    if (nh, nw, top, left) == (H, W, 0, 0) or len(b) == 0:
        return b.astype(np.float32)
    sx, sy = nw / W, nh / H
    ox, oy = left / W, top / H
    return (b * np.array([sx, sy, sx, sy]) + np.array([ox, oy, ox, oy])).astype(np.float32)


def encode_targets(records: Sequence[Record], class_map: ClassMap, geometry: Sequence, size,
                   max_boxes: int, pseudo_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Per-record targets and weights as arrays (see :mod:`src.data.pipeline`'s docstring for meanings).

    ``pseudo_weight``: the weight of a known box / mask target that a model made
    (``record.pseudo``, e.g. CAM pseudo masks) instead of 1."""
    n, C = len(records), class_map.num_classes
    classes = class_map.classes
    tumor_classes = class_map.tumor_classes
    cidx = {c: i for i, c in enumerate(classes)}
    out = {
        "class": np.zeros(n, np.int32), "class_w": np.zeros(n, np.float32),
        "multilabel": np.zeros((n, C), np.float32), "multilabel_w": np.zeros(n, np.float32),
        "tumor": np.zeros(n, np.float32), "tumor_w": np.zeros(n, np.float32),
        "subtype": np.zeros(n, np.int32), "subtype_w": np.zeros(n, np.float32),
        "boxes": np.zeros((n, C, 4), np.float32), "boxes_w": np.zeros((n, C), np.float32),
        "boxes_all": np.zeros((n, max_boxes, 4), np.float32),
        "boxes_all_classes": np.full((n, max_boxes), -1, np.int32),
        "boxes_all_count": np.zeros(n, np.int32),
        "mask_w": np.zeros(n, np.float32),
        CLASS_SET: np.zeros((n, C), np.float32), CLASS_SET + "_w": np.zeros(n, np.float32),
    }
    tumor_set = np.array([c in tumor_classes for c in classes], np.float32)
    can_set = NO_TUMOR in cidx and TUMOR not in cidx and tumor_set.any()
    for i, r in enumerate(records):
        label_known = bool(r.known.get("label")) and r.label is not None
        label = r.label if label_known else None
        boxes_known = bool(r.known.get("boxes"))
        # class
        if label in cidx:
            out["class"][i] = cidx[label]
            out["class_w"][i] = 1.0
        # multilabel
        if label_known and not (label == TUMOR and TUMOR not in cidx):
            present = {label} | set(r.box_classes)
            if label == NO_TUMOR:
                present = {NO_TUMOR}
            else:
                present.discard(NO_TUMOR)
            for c in present:
                if c in cidx:
                    out["multilabel"][i, cidx[c]] = 1.0
            out["multilabel_w"][i] = 1.0
        # tumour present
        if label_known:
            out["tumor"][i] = 0.0 if label == NO_TUMOR else 1.0
            out["tumor_w"][i] = 1.0
        elif boxes_known and len(r.boxes):
            out["tumor"][i] = 1.0
            out["tumor_w"][i] = 1.0
        # the class head of a generic tumour: any tumour class (tumour vs healthy, no subtype)
        if can_set and out["class_w"][i] == 0 and out["tumor_w"][i] > 0 and out["tumor"][i] == 1:
            out[CLASS_SET][i] = tumor_set
            out[CLASS_SET + "_w"][i] = 1.0
        # subtype
        if label in tumor_classes:
            out["subtype"][i] = tumor_classes.index(label)
            out["subtype_w"][i] = 1.0
        # boxes
        b = _frame_boxes(np.asarray(r.boxes, np.float32).reshape(-1, 4), geometry[i], size)
        if len(b) > max_boxes:
            raise DataError(f"{r.image}: {len(b)} boxes but data.max_boxes={max_boxes}; raise data.max_boxes")
        out["boxes_all"][i, :len(b)] = b
        out["boxes_all_count"][i] = len(b)
        for j, c in enumerate(r.box_classes):
            k = cidx.get(c, -1)
            out["boxes_all_classes"][i, j] = k
            if k < 0:
                continue
            if out["boxes_w"][i, k] == 0 and boxes_known:
                out["boxes"][i, k] = b[j]
                out["boxes_w"][i, k] = pseudo_weight if r.is_pseudo("boxes") else 1.0
            elif boxes_known:
                cur = out["boxes"][i, k]
                out["boxes"][i, k] = [min(cur[0], b[j, 0]), min(cur[1], b[j, 1]),
                                      max(cur[2], b[j, 2]), max(cur[3], b[j, 3])]
        # mask
        if r.known.get("mask"):
            out["mask_w"][i] = pseudo_weight if r.is_pseudo("mask") else 1.0
    return out
