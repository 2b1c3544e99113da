"""The dense box head (heat + box maps, soft arg-max per slot) and its training loss."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from src.losses import DenseBoxLoss, box_iou, get_loss
from src.losses.box import cell_centres, dense_boxes
from src.models import create_model
from src.models.heads import DenseBoxDecode
from src.training.engine import weights_for
from src.models.task import MultiTaskModel, load_checkpoint


def _logit(p):
    return np.log(p / (1 - p))


def test_cells_and_their_boxes():
    cx, cy = (keras.ops.convert_to_numpy(v) for v in cell_centres(2, 4))
    np.testing.assert_allclose(cx[0], [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(cy[:, 0], [0.25, 0.75])
    dist = np.full((1, 2, 4, 4), _logit(0.1), "float32")
    boxes = keras.ops.convert_to_numpy(dense_boxes(dist))
    np.testing.assert_allclose(boxes[0, 1, 2], [0.525, 0.65, 0.725, 0.85], atol=1e-6)


def test_decode_peaked_heat_gives_that_cells_box_and_boxes_are_valid():
    rng = np.random.default_rng(0)
    heat = np.full((2, 4, 4, 1), -20.0, "float32")
    heat[0, 1, 2, 0] = 20.0                       # image 0: all weight on cell (row 1, col 2)
    heat[1] = rng.normal(size=(4, 4, 1))          # image 1: spread out
    dist = rng.normal(scale=3.0, size=(2, 4, 4, 4)).astype("float32")
    out = keras.ops.convert_to_numpy(DenseBoxDecode(3)([heat, dist]))
    assert out.shape == (2, 3, 4)
    cell = keras.ops.convert_to_numpy(dense_boxes(dist))[0, 1, 2]
    np.testing.assert_allclose(out[0, 0], np.clip(cell, 0, 1), atol=1e-5)
    np.testing.assert_allclose(out[:, 0], out[:, 2])  # shared heat: every slot the same box
    assert np.all(out[..., 2] > out[..., 0]) and np.all(out[..., 3] > out[..., 1])
    per_slot = keras.ops.convert_to_numpy(DenseBoxDecode(3)([np.tile(heat, (1, 1, 1, 3)) * [1, -1, 1], dist]))
    assert not np.allclose(per_slot[1, 0], per_slot[1, 1])  # per-slot maps decode separately


def _gauss_logits(box, h, w, sigma):
    """Heat logits = log of the loss's own target distribution for ``box``."""
    cx, cy = (keras.ops.convert_to_numpy(v) for v in cell_centres(h, w))
    tx, ty = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sx, sy = max(sigma * (box[2] - box[0]), 0.5 / w), max(sigma * (box[3] - box[1]), 0.5 / h)
    return -((cx - tx) ** 2 / (2 * sx ** 2) + (cy - ty) ** 2 / (2 * sy ** 2))


def test_dense_loss_heat_term_is_the_kl_divergence():
    h = w = 6
    box = np.array([0.2, 0.3, 0.6, 0.7], "float32")
    y = np.tile(box, (1, 2, 1))                                   # [1, 2, 4]
    dist = np.zeros((1, h, w, 4), "float32")
    target = _gauss_logits(box, h, w, 0.15)
    loss = DenseBoxLoss(box_weight=0.0, sigma=0.15, reduction="none")
    exact = np.concatenate([target[None, :, :, None], dist], -1)
    assert np.allclose(keras.ops.convert_to_numpy(loss(y, exact, np.ones((1, 2)))), 0.0, atol=1e-5)
    rng = np.random.default_rng(1)
    heat = rng.normal(size=(h, w))
    got = keras.ops.convert_to_numpy(loss(y, np.concatenate([heat[None, :, :, None], dist], -1).astype("float32"),
                                          np.ones((1, 2))))
    q = np.exp(target - target.max()); q /= q.sum()
    p = np.exp(heat - heat.max()); p /= p.sum()
    kl = float(np.sum(q * (np.log(q) - np.log(p))))
    np.testing.assert_allclose(got, [[kl, kl]], rtol=1e-4)


