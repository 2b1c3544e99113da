"""``roboflow_csv`` reader: Roboflow's "TensorFlow Object Detection CSV" export.

Accepted layouts::

    <root>/<split>/_annotations.csv   one per split folder present (train, valid, test ...)
    <root>/_annotations.csv           a single file; the split is the root's name when it
                                      is named like one, else None

Images lie beside the csv. The csv has a header naming (in any order) the columns
``filename,width,height,class,xmin,ymin,xmax,ymax`` (pixels); an image with several
boxes has several rows. Per image:

* boxes: every row, normalised to ``[0, 1]`` xyxy by the row's width/height, which must
  match the image file (probed). Up to 1 pixel outside the image is clipped; further
  out, or an empty/inverted box, is an error naming ``csv:line``;
* label: the class shared by all boxes, else the class of the largest box; class names
  go through the :class:`~src.data.records.ClassMap` alias table (a ``no_tumor`` box is
  an error); mask unknown (this format has none);
* an image in the folder with no row: unlabelled (``label=None``, nothing known), or a
  healthy slice with option ``unannotated: negative``;
* a row naming a missing image: an error naming ``csv:line`` and the image.

Options: ``source`` (default ``"roboflow_csv"``), ``unannotated`` (``unknown`` |
``negative``), ``annotation_file`` (default ``_annotations.csv``), ``workers``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from ..base import AnnotationFileReader, list_images, register_reader
from ..records import NO_TUMOR, Record
from .coco import canonical_class, label_from_boxes, pixel_box, unannotated_record
from .folder import probe_many

ANNOTATION_FILE = "_annotations.csv"
COLUMNS = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")


@register_reader("roboflow_csv")
class RoboflowCsvReader(AnnotationFileReader):
    """Boxes from Roboflow's TensorFlow CSV export; images without rows stay unlabelled."""

    OPTIONS = ("unannotated", "annotation_file")

    ANNOTATION_FILE = ANNOTATION_FILE

    def _rows(self, ann: Path) -> Optional[dict]:
        """``{image file name: [(line, row dict)]}``, or None after a failure."""
        rows: dict[str, list] = {}
        try:
            with open(ann, newline="") as f:
                reader = csv.DictReader(f)
                header = [c.strip().lower() for c in (reader.fieldnames or [])]
                missing = [c for c in COLUMNS if c not in header]
                if missing:
                    self.fail(ann, f"csv header lacks column(s) {missing} (has {reader.fieldnames}; "
                                   f"expected {','.join(COLUMNS)})")
                    return None
                reader.fieldnames = header
                for row in reader:
                    if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        continue
                    rows.setdefault((row["filename"] or "").strip(), []).append((reader.line_num, row))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            self.fail(ann, f"unreadable csv ({e.__class__.__name__}: {e})")
            return None
        return rows

    def _read_file(self, ann: Path, split: Optional[str]) -> list[Record]:
        rows = self._rows(ann)
        if rows is None:
            return []
        folder = ann.parent
        images = list_images(folder)
        listed = {p.name for p in images}
        for name, lines in sorted(rows.items()):
            if name in listed:
                continue
            if not name or not (folder / name).is_file():
                self.fail(f"{ann}:{lines[0][0]}", f"image file not found: {folder / name}")
            else:
                self.fail(f"{ann}:{lines[0][0]}", f"{folder / name} is not an image beside the csv "
                                                  "(expected a file name with an image extension)")
        sizes = probe_many(self, images)
        records = []
        for path, size in zip(images, sizes):
            if size is None:
                continue
            meta = {"annotation_file": str(ann)}
            lines = rows.get(path.name)
            if not lines:
                records.append(unannotated_record(path, size, self.unannotated, source=self.source,
                                                  split=split, meta=meta))
                continue
            rec = self._record(ann, path, size, lines)
            if rec is not None:
                rec.split, rec.source, rec.meta = split, self.source, meta
                records.append(rec)
        return records

    def _record(self, ann: Path, path: Path, size: tuple[int, int], lines: list) -> Optional[Record]:
        w, h = size
        boxes, classes = [], []
        for line, row in lines:
            where = f"{ann}:{line}"
            try:
                rw, rh = int(float(row["width"])), int(float(row["height"]))
                xyxy = [float(row[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                self.fail(where, f"malformed row (width, height, xmin, ymin, xmax, ymax must be numbers): "
                                 f"{dict(row)} for image {path.name}")
                return None
            if (rw, rh) != (w, h):
                self.fail(where, f"image size mismatch ({path} is {w}x{h}, the row says {rw}x{rh})")
                return None
            cls = canonical_class(self, (row["class"] or "").strip(), where=where)
            if cls is None:
                return None
            if cls == NO_TUMOR:
                self.fail(where, f"a box of class {row['class']!r} (= no_tumor) makes no sense; healthy "
                                 "slices have no row (use unannotated=negative)")
                return None
            box = pixel_box(self, xyxy, w, h, f"{where} (image {path.name})")
            if box is None:
                return None
            boxes.append(box)
            classes.append(cls)
        boxes = np.stack(boxes)
        return Record(image=str(path), label=label_from_boxes(boxes, classes), boxes=boxes,
                      box_classes=tuple(classes), width=w, height=h,
                      known={"label": True, "boxes": True, "mask": False})
