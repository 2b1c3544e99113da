"""Distribution strategies by name (``trainer.strategy``), so scaling out is a config change.

============  ==================================================================
name          strategy
============  ==================================================================
``auto``      :class:`tf.distribute.MirroredStrategy` when more than one GPU is
              visible, else the default (single-device) strategy
``default``   ``tf.distribute.get_strategy()`` (one device, no distribution)
``mirrored``  :class:`tf.distribute.MirroredStrategy` over all visible GPUs; on a
              machine without GPU, over the logical CPU devices (see
              :func:`configure_logical_cpus`)
``multi_worker``  :class:`tf.distribute.MultiWorkerMirroredStrategy`; the cluster is
              read from the ``TF_CONFIG`` environment variable, which must be set
``tpu``       ``TPUClusterResolver`` + :class:`tf.distribute.TPUStrategy`
============  ==================================================================

Everything that creates variables (model, optimizer, metrics) must be built inside
``strategy.scope()``; Keras' ``fit`` then splits each global batch across the replicas.

Losses under a strategy with ``R`` replicas: Keras losses divide their per-replica value
by ``R`` and the gradients are *summed* over replicas, so a per-replica mean becomes the
mean of the per-replica means. For a plain mean over equally sized per-replica batches
this is the global mean; for a *masked* mean (``sum(w*l) / sum(w)``) it is the mean of
the per-replica masked means, which differs from the global masked mean when the
weights are uneven across replicas (see ``tests/training/test_strategy.py``).
A ``compute_loss`` that reduces by hand must scale by ``1 / R`` itself (as the Keras
losses do), or its gradients are ``R`` times too large.
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def _tf():
    import tensorflow as tf

    return tf


# --------------------------------------------------------------------------- devices
def configure_logical_cpus(n: int) -> List[str]:
    """Split the physical CPU into ``n`` logical devices (to run ``mirrored`` without GPU).

    Useful to test data-parallel code on a laptop or in CI: ``MirroredStrategy`` then
    places one replica on each logical CPU. It must be called **before TensorFlow
    initialises its devices**, i.e. before any tensor, op, model, ``list_logical_devices``
    or strategy is created in the process (logical device configuration cannot change
    afterwards). Calling it again with the same ``n`` after initialisation is a no-op.

    Returns:
        the names of the logical CPU devices.

    Raises:
        ValueError: ``n < 1``.
        RuntimeError: TensorFlow has already initialised its devices with another layout.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"the number of logical CPUs must be >= 1, got {n}")
    tf = _tf()
    cpus = tf.config.list_physical_devices("CPU")
    if not cpus:  # pragma: no cover - TF always has a CPU
        raise RuntimeError("TensorFlow sees no CPU device")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:
        current = tf.config.list_logical_devices("CPU")
        if len(current) == n:
            return [d.name for d in current]
        raise RuntimeError(
            f"configure_logical_cpus({n}) must be called before TensorFlow initialises its devices "
            f"(before any tensor, model, strategy or list_logical_devices call in this process); "
            f"TensorFlow already runs with {len(current)} logical CPU device(s). Call it first thing "
            f"in the program (e.g. right after importing tensorflow)") from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


# --------------------------------------------------------------------------- strategies
def _mirrored(devices: Optional[List[str]] = None):
    tf = _tf()
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy(devices=[d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) <= 1:
        log.warning("mirrored strategy: no GPU and a single CPU device: one replica (same as 'default'). "
                    "Call src.training.strategy.configure_logical_cpus(n) before TensorFlow starts to "
                    "split the CPU into n replicas.")
    return tf.distribute.MirroredStrategy(devices=[d.name for d in cpus])


def _check_tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    hint = ('set TF_CONFIG on every worker, e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
            '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\'')
    if not raw:
        raise RuntimeError(f"trainer.strategy=multi_worker needs the TF_CONFIG environment variable; {hint}")
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"TF_CONFIG is not valid JSON ({e}); {hint}") from e
    if not isinstance(conf, dict):
        raise RuntimeError(f"TF_CONFIG must be a JSON object; {hint}")
    cluster, task = conf.get("cluster"), conf.get("task")
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise RuntimeError(f"TF_CONFIG has no cluster with workers; {hint}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise RuntimeError(f"TF_CONFIG has no task {{type, index}}; {hint}")
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not isinstance(task["index"], int) \
            or not 0 <= task["index"] < len(members):
        raise RuntimeError(f"TF_CONFIG task {task} does not name a member of the cluster {cluster}; {hint}")
    return conf


def _multi_worker():
    _check_tf_config()
    return _tf().distribute.MultiWorkerMirroredStrategy()


def _tpu(tpu: Optional[str] = None):
    tf = _tf()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as e:  # ValueError (no TPU name), NotFoundError, RuntimeError, ...
        raise RuntimeError(
            f"trainer.strategy=tpu but no TPU could be reached ({type(e).__name__}: {e}). Run on a TPU VM "
            f"or Colab TPU runtime (or set TPU_NAME), or choose trainer.strategy=auto") from e


def get_strategy(name: str = "auto", devices: Optional[List[str]] = None, tpu: Optional[str] = None):
    """The ``tf.distribute`` strategy called ``name`` (one of :data:`STRATEGIES`).

    Args:
        name: ``auto`` | ``default`` | ``mirrored`` | ``multi_worker`` | ``tpu``.
        devices: for ``mirrored`` only: explicit device names (default: all GPUs, else
            all logical CPUs).
        tpu: for ``tpu`` only: the TPU name/address (default: found from the environment).

    Raises:
        ValueError: unknown name.
        RuntimeError: ``multi_worker`` without a valid ``TF_CONFIG``; ``tpu`` without a TPU.
    """
    key = str(name).strip().lower().replace("-", "_") if name is not None else "auto"
    if key not in STRATEGIES:
        raise ValueError(f"unknown trainer.strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    tf = _tf()
    if key == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) > 1:
            return _mirrored(devices)
        return tf.distribute.get_strategy()
    if key == "default":
        return tf.distribute.get_strategy()
    if key == "mirrored":
        return _mirrored(devices)
    if key == "multi_worker":
        return _multi_worker()
    return _tpu(tpu)


def describe_strategy(strategy) -> str:
    """One line: strategy class, number of replicas and their devices."""
    tf = _tf()
    n = int(getattr(strategy, "num_replicas_in_sync", 1))
    try:
        devices = list(strategy.extended.worker_devices)
    except Exception:  # noqa: BLE001 - some strategies do not expose them
        devices = []
    short = [d.split("/")[-1].replace("device:", "") for d in devices]
    cls = type(strategy).__name__
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        cls = "default strategy"
        if not short:
            gpus = tf.config.list_logical_devices("GPU")
            short = [(gpus[0].name if gpus else "/device:CPU:0").split("/")[-1].replace("device:", "")]
    where = f" on {', '.join(short)}" if short else ""
    return f"{cls}: {n} replica{'s' if n != 1 else ''}{where}"


__all__ = ["STRATEGIES", "get_strategy", "configure_logical_cpus", "describe_strategy"]
