"""Weighted BCE, class weights, sparse focal / CE: NumPy references, Keras equivalence, masking."""
from __future__ import annotations

import numpy as np
import pytest

import keras
import tensorflow as tf

from src.losses import (
    MaskedSparseCategoricalCrossentropy,
    SparseCategoricalFocalLoss,
    WeightedBinaryCrossentropy,
    class_weights_from_labels,
    get_loss,
    list_losses,
)

EPS = 1e-7


def _np_weighted_bce(y, p, pos, neg, sample_weight=None, from_logits=False, smoothing=0.0, normalize="weights"):
    y = y.astype("float64")
    if smoothing:
        y = y * (1 - smoothing) + 0.5 * smoothing
    if from_logits:
        p = 1.0 / (1.0 + np.exp(-p.astype("float64")))
        log_p, log_1mp = np.log(p), np.log(1 - p)
    else:  # clipped in float32, as the loss (and Keras) does: 1 - 1e-7 rounds to 1 - 1.19e-7
        p = np.clip(p.astype("float32"), np.float32(EPS), np.float32(1 - EPS))
        log_p, log_1mp = np.log(p.astype("float64")), np.log((np.float32(1) - p).astype("float64"))
    per_sample = np.mean(-(np.asarray(pos) * y * log_p + np.asarray(neg) * (1 - y) * log_1mp), axis=-1)
    w = np.ones(len(y)) if sample_weight is None else sample_weight
    denom = w.sum() if normalize == "weights" else len(y)
    return float((per_sample * w).sum() / denom) if denom else 0.0


def _np_focal(labels, probs, gamma, alpha=None):
    p = probs / probs.sum(-1, keepdims=True)
    pt = p[np.arange(len(labels)), labels]
    a = 1.0 if alpha is None else np.asarray(alpha)[labels]
    return a * (1 - pt) ** gamma * -np.log(pt)


@pytest.fixture
def multilabel_data():
    rng = np.random.default_rng(42)
    y = (rng.uniform(size=(16, 4)) < 0.3).astype("float32")
    logits = rng.normal(scale=2.0, size=(16, 4)).astype("float32")
    probs = (1.0 / (1.0 + np.exp(-logits))).astype("float32")
    w = rng.uniform(0.5, 2.0, size=16).astype("float32")
    w[[1, 5, 9]] = 0.0
    return y, logits, probs, w


# ----------------------------------------------------------------- weighted BCE
POS = [2.0, 0.5, 1.5, 3.0]
NEG = [0.6, 1.2, 0.8, 0.4]


@pytest.mark.parametrize("normalize", ["weights", "batch"])
def test_weighted_bce_matches_numpy(multilabel_data, normalize):
    y, logits, probs, w = multilabel_data
    loss = WeightedBinaryCrossentropy(POS, NEG, normalize=normalize)
    got = float(loss(y, probs, sample_weight=w))
    assert got == pytest.approx(_np_weighted_bce(y, probs, POS, NEG, w, normalize=normalize), rel=1e-5)
    logit_loss = WeightedBinaryCrossentropy(POS, NEG, from_logits=True, normalize=normalize)
    assert float(logit_loss(y, logits, sample_weight=w)) == pytest.approx(
        _np_weighted_bce(y, logits, POS, NEG, w, from_logits=True, normalize=normalize), rel=1e-5)


def test_weighted_bce_label_smoothing_and_extreme_probabilities(multilabel_data):
    y, _, probs, _ = multilabel_data
    probs = probs.copy()
    probs[0] = [0.0, 1.0, 0.0, 1.0]          # clipped, never inf
    loss = WeightedBinaryCrossentropy(POS, NEG, label_smoothing=0.1)
    got = float(loss(y, probs))
    assert np.isfinite(got)
    assert got == pytest.approx(_np_weighted_bce(y, probs, POS, NEG, smoothing=0.1), rel=1e-5)


def test_unweighted_bce_equals_keras(multilabel_data):
    y, logits, probs, w = multilabel_data
    ours = WeightedBinaryCrossentropy(normalize="batch")
    keras_bce = keras.losses.BinaryCrossentropy()
    assert float(ours(y, probs)) == pytest.approx(float(keras_bce(y, probs)), rel=1e-5)
    assert float(ours(y, probs, sample_weight=w)) == pytest.approx(
        float(keras_bce(y, probs, sample_weight=w)), rel=1e-5)
    assert float(get_loss("bce", from_logits=True)(y, logits)) == pytest.approx(
        float(keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)), rel=1e-5)


def test_weighted_bce_all_zero_weights_and_mixed_precision(multilabel_data):
    y, logits, _, _ = multilabel_data
    loss = WeightedBinaryCrossentropy(POS, NEG, from_logits=True)
    for dtype in ("float32", "float16", "bfloat16"):
        z = tf.Variable(tf.cast(logits, dtype))
        with tf.GradientTape() as tape:
            value = loss(y, z, sample_weight=np.zeros(16, "float32"))
        grad = tape.gradient(value, z)
        assert value.dtype == tf.float32 and float(value) == 0.0
        assert np.all(tf.cast(grad, "float32").numpy() == 0.0)
        with tf.GradientTape() as tape:
            value = loss(y, z)
        assert value.dtype == tf.float32 and np.isfinite(float(value))
        assert np.all(np.isfinite(tf.cast(tape.gradient(value, z), "float32").numpy()))


