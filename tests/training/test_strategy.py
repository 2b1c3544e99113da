"""Distribution strategies: names, errors, and mirrored == single device (2 logical CPUs).

The mirrored checks run in a subprocess because logical CPU devices must be configured
before TensorFlow initialises its devices (pytest's process has long done so).

What the subprocess establishes (R = 2 replicas, one global batch of 8, split 4 + 4):

* plain Keras loss: loss and one SGD step under ``MirroredStrategy`` equal the single
  device ones (within 1e-5);
* masked mean ``sum(w*l) / sum(w)`` in a custom ``compute_loss`` (dict targets, dict
  sample weights): under mirrored the effective loss is the **mean over replicas of the
  per-replica masked means**, ``(1/R) sum_r [sum_{i in r} w_i l_i / sum_{i in r} w_i]``,
  *not* the global masked mean. They agree only when every replica holds the same total
  weight per head; a replica whose weights are all 0 contributes 0 (and halves that
  head's loss and gradient for R = 2);
* a hand-written ``compute_loss`` must divide by ``R`` (as Keras losses do internally):
  without it the gradients (summed over replicas) are exactly ``R`` times too large,
  and the reported loss is ``R`` times the mean of the per-replica values;
* a compiled Keras loss with ``reduction="mean_with_sample_weight"`` behaves like the
  correctly scaled hand-written masked mean (mean of per-replica masked means).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from src.training.strategy import (STRATEGIES, configure_logical_cpus, describe_strategy,
                                   get_strategy)

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["KERAS_BACKEND"] = "tensorflow"
    from src.training.strategy import configure_logical_cpus, get_strategy, describe_strategy
    cpus = configure_logical_cpus(2)
    import numpy as np
    import tensorflow as tf
    import keras
    from keras import ops

    R = 2
    single = get_strategy("default")
    mirrored = get_strategy("mirrored")
    out = {"cpus": cpus, "describe": describe_strategy(mirrored),
           "replicas": int(mirrored.num_replicas_in_sync)}

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 1)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    ya = rng.normal(size=(8, 1)).astype("float32")
    yb = rng.normal(size=(8, 1)).astype("float32")

    def net(dict_out):
        keras.utils.set_random_seed(0)
        i = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(3, 3, activation="tanh")(i)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(4, activation="tanh")(h)
        if not dict_out:
            return keras.Model(i, keras.layers.Dense(1)(h))
        return keras.Model(i, {"a": keras.layers.Dense(1, name="a")(h), "b": keras.layers.Dense(1, name="b")(h)})

    def one_step(strategy, build, data, init):
        """Loss at the initial weights (fit reports it for a single batch) and the SGD update."""
        with strategy.scope():
            model, net_ = build()
            net_.set_weights(init)
        hist = model.fit(data, epochs=1, verbose=0, shuffle=False)
        delta = [a - b for a, b in zip(net_.get_weights(), init)]
        return float(hist.history["loss"][0]), delta

    def maxdiff(d1, d2, scale=1.0):
        return float(max(np.abs(a - scale * b).max() for a, b in zip(d1, d2)))

    def maxabs(d):
        return float(max(np.abs(a).max() for a in d))

    # ---------------------------------------------------------------- plain Keras loss
    init = net(False).get_weights()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    def build_plain():
        n = net(False)
        n.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return n, n

    l1, d1 = one_step(single, build_plain, ds, init)
    l2, d2 = one_step(mirrored, build_plain, ds, init)
    out["plain"] = {"loss_single": l1, "loss_mirrored": l2, "update_diff": maxdiff(d1, d2),
                    "update_size": maxabs(d1)}

    # ---------------------------------------------------------------- masked mean
    def masked_mean(l, w):
        return ops.divide_no_nan(ops.sum(w * l), ops.sum(w))

    class Masked(keras.Model):
        """mode: global (sum w l / sum w over the replica's batch, scaled by 1/R like Keras
        losses), raw (same without the 1/R), per_replica (explicit mean over the R halves of
        the batch of their masked means; meant for a single device)."""

        def __init__(self, mode, **kw):
            super().__init__(**kw)
            self.mode = mode
            self.net = net(True)

        def call(self, x):
            return self.net(x)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            total = 0.0
            for h in ("a", "b"):
                l = ops.mean(ops.square(y[h] - y_pred[h]), axis=-1)
                w = sample_weight[h]
                if self.mode == "per_replica":
                    n = ops.shape(l)[0] // R
                    total = total + sum(masked_mean(l[r * n:(r + 1) * n], w[r * n:(r + 1) * n])
                                        for r in range(R)) / R
                else:
                    total = total + masked_mean(l, w)
            if self.mode != "raw":
                total = total / tf.distribute.get_strategy().num_replicas_in_sync
            return total

    init_d = net(True).get_weights()

    def build_masked(mode):
        def build():
            m = Masked(mode)
            m.compile(optimizer=keras.optimizers.SGD(0.1))
            return m, m.net
        return build

    def build_compiled():
        n = net(True)
        n.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss={h: keras.losses.MeanSquaredError(reduction="mean_with_sample_weight")
                        for h in ("a", "b")})
        return n, n

    def data(wa, wb):
        wa, wb = np.asarray(wa, "float32"), np.asarray(wb, "float32")
        return tf.data.Dataset.from_tensor_slices((x, {"a": ya, "b": yb}, {"a": wa, "b": wb})).batch(8)

    # uneven: head a has 4 valid samples on replica 0 and 1 on replica 1;
    # head b has none on replica 0 and 3 on replica 1
    uneven = data([1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 1])
    lg, dg = one_step(single, build_masked("global"), uneven, init_d)
    lp, dp = one_step(single, build_masked("per_replica"), uneven, init_d)
    lm, dm = one_step(mirrored, build_masked("global"), uneven, init_d)
    lr, dr = one_step(mirrored, build_masked("raw"), uneven, init_d)
    lk, dk = one_step(mirrored, build_compiled, uneven, init_d)

    # numpy reference from the initial predictions
    p = net(True)
    p.set_weights(init_d)
    pred = p.predict(x, verbose=0)
    la = ((ya - pred["a"]) ** 2).mean(-1)
    lb = ((yb - pred["b"]) ** 2).mean(-1)
    wa = np.array([1, 1, 1, 1, 1, 0, 0, 0], "float32")
    wb = np.array([0, 0, 0, 0, 1, 1, 0, 1], "float32")

    def np_masked(l, w):
        return float((w * l).sum() / w.sum()) if w.sum() > 0 else 0.0

    glob = np_masked(la, wa) + np_masked(lb, wb)
    per = sum(np_masked(l[r * 4:(r + 1) * 4], w[r * 4:(r + 1) * 4])
              for l, w in ((la, wa), (lb, wb)) for r in range(R)) / R
    out["uneven"] = {
        "numpy_global": glob, "numpy_per_replica": per,
        "loss_single_global": lg, "loss_single_per_replica": lp,
        "loss_mirrored": lm, "loss_mirrored_raw": lr, "loss_mirrored_compiled": lk,
        "diff_mirrored_vs_single_per_replica": maxdiff(dm, dp),
        "diff_mirrored_vs_single_global": maxdiff(dm, dg),
        "diff_raw_vs_R_times_mirrored": maxdiff(dr, dm, scale=R),
        "diff_compiled_vs_single_per_replica": maxdiff(dk, dp),
        "update_size": maxabs(dg),
    }

    # even: every replica holds the same total weight per head -> global masked mean
    even = data([1, 0, 1, 0, 0, 1, 0, 1], [1, 1, 1, 0, 1, 0, 1, 1])
    le1, de1 = one_step(single, build_masked("global"), even, init_d)
    le2, de2 = one_step(mirrored, build_masked("global"), even, init_d)
    out["even"] = {"loss_single": le1, "loss_mirrored": le2, "update_diff": maxdiff(de1, de2),
                   "update_size": maxabs(de1)}
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    script = tmp_path_factory.mktemp("strategy") / "mirrored_vs_single.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


TOL = 1e-5


def test_two_logical_cpus_make_two_replicas(mirrored_results):
    r = mirrored_results
    assert r["replicas"] == 2 and len(r["cpus"]) == 2
    assert r["describe"].startswith("MirroredStrategy: 2 replicas")


def test_plain_loss_mirrored_equals_single_device(mirrored_results):
    r = mirrored_results["plain"]
    assert r["update_size"] > 1e-3  # the step really moved the weights
    assert abs(r["loss_single"] - r["loss_mirrored"]) < TOL
    assert r["update_diff"] < TOL


def test_masked_mean_under_mirrored_is_mean_of_per_replica_masked_means(mirrored_results):
    r = mirrored_results["uneven"]
    # single device: the hand-written losses compute what they say
    assert r["loss_single_global"] == pytest.approx(r["numpy_global"], abs=TOL)
    assert r["loss_single_per_replica"] == pytest.approx(r["numpy_per_replica"], abs=TOL)
    # ...and with uneven weights the two definitions really differ
    assert abs(r["numpy_global"] - r["numpy_per_replica"]) > 1e-2
    # mirrored: loss and update are those of the mean of per-replica masked means
    assert r["loss_mirrored"] == pytest.approx(r["numpy_per_replica"], abs=TOL)
    assert r["diff_mirrored_vs_single_per_replica"] < TOL
    assert r["diff_mirrored_vs_single_global"] > 1e-3
    # a compiled Keras loss with mean_with_sample_weight does the same
    assert r["loss_mirrored_compiled"] == pytest.approx(r["numpy_per_replica"], abs=TOL)
    assert r["diff_compiled_vs_single_per_replica"] < TOL


def test_unscaled_compute_loss_gives_R_times_the_gradient(mirrored_results):
    r = mirrored_results["uneven"]
    assert r["diff_raw_vs_R_times_mirrored"] < TOL
    assert r["loss_mirrored_raw"] == pytest.approx(2 * r["numpy_per_replica"], abs=2 * TOL)


def test_masked_mean_with_equal_weight_per_replica_matches_global(mirrored_results):
    r = mirrored_results["even"]
    assert r["update_size"] > 1e-3
    assert abs(r["loss_single"] - r["loss_mirrored"]) < TOL
    assert r["update_diff"] < TOL


# --------------------------------------------------------------------------- in-process
def test_unknown_name_lists_the_options():
    with pytest.raises(ValueError) as e:
        get_strategy("horovod")
    for name in STRATEGIES:
        assert name in str(e.value)


def test_default_and_auto_on_cpu():
    import tensorflow as tf

    assert get_strategy("default") is tf.distribute.get_strategy()
    if len(tf.config.list_physical_devices("GPU")) <= 1:
        assert get_strategy("auto") is tf.distribute.get_strategy()
    text = describe_strategy(get_strategy("default"))
    assert "1 replica" in text and ("CPU:0" in text or "GPU:0" in text)


@pytest.mark.parametrize("tf_config, match", [
    (None, "needs the TF_CONFIG"),
    ("{not json", "not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "no cluster"),
    ('{"cluster": {"worker": ["localhost:1"]}}', "no task"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}', "does not name"),
])
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, match):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(RuntimeError, match=match):
        get_strategy("multi_worker")


def test_tpu_without_tpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(RuntimeError, match="no TPU"):
        get_strategy("tpu")


def test_configure_logical_cpus_after_init_is_a_clear_error():
    import tensorflow as tf

    n = len(tf.config.list_logical_devices("CPU"))  # initialises the devices
    assert configure_logical_cpus(n)  # same layout: accepted
    with pytest.raises(RuntimeError, match="before TensorFlow initialises"):
        configure_logical_cpus(n + 2)
    with pytest.raises(ValueError):
        configure_logical_cpus(0)
