"""Model registry: ``create_model(name, **cfg)``, ``list_models()``.

Each architecture module registers a builder with :func:`register_model`. Builders take
keyword arguments from the ``model`` config group (plus ``num_classes`` and
``image_size`` filled in from the data) and return a Keras model whose outputs are a
dict keyed by head name (the same names as the pipeline's targets).
"""
from __future__ import annotations

import importlib
from typing import Callable

_MODELS: dict[str, Callable] = {}
_MODULES = ("small_cnn", "detector", "mtl_unet", "efficient_mtnet")


def register_model(name: str):
    def deco(fn):
        _MODELS[name] = fn
        return fn
    return deco


def _load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__package__}.{m}")


def list_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def create_model(name: str, **cfg):
    _load_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name](**cfg)
