"""Constructed MRI-like slices for duplicate tests (src.data.dedup, src.curate)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.data.dedup import canonical_array


def slice_image(seed: int, size: int = 64, rgb: bool = False) -> np.ndarray:
    """A smooth, left-right asymmetric MRI-like slice: blobs inside an off-centre ellipse."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = 0.45 + 0.1 * rng.random(), 0.5
    head = (((xx - cx) / 0.38) ** 2 + ((yy - cy) / 0.45) ** 2) < 1
    img = np.zeros((size, size))
    for _ in range(6):
        bx, by, s, a = rng.random(), rng.random(), 0.05 + 0.15 * rng.random(), rng.random()
        img += a * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * s ** 2))
    img = 40 + 180 * img / img.max() * head + 30 * (xx > 0.6) * head  # brighter right side: not symmetric
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rgb:
        img = np.stack([img, np.clip(img.astype(int) + 20, 0, 255).astype(np.uint8), img], -1)
    return img


def save(path: Path, arr: np.ndarray, quality: int = 92) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=quality)
    else:
        im.save(path)
    return path


def decoded(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return canonical_array(im)
