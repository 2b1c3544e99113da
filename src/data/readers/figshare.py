"""``figshare`` reader: the Cheng et al. 2015 brain-tumour dataset (figshare article 1512427).

3,064 T1-weighted contrast-enhanced slices of 233 patients with meningioma, glioma or
pituitary tumour, each with a tumour mask. Two on-disk forms are accepted and told apart
automatically:

a) **Extracted layout** (as in ``../shared/data/figshare-cheng``)::

       <root>/metadata.csv          index,label,label_name,tumor_border
       <root>/images/<index>.jpg    512x512 grey (any image extension)
       <root>/masks/<index>.png     0/255, same size as the image
       <root>/labels/<index>.txt    optional: third-party YOLO boxes (class xc yc w h)
       <root>/data.yaml             optional: YOLO class names (default 0 pituitary,
                                    1 meningioma, 2 glioma)

   ``label`` is 1 meningioma, 2 glioma, 3 pituitary (the publisher's numbering);
   ``label_name``, when present, must agree with it.

b) **Original MATLAB files** as published (``brainTumorDataPublic_*.zip``, unzipped)::

       <root>/**/<n>.mat            struct ``cjdata`` with image, label, PID,
                                    tumorBorder, tumorMask

   MATLAB v7.3 files are HDF5 (read with h5py; arrays are stored column-major, so
   they are transposed back). Older v5 files are read with :func:`scipy.io.loadmat`.
   Files whose name is not a number (``cvind.mat``) are not slices and are ignored.
   Each slice is converted once to an 8-bit grey PNG (per-image robust min-max
   scaling between the ``intensity_range`` percentiles, default 0.5 and 99.5) and a
   0/255 mask PNG under ``cache_dir`` (default ``<root>/.btmtl_cache`` when ``root``
   is writable, else ``~/.cache/btmtl/figshare/<hash of root>``). Later reads reuse
   the converted files while they are newer than their ``.mat`` (an ``index.json``
   there holds label, patient id and box, so unchanged ``.mat`` files are not opened).

Targets
-------
* ``label``: the slice's class; every slice has exactly one tumour.
* ``boxes``: one box per slice, of the slice's class. By default (``box_source=mask``)
  it is the tight box of the mask's non-zero pixels, normalised with the *pixel-edge*
  convention: ``x_min = first_col / W``, ``x_max = (last_col + 1) / W`` (same for y),
  so a one-pixel tumour has a box of width ``1 / W`` and every mask pixel lies inside
  its box. ``box_source=labels`` uses the third-party boxes of ``labels/`` instead
  (layout a only; their IoU with the mask boxes is about 0.92).
* ``mask``: the mask file. All three targets are known for every slice.

Groups (for group-aware splits)
-------------------------------
* Layout b: the patient id (``PID``) of the ``.mat`` file: a real patient id.
* Layout a has no patient ids. Neighbouring indices are usually neighbouring slices of
  one patient (233 patients, ~13 slices each), so groups are *contiguous index blocks*:
  walking the metadata rows in index order, a new group starts whenever the label
  changes from the previous row or the current block already holds ``group_block``
  slices (default 16). Groups are named ``blk0000``, ``blk0001``, ... and are computed
  over all metadata rows before any skip, so they do not move when a file is skipped.
  This is a heuristic: a block boundary can cut a patient in two, which leaks at most
  the slices around that boundary, far less than a random slice split.

Errors (raised, or skipped and counted with ``data.on_error=skip``) name the file: a
metadata row whose image is missing or unreadable, a mask missing or of a different
size than its image, an empty mask, an unknown label number, a ``.mat`` file that is
neither v7.3 nor v5 or has no ``cjdata``.

Options (``data.options``): ``box_source`` (``mask`` | ``labels``, default ``mask``),
``group_block`` (16), ``cache_dir`` (where converted ``.mat`` slices go), ``workers``
(thread-pool size), ``intensity_range`` (``[0.5, 99.5]``: percentiles mapped to 0 and 255
when converting ``.mat`` images), ``source`` (``record.source``, default ``figshare``).
An unknown option is an error (no silent typos).

Speed: layout a reads the 2,398 masks of the shared copy in a thread pool (option
``workers``) in about 1-2 s, so nothing is cached for it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..base import IMAGE_EXTENSIONS, Reader, probe_image, register_reader
from ..records import DataError, Record

log = logging.getLogger(__name__)

#: The publisher's label numbers.
LABELS: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}
#: Class ids of the third-party YOLO boxes when ``data.yaml`` is absent.
DEFAULT_YOLO_NAMES: dict[int, str] = {0: "pituitary", 1: "meningioma", 2: "glioma"}

OPTIONS = ("box_source", "group_block", "cache_dir", "workers", "intensity_range", "source")
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------
# helpers (module level so tests and other code can use them)
# --------------------------------------------------------------------------------------
def mask_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight normalised xyxy box of the non-zero pixels of ``mask`` (None when empty).

    Pixel-edge convention: ``x_max = (last non-zero column + 1) / W``.
    """
    import cv2

    m = np.ascontiguousarray(np.asarray(mask))
    if m.ndim == 3:
        m = m.max(axis=2)
    m = (m != 0).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(m)
    if w == 0 or h == 0:
        return None
    H, W = m.shape
    return np.array([x / W, y / H, (x + w) / W, (y + h) / H], np.float32)


