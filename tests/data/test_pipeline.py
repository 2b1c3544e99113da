"""The tf.data pipeline (src/data/pipeline.py): targets, weights, geometry, decoding."""
from __future__ import annotations

import importlib

import cv2
import numpy as np
import pytest
import tensorflow as tf

from src.data.image_header import probe_header
from src.data.masks import mask_to_box
from src.data.pipeline import build_dataset, check_decodable, describe_batch, plan_pipeline
from src.data.records import ClassMap, DataError, Record
from src.data.targets import TARGET_KEYS

CM = ClassMap()  # glioma, meningioma, pituitary, no_tumor
# xla off where the test is not about the image path: XLA compiles per shape (~1 s each)
EVAL = {"image_size": 32, "batch_size": 8, "augment": None, "seed": 0, "xla": False}
STRONG = {"hflip": 0.5, "vflip": 0.5, "rotate_deg": 30, "scale": 0.2, "shift": 0.1,
          "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02, "noise_std": 0.02, "blur_prob": 0.3}
ZERO = {"hflip": 0, "vflip": 0, "rotate_deg": 0, "scale": 0, "shift": 0, "brightness": 0, "contrast": 0}
ALL = {"label": True, "boxes": True, "mask": True}


def ellipse(h, w, centre, axes, angle=20) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, centre, axes, angle, 0, 360, 255, -1)
    return m


def write(path, arr, quality=95):
    ok = cv2.imwrite(str(path), arr, [cv2.IMWRITE_JPEG_QUALITY, quality] if str(path).endswith(".jpg") else [])
    assert ok
    return str(path)


def texture(h, w, seed, rgb=True):
    rng = np.random.default_rng(seed)
    a = cv2.resize(rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3 if rgb else 1), np.uint8), (w, h))
    return a if rgb else a.reshape(h, w)


@pytest.fixture()
def recs(tmp_path):
    """A small mixed set: RGB PNG and grey JPEG with masks and boxes, unlabelled, generic
    tumour, healthy slice with a known-empty mask."""
    out = {}
    m1 = ellipse(64, 64, (22, 26), (10, 6))
    img = texture(64, 64, 1)
    img[m1 > 0] = 230
    out["png_rgb"] = Record(image=write(tmp_path / "a.png", img), label="glioma", boxes=[mask_to_box(m1)],
                            box_classes=["glioma"], mask=write(tmp_path / "a_mask.png", m1), known=dict(ALL))
    m2 = ellipse(64, 64, (40, 36), (8, 12))
    g = texture(64, 64, 2, rgb=False)
    g[m2 > 0] = 240
    out["jpg_grey"] = Record(image=write(tmp_path / "b.jpg", g), label="meningioma", boxes=[mask_to_box(m2)],
                             box_classes=["meningioma"], mask=write(tmp_path / "b_mask.png", m2), known=dict(ALL))
    out["unlabelled"] = Record(image=write(tmp_path / "c.jpg", texture(64, 64, 3, rgb=False)))
    out["generic"] = Record(image=write(tmp_path / "d.png", texture(64, 64, 4)), label="tumor",
                            boxes=[[0.1, 0.2, 0.5, 0.6]], box_classes=["tumor"],
                            known={"label": True, "boxes": True, "mask": False})
    out["healthy"] = Record(image=write(tmp_path / "e.jpg", texture(64, 64, 5, rgb=False)), label="no_tumor",
                            known=dict(ALL))
    return out


def one_batch(records, cfg=None, training=False, heads=None):
    ds = build_dataset(list(records), CM, {**EVAL, **(cfg or {})}, training=training, heads=heads)
    return next(iter(ds))


def np_batch(b):
    x, y, w = b
    return x.numpy(), {k: v.numpy() for k, v in y.items()}, {k: v.numpy() for k, v in w.items()}


