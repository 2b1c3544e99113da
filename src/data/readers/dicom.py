"""``dicom`` reader: a folder tree of DICOM files (any depth), one volume per series.

Layout: anything. Every file under ``root`` (hidden files and folders, the labels CSV and
files matching ``ignore`` left out) must be a DICOM file; a file that is not is an error
naming it (``data.on_error=skip`` skips and counts it). DICOM objects without pixel data
(``DICOMDIR``, structured reports) are passed over and counted in the log.

Series
------
Files are grouped into series by ``SeriesInstanceUID`` (several series in one folder, or
one series over several folders, are both fine; an image file without one is a series of
its own, with a warning) and ordered along the slice normal
(``ImagePositionPatient`` projected on the cross product of ``ImageOrientationPatient``),
else by ``InstanceNumber``. A series is an error naming its files when:

* a slice is missing: a gap between neighbouring positions larger than ``gap_tolerance``
  (1.5) times the series' spacing (its smallest step), or a jump in ``InstanceNumber`` when positions
  are absent;
* two slices share a position (or an instance number), or the slices differ in size or
  orientation (a localiser mixed into the series);
* a file's pixel data cannot be decoded (a compressed transfer syntax without its
  plugin: ``pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg``).

A multi-frame file (``NumberOfFrames`` > 1) is a series of its own, its frames the slices.
A file written without the 128-byte preamble and ``DICM`` prefix (old ACR-NEMA style
exports, raw datasets) is read when a forced parse finds a SOP class or a modality; any
other file is "not a DICOM file".

Intensities
-----------
Stored values go through ``RescaleSlope`` / ``RescaleIntercept`` (the modality LUT), then
a window to 8 bit (``window``): ``header`` (the default: each slice's own
``WindowCenter`` / ``WindowWidth``, the first pair when several; a series without one
falls back to ``percentile``), ``percentile`` (the ``intensity_range`` percentiles of the
series' non-zero values: one scale for the whole series), or ``[center, width]`` (one fixed
window, e.g. ``[40, 80]`` for a CT brain window). ``MONOCHROME1`` is inverted, colour
images are averaged to grey.

Identifiers, groups, labels
---------------------------
``PatientID``, ``StudyInstanceUID`` and ``SeriesInstanceUID`` are hashed as soon as they
are read (:func:`.clinical.hash_id`; set ``BTMTL_ID_SALT`` for a keyed hash): the group of
every slice is the hashed patient (``pt-...``; the hashed study when ``PatientID`` is
empty), the cache folders and the cache index hold hashes only, and nothing logs an id in
clear. Class labels come from ``labels`` -- a CSV with a ``label`` column and one key
column: ``patient`` (``PatientID``), ``study`` (``StudyInstanceUID``), ``series``
(``SeriesInstanceUID``) or ``path`` (a file or folder relative to ``root``; a slice takes
the row of its file, else of the nearest folder above it) -- else from ``label`` (one
class for every series), else they are unknown. DICOM carries no tumour outline here
(DICOM-SEG / RTSTRUCT are not read): boxes and masks are unknown, except on slices
labelled ``no_tumor`` (known empty).

Options: ``window``, ``ignore`` (file-name globs left out, default ``[DICOMDIR, *.csv,
*.txt, *.md, *.json]``), ``gap_tolerance`` and the common ones of :mod:`.clinical`
(``cache_dir``, ``workers``, ``intensity_range``, ``every``, ``min_foreground``, ``label``,
``labels``, ``source``). Converted slices are cached and reused while newer than their
files; the headers of unchanged files are cached too, so a second read opens no file.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..base import register_reader
from ..records import DataError, Record
from .clinical import COMMON_OPTIONS, Failure, LabelTable, VolumeReader, as_list, file_stamp, hash_id, \
    linear_window, percentile_bounds, window_bounds

log = logging.getLogger(__name__)

OPTIONS = COMMON_OPTIONS + ("window", "ignore", "gap_tolerance")
DEFAULT_IGNORE = ("DICOMDIR", "*.csv", "*.txt", "*.md", "*.json")
LABEL_KEYS = {"patient": "patient", "patient_id": "patient", "patientid": "patient",
              "study": "study", "study_instance_uid": "study", "studyinstanceuid": "study",
              "series": "series", "series_instance_uid": "series", "seriesinstanceuid": "series",
              "path": "path", "file": "path", "folder": "path"}
HEADER_VERSION = 1
PLUGIN_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


def is_dicom_file(path) -> bool:
    """True when ``path`` has the DICOM Part 10 marker (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _floats(v, n: int) -> Optional[list]:
    try:
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _first(v) -> Optional[float]:
    """A DS value or the first of a multi-valued one, as float (None when absent)."""
    if v is None or v == "":
        return None
    try:
        return float(v[0] if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else v)
    except (TypeError, ValueError, IndexError):
        return None


def _headerless(path):
    """The dataset of a DICOM file written without preamble and file meta (ACR-NEMA style,
    or a raw dataset), or None when the bytes do not parse as one: a forced read must find
    a SOP class or a modality and at least a few elements, so a text or image file that
    happens to parse is still "not a DICOM file"."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - not parseable at all
        return None
    try:
        ok = len(ds) >= 4 and ("SOPClassUID" in ds or "Modality" in ds)
    except Exception:  # noqa: BLE001 - garbage that parsed into broken elements
        return None
    return ds if ok else None


def read_header(path) -> dict:
    """The header facts a series needs, identifiers hashed. :class:`~.clinical.Failure`
    naming the file for anything that is not a readable DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except InvalidDicomError:
        ds = _headerless(path)  # an old export without the 128-byte preamble and "DICM" prefix
        if ds is None:
            raise Failure(path, f"{path}: not a DICOM file (no DICOM header; leave such files out with "
                                "data.options.ignore=[...] or move them)") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed file: one line naming it
        raise Failure(path, f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from None
    has_pixels = "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
    if not has_pixels:
        # stop_before_pixels hides PixelData: look at the image attributes instead
        has_pixels = "Rows" in ds and "Columns" in ds and ds.get("SOPClassUID", "") != "1.2.840.10008.1.3.10"
    series = str(ds.get("SeriesInstanceUID", "") or "").strip()
    patient = str(ds.get("PatientID", "") or "").strip()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    inst = ds.get("InstanceNumber")
    try:
        inst = int(inst) if inst not in (None, "") else None
    except (TypeError, ValueError):
        inst = None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return {"pixels": bool(has_pixels), "series": hash_id(series, "series") if series else None,
            "patient": hash_id(patient, "patient") if patient else None,
            "study": hash_id(study, "study") if study else None,
            "pos": _floats(ds.get("ImagePositionPatient"), 3), "iop": _floats(ds.get("ImageOrientationPatient"), 6),
            "inst": inst, "frames": frames, "rows": int(ds.get("Rows", 0) or 0), "cols": int(ds.get("Columns", 0) or 0)}


def order_series(items: Sequence[tuple], gap_tolerance: float = 1.5) -> list:
    """``items`` (``(path, header)``) of one series in slice order; :class:`Failure` for a
    missing slice, a repeated position, mixed sizes or orientations, or no way to order."""
    first = items[0][0]
    if len({(h["rows"], h["cols"]) for _, h in items}) > 1:
        sizes = sorted({f"{h['cols']}x{h['rows']}" for _, h in items})
        raise Failure(first, f"{first}: its series mixes slice sizes {sizes} (a localiser or a second "
                             f"acquisition under one SeriesInstanceUID)")
    if any(h["frames"] > 1 for _, h in items):
        if len(items) > 1:
            raise Failure(first, f"{first}: a multi-frame file in a series of {len(items)} files (expected one "
                                 "multi-frame file or single-frame files)")
        return list(items)
    if len(items) == 1:
        return list(items)
    if all(h["pos"] and h["iop"] for _, h in items):
        iops = np.asarray([h["iop"] for _, h in items])
        if np.abs(iops - iops[0]).max() > 1e-3:
            raise Failure(first, f"{first}: its series holds slices of several orientations "
                                 "(ImageOrientationPatient differs)")
        normal = np.cross(iops[0][:3], iops[0][3:])
        d = np.asarray([float(np.dot(h["pos"], normal)) for _, h in items])
        order = np.argsort(d, kind="stable")
        ordered = [items[i] for i in order]
        steps = np.diff(d[order])
        where = "position along the slice normal"
    elif all(h["inst"] is not None for _, h in items):
        order = np.argsort([h["inst"] for _, h in items], kind="stable")
        ordered = [items[i] for i in order]
        steps = np.diff([h["inst"] for _, h in ordered]).astype(np.float64)
        where = "InstanceNumber"
    else:
        raise Failure(first, f"{first}: cannot order its series of {len(items)} files (no ImagePositionPatient "
                             "/ ImageOrientationPatient nor InstanceNumber)")
    # the smallest step is the spacing: a median of few steps hides one missing slice
    spacing = float(np.min(steps[steps > 1e-4])) if where != "InstanceNumber" and (steps > 1e-4).any() else 1.0
    for j, step in enumerate(steps):
        a, b = ordered[j][0], ordered[j + 1][0]
        if step <= 1e-4 * max(spacing, 1.0):
            raise Failure(b, f"{b}: same {where} as {a} in one series (a repeated slice or two acquisitions "
                             "under one SeriesInstanceUID)")
        if step > gap_tolerance * spacing + 1e-6:
            missing = int(round(step / spacing)) - 1 if spacing > 0 else 1
            raise Failure(b, f"{b}: series has a missing slice between {a} and {b} ({where} step "
                             f"{step:g}, series spacing {spacing:g}: about {max(missing, 1)} slice(s) missing)")
    return ordered


def _implied_transfer_syntax(ds) -> None:
    """A dataset read without file meta (no preamble) has no Transfer Syntax UID, which the
    pixel decoders need: the uncompressed one its encoding implies."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _pixels(path) -> tuple[np.ndarray, object]:
    """Rescaled float32 pixels ``[frames, H, W]`` and the dataset of one file."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)  # headers were checked by read_header
        _implied_transfer_syntax(ds)
        arr = np.asarray(ds.pixel_array)
    except Exception as e:  # noqa: BLE001 - a missing decoder, truncated pixel data ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if "ds" in locals() else None
        hint = f"; a compressed transfer syntax ({ts.name}) needs its decoder: {PLUGIN_HINT}" \
            if ts is not None and ts.is_compressed else ""
        raise Failure(path, f"{path}: cannot decode the pixel data ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}){hint}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp > 1:   # colour: grey as the mean of the channels
        arr = arr.mean(axis=-1)
    arr = arr.astype(np.float32)
    if frames == 1 and arr.ndim == 2:
        arr = arr[None]
    slope = _first(ds.get("RescaleSlope"))
    inter = _first(ds.get("RescaleIntercept"))
    return arr * np.float32(1.0 if slope is None else slope) + np.float32(inter or 0.0), ds


def series_images(paths: Sequence, window="header", intensity_range=(0.5, 99.5)) -> list[np.ndarray]:
    """8-bit display slices of one ordered series (see the module docstring, Intensities).
    Raises :class:`Failure` naming the file."""
    values, windows, invert = [], [], []
    for p in paths:
        arr, ds = _pixels(p)
        c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        for frame in arr:
            values.append(frame)
            windows.append(window_bounds(c, w) if c is not None and w is not None and w > 0 else None)
            invert.append(str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1")
    if isinstance(window, (list, tuple)):
        bounds = [window_bounds(*window)] * len(values)
    elif window == "header" and all(b is not None for b in windows):
        bounds = windows
    else:
        bounds = [percentile_bounds(values, *intensity_range)] * len(values)
    out = []
    for v, (lo, hi), inv in zip(values, bounds, invert):
        img = linear_window(v, lo, hi)
        out.append(255 - img if inv else img)
    return out


def parse_window(value):
    """``header`` | ``percentile`` | ``[center, width]``."""
    if isinstance(value, (list, tuple)):
        try:
            c, w = (float(v) for v in value)
        except (TypeError, ValueError):
            c, w = 0.0, -1.0
        if not w > 0:
            raise DataError(f"dicom reader: window must be header, percentile or [center, width] with width > 0, "
                            f"got {value!r}")
        return [c, w]
    v = str(value or "header").strip().lower()
    if v not in ("header", "percentile"):
        raise DataError(f"dicom reader: window must be header, percentile or [center, width], got {value!r}")
    return v


def group_series(headers: dict) -> tuple[dict, int]:
    """``{series hash: [(path, header), ...]}`` of the files with pixel data, and how many
    files had none."""
    series, no_pixels = defaultdict(list), 0
    for path, h in headers.items():
        if not h["pixels"]:
            no_pixels += 1
            continue
        series[h["series"]].append((path, h))
    return dict(series), no_pixels


def scan_headers(files: Sequence[Path], fail, cached: Optional[dict] = None,
                 root: Optional[Path] = None) -> tuple[dict, bool]:
    """``{path: header}`` of DICOM ``files`` (a header from ``cached`` is reused while the
    file's size and mtime are unchanged) and whether ``cached`` changed; a file that fails
    goes to ``fail(path, message)``. ``cached`` (keyed by path relative to ``root``) is
    updated in place and loses the files that are gone."""
    out, changed = {}, False
    if cached is not None and root is not None:
        present = {p.relative_to(root).as_posix() for p in files}
        for rel in [r for r in cached if r not in present]:
            del cached[rel]
            changed = True
    for p in files:
        rel = p.relative_to(root).as_posix() if root is not None else str(p)
        st = p.stat()
        c = (cached or {}).get(rel)
        if c is not None and c.get("m") == st.st_mtime_ns and c.get("s") == st.st_size:
            out[p] = c["h"]
            continue
        try:
            h = read_header(p)
            if h["pixels"] and not h["series"]:  # no series UID: the file is a series of its own
                h["series"] = hash_id(f"file:{rel}", "series")
                h["own_series"] = True
        except Failure as e:
            fail(e.path, e.message)
            continue
        out[p] = h
        if cached is not None:
            cached[rel] = {"m": st.st_mtime_ns, "s": st.st_size, "h": h}
            changed = True
    return out, changed


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------
@register_reader("dicom")
class DicomReader(VolumeReader):
    """DICOM series under a folder tree (see the module docstring)."""

    OPTIONS = OPTIONS
    REQUIRES = "pydicom"

    def __init__(self, root, class_map=None, on_error: str = "raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        o = self.options
        self.window = parse_window(o.get("window", "header"))
        self.ignore = as_list(o["ignore"]) if o.get("ignore") is not None else list(DEFAULT_IGNORE)
        try:
            self.gap_tolerance = float(o.get("gap_tolerance", 1.5) or 1.5)
        except (TypeError, ValueError):
            self.gap_tolerance = 0.0
        if self.gap_tolerance <= 1.0:
            raise DataError(f"dicom reader: gap_tolerance must be a number > 1 (a step this many times the "
                            f"series spacing is a missing slice), got {o.get('gap_tolerance')!r}")

    def cache_settings(self) -> dict:
        return {**super().cache_settings(), "window": self.window}

    def _ignored(self, p: Path, labels_file: Optional[Path]) -> bool:
        if labels_file is not None and p.resolve() == labels_file:
            return True
        return any(fnmatch.fnmatch(p.name, g) or fnmatch.fnmatch(p.name.lower(), g.lower()) for g in self.ignore)

    def read_records(self) -> list[Record]:  # long on purpose: scan, order, convert, label in one pass
        if not self.root.is_dir():
            raise DataError(f"{self.root}: the dicom reader needs a folder (of DICOM files, any depth)")
        cache = self.open_cache()
        table = (LabelTable(self.labels_option, self.class_map, LABEL_KEYS, hashed=("patient", "study", "series"),
                            root=self.root) if self.labels_option else None)
        labels_file = table.path.resolve() if table is not None else None
        files = self.files_under_root(lambda p: self._ignored(p, labels_file))
        headers_cache = cache.extra.setdefault("headers", {})
        if cache.extra.get("headers_version") != HEADER_VERSION:
            headers_cache.clear()
            cache.extra["headers_version"] = HEADER_VERSION
        headers, changed = scan_headers(files, self.fail, headers_cache, self.root)
        cache.changed = cache.changed or changed
        series, no_pixels = group_series(headers)
        if no_pixels:
            log.info("dicom reader: %d DICOM files without pixel data passed over (DICOMDIR, reports ...)",
                     no_pixels)
        if not series and not len(self.skipped):
            raise DataError(f"{self.root}: no DICOM image found among {len(files)} files")
        keys, ordered = [], []
        for key in sorted(series):
            try:
                ordered.append(order_series(sorted(series[key], key=lambda t: str(t[0])), self.gap_tolerance))
                keys.append(key)
            except Failure as f:
                self.fail(f.path, f.message)
        sources = [[file_stamp(p, self.root) for p, _ in items] for items in ordered]
        entries = [cache.fresh(k, s) for k, s in zip(keys, sources)]
        todo = [i for i, e in enumerate(entries) if e is None]
        converted = self._map(lambda i: self._convert(cache, keys[i], sources[i], ordered[i]), todo,
                              lambda i: ordered[i][0][0])
        for i, e in zip(todo, converted):
            entries[i] = e
        self.finish_cache(cache, sum(e is not None for e in converted), "series")
        records, no_patient, own = [], 0, 0
        for key, items, e in zip(keys, ordered, entries):
            if e is None:
                continue
            h = items[0][1]
            no_patient += h["patient"] is None
            own += bool(h.get("own_series"))
            files_of = e["files"]
            label = self._label_fn(table, h, files_of)
            try:
                records.extend(self.slice_records(
                    cache, key, e, label, h["patient"] or h["study"] or key,
                    {"series": key, "study": h["study"]}, str(items[0][0]),
                    slice_meta=lambda k, f=files_of: {"file": f[k]}))
            except Failure as f:
                self.fail(f.path, f.message)
        if no_patient:
            log.warning("dicom reader: %d series without PatientID: grouped by their (hashed) study instead "
                        "(or by the file, without either)", no_patient)
        if own:
            log.warning("dicom reader: %d image file(s) without SeriesInstanceUID: each read as a series of its own",
                        own)
        if table is not None:
            table.report_unused(table.kind)
        return records

    def _label_fn(self, table: Optional[LabelTable], h: dict, files_of: list):
        """The class of a series, or of each slice (``path`` keys)."""
        if table is None:
            return self.fixed_label
        if table.kind == "path":
            def by_path(k: int) -> Optional[str]:
                found, lab = table.lookup_path(files_of[k])
                return lab if found else self.fixed_label
            return by_path
        found, lab = table.lookup(h.get(table.kind))
        return lab if found else self.fixed_label

    def _convert(self, cache, key: str, sources: list, items: list) -> dict:
        paths = [p for p, _ in items]
        images = series_images(paths, self.window, self.intensity_range)
        files = paths if len(paths) == len(images) else [paths[0]] * len(images)   # a multi-frame file
        keep = self.select_slices(images)
        return cache.store(key, sources, keep, files=[f.relative_to(self.root).as_posix() for f in files])
