"""The backbones written here (ResNet-18/34, ResNeXt-50, ViT-Ti/B, Swin-T): named feature
pyramids with stages, trained one step, saved and loaded, unfrozen by stage, explained by
Grad-CAM on a named stage, weights from a local file; ``imagenet`` without a converted file
is the helpful error.

Expected parameter counts are the published torchvision / timm numbers of the classifiers
minus their 1000-class top, plus the BatchNorm moving statistics Keras counts as weights.
Everything runs at 32 px with eager train steps (no graph tracing). Every backbone gets the
whole battery: structure and parameter counts, one train step, a ``.keras`` round trip, a
weights-file round trip, ``unfreeze`` by stage and fraction, and Grad-CAM on a named stage
(each network is built once per test module and shared by the tests; the CNNs' U-Net encoder
is in ``test_unet.py``).
"""
from __future__ import annotations

import keras
import numpy as np
import pytest

from src.models import create_model
from src.models.backbones import (
    LEVEL_STRIDES,
    Backbone,
    create_backbone,
    imagenet_weights_file,
)
from src.models.swin import relative_index, shift_mask, window_shift
from src.models.unfreeze import count_params, set_trainable
from src.models.weights import WeightsMismatchError, WeightsUnavailableError

SIZE = 32
NAMES = ["resnet18", "resnet34", "resnext50", "vit_tiny", "vit_b16", "swin_tiny"]
FULL = NAMES  # the whole battery on every backbone
CHANNELS = {
    "resnet18": {"P2": 64, "P3": 128, "P4": 256, "P5": 512},
    "resnet34": {"P2": 64, "P3": 128, "P4": 256, "P5": 512},
    "resnext50": {"P2": 256, "P3": 512, "P4": 1024, "P5": 2048},
    "vit_tiny": {"P3": 192, "P4": 192, "P5": 192},
    "vit_b16": {"P3": 768, "P4": 768, "P5": 768},
    "swin_tiny": {"P2": 96, "P3": 192, "P4": 384, "P5": 768},
}
# published totals (with the 1000-class head) - head (+ BatchNorm moving mean/variance)
PARAMS = {
    "resnet18": 11_689_512 - 513_000 + 9_600,
    "resnet34": 21_797_672 - 513_000 + 17_024,
    "resnext50": 25_028_904 - 2_049_000 + 68_224,
    "vit_tiny": 5_717_416 - 193_000,
    "vit_b16": 86_567_656 - 769_000,
    "swin_tiny": 28_288_354 - 769_000,
}
STAGES = {n: ["conv1", "conv2", "conv3", "conv4", "conv5"] for n in ("resnet18", "resnet34", "resnext50")} | {
    n: ["stem", "stage1", "stage2", "stage3", "stage4"] for n in ("vit_tiny", "vit_b16", "swin_tiny")}
# a layer of the last stage Grad-CAM can explain (a 4-D map), and known (layer, stage) pairs
# (2x2 at 32 px: a 1x1 map normalises to zero)
CAM_LAYER = {"resnet18": "conv4_block2_out", "resnet34": "conv4_block6_out", "resnext50": "conv4_block6_out",
             "vit_tiny": "P4_map", "vit_b16": "P4_map", "swin_tiny": "stage3_block5"}
KNOWN_STAGES = {
    "resnet18": [("conv1_conv", "conv1"), ("pool1_pool", "conv1"), ("conv3_block1_0_conv", "conv3"),
                 ("conv5_block2_out", "conv5")],
    "resnet34": [("conv4_block6_2_bn", "conv4"), ("conv5_block1_1_conv", "conv5")],
    "resnext50": [("conv2_block3_3_conv", "conv2"), ("conv4_block1_2_conv", "conv4")],
    "vit_tiny": [("patch_embed", "stem"), ("pos_embed", "stem"), ("block2", "stage1"), ("block3", "stage2"),
                 ("block11", "stage4"), ("norm", "stage4")],
    "vit_b16": [("cls_token", "stem"), ("block8", "stage3")],
    "swin_tiny": [("patch_embed_norm", "stem"), ("stage2_merge", "stage2"), ("stage3_block5", "stage3"),
                  ("norm", "stage4")],
}


