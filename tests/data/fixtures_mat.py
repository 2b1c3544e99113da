"""Writers of small synthetic figshare (Cheng et al.) ``.mat`` slices for tests.

Real files are MATLAB v7.3: an HDF5 file behind a 512-byte user block that starts with
MATLAB's text header, struct ``cjdata`` as an HDF5 group, every array stored
column-major (so an (H, W) MATLAB image is an (W, H) HDF5 dataset), char arrays as
uint16 codes, logicals as uint8, scalars as (1, 1) doubles.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

MATLAB_HEADER = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Apr  6 16:05:49 2015 "
                 b"HDF5 schema 1.00 .")


def _attr(ds, cls: str, **extra) -> None:
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    for k, v in extra.items():
        ds.attrs[k] = v


def write_mat73(path: str | Path, image: np.ndarray, mask: np.ndarray, label: float, pid: Optional[str],
                border: Optional[np.ndarray] = None, group: str = "cjdata") -> Path:
    """Write one slice as MATLAB v7.3 does (see module docstring). ``image``/``mask`` are (H, W)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    mask = np.asarray(mask)
    if border is None:
        border = np.array([1.0, 2.0, 3.0, 4.0])
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group(group)
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        _attr(g.create_dataset("image", data=image.T.astype(np.int16)), "int16")
        _attr(g.create_dataset("label", data=np.array([[float(label)]])), "double")
        if pid is not None:
            codes = np.array([[ord(c)] for c in pid], np.uint16)
            _attr(g.create_dataset("PID", data=codes), "char", MATLAB_int_decode=np.int32(2))
        _attr(g.create_dataset("tumorBorder", data=np.asarray(border, np.float64).reshape(-1, 1)), "double")
        _attr(g.create_dataset("tumorMask", data=(mask.T != 0).astype(np.uint8)), "logical",
              MATLAB_int_decode=np.int32(1))
    header = MATLAB_HEADER.ljust(116, b" ") + b" " * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:  # the user block is ours to fill
        f.write(header.ljust(512, b"\x00"))
    return path


def write_mat5(path: str | Path, image: np.ndarray, mask: np.ndarray, label: float, pid: str) -> Path:
    """An older (v5) MATLAB file with the same struct, written by scipy."""
    import scipy.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"cjdata": {
        "image": np.asarray(image, np.int16), "label": float(label), "PID": pid,
        "tumorBorder": np.array([[1.0, 2.0, 3.0, 4.0]]),
        "tumorMask": (np.asarray(mask) != 0).astype(np.uint8)}})
    return path


def slice_arrays(h: int, w: int, box: tuple[int, int, int, int], seed: int = 0):
    """(image, mask): an int16 image with a horizontal ramp + noise and a rectangular
    tumour ``box = (row0, col0, row1, col1)`` (inclusive) in the mask."""
    rng = np.random.default_rng(seed)
    image = (np.arange(w)[None, :] * 20 + rng.integers(0, 5, (h, w))).astype(np.int16)
    image[0, 0] = 3000  # a hot pixel: the robust scaling must not let it flatten the image
    mask = np.zeros((h, w), np.uint8)
    r0, c0, r1, c1 = box
    mask[r0:r1 + 1, c0:c1 + 1] = 1
    return image, mask
