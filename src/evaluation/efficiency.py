"""`python -m src.evaluation.efficiency model=<name> [model.context=attention] [image_size=640] [batch=8]`

Prints a JSON record of what a registered model costs: parameters, FLOPs counted from
the compiled graph, images/s at batch 1 and batch N, and peak memory. ``measure(model,
image_size, batch)`` does the same for any Keras model (every ``src.models.list_models()``
entry builds with ``weights=None``; pretrained weights change nothing measured here).

What is measured, exactly
-------------------------
* **Parameters**: ``total`` (= ``model.count_params()``), ``trainable``, ``non_trainable``
  (BatchNorm moving statistics, fixed NMF bases).
* **FLOPs**: the inference function ``model(x, training=False)`` at batch 1 is traced
  with ``tf.function``, its variables frozen into constants
  (``convert_variables_to_constants_v2``) and the graph counted by TensorFlow's profiler
  (``tf.compat.v1.profiler`` with ``float_operation()``), so everything in the graph
  counts, attention matmuls included, not only layers a hand-written table knows.
  The profiler's convention: one multiply-add = **2 FLOPs** (Conv2D:
  ``2 * H_out * W_out * C_in * C_out * k * k``; MatMul/BatchMatMul: ``2 * M * N * K``
  per matrix), elementwise ops 1 per output element (BiasAdd, Add, Mul, ...), softmax 5
  per element. Ops without registered statistics (resize, pooling, reductions such as
  the BatchNorm-folded graph's ``Mean``; ``Einsum``) count 0 and are listed under
  ``uncounted_ops``. ``gmacs`` = conv + matmul FLOPs / 2, the unit most papers (and the
  thop / ptflops counters behind published "GFLOPs") actually report.
* **Speed**: images/s of the ``tf.function`` (optionally XLA-compiled) inference call on
  a constant batch after ``warmup`` calls, over ``steps`` calls, at batch 1 and batch N;
  the last result is fetched to host so GPU work is included. No data loading.
* **Peak memory** of one batch-N inference call (after a first, untimed call): the peak
  of TensorFlow's allocator on the device (``tf.config.experimental.get_memory_info``
  after ``reset_memory_stats``; on GPU and, in TF 2.21, also on ``CPU:0``):
  ``peak_bytes`` includes what was resident before the call (weights, input),
  ``peak_over_start_bytes`` only the activations and workspace of the call. Scratch
  memory that oneDNN/XLA kernels take outside TensorFlow's allocator is not seen.
  ``tracemalloc`` would see only Python objects (~0 here). Where the allocator keeps no
  statistics, the growth of the process' peak resident set is reported instead
  (``VmHWM`` of ``/proc/self/status`` reset through ``/proc/self/clear_refs``, else
  ``ru_maxrss``): an upper bound including allocator caching; ``method`` says which.
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Optional, Sequence

log = logging.getLogger(__name__)

#: op types whose FLOPs are conv/matmul multiply-adds (the "MACs" of papers)
MAC_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3",
           "Conv2DBackpropInput", "Conv3D")
#: op types that do arithmetic but that the profiler has no statistics for
_KNOWN_UNCOUNTED = ("Einsum", "ResizeBilinear", "ResizeNearestNeighbor", "AvgPool", "MaxPool", "Mean", "Sum",
                    "Sigmoid", "Relu", "Relu6", "Tanh", "Exp", "Log", "Sqrt", "Rsqrt", "Square", "Maximum", "Minimum",
                    "Select", "SelectV2", "FusedBatchNormV3")


def _size(image_size):
    if isinstance(image_size, (int, float)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def _input_shape(model, image_size):
    """``(H, W, C)`` of the model input; ``image_size`` overrides H, W when given."""
    shape = tuple(model.input.shape[1:]) if not isinstance(model.input, dict) else tuple(
        next(iter(model.input.values())).shape[1:])
    if image_size is not None:
        h, w = _size(image_size)
        shape = (h, w, shape[-1] if shape and shape[-1] else 3)
    if any(s is None for s in shape):
        raise ValueError(f"model input {shape} has unknown dimensions: pass image_size")
    return tuple(int(s) for s in shape)


# ---------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------
def count_params(model) -> dict:
    import numpy as np

    trainable = int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))
    non_trainable = int(sum(int(np.prod(v.shape)) for v in model.non_trainable_weights))
    return {"total": trainable + non_trainable, "trainable": trainable, "non_trainable": non_trainable}


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------
def _inference_fn(model, jit_compile: bool = False):
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False), jit_compile=bool(jit_compile))


def frozen_graph(model, input_shape, batch: int = 1):
    """The inference graph of ``model`` at ``[batch, *input_shape]`` with variables as constants."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = _inference_fn(model)
    concrete = fn.get_concrete_function(tf.TensorSpec([batch, *input_shape], model.inputs[0].dtype or "float32"))
    frozen = convert_variables_to_constants_v2(concrete)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
    return graph


