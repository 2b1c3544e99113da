"""The task model: one multi-task Keras model class for every architecture, and loading it.

keras-hub keeps a Task beside its Backbone; here :class:`MultiTaskModel` sits beside the
architectures of :mod:`src.models`. It wraps a functional ``network`` whose outputs are a
dict keyed by head name and overrides ``compute_loss`` so per-head losses, per-head sample
weights (unknown targets have weight 0), phase loss weights and loss balancing (static,
EMA, uncertainty; see :mod:`src.losses.balancing`) all live in one place. Per-head losses
are reported as metrics (``<head>_loss``) every epoch. Every checkpoint of the library
holds one (registered as ``btmtl>MultiTaskModel``).

A head whose loss weight is 0 in a phase is not computed at all, so a phase that trains
only the box head pays nothing for the others. Which target a head learns is the head
vocabulary's business (:func:`src.heads.target_key`): ``mask_aux1`` learns ``mask``,
``recon`` the input image. Auxiliary heads are training-only:
:meth:`MultiTaskModel.inference_model` leaves them out.

The model config (``conf/model/*.yaml``) holds keys of two kinds: the network builder's
(checked strictly by :func:`src.models.registry.create_model`) and the task's,
:data:`TASK_KEYS` (losses, weights, balancing, phases, ...: read by the training engine,
evaluation and this class). :func:`split_model_config` separates them.

:func:`load_checkpoint` loads a ``.keras`` checkpoint without anything from
:mod:`src.training` (``compile=False``, the default: the network, its losses and
balancer state, enough to evaluate, predict, explain and export).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping, Optional

import keras
from keras import ops

from ..heads import ACCURACY_HEADS, BINARY_HEADS, CLASS_SET, is_aux_head, target_key
from ..losses import get_loss
from ..losses.classification import class_set_nll
from ..losses.balancing import LossBalancer

__all__ = ["MultiTaskModel", "load_checkpoint", "check_keras_file", "CheckpointLoadError", "TASK_KEYS",
           "split_model_config"]

#: model-config keys that are not network-builder arguments: ``name`` (the registry
#: name), the task's losses and their weighting (``losses``, ``loss_weights``,
#: ``balancing``, ``ema_beta``, ``class_weighting``: weighted-BCE weights from the
#: training labels), the training schedule (``phases``), the 4-class decision threshold
#: of evaluation / prediction (``threshold``) and the input size of the efficiency
#: benchmark (``published_image_size``). :func:`src.models.create_model` never gives them to
#: a builder.
TASK_KEYS = ("name", "losses", "loss_weights", "balancing", "ema_beta", "class_weighting", "phases", "threshold",
             "published_image_size")


def split_model_config(model_cfg: Mapping) -> tuple[str, dict, dict]:
    """``(registry name, builder kwargs, task kwargs)`` of a model config (a plain mapping).

    The builder kwargs go to :func:`src.models.create_model`, which rejects unknown keys;
    the task kwargs are the :data:`TASK_KEYS` present.
    """
    cfg = dict(model_cfg)
    if "name" not in cfg:
        raise ValueError("the model config has no name (the registry name, e.g. model=small_cnn)")
    task = {k: cfg.pop(k) for k in TASK_KEYS if k in cfg}
    return task["name"], cfg, task


def _build_loss(spec):
    if isinstance(spec, keras.losses.Loss):
        return spec
    if isinstance(spec, str):
        return get_loss(spec)
    if isinstance(spec, Mapping):
        if "class_name" in spec and "config" in spec:
            return keras.saving.deserialize_keras_object(spec)
        spec = dict(spec)
        return get_loss(spec.pop("name"), **spec)
    raise TypeError(f"cannot build a loss from {spec!r}")


_TRACING = threading.local()


def _batched_logs(logs):
    """Under a multi-worker strategy Keras reduces each replica's logs with
    ``strategy.reduce("MEAN", v, axis=0)``, which fails on the scalars a step returns
    (``Invalid reduction dimension 0 for input with 0 dimensions``): give them a leading
    axis of 1 there (the mean over replicas is then the same number)."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if not (isinstance(strategy, tf.distribute.experimental.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode()):
        return logs
    return {k: ops.reshape(v, (1,)) if len(getattr(v, "shape", ())) == 0 else v for k, v in logs.items()}


