"""Box and mask detection metrics: COCO mAP from ``pycocotools``, and our slot IoU / VOC AP.

Every function takes arrays of *known* targets only (the caller drops the images whose
boxes or masks are unknown). Undefined values are ``NaN`` (``null`` in JSON); COCOeval's
``-1`` ("no ground truth for this class") is mapped to ``NaN``.

COCO conversion (:func:`coco_evaluate`), in memory, pycocotools' prints silenced
    One COCO image per evaluated image (ids from 1, in order), ``height`` x ``width`` =
    the evaluated image size (the model's input size in :mod:`src.evaluate`; boxes are
    normalised xyxy and are converted to pixels ``[x, y, w, h]`` with it). Only the area
    range ``all`` enters the reported numbers, so the size does not change them (IoU is
    scale-invariant); COCO's small / medium / large split would depend on it and is not
    reported. Categories = the classes (ids from 1); a class without ground truth is
    ``-1`` in COCOeval, reported as ``null`` and left out of the means (as COCO does).
    Ground truth has ``iscrowd = 0``, annotation ids from 1. Headline numbers are
    ``COCOeval.summarize()``'s ``stats``: ``map50_95`` (AP@[0.50:0.05:0.95]), ``map50``,
    ``map75``, ``mar100`` (AR with 100 detections), all area ``all``, ``maxDets`` 100,
    precision sampled at 101 recall points. Per class: ``ap50`` and ``ap50_95`` from
    ``eval["precision"]`` (101-point, area all, maxDets 100), averaged as ``summarize``.

Boxes (:func:`box_report`)
    The box head predicts one box per class slot (``[N, C, 4]`` normalised xyxy).
    *COCO bbox mAP*: every image with known boxes gives one detection per class slot
    ``k``: the predicted box of slot ``k``, category ``k``, score = the image's
    probability of class ``k`` (class head, composed tumour / subtype probabilities or
    multi-label head; 1 for every detection when the model has no class output). Ground
    truth: every ``boxes_all`` box of those images with its class. Images without a true
    box (healthy slices) are COCO images without annotations: their detections are
    false positives.
    *Ours, named so*: ``slot_iou_*`` = for every slot with a known true box (slot weight
    1), the IoU of the predicted and true box of that slot (mean / median / share >= 0.5
    and 0.75 / histogram over 10 equal bins of [0, 1], per class); ``voc_ap50`` /
    ``voc_map50`` = the same detections, greedy matching by confidence (stable sort) to
    the unmatched true box of the image and class with the highest IoU, AP = area under
    the precision envelope at every recall step (all-point interpolation, PASCAL VOC
    2010+), IoU >= 0.5, mean over the classes with true boxes.

Masks (:func:`mask_map`): COCO segm mAP of a model with a mask head
    The mask head predicts one binary mask per image (thresholded by the caller). One
    detection per image = its predicted mask as a COCO RLE
    (``pycocotools.mask.encode``); an empty predicted mask is *no* detection. Ground truth
    = the true mask of the image with its class; an empty true mask (healthy slice) is no
    annotation, so a mask predicted there is a false positive. *Class-aware* (the
    headline, when the model has class probabilities and every tumour image has a known
    tumour class): categories = the classes except ``no_tumor``; the detection's category
    is the tumour class with the highest probability and its score that probability (a
    YOLO-seg's top-1 detection). *Class-agnostic* (``agnostic``, always): one category
    ``tumor``, score = p(tumour) (the ``tumor`` head, else 1 - p(no_tumor), else 1 when
    the model has no class output); the headline for models without class output.
"""
from __future__ import annotations

import contextlib
import io
from typing import Mapping, Optional, Sequence

import numpy as np

from .metrics import _div, _nanmean, histogram, version

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