def test_weighted_bce_config_round_trip_and_errors():
    loss = WeightedBinaryCrossentropy(np.array(POS), NEG, from_logits=True, label_smoothing=0.05, name="wbce")
    config = loss.get_config()
    assert config["pos_weights"] == POS and all(isinstance(v, float) for v in config["neg_weights"])
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, WeightedBinaryCrossentropy) and restored.get_config() == config
    assert WeightedBinaryCrossentropy.from_config(config).get_config() == config
    with pytest.raises(ValueError):
        WeightedBinaryCrossentropy([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        WeightedBinaryCrossentropy([-1.0], [1.0])
    with pytest.raises(ValueError, match="sample_weight of shape"):
        WeightedBinaryCrossentropy(POS, NEG)(np.zeros((2, 4)), np.full((2, 4), 0.5), sample_weight=np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="per-class"):
        WeightedBinaryCrossentropy([1.0, 2.0], [1.0, 2.0])(np.zeros((2, 3)), np.full((2, 3), 0.5))


# ----------------------------------------------------------------- class weights
def test_class_weights_from_labels_balanced():
    y = np.zeros((8, 4))
    y[:2, 0] = 1     # 2 positives, 6 negatives
    y[:4, 1] = 1     # 4 / 4
    y[:, 3] = 1      # all positive; class 2 has no positive
    with pytest.warns(UserWarning, match=r"\[2, 3\]"):
        pos, neg = class_weights_from_labels(y)
    assert pos == pytest.approx([8 / 4, 8 / 8, 1.0, 8 / 16])
    assert neg == pytest.approx([8 / 12, 8 / 8, 8 / 16, 1.0])
    assert all(isinstance(v, float) for v in pos + neg)
    # both sides carry the same total weight N/2 where both exist
    assert pos[0] * 2 == pytest.approx(neg[0] * 6) == pytest.approx(4.0)
    with pytest.warns(UserWarning):
        pos_s, neg_s = class_weights_from_labels(y, mode="sqrt")
    assert pos_s == pytest.approx(np.sqrt(pos)) and neg_s == pytest.approx(np.sqrt(neg))
    assert class_weights_from_labels(y, mode="none") == ([1.0] * 4, [1.0] * 4)


def test_class_weights_from_labels_mask_and_errors():
    y = np.array([[1, 0], [0, 1], [1, 1], [-1, -1]])
    pos, neg = class_weights_from_labels(y, mask=[1, 1, 1, 0])
    assert pos == pytest.approx([3 / 4, 3 / 4]) and neg == pytest.approx([3 / 2, 3 / 2])
    with pytest.raises(ValueError, match="0 and 1"):
        class_weights_from_labels(y)
    with pytest.raises(ValueError, match="2-D"):
        class_weights_from_labels(np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="at least one"):
        class_weights_from_labels(y, mask=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="mode"):
        class_weights_from_labels(y[:3], mode="inverse")
    # feeds straight into the loss and the factory
    loss = get_loss("weighted_bce", pos_weights=pos, neg_weights=neg)
    assert isinstance(loss, WeightedBinaryCrossentropy) and loss.pos_weights == pos


# ----------------------------------------------------------------- sparse focal / CE
@pytest.fixture
def softmax_data():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=2.0, size=(12, 4)).astype("float32")
    probs = tf.nn.softmax(logits).numpy()
    labels = rng.integers(0, 4, size=12)
    w = rng.uniform(0.5, 2.0, size=12).astype("float32")
    w[[0, 3]] = 0.0
    return labels, logits, probs, w


def test_focal_gamma_zero_equals_keras_sparse_ce(softmax_data):
    labels, logits, probs, w = softmax_data
    for from_logits, pred in ((False, probs), (True, logits)):
        ref = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        focal = SparseCategoricalFocalLoss(gamma=0.0, from_logits=from_logits, normalize="batch")
        assert float(focal(labels, pred)) == pytest.approx(float(ref(labels, pred)), rel=1e-5)
        assert float(focal(labels, pred, sample_weight=w)) == pytest.approx(
            float(ref(labels, pred, sample_weight=w)), rel=1e-5)
        # masked mean: sum(w l) / sum(w)
        per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction="none")(labels, pred)
        ce = MaskedSparseCategoricalCrossentropy(from_logits=from_logits)
        assert float(ce(labels[:, None], pred, sample_weight=w)) == pytest.approx(
            float(np.sum(per_sample * w) / np.sum(w)), rel=1e-5)