# ---------------------------------------------------------------------------------------
# shapes, dtypes, weights
# ---------------------------------------------------------------------------------------
def test_every_key_shape_and_dtype(recs):
    rs = list(recs.values())
    x, y, w = np_batch(one_batch(rs, {"max_boxes": 3}))
    B, C = len(rs), CM.num_classes
    assert x.shape == (B, 32, 32, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    expect = {
        "class": ((B,), np.int32), "multilabel": ((B, C), np.float32), "tumor": ((B,), np.float32),
        "subtype": ((B,), np.int32), "boxes": ((B, C, 4), np.float32), "boxes_all": ((B, 3, 4), np.float32),
        "boxes_all_classes": ((B, 3), np.int32), "boxes_all_count": ((B,), np.int32),
        "mask": ((B, 32, 32, 1), np.float32),
        # the batch holds a generic `tumor` record: the class head's set target (tumour, any subtype)
        "class_set": ((B, C), np.float32),
    }
    assert set(y) == set(w) == set(TARGET_KEYS) | {"class_set"} == set(expect)
    for k, (shape, dt) in expect.items():
        assert y[k].shape == shape and y[k].dtype == dt, k
        assert w[k].dtype == np.float32
        assert w[k].shape == ((B, C) if k == "boxes" else (B,)), k
    assert set(np.unique(y["mask"])) <= {0.0, 1.0}
    assert "x:" in describe_batch((x, y, w))


def test_weights_of_unknown_targets_are_zero(recs):
    order = ["png_rgb", "jpg_grey", "unlabelled", "generic", "healthy"]
    _, y, w = np_batch(one_batch([recs[k] for k in order]))
    i = {k: n for n, k in enumerate(order)}
    # fully annotated tumour slices
    for k, cls in (("png_rgb", 0), ("jpg_grey", 1)):
        assert y["class"][i[k]] == cls and w["class"][i[k]] == 1
        assert w["subtype"][i[k]] == 1 and y["subtype"][i[k]] == cls
        assert y["tumor"][i[k]] == 1 and w["tumor"][i[k]] == 1
        assert w["mask"][i[k]] == 1 and y["mask"][i[k]].sum() > 0
        assert w["boxes"][i[k]].tolist() == [float(c == cls) for c in range(4)]
    # unlabelled (coco-like, nothing annotated): every weight 0, never a fake negative
    u = i["unlabelled"]
    for k in ("class", "multilabel", "tumor", "subtype", "mask"):
        assert w[k][u] == 0, k
    assert w["boxes"][u].sum() == 0 and y["mask"][u].sum() == 0
    # generic tumour with the 4 subtype classes: tumour known, subtype / class unknown
    g = i["generic"]
    assert w["class"][g] == 0 and w["multilabel"][g] == 0 and w["subtype"][g] == 0
    assert y["tumor"][g] == 1 and w["tumor"][g] == 1
    assert w["boxes"][g].sum() == 0  # a "tumor" box has no slot among the subtypes
    assert y["boxes_all_count"][g] == 1 and y["boxes_all_classes"][g][0] == -1
    assert w["mask"][g] == 0  # unknown mask
    # healthy slice: negative for tumour, no subtype, known-empty mask
    h = i["healthy"]
    assert y["tumor"][h] == 0 and w["tumor"][h] == 1
    assert w["subtype"][h] == 0
    assert y["class"][h] == 3 and w["class"][h] == 1
    assert y["multilabel"][h].tolist() == [0, 0, 0, 1] and w["multilabel"][h] == 1
    assert w["mask"][h] == 1 and y["mask"][h].sum() == 0
    assert w["boxes"][h].sum() == 0
    # evaluation-only keys carry no weight
    for k in ("boxes_all", "boxes_all_classes", "boxes_all_count"):
        assert w[k].sum() == 0


def test_generic_tumour_counts_when_tumor_is_a_class(recs):
    cm = ClassMap(["tumor", "no_tumor"])
    ds = build_dataset([recs["generic"], recs["healthy"]], cm, EVAL, training=False)
    _, y, w = np_batch(next(iter(ds)))
    assert y["class"].tolist() == [0, 1] and w["class"].tolist() == [1, 1]
    assert y["multilabel"].tolist() == [[1, 0], [0, 1]] and w["multilabel"].tolist() == [1, 1]
    assert w["boxes"].tolist() == [[1, 0], [0, 0]]
    assert w["subtype"].tolist() == [1, 0]


def test_box_class_slots(tmp_path):
    img = write(tmp_path / "x.png", texture(64, 64, 7))
    r = Record(image=img, label="glioma",
               boxes=[[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.9, 0.8], [0.2, 0.6, 0.4, 0.9]],
               box_classes=["glioma", "pituitary", "glioma"], known={"label": True, "boxes": True, "mask": False})
    _, y, w = np_batch(one_batch([r], heads=["boxes", "multilabel", "boxes_all"]))
    assert set(y) == {"boxes", "multilabel", "boxes_all", "boxes_all_classes", "boxes_all_count"}
    np.testing.assert_allclose(y["boxes"][0, 0], [0.1, 0.1, 0.4, 0.9], atol=1e-6)  # enclosing the 2 gliomas
    np.testing.assert_allclose(y["boxes"][0, 2], [0.6, 0.5, 0.9, 0.8], atol=1e-6)
    np.testing.assert_array_equal(y["boxes"][0, 1], 0)
    assert w["boxes"][0].tolist() == [1, 0, 1, 0]
    assert y["multilabel"][0].tolist() == [1, 0, 1, 0]
    assert y["boxes_all_classes"][0].tolist() == [0, 2, 0] and y["boxes_all_count"][0] == 3
    # boxes not known -> no slot carries weight
    r.known["boxes"] = False
    _, y, w = np_batch(one_batch([r], heads=["boxes"]))
    assert w["boxes"].sum() == 0


def test_heads_restrict_targets(recs):
    rs = [recs["png_rgb"], recs["jpg_grey"]]
    _, y, w = one_batch(rs, heads=["class"])
    assert set(y) == set(w) == {"class"}
    _, y, w = one_batch(rs, heads=["mask", "image"])
    assert set(y) == {"mask"}
    with pytest.raises(ValueError, match="unknown target"):
        build_dataset(rs, CM, EVAL, training=False, heads=["segmentation"])


# ---------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------
def assert_box_encloses_mask(box, mask, tol=1e-5):
    ys, xs = np.nonzero(mask[..., 0] > 0)
    h, w = mask.shape[:2]
    assert np.all((xs + 0.5) / w >= box[0] - tol) and np.all((xs + 0.5) / w <= box[2] + tol)
    assert np.all((ys + 0.5) / h >= box[1] - tol) and np.all((ys + 0.5) / h <= box[3] + tol)


def test_boxes_match_masks_without_augmentation(recs):
    rs = [recs["png_rgb"], recs["jpg_grey"]]
    _, y, w = np_batch(one_batch(rs, {"image_size": 64}))
    for i, cls in ((0, 0), (1, 1)):
        np.testing.assert_allclose(y["boxes"][i, cls], mask_to_box(y["mask"][i]), atol=1e-6)


def test_augmented_boxes_still_enclose_augmented_masks(recs):
    rs = [recs["png_rgb"], recs["jpg_grey"]] * 8
    geometric = {k: STRONG[k] for k in ("hflip", "vflip", "rotate_deg", "scale", "shift")}
    cfg = {"image_size": 48, "batch_size": 16, "augment": {**ZERO, **geometric}, "seed": 3, "xla": False}
    # the default warp (cv2); the other kernels agree with it (test_augment)
    for warp in ("auto",):
        cfg["augment"]["warp"] = warp
        x, y, w = np_batch(next(iter(build_dataset(rs, CM, cfg, training=True))))
        assert np.isfinite(x).all()
        n_checked = 0
        for i in range(len(rs)):
            k = int(np.argmax(w["boxes"][i])) if w["boxes"][i].any() else None
            if k is None:  # the box left the image: so did the mask
                assert y["mask"][i].sum() == 0
                continue
            # a warped mask is resampled on the pixel grid: it may reach half a pixel past the box
            assert_box_encloses_mask(y["boxes"][i, k], y["mask"][i], tol=0.5 / 48)
            np.testing.assert_allclose(y["boxes_all"][i, 0], y["boxes"][i, k], atol=1e-6)
            n_checked += 1
        assert n_checked >= 12


def test_letterbox_places_boxes_on_the_mask(tmp_path):
    h, w = 48, 96
    m = ellipse(h, w, (70, 20), (12, 8), angle=0)
    img = texture(h, w, 8)
    img[m > 0] = 255
    r = Record(image=write(tmp_path / "wide.png", img), label="pituitary", boxes=[mask_to_box(m)],
               box_classes=["pituitary"], mask=write(tmp_path / "wide_mask.png", m), known=dict(ALL))
    x, y, wt = np_batch(one_batch([r], {"image_size": 64, "resize": "letterbox"}))
    # content is 64 x 32, centred: rows 16..47; padding is black
    assert np.all(x[0, :16] == 0) and np.all(x[0, 48:] == 0) and x[0, 16:48].mean() > 0.1
    box = y["boxes"][0, 2]
    assert 0.25 - 1e-6 <= box[1] and box[3] <= 0.75 + 1e-6
    np.testing.assert_allclose(box, mask_to_box(y["mask"][0]), atol=1.5 / 64)
    assert_box_encloses_mask(box, y["mask"][0], tol=1 / 64)
    # stretch: the same box (normalised) without the offsets
    _, ys, _ = np_batch(one_batch([r], {"image_size": 64, "resize": "stretch"}))
    np.testing.assert_allclose(ys["boxes"][0, 2], r.boxes[0], atol=1e-6)


# ---------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------
def test_jpeg_dct_ratio_selected_and_right_size(tmp_path):
    big = texture(256, 256, 9, rgb=False)
    mid = texture(200, 200, 10, rgb=False)
    r1 = Record(image=write(tmp_path / "big.jpg", big), label="glioma", known={"label": True})
    r2 = Record(image=write(tmp_path / "mid.jpg", mid), label="glioma", known={"label": True})
    plan = plan_pipeline([r1, r2], CM, {**EVAL, "image_size": 64}, training=False)
    assert plan.codecs == [("jpeg", 4), ("jpeg", 2)]  # 256/4 = 64 exactly; 200/2 = 100 >= 64 > 200/4
    assert plan.stats["resized_after_decode"] == 1 and plan.channels == 1
    x, _, _ = np_batch(next(iter(plan.dataset())))
    assert x.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 1])  # grey broadcast to 3 channels
    for i, src in enumerate((big, mid)):
        ref = cv2.resize(src, (64, 64), interpolation=cv2.INTER_AREA) / 255.0
        assert np.abs(x[i, ..., 0] - ref).mean() < 0.03
    no_dct = plan_pipeline([r1, r2], CM, {**EVAL, "image_size": 64, "dct_scaling": False}, training=False)
    assert no_dct.codecs == [("jpeg", 1)]