@keras.saving.register_keras_serializable(package="btmtl")
class MultiTaskModel(keras.Model):
    """A functional multi-head network + per-head losses + loss balancing.

    Args:
        network: functional model whose outputs are a dict ``{head: tensor}``.
        head_losses: ``{head: loss}`` (a Loss, a name for :func:`src.losses.get_loss`, or
            ``{"name": ..., **kwargs}``). Heads without a loss are outputs only.
        loss_weights: ``{head: weight}`` (default 1); changeable per phase with
            :meth:`set_loss_weights`.
        balancing: ``static`` | ``ema`` | ``uncertainty``.
        ema_beta: EMA decay for ``balancing="ema"``.
    """

    def __init__(self, network: keras.Model, head_losses: Mapping, loss_weights: Optional[Mapping] = None,
                 balancing: str = "static", ema_beta: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        if isinstance(network, Mapping):
            network = keras.saving.deserialize_keras_object(network)
        self.network = network
        out_names = set(self.output_names_of(network))
        missing = set(head_losses) - out_names
        if missing:
            raise ValueError(f"losses given for heads the network does not output: {sorted(missing)}; "
                             f"outputs are {sorted(out_names)}")
        self.head_losses = {h: _build_loss(spec) for h, spec in head_losses.items()}
        self.heads = list(self.head_losses)
        self.balancer = LossBalancer(self.heads, mode=balancing, beta=ema_beta, weights=loss_weights,
                                     name="loss_balancer")
        self._static_weights = {h: float((loss_weights or {}).get(h, 1.0)) for h in self.heads}
        self.head_loss_trackers = {h: keras.metrics.Mean(name=f"{h}_loss") for h in self.heads}
        # cheap training-batch metrics (``train_metrics="light"``): accuracy of the class-type heads
        outs = self.output_names_of(network)
        self.train_accuracy = {h: (keras.metrics.BinaryAccuracy(name=f"{h}_acc") if h in BINARY_HEADS
                                   else keras.metrics.SparseCategoricalAccuracy(name=f"{h}_acc"))
                               for h in outs if h in ACCURACY_HEADS}
        #: ``full`` (training batches get every compiled metric), ``light`` (losses and
        #: accuracy only: AUC, F1, IoU and Dice are validation metrics) or ``loss``
        self.train_metrics = "full"

    @staticmethod
    def output_names_of(network) -> list:
        out = network.output
        if isinstance(out, Mapping):
            return list(out)
        return list(getattr(network, "output_names", []) or [])

    def build(self, input_shape=None):
        # the wrapped network is already built; the balancer creates its state in __init__
        self.balancer.built = True
        self.built = True

    # ---- forward --------------------------------------------------------------------
    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    # ---- weights per phase ----------------------------------------------------------
    def set_loss_weights(self, weights: Mapping[str, float]) -> None:
        """Change per-head loss weights (e.g. per phase). A weight of 0 skips that head's loss."""
        self.balancer.set_weights_for(weights)
        self._static_weights.update({h: float(w) for h, w in weights.items()})

    def freeze_inactive_heads(self) -> list:
        """Freeze the layers of heads whose loss weight is 0 (``<head>`` and ``<head>_*``),
        unfreeze those of active heads; returns the frozen layer names."""
        frozen = []
        # longest matching head wins: `mask_aux1_conv` belongs to `mask_aux1`, not `mask`
        by_length = sorted(self.heads, key=len, reverse=True)
        for layer in self.network.layers:
            h = next((h for h in by_length if layer.name == h or layer.name.startswith(h + "_")), None)
            if h is None:
                continue
            layer.trainable = h in self.active_heads
            if not layer.trainable:
                frozen.append(layer.name)
        return frozen

    @property
    def active_heads(self) -> list:
        return [h for h in self.heads if self._static_weights.get(h, 1.0) != 0.0]

    # ---- loss -----------------------------------------------------------------------
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Per-head masked losses -> balancer -> one scalar.

        Under a distribution strategy our losses come back scaled by 1/R (R replicas) so
        that summed replica gradients average. The balancer (EMA means, uncertainty
        terms) and the per-head metrics must see *unscaled* losses, so each head's loss is
        multiplied by R first and the balanced total divided by R again.
        """
        import tensorflow as tf

        replicas = float(tf.distribute.get_strategy().num_replicas_in_sync)
        per_head = self.head_loss_values(x, y, y_pred, sample_weight, replicas)
        for h, value in per_head.items():
            self.head_loss_trackers[h].update_state(value)
        total = self.balancer(per_head, training=training) if per_head else ops.zeros((), "float32")
        if self.losses:
            total = total + ops.cast(ops.sum(self.losses), "float32")
        return total / replicas

    def head_loss_values(self, x, y, y_pred, sample_weight=None, replicas: float = 1.0) -> dict:
        """``{head: loss}`` of the active heads before balancing: each head's masked mean
        over the records whose target is known (weight > 0), so a batch mixing sources
        gives each head the mean over the records that know its target, i.e. the
        per-source losses weighted by their known-target counts."""
        if y is None:
            raise ValueError("MultiTaskModel needs targets: a dict {head: target}")
        per_head = {}
        for h in self.active_heads:
            key = target_key(h)
            if key == "x":
                target, sw = (x.get("image") if isinstance(x, Mapping) else x), None
            elif key in y:
                target = y[key]
                sw = sample_weight.get(key) if isinstance(sample_weight, Mapping) else None
            else:
                raise ValueError(f"no target {key!r} for head {h!r}; the dataset yields {sorted(y)}")
            target = ops.cast(target, "float32") if key == "x" else target
            value = ops.cast(self.head_losses[h](target, y_pred[h], sample_weight=sw), "float32") * replicas
            if key == "class" and CLASS_SET in y and isinstance(sample_weight, Mapping) and sw is not None:
                value = self._with_class_set(h, value, y_pred[h], y[CLASS_SET], sample_weight[CLASS_SET], sw)
            per_head[h] = value
        return per_head

    def _with_class_set(self, head, value, y_pred, y_set, w_set, w_class):
        """The class loss over records with a known class *and* records whose label is only
        known to be in a set of classes (a generic tumour: :func:`src.losses.class_set_nll`):
        ``(sum_known w l + sum_set w l_set) / (sum w_known + sum w_set)``, the masked mean over
        both, so each record counts once; exactly ``value`` when the batch has no set labels."""
        w_set = ops.reshape(ops.cast(w_set, "float32"), (-1,))
        w_class = ops.reshape(ops.cast(w_class, "float32"), (-1,))
        nll = class_set_nll(y_set, y_pred, from_logits=bool(getattr(self.head_losses[head], "from_logits", False)))
        nll = ops.where(w_set > 0, nll, ops.zeros_like(nll))
        n_set, n_class = ops.sum(w_set), ops.sum(w_class)
        combined = (value * n_class + ops.sum(w_set * nll)) / ops.maximum(n_class + n_set, 1e-12)
        return ops.where(n_set > 0, combined, value)

    def train_step(self, data):
        # a Python flag, read while the train step is traced (compute_metrics and
        # get_metrics_result run inside it): the test step is traced without it. Thread
        # local: MirroredStrategy traces its replicas' steps in parallel threads.
        _TRACING.train = True
        try:
            return _batched_logs(super().train_step(data))
        finally:
            _TRACING.train = False

    def test_step(self, data):
        return _batched_logs(super().test_step(data))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras builds the compiled metrics from the first batch; under a distribution
        strategy it first *reduces* that batch across replicas, which fails for a
        ``MultiWorkerMirroredStrategy`` (``Attempt to convert a value (PerReplica...)``).
        A local replica's part of the batch has the same structure and shapes: use it."""
        import tensorflow as tf

        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None or iterator is None or strategy.num_replicas_in_sync == 1:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        from keras.src import tree

        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _light(self) -> bool:
        return getattr(_TRACING, "train", False) and self.train_metrics != "full"


    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._light():
            if self.train_metrics == "light" and isinstance(y, Mapping) and isinstance(y_pred, Mapping):
                for h, metric in self.train_accuracy.items():
                    if h in y and h in y_pred:
                        sw = sample_weight.get(h) if isinstance(sample_weight, Mapping) else None
                        metric.update_state(y[h], y_pred[h], sample_weight=sw)
            return self.get_metrics_result()
        if isinstance(y, Mapping) and isinstance(y_pred, Mapping):
            # compiled metrics see only heads that have a target of their own (not aux or
            # reconstruction heads) and only targets that some head outputs
            y = {k: v for k, v in y.items() if k in y_pred}
            y_pred = {k: v for k, v in y_pred.items() if k in y}
            if isinstance(sample_weight, Mapping):
                sample_weight = {k: v for k, v in sample_weight.items() if k in y_pred}
        return super().compute_metrics(x, y, y_pred, sample_weight)

    @property
    def metrics(self):
        # only heads that learn in this phase report a loss (Keras may track them itself)
        inactive = {id(t) for h, t in self.head_loss_trackers.items() if h not in self.active_heads}
        accuracy = {id(m) for m in self.train_accuracy.values()}
        base = [m for m in super().metrics if id(m) not in inactive and id(m) not in accuracy]
        trackers = [self.head_loss_trackers[h] for h in self.active_heads]
        return base + [t for t in trackers if all(t is not b for b in base)] + list(self.train_accuracy.values())

    def get_metrics_result(self):
        # training batches under train_metrics=light|loss: losses (+ accuracy), no compiled
        # metrics; everywhere else the compiled metrics and never the training-only ones
        light = self._light()
        skip = {id(m) for m in self.train_accuracy.values()} if not light or self.train_metrics == "loss" else set()
        if light and getattr(self, "_compile_metrics", None) is not None:
            skip.add(id(self._compile_metrics))
        out = {}
        for m in self.metrics:
            if id(m) in skip or not getattr(m, "built", True):  # compiled metrics never updated in training
                continue
            r = m.result()
            if isinstance(r, Mapping):
                out.update(r)
            else:
                out[m.name] = r
        return out

    # ---- serialisation --------------------------------------------------------------
    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.network),
            "head_losses": {h: keras.saving.serialize_keras_object(l) for h, l in self.head_losses.items()},
            "loss_weights": dict(self._static_weights),
            "balancing": self.balancer.mode,
            "ema_beta": self.balancer.beta,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"], custom_objects=custom_objects)
        return cls(**config)

    def inference_model(self, heads=None) -> keras.Model:
        """The functional network without training-only auxiliary heads (optionally only
        ``heads``): for export and prediction."""
        names = self.output_names_of(self.network)
        if heads is None:
            heads = [h for h in names if not is_aux_head(h)]
            if len(heads) == len(names):
                return self.network
        outs = {h: self.network.output[h] for h in heads}
        return keras.Model(self.network.input, outs, name=f"{self.network.name}_inference")


