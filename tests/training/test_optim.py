"""Schedules, weight EMA and the swap used for validation and best.keras (src/training/optim.py)."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from src.training.optim import (AdamWEMA, EMAValidation, WarmupCosine, make_optimizer, schedule_of, swap_ema,
                                uses_ema)


def test_warmup_cosine_values():
    s = WarmupCosine(1.0, total_steps=110, warmup_steps=10, alpha=0.1)
    lr = lambda t: float(s(t))  # noqa: E731
    assert lr(0) == pytest.approx(0.1)                      # (t + 1) / warmup
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)                     # cosine starts at the peak
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    flat = WarmupCosine(2.0, total_steps=50, warmup_steps=5, cosine=False)
    assert float(flat(2)) == pytest.approx(2.0 * 3 / 5) and float(flat(40)) == pytest.approx(2.0)


def test_schedule_length_changes_after_tracing():
    s = WarmupCosine(1.0, total_steps=100, warmup_steps=0, alpha=0.0)
    f = tf.function(lambda t: s(t))
    assert float(f(tf.constant(50))) == pytest.approx(0.5)
    s.set_total_steps(50)                                   # what the time budget does after epoch 1
    assert float(f(tf.constant(50))) == pytest.approx(0.0, abs=1e-6)
    assert s.get_config()["total_steps"] == 50
    assert WarmupCosine.from_config(s.get_config()).total_steps == 50


def test_make_optimizer_options():
    opt = make_optimizer({"optimizer": "adamw", "schedule": "cosine", "warmup_epochs": 0.5, "ema_weights": True,
                          "ema_decay": 0.99}, 1e-3, total_steps=40, steps_per_epoch=20)
    assert isinstance(opt, AdamWEMA) and opt.use_ema and opt.ema_momentum == 0.99
    sched = schedule_of(opt)
    assert sched.warmup_steps == 10 and sched.total_steps == 40
    const = make_optimizer({"optimizer": "adam", "schedule": "constant"}, 1e-3, total_steps=40)
    assert schedule_of(const) is None and not uses_ema(const)
    with pytest.raises(ValueError, match="trainer.schedule"):
        make_optimizer({"schedule": "linear"}, 1e-3, 10)
    with pytest.raises(ValueError, match="trainer.optimizer"):
        make_optimizer({"optimizer": "lion"}, 1e-3, 10)
    with pytest.raises(ValueError, match="ema_decay"):
        make_optimizer({"ema_weights": True, "ema_decay": 1.5}, 1e-3, 10)


def _tiny_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2)(inp))


def test_ema_follows_the_warmed_up_recurrence():
    """After fit (Keras writes the averages into the model) the weights equal the
    recurrence avg_0 = w_0, avg_t = d_t avg_{t-1} + (1 - d_t) w_t, d_t = min(decay,
    (1 + t) / (10 + t)), computed here from the raw weights recorded after every step."""
    model = _tiny_model()
    model.compile(optimizer=AdamWEMA(learning_rate=0.05, use_ema=True, ema_momentum=0.9), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(16, 3)), np.random.default_rng(1).normal(size=(16, 2))
    kernel = model.layers[-1].kernel
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(np.array(kernel.numpy()))

    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[Record()])
    expected = seen[0]
    for t, w in enumerate(seen[1:], start=1):
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * w
    assert len(seen) == 12 and not np.allclose(expected, seen[-1])
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_swap_is_an_exchange_and_validation_uses_the_average():
    model = _tiny_model()
    model.compile(optimizer=AdamWEMA(learning_rate=0.1, use_ema=True, ema_momentum=0.9), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(8, 3)), np.zeros((8, 2))
    kernel = model.layers[-1].kernel
    seen = {}

    class Peek(keras.callbacks.Callback):
        def _avg(self):
            opt = model.optimizer
            i = [j for j, v in enumerate(opt._trainable_variables) if v is kernel][0]
            return np.array(opt._model_variables_moving_average[i].numpy())

        def on_test_batch_begin(self, batch, logs=None):
            seen["model_at_val"], seen["slot_at_val"] = np.array(kernel.numpy()), self._avg()

        def on_epoch_end(self, epoch, logs=None):
            seen["model_after"], seen["slot_after"] = np.array(kernel.numpy()), self._avg()

    model.fit(x, y, epochs=2, batch_size=2, verbose=0, validation_data=(x, y), callbacks=[EMAValidation(), Peek()])
    # validation ran on the average; afterwards training continues on the raw weights
    np.testing.assert_array_equal(seen["model_at_val"], seen["slot_after"])
    np.testing.assert_array_equal(seen["slot_at_val"], seen["model_after"])
    assert not np.allclose(seen["model_after"], seen["slot_after"])
    opt = model.optimizer
    before = [np.array(v.numpy()) for v in opt._trainable_variables]
    swap_ema(opt)
    swap_ema(opt)
    for v, b in zip(opt._trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


@pytest.mark.parametrize("fused,reference,kw", [
    ("FusedAdam", keras.optimizers.Adam, {}),
    ("FusedAdamW", keras.optimizers.AdamW, {"weight_decay": 0.05}),
])
def test_fused_adam_steps_equal_keras(fused, reference, kw):
    """The fused kernel path gives Keras' Adam / AdamW weights (schedule, clipping and
    decay included)."""
    import src.training.optim as optim

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")
    results = []
    for cls in (getattr(optim, fused), reference):
        model = _tiny_model()
        opt = cls(learning_rate=WarmupCosine(0.05, total_steps=8, warmup_steps=2), global_clipnorm=1.0, **kw)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        results.append([np.array(v.numpy()) for v in model.weights])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert isinstance(make_optimizer({"optimizer": "adamw"}, 1e-3, 10), optim.FusedAdamW)
