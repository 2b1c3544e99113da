"""Readers: each module registers one reader with :func:`src.data.base.register_reader`."""
from . import coco, dicom, figshare, folder, nifti, phantom, roboflow, roboflow_csv, yolo  # noqa: F401
