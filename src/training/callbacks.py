"""Keras callbacks of the training engine: checkpoints, resumable state, balancer logging.

Order matters, because Keras hands one ``logs`` dict to the callbacks in list order:

1. :class:`LogBalancerState` first: it *adds* ``balance/<head>/<key>`` entries to the
   epoch logs, so every later callback (``CSVLogger``, the MLflow callback of
   :class:`src.tracking.Tracker`, TensorBoard, History) sees them;
2. :class:`BestAndLastCheckpoint` before :class:`EpochStateCheckpoint`: the state file
   says "``epoch`` epochs done", so it must be written *after* ``last.keras`` holds
   those epochs. A kill between the two then repeats one epoch on resume instead of
   skipping one;
3. :class:`TimeLimit` anywhere (it only sets ``model.stop_training``).

:func:`make_callbacks` builds them in this order.

Resume after a kill::

    state = load_epoch_state(run_dir / "state.json")          # None: fresh start
    model = keras.saving.load_model(run_dir / "checkpoints" / "last.keras")  # weights + optimizer
    model.fit(..., initial_epoch=state["epoch"], epochs=total,
              callbacks=make_callbacks(run_dir, monitor=state["monitor"], mode=state["mode"],
                                       initial_best=state["best"], phase=state["phase"]))

All files are written atomically (temporary file in the same folder, then
``os.replace``), so a kill during a save never corrupts the previous file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import keras

from .optim import swap_ema, uses_ema

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MAX_WORDS = ("acc", "auc", "iou", "dice", "precision", "recall", "f1", "map", "fmeasure", "psnr", "ssim")


# --------------------------------------------------------------------------- helpers
def resolve_mode(monitor: str, mode: str = "auto") -> str:
    """``min`` | ``max``; ``auto`` is ``max`` for accuracy/AUC/IoU/Dice/F1/mAP-like names."""
    mode = str(mode).lower()
    if mode not in ("min", "max", "auto"):
        raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
    if mode != "auto":
        return mode
    name = monitor.lower().split("/")[-1]
    return "max" if any(w in name for w in _MAX_WORDS) and "loss" not in name else "min"


def _finite_or_none(value) -> Optional[float]:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def is_improvement(value, best, mode: str, min_delta: float = 0.0) -> bool:
    """``value`` beats ``best`` by more than ``min_delta`` (NaN/inf/None never improve)."""
    v = _finite_or_none(value)
    if v is None:
        return False
    if best is None:
        return True
    return v < best - min_delta if mode == "min" else v > best + min_delta


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous file stays."""


