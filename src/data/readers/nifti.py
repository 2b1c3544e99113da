"""``nifti`` reader: NIfTI volumes (``.nii``, ``.nii.gz``) with label volumes, as BraTS shares them.

Layouts (option ``pairing``)
----------------------------
a) ``suffix`` (the default; BraTS): every volume of a subject in one folder, named
   ``<subject><sep><sequence>.nii.gz`` with ``<sep>`` ``_`` or ``-``::

       <root>/**/BraTS2021_00000_t1ce.nii.gz    the image: its sequence is one of ``sequence``
       <root>/**/BraTS2021_00000_seg.nii.gz     the label volume: ``label_suffix``
       <root>/**/BraTS2021_00000_flair.nii.gz   other sequences are not read

   ``sequence`` (default ``[t1ce, t1c]``: BraTS 2021 ``_t1ce``, BraTS 2023 ``-t1c``) picks the
   image, the first of the list a subject has; ``label_suffix`` (default ``[seg]``) the label
   volume of the same subject in the same folder. The subject id is the name before the
   separator (``BraTS2021_00000``).
b) ``folders`` (Medical Segmentation Decathlon, nnU-Net): ``<root>/**/<image_dir>/<case>.nii.gz``
   paired with ``<label_dir>/<case>.nii.gz`` beside it (``image_dir`` default ``[images,
   imagesTr]``, ``label_dir`` ``[labels, labelsTr]``); the subject id is ``<case>``. A 4-D
   image (several sequences in one file, as Decathlon's BrainTumour) needs ``channel``.

c) ``none``: every NIfTI file under ``root`` is an image volume of its own (the subject id
   is its name), without a label volume: masks unknown, labels from ``labels`` / ``label``.

An image without its label volume is an error naming the file it looked for, unless
``require_labels: false`` (its slices then have unknown masks: classification only).

Geometry
--------
Each volume is reoriented to the closest canonical orientation (RAS+,
``nibabel.as_closest_canonical``), so a volume stored flipped or permuted gives the same
slices. It is cut along ``axis`` (``axial`` = 2, the default; ``coronal`` = 1;
``sagittal`` = 0; canonical axes) and every slice is shown as a radiologist's viewer and a
DICOM series show it: the patient's left on the image's right, anterior (axial) or superior
(coronal, sagittal) at the top (:func:`to_display` / :func:`from_display`). The label volume
must have the image's shape and affine after the same reorientation, else the volume is an
error naming both files (``data.on_error=skip`` skips and counts it).

Targets
-------
Label values are mapped by ``tumor_labels`` (null: any non-zero voxel is tumour; or a list,
e.g. ``[1, 4]`` for BraTS 2021's tumour core without oedema). A slice holding tumour gets
the subject's class, its mask and the tight box of its tumour pixels; a slice without keeps
``label=no_tumor`` with known-empty box and mask (``empty_slices: keep``, the default) or is
dropped (``drop``). The subject's class comes from ``labels`` (a CSV with columns
``subject,label``), else from ``label`` (one class for all, e.g. ``glioma`` for BraTS), else
it is the generic ``tumor`` (tumour present, subtype unknown). The group of every slice is
the subject id (``subject_regex``: a regex whose first group gives the patient from the
subject id, e.g. ``'^(.*)-\\d{3}$'`` for BraTS 2023's ``BraTS-GLI-00000-000`` time points).

Intensities: one window per volume, the ``intensity_range`` percentiles of its non-zero
voxels mapped to 0 and 255. Converted slices are cached (:mod:`.clinical`).

Options: ``pairing``, ``sequence``, ``label_suffix``, ``image_dir``, ``label_dir``,
``channel``, ``axis``, ``tumor_labels``, ``empty_slices``, ``require_labels``,
``subject_regex`` and the common ones of :mod:`.clinical` (``cache_dir``, ``workers``,
``intensity_range``, ``every``, ``min_foreground``, ``label``, ``labels``, ``source``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..base import register_reader
from ..records import DataError, Record
from .clinical import COMMON_OPTIONS, Failure, LabelTable, VolumeReader, as_list, file_stamp, hash_id, \
    linear_window, percentile_bounds

log = logging.getLogger(__name__)

OPTIONS = COMMON_OPTIONS + ("pairing", "sequence", "label_suffix", "image_dir", "label_dir", "channel", "axis",
                            "tumor_labels", "empty_slices", "require_labels", "subject_regex")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULTS = {"sequence": ["t1ce", "t1c"], "label_suffix": ["seg"], "image_dir": ["images", "imagesTr"],
            "label_dir": ["labels", "labelsTr"]}


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    name = Path(path).name
    for s in NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[:-len(s)]
    return Path(name).stem


def parse_axis(value) -> int:
    """0, 1, 2 or ``sagittal`` / ``coronal`` / ``axial``."""
    v = AXES.get(str(value).strip().lower(), value)
    try:
        v = int(v)
    except (TypeError, ValueError):
        v = -1
    if v not in (0, 1, 2):
        raise DataError(f"nifti reader: axis must be 0, 1, 2, sagittal, coronal or axial, got {value!r}")
    return v


# --------------------------------------------------------------------------------------
# geometry: canonical volumes, display slices and back
# --------------------------------------------------------------------------------------
def to_display(plane: np.ndarray) -> np.ndarray:
    """A canonical (RAS+) slice -> as a viewer shows it (patient left on the image's right,
    anterior / superior at the top)."""
    return np.ascontiguousarray(np.asarray(plane)[::-1, ::-1].T)


def from_display(image: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_display`."""
    return np.ascontiguousarray(np.asarray(image).T[::-1, ::-1])


