"""A batch mixing three sources (figshare-like: class + mask; Kaggle-like: 4 classes, no
masks except the known-empty ones of healthy slices; Br35H-like: generic tumour + mask):
each head's loss equals the per-source losses weighted by their known-target counts, and a
generic tumour trains the class head's tumour-vs-healthy mass only."""
from __future__ import annotations

import numpy as np
import pytest
import keras

from src.data.dataset import mark_healthy_known_empty
from src.data.pipeline import build_dataset
from src.data.records import ClassMap, Record
from src.models.task import MultiTaskModel
from tests.data.fixtures_images import save, slice_image

SIZE = 16


def _network():
    x = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    cls = keras.layers.Dense(4, activation="softmax", name="class")(keras.layers.GlobalAveragePooling2D()(h))
    mask = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(h)
    return keras.Model(x, {"class": cls, "mask": mask})


def _records(tmp_path) -> list[Record]:
    from PIL import Image

    recs, k = [], 0
    spec = {"figshare": [("glioma", True), ("meningioma", True), ("pituitary", True)],
            "kaggle": [("glioma", False), ("no_tumor", False), ("meningioma", False), ("no_tumor", False)],
            "br35h": [("tumor", True), ("tumor", True), (None, False)]}  # the last one unannotated
    for source, items in spec.items():
        for label, has_mask in items:
            img = save(tmp_path / source / f"{k}.png", slice_image(k, size=32))
            mask = None
            if has_mask:
                m = np.zeros((32, 32), np.uint8)
                m[8 + k % 5:20, 6:18 + k % 7] = 255
                mask = str(tmp_path / source / f"{k}_mask.png")
                Image.fromarray(m).save(mask)
            recs.append(Record(image=str(img), label=label, mask=mask, source=source, split="val",
                               known={"label": label is not None, "boxes": False, "mask": has_mask}))
            k += 1
    mark_healthy_known_empty(recs)  # Kaggle's healthy slices: empty mask, known
    return recs


def _losses(model, recs):
    cfg = {"image_size": SIZE, "batch_size": len(recs), "augment": None, "cache": False, "xla": False}
    x, y, w = next(iter(build_dataset(recs, ClassMap(), cfg, training=False, heads=["class", "mask"])))
    values = model.head_loss_values(x, y, model(x, training=False), w)
    counts = {"class": float(np.sum(w["class"]) + (np.sum(w["class_set"]) if "class_set" in w else 0.0)),
              "mask": float(np.sum(w["mask"]))}
    return {h: float(v) for h, v in values.items()}, counts, (x, y, w)


def test_mixed_batch_losses_are_the_known_count_weighted_source_losses(tmp_path):
    keras.utils.set_random_seed(0)
    model = MultiTaskModel(_network(), {"class": "ce", "mask": {"name": "dice_focal"}})
    recs = _records(tmp_path)
    mixed, mixed_counts, _ = _losses(model, recs)
    per = {s: _losses(model, [r for r in recs if r.source == s]) for s in ("figshare", "kaggle", "br35h")}
    assert per["br35h"][1] == {"class": 2.0, "mask": 2.0}   # the unannotated image counts for nothing
    assert per["kaggle"][1] == {"class": 4.0, "mask": 2.0}  # healthy slices: known-empty masks
    for head in ("class", "mask"):
        n = {s: per[s][1][head] for s in per}
        expected = sum(n[s] * per[s][0][head] for s in per) / sum(n.values())
        assert mixed_counts[head] == sum(n.values())
        assert mixed[head] == pytest.approx(expected, rel=1e-5)
        assert len({round(per[s][0][head], 4) for s in per if n[s]}) > 1  # the sources really differ


def test_generic_tumour_class_loss_is_tumour_vs_healthy(tmp_path):
    keras.utils.set_random_seed(1)
    model = MultiTaskModel(_network(), {"class": "ce", "mask": {"name": "dice_focal"}})
    br = [r for r in _records(tmp_path) if r.source == "br35h"]
    values, _, (x, y, w) = _losses(model, br)
    p = model(x, training=False)["class"].numpy()
    known = np.asarray(w["class_set"]) > 0
    expected = -np.log(1.0 - p[known, 3]).mean()  # class 3 = no_tumor
    assert values["class"] == pytest.approx(expected, rel=1e-5)
    # its gradient never prefers a subtype: within the tumour classes each logit's gradient is
    # proportional to its own probability (the within-set odds are not pushed toward any class)
    import tensorflow as tf

    from src.losses.classification import class_set_nll

    z = tf.Variable([[0.3, -1.2, 0.9, 0.1], [2.0, 0.5, -0.4, 1.5]])
    y_set = tf.constant([[1.0, 1.0, 1.0, 0.0]] * 2)
    for from_logits in (False, True):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(class_set_nll(y_set, z if from_logits else tf.nn.softmax(z), from_logits=from_logits))
        g, pz = tape.gradient(loss, z).numpy(), tf.nn.softmax(z).numpy()
        ratio = g[:, :3] / pz[:, :3]
        np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, axis=1), rtol=1e-4)
        assert np.all(ratio < 0) and np.all(g[:, 3] > 0)  # mass leaves no_tumor, enters the set


def test_mixed_batch_metrics_count_known_targets_only(tmp_path):
    """The compiled per-head metrics of a mixed batch see only the records whose target is
    known: class accuracy over the labelled figshare/Kaggle images (not the generic Br35H
    tumours), Dice over the known masks (not Kaggle's tumour images)."""
    from src.training.metrics import head_metrics

    keras.utils.set_random_seed(2)
    model = MultiTaskModel(_network(), {"class": "ce", "mask": {"name": "dice_focal"}})
    recs = _records(tmp_path)
    _, _, (x, y, w) = _losses(model, recs)
    out = model(x, training=False)
    metrics = head_metrics(["class", "mask"], 4)
    for head, ms in metrics.items():
        for m in ms:
            m.update_state(y[head], out[head], sample_weight=w[head])
    known = np.asarray(w["class"]) > 0
    pred = np.asarray(out["class"]).argmax(1)
    assert known.sum() == 7  # 3 figshare + 4 Kaggle
    assert float(metrics["class"][0].result()) == pytest.approx(np.mean(pred[known] == np.asarray(y["class"])[known]))
    mk = np.asarray(w["mask"]) > 0
    pm, tm = np.asarray(out["mask"])[..., 0] >= 0.5, np.asarray(y["mask"])[..., 0] >= 0.5
    inter, tot = (pm & tm).sum((1, 2)), pm.sum((1, 2)) + tm.sum((1, 2))
    dice = np.where(tot > 0, 2 * inter / np.maximum(tot, 1), 1.0)
    assert mk.sum() == 7 and float(metrics["mask"][0].result()) == pytest.approx(dice[mk].mean(), abs=1e-6)
