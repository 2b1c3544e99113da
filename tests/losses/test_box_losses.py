"""Box IoU-family losses against hand-computed cases, masking, gradients, precision, saving."""
from __future__ import annotations

import math

import numpy as np
import pytest

import keras
import tensorflow as tf

from src.losses import BOX_MODES, BoxIoULoss, box_iou, get_loss, pairwise_iou
from src.training.metrics import BoxMeanIoU

ATOL = 1e-6


def _loss(mode, y_true, y_pred, sample_weight=None, **kwargs):
    loss = BoxIoULoss(mode=mode, **kwargs)
    return float(loss(np.asarray(y_true, "float32"), np.asarray(y_pred, "float32"), sample_weight=sample_weight))


def _grad(loss, y_true, y_pred, sample_weight=None, dtype="float32"):
    y_pred = tf.Variable(tf.cast(np.asarray(y_pred, "float32"), dtype))
    y_true = tf.cast(np.asarray(y_true, "float32"), dtype)
    with tf.GradientTape() as tape:
        value = loss(y_true, y_pred, sample_weight=sample_weight)
    return value, tape.gradient(value, y_pred)


# ----------------------------------------------------------------- hand-computed values
@pytest.mark.parametrize("mode", BOX_MODES)
def test_identical_boxes_give_zero(mode):
    boxes = [[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.35, 0.9]]]
    assert _loss(mode, boxes, boxes) == pytest.approx(0.0, abs=ATOL)


def test_disjoint_boxes_hand_computed():
    a = [[0.0, 0.0, 0.2, 0.2]]
    b = [[0.5, 0.5, 0.7, 0.7]]
    # IoU = 0
    assert _loss("iou", a, b) == pytest.approx(1.0, abs=ATOL)
    # enclosing box [0, 0, .7, .7]: area .49; union .04 + .04 = .08
    giou = 0.0 - (0.49 - 0.08) / 0.49
    giou_loss = _loss("giou", a, b)
    assert 1.0 < giou_loss < 2.0
    assert giou_loss == pytest.approx(1.0 - giou, abs=ATOL)
    # centres (.1, .1) and (.6, .6): rho^2 = .25 + .25; enclosing diagonal^2 = .49 + .49
    diou = 0.0 - 0.5 / 0.98
    assert _loss("diou", a, b) == pytest.approx(1.0 - diou, abs=ATOL)
    # same aspect ratio (both square): v = 0, so CIoU = DIoU
    assert _loss("ciou", a, b) == pytest.approx(1.0 - diou, abs=ATOL)


def test_nested_boxes_iou_is_area_ratio():
    outer = [[0.1, 0.1, 0.9, 0.9]]   # area .64, centre (.5, .5)
    inner = [[0.3, 0.3, 0.5, 0.5]]   # area .04, centre (.4, .4)
    iou = 0.04 / 0.64
    assert _loss("iou", outer, inner) == pytest.approx(1.0 - iou, abs=ATOL)
    # enclosing box = outer = union: GIoU penalty 0
    assert _loss("giou", outer, inner) == pytest.approx(1.0 - iou, abs=ATOL)
    # rho^2 = .01 + .01, enclosing diagonal^2 = .64 + .64
    assert _loss("diou", outer, inner) == pytest.approx(1.0 - (iou - 0.02 / 1.28), abs=ATOL)


