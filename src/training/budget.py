"""A wall-clock budget for training (``trainer.max_time``), as ultralytics' ``time=`` and
Lightning's ``max_time``.

With ``trainer.max_time=25m`` the number of epochs is not fixed in advance: after the
first epoch :class:`TimeBudget` measures it (tracing the train and validation steps,
which only the first epoch pays, is measured separately), works out how many epochs fit
before the budget runs out with room left for the final evaluation, sets the learning
rate schedule to that length (:class:`src.training.optim.WarmupCosine`) so it completes
inside the budget, logs the decision, and refines it from the measured epochs (the first without tracing is the
second): up to half-way through the plan it may grow or shrink, after that it only
shrinks, when epochs turn out slower.
Training stops at the end of the planned epoch; if an epoch
runs over (a slower machine, a busier minute) it stops at the first batch past the
budget, and the epoch in flight is still validated and checkpointed.

``phase=all`` splits the budget between the phases in proportion to their ``epochs``
unless a phase sets its own ``max_time`` in the model's phase table. The plan and the
time spent are kept in ``phase<N>/budget.json``, so a resumed phase only gets the time
that is left.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import keras

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|hr|h|min|m|sec|s)")


def parse_duration(value) -> Optional[float]:
    """Seconds from ``"25m"``, ``"2h"``, ``"1h30m"``, ``"90s"``, ``"00:25:00"`` or a number
    of seconds; ``None``, ``0``, ``""``, ``"null"``, ``"none"`` mean no budget.

    Raises:
        ValueError: anything else, with the accepted forms named.
    """
    if value is None or value is False:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "null", "none", "0", "false"):
            return None
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif re.fullmatch(r"\d+:\d{1,2}(:\d{1,2})?", text):
            parts = [float(p) for p in text.split(":")]
            seconds = sum(p * 60.0 ** i for i, p in enumerate(reversed(parts)))
            if len(parts) == 2:  # hh:mm
                seconds *= 60.0
        else:
            compact = text.replace(" ", "")
            parts = _PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise ValueError(f"trainer.max_time={value!r} is not a duration; use e.g. 90s, 25m, 2h, 1h30m, "
                                 f"hh:mm:ss or a number of seconds")
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"trainer.max_time must be a positive duration, got {value!r}")
    return seconds or None


def phase_budgets(total: Optional[float], phases: Sequence[str], table: Mapping, default_epochs: int) -> dict:
    """Seconds per phase: a phase's own ``max_time``, the rest of ``total`` split over the
    other phases in proportion to their ``epochs`` (``None`` where there is no budget)."""
    own = {p: parse_duration((table.get(p) or {}).get("max_time")) for p in phases}
    if total is None:
        return own
    rest = [p for p in phases if own[p] is None]
    left = max(0.0, total - sum(v for v in own.values() if v))
    weights = {p: float((table.get(p) or {}).get("epochs") or default_epochs) for p in rest}
    wsum = sum(weights.values()) or 1.0
    return {p: (own[p] if own[p] is not None else left * weights[p] / wsum) for p in phases}


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class TimeBudget(keras.callbacks.Callback):
    """Plan the epoch count of one ``fit`` call from its measured speed (module doc).

    Args:
        seconds: the phase's budget, counted from ``start``.
        steps_per_epoch: training steps per epoch (the schedule is set in steps).
        max_epochs: upper bound (``fit``'s ``epochs``); the plan never exceeds it.
        schedule: a :class:`~src.training.optim.WarmupCosine` to stretch or shrink, or None.
        start: ``time.monotonic()`` at the start of the phase (model building and data
            loading count); default: when training begins.
        spent: seconds this phase already used in an earlier (killed) run.
        state_path: where the plan is kept (``budget.json``), or None.
        reserve: seconds kept free after the last epoch for re-evaluating the best
            checkpoint; default: the measured first validation plus 10%.
        say: a function that prints a decision for the user (default: log only).
    """

    def __init__(self, seconds: float, steps_per_epoch: int, max_epochs: int, schedule=None,
                 start: Optional[float] = None, spent: float = 0.0, state_path=None,
                 reserve: Optional[float] = None, say=None):
        super().__init__()
        self.seconds = float(seconds)
        self.steps = max(1, int(steps_per_epoch))
        self.max_epochs = int(max_epochs)
        self.schedule = schedule
        self.start = start
        self.spent = float(spent)
        self.state_path = Path(state_path) if state_path else None
        self.fixed_reserve = reserve
        self.say = say or (lambda msg: None)
        self.planned: Optional[int] = None
        self.stopped_early = False
        self.epochs_run = 0
        self._batch_times: list = []
        self._val_time: Optional[float] = None
        self._first_val: Optional[float] = None
        self._cycles: list = []
        self._last_end = 0.0
        self._epoch = 0

    # ---- clock --------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.spent + (time.monotonic() - self.start)

    def reserve(self) -> float:
        if self.fixed_reserve is not None:
            return float(self.fixed_reserve)
        return 1.1 * (self._first_val or 0.0) + 2.0

    # ---- callbacks ----------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = time.monotonic()
        self._last_batch = self._epoch_start
        self._batch_times = []

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        self._batch_times.append(now - self._last_batch)
        self._last_batch = now
        # hard stop: past the budget (less the final evaluation) in the middle of an epoch
        if self.elapsed() + self.reserve() >= self.seconds and not self.model.stop_training:
            self.model.stop_training = True
            self.stopped_early = True
            msg = (f"time budget {fmt_seconds(self.seconds)}: stopping {len(self._batch_times)} steps into epoch "
                   f"{self._epoch + 1} ({fmt_seconds(self.elapsed())} used); this epoch is still validated and "
                   f"checkpointed")
            log.warning(msg)
            self.say(msg)

    def on_test_begin(self, logs=None):
        self._val_start = time.monotonic()

    def on_test_end(self, logs=None):
        self._val_time = time.monotonic() - self._val_start
        if self._first_val is None:
            self._first_val = self._val_time

    def _steady_epoch(self) -> float:
        """Seconds of an epoch without tracing: the median step times the steps, plus the
        last validation (the first one includes tracing, so it overestimates) and the
        epoch's other work (checkpoints)."""
        times = sorted(self._batch_times[1:] or self._batch_times)
        step = times[len(times) // 2] if times else 0.0
        train = step * self.steps
        epoch_wall = time.monotonic() - self._epoch_start
        other = max(0.0, epoch_wall - sum(self._batch_times) - (self._val_time or 0.0))
        return train + (self._val_time or 0.0) + other

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_run += 1
        done = epoch + 1
        now = time.monotonic()
        if self.epochs_run >= 2:  # a whole epoch cycle without tracing, callbacks included
            self._cycles.append(now - self._last_end)
        self._last_end = now
        if not self.stopped_early:
            # epoch 1: an estimate from its steps; then the measured epoch cycles (median of
            # the last five, so one slow epoch on a shared machine does not rule). Until half
            # the plan is done it may grow or shrink; after that it only shrinks, so the
            # schedule's end stays where it is unless the budget forces it earlier.
            recent = sorted(self._cycles[-5:])
            per_epoch = max(recent[len(recent) // 2] if recent else self._steady_epoch(), 1e-3)
            left = self.seconds - self.elapsed() - self.reserve()
            fit = done + max(0, int(left // per_epoch))
            planned = min(fit, self.max_epochs)
            early = self.planned is None or done <= self.planned // 2
            # growing is worth a change of schedule only when it adds a few epochs
            grow = early and (self.planned is None or planned >= self.planned + max(2, self.planned // 20))
            if self.planned is None or grow or planned < self.planned:
                self.planned = planned
                if self.schedule is not None:
                    self.schedule.set_total_steps(planned * self.steps)
                cap = f" (capped by trainer.max_epochs={self.max_epochs})" if fit > self.max_epochs else ""
                msg = (f"time budget {fmt_seconds(self.seconds)}: epoch {done} ended at {fmt_seconds(self.elapsed())}, "
                       f"~{fmt_seconds(per_epoch)} an epoch from now on -> {planned} epochs in all{cap}"
                       + (", learning-rate schedule set to match" if self.schedule is not None else ""))
                log.info(msg)
                self.say(msg)
        if self.planned is not None and done >= self.planned:
            self.model.stop_training = True
        self._save(done)

    def _save(self, done: int) -> None:
        if self.state_path is None:
            return
        from .callbacks import atomic_write_json

        atomic_write_json(self.state_path, self.summary(done))

    def summary(self, done: Optional[int] = None) -> dict:
        return {"budget_s": round(self.seconds, 1), "elapsed_s": round(self.elapsed(), 1) if self.start else None,
                "planned_epochs": self.planned, "epochs_done": done, "stopped_inside_epoch": self.stopped_early,
                "schedule_steps": self.schedule.total_steps if self.schedule is not None else None,
                "reserve_s": round(self.reserve(), 1)}


def load_budget_state(path) -> dict:
    """The ``budget.json`` of an earlier run of a phase ({} when there is none)."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


__all__ = ["parse_duration", "phase_budgets", "TimeBudget", "load_budget_state", "fmt_seconds"]
