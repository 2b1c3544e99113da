"""Temporary re-export shim: the task model moved to :mod:`src.models.task`, the head
vocabulary to :mod:`src.heads`.

Kept only while ``src/training/engine.py``, ``callbacks.py`` and the entry points still
import from here; it goes once they import from the new homes. New code must not import it.

:func:`load_checkpoint` here is the *training* loader: it registers the compile-time
custom objects of :mod:`src.training` (metrics, optimizers) and loads with
``compile=True`` (the optimizer and its state, as before the move); the engine's resume
needs that. ``src.models.task.load_checkpoint`` loads with ``compile=False`` by default.
"""
from __future__ import annotations

from ..heads import ACCURACY_HEADS, BINARY_HEADS, RECON_HEADS, is_aux_head, target_key  # noqa: F401
from ..models import task as _task
from ..models.task import TASK_KEYS, MultiTaskModel, split_model_config  # noqa: F401


def load_checkpoint(path, compile: bool = True) -> MultiTaskModel:
    """:func:`src.models.task.load_checkpoint` with the training metrics and optimizers
    registered first; ``compile=True`` by default (the behaviour before the move)."""
    from . import metrics as _metrics, optim as _optim  # noqa: F401

    return _task.load_checkpoint(path, compile=compile)
