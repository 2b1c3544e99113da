"""What the clinical readers (``dicom``, ``nifti``) share: volumes in, cached 2-D slices out.

A DICOM series and a NIfTI volume are both a stack of slices of one patient. The two
readers turn each stack into 8-bit grey PNG slices (and 0/255 tumour masks where a label
volume exists) **once**, under ``cache_dir``, and reuse them while they are newer than
their source files (as the figshare reader does for ``.mat`` files). This module holds
that machinery:

* :class:`SliceCache` -- ``<cache_dir>/index.json`` (one entry per volume: its source
  files with size and mtime, and per kept slice its size and box) plus
  ``<cache_dir>/images/<volume>/<k>.png`` and ``masks/<volume>/<k>.png``. An entry is
  *fresh* while its sources have the same size and mtime and every PNG is at least as new
  as the newest source; the conversion settings are part of the index, so changing one
  (``window``, ``axis``, ``every`` ...) converts again.
* windows to 8-bit: :func:`linear_window` (the DICOM linear VOI function), :func:`window_bounds`
  (a DICOM ``WindowCenter`` / ``WindowWidth``), :func:`percentile_bounds` (percentiles of a
  whole volume's non-zero voxels, so slices of one volume share one scale and the black
  background of a skull-stripped volume does not pull the window down);
* :func:`hash_id` -- patient, study and series identifiers are only ever kept, written and
  logged as salted hashes (``pt-...``, ``st-...``, ``se-...``);
* :class:`LabelTable` -- class labels from a CSV keyed by patient, study, series, subject
  or path;
* :class:`VolumeReader` -- options common to both readers, the cache folder, slice
  selection (``every``, ``min_foreground``, ``empty_slices``) and one :class:`Record` per
  kept slice.

Common options (``data.options``): ``cache_dir`` (default ``<root>/.btmtl_cache`` when
``root`` is writable, else ``~/.cache/btmtl/<reader>/<hash of root>``; the commands pass
``<paths.cache_dir>/<data.name>``), ``workers`` (threads converting volumes, default 2:
whole volumes are held in memory), ``intensity_range`` (``[0.5, 99.5]``: percentiles of
the volume's non-zero voxels mapped to 0 and 255), ``every`` (keep every k-th slice, 1),
``min_foreground`` (drop slices with fewer than this fraction of non-black pixels, 0.01:
the empty slices beyond the head), ``label`` (one class for every volume, e.g. ``glioma``
for BraTS), ``labels`` (a CSV of class labels, see :class:`LabelTable`), ``source``.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..base import Reader
from ..records import NO_TUMOR, TUMOR, DataError, Record, _norm
from .figshare import FigshareReader, _dir_writable, _Failure, _write_png, mask_box, percentile_range

log = logging.getLogger(__name__)

COMMON_OPTIONS = ("cache_dir", "workers", "source", "intensity_range", "every", "min_foreground", "label",
                  "labels")
CACHE_VERSION = 1
ID_SALT_ENV = "BTMTL_ID_SALT"
_ID_PREFIX = {"patient": "pt", "study": "st", "series": "se"}

__all__ = ["COMMON_OPTIONS", "Failure", "LabelTable", "SliceCache", "VolumeReader", "hash_id", "linear_window",
           "percentile_bounds", "window_bounds"]

#: a per-file problem found in a worker thread (names the file); reported through Reader.fail
Failure = _Failure


# --------------------------------------------------------------------------------------
# identifiers
# --------------------------------------------------------------------------------------
def hash_id(value, kind: str = "patient") -> str:
    """A stable pseudonym of a patient / study / series identifier: ``pt-<16 hex>``.

    SHA-256 of the value, keyed (HMAC) by the environment variable ``BTMTL_ID_SALT`` when
    it is set. Without a salt a short numeric PatientID can be recovered by hashing every
    candidate: set the variable (never in a config: it would be written with the run) for
    data whose IDs matter. The same value and salt always give the same pseudonym, so
    splits stay reproducible.
    """
    data = f"{kind}:{str(value).strip()}".encode()
    salt = os.environ.get(ID_SALT_ENV, "")
    if salt:
        digest = hmac.new(salt.encode(), data, hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(b"btmtl:" + data).hexdigest()
    return f"{_ID_PREFIX.get(kind, kind[:2])}-{digest[:16]}"


# --------------------------------------------------------------------------------------
# windows to 8 bit
# --------------------------------------------------------------------------------------
def linear_window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` mapped linearly from ``[lo, hi]`` to 0..255 (clipped, rounded) as uint8;
    all zeros when ``hi <= lo``."""
    x = np.asarray(x, np.float32)
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    out = (np.nan_to_num(x, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def window_bounds(center: float, width: float) -> tuple[float, float]:
    """``(lo, hi)`` of a DICOM linear window (PS3.3 C.11.2.1.2.1): values at or below
    ``c - 0.5 - (w - 1) / 2`` are black, above ``c - 0.5 + (w - 1) / 2`` white."""
    w = max(float(width), 1.0)
    half = (w - 1.0) / 2.0
    lo, hi = float(center) - 0.5 - half, float(center) - 0.5 + half
    return (lo, hi) if hi > lo else (lo, lo + 1e-3)   # width 1: a threshold


def percentile_bounds(arrays: Iterable[np.ndarray], lo_pct: float, hi_pct: float,
                      max_values: int = 4_000_000) -> tuple[float, float]:
    """``(lo, hi)``: the ``lo_pct`` / ``hi_pct`` percentiles of the non-zero finite values
    of a whole volume (all values when none is non-zero), from a strided sample of at most
    about ``max_values`` values; the plain range when the percentiles coincide."""
    arrays = [np.asarray(a) for a in arrays]
    total = sum(a.size for a in arrays) or 1
    stride = max(1, int(np.ceil(total / max_values)))
    vals = np.concatenate([a.ravel()[::stride] for a in arrays]).astype(np.float32) if arrays else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 0.0
    nonzero = vals[vals != 0]
    v = nonzero if nonzero.size else vals
    lo, hi = (float(p) for p in np.percentile(v, [lo_pct, hi_pct]))
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    return lo, hi


# --------------------------------------------------------------------------------------
# class labels from a CSV
# --------------------------------------------------------------------------------------
class LabelTable:
    """Class labels from a CSV: a ``label`` column and one key column.

    ``keys`` maps accepted key-column names (normalised: lower case, ``-`` and spaces as
    ``_``) to a key kind; kinds in ``hashed`` are compared as :func:`hash_id` pseudonyms
    (the readers never keep patient / study / series ids in clear). A ``path`` key is a
    file or folder relative to the dataset root (a slice takes the label of its own file's
    row, else of the nearest folder above it that has one). An empty label cell means
    unknown. Errors name the file and line: a missing column, several key columns, an
    unknown class name, one key given two labels.
    """

    def __init__(self, path, class_map, keys: dict, hashed: Sequence[str] = (), root: Optional[Path] = None):
        p = Path(str(path)).expanduser()
        if not p.is_file() and root is not None and (Path(root) / p).is_file():
            p = Path(root) / p
        if not p.is_file():
            raise DataError(f"labels file {p} not found (data.options.labels: a CSV with a label column and "
                            f"one of {sorted(set(keys))})")
        self.path = p
        self.rows: dict[str, Optional[str]] = {}
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = {_norm(c): c for c in (reader.fieldnames or [])}
            found = [c for c in cols if c in keys]
            if "label" not in cols or len(found) != 1:
                raise DataError(f"{p}: needs a 'label' column and exactly one key column of "
                                f"{sorted(keys)} (found columns {sorted(cols)})")
            self.column = found[0]
            self.kind = keys[self.column]
            for line, row in enumerate(reader, 2):
                raw = (row.get(cols[self.column]) or "").strip()
                if not raw:
                    continue
                name = (row.get(cols["label"]) or "").strip()
                label = class_map.canonical(name, where=f"{p}:{line}") if name else None
                key = self._key(raw, hashed)
                if key in self.rows and self.rows[key] != label:
                    raise DataError(f"{p}:{line}: {self.column} given two labels ({self.rows[key]!r}, {label!r})")
                self.rows[key] = label
        self.used: set = set()

    def _key(self, raw: str, hashed) -> str:
        if self.kind in hashed:
            return hash_id(raw, self.kind)
        if self.kind == "path":
            return Path(raw.replace("\\", "/")).as_posix().strip("/")
        return raw

    def lookup(self, key) -> tuple[bool, Optional[str]]:
        """``(found, label)`` of one key."""
        if key in self.rows:
            self.used.add(key)
            return True, self.rows[key]
        return False, None

    def lookup_path(self, rel: str) -> tuple[bool, Optional[str]]:
        """A ``path`` key: the file's own row, else the nearest folder above it."""
        p = Path(rel)
        for cand in (p, *p.parents):
            found, label = self.lookup(cand.as_posix())
            if found:
                return found, label
        return False, None

    def report_unused(self, what: str) -> None:
        n = len(set(self.rows) - self.used)
        if n:   # counts only: keys may be patient ids
            log.warning("%s: %d of %d rows of %s (keyed by %s) match no %s", self.path.name, n, len(self.rows),
                        self.path, self.column, what)


# --------------------------------------------------------------------------------------
# the slice cache
# --------------------------------------------------------------------------------------
def file_stamp(path: Path, root: Path) -> list:
    """``[relative path, mtime_ns, size]`` of a source file."""
    st = path.stat()
    return [path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path), st.st_mtime_ns,
            st.st_size]


class SliceCache:
    """Converted slices of many volumes under one folder (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))   # plain JSON types, compared as stored
        self.path = self.folder / "index.json"
        self.volumes: dict[str, dict] = {}
        self.extra: dict = {}
        self.changed = False
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.extra = data.get("extra", {})
                    if data.get("settings") == self.settings:
                        self.volumes = data.get("volumes", {})
            except (json.JSONDecodeError, AttributeError, OSError):
                log.warning("ignoring unreadable cache index %s", self.path)

    def image_path(self, key: str, k: int) -> Path:
        return self.folder / "images" / key / f"{k:04d}.png"

    def mask_path(self, key: str, k: int) -> Path:
        return self.folder / "masks" / key / f"{k:04d}.png"

    def fresh(self, key: str, sources: list) -> Optional[dict]:
        """The cached entry of volume ``key`` when still valid for ``sources``
        (:func:`file_stamp` rows), else None."""
        e = self.volumes.get(key)
        if not e or e.get("sources") != sources:
            return None
        newest = max((s[1] for s in sources), default=0)
        try:
            for s in e["slices"]:
                paths = [self.image_path(key, s["k"])] + ([self.mask_path(key, s["k"])] if s.get("box") else [])
                if min(p.stat().st_mtime_ns for p in paths) < newest:
                    return None
        except OSError:
            return None
        return e

    def store(self, key: str, sources: list, slices: list, **info) -> dict:
        """Write the kept slices (``{"k", "image": uint8 [H, W], "mask": bool [H, W] or None}``)
        as PNGs and record the volume; returns its entry. Slices of an earlier conversion of
        the volume are removed first (a changed ``every`` leaves no stale file behind)."""
        import shutil

        for d in (self.folder / "images" / key, self.folder / "masks" / key):
            shutil.rmtree(d, ignore_errors=True)
        entries = []
        for s in slices:
            img = s["image"]
            _write_png(self.image_path(key, s["k"]), img)
            box = None
            if s.get("mask") is not None:
                b = mask_box(s["mask"])
                if b is not None:
                    box = [float(v) for v in b]
                    _write_png(self.mask_path(key, s["k"]), np.where(s["mask"], 255, 0).astype(np.uint8))
            entries.append({"k": int(s["k"]), "w": int(img.shape[1]), "h": int(img.shape[0]), "box": box,
                            "has_mask": s.get("mask") is not None})
        e = {"sources": sources, "slices": entries, **info}
        self.volumes[key] = e
        self.changed = True
        return e

    def save(self) -> None:
        if not self.changed:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".index.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "settings": self.settings, "volumes": self.volumes,
                                   "extra": self.extra}))
        os.replace(tmp, self.path)
        self.changed = False


# --------------------------------------------------------------------------------------
# the readers' common part
# --------------------------------------------------------------------------------------
def _plain(v):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(v, (DictConfig, ListConfig)):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return v


def as_list(v) -> list:
    """A config value that may be one item or a list, as a list (None -> [])."""
    v = _plain(v)
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]


class VolumeReader(Reader):
    """Base of the ``dicom`` and ``nifti`` readers (options in the module docstring).

    Subclasses set ``OPTIONS`` and implement :meth:`read_records`, using :meth:`open_cache`,
    :meth:`select_slices` and :meth:`slice_records`.
    """

    OPTIONS: tuple = COMMON_OPTIONS
    REQUIRES = ""                # the module reading the format (pydicom, nibabel)
    _map = FigshareReader._map   # the thread pool that reports failures in item order

    def __init__(self, root, class_map=None, on_error: str = "raise", **options):
        import importlib.util

        if self.REQUIRES and importlib.util.find_spec(self.REQUIRES) is None:
            raise DataError(f"data={self.name} needs {self.REQUIRES}: pip install -e '.[clinical]' "
                            f"(or pip install {self.REQUIRES})")
        super().__init__(root, class_map=class_map, on_error=on_error, **{k: _plain(v) for k, v in options.items()})
        self.check_options(self.OPTIONS)
        o = self.options
        self.source = str(o.get("source") or self.name)
        self.workers = self._int("workers", 2, 1)
        self.every = self._int("every", 1, 1)
        try:
            self.min_foreground = float(o.get("min_foreground", 0.01) or 0.0)
        except (TypeError, ValueError):
            self.min_foreground = -1.0
        if not 0 <= self.min_foreground < 1:
            raise DataError(f"{self.name} reader: min_foreground must be a fraction in [0, 1), "
                            f"got {o.get('min_foreground')!r}")
        self.intensity_range = percentile_range(o.get("intensity_range", (0.5, 99.5)), self.name)
        self.fixed_label = self.class_map.canonical(o["label"], where="data.options.label") if o.get("label") else None
        self.labels_option = o.get("labels")
        self.cache_dir_option = o.get("cache_dir")

    def _int(self, key: str, default: int, minimum: int) -> int:
        v = self.options.get(key, default)
        try:
            n = int(default if v is None else v)
        except (TypeError, ValueError):
            n = minimum - 1
        if n < minimum:
            raise DataError(f"{self.name} reader: {key} must be an integer >= {minimum}, got {v!r}")
        return n

    def cache_settings(self) -> dict:
        """The settings a conversion depends on (a change converts again)."""
        return {"intensity_range": list(self.intensity_range), "every": self.every,
                "min_foreground": self.min_foreground}

    def open_cache(self) -> SliceCache:
        if self.cache_dir_option:
            d = Path(str(self.cache_dir_option)).expanduser()
        elif _dir_writable(self.root):
            d = self.root / ".btmtl_cache"
        else:
            digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
            d = Path.home() / ".cache" / "btmtl" / self.name / digest
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"{self.name} reader: cannot create cache_dir {d} for the converted slices ({e}); "
                            "set data.options.cache_dir to a writable folder") from e
        return SliceCache(d, {"reader": self.name, **self.cache_settings()})

    def files_under_root(self, skip: Callable[[Path], bool] = lambda p: False) -> list[Path]:
        """Every file under ``root`` (any depth), sorted; hidden files and folders (the
        cache among them) and those ``skip`` names are left out."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if not f.startswith(".") and not skip(p):
                    out.append(p)
        return out

    def select_slices(self, images: Sequence[np.ndarray], masks: Optional[Sequence[np.ndarray]] = None,
                      keep_empty: bool = True) -> list[dict]:
        """The slices to keep: every ``every``-th, with at least ``min_foreground`` of
        non-black pixels (a slice holding tumour is always kept), and -- with ``masks`` and
        ``keep_empty=False`` -- only slices holding tumour."""
        out = []
        for k, img in enumerate(images):
            if k % self.every:
                continue
            m = None if masks is None else np.asarray(masks[k], bool)
            tumour = m is not None and bool(m.any())
            if not tumour and (float(np.mean(img > 0)) < self.min_foreground or (m is not None and not keep_empty)):
                continue
            out.append({"k": k, "image": img, "mask": m})
        return out

    def slice_records(self, cache: SliceCache, key: str, entry: dict, label, group: str,
                      meta: dict, where: str, slice_meta: Optional[Callable[[int], dict]] = None) -> list[Record]:
        """One record per cached slice of a volume. ``label`` is the volume's class (or
        None), or a function of the slice index giving it. With a label volume
        (``has_mask``): a slice holding tumour gets the class (generic ``tumor`` when none is
        given), its mask and box; a slice without gets ``no_tumor`` and known-empty box and
        mask. Without one: the class (or unknown) and unknown box and mask."""
        label_of = label if callable(label) else (lambda k: label)
        if any(s.get("box") and label_of(s["k"]) == NO_TUMOR for s in entry["slices"]):
            raise Failure(where, f"{where}: labelled {NO_TUMOR} but its label volume marks tumour")
        out = []
        for s in entry["slices"]:
            label = label_of(s["k"])
            extra = slice_meta(s["k"]) if slice_meta is not None else {}
            common = dict(image=str(cache.image_path(key, s["k"])), group=group, source=self.source,
                          width=s["w"], height=s["h"], meta={**meta, "slice": s["k"], **extra})
            if s.get("has_mask") and s.get("box"):
                lab = label or TUMOR
                out.append(Record(label=lab, boxes=np.asarray(s["box"], np.float32)[None], box_classes=(lab,),
                                  mask=str(cache.mask_path(key, s["k"])),
                                  known={"label": True, "boxes": True, "mask": True}, **common))
            elif s.get("has_mask"):
                out.append(Record(label=NO_TUMOR, known={"label": True, "boxes": True, "mask": True}, **common))
            else:
                out.append(Record(label=label, known={"label": label is not None, "boxes": False, "mask": False},
                                  **common))
        return out

    def finish_cache(self, cache: SliceCache, converted: int, what: str) -> None:
        cache.save()
        if converted:
            log.info("%s reader: converted %d %s to PNG slices under %s", self.name, converted, what, cache.folder)
