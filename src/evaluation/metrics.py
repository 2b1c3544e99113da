"""Evaluation metrics: classification from scikit-learn, masks and calibration in numpy /
scipy, reconstruction from ``tf.image``; boxes and COCO mAP live in
:mod:`src.evaluation.detection`.

Every function takes arrays of *known* targets only: the caller drops samples whose
sample weight is 0 (an unknown target is never a negative). Undefined values are ``NaN``
in arrays and ``null`` in JSON (:func:`to_jsonable`). Every report carries an
``implementations`` block (metric -> library and convention) that ``metrics.json`` and
``report.html`` show, so a number can be compared with the literature.

Classification (:func:`classification_report`), scikit-learn
    ``y_true`` int ``[N]``, ``probs`` ``[N, C]``. ``sklearn.metrics``: ``confusion_matrix``
    (rows = true, columns = predicted; also row-normalised), ``accuracy_score``,
    ``balanced_accuracy_score`` (mean recall over the classes present in ``y_true``),
    ``precision_recall_fscore_support``, ``roc_auc_score`` / ``roc_curve`` one-vs-rest per
    class, ``brier_score_loss`` (multiclass: mean over images of the sum over classes of
    the squared error, range [0, 2]; binary heads: the usual [0, 1] score of p(positive)).
    *Absent classes* (no image of the class in ``y_true``, e.g. ``no_tumor`` on figshare,
    which has no healthy slices): recall, F1 and ROC-AUC are undefined (``NaN``/``null``,
    never 0); precision is 0 when the class is predicted (those predictions are false
    positives; they also lower the recall of the true classes) and ``NaN`` when it is
    not. A present class that is never predicted has precision 0 (``zero_division=0``).
    *Averages*: macro and support-weighted over the classes present in ``y_true``
    (scikit-learn's ``labels=present``); micro over all classes (= accuracy for a
    single-label head); ROC-AUC macro = the mean over the classes with positives and
    negatives. ``worst_class`` names the present class with the lowest recall and its
    gap to the macro recall (the "glioma gap").

Calibration (:func:`calibration`), ours (scikit-learn has no ECE)
    Confidence = the top-label probability, outcome = the prediction is correct.
    ``n_bins`` equal-width bins over [0, 1]; bin ``b`` holds confidences in
    ``(b/n, (b+1)/n]`` (0 falls into the first bin). ECE = sum over bins of
    ``count_b / N * |accuracy_b - confidence_b|`` (Guo et al. 2017); MCE = the largest
    per-bin gap over non-empty bins. The per-bin table is the reliability diagram's data.

Masks (:func:`mask_scores`, :func:`mask_report`), ours
    Foreground only, per image, on binary masks (the caller thresholds probabilities).
    Dice = 2|A and B| / (|A| + |B|), IoU = |A and B| / |A or B|; both empty: Dice = IoU = 1.
    HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the surface of a
    mask is its pixels that an erosion with the 4-connected cross removes (pixels on the
    image border stay surface); HD95 = max(95th percentile of the distances from A's
    surface pixels to B's surface, the same from B to A), Euclidean, from
    ``scipy.ndimage.distance_transform_edt``; in pixels, or in mm with ``spacing`` (mm per
    pixel, rows then columns). Checked against a brute-force ``cdist`` over the surface
    point sets in the tests (MONAI is not a dependency). *Empty masks* (where MONAI gives
    NaN or inf): both empty -> 0; exactly one empty -> undefined (``NaN``), left out of
    ``hd95_mean`` and counted in ``hd95_undefined``; ``hd95_mean_penalised`` counts those
    images as the image diagonal instead. Means over all images with a known mask and,
    separately, over images whose true mask is not empty (``*_tumor_only``: healthy
    images with an empty prediction score 1 and would flatter the mean), plus the pooled
    (global) Dice over all pixels. Mask mAP (COCO ``segm``) is in
    :mod:`src.evaluation.detection`.

Reconstruction (:func:`psnr`, :func:`ssim`), ``tf.image``
    PSNR from ``tf.image.psnr`` per image (a perfect copy, ``inf``, is capped at
    :data:`PSNR_CAP` dB); SSIM from ``tf.image.ssim`` (11x11 Gaussian window, sigma 1.5,
    smaller for images under 11 pixels).

U-Net 4-class composition (:func:`compose_tumor_subtype`), ours
    A model with a binary ``tumor`` head and a ``subtype`` head but no ``class`` head is
    read as a 4-class classifier: ``no_tumor`` when p(tumour) < threshold, else the
    subtype argmax; class probabilities p(no_tumor) = 1 - p, p(subtype k) = p * q_k.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

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


def version(package: str) -> str:
    """Installed version of ``package`` (distribution name), or ``"?"``."""
    from importlib.metadata import PackageNotFoundError, version as _v

    try:
        return _v(package)
    except PackageNotFoundError:
        return "?"


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
# classification (scikit-learn)
# ---------------------------------------------------------------------------------------
def _sk(kind: str = "") -> str:
    return f"scikit-learn {version('scikit-learn')} sklearn.metrics.{kind}"


def classification_implementations(n_bins: int, binary: bool = False) -> dict:
    """The ``implementations`` block of a classification report (metric -> convention)."""
    return {
        "accuracy": _sk("accuracy_score"),
        "balanced_accuracy": _sk("balanced_accuracy_score") + " (mean recall over the classes present in y_true)",
        "precision/recall/f1": _sk("precision_recall_fscore_support") + " per class, zero_division=0; a class "
                               "absent from y_true: recall and F1 null, precision 0 if predicted else null",
        "macro/weighted": _sk("precision_recall_fscore_support") + " (labels = the classes present in y_true)",
        "micro": _sk("precision_recall_fscore_support") + " (labels = all classes; = accuracy for single-label)",
        "confusion_matrix": _sk("confusion_matrix") + " (rows true, columns predicted)",
        "roc_auc": _sk("roc_auc_score") + " one-vs-rest per class (null without positives or negatives); macro = "
                   "mean over the defined classes",
        "brier": _sk("brier_score_loss") + (" of p(positive), range [0, 1]" if binary else
                                            " multiclass, sum over classes, range [0, 2]"),
        "ece": f"ours: {'binary reliability' if binary else 'top-label'}, {n_bins} equal-width bins "
               "(Guo et al. 2017)",
    }


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class (scikit-learn)."""
    from sklearn.metrics import confusion_matrix as _cm

    y_true = np.asarray(y_true, np.int64).ravel()
    y_pred = np.asarray(y_pred, np.int64).ravel()
    if not len(y_true):
        return np.zeros((num_classes, num_classes), np.int64)
    return _cm(y_true, y_pred, labels=np.arange(num_classes)).astype(np.int64)


