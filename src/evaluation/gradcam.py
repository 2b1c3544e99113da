"""Grad-CAM and Grad-CAM++ for any head of any model of this library.

Usage::

    cam = GradCAM(model)                       # auto: last 4-D feature map feeding the head
    res = cam(images, head="class")            # images: [B, H, W, 3] floats in [0, 1]
    res.cams                                   # [B, H, W] in [0, 1], at the input size
    GradCAM(model, layer="backbone/conv5_block3_out")(images, class_index=2, method="gradcam++")

``model`` is a :class:`~src.models.task.MultiTaskModel` (its ``network`` is used)
or a functional Keras model whose outputs are a dict keyed by head name.

Nested backbones without "Graph disconnected"
---------------------------------------------
The usual recipe, ``keras.Model(model.input, [model.get_layer("backbone").get_layer(X).output,
model.output])``, fails for a layer inside a nested sub-model: ``X.output`` belongs to the
sub-model's own graph (its own ``Input``), not to the outer one. Here nothing is rebuilt
from tensors of another graph. The network is *run* node by node (:func:`walk`), in the
order of its functional graph, and when the walk reaches the nested model that holds the
target layer it descends and runs that model node by node too, keeping the target
layer's output on the way. The whole walk runs inside ``tf.GradientTape`` (eagerly, or
traced once per head and method by ``tf.function`` with ``graph=True``), so the gradient
of the head's score with respect to the kept feature map is exact, for any depth of
nesting, any number of heads and with skip connections around the target layer. Layers
run in inference mode (dropout off, BatchNorm moving statistics).

Layer names: ``"backbone/conv5_block3_out"`` (a path through nested models), a bare name
found anywhere when it is unique (``"conv5_block3_out"``; a layer giving ViT tokens
``[B, N, D]`` such as ``"backbone/block11"`` is explained on its patch tokens as their
grid, class token left out: :func:`token_grid`), or ``None``: the 4-D feature
map closest to the head that every path from the input to the head passes through (so
``P5`` of a detector, the last stage of ``small_cnn``, the bottleneck of a U-Net; for a
dense head such as ``mask``, the last decoder map with more channels than the head's
logits), found inside the nested backbone when the head reads one of its outputs. A map
of 1x1 spatial size is taken only when no larger one dominates the head.

Scores (what is explained, per head output shape; logits are used where the head ends
in a softmax/sigmoid ``Activation``, so saturated probabilities still give gradients):

* ``[B, K]`` (class, multilabel, subtype): the logit of ``class_index`` (default: the
  predicted class, the argmax). With ``against=k`` instead: the log-odds of *any class
  but k* against class ``k``, ``logsumexp(z_j, j != k) - z_k`` (a softmax head); with
  ``k`` = ``no_tumor`` that is the tumour-vs-healthy decision, which looks at the lesion
  where a subtype's own logit may look at where the lesion usually sits.
* ``[B]`` / ``[B, 1]`` (tumor): the logit for ``class_index`` 1 (tumour), its negative
  for 0 (healthy); default the predicted one (``p >= 0.5``).
* ``[B, K, 4]`` (boxes): the mean of the 4 coordinates of slot ``class_index`` (default
  the argmax of the model's class head when it has one, else 0).
* ``[B, H, W, C]`` (mask, recon): the mean logit of channel ``class_index`` (default 0)
  over the predicted foreground (``p >= 0.5``; the whole image when none): Seg-Grad-CAM.

Methods: ``gradcam`` (channel weights = spatial mean of the gradients) and ``gradcam++``
(Chattopadhay et al. 2018: weights = sum of ``alpha * relu(grad)`` with
``alpha = g^2 / (2 g^2 + sum(A) g^3)``). Maps are ReLU'd, resized bilinearly to the input
size and min-max normalised per image.

Also here: :func:`cam_to_mask` (threshold / Otsu + largest connected component) and
:func:`overlay` / :func:`save_overlay` (jet colormap blended, PNG); a pseudo mask's Dice is
:func:`src.evaluation.metrics.dice_iou`.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import keras
import numpy as np

from ..inference import fit_text_scale

METHODS = ("gradcam", "gradcam++")
_SQUASH = ("softmax", "sigmoid")


class GradCamError(ValueError):
    """A layer or head that Grad-CAM cannot use (named in the message)."""


# ---------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------
def as_functional(model) -> keras.Model:
    """The functional graph behind ``model`` (MultiTaskModel -> its network; Sequential ->
    its internal functional model)."""
    net = getattr(model, "network", None)
    if isinstance(net, keras.Model):
        model = net
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise GradCamError(f"Sequential model {model.name!r} is not built (call it once first)")
        return model._functional
    if not hasattr(model, "_nodes_by_depth") or not hasattr(model, "_outputs_struct"):
        raise GradCamError(f"{type(model).__name__} {getattr(model, 'name', '')!r} is not a functional Keras "
                           "model; Grad-CAM walks functional graphs (build models with keras.Model(inputs, outputs))")
    return model


def _is_graph_model(op) -> bool:
    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None) is not None
    return isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth") and hasattr(op, "_outputs_struct")


def _producer(t):
    op, node_index, tensor_index = t._keras_history
    return op, op._inbound_nodes[node_index], tensor_index


def _parents(t, input_ids) -> list:
    if id(t) in input_ids:
        return []
    _, node, _ = _producer(t)
    return [] if node.is_input else list(node.input_tensors)


def _spatial(t) -> int:
    h, w = t.shape[1], t.shape[2]
    return (h or 2) * (w or 2)


def output_dict(model) -> dict:
    """``{head: symbolic output tensor}`` of a functional model (a single output is ``output``)."""
    f = as_functional(model)
    out = f._outputs_struct
    if isinstance(out, Mapping):
        return dict(out)
    flat = list(f.outputs)
    names = list(getattr(f, "output_names", None) or [])
    if len(names) != len(flat):
        names = ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]
    return dict(zip(names, flat))


def default_head(model) -> str:
    outs = output_dict(model)
    for h in ("class", "multilabel", "subtype", "tumor", "mask", "boxes"):
        if h in outs:
            return h
    return next(iter(outs))


@dataclasses.dataclass(frozen=True)
class Target:
    """A feature map inside a (possibly nested) functional model: the output
    ``index`` of the layer reached by ``path`` (outer -> inner names); ``nodes`` pins the
    call of each layer (None = its first call in that graph)."""

    path: tuple
    nodes: tuple
    index: int = 0
    grid: Optional[tuple] = None   # (prefix, h, w) of a token layer [B, prefix + h*w, D]; None for a 4-D map

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _first_node(fmodel, op):
    for depth in sorted(fmodel._nodes_by_depth, reverse=True):
        for node in fmodel._nodes_by_depth[depth]:
            if node.operation is op:
                return node
    return None


def _inner_output(op, tensor_index):
    return as_functional(op).outputs[tensor_index]


def _dominates(t, head_t, input_ids) -> bool:
    """Every path from the model's inputs to ``head_t`` passes through ``t``."""
    stack, seen = [head_t], {id(t)}
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if id(x) in input_ids:
            return False
        stack.extend(_parents(x, input_ids))
    return True