# ---------------------------------------------------------------------------------------
# ours: IoU, slot IoU, VOC AP
# ---------------------------------------------------------------------------------------
def box_iou_np(a, b, eps: float = 1e-7) -> np.ndarray:
    """Elementwise IoU of xyxy boxes (broadcasting); inverted boxes have zero width, an
    empty union gives 0 (same conventions as :func:`src.losses.box.box_iou`)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    aw = np.maximum(a[..., 2] - a[..., 0], 0)
    ah = np.maximum(a[..., 3] - a[..., 1], 0)
    bw = np.maximum(b[..., 2] - b[..., 0], 0)
    bh = np.maximum(b[..., 3] - b[..., 1], 0)
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    out = np.zeros(np.broadcast(inter, union).shape)
    np.divide(inter, union, out=out, where=union > eps)
    return out


def slot_ious(pred_boxes, true_boxes, slot_weights) -> np.ndarray:
    """``[N, C]`` IoU of every slot with a known true box (``NaN`` elsewhere)."""
    iou = box_iou_np(pred_boxes, true_boxes)
    return np.where(np.asarray(slot_weights) > 0, iou, np.nan)


def average_precision(recall, precision) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+): area under the precision envelope."""
    mrec = np.r_[0.0, np.asarray(recall, np.float64), 1.0]
    mpre = np.r_[0.0, np.asarray(precision, np.float64), 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def class_ap(pred_boxes, scores, gt_boxes: Sequence[np.ndarray], iou_threshold: float) -> dict:
    """VOC AP of one class: ``pred_boxes [N, 4]`` (one detection per image), ``scores [N]``,
    ``gt_boxes[i]`` ``[G_i, 4]`` the true boxes of that class on image ``i``.

    Returns ``{"ap", "n_gt", "tp", "fp", "recall", "precision"}`` (curves per detection in
    confidence order); ``ap`` is ``NaN`` without true boxes.
    """
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).ravel()
    n_gt = int(sum(len(g) for g in gt_boxes))
    order = np.argsort(-scores, kind="mergesort")
    used = [np.zeros(len(g), bool) for g in gt_boxes]
    tp = np.zeros(len(order))
    for r, i in enumerate(order):
        g = np.asarray(gt_boxes[i], np.float64).reshape(-1, 4)
        if not len(g):
            continue
        ious = box_iou_np(pred_boxes[i][None], g)
        ious[used[i]] = -1.0
        j = int(np.argmax(ious))
        if ious[j] >= iou_threshold:
            used[i][j] = True
            tp[r] = 1.0
    ctp = np.cumsum(tp)
    cfp = np.cumsum(1.0 - tp)
    recall = ctp / n_gt if n_gt else np.zeros_like(ctp)
    precision = _div(ctp, ctp + cfp)
    ap = average_precision(recall, precision) if n_gt else float("nan")
    return {"ap": ap, "n_gt": n_gt, "tp": int(ctp[-1]) if len(ctp) else 0,
            "fp": int(cfp[-1]) if len(cfp) else 0, "recall": recall, "precision": precision}


def gt_boxes_by_class(boxes_all, boxes_all_classes, boxes_all_count, num_classes: int) -> list:
    """``out[k][i]`` = ``[G, 4]`` true boxes of class ``k`` on image ``i``."""
    ba = np.asarray(boxes_all, np.float64)
    bc = np.asarray(boxes_all_classes, np.int64)
    cnt = np.asarray(boxes_all_count, np.int64).ravel()
    out = [[np.zeros((0, 4)) for _ in range(len(ba))] for _ in range(num_classes)]
    for i in range(len(ba)):
        for j in range(min(int(cnt[i]), ba.shape[1])):
            k = int(bc[i, j])
            if 0 <= k < num_classes:
                out[k][i] = np.vstack([out[k][i], ba[i, j][None]])
    return out


def voc_map50(pred_boxes, scores, boxes_all, boxes_all_classes, boxes_all_count,
              class_names: Sequence[str], iou_threshold: float = 0.5) -> dict:
    """Our all-point VOC AP per class at ``iou_threshold`` and its mean over the classes
    with true boxes. ``pred_boxes [N, C, 4]``, ``scores [N, C]`` (None: 1).

    Returns ``{"voc_map50", "voc_ap50": {class: AP}, "n_gt": {class: n}}``.
    """
    pred_boxes = np.asarray(pred_boxes, np.float64)
    N, C = pred_boxes.shape[:2]
    scores = np.ones((N, C)) if scores is None else np.asarray(scores, np.float64).reshape(N, C)
    gts = gt_boxes_by_class(boxes_all, boxes_all_classes, boxes_all_count, C)
    n_gt = [int(sum(len(g) for g in gts[k])) for k in range(C)]
    ap = [class_ap(pred_boxes[:, k], scores[:, k], gts[k], iou_threshold)["ap"] if n_gt[k] else float("nan")
          for k in range(C)]
    return {"voc_map50": _nanmean(ap), "voc_ap50": dict(zip(class_names, ap)), "n_gt": dict(zip(class_names, n_gt))}


