"""Metrics of a split from the arrays a :class:`~src.evaluation.collect.Collector` gathered.

* :func:`compute_metrics` -- one report per head (``{"heads": {...}, "notes": [...]}``):
  one loop over :data:`HEAD_REPORTS`, a table of ``(head, is it there, its report, why
  it may not be evaluated)``; each report comes from :mod:`src.evaluation.metrics` or
  :mod:`src.evaluation.detection`.
* :func:`headline` -- the flat scalars of MLflow and the console (a table per head too).
* :func:`prediction_rows` / :func:`write_csv` -- ``predictions.csv``, one row per image.
* :func:`class_scores` -- the 4-class reading of a model (its ``class`` head, or
  ``tumor`` + ``subtype`` composed, or ``multilabel``), shared by all of the above and
  the plots.
* :func:`subset` / :func:`per_source` -- the same reports for each source of a mix
  (``metrics.json`` ``sources``), from one pass over the split.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..data.records import NO_TUMOR
from ..heads import RECON_HEADS


def known(col: Mapping, key: str) -> np.ndarray:
    """``[N]`` images whose ``key`` target is known (sample weight > 0)."""
    w = col["w"].get(key)
    if w is None:
        return np.zeros(col["n"], bool)
    w = np.asarray(w)
    return (w.reshape(len(w), -1) > 0).any(axis=1)


def class_scores(col: Mapping, class_map, threshold: float) -> tuple[Optional[np.ndarray], Optional[np.ndarray], list]:
    """``(probs [N, C], pred [N], source heads)`` of the 4-class reading of the model:
    its ``class`` head, or ``tumor`` + ``subtype`` composed (the threshold rule decides
    the prediction whenever both exist), or the ``multilabel`` head (argmax)."""
    from .metrics import compose_tumor_subtype

    pred = col["pred"]
    classes, tumor_classes = list(class_map.classes), list(class_map.tumor_classes)
    composable = "tumor" in pred and "subtype" in pred and NO_TUMOR in classes
    if composable:
        probs, hard = compose_tumor_subtype(pred["tumor"], pred["subtype"], classes, tumor_classes, threshold)
        if "class" in pred:
            probs = pred["class"]
        return probs, hard, ["tumor", "subtype"]
    if "class" in pred:
        return pred["class"], pred["class"].argmax(axis=1), ["class"]
    if "multilabel" in pred:
        return pred["multilabel"], pred["multilabel"].argmax(axis=1), ["multilabel"]
    return None, None, []


# ---------------------------------------------------------------------------------------
# per-head reports
# ---------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    """What every head's report may need besides the arrays."""

    classes: list
    tumor_classes: list
    threshold: float
    n_bins: int
    boxes_known: Optional[np.ndarray]
    probs: Optional[np.ndarray]
    hard: Optional[np.ndarray]
    source: list
    notes: list = field(default_factory=list)


def _class_report(col, c: _Ctx) -> Optional[dict]:
    from .metrics import classification_report

    sel = known(col, "class")
    if not sel.any():
        return None
    rep = classification_report(col["y"]["class"][sel], c.probs[sel], c.classes, y_pred=c.hard[sel], n_bins=c.n_bins)
    if c.source == ["tumor", "subtype"]:
        rep["composed_from"] = c.source
        rep["threshold"] = float(c.threshold)
    return rep


def _multilabel_report(col, c: _Ctx) -> Optional[dict]:
    from .metrics import multilabel_report

    sel = known(col, "multilabel")
    return multilabel_report(col["y"]["multilabel"][sel], col["pred"]["multilabel"][sel], c.classes,
                             threshold=c.threshold, n_bins=c.n_bins) if sel.any() else None


def _tumor_report(col, c: _Ctx) -> Optional[dict]:
    from .metrics import binary_report

    sel = known(col, "tumor")
    return binary_report(col["y"]["tumor"][sel], col["pred"]["tumor"][sel], c.threshold, names=(NO_TUMOR, "tumor"),
                         n_bins=c.n_bins) if sel.any() else None


def _tumor_from_class_report(col, c: _Ctx) -> Optional[dict]:
    """Tumour vs healthy read off the 4-class head (p(tumour) = 1 - p(no_tumor)) on every image
    whose tumour status is known: evaluated only where some image's class is *not* known
    but its tumour status is (a generic ``tumor`` label, e.g. Br35H), the one figure those
    images have."""
    from .metrics import binary_report

    sel = known(col, "tumor")
    if not sel.any() or NO_TUMOR not in c.classes:
        return None
    p_tumor = 1.0 - c.probs[sel, c.classes.index(NO_TUMOR)]
    rep = binary_report(col["y"]["tumor"][sel], p_tumor, c.threshold, names=(NO_TUMOR, "tumor"), n_bins=c.n_bins)
    rep["note"] = "p(tumour) = 1 - p(no_tumor) of the class head; every image with a known tumour status"
    return rep


