"""Backbones: ``keras.applications`` networks and the ResNet-18/34, ResNeXt-50, ViT and Swin
written here, as named feature pyramids.

``create_backbone(name, input_shape, weights, trainable)`` returns a :class:`Backbone`: a
functional ``keras.Model`` built directly on the application's own layers, whose output is
a dict of feature maps keyed by level, carrying the metadata the rest of the library needs
(stages for freezing, preprocessing mode, channels per level) and saved with it.

Levels and the layers that give them (``Pk`` has stride ``2**k``; the rule: the last
layer computed at that resolution, i.e. just before the next down-sampling; channels in
brackets)::

    backbone            P2 (stride 4)                        P3 (stride 8)
                        P4 (stride 16)                       P5 (stride 32)
    resnet50            conv2_block3_out (256)               conv3_block4_out (512)
                        conv4_block6_out (1024)              conv5_block3_out (2048)
    resnet101           conv2_block3_out (256)               conv3_block4_out (512)
                        conv4_block23_out (1024)             conv5_block3_out (2048)
    resnet50v2          conv2_block3_preact_relu (256)       conv3_block4_preact_relu (512)
                        conv4_block6_preact_relu (1024)      post_relu (2048)
    mobilenet_v2        block_3_expand_relu (144)            block_6_expand_relu (192)
                        block_13_expand_relu (576)           out_relu (1280)
    mobilenet_v3_small  in: expanded_conv_1_depthwise_pad (72)   in: expanded_conv_3_depthwise_pad (96)
                        in: expanded_conv_8_depthwise_pad (288)  model output (576)
    mobilenet_v3_large  in: expanded_conv_3_depthwise_pad (72)   in: expanded_conv_6_depthwise_pad (240)
                        in: expanded_conv_12_depthwise_pad (672) model output (960)
    efficientnet_b0     block3a_expand_activation (144)      block4a_expand_activation (240)
                        block6a_expand_activation (672)      top_activation (1280)
    vgg16               block3_conv3 (256)                   block4_conv3 (512)
                        block5_conv3 (512)                   block5_pool (512)
    convnext_tiny       in: convnext_tiny_downsampling_block_0 (96)
                        in: convnext_tiny_downsampling_block_1 (192)
                        in: convnext_tiny_downsampling_block_2 (384)
                        model output (the final LayerNormalization, 768)

    resnet18 / resnet34 conv2_blockN_out (64)  conv3 (128)  conv4 (256)  conv5 (512)   (last block of each stage)
    resnext50           conv2_block3_out (256)  conv3_block4_out (512)  conv4_block6_out (1024)  conv5_block3_out (2048)
    swin_tiny           stage1_block1 (96)  stage2_block1 (192)  stage3_block5 (384)  norm (768)
    vit_b16 / vit_tiny  P3: P3_upsample  P4: P4_map  P5: P5_pool (768 / 192; no P2)

The last four rows are networks written here, not in ``keras.applications``
(:mod:`src.models.resnet`, :mod:`src.models.vit`, :mod:`src.models.swin`). A ViT has one
resolution (stride 16): its P4 is the normed patch tokens as their grid (the class token
left out), P3 that map upsampled twice, P5 it average-pooled 2x2, all parameter-free. Swin
keeps its tokens as maps, so its stages are the levels.

("in: X" = the tensor feeding layer X, i.e. the expansion activation of the first
strided block for MobileNetV3 and the last block's output for ConvNeXt; the producing
layers there are auto-named.)

(ResNetV2 in Keras down-samples inside the *last* block of each stack, so its stage
outputs ``convN_blockK_out`` already have the next stride; the pre-activation of that
last block is the full-width feature at the stage's own stride.) ``backbone.level_layers``
gives the name of the operation that actually produces each level in the built model
(auto-generated names such as ``re_lu_13`` differ between sessions).

Every level's producer is at or before the application's final layer, and P5 is the
application's output, so the backbone holds *all* the application's weights: a Keras
ImageNet ``*_notop.h5`` file loads into it exactly.

Stages (for :mod:`src.models.unfreeze`; every layer belongs to exactly one, in order):
resnet: conv1..conv5 (``pool1_*`` -> conv1, ``post_*`` -> conv5); vgg16: block1..block5;
mobilenet_v2 / mobilenet_v3 / efficientnet_b0: stem, block1..blockN, top (blocks grouped
as in the papers' stage tables: mobilenet_v2 and efficientnet_b0 have block1..block7,
mobilenet_v3_small block1..block5, mobilenet_v3_large block1..block6); convnext_tiny:
stem, stage_0..stage_3 (a stage owns the down-sampling block in front of it; the final
LayerNormalization belongs to stage_3); resnet18 / resnet34 / resnext50 as resnet; vit_* and
swin_tiny: stem (patch embedding, class token, position embedding), stage1..stage4 (ViT: the
12 blocks in groups of 3; Swin: its four stages, each with the patch merging in front, the
final norm in stage4). Input and input-scaling layers belong to the first
stage; auto-named layers (activations, merges) belong to the stage of their input.

Preprocessing (``backbone.preprocessing``, a mode of :data:`src.models.layers.PREPROCESS_MODES`,
applied to [0, 1] images by the :class:`~src.models.layers.Preprocess` layer the
architectures put in front of the backbone; the backbone itself takes what the
``keras.applications`` network takes): ``caffe`` for resnet50 / resnet101 / vgg16 (RGB->BGR,
x*255 minus the ImageNet mean), ``tf`` for resnet50v2 / mobilenet_v2 ([-1, 1]), ``raw255``
for mobilenet_v3 / efficientnet / convnext (these applications contain their own
preprocessing layers, which expect raw [0, 255] pixels: their ``preprocess_input`` is the
identity). Checkpoints saved before ``raw255`` existed hold those backbones with a
``Rescaling(255)`` first layer and ``Preprocess("none")`` in front: they load and predict
as before.

EfficientNet: Keras inserts an extra ``Rescaling(1/sqrt(std))`` after its Normalization
layer only when built with ``weights="imagenet"`` (keras issue 49930). The backbone always
contains it, so the same graph serves random init, ImageNet weights and a local file.

The networks written here take ``torch`` preprocessing (ImageNet mean / std: the
torchvision and timm ResNets and Swin) or ``tf`` (ViT: timm's augreg ViTs use mean = std =
0.5). No Keras ImageNet file exists for them: ``imagenet`` loads
``<cache_dir>/models/<name>_imagenet_notop.weights.h5`` when it is there (a timm checkpoint
converted by :mod:`src.models.convert`) and otherwise fails at once with
:class:`WeightsUnavailableError` naming ``model.weights=null``, the converter and
``model.weights=/path/to/<file>``.

Weights: ``None`` -> random init; ``"imagenet"`` -> the Keras ImageNet file, downloaded
with ``keras.utils.get_file`` (same file name, URL and hash that ``keras.applications``
uses, read from the Keras module at call time) into ``<cache_dir>/models`` (default
``$KERAS_HOME`` or ``~/.keras``); a cached file is used without any network access, and
when the file is absent the server is probed first with a short timeout, so an offline
machine fails in seconds with :class:`WeightsUnavailableError` naming both alternatives;
a path -> the file is loaded exactly (a Keras application ``.h5`` file or a
``.weights.h5`` / ``.keras`` file saved from a backbone of the same name), and a file that
does not fit raises :class:`WeightsMismatchError` naming the file. (The files, errors and
server probe: :mod:`src.models.weights`.)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any, Callable

import keras
from keras import layers

from .unfreeze import set_trainable
from .weights import (DEFAULT_DOWNLOAD_TIMEOUT, WeightsFile, WeightsMismatchError, WeightsUnavailableError,  # noqa: F401
                      _convnext_file, _efficientnet_file, _keras_home, _mobilenet_v2_file, _mobilenet_v3_file,
                      _own_file, _probe, _resnet_file, _unavailable_message, _vgg16_file)

log = logging.getLogger(__name__)

LEVELS = ("P2", "P3", "P4", "P5")
LEVEL_STRIDES = {"P2": 4, "P3": 8, "P4": 16, "P5": 32}


# ---------------------------------------------------------------------------------------
# Stage rules: layer name -> stage, or None ("same stage as my input").
# ---------------------------------------------------------------------------------------
def _resnet_stage(n: str) -> str | None:
    m = re.match(r"(conv[1-5])_", n)
    if m:
        return m.group(1)
    if n.startswith("pool1_"):
        return "conv1"
    if n.startswith("post_"):
        return "conv5"
    return None


def _vgg_stage(n: str) -> str | None:
    m = re.match(r"(block[1-5])_", n)
    return m.group(1) if m else None


def _groups(*sizes: int) -> dict[int, str]:
    """Block index -> 'blockK' for consecutive groups of the given sizes."""
    out, i = {}, 0
    for k, size in enumerate(sizes, start=1):
        for _ in range(size):
            out[i] = f"block{k}"
            i += 1
    return out


_MBV2_GROUPS = _groups(1, 2, 3, 4, 3, 3, 1)          # t,c,n,s table of MobileNetV2
_MBV3_SMALL_GROUPS = _groups(1, 2, 3, 2, 3)          # 16, 24, 40, 48, 96 channels
_MBV3_LARGE_GROUPS = _groups(1, 2, 3, 4, 2, 3)       # 16, 24, 40, 80, 112, 160 channels


def _mobilenet_v2_stage(n: str) -> str | None:
    if n in ("Conv1", "bn_Conv1", "Conv1_relu"):
        return "stem"
    if n.startswith("expanded_conv_"):
        return _MBV2_GROUPS[0]
    m = re.match(r"block_(\d+)_", n)
    if m:
        return _MBV2_GROUPS[int(m.group(1))]
    if n in ("Conv_1", "Conv_1_bn", "out_relu"):
        return "top"
    return None


def _mobilenet_v3_stage(groups: dict[int, str]) -> Callable[[str], str | None]:
    def fn(n: str) -> str | None:
        if n in ("conv", "conv_bn"):
            return "stem"
        m = re.match(r"expanded_conv_(\d+)_", n)
        if m:
            return groups[int(m.group(1))]
        if n.startswith("expanded_conv_"):
            return groups[0]
        if n in ("conv_1", "conv_1_bn"):
            return "top"
        return None
    return fn


def _efficientnet_stage(n: str) -> str | None:
    if n.startswith("stem_"):
        return "stem"
    m = re.match(r"block(\d)[a-z]_", n)
    if m:
        return f"block{m.group(1)}"
    if n.startswith("top_"):
        return "top"
    return None


def _convnext_stage(prefix: str) -> Callable[[str], str | None]:
    def fn(n: str) -> str | None:
        if n.startswith(f"{prefix}_stem") or n.startswith(f"{prefix}_prestem"):
            return "stem"
        m = re.match(rf"{prefix}_stage_(\d)_", n)
        if m:
            return f"stage_{m.group(1)}"
        m = re.match(rf"{prefix}_downsampling_block_(\d)", n)
        if m:
            return f"stage_{int(m.group(1)) + 1}"
        return None
    return fn


# ---------------------------------------------------------------------------------------
# Networks written here (no keras.applications model): ResNet-18/34, ResNeXt-50, ViT, Swin.
# ---------------------------------------------------------------------------------------
def _own_specs() -> list:
    from . import resnet, swin, vit

    out = []
    for name in ("resnet18", "resnet34", "resnext50"):
        last = resnet.DEPTHS[name]
        out.append(BackboneSpec(name, getattr(resnet, name), "torch",
                                {f"P{s}": f"conv{s}_block{last[s - 2]}_out" for s in (2, 3, 4, 5)},
                                _RESNET_STAGES, _resnet_stage, _own_file(name)))
    for name in vit.CONFIGS:
        out.append(BackboneSpec(name, getattr(vit, name), vit.CONFIGS[name].preprocessing,
                                {"P3": "P3_upsample", "P4": "P4_map", "P5": "P5_pool"},
                                vit.STAGES, vit.stage_rule(vit.CONFIGS[name].depth), _own_file(name)))
    for name, c in swin.CONFIGS.items():
        out.append(BackboneSpec(name, getattr(swin, name), "torch",
                                {f"P{i + 2}": f"stage{i + 1}_block{d - 1}" for i, d in enumerate(c.depths[:3])}
                                | {"P5": "norm"},
                                swin.STAGES, swin.stage_rule, _own_file(name)))
    return out


# ---------------------------------------------------------------------------------------
# The table of architectures.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one architecture and read its levels and stages.

    ``preprocessing``: the input scaling the application expects, a mode of
    :data:`src.models.layers.PREPROCESS_MODES`. ``levels`` values: ``"layer"`` = the output
    of that layer, ``"input:layer"`` = the tensor feeding that layer, ``"output"`` = the
    application's output. ``app``: the ``keras.applications`` function name, or for the
    networks written here (:mod:`.resnet`, :mod:`.vit`, :mod:`.swin`) a builder
    ``fn(inputs) -> keras.Model``.
    """

    name: str
    app: str | Callable[[Any], keras.Model]
    preprocessing: str
    levels: Mapping[str, str]
    stages: tuple[str, ...]
    stage_rule: Callable[[str], str | None]
    imagenet_file: Callable[[tuple], WeightsFile]
    min_size: int = 32