def prf(y_true, y_pred, num_classes: int, multilabel: bool = False) -> dict:
    """Per-class precision / recall / F1 / support (module docstring's absent-class
    convention) and macro / weighted (present classes) / micro (all classes) averages,
    from ``sklearn.metrics.precision_recall_fscore_support``. ``multilabel``: indicator
    arrays ``[N, C]``."""
    from sklearn.metrics import precision_recall_fscore_support as sk_prfs

    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if multilabel:
        support = yt.sum(axis=0).astype(np.int64)
        predicted = yp.sum(axis=0) > 0
    else:
        support = np.bincount(yt.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
        predicted = np.bincount(yp.ravel(), minlength=num_classes)[:num_classes] > 0
    present = np.flatnonzero(support > 0)
    out = {"precision": np.where(predicted, 0.0, np.nan), "recall": np.full(num_classes, np.nan),
           "f1": np.full(num_classes, np.nan), "support": support, "present": present}
    nan3 = {k: float("nan") for k in ("precision", "recall", "f1")}
    out["macro"], out["weighted"], out["micro"] = dict(nan3), dict(nan3), dict(nan3)
    if not len(yt):
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": the documented case
        if len(present):
            p, r, f, _ = sk_prfs(yt, yp, labels=present, zero_division=0)
            out["precision"][present], out["recall"][present], out["f1"][present] = p, r, f
            for avg in ("macro", "weighted"):
                vals = sk_prfs(yt, yp, labels=present, average=avg, zero_division=0)[:3]
                out[avg] = dict(zip(("precision", "recall", "f1"), map(float, vals)))
        vals = sk_prfs(yt, yp, labels=np.arange(num_classes), average="micro", zero_division=0)[:3]
        out["micro"] = dict(zip(("precision", "recall", "f1"), map(float, vals)))
    return out


def roc_auc_binary(y, score) -> float:
    """``sklearn.metrics.roc_auc_score`` of binary labels and scores; ``NaN`` when one
    class is absent."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_curve(y, score):
    """``(fpr, tpr, thresholds)`` from ``sklearn.metrics.roc_curve(drop_intermediate=False)``:
    one point per distinct score plus the origin (threshold ``inf``); empty arrays when a
    class is absent."""
    from sklearn.metrics import roc_curve as _roc

    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    if y.all() or not y.any():
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return _roc(y, s, drop_intermediate=False)


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


def brier(y_true, probs) -> float:
    """Multiclass Brier score (``sklearn.metrics.brier_score_loss``, range [0, 2])."""
    from sklearn.metrics import brier_score_loss

    if not len(y_true):
        return float("nan")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*do not sum to one.*")  # float32 softmax round-off
        return float(brier_score_loss(y_true, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


def classification_report(y_true, probs, class_names: Sequence[str], y_pred=None, n_bins: int = 15) -> dict:
    """The full single-label report (module docstring). ``y_pred`` overrides the argmax
    (e.g. a threshold rule); the probabilities still drive ROC-AUC, Brier and calibration."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    y_true = np.asarray(y_true, np.int64).ravel()
    probs = np.asarray(probs, np.float64).reshape(len(y_true), -1)
    C = len(class_names)
    if probs.shape[1] != C:
        raise ValueError(f"probs have {probs.shape[1]} columns but there are {C} classes {list(class_names)}")
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred, np.int64).ravel()
    n = len(y_true)
    cm = confusion_matrix(y_true, y_pred, C)
    m = prf(y_true, y_pred, C)
    auc = np.array([roc_auc_binary(y_true == k, probs[:, k]) for k in range(C)])
    conf = probs[np.arange(n), y_pred] if n else np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": the documented case
        bacc = float(balanced_accuracy_score(y_true, y_pred)) if n else float("nan")
    rep = {
        "n": int(n),
        "classes": list(class_names),
        "accuracy": float(accuracy_score(y_true, y_pred)) if n else float("nan"),
        "balanced_accuracy": bacc,
        "per_class": {name: {"precision": float(m["precision"][k]), "recall": float(m["recall"][k]),
                             "f1": float(m["f1"][k]), "support": int(m["support"][k]),
                             "roc_auc": float(auc[k])} for k, name in enumerate(class_names)},
        "macro": m["macro"], "micro": m["micro"], "weighted": m["weighted"],
        "classes_present": [class_names[k] for k in m["present"]],
        "roc_auc": {"per_class": {name: float(auc[k]) for k, name in enumerate(class_names)},
                    "macro": _nanmean(auc)},
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": _div(cm, cm.sum(axis=1, keepdims=True)).round(6).tolist(),
        "brier": brier(y_true, probs),
        "calibration": calibration(conf, y_pred == y_true, n_bins),
        "implementations": classification_implementations(n_bins),
    }
    if len(m["present"]):
        k = int(m["present"][np.argmin(m["recall"][m["present"]])])
        rep["worst_class"] = {"name": class_names[k], "recall": float(m["recall"][k]), "f1": float(m["f1"][k]),
                              "gap_to_macro_recall": float(m["recall"][k] - m["macro"]["recall"])}
    return rep