def count_flops(model, image_size=None, batch: int = 1) -> dict:
    """FLOPs of one inference call at ``batch`` (see the module doc for the convention).

    Returns ``{"flops": total, "per_image": total / batch, "gflops": ..., "gmacs": ...,
    "by_op": {op type: flops}, "uncounted_ops": {op type: count}}``.
    """
    import tensorflow as tf

    shape = _input_shape(model, image_size)
    graph = frozen_graph(model, shape, batch)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    prof = tf.compat.v1.profiler.profile(graph, cmd="scope", options=opts)
    total = int(prof.total_float_ops)
    # the scope tree holds every node's own FLOPs; group them by op type
    by_op: dict = {}
    stack = list(prof.children)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.float_ops:
            try:
                op_type = graph.get_operation_by_name(node.name).type
            except (KeyError, ValueError):
                op_type = "other"
            by_op[op_type] = by_op.get(op_type, 0) + int(node.float_ops)
    counted = set(by_op)
    uncounted: dict = {}
    for op in graph.get_operations():
        if op.type in _KNOWN_UNCOUNTED and op.type not in counted:
            uncounted[op.type] = uncounted.get(op.type, 0) + 1
    macs = sum(v for k, v in by_op.items() if k in MAC_OPS) / 2.0
    return {"flops": total, "per_image": total / batch, "gflops": total / batch / 1e9,
            "gmacs": macs / batch / 1e9, "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "uncounted_ops": uncounted, "batch": batch, "convention": "2 FLOPs per multiply-add (tf profiler)"}


# ---------------------------------------------------------------------------------------
# speed and memory
# ---------------------------------------------------------------------------------------
def _fetch(out):
    import tensorflow as tf

    for v in tf.nest.flatten(out):
        v.numpy()


def throughput(model, image_size=None, batch: int = 1, warmup: int = 2, steps: int = 10,
               jit_compile: bool = False, fn=None) -> dict:
    """Images/s of ``model(x, training=False)`` on a constant batch (see the module doc)."""
    import tensorflow as tf

    shape = _input_shape(model, image_size)
    fn = fn or _inference_fn(model, jit_compile)
    x = tf.random.stateless_uniform([batch, *shape], seed=[0, 0], dtype=tf.float32)
    out = None
    for _ in range(max(1, int(warmup))):
        out = fn(x)
    _fetch(out)
    t0 = time.perf_counter()
    for _ in range(max(1, int(steps))):
        out = fn(x)
    _fetch(out)
    dt = time.perf_counter() - t0
    n = max(1, int(steps))
    return {"batch": batch, "images_per_s": batch * n / dt, "ms_per_batch": 1000.0 * dt / n, "steps": n}


def _read_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(model, image_size=None, batch: int = 1, jit_compile: bool = False, fn=None) -> dict:
    """Peak memory of one batch-``batch`` inference call (TensorFlow allocator, else process RSS)."""
    import tensorflow as tf

    shape = _input_shape(model, image_size)
    fn = fn or _inference_fn(model, jit_compile)
    x = tf.random.stateless_uniform([batch, *shape], seed=[0, 0], dtype=tf.float32)
    _fetch(fn(x))  # trace / compile outside the measurement
    gpus = tf.config.list_logical_devices("GPU")
    dev = gpus[0].name.split("device:")[-1] if gpus else "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(dev)
        before = tf.config.experimental.get_memory_info(dev)["current"]
        _fetch(fn(x))
        info = tf.config.experimental.get_memory_info(dev)
        return {"device": dev, "peak_bytes": int(info["peak"]), "peak_over_start_bytes": int(info["peak"] - before),
                "method": "tf.config.experimental.get_memory_info (TensorFlow allocator peak)", "batch": batch}
    except (ValueError, RuntimeError, tf.errors.OpError) as e:  # allocator without statistics
        log.info("no allocator statistics on %s (%s): measuring the process RSS", dev, e)
    rss = _read_status("VmRSS")
    if _reset_peak_rss() and rss is not None:
        _fetch(fn(x))
        hwm = _read_status("VmHWM") or rss
        return {"device": "CPU", "peak_over_start_bytes": max(0, hwm - rss), "peak_rss_bytes": hwm,
                "method": "process VmHWM (reset via /proc/self/clear_refs) - VmRSS before", "batch": batch}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _fetch(fn(x))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"device": "CPU", "peak_over_start_bytes": max(0, after - before), "peak_rss_bytes": after,
            "method": "ru_maxrss growth (0 when an earlier peak was higher)", "batch": batch}


