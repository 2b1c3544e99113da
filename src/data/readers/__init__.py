"""Readers: each module registers one reader with :func:`src.data.base.register_reader`."""
from . import coco, figshare, folder, phantom, roboflow, roboflow_csv, yolo  # noqa: F401
