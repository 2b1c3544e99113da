"""Transfer-learning detector and classifier over any registered backbone.

``resnet101_detector``: a ResNet101 feature pyramid, a class head (softmax over the
classes, or one sigmoid per class with ``multilabel: true``, output ``multilabel``) and
a box head with one box per class slot (slot k always means class k), valid by
construction: dense maps over P3-P5 by default, the seed's flattened-P5 regression with
``box_head: flat``. ``detector`` is the same over any backbone; ``classifier`` has the class
head only (plain transfer learning, the backbones the seed projects compared); ``tumornet``
is the classifier over ``resnet18`` (TumorNet; its two-stage plan is in
``conf/model/tumornet.yaml``).
"""
from __future__ import annotations

import functools

import keras
from keras import layers

from .backbones import create_backbone
from .heads import box_head as flat_box_head, class_head, dense_box_head
from .layers import Preprocess
from .registry import register_model


def _shape(image_size) -> tuple:
    if isinstance(image_size, int):
        return (image_size, image_size, 3)
    return (int(image_size[0]), int(image_size[1]), 3)


def _backbone_features(backbone: str, image_size, weights):
    shape = _shape(image_size)
    bb = create_backbone(backbone, shape, weights=weights, model_name="backbone")
    inputs = keras.Input(shape, name="image")
    x = Preprocess(bb.preprocessing, name="preprocess")(inputs)
    feats = bb(x)
    return inputs, feats, bb


@register_model("detector")
def detector(num_classes: int = 4, image_size=224, backbone: str = "resnet101", weights=None,
             multilabel: bool = False, dropout: float = 0.3, hidden: int = 256, box_channels: int = 64,
             heads=("class", "boxes"), box_head: str = "dense", box_heatmaps: str = "shared",
             box_levels=("P3", "P4", "P5")) -> keras.Model:
    """``box_head``: ``dense`` (heat + box maps over the pyramid levels ``box_levels``,
    merged top-down: :func:`src.models.heads.dense_box_head`) or ``flat`` (the seed
    detector: P5 reduced to ``box_channels`` by a 1x1 convolution, flattened, dense
    layers, one box per class slot)."""
    if box_head not in ("dense", "flat"):
        raise ValueError(f"model.box_head must be 'dense' or 'flat', got {box_head!r}")
    inputs, feats, _ = _backbone_features(backbone, image_size, weights)
    p5 = feats["P5"]
    outputs = {}
    class_key = "multilabel" if multilabel else "class"
    if "class" in heads or "multilabel" in heads:
        pooled = layers.GlobalAveragePooling2D(name="class_pool")(p5)
        outputs[class_key] = class_head(pooled, num_classes, multilabel=multilabel, hidden=hidden,
                                        dropout=dropout, name=class_key)
    if "boxes" in heads and box_head == "flat":
        # keep the spatial layout for localisation: 1x1 reduce, flatten, dense
        b = layers.Conv2D(box_channels, 1, activation="relu", name="boxes_reduce")(p5)
        b = layers.Flatten(name="boxes_flatten")(b)
        outputs["boxes"] = flat_box_head(b, num_classes, hidden=hidden, dropout=dropout)
    elif "boxes" in heads:
        missing = [lv for lv in box_levels if lv not in feats]
        if missing or not box_levels:
            raise ValueError(f"model.box_levels {list(box_levels)}: the backbone has levels {sorted(feats)}")
        order = sorted(box_levels, key=lambda lv: -int(feats[lv].shape[1]))  # finest first
        outputs["boxes"], outputs["boxes_aux1"] = dense_box_head([feats[lv] for lv in order], num_classes,
                                                                 channels=box_channels, heatmaps=box_heatmaps)
    return keras.Model(inputs, outputs, name=f"{backbone}_detector")


#: the detector with ``backbone="resnet101"`` by default (its signature, so the registry
#: checks the same keys)
resnet101_detector = register_model("resnet101_detector")(functools.partial(detector, backbone="resnet101"))


@register_model("classifier")
def classifier(num_classes: int = 4, image_size=224, backbone: str = "resnet50", weights=None,
               multilabel: bool = False, dropout: float = 0.3, hidden: int = 0, heads=("class",)) -> keras.Model:
    """The class head over a backbone: ``heads`` may name ``class`` / ``multilabel`` only
    (which one is built follows ``multilabel``)."""
    other = [h for h in heads if h not in ("class", "multilabel")]
    if other or not heads:
        raise ValueError(f"model.heads: the classifier has a class head only, got {list(heads)}")
    inputs, feats, _ = _backbone_features(backbone, image_size, weights)
    p5 = feats["P5"]
    pooled = layers.GlobalAveragePooling2D(name="class_pool")(p5)
    key = "multilabel" if multilabel else "class"
    out = class_head(pooled, num_classes, multilabel=multilabel, hidden=hidden, dropout=dropout, name=key)
    return keras.Model(inputs, {key: out}, name=f"{backbone}_classifier")


#: TumorNet: the classifier with ``backbone="resnet18"`` by default
tumornet = register_model("tumornet")(functools.partial(classifier, backbone="resnet18"))
