"""Evaluation plots as PNG files (matplotlib's object API on the Agg canvas: no pyplot,
no global backend switch, safe in notebooks and on machines without a display).

Every function takes plain arrays / the dicts of :mod:`src.evaluation.metrics`, writes
one PNG and returns its path.

* :func:`confusion_matrix_plot`: counts and row-normalised matrices side by side.
* :func:`roc_plot`: one-vs-rest ROC curve per class with its AUC.
* :func:`histogram_plot`: IoU / Dice histograms from ``metrics.histogram`` dicts.
* :func:`reliability_plot`: accuracy (or fraction positive) per confidence bin against
  the diagonal, with the bin counts and the ECE.
* :func:`gallery_plot`: rows of cases (e.g. the worst and the best): the image with true
  boxes (solid green) and predicted boxes (dashed red), true mask outline (green) and
  predicted mask outline (dashed red), the labels and the case's score in the title.

The evaluation report's figures from the collected arrays
(:class:`~src.evaluation.collect.Collector`):

* :func:`gallery_ranking` / :func:`gallery_cases`: the worst and best images by the most
  telling score there is (Dice, box IoU, p(true class), SSIM), at most two per group;
* :func:`make_plots`: every PNG of the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..data.records import NO_TUMOR

TRUE_COLOR = "#2ca02c"
PRED_COLOR = "#d62728"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


def confusion_matrix_plot(cm, class_names: Sequence[str], path, title: str = "Confusion matrix") -> Path:
    """Two panels: counts and row-normalised (recall on the diagonal)."""
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    C = len(class_names)
    side = max(3.2, 0.75 * C + 1.6)
    fig = _figure(2 * side + 0.6, side)
    for j, (mat, sub, fmt) in enumerate(((cm, "counts", "{:.0f}"), (norm, "row-normalised", "{:.2f}"))):
        ax = fig.add_subplot(1, 2, j + 1)
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1.0, mat.max()) if j == 0 else 1.0)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(C), class_names, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(C), class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {sub}", fontsize=9)
        hi = mat.max() if mat.size else 0
        for r in range(C):
            for c in range(C):
                ax.text(c, r, fmt.format(mat[r, c]), ha="center", va="center", fontsize=8,
                        color="white" if hi and mat[r, c] > 0.6 * hi else "black")
    fig.tight_layout()
    return _save(fig, path)


def roc_plot(y_true, probs, class_names: Sequence[str], path, title: str = "ROC (one-vs-rest)",
             positive_only: bool = False) -> Path:
    """One-vs-rest ROC curves (``positive_only``: only the last class, for binary heads)."""
    from .metrics import roc_auc_binary, roc_curve

    y_true = np.asarray(y_true, np.int64).ravel()
    probs = np.asarray(probs, np.float64).reshape(len(y_true), -1)
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    ks = [len(class_names) - 1] if positive_only else range(len(class_names))
    drawn = 0
    for k in ks:
        fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
        if not len(fpr):
            ax.plot([], [], label=f"{class_names[k]}: undefined (one class only)")
            continue
        ax.plot(fpr, tpr, lw=1.5, label=f"{class_names[k]}: AUC {roc_auc_binary(y_true == k, probs[:, k]):.3f}")
        drawn += 1
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def histogram_plot(hist: Mapping, path, title: str, xlabel: str, marks: Sequence[float] = ()) -> Path:
    """Bar chart of a ``{"edges", "counts"}`` histogram with optional vertical marks."""
    edges = np.asarray(hist["edges"], np.float64)
    counts = np.asarray(hist["counts"], np.float64)
    fig = _figure(4.6, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    for m in marks:
        ax.axvline(m, color="0.3", ls="--", lw=1)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={int(counts.sum())})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def reliability_plot(cal: Mapping, path, title: str = "Reliability") -> Path:
    """Per-bin accuracy (fraction positive for a binary head) vs confidence; counts below."""
    bins = cal["bins"]
    lo = np.array([b["lo"] for b in bins])
    hi = np.array([b["hi"] for b in bins])
    cnt = np.array([b["count"] for b in bins], np.float64)
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    binary = cal.get("kind") == "binary"
    fig = _figure(4.6, 5.0)
    ax = fig.add_axes([0.14, 0.36, 0.82, 0.56])
    ax2 = fig.add_axes([0.14, 0.1, 0.82, 0.18], sharex=ax)
    ok = np.isfinite(acc)
    ax.bar(lo[ok], acc[ok], width=(hi - lo)[ok], align="edge", color="#4c72b0", edgecolor="white",
           label="fraction positive" if binary else "accuracy")
    ax.bar(lo[ok], np.abs(conf - acc)[ok], bottom=np.minimum(acc, conf)[ok], width=(hi - lo)[ok], align="edge",
           facecolor="none", hatch="///", edgecolor=PRED_COLOR, lw=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], color="0.4", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction positive" if binary else "accuracy")
    ece = cal.get("ece")
    ax.set_title(f"{title}  ECE {ece:.3f}" if ece is not None and np.isfinite(ece) else title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax2.bar(lo, cnt, width=hi - lo, align="edge", color="0.5", edgecolor="white")
    ax2.set_ylabel("count", fontsize=8)
    ax2.set_xlabel("predicted probability" if binary else "confidence (top-label probability)")
    return _save(fig, path)


def _draw_box(ax, box, W: int, H: int, color: str, dashed: bool, label: Optional[str] = None):
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 * W - 0.5, y0 * H - 0.5), (x1 - x0) * W, (y1 - y0) * H, fill=False,
                           edgecolor=color, lw=1.4, ls="--" if dashed else "-"))
    if label:
        ax.text(x0 * W - 0.5, y0 * H - 1.5, label, color=color, fontsize=6, va="bottom")


def _draw_outline(ax, mask, color: str, dashed: bool):
    m = np.asarray(mask, np.float64)
    if m.ndim == 3:
        m = m[..., 0]
    if m.max() > 0.5 and m.min() < 0.5:
        ax.contour(m, levels=[0.5], colors=[color], linewidths=1.2, linestyles="dashed" if dashed else "solid")


def gallery_plot(rows: Sequence[tuple[str, Sequence[Mapping]]], path, title: str = "", tile: float = 2.1) -> Path:
    """A grid of cases: ``rows`` = ``[(row_title, [case, ...]), ...]``; a case is a dict with
    ``image`` (uint8 ``[H, W, 3]`` or grey), ``title``, optional ``true_boxes`` /
    ``pred_boxes`` (lists of ``(xyxy normalised, label)``), ``true_mask`` / ``pred_mask``
    (``[H, W]``) and ``recon`` (an image shown in a second panel beside it)."""
    rows = [(t, list(c)) for t, c in rows if len(c)]
    if not rows:
        fig = _figure(3, 1)
        fig.text(0.5, 0.5, "no cases", ha="center")
        return _save(fig, path)
    has_recon = any("recon" in c for _, cases in rows for c in cases)
    per = 2 if has_recon else 1
    ncol = max(len(c) for _, c in rows) * per
    fig = _figure(tile * ncol, (tile + 0.45) * len(rows) + (0.3 if title else 0))
    for r, (row_title, cases) in enumerate(rows):
        for j, case in enumerate(cases):
            ax = fig.add_subplot(len(rows), ncol, r * ncol + j * per + 1)
            img = np.asarray(case["image"])
            H, W = img.shape[:2]
            ax.imshow(img if img.ndim == 3 else img, cmap=None if img.ndim == 3 else "gray", interpolation="nearest")
            if case.get("true_mask") is not None:
                _draw_outline(ax, case["true_mask"], TRUE_COLOR, dashed=False)
            if case.get("pred_mask") is not None:
                _draw_outline(ax, case["pred_mask"], PRED_COLOR, dashed=True)
            for box, label in case.get("true_boxes") or []:
                _draw_box(ax, box, W, H, TRUE_COLOR, dashed=False)
            for box, label in case.get("pred_boxes") or []:
                _draw_box(ax, box, W, H, PRED_COLOR, dashed=True, label=label)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            ax.set_title(case.get("title", ""), fontsize=6.5)
            if j == 0:
                ax.set_ylabel(row_title, fontsize=9)
            if has_recon and case.get("recon") is not None:
                ax2 = fig.add_subplot(len(rows), ncol, r * ncol + j * per + 2)
                ax2.imshow(np.asarray(case["recon"]), interpolation="nearest")
                ax2.set_xticks([])
                ax2.set_yticks([])
                ax2.set_title("reconstruction", fontsize=6.5)
    if title:
        fig.suptitle(title + "   (green: true, red dashed: predicted)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# the report's figures from collected arrays
# ---------------------------------------------------------------------------------------
def gallery_ranking(col: Mapping, class_map, threshold: float) -> tuple[Optional[np.ndarray], np.ndarray, str]:
    """``(score per image (NaN = not ranked), candidate mask, what the score is)``: Dice on
    tumour images when masks exist, else the mean box IoU, else p(true class), else SSIM."""
    from ..heads import RECON_HEADS
    from .compute import class_scores, known
    from .detection import slot_ious

    sc, pred, y = col["scores"], col["pred"], col["y"]
    n = col["n"]
    if "mask_dice" in sc and np.isfinite(sc["mask_dice"]).any():
        s = sc["mask_dice"]
        tumor = np.nan_to_num(sc["mask_true_area"]) > 0
        cand = np.isfinite(s) & tumor if (np.isfinite(s) & tumor).any() else np.isfinite(s)
        return s, cand, "Dice (tumour images)" if (np.isfinite(s) & tumor).any() else "Dice"
    if "boxes" in pred and (np.asarray(col["w"]["boxes"]) > 0).any():
        ious = slot_ious(pred["boxes"], y["boxes"], col["w"]["boxes"])
        ok = np.isfinite(ious).any(axis=1)
        s = np.full(n, np.nan)
        s[ok] = np.nanmean(ious[ok], axis=1)
        return s, ok, "box IoU"
    probs, hard, _ = class_scores(col, class_map, threshold)
    if probs is not None and "class" in y:
        ok = known(col, "class")
        s = np.full(n, np.nan)
        s[ok] = probs[ok, y["class"][ok].astype(int)]
        return s, ok, "p(true class)"
    if "tumor" in pred and "tumor" in y:
        ok = known(col, "tumor")
        p = pred["tumor"]
        s = np.where(ok, np.where(y["tumor"] > 0.5, p, 1 - p), np.nan)
        return s, ok, "p(true tumour label)"
    for h in RECON_HEADS:
        if f"{h}_ssim" in sc:
            s = sc[f"{h}_ssim"]
            return s, np.isfinite(s), "SSIM"
    return None, np.zeros(n, bool), "none"


def _pick_cases(seq, k: int, groups: Sequence, exclude=(), per_group: int = 2) -> list:
    """The first ``k`` of ``seq`` with at most ``per_group`` per group (patient: its
    neighbouring slices look alike), filled up from the rest when groups run out."""
    seq = [i for i in seq if i not in exclude]
    first, count = [], {}
    for i in seq:
        if count.get(groups[i], 0) < per_group:
            count[groups[i]] = count.get(groups[i], 0) + 1
            first.append(i)
    taken = set(first[:k])
    taken |= set([i for i in seq if i not in taken][:k - len(taken)])
    return [i for i in seq if i in taken]


def _case(i: int, col: Mapping, class_map, cs: tuple, score: np.ndarray, what: str, meta: Sequence[Mapping]) -> dict:
    """One gallery case (see :func:`gallery_plot`) of image ``i``."""
    from ..heads import RECON_HEADS
    from .compute import known

    pred, y, th = col["pred"], col["y"], col["thumbs"]
    classes = list(class_map.classes)
    probs, hard, _ = cs
    c: dict = {"image": th["image"][i]}
    lines = []
    if probs is not None:
        t = classes[int(y["class"][i])] if "class" in y and known(col, "class")[i] else "?"
        lines.append(f"true {t} / pred {classes[int(hard[i])]} {probs[i, hard[i]]:.2f}")
    elif "tumor" in pred:
        lines.append(f"p(tumour) {pred['tumor'][i]:.2f}")
    lines.append(f"{what} {score[i]:.3f}")
    if meta and i < len(meta) and meta[i].get("path"):
        lines.append(Path(str(meta[i]["path"])).name[:28])
    c["title"] = "\n".join(lines)
    if "boxes" in pred:
        if "boxes_all" in y:
            cnt = int(y["boxes_all_count"][i])
            c["true_boxes"] = [(y["boxes_all"][i, j], None) for j in range(cnt) if y["boxes_all_classes"][i, j] >= 0]
        slots = set(np.flatnonzero(np.asarray(col["w"]["boxes"][i]) > 0).tolist())
        if hard is not None and classes[int(hard[i])] != NO_TUMOR:
            slots.add(int(hard[i]))
        c["pred_boxes"] = [(pred["boxes"][i, s], classes[s]) for s in sorted(slots)]
        if "boxes_from_mask" in pred:  # one box read off the mask (every slot holds it), none when empty
            c["pred_boxes"] = [(pred["boxes"][i, 0], "mask")] if pred["boxes_from_mask"][i] > 0 else []
    if "mask_true" in th and np.isfinite(col["scores"]["mask_dice"][i]):
        c["true_mask"] = th["mask_true"][i]
        c["pred_mask"] = th["mask_pred"][i].astype(np.float32) / 255.0 >= 0.5
    for h in RECON_HEADS:
        if h in th:
            c["recon"] = th[h][i]
    return c


def gallery_cases(col: Mapping, class_map, threshold: float, k: int = 6, meta: Sequence[Mapping] = ()):
    """``([(row title, [case dicts])], score name)`` of the ``k`` worst and ``k`` best images."""
    from .compute import class_scores

    score, cand, what = gallery_ranking(col, class_map, threshold)
    if score is None or not cand.any():
        return [], what
    idx = np.flatnonzero(cand)
    order = idx[np.argsort(score[idx], kind="mergesort")]
    k = int(min(k, max(1, len(order) // 2))) if len(order) > 1 else 1
    groups = [(meta[i].get("group") if meta and i < len(meta) else None) or i for i in range(col["n"])]
    worst = _pick_cases(list(order), k, groups)
    best = _pick_cases(list(order[::-1]), k, groups, exclude=set(worst))
    cs = class_scores(col, class_map, threshold)
    cases = lambda ids: [_case(i, col, class_map, cs, score, what, meta) for i in ids]  # noqa: E731
    return [(f"worst {len(worst)}", cases(worst)), (f"best {len(best)}", cases(best))], what


def _classification_curves(col: Mapping, class_map, probs: Optional[np.ndarray], heads: Mapping) -> list:
    """``(head, true labels, probabilities, class names, binary)`` of each classification
    head of the report."""
    from .compute import known

    y, pred, specs = col["y"], col["pred"], []
    if "class" in heads:
        sel = known(col, "class")
        specs.append(("class", y["class"][sel], probs[sel], list(class_map.classes), False))
    if "tumor" in heads:
        sel = known(col, "tumor")
        p = pred["tumor"][sel]
        specs.append(("tumor", y["tumor"][sel].astype(int), np.stack([1 - p, p], 1), [NO_TUMOR, "tumor"], True))
    if "subtype" in heads:
        sel = known(col, "subtype")
        specs.append(("subtype", y["subtype"][sel], pred["subtype"][sel], list(class_map.tumor_classes), False))
    return specs


def make_plots(col: Mapping, metrics: Mapping, class_map, out_dir, threshold: float, gallery: int = 6,
               meta: Sequence[Mapping] = ()) -> dict:
    """Every PNG of the report; returns ``{head: {kind: path}, "gallery": path}``."""
    from .compute import class_scores

    out_dir = Path(out_dir)
    h = metrics["heads"]
    res: dict = {}
    probs, _, _ = class_scores(col, class_map, threshold)
    for key, yt, pr, names, binary in _classification_curves(col, class_map, probs, h):
        m = h[key]
        title = {"class": "class", "tumor": "tumour", "subtype": "subtype"}[key]
        res[key] = {
            "confusion": confusion_matrix_plot(m["confusion_matrix"], names, out_dir / f"confusion_{key}.png",
                                               title=f"Confusion, {title}"),
            "roc": roc_plot(yt, pr, names, out_dir / f"roc_{key}.png", title=f"ROC ({title})", positive_only=binary),
            "reliability": reliability_plot(m["calibration"], out_dir / f"reliability_{key}.png",
                                            title=f"Reliability ({title})"),
        }
    if "boxes" in h:
        res["boxes"] = {"iou_hist": histogram_plot(h["boxes"]["slot_iou_histogram"], out_dir / "iou_hist.png",
                                                   "Box IoU (known slots)", "IoU", marks=(0.5, 0.75))}
    if "mask" in h:
        res["mask"] = {"dice_hist": histogram_plot(h["mask"]["dice_histogram"], out_dir / "dice_hist.png",
                                                   "Mask Dice per image", "Dice")}
    rows, what = gallery_cases(col, class_map, threshold, k=gallery, meta=meta)
    if rows:
        res["gallery"] = gallery_plot(rows, out_dir / "gallery.png", title=f"Worst and best by {what}")
        res["gallery_score"] = what
    return res


__all__ = ["confusion_matrix_plot", "roc_plot", "histogram_plot", "reliability_plot", "gallery_plot",
           "gallery_ranking", "gallery_cases", "make_plots"]
