"""``roboflow_csv`` reader: Roboflow TensorFlow CSV export, unlabelled images, ill input."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from src.data.base import get_reader
from src.data.readers.roboflow_csv import RoboflowCsvReader
from src.data.records import DataError
from tests.data.fixtures_readers import write_csv, write_garbage, write_image, write_truncated_jpeg

W, H = 32, 24


def _split(folder, rows=None, images=("a.jpg", "b.jpg", "c.jpg")):
    for i, name in enumerate(images):
        write_image(folder / name, W, H, seed=i)
    if rows is None:
        rows = [("a.jpg", W, H, "glioma_tumor", 4, 6, 12, 18),
                ("b.jpg", W, H, "glioma", 0, 0, 4, 4),
                ("b.jpg", W, H, "Meningioma", 8, 8, 24, 20)]  # c.jpg: no row
    return write_csv(folder, rows)


def _by_name(recs):
    return {r.image.rsplit("/", 1)[-1]: r for r in recs}


def test_registered():
    assert get_reader("roboflow_csv") is RoboflowCsvReader


def test_boxes_labels_unlabelled(tmp_path):
    _split(tmp_path / "train")
    _split(tmp_path / "valid")
    recs = RoboflowCsvReader(tmp_path).read()
    assert collections.Counter(r.split for r in recs) == {"train": 3, "val": 3}
    r = _by_name(r for r in recs if r.split == "train")
    a, b, c = r["a.jpg"], r["b.jpg"], r["c.jpg"]
    assert a.label == "glioma" and a.known == {"label": True, "boxes": True, "mask": False}
    np.testing.assert_allclose(a.boxes, [[4 / 32, 6 / 24, 12 / 32, 18 / 24]], atol=1e-6)
    assert b.label == "meningioma" and b.box_classes == ("glioma", "meningioma")
    np.testing.assert_allclose(b.boxes, [[0, 0, 4 / 32, 4 / 24], [8 / 32, 8 / 24, 24 / 32, 20 / 24]], atol=1e-6)
    assert c.label is None and c.known == {"label": False, "boxes": False, "mask": False}
    assert (a.width, a.height) == (W, H) and a.source == "roboflow_csv"
    assert [x.image for x in recs] == sorted(x.image for x in recs)


def test_unannotated_negative_and_single_folder(tmp_path):
    _split(tmp_path / "test")
    recs = RoboflowCsvReader(tmp_path / "test", unannotated="negative", source="rf").read()
    c = _by_name(recs)["c.jpg"]
    assert c.label == "no_tumor" and all(c.known.values()) and len(c.boxes) == 0
    assert {r.split for r in recs} == {"test"} and {r.source for r in recs} == {"rf"}


def test_rounding_is_clipped(tmp_path):
    _split(tmp_path / "train", rows=[("a.jpg", W, H, "glioma", -0.5, 0, 32.6, 24.4)])
    a = _by_name(RoboflowCsvReader(tmp_path).read())["a.jpg"]
    np.testing.assert_allclose(a.boxes, [[0, 0, 1, 1]])


# ---- ill input -------------------------------------------------------------------------
def test_row_for_missing_image(tmp_path):
    ann = _split(tmp_path / "train", rows=[("a.jpg", W, H, "glioma", 1, 1, 5, 5),
                                           ("gone.jpg", W, H, "glioma", 1, 1, 5, 5)])
    with pytest.raises(DataError, match="not found") as e:
        RoboflowCsvReader(tmp_path).read()
    assert f"{ann}:3" in str(e.value) and "gone.jpg" in str(e.value)


@pytest.mark.parametrize("row,match", [
    (("a.jpg", W, H, "astrocytoma", 1, 1, 5, 5), "unknown class name 'astrocytoma'"),
    (("a.jpg", W, H, "glioma", 20, 1, 40, 5), "box outside the image"),
    (("a.jpg", W, H, "glioma", 10, 1, 5, 5), "empty or inverted box"),
    (("a.jpg", 64, 64, "glioma", 1, 1, 5, 5), "size mismatch"),
    (("a.jpg", W, H, "glioma", "x", 1, 5, 5), "malformed row"),
    (("a.jpg", W, H, "no_tumor", 1, 1, 5, 5), "no_tumor"),
])
def test_bad_rows_name_csv_line(tmp_path, row, match):
    ann = _split(tmp_path / "train", rows=[("b.jpg", W, H, "glioma", 1, 1, 5, 5), row])
    with pytest.raises(DataError, match=match) as e:
        RoboflowCsvReader(tmp_path).read()
    assert f"{ann}:3" in str(e.value)


def test_missing_column(tmp_path):
    ann = write_csv(tmp_path / "train", [("a.jpg", W, H, "glioma", 1, 1, 5)],
                    header=("filename", "width", "height", "class", "xmin", "ymin", "xmax"))
    write_image(tmp_path / "train" / "a.jpg", W, H)
    with pytest.raises(DataError, match="ymax") as e:
        RoboflowCsvReader(tmp_path).read()
    assert str(ann) in str(e.value)


@pytest.mark.parametrize("writer", [write_garbage, write_truncated_jpeg], ids=["garbage", "truncated"])
def test_corrupt_image(tmp_path, writer):
    _split(tmp_path / "train")
    bad = writer(tmp_path / "train" / "b.jpg")
    with pytest.raises(DataError, match="corrupt") as e:
        RoboflowCsvReader(tmp_path).read()
    assert str(bad) in str(e.value)


def test_skip_counts(tmp_path):
    _split(tmp_path / "train", rows=[("a.jpg", W, H, "glioma", 1, 1, 5, 5),
                                     ("b.jpg", W, H, "glioma", 1, 1, 50, 5)])
    write_garbage(tmp_path / "train" / "c.jpg")
    reader = RoboflowCsvReader(tmp_path, on_error="skip")
    assert [r.image.rsplit("/", 1)[-1] for r in reader.read()] == ["a.jpg"]
    assert len(reader.skipped) == 2


def test_empty_and_missing(tmp_path):
    write_csv(tmp_path / "train", [])
    with pytest.raises(DataError, match="empty dataset"):
        RoboflowCsvReader(tmp_path).read()
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="_annotations.csv"):
        RoboflowCsvReader(tmp_path / "x").read()
    with pytest.raises(DataError, match="unknown option"):
        RoboflowCsvReader(tmp_path, cache_dir="/tmp")
