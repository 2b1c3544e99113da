"""Helpers that write tiny datasets (in the layouts the readers accept) into tmp_path."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image


def write_image(path: Path, width: int = 32, height: int = 24, mode: str = "L", seed: int = 0) -> Path:
    """A small noise image; the format follows the suffix (.jpg, .png ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_garbage(path: Path) -> Path:
    """Bytes that are no image, under an image name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all" * 4)
    return path


def write_truncated_jpeg(path: Path, width: int = 32, height: int = 24) -> Path:
    """A JPEG cut short (no end-of-image marker), as an interrupted download leaves it."""
    write_image(path, width, height)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) * 2 // 3])
    return Path(path)


def write_mask(path: Path, width: int = 32, height: int = 24, mode: str = "L") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((height, width) if mode == "L" else (height, width, 3), np.uint8)
    m[height // 4: height // 2, width // 4: width // 2] = 255
    Image.fromarray(m, mode=mode).save(path)
    return path


# ---- COCO ---------------------------------------------------------------------------------
def coco_categories(names=("glioma", "meningioma"), placeholder: Optional[str] = "tumors") -> list[dict]:
    """Roboflow style: id 0 is the placeholder supercategory, real classes from id 1."""
    cats = []
    if placeholder:
        cats.append({"id": 0, "name": placeholder, "supercategory": "none"})
    for i, n in enumerate(names, 1):
        cats.append({"id": i, "name": n, "supercategory": placeholder or "none"})
    return cats


def write_coco(folder: Path, images: Iterable[dict], annotations: Iterable[dict],
               categories: Optional[list] = None, make_images: bool = True) -> Path:
    """Write ``_annotations.coco.json`` (and the image files) into ``folder``.

    ``images``: dicts with ``file_name``, ``width``, ``height`` (and optional ``id``);
    ``annotations``: dicts with ``image_id``, ``category_id``, ``bbox`` and optional
    ``segmentation``; ids are filled in.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    imgs = []
    for i, im in enumerate(images):
        im = {"id": i, **im}
        imgs.append(im)
        if make_images:
            write_image(folder / im["file_name"], im["width"], im["height"], seed=i)
    anns = [{"id": i, "iscrowd": 0, **a} for i, a in enumerate(annotations)]
    data = {"info": {}, "licenses": [], "categories": categories if categories is not None else coco_categories(),
            "images": imgs, "annotations": anns}
    path = folder / "_annotations.coco.json"
    path.write_text(json.dumps(data))
    return path


def rle_encode_string(counts: list[int]) -> str:
    """COCO's compressed RLE string for run lengths (``maskApi.c: rleToString``)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a 0/1 mask in COCO's column-major order, starting with zeros."""
    flat = np.asarray(mask, np.uint8).T.ravel()
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


# ---- YOLO ---------------------------------------------------------------------------------
def write_yolo_yaml(root: Path, names) -> Path:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    p = root / "data.yaml"
    p.write_text(yaml.safe_dump({"names": names}))
    return p


def write_yolo_item(images: Path, labels: Path, stem: str, lines: Optional[list[str]],
                    width: int = 32, height: int = 24, suffix: str = ".png",
                    masks: Optional[Path] = None, trailing_newline: bool = True) -> Path:
    """One image, its label file (``lines=None``: no label file) and optionally a mask."""
    img = write_image(images / f"{stem}{suffix}", width, height)
    if lines is not None:
        labels.mkdir(parents=True, exist_ok=True)
        text = "\n".join(lines) + ("\n" if lines and trailing_newline else "")
        (labels / f"{stem}.txt").write_text(text)
    if masks is not None:
        write_mask(masks / f"{stem}.png", width, height)
    return img


# ---- Roboflow CSV -------------------------------------------------------------------------
def write_csv(folder: Path, rows: list[tuple], header=("filename", "width", "height", "class",
                                                       "xmin", "ymin", "xmax", "ymax")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "_annotations.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return p
