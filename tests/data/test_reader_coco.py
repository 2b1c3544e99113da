"""``coco`` reader: Roboflow COCO exports, placeholder category, unlabelled images, RLE, ill input."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from src.data.base import get_reader
from src.data.readers.coco import CocoReader, rle_counts_from_string, rle_decode
from src.data.records import DataError
from tests.conftest import need_dataset
from tests.data.fixtures_readers import (coco_categories, rle_counts, rle_encode_string, write_coco,
                                         write_garbage, write_truncated_jpeg)

W, H = 32, 24  # non-square on purpose: x is divided by W, y by H


def _export(root, split="train", anns=None, images=None, **kw):
    images = images or [{"file_name": "a.jpg", "width": W, "height": H},
                        {"file_name": "b.jpg", "width": W, "height": H},
                        {"file_name": "c.jpg", "width": W, "height": H}]
    if anns is None:
        anns = [
            # a: one glioma box with its polygon
            {"image_id": 0, "category_id": 1, "bbox": [4, 6, 8, 12],
             "segmentation": [[4, 6, 12, 6, 12, 18, 4, 18]]},
            # b: a small glioma and a large meningioma
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"image_id": 1, "category_id": 2, "bbox": [8, 8, 16, 12], "segmentation": [[8, 8, 24, 8, 24, 20]]},
            # c: nothing
        ]
    return write_coco(root / split if split else root, images, anns, **kw)


def _by_name(recs):
    return {r.image.rsplit("/", 1)[-1]: r for r in recs}


def test_registered():
    assert get_reader("coco") is CocoReader


def test_boxes_polygons_labels(tmp_path):
    _export(tmp_path)
    recs = CocoReader(tmp_path).read()
    assert len(recs) == 3
    r = _by_name(recs)
    a, b, c = r["a.jpg"], r["b.jpg"], r["c.jpg"]
    np.testing.assert_allclose(a.boxes, [[4 / 32, 6 / 24, 12 / 32, 18 / 24]], atol=1e-6)
    assert a.label == "glioma" and a.box_classes == ("glioma",) and a.split == "train"
    assert a.known == {"label": True, "boxes": True, "mask": True}
    np.testing.assert_allclose(a.polygons[0], [[0.125, 0.25], [0.375, 0.25], [0.375, 0.75], [0.125, 0.75]])
    assert (a.width, a.height) == (W, H)
    # several annotations: all kept, label of the largest box
    assert b.label == "meningioma" and b.box_classes == ("glioma", "meningioma")
    np.testing.assert_allclose(b.boxes, [[0, 0, 4 / 32, 4 / 24], [8 / 32, 8 / 24, 24 / 32, 20 / 24]], atol=1e-6)
    assert len(b.polygons) == 2
    # no annotation: unlabelled, not a negative
    assert c.label is None and c.known == {"label": False, "boxes": False, "mask": False}
    assert len(c.boxes) == 0


def test_unannotated_negative(tmp_path):
    _export(tmp_path)
    c = _by_name(CocoReader(tmp_path, unannotated="negative").read())["c.jpg"]
    assert c.label == "no_tumor" and c.known == {"label": True, "boxes": True, "mask": True}
    assert len(c.boxes) == 0 and c.polygons == []
    with pytest.raises(DataError, match="unannotated"):
        CocoReader(tmp_path, unannotated="healthy")


def test_splits_detected(tmp_path):
    for split in ("train", "valid", "test"):
        _export(tmp_path, split)
    recs = CocoReader(tmp_path).read()
    assert collections.Counter(r.split for r in recs) == {"train": 3, "val": 3, "test": 3}
    assert [r.image for r in recs] == sorted(r.image for r in recs)
    # root pointing at one split folder
    assert {r.split for r in CocoReader(tmp_path / "valid").read()} == {"val"}
    # no split folder at all
    flat = tmp_path / "flat"
    _export(flat, split=None)
    assert {r.split for r in CocoReader(flat).read()} == {None}


def test_placeholder_category_dropped_and_aliases(tmp_path):
    cats = [{"id": 0, "name": "Brain-Tumor", "supercategory": "none"},
            {"id": 1, "name": "object", "supercategory": "Brain-Tumor"}]
    anns = [{"image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"image_id": 0, "category_id": 0, "bbox": [1, 1, 20, 20]},
            {"image_id": 1, "category_id": 0, "bbox": [1, 1, 5, 5]}]
    _export(tmp_path, anns=anns, categories=cats)
    reader = CocoReader(tmp_path)
    r = _by_name(reader.read())
    assert r["a.jpg"].label == "tumor" and len(r["a.jpg"].boxes) == 1
    assert r["a.jpg"].known["mask"] is False and r["a.jpg"].polygons is None  # no segmentation
    assert r["b.jpg"].label is None  # only a placeholder annotation: unlabelled
    assert len(reader.dropped) == 2


def test_br35h_style_placeholder(tmp_path):
    cats = [{"id": 0, "name": "Tumor", "supercategory": "none"}, {"id": 1, "name": "Tumor", "supercategory": "Tumor"}]
    _export(tmp_path, anns=[{"image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5]}], categories=cats)
    assert _by_name(CocoReader(tmp_path).read())["a.jpg"].label == "tumor"


def test_plain_coco_keeps_category_zero(tmp_path):
    cats = [{"id": 0, "name": "glioma", "supercategory": "none"},
            {"id": 1, "name": "pituitary", "supercategory": "none"}]
    _export(tmp_path, anns=[{"image_id": 0, "category_id": 0, "bbox": [1, 1, 5, 5]}], categories=cats)
    reader = CocoReader(tmp_path)
    assert _by_name(reader.read())["a.jpg"].label == "glioma" and not reader.dropped


def test_mask_known_only_when_every_annotation_has_one(tmp_path):
    anns = [{"image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]},
            {"image_id": 0, "category_id": 1, "bbox": [10, 10, 5, 5], "segmentation": []}]
    _export(tmp_path, anns=anns)
    a = _by_name(CocoReader(tmp_path).read())["a.jpg"]
    assert a.known == {"label": True, "boxes": True, "mask": False} and len(a.boxes) == 2


def test_rle_string_codec():
    assert rle_counts_from_string(":5:?") == [10, 5, 10, 20]
    assert rle_counts_from_string(rle_encode_string([10, 20, 10, 5])) == [10, 20, 10, 5]
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = [int(v) for v in rng.integers(0, 300, rng.integers(1, 12))]
        assert rle_counts_from_string(rle_encode_string(counts)) == counts
    m = np.zeros((3, 4), np.uint8)
    m[1, 2] = m[2, 2] = m[0, 3] = 1
    assert rle_counts(m) == [7, 3, 2]  # column-major: rows 1, 2 of column 2, row 0 of column 3
    np.testing.assert_array_equal(rle_decode([7, 3, 2], 3, 4), m)
    with pytest.raises(ValueError):
        rle_decode([5, 3], 3, 4)


@pytest.mark.parametrize("compressed", [False, True], ids=["counts-list", "compressed-string"])
def test_rle_masks_written_to_cache(tmp_path, compressed):
    m = np.zeros((H, W), np.uint8)
    m[5:15, 10:20] = 1
    counts = rle_counts(m)
    seg = {"size": [H, W], "counts": rle_encode_string(counts) if compressed else counts}
    anns = [{"image_id": 0, "category_id": 1, "bbox": [10, 5, 10, 10], "segmentation": seg, "iscrowd": 1},
            {"image_id": 0, "category_id": 1, "bbox": [0, 20, 4, 4], "segmentation": [[0, 20, 3, 20, 3, 23, 0, 23]]}]
    _export(tmp_path / "ds", anns=anns)
    cache = tmp_path / "cache"
    a = _by_name(CocoReader(tmp_path / "ds", cache_dir=str(cache)).read())["a.jpg"]
    assert a.known["mask"] and a.polygons is None and a.mask.startswith(str(cache))
    written = np.array(Image.open(a.mask))
    assert written.shape == (H, W) and set(np.unique(written)) == {0, 255}
    assert np.all(written[5:15, 10:20] == 255) and written[20:24, 0:4].sum() > 0
    assert written[0:5].sum() == 0


# ---- ill input -------------------------------------------------------------------------
def test_missing_image_file(tmp_path):
    _export(tmp_path)
    (tmp_path / "train" / "b.jpg").unlink()
    with pytest.raises(DataError, match="not found") as e:
        CocoReader(tmp_path).read()
    assert str(tmp_path / "train" / "b.jpg") in str(e.value)


def test_annotation_points_at_missing_image(tmp_path):
    ann = _export(tmp_path, anns=[{"image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5]},
                                  {"image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(DataError, match="missing image id 7") as e:
        CocoReader(tmp_path).read()
    assert str(ann) in str(e.value)


def test_unknown_class_name(tmp_path):
    ann = _export(tmp_path, categories=coco_categories(("glioma", "astrocytoma")))
    with pytest.raises(DataError, match="astrocytoma") as e:
        CocoReader(tmp_path).read()
    assert str(ann) in str(e.value)


@pytest.mark.parametrize("bbox,seg,match", [
    ([20, 4, 14, 8], None, "box outside the image"),          # x_max 34 > 32 + 1 px
    ([4, -3, 8, 8], None, "box outside the image"),
    ([4, 4, 0, 8], None, "empty or inverted box"),
    ([4, 4, 8, 8], [[4, 4, 40, 4, 12, 12]], "polygon outside the image"),
    ([4, 4, 8, 8], [[4, 4, 12, 4, 12]], "malformed polygon"),
])
def test_bad_geometry(tmp_path, bbox, seg, match):
    a = {"image_id": 0, "category_id": 1, "bbox": bbox}
    if seg is not None:
        a["segmentation"] = seg
    ann = _export(tmp_path, anns=[a])
    with pytest.raises(DataError, match=match) as e:
        CocoReader(tmp_path).read()
    assert str(ann) in str(e.value) and "a.jpg" in str(e.value)


def test_rounding_is_clipped(tmp_path):
    _export(tmp_path, anns=[{"image_id": 0, "category_id": 1, "bbox": [-0.4, 20, 32.6, 4.5],
                             "segmentation": [[-0.5, 20, 32.5, 20, 32.5, 24.5]]}])
    a = _by_name(CocoReader(tmp_path).read())["a.jpg"]
    np.testing.assert_allclose(a.boxes, [[0, 20 / 24, 1, 1]], atol=1e-6)
    assert a.polygons[0].min() >= 0 and a.polygons[0].max() <= 1


def test_duplicate_file_name(tmp_path):
    ann = _export(tmp_path, images=[{"file_name": "a.jpg", "width": W, "height": H},
                                    {"file_name": "a.jpg", "width": W, "height": H}], anns=[])
    with pytest.raises(DataError, match="appears twice") as e:
        CocoReader(tmp_path).read()
    assert str(ann) in str(e.value)


def test_size_mismatch(tmp_path):
    _export(tmp_path, images=[{"file_name": "a.jpg", "width": W, "height": H}])
    data = json.loads((tmp_path / "train" / "_annotations.coco.json").read_text())
    data["images"][0]["width"] = 64
    (tmp_path / "train" / "_annotations.coco.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="size mismatch") as e:
        CocoReader(tmp_path).read()
    assert "a.jpg" in str(e.value)


@pytest.mark.parametrize("writer", [write_garbage, write_truncated_jpeg], ids=["garbage", "truncated"])
def test_corrupt_image(tmp_path, writer):
    _export(tmp_path)
    bad = writer(tmp_path / "train" / "b.jpg")
    with pytest.raises(DataError, match="corrupt") as e:
        CocoReader(tmp_path).read()
    assert str(bad) in str(e.value)


def test_skip_counts(tmp_path):
    _export(tmp_path, anns=[{"image_id": 0, "category_id": 1, "bbox": [20, 4, 30, 8]},
                            {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    write_garbage(tmp_path / "train" / "c.jpg")
    reader = CocoReader(tmp_path, on_error="skip")
    recs = reader.read()
    assert [r.image.rsplit("/", 1)[-1] for r in recs] == ["b.jpg"]
    assert len(reader.skipped) == 2


def test_empty_and_missing(tmp_path):
    write_coco(tmp_path / "train", [], [])
    with pytest.raises(DataError, match="empty dataset"):
        CocoReader(tmp_path).read()
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="_annotations.coco.json"):
        CocoReader(tmp_path / "other").read()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "_annotations.coco.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable COCO") as e:
        CocoReader(tmp_path / "broken").read()
    assert "broken/_annotations.coco.json" in str(e.value)
    with pytest.raises(DataError, match="unknown option"):
        CocoReader(tmp_path, unanotated="negative")


# ---- real data -------------------------------------------------------------------------
def _raw_box_counts(ann_file):
    data = json.loads(ann_file.read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    return collections.Counter(names[a["image_id"]] for a in data["annotations"] if a["category_id"] != 0)


@pytest.mark.parametrize("split,n,unknown", [("train", 500, 47), ("valid", 201, 74)])
def test_br35h(shared_data, split, n, unknown):
    root = need_dataset(shared_data, "roboflow-coco-br35h") / split
    recs = CocoReader(root).read()
    assert len(recs) == n
    unl = [r for r in recs if r.label is None]
    assert len(unl) == unknown
    assert all(r.known == {"label": False, "boxes": False, "mask": False} for r in unl)
    labelled = [r for r in recs if r.label is not None]
    assert {r.label for r in labelled} == {"tumor"}
    assert all(r.known["boxes"] and r.known["mask"] and len(r.polygons) == len(r.boxes) for r in labelled)
    raw = _raw_box_counts(root / "_annotations.coco.json")
    got = {r.image.rsplit("/", 1)[-1]: len(r.boxes) for r in labelled}
    assert got == dict(raw)
    assert sum(v > 1 for v in got.values()) == {"train": 26, "valid": 1}[split]
    assert {r.split for r in recs} == {"train" if split == "train" else "val"}


def test_tiny(shared_data):
    root = need_dataset(shared_data, "roboflow-coco-tiny")
    recs = CocoReader(root).read()
    assert collections.Counter(r.split for r in recs) == {"train": 154, "val": 20, "test": 4}
    assert {r.label for r in recs} == {"tumor"}
    assert {(r.width, r.height) for r in recs} == {(256, 256)}
    assert sum(len(r.boxes) for r in recs) == 198 + 31 + 4