def atomic_save_model(model: keras.Model, path) -> None:
    """``model.save(path)`` (weights + optimizer state) without ever leaving a partial ``path``.

    Raises:
        CheckpointWriteError: the folder or the disk refused the write (full disk, no
            permission); one line naming the file, and the previous ``path`` is intact.
    """
    path = Path(path)
    # Keras wants the .keras suffix; a dot-prefixed name in the same folder keeps os.replace atomic
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp.keras"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {path.name} is kept" if path.is_file() else ""
        why = "the disk is full" if e.errno == 28 else (e.strerror or str(e))
        raise CheckpointWriteError(e.errno, f"could not write the checkpoint {path}: {why}{kept}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_copy(src, dst) -> None:
    dst = Path(dst)
    tmp = dst.parent / f".{dst.stem}.{os.getpid()}.tmp{dst.suffix}"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_epoch_state(path) -> Optional[dict]:
    """The state written by :class:`EpochStateCheckpoint`, or ``None`` when there is none.

    Raises:
        ValueError: the file exists but is not a valid state file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid epoch-state file ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise ValueError(f"{path}: not a valid epoch-state file (no integer 'epoch')")
    return state


def repair_history(path, state: Optional[Mapping]) -> int:
    """Make ``history.csv`` agree with a resumed phase's ``state.json`` before appending.

    A kill can land between the callbacks of one epoch end: rows for epochs the
    checkpoint does not hold are dropped (they will be trained again), and a row the kill
    kept from being written is restored from the state's copy of that epoch's logs. So the
    history stays one row per epoch, in order. Returns the number of rows kept.
    """
    import csv

    path = Path(path)
    if state is None or not path.is_file():
        return 0
    done = int(state.get("epoch") or 0)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("epoch", "").strip().isdigit() and int(r["epoch"]) < done]
    have = {int(r["epoch"]) for r in rows}
    last_logs = state.get("logs") or {}
    if done - 1 not in have and done > 0 and last_logs:
        row = {"epoch": str(done - 1), **{k: "" if v is None else repr(float(v)) for k, v in last_logs.items()}}
        fields = fields or ["epoch", *last_logs]
        rows.append({k: row.get(k, "") for k in fields})
    rows.sort(key=lambda r: int(r["epoch"]))
    text = [",".join(fields)] + [",".join(str(r.get(k, "")) for k in fields) for r in rows]
    atomic_write_text(path, "\n".join(text) + "\n")
    return len(rows)


def _current_value(logs: Optional[Mapping], monitor: str, owner, warned: set):
    value = (logs or {}).get(monitor)
    if value is None and monitor not in warned:
        warned.add(monitor)
        log.warning("%s: monitored metric %r is not in the epoch logs (available: %s); "
                    "no best checkpoint will be chosen by it", type(owner).__name__, monitor,
                    ", ".join(sorted(logs or {})))
    return value


def finite_loss(logs: Optional[Mapping]) -> bool:
    """Every loss in ``logs`` (``loss``, ``<head>_loss``) is a finite number (or absent)."""
    for k, v in (logs or {}).items():
        if (k == "loss" or k.endswith("_loss")) and not k.startswith("val_") and _finite_or_none(v) is None:
            return False
    return True


def nonfinite_weights(model) -> list:
    """Paths of the model's variables holding NaN or infinity (bounded losses, e.g. an IoU
    of saturated boxes, can stay finite while the weights under them blow up)."""
    import numpy as np

    return [v.path for v in model.weights
            if v.dtype in ("float16", "bfloat16", "float32", "float64")
            and not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]


# --------------------------------------------------------------------------- checkpoints
class BestAndLastCheckpoint(keras.callbacks.Callback):
    """Save ``last.keras`` every epoch and ``best.keras`` when ``monitor`` improves.

    Both files include the optimizer state (Keras' ``.keras`` format), so training can
    resume from ``last.keras``. Saves are atomic: a kill during a save leaves the
    previous file intact.

    Args:
        directory: folder for ``last.keras`` / ``best.keras``.
        monitor: epoch-log key to compare (e.g. ``val_loss``).
        mode: ``min`` | ``max`` | ``auto``.
        initial_best: best value so far (from a resumed run's state), so a resumed run
            only overwrites ``best.keras`` on a real improvement.
        min_delta: smallest change that counts as an improvement.
        save_last: also save ``last.keras`` (default true).
        last_name, best_name: file names.
    """

    def __init__(self, directory, monitor: str = "val_loss", mode: str = "auto",
                 initial_best: Optional[float] = None, min_delta: float = 0.0, save_last: bool = True,
                 last_name: str = "last.keras", best_name: str = "best.keras",
                 initial_best_logs: Optional[Mapping] = None, initial_best_balancer: Optional[Mapping] = None):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = resolve_mode(monitor, mode)
        self.best = _finite_or_none(initial_best)
        self.best_epoch: Optional[int] = None
        #: the validation metrics of the epoch ``best.keras`` holds (``val_`` dropped) and
        #: its loss balancer's state: the phase's final metrics without evaluating again
        self.best_logs: Optional[dict] = dict(initial_best_logs) if initial_best_logs else None
        self.best_balancer: Optional[dict] = dict(initial_best_balancer) if initial_best_balancer else None
        self.min_delta = abs(float(min_delta))
        self.save_last = save_last
        self.last_path = self.directory / last_name
        self.best_path = self.directory / best_name
        self._warned: set = set()

    def on_epoch_end(self, epoch, logs=None):
        if not finite_loss(logs) or nonfinite_weights(self.model):
            log.warning("epoch %d: the loss or the weights are not finite; no checkpoint written (the last good "
                        "ones stay)", epoch + 1)
            return
        if self.save_last:
            atomic_save_model(self.model, self.last_path)
        value = _current_value(logs, self.monitor, self, self._warned)
        if is_improvement(value, self.best, self.mode, self.min_delta):
            previous = self.best
            self.best, self.best_epoch = float(value), epoch + 1
            self.best_logs = {k[4:]: float(v) for k, v in (logs or {}).items()
                              if k.startswith("val_") and _finite_or_none(v) is not None}
            state_fn = getattr(getattr(self.model, "balancer", None), "state", None)
            self.best_balancer = state_fn() if callable(state_fn) else None
            opt = getattr(self.model, "optimizer", None)
            if opt is not None and uses_ema(opt):
                # the averaged weights were validated: they are the model to keep
                # (last.keras keeps the raw weights, with the averages in the optimizer)
                swap_ema(opt)
                try:
                    atomic_save_model(self.model, self.best_path)
                finally:
                    swap_ema(opt)
            elif self.save_last:
                atomic_copy(self.last_path, self.best_path)  # same bytes, no second save
            else:
                atomic_save_model(self.model, self.best_path)
            log.info("epoch %d: %s improved %s -> %.6g, saved %s", epoch + 1, self.monitor,
                     "none" if previous is None else f"{previous:.6g}", self.best, self.best_path)


class EpochStateCheckpoint(keras.callbacks.Callback):
    """After every epoch, write a small JSON state so a killed run can resume.

    The file holds ``epoch`` (number of completed epochs = the ``initial_epoch`` to
    resume with), ``best`` (best monitored value so far, ``null`` if none), ``best_epoch``,
    ``monitor``, ``mode``, ``phase``, ``iterations`` (optimizer steps, to check a
    loaded checkpoint against), the last epoch's ``logs`` and ``extra`` (anything the
    engine wants back, e.g. the MLflow run id). Written atomically.

    Args:
        path: the JSON file.
        monitor, mode, min_delta, initial_best: as for :class:`BestAndLastCheckpoint`.
        phase: phase name/number recorded in the file.
        checkpoint: a :class:`BestAndLastCheckpoint`; when given, its best value is
            recorded (one source of truth) instead of tracking one here.
        extra: JSON-serialisable dict stored as ``extra``.
    """

    def __init__(self, path, monitor: str = "val_loss", mode: str = "auto", phase: Any = None,
                 initial_best: Optional[float] = None, min_delta: float = 0.0,
                 checkpoint: Optional[BestAndLastCheckpoint] = None, extra: Optional[Mapping] = None):
        super().__init__()
        self.path = Path(path)
        self.monitor = checkpoint.monitor if checkpoint is not None else monitor
        self.mode = checkpoint.mode if checkpoint is not None else resolve_mode(monitor, mode)
        self.phase = phase
        self.min_delta = abs(float(min_delta))
        self.checkpoint = checkpoint
        self.best = _finite_or_none(initial_best)
        self.best_epoch: Optional[int] = None
        self.extra = dict(extra or {})
        self._warned: set = set()

    def state(self, epoch: int, logs: Optional[Mapping] = None) -> dict:
        if self.checkpoint is not None:
            best, best_epoch = self.checkpoint.best, self.checkpoint.best_epoch
        else:
            best, best_epoch = self.best, self.best_epoch
        iterations = None
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and getattr(opt, "iterations", None) is not None:
            try:
                iterations = int(keras.ops.convert_to_numpy(opt.iterations))
            except Exception:  # noqa: BLE001 - optimizer not built yet
                iterations = None
        return {
            "version": STATE_VERSION,
            "epoch": int(epoch) + 1,
            "best": best,
            "best_epoch": best_epoch,
            "monitor": self.monitor,
            "mode": self.mode,
            "phase": self.phase,
            "iterations": iterations,
            "logs": {k: _finite_or_none(v) for k, v in (logs or {}).items()},  # non-finite -> null
            "best_logs": self.checkpoint.best_logs if self.checkpoint is not None else None,
            "best_balancer": self.checkpoint.best_balancer if self.checkpoint is not None else None,
            "time": time.time(),
            "extra": self.extra,
        }

    def on_epoch_end(self, epoch, logs=None):
        if not finite_loss(logs) or nonfinite_weights(self.model):  # not a done epoch: resume repeats it
            return
        if self.checkpoint is None:
            value = _current_value(logs, self.monitor, self, self._warned)
            if is_improvement(value, self.best, self.mode, self.min_delta):
                self.best, self.best_epoch = float(value), epoch + 1
        atomic_write_json(self.path, self.state(epoch, logs))


# --------------------------------------------------------------------------- logging
class LogBalancerState(keras.callbacks.Callback):
    """Add the loss balancer's state to the epoch logs as ``balance/<head>/<key>``.

    Works with any model that has a ``balancer`` attribute whose ``state()`` returns
    ``{head: {"weight", "ema", "log_var", "effective_weight", ...: number}}``; does
    nothing otherwise. Put it **before** ``CSVLogger`` and the MLflow/TensorBoard
    callbacks: it edits the ``logs`` dict those callbacks receive afterwards.
    """

    def __init__(self, prefix: str = "balance"):
        super().__init__()
        self.prefix = prefix

    def values(self) -> dict:
        balancer = getattr(self.model, "balancer", None)
        state_fn = getattr(balancer, "state", None)
        if not callable(state_fn):
            return {}
        out = {}
        for head, entries in (state_fn() or {}).items():
            for key, value in (entries or {}).items():
                try:
                    out[f"{self.prefix}/{head}/{key}"] = float(value)
                except (TypeError, ValueError):
                    continue
        return out

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.values())


class StopOnDivergence(keras.callbacks.Callback):
    """Stop a phase at the first training step whose loss is NaN or infinite.

    Records ``epoch`` (1-based), ``step`` (1-based within the epoch) and ``heads`` (the
    heads whose running loss is no longer finite, or ``["total"]``) in :attr:`diverged`.
    The checkpoint callbacks write nothing for that epoch, so ``last.keras`` and
    ``state.json`` keep the last good epoch and ``trainer.resume=true`` continues from it.
    """

    def __init__(self):
        super().__init__()
        self.diverged: Optional[dict] = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.diverged is not None or finite_loss(logs):
            return
        heads = sorted(k[:-5] for k, v in (logs or {}).items()
                       if k.endswith("_loss") and _finite_or_none(v) is None)
        self.diverged = {"epoch": self._epoch + 1, "step": int(batch) + 1, "heads": heads or ["total"],
                         "loss": {k: (None if _finite_or_none(v) is None else float(v))
                                  for k, v in (logs or {}).items() if k == "loss" or k.endswith("_loss")}}
        self.model.stop_training = True
        log.error("training diverged at epoch %d, step %d: loss of %s is not finite", self.diverged["epoch"],
                  self.diverged["step"], ", ".join(self.diverged["heads"]))

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged is not None:
            return
        bad = nonfinite_weights(self.model)
        if bad:
            layers = sorted({p.split("/")[0] for p in bad})
            self.diverged = {"epoch": epoch + 1, "step": None, "heads": [f"weights of {', '.join(layers[:4])}"
                                                                         + (" ..." if len(layers) > 4 else "")],
                             "loss": {}}
            self.model.stop_training = True
            log.error("training diverged in epoch %d: NaN/inf in the weights of %s", epoch + 1, ", ".join(layers))


class FixedWeightValLoss(keras.callbacks.Callback):
    """Add ``val_loss_fixed``: the validation losses of the heads summed with the phase's
    own (static) loss weights.

    With ``ema`` or ``uncertainty`` balancing, ``val_loss`` is weighted by the balancer's
    running state, which moves as training goes on (the EMA divides each head's loss by
    its running mean, so a falling mask loss *raises* its weight): ``val_loss`` can rise
    while every head's validation loss falls, and choosing the best epoch by it picks an
    early one. This sum is comparable across epochs. Put it before the checkpoint and the
    loggers (it edits the ``logs`` they receive).
    """

    key = "val_loss_fixed"

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        balancer = getattr(self.model, "balancer", None)
        if balancer is None:
            return
        weights = dict(zip(balancer.heads, keras.ops.convert_to_numpy(balancer.head_weights).tolist()))
        terms = [w * float(logs[f"val_{h}_loss"]) for h, w in weights.items() if f"val_{h}_loss" in logs and w]
        if terms:
            logs[self.key] = float(sum(terms))


class LogLearningRate(keras.callbacks.Callback):
    """Add the optimizer's current learning rate to the epoch logs as ``learning_rate``
    (a schedule's value at the step reached), for ``history.csv``, MLflow and TensorBoard.
    Put it before those callbacks."""

    def on_epoch_end(self, epoch, logs=None):
        opt = getattr(self.model, "optimizer", None)
        if logs is None or opt is None or "learning_rate" in logs:
            return
        try:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(opt.learning_rate))
        except Exception:  # noqa: BLE001 - an optimizer without a readable rate
            pass


class StepTimer(keras.callbacks.Callback):
    """Time the training steps of a ``fit``: the first one (which traces the train
    step: the start-up cost a user waits for) and the steady rate after it.

    ``summary()`` gives ``first_step_s`` (from ``on_train_begin`` to the end of the first
    step), ``step_s`` (median of the later steps), ``train_img_per_s`` (``batch_size /
    step_s``) and ``steps_timed``. Validation and callbacks are not in the steady rate.
    """

    def __init__(self, batch_size: int, since: Optional[float] = None):
        super().__init__()
        self.batch_size = int(batch_size)
        self.since = since
        self.first_step: Optional[float] = None
        self.since_start: Optional[float] = None
        self.steps: list = []

    def on_train_begin(self, logs=None):
        self._t0 = time.monotonic()

    def on_train_batch_begin(self, batch, logs=None):
        self._tb = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = now - self._t0
            self.since_start = (now - self.since) if self.since is not None else None
        else:
            self.steps.append(now - self._tb)

    def summary(self) -> dict:
        step = sorted(self.steps)[len(self.steps) // 2] if self.steps else None
        return {"first_step_s": round(self.first_step, 2) if self.first_step is not None else None,
                "first_step_since_start_s": round(self.since_start, 2) if self.since_start is not None else None,
                "step_s": round(step, 4) if step else None,
                "train_img_per_s": round(self.batch_size / step, 1) if step else None,
                "steps_timed": len(self.steps)}


class TimeLimit(keras.callbacks.Callback):
    """Stop training gracefully at an epoch end once ``seconds`` have passed.

    Args:
        seconds: time budget for this ``fit`` call (``None``/``<= 0``: unlimited).
        anticipate: also stop when the next epoch (estimated as the mean epoch time so
            far) would end past the budget.
    """

    def __init__(self, seconds: Optional[float], anticipate: bool = False):
        super().__init__()
        self.seconds = float(seconds) if seconds else None
        self.anticipate = anticipate
        self.stopped_epoch: Optional[int] = None
        self._start = None
        self._epochs = 0

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()
        self._epochs = 0
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        if self.seconds is None or self.seconds <= 0:
            return
        self._epochs += 1
        elapsed = time.monotonic() - self._start
        need = elapsed / self._epochs if self.anticipate else 0.0
        if elapsed + need >= self.seconds:
            self.model.stop_training = True
            self.stopped_epoch = epoch + 1
            log.warning("time limit of %.0f s reached after %.0f s: training stops after epoch %d",
                        self.seconds, elapsed, epoch + 1)


# --------------------------------------------------------------------------- assembly
def make_callbacks(run_dir, monitor: str = "val_loss", mode: str = "auto", phase: Any = None,
                   initial_best: Optional[float] = None, checkpoint_dir=None, state_path=None,
                   time_limit: Optional[float] = None, log_balancer: bool = True,
                   extra_state: Optional[Mapping] = None) -> list:
    """The engine's callbacks in the right order (see the module doc).

    ``checkpoint_dir`` defaults to ``<run_dir>/checkpoints`` and ``state_path`` to
    ``<run_dir>/state.json``. Append CSVLogger/MLflow/TensorBoard callbacks *after* these.
    """
    run_dir = Path(run_dir)
    ckpt = BestAndLastCheckpoint(checkpoint_dir or run_dir / "checkpoints", monitor=monitor, mode=mode,
                                 initial_best=initial_best)
    cbs: list = []
    if log_balancer:
        cbs.append(LogBalancerState())
    cbs.append(ckpt)
    cbs.append(EpochStateCheckpoint(state_path or run_dir / "state.json", phase=phase, checkpoint=ckpt,
                                    extra=extra_state))
    if time_limit:
        cbs.append(TimeLimit(time_limit))
    return cbs


__all__ = ["CheckpointWriteError", "BestAndLastCheckpoint", "EpochStateCheckpoint", "LogBalancerState", "LogLearningRate", "StepTimer",
           "StopOnDivergence", "TimeLimit", "finite_loss", "repair_history",
           "load_epoch_state", "make_callbacks", "atomic_write_json", "atomic_write_text",
           "atomic_save_model", "resolve_mode", "is_improvement"]