def load_nifti(path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        img.header.get_data_shape()
    except Exception as e:  # nibabel raises many types for a bad file  # noqa: BLE001
        raise Failure(path, f"{path}: not a readable NIfTI volume ({type(e).__name__}: {e})") from e
    return img


def spatial_image(img, path, channel: Optional[int]):
    """The 3-D image of ``img``: itself, or channel ``channel`` of a 4-D volume."""
    shape = img.shape
    if len(shape) == 3:
        return img
    if len(shape) == 4 and shape[3] == 1:
        return img.slicer[:, :, :, 0]
    if len(shape) == 4:
        if channel is None:
            raise Failure(path, f"{path}: a 4-D volume {shape} (several sequences in one file): set "
                                f"data.options.channel to the one to read (0..{shape[3] - 1})")
        if not 0 <= channel < shape[3]:
            raise Failure(path, f"{path}: channel {channel} out of range for a 4-D volume {shape}")
        return img.slicer[:, :, :, channel]
    raise Failure(path, f"{path}: expected a 3-D volume, got shape {shape}")


@dataclass
class VolumeGeometry:
    """Where a volume's display slices sit in the file (to write a mask volume back)."""

    image: object            # the nibabel image as loaded (original orientation, 3-D)
    canonical_shape: tuple
    canonical_affine: np.ndarray
    axis: int

    def mask_volume(self, masks: dict) -> object:
        """A uint8 NIfTI image with the input's shape (3-D), affine and orientation from
        display-slice masks ``{k: [H, W] 0/1}`` (slices not given are 0)."""
        import nibabel as nib
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

        vol = np.zeros(self.canonical_shape, np.uint8)
        for k, m in masks.items():
            idx = [slice(None)] * 3
            idx[self.axis] = k
            vol[tuple(idx)] = from_display(np.asarray(m, np.uint8))
        to_file = ornt_transform(axcodes2ornt("RAS"), io_orientation(self.image.affine))
        data = apply_orientation(vol, to_file)
        header = self.image.header.copy()
        header.set_data_dtype(np.uint8)
        out = nib.Nifti1Image(data, self.image.affine, header)
        out.header.set_data_shape(data.shape)
        out.set_qform(self.image.affine, code=int(self.image.header["qform_code"]) or 1)
        out.set_sform(self.image.affine, code=int(self.image.header["sform_code"]) or 1)
        out.header["scl_slope"], out.header["scl_inter"] = 1.0, 0.0
        return out


def display_slices(volume: np.ndarray, axis: int) -> list[np.ndarray]:
    return [to_display(np.take(volume, k, axis=axis)) for k in range(volume.shape[axis])]


def volume_slices(path, axis: int = 2, channel: Optional[int] = None,
                  intensity_range=(0.5, 99.5)) -> tuple[list[np.ndarray], VolumeGeometry]:
    """The display slices (uint8, one window for the volume) of a NIfTI image and its
    geometry. Raises :class:`~.clinical.Failure` naming the file."""
    import nibabel as nib

    img = spatial_image(load_nifti(path), path, channel)
    try:
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32))
    except Exception as e:  # noqa: BLE001 - truncated gzip, bad data type ...
        raise Failure(path, f"{path}: cannot read the voxels ({type(e).__name__}: {e})") from e
    lo, hi = percentile_bounds([data], *intensity_range)
    images = [linear_window(s, lo, hi) for s in display_slices(data, axis)]
    return images, VolumeGeometry(image=img, canonical_shape=tuple(data.shape), canonical_affine=canon.affine,
                                  axis=axis)


