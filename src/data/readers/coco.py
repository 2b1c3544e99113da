"""``coco`` reader: Roboflow COCO exports (and plain COCO detection/segmentation files).

Accepted layouts::

    <root>/<split>/_annotations.coco.json   one per split folder present (train, valid/val,
                                            validation, test ...; split from canonical_split)
    <root>/_annotations.coco.json           a single file; the split is the root's name when
                                            it is named like one (``.../valid``), else None

Images lie beside the json (``file_name`` relative to the json's folder).

Per image:

* **boxes**: every annotation's ``bbox`` ``[x, y, w, h]`` (pixels) becomes a normalised
  ``[x_min, y_min, x_max, y_max]`` using the image's ``width``/``height`` from the json,
  which must match the image file (probed). Coordinates up to 1 pixel (or 1e-3) outside
  the image are clipped; further out is an error ("box outside the image"), and so is an
  empty or inverted box. All annotations are kept, ``box_classes`` names each one.
* **label**: the class shared by all boxes, or the class of the largest box when they
  differ. A box whose class is ``no_tumor`` is an error.
* **mask**: polygon segmentations become normalised ``polygons`` (all instances of the
  image); RLE segmentations (uncompressed ``counts`` list or compressed COCO string) are
  decoded without pycocotools and, together with the image's polygons, written as one
  0/255 PNG in ``cache_dir`` (``record.mask``). ``known["mask"]`` is True only when every
  annotation of the image has a segmentation.
* **no annotation**: by default the image is *unlabelled* (``label=None``, nothing known:
  not a negative). Option ``unannotated: negative`` makes such images healthy slices
  (``no_tumor``, every target known, no boxes, empty mask).
* **Roboflow's placeholder category** (id 0, when other categories exist, named like
  their supercategory, or with supercategory ``"none"`` while theirs is not) is not a
  class: annotations pointing at it are dropped and counted in :attr:`CocoReader.dropped`.
* ``iscrowd`` annotations are treated like the others.

Errors name the json (and the annotation/image id) or the image: a missing image file,
an annotation pointing at an unknown image or category id, an unknown class name, a
size mismatch, a box or polygon outside the image, an unreadable image.

Options: ``source`` (default ``"coco"``), ``unannotated`` (``unknown`` | ``negative``),
``cache_dir`` (default ``<root>/.btmtl_cache/masks``; only written when RLE masks exist),
``annotation_file`` (default ``_annotations.coco.json``), ``workers`` (probe threads).

This module also holds the box/polygon/label helpers shared by the ``yolo`` and
``roboflow_csv`` readers.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..base import AnnotationFileReader, Reader, register_reader
from ..records import NO_TUMOR, DataError, Record
from .folder import probe_many

log = logging.getLogger(__name__)

ANNOTATION_FILE = "_annotations.coco.json"


# ---- helpers shared by the annotation readers ------------------------------------------
def _tolerance(size: int) -> float:
    """Normalised slack for rounding: 1 pixel, and never less than 1e-3."""
    return max(1e-3, 1.0 / max(int(size), 1))


def normalised_box(reader: Reader, xyxy: Sequence[float], width: int, height: int,
                   where: str, what: str = "box") -> Optional[np.ndarray]:
    """Check and clip a normalised ``xyxy`` box; ``reader.fail`` and None when it is bad.

    ``where`` names the file (and line/annotation) for the error message.
    """
    b = np.asarray(xyxy, np.float64).reshape(4)
    if not np.all(np.isfinite(b)):
        reader.fail(where, f"non-finite {what} coordinates {b.tolist()}")
        return None
    tx, ty = _tolerance(width), _tolerance(height)
    lo = np.array([-tx, -ty, -tx, -ty])
    hi = 1.0 + np.array([tx, ty, tx, ty])
    if np.any(b < lo) or np.any(b > hi):
        reader.fail(where, f"{what} outside the image (normalised xyxy {np.round(b, 4).tolist()}, "
                           f"image {width}x{height})")
        return None
    b = np.clip(b, 0.0, 1.0)
    if b[2] <= b[0] or b[3] <= b[1]:
        reader.fail(where, f"empty or inverted {what} (normalised xyxy {np.round(b, 4).tolist()})")
        return None
    return b.astype(np.float32)


def pixel_box(reader: Reader, xyxy_px: Sequence[float], width: int, height: int,
              where: str) -> Optional[np.ndarray]:
    """Pixel ``xyxy`` -> checked, clipped, normalised ``xyxy`` (or None after ``fail``)."""
    b = np.asarray(xyxy_px, np.float64).reshape(4)
    return normalised_box(reader, b / np.array([width, height, width, height], np.float64),
                          width, height, where)


def normalised_polygon(reader: Reader, points: np.ndarray, width: int, height: int,
                       where: str) -> Optional[np.ndarray]:
    """Check and clip a normalised ``(K, 2)`` polygon; ``reader.fail`` and None when bad."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    if len(p) < 3:
        reader.fail(where, f"polygon needs at least 3 (x, y) points, got {len(p)}")
        return None
    if not np.all(np.isfinite(p)):
        reader.fail(where, "non-finite polygon coordinates")
        return None
    tx, ty = _tolerance(width), _tolerance(height)
    if (p[:, 0].min() < -tx or p[:, 0].max() > 1 + tx
            or p[:, 1].min() < -ty or p[:, 1].max() > 1 + ty):
        reader.fail(where, f"polygon outside the image (normalised x in [{p[:, 0].min():.4f}, "
                           f"{p[:, 0].max():.4f}], y in [{p[:, 1].min():.4f}, {p[:, 1].max():.4f}], "
                           f"image {width}x{height})")
        return None
    p = np.clip(p, 0.0, 1.0)
    if p[:, 0].max() <= p[:, 0].min() or p[:, 1].max() <= p[:, 1].min():
        reader.fail(where, "degenerate polygon (zero width or height)")
        return None
    return p.astype(np.float32)


