"""Masks: polygons -> mask files, mask files -> arrays, tight boxes, packed masks.

The tf.data pipeline reads one kind of mask: a single-channel file where non-zero means
tumour. :func:`materialise_masks` rasterises the polygons of records that have no mask
file (COCO / Roboflow exports) into 0/255 PNGs once, before the pipeline is built.

Coordinates follow the record schema: normalised, pixel column ``i`` covering
``[i / W, (i + 1) / W]``; a polygon vertex ``(u, v)`` is the continuous point
``(u * W, v * H)``; :func:`mask_to_box` returns ``x_max = (last_col + 1) / W``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .records import DataError, Record

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# polygons -> mask files
# ---------------------------------------------------------------------------------------
def _fill_polygon(mask: np.ndarray, px: np.ndarray) -> None:
    """Set the pixels of ``mask`` whose centres lie inside polygon ``px`` (continuous pixel
    coordinates, even-odd rule; left/top edges inclusive, right/bottom exclusive)."""
    h, w = mask.shape
    x0, y0 = px[:, 0], px[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r0 = max(0, int(np.ceil(y0.min() - 0.5)))
    r1 = min(h - 1, int(np.floor(y0.max() - 0.5)))
    if r1 < r0:
        return
    yc = np.arange(r0, r1 + 1, dtype=np.float64)[:, None] + 0.5          # [R, 1] row centres
    crosses = (y0[None] <= yc) != (y1[None] <= yc)                         # [R, E] half-open rule
    dy = np.where(y1 != y0, y1 - y0, 1.0)
    xi = np.where(crosses, x0[None] + (yc - y0[None]) * ((x1 - x0) / dy)[None], np.inf)
    xi = np.sort(xi, axis=1)
    if xi.shape[1] % 2:
        xi = np.concatenate([xi, np.full((len(xi), 1), np.inf)], axis=1)
    a, b = xi[:, 0::2], xi[:, 1::2]                                        # [R, E/2] spans
    ok = np.isfinite(a) & np.isfinite(b)
    start = np.clip(np.ceil(a - 0.5), 0, w).astype(np.int64)
    stop = np.clip(np.ceil(b - 0.5), 0, w).astype(np.int64)
    ok &= stop > start
    rows = np.broadcast_to(np.arange(len(xi))[:, None], a.shape)
    diff = np.zeros((len(xi), w + 1), np.int32)
    np.add.at(diff, (rows[ok], start[ok]), 1)
    np.add.at(diff, (rows[ok], stop[ok]), -1)
    mask[r0:r1 + 1] |= np.cumsum(diff[:, :w], axis=1) > 0


def rasterise_polygons(polygons: Sequence, width: int, height: int) -> np.ndarray:
    """``uint8`` ``[height, width]`` mask, 255 inside any polygon (instances merged).

    A pixel is inside when its centre is (so a polygon along pixel edges gives exactly
    those pixels and :func:`mask_to_box` returns its vertices' box).
    """
    inside = np.zeros((int(height), int(width)), bool)
    for poly in polygons:
        p = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(p) >= 3:
            _fill_polygon(inside, p * np.array([width, height], np.float64))
    return inside.astype(np.uint8) * 255


def mask_cache_name(image: str, polygons: Sequence, width: int, height: int) -> str:
    """File name for a rasterised mask: a hash of image path, size and polygon vertices,
    so that an edited annotation or image size gives a new file (never a stale one)."""
    h = hashlib.sha1()
    h.update(str(Path(image).expanduser().resolve()).encode())
    h.update(f"|{int(width)}x{int(height)}|".encode())
    for poly in polygons:
        h.update(np.round(np.asarray(poly, np.float64).reshape(-1, 2), 6).tobytes())
        h.update(b";")
    return f"{Path(image).stem[:40]}-{h.hexdigest()[:20]}.png"


def _write_png_atomic(path: Path, mask: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise DataError(f"{path}: could not encode mask PNG")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def materialise_masks(records: Iterable[Record], cache_dir: str | Path, on_error: str = "raise",
                      skipped=None) -> list[Record]:
    """Rasterise the polygons of records that have no mask file into PNGs in ``cache_dir``.

    For each record with non-empty ``polygons`` and ``mask is None``: the mask is drawn
    at the image's ``width x height`` (from the record, else read from the image header),
    every instance merged, 0/255, written once to ``cache_dir/<mask_cache_name>`` (reused
    when it exists) and ``record.mask`` is set to it (records are changed in place).
    Records with a mask file, without polygons, or with an empty polygon list (a known
    empty mask) are passed through unchanged.

    ``on_error``: ``"raise"`` (default) raises :class:`DataError` naming the image for an
    invalid polygon or an unreadable image; ``"skip"`` drops such records from the
    returned list and notes them in ``skipped`` (a :class:`~src.data.base.SkipLog`) when
    given. Returns the kept records.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    kept, made, reused = [], 0, 0
    for r in records:
        if r.mask is not None or not r.polygons:
            kept.append(r)
            continue
        try:
            for poly in r.polygons:
                p = np.asarray(poly, np.float64)
                if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3 or not np.all(np.isfinite(p)):
                    raise DataError(f"{r.image}: polygon needs at least 3 finite (x, y) points, got shape {p.shape}")
            w, h = r.width, r.height
            if not w or not h:
                from .base import probe_image

                w, h = probe_image(r.image)
                r.width, r.height = w, h
            path = cache / mask_cache_name(r.image, r.polygons, w, h)
            if path.is_file():
                reused += 1
            else:
                _write_png_atomic(path, rasterise_polygons(r.polygons, w, h))
                made += 1
            r.mask = str(path)
            kept.append(r)
        except DataError as e:
            if on_error == "raise":
                raise
            log.warning("skipping %s", e)
            if skipped is not None:
                skipped.add(r.image, str(e))
    if made or reused:
        log.info("materialise_masks: %d mask files written, %d reused in %s", made, reused, cache)
    return kept


# ---------------------------------------------------------------------------------------
# mask arrays
# ---------------------------------------------------------------------------------------
def load_mask(path: str | Path) -> np.ndarray:
    """Boolean ``[H, W]`` mask from a file (non-zero in any channel = tumour)."""
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        p = Path(path)
        why = "file not found" if not p.is_file() else "corrupt or unreadable image"
        raise DataError(f"{path}: mask {why}")
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 0


def mask_to_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight normalised xyxy box of a mask (``[H, W]`` or ``[H, W, 1]``), None if empty.

    ``x_min = first_col / W``, ``x_max = (last_col + 1) / W`` (pixel edges).
    """
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > 0
    h, w = m.shape
    cols = np.flatnonzero(m.any(axis=0))
    rows = np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        return None
    return np.array([cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h], np.float32)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize with half-pixel centres (as ``tf.image.resize(method='nearest')``)."""
    h, w = mask.shape[:2]
    if (h, w) == (height, width):
        return mask
    rows = np.minimum(np.floor((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def pack_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compact form of a binary mask: ``(box, bits)`` where ``box`` is int32
    ``[y0, x0, h, w]`` of the mask's bounding box (zeros when empty) and ``bits`` the crop
    packed 8 pixels a byte, rows padded to whole bytes (``np.packbits`` order)."""
    m = np.asarray(mask, bool)
    if m.ndim == 3:
        m = m[..., 0]
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return np.zeros(4, np.int32), np.zeros(0, np.uint8)
    cols = np.flatnonzero(m.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = m[y0:y1, x0:x1]
    return np.array([y0, x0, y1 - y0, x1 - x0], np.int32), np.packbits(crop, axis=1).ravel()


def unpack_mask(box: np.ndarray, bits: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_mask`: boolean ``shape`` (``[H, W]``) mask."""
    out = np.zeros(tuple(shape)[:2], bool)
    y0, x0, h, w = (int(v) for v in box)
    if h and w:
        crop = np.unpackbits(np.asarray(bits, np.uint8).reshape(h, -1), axis=1)[:, :w]
        out[y0:y0 + h, x0:x0 + w] = crop.astype(bool)
    return out
