"""Dice / focal / Dice+focal losses and the mask metrics against numpy references."""
from __future__ import annotations

import numpy as np
import pytest

import keras
import tensorflow as tf

from src.evaluation.metrics import dice_iou
from src.losses import BinaryFocalLoss, DiceFocalLoss, DiceLoss, get_loss
from src.training.metrics import DiceScore, MaskIoU, head_metrics

EPS = 1e-7


# ---------------------------------------------------------------- numpy references
def np_dice(t, p, smooth=1.0):
    axes = tuple(range(1, t.ndim))
    return (2 * (t * p).sum(axes) + smooth) / (t.sum(axes) + p.sum(axes) + smooth)


def np_dice_loss(t, p, smooth=1.0, include_background=False):
    d = np_dice(t, p, smooth)
    if include_background:
        d = 0.5 * (d + np_dice(1 - t, 1 - p, smooth))
    return 1.0 - d


def np_focal(t, p, alpha=0.25, gamma=2.0):
    p = np.clip(p, EPS, 1 - EPS)
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, alpha, 1 - alpha) if alpha is not None else 1.0
    return (-at * (1 - pt) ** gamma * np.log(pt)).mean(axis=tuple(range(1, t.ndim)))


def masked_mean(v, w):
    return float((v * w).sum() / w.sum()) if w.sum() > 0 else 0.0


def batch(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    t = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        r, c, h = rng.integers(0, size // 2, 3)
        t[i, r: r + h + 2, c: c + h + 2] = 1.0
    t[-1] = 0.0  # a known-empty mask (a healthy slice)
    p = rng.uniform(0.01, 0.99, t.shape).astype(np.float32)
    return t, p


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("include_background", [False, True])
def test_dice_focal_matches_numpy(include_background):
    t, p = batch()
    w = np.array([1, 1, 0, 1], np.float32)
    loss = DiceFocalLoss(dice_weight=0.7, focal_weight=1.3, include_background=include_background)
    expect = 0.7 * np_dice_loss(t, p, include_background=include_background) + 1.3 * np_focal(t, p)
    assert float(loss(t, p, sample_weight=w)) == pytest.approx(masked_mean(expect, w), rel=1e-5)
    dice = DiceLoss(include_background=include_background)
    assert float(dice(t, p)) == pytest.approx(np_dice_loss(t, p, include_background=include_background).mean(),
                                              rel=1e-5)


def test_background_inclusive_dice_looks_better_than_it_is():
    # predicting nothing on a slice with a small tumour: foreground Dice ~0, with background ~0.5
    t = np.zeros((1, 32, 32, 1), np.float32)
    t[0, 10:14, 10:14] = 1.0
    p = np.zeros_like(t)
    fg = float(DiceLoss(smooth=1e-6)(t, p))
    with_bg = float(DiceLoss(smooth=1e-6, include_background=True)(t, p))
    assert fg == pytest.approx(1.0, abs=1e-4) and with_bg < 0.52


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (None, 0.0), (0.5, 1.0)])
def test_binary_focal_matches_numpy(alpha, gamma):
    t, p = batch(seed=1)
    loss = BinaryFocalLoss(alpha=alpha, gamma=gamma)
    assert float(loss(t, p)) == pytest.approx(np_focal(t, p, alpha, gamma).mean(), rel=1e-5)
    if alpha is None and gamma == 0.0:  # plain BCE
        bce = keras.losses.BinaryCrossentropy()(t, p)
        assert float(loss(t, p)) == pytest.approx(float(bce), rel=1e-4)


def test_from_logits_equals_probabilities():
    t, p = batch(seed=2)
    logits = np.log(p / (1 - p)).astype(np.float32)
    a = DiceFocalLoss()(t, p)
    b = DiceFocalLoss(from_logits=True)(t, logits)
    assert float(a) == pytest.approx(float(b), rel=1e-4)


def test_empty_mask_with_empty_prediction_is_zero_not_nan():
    t = np.zeros((2, 8, 8, 1), np.float32)
    p = np.zeros_like(t)
    assert float(DiceLoss()(t, p)) == pytest.approx(0.0, abs=1e-6)
    v = float(DiceFocalLoss()(t, p))
    assert np.isfinite(v) and v == pytest.approx(0.0, abs=1e-5)


