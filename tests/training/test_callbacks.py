"""Training callbacks: atomic best/last checkpoints, resumable epoch state, balancer logs, time limit."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import keras

from src.training import callbacks as cbm
from src.training.callbacks import (BestAndLastCheckpoint, EpochStateCheckpoint, LogBalancerState,
                                    TimeLimit, load_epoch_state, make_callbacks, resolve_mode)


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    m.optimizer.build(m.trainable_variables)  # saved checkpoints then hold the full optimizer state
    return m


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, x.sum(-1, keepdims=True)


def mark(model, value):
    """Give the model recognisable weights: every bias = value."""
    model.layers[-1].bias.assign(np.full((1,), value, "float32"))


def bias_of(path):
    return float(keras.saving.load_model(path).layers[-1].bias.numpy()[0])


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.logs, self.iter_at_begin = [], [], None

    def on_train_begin(self, logs=None):
        self.iter_at_begin = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.logs.append(dict(logs or {}))


class StopAfter(keras.callbacks.Callback):
    """Simulates a kill: training ends after ``n`` epochs of the planned ones."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.n:
            self.model.stop_training = True


# --------------------------------------------------------------------------- best / last
@pytest.mark.parametrize("mode, values, best_at", [
    ("min", [3.0, 2.0, 2.5, 1.0, float("nan")], [0, 1, 1, 3, 3]),
    ("max", [0.5, 0.4, 0.7, 0.7, 0.9], [0, 0, 2, 2, 4]),
])
def test_best_only_on_improvement(tmp_path, mode, values, best_at):
    model = tiny_model()
    cb = BestAndLastCheckpoint(tmp_path, monitor="val_metric", mode=mode)
    cb.set_model(model)
    for epoch, v in enumerate(values):
        mark(model, float(epoch))
        cb.on_epoch_end(epoch, {"val_metric": v})
        assert bias_of(tmp_path / "last.keras") == epoch
        assert bias_of(tmp_path / "best.keras") == best_at[epoch], (epoch, v)
    assert cb.best == values[best_at[-1]] and cb.best_epoch == best_at[-1] + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "last.keras"]  # no temp files


def test_initial_best_survives_resume(tmp_path):
    model = tiny_model()
    cb = BestAndLastCheckpoint(tmp_path, monitor="val_loss", mode="min", initial_best=1.0)
    cb.set_model(model)
    cb.on_epoch_end(5, {"val_loss": 1.5})
    assert not (tmp_path / "best.keras").exists() and cb.best == 1.0
    cb.on_epoch_end(6, {"val_loss": 0.5})
    assert (tmp_path / "best.keras").exists() and cb.best == 0.5 and cb.best_epoch == 7


def test_last_save_is_atomic(tmp_path, monkeypatch):
    model = tiny_model()
    cb = BestAndLastCheckpoint(tmp_path, monitor="val_loss")
    cb.set_model(model)
    mark(model, 1.0)
    cb.on_epoch_end(0, {"val_loss": 1.0})
    before = (tmp_path / "last.keras").read_bytes()

    seen = []

    def dying_save(path, *a, **k):  # a kill in the middle of writing the file
        seen.append(str(path))
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(model, "save", dying_save)
    mark(model, 2.0)
    with pytest.raises(KeyboardInterrupt):
        cb.on_epoch_end(1, {"val_loss": 0.5})
    assert seen and all(p != str(tmp_path / "last.keras") and p.startswith(str(tmp_path)) for p in seen)
    assert (tmp_path / "last.keras").read_bytes() == before
    assert bias_of(tmp_path / "last.keras") == 1.0
    assert bias_of(tmp_path / "best.keras") == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "last.keras"]


def test_missing_monitor_warns_once_and_keeps_saving_last(tmp_path, caplog):
    model = tiny_model()
    cb = BestAndLastCheckpoint(tmp_path, monitor="val_loss")
    cb.set_model(model)
    with caplog.at_level("WARNING"):
        cb.on_epoch_end(0, {"loss": 1.0})
        cb.on_epoch_end(1, {"loss": 0.5})
    assert sum("val_loss" in r.message for r in caplog.records) == 1
    assert (tmp_path / "last.keras").exists() and not (tmp_path / "best.keras").exists()


@pytest.mark.parametrize("monitor, want", [("val_loss", "min"), ("val_accuracy", "max"), ("val_boxes_iou", "max"),
                                           ("val_dice_loss", "min"), ("phase3/val_auc", "max")])
def test_resolve_mode_auto(monitor, want):
    assert resolve_mode(monitor, "auto") == want
    with pytest.raises(ValueError):
        resolve_mode(monitor, "lowest")


