"""Packed masks (``data.mask_format: packed``, the pipeline's default): every mask read
once when the dataset is built, resized (nearest) to its place in the target frame and
kept as a bit-packed crop of its bounding box (:func:`encode_packed_masks`, cached
between runs), then expanded -- or warped -- a batch at a time in the graph
(:class:`PackedMasks`). Used by :mod:`src.data.pipeline`."""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from . import augment as aug
from .records import DataError, Record

log = logging.getLogger(__name__)


# tf.map_fn parallel_iterations inside one batch call: image decodes in flight (the
# pipeline's per-batch decode) and masks expanded at once (PackedMasks.unpack)
_MAP_FN_PARALLEL = 8


def _pack_one(path: Optional[str], geo, size):
    from .masks import load_mask, pack_mask, resize_nearest

    if path is None:
        return np.zeros(4, np.int32), np.zeros(0, np.uint8)
    nh, nw, top, left = geo
    box, bits = pack_mask(resize_nearest(load_mask(path), nh, nw))
    if box[2]:
        box = box + np.array([top, left, 0, 0], np.int32)
    return box, bits


def _mask_sources(records: Sequence[Record], heads: set) -> list[Optional[str]]:
    out = []
    for r in records:
        if "mask" not in heads or not r.known.get("mask"):
            out.append(None)
            continue
        if r.mask is None and r.polygons:
            raise DataError(f"{r.image}: the mask is given as polygons but has no mask file: set "
                            "data.mask_cache_dir (build_dataset rasterises them there) or call "
                            "src.data.masks.materialise_masks(records, cache_dir) first")
        out.append(r.mask)
    return out


def encode_packed_masks(paths: Sequence[Optional[str]], geometry: Sequence, size,
                        cache_dir: Optional[str | Path] = None, workers: Optional[int] = None):
    """Every mask at its place in the target frame, packed (:func:`src.data.masks.pack_mask`).

    Returns ``(boxes int32 [N, 4], bits uint8 flat, lengths int64 [N])``; ``None`` paths
    give empty masks. Masks are decoded in a thread pool (OpenCV releases the GIL). With
    ``cache_dir`` the result is kept in ``cache_dir/masks-<hash>.npz``, keyed by the mask
    files (path, size, modification time) and the geometry, and reused by the next run.
    """
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha1()
        h.update(b"packed-v1|" + repr(tuple(size)).encode())
        for p, g in zip(paths, geometry):
            if p is None:
                h.update(b"-;")
                continue
            try:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{tuple(g)};".encode())
            except OSError:
                h.update(f"{p}|missing;".encode())
        cache_file = Path(cache_dir).expanduser() / f"masks-{h.hexdigest()[:24]}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file) as z:
                    return z["boxes"], z["bits"], z["lengths"]
            except Exception:  # noqa: BLE001 - a bad cache file is rebuilt
                log.warning("ignoring unreadable mask cache %s", cache_file)
    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    jobs = list(zip(paths, geometry))
    if sum(p is not None for p in paths) > 64 and workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            packed = list(ex.map(lambda a: _pack_one(a[0], a[1], size), jobs, chunksize=32))
    else:
        packed = [_pack_one(p, g, size) for p, g in jobs]
    boxes = np.stack([b for b, _ in packed]).astype(np.int32) if packed else np.zeros((0, 4), np.int32)
    lengths = np.array([len(bits) for _, bits in packed], np.int64)
    bits = np.concatenate([bits for _, bits in packed]).astype(np.uint8) if packed else np.zeros(0, np.uint8)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, boxes=boxes, bits=bits, lengths=lengths)
        os.replace(tmp, cache_file)
    return boxes, bits, lengths


def _unpack_mask(box, bits, H: int, W: int):
    """Packed bounding-box crop (:func:`src.data.masks.pack_mask`) -> uint8 ``[H, W, 1]``."""
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    wp = (w + 7) // 8 * 8
    shifts = tf.constant([7, 6, 5, 4, 3, 2, 1, 0], tf.uint8)
    unpacked = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits[:, None], shifts), 1)
    crop = tf.reshape(unpacked, [h, wp])[:, :w]
    m = tf.pad(crop, [[y0, H - y0 - h], [x0, W - x0 - w]])
    return tf.reshape(m, [H, W, 1])


class PackedMasks:
    """Every mask of a dataset in the target frame, bit-packed (a crop of its bounding box,
    8 pixels a byte: :func:`src.data.masks.pack_mask`; a few hundred bytes a mask), kept
    outside the tf.data elements and expanded -- or warped -- a batch at a time by record
    index. ``python``: NumPy/OpenCV inside the graph (``tf.numpy_function``: a few
    microseconds a mask); else TensorFlow ops only (``warp: xla | tf``; ~0.15 ms a mask)."""

    def __init__(self, boxes, bits, lengths, size, python: bool = True):
        self.boxes = np.asarray(boxes, np.int32).reshape(-1, 4)
        self.bits = np.asarray(bits, np.uint8)
        self.splits = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int64)
        self.size = (int(size[0]), int(size[1]))
        self.python = bool(python)
        self._ragged = None

    def _call(self, fn, args):
        H, W = self.size
        m = tf.numpy_function(fn, args, tf.uint8, stateful=False)
        m.set_shape([args[0].shape[0], H, W, 1])
        return m

    def unpack(self, rows):
        """uint8 ``[B, H, W, 1]`` masks of records ``rows`` ([B] int)."""
        H, W = self.size
        if self.python:
            return self._call(lambda r: aug._unpack_packed_np(r, self.boxes, self.bits, self.splits, H, W), [rows])
        if self._ragged is None:
            self._ragged = (tf.constant(self.boxes), tf.RaggedTensor.from_row_splits(
                tf.constant(self.bits), tf.constant(self.splits), validate=False))
        boxes, bits = (tf.gather(v, rows) for v in self._ragged)
        return tf.map_fn(lambda a: _unpack_mask(a[0], a[1], H, W), (boxes, bits),
                         fn_output_signature=tf.TensorSpec([H, W, 1], tf.uint8), parallel_iterations=_MAP_FN_PARALLEL)

    def warp_with_images(self, rows, matrices, images):
        """``(images, masks)`` warped by ``matrices`` in one OpenCV call: images bilinear
        (:func:`src.data.augment.warp`), the masks of records ``rows`` nearest, straight
        from their packed crops (:func:`src.data.augment._warp_packed_np`)."""
        H, W = self.size
        coef = aug.index_transforms(matrices, (H, W))
        none = np.zeros([0, 1, 1, 1], np.uint8)

        def both(imgs, r, c):
            return (aug._warp_cv2_np(imgs, none, c)[0],
                    aug._warp_packed_np(c, r, self.boxes, self.bits, self.splits, H, W))

        out, m = tf.numpy_function(both, [images, rows, coef], [images.dtype, tf.uint8], stateful=False)
        out.set_shape(images.shape)
        m.set_shape([images.shape[0], H, W, 1])
        return out, m