def _generic_tumors(col, c: _Ctx) -> bool:
    """A class head without a tumour head, and images with a known tumour status but no known class."""
    return (c.source == ["class"] and "tumor" not in col["pred"] and "tumor" in col["y"]
            and bool((known(col, "tumor") & ~known(col, "class")).any()))


def _subtype_report(col, c: _Ctx) -> Optional[dict]:
    from .metrics import classification_report

    sel = known(col, "subtype")
    if not sel.any():
        return None
    rep = classification_report(col["y"]["subtype"][sel], col["pred"]["subtype"][sel], c.tumor_classes,
                                n_bins=c.n_bins)
    rep["note"] = "tumour images with a known subtype only"
    return rep


def _boxes_known(col, c: _Ctx) -> np.ndarray:
    if c.boxes_known is not None:
        return np.asarray(c.boxes_known, bool)
    return (np.asarray(col["w"]["boxes"]) > 0).any(axis=1)


def _boxes_report(col, c: _Ctx) -> Optional[dict]:
    from .detection import box_report

    pred, y = col["pred"], col["y"]
    if not (np.asarray(col["w"]["boxes"]) > 0).any():
        return None
    bk = _boxes_known(col, c)
    rep = box_report(pred["boxes"], y["boxes"], col["w"]["boxes"], c.classes, boxes_all=y.get("boxes_all"),
                     boxes_all_classes=y.get("boxes_all_classes"), boxes_all_count=y.get("boxes_all_count"),
                     scores=c.probs, known=bk, image_size=col.get("image_shape"))
    if "boxes_from_mask" in pred:
        # no box head: the boxes were read off the predicted masks (Collector(boxes_from_mask=...))
        comps = np.asarray(pred["boxes_from_mask"])
        rep.update(source="mask", images_without_box=int((comps[bk] == 0).sum()),
                   note="boxes read off the predicted mask (no box head): every class slot holds the "
                        "mask's box, an empty mask a zero box (IoU 0); detection confidence = the "
                        "image's class probability")
    return rep


def _generic_boxes(col, c: _Ctx) -> bool:
    """Predicted boxes, and known boxes of a class the slots do not have (a generic tumour)."""
    y = col["y"]
    if "boxes" not in col["pred"] or "boxes_all_classes" not in y:
        return False
    bc, cnt = np.asarray(y["boxes_all_classes"]), np.asarray(y["boxes_all_count"]).ravel()
    if c.boxes_known is None and "boxes" not in col["w"]:
        return False
    listed = np.arange(bc.shape[1])[None, :] < cnt[:, None]
    return bool((listed & (bc < 0))[_boxes_known(col, c)].any())


def _agnostic_boxes_report(col, c: _Ctx) -> Optional[dict]:
    """Class-agnostic COCO bbox mAP on the images with known boxes: every true box is a
    ``tumor``, one detection per image (the box of the most likely tumour class's slot; read
    off the mask, every slot holds the same box) scored ``1 - p(no_tumor)``: the box figure of
    data whose boxes have no subtype (Br35H)."""
    from .detection import coco_evaluate, coco_implementation, xyxy_to_coco

    y, pred = col["y"], col["pred"]
    sel = np.flatnonzero(_boxes_known(col, c))
    size = tuple(col.get("image_shape") or (1, 1))[:2]
    ba = xyxy_to_coco(np.asarray(y["boxes_all"], np.float64)[sel], size)
    cnt = np.asarray(y["boxes_all_count"]).ravel()[sel]
    gts = [{"image": n, "category": 0, "bbox": ba[n, j]} for n in range(len(sel)) for j in range(int(cnt[n]))]
    if not gts:
        return None
    boxes = np.asarray(pred["boxes"], np.float64)[sel]
    tumor_idx = [k for k, name in enumerate(c.classes) if name != NO_TUMOR]
    if c.probs is not None and NO_TUMOR in c.classes:
        probs = np.asarray(c.probs)[sel]
        slot = np.asarray(tumor_idx)[probs[:, tumor_idx].argmax(axis=1)]
        score = 1.0 - probs[:, c.classes.index(NO_TUMOR)]
    else:
        slot, score = np.zeros(len(sel), np.int64), np.ones(len(sel))
    pix = xyxy_to_coco(boxes[np.arange(len(sel)), slot][:, None], size)[:, 0]
    dets = [{"image": n, "category": 0, "bbox": pix[n], "score": score[n]} for n in range(len(sel))]
    rep = coco_evaluate([size] * len(sel), gts, dets, ["tumor"], "bbox")
    rep["note"] = "class-agnostic: every true box a tumour, one detection per image scored 1 - p(no_tumor)"
    rep["implementations"] = {"map50/map50_95/map75/mar100": coco_implementation("bbox", size)}
    return rep


