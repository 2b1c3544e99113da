"""Volumes as inputs of a command (``predict input=<DICOM folder | .nii.gz>``): the files
of an input that are NIfTI volumes or DICOM series, as stacks of 8-bit display slices.

The slices are made as the ``nifti`` / ``dicom`` readers make them
(:func:`.readers.nifti.volume_slices`, :func:`.readers.dicom.series_images`), with the
options of the run that trained the model (``window``, ``intensity_range``, ``axis``,
``channel``) so a model sees at inference what it saw in training. Every slice is kept
(no ``every`` / ``min_foreground`` selection): one prediction per slice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .records import DataError
from .readers.clinical import Failure

log = logging.getLogger(__name__)

#: the reader options that change how slices look (taken from the run's config)
SLICE_OPTIONS = ("window", "intensity_range", "axis", "channel")


@dataclass
class SliceStack:
    """One volume's display slices, in order."""

    kind: str                          # nifti | dicom
    name: str                          # a NIfTI file's path, or a DICOM series' hashed id (se-...)
    path: Path                         # the NIfTI file, or the series' first file
    slices: list                       # uint8 [H, W] per slice
    files: list                        # the file of each slice
    geometry: Optional[object] = None  # NIfTI: VolumeGeometry (to write a mask volume back)


@dataclass
class VolumeInput:
    """A volume found among the input files, read on :meth:`load`."""

    kind: str
    path: Path
    files: list = field(default_factory=list)   # DICOM: the series' files, ordered
    series: Optional[str] = None
    options: dict = field(default_factory=dict)

    def load(self) -> SliceStack:
        """The slices; :class:`~.readers.clinical.Failure` naming the file when unreadable."""
        o = self.options
        rng = tuple(float(v) for v in (o.get("intensity_range") or (0.5, 99.5)))
        if self.kind == "nifti":
            from .readers.nifti import parse_axis, volume_slices

            ch = o.get("channel")
            images, geom = volume_slices(self.path, parse_axis(o.get("axis", 2) or 2),
                                         None if ch is None else int(ch), rng)
            return SliceStack("nifti", str(self.path), self.path, images, [self.path] * len(images), geom)
        from .readers.dicom import parse_window, series_images

        images = series_images(self.files, parse_window(o.get("window", "header")), rng)
        files = self.files if len(self.files) == len(images) else [self.files[0]] * len(images)
        return SliceStack("dicom", str(self.series), self.files[0], images, list(files))


def find_volumes(files: Sequence[Path], options: Optional[dict] = None,
                 fail: Optional[Callable[[str, str], None]] = None) -> tuple[list, list]:
    """``(other files, [VolumeInput])``: NIfTI files (by name) and DICOM files (by their
    ``DICM`` marker) become volumes, DICOM files grouped into ordered series; the rest is
    left as it is. A file or series that cannot be used goes to ``fail(path, message)``
    (default: raise :class:`DataError`)."""
    from .readers.nifti import is_nifti

    def raise_(path, message):
        raise DataError(message)

    fail = fail or raise_
    options = {k: v for k, v in (options or {}).items() if k in SLICE_OPTIONS and v is not None}
    rest, niftis, dicoms = [], [], []
    for f in files:
        f = Path(f)
        if is_nifti(f):
            niftis.append(f)
        elif _is_dicom(f):
            dicoms.append(f)
        else:
            rest.append(f)
    volumes = [VolumeInput("nifti", f, options=options) for f in niftis]
    if dicoms:
        _need("pydicom")
        from .readers.dicom import group_series, order_series, scan_headers

        headers, _ = scan_headers(dicoms, fail)
        series, _ = group_series(headers)
        for key in sorted(series, key=lambda k: str(min(p for p, _ in series[k]))):
            try:
                items = order_series(sorted(series[key], key=lambda t: str(t[0])))
            except Failure as e:
                fail(e.path, e.message)
                continue
            volumes.append(VolumeInput("dicom", items[0][0], [p for p, _ in items], key, options))
    if niftis:
        _need("nibabel")
    return rest, volumes


def load_stacks(volumes: Sequence[VolumeInput], fail) -> Iterator[SliceStack]:
    """Each volume's :class:`SliceStack` in turn (one in memory at a time); a volume that
    cannot be read goes to ``fail(path, message)``."""
    for v in volumes:
        try:
            yield v.load()
        except Failure as e:
            fail(e.path, e.message)


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def _is_dicom(path: Path) -> bool:
    from .readers.dicom import is_dicom_file

    return is_dicom_file(path)


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DataError(f"reading {'DICOM' if module == 'pydicom' else 'NIfTI'} input needs {module}: "
                        "pip install -e '.[clinical]'")