# ---------------------------------------------------------------------------------------
# COCO (pycocotools)
# ---------------------------------------------------------------------------------------
def xyxy_to_coco(boxes, image_size: Sequence[int]) -> np.ndarray:
    """Normalised ``[..., 4]`` xyxy -> COCO pixels ``[x, y, w, h]`` for ``image_size``
    ``(H, W)`` (inverted boxes get zero width / height)."""
    b = np.asarray(boxes, np.float64)
    H, W = float(image_size[0]), float(image_size[1])
    return np.stack([b[..., 0] * W, b[..., 1] * H, np.maximum(b[..., 2] - b[..., 0], 0) * W,
                     np.maximum(b[..., 3] - b[..., 1], 0) * H], axis=-1)


def encode_masks(masks) -> list:
    """COCO RLEs (``pycocotools.mask.encode``) of binary masks ``[N, H, W]``."""
    from pycocotools import mask as mask_utils

    m = np.asarray(masks, bool)
    if not len(m):
        return []
    return mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))


def _undef(v) -> float:
    v = float(v)
    return float("nan") if v < 0 else v


def coco_evaluate(image_sizes: Sequence[Sequence[int]], gts: Sequence[Mapping], dets: Sequence[Mapping],
                  categories: Sequence[str], iou_type: str = "bbox") -> dict:
    """``COCOeval`` on in-memory annotations (module docstring).

    ``image_sizes[i] = (H, W)`` of image ``i`` (COCO id ``i + 1``); ``gts`` and ``dets``:
    dicts with ``image`` (0-based index), ``category`` (0-based index into
    ``categories``), ``bbox`` (pixels xywh; bbox) or ``segmentation`` (RLE; segm), and
    ``score`` (dets). Returns the headline numbers, per-class AP, mAP per IoU threshold
    and counts; everything ``NaN`` without images or ground truth.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    nan = float("nan")
    out = {"map50_95": nan, "map50": nan, "map75": nan, "mar100": nan,
           "per_class": {c: {"ap50": nan, "ap50_95": nan, "n_gt": 0} for c in categories},
           "map_by_threshold": {f"{t:.2f}": nan for t in IOU_THRESHOLDS},
           "n_images": len(image_sizes), "n_gt": len(gts), "n_detections": len(dets)}
    for g in gts:
        out["per_class"][categories[g["category"]]]["n_gt"] += 1
    if not len(image_sizes) or not len(gts):
        return out

    def ann(a, i, score=None):
        d = {"id": i + 1, "image_id": int(a["image"]) + 1, "category_id": int(a["category"]) + 1, "iscrowd": 0}
        if iou_type == "bbox":
            d["bbox"] = [float(v) for v in a["bbox"]]
            d["area"] = d["bbox"][2] * d["bbox"][3]
        else:
            d["segmentation"] = a["segmentation"]
            d["area"] = float(mask_utils.area(a["segmentation"]))
            d["bbox"] = [float(v) for v in mask_utils.toBbox(a["segmentation"])]
        if score is not None:
            d["score"] = float(score)
        return d

    images = [{"id": i + 1, "height": int(h), "width": int(w)} for i, (h, w) in enumerate(image_sizes)]
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(categories)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": cats, "annotations": [ann(a, i) for i, a in enumerate(gts)]}
        gt.createIndex()
        dt = COCO()
        dt.dataset = {"images": images, "categories": cats,
                      "annotations": [ann(a, i, a["score"]) for i, a in enumerate(dets)]}
        dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    out.update(map50_95=_undef(s[0]), map50=_undef(s[1]), map75=_undef(s[2]), mar100=_undef(s[8]))
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K], area all, maxDets 100
    for k, c in enumerate(categories):
        p = prec[:, :, k]
        out["per_class"][c]["ap50_95"] = float(p[p > -1].mean()) if (p > -1).any() else nan
        out["per_class"][c]["ap50"] = float(p[0][p[0] > -1].mean()) if (p[0] > -1).any() else nan
    for t, thr in enumerate(ev.params.iouThrs):
        p = prec[t]
        out["map_by_threshold"][f"{thr:.2f}"] = float(p[p > -1].mean()) if (p > -1).any() else nan
    return out


def coco_implementation(iou_type: str, image_size) -> str:
    size = "x".join(str(int(v)) for v in image_size) if image_size is not None else "1x1"
    what = "boxes converted to pixels [x, y, w, h]" if iou_type == "bbox" else \
        "masks as RLE (pycocotools.mask.encode)"
    return (f"COCO {iou_type} mAP (pycocotools {version('pycocotools')} COCOeval), 101-point interpolated, IoU "
            f"0.50:0.05:0.95, area all, maxDets 100; {what} on {size} (HxW) images")


# ---------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------
def box_coco_map(pred_boxes, scores, boxes_all, boxes_all_classes, boxes_all_count, class_names: Sequence[str],
                 image_size: Optional[Sequence[int]] = None) -> dict:
    """COCO bbox mAP of the slot detections (module docstring). ``pred_boxes [N, C, 4]``
    normalised xyxy, ``scores [N, C]`` (None: 1), ``image_size (H, W)`` for the pixel
    conversion (None: 1 x 1)."""
    pred_boxes = np.asarray(pred_boxes, np.float64)
    N, C = pred_boxes.shape[:2]
    scores = np.ones((N, C)) if scores is None else np.asarray(scores, np.float64).reshape(N, C)
    size = (1, 1) if image_size is None else tuple(image_size)[:2]
    pix = xyxy_to_coco(pred_boxes, size)
    ba = xyxy_to_coco(np.asarray(boxes_all, np.float64).reshape(N, -1, 4), size)
    bc = np.asarray(boxes_all_classes, np.int64).reshape(N, -1)
    cnt = np.asarray(boxes_all_count, np.int64).ravel()
    gts = [{"image": i, "category": int(bc[i, j]), "bbox": ba[i, j]}
           for i in range(N) for j in range(min(int(cnt[i]), bc.shape[1])) if 0 <= bc[i, j] < C]
    dets = [{"image": i, "category": k, "bbox": pix[i, k], "score": scores[i, k]} for i in range(N) for k in range(C)]
    return coco_evaluate([size] * N, gts, dets, list(class_names), "bbox")


def box_report(pred_boxes, true_boxes, slot_weights, class_names: Sequence[str], boxes_all=None,
               boxes_all_classes=None, boxes_all_count=None, scores=None, known=None, bins: int = 10,
               image_size: Optional[Sequence[int]] = None) -> dict:
    """Slot IoU statistics and (with ``boxes_all*``) COCO bbox mAP and our VOC AP@0.5;
    ``known [N]`` selects the images whose boxes are known (the mAP's image set; default
    all); ``image_size (H, W)``: the pixel size of the COCO conversion."""
    pred_boxes = np.asarray(pred_boxes, np.float64)
    N = len(pred_boxes)
    ious = slot_ious(pred_boxes, true_boxes, slot_weights)
    flat = ious[np.isfinite(ious)]
    rep = {
        "n_boxes": int(flat.size),
        "slot_iou_mean": float(flat.mean()) if flat.size else float("nan"),
        "slot_iou_median": float(np.median(flat)) if flat.size else float("nan"),
        "slot_iou_ge_0.5": float(np.mean(flat >= 0.5)) if flat.size else float("nan"),
        "slot_iou_ge_0.75": float(np.mean(flat >= 0.75)) if flat.size else float("nan"),
        "slot_iou_histogram": histogram(flat, bins),
        "per_class": {name: {"slot_iou_mean": _nanmean(ious[:, k]), "n_slots": int(np.isfinite(ious[:, k]).sum())}
                      for k, name in enumerate(class_names)},
        "implementations": {"slot_iou_*": "ours: IoU of each class slot's predicted box with its known true box"},
    }
    if boxes_all is None:
        return rep
    sel = np.ones(N, bool) if known is None else np.asarray(known, bool).ravel()
    sc = None if scores is None else np.asarray(scores, np.float64)[sel]
    args = (pred_boxes[sel], sc, np.asarray(boxes_all)[sel], np.asarray(boxes_all_classes)[sel],
            np.asarray(boxes_all_count)[sel], class_names)
    coco = box_coco_map(*args, image_size=image_size)
    voc = voc_map50(*args)
    for name in class_names:
        pc = rep["per_class"][name]
        pc.update(ap50=coco["per_class"][name]["ap50"], ap50_95=coco["per_class"][name]["ap50_95"],
                  voc_ap50=voc["voc_ap50"][name], n_gt=voc["n_gt"][name])
    confidence = "class probability" if scores is not None else "none (1 for every detection)"
    rep.update(map50=coco["map50"], map50_95=coco["map50_95"], map75=coco["map75"], mar100=coco["mar100"],
               voc_map50=voc["voc_map50"],
               coco={**coco, "image_size": list(image_size or (1, 1))[:2], "confidence": confidence,
                     "detections": "one per image and class slot"})
    rep["implementations"].update({
        "map50/map50_95/map75/mar100": coco_implementation("bbox", image_size),
        "voc_ap50/voc_map50": "ours: all-point interpolated AP (PASCAL VOC 2010+) at IoU 0.5, greedy matching by "
                              "confidence, mean over classes with true boxes",
    })
    return rep


def mask_map(pred_rles: Sequence, true_rles: Sequence, probs=None, y_class=None, class_names: Sequence[str] = (),
             p_tumor=None, no_tumor: str = "no_tumor") -> dict:
    """COCO segm mAP of one predicted mask per image (module docstring).

    ``pred_rles`` / ``true_rles``: RLEs (:func:`encode_masks`) of the images with a known
    mask; ``probs [N, C]`` class probabilities in ``class_names`` order and ``y_class
    [N]`` the true class (-1: unknown) for the class-aware reading; ``p_tumor [N]`` the
    tumour probability of the agnostic reading (default 1 - p(no_tumor), else 1).
    """
    from pycocotools import mask as mask_utils

    n = len(pred_rles)
    sizes = [tuple(int(v) for v in r["size"]) for r in true_rles]
    pred_area = np.array([mask_utils.area(r) for r in pred_rles], np.int64) if n else np.zeros(0, np.int64)
    true_area = np.array([mask_utils.area(r) for r in true_rles], np.int64) if n else np.zeros(0, np.int64)
    names = list(class_names)
    score = "p(tumour)" if p_tumor is not None or (probs is not None and no_tumor in names) else "1 (no class output)"
    if p_tumor is None:
        p_tumor = (1.0 - np.asarray(probs, np.float64)[:, names.index(no_tumor)]
                   if probs is not None and no_tumor in names else np.ones(n))
    p_tumor = np.asarray(p_tumor, np.float64).ravel()
    gts = [{"image": i, "category": 0, "segmentation": true_rles[i]} for i in range(n) if true_area[i]]
    dets = [{"image": i, "category": 0, "segmentation": pred_rles[i], "score": p_tumor[i]}
            for i in range(n) if pred_area[i]]
    agnostic = {**coco_evaluate(sizes, gts, dets, ["tumor"], "segm"), "score": score,
                "detections": "one per image with a non-empty predicted mask, one category"}
    tumour_cols = [k for k, c in enumerate(names) if c != no_tumor]
    note = None
    if probs is not None and y_class is not None and tumour_cols:
        probs = np.asarray(probs, np.float64).reshape(n, -1)
        y = np.asarray(y_class, np.int64).ravel()
        bad = [i for i in range(n) if true_area[i] and int(y[i]) not in tumour_cols]
        if not bad:
            cat = {k: j for j, k in enumerate(tumour_cols)}
            top = np.asarray(tumour_cols)[probs[:, tumour_cols].argmax(axis=1)] if n else np.zeros(0, np.int64)
            gts = [{**g, "category": cat[int(y[g["image"]])]} for g in gts]
            dets = [{**d, "category": cat[int(top[d["image"]])], "score": probs[d["image"], top[d["image"]]]}
                    for d in dets]
            aware = {**coco_evaluate(sizes, gts, dets, [names[k] for k in tumour_cols], "segm"),
                     "score": "p(top tumour class)", "detections": "one per image with a non-empty predicted mask, "
                     "category = the most probable tumour class"}
            return _mask_map_out(aware, agnostic, sizes)
        note = (f"{len(bad)} images with a tumour mask have no known tumour class: mask mAP is class-agnostic only")
    return _mask_map_out(None, agnostic, sizes, note)


def _mask_map_out(aware: Optional[dict], agnostic: dict, sizes, note: Optional[str] = None) -> dict:
    head = aware if aware is not None else agnostic
    size = sizes[0] if sizes else None
    out = {"map50": head["map50"], "map50_95": head["map50_95"], "map75": head["map75"],
           "mask_map_kind": "class-aware" if aware is not None else "class-agnostic",
           "coco": {**head, "image_size": list(size) if size else None}, "agnostic": agnostic,
           "implementations": {"map50/map50_95/map75": coco_implementation("segm", size) + (
               "; one detection per image (its predicted mask, none when empty), category = the top tumour class, "
               "score = its probability" if aware is not None else
               "; one detection per image (its predicted mask, none when empty), one category, score = p(tumour)")}}
    if note:
        out["note"] = note
    return out


__all__ = ["box_iou_np", "slot_ious", "average_precision", "class_ap", "gt_boxes_by_class", "voc_map50",
           "xyxy_to_coco", "encode_masks", "coco_evaluate", "box_coco_map", "box_report", "mask_map",
           "IOU_THRESHOLDS"]
