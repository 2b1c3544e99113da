"""The task model (src/models/task.py): MultiTaskModel.compute_loss, loss balancing, the
split of a model config into builder and task keys, and loading a checkpoint without
src.training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import keras

from src.losses.balancing import LossBalancer
from src.models import create_model
from src.models.task import TASK_KEYS, MultiTaskModel, load_checkpoint, split_model_config


def tiny_network(num_classes=3):
    return create_model("small_cnn", num_classes=num_classes, image_size=16, widths=(4, 8), dropout=0.0)


def batch(n=8, num_classes=3, seed=0, box_weight=1.0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 16, 16, 3), dtype=np.float32)
    lo = rng.uniform(0.0, 0.4, (n, num_classes, 2)).astype("float32")
    y = {"class": rng.integers(0, num_classes, n).astype("int32"),
         "boxes": np.concatenate([lo, lo + 0.3], -1)}
    w = {"class": np.ones(n, "float32"), "boxes": np.full((n, num_classes), box_weight, "float32")}
    return x, y, w


def ds(n=8, **kw):
    x, y, w = batch(n, **kw)
    return tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)


def test_ema_recurrence_matches_numpy():
    bal = LossBalancer(["a", "b"], mode="ema", beta=0.9)
    rng = np.random.default_rng(1)
    seq = rng.uniform(0.1, 5.0, (12, 2)).astype("float32")
    m = None
    for la, lb in seq:
        bal({"a": tf.constant(la), "b": tf.constant(lb)}, training=True)
        m = np.array([la, lb]) if m is None else 0.9 * m + 0.1 * np.array([la, lb])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bal.ema), m, rtol=1e-5)
    # validation (training=False) leaves the state alone
    before = keras.ops.convert_to_numpy(bal.ema).copy()
    total = bal({"a": tf.constant(100.0), "b": tf.constant(100.0)}, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bal.ema), before)
    np.testing.assert_allclose(float(total), 100.0 / m[0] + 100.0 / m[1], rtol=1e-4)


def test_static_and_uncertainty_combination():
    bal = LossBalancer(["a", "b"], mode="static", weights={"a": 2.0, "b": 0.5})
    assert float(bal({"a": tf.constant(1.0), "b": tf.constant(4.0)})) == pytest.approx(4.0)
    unc = LossBalancer(["a", "b"], mode="uncertainty")
    unc.log_vars.assign([0.5, -0.5])
    want = np.exp(-0.5) * 1.0 + 0.5 + np.exp(0.5) * 4.0 - 0.5
    assert float(unc({"a": tf.constant(1.0), "b": tf.constant(4.0)})) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="balancing"):
        LossBalancer(["a"], mode="magic")
    with pytest.raises(ValueError, match="unknown heads"):
        LossBalancer(["a"], weights={"z": 1.0})


def test_uncertainty_log_vars_receive_gradients():
    model = MultiTaskModel(tiny_network(), {"class": "ce", "boxes": "giou"}, balancing="uncertainty")
    x, y, w = batch()
    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        loss = model.compute_loss(x, y, pred, w, training=True)
    grads = tape.gradient(loss, [model.balancer.log_vars])
    assert grads[0] is not None and np.all(np.abs(grads[0].numpy()) > 0)
    assert any(v is model.balancer.log_vars for v in model.trainable_variables)


def test_empty_batch_gives_zero_not_nan():
    model = MultiTaskModel(tiny_network(), {"class": "ce", "boxes": "giou"})
    x, y, w = batch()
    w = {k: np.zeros_like(v) for k, v in w.items()}
    loss = model.compute_loss(x, y, model(x), w)
    assert float(loss) == 0.0


def test_zero_weight_head_is_skipped_and_phase_weights_apply():
    model = MultiTaskModel(tiny_network(), {"class": "ce", "boxes": "giou"}, loss_weights={"class": 0.0})
    assert model.active_heads == ["boxes"]
    x, y, w = batch()
    pred = model(x)
    only_boxes = float(model.compute_loss(x, y, pred, w))
    direct = float(model.head_losses["boxes"](y["boxes"], pred["boxes"], sample_weight=w["boxes"]))
    assert only_boxes == pytest.approx(direct, rel=1e-6)
    model.set_loss_weights({"class": 1.0, "boxes": 2.0})
    both = float(model.compute_loss(x, y, pred, w))
    cls = float(model.head_losses["class"](y["class"], pred["class"], sample_weight=w["class"]))
    assert both == pytest.approx(cls + 2 * direct, rel=1e-5)


def test_losses_for_unknown_heads_rejected():
    with pytest.raises(ValueError, match="does not output"):
        MultiTaskModel(tiny_network(), {"mask": "ce"})


@pytest.mark.parametrize("mode", ["static", "ema", "uncertainty"])
def test_one_step_fit_each_balancing_mode(mode):
    model = MultiTaskModel(tiny_network(), {"class": "ce", "boxes": "ciou"}, balancing=mode)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    hist = model.fit(ds(), epochs=1, verbose=0)
    for k in ("loss", "class_loss", "boxes_loss"):
        assert np.isfinite(hist.history[k][0])


def test_ema_state_survives_evaluate_and_save_load(tmp_path):
    model = MultiTaskModel(tiny_network(), {"class": "ce", "boxes": "giou"}, balancing="ema", ema_beta=0.95)
    model.compile(optimizer="adam", metrics={"class": [keras.metrics.SparseCategoricalAccuracy(name="acc")]})
    model.fit(ds(), epochs=2, verbose=0)
    ema = keras.ops.convert_to_numpy(model.balancer.ema).copy()
    steps = float(model.balancer.ema_steps.numpy())
    assert steps == 4.0 and np.all(ema > 0)
    model.evaluate(ds(seed=3), verbose=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.balancer.ema), ema)
    path = tmp_path / "m.keras"
    model.save(path)
    back = keras.saving.load_model(path)
    assert isinstance(back, MultiTaskModel) and back.balancer.mode == "ema" and back.balancer.beta == 0.95
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(back.balancer.ema), ema)
    x, _, _ = batch(seed=5)
    p1, p2 = model.predict(x, verbose=0), back.predict(x, verbose=0)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], atol=1e-6)


def test_split_model_config_separates_task_keys():
    name, builder, task = split_model_config({"name": "small_cnn", "widths": [4, 8], "losses": {"class": "ce"},
                                              "phases": {}, "balancing": "ema", "dropout": 0.1})
    assert name == "small_cnn" and builder == {"widths": [4, 8], "dropout": 0.1}
    assert set(task) == {"name", "losses", "phases", "balancing"} <= set(TASK_KEYS)
    with pytest.raises(ValueError, match="no name"):
        split_model_config({"widths": [4]})


_LOAD_IN_FRESH_PROCESS = """
import json, sys
import numpy as np
from src.models.task import MultiTaskModel, load_checkpoint
model = load_checkpoint(sys.argv[1])
assert isinstance(model, MultiTaskModel), type(model)
assert getattr(model, "optimizer", None) is None
x = np.load(sys.argv[2])
pred = model.predict(x, verbose=0)
np.savez(sys.argv[3], **pred)
print(json.dumps(sorted(m for m in sys.modules if m == "src.training" or m.startswith("src.training."))))
"""


def test_engine_checkpoint_loads_without_src_training(tmp_path):
    """A checkpoint compiled like the engine compiles it (its weighted head metrics from
    src.training.metrics, a FusedAdamW with a WarmupCosine schedule from src.training.optim)
    loads with compile=False in a process that never imports src.training."""
    from src.training.engine import compile_model
    from src.training.optim import make_optimizer

    model = MultiTaskModel(tiny_network(), {"class": "ce", "boxes": "giou", "boxes_aux1": "dense_box"},
                           balancing="ema")
    opt = make_optimizer({"optimizer": "adamw", "schedule": "cosine", "weight_decay": 1e-4, "clip_norm": 1.0},
                         1e-3, total_steps=4)
    compile_model(model, opt, 3, False)
    model.fit(ds(), epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    assert type(load_checkpoint(path, compile=True).optimizer).__name__ == "FusedAdamW"  # the engine's resume
    x, _, _ = batch(seed=5)
    np.save(tmp_path / "x.npy", x)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(path), str(tmp_path / "x.npy"),
                          str(tmp_path / "pred.npz")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []  # src.training never imported
    want = model.predict(x, verbose=0)
    got = np.load(tmp_path / "pred.npz")
    assert set(got.files) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)

