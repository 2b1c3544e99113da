"""Model registry: ``create_model(name, **cfg)``, ``list_models()``, ``builder_keys(name)``.

Each architecture module registers a builder with :func:`register_model`. A builder takes
keyword arguments from the ``model`` config group (plus the :data:`DATA_KEYS` filled in
from the data) and returns a Keras model whose outputs are a dict keyed by head name (the
same names as the pipeline's targets).

The contract is strict and checked here, once, for every builder: a builder accepts
exactly the keys of its signature (``**kwargs`` is refused when it is registered), and
:func:`create_model` stops on any other key with one line naming it, the closest allowed
key and the allowed ones, so a misspelt ``model.dropuot`` in a YAML file or a
``+model.dropuot=0.5`` on the command line is an error, not a silently ignored setting.
Model-config keys that belong to the task, not to the network (losses, phases, ...), are
:data:`src.models.task.TASK_KEYS`: they are not given to the builder (callers may split
them off first with :func:`src.models.task.split_model_config`, or pass the whole config),
and a misspelt one is reported like any other unknown key.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

from .task import TASK_KEYS

_MODELS: dict[str, Callable] = {}
_MODULES = ("small_cnn", "detector", "mtl_unet", "efficient_mtnet", "unet")

#: filled in from the data by the caller (the training engine passes all three to every
#: model): a builder that does not take one is simply not given it
DATA_KEYS = ("num_classes", "image_size", "class_names")


class ModelConfigError(ValueError):
    """A model config key that the model's builder does not take."""


def register_model(name: str):
    """Register a builder under ``name``; it must list every key it accepts (no ``**kwargs``)."""
    def deco(fn):
        params = inspect.signature(fn).parameters.values()
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            raise TypeError(f"model builder {name!r} takes *args/**kwargs: a builder accepts exactly its "
                            "documented keys")
        _MODELS[name] = fn
        return fn
    return deco


def _load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__package__}.{m}")


def list_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def _builder(name: str) -> Callable:
    _load_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name]


def builder_keys(name: str) -> list[str]:
    """The model-config keys the builder of ``name`` accepts (the data keys left out)."""
    return sorted(k for k in inspect.signature(_builder(name)).parameters if k not in DATA_KEYS)


def create_model(name: str, **cfg):
    """Build the registered model ``name`` from its config keys and the data keys.

    ``cfg`` may hold the task's keys (:data:`~src.models.task.TASK_KEYS`): the builder does
    not get them. Raises :class:`ModelConfigError` (a ValueError) naming every other key the
    builder does not take, e.g. ``model.dropuot (did you mean dropout?): unknown key for
    model small_cnn; allowed: bn_momentum, ..., widths (and the task's: losses, ...)``.
    """
    fn = _builder(name)
    params = inspect.signature(fn).parameters
    cfg = {k: v for k, v in cfg.items() if k in params or k not in (*DATA_KEYS, *TASK_KEYS)}
    unknown = [k for k in cfg if k not in params]
    if unknown:
        allowed = builder_keys(name)
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, [*allowed, *TASK_KEYS], n=1, cutoff=0.8)
            hints.append(f"model.{k}" + (f" (did you mean {close[0]}?)" if close else ""))
        what = "unknown key" if len(unknown) == 1 else "unknown keys"
        raise ModelConfigError(f"{', '.join(hints)}: {what} for model {name}; allowed: {', '.join(allowed)} "
                               f"(and the task's: {', '.join(k for k in TASK_KEYS if k != 'name')})")
    return fn(**cfg)