def _mask_report(col, c: _Ctx) -> Optional[dict]:
    from .detection import mask_map
    from .metrics import mask_report

    sc, pred, y = col["scores"], col["pred"], col["y"]
    sel = np.isfinite(sc["mask_dice"])
    if not sel.any():
        return None
    rep = mask_report({k: sc[f"mask_{k}"][sel] for k in ("dice", "iou", "hd95", "pred_area", "true_area")},
                      col["image_shape"], pooled=col.get("pooled"))
    rles = col.get("rles") or {}
    if rles.get("pred"):
        idx = np.flatnonzero(sel)
        yc = np.where(known(col, "class"), y["class"], -1)[idx] if "class" in y else None
        mm = mask_map([rles["pred"][i] for i in idx], [rles["true"][i] for i in idx],
                      probs=None if c.probs is None else c.probs[idx], y_class=yc, class_names=c.classes,
                      p_tumor=pred["tumor"][idx] if "tumor" in pred else None)
        impl = {**rep.pop("implementations"), **mm.pop("implementations")}
        rep.update(mm, implementations=impl)
        if mm.get("note"):
            c.notes.append(f"head 'mask': {mm['note']}")
    return rep


def _recon_report(head: str) -> Callable:
    def report(col, c: _Ctx) -> dict:
        from .metrics import recon_report

        return recon_report(col["scores"][f"{head}_psnr"], col["scores"][f"{head}_ssim"])

    return report


def _predicted(head: str) -> Callable:
    return lambda col, c: head in col["pred"]


def _scored(key: str) -> Callable:
    return lambda col, c: key in col["scores"]


#: ``(head, is it there, its report (None: no known target), why it is then not evaluated)``,
#: in the order of ``metrics.json``
HEAD_REPORTS = (
    ("class", lambda col, c: c.probs is not None and c.source != ["multilabel"], _class_report,
     "no image of this split has a known class label"),
    ("multilabel", _predicted("multilabel"), _multilabel_report, "no known labels"),
    ("tumor", _predicted("tumor"), _tumor_report, "no known tumour / healthy labels"),
    ("tumor_from_class", _generic_tumors, _tumor_from_class_report, "no known tumour / healthy labels"),
    ("subtype", _predicted("subtype"), _subtype_report, "no tumour image with a known subtype"),
    ("boxes", _predicted("boxes"), _boxes_report, "no known boxes"),
    ("boxes_agnostic", _generic_boxes, _agnostic_boxes_report, "no known boxes"),
    ("mask", _scored("mask_dice"), _mask_report, "no known masks"),
    *((h, _scored(f"{h}_psnr"), _recon_report(h), None) for h in RECON_HEADS),
)


def compute_metrics(col: Mapping, class_map, threshold: float = 0.5, n_bins: int = 15,
                    boxes_known: Optional[np.ndarray] = None) -> dict:
    """Per-head metrics (``{"heads": {...}, "notes": [...]}``) from :meth:`Collector.arrays`.

    ``boxes_known [N]``: images whose boxes are known (the records' flags); default: every
    image with a known box slot.
    """
    probs, hard, source = class_scores(col, class_map, threshold)
    ctx = _Ctx(classes=list(class_map.classes), tumor_classes=list(class_map.tumor_classes), threshold=threshold,
               n_bins=n_bins, boxes_known=boxes_known, probs=probs, hard=hard, source=source)
    heads: dict = {}
    for head, present, report, why in HEAD_REPORTS:
        if not present(col, ctx):
            continue
        rep = report(col, ctx)
        if rep is None:
            ctx.notes.append(f"head {head!r}: {why}; not evaluated")
        else:
            heads[head] = rep
    return {"heads": heads, "notes": ctx.notes}