def test_label_smoothing_equals_keras(softmax_data):
    labels, logits, probs, w = softmax_data
    for from_logits, pred in ((False, probs), (True, logits)):
        ref = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.1)
        ours = MaskedSparseCategoricalCrossentropy(from_logits=from_logits, label_smoothing=0.1, normalize="batch")
        assert float(ours(labels, pred, sample_weight=w)) == pytest.approx(
            float(ref(np.eye(4)[labels], pred, sample_weight=w)), rel=1e-5)
    # it survives the config round trip; out-of-range values are refused
    again = MaskedSparseCategoricalCrossentropy.from_config(
        MaskedSparseCategoricalCrossentropy(label_smoothing=0.2).get_config())
    assert again.label_smoothing == 0.2
    with pytest.raises(ValueError, match="label_smoothing"):
        MaskedSparseCategoricalCrossentropy(label_smoothing=1.0)


def test_focal_matches_numpy_and_keras_focal(softmax_data):
    labels, logits, probs, _ = softmax_data
    alpha = [0.25, 0.5, 1.0, 2.0]
    got = SparseCategoricalFocalLoss(gamma=2.0, alpha=alpha, reduction="none")(labels, probs)
    np.testing.assert_allclose(np.asarray(got), _np_focal(labels, probs, 2.0, alpha), rtol=1e-4, atol=1e-7)
    got = SparseCategoricalFocalLoss(gamma=1.5, from_logits=True, reduction="none")(labels, logits)
    np.testing.assert_allclose(np.asarray(got), _np_focal(labels, probs, 1.5), rtol=1e-4, atol=1e-7)
    keras_focal = keras.losses.CategoricalFocalCrossentropy(alpha=0.25, gamma=2.0)
    ours = SparseCategoricalFocalLoss(gamma=2.0, alpha=0.25, normalize="batch")
    assert float(ours(labels, probs)) == pytest.approx(float(keras_focal(np.eye(4)[labels], probs)), rel=1e-4)


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_sparse_losses_all_zero_weights(softmax_data, name):
    labels, logits, _, _ = softmax_data
    labels = labels.copy()
    labels[:4] = -1                                   # unknown labels in masked rows are harmless
    loss = get_loss(name, from_logits=True)
    for dtype in ("float32", "float16", "bfloat16"):
        z = tf.Variable(tf.cast(logits, dtype))
        with tf.GradientTape() as tape:
            value = loss(labels, z, sample_weight=np.zeros(12, "float32"))
        grad = tape.gradient(value, z)
        assert value.dtype == tf.float32 and float(value) == 0.0
        assert np.all(tf.cast(grad, "float32").numpy() == 0.0)
    w = np.ones(12, "float32")
    w[:4] = 0.0
    full = float(loss(labels[4:], logits[4:]))
    assert float(loss(labels, logits, sample_weight=w)) == pytest.approx(full, rel=1e-5)


def test_sparse_losses_config_round_trip():
    for loss in (SparseCategoricalFocalLoss(gamma=1.0, alpha=[1.0, 2.0], from_logits=True, normalize="batch"),
                 MaskedSparseCategoricalCrossentropy(class_weights=[0.5, 2.0], name="sub_ce")):
        config = loss.get_config()
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(restored) is type(loss) and restored.get_config() == config
        assert type(loss).from_config(config).get_config() == config
    with pytest.raises(ValueError):
        SparseCategoricalFocalLoss(gamma=-1.0)


def test_get_loss_factory():
    assert set(list_losses()) >= {"iou", "giou", "diou", "ciou", "bce", "weighted_bce", "ce", "focal"}
    assert isinstance(get_loss("bce"), WeightedBinaryCrossentropy)
    assert isinstance(get_loss("ce"), MaskedSparseCategoricalCrossentropy)
    focal = get_loss("focal", gamma=3.0)
    assert isinstance(focal, SparseCategoricalFocalLoss) and focal.gamma == 3.0
    instance = get_loss("ce")
    assert get_loss(instance) is instance
    with pytest.raises(ValueError, match="pos_weights"):
        get_loss("weighted_bce")
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("dice_of_doom")


def test_masked_subtype_loss_in_fit():
    """A subtype head whose loss ignores healthy slices (weight 0) trains without NaN."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss=get_loss("focal", gamma=2.0))
    x = np.random.default_rng(1).normal(size=(8, 5)).astype("float32")
    y = np.array([0, 1, 2, -1, -1, 0, 1, -1])
    w = (y >= 0).astype("float32")
    hist = model.fit(x, y, sample_weight=w, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0]) and hist.history["loss"][0] > 0
    hist = model.fit(x, y, sample_weight=np.zeros(8, "float32"), batch_size=8, epochs=1, verbose=0)
    assert hist.history["loss"][0] == 0.0


def test_saved_model_reloads_weighted_bce_without_custom_objects(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="sigmoid")(inputs))
    model.compile(optimizer="sgd", loss=WeightedBinaryCrossentropy(POS, NEG, label_smoothing=0.1))
    path = tmp_path / "wbce.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, WeightedBinaryCrossentropy)
    assert loaded.loss.pos_weights == POS and loaded.loss.neg_weights == NEG
