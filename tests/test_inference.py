"""`src.boxes_from_mask` and `src.inference`: boxes read off masks (pure numpy + OpenCV) and
flip test-time augmentation checked against two raw model calls."""
import numpy as np
import pytest

from src.boxes_from_mask import mask_boxes, resolve_box_mode, slot_boxes_from_masks, union_box
from src.inference import merge_flip, predict_with_tta, resolve_tta


def _two_blobs():
    """A 20 x 30 probability mask: a 3 x 4 blob (12 px) and a 5 x 6 blob (30 px), plus a
    diagonal 2-px speck (8-connected) and pixels under the threshold."""
    m = np.zeros((20, 30), np.float32)
    m[2:5, 3:7] = 0.9            # rows 2-4, cols 3-6
    m[10:15, 20:26] = 0.6        # rows 10-14, cols 20-25
    m[17, 1] = m[18, 2] = 1.0    # diagonal neighbours: one component with connectivity 8
    m[0:2, 10:20] = 0.3          # below 0.5: background
    return m


def test_largest_component_gives_one_tight_box_in_pixel_edges():
    np.testing.assert_array_equal(mask_boxes(_two_blobs()), [[20, 10, 26, 15]])
    np.testing.assert_array_equal(mask_boxes(_two_blobs()[..., None], mode="largest"), [[20, 10, 26, 15]])


def test_components_gives_every_box_largest_first():
    np.testing.assert_array_equal(mask_boxes(_two_blobs(), mode="components"),
                                  [[20, 10, 26, 15], [3, 2, 7, 5], [1, 17, 3, 19]])
    np.testing.assert_array_equal(union_box(mask_boxes(_two_blobs(), mode="components")), [1, 2, 26, 19])
    # the threshold decides what is foreground: at 0.25 the faint band joins in (20 px, second largest)
    b = mask_boxes(_two_blobs(), threshold=0.25, mode="components")
    assert len(b) == 4 and b[1].tolist() == [10, 0, 20, 2]


def test_min_area_drops_specks():
    m = _two_blobs()
    assert mask_boxes(m, mode="components", min_area=3).tolist() == [[20, 10, 26, 15], [3, 2, 7, 5]]
    assert mask_boxes(m, mode="components", min_area=13).tolist() == [[20, 10, 26, 15]]
    assert mask_boxes(m, mode="largest", min_area=31).shape == (0, 4)   # even the largest is too small


def test_empty_mask_and_off_give_no_box():
    assert mask_boxes(np.zeros((8, 8))).shape == (0, 4)
    assert mask_boxes(np.full((8, 8), 0.49)).shape == (0, 4)
    assert mask_boxes(_two_blobs(), mode=False).shape == (0, 4)
    assert union_box(np.zeros((0, 4))) is None
    boxes, counts = slot_boxes_from_masks(np.zeros((2, 8, 8, 1)), 4)
    assert boxes.shape == (2, 4, 4) and not boxes.any() and counts.tolist() == [0, 0]


def test_mask_touching_the_border():
    m = np.zeros((16, 16), np.uint8)
    m[0:4, 12:16] = 1     # top-right corner
    m[10:16, 0:16] = 1    # the whole bottom band
    np.testing.assert_array_equal(mask_boxes(m), [[0, 10, 16, 16]])
    np.testing.assert_array_equal(mask_boxes(m, mode="components"), [[0, 10, 16, 16], [12, 0, 16, 4]])
    np.testing.assert_array_equal(mask_boxes(np.ones((5, 7))), [[0, 0, 7, 5]])


def test_slot_boxes_are_normalised_and_fill_every_slot():
    m = np.stack([_two_blobs(), np.zeros((20, 30), np.float32)])
    boxes, counts = slot_boxes_from_masks(m, 3, mode="largest")
    assert boxes.shape == (2, 3, 4) and counts.tolist() == [3, 0]
    np.testing.assert_allclose(boxes[0], np.tile([[20 / 30, 10 / 20, 26 / 30, 15 / 20]], (3, 1)), rtol=1e-6)
    assert not boxes[1].any()
    boxes, _ = slot_boxes_from_masks(m, 3, mode="components")   # the union box of the components
    np.testing.assert_allclose(boxes[0, 0], [1 / 30, 2 / 20, 26 / 30, 19 / 20], rtol=1e-6)
    boxes, counts = slot_boxes_from_masks(m, 3, mode="components", min_area=13)
    np.testing.assert_allclose(boxes[0, 2], [20 / 30, 10 / 20, 26 / 30, 15 / 20], rtol=1e-6)
    assert counts.tolist() == [1, 0]