_RESNET_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")

SPECS: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("resnet50", "ResNet50", "caffe",
                 {"P2": "conv2_block3_out", "P3": "conv3_block4_out", "P4": "conv4_block6_out",
                  "P5": "conv5_block3_out"},
                 _RESNET_STAGES, _resnet_stage, _resnet_file("resnet50")),
    BackboneSpec("resnet101", "ResNet101", "caffe",
                 {"P2": "conv2_block3_out", "P3": "conv3_block4_out", "P4": "conv4_block23_out",
                  "P5": "conv5_block3_out"},
                 _RESNET_STAGES, _resnet_stage, _resnet_file("resnet101")),
    BackboneSpec("resnet50v2", "ResNet50V2", "tf",
                 {"P2": "conv2_block3_preact_relu", "P3": "conv3_block4_preact_relu",
                  "P4": "conv4_block6_preact_relu", "P5": "post_relu"},
                 _RESNET_STAGES, _resnet_stage, _resnet_file("resnet50v2")),
    BackboneSpec("mobilenet_v2", "MobileNetV2", "tf",
                 {"P2": "block_3_expand_relu", "P3": "block_6_expand_relu", "P4": "block_13_expand_relu",
                  "P5": "out_relu"},
                 ("stem", *sorted(set(_MBV2_GROUPS.values())), "top"), _mobilenet_v2_stage,
                 _mobilenet_v2_file),
    BackboneSpec("mobilenet_v3_small", "MobileNetV3Small", "raw255",
                 {"P2": "input:expanded_conv_1_depthwise_pad", "P3": "input:expanded_conv_3_depthwise_pad",
                  "P4": "input:expanded_conv_8_depthwise_pad", "P5": "output"},
                 ("stem", *sorted(set(_MBV3_SMALL_GROUPS.values())), "top"),
                 _mobilenet_v3_stage(_MBV3_SMALL_GROUPS), _mobilenet_v3_file("small")),
    BackboneSpec("mobilenet_v3_large", "MobileNetV3Large", "raw255",
                 {"P2": "input:expanded_conv_3_depthwise_pad", "P3": "input:expanded_conv_6_depthwise_pad",
                  "P4": "input:expanded_conv_12_depthwise_pad", "P5": "output"},
                 ("stem", *sorted(set(_MBV3_LARGE_GROUPS.values())), "top"),
                 _mobilenet_v3_stage(_MBV3_LARGE_GROUPS), _mobilenet_v3_file("large")),
    BackboneSpec("efficientnet_b0", "EfficientNetB0", "raw255",
                 {"P2": "block3a_expand_activation", "P3": "block4a_expand_activation",
                  "P4": "block6a_expand_activation", "P5": "top_activation"},
                 ("stem", *(f"block{i}" for i in range(1, 8)), "top"), _efficientnet_stage,
                 _efficientnet_file("b0")),
    BackboneSpec("vgg16", "VGG16", "caffe",
                 {"P2": "block3_conv3", "P3": "block4_conv3", "P4": "block5_conv3", "P5": "block5_pool"},
                 tuple(f"block{i}" for i in range(1, 6)), _vgg_stage, _vgg16_file),
    BackboneSpec("convnext_tiny", "ConvNeXtTiny", "raw255",
                 {"P2": "input:convnext_tiny_downsampling_block_0",
                  "P3": "input:convnext_tiny_downsampling_block_1",
                  "P4": "input:convnext_tiny_downsampling_block_2", "P5": "output"},
                 ("stem", "stage_0", "stage_1", "stage_2", "stage_3"), _convnext_stage("convnext_tiny"),
                 _convnext_file("tiny")),
    *_own_specs(),
)}