# --------------------------------------------------------------------------- epoch state
def test_state_file_after_fit(tmp_path):
    x, y = data()
    model = tiny_model()
    ckpt = BestAndLastCheckpoint(tmp_path / "ckpt", monitor="val_loss", mode="min")
    state_cb = EpochStateCheckpoint(tmp_path / "state.json", phase=3, checkpoint=ckpt, extra={"run_id": "abc"})
    hist = model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=8, verbose=0, callbacks=[ckpt, state_cb])
    state = load_epoch_state(tmp_path / "state.json")
    assert state["epoch"] == 2
    assert state["monitor"] == "val_loss" and state["mode"] == "min" and state["phase"] == 3
    assert state["best"] == pytest.approx(min(hist.history["val_loss"]))
    assert state["best_epoch"] == int(np.argmin(hist.history["val_loss"])) + 1
    assert state["iterations"] == 4  # 2 epochs x 2 steps
    assert state["logs"]["loss"] == pytest.approx(hist.history["loss"][-1])
    assert state["extra"] == {"run_id": "abc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "state.json"]


def test_state_tracks_its_own_best_without_checkpoint(tmp_path):
    cb = EpochStateCheckpoint(tmp_path / "s.json", monitor="val_acc", mode="max", initial_best=0.6)
    cb.set_model(tiny_model())
    for epoch, v in enumerate([0.5, 0.7, float("inf"), 0.65]):
        cb.on_epoch_end(epoch, {"val_acc": v})
    state = json.loads((tmp_path / "s.json").read_text())
    assert state["epoch"] == 4 and state["best"] == 0.7 and state["best_epoch"] == 2
    assert state["logs"]["val_acc"] == 0.65


def test_load_epoch_state_missing_and_corrupt(tmp_path):
    assert load_epoch_state(tmp_path / "nope.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{half")
    with pytest.raises(ValueError, match="bad.json"):
        load_epoch_state(bad)
    bad.write_text('{"best": 1}')
    with pytest.raises(ValueError, match="epoch"):
        load_epoch_state(bad)


def test_resume_continues_epochs_and_optimizer(tmp_path):
    x, y = data()
    run = tmp_path / "run"
    model = tiny_model()
    first = Recorder()
    model.fit(x, y, validation_data=(x, y), epochs=4, batch_size=8, verbose=0,
              callbacks=make_callbacks(run, monitor="val_loss", phase="p1") + [first, StopAfter(2)])
    assert first.epochs == [0, 1]
    state = load_epoch_state(run / "state.json")
    assert state["epoch"] == 2 and state["iterations"] == 4
    opt_vars = [v.numpy().copy() for v in model.optimizer.variables]

    # the process is gone; a new one rebuilds everything from the files
    resumed = keras.saving.load_model(run / "checkpoints" / "last.keras")
    for a, b in zip(opt_vars, [v.numpy() for v in resumed.optimizer.variables]):
        np.testing.assert_array_equal(a, b)  # Adam moments and step count came back
    second = Recorder()
    cbs = make_callbacks(run, monitor=state["monitor"], mode=state["mode"], phase=state["phase"],
                         initial_best=state["best"])
    resumed.fit(x, y, validation_data=(x, y), epochs=4, initial_epoch=state["epoch"], batch_size=8, verbose=0,
                callbacks=cbs + [second])
    assert second.epochs == [2, 3]
    assert second.iter_at_begin == 4  # continued, not restarted from 0
    assert int(resumed.optimizer.iterations.numpy()) == 8
    final = load_epoch_state(run / "state.json")
    assert final["epoch"] == 4 and final["iterations"] == 8 and final["phase"] == "p1"
    assert final["best"] <= state["best"]


# --------------------------------------------------------------------------- balancer logs
class FakeBalancer:
    def __init__(self):
        self.calls = 0

    def state(self):
        self.calls += 1
        return {"class": {"weight": 1.0, "ema": 0.5 * self.calls, "log_var": 0.0, "effective_weight": 2.0},
                "boxes": {"weight": 0.5, "ema": np.float32(0.25), "log_var": -0.1, "effective_weight": 0.5}}


class WithBalancer(keras.Model):
    """Test double of the interface the callback reads: any model with ``balancer.state()``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dense = keras.layers.Dense(1)
        self.balancer = FakeBalancer()

    def call(self, x):
        return self.dense(x)


def test_log_balancer_state_reaches_later_callbacks(tmp_path):
    x, y = data()
    model = WithBalancer()
    model.compile(optimizer="sgd", loss="mse")
    rec = Recorder()
    csv_path = tmp_path / "log.csv"
    hist = model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                     callbacks=[LogBalancerState(), keras.callbacks.CSVLogger(str(csv_path)), rec])
    keys = {f"balance/{h}/{k}" for h in ("class", "boxes") for k in ("weight", "ema", "log_var", "effective_weight")}
    assert keys <= set(rec.logs[0]) and keys <= set(hist.history)
    assert rec.logs[1]["balance/class/ema"] == 1.0 and rec.logs[1]["balance/boxes/log_var"] == pytest.approx(-0.1)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert keys <= set(rows[0]) and float(rows[0]["balance/class/ema"]) == 0.5


def test_log_balancer_state_without_balancer_is_a_no_op():
    cb = LogBalancerState()
    cb.set_model(tiny_model())
    logs = {"loss": 1.0}
    cb.on_epoch_end(0, logs)
    assert logs == {"loss": 1.0}


# --------------------------------------------------------------------------- time limit
def test_time_limit_stops_at_an_epoch_end():
    x, y = data()
    model = tiny_model()
    tl = TimeLimit(1e-9)
    hist = model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[tl])
    assert len(hist.history["loss"]) == 1 and tl.stopped_epoch == 1
    hist = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[TimeLimit(None)])
    assert len(hist.history["loss"]) == 3


def test_make_callbacks_order(tmp_path):
    cbs = make_callbacks(tmp_path, time_limit=60)
    kinds = [type(c) for c in cbs]
    assert kinds == [LogBalancerState, BestAndLastCheckpoint, EpochStateCheckpoint, TimeLimit]
    assert cbs[2].checkpoint is cbs[1]


def test_atomic_write_json_leaves_no_temp(tmp_path):
    cbm.atomic_write_json(tmp_path / "a" / "s.json", {"x": 1})
    cbm.atomic_write_json(tmp_path / "a" / "s.json", {"x": 2})
    assert json.loads((tmp_path / "a" / "s.json").read_text()) == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["s.json"]


def test_repair_history_matches_the_resumed_state(tmp_path):
    from src.training.callbacks import repair_history

    h = tmp_path / "history.csv"
    h.write_text("epoch,loss,val_loss\n0,1.0,1.1\n1,0.9,1.0\n")
    # killed after state.json said 3 epochs, before the CSV row of epoch 2 was written
    n = repair_history(h, {"epoch": 3, "logs": {"loss": 0.8, "val_loss": 0.95}})
    rows = list(csv.DictReader(h.open()))
    assert n == 3 and [r["epoch"] for r in rows] == ["0", "1", "2"] and float(rows[2]["val_loss"]) == 0.95
    # rows past the checkpoint (epochs that will be trained again) are dropped
    h.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n3,0.7\n")
    assert repair_history(h, {"epoch": 2, "logs": {}}) == 2
    assert [r["epoch"] for r in csv.DictReader(h.open())] == ["0", "1"]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    from src.training.callbacks import CheckpointWriteError, atomic_save_model

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    best = tmp_path / "best.keras"
    atomic_save_model(model, best)
    good = best.read_bytes()

    def full_disk(self, filepath, *a, **k):  # the disk fills half-way through Keras' write
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint .*best.keras: the disk is full; "
                                                   r"the previous best.keras is kept"):
        atomic_save_model(model, best)
    assert best.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]   # no half-written temporary left


# --------------------------------------------------------------------------- selection under dynamic balancing
def test_fixed_weight_val_loss_is_comparable_across_epochs_when_ema_balancing_moves():
    """EMA balancing divides each head's loss by its running mean: as the mask loss falls its
    weight rises, so val_loss can rise while every head improves. The selection loss uses
    the phase's fixed weights and falls, and the best checkpoint follows it."""
    from src.losses.balancing import LossBalancer

    model = tiny_model()
    model.balancer = LossBalancer(["mask", "class"], mode="ema", weights={"mask": 2.0, "class": 1.0})
    cb = cbm.FixedWeightValLoss()
    cb.set_model(model)
    epochs = [{"val_loss": 1.9, "val_mask_loss": 0.99, "val_class_loss": 0.82},   # balancer state of epoch 1
              {"val_loss": 2.1, "val_mask_loss": 0.96, "val_class_loss": 0.78}]   # every head better, val_loss worse
    for logs in epochs:
        cb.on_epoch_end(0, logs)
    assert epochs[0]["val_loss_fixed"] == pytest.approx(2 * 0.99 + 0.82)
    assert epochs[1]["val_loss_fixed"] == pytest.approx(2 * 0.96 + 0.78)
    assert epochs[1]["val_loss_fixed"] < epochs[0]["val_loss_fixed"]
    no_heads = {"val_loss": 1.0}
    cb.on_epoch_end(0, no_heads)
    assert "val_loss_fixed" not in no_heads
