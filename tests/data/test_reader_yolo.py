"""``yolo`` reader: three layouts, detect and seg lines, empty vs missing label files, masks, ill input."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from src.data.base import get_reader
from src.data.readers.yolo import YoloReader
from src.data.records import DataError
from tests.conftest import need_dataset
from tests.data.fixtures_readers import (write_garbage, write_mask, write_truncated_jpeg, write_yolo_item,
                                         write_yolo_yaml)

W, H = 32, 24
PHANTOM_NAMES = {0: "glioma", 1: "meningioma", 2: "pituitary"}


def _phantom(root, splits=("train", "val", "test")):
    """The layout the synthetic phantom dataset uses: images/<split>, labels/<split>, masks/<split>."""
    write_yolo_yaml(root, PHANTOM_NAMES)
    for s in splits:
        args = dict(images=root / "images" / s, labels=root / "labels" / s, masks=root / "masks" / s)
        write_yolo_item(stem=f"{s}_000", lines=["0 0.5 0.5 0.25 0.5"], **args)
        write_yolo_item(stem=f"{s}_001", lines=[], **args)  # empty label file: healthy slice
        write_yolo_item(stem=f"{s}_002", lines=["2 0.25 0.25 0.25 0.25", "1 0.6 0.6 0.5 0.5"], **args)
    return root


def _by_name(recs):
    return {r.image.rsplit("/", 1)[-1].split(".")[0]: r for r in recs}


def test_registered():
    assert get_reader("yolo") is YoloReader


def test_phantom_layout(tmp_path):
    recs = YoloReader(_phantom(tmp_path / "phantom")).read()
    assert len(recs) == 9
    assert collections.Counter(r.split for r in recs) == {"train": 3, "val": 3, "test": 3}
    r = _by_name(recs)
    a = r["train_000"]
    assert a.label == "glioma" and a.box_classes == ("glioma",)
    np.testing.assert_allclose(a.boxes, [[0.375, 0.25, 0.625, 0.75]], atol=1e-6)
    assert a.known == {"label": True, "boxes": True, "mask": True} and a.mask.endswith("masks/train/train_000.png")
    assert (a.width, a.height) == (W, H) and a.source == "yolo"
    neg = r["val_001"]
    assert neg.label == "no_tumor" and len(neg.boxes) == 0
    assert neg.known == {"label": True, "boxes": True, "mask": True} and neg.mask.endswith("val_001.png")
    two = r["test_002"]  # a small pituitary and a large meningioma: both kept, label of the larger
    assert two.label == "meningioma" and two.box_classes == ("pituitary", "meningioma")
    np.testing.assert_allclose(two.boxes, [[0.125, 0.125, 0.375, 0.375], [0.35, 0.35, 0.85, 0.85]], atol=1e-6)


def test_split_first_layout_and_list_names(tmp_path):
    root = tmp_path / "rf"
    write_yolo_yaml(root, ["glioma_tumor", "Meningioma", "notumor"])
    for s in ("train", "valid"):
        write_yolo_item(root / s / "images", root / s / "labels", f"{s}_a", ["0 0.5 0.5 0.5 0.5"], suffix=".jpg")
        write_yolo_item(root / s / "images", root / s / "labels", f"{s}_b", ["1 0.5 0.5 0.5 0.5"], suffix=".jpg")
    recs = YoloReader(root).read()
    assert [(r.split, r.label) for r in recs] == [("train", "glioma"), ("train", "meningioma"),
                                                 ("val", "glioma"), ("val", "meningioma")]
    assert all(r.known == {"label": True, "boxes": True, "mask": False} for r in recs)


def test_flat_layout_and_root_named_like_split(tmp_path):
    root = tmp_path / "flat"
    write_yolo_yaml(root, {0: "pituitary", 1: "meningioma", 2: "glioma"})
    for i, c in enumerate((0, 1, 2)):
        write_yolo_item(root / "images", root / "labels", str(i), [f"{c} 0.5 0.5 0.2 0.2"], suffix=".jpg",
                        masks=root / "masks", trailing_newline=False)
    recs = YoloReader(root).read()
    assert [r.label for r in recs] == ["pituitary", "meningioma", "glioma"] and {r.split for r in recs} == {None}
    assert all(r.mask and r.known["mask"] for r in recs)
    train = tmp_path / "train"
    write_yolo_yaml(train, ["glioma"])
    write_yolo_item(train / "images", train / "labels", "x", ["0 0.5 0.5 0.2 0.2"])
    assert YoloReader(train).read()[0].split == "train"


def test_names_from_hydra_config_and_orphan_labels(tmp_path):
    from omegaconf import OmegaConf

    root = tmp_path / "d"
    write_yolo_yaml(root, ["x"])
    write_yolo_item(root / "images", root / "labels", "a", ["1 0.5 0.5 0.2 0.2"])
    (root / "labels" / "lost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    for names in (OmegaConf.create(["glioma", "pituitary"]), OmegaConf.create({0: "glioma", 1: "pituitary"})):
        reader = YoloReader(root, names=names)
        assert [r.label for r in reader.read()] == ["pituitary"]
        assert [p.rsplit("/", 1)[-1] for p in reader.orphans] == ["lost.txt"]


def test_seg_lines_give_polygons(tmp_path):
    root = tmp_path / "seg"
    write_yolo_yaml(root, ["glioma", "pituitary"])
    imgs, labs = root / "images" / "train", root / "labels" / "train"
    write_yolo_item(imgs, labs, "poly", ["", "0 0.1 0.2 0.5 0.2 0.5 0.6", "  ", "0 0.6 0.6 0.9 0.6 0.9 0.9 0.6 0.9"])
    write_yolo_item(imgs, labs, "mixed", ["0 0.1 0.2 0.5 0.2 0.5 0.6", "1 0.7 0.7 0.2 0.2"])
    r = _by_name(YoloReader(root).read())
    p = r["poly"]
    assert p.known == {"label": True, "boxes": True, "mask": True} and p.mask is None
    assert len(p.polygons) == 2 and len(p.boxes) == 2
    np.testing.assert_allclose(p.polygons[0], [[0.1, 0.2], [0.5, 0.2], [0.5, 0.6]], atol=1e-6)
    np.testing.assert_allclose(p.boxes[0], [0.1, 0.2, 0.5, 0.6], atol=1e-6)
    m = r["mixed"]  # one line is only a box: the mask is not known
    assert m.known["mask"] is False and m.polygons is None and len(m.boxes) == 2


def test_missing_label_file_is_unknown(tmp_path):
    root = _phantom(tmp_path / "p", splits=("train",))
    write_yolo_item(root / "images" / "train", root / "labels" / "train", "nolabel", None)
    r = _by_name(YoloReader(root).read())["nolabel"]
    assert r.label is None and r.known == {"label": False, "boxes": False, "mask": False}
    r = _by_name(YoloReader(root, unannotated="negative").read())["nolabel"]
    assert r.label == "no_tumor" and r.known == {"label": True, "boxes": True, "mask": True}
    assert r.polygons == [] and len(r.boxes) == 0


def test_empty_label_without_mask_is_negative(tmp_path):
    root = tmp_path / "d"
    write_yolo_yaml(root, ["glioma"])
    write_yolo_item(root / "images", root / "labels", "bg", ["", "   "])
    write_yolo_item(root / "images", root / "labels", "t", ["0 0.5 0.5 0.1 0.1"])
    r = _by_name(YoloReader(root).read())["bg"]
    assert r.label == "no_tumor" and r.polygons == [] and r.mask is None and all(r.known.values())


def test_rounding_is_clipped(tmp_path):
    root = tmp_path / "d"
    write_yolo_yaml(root, ["glioma"])
    write_yolo_item(root / "images", root / "labels", "box", ["0 0.1 0.5 0.2004 0.5"])
    write_yolo_item(root / "images", root / "labels", "poly", ["0 -0.0005 0 1.0005 0 0.5 1"])
    r = _by_name(YoloReader(root).read())
    np.testing.assert_allclose(r["box"].boxes[0], [0, 0.25, 0.2002, 0.75], atol=1e-6)
    np.testing.assert_allclose(r["poly"].polygons[0], [[0, 0], [1, 0], [0.5, 1]], atol=1e-6)
    np.testing.assert_allclose(r["poly"].boxes[0], [0, 0, 1, 1], atol=1e-6)


# ---- ill input -------------------------------------------------------------------------
def _one(tmp_path, lines, names=("glioma", "meningioma")):
    root = tmp_path / "d"
    write_yolo_yaml(root, list(names))
    write_yolo_item(root / "images", root / "labels", "ok", ["0 0.5 0.5 0.2 0.2"])
    write_yolo_item(root / "images", root / "labels", "x", lines)
    return root, root / "labels" / "x.txt"


@pytest.mark.parametrize("lines,lineno,match", [
    (["0 0.5 0.5 0.2 0.2", "0 0.5 zero 0.2 0.2"], 2, "malformed line"),
    (["0 0.1 0.1 0.5 0.1 0.5"], 1, "malformed line"),                       # odd coordinate count
    (["0 0.1 0.1 0.5 0.1 0.5 0.5 0.2"], 1, "malformed line"),               # 7 coordinates: odd
    (["0 0.1 0.1"], 1, "malformed line"),
    (["", "5 0.5 0.5 0.2 0.2"], 2, "unknown class id"),
    (["0 0.9 0.5 0.4 0.2"], 1, "box outside the image"),
    (["0 0.5 0.5 0 0.2"], 1, "empty or inverted box"),
    (["1 0.1 0.1 0.5 0.1 1.2 0.5"], 1, "polygon outside the image"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, lineno, match):
    root, lab = _one(tmp_path, lines)
    with pytest.raises(DataError, match=match) as e:
        YoloReader(root).read()
    assert f"{lab}:{lineno}" in str(e.value)


def test_no_tumor_boxes_are_an_error(tmp_path):
    root, lab = _one(tmp_path, ["1 0.5 0.5 0.2 0.2"], names=("glioma", "healthy"))
    with pytest.raises(DataError, match="no_tumor") as e:
        YoloReader(root).read()
    assert f"{lab}:1" in str(e.value)
    # listing a no-tumour name is fine as long as no box uses it
    root2, _ = _one(tmp_path / "b", [], names=("glioma", "notumor"))
    assert len(YoloReader(root2).read()) == 2


def test_unknown_name_in_yaml(tmp_path):
    root, _ = _one(tmp_path, [], names=("glioma", "astrocytoma"))
    with pytest.raises(DataError, match="astrocytoma") as e:
        YoloReader(root).read()
    assert str(root / "data.yaml") in str(e.value)


def test_missing_yaml_and_option_names(tmp_path):
    root, _ = _one(tmp_path, [])
    (root / "data.yaml").unlink()
    with pytest.raises(DataError, match="data.yaml"):
        YoloReader(root).read()
    assert len(YoloReader(root, names=["glioma"]).read()) == 2
    with pytest.raises(DataError, match="unknown option"):
        YoloReader(root, nmes=["glioma"])


@pytest.mark.parametrize("writer", [write_garbage, write_truncated_jpeg], ids=["garbage", "truncated"])
def test_corrupt_image(tmp_path, writer):
    root, _ = _one(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    bad = writer(root / "images" / "bad.jpg")
    with pytest.raises(DataError, match="corrupt") as e:
        YoloReader(root).read()
    assert str(bad) in str(e.value)


def test_bad_masks(tmp_path):
    root, _ = _one(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    m = write_mask(root / "masks" / "x.png", W + 1, H)
    with pytest.raises(DataError, match="mask size") as e:
        YoloReader(root).read()
    assert str(m) in str(e.value)
    write_mask(m, W, H, mode="RGB")
    with pytest.raises(DataError, match="single-channel") as e:
        YoloReader(root).read()
    assert str(m) in str(e.value)


def test_skip_counts(tmp_path):
    root, _ = _one(tmp_path, ["0 0.5 0.5 0.2 0.2", "oops"])
    write_garbage(root / "images" / "bad.png")
    reader = YoloReader(root, on_error="skip")
    recs = reader.read()
    assert [r.image.rsplit("/", 1)[-1] for r in recs] == ["ok.png"]
    assert len(reader.skipped) == 2


def test_empty_dataset_and_no_layout(tmp_path):
    root = tmp_path / "d"
    write_yolo_yaml(root, ["glioma"])
    (root / "images" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="empty dataset"):
        YoloReader(root).read()
    other = tmp_path / "o"
    write_yolo_yaml(other, ["glioma"])
    with pytest.raises(DataError, match="no YOLO layout"):
        YoloReader(other).read()


# ---- real data -------------------------------------------------------------------------
def test_figshare(shared_data):
    root = need_dataset(shared_data, "figshare-cheng")
    recs = YoloReader(root).read()
    assert len(recs) == 2398
    assert collections.Counter(r.label for r in recs) == {"meningioma": 542, "glioma": 1127, "pituitary": 729}
    assert all(r.mask and r.known == {"label": True, "boxes": True, "mask": True} for r in recs)
    assert all(len(r.boxes) == 1 for r in recs) and {r.split for r in recs} == {None}
    r1 = next(r for r in recs if r.image.endswith("/images/1.jpg"))  # "1 0.63 0.42 0.22 0.15"
    assert r1.label == "meningioma"
    np.testing.assert_allclose(r1.boxes[0], [0.52, 0.345, 0.74, 0.495], atol=1e-6)