def label_slices(path, image_path, geometry: VolumeGeometry, tumor_labels) -> list[np.ndarray]:
    """Display-slice tumour masks (bool) of a label volume; it must match the image."""
    import nibabel as nib

    seg = spatial_image(load_nifti(path), path, None)
    try:
        canon = nib.as_closest_canonical(seg)
    except Exception as e:  # noqa: BLE001 - a degenerate affine, unreadable voxels
        raise Failure(path, f"{path}: cannot reorient the label volume ({type(e).__name__}: {e})") from e
    shape, affine = tuple(geometry.canonical_shape), np.asarray(geometry.canonical_affine)
    if tuple(canon.shape) != shape:
        raise Failure(path, f"{path}: label volume shape {tuple(canon.shape)} does not match image {image_path} "
                            f"shape {shape} (both in canonical orientation)")
    tol = 1e-3 * max(1e-6, float(np.abs(affine[:3, :3]).max()))
    if not np.allclose(canon.affine, affine, atol=max(tol, 1e-4)):
        raise Failure(path, f"{path}: label volume affine does not match image {image_path} (not on the same "
                            f"voxel grid: {np.round(canon.affine, 3).tolist()} vs {np.round(affine, 3).tolist()})")
    try:
        lab = np.asanyarray(canon.dataobj)
    except Exception as e:  # noqa: BLE001
        raise Failure(path, f"{path}: cannot read the voxels ({type(e).__name__}: {e})") from e
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.round(lab)):
            raise Failure(path, f"{path}: label volume holds non-integer values (expected integer labels)")
    tumour = lab != 0 if tumor_labels is None else np.isin(np.rint(lab).astype(np.int64), tumor_labels)
    return display_slices(tumour, geometry.axis)


# --------------------------------------------------------------------------------------
# pairing image and label volumes
# --------------------------------------------------------------------------------------
@dataclass
class VolumePair:
    subject: str
    image: Path
    labels: Optional[Path]


