"""The head vocabulary: which heads exist, what target each learns, which are auxiliary.

The bottom layer of the package (pure Python, no TensorFlow): data, losses, models,
training, evaluation and the entry points all name heads through this module.

A model's outputs and a batch's targets are dicts keyed by head name. A head named like
a pipeline target (``class``, ``multilabel``, ``tumor``, ``subtype``, ``boxes``,
``mask``) learns that target; an auxiliary head ``<target>_aux<k>`` (deep supervision,
e.g. ``mask_aux1``, ``boxes_aux1``) learns ``<target>`` with its sample weights and is
training-only; a reconstruction head (:data:`RECON_HEADS`) learns the input image ``x``
itself (weight 1 for every sample).
"""
from __future__ import annotations

#: heads that classify a whole image (softmax ``class`` / ``subtype``, sigmoid
#: ``multilabel`` / ``tumor``)
CLASS_HEADS = ("class", "multilabel", "tumor", "subtype")
#: class heads with one sigmoid per output (binary accuracy, not categorical)
BINARY_HEADS = ("multilabel", "tumor")
#: heads whose training batches report an accuracy under ``train_metrics=light``
ACCURACY_HEADS = CLASS_HEADS
#: heads whose target is the input image itself
RECON_HEADS = ("recon", "reconstruction")
#: heads with a dataset target of their own (not auxiliary, not reconstruction)
TARGET_HEADS = CLASS_HEADS + ("boxes", "mask")

#: a companion target of ``class`` (not a head): the classes a record's label is known to lie
#: in when the label is not itself a class (a generic ``tumor``: every tumour class); the
#: ``class`` head's loss adds ``-log sum p(set)`` for those records (tumour vs healthy, no subtype)
CLASS_SET = "class_set"

#: which ``Record.known`` flag makes a head's target known (``"always"``: the input image)
KNOWN_FLAG = {"class": "label", "multilabel": "label", "tumor": "label", "subtype": "label",
              "boxes": "boxes", "mask": "mask", "recon": "always", "reconstruction": "always"}


def target_key(head: str) -> str:
    """The dataset target a head learns: ``mask_aux2`` -> ``mask``; ``recon`` -> ``x``."""
    if head in RECON_HEADS:
        return "x"
    base, sep, tail = head.rpartition("_aux")
    if sep and base and (tail == "" or tail.isdigit()):
        return base
    return head


def is_aux_head(head: str) -> bool:
    """Training-only auxiliary head (deep supervision): ``<target>_aux<k>``."""
    return target_key(head) not in (head, "x")