def test_dense_loss_box_term_and_masking():
    h = w = 4
    y = np.array([[[0.1, 0.1, 0.9, 0.9], [np.nan, 0, 0, 0]]], "float32")   # slot 1 unknown (NaN inside)
    wts = np.array([[1.0, 0.0]], "float32")
    heat = np.zeros((1, h, w, 1), "float32")
    # distances that make every cell's box exactly the true box: l = cx - 0.1, ...
    cx, cy = (keras.ops.convert_to_numpy(v) for v in cell_centres(h, w))
    d = np.stack([cx - 0.1, cy - 0.1, 0.9 - cx, 0.9 - cy], -1)
    exact = np.concatenate([heat, _logit(d)[None].astype("float32")], -1)
    loss = DenseBoxLoss(heat_weight=0.0)
    assert float(loss(y, exact, wts)) == pytest.approx(0.0, abs=1e-4)
    worse = np.concatenate([heat, np.full((1, h, w, 4), _logit(0.05), "float32")], -1)
    assert float(loss(y, worse, wts)) > 0.5
    # all slots unknown: exactly 0 with a finite zero gradient
    var = tf.Variable(worse)
    with tf.GradientTape() as tape:
        value = loss(y, var, np.zeros((1, 2), "float32"))
    g = tape.gradient(value, var)
    assert float(value) == 0.0 and np.all(np.isfinite(g.numpy())) and not np.any(g.numpy())
    assert isinstance(get_loss("dense_box", sigma=0.2), DenseBoxLoss)
    with pytest.raises(ValueError, match="sigma"):
        DenseBoxLoss(sigma=0)


def test_small_cnn_dense_head_trains_towards_the_box_and_round_trips(tmp_path):
    """One fixed bright square: a few dozen steps of the dense head move the decoded box
    onto it (IoU far above the initial guess); save -> load keeps the outputs."""
    keras.utils.set_random_seed(0)
    net = create_model("small_cnn", num_classes=2, image_size=32, widths=(8, 16, 16), heads=("boxes",))
    assert set(net.output) == {"boxes", "boxes_aux1"}
    model = MultiTaskModel(net, {"boxes": {"name": "giou", "l1_weight": 1.0}, "boxes_aux1": "dense_box"})
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    x = np.zeros((8, 32, 32, 3), "float32")
    x[:, 4:16, 16:28] = 1.0
    box = np.array([16 / 32, 4 / 32, 28 / 32, 16 / 32], "float32")
    y = {"boxes": np.tile(box, (8, 2, 1))}
    w = {"boxes": np.tile([1.0, 0.0], (8, 1)).astype("float32")}
    before = float(np.mean(keras.ops.convert_to_numpy(box_iou(model.predict(x, verbose=0)["boxes"][:, 0], box))))
    model.fit(tf.data.Dataset.from_tensors((x, y, w)).repeat(60), epochs=1, verbose=0)
    pred = model.predict(x, verbose=0)
    after = float(np.mean(keras.ops.convert_to_numpy(box_iou(pred["boxes"][:, 0], box))))
    assert after > 0.6 and after > before + 0.3
    infer = model.inference_model()
    assert set(infer.output) == {"boxes"}                 # the maps are training-only
    model.save(tmp_path / "m.keras")
    back = load_checkpoint(tmp_path / "m.keras")
    np.testing.assert_allclose(back.predict(x, verbose=0)["boxes"], pred["boxes"], atol=1e-6)
    flat = create_model("small_cnn", num_classes=2, image_size=32, widths=(8, 16), box_head="flat")
    assert set(flat.output) == {"class", "boxes"}
    with pytest.raises(ValueError, match="box_head"):
        create_model("small_cnn", num_classes=2, image_size=32, widths=(8, 16), box_head="anchors")


def test_aux_heads_follow_their_head_in_phase_weights():
    heads = ["class", "boxes", "boxes_aux1", "mask", "mask_aux1"]
    defaults = {"boxes_aux1": 0.5, "mask_aux1": 0.2}
    assert weights_for({"class": 1.0, "boxes": 0.0}, heads, defaults) == {"class": 1.0, "boxes": 0.0,
                                                                          "boxes_aux1": 0.0}
    assert weights_for({"boxes": 2.0, "mask": 1.0, "mask_aux1": 0.3}, heads, defaults) == {
        "boxes": 2.0, "boxes_aux1": 0.5, "mask": 1.0, "mask_aux1": 0.3}
