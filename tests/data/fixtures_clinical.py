"""Clinical test data the tests make themselves: DICOM series (pydicom) and NIfTI volumes
(nibabel). Every slice encodes its position, so slice order and orientation are checkable."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def slice_pixels(k: int, rows: int = 32, cols: int = 32, base: int = 100, step: int = 20,
                 texture: Optional[int] = None) -> np.ndarray:
    """A head-like disc of value ``base + step * k`` on a zero background (stored values);
    with ``texture`` (a seed) coarse random blobs make each patient's slices look different."""
    yy, xx = np.mgrid[:rows, :cols]
    disc = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (0.4 * min(rows, cols)) ** 2
    px = np.where(disc, base + step * k, 0).astype(np.int32)
    if texture is not None:
        blobs = np.random.default_rng([texture, k]).integers(0, 120, (4, 4))
        tiles = np.kron(blobs, np.ones((rows // 4 + 1, cols // 4 + 1)))[:rows, :cols]
        px += np.where(disc, tiles, 0).astype(np.int32)
    return px.astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, *, patient: str = "PAT001", study: str = "1.2.3.4",
                series: str = "1.2.3.4.1", instance: Optional[int] = 1, position: Optional[Sequence] = (0, 0, 0),
                orientation: Optional[Sequence] = AXIAL_IOP, slope: Optional[float] = None,
                intercept: Optional[float] = None, window: Optional[tuple] = None, compress: Optional[str] = None,
                photometric: str = "MONOCHROME2") -> Path:
    """One single-frame MR image; ``compress``: a transfer syntax UID (e.g. RLE Lossless)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
    ds.PatientID, ds.PatientName = patient, "Test^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "MR"
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [1.0, 1.0]
    px = np.asarray(pixels, np.uint16)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = px.tobytes()
    if compress:
        ds.compress(compress, px)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int = 5, *, spacing: float = 2.0, patient: str = "PAT001",
                 study: str = "1.2.3.4", series: str = "1.2.3.4.1", skip: Sequence[int] = (), reverse_names=True,
                 orientation: Sequence = AXIAL_IOP, rows: int = 32, cols: int = 32, texture: Optional[int] = None,
                 **kw) -> list[Path]:
    """A series of ``n`` slices along the orientation's normal; slice ``k`` holds
    :func:`slice_pixels` ``(k)``. File names run against the slice order (``reverse_names``)
    so a reader that orders by name gets it wrong; ``skip`` leaves slices out."""
    normal = np.cross(orientation[:3], orientation[3:])
    out = []
    for k in range(n):
        if k in skip:
            continue
        name = f"IM{(n - k if reverse_names else k + 1):04d}.dcm"
        out.append(write_dicom(Path(folder) / name, slice_pixels(k, rows, cols, texture=texture), patient=patient, study=study,
                               series=series, instance=k + 1, position=list(normal * spacing * k + 10.0),
                               orientation=orientation, **kw))
    return out


# --------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------
def ras_volume(shape=(20, 24, 10), seed: int = 0, texture: bool = False) -> np.ndarray:
    """A float volume in RAS+ voxel order: a head-like ellipsoid whose value grows with
    the axial index, plus a bright marker at the right-anterior corner of each slice."""
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    i, j, k = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    head = ((i - X / 2) / (0.45 * X)) ** 2 + ((j - Y / 2) / (0.45 * Y)) ** 2 < 1
    vol = np.where(head, 200.0 + 30.0 * k, 0.0) + rng.normal(0, 1, shape) * head
    if texture:   # coarse blobs: each subject's slices look different (no near-duplicates across subjects)
        blobs = rng.integers(0, 300, (4, 4, Z)).astype(np.float32)
        vol += head * np.kron(blobs, np.ones((X // 4 + 1, Y // 4 + 1, 1)))[:X, :Y, :]
    vol[X - 4:X - 1, Y - 4:Y - 1, :] = 2000.0    # right (high i), anterior (high j)
    return vol.astype(np.float32)


def ras_labels(shape=(20, 24, 10), slices: Sequence[int] = (3, 4, 5)) -> np.ndarray:
    """BraTS-like labels (1 core, 2 oedema, 4 enhancing) in the given axial slices."""
    X, Y, Z = shape
    seg = np.zeros(shape, np.uint8)
    for k in slices:
        seg[6:10, 8:12, k] = 2
        seg[7:9, 9:11, k] = 1
        seg[7, 9, k] = 4
    return seg


def ras_affine(spacing=(1.0, 1.0, 2.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = [-10.0, -12.0, -5.0]
    return a


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, axcodes: Optional[str] = None) -> Path:
    """``data`` (RAS+ voxel order with ``affine``) saved as NIfTI, stored in the voxel order
    ``axcodes`` (e.g. ``"PLI"``: the same physical volume, permuted and flipped)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img = nib.Nifti1Image(data, affine)
    if axcodes:
        img = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes))))
        assert "".join(nib.aff2axcodes(img.affine)) == axcodes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_subject(root: Path, subject: str, axcodes: Optional[str] = None, seg_slices=(3, 4, 5),
                  shape=(20, 24, 10), seed: int = 0, seq: str = "t1ce", texture: bool = False) -> tuple[Path, Path]:
    """BraTS layout: ``<root>/<subject>/<subject>_<seq>.nii.gz`` + ``_seg.nii.gz`` (+ a flair)."""
    d = Path(root) / subject
    aff = ras_affine()
    img = write_nifti(d / f"{subject}_{seq}.nii.gz", ras_volume(shape, seed, texture), aff, axcodes)
    write_nifti(d / f"{subject}_flair.nii.gz", ras_volume(shape, seed + 1), aff, axcodes)
    seg = write_nifti(d / f"{subject}_seg.nii.gz", ras_labels(shape, seg_slices), aff, axcodes)
    return img, seg