def label_from_boxes(boxes: np.ndarray, classes: Sequence[str]) -> str:
    """The class shared by all boxes, else the class of the largest box (first on ties)."""
    if len(set(classes)) == 1:
        return classes[0]
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return classes[int(np.argmax(area))]


def unannotated_record(image: Path, size: tuple[int, int], mode: str, **fields) -> Record:
    """Record for an image without annotation: unlabelled (default) or a healthy slice."""
    if mode == "negative":
        return Record(image=str(image), label=NO_TUMOR, polygons=fields.pop("polygons", []),
                      known={"label": True, "boxes": True, "mask": True},
                      width=size[0], height=size[1], **fields)
    return Record(image=str(image), label=None,
                  known={"label": False, "boxes": False, "mask": False},
                  width=size[0], height=size[1], **fields)


def canonical_class(reader: Reader, name: str, where: str) -> Optional[str]:
    """Map a dataset class name; an unknown name fails naming ``where`` (None after a skip)."""
    try:
        c = reader.class_map.canonical(name, where=where)
    except DataError as e:
        reader.fail(where, str(e))
        return None
    return c


# ---- COCO run-length encoding (no pycocotools) -----------------------------------------
def rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (``maskApi.c: rleFrString``) into run lengths."""
    counts: list[int] = []
    p = 0
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(counts, height: int, width: int) -> np.ndarray:
    """COCO RLE (run lengths, column-major, starting with zeros) -> ``(H, W)`` uint8 0/1."""
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts)
    counts = np.asarray(counts, np.int64)
    if np.any(counts < 0) or counts.sum() != height * width:
        raise ValueError(f"RLE runs sum to {int(counts.sum())}, expected {height}x{width}={height * width}")
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape((width, height)).T.copy()


# ---- the reader ----------------------------------------------------------------------
def _placeholder_ids(categories: list[dict]) -> set:
    """Roboflow's placeholder supercategory: id 0 when other categories exist and either
    it is named like their supercategory, or its own supercategory is ``"none"`` while
    theirs is not (a plain COCO file whose categories all say ``"none"`` keeps its id 0)."""
    if len(categories) < 2:
        return set()
    zero = [c for c in categories if c.get("id") == 0]
    if not zero:
        return set()
    z = zero[0]
    others = [c for c in categories if c.get("id") != 0]
    supers = {str(c.get("supercategory", "")).strip().lower() for c in others}
    name = str(z.get("name", "")).strip().lower()
    zsuper = str(z.get("supercategory", "")).strip().lower()
    if name in supers or (zsuper == "none" and "none" not in supers):
        return {0}
    return set()


@register_reader("coco")
class CocoReader(AnnotationFileReader):
    """Roboflow COCO export: boxes, polygons/RLE masks, unlabelled images kept as unknown."""

    OPTIONS = ("unannotated", "cache_dir", "annotation_file")

    ANNOTATION_FILE = ANNOTATION_FILE

    def __init__(self, root, class_map=None, on_error="raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        cache = self.options.get("cache_dir")
        self.cache_dir = Path(cache).expanduser() if cache else self.root / ".btmtl_cache" / "masks"
        self.dropped: list[str] = []  # annotations dropped (placeholder category)

    def after_read(self) -> None:
        if self.dropped:
            log.warning("coco reader: dropped %d annotation(s) of Roboflow's placeholder category under %s",
                        len(self.dropped), self.root)

    # one json ---------------------------------------------------------------------------
    def _read_file(self, ann: Path, split: Optional[str]) -> list[Record]:
        try:
            with open(ann) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            self.fail(ann, f"unreadable COCO annotation file ({e.__class__.__name__}: {e})")
            return []
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            self.fail(ann, "not a COCO annotation file (no 'images' list)")
            return []
        categories = data.get("categories") or []
        cat_names = {c.get("id"): str(c.get("name")) for c in categories}
        cat_canon: dict = {}
        images, bad_ids = self._images(ann, data["images"])
        ids = sorted(images, key=lambda i: str(images[i][0]))
        sizes = self._sizes(ann, images, ids, bad_ids)
        per_image = self._annotations(ann, data.get("annotations") or [], images, ids, bad_ids,
                                      _placeholder_ids(categories), cat_names)
        records = []
        for iid in ids:
            if iid in bad_ids:
                continue
            path = images[iid][0]
            w, h = sizes[iid]
            anns = per_image[iid]
            meta = {"coco_image_id": iid, "annotation_file": str(ann)}
            if not anns:
                records.append(unannotated_record(path, (w, h), self.unannotated,
                                                  source=self.source, split=split, meta=meta))
                continue
            rec = self._record(ann, path, w, h, anns, cat_names, cat_canon)
            if rec is not None:
                rec.split, rec.source, rec.meta = split, self.source, meta
                records.append(rec)
        return records

    def _images(self, ann: Path, entries: list) -> tuple[dict, set]:
        """``({image id: (path, json width, json height)}, bad ids)``; bad entries fail here."""
        folder = ann.parent
        images: dict = {}
        bad_ids: set = set()
        names_seen: dict = {}
        for im in entries:
            iid = im.get("id")
            name = im.get("file_name")
            if iid is None or not name:
                self.fail(ann, f"image entry without id or file_name: {im}")
                continue
            if iid in images or iid in bad_ids:
                self.fail(ann, f"image id {iid} appears twice ({name})")
                bad_ids.add(iid)
                images.pop(iid, None)
                continue
            if name in names_seen:
                self.fail(ann, f"file_name {name!r} appears twice (image ids {names_seen[name]} and {iid})")
                bad_ids.add(iid)
                continue
            names_seen[name] = iid
            path = folder / name
            if not path.is_file():
                self.fail(path, f"image file not found (image id {iid} in {ann})")
                bad_ids.add(iid)
                continue
            images[iid] = (path, im.get("width"), im.get("height"))
        return images, bad_ids

    def _sizes(self, ann: Path, images: dict, ids: list, bad_ids: set) -> dict:
        """``{image id: (width, height)}`` from the files; a size the JSON contradicts fails."""
        sizes = dict(zip(ids, probe_many(self, [images[i][0] for i in ids])))
        for iid in ids:
            path, jw, jh = images[iid]
            size = sizes[iid]
            if size is None:
                bad_ids.add(iid)
                continue
            if jw is not None and jh is not None and (int(jw), int(jh)) != size:
                self.fail(path, f"image size mismatch (the file is {size[0]}x{size[1]}, {ann} says "
                                f"{jw}x{jh} for image id {iid})")
                bad_ids.add(iid)
        return sizes

    def _annotations(self, ann: Path, annotations: list, images: dict, ids: list, bad_ids: set,
                     placeholder: set, cat_names: dict) -> dict:
        """``{image id: [annotation]}``; Roboflow's placeholder category is dropped (counted)."""
        per_image: dict = {i: [] for i in ids}
        for a in annotations:
            aid = a.get("id")
            iid = a.get("image_id")
            if iid in bad_ids:
                continue
            if iid not in images:
                self.fail(ann, f"annotation {aid} points at a missing image id {iid}")
                continue
            cid = a.get("category_id")
            if cid in placeholder:
                self.dropped.append(f"{ann}#annotation {aid}")
                continue
            if cid not in cat_names:
                self.fail(ann, f"annotation {aid} points at a missing category id {cid} "
                               f"(image {images[iid][0].name})")
                bad_ids.add(iid)
                continue
            per_image[iid].append(a)
        return per_image

    def _record(self, ann: Path, path: Path, w: int, h: int, anns: list, cat_names: dict,
                cat_canon: dict) -> Optional[Record]:
        boxes, classes, polygons, rles = [], [], [], []
        mask_known = True
        for a in anns:
            aid = a.get("id")
            where = f"{ann} (annotation {aid}, image {path.name})"
            cid = a["category_id"]
            cls = cat_canon.get(cid)
            if cls is None:  # failures are not cached: each image they touch is reported
                cls = canonical_class(self, cat_names[cid], where=f"{ann} (category id {cid}, image {path.name})")
                if cls is None:
                    return None
                cat_canon[cid] = cls
            if cls == NO_TUMOR:
                self.fail(where, f"a box of class {cat_names[cid]!r} (= no_tumor) makes no sense; "
                                 "healthy slices have no annotation (use unannotated=negative)")
                return None
            seg = a.get("segmentation")
            image_polys = []
            if isinstance(seg, list) and seg:
                for flat in seg:
                    flat = np.asarray(flat, np.float64).ravel() if isinstance(flat, (list, tuple)) else None
                    if flat is None or len(flat) % 2:
                        self.fail(where, "malformed polygon (needs a flat list of x, y pairs)")
                        return None
                    poly = normalised_polygon(self, flat.reshape(-1, 2) / np.array([w, h]), w, h, where)
                    if poly is None:
                        return None
                    image_polys.append(poly)
                polygons.extend(image_polys)
            elif isinstance(seg, dict) and "counts" in seg:
                try:
                    rh, rw = (int(v) for v in seg.get("size", (h, w)))
                    if (rw, rh) != (w, h):
                        raise ValueError(f"RLE size {rw}x{rh} differs from the image {w}x{h}")
                    rles.append(rle_decode(seg["counts"], h, w))
                except (ValueError, TypeError) as e:
                    self.fail(where, f"malformed RLE segmentation ({e})")
                    return None
            else:
                mask_known = False
            bbox = a.get("bbox")
            if bbox is not None:
                try:
                    x, y, bw, bh = (float(v) for v in bbox)
                except (TypeError, ValueError):
                    self.fail(where, f"malformed bbox {bbox!r} (needs [x, y, width, height])")
                    return None
                box = pixel_box(self, (x, y, x + bw, y + bh), w, h, where)
            elif image_polys:
                pts = np.concatenate(image_polys)
                box = normalised_box(self, (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(),
                                            pts[:, 1].max()), w, h, where)
            elif rles:
                ys, xs = np.nonzero(rles[-1])
                if not len(xs):
                    self.fail(where, "annotation without bbox and with an empty mask")
                    return None
                box = normalised_box(self, (xs.min() / w, ys.min() / h, (xs.max() + 1) / w,
                                            (ys.max() + 1) / h), w, h, where)
            else:
                self.fail(where, "annotation without bbox or segmentation")
                return None
            if box is None:
                return None
            boxes.append(box)
            classes.append(cls)
        boxes = np.stack(boxes)
        rec = Record(image=str(path), label=label_from_boxes(boxes, classes), boxes=boxes,
                     box_classes=tuple(classes),
                     known={"label": True, "boxes": True, "mask": mask_known},
                     width=w, height=h)
        if mask_known and rles:
            rec.mask = self._write_mask(path, w, h, rles, polygons)
        elif mask_known:
            rec.polygons = polygons
        return rec

    def _write_mask(self, image: Path, w: int, h: int, rles: list, polygons: list) -> str:
        import cv2

        mask = np.zeros((h, w), np.uint8)
        for m in rles:
            mask[m > 0] = 255
        for poly in polygons:
            pts = np.round(poly * np.array([w, h]) - 0.5).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255)
        key = hashlib.sha1(str(image.resolve()).encode()).hexdigest()[:10]
        out = self.cache_dir / f"{image.stem}_{key}.png"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(out), mask):
                raise OSError("cv2.imwrite returned False")
        except OSError as e:
            raise DataError(f"{image}: cannot write its decoded RLE mask to {out} ({e}); "
                            "set data.cache_dir to a writable folder") from e
        return str(out)