def list_backbones() -> list[str]:
    return sorted(SPECS)


def get_spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; available: {list_backbones()}")
    return SPECS[name]


def preprocessing_for(name: str) -> str:
    """The preprocessing mode a backbone expects (without building it)."""
    return get_spec(name).preprocessing


def imagenet_weights_file(name: str, input_shape=(224, 224, 3)) -> WeightsFile:
    """The file name, URL and hash ``keras.applications`` uses for ``weights='imagenet'``."""
    return get_spec(name).imagenet_file(tuple(input_shape))


# ---------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------
def _is_container(layer) -> bool:
    return isinstance(layer, keras.Model)  # Functional and Sequential sub-models


def _leaves(layer) -> list:
    """The layer itself, or the (recursively flattened) layers of a nested model."""
    if _is_container(layer):
        out = []
        for sub in layer.layers:
            out.extend(_leaves(sub))
        return out
    return [layer]


def _parent_ops(op) -> list:
    parents = []
    for node in getattr(op, "_inbound_nodes", []):
        for pn in node.parent_nodes:
            parents.append(pn.operation)
    return parents


def _producer(tensor):
    return tensor._keras_history[0]


# ---------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="btmtl")
class Backbone(keras.Model):
    """A feature extractor: a functional ``keras.Model`` from the image to
    ``{"P2": ..., "P5": ...}``, with the metadata the rest of the library needs.

    It is a real Keras model (a Functional subclass, registered as ``btmtl>Backbone``): it
    is called, saved and loaded like any model, nested in a network or on its own, and its
    layers are the application's own layers, addressable by name (Grad-CAM, freezing). Its
    config is the functional graph (so per-layer ``trainable`` flags and dtype policies
    survive save/load) plus ``architecture`` and ``weights_source``; everything else is
    derived from those and the graph.

    Attributes:
        architecture: architecture name (a key of :data:`SPECS`); the Keras ``name`` is the
            layer name (``<architecture>_backbone``, or ``backbone`` inside a network).
        levels: the level names present, in stride order.
        level_layers: level -> name of the operation producing that feature map.
        feature_strides / feature_channels: level -> stride / channels.
        stage_names: stages in order; ``layer_stages``: layer name -> stage (every leaf
            layer, nested models' layers included, and every operation of the graph).
        preprocessing: the input scaling it expects, a mode of
            :data:`src.models.layers.PREPROCESS_MODES` applied to [0, 1] images by a
            :class:`~src.models.layers.Preprocess` layer in front of it.
        weights_source: what the weights came from (None, "imagenet" or the file path).
        image_shape: ``(height, width, channels)`` of its input.
    """

    def __init__(self, inputs, outputs, name=None, *, architecture: str | None = None, weights_source=None,
                 **kwargs):
        if architecture is None:
            raise ValueError("Backbone needs architecture=<name> (one of list_backbones())")
        spec = get_spec(architecture)
        super().__init__(inputs=inputs, outputs=outputs, name=name or f"{architecture}_backbone", **kwargs)
        self.architecture = architecture
        self.weights_source = weights_source
        out = self.output
        self.levels = [lvl for lvl in LEVELS if lvl in out]
        self.level_layers = {lvl: _producer(out[lvl]).name for lvl in self.levels}
        self.feature_strides = {lvl: LEVEL_STRIDES[lvl] for lvl in self.levels}
        self.feature_channels = {lvl: int(out[lvl].shape[-1]) for lvl in self.levels}
        self.preprocessing = spec.preprocessing
        self.stage_names = list(spec.stages)
        self.layer_stages = self._assign_stages(spec)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.input.shape[1:])

    def get_config(self) -> dict:
        return {**super().get_config(), "architecture": self.architecture, "weights_source": self.weights_source}

    def __repr__(self) -> str:
        levels = ", ".join(f"{lvl}:{self.feature_channels[lvl]}@/{self.feature_strides[lvl]}"
                           for lvl in self.levels)
        return (f"Backbone({self.architecture!r}, name={self.name!r}, image_shape={self.image_shape}, {levels}, "
                f"weights={self.weights_source!r})")

    # -- stages -----------------------------------------------------------------------
    def _assign_stages(self, spec: BackboneSpec) -> dict[str, str]:
        order = {s: i for i, s in enumerate(self.stage_names)}
        first = self.stage_names[0]
        stages: dict[str, str] = {}
        for op in self.operations:
            stage = spec.stage_rule(op.name)
            if stage is None:
                parents = [stages[p.name] for p in _parent_ops(op) if p.name in stages]
                stage = max(parents, key=order.__getitem__) if parents else first
            if stage not in order:  # a rule returned a stage the spec does not list
                raise RuntimeError(f"{self.architecture}: layer {op.name!r} mapped to unknown stage {stage!r}")
            stages[op.name] = stage
            if _is_container(op):
                for leaf in _leaves(op):
                    stages[leaf.name] = stage
        return stages

    def leaf_layers(self) -> list:
        """Every layer in topological order, nested models flattened into their layers."""
        out = []
        for layer in self.layers:
            out.extend(_leaves(layer))
        return out

    def stage_of(self, layer) -> str:
        name = layer if isinstance(layer, str) else layer.name
        return self.layer_stages[name]

    def stage_layers(self, stage: str) -> list:
        if stage not in self.stage_names:
            raise ValueError(f"{self.architecture} has no stage {stage!r}; stages: {self.stage_names}")
        return [lyr for lyr in self.leaf_layers() if self.layer_stages[lyr.name] == stage]


