"""`src.inference`: flip test-time augmentation checked against two raw model calls (boxes read
off masks: tests/test_boxes_from_mask.py)."""
import numpy as np
import pytest

from src.inference import merge_flip, predict_with_tta, resolve_tta


def test_tta_modes_are_checked():
    assert [resolve_tta(v) for v in (False, None, "none", "false", "flip", "FLIP")] == ["none"] * 4 + ["flip"] * 2
    with pytest.raises(ValueError, match="tta must be false or flip"):
        resolve_tta("rotate")


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