def binary_report(y_true, p, threshold: float = 0.5, names: Sequence[str] = ("negative", "positive"),
                  n_bins: int = 15) -> dict:
    """A binary head (sigmoid ``p``) as a 2-class report, predicted positive when
    ``p >= threshold``; Brier score and calibration of ``p`` itself."""
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p, np.float64).ravel()
    rep = classification_report(y, np.stack([1 - p, p], axis=1), names, y_pred=(p >= threshold).astype(np.int64),
                                n_bins=n_bins)
    rep["threshold"] = float(threshold)
    rep["roc_auc"]["macro"] = rep["roc_auc"]["per_class"][names[1]]
    rep["brier"] = float(brier_score_loss(y, p, pos_label=1)) if len(y) else float("nan")
    rep["calibration"] = binary_calibration(y, p, n_bins)
    rep["implementations"] = classification_implementations(n_bins, binary=True)
    rep["implementations"]["roc_auc"] = _sk("roc_auc_score") + " of p(positive); macro = the positive class's"
    return rep


def multilabel_report(y_true, probs, class_names: Sequence[str], threshold: float = 0.5, n_bins: int = 15) -> dict:
    """A sigmoid-per-class head: per-class binary precision / recall / F1 / support /
    ROC-AUC at ``threshold`` (scikit-learn on indicator arrays; a class without positives
    follows the absent-class convention), macro / weighted over the classes with
    positives, micro over all, subset accuracy, Hamming loss and the class-wise ECE (mean
    over classes of :func:`binary_calibration`)."""
    from sklearn.metrics import accuracy_score, hamming_loss

    y = (np.asarray(y_true, np.float64) > 0.5).astype(np.int64)
    probs = np.asarray(probs, np.float64).reshape(y.shape)
    pred = (probs >= threshold).astype(np.int64)
    C = y.shape[1]
    m = prf(y, pred, C, multilabel=True)
    auc = np.array([roc_auc_binary(y[:, k], probs[:, k]) for k in range(C)])
    cal = [binary_calibration(y[:, k], probs[:, k], n_bins) for k in range(C)]
    n = len(y)
    impl = classification_implementations(n_bins, binary=True)
    impl.update(subset_accuracy=_sk("accuracy_score") + " (exact match)", hamming_loss=_sk("hamming_loss"),
                ece=f"ours: binary reliability per class, {n_bins} equal-width bins, mean over classes")
    for k in ("balanced_accuracy", "accuracy", "confusion_matrix", "brier"):
        impl.pop(k)
    return {
        "n": int(n), "classes": list(class_names), "threshold": float(threshold),
        "subset_accuracy": float(accuracy_score(y, pred)) if n else float("nan"),
        "hamming_loss": float(hamming_loss(y, pred)) if n else float("nan"),
        "per_class": {name: {"precision": float(m["precision"][k]), "recall": float(m["recall"][k]),
                             "f1": float(m["f1"][k]), "support": int(m["support"][k]), "roc_auc": float(auc[k]),
                             "ece": cal[k]["ece"]} for k, name in enumerate(class_names)},
        "macro": m["macro"], "micro": m["micro"], "weighted": m["weighted"],
        "classes_present": [class_names[k] for k in m["present"]],
        "roc_auc": {"per_class": {name: float(auc[k]) for k, name in enumerate(class_names)}, "macro": _nanmean(auc)},
        "calibration": {"ece_classwise": _nanmean([c["ece"] for c in cal])},
        "implementations": impl,
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
# masks
# ---------------------------------------------------------------------------------------
def dice_iou(pred, true) -> tuple[float, float]:
    """Foreground Dice and IoU of two binary masks of one shape (both empty: 1, 1).

    The one numpy Dice of the library (Grad-CAM pseudo-masks use it too); the graph one
    is :func:`src.losses.segmentation.soft_dice`.
    """
    a = np.asarray(pred, bool)
    b = np.asarray(true, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    inter = float(np.logical_and(a, b).sum())
    sa, sb = float(a.sum()), float(b.sum())
    if sa + sb == 0:
        return 1.0, 1.0
    return 2 * inter / (sa + sb), inter / (sa + sb - inter)


def surface(m: np.ndarray) -> np.ndarray:
    """The pixels of a binary mask that an erosion with the 4-connected cross removes."""
    from scipy import ndimage

    m = np.asarray(m, bool)
    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1))