def test_all_weights_zero_gives_zero_and_finite_gradient():
    t, p = batch()
    t[0, 0, 0, 0] = np.nan  # an unknown mask may hold anything
    var = tf.Variable(p)
    with tf.GradientTape() as tape:
        value = DiceFocalLoss()(t, var, sample_weight=np.zeros(4, np.float32))
    g = tape.gradient(value, var)
    assert float(value) == 0.0
    assert g is not None, "no gradient path from the loss to the predictions"
    assert np.all(np.isfinite(g.numpy())) and not np.any(g.numpy())  # it flows, finite and exactly 0
    # one known mask: that image gets a (finite, non-zero) gradient, the others exactly 0
    with tf.GradientTape() as tape:
        value = DiceFocalLoss()(t, var, sample_weight=np.array([0, 1, 0, 0], np.float32))
    g = tape.gradient(value, var).numpy()
    assert np.isfinite(float(value)) and np.all(np.isfinite(g))
    assert np.abs(g[1]).max() > 0 and not np.any(g[[0, 2, 3]])


def test_masked_samples_do_not_count():
    t, p = batch()
    w = np.array([1, 0, 1, 1], np.float32)
    t2 = t.copy()
    t2[1] = 1.0 - t2[1]  # garbage under weight 0
    a = float(DiceFocalLoss()(t, p, sample_weight=w))
    b = float(DiceFocalLoss()(t2, p, sample_weight=w))
    assert a == pytest.approx(b, rel=1e-6)


def test_mixed_precision_inputs_compute_in_float32():
    t, p = batch()
    v16 = DiceFocalLoss()(tf.cast(t, tf.float16), tf.cast(p, tf.float16))
    assert v16.dtype == tf.float32
    assert float(v16) == pytest.approx(float(DiceFocalLoss()(t, tf.cast(tf.cast(p, tf.float16), tf.float32))),
                                       rel=1e-5)


def test_registry_names_and_config_round_trip():
    for name, cls in (("dice", DiceLoss), ("binary_focal", BinaryFocalLoss), ("dice_focal", DiceFocalLoss)):
        assert isinstance(get_loss(name), cls)
    loss = get_loss("dice_focal", dice_weight=0.5, focal_weight=0.5, include_background=True, alpha=None, gamma=1.0)
    back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    t, p = batch()
    assert float(back(t, p)) == pytest.approx(float(loss(t, p)), rel=1e-7)
    assert back.get_config()["include_background"] is True


@pytest.mark.parametrize("bad", [dict(smooth=0.0), dict(alpha=1.5), dict(gamma=-1.0)])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        DiceFocalLoss(**bad)


# ---------------------------------------------------------------- metrics
def np_hard_scores(t, p, thr=0.5, include_background=False):
    """Per-image hard (Dice, IoU) from the library's numpy implementation."""
    out = []
    for a, b in zip(t > 0.5, p >= thr):
        d, i = dice_iou(b, a)
        if include_background:
            d2, i2 = dice_iou(~b, ~a)
            d, i = (d + d2) / 2, (i + i2) / 2
        out.append((d, i))
    return np.array(out)


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_and_iou_metrics_match_numpy(include_background):
    t, p = batch(seed=3)
    p[-1] = 0.0  # empty truth, empty prediction: scores 1
    w = np.array([1, 0, 1, 1], np.float32)
    ref = np_hard_scores(t, p, include_background=include_background)
    dice, iou = DiceScore(include_background=include_background), MaskIoU(include_background=include_background)
    # two updates: the metric accumulates per image over batches
    for m in (dice, iou):
        m.update_state(t[:2], p[:2], sample_weight=w[:2])
        m.update_state(t[2:], p[2:], sample_weight=w[2:])
    assert float(dice.result()) == pytest.approx(masked_mean(ref[:, 0], w), rel=1e-5)
    assert float(iou.result()) == pytest.approx(masked_mean(ref[:, 1], w), rel=1e-5)
    assert dice.name == ("dice_with_bg" if include_background else "dice")
    assert iou.name == ("iou_with_bg" if include_background else "iou")


def test_metric_with_no_known_masks_is_zero_and_head_metrics_has_them():
    t, p = batch()
    m = DiceScore()
    m.update_state(t, p, sample_weight=np.zeros(4, np.float32))
    assert float(m.result()) == 0.0
    names = [x.name for x in head_metrics(["mask", "mask_aux1"], 3)["mask"]]
    assert names == ["dice", "iou"] and "mask_aux1" not in head_metrics(["mask_aux1"], 3)


def test_ignore_empty_scores_tumour_slices_only():
    t, p = batch(seed=4)
    p[-1] = 0.0  # the empty-mask image is predicted empty: 1 unless ignored
    ref = np_hard_scores(t, p)[:, 0]
    m = DiceScore(ignore_empty=True)
    m.update_state(t, p)
    assert float(m.result()) == pytest.approx(ref[:-1].mean(), rel=1e-5)
    back = DiceScore.from_config(m.get_config())
    assert back.ignore_empty and back.name == "dice"
