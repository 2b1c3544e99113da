"""`python -m src.data.describe data=<name> [data.root=...] [grid=grid.png]`

Prints a JSON summary of a dataset as the project reads it: images per split and class,
box and mask counts (``masks``: annotated; ``pseudo_masks``: model-made, e.g. CAM masks
from ``src.explain what=pseudo_masks``, with totals under ``pseudo``), unknown-target
counts, image sizes, groups, skipped files and why.
With ``grid=PATH`` it also writes a sample grid PNG with boxes and mask outlines drawn.
"""
from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .dataset import DataBundle, load_data
from .records import DataError, Record, pseudo_counts

log = logging.getLogger(__name__)


def _per_split(recs: Sequence[Record]) -> dict:
    """Images, classes, boxes, masks, unknown targets and groups per split."""
    per_split: dict = {}
    for r in recs:
        s = per_split.setdefault(r.split or "none", {
            "images": 0, "classes": collections.Counter(), "boxes": 0, "images_with_boxes": 0,
            "masks": 0, "pseudo_masks": 0, "unknown": collections.Counter(), "groups": set()})
        s["images"] += 1
        s["classes"][r.label if r.known.get("label") and r.label else "unknown"] += 1
        s["boxes"] += len(r.boxes)
        s["images_with_boxes"] += int(len(r.boxes) > 0)
        has_mask = bool(r.known.get("mask") and (r.mask or r.polygons))
        s["masks"] += int(has_mask and not r.is_pseudo("mask"))  # annotated masks only
        s["pseudo_masks"] += int(has_mask and r.is_pseudo("mask"))
        for t in ("label", "boxes", "mask"):
            if not r.known.get(t):
                s["unknown"][t] += 1
        if r.group is not None:
            s["groups"].add(r.group)
    return {k: {"images": v["images"], "classes": dict(sorted(v["classes"].items())), "boxes": v["boxes"],
                "images_with_boxes": v["images_with_boxes"], "masks": v["masks"], "pseudo_masks": v["pseudo_masks"],
                "unknown": {t: v["unknown"].get(t, 0) for t in ("label", "boxes", "mask")},
                "groups": len(v["groups"])}
            for k, v in sorted(per_split.items())}


def describe(bundle: DataBundle) -> dict:
    """JSON-able summary of a :class:`DataBundle` (a mix: also per source, and its hygiene)."""
    recs = bundle.records
    sizes = collections.Counter(f"{r.width}x{r.height}" for r in recs)
    groups = collections.Counter(r.group for r in recs if r.group is not None)
    out = {
        "name": bundle.name,
        "root": bundle.root,
        "classes": list(bundle.class_map.classes),
        "images": len(recs),
        "splits": _per_split(recs),
        "image_sizes": dict(sizes.most_common(10)),
        "distinct_image_sizes": len(sizes),
        "groups": {"count": len(groups),
                   "images_per_group": _stats(list(groups.values())) if groups else None},
        "sources": dict(collections.Counter(r.source for r in recs)),
        "skipped": bundle.skipped.summary(),
    }
    pseudo = pseudo_counts(recs)
    if pseudo:
        out["pseudo"] = pseudo
    if bundle.sources:
        out["per_source"] = {name: {"reader": info.get("reader"), "root": info.get("root"), "weight": info.get("weight"),
                                    "images": info.get("images"),
                                    "splits": _per_split([r for r in recs if r.source == name])}
                             for name, info in bundle.sources.items()}
        out["hygiene"] = bundle.hygiene
    return out


def _stats(values: Sequence[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": round(float(a.mean()), 3)}


def _load_rgb(path: str, size: int) -> np.ndarray:
    import cv2
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: unreadable image")
    return cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)


def _mask_for(r: Record, size: int) -> Optional[np.ndarray]:
    import cv2
    if r.mask:
        m = cv2.imread(r.mask, cv2.IMREAD_GRAYSCALE)
        return None if m is None else cv2.resize((m > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    if r.polygons:
        m = np.zeros((size, size), np.uint8)
        for p in r.polygons:
            cv2.fillPoly(m, [np.round(np.asarray(p) * size).astype(np.int32)], 1)
        return m
    return None


def sample_grid(bundle: DataBundle, path: str | Path, per_class: int = 4, size: int = 160, seed: int = 0) -> Path:
    """Write a PNG grid: ``per_class`` images per class, mask outline (green), boxes (red)."""
    import cv2

    rng = np.random.default_rng(seed)
    by_class: dict = collections.defaultdict(list)
    for r in bundle.records:
        by_class[r.label if r.known.get("label") and r.label else "unknown"].append(r)
    rows = []
    for cls in sorted(by_class):
        pick = rng.choice(len(by_class[cls]), size=min(per_class, len(by_class[cls])), replace=False)
        tiles = []
        for i in sorted(pick):
            r = by_class[cls][i]
            img = _load_rgb(r.image, size)
            m = _mask_for(r, size)
            if m is not None:
                contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
            for b in r.boxes:
                x0, y0, x1, y1 = (np.asarray(b) * size).round().astype(int)
                cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (255, 0, 0), 1)
            cv2.putText(img, f"{cls} [{r.split}]", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 0), 1)
            tiles.append(img)
        while len(tiles) < per_class:
            tiles.append(np.zeros((size, size, 3), np.uint8))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return path


def run(cfg) -> dict:
    bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
    summary = describe(bundle)
    if cfg.get("grid"):
        summary["grid"] = str(sample_grid(bundle, cfg.grid, per_class=int(cfg.get("grid_per_class", 4)), seed=int(cfg.seed)))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import cli_main

    return cli_main(__doc__, "describe", lambda cfg, args: run(cfg), argv)

if __name__ == "__main__":
    sys.exit(main())
