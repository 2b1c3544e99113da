"""``yolo`` reader: YOLO detection and YOLO-seg label files, with optional mask files.

Accepted layouts (detected; ``<split>`` is any name ``canonical_split`` knows: train,
val, valid, validation, test, Training ...)::

    <root>/images/<split>/<stem>.<ext>   <root>/labels/<split>/<stem>.txt   [<root>/masks/<split>/<stem>.png]
    <root>/<split>/images/<stem>.<ext>   <root>/<split>/labels/<stem>.txt   [<root>/<split>/masks/<stem>.png]
    <root>/images/<stem>.<ext>           <root>/labels/<stem>.txt           [<root>/masks/<stem>.png]

The last (flat) layout has no split, unless ``root`` itself is named like a split. The
class names come from ``<root>/data.yaml`` (``names`` as a list or an ``{id: name}``
dict; ``nc``, when given, must agree), or from option ``names``; every name goes
through the :class:`~src.data.records.ClassMap` alias table. Any ``train:``/``val:``
paths in ``data.yaml`` are ignored: the layout on disk is what is read.

Label files (blank lines ignored, a missing trailing newline is fine):

* ``cls xc yc w h`` (normalised centre and size): a box;
* ``cls x1 y1 x2 y2 ... xn yn`` (YOLO-seg, n >= 3, normalised): a polygon, and its
  bounding box. An odd number of coordinates, fewer than 3 points, a non-number or an
  unknown class id is an error naming ``file:line``; so is a box of a ``no_tumor`` class.

Per image:

* label file with lines: label = the class shared by all boxes, else the class of the
  largest box; boxes known; mask known when a mask file exists (``record.mask``; it
  takes precedence over polygons) or when every line is a polygon (``record.polygons``);
* **empty** label file: the YOLO convention for a background image: a healthy slice,
  ``no_tumor``, boxes known and empty, mask known (the mask file, or empty polygons);
* **missing** label file: unlabelled (``label=None``, nothing known; a mask file, when
  present, is still used and marked known). Option ``unannotated: negative`` treats a
  missing label file like an empty one.

Mask files (``<stem>.png``, single channel, 0/255 or 0/1) must have the image's size.
Label files without an image are logged and listed in :attr:`YoloReader.orphans`.

Options: ``source`` (default ``"yolo"``), ``names`` (overrides data.yaml),
``unannotated`` (``unknown`` | ``negative``), ``workers`` (probe threads).
"""
from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np

from ..base import Reader, canonical_split, list_images, register_reader
from ..records import NO_TUMOR, DataError, Record
from .coco import (canonical_class, label_from_boxes, normalised_box,
                   normalised_polygon, unannotated_record)
from .folder import check_options, parallel_map, probe_many

log = logging.getLogger(__name__)

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
MASK_MODES = ("L", "1", "P", "I", "I;16", "I;16B", "I;16L")


def _split_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and canonical_split(d.name))


def _probe_mask(path: Path) -> tuple[int, int, str]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0], im.size[1], im.mode


