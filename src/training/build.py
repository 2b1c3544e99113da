"""Building and compiling the model of a training phase.

``build_model`` turns a model config into the network (registry) wrapped in the task
model with its losses (class weights from the training labels where the loss wants
them); ``drop_unlearnable_heads`` removes heads the training data cannot teach;
``weights_for`` gives a phase's loss weights (auxiliary heads follow their head);
``compile_model`` compiles with the per-head metrics as weighted metrics; unfreezing
applies a phase's ``unfreeze`` spec to the backbone.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..data.records import NO_TUMOR

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# model building
# ---------------------------------------------------------------------------------------
def multi_hot_matrix(records, class_map):
    """[N, C] multi-hot labels of ``records`` ({label} + box classes) and a [N] known mask."""
    mh = np.zeros((len(records), class_map.num_classes), np.float32)
    known = np.zeros(len(records), bool)
    for i, r in enumerate(records):
        if not r.known.get("label"):
            continue
        for name in {r.label, *r.box_classes}:
            j = class_map.index(name)
            if j >= 0:
                mh[i, j] = 1.0
        known[i] = True
    return mh, known


#: which ``Record.known`` flag makes a head's target known ("always": the input image)

def tumour_values(records) -> set:
    """The tumour-vs-healthy answers the records know (``{True}``, ``{False}``, both, none)."""
    out = set()
    for r in records:
        if r.known.get("label") and r.label is not None:
            out.add(r.label != NO_TUMOR)
        elif r.known.get("boxes") and len(r.boxes):
            out.add(True)
    return out


def drop_unlearnable_heads(model_cfg: dict, train_records) -> dict:
    """Remove from ``model_cfg["heads"]`` the heads whose target no training record has.

    E.g. a segmentation head on a dataset without tumour masks would only ever see
    unknown or known-empty (healthy) masks: it is dropped with a warning instead of
    learning to predict nothing. A tumour-vs-healthy head on data with one answer only
    (figshare has no healthy slices) is dropped too.
    """
    from ..heads import KNOWN_FLAG, target_key

    heads = model_cfg.get("heads")
    if not heads:
        return model_cfg
    def positive(r, flag):  # a known target that is not only "nothing here"
        if flag == "mask":
            return bool(r.known.get("mask") and (r.mask or r.polygons))
        if flag == "boxes":
            return bool(r.known.get("boxes") and len(r.boxes))
        return bool(r.known.get(flag))

    keep = []
    for h in heads:
        flag = KNOWN_FLAG.get(target_key(h), "always")
        if flag != "always" and not any(positive(r, flag) for r in train_records):
            why = f"no training record has a known {flag} target"
        elif target_key(h) == "tumor" and len(tumour_values(train_records)) == 1:
            # one answer for every slice (figshare: all tumours) teaches nothing, and under
            # EMA balancing its vanishing loss would be scaled up without end
            only = "a tumour" if tumour_values(train_records) == {True} else "no tumour"
            why = f"every training slice has {only}: nothing to tell apart"
        else:
            keep.append(h)
            continue
        log.warning("head %r dropped: %s", h, why)
        print(f"warning: head {h!r} dropped: {why}")
    if not keep:
        raise ValueError(f"none of the heads {list(heads)} has a known target in the training data")
    return {**model_cfg, "heads": keep}


def weights_for(weights, heads, defaults: Optional[dict] = None) -> Optional[dict]:
    """Loss weights restricted to the model's heads (a config may name heads it dropped).

    An auxiliary head (``<head>_aux<k>``) that ``weights`` does not name follows its head:
    its default weight (``defaults``) while the head learns, 0 when the head is off.
    """
    from ..heads import is_aux_head, target_key

    if not weights:
        return None
    out = {h: float(w) for h, w in dict(weights).items() if h in heads}
    for h in heads:
        base = target_key(h)
        if is_aux_head(h) and h not in out and base in out:
            out[h] = float((defaults or {}).get(h, 1.0)) if out[base] != 0.0 else 0.0
    return out


def metric_heads(model) -> list:
    """Heads that get compiled metrics: the active ones, plus loss-less outputs that
    have a dataset target of their own (e.g. the U-Net's composed 4-class ``class``)."""
    from ..heads import RECON_HEADS, is_aux_head

    outs = model.output_names_of(model.network)
    extra = [h for h in outs if h not in model.heads and not is_aux_head(h) and h not in RECON_HEADS]
    return list(model.active_heads) + extra


def compile_model(model, optimizer, num_classes: int, jit) -> None:
    """Compile with the per-head metrics as *weighted* metrics: Keras' plain ``metrics=``
    ignore sample weights, so unknown targets (unlabelled images, empty box slots, unknown
    masks) would count as zeros."""
    from .metrics import head_metrics

    kw = {"optimizer": optimizer} if optimizer is not None else {}
    model.compile(weighted_metrics=head_metrics(metric_heads(model), num_classes), jit_compile=jit, **kw)


def build_model(model_cfg: dict, class_map, image_size, train_records=None):
    """Network from the registry wrapped in a :class:`MultiTaskModel` with its losses."""
    from ..losses import class_weights_from_labels
    from ..models import create_model
    from ..models.task import MultiTaskModel, split_model_config

    name, builder_cfg, task = split_model_config(model_cfg)
    losses = dict(task.get("losses") or {})
    network = create_model(name, num_classes=class_map.num_classes, image_size=image_size,
                           class_names=list(class_map.classes), **builder_cfg)
    outputs = list(network.output)
    head_losses = {}
    for head in outputs:
        spec = losses.get(head)
        if spec is None:
            continue
        spec = dict(spec) if isinstance(spec, dict) else {"name": spec}
        if spec.get("name") == "weighted_bce" and spec.get("pos_weights") is None and train_records is not None:
            mh, known = multi_hot_matrix(train_records, class_map)
            pos, neg = class_weights_from_labels(mh, mode=model_cfg.get("class_weighting", "balanced"), mask=known)
            spec.update(pos_weights=pos, neg_weights=neg)
            log.info("weighted BCE from %d training labels: pos=%s neg=%s", int(known.sum()),
                     np.round(pos, 3).tolist(), np.round(neg, 3).tolist())
        head_losses[head] = spec
    if not head_losses:
        raise ValueError(f"model {name!r}: no losses configured for its outputs {outputs}")
    return MultiTaskModel(network, head_losses, loss_weights=weights_for(model_cfg.get("loss_weights"), head_losses),
                          balancing=model_cfg.get("balancing", "static"),
                          ema_beta=float(model_cfg.get("ema_beta", 0.99)),
                          name=f"{name}")


def backbone_of(model, model_cfg: dict):
    """The model's nested :class:`Backbone` (a view of it for checkpoints saved before
    backbones were Keras models), or None."""
    from ..models.backbones import Backbone, as_backbone

    try:
        sub = model.network.get_layer("backbone")
    except ValueError:
        return None
    if isinstance(sub, Backbone):
        return sub
    name = model_cfg.get("backbone")
    return as_backbone(sub, name) if name else None


def apply_unfreeze(model, model_cfg: dict, spec) -> Optional[dict]:
    from ..models.unfreeze import set_trainable

    if not spec:
        return None
    bb = backbone_of(model, model_cfg)
    if bb is None:
        log.info("unfreeze: model has no backbone; every layer trains")
        return None
    summary = set_trainable(bb, OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec))
    log.info("unfreeze %s: %d/%d backbone layers trainable, %s trainable params (first: %s)", dict(spec),
             summary["trainable_layers"], summary["total_layers"], f"{summary['trainable_params']:,}",
             summary.get("first_trainable_layer"))
    return summary