def test_ciou_aspect_ratio_mismatch_hand_computed():
    gt = np.array([0.2, 0.2, 0.6, 0.4])      # w .4, h .2, centre (.4, .3)
    pred = np.array([0.35, 0.1, 0.55, 0.5])  # w .2, h .4, centre (.45, .3)
    # by hand with numpy
    inter = (min(gt[2], pred[2]) - max(gt[0], pred[0])) * (min(gt[3], pred[3]) - max(gt[1], pred[1]))
    assert inter == pytest.approx(0.2 * 0.2)
    union = 0.4 * 0.2 + 0.2 * 0.4 - inter
    iou = inter / union                                   # 1/3
    c2 = (0.6 - 0.2) ** 2 + (0.5 - 0.1) ** 2              # enclosing [.2,.1,.6,.5]
    rho2 = (0.45 - 0.4) ** 2 + (0.3 - 0.3) ** 2
    v = 4.0 / math.pi**2 * (math.atan(0.4 / 0.2) - math.atan(0.2 / 0.4)) ** 2
    alpha = v / ((1.0 - iou) + v)
    ciou = iou - rho2 / c2 - alpha * v
    got = _loss("ciou", [gt], [pred])
    assert got == pytest.approx(1.0 - ciou, abs=1e-5)
    assert got > _loss("diou", [gt], [pred]) + 0.02   # the aspect term (~.034) is really there
    # symmetric
    assert _loss("ciou", [pred], [gt]) == pytest.approx(got, abs=1e-6)


def test_box_iou_and_pairwise_iou_against_numpy():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.6, size=(5, 2))
    a = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, size=(5, 2))], axis=1).astype("float32")
    xy = rng.uniform(0, 0.6, size=(3, 2))
    b = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, size=(3, 2))], axis=1).astype("float32")

    def ref(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)

    expected = np.array([[ref(p, q) for q in b] for p in a])
    got = np.asarray(pairwise_iou(a, b))
    assert got.shape == (5, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(box_iou(a[:3], b)), np.diag(expected[:3]), atol=1e-6)
    # GIoU <= IoU and DIoU <= IoU elementwise
    for mode in ("giou", "diou", "ciou"):
        assert np.all(np.asarray(pairwise_iou(a, b, mode=mode)) <= got + 1e-6)


# ----------------------------------------------------------------- masking and reduction
@pytest.mark.parametrize("mode", BOX_MODES)
def test_all_zero_weights_give_exact_zero_and_zero_gradient(mode):
    y_true = np.zeros((2, 3, 4), "float32")                 # degenerate boxes everywhere
    y_pred = np.zeros((2, 3, 4), "float32")
    y_pred[1, 2] = [0.5, 0.5, 0.5, 0.9]                      # zero-width prediction
    y_true[0, 1] = [np.nan, 0.1, np.inf, 0.2]                # garbage in a masked slot
    w = np.zeros((2, 3), "float32")
    value, grad = _grad(BoxIoULoss(mode=mode), y_true, y_pred, sample_weight=w)
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("mode", BOX_MODES)
def test_degenerate_boxes_are_finite_even_unweighted(mode):
    # the safe divisions alone (no mask) keep value and gradient finite
    y_true = np.array([[[0, 0, 0, 0], [0.2, 0.2, 0.2, 0.6], [0.3, 0.3, 0.3, 0.3]]], "float32")
    y_pred = np.array([[[0, 0, 0, 0], [0.2, 0.2, 0.2, 0.6], [0.1, 0.1, 0.1, 0.1]]], "float32")
    value, grad = _grad(BoxIoULoss(mode=mode), y_true, y_pred)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("mode", BOX_MODES)
def test_masked_slots_are_ignored(mode):
    y_true = np.array([[[0.1, 0.1, 0.4, 0.5], [0, 0, 0, 0], [0.5, 0.5, 0.9, 0.7]],
                       [[0, 0, 0, 0], [0.2, 0.3, 0.6, 0.8], [np.nan, 0, 0, 0]]], "float32")
    y_pred = np.array([[[0.15, 0.1, 0.5, 0.45], [0.3, 0.3, 0.2, 0.1], [0.1, 0.1, 0.3, 0.3]],
                       [[np.nan, 0.9, 0.9, 0.9], [0.25, 0.2, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]]], "float32")
    w = np.array([[1, 0, 1], [0, 1, 0]], "float32")
    per_slot = np.asarray(BoxIoULoss(mode=mode, reduction="none")(y_true, y_pred, sample_weight=w))
    assert per_slot.shape == (2, 3) and np.all(np.isfinite(per_slot))
    assert np.all(per_slot[w == 0] == 0.0)
    valid = [(0, 0), (0, 2), (1, 1)]
    singles = [_loss(mode, y_true[i, j][None], y_pred[i, j][None]) for i, j in valid]
    assert _loss(mode, y_true, y_pred, sample_weight=w) == pytest.approx(np.mean(singles), abs=1e-6)
    # non-binary weights: sum(w l) / sum(w)
    w2 = w * np.array([[2.0, 1.0, 0.5], [1.0, 3.0, 1.0]], "float32")
    expected = np.dot([2.0, 0.5, 3.0], singles) / 5.5
    assert _loss(mode, y_true, y_pred, sample_weight=w2) == pytest.approx(expected, abs=1e-6)
    # normalize="batch": Keras' sum over all 6 elements
    assert _loss(mode, y_true, y_pred, sample_weight=w, normalize="batch") == pytest.approx(
        np.sum(singles) / 6.0, abs=1e-6)
    # gradients finite despite NaN / degenerate boxes in masked slots
    _, grad = _grad(BoxIoULoss(mode=mode), y_true, y_pred, sample_weight=w)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[w == 0] == 0.0)