def as_backbone(model: keras.Model, architecture: str | None = None) -> Backbone:
    """``model`` itself when it is a :class:`Backbone`; else a Backbone view of a plain
    functional feature model (the nested ``backbone`` of checkpoints saved before Backbone
    was a Keras model) that shares its layers, so freezing the view freezes the model.
    ``architecture`` is needed for the view only."""
    if isinstance(model, Backbone):
        return model
    if not architecture:
        raise ValueError(f"{model.name!r} is a plain functional model: as_backbone needs its architecture name")
    return Backbone(model.input, model.output, name=model.name, architecture=architecture)


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------
def _normalise_shape(input_shape, spec: BackboneSpec) -> tuple:
    if isinstance(input_shape, int):
        input_shape = (input_shape, input_shape, 3)
    shape = tuple(None if d is None else int(d) for d in input_shape)
    if len(shape) == 2:
        shape = (*shape, 3)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    for d in shape[:2]:
        if d is not None and d < spec.min_size:
            raise ValueError(f"backbone {spec.name} needs inputs of at least {spec.min_size}x{spec.min_size} "
                             f"pixels, got input_shape={shape}")
    return shape


def _build_app(spec: BackboneSpec, input_shape: tuple) -> keras.Model:
    """The application without top on an input named ``image`` (random weights)."""
    inputs = keras.Input(shape=input_shape, name="image")
    if callable(spec.app):  # written here: a builder on the input
        if None in input_shape[:2]:
            raise ValueError(f"backbone {spec.name} needs a fixed input size, got input_shape={input_shape}")
        return spec.app(inputs)
    app = getattr(keras.applications, spec.app)(include_top=False, weights=None, input_tensor=inputs,
                                                 input_shape=input_shape)
    if spec.name.startswith("efficientnet"):
        app = _with_imagenet_stem(app)
    return app


