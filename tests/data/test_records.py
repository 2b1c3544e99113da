"""Record schema, class aliases, manifests."""
import numpy as np
import pytest

from src.data.records import ClassMap, DataError, Record, load_manifest, save_manifest


@pytest.mark.parametrize("alias,canonical", [
    ("glioma_tumor", "glioma"), ("notumor", "no_tumor"), ("no_tumor", "no_tumor"), ("No_Tumor", "no_tumor"),
    ("Tumor", "tumor"), ("object", "tumor"), ("Meningioma", "meningioma"), ("pituitary_tumor", "pituitary"),
    ("no-tumour", "no_tumor"),
])
def test_aliases_map_to_canonical(alias, canonical):
    assert ClassMap().canonical(alias) == canonical


def test_user_aliases_extend_the_table():
    cm = ClassMap(aliases={"GBM": "glioma"})
    assert cm.canonical("gbm") == "glioma"


def test_unknown_class_raises_with_hint():
    with pytest.raises(DataError, match="unknown class name 'astrocytoma' in f.json.*data.aliases"):
        ClassMap().canonical("astrocytoma", where="f.json")


def test_class_ids_and_tumor_classes():
    cm = ClassMap(["notumor", "glioma", "meningioma", "pituitary"])
    assert cm.classes == ("no_tumor", "glioma", "meningioma", "pituitary")
    assert cm.index("glioma") == 1 and cm.index("tumor") == -1 and cm.index(None) == -1
    assert cm.tumor_classes == ("glioma", "meningioma", "pituitary")
    with pytest.raises(DataError, match="repeated"):
        ClassMap(["notumor", "no_tumor"])


@pytest.mark.parametrize("boxes,match", [
    ([[0.5, 0.1, 0.4, 0.3]], "inverted"),
    ([[0.1, 0.1, 0.1, 0.3]], "inverted"),
    ([[0.1, 0.1, 1.5, 0.3]], "outside"),
    ([[np.nan, 0.1, 0.2, 0.3]], "non-finite"),
])
def test_bad_boxes_raise_naming_the_file(boxes, match):
    r = Record(image="/d/a.jpg", boxes=boxes, box_classes=["glioma"])
    with pytest.raises(DataError, match=match) as e:
        r.validate()
    assert "/d/a.jpg" in str(e.value)


def test_polygon_outside_raises():
    r = Record(image="/d/b.jpg", polygons=[np.array([[0.1, 0.1], [1.4, 0.1], [0.5, 0.5]])])
    with pytest.raises(DataError, match="polygon outside"):
        r.validate()


def test_box_class_count_must_match():
    with pytest.raises(DataError, match="box classes"):
        Record(image="x.jpg", boxes=[[0, 0, 1, 1]], box_classes=[])


def test_manifest_round_trip(tmp_path):
    recs = [Record(image="/a.png", label="glioma", boxes=[[0.1, 0.2, 0.3, 0.4]], box_classes=["glioma"],
                   polygons=[np.array([[0.1, 0.2], [0.3, 0.2], [0.3, 0.4]])], group="p1", split="train",
                   known={"label": True, "boxes": True, "mask": True}, width=64, height=64)]
    p = save_manifest(recs, tmp_path / "m.jsonl")
    back = load_manifest(p)
    assert back[0].label == "glioma" and back[0].split == "train" and back[0].group == "p1"
    np.testing.assert_allclose(back[0].boxes, recs[0].boxes)
    np.testing.assert_allclose(back[0].polygons[0], recs[0].polygons[0])
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")