def _has_weights_upstream(t, input_ids, cache) -> bool:
    key = id(t)
    if key in cache:
        return cache[key]
    stack, seen, found = [t], set(), False
    while stack and not found:
        x = stack.pop()
        if id(x) in seen or id(x) in input_ids:
            continue
        seen.add(id(x))
        op, _, _ = _producer(x)
        if op is not None and op.weights:
            found = True
        stack.extend(_parents(x, input_ids))
    cache[key] = found
    return found


def _auto_in(fmodel, head_t, include_self: bool, min_channels: int = 1):
    """(steps, index, spatial) of the dominating 4-D map closest to ``head_t`` in
    ``fmodel`` (descending into nested models), or None. Maps with fewer than
    ``min_channels`` channels (a dense head's own logit maps) are passed over."""
    input_ids = {id(x) for x in fmodel.inputs}
    cache: dict = {}
    fallback = None
    queue, seen = deque([(head_t, 0)]), set()
    while queue:
        t, dist = queue.popleft()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in input_ids:
            continue
        ok = (include_self or dist > 0) and len(t.shape) == 4 and (t.shape[-1] or min_channels) >= min_channels
        if ok and _has_weights_upstream(t, input_ids, cache) and _dominates(t, head_t, input_ids):
            op, node, ti = _producer(t)
            found = None
            if _is_graph_model(op):
                inner = _auto_in(as_functional(op), _inner_output(op, ti), include_self=True,
                                 min_channels=min_channels)
                if inner is not None:
                    steps, idx, sp = inner
                    found = ([(op.name, node)] + steps, idx, sp)
            if found is None:
                found = ([(op.name, node)], ti, _spatial(t))
            if found[2] > 1:
                return found
            fallback = fallback or found
        for p in _parents(t, input_ids):
            queue.append((p, dist + 1))
    return fallback


