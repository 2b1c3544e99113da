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
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

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


__all__ = ["confusion_matrix_plot", "roc_plot", "histogram_plot", "reliability_plot", "gallery_plot"]