def _x(n=2, seed=0):
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def nets():
    cache: dict = {}

    def get(name: str) -> keras.Model:
        if name not in cache:
            keras.utils.set_random_seed(1)
            cache[name] = create_model("classifier", backbone=name, image_size=SIZE, num_classes=3, dropout=0.0)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_pyramid_stages_and_parameters(nets, name):
    bb = nets(name).get_layer("backbone")
    assert isinstance(bb, Backbone) and bb.architecture == name
    assert bb.feature_channels == CHANNELS[name] and bb.levels == list(CHANNELS[name])
    out = bb(_x())
    for lvl, t in out.items():
        s = LEVEL_STRIDES[lvl]
        assert tuple(t.shape) == (2, SIZE // s, SIZE // s, CHANNELS[name][lvl]), lvl
    assert count_params(bb)["total"] == PARAMS[name]
    assert bb.stage_names == STAGES[name]
    order = {s: i for i, s in enumerate(bb.stage_names)}
    idx = [order[bb.stage_of(lyr)] for lyr in bb.leaf_layers()]
    assert idx == sorted(idx) and set(idx) == set(order.values())
    for layer, stage in KNOWN_STAGES[name]:
        assert bb.stage_of(layer) == stage, layer


@pytest.mark.parametrize("name", FULL)
def test_one_train_step_changes_the_weights(nets, name):
    net = nets(name)
    clone = keras.models.clone_model(net)
    clone.set_weights(net.get_weights())
    clone.compile(optimizer=keras.optimizers.SGD(0.05), loss={"class": "sparse_categorical_crossentropy"},
                  run_eagerly=True)
    first = clone.get_layer("backbone").trainable_weights[0]  # the stem: the gradient reaches the bottom
    before = np.asarray(first).copy()
    logs = clone.train_on_batch(_x(4), {"class": np.array([0, 1, 2, 1])}, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert np.abs(np.asarray(first) - before).max() > 0


@pytest.mark.parametrize("name", FULL)
def test_keras_file_round_trip_gives_identical_outputs(nets, name, tmp_path):
    net = nets(name)
    path = tmp_path / f"{name}.keras"
    net.save(path)
    loaded = keras.models.load_model(path)
    x = _x(seed=3)
    np.testing.assert_array_equal(np.asarray(loaded(x)["class"]), np.asarray(net(x)["class"]))
    bb = loaded.get_layer("backbone")
    assert isinstance(bb, Backbone) and bb.architecture == name and bb.layer_stages == net.get_layer(
        "backbone").layer_stages


@pytest.mark.parametrize("name", FULL)
def test_weights_file_loads_exactly(nets, name, tmp_path):
    bb = nets(name).get_layer("backbone")
    path = tmp_path / f"{name}.weights.h5"
    bb.save_weights(str(path))
    again = create_backbone(name, (SIZE, SIZE, 3), weights=str(path))
    x = _x(seed=4)
    a, b = bb(x), again(x)
    for lvl in a:
        np.testing.assert_array_equal(np.asarray(a[lvl]), np.asarray(b[lvl]))
    assert again.weights_source == str(path)


@pytest.mark.parametrize("name", FULL)
def test_unfreeze_by_stage_and_fraction(nets, name):
    bb = nets(name).get_layer("backbone")
    try:
        last = bb.stage_names[-1]
        s = set_trainable(bb, {"from_stage": last})
        stage_of = {v.path: bb.stage_of(lyr) for lyr in bb.leaf_layers() for v in lyr.weights}
        assert s["trainable_params"] > 0 and s["non_trainable_params"] > 0
        assert {stage_of[v.path] for v in bb.trainable_weights} == {last}
        s = set_trainable(bb, {"fraction": 0.5})
        assert 0 < s["trainable_layers"] < s["total_layers"]
        assert bb.stage_of(s["first_trainable_layer"]) != bb.stage_names[0]
    finally:
        set_trainable(bb, {"mode": "all"})


@pytest.mark.parametrize("name", FULL)
def test_gradcam_on_a_named_stage(nets, name):
    from src.evaluation.gradcam import GradCAM

    res = GradCAM(nets(name), layer=f"backbone/{CAM_LAYER[name]}")(_x(seed=5), head="class")
    assert res.layer == f"backbone/{CAM_LAYER[name]}"
    assert res.raw.shape == (2, 2, 2)  # the named map's grid (stride 16 at 32 px)
    assert res.cams.shape == (2, SIZE, SIZE) and np.isfinite(res.cams).all()
    assert res.cams.min() >= 0 and res.cams.max() <= 1


def test_gradcam_on_a_vit_block_uses_its_patch_tokens_as_a_grid(nets):
    from src.evaluation.gradcam import GradCAM, token_grid

    assert token_grid(1 + 14 * 14, (224, 224)) == (1, 14, 14) and token_grid(1 + 2 * 3, (32, 48)) == (1, 2, 3)
    res = GradCAM(nets("vit_tiny"), layer="backbone/block5")(_x(seed=7), head="class")
    assert res.raw.shape == (2, 2, 2) and res.cams.shape == (2, SIZE, SIZE) and np.isfinite(res.cams).all()


def test_detector_over_window_backbone():
    net = create_model("detector", backbone="swin_tiny", image_size=SIZE, num_classes=2)  # box levels P3-P5
    boxes = np.asarray(net(_x())["boxes"])
    assert boxes.shape == (2, 2, 4) and (boxes[..., 2:] > boxes[..., :2]).all()


def test_imagenet_without_a_converted_file_names_both_alternatives(tmp_path):
    cache = tmp_path / "keras_home"
    fname = imagenet_weights_file("resnet18").fname
    assert fname == "resnet18_imagenet_notop.weights.h5"
    with pytest.raises(WeightsUnavailableError) as e:
        create_backbone("resnet18", (SIZE, SIZE, 3), weights="imagenet", cache_dir=str(cache))
    msg = str(e.value)
    assert "model.weights=null" in msg and f"model.weights=/path/to/{fname}" in msg
    assert str(cache / "models" / fname) in msg and "src.models.convert" in msg


def test_imagenet_uses_a_converted_file_in_the_cache(nets, tmp_path):
    bb = nets("resnet18").get_layer("backbone")
    cache = tmp_path / "keras_home"
    (cache / "models").mkdir(parents=True)
    bb.save_weights(str(cache / "models" / imagenet_weights_file("resnet18").fname))
    got = create_backbone("resnet18", (SIZE, SIZE, 3), weights="imagenet", cache_dir=str(cache))
    x = _x(seed=6)
    np.testing.assert_array_equal(np.asarray(got(x)["P5"]), np.asarray(bb(x)["P5"]))
    assert got.weights_source == "imagenet"


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_a_foreign_weights_file_is_a_mismatch_naming_it(nets, tmp_path):
    path = tmp_path / "r18.weights.h5"
    nets("resnet18").get_layer("backbone").save_weights(str(path))
    with pytest.raises(WeightsMismatchError, match="r18.weights.h5.*resnet34"):
        create_backbone("resnet34", (SIZE, SIZE, 3), weights=str(path))


def test_swin_takes_any_input_size_with_one_weights_file(nets, tmp_path):
    """The bias table (Swin) and the position embeddings (ViT) do not depend on the input
    size: a file saved at 32 px loads at 64 px (where stage 1 has windows to shift and pad)."""
    a = nets("swin_tiny").get_layer("backbone")
    path = tmp_path / "swin.weights.h5"
    a.save_weights(str(path))
    b = create_backbone("swin_tiny", (64, 64, 3), weights=str(path))
    assert count_params(a) == count_params(b)
    assert tuple(b(np.zeros((1, 64, 64, 3), np.float32))["P5"].shape) == (1, 2, 2, 768)


def test_swin_windows_shifts_and_masks():
    assert window_shift((56, 56), 7, True) == ((7, 7), (3, 3))
    assert window_shift((7, 7), 7, True) == ((7, 7), (0, 0))     # grid = window: no shift
    assert window_shift((4, 16), 7, False) == ((4, 7), (0, 0))
    idx = relative_index((7, 7), 7)
    assert idx.shape == (49, 49) and idx.min() == 0 and idx.max() == 13 * 13 - 1
    assert (np.diag(idx) == 6 * 13 + 6).all()                    # zero offset: the table's centre
    assert relative_index((3, 3), 7).max() < 13 * 13
    assert shift_mask((14, 14), (7, 7), (0, 0)) is None
    m = shift_mask((14, 14), (7, 7), (3, 3))
    assert m.shape == (4, 49, 49)
    assert (m[0] == 0).all()                                     # the top-left window is one region
    assert (m[3] < 0).any() and (np.diagonal(m, axis1=1, axis2=2) == 0).all()