def auto_target(model, head: Optional[str] = None) -> Target:
    """The feature map Grad-CAM uses by default for ``head`` (see the module docstring)."""
    f = as_functional(model)
    head = head or default_head(model)
    outs = output_dict(f)
    if head not in outs:
        raise GradCamError(f"model has no head {head!r}; heads: {sorted(outs)}")
    shape = outs[head].shape
    # a dense head (mask, recon: [B, H, W, C]) is explained at a map richer than its logits
    min_channels = int(shape[-1]) + 1 if len(shape) == 4 and shape[-1] else 1
    found = _auto_in(f, outs[head], include_self=False, min_channels=min_channels)
    if found is None:
        raise GradCamError(f"no 4-D feature map [B, H, W, C] feeds head {head!r}; name one with layer=...")
    steps, idx, _ = found
    return Target(tuple(s[0] for s in steps), tuple(s[1] for s in steps), idx)


def _find_paths(fmodel, name, prefix=()) -> list:
    hits = []
    for layer in fmodel.layers:
        if layer.name == name:
            hits.append(prefix + (name,))
        if _is_graph_model(layer):
            hits.extend(_find_paths(as_functional(layer), name, prefix + (layer.name,)))
    return hits


def resolve_target(model, layer: Union[None, str, Target] = None, head: Optional[str] = None) -> Target:
    """A :class:`Target` from a layer path (``"backbone/conv5_block3_out"``), a bare unique
    layer name, or None (auto, for ``head``)."""
    if isinstance(layer, Target):
        return layer
    if layer is None or layer == "auto":
        return auto_target(model, head)
    f = as_functional(model)
    parts = tuple(p for p in str(layer).split("/") if p)
    paths = []
    try:
        m = f
        for i, p in enumerate(parts):
            lyr = m.get_layer(p)
            if i < len(parts) - 1:
                if not _is_graph_model(lyr):
                    raise ValueError(p)
                m = as_functional(lyr)
        paths = [parts]
    except ValueError:
        if len(parts) == 1:
            paths = _find_paths(f, parts[0])
    if not paths:
        raise GradCamError(f"no layer {layer!r} in model {f.name!r} (nested layers are named "
                           f"'<submodel>/<layer>', e.g. 'backbone/conv5_block3_out')")
    if len(paths) > 1:
        raise GradCamError(f"layer name {layer!r} is ambiguous: {['/'.join(p) for p in paths]}; give the full path")
    path = paths[0]
    # check the layer gives one 4-D map
    m, lyr = f, None
    for p in path:
        lyr = m.get_layer(p)
        if _is_graph_model(lyr):
            m = as_functional(lyr)
    outs = [t for t in (as_functional(lyr).outputs if _is_graph_model(lyr) else _layer_outputs(lyr))]
    if len(outs) != 1:
        raise GradCamError(f"layer {'/'.join(path)!r} has {len(outs)} outputs; name a layer inside it")
    shape = tuple(outs[0].shape)
    grid = token_grid(shape[1], f.inputs[0].shape[1:3]) if len(shape) == 3 and shape[1] else None
    if len(shape) != 4 and grid is None:
        raise GradCamError(f"layer {'/'.join(path)!r} gives shape {shape}; Grad-CAM needs a 4-D feature map "
                           "[B, H, W, C] or tokens [B, N, C] that form a grid of the image's shape")
    return Target(path, (None,) * len(path), 0, grid)