def _suffix_parts(path: Path) -> tuple[str, str]:
    m = re.fullmatch(r"(?P<subject>.+?)[_-](?P<seq>[^_-]+)", nifti_stem(path))
    return (m["subject"], m["seq"].lower()) if m else (nifti_stem(path), "")


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------
@register_reader("nifti")
class NiftiReader(VolumeReader):
    """NIfTI image volumes with label volumes (see the module docstring)."""

    OPTIONS = OPTIONS
    REQUIRES = "nibabel"

    def __init__(self, root, class_map=None, on_error: str = "raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        o = self.options
        self.pairing = str(o.get("pairing") or "suffix").lower()
        if self.pairing not in ("suffix", "folders", "none"):
            raise DataError(f"nifti reader: pairing must be 'suffix' (BraTS <subject>_t1ce / _seg names), "
                            f"'folders' (images/ + labels/ with one name) or 'none' (every file an image, no "
                            f"label volumes), got {o.get('pairing')!r}")
        self.sequences = [s.lower() for s in as_list(o.get("sequence", DEFAULTS["sequence"]))]
        self.label_suffixes = [s.lower() for s in as_list(o.get("label_suffix", DEFAULTS["label_suffix"]))]
        self.image_dirs = as_list(o.get("image_dir", DEFAULTS["image_dir"]))
        self.label_dirs = as_list(o.get("label_dir", DEFAULTS["label_dir"]))
        if not self.sequences or not self.label_suffixes:
            raise DataError("nifti reader: sequence and label_suffix must name at least one suffix")
        self.axis = parse_axis(o.get("axis", 2))
        ch = o.get("channel")
        try:
            self.channel = None if ch is None else int(ch)
        except (TypeError, ValueError):
            raise DataError(f"nifti reader: channel must be an integer or null, got {ch!r}") from None
        tl = o.get("tumor_labels")
        try:
            self.tumor_labels = None if tl is None else sorted(int(v) for v in as_list(tl))
        except ValueError:
            raise DataError(f"nifti reader: tumor_labels must be null (any non-zero) or a list of integer "
                            f"label values, got {tl!r}") from None
        self.empty_slices = str(o.get("empty_slices") or "keep").lower()
        if self.empty_slices not in ("keep", "drop"):
            raise DataError(f"nifti reader: empty_slices must be 'keep' (tumour-free slices as known-empty "
                            f"no_tumor) or 'drop', got {o.get('empty_slices')!r}")
        self.require_labels = bool(o.get("require_labels", True))
        rx = o.get("subject_regex")
        try:
            self.subject_regex = re.compile(rx) if rx else None
        except re.error as e:
            raise DataError(f"nifti reader: subject_regex {rx!r} is not a regular expression ({e})") from None

    def cache_settings(self) -> dict:
        return {**super().cache_settings(), "axis": self.axis, "channel": self.channel,
                "tumor_labels": self.tumor_labels, "empty_slices": self.empty_slices}

    # ---- pairing ----------------------------------------------------------------------
    def pairs(self) -> list[VolumePair]:
        files = [p for p in self.files_under_root() if is_nifti(p)]
        if self.pairing == "none":
            pairs = [VolumePair(nifti_stem(p), p, None) for p in files]
        else:
            pairs = self._pairs_suffix(files) if self.pairing == "suffix" else self._pairs_folders(files)
        if not pairs and not len(self.skipped):
            hint = (f"pairing=suffix looks for <subject>_<sequence>.nii.gz with a sequence in {self.sequences} "
                    f"and <subject>_<label suffix> with a label suffix in {self.label_suffixes}"
                    if self.pairing == "suffix" else
                    f"pairing=folders looks for {self.image_dirs}/<case>.nii.gz and {self.label_dirs}/<case>.nii.gz")
            raise DataError(f"{self.root}: no image volume found among {len(files)} NIfTI files ({hint}); set "
                            "data.options.sequence / label_suffix / pairing to match the names")
        return pairs

    def _pairs_suffix(self, files: list[Path]) -> list[VolumePair]:
        by_subject: dict[tuple, dict] = {}
        for p in files:
            subject, seq = _suffix_parts(p)
            by_subject.setdefault((p.parent, subject), {})[seq] = p
        out = []
        for (folder, subject), seqs in sorted(by_subject.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            image = next((seqs[s] for s in self.sequences if s in seqs), None)
            labels = next((seqs[s] for s in self.label_suffixes if s in seqs), None)
            if image is None:
                if labels is not None:
                    self.fail(labels, f"{labels}: a label volume without an image volume (looked for "
                                      f"{subject}_<{'|'.join(self.sequences)}>.nii[.gz] beside it)")
                continue
            out.append(self._pair(subject, image, labels,
                                  folder / f"{subject}_{self.label_suffixes[0]}.nii.gz"))
        return [p for p in out if p is not None]

    def _pairs_folders(self, files: list[Path]) -> list[VolumePair]:
        out = []
        lookup = {(p.parent, nifti_stem(p)): p for p in files}
        for p in files:
            if p.parent.name not in self.image_dirs:
                continue
            case = nifti_stem(p)
            labels = next((lookup[(p.parent.parent / d, case)] for d in self.label_dirs
                           if (p.parent.parent / d, case) in lookup), None)
            out.append(self._pair(case, p, labels, p.parent.parent / self.label_dirs[0] / p.name))
        return [p for p in out if p is not None]

    def _pair(self, subject: str, image: Path, labels: Optional[Path], expected: Path) -> Optional[VolumePair]:
        if labels is None and self.require_labels:
            self.fail(image, f"{image}: no label volume (expected {expected}); set "
                             "data.options.require_labels=false to read images without one (masks unknown)")
            return None
        return VolumePair(subject, image, labels)

    # ---- reading ------------------------------------------------------------------------
    def read_records(self) -> list[Record]:
        pairs = self.pairs()
        cache = self.open_cache()
        table = (LabelTable(self.labels_option, self.class_map, {"subject": "subject", "subject_id": "subject"},
                            root=self.root) if self.labels_option else None)
        keys = [self._key(p) for p in pairs]
        sources = [[file_stamp(f, self.root) for f in (p.image, p.labels) if f is not None] for p in pairs]
        entries = [cache.fresh(k, s) for k, s in zip(keys, sources)]
        todo = [i for i, e in enumerate(entries) if e is None]
        converted = self._map(lambda i: self._convert(cache, keys[i], sources[i], pairs[i]), todo,
                              lambda i: pairs[i].image)
        for i, e in zip(todo, converted):
            entries[i] = e
        self.finish_cache(cache, sum(e is not None for e in converted), "volumes")
        records = []
        for p, key, e in zip(pairs, keys, entries):
            if e is None:
                continue
            label = self.fixed_label
            if table is not None:
                found, lab = table.lookup(p.subject)
                label = lab if found else label
            try:
                records.extend(self.slice_records(cache, key, e, label, hash_id(self._group(p.subject), "patient"),
                                                  {"volume": str(p.image), "axis": self.axis}, str(p.image)))
            except Failure as f:
                self.fail(f.path, f.message)
        if table is not None:
            table.report_unused("subject")
        return records

    def _key(self, p: VolumePair) -> str:
        rel = p.image.relative_to(self.root)
        return (rel.parent / nifti_stem(rel)).as_posix()

    def _group(self, subject: str) -> str:
        if self.subject_regex is not None:
            m = self.subject_regex.search(subject)
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return subject

    def _convert(self, cache, key: str, sources: list, p: VolumePair) -> dict:
        images, geom = volume_slices(p.image, self.axis, self.channel, self.intensity_range)
        masks = None
        if p.labels is not None:
            masks = label_slices(p.labels, p.image, geom, self.tumor_labels)
        keep = self.select_slices(images, masks, keep_empty=self.empty_slices == "keep")
        return cache.store(key, sources, keep, shape=list(geom.canonical_shape))
