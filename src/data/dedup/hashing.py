"""Per-image hashes: an exact hash of the decoded pixels and perceptual hashes.

Canonical pixels (what the *exact* hash covers)
-----------------------------------------------
Every file is decoded with Pillow (``Image.open(...).load()``; EXIF orientation is *not*
applied: the pixels as stored) into a canonical ``uint8`` array:

* grey ``(H, W)`` when the image has no colour: one channel (``L``, ``1``, ``LA``), or
  three channels that are equal everywhere (a grey slice saved as RGB);
* RGB ``(H, W, 3)`` otherwise (palette, CMYK, YCbCr are converted to RGB; alpha is dropped);
* 16-bit / 32-bit / float images keep their own dtype for the exact hash, and are min-max
  scaled to ``uint8`` for the perceptual hash.

The exact hash is BLAKE2b (128 bit) of the array's shape, dtype and bytes. So the same
pixels match whatever the container: a PNG written from a JPEG's decoded pixels is an
*exact* duplicate of that JPEG, and so is a grey slice stored once as ``L`` and once as
``RGB``. A JPEG that is decoded and *encoded again as JPEG* has different pixels (JPEG is
lossy): it is not an exact duplicate; the perceptual (near) pass finds it.

Perceptual hash (the *near* pass): :func:`imagehash.phash` of the canonical image
(``hash_size**2`` bits, packed into bytes; the default ``hash_size=16`` gives 256 bits:
on the Kaggle MRI set 64-bit hashes put hundreds of different slices at distance 0). With
``flips=True`` the horizontally mirrored image is hashed too (``flip`` bits), so a
left-right mirrored copy can be matched; without it a mirrored copy is *not* a duplicate.

:func:`hash_files` hashes many files in a thread pool (decoding, resizing and BLAKE2b
release the GIL), streaming: at most a few chunks are in flight, results come back in
input order, progress on stderr (tqdm when installed, else a counter every 10%).
:func:`src.data.dedup.cache.hash_files_cached` keeps the hashes on disk per file.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..records import DataError


@dataclass
class ImageHashes:
    """Hashes of one image (or the error that kept it from being hashed)."""

    path: str
    exact: str = ""  # BLAKE2b hex of the canonical pixels
    phash: Optional[np.ndarray] = None  # packed bits, uint8 (hash_size**2 / 8 bytes)
    flip: Optional[np.ndarray] = None  # packed bits of the mirrored image (flips=True)
    shape: tuple = ()  # canonical array shape: (H, W) grey or (H, W, 3) RGB
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def phash_hex(self) -> str:
        return "" if self.phash is None else bytes(self.phash).hex()


def canonical_array(im) -> np.ndarray:
    """The canonical pixel array of a loaded PIL image (see the module docstring)."""
    mode = im.mode
    if mode in ("L", "RGB"):
        a = np.asarray(im)
    elif mode in ("1", "LA", "La"):
        a = np.asarray(im.convert("L"))
    elif mode.startswith("I") or mode == "F":
        a = np.asarray(im)
        if a.dtype.byteorder not in ("=", "|"):
            a = a.astype(a.dtype.newbyteorder("="))
    else:  # P, PA, RGBA, RGBa, CMYK, YCbCr, LAB, HSV
        a = np.asarray(im.convert("RGB"))
    if a.ndim == 3 and a.shape[2] == 3 and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]):
        a = a[..., 0]
    return np.ascontiguousarray(a)


def exact_hash(a: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def phash_bits(img, hash_size: int = 16) -> np.ndarray:
    """Packed ``imagehash.phash`` bits of a PIL image (``hash_size**2 / 8`` bytes)."""
    import imagehash

    return np.packbits(imagehash.phash(img, hash_size=hash_size).hash.reshape(-1))


def hash_file(path: str, hash_size: int = 16, flips: bool = False, perceptual: bool = True) -> ImageHashes:
    """Hashes of one image file. Never raises for a bad file: the error is returned.

    ``perceptual=False`` computes the exact hash only (about twice as fast)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            a = canonical_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return ImageHashes(path=path, error=f"{path}: unreadable image ({e.__class__.__name__}: {e})")
    try:
        ex = exact_hash(a)
        ph = fl = None
        if perceptual:
            img = Image.fromarray(_to_uint8(a))
            ph = phash_bits(img, hash_size)
            fl = phash_bits(ImageOps.mirror(img), hash_size) if flips else None
    except Exception as e:  # noqa: BLE001 - reported with the file name
        return ImageHashes(path=path, error=f"{path}: cannot hash ({e.__class__.__name__}: {e})")
    return ImageHashes(path=path, exact=ex, phash=ph, flip=fl, shape=tuple(a.shape))


# ---- parallel, streaming ---------------------------------------------------------------
class Progress:
    """A progress bar on stderr: tqdm when installed, else a line every 10%."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self._bar = None
        self._next = 0.1
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5,
                                 dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.n += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
        elif self.total and self.n / self.total >= self._next:
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)
            while self._next <= self.n / self.total:
                self._next += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def default_workers(workers: Optional[int]) -> int:
    return (os.cpu_count() or 1) if not workers or int(workers) <= 0 else int(workers)


def parallel_imap(fn: Callable, items: Sequence, workers: int, chunk: int = 32,
                  progress: Optional[Progress] = None) -> Iterator:
    """``fn(x) for x in items`` in threads, in input order, with a bounded window of chunks."""
    items = list(items)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    run = lambda c: [fn(x) for x in c]  # noqa: E731
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            out = run(c)
            if progress:
                progress.update(len(c))
            yield from out
        return
    window: deque = deque()
    it = iter(chunks)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dedup-hash") as ex:
        for c in it:
            window.append((len(c), ex.submit(run, c)))
            if len(window) >= 3 * workers:
                break
        while window:
            k, fut = window.popleft()
            out = fut.result()
            if progress:
                progress.update(k)
            nxt = next(it, None)
            if nxt is not None:
                window.append((len(nxt), ex.submit(run, nxt)))
            yield from out


def hash_files(paths: Iterable[str], hash_size: int = 16, flips: bool = False, workers: Optional[int] = None,
               progress: bool = True, desc: str = "hashing", perceptual: bool = True) -> tuple[list[ImageHashes], dict]:
    """Hash every file (in input order); returns ``(hashes, timing)``.

    ``timing`` holds ``images``, ``seconds``, ``images_per_s`` and ``workers``.
    """
    paths = [str(p) for p in paths]
    w = default_workers(workers)
    bar = Progress(len(paths), desc, enabled=progress)
    t = time.perf_counter()
    try:
        out = list(parallel_imap(lambda p: hash_file(p, hash_size, flips, perceptual), paths, w, progress=bar))
    finally:
        bar.close()
    dt = time.perf_counter() - t
    return out, {"images": len(paths), "seconds": round(dt, 3),
                 "images_per_s": round(len(paths) / dt, 1) if dt > 0 else None, "workers": w}


def raise_or_drop(hashes: list[ImageHashes], on_error: str = "raise") -> list[int]:
    """Indices of hashed images; raise :class:`DataError` for the first failure unless skipping."""
    bad = [h for h in hashes if not h.ok]
    if bad and on_error != "skip":
        raise DataError(f"{bad[0].error}  ({len(bad)} unreadable image(s); set data.on_error=skip to skip "
                        "them and count them)")
    return [i for i, h in enumerate(hashes) if h.ok]