def token_grid(n_tokens: int, image_hw) -> Optional[tuple]:
    """``(prefix, h, w)`` of ``n_tokens`` tokens of an image of ``image_hw`` pixels (a ViT
    block's output): the fewest prefix (class / register) tokens, at most 8, after which
    the rest form a grid of the image's aspect ratio; None when there is no such grid."""
    ih, iw = int(image_hw[0]), int(image_hw[1])
    for prefix in range(0, min(9, n_tokens)):
        n = n_tokens - prefix
        h = int(round(np.sqrt(n * ih / iw)))
        if h > 0 and n % h == 0 and abs((n // h) * ih - h * iw) <= max(ih, iw) // h:
            return prefix, h, n // h
    return None


def _as_map(t, grid, tf):
    """Tokens ``[B, prefix + h*w, D]`` -> ``[B, h, w, D]`` (the prefix tokens left out)."""
    prefix, h, w = grid
    return tf.reshape(t[:, prefix:], [-1, h, w, t.shape[-1]])


def _layer_outputs(layer) -> list:
    if not layer._inbound_nodes:
        raise GradCamError(f"layer {layer.name!r} was never called in the model graph")
    return list(layer._inbound_nodes[0].outputs)


def _call(op, args, kwargs, training):
    if "training" in getattr(op, "_call_context_args", ()):
        kwargs = {**kwargs, "training": training}
    return op(*args, **kwargs)


def walk(model, inputs, target: Optional[Target] = None, training: bool = False, keep: Sequence = ()):
    """Run the functional ``model`` on ``inputs`` node by node.

    Returns ``(outputs, feature, kept)``: the model's outputs (its own structure), the
    output of ``target`` (descending into nested models; None without a target) and
    ``{id(t): value}`` for the symbolic tensors ``t`` of this graph listed in ``keep``.
    """
    import keras.src.tree as tree

    f = as_functional(model)
    flat = f._standardize_inputs(inputs) if hasattr(f, "_standardize_inputs") else tree.flatten(inputs)
    values = {id(x): y for x, y in zip(f.inputs, flat)}
    step_name, step_node = (target.path[0], target.nodes[0]) if target else (None, None)
    if target is not None and step_node is None:
        try:
            step_node = _first_node(f, f.get_layer(step_name))
        except ValueError:
            step_node = None
        if step_node is None:
            raise GradCamError(f"layer {step_name!r} is not called in model {f.name!r}")
    feature = None
    for depth in sorted(f._nodes_by_depth, reverse=True):
        for node in f._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(x) not in values for x in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(values)
            op = node.operation
            if node is step_node and len(target.path) > 1:
                sub = Target(target.path[1:], target.nodes[1:], target.index)
                outputs, feature, _ = walk(op, args[0] if len(args) == 1 else list(args), sub, training)
            else:
                outputs = _call(op, args, kwargs, training)
                if node is step_node:
                    feature = tree.flatten(outputs)[target.index]
            for x, y in zip(node.outputs, tree.flatten(outputs)):
                values[id(x)] = y
    missing = [i for i, x in enumerate(f.outputs) if id(x) not in values]
    if missing:
        raise GradCamError(f"outputs {missing} of {f.name!r} are not connected to its inputs")
    outs = tree.pack_sequence_as(f._outputs_struct, [values[id(x)] for x in f.outputs])
    return outs, feature, {id(t): values[id(t)] for t in keep if id(t) in values}


def logit_tensor(head_t):
    """The pre-activation tensor of a head that ends in a softmax/sigmoid ``Activation``
    (through weight-free reshaping layers such as a squeeze), else None."""
    t = head_t
    for _ in range(4):
        op, node, _ = _producer(t)
        if op is None or node.is_input or len(node.input_tensors) != 1:
            return None
        if isinstance(op, keras.layers.Activation):
            name = getattr(op.activation, "__name__", "")
            return node.input_tensors[0] if name in _SQUASH else None
        if op.weights or int(np.prod([d or 1 for d in t.shape[1:]])) != int(
                np.prod([d or 1 for d in node.input_tensors[0].shape[1:]])):
            return None
        t = node.input_tensors[0]
    return None


# ---------------------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class CamResult:
    cams: np.ndarray          # [B, H, W] float32 in [0, 1] at the input size
    raw: np.ndarray           # [B, h, w] float32, the ReLU'd map at the feature resolution
    class_index: np.ndarray   # [B] int: what was explained (-1: "not class k" against k, ``against=k``)
    outputs: dict             # {head: np.ndarray} model outputs for these images
    head: str
    layer: str
    method: str


def _score(out, logit, idx, tf):
    """Per-image scalar score of ``out`` (see the module docstring); ``idx`` int32 [B]."""
    src = logit if logit is not None else out
    src = tf.cast(src, tf.float32)
    out = tf.cast(out, tf.float32)
    rank = len(out.shape)
    if rank == 1 or (rank == 2 and out.shape[-1] == 1):
        v = tf.reshape(src, [-1])
        if logit is None:
            v = tf.where(idx == 1, v, 1.0 - v)
            return v
        return tf.where(idx == 1, v, -v)
    if rank == 2:
        return tf.gather(src, idx, axis=1, batch_dims=1)
    if rank == 3:
        return tf.reduce_mean(tf.gather(src, idx, axis=1, batch_dims=1), axis=-1)
    if rank == 4:
        ch = tf.gather(src, idx, axis=3, batch_dims=1)
        p = tf.gather(out, idx, axis=3, batch_dims=1)
        fg = tf.cast(p >= 0.5, tf.float32)
        n = tf.reduce_sum(fg, axis=[1, 2])
        fg = tf.where((n > 0)[:, None, None], fg, tf.ones_like(fg))
        return tf.reduce_sum(ch * fg, axis=[1, 2]) / tf.reduce_sum(fg, axis=[1, 2])
    raise GradCamError(f"cannot explain an output of rank {rank}")


def _against_score(out, logit, k: int, tf):
    """Per-image log-odds of "any class but ``k``" against class ``k`` of a ``[B, K]`` head:
    ``logsumexp(z_j, j != k) - z_k`` on the logits, or ``log(1 - p_k) - log(p_k)`` when
    only probabilities are reachable (the same number for a softmax)."""
    if len(out.shape) != 2 or int(out.shape[-1]) < 2 or not 0 <= k < int(out.shape[-1]):
        raise GradCamError(f"against={k}: needs a head of K >= 2 class outputs with 0 <= k < K; "
                           f"output shape {tuple(out.shape)}")
    if logit is not None:
        z = tf.cast(logit, tf.float32)
        others = tf.concat([z[:, :k], z[:, k + 1:]], axis=1)
        return tf.reduce_logsumexp(others, axis=1) - z[:, k]
    pk = tf.clip_by_value(tf.cast(out, tf.float32)[:, k], 1e-7, 1.0 - 1e-7)
    return tf.math.log(1.0 - pk) - tf.math.log(pk)


def _default_index(head, outs, tf):
    out = tf.cast(outs[head], tf.float32)
    rank = len(out.shape)
    if rank == 1 or (rank == 2 and out.shape[-1] == 1):
        return tf.cast(tf.reshape(out, [-1]) >= 0.5, tf.int32)
    if rank == 2:
        return tf.cast(tf.argmax(out, axis=-1), tf.int32)
    b = tf.shape(out)[0]
    if rank == 3:
        for h in ("class", "multilabel"):
            if h in outs and len(outs[h].shape) == 2 and outs[h].shape[-1] == out.shape[1]:
                return tf.cast(tf.argmax(outs[h], axis=-1), tf.int32)
    return tf.zeros([b], tf.int32)


class GradCAM:
    """Grad-CAM / Grad-CAM++ of one feature map for every head of ``model``.

    Args:
        model: a MultiTaskModel or functional Keras model (dict outputs by head).
        layer: ``"backbone/<layer>"``, a unique bare layer name, a :class:`Target`, or
            None (auto, chosen per head).
        graph: False (default) runs eagerly: no tracing cost, best for a few batches; True
            traces the computation once per head and method with ``tf.function``
            (seconds to trace a large model, then fast for many batches).
    """

    def __init__(self, model, layer: Union[None, str, Target] = None, graph: bool = False):
        self.network = as_functional(model)
        self.layer = layer
        self.graph = bool(graph)
        self._fns: dict = {}
        self._targets: dict = {}
        shape = self.network.inputs[0].shape
        self.input_shape = tuple(shape[1:])

    def target(self, head: Optional[str] = None) -> Target:
        head = head or default_head(self.network)
        if head not in self._targets:
            self._targets[head] = resolve_target(self.network, self.layer, head)
        return self._targets[head]

    def _fn(self, head: str, method: str, explicit: bool, against: Optional[int] = None):
        import tensorflow as tf

        key = (head, method, explicit, against)
        if key in self._fns:
            return self._fns[key]
        target = self.target(head)
        outs_sym = output_dict(self.network)
        if head not in outs_sym:
            raise GradCamError(f"model has no head {head!r}; heads: {sorted(outs_sym)}")
        logit_t = logit_tensor(outs_sym[head])
        keep = [logit_t] if logit_t is not None else []
        net = self.network
        dtype = net.inputs[0].dtype or "float32"

        def fn(x, idx):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outs, feat, kept = walk(net, x, target, training=False, keep=keep)
                outs = outs if isinstance(outs, Mapping) else {"output": outs}
                logit = kept.get(id(logit_t)) if logit_t is not None else None
                if logit is not None:
                    logit = tf.reshape(tf.cast(logit, tf.float32), tf.shape(outs[head]))
                if against is not None:
                    cls = tf.fill(tf.shape(idx), -1)
                    score = tf.reduce_sum(_against_score(outs[head], logit, against, tf))
                else:
                    cls = idx if explicit else _default_index(head, outs, tf)
                    score = tf.reduce_sum(_score(outs[head], logit, cls, tf))
            a = tf.cast(feat, tf.float32)
            g = tf.cast(tape.gradient(score, feat), tf.float32)
            if target.grid is not None:  # ViT tokens: the patch tokens as their grid
                a, g = _as_map(a, target.grid, tf), _as_map(g, target.grid, tf)
            if method == "gradcam":
                w = tf.reduce_mean(g, axis=[1, 2])
            else:
                g2 = g * g
                g3 = g2 * g
                denom = 2.0 * g2 + tf.reduce_sum(a, axis=[1, 2], keepdims=True) * g3
                alpha = g2 / tf.where(tf.abs(denom) > 0, denom, tf.ones_like(denom))
                w = tf.reduce_sum(alpha * tf.nn.relu(g), axis=[1, 2])
            cam = tf.nn.relu(tf.reduce_sum(a * w[:, None, None, :], axis=-1))
            return cam, cls, {k: tf.cast(v, tf.float32) for k, v in outs.items()}

        spec = [tf.TensorSpec([None, *self.input_shape], dtype), tf.TensorSpec([None], tf.int32)]
        self._fns[key] = tf.function(fn, input_signature=spec) if self.graph else fn
        return self._fns[key]

    def __call__(self, images, head: Optional[str] = None, class_index=None, method: str = "gradcam",
                 against: Optional[int] = None) -> CamResult:
        """CAMs of ``images`` for ``head``: of ``class_index`` (default: the prediction), or,
        with ``against=k``, of the log-odds of any other class against class ``k`` (then
        ``class_index`` is ignored and ``CamResult.class_index`` is -1)."""
        import tensorflow as tf

        if method not in METHODS:
            raise GradCamError(f"method must be one of {METHODS}, got {method!r}")
        head = head or default_head(self.network)
        x = np.asarray(images, np.float32)
        if x.ndim == 3:
            x = x[None]
        b = x.shape[0]
        explicit = class_index is not None
        idx = np.broadcast_to(np.asarray(class_index if explicit else 0, np.int32), (b,)).copy()
        against = None if against is None else int(against)
        cam, cls, outs = self._fn(head, method, explicit, against)(tf.convert_to_tensor(x), tf.convert_to_tensor(idx))
        raw = cam.numpy()
        up = tf.image.resize(cam[..., None], x.shape[1:3], method="bilinear")[..., 0].numpy()
        lo = up.reshape(b, -1).min(axis=1)[:, None, None]
        hi = up.reshape(b, -1).max(axis=1)[:, None, None]
        cams = np.where(hi - lo > 1e-12, (up - lo) / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)
        return CamResult(cams=cams, raw=raw, class_index=cls.numpy(), outputs={k: v.numpy() for k, v in outs.items()},
                         head=head, layer=self.target(head).name, method=method)


def gradcam(model, images, head: Optional[str] = None, class_index=None, layer=None,
            method: str = "gradcam") -> CamResult:
    """One-call Grad-CAM (see :class:`GradCAM`)."""
    return GradCAM(model, layer)(images, head=head, class_index=class_index, method=method)


def gradcam_plus_plus(model, images, head: Optional[str] = None, class_index=None, layer=None) -> CamResult:
    return gradcam(model, images, head=head, class_index=class_index, layer=layer, method="gradcam++")


# ---------------------------------------------------------------------------------------
# pseudo-masks, Dice, overlays
# ---------------------------------------------------------------------------------------
def cam_to_mask(cam: np.ndarray, threshold: Union[float, str] = 0.5, largest_component: bool = True) -> np.ndarray:
    """A CAM in [0, 1] ([H, W]) -> uint8 0/1 pseudo-mask.

    ``threshold``: a number in [0, 1] or ``"otsu"`` (Otsu's threshold on the map).
    ``largest_component``: keep only the largest 8-connected region.
    """
    import cv2

    c = np.asarray(cam, np.float32)
    if c.ndim != 2:
        raise ValueError(f"cam must be 2-D [H, W], got shape {c.shape}")
    c = np.clip(np.nan_to_num(c), 0.0, 1.0)
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
        u8 = np.round(c * 255).astype(np.uint8)
        if u8.min() == u8.max():
            return np.zeros(c.shape, np.uint8)
        _, m = cv2.threshold(u8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        m = m.astype(np.uint8)
    else:
        m = (c >= float(threshold)).astype(np.uint8)
    if largest_component and m.any():
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n > 2:
            k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            m = (lab == k).astype(np.uint8)
    return m


def _to_uint8_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.dtype != np.uint8:
        img = np.clip(np.asarray(img, np.float32) * (255.0 if img.max() <= 1.0 + 1e-6 else 1.0), 0, 255)
        img = np.round(img).astype(np.uint8)
    return img


def overlay(image, cam: np.ndarray, alpha: float = 0.4, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB uint8 ``image`` (or float [0, 1]) blended with the jet-coloured ``cam``; an
    optional binary ``mask`` (e.g. the true mask) is outlined in white."""
    import cv2

    img = _to_uint8_rgb(image)
    c = np.asarray(cam, np.float32)
    if c.shape != img.shape[:2]:
        c = cv2.resize(c, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.round(np.clip(c, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0)
    if mask is not None:
        m = np.asarray(mask).astype(np.uint8)
        if m.ndim == 3:
            m = m[..., 0]
        if m.shape != img.shape[:2]:
            m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


def save_overlay(path, image, cam: np.ndarray, alpha: float = 0.4, mask: Optional[np.ndarray] = None,
                 title: Optional[str] = None, side_by_side: bool = True, min_height: int = 0) -> Path:
    """Write a PNG: the image and its Grad-CAM overlay side by side (or the overlay alone).

    ``min_height``: small images are enlarged (nearest neighbour, integer factor) to at
    least this height so the title stays readable; ``title`` goes in a band above.
    """
    import cv2

    img = _to_uint8_rgb(image)
    ov = overlay(img, cam, alpha=alpha, mask=mask)
    pic = np.concatenate([img, ov], axis=1) if side_by_side else ov
    if min_height and pic.shape[0] < min_height:
        f = int(np.ceil(min_height / pic.shape[0]))
        pic = cv2.resize(pic, (pic.shape[1] * f, pic.shape[0] * f), interpolation=cv2.INTER_NEAREST)
    if title:
        scale = fit_text_scale(title, pic.shape[1])
        (_, th), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        band = np.zeros((th + base + 8, pic.shape[1], 3), np.uint8)
        cv2.putText(band, title, (3, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        pic = np.concatenate([band, pic], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(pic, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