def load_checkpoint(path, compile: bool = False) -> MultiTaskModel:
    """Load a ``.keras`` checkpoint of this library.

    Registers every custom object the model needs (layers of every architecture, losses,
    the loss balancer, this class) and loads with ``compile=False`` by default: the
    network with its weights, its per-head losses and loss-balancer state, which is all
    evaluation, prediction, Grad-CAM and export need. Nothing is imported from
    :mod:`src.training`.

    ``compile=True`` also restores the optimizer (with its state and step count) and the
    compiled metrics, for resuming training. Their classes live in :mod:`src.training`
    (``metrics``: SparseAUC, BoxMeanIoU, DiceScore, ...; ``optim``: FusedAdamW,
    WarmupCosine, ...), which this layer never imports: a caller that passes
    ``compile=True`` imports ``src.training.metrics`` and ``src.training.optim`` first.
    """
    from . import layers as _layers  # noqa: F401
    from .registry import list_models

    list_models()  # imports every architecture module (their custom layers)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_keras_file(path)
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as e:  # noqa: BLE001 - any deserialisation problem becomes one line naming the file
        raise CheckpointLoadError(f"cannot load checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())}") \
            from e


class CheckpointLoadError(ValueError):
    """A checkpoint file that is not a loadable Keras model (named, with what is wrong)."""


def check_keras_file(path) -> None:
    """Raise :class:`CheckpointLoadError` when ``path`` is not a ``.keras`` archive: Keras'
    own message for a truncated or foreign file ("File not found ... ensure the file is an
    accessible .keras zip file") reads as if the file were missing."""
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointLoadError(f"{path} is not a Keras checkpoint: a .keras file is a zip archive and these "
                                  f"{size:,} bytes are not one (cut short by a kill or a full disk, or another "
                                  f"format)")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointLoadError(f"{path} is a damaged zip archive ({e}); not a usable Keras checkpoint") from e
    if bad is not None:
        raise CheckpointLoadError(f"{path} is a damaged Keras checkpoint: its member {bad} fails its checksum")
    if "config.json" not in names:
        raise CheckpointLoadError(f"{path} is a zip archive but not a Keras model (no config.json inside)")