def hd95(pred, true, percentile: float = 95.0, spacing: Optional[Sequence[float]] = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance (module docstring) in pixels, or in mm
    with ``spacing`` (mm per pixel along each axis): 0 when both masks are empty, ``NaN``
    when exactly one is."""
    from scipy import ndimage

    a = np.asarray(pred, bool)
    b = np.asarray(true, bool)
    ea, eb = a.any(), b.any()
    if not ea and not eb:
        return 0.0
    if ea != eb:
        return float("nan")
    sa, sb = surface(a), surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return float(max(np.percentile(dist_to_b[sa], percentile), np.percentile(dist_to_a[sb], percentile)))


def mask_scores(pred, true, spacing: Optional[Sequence[float]] = None) -> dict:
    """Per-image ``dice``, ``iou``, ``hd95`` (pixels, or mm with ``spacing``),
    ``pred_area``, ``true_area`` (pixels) of binary masks ``[N, H, W]`` (or ``[N, H, W, 1]``)."""
    pred = np.asarray(pred, bool)
    true = np.asarray(true, bool)
    if pred.ndim == 4:
        pred, true = pred[..., 0], true[..., 0]
    out = {k: np.zeros(len(pred)) for k in ("dice", "iou", "hd95", "pred_area", "true_area")}
    for i in range(len(pred)):
        out["dice"][i], out["iou"][i] = dice_iou(pred[i], true[i])
        out["hd95"][i] = hd95(pred[i], true[i], spacing=spacing)
        out["pred_area"][i], out["true_area"][i] = pred[i].sum(), true[i].sum()
    return out


def mask_implementations(unit: str = "px") -> dict:
    return {
        "dice/iou": "ours (numpy): foreground, per image; both masks empty -> 1",
        "dice_global": "ours: pooled over all pixels of all images",
        "hd95": f"ours (scipy distance_transform_edt), MONAI compute_hausdorff_distance(percentile=95) definition: "
                f"symmetric, 4-connected surface, {unit}; both empty -> 0, one empty -> null (not in hd95_mean; "
                "image diagonal in hd95_mean_penalised)",
    }


def mask_report(scores: Mapping, image_shape: Sequence[int], threshold: float = 0.5, bins: int = 10,
                pooled: Optional[Mapping] = None, spacing: Optional[Sequence[float]] = None) -> dict:
    """Summary of per-image :func:`mask_scores` (module docstring); ``pooled`` =
    ``{"inter", "pred", "true"}`` pixel sums for the global Dice; ``spacing``: the mm per
    pixel the HD95 values were computed with (None: pixels)."""
    dice = np.asarray(scores["dice"], np.float64)
    iou = np.asarray(scores["iou"], np.float64)
    h = np.asarray(scores["hd95"], np.float64)
    tumor = np.asarray(scores["true_area"]) > 0
    undefined = ~np.isfinite(h)
    sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[-1]))
    diag = float(math.hypot(image_shape[0] * sy, image_shape[1] * sx))
    unit = "px" if spacing is None else "mm"
    rep = {
        "n": int(len(dice)), "n_tumor": int(tumor.sum()), "threshold": float(threshold),
        "dice_mean": _nanmean(dice), "iou_mean": _nanmean(iou),
        "dice_mean_tumor_only": _nanmean(dice[tumor]), "iou_mean_tumor_only": _nanmean(iou[tumor]),
        "dice": summarize(dice), "iou": summarize(iou),
        "hd95_unit": unit,
        "hd95_mean": _nanmean(h),
        "hd95_median": float(np.median(h[~undefined])) if (~undefined).any() else float("nan"),
        "hd95_undefined": int(undefined.sum()),
        "hd95_mean_penalised": _nanmean(np.where(undefined, diag, h)) if len(h) else float("nan"),
        "hd95_penalty": diag,
        "dice_histogram": histogram(dice, bins),
        "empty_prediction_on_tumor": int((tumor & (np.asarray(scores["pred_area"]) == 0)).sum()),
        "false_positive_on_healthy": int((~tumor & (np.asarray(scores["pred_area"]) > 0)).sum()),
        "implementations": mask_implementations(unit),
    }
    if pooled is not None:
        den = float(pooled["pred"]) + float(pooled["true"])
        rep["dice_global"] = 2 * float(pooled["inter"]) / den if den else 1.0
    return rep


# ---------------------------------------------------------------------------------------
# reconstruction (tf.image)
# ---------------------------------------------------------------------------------------
def psnr(pred, true, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB of ``[N, H, W, C]`` images from ``tf.image.psnr`` (capped at
    :data:`PSNR_CAP`)."""
    import tensorflow as tf

    pred = np.asarray(pred, np.float32)
    true = np.asarray(true, np.float32)
    val = tf.image.psnr(tf.constant(pred), tf.constant(true), max_val=float(data_range)).numpy()
    return np.minimum(np.asarray(val, np.float64).reshape(len(true)), PSNR_CAP)


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
    tfv = version("tensorflow")
    return {"n": int(len(np.asarray(psnr_values))), "data_range": float(data_range),
            "psnr_mean": _nanmean(psnr_values), "ssim_mean": _nanmean(ssim_values),
            "psnr": summarize(psnr_values), "ssim": summarize(ssim_values),
            "implementations": {"psnr": f"tf.image.psnr (TensorFlow {tfv}), per image, capped at {PSNR_CAP:g} dB",
                                "ssim": f"tf.image.ssim (TensorFlow {tfv}), 11x11 Gaussian window, sigma 1.5, "
                                        "per image"}}


_MOVED = ("box_iou_np", "slot_ious", "average_precision", "class_ap", "gt_boxes_by_class", "box_report",
          "IOU_THRESHOLDS")


def __getattr__(name: str):
    """Box functions moved to :mod:`src.evaluation.detection` stay importable from here."""
    if name in _MOVED:
        from . import detection

        return getattr(detection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["classification_report", "binary_report", "multilabel_report", "calibration", "binary_calibration",
           "confusion_matrix", "prf", "brier", "roc_auc_binary", "roc_curve", "compose_tumor_subtype", "dice_iou",
           "surface", "hd95", "mask_scores", "mask_report", "psnr", "ssim", "recon_report", "to_jsonable",
           "summarize", "histogram", "version"]