def test_modes_are_checked():
    assert [resolve_tta(v) for v in (False, None, "none", "false", "flip", "FLIP")] == ["none"] * 4 + ["flip"] * 2
    assert [resolve_box_mode(v) for v in (False, None, "false", "largest", "components")] == \
        [None, None, None, "largest", "components"]
    with pytest.raises(ValueError, match="tta must be false or flip"):
        resolve_tta("rotate")
    with pytest.raises(ValueError, match="largest, components or false"):
        resolve_box_mode("biggest")
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_boxes(np.zeros((2, 4, 4, 1)))


# ---------------------------------------------------------------------------------------
# test-time augmentation
# ---------------------------------------------------------------------------------------
def _asymmetric_model():
    """Every kind of output, none of them mirror-symmetric: class / multilabel / tumor /
    subtype from a flattened (position-aware) layer, boxes [B, 4, 4], mask and recon."""
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input((12, 16, 3))
    flat = keras.layers.Flatten()(x)
    conv = keras.layers.Conv2D(4, 3, padding="same", name="c")(x)
    boxes = keras.layers.Reshape((4, 4), name="boxes")(keras.layers.Dense(16, activation="sigmoid")(flat))
    out = {"class": keras.layers.Dense(4, activation="softmax", name="class")(flat),
           "multilabel": keras.layers.Dense(4, activation="sigmoid", name="multilabel")(flat),
           "tumor": keras.layers.Dense(1, activation="sigmoid", name="tumor")(flat),
           "subtype": keras.layers.Dense(3, activation="softmax", name="subtype")(flat),
           "boxes": boxes,
           "mask": keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="mask")(conv),
           "recon": keras.layers.Conv2D(3, 1, activation="sigmoid", name="recon")(conv)}
    return keras.Model(x, out)


def test_flip_tta_is_the_mean_of_the_image_and_its_unflipped_mirror():
    import tensorflow as tf

    model = _asymmetric_model()
    x = np.random.default_rng(0).uniform(0, 1, (3, 12, 16, 3)).astype(np.float32)
    a = {k: np.asarray(v) for k, v in model(x, training=False).items()}
    b = {k: np.asarray(v) for k, v in model(x[:, :, ::-1].copy(), training=False).items()}   # two raw calls
    want = {k: (a[k] + b[k]) / 2 for k in ("class", "multilabel", "tumor", "subtype")}
    want["mask"] = (a["mask"] + b["mask"][:, :, ::-1]) / 2
    want["recon"] = (a["recon"] + b["recon"][:, :, ::-1]) / 2
    bb = b["boxes"]
    want["boxes"] = (a["boxes"] + np.stack([1 - bb[..., 2], bb[..., 1], 1 - bb[..., 0], bb[..., 3]], -1)) / 2
    assert not np.allclose(a["mask"], b["mask"][:, :, ::-1], atol=1e-4)   # the test would be vacuous otherwise

    eager = {k: np.asarray(v) for k, v in predict_with_tta(model, x, "flip").items()}
    graph = {k: np.asarray(v) for k, v in tf.function(lambda t: predict_with_tta(model, t, "flip"))(x).items()}
    assert set(eager) == set(graph) == set(want)
    for k in want:
        np.testing.assert_allclose(eager[k], want[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(graph[k], want[k], atol=1e-6, err_msg=k)
    none = predict_with_tta(model, x, False)
    for k in a:
        np.testing.assert_allclose(np.asarray(none[k]), a[k], atol=1e-6)


def test_unflipped_box_of_a_mirrored_box_is_the_box():
    box = np.array([[[0.1, 0.2, 0.4, 0.9]]], np.float32)
    mirrored = np.array([[[0.6, 0.2, 0.9, 0.9]]], np.float32)
    merged = merge_flip({"boxes": box}, {"boxes": mirrored})
    np.testing.assert_allclose(np.asarray(merged["boxes"]), box, atol=1e-6)


def test_single_output_model():
    import keras

    x_in = keras.Input((4, 6, 1))
    model = keras.Model(x_in, keras.layers.Conv2D(1, (1, 3), padding="same", use_bias=False)(x_in))
    x = np.random.default_rng(1).uniform(0, 1, (2, 4, 6, 1)).astype(np.float32)
    a, b = np.asarray(model(x)), np.asarray(model(x[:, :, ::-1].copy()))
    np.testing.assert_allclose(np.asarray(predict_with_tta(model, x, "flip")), (a + b[:, :, ::-1]) / 2, atol=1e-6)