def block_groups(labels: list, block: int) -> list[str]:
    """Contiguous-block group ids: a new block when the label changes or it is full."""
    groups, g, n, prev = [], -1, 0, object()
    for lab in labels:
        if lab != prev or n >= block:
            g, n = g + 1, 0
        groups.append(f"blk{g:04d}")
        n += 1
        prev = lab
    return groups


def to_uint8(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Robust per-image min-max scaling of an MRI slice to 0..255."""
    img = np.asarray(image, np.float32)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros(img.shape, np.uint8)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if hi <= lo:  # (nearly) constant percentiles: fall back to the plain range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(img.shape, np.uint8)
    out = (np.nan_to_num(img, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def percentile_range(value, reader: str) -> tuple[float, float]:
    """``(lo, hi)`` intensity percentiles from ``data.options.intensity_range``; a
    :class:`DataError` naming the reader otherwise."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        lo, hi = -1.0, -1.0
    if not 0 <= lo < hi <= 100:
        raise DataError(f"{reader} reader: intensity_range must be two percentiles 0 <= lo < hi <= 100, "
                        f"got {value!r}")
    return lo, hi


def _dir_writable(path: Path) -> bool:
    """True when a cache folder can be created inside ``path``."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".btmtl_probe"):
            pass
        return True
    except OSError:
        return False


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write atomically (tmp file + rename) so a killed conversion leaves no half PNG."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


class _Failure(Exception):
    """A per-file problem found in a worker thread; reported by the main thread."""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = str(path)
        self.message = message


# --------------------------------------------------------------------------------------
# .mat loading
# --------------------------------------------------------------------------------------
def _chars(a) -> str:
    if isinstance(a, str):
        return a.strip("\x00 ").strip()
    codes = np.asarray(a).ravel()
    if codes.dtype.kind in "US":
        return "".join(str(c) for c in codes).strip("\x00 ").strip()
    return "".join(chr(int(c)) for c in codes if int(c) != 0).strip()


def load_mat(path: str | Path) -> dict[str, Any]:
    """Read one figshare ``.mat`` slice: ``image`` (H, W), ``mask`` (H, W), ``label``, ``pid``.

    Arrays come back row-major (v7.3 HDF5 arrays are transposed back). Raises
    :class:`_Failure` naming the file for anything unreadable or missing.
    """
    import h5py

    path = Path(path)
    if h5py.is_hdf5(str(path)):
        try:
            with h5py.File(path, "r") as f:
                if "cjdata" not in f:
                    raise _Failure(path, f"{path}: MATLAB v7.3 file has no 'cjdata' struct "
                                         f"(variables: {sorted(f.keys())}); not a figshare slice")
                g = f["cjdata"]
                missing = [k for k in ("image", "label", "tumorMask") if k not in g]
                if missing:
                    raise _Failure(path, f"{path}: cjdata lacks {missing} (fields: {sorted(g.keys())})")
                image = np.asarray(g["image"][()]).T
                mask = np.asarray(g["tumorMask"][()]).T
                label = np.asarray(g["label"][()]).ravel()
                pid = _chars(g["PID"][()]) if "PID" in g else ""
        except _Failure:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise _Failure(path, f"{path}: unreadable MATLAB v7.3 (HDF5) file "
                                 f"({e.__class__.__name__}: {e})") from e
    else:
        import scipy.io

        try:
            d = scipy.io.loadmat(str(path), simplify_cells=True)
        except Exception as e:  # scipy raises many types for non-mat input
            raise _Failure(path, f"{path}: not a MATLAB .mat file that can be read (neither v7.3/HDF5 "
                                 f"nor v5: {e.__class__.__name__}: {e})") from e
        cj = d.get("cjdata")
        if not isinstance(cj, dict):
            names = sorted(k for k in d if not k.startswith("__"))
            raise _Failure(path, f"{path}: .mat file has no 'cjdata' struct (variables: {names}); "
                                 "not a figshare slice")
        missing = [k for k in ("image", "label", "tumorMask") if k not in cj]
        if missing:
            raise _Failure(path, f"{path}: cjdata lacks {missing} (fields: {sorted(cj)})")
        image = np.asarray(cj["image"])
        mask = np.asarray(cj["tumorMask"])
        label = np.asarray(cj["label"]).ravel()
        pid = _chars(cj.get("PID", ""))
    if image.ndim != 2 or min(image.shape) == 0:
        raise _Failure(path, f"{path}: cjdata.image is not a 2-D image (shape {image.shape})")
    if mask.shape != image.shape:
        raise _Failure(path, f"{path}: tumorMask shape {mask.shape} differs from image shape {image.shape}")
    if label.size != 1 or not np.isfinite(label[0]) or float(label[0]) != int(label[0]):
        raise _Failure(path, f"{path}: cjdata.label is not one integer ({label.tolist()})")
    return {"image": image, "mask": mask, "label": int(label[0]), "pid": pid}


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------
@register_reader("figshare")
class FigshareReader(Reader):
    """Cheng et al. figshare brain-tumour slices (extracted layout or original ``.mat``).

    Options: ``box_source`` (``mask`` | ``labels``), ``group_block`` (16),
    ``cache_dir`` (``.mat`` conversions), ``workers`` (thread pool size),
    ``intensity_range`` (percentiles for the ``.mat`` image scaling, ``[0.5, 99.5]``),
    ``source`` (``record.source``, default ``"figshare"``). An unknown option is an error.
    """

    def __init__(self, root, class_map=None, on_error: str = "raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:  # no silent typos
            raise DataError(f"reader 'figshare' (data.root {self.root}) got unknown option(s) {unknown}; "
                            f"it accepts {sorted(OPTIONS)}")
        self.source = str(options.get("source") or "figshare")
        self.box_source = str(options.get("box_source", "mask")).lower()
        if self.box_source not in ("mask", "labels"):
            raise DataError(f"figshare reader: box_source must be 'mask' or 'labels', got {self.box_source!r}")
        try:
            self.group_block = int(options.get("group_block", 16))
        except (TypeError, ValueError):
            self.group_block = 0
        if self.group_block < 1:
            raise DataError(f"figshare reader: group_block must be a positive integer, "
                            f"got {options.get('group_block')!r}")
        self.workers = max(1, int(options.get("workers") or min(16, 4 * (os.cpu_count() or 1))))
        self.intensity_range = percentile_range(options.get("intensity_range", (0.5, 99.5)), "figshare")
        self.cache_dir_option = options.get("cache_dir")
        self.layout: Optional[str] = None

    # ---- layout detection -----------------------------------------------------------
    def detect_layout(self) -> str:
        root = self.root
        if (root / "metadata.csv").is_file():
            return "extracted"
        if self._mat_files():
            return "mat"
        zips = sorted(p.name for p in root.glob("*.zip"))
        hint = (f" Found {zips}: unzip them first (the .mat files inside are read directly)."
                if zips else "")
        if (root / "images").is_dir():
            hint += f" {root / 'images'} exists but {root / 'metadata.csv'} (index,label,...) is missing."
        raise DataError(
            f"{root}: not a figshare dataset. Expected either metadata.csv + images/ + masks/ "
            f"(extracted layout) or the original <n>.mat files (MATLAB, struct cjdata) under it.{hint}")

    def _mat_files(self) -> list[Path]:
        out = []
        for p in self.root.rglob("*.mat"):
            if any(part.startswith(".") for part in p.relative_to(self.root).parts[:-1]):
                continue  # our own cache and hidden folders
            if re.fullmatch(r"\d+", p.stem):
                out.append(p)
            else:
                log.debug("figshare reader: ignoring %s (not a numbered slice file)", p)
        return sorted(out, key=lambda p: (str(p.parent), int(p.stem)))

    def read_records(self) -> list[Record]:
        self.layout = self.detect_layout()
        if self.layout == "extracted":
            return self._read_extracted()
        if self.box_source == "labels":
            raise DataError(f"{self.root}: box_source=labels needs the extracted layout (labels/<index>.txt); "
                            "the .mat files carry masks only: use box_source=mask")
        return self._read_mat()

    def _label(self, number, where: str) -> Optional[str]:
        name = LABELS.get(number)
        if name is None:
            self.fail(where, f"{where}: unknown label number {number!r} (expected 1 meningioma, "
                             "2 glioma, 3 pituitary)")
            return None
        return self.class_map.canonical(name, where=where)

    # ---- layout a ---------------------------------------------------------------------
    def _read_metadata(self) -> list[tuple[int, Optional[str]]]:
        path = self.root / "metadata.csv"
        rows: list[tuple[int, Optional[str]]] = []
        seen: set[int] = set()
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if not {"index", "label"} <= cols:
                raise DataError(f"{path}: needs columns index,label (found {sorted(cols)})")
            for line, row in enumerate(reader, 2):
                where = f"{path}:{line}"
                try:
                    index = int(str(row["index"]).strip())
                    number = int(float(str(row["label"]).strip()))
                except (TypeError, ValueError):
                    self.fail(where, f"{where}: index/label are not integers ({row.get('index')!r}, "
                                     f"{row.get('label')!r})")
                    continue
                if index in seen:
                    self.fail(where, f"{where}: index {index} is repeated")
                    continue
                seen.add(index)
                label = self._label(number, where)
                name = (row.get("label_name") or "").strip()
                if label is not None and name and self.class_map.try_canonical(name) != label:
                    self.fail(where, f"{where}: label {number} ({LABELS[number]}) disagrees with "
                                     f"label_name {name!r}")
                    label = None
                rows.append((index, label))
        rows.sort()
        return rows

    def _yolo_names(self) -> dict[int, str]:
        path = self.root / "data.yaml"
        if not path.is_file():
            return dict(DEFAULT_YOLO_NAMES)
        import yaml

        try:
            names = (yaml.safe_load(path.read_text()) or {}).get("names")
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML ({e})") from e
        if isinstance(names, list):
            names = dict(enumerate(names))
        if not isinstance(names, dict) or not names:
            raise DataError(f"{path}: has no 'names' (class id -> name)")
        return {int(k): str(v) for k, v in names.items()}

    def _read_extracted(self) -> list[Record]:
        root = self.root
        rows = self._read_metadata()
        # a row whose label is unusable (skipped) neither splits nor starts a block
        filled, prev = [], None
        for _, lab in rows:
            prev = lab if lab is not None else prev
            filled.append(prev)
        groups = block_groups(filled, self.group_block)
        images = _by_stem(root / "images")
        masks = _by_stem(root / "masks")
        use_labels = self.box_source == "labels"
        yolo_names = self._yolo_names() if use_labels else {}

        def work(item):
            index, label = item
            img = images.get(str(index), root / "images" / f"{index}.jpg")
            w, h = probe_image(img)  # DataError names the file
            mpath = masks.get(str(index), root / "masks" / f"{index}.png")
            mask = _read_mask(mpath)
            if mask.shape[:2] != (h, w):
                raise _Failure(mpath, f"{mpath}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                                      f"image size {w}x{h} ({img})")
            box = mask_box(mask)
            if box is None:
                raise _Failure(mpath, f"{mpath}: empty mask (no tumour pixel) for {img}")
            if use_labels:
                box = self._yolo_box(root / "labels" / f"{index}.txt", yolo_names, label)
            return img, mpath, w, h, box

        keep = [k for k, (_, lab) in enumerate(rows) if lab is not None]
        results = self._map(work, [rows[k] for k in keep],
                            lambda item: images.get(str(item[0]), root / "images" / f"{item[0]}.jpg"))
        done = dict(zip(keep, results))
        records = []
        for k, ((index, label), group) in enumerate(zip(rows, groups)):
            res = done.get(k)
            if res is None:
                continue
            img, mpath, w, h, box = res
            records.append(Record(
                image=str(img), label=label, boxes=box[None], box_classes=(label,), mask=str(mpath),
                group=group, source=self.source, known={"label": True, "boxes": True, "mask": True},
                width=w, height=h, meta={"index": index, "box_source": self.box_source}))
        return records

    def _yolo_box(self, path: Path, names: dict[int, str], label: str) -> np.ndarray:
        if not path.is_file():
            raise _Failure(path, f"{path}: label file not found (box_source=labels)")
        boxes = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                cid = int(float(parts[0]))
                xc, yc, bw, bh = (float(v) for v in parts[1:5])
                if len(parts) < 5:
                    raise ValueError
            except ValueError:
                raise _Failure(path, f"{path}:{n}: expected 'class xc yc w h', got {line!r}") from None
            if cid not in names:
                raise _Failure(path, f"{path}:{n}: class id {cid} not in data.yaml names {names}")
            cls = self.class_map.try_canonical(names[cid])
            if cls != label:
                raise _Failure(path, f"{path}:{n}: box class {names[cid]!r} disagrees with the slice "
                                     f"label {label!r} of metadata.csv")
            boxes.append([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2])
        if len(boxes) != 1:
            raise _Failure(path, f"{path}: expected one box, found {len(boxes)}")
        return np.clip(np.asarray(boxes[0], np.float32), 0.0, 1.0)

    # ---- layout b ---------------------------------------------------------------------
    def cache_dir(self) -> Path:
        """Where converted ``.mat`` slices go (created)."""
        if self.cache_dir_option:
            d = Path(str(self.cache_dir_option)).expanduser()
        elif _dir_writable(self.root):
            d = self.root / ".btmtl_cache"
        else:
            digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
            d = Path.home() / ".cache" / "btmtl" / "figshare" / digest
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"figshare reader: cannot create cache_dir {d} for the converted .mat slices "
                            f"({e}); set data.cache_dir to a writable folder") from e
        return d

    def _read_mat(self) -> list[Record]:  # long on purpose: convert each .mat once, keep the cache index in step
        mats = self._mat_files()
        cache = self.cache_dir()
        index_path = cache / "index.json"
        index: dict[str, dict] = {}
        if index_path.is_file():
            try:
                data = json.loads(index_path.read_text())
                if data.get("version") == CACHE_VERSION and data.get("intensity_range") == list(self.intensity_range):
                    index = data.get("slices", {})
            except (json.JSONDecodeError, AttributeError, OSError):
                log.warning("figshare reader: ignoring unreadable cache index %s", index_path)

        def paths(mat: Path) -> tuple[str, Path, Path]:
            rel = mat.relative_to(self.root).with_suffix(".png")
            return rel.as_posix(), cache / "images" / rel, cache / "masks" / rel

        def fresh(mat: Path) -> Optional[dict]:
            key, ipng, mpng = paths(mat)
            e = index.get(key)
            if not e:
                return None
            st = mat.stat()
            try:
                newer = min(ipng.stat().st_mtime_ns, mpng.stat().st_mtime_ns) >= st.st_mtime_ns
            except OSError:
                return None
            if newer and e.get("mat_mtime_ns") == st.st_mtime_ns and e.get("mat_size") == st.st_size:
                return e
            return None

        lo, hi = self.intensity_range

        def convert(mat: Path) -> dict:
            key, ipng, mpng = paths(mat)
            st = mat.stat()
            d = load_mat(mat)
            if d["label"] not in LABELS:
                raise _Failure(mat, f"{mat}: unknown label number {d['label']} (expected 1 meningioma, "
                                    "2 glioma, 3 pituitary)")
            if not d["pid"]:
                raise _Failure(mat, f"{mat}: cjdata has no patient id (PID)")
            box = mask_box(d["mask"])
            if box is None:
                raise _Failure(mat, f"{mat}: empty tumorMask (no tumour pixel)")
            _write_png(ipng, to_uint8(d["image"], lo, hi))
            _write_png(mpng, np.where(np.asarray(d["mask"]) != 0, 255, 0).astype(np.uint8))
            h, w = d["image"].shape
            return {"label": d["label"], "pid": d["pid"], "box": [float(v) for v in box],
                    "width": int(w), "height": int(h), "mat_mtime_ns": st.st_mtime_ns,
                    "mat_size": st.st_size}

        entries: list[Optional[dict]] = [fresh(m) for m in mats]
        todo = [m for m, e in zip(mats, entries) if e is None]
        if todo:
            log.info("figshare reader: converting %d .mat slices to PNG under %s", len(todo), cache)
        converted = self._map(convert, todo, lambda m: m)
        changed = False
        it = iter(converted)
        for i, e in enumerate(entries):
            if e is None:
                e = next(it)
                if e is not None:
                    index[paths(mats[i])[0]] = e
                    changed = True
                entries[i] = e
        if changed:
            tmp = index_path.with_name(f".index.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "intensity_range": list(self.intensity_range),
                                       "slices": index}))
            os.replace(tmp, index_path)

        records = []
        for mat, e in zip(mats, entries):
            if e is None:
                continue
            label = self._label(e["label"], str(mat))
            if label is None:
                continue
            _, ipng, mpng = paths(mat)
            records.append(Record(
                image=str(ipng), label=label, boxes=np.asarray(e["box"], np.float32)[None],
                box_classes=(label,), mask=str(mpng), group=str(e["pid"]), source=self.source,
                known={"label": True, "boxes": True, "mask": True}, width=e["width"], height=e["height"],
                meta={"mat": str(mat), "pid": str(e["pid"])}))
        return records

    # ---- shared -----------------------------------------------------------------------
    def _map(self, fn, items: list, path_of) -> list:
        """Run ``fn`` over ``items`` in a thread pool; failures go through :meth:`fail`
        (in the main thread, in item order) and give None."""

        def safe(item):
            try:
                return fn(item), None
            except _Failure as e:
                return None, (e.path, e.message)
            except DataError as e:
                return None, (str(path_of(item)), str(e))

        if not items:
            return []
        if self.workers == 1 or len(items) < 8:
            outs = [safe(i) for i in items]
        else:
            with ThreadPoolExecutor(self.workers) as ex:
                outs = list(ex.map(safe, items))
        results = []
        for res, err in outs:
            if err is not None:
                self.fail(*err)
            results.append(res)
        return results


def _by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            out.setdefault(p.stem, p)
    return out


def _read_mask(path: Path) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise _Failure(path, f"{path}: mask file not found")
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise _Failure(path, f"{path}: corrupt or unreadable mask")
    if m.ndim == 3:
        m = m.max(axis=2)
    return m

