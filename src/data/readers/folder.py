"""``folder`` reader: one folder per class, optionally inside split folders.

Accepted layouts (detected, in this order)::

    <root>/<split>/<class>/<image>     split folders: Training/Testing, train/val/test,
                                       valid, validation (see ``canonical_split``)
    <root>/<class>/<image>             no split folders; when ``root`` itself is named
                                       like a split (``.../Training``) every record gets
                                       that split, else ``split=None``

Class folder names go through the :class:`~src.data.records.ClassMap` alias table
(``notumor``, ``no_tumor``, ``glioma_tumor``, ``yes``/``no`` ...); an unknown folder
name is an error naming the folder. Only the label is known: ``known`` is
``{"label": True, "boxes": False, "mask": False}`` for every image (also for healthy
slices: this reader does not claim their boxes or masks are known to be empty).

Files without an image extension (``.DS_Store``, ``Thumbs.db``, notes) and hidden
folders are ignored and listed in :attr:`FolderReader.ignored`; a file *with* an image
extension that cannot be read (corrupt, truncated) goes through :meth:`Reader.fail`
(error naming the file, or a counted skip with ``on_error=skip``).

Options (from config ``data.*``): ``source`` (default ``"folder"``), ``classes_from``
(only ``"folder"``), ``workers`` (threads used to probe images; 0 or 1 = no threads).
Any other option is an error.

This module also holds two helpers every reader here uses: :func:`check_options`,
:func:`parallel_map` and :func:`probe_many` (threaded, order-preserving image probing).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..base import IMAGE_EXTENSIONS, Reader, canonical_split, probe_image, register_reader
from ..records import DataError, Record

log = logging.getLogger(__name__)



# ---- helpers shared by the readers of this package -------------------------------------
def check_options(reader: Reader, allowed: Iterable[str]) -> None:
    """Raise :class:`DataError` for an option the reader does not know (no silent typos)."""
    reader.check_options(allowed)


def _probe_one(path: Path):
    try:
        return probe_image(path)
    except DataError as e:
        return e


def parallel_map(reader: Reader, fn: Callable, items: Sequence, min_threaded: int = 64) -> list:
    """``[fn(x) for x in items]`` in a thread pool, results in input order.

    Threads: option ``workers`` (default ``min(8, cpu_count)``; 0 or 1 = none). Work is
    handed out in chunks so that thread overhead stays small; ``fn`` should return its
    errors rather than raise them, so the caller can report them in order.
    """
    items = list(items)
    workers = reader.options.get("workers")
    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    if workers <= 1 or len(items) < min_threaded:
        return [fn(x) for x in items]
    size = max(16, min(256, len(items) // (workers * 4) or 1))
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return [r for chunk in ex.map(lambda c: [fn(x) for x in c], chunks) for r in chunk]


def probe_many(reader: Reader, paths: Sequence[Path]) -> list[Optional[tuple[int, int]]]:
    """``(width, height)`` for each path, in input order; ``None`` for an unreadable file.

    Probing (:func:`~src.data.base.probe_image`) runs in threads (:func:`parallel_map`).
    Failures are reported afterwards, in input order, through ``reader.fail``, so errors
    and skip logs are deterministic: with ``on_error=raise`` the first bad file raises.
    """
    paths = list(paths)
    out: list[Optional[tuple[int, int]]] = []
    for p, r in zip(paths, parallel_map(reader, _probe_one, paths)):
        if isinstance(r, DataError):
            msg = str(r)
            prefix = f"{p}: "
            # the skip log groups by the text before the first colon: keep the reason first
            reader.fail(p, msg[len(prefix):] if msg.startswith(prefix) else msg)
            out.append(None)
        else:
            out.append(r)
    return out


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


# ---- the reader ----------------------------------------------------------------------
@register_reader("folder")
class FolderReader(Reader):
    """Images sorted into one folder per class (label known, boxes and mask unknown)."""

    OPTIONS = ("classes_from",)

    def __init__(self, root, class_map=None, on_error="raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        check_options(self, self.OPTIONS)
        classes_from = self.options.get("classes_from", "folder")
        if classes_from != "folder":
            raise DataError(f"reader 'folder': classes_from={classes_from!r} is not supported "
                            "(only 'folder': the class is the name of the image's folder)")
        self.source = self.options.get("source", self.name)
        self.ignored: list[str] = []  # non-image files and nested folders that were not read

    def _layout(self) -> list[tuple[Optional[str], Path]]:
        """``[(split, folder holding class folders)]``."""
        subdirs = _visible_dirs(self.root)
        split_dirs = [d for d in subdirs if canonical_split(d.name)]
        if split_dirs:
            others = [d for d in subdirs if not canonical_split(d.name)]
            if others:
                raise DataError(
                    f"{self.root}: mixes split folders {[d.name for d in split_dirs]} with other folders "
                    f"{[d.name for d in others]}; point data.root at one level (the split folders' "
                    "parent, or one split folder)")
            splits = [canonical_split(d.name) for d in split_dirs]
            dup = sorted({s for s in splits if splits.count(s) > 1})
            if dup:
                raise DataError(f"{self.root}: several folders name the same split {dup}: "
                                f"{[d.name for d in split_dirs]}")
            return [(canonical_split(d.name), d) for d in split_dirs]
        return [(canonical_split(self.root.name), self.root)]

    def read_records(self) -> list[Record]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: reader 'folder' needs a folder (one sub-folder per class)")
        items: list[tuple[Path, str, Optional[str], str]] = []  # path, label, split, folder name
        for split, base in self._layout():
            for cdir in _visible_dirs(base):
                try:
                    label = self.class_map.canonical(cdir.name, where=f"class folder {cdir}")
                except DataError as e:
                    self.fail(cdir, str(e))
                    continue
                for p in sorted(cdir.iterdir()):
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                        items.append((p, label, split, cdir.name))
                    else:
                        self.ignored.append(str(p))
            stray = [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if stray:
                log.warning("folder reader: %d image(s) directly in %s (not in a class folder) ignored, e.g. %s",
                            len(stray), base, stray[0].name)
                self.ignored.extend(str(p) for p in sorted(stray))
        if self.ignored:
            log.info("folder reader: ignored %d non-image files/folders under %s", len(self.ignored), self.root)
        sizes = probe_many(self, [it[0] for it in items])
        records = []
        for (path, label, split, folder), size in zip(items, sizes):
            if size is None:
                continue
            records.append(Record(
                image=str(path), label=label, source=self.source, split=split,
                known={"label": True, "boxes": False, "mask": False},
                width=size[0], height=size[1], meta={"class_folder": folder}))
        records.sort(key=lambda r: r.image)
        return records