# ---------------------------------------------------------------------------------------
# all together
# ---------------------------------------------------------------------------------------
def _device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        except Exception:  # noqa: BLE001 - details are best effort
            return "GPU"
    return f"CPU ({os.cpu_count()} cores visible)"


def measure(model, image_size=None, batch: int = 8, warmup: int = 2, steps: int = 10, jit_compile: bool = False,
            flops: bool = True, speed: bool = True, memory: bool = True) -> dict:
    """Parameters, FLOPs (batch 1), images/s at batch 1 and ``batch``, peak memory at ``batch``."""
    import keras

    shape = _input_shape(model, image_size)
    out = {"model": model.name, "input_shape": list(shape), "params": count_params(model),
           "precision": keras.mixed_precision.global_policy().name, "jit_compile": bool(jit_compile),
           "device": _device_name()}
    if flops:
        out["flops"] = count_flops(model, shape[:2], batch=1)
    if speed or memory:
        fn = _inference_fn(model, jit_compile)
        if speed:
            out["speed"] = {f"batch_{b}": throughput(model, shape[:2], b, warmup, steps, fn=fn)
                            for b in sorted({1, int(batch)})}
        if memory:
            out["memory"] = peak_memory(model, shape[:2], int(batch), fn=fn)
    return out


def inference_network(network):
    """``network`` without training-only auxiliary heads (``mask_aux1``, ...): what is exported."""
    import keras

    from ..heads import is_aux_head

    outs = network.output
    if not isinstance(outs, dict) or not any(is_aux_head(h) for h in outs):
        return network
    keep = {h: t for h, t in outs.items() if not is_aux_head(h)}
    return keras.Model(network.input, keep, name=network.name)


def build(model_cfg: dict, image_size, num_classes: int = 4, inference: bool = True):
    """A registered model from a ``model`` config (losses/phases ignored, ``weights=None``);
    ``inference``: without auxiliary heads, as exported."""
    from ..models import create_model
    from ..models.task import split_model_config

    name, cfg, _ = split_model_config(model_cfg)
    if "weights" in cfg:
        cfg["weights"] = None  # random weights measure the same and need no download
    network = create_model(name, num_classes=num_classes, image_size=image_size, **cfg)
    return inference_network(network) if inference else network


def run(cfg) -> dict:
    from omegaconf import OmegaConf

    from ..training.precision import set_precision

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    size = cfg.get("image_size")
    if size is None:
        size = model_cfg.get("published_image_size") or cfg.data.image_size
    size = OmegaConf.to_container(size) if OmegaConf.is_config(size) else size
    classes = cfg.data.get("classes")
    num_classes = len(classes) if classes else 4
    set_precision(cfg.get("precision", "float32"))
    full = build(model_cfg, size, num_classes, inference=False)
    model = inference_network(full) if bool(cfg.get("inference_only", True)) else full
    res = measure(model, size, batch=int(cfg.batch), warmup=int(cfg.warmup), steps=int(cfg.steps),
                  jit_compile=bool(cfg.get("jit_compile", False)), flops=bool(cfg.get("flops", True)),
                  speed=bool(cfg.get("speed", True)), memory=bool(cfg.get("memory", True)))
    res["model"] = model_cfg["name"]
    res["heads"] = list(model.output) if isinstance(model.output, dict) else None
    if model is not full:
        res["params_with_aux_heads"] = count_params(full)
    res["model_config"] = {k: v for k, v in model_cfg.items() if k in ("context", "backbone", "heads", "aux")}
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import cli_main

    return cli_main(__doc__, "efficiency", lambda cfg, args: run(cfg), argv, errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
