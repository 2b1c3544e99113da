"""Latent-space projections: embeddings from a chosen layer -> UMAP 2-D -> PNG + CSV.

Usage::

    emb = extract_embeddings(model, images)                     # [N, D]
    xy = project(emb, method="umap")                            # [N, 2]
    save_projection(out_dir, xy, paths, splits, labels)         # umap.png + umap.csv

The default embedding layer is the pooled feature vector the heads read: the global
pooling layer closest to the model's class head (``class_pool`` of a detector, ``pool``
of ``small_cnn``, the latent of a U-Net); a model without one gets the global average of
the 4-D feature map Grad-CAM would use (:func:`src.evaluation.gradcam.auto_target`). Any
layer can be named, also inside a nested backbone (``"backbone/conv5_block3_out"``); a
4-D output is globally average-pooled, anything else flattened.

The scatter colours points by class and marks them by split (train ``o``, test ``x``,
val ``^``); the CSV has one row per point: ``path, split, label, x, y``.
"""
from __future__ import annotations

import csv
import logging
from collections import deque
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .gradcam import (GradCamError, Target, _parents, _producer, as_functional, auto_target, default_head,
                      output_dict, resolve_target, walk)

log = logging.getLogger(__name__)

SPLIT_MARKERS = {"train": "o", "test": "x", "val": "^"}


def default_embedding_target(model, head: Optional[str] = None) -> Target:
    """The pooled features before the heads (see the module docstring)."""
    import keras

    f = as_functional(model)
    head = head or default_head(f)
    outs = output_dict(f)
    pools = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
    input_ids = {id(x) for x in f.inputs}
    queue, seen = deque([outs[head]]), set()
    while queue:
        t = queue.popleft()
        if id(t) in seen:
            continue
        seen.add(id(t))
        op, node, ti = _producer(t)
        if isinstance(op, pools):
            return Target((op.name,), (node,), ti)
        queue.extend(_parents(t, input_ids))
    return auto_target(f, head)


def _resolve_any(model, layer) -> Target:
    if layer is None or isinstance(layer, Target):
        return layer if layer is not None else default_embedding_target(model)
    try:
        return resolve_target(model, layer)
    except GradCamError as e:
        if "4-D" not in str(e):
            raise
    # a non-4-D layer: same lookup without the shape check
    f = as_functional(model)
    parts = tuple(p for p in str(layer).split("/") if p)
    m = f
    for p in parts[:-1]:
        m = as_functional(m.get_layer(p))
    m.get_layer(parts[-1])
    return Target(parts, (None,) * len(parts), 0)


def _pool(v):
    import tensorflow as tf

    v = tf.cast(v, tf.float32)
    if len(v.shape) == 4:
        return tf.reduce_mean(v, axis=[1, 2])
    if len(v.shape) > 2:
        return tf.reshape(v, [tf.shape(v)[0], -1])
    return v


def extract_embeddings(model, images: Union[np.ndarray, Iterable], layer=None, batch_size: int = 32,
                       return_outputs: bool = False):
    """``[N, D]`` float32 embeddings of ``images`` ([N, H, W, 3] in [0, 1], or an iterable
    of such batches, or of ``(x, ...)`` tuples as the data pipeline yields).

    With ``return_outputs`` also ``{head: [N, ...]}`` model outputs (one pass for both).
    """
    target = _resolve_any(model, layer)
    f = as_functional(model)
    feats, outs = [], {}

    def batches():
        if isinstance(images, np.ndarray):
            for i in range(0, len(images), int(batch_size)):
                yield images[i:i + int(batch_size)]
        else:
            for b in images:
                yield b[0] if isinstance(b, (tuple, list)) else b

    for x in batches():
        o, feat, _ = walk(f, x, target, training=False)
        feats.append(_pool(feat).numpy())
        if return_outputs:
            for k, v in (o.items() if isinstance(o, dict) else [("output", o)]):
                outs.setdefault(k, []).append(np.asarray(v))
    emb = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0), np.float32)
    if return_outputs:
        return emb, {k: np.concatenate(v, axis=0) for k, v in outs.items()}
    return emb


