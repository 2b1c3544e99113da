"""Image hashes kept on disk, one row per file, so a second run hashes nothing.

:class:`HashCache` is a SQLite file (``<cache_dir>/duplicates/hashes-v1.sqlite``; the
standard library's ``sqlite3``: concurrent runs wait for each other's writes instead of
clobbering a file). A row is keyed by the file's absolute path and the hash size, keeps
the file's size and ``mtime_ns``, and is used only while both still match: an edited or
replaced image is hashed again. Paths, not contents, are the key: one cache serves every
dataset under one ``cache_dir`` (several sources mixed in one run hash each file once).

:func:`hash_files_cached` is :func:`.hashing.hash_files` in front of that cache: it hashes
only what the cache lacks (each path once), shows a progress bar when many files need
hashing, stores the new hashes and returns them in input order. Unreadable files are
returned with their error and never cached.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .hashing import ImageHashes, hash_files

log = logging.getLogger(__name__)

CACHE_FILE = "hashes-v1.sqlite"  # bump the version when what a hash means changes
PROGRESS_MIN = 256  # a progress bar when at least this many files need hashing (progress=None)
_SQL_VARS = 900  # paths per SELECT ... IN (...) (SQLite's old limit is 999 variables)


def _stat(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


class HashCache:
    """Hashes of image files under ``directory``, valid while a file's size and mtime are unchanged."""

    def __init__(self, directory: str | Path, hash_size: int = 16):
        self.path = Path(directory) / CACHE_FILE
        self.hash_size = int(hash_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(str(self.path), timeout=60)
        self._con.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT NOT NULL, hash_size INTEGER NOT NULL, "
                          "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, exact TEXT NOT NULL, phash BLOB, "
                          "flip BLOB, shape TEXT NOT NULL, PRIMARY KEY (path, hash_size))")
        self._con.commit()

    def lookup(self, stats: dict[str, Optional[tuple[int, int]]], flips: bool = False) -> dict[str, ImageHashes]:
        """The cached hashes of the paths in ``stats`` (path -> (size, mtime_ns)) that are still valid
        (and hold mirrored hashes when ``flips``)."""
        found: dict[str, ImageHashes] = {}
        paths = [p for p, st in stats.items() if st is not None]
        for i in range(0, len(paths), _SQL_VARS):
            part = paths[i:i + _SQL_VARS]
            rows = self._con.execute(
                f"SELECT path, size, mtime_ns, exact, phash, flip, shape FROM hashes WHERE hash_size = ? "
                f"AND path IN ({','.join('?' * len(part))})", [self.hash_size, *part])
            for path, size, mtime, exact, ph, fl, shape in rows:
                if (size, mtime) != stats[path] or (flips and fl is None):
                    continue
                found[path] = ImageHashes(
                    path=path, exact=exact, phash=None if ph is None else np.frombuffer(ph, np.uint8).copy(),
                    flip=None if fl is None else np.frombuffer(fl, np.uint8).copy(),
                    shape=tuple(int(v) for v in shape.split(",") if v))
        return found

    def store(self, hashes: Iterable[ImageHashes], stats: dict[str, Optional[tuple[int, int]]]) -> int:
        """Store the hashes of readable files whose stat is known; returns how many were stored."""
        rows = [(h.path, self.hash_size, *stats[h.path], h.exact,
                 None if h.phash is None else bytes(h.phash), None if h.flip is None else bytes(h.flip),
                 ",".join(str(v) for v in h.shape))
                for h in hashes if h.ok and stats.get(h.path) is not None]
        with self._con:
            self._con.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def close(self) -> None:
        self._con.close()


def open_cache(directory: Optional[str | Path], hash_size: int = 16) -> Optional[HashCache]:
    """A :class:`HashCache`, or ``None`` (with a warning) when ``directory`` is unset or unusable."""
    if directory in (None, ""):
        return None
    try:
        return HashCache(directory, hash_size)
    except (OSError, sqlite3.Error) as e:
        log.warning("image hash cache %s unusable (%s: %s): hashing without it", directory, type(e).__name__, e)
        return None


def hash_files_cached(paths: Iterable[str], cache_dir: Optional[str | Path] = None, hash_size: int = 16,
                      flips: bool = False, workers: Optional[int] = None, progress: Optional[bool] = None,
                      desc: str = "hashing images") -> tuple[list[ImageHashes], dict]:
    """Hashes of ``paths`` (in input order; paths made absolute), from the cache where valid.

    ``progress=None`` shows a bar only when at least :data:`PROGRESS_MIN` files need hashing.
    Returns ``(hashes, info)``; ``info`` holds ``images``, ``cached``, ``hashed``, ``seconds``
    and ``cache`` (the cache file, or ``None``).
    """
    t = time.perf_counter()
    paths = [os.path.abspath(str(p)) for p in paths]
    unique = list(dict.fromkeys(paths))
    stats = {p: _stat(p) for p in unique}
    cache = open_cache(cache_dir, hash_size)
    found: dict[str, ImageHashes] = {}
    try:
        if cache is not None:
            try:
                found = cache.lookup(stats, flips)
            except sqlite3.Error as e:
                log.warning("image hash cache %s unreadable (%s): hashing every file", cache.path, e)
        todo = [p for p in unique if p not in found]
        if todo:
            show = len(todo) >= PROGRESS_MIN if progress is None else bool(progress)
            new, _ = hash_files(todo, hash_size, flips, workers, progress=show, desc=desc)
            found.update((h.path, h) for h in new)
            if cache is not None:
                try:
                    cache.store(new, stats)
                except sqlite3.Error as e:
                    log.warning("image hash cache %s not written (%s)", cache.path, e)
    finally:
        if cache is not None:
            cache.close()
    info = {"images": len(paths), "cached": len(unique) - len(todo), "hashed": len(todo),
            "seconds": round(time.perf_counter() - t, 3), "cache": None if cache is None else str(cache.path)}
    return [found[p] for p in paths], info