def subset(col: Mapping, idx) -> dict:
    """The arrays of :meth:`Collector.arrays` restricted to images ``idx`` (pooled mask sums
    recomputed from the per-image areas and intersections)."""
    idx = np.asarray(idx, np.int64)
    take = lambda d: {k: np.asarray(v)[idx] for k, v in d.items()}  # noqa: E731
    out = {**col, "pred": take(col["pred"]), "y": take(col["y"]), "w": take(col["w"]), "scores": take(col["scores"]),
           "thumbs": take(col.get("thumbs", {})), "n": int(len(idx)),
           "rles": {k: [v[i] for i in idx] for k, v in (col.get("rles") or {}).items()}}
    sc = out["scores"]
    if "mask_inter" in sc:
        out["pooled"] = {"inter": float(np.nansum(sc["mask_inter"])), "pred": float(np.nansum(sc["mask_pred_area"])),
                         "true": float(np.nansum(sc["mask_true_area"]))}
    return out


def per_source(col: Mapping, sources: Sequence[str], order: Sequence[str], class_map, threshold: float = 0.5,
               n_bins: int = 15, boxes_known: Optional[Sequence[bool]] = None,
               mask_boxes: Optional[tuple] = None) -> dict:
    """``{source: {"n_images", "heads", "notes"}}``: :func:`compute_metrics` of each source's
    images (``sources[i]`` = image ``i``'s source; ``order``: the report order). ``mask_boxes``
    = ``(mode, min_area, mask_threshold)`` when boxes were read off the masks."""
    src = np.asarray(sources, dtype=object)
    out = {}
    for name in list(order) + sorted(set(sources) - set(order)):
        idx = np.flatnonzero(src == name)
        if not len(idx):
            continue
        bk = None if boxes_known is None else np.asarray(boxes_known, bool)[idx]
        m = compute_metrics(subset(col, idx), class_map, threshold, n_bins=n_bins, boxes_known=bk)
        if mask_boxes is not None:
            mark_mask_boxes(m, *mask_boxes)
        out[name] = {"n_images": int(len(idx)), **m}
    return out


def mark_mask_boxes(metrics: dict, mode: str, min_area: int, mask_threshold: float) -> bool:
    """After :func:`compute_metrics` of boxes read off the masks: record how they were read
    (True), or, when no image had a known box, say so in the notes (False)."""
    if "boxes" in metrics["heads"]:
        metrics["heads"]["boxes"].update(mode=mode, min_area=int(min_area), mask_threshold=mask_threshold)
        return True
    metrics["notes"] = [n if not n.startswith("head 'boxes'") else
                        "boxes from the mask: no image of this split has a known box; not evaluated"
                        for n in metrics["notes"]]
    return False


# ---------------------------------------------------------------------------------------
# headline scalars
# ---------------------------------------------------------------------------------------
def _classification_headline(m: Mapping) -> dict:
    out = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro"]["f1"],
           "roc_auc_macro": m["roc_auc"]["macro"], "ece": m["calibration"]["ece"]}
    for name, pc in m["per_class"].items():
        out[f"recall_{name}"] = pc["recall"]
        out[f"f1_{name}"] = pc["f1"]
    return out


def _keys(*keys: str) -> Callable:
    return lambda m: {k: m.get(k) for k in keys}


#: head -> its headline scalars, in the order they are reported
HEADLINES = {
    "class": _classification_headline,
    "tumor": _classification_headline,
    "tumor_from_class": lambda m: {"accuracy": m["accuracy"], "recall_tumor": m["per_class"]["tumor"]["recall"]},
    "subtype": _classification_headline,
    "multilabel": lambda m: {"subset_accuracy": m["subset_accuracy"], "macro_f1": m["macro"]["f1"],
                             "roc_auc_macro": m["roc_auc"]["macro"]},
    "boxes": _keys("slot_iou_mean", "slot_iou_ge_0.5", "slot_iou_ge_0.75", "map50", "map50_95", "map75", "voc_map50"),
    "boxes_agnostic": _keys("map50", "map50_95", "map75"),
    "mask": _keys("dice_mean", "dice_mean_tumor_only", "iou_mean", "hd95_mean", "dice_global", "map50", "map50_95"),
    **{h: (lambda m: {"psnr": m["psnr_mean"], "ssim": m["ssim_mean"]}) for h in RECON_HEADS},
}


def headline(metrics: Mapping) -> dict:
    """Flat scalar metrics (for MLflow and the console)."""
    h = metrics.get("heads", {})
    out = {f"{key}/{k}": v for key, scalars in HEADLINES.items() if key in h for k, v in scalars(h[key]).items()}
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and v is not None and math.isfinite(v)}


# ---------------------------------------------------------------------------------------
# predictions.csv
# ---------------------------------------------------------------------------------------
def _fmt_box(b) -> str:
    return " ".join(f"{float(v):.4f}" for v in b)