def test_mixed_grey_and_rgb_decode_as_rgb(recs):
    plan = plan_pipeline([recs["png_rgb"], recs["jpg_grey"]], CM, EVAL, training=False)
    assert plan.channels == 3
    x, _, _ = np_batch(next(iter(plan.dataset())))
    assert not np.allclose(x[0, ..., 0], x[0, ..., 2])  # colour kept
    np.testing.assert_allclose(x[1, ..., 0], x[1, ..., 2])  # grey replicated


def test_header_probe(recs, tmp_path):
    info = probe_header(recs["jpg_grey"].image)
    assert (info.fmt, info.width, info.height, info.channels, info.clean_end) == ("jpeg", 64, 64, 1, True)
    assert probe_header(recs["png_rgb"].image).channels == 3
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="notes.png"):
        build_dataset([Record(image=str(bad))], CM, EVAL, training=False)
    with pytest.raises(DataError, match="gone.jpg"):
        probe_header(tmp_path / "gone.jpg")


def test_file_corrupted_after_build_is_named(recs, tmp_path):
    r = recs["jpg_grey"]
    ds = build_dataset([r], CM, EVAL, training=False)
    data = open(r.image, "rb").read()
    open(r.image, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(tf.errors.InvalidArgumentError, match="b.jpg"):
        next(iter(ds))
    open(r.image, "wb").write(b"GIF89a" + data[6:])  # wrong signature
    with pytest.raises(tf.errors.InvalidArgumentError, match="b.jpg"):
        next(iter(ds))
    assert [p for p, _ in check_decodable([r])] == [r.image]


def test_png_masks_equal_packed_masks(recs, tmp_path):
    rs = [recs["png_rgb"], recs["jpg_grey"], recs["healthy"], recs["unlabelled"]]
    cfg = {"image_size": [40, 56], "resize": "letterbox"}
    _, a, wa = np_batch(one_batch(rs, {**cfg, "mask_format": "packed", "mask_cache_dir": str(tmp_path / "mc")}))
    _, b, wb = np_batch(one_batch(rs, {**cfg, "mask_format": "png"}))
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_array_equal(wa["mask"], wb["mask"])
    assert list((tmp_path / "mc").glob("masks-*.npz"))  # cached for the next run
    _, c, _ = np_batch(one_batch(rs, {**cfg, "mask_cache_dir": str(tmp_path / "mc")}))
    np.testing.assert_array_equal(a["mask"], c["mask"])


def test_polygons_need_a_cache_dir_then_become_masks(tmp_path):
    img = write(tmp_path / "p.png", texture(64, 64, 11))
    poly = [np.array([[0.25, 0.25], [0.75, 0.25], [0.75, 0.5], [0.25, 0.5]], np.float32)]
    r = Record(image=img, label="glioma", boxes=[[0.25, 0.25, 0.75, 0.5]], box_classes=["glioma"], polygons=poly,
               known=dict(ALL))
    with pytest.raises(DataError, match="p.png"):
        build_dataset([r], CM, EVAL, training=False)
    _, y, w = np_batch(one_batch([r], {"mask_cache_dir": str(tmp_path / "cache")}))
    assert r.mask is None  # the caller's record is not changed
    assert w["mask"][0] == 1
    np.testing.assert_allclose(mask_to_box(y["mask"][0]), [0.25, 0.25, 0.75, 0.5], atol=1e-6)


# ---------------------------------------------------------------------------------------
# no data.preprocessing: images are [0, 1], the model scales them (src/models/layers.py)
# ---------------------------------------------------------------------------------------
def test_images_are_unit_range_and_data_preprocessing_is_an_error(recs):
    rs = [recs["png_rgb"]]
    x, _, _ = np_batch(one_batch(rs))
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    for same in ("auto", "none", None):  # what callers still pass mean exactly that
        np.testing.assert_array_equal(np_batch(one_batch(rs, {"preprocessing": same}))[0], x)
    with pytest.raises(ValueError, match=r"data\.preprocessing='caffe'.*the model scales its own inputs"):
        one_batch(rs, {"preprocessing": "caffe"})


# ---------------------------------------------------------------------------------------
# training behaviour
# ---------------------------------------------------------------------------------------
def all_batches(ds):
    return [np_batch(b) for b in ds]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya, wa), (xb, yb, wb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        for k in ya:
            np.testing.assert_array_equal(ya[k], yb[k])
            np.testing.assert_array_equal(wa[k], wb[k])


def test_seeded_training_is_deterministic(recs):
    rs = list(recs.values()) * 2
    # hue / saturation / blur are seeded the same way (test_augment); left out here to
    # keep the XLA compilation short
    aug = {**STRONG, "saturation": 0, "hue": 0, "blur_prob": 0, "warp": "cv2"}
    cfg = {**EVAL, "batch_size": 5, "augment": aug, "seed": 7, "xla": True}
    ds = build_dataset(rs, CM, cfg, training=True)
    a = all_batches(ds)
    b = all_batches(build_dataset(rs, CM, cfg, training=True))
    assert_same(a, b)
    c = all_batches(build_dataset(rs, CM, {**cfg, "seed": 8}, training=True))
    assert not np.allclose(a[0][0], c[0][0])
    # a second epoch of the same dataset is shuffled and augmented differently
    a2 = all_batches(ds)
    assert not np.allclose(a[0][0], a2[0][0])


def test_training_with_zero_augmentation_equals_eval(recs):
    rs = list(recs.values()) * 2
    ev = all_batches(build_dataset(rs, CM, {**EVAL, "batch_size": 5, "xla": True}, training=False))
    tr = all_batches(build_dataset(rs, CM, {**EVAL, "batch_size": 5, "augment": ZERO, "shuffle_buffer": 0,
                                            "xla": True}, training=True))
    assert_same(ev, tr)
    # augment is ignored for evaluation
    ev2 = all_batches(build_dataset(rs, CM, {**EVAL, "batch_size": 5, "augment": STRONG, "xla": True},
                                    training=False))
    assert_same(ev, ev2)


def test_cache_repeat_and_drop_remainder(recs, tmp_path):
    rs = list(recs.values())  # 5 records
    base = all_batches(build_dataset(rs, CM, {**EVAL, "batch_size": 2}, training=False))
    mem = all_batches(build_dataset(rs, CM, {**EVAL, "batch_size": 2, "cache": "memory"}, training=False))
    assert_same(base, mem)
    f = all_batches(build_dataset(rs, CM, {**EVAL, "batch_size": 2, "cache": str(tmp_path / "c")}, training=False))
    assert_same(base, f)
    ds = build_dataset(rs, CM, {**EVAL, "batch_size": 2, "repeat": 2, "drop_remainder": True}, training=True)
    sizes = [int(x.shape[0]) for x, _, _ in ds]
    assert sizes == [2] * 5


def test_training_defaults_run_on_grey_and_rgb(recs):
    rs = list(recs.values())
    x, y, w = np_batch(one_batch(rs, {"augment": {"warp": "tf"}, "xla": True}, training=True))
    assert x.shape == (5, 32, 32, 3) and np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
    assert y["mask"].shape == (5, 32, 32, 1)


def test_bad_config_values():
    with pytest.raises(ValueError, match="resize"):
        plan_pipeline([], CM, {"resize": "crop"}, training=False)
    with pytest.raises(ValueError, match="mask_format"):
        plan_pipeline([], CM, {"mask_format": "rle"}, training=False)
    with pytest.raises(DataError, match="no records"):
        plan_pipeline([], CM, {}, training=False)


def test_cached_and_streamed_training_batches_are_identical(recs, tmp_path):
    """Same seed, no shuffling: the cache path (decode per element, cache, batch) and the
    streaming path (decode per batch) give the same augmented images, masks and boxes."""
    rs = [recs["png_rgb"], recs["jpg_grey"], recs["healthy"], recs["generic"]] * 3
    cfg = {**EVAL, "batch_size": 4, "shuffle_buffer": 0, "augment": STRONG, "seed": 11,
           "mask_cache_dir": str(tmp_path / "mc")}
    streamed = all_batches(build_dataset(rs, CM, cfg, training=True))
    cached = all_batches(build_dataset(rs, CM, {**cfg, "cache": "memory"}, training=True))
    assert_same(streamed, cached)
    assert sum(int(y["mask"].sum()) for _, y, _ in streamed) > 0


def test_pure_tf_warp_masks_agree_with_cv2(recs, tmp_path):
    """``warp: xla`` (no Python in the graph: masks unpacked by TF ops) and the default
    OpenCV path (masks warped straight from their packed crops) agree on the masks."""
    rs = [recs["png_rgb"], recs["jpg_grey"], recs["healthy"]] * 4
    geo = {**ZERO, "hflip": 0.5, "rotate_deg": 20, "scale": 0.1, "shift": 0.05}
    base = {"image_size": 48, "batch_size": 12, "shuffle_buffer": 0, "seed": 2, "xla": False}
    a = np_batch(one_batch(rs, {**base, "augment": {**geo, "warp": "cv2"}}, training=True))
    b = np_batch(one_batch(rs, {**base, "augment": {**geo, "warp": "xla"}}, training=True))
    assert a[1]["mask"].sum() > 100
    assert np.mean(a[1]["mask"] != b[1]["mask"]) < 0.005
    np.testing.assert_allclose(a[1]["boxes"], b[1]["boxes"], atol=1e-5)
    # and without geometric augmentation the pure-TF unpacking is exact
    c = np_batch(one_batch(rs, {**base, "augment": {**ZERO, "hflip": 0.5, "warp": "xla"}}, training=True))
    d = np_batch(one_batch(rs, {**base, "augment": {**ZERO, "hflip": 0.5, "warp": "cv2"}}, training=True))
    np.testing.assert_array_equal(c[1]["mask"], d[1]["mask"])


def test_cache_auto_caches_training_sets_that_fit(recs, monkeypatch):
    import src.data.pipeline as P

    rs = list(recs.values())
    train = plan_pipeline(rs, CM, {**EVAL, "cache": "auto"}, training=True).summary()
    assert train["cache"] == "memory" and "auto" in train["cache_decision"]
    assert plan_pipeline(rs, CM, {**EVAL, "cache": "auto"}, training=False).summary()["cache"] == "off"
    assert plan_pipeline(rs, CM, {**EVAL, "cache": False}, training=True).summary()["cache"] == "off"
    monkeypatch.setattr(P, "CACHE_AUTO_FRACTION", 1e-15)  # nothing fits
    tight = plan_pipeline(rs, CM, {**EVAL, "cache": "auto"}, training=True).summary()
    assert tight["cache"] == "off" and "decoding every epoch" in tight["cache_decision"]
    # the default is auto, and the cached training dataset runs
    assert P.PIPELINE_DEFAULTS["cache"] == "auto"
    monkeypatch.setattr(P, "CACHE_AUTO_FRACTION", 0.25)
    ds = build_dataset(rs, CM, {**EVAL, "augment": STRONG, "repeat": 2}, training=True)
    assert sum(int(x.shape[0]) for x, _, _ in ds) == 2 * len(rs)


def test_pure_tf_config_keeps_python_out_of_evaluation_graphs(recs):
    """``warp: xla`` means no ``tf.numpy_function`` anywhere, also when not training."""
    rs = [recs["png_rgb"], recs["jpg_grey"]]

    def py_ops(cfg):
        ds = build_dataset(rs, CM, {**EVAL, **cfg}, training=False)
        ser = tf.raw_ops.DatasetToGraphV2(input_dataset=ds._variant_tensor, external_state_policy=0)
        gdef = tf.compat.v1.GraphDef.FromString(ser.numpy())
        names = [n.op for f in gdef.library.function for n in f.node_def] + [n.op for n in gdef.node]
        return sum(op in ("PyFunc", "PyFuncStateless", "EagerPyFunc") for op in names)

    assert py_ops({"augment": {"warp": "xla"}}) == 0
    assert py_ops({"augment": {"warp": "auto"}}) > 0  # the default unpacks masks in NumPy


def _class_records(tmp_path, counts):
    """Tiny labelled records, ``counts[label]`` of each."""
    recs = []
    for label, n in counts.items():
        for i in range(n):
            path = write(tmp_path / f"{label}_{i}.png", texture(16, 16, len(recs)))
            recs.append(Record(image=path, label=label, known={"label": True}))
    return recs


@pytest.mark.parametrize("cache", [False, "memory"])
def test_balanced_sampling_gives_equal_class_shares(tmp_path, cache):
    recs = _class_records(tmp_path, {"glioma": 36, "meningioma": 9, "pituitary": 15})
    cfg = {**EVAL, "image_size": 16, "batch_size": 20, "cache": cache, "sampling": "balanced", "repeat": True}
    ds = build_dataset(recs, CM, cfg, training=True, heads=["class"])
    labels = np.concatenate([y["class"].numpy() for _, y, _ in ds.take(60)])
    shares = np.bincount(labels, minlength=4) / len(labels)
    # 1,200 draws: each present class ~1/3 (binomial sd ~0.014), the absent no_tumor never
    np.testing.assert_allclose(shares[:3], 1 / 3, atol=0.05)
    assert shares[3] == 0
    # natural order keeps the records' own shares (glioma 60%)
    nat = build_dataset(recs, CM, {**cfg, "sampling": "natural"}, training=True, heads=["class"])
    labels = np.concatenate([y["class"].numpy() for _, y, _ in nat.take(60)])
    assert abs(np.mean(labels == 0) - 0.6) < 0.02


def test_balanced_sampling_epoch_length_and_seed(tmp_path):
    recs = _class_records(tmp_path, {"glioma": 20, "pituitary": 5})
    cfg = {**EVAL, "image_size": 16, "batch_size": 5, "sampling": "balanced", "seed": 3}
    ds = build_dataset(recs, CM, cfg, training=True, heads=["class"])
    one = [y["class"].numpy() for _, y, _ in ds]
    assert sum(len(b) for b in one) == len(recs)           # an epoch is one pass' worth of records
    again = [y["class"].numpy() for _, y, _ in build_dataset(recs, CM, cfg, training=True, heads=["class"])]
    assert all((a == b).all() for a, b in zip(one, again))  # seeded: the same draw
    # evaluation datasets are never resampled
    ev = build_dataset(recs, CM, cfg, training=False, heads=["class"])
    assert sorted(np.concatenate([y["class"].numpy() for _, y, _ in ev]).tolist()) == [0] * 20 + [2] * 5
    with pytest.raises(ValueError, match="data.sampling"):
        build_dataset(recs, CM, {**cfg, "sampling": "uniform"}, training=True)