def test_per_sample_weights_broadcast_over_slots_and_no_weights():
    y_true = np.array([[[0.1, 0.1, 0.4, 0.5], [0.2, 0.2, 0.3, 0.3]],
                       [[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.8, 0.9]]], "float32")
    y_pred = y_true + 0.05
    per_slot = np.asarray(BoxIoULoss("giou", reduction="none")(y_true, y_pred))
    assert _loss("giou", y_true, y_pred) == pytest.approx(per_slot.mean(), abs=1e-6)
    assert _loss("giou", y_true, y_pred, sample_weight=np.array([1.0, 0.0])) == pytest.approx(
        per_slot[0].mean(), abs=1e-6)
    assert float(BoxIoULoss("giou", reduction="sum")(y_true, y_pred)) == pytest.approx(per_slot.sum(), abs=1e-5)


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("mode", BOX_MODES)
def test_gradient_for_disjoint_boxes(mode):
    y_true = [[[0.0, 0.0, 0.2, 0.2]]]
    y_pred = [[[0.5, 0.5, 0.7, 0.7]]]
    _, grad = _grad(BoxIoULoss(mode=mode), y_true, y_pred, sample_weight=np.ones((1, 1), "float32"))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    if mode == "iou":
        # documented: plain IoU has no signal when the boxes do not overlap
        assert np.all(grad == 0.0)
    else:
        assert np.abs(grad).sum() > 1e-3
        # the penalty pulls the prediction towards the target (down-left): positive
        # gradient on the coordinates, so a descent step decreases them
        assert grad[0, 0, 0] > 0 and grad[0, 0, 1] > 0


# ----------------------------------------------------------------- mixed precision
@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("mode", BOX_MODES)
def test_no_nan_under_mixed_precision(mixed_policy, mode):
    dtype = "float16" if mixed_policy == "mixed_float16" else "bfloat16"
    y_true = np.array([[[0.1, 0.1, 0.4, 0.5], [0, 0, 0, 0], [0.5, 0.5, 0.9, 0.7]],
                       [[0, 0, 0, 0], [0.2, 0.3, 0.6, 0.8], [0.001, 0.001, 0.0011, 0.0011]]], "float32")
    y_pred = np.array([[[0.6, 0.6, 0.9, 0.95], [0, 0, 0, 0], [0.1, 0.1, 0.3, 0.3]],
                       [[0.9, 0.9, 0.9, 0.9], [0.25, 0.2, 0.6, 0.7], [0.0, 0.0, 0.0005, 0.0005]]], "float32")
    w = np.array([[1, 0, 1], [0, 1, 1]], "float32")
    loss = BoxIoULoss(mode=mode)
    value, grad = _grad(loss, y_true, y_pred, sample_weight=tf.cast(w, dtype), dtype=dtype)
    assert value.dtype == tf.float32
    assert np.isfinite(float(value)) and np.all(np.isfinite(tf.cast(grad, "float32")))
    ref = float(loss(tf.cast(tf.cast(y_true, dtype), "float32"), tf.cast(tf.cast(y_pred, dtype), "float32"),
                     sample_weight=w))
    assert float(value) == pytest.approx(ref, abs=1e-6)
    zero, zgrad = _grad(loss, y_true, y_pred, sample_weight=tf.zeros((2, 3), dtype), dtype=dtype)
    assert float(zero) == 0.0 and np.all(tf.cast(zgrad, "float32").numpy() == 0.0)