@register_reader("yolo")
class YoloReader(Reader):
    """YOLO detect / YOLO-seg labels (+ optional mask files) with ``data.yaml`` names."""

    OPTIONS = ("names", "unannotated")

    def __init__(self, root, class_map=None, on_error="raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        check_options(self, self.OPTIONS)
        self.unannotated = self.unannotated_mode()
        self.source = self.options.get("source", self.name)
        self.names: dict[int, str] = {}      # class id -> canonical name
        self.raw_names: dict[int, str] = {}  # class id -> name as the dataset spells it
        self.orphans: list[str] = []  # label files without an image (logged, not read)

    # names -----------------------------------------------------------------------------
    def _load_names(self) -> None:
        names = self.options.get("names")
        where = "option data.names"
        if names is None:
            yml = next((self.root / n for n in YAML_NAMES if (self.root / n).is_file()), None)
            if yml is None:
                raise DataError(f"{self.root}: no data.yaml with the class names (names: [..] or "
                                "{id: name}); add one or pass option names")
            import yaml

            try:
                with open(yml) as f:
                    cfg = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError) as e:
                raise DataError(f"{yml}: unreadable YAML ({e})") from e
            if not isinstance(cfg, dict) or "names" not in cfg:
                raise DataError(f"{yml}: has no 'names' (list or {{id: name}})")
            names, where = cfg["names"], str(yml)
            nc = cfg.get("nc")
            if nc is not None and nc != len(names or ()):
                raise DataError(f"{yml}: nc={nc} but {len(names or ())} names")
        if isinstance(names, Sequence) and not isinstance(names, str):  # list, tuple, ListConfig
            pairs = list(enumerate(names))
        elif isinstance(names, Mapping):  # dict, DictConfig
            try:
                pairs = [(int(k), v) for k, v in names.items()]
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: class ids in names must be integers ({e})") from e
        else:
            raise DataError(f"{where}: names must be a list or an {{id: name}} dict, got {names!r}")
        if not pairs:
            raise DataError(f"{where}: names is empty")
        for i, n in pairs:
            self.raw_names[i] = str(n)
            self.names[i] = self.class_map.canonical(str(n), where=where)

    # layout ----------------------------------------------------------------------------
    def layout(self) -> list[tuple[Optional[str], Path, Path, Path]]:
        """``[(split, images folder, labels folder, masks folder)]``; the masks folder may not exist."""
        units = []
        img = self.root / "images"
        for d in _split_dirs(img):
            units.append((canonical_split(d.name), d, self.root / "labels" / d.name, self.root / "masks" / d.name))
        for d in _split_dirs(self.root):
            if (d / "images").is_dir():
                units.append((canonical_split(d.name), d / "images", d / "labels", d / "masks"))
        if img.is_dir() and list_images(img):
            if units:
                raise DataError(f"{img}: holds images and also split folders; use one layout")
            units.append((canonical_split(self.root.name), img, self.root / "labels", self.root / "masks"))
        if not units:
            raise DataError(
                f"{self.root}: no YOLO layout found; expected images/<split>/ + labels/<split>/, "
                "<split>/images/ + <split>/labels/, or images/ + labels/")
        splits = [u[0] for u in units]
        dup = sorted({s for s in splits if splits.count(s) > 1})
        if dup:
            raise DataError(f"{self.root}: several folders hold the same split {dup}: "
                            f"{[str(u[1]) for u in units]}")
        return units

    # read ------------------------------------------------------------------------------
    def read_records(self) -> list[Record]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: reader 'yolo' needs a folder")
        self._load_names()
        items = []  # (split, image, label file or None, mask file or None)
        for split, img_dir, lab_dir, mask_dir in self.layout():
            seen: dict[str, Path] = {}
            for p in list_images(img_dir):
                if p.stem in seen:
                    self.fail(p, f"two images share the stem {p.stem!r} ({seen[p.stem].name}), so one "
                                 "label file would serve both")
                    continue
                seen[p.stem] = p
                lab = lab_dir / f"{p.stem}.txt"
                mask = mask_dir / f"{p.stem}.png"
                items.append((split, p, lab if lab.is_file() else None, mask if mask.is_file() else None))
            if lab_dir.is_dir():
                orphans = sorted(q.name for q in lab_dir.glob("*.txt") if q.stem not in seen)
                if orphans:
                    log.warning("yolo reader: %d label file(s) in %s have no image (e.g. %s)",
                                len(orphans), lab_dir, orphans[0])
                    self.orphans.extend(str(lab_dir / n) for n in orphans)
        sizes = probe_many(self, [it[1] for it in items])
        mask_info = self._probe_masks([it[3] for it in items])
        records = []
        for (split, image, lab, mask), size, minfo in zip(items, sizes, mask_info):
            if size is None:
                continue
            if mask is not None:
                if isinstance(minfo, Exception):
                    self.fail(mask, f"corrupt or unreadable mask ({minfo.__class__.__name__}: {minfo})")
                    continue
                mw, mh, mode = minfo
                if (mw, mh) != size:
                    self.fail(mask, f"mask size {mw}x{mh} differs from its image {image} ({size[0]}x{size[1]})")
                    continue
                if mode not in MASK_MODES:
                    self.fail(mask, f"mask is not single-channel (PIL mode {mode}); expected 0/255 or 0/1 grey")
                    continue
            rec = self._record(image, size, lab, mask)
            if rec is not None:
                rec.split, rec.source = split, self.source
                records.append(rec)
        records.sort(key=lambda r: r.image)
        return records

    def _probe_masks(self, masks: list[Optional[Path]]) -> list:
        def one(p):
            if p is None:
                return None
            try:
                return _probe_mask(p)
            except Exception as e:  # noqa: BLE001 - reported per file by the caller
                return e

        return parallel_map(self, one, masks)

    def _record(self, image: Path, size: tuple[int, int], lab: Optional[Path],
                mask: Optional[Path]) -> Optional[Record]:
        w, h = size
        meta = {"label_file": str(lab) if lab else None}
        if lab is None:
            if self.unannotated == "negative":
                return unannotated_record(image, size, "negative", mask=str(mask) if mask else None,
                                          polygons=None if mask else [], meta=meta)
            rec = unannotated_record(image, size, "unknown", meta=meta)
            if mask is not None:
                rec.mask = str(mask)
                rec.known["mask"] = True
            return rec
        try:
            text = lab.read_text()
        except (OSError, UnicodeDecodeError) as e:
            self.fail(lab, f"unreadable label file ({e.__class__.__name__}: {e})")
            return None
        boxes, classes, polygons = [], [], []
        all_polygons = True
        for lineno, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{lab}:{lineno}"
            try:
                values = [float(v) for v in parts]
            except ValueError:
                self.fail(where, f"malformed line {line.strip()!r} (expected numbers: class xc yc w h, "
                                 "or class x1 y1 ... xn yn)")
                return None
            cid, coords = values[0], np.asarray(values[1:], np.float64)
            if not np.isfinite(cid) or cid != int(cid) or int(cid) not in self.names:
                self.fail(where, f"unknown class id {parts[0]!r} (names: {self.raw_names})")
                return None
            cls = self.names[int(cid)]
            if cls == NO_TUMOR:
                self.fail(where, f"a box of class {self.raw_names[int(cid)]!r} (= no_tumor) makes no sense; "
                                 "healthy slices have an empty label file")
                return None
            if len(coords) == 4:
                xc, yc, bw, bh = coords
                all_polygons = False
                box = normalised_box(self, (xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2), w, h, where)
            elif len(coords) >= 6 and len(coords) % 2 == 0:
                poly = normalised_polygon(self, coords.reshape(-1, 2), w, h, where)
                if poly is None:
                    return None
                polygons.append(poly)
                box = normalised_box(self, (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(),
                                            poly[:, 1].max()), w, h, where)
            else:
                self.fail(where, f"malformed line: {len(coords)} coordinates after the class "
                                 "(4 for a box, an even number >= 6 for a polygon)")
                return None
            if box is None:
                return None
            boxes.append(box)
            classes.append(cls)
        if not boxes:  # empty label file: a background (healthy) image
            return Record(image=str(image), label=NO_TUMOR, mask=str(mask) if mask else None,
                          polygons=None if mask else [],
                          known={"label": True, "boxes": True, "mask": True},
                          width=w, height=h, meta=meta)
        boxes = np.stack(boxes)
        rec = Record(image=str(image), label=label_from_boxes(boxes, classes), boxes=boxes,
                     box_classes=tuple(classes), width=w, height=h, meta=meta,
                     known={"label": True, "boxes": True, "mask": bool(mask) or all_polygons})
        if mask is not None:
            rec.mask = str(mask)
        elif all_polygons:
            rec.polygons = polygons
        return rec
