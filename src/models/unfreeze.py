"""What part of a backbone learns: ``set_trainable(backbone, spec)`` and ``count_params``.

Specs (a mapping, e.g. from the model config; ``None`` values count as absent):

- ``{"mode": "none"}``: everything frozen;
- ``{"mode": "all"}``: everything trainable;
- ``{"fraction": 0.3}``: the LAST 30 % of the backbone's *learnable* layers are trainable.
  Learnable layers are the leaf layers (nested models flattened) that own trainable
  parameters (Conv, Dense, BatchNormalization, LayerNormalization, LayerScale, ...; not the
  statistics-only Normalization layer, not weightless layers), in topological order. With N
  of them, ``k = round(fraction * N)`` (at least 1 when fraction > 0) and every layer from
  the k-th last learnable layer on is trainable, weightless layers included;
- ``{"from_stage": "conv4"}``: that stage and every later stage are trainable (stage names
  come from the backbone: ``backbone.stage_names``).

Option ``"bn_trainable": false`` additionally freezes every BatchNormalization layer, even in
the trainable part (useful with small batches). A frozen BatchNormalization runs in
inference mode in Keras 3 (``training and self.trainable`` decides whether it normalises
with batch statistics and updates its moving mean/variance), so frozen parts keep their
ImageNet statistics even though the model is called with ``training=True``.

The summary's layer counts are over learnable layers. A compiled model must be compiled
again after its trainable set changes (the train function captured the old variables).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras

log = logging.getLogger(__name__)

MODES = ("none", "all", "fraction", "from_stage")
_KEYS = {"mode", "fraction", "from_stage", "bn_trainable"}


def _leaf_layers(model) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _containers(model) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.append(layer)
            out.extend(_containers(layer))
    return out


def count_params(model) -> dict:
    """``{"trainable", "non_trainable", "total"}`` parameter counts (shared variables once).

    Accepts a keras Model or Layer (a :class:`~src.models.backbones.Backbone` is one).
    """
    trainable_ids = {id(v) for v in model.trainable_weights}
    seen: set[int] = set()
    counts = {"trainable": 0, "non_trainable": 0}
    for v in model.weights:
        if id(v) in seen:
            continue
        seen.add(id(v))
        n = 1
        for d in v.shape:
            n *= int(d)
        counts["trainable" if id(v) in trainable_ids else "non_trainable"] += n
    counts["total"] = counts["trainable"] + counts["non_trainable"]
    return counts


def parse_spec(spec: Any) -> tuple[str, Any, bool]:
    """Normalise a spec to ``(mode, argument, bn_trainable)``; raise ValueError on a bad one."""
    if spec is None or spec is True:
        return "all", None, True
    if spec is False:
        return "none", None, True
    if isinstance(spec, str):
        spec = {"mode": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"unfreeze spec must be a mapping like {{'fraction': 0.3}}, got {spec!r}")
    spec = {k: v for k, v in dict(spec).items() if v is not None}
    unknown = set(spec) - _KEYS
    if unknown:
        raise ValueError(f"unknown unfreeze spec keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    bn_trainable = bool(spec.get("bn_trainable", True))
    given = [k for k in ("fraction", "from_stage") if k in spec]
    mode = spec.get("mode")
    if len(given) > 1:
        raise ValueError(f"unfreeze spec sets both fraction and from_stage: {spec}")
    if mode is None:
        if not given:
            raise ValueError(f"unfreeze spec needs mode, fraction or from_stage: {spec}")
        mode = given[0]
    if mode not in MODES:
        raise ValueError(f"unfreeze mode must be one of {MODES}, got {mode!r}")
    if mode in ("none", "all"):
        if given:
            raise ValueError(f"unfreeze mode {mode!r} takes no {given[0]}: {spec}")
        return mode, None, bn_trainable
    if mode not in spec:
        raise ValueError(f"unfreeze mode {mode!r} needs a value for {mode!r}: {spec}")
    if given and given[0] != mode:
        raise ValueError(f"unfreeze mode {mode!r} conflicts with {given[0]}: {spec}")
    arg = spec[mode]
    if mode == "fraction":
        arg = float(arg)
        if not 0.0 <= arg <= 1.0:
            raise ValueError(f"unfreeze fraction must be in [0, 1], got {arg}")
    else:
        arg = str(arg)
    return mode, arg, bn_trainable


def set_trainable(backbone, spec: Any) -> dict:
    """Set which backbone layers learn; return a summary and log one line.

    Args:
        backbone: a :class:`src.models.backbones.Backbone` (any mode), or a plain keras
            Model (every mode but ``from_stage``, which needs the backbone's stages).
        spec: see the module docstring.

    Returns:
        ``{"mode", "trainable_layers", "total_layers", "trainable_params",
        "non_trainable_params", "first_trainable_layer"}`` (layers = learnable layers).
    """
    mode, arg, bn_trainable = parse_spec(spec)
    # reset: the model and nested models stay trainable containers, their leaf layers decide
    # (a Functional model's `trainable` setter does not reach its layers)
    backbone.trainable = True
    for container in _containers(backbone):
        container.trainable = True
    leaves = backbone.leaf_layers() if hasattr(backbone, "leaf_layers") else _leaf_layers(backbone)
    for layer in leaves:
        layer.trainable = True
    learnable = [i for i, layer in enumerate(leaves) if layer.trainable_weights]

    if mode == "all":
        flags = [True] * len(leaves)
    elif mode == "none":
        flags = [False] * len(leaves)
    elif mode == "fraction":
        k = int(round(arg * len(learnable)))
        if arg > 0:
            k = max(k, 1)
        start = learnable[-k] if k else len(leaves)
        flags = [i >= start for i in range(len(leaves))]
    else:  # from_stage
        stage_names = getattr(backbone, "stage_names", None)
        if stage_names is None:
            raise ValueError("unfreeze from_stage needs a Backbone (with stage names), not a plain model")
        if arg not in stage_names:
            raise ValueError(f"unknown stage {arg!r} for backbone {backbone.architecture}; stages: {stage_names}")
        first = stage_names.index(arg)
        order = {s: i for i, s in enumerate(stage_names)}
        flags = [order[backbone.stage_of(layer)] >= first for layer in leaves]

    if not bn_trainable:
        flags = [f and not isinstance(layer, keras.layers.BatchNormalization) for f, layer in zip(flags, leaves)]
    for layer, flag in zip(leaves, flags):
        layer.trainable = flag

    trainable_idx = [i for i in learnable if flags[i]]
    params = count_params(backbone)
    summary = {
        "mode": mode if arg is None else f"{mode}={arg}",
        "trainable_layers": len(trainable_idx),
        "total_layers": len(learnable),
        "trainable_params": params["trainable"],
        "non_trainable_params": params["non_trainable"],
        "first_trainable_layer": leaves[trainable_idx[0]].name if trainable_idx else None,
    }
    log.info("unfreeze: %d/%d layers, %d trainable params (%s%s, first trainable: %s)",
             summary["trainable_layers"], summary["total_layers"], summary["trainable_params"],
             summary["mode"], "" if bn_trainable else ", BatchNorm frozen", summary["first_trainable_layer"])
    return summary
