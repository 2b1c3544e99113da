"""Files a curation run writes: CSV tables, the gallery and the embedding plot."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.dedup.hashing import ImageHashes
from ..data.records import Record
from .groups import Group, split_name

log = logging.getLogger(__name__)

DUPLICATE_COLUMNS = ("group", "path", "split", "label", "kind", "hash", "distance", "phash", "group_kind",
                     "group_size", "cross_split", "conflict", "kept")
CROSS_COLUMNS = ("path", "split", "label", "kind", "distance", "other_path", "other_split", "other_label",
                 "matches")
SPLIT_MARKERS = {"train": "o", "val": "^", "test": "x", "none": "s"}


def write_duplicates_csv(path: Path, groups: Sequence[Group], records: Sequence[Record],
                         hashes: Sequence[ImageHashes], kept: set) -> Path:
    """One row per image in a group: ``group, path, split, label, kind, hash, distance, ...``.

    ``kind`` is the member's strongest link to another member and ``distance`` its distance
    (0 for exact; Hamming bits for near/flip; ``1 - cosine`` for embedding); ``hash`` is the
    exact (pixel) hash, ``phash`` the perceptual hash; ``group_kind`` is the weakest kind
    needed to connect the whole group; ``kept`` says whether the cleaned manifest keeps it.
    """
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DUPLICATE_COLUMNS)
        for g in groups:
            for i in g.members:
                r = records[i]
                d = g.member_distance.get(i, 0.0)
                w.writerow([g.id, r.image, split_name(r.split), r.label or "", g.member_kind.get(i, g.kind),
                            hashes[i].exact, int(d) if float(d).is_integer() else round(d, 6),
                            hashes[i].phash_hex, g.kind, g.size, int(g.cross_split), int(g.conflict),
                            int(i in kept)])
    return path


def write_cross_csv(path: Path, rows: Sequence[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CROSS_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CROSS_COLUMNS})
    return path


def _thumb(path: str, size: int) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        return np.zeros((size, size, 3), np.uint8)
    h, w = img.shape[:2]
    s = size / max(h, w)
    img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size, 3), np.uint8)
    y, x = (size - img.shape[0]) // 2, (size - img.shape[1]) // 2
    out[y:y + img.shape[0], x:x + img.shape[1]] = img
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def _interleave_splits(members: Sequence[int], records: Sequence[Record]) -> list[int]:
    """Members ordered so that every split shows early: train, val, test, train, val ..."""
    from .groups import SPLIT_ORDER

    by: dict = {}
    for i in sorted(members, key=lambda i: records[i].image):
        by.setdefault(split_name(records[i].split), []).append(i)
    queues = [by[k] for k in sorted(by, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def gallery(path: Path, groups: Sequence[Group], records: Sequence[Record], max_groups: int = 8,
            max_members: int = 6, thumb: int = 128) -> Optional[dict]:
    """PNG of the largest cross-split groups (one row each; falls back to the largest groups
    when no group crosses splits). Returns what it drew, or ``None`` when there is no group."""
    if not groups or max_groups <= 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cross = [g for g in groups if g.cross_split]
    chosen = sorted(cross or groups, key=lambda g: (-g.size, g.id))[:max_groups]
    cols = max(2, min(max_members, max(g.size for g in chosen)))
    fig, axes = plt.subplots(len(chosen), cols, figsize=(1.9 * cols, 2.15 * len(chosen)), squeeze=False)
    for row, g in zip(axes, chosen):
        members = _interleave_splits(g.members, records)
        for ax, i in zip(row, members[:cols]):
            r = records[i]
            ax.imshow(_thumb(r.image, thumb))
            d = g.member_distance.get(i, 0.0)
            ax.set_title(f"{split_name(r.split)} | {r.label or '?'}\n{g.member_kind.get(i, g.kind)} d={d:g}",
                         fontsize=7, color="red" if g.conflict else "black")
            ax.set_xlabel(Path(r.image).name[:28], fontsize=6)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[len(members[:cols]):]:
            ax.axis("off")
        extra = f" (+{g.size - cols} more)" if g.size > cols else ""
        row[0].set_ylabel(f"group {g.id}\n{g.size} imgs{extra}", fontsize=7)
    what = "cross-split groups" if cross else "groups (none crosses splits)"
    fig.suptitle(f"largest {what}; red title = labels disagree", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(chosen) / 2.15))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"path": str(path), "groups": [g.id for g in chosen], "what": what}


def project_2d(features: np.ndarray, method: str = "umap", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D projection of ``features``: ``(coords, method used)``. UMAP needs a handful of
    points; with fewer (or ``method='pca'``) it is PCA."""
    n = len(features)
    if method == "umap" and n >= 8:
        import umap

        nn = max(2, min(15, n - 1))
        return umap.UMAP(n_neighbors=nn, random_state=seed, init="random" if n < 32 else "spectral").fit_transform(
            features).astype(np.float32), f"umap (n_neighbors={nn})"
    if method == "umap":
        log.info("embedding plot: %d images are too few for UMAP; using PCA", n)
    x = features - features.mean(0, keepdims=True)
    if n < 2 or not np.any(x):
        return np.zeros((n, 2), np.float32), "none (identical features)"
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    c = u[:, :2] * s[:2]
    if c.shape[1] < 2:
        c = np.concatenate([c, np.zeros((n, 1))], axis=1)
    return c.astype(np.float32), "pca"


def embedding_plot(path: Path, coords: np.ndarray, records: Sequence[Record], method: str,
                   cross_members: Sequence[int] = ()) -> Path:
    """Scatter of the 2-D projection: colour = class, marker = split (train o, val ^, test x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label or "unknown" for r in records]
    splits = [split_name(r.split) for r in records]
    classes = sorted(set(labels))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 6))
    for ci, c in enumerate(classes):
        for s in sorted(set(splits)):
            m = np.array([(l == c and sp == s) for l, sp in zip(labels, splits)])
            if m.any():
                ax.scatter(coords[m, 0], coords[m, 1], s=14 if s != "test" else 22, marker=SPLIT_MARKERS.get(s, "s"),
                           color=cmap(ci % 10), alpha=0.75, linewidths=1.0,
                           label=f"{c} / {s}")
    if len(cross_members):
        cm = np.asarray(sorted(cross_members))
        ax.scatter(coords[cm, 0], coords[cm, 1], s=70, facecolors="none", edgecolors="red", linewidths=0.8,
                   label="in a cross-split group")
    ax.set_title(f"image embeddings ({method}); colour = class, marker = split (train o, val ^, test x)", fontsize=9)
    ax.legend(fontsize=7, markerscale=1.2, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