def _class_cells(r: dict, i: int, col: Mapping, class_map, threshold: float, cs: tuple, kn: dict) -> None:
    pred, y = col["pred"], col["y"]
    classes, tumor_classes = list(class_map.classes), list(class_map.tumor_classes)
    probs, hard, _ = cs
    if probs is not None:
        r["true_label"] = classes[int(y["class"][i])] if "class" in y and kn["class"][i] else ""
        r["pred_label"] = classes[int(hard[i])]
        r["correct"] = int(hard[i] == y["class"][i]) if "class" in y and kn["class"][i] else ""
        r["confidence"] = round(float(probs[i, hard[i]]), 6)
        r.update({f"p_{c}": round(float(probs[i, k]), 6) for k, c in enumerate(classes)})
    if "tumor" in pred:
        r["tumor_true"] = int(y["tumor"][i]) if kn["tumor"][i] else ""
        r["p_tumor"] = round(float(pred["tumor"][i]), 6)
    if "subtype" in pred:
        r["subtype_true"] = tumor_classes[int(y["subtype"][i])] if kn["subtype"][i] else ""
        r["subtype_pred"] = tumor_classes[int(pred["subtype"][i].argmax())]
        r.update({f"p_subtype_{c}": round(float(pred["subtype"][i, k]), 6) for k, c in enumerate(tumor_classes)})
    if "multilabel" in pred:
        r["true_labels"] = ";".join(c for k, c in enumerate(classes) if y["multilabel"][i, k] > 0.5) \
            if kn["multilabel"][i] else ""
        r["pred_labels"] = ";".join(c for k, c in enumerate(classes) if pred["multilabel"][i, k] >= threshold)


def _box_cells(r: dict, i: int, col: Mapping, classes: list, hard, ious: np.ndarray) -> None:
    pred = col["pred"]
    row = ious[i]
    r["box_iou"] = round(float(np.nanmean(row)), 6) if np.isfinite(row).any() else ""
    for k, c in enumerate(classes):
        if np.isfinite(row[k]):
            r[f"iou_{c}"] = round(float(row[k]), 6)
    if hard is not None and classes[int(hard[i])] != NO_TUMOR:
        r["pred_box_class"] = classes[int(hard[i])]
        r["pred_box"] = _fmt_box(pred["boxes"][i, int(hard[i])])
    if "boxes_from_mask" in pred:  # read off the mask: its box whatever the class, none when empty
        r["mask_components"] = int(pred["boxes_from_mask"][i])
        r.pop("pred_box_class", None)
        r["pred_box"] = _fmt_box(pred["boxes"][i, 0]) if r["mask_components"] else ""


def _score_cells(r: dict, i: int, sc: Mapping) -> None:
    if "mask_dice" in sc and np.isfinite(sc["mask_dice"][i]):
        for k, name in (("dice", "dice"), ("iou", "mask_iou"), ("hd95", "hd95"), ("pred_area", "mask_pred_area"),
                        ("true_area", "mask_true_area")):
            v = float(sc[f"mask_{k}"][i])
            r[name] = round(v, 6) if math.isfinite(v) else ""
    for h in RECON_HEADS:
        if f"{h}_psnr" in sc:
            r["psnr"] = round(float(sc[f"{h}_psnr"][i]), 4)
            r["ssim"] = round(float(sc[f"{h}_ssim"][i]), 6)


def prediction_rows(col: Mapping, class_map, threshold: float, meta: Sequence[Mapping]) -> list[dict]:
    """One dict per image for ``predictions.csv``."""
    from .detection import slot_ious

    pred, y = col["pred"], col["y"]
    cs = class_scores(col, class_map, threshold)
    ious = slot_ious(pred["boxes"], y["boxes"], col["w"]["boxes"]) if "boxes" in pred else None
    kn = {k: known(col, k) for k in ("class", "tumor", "subtype", "multilabel")}
    rows = []
    for i in range(col["n"]):
        r: dict = {"index": i, **(meta[i] if i < len(meta) else {})}
        _class_cells(r, i, col, class_map, threshold, cs, kn)
        if ious is not None:
            _box_cells(r, i, col, list(class_map.classes), cs[1], ious)
        _score_cells(r, i, col["scores"])
        rows.append(r)
    return rows


def write_csv(path, rows: Sequence[Mapping]) -> Path:
    """``rows`` as CSV, the columns in the order they first appear."""
    cols: list = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=cols, restval="")
        wr.writeheader()
        wr.writerows(rows)
    return path