def project(embeddings: np.ndarray, method: str = "umap", n_neighbors: int = 15, min_dist: float = 0.1,
            seed: int = 0, metric: str = "euclidean") -> np.ndarray:
    """``[N, D]`` -> ``[N, 2]`` with UMAP (``method="umap"``, umap-learn) or PCA."""
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    n = len(x)
    if n < 3:
        raise ValueError(f"need at least 3 embeddings to project, got {n}")
    x = np.nan_to_num(x)
    if method == "pca":
        xc = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        out = xc @ vt[:2].T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))).astype(np.float32)
    if method != "umap":
        raise ValueError(f"method must be umap or pca, got {method!r}")
    import warnings

    import umap

    k = max(2, min(int(n_neighbors), n - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", spectral init notes
        reducer = umap.UMAP(n_components=2, n_neighbors=k, min_dist=float(min_dist), random_state=int(seed),
                            metric=metric, init="spectral" if n > k + 1 else "random")
        return np.asarray(reducer.fit_transform(x), np.float32)


def plot_projection(xy: np.ndarray, labels: Sequence, splits: Sequence, path, title: Optional[str] = None,
                    class_order: Optional[Sequence[str]] = None) -> Path:
    """Scatter PNG: colour = class, marker = split (train o, test x, val ^)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels = ["unknown" if v is None else str(v) for v in labels]
    splits = ["none" if v is None else str(v) for v in splits]
    classes = list(class_order or [])
    classes += sorted({c for c in labels if c not in classes})
    split_names = [s for s in ("train", "val", "test") if s in splits] + sorted(
        {s for s in splits if s not in SPLIT_MARKERS})
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colours = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    lab = np.asarray(labels)
    spl = np.asarray(splits)
    for s in split_names:
        marker = SPLIT_MARKERS.get(s, "s")
        for c in classes:
            sel = (lab == c) & (spl == s)
            if not sel.any():
                continue
            kw = {"facecolors": "none", "edgecolors": [colours[c]]} if marker == "o" else {"c": [colours[c]]}
            ax.scatter(xy[sel, 0], xy[sel, 1], marker=marker, s=28, linewidths=1.2, alpha=0.85, **kw)
    cls_handles = [Line2D([], [], marker="o", linestyle="", color=colours[c], label=c) for c in classes
                   if (lab == c).any()]
    split_handles = [Line2D([], [], marker=SPLIT_MARKERS.get(s, "s"), linestyle="", color="black", label=s,
                            markerfacecolor="none" if SPLIT_MARKERS.get(s) == "o" else "black")
                     for s in split_names]
    leg = ax.legend(handles=cls_handles, title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.add_artist(leg)
    leg2 = ax.legend(handles=split_handles, title="split", loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=8)
    ax.set_xlabel("dim 1")
    ax.set_ylabel("dim 2")
    ax.set_title(title or f"embedding projection ({len(xy)} images)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", bbox_extra_artists=[leg, leg2])
    plt.close(fig)
    return path


def save_projection(out_dir, xy: np.ndarray, paths: Sequence, splits: Sequence, labels: Sequence,
                    stem: str = "umap", title: Optional[str] = None,
                    class_order: Optional[Sequence[str]] = None) -> dict:
    """Write ``<stem>.png`` (scatter) and ``<stem>.csv`` (path, split, label, x, y)."""
    xy = np.asarray(xy, np.float32)
    n = len(xy)
    if not (len(paths) == len(splits) == len(labels) == n):
        raise ValueError(f"lengths differ: {n} points, {len(paths)} paths, {len(splits)} splits, {len(labels)} labels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_projection(xy, labels, splits, out / f"{stem}.png", title=title, class_order=class_order)
    csv_path = out / f"{stem}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "split", "label", "x", "y"])
        for p, s, lab, (x, y) in zip(paths, splits, labels, xy):
            w.writerow([p, "" if s is None else s, "" if lab is None else lab, f"{x:.6g}", f"{y:.6g}"])
    return {"png": str(png), "csv": str(csv_path), "points": n}


def embedding_projection(embeddings: np.ndarray, paths: Sequence, splits: Sequence, labels: Sequence, out_dir,
                         method: str = "umap", n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                         stem: Optional[str] = None, class_order: Optional[Sequence[str]] = None) -> dict:
    """Project ``embeddings`` and write the PNG + CSV; returns their paths."""
    xy = project(embeddings, method=method, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    return save_projection(out_dir, xy, paths, splits, labels, stem=stem or method,
                           title=f"{method.upper()} of {len(xy)} embeddings ({np.shape(embeddings)[1]}-D)",
                           class_order=class_order)
