"""Evaluation metrics in plain numpy (scipy for distance transforms).

Every function takes arrays of *known* targets only: the caller drops samples whose
sample weight is 0 (an unknown target is never a negative). Undefined values (a ratio
with a zero denominator that has no conventional value, an AUC of a class with no
positives) are ``NaN`` in arrays and ``null`` in JSON (:func:`to_jsonable`).

Classification (:func:`classification_report`)
    ``y_true`` int ``[N]``, ``probs`` ``[N, C]``: accuracy, balanced accuracy (mean recall
    over the classes that occur in ``y_true``, as scikit-learn), per-class precision /
    recall / F1 / support (a zero denominator gives 0, scikit-learn's
    ``zero_division=0``), macro / micro / weighted averages (weighted by support), the
    confusion matrix (rows = true, columns = predicted; counts and row-normalised),
    one-vs-rest ROC-AUC per class (Mann-Whitney rank statistic, ties count 1/2; ``NaN``
    for a class without positives or without negatives) and their macro mean over the
    defined classes, the multi-class Brier score and the top-label calibration
    (:func:`calibration`). ``worst_class`` names the class with the lowest recall and
    its gap to the macro recall (the "glioma gap").

Calibration (:func:`calibration`)
    Confidence = the top-label probability, outcome = the prediction is correct.
    ``n_bins`` equal-width bins over [0, 1]; bin ``b`` holds confidences in
    ``(b/n, (b+1)/n]`` (0 falls into the first bin). ECE = sum over bins of
    ``count_b / N * |accuracy_b - confidence_b|`` (Guo et al. 2017); MCE = the largest
    per-bin gap over non-empty bins. The per-bin table is the reliability diagram's data.

Boxes (:func:`box_report`)
    The box head predicts one box per class slot (``[N, C, 4]`` normalised xyxy).
    *Per-slot IoU*: for every slot with a known true box (slot weight 1), the IoU of the
    predicted and true box of that slot; mean / median, a histogram over 10 equal bins
    of [0, 1] and the share >= 0.5 and >= 0.75; also per class.
    *mAP*: a detection task per class ``k`` over the images whose boxes are known: every
    such image contributes one detection, the predicted box of slot ``k``, with
    confidence = the image's probability of class ``k`` (class head, composed
    tumour/subtype probabilities or multi-label head; 1 for every detection when the
    model has no class output). The ground truth is every ``boxes_all`` box of class
    ``k`` on those images. Detections are sorted by confidence (stable) and each is
    matched to the unmatched true box of its image and class with the highest IoU; it
    is a true positive when that IoU >= the threshold, else a false positive. AP is the
    area under the precision envelope at every recall step (all-point interpolation of
    PASCAL VOC 2010+, not COCO's 101-point sampling). Classes without true boxes (e.g.
    ``no_tumor``) have no AP and are left out of the means. ``map50`` = mean AP at IoU
    0.5; ``map50_95`` = the mean over the thresholds 0.50, 0.55, ..., 0.95 of the mean
    AP over classes (COCO's averaging).

Masks (:func:`mask_scores`, :func:`mask_report`)
    Foreground only, per image, on binary masks (the caller thresholds probabilities).
    Dice = 2|A and B| / (|A| + |B|), IoU = |A and B| / |A or B|; both empty: Dice = IoU = 1.
    HD95 (pixels) follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the
    surface of a mask is its pixels that an erosion with the 4-connected cross removes;
    HD95 = max(95th percentile of the distances from A's surface to B's surface, the same
    from B to A), Euclidean distances from ``scipy.ndimage.distance_transform_edt``.
    Both empty: HD95 = 0. Exactly one empty: HD95 is undefined: ``NaN``, left out of
    ``hd95_mean`` and counted in ``hd95_undefined``; ``hd95_mean_penalised`` counts those
    images as the image diagonal instead. Means are reported over all images with a
    known mask and, separately, over images whose true mask is not empty
    (``*_tumor_only``: healthy images with an empty prediction score 1 and would flatter
    the mean), plus the pooled (global) Dice over all pixels.

Reconstruction (:func:`psnr`, :func:`ssim`)
    PSNR = 10 log10(range^2 / MSE) per image (``inf`` for a perfect copy, reported as the
    finite cap 100 dB); SSIM per image from ``tf.image.ssim`` (11x11 Gaussian window,
    sigma 1.5, smaller for images under 11 pixels).

U-Net 4-class composition (:func:`compose_tumor_subtype`)
    A model with a binary ``tumor`` head and a ``subtype`` head but no ``class`` head is
    read as a 4-class classifier: ``no_tumor`` when p(tumour) < threshold, else the
    subtype argmax; class probabilities p(no_tumor) = 1 - p, p(subtype k) = p * q_k.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())
PSNR_CAP = 100.0


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _div(num, den, zero=0.0):
    """``num / den`` elementwise with ``zero`` where ``den == 0``."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, float(zero))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(a) -> float:
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def summarize(values) -> dict:
    """mean / median / std / min / max / n of the finite values."""
    a = np.asarray(values, np.float64).ravel()
    a = a[np.isfinite(a)]
    if not a.size:
        return {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays -> Python; NaN/inf -> None (valid JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def histogram(values, bins: int = 10, lo: float = 0.0, hi: float = 1.0) -> dict:
    """Counts of finite ``values`` in ``bins`` equal bins of [lo, hi] (last bin closed)."""
    a = np.asarray(values, np.float64).ravel()
    a = a[np.isfinite(a)]
    counts, edges = np.histogram(np.clip(a, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": edges.round(6).tolist(), "counts": counts.astype(int).tolist()}


# ---------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------
def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, np.int64).ravel()
    y_pred = np.asarray(y_pred, np.int64).ravel()
    cm = np.zeros((num_classes, num_classes), np.int64)
    ok = (y_true >= 0) & (y_true < num_classes) & (y_pred >= 0) & (y_pred < num_classes)
    np.add.at(cm, (y_true[ok], y_pred[ok]), 1)
    return cm


def prf_from_confusion(cm: np.ndarray) -> dict:
    """Per-class precision, recall, F1, support and tp/fp/fn arrays from a confusion matrix."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return {"precision": _div(tp, tp + fp), "recall": _div(tp, tp + fn), "f1": _div(2 * tp, 2 * tp + fp + fn),
            "support": cm.sum(axis=1).astype(np.int64), "tp": tp, "fp": fp, "fn": fn}


def averages(prf: Mapping) -> dict:
    """Macro, micro and support-weighted precision / recall / F1."""
    tp, fp, fn = prf["tp"].sum(), prf["fp"].sum(), prf["fn"].sum()
    sup = np.asarray(prf["support"], np.float64)
    out = {"macro": {k: float(np.mean(prf[k])) for k in ("precision", "recall", "f1")}}
    p, r = float(_div(tp, tp + fp)), float(_div(tp, tp + fn))
    out["micro"] = {"precision": p, "recall": r, "f1": float(_div(2 * tp, 2 * tp + fp + fn))}
    out["weighted"] = {k: float(_div(np.sum(prf[k] * sup), sup.sum())) for k in ("precision", "recall", "f1")}
    return out


def roc_auc_binary(y, score) -> float:
    """Area under the ROC curve of binary labels ``y`` and scores (Mann-Whitney U with
    average ranks, so ties count 1/2, as scikit-learn). ``NaN`` when one class is absent."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y, score):
    """``(fpr, tpr, thresholds)`` of binary labels and scores: one point per distinct score
    (descending) plus the origin (threshold ``inf``). Empty arrays when a class is absent."""
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return (np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, s[last]])


def calibration(confidence, correct, n_bins: int = 15) -> dict:
    """Top-label calibration: ECE, MCE and the reliability table (module docstring)."""
    conf = np.asarray(confidence, np.float64).ravel()
    corr = np.asarray(correct, np.float64).ravel()
    n = len(conf)
    idx = np.clip(np.ceil(conf * n_bins - 1e-9).astype(np.int64) - 1, 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        sel = idx == b
        cnt = int(sel.sum())
        row = {"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": cnt, "confidence": None, "accuracy": None}
        if cnt:
            c, a = float(conf[sel].mean()), float(corr[sel].mean())
            row.update(confidence=c, accuracy=a)
            ece += cnt / n * abs(a - c)
            mce = max(mce, abs(a - c))
        bins.append(row)
    return {"ece": float(ece) if n else float("nan"), "mce": float(mce) if n else float("nan"),
            "n_bins": int(n_bins), "kind": "top_label", "bins": bins}


def binary_calibration(y, p, n_bins: int = 15) -> dict:
    """Calibration of a probability of the positive class: per bin, mean p vs the fraction
    of positives (the reliability of a sigmoid output). Same keys as :func:`calibration`."""
    out = calibration(p, np.asarray(y, np.float64), n_bins)
    out["kind"] = "binary"
    return out


def classification_report(y_true, probs, class_names: Sequence[str], y_pred=None, n_bins: int = 15) -> dict:
    """The full single-label report (module docstring). ``y_pred`` overrides the argmax
    (e.g. a threshold rule); the probabilities still drive ROC-AUC and calibration."""
    y_true = np.asarray(y_true, np.int64).ravel()
    probs = np.asarray(probs, np.float64).reshape(len(y_true), -1)
    C = len(class_names)
    if probs.shape[1] != C:
        raise ValueError(f"probs have {probs.shape[1]} columns but there are {C} classes {list(class_names)}")
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred, np.int64).ravel()
    n = len(y_true)
    cm = confusion_matrix(y_true, y_pred, C)
    prf = prf_from_confusion(cm)
    present = prf["support"] > 0
    auc = np.array([roc_auc_binary(y_true == k, probs[:, k]) for k in range(C)])
    conf = probs[np.arange(n), y_pred] if n else np.zeros(0)
    onehot = np.eye(C)[y_true] if n else np.zeros((0, C))
    rep = {
        "n": int(n),
        "classes": list(class_names),
        "accuracy": float(np.mean(y_pred == y_true)) if n else float("nan"),
        "balanced_accuracy": float(np.mean(prf["recall"][present])) if present.any() else float("nan"),
        "per_class": {name: {"precision": float(prf["precision"][k]), "recall": float(prf["recall"][k]),
                             "f1": float(prf["f1"][k]), "support": int(prf["support"][k]),
                             "roc_auc": float(auc[k])} for k, name in enumerate(class_names)},
        **averages(prf),
        "roc_auc": {"per_class": {name: float(auc[k]) for k, name in enumerate(class_names)},
                    "macro": _nanmean(auc)},
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": _div(cm, cm.sum(axis=1, keepdims=True)).round(6).tolist(),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))) if n else float("nan"),
        "calibration": calibration(conf, y_pred == y_true, n_bins),
    }
    if present.any():
        rec = np.where(present, prf["recall"], np.inf)
        k = int(np.argmin(rec))
        rep["worst_class"] = {"name": class_names[k], "recall": float(prf["recall"][k]), "f1": float(prf["f1"][k]),
                              "gap_to_macro_recall": float(prf["recall"][k] - rep["balanced_accuracy"])}
    return rep


def binary_report(y_true, p, threshold: float = 0.5, names: Sequence[str] = ("negative", "positive"),
                  n_bins: int = 15) -> dict:
    """A binary head (sigmoid ``p``) as a 2-class report, predicted positive when
    ``p >= threshold``; calibration of ``p`` itself (:func:`binary_calibration`)."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p, np.float64).ravel()
    rep = classification_report(y, np.stack([1 - p, p], axis=1), names, y_pred=(p >= threshold).astype(np.int64),
                                n_bins=n_bins)
    rep["threshold"] = float(threshold)
    rep["roc_auc"]["macro"] = rep["roc_auc"]["per_class"][names[1]]
    rep["calibration"] = binary_calibration(y, p, n_bins)
    return rep


def multilabel_report(y_true, probs, class_names: Sequence[str], threshold: float = 0.5, n_bins: int = 15) -> dict:
    """A sigmoid-per-class head: per-class binary precision / recall / F1 / support /
    ROC-AUC at ``threshold``, macro / micro / weighted averages, subset accuracy, Hamming
    loss and the class-wise ECE (mean over classes of :func:`binary_calibration`)."""
    y = np.asarray(y_true, np.float64) > 0.5
    probs = np.asarray(probs, np.float64).reshape(y.shape)
    pred = probs >= threshold
    tp = (pred & y).sum(0).astype(np.float64)
    fp = (pred & ~y).sum(0).astype(np.float64)
    fn = (~pred & y).sum(0).astype(np.float64)
    prf = {"precision": _div(tp, tp + fp), "recall": _div(tp, tp + fn), "f1": _div(2 * tp, 2 * tp + fp + fn),
           "support": y.sum(0).astype(np.int64), "tp": tp, "fp": fp, "fn": fn}
    auc = np.array([roc_auc_binary(y[:, k], probs[:, k]) for k in range(y.shape[1])])
    cal = [binary_calibration(y[:, k], probs[:, k], n_bins) for k in range(y.shape[1])]
    n = len(y)
    return {
        "n": int(n), "classes": list(class_names), "threshold": float(threshold),
        "subset_accuracy": float(np.mean(np.all(pred == y, axis=1))) if n else float("nan"),
        "hamming_loss": float(np.mean(pred != y)) if n else float("nan"),
        "per_class": {name: {"precision": float(prf["precision"][k]), "recall": float(prf["recall"][k]),
                             "f1": float(prf["f1"][k]), "support": int(prf["support"][k]), "roc_auc": float(auc[k]),
                             "ece": cal[k]["ece"]} for k, name in enumerate(class_names)},
        **averages(prf),
        "roc_auc": {"per_class": {name: float(auc[k]) for k, name in enumerate(class_names)}, "macro": _nanmean(auc)},
        "calibration": {"ece_classwise": _nanmean([c["ece"] for c in cal])},
    }


def compose_tumor_subtype(p_tumor, subtype_probs, class_names: Sequence[str], tumor_classes: Sequence[str],
                          threshold: float = 0.5, no_tumor: str = "no_tumor"):
    """``(probs [N, C] in class_names order, pred [N])`` of a tumour + subtype model.

    ``no_tumor`` when ``p_tumor < threshold``, else the subtype argmax; probabilities
    ``p(no_tumor) = 1 - p``, ``p(subtype k) = p * q_k`` (rows sum to 1).
    """
    p = np.asarray(p_tumor, np.float64).ravel()
    q = np.asarray(subtype_probs, np.float64).reshape(len(p), -1)
    if q.shape[1] != len(tumor_classes):
        raise ValueError(f"subtype head has {q.shape[1]} outputs but there are {len(tumor_classes)} tumour classes "
                         f"{list(tumor_classes)}")
    if no_tumor not in class_names:
        raise ValueError(f"composing tumour + subtype needs a {no_tumor!r} class; classes are {list(class_names)}")
    idx = {c: i for i, c in enumerate(class_names)}
    probs = np.zeros((len(p), len(class_names)))
    probs[:, idx[no_tumor]] = 1.0 - p
    sub_idx = np.array([idx[c] for c in tumor_classes], np.int64)
    probs[:, sub_idx] = p[:, None] * q
    pred = np.where(p < threshold, idx[no_tumor], sub_idx[q.argmax(axis=1)] if len(p) else 0)
    return probs, pred.astype(np.int64)


# ---------------------------------------------------------------------------------------
# boxes
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


def average_precision(recall, precision) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+): area under the precision envelope."""
    mrec = np.r_[0.0, np.asarray(recall, np.float64), 1.0]
    mpre = np.r_[0.0, np.asarray(precision, np.float64), 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def class_ap(pred_boxes, scores, gt_boxes: Sequence[np.ndarray], iou_threshold: float) -> dict:
    """AP of one class: ``pred_boxes [N, 4]`` (one detection per image), ``scores [N]``,
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


def mean_average_precision(pred_boxes, scores, boxes_all, boxes_all_classes, boxes_all_count,
                           class_names: Sequence[str], thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
    """mAP over classes (module docstring). ``pred_boxes [N, C, 4]``, ``scores [N, C]``.

    Returns ``{"map50", "map50_95", "ap50": {class: AP}, "ap": {class: {thr: AP}},
    "map_by_threshold": {thr: mAP}, "classes_with_boxes": [...]}``.
    """
    pred_boxes = np.asarray(pred_boxes, np.float64)
    N, C = pred_boxes.shape[:2]
    scores = np.ones((N, C)) if scores is None else np.asarray(scores, np.float64).reshape(N, C)
    gts = gt_boxes_by_class(boxes_all, boxes_all_classes, boxes_all_count, C)
    ap = {name: {} for name in class_names}
    with_boxes = [k for k in range(C) if sum(len(g) for g in gts[k])]
    by_thr = {}
    for t in thresholds:
        vals = []
        for k in range(C):
            a = class_ap(pred_boxes[:, k], scores[:, k], gts[k], t)["ap"] if k in with_boxes else float("nan")
            ap[class_names[k]][f"{t:.2f}"] = a
            if k in with_boxes:
                vals.append(a)
        by_thr[f"{t:.2f}"] = float(np.mean(vals)) if vals else float("nan")
    finite = [v for v in by_thr.values() if np.isfinite(v)]
    return {"map50": by_thr.get("0.50", float("nan")),
            "map50_95": float(np.mean(finite)) if finite and len(finite) == len(by_thr) else float("nan"),
            "ap50": {name: ap[name].get("0.50", float("nan")) for name in class_names},
            "ap": ap, "map_by_threshold": by_thr,
            "classes_with_boxes": [class_names[k] for k in with_boxes],
            "n_gt": {class_names[k]: int(sum(len(g) for g in gts[k])) for k in range(C)}}


def slot_ious(pred_boxes, true_boxes, slot_weights) -> np.ndarray:
    """``[N, C]`` IoU of every slot with a known true box (``NaN`` elsewhere)."""
    iou = box_iou_np(pred_boxes, true_boxes)
    return np.where(np.asarray(slot_weights) > 0, iou, np.nan)


def box_report(pred_boxes, true_boxes, slot_weights, class_names: Sequence[str], boxes_all=None,
               boxes_all_classes=None, boxes_all_count=None, scores=None, known=None, bins: int = 10) -> dict:
    """Per-slot IoU statistics and (with ``boxes_all*``) mAP; ``known [N]`` selects the
    images whose boxes are known (the mAP's image set; default all)."""
    pred_boxes = np.asarray(pred_boxes, np.float64)
    N = len(pred_boxes)
    ious = slot_ious(pred_boxes, true_boxes, slot_weights)
    flat = ious[np.isfinite(ious)]
    rep = {
        "n_boxes": int(flat.size),
        "mean_iou": float(flat.mean()) if flat.size else float("nan"),
        "median_iou": float(np.median(flat)) if flat.size else float("nan"),
        "iou_ge_0.5": float(np.mean(flat >= 0.5)) if flat.size else float("nan"),
        "iou_ge_0.75": float(np.mean(flat >= 0.75)) if flat.size else float("nan"),
        "iou_histogram": histogram(flat, bins),
        "per_class": {name: {"mean_iou": _nanmean(ious[:, k]), "n": int(np.isfinite(ious[:, k]).sum())}
                      for k, name in enumerate(class_names)},
    }
    if boxes_all is not None:
        sel = np.ones(N, bool) if known is None else np.asarray(known, bool).ravel()
        m = mean_average_precision(pred_boxes[sel], None if scores is None else np.asarray(scores)[sel],
                                   np.asarray(boxes_all)[sel], np.asarray(boxes_all_classes)[sel],
                                   np.asarray(boxes_all_count)[sel], class_names)
        m["n_images"] = int(sel.sum())
        m["confidence"] = "class probability" if scores is not None else "none (1 for every detection)"
        rep.update(map50=m.pop("map50"), map50_95=m.pop("map50_95"), detection=m)
    return rep


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def dice_iou(pred, true) -> tuple[float, float]:
    """Foreground Dice and IoU of two binary masks (both empty: 1, 1)."""
    a = np.asarray(pred, bool)
    b = np.asarray(true, bool)
    inter = float(np.logical_and(a, b).sum())
    sa, sb = float(a.sum()), float(b.sum())
    if sa + sb == 0:
        return 1.0, 1.0
    return 2 * inter / (sa + sb), inter / (sa + sb - inter)


def _surface(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1))


def hd95(pred, true, percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels (module docstring):
    0 when both masks are empty, ``NaN`` when exactly one is."""
    from scipy import ndimage

    a = np.asarray(pred, bool)
    b = np.asarray(true, bool)
    ea, eb = a.any(), b.any()
    if not ea and not eb:
        return 0.0
    if ea != eb:
        return float("nan")
    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb)
    dist_to_a = ndimage.distance_transform_edt(~sa)
    return float(max(np.percentile(dist_to_b[sa], percentile), np.percentile(dist_to_a[sb], percentile)))


def mask_scores(pred, true) -> dict:
    """Per-image ``dice``, ``iou``, ``hd95``, ``pred_area``, ``true_area`` (pixels) of
    binary masks ``[N, H, W]`` (or ``[N, H, W, 1]``)."""
    pred = np.asarray(pred, bool)
    true = np.asarray(true, bool)
    if pred.ndim == 4:
        pred, true = pred[..., 0], true[..., 0]
    out = {k: np.zeros(len(pred)) for k in ("dice", "iou", "hd95", "pred_area", "true_area")}
    for i in range(len(pred)):
        out["dice"][i], out["iou"][i] = dice_iou(pred[i], true[i])
        out["hd95"][i] = hd95(pred[i], true[i])
        out["pred_area"][i], out["true_area"][i] = pred[i].sum(), true[i].sum()
    return out


def mask_report(scores: Mapping, image_shape: Sequence[int], threshold: float = 0.5, bins: int = 10,
                pooled: Optional[Mapping] = None) -> dict:
    """Summary of per-image :func:`mask_scores` (module docstring); ``pooled`` =
    ``{"inter", "pred", "true"}`` pixel sums for the global Dice."""
    dice = np.asarray(scores["dice"], np.float64)
    iou = np.asarray(scores["iou"], np.float64)
    h = np.asarray(scores["hd95"], np.float64)
    tumor = np.asarray(scores["true_area"]) > 0
    undefined = ~np.isfinite(h)
    diag = float(math.hypot(*image_shape[:2]))
    rep = {
        "n": int(len(dice)), "n_tumor": int(tumor.sum()), "threshold": float(threshold),
        "dice_mean": _nanmean(dice), "iou_mean": _nanmean(iou),
        "dice_mean_tumor_only": _nanmean(dice[tumor]), "iou_mean_tumor_only": _nanmean(iou[tumor]),
        "dice": summarize(dice), "iou": summarize(iou),
        "hd95_mean": _nanmean(h),
        "hd95_median": float(np.median(h[~undefined])) if (~undefined).any() else float("nan"),
        "hd95_undefined": int(undefined.sum()),
        "hd95_mean_penalised": _nanmean(np.where(undefined, diag, h)) if len(h) else float("nan"),
        "hd95_penalty": diag,
        "dice_histogram": histogram(dice, bins),
        "empty_prediction_on_tumor": int((tumor & (np.asarray(scores["pred_area"]) == 0)).sum()),
        "false_positive_on_healthy": int((~tumor & (np.asarray(scores["pred_area"]) > 0)).sum()),
    }
    if pooled is not None:
        den = float(pooled["pred"]) + float(pooled["true"])
        rep["dice_global"] = 2 * float(pooled["inter"]) / den if den else 1.0
    return rep


# ---------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------
def psnr(pred, true, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB of ``[N, H, W, C]`` images (capped at :data:`PSNR_CAP`)."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    mse = ((pred - true) ** 2).reshape(len(true), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        val = 10.0 * np.log10(float(data_range) ** 2 / mse)
    return np.minimum(val, PSNR_CAP)


def ssim(pred, true, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM of ``[N, H, W, C]`` images via ``tf.image.ssim``."""
    import tensorflow as tf

    pred = np.asarray(pred, np.float32)
    true = np.asarray(true, np.float32)
    size = int(min(11, true.shape[1], true.shape[2]))
    sigma = 1.5 * size / 11.0
    return tf.image.ssim(tf.constant(pred), tf.constant(true), max_val=float(data_range), filter_size=size,
                         filter_sigma=sigma).numpy().astype(np.float64)


def recon_report(psnr_values, ssim_values, data_range: float = 1.0) -> dict:
    return {"n": int(len(np.asarray(psnr_values))), "data_range": float(data_range),
            "psnr_mean": _nanmean(psnr_values), "ssim_mean": _nanmean(ssim_values),
            "psnr": summarize(psnr_values), "ssim": summarize(ssim_values)}


__all__ = ["classification_report", "binary_report", "multilabel_report", "calibration", "binary_calibration",
           "confusion_matrix", "roc_auc_binary", "roc_curve", "compose_tumor_subtype", "box_iou_np",
           "average_precision", "class_ap", "mean_average_precision", "box_report", "slot_ious", "dice_iou",
           "hd95", "mask_scores", "mask_report", "psnr", "ssim", "recon_report", "to_jsonable", "summarize",
           "histogram", "IOU_THRESHOLDS"]