# ----------------------------------------------------------------- config and saving
@pytest.mark.parametrize("mode", BOX_MODES)
def test_config_round_trip_and_serialization(mode):
    loss = BoxIoULoss(mode=mode, eps=1e-6, normalize="batch", name="my_box", reduction="sum")
    config = loss.get_config()
    assert config["mode"] == mode and config["normalize"] == "batch" and config["eps"] == 1e-6
    clone = BoxIoULoss.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, BoxIoULoss) and restored.get_config() == config
    y_true = np.array([[[0.1, 0.1, 0.4, 0.5]]], "float32")
    y_pred = np.array([[[0.2, 0.1, 0.5, 0.4]]], "float32")
    assert float(restored(y_true, y_pred)) == pytest.approx(float(loss(y_true, y_pred)))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        BoxIoULoss(mode="eiou")
    with pytest.raises(ValueError, match="normalize"):
        BoxIoULoss(normalize="slots")
    with pytest.raises(ValueError, match="mode"):
        box_iou(np.zeros((1, 4)), np.zeros((1, 4)), mode="bogus")


def test_get_loss_box_names():
    for mode in BOX_MODES:
        loss = get_loss(mode.upper())
        assert isinstance(loss, BoxIoULoss) and loss.mode == mode
    assert get_loss("giou_loss", normalize="batch").normalize == "batch"


# ----------------------------------------------------------------- inside a Keras model
def _tiny_box_model(num_slots=3):
    inputs = keras.Input((6,))
    raw = keras.layers.Reshape((num_slots, 4))(keras.layers.Dense(num_slots * 4)(inputs))

    def to_xyxy(t):  # centre in (0, 1), size in (0, 0.5): valid boxes by construction
        centre = keras.ops.sigmoid(t[..., :2])
        half = 0.25 * keras.ops.sigmoid(t[..., 2:])
        return keras.ops.concatenate([centre - half, centre + half], axis=-1)

    return keras.Model(inputs, keras.layers.Lambda(to_xyxy, dtype="float32")(raw))


@pytest.mark.parametrize("mode", ["iou", "ciou"])
def test_fit_one_step_with_sample_weight(mode):
    keras.utils.set_random_seed(1)
    model = _tiny_box_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=BoxIoULoss(mode=mode))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    y = np.tile(np.array([[0.1, 0.1, 0.4, 0.5], [0, 0, 0, 0], [0.5, 0.5, 0.8, 0.9]], "float32"), (4, 1, 1))
    w = np.tile(np.array([[1.0, 0.0, 1.0]], "float32"), (4, 1))
    before = [v.copy() for v in model.get_weights()]
    hist = model.fit(x, y, sample_weight=w, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    # the engine's loss equals a direct masked mean on the same (pre-step) predictions
    model.set_weights(before)
    direct = float(BoxIoULoss(mode=mode)(y, model.predict(x, verbose=0), sample_weight=w))
    assert model.evaluate(x, y, sample_weight=w, verbose=0) == pytest.approx(direct, abs=1e-5)
    # a batch without any known box: loss 0, no update, no NaN
    hist = model.fit(x, y, sample_weight=np.zeros_like(w), batch_size=4, epochs=1, verbose=0)
    assert hist.history["loss"][0] == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_saved_model_reloads_loss_and_metric_without_custom_objects(tmp_path):
    inputs = keras.Input((6,))
    outputs = keras.layers.Reshape((2, 4))(keras.layers.Dense(8, activation="sigmoid")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss=BoxIoULoss(mode="diou", normalize="batch"),
                  metrics=[BoxMeanIoU(mode="giou")])
    path = tmp_path / "box.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, BoxIoULoss)
    assert loaded.loss.get_config() == model.loss.get_config()