def _with_imagenet_stem(app: keras.Model) -> keras.Model:
    """Clone an EfficientNet built with weights=None into the graph Keras builds for ImageNet.

    keras adds ``Rescaling(1/sqrt(IMAGENET_STDDEV_RGB))`` after the stem Normalization only
    when ``weights == "imagenet"``; without it ImageNet weights would see wrongly scaled inputs.
    """
    from keras.src.applications import efficientnet

    scale = [1.0 / math.sqrt(s) for s in efficientnet.IMAGENET_STDDEV_RGB]
    done = []

    def call_function(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if isinstance(layer, layers.Normalization) and not done:
            done.append(layer.name)
            out = layers.Rescaling(scale, name="imagenet_stddev_rescaling")(out)
        return out

    clone = keras.models.clone_model(app, call_function=call_function)
    if not done:
        raise RuntimeError("EfficientNet stem: no Normalization layer found (keras changed?)")
    return clone


def _level_tensor(app: keras.Model, where: str):
    if where == "output":
        return app.output
    if where.startswith("input:"):
        return app.get_layer(where[len("input:"):]).input
    return app.get_layer(where).output


def _feature_model(spec: BackboneSpec, app: keras.Model, name: str | None, weights_source) -> Backbone:
    outputs = {lvl: _level_tensor(app, spec.levels[lvl]) for lvl in LEVELS if lvl in spec.levels}
    inputs = app.inputs[0] if len(app.inputs) == 1 else app.inputs
    return Backbone(inputs, outputs, name=name, architecture=spec.name, weights_source=weights_source)


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------
def fetch_imagenet_weights(name: str, input_shape=(224, 224, 3), *, cache_dir: str | None = None,
                           timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> str:
    """Path of the Keras ImageNet ``notop`` weights file, downloading it when not cached.

    Raises :class:`WeightsUnavailableError` (naming ``model.weights=null`` and
    ``model.weights=/path/to/<file>``) when the file cannot be obtained.
    """
    wf = imagenet_weights_file(name, input_shape)
    cache_dir = os.path.expanduser(cache_dir or _keras_home())
    if not wf.origin:  # written here: only a converted local file (read-only folders are fine)
        target = os.path.join(cache_dir, "models", wf.fname)
        if os.path.exists(target):
            return target
        raise WeightsUnavailableError(_unavailable_message(
            name, wf, "no Keras ImageNet file is published for this network (it is written in this library) "
            "and no converted file is cached", cache_dir))
    try:
        os.makedirs(os.path.join(cache_dir, "models"), exist_ok=True)
    except OSError:
        pass
    if not os.access(cache_dir, os.W_OK):  # where keras.utils.get_file falls back to
        cache_dir = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    target = os.path.join(cache_dir, "models", wf.fname)
    if not os.path.exists(target):
        try:
            _probe(wf.origin, timeout)
        except WeightsUnavailableError as e:
            raise WeightsUnavailableError(_unavailable_message(name, wf, str(e), cache_dir)) from e.__cause__
    try:
        path = keras.utils.get_file(wf.fname, wf.origin, cache_subdir="models", file_hash=wf.file_hash,
                                    cache_dir=cache_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        reason = str(e)
        if "hash" in reason.lower() and os.path.exists(target):
            os.remove(target)  # do not leave a corrupted file in the cache
            reason = f"the downloaded file failed its hash check ({reason})"
        raise WeightsUnavailableError(_unavailable_message(name, wf, reason, cache_dir)) from e
    return path


def load_weights_file(backbone: Backbone | keras.Model, path, *, name: str | None = None) -> None:
    """Load a weights file exactly, or raise :class:`WeightsMismatchError` naming the file."""
    model = backbone
    name = name or getattr(backbone, "architecture", model.name)
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file not found: {path} (model.weights must be null, imagenet or the path of an "
            f"existing weights file)")
    try:
        model.load_weights(path)
    except Exception as e:
        reason = str(e)
        if len(reason) > 600:  # keras may print whole tensors
            reason = reason[:600] + " ..."
        shape = tuple(model.input.shape[1:])
        hint = ""
        if name in SPECS and not imagenet_weights_file(name, (224, 224, 3)).origin:
            hint = (f"\nThe file must hold the weights of a {name} without its classification top: a "
                    f".weights.h5 saved from create_backbone({name!r}) or converted by src.models.convert "
                    f"({imagenet_weights_file(name).fname}), with the same input channels.")
        elif name in SPECS:
            hint = (f"\nThe file must hold the weights of a {name} without its classification top: the "
                    f"Keras ImageNet file {imagenet_weights_file(name, shape).fname} or a .weights.h5 saved "
                    f"from create_backbone({name!r}) with the same input channels.")
        raise WeightsMismatchError(
            f"weights file {path} does not fit backbone {name!r} (input {shape}): {reason}{hint}") from e


def create_backbone(name: str, input_shape=(224, 224, 3), weights: Any = None, trainable: Any = True, *,
                    cache_dir: str | None = None, download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
                    model_name: str | None = None) -> Backbone:
    """Build a named backbone (see the module docstring for levels, stages and weights).

    Args:
        name: one of :func:`list_backbones`.
        input_shape: (height, width, channels) (an int means square RGB); at least 32 px.
            Sizes that are multiples of 32 give exact strides.
        weights: None (random init), "imagenet" (download or cache) or a weights file path.
        trainable: True (all trainable), False (all frozen) or an unfreeze spec for
            :func:`src.models.unfreeze.set_trainable` (e.g. ``{"from_stage": "conv4"}``).
        cache_dir: where ImageNet files are cached (``<cache_dir>/models``); default
            ``$KERAS_HOME`` or ``~/.keras``.
        download_timeout: seconds to wait for the weights server before giving up.
        model_name: the Keras name of the model (default ``<name>_backbone``; the
            architectures of :mod:`src.models` nest it as ``backbone``).
    """
    spec = get_spec(name)
    shape = _normalise_shape(input_shape, spec)
    if isinstance(weights, str) and weights.strip().lower() in ("", "none", "null"):
        weights = None
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be None, 'imagenet' or a file path, got {weights!r}")

    weights_path = None
    if weights == "imagenet":
        if shape[2] != 3:
            raise ValueError(f"ImageNet weights need 3 input channels, got input_shape={shape}")
        # fetch before building: an offline machine fails in seconds, not after a build
        weights_path = fetch_imagenet_weights(name, shape, cache_dir=cache_dir, timeout=download_timeout)
    elif weights is not None:
        weights_path = os.path.expanduser(os.fspath(weights))
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"weights file not found: {weights_path} (model.weights must be null, imagenet or the path "
                f"of an existing weights file)")

    app = _build_app(spec, shape)
    backbone = _feature_model(spec, app, model_name, None if weights is None else str(weights))
    if weights_path is not None:
        load_weights_file(backbone, weights_path)
        log.info("backbone %s: loaded weights from %s", name, weights_path)

    if trainable is not True and trainable is not None:
        set_trainable(backbone, {"mode": "none"} if trainable is False else trainable)
    return backbone
