"""Backbones: every architecture builds as a named feature pyramid; weights None / imagenet / path.

The ImageNet path is exercised for real against a local HTTP server on 127.0.0.1: the test
points the Keras module constant the URL is built from (``BASE_WEIGHT_PATH``) at the server,
serves a weights file it generated from a randomly initialised Keras application (in the
legacy ``.h5`` layout of the real Keras files), and registers that file's md5 in the Keras
hash table (``WEIGHTS_HASHES``), so ``keras.utils.get_file`` downloads it, verifies the
hash, caches it under a temporary ``cache_dir`` and the backbone loads it. Nothing is
written to the real ``~/.keras``.
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from src.models.backbones import (
    LEVEL_STRIDES,
    SPECS,
    Backbone,
    as_backbone,
    create_backbone,
    imagenet_weights_file,
    list_backbones,
    preprocessing_for,
)
from src.models.layers import PREPROCESS_MODES, Preprocess
from src.models.unfreeze import set_trainable
from src.models.weights import WeightsMismatchError, WeightsUnavailableError

SIZE = 64
NAMES = [n for n in list_backbones() if isinstance(SPECS[n].app, str)]  # keras.applications ones (the
# networks written here: tests/models/test_own_backbones.py)

# Independent expectations (from the papers / keras sources), not read from the module.
EXPECTED_CHANNELS = {
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnet50v2": (256, 512, 1024, 2048),
    "mobilenet_v2": (144, 192, 576, 1280),
    "mobilenet_v3_small": (72, 96, 288, 576),
    "mobilenet_v3_large": (72, 240, 672, 960),
    "efficientnet_b0": (144, 240, 672, 1280),
    "vgg16": (256, 512, 512, 512),
    "convnext_tiny": (96, 192, 384, 768),
}
EXPECTED_PREPROCESSING = {
    "resnet50": "caffe", "resnet101": "caffe", "vgg16": "caffe",
    "resnet50v2": "tf", "mobilenet_v2": "tf",
    "mobilenet_v3_small": "raw255", "mobilenet_v3_large": "raw255", "efficientnet_b0": "raw255",
    "convnext_tiny": "raw255",
}
KERAS_MODULE = {
    "resnet50": "resnet", "resnet101": "resnet", "resnet50v2": "resnet_v2", "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_small": "mobilenet_v3", "mobilenet_v3_large": "mobilenet_v3",
    "efficientnet_b0": "efficientnet", "vgg16": "vgg16", "convnext_tiny": "convnext",
}
KNOWN_STAGES = {  # (layer name, stage) pairs read off the keras sources
    "resnet50": [("conv1_conv", "conv1"), ("pool1_pool", "conv1"), ("conv2_block1_0_conv", "conv2"),
                 ("conv4_block6_out", "conv4"), ("conv5_block3_3_bn", "conv5")],
    "resnet101": [("conv4_block23_out", "conv4"), ("conv5_block1_1_conv", "conv5")],
    "resnet50v2": [("conv1_conv", "conv1"), ("conv3_block4_preact_relu", "conv3"), ("post_bn", "conv5")],
    "mobilenet_v2": [("Conv1", "stem"), ("expanded_conv_project", "block1"), ("block_2_add", "block2"),
                     ("block_13_expand_relu", "block6"), ("block_16_project", "block7"), ("out_relu", "top")],
    "mobilenet_v3_small": [("conv", "stem"), ("expanded_conv_project_bn", "block1"),
                           ("expanded_conv_2_add", "block2"), ("expanded_conv_8_expand", "block5"),
                           ("conv_1_bn", "top")],
    "mobilenet_v3_large": [("expanded_conv_project", "block1"), ("expanded_conv_9_add", "block4"),
                           ("expanded_conv_12_expand", "block6"), ("conv_1", "top")],
    "efficientnet_b0": [("stem_conv", "stem"), ("block1a_dwconv", "block1"), ("block6d_add", "block6"),
                        ("top_conv", "top")],
    "vgg16": [("block1_conv1", "block1"), ("block5_pool", "block5")],
    "convnext_tiny": [("convnext_tiny_stem", "stem"), ("convnext_tiny_stem_conv", "stem"),
                      ("convnext_tiny_stage_0_block_2_layer_scale", "stage_0"),
                      ("convnext_tiny_downsampling_block_0", "stage_1"),
                      ("convnext_tiny_downsampling_conv_2", "stage_3")],
}


@pytest.fixture(scope="module")
def built():
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            cache[name] = create_backbone(name, (SIZE, SIZE, 3), weights=None)
        return cache[name]

    return get


def _leaves(model):
    out = []
    for layer in model.layers:
        out.extend(_leaves(layer) if isinstance(layer, keras.Model) else [layer])
    return out


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", NAMES)
def test_levels_strides_and_channels(built, name):
    bb = built(name)
    assert bb.levels == ["P2", "P3", "P4", "P5"]
    assert bb.feature_strides == {"P2": 4, "P3": 8, "P4": 16, "P5": 32}
    assert tuple(bb.feature_channels[lvl] for lvl in bb.levels) == EXPECTED_CHANNELS[name]
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    out = bb(x)
    assert sorted(out) == bb.levels
    for lvl, t in out.items():
        s = LEVEL_STRIDES[lvl]
        assert tuple(t.shape) == (2, SIZE // s, SIZE // s, bb.feature_channels[lvl]), (name, lvl)
        assert np.isfinite(np.asarray(t)).all()
    # every level's producer is a named operation of the model
    names = {op.name for op in bb.operations}
    assert set(bb.level_layers.values()) <= names
    # P5 is the application's last output, so all of its weights live in the backbone
    assert bb.input.name == "image"


@pytest.mark.parametrize("name", NAMES)
def test_stage_names_cover_all_layers_in_order(built, name):
    bb = built(name)
    assert bb.stage_names == list(SPECS[name].stages)
    leaves = _leaves(bb)
    assert [lyr.name for lyr in bb.leaf_layers()] == [lyr.name for lyr in leaves]
    order = {s: i for i, s in enumerate(bb.stage_names)}
    idx = []
    for layer in leaves:
        assert layer.name in bb.layer_stages, f"{name}: {layer.name} has no stage"
        idx.append(order[bb.stage_of(layer)])
    for op in bb.operations:
        assert bb.layer_stages[op.name] in order
    assert idx == sorted(idx), f"{name}: stages are not contiguous in topological order"
    # every stage owns at least one layer with weights
    for stage in bb.stage_names:
        assert any(lyr.weights for lyr in bb.stage_layers(stage)), (name, stage)
    for layer_name, stage in KNOWN_STAGES[name]:
        assert bb.stage_of(layer_name) == stage, (name, layer_name)
    with pytest.raises(ValueError, match="no stage"):
        bb.stage_layers("nope")


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_mode_matches_keras(built, name):
    """Preprocess(bb.preprocessing) on [0, 1] images == the application's preprocess_input on
    [0, 255] pixels (the identity for the networks that normalise inside: raw255), and the
    backbone starts with the application's own layers (no extra input scaling)."""
    import importlib

    bb = built(name)
    assert bb.preprocessing == EXPECTED_PREPROCESSING[name] == preprocessing_for(name)
    mod = importlib.import_module(f"keras.src.applications.{KERAS_MODULE[name]}")
    x01 = np.random.default_rng(1).random((1, 8, 8, 3), dtype=np.float32)
    want = np.asarray(mod.preprocess_input(x01 * 255.0))
    got = np.asarray(Preprocess(bb.preprocessing)(x01))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not any(isinstance(lyr, keras.layers.Rescaling) and lyr.name.endswith("pixels_to_255")
                   for lyr in bb.layers)


def test_every_spec_uses_the_one_preprocessing_vocabulary():
    assert {spec.preprocessing for spec in SPECS.values()} <= set(PREPROCESS_MODES)


def test_layers_addressable_for_gradcam(built):
    bb = built("resnet50")
    conv = bb.get_layer("conv5_block3_out")
    sub = keras.Model(bb.input, [conv.output, bb.output["P4"]])
    x = np.zeros((1, SIZE, SIZE, 3), np.float32)
    a, b = sub(x)
    assert a.shape == (1, 2, 2, 2048) and b.shape == (1, 4, 4, 1024)


def test_backbone_save_load_keeps_graph_metadata_and_trainable_flags(tmp_path):
    name = "mobilenet_v3_small"  # input scaling layer + auto-named layers; small file
    bb = create_backbone(name, (SIZE, SIZE, 3), trainable={"from_stage": "block4"})
    path = tmp_path / f"{name}.keras"
    bb.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, Backbone) and loaded.architecture == name and loaded.name == f"{name}_backbone"
    for attr in ("levels", "level_layers", "feature_strides", "feature_channels", "stage_names", "layer_stages",
                 "preprocessing", "weights_source", "image_shape"):
        assert getattr(loaded, attr) == getattr(bb, attr), attr
    flags = [(lyr.name, lyr.trainable) for lyr in bb.leaf_layers() if lyr.weights]
    assert [(lyr.name, lyr.trainable) for lyr in loaded.leaf_layers() if lyr.weights] == flags
    assert {t for _, t in flags} == {True, False}
    x = np.random.default_rng(5).random((1, SIZE, SIZE, 3), dtype=np.float32)
    a, b = bb(x), loaded(x)
    for lvl in bb.levels:
        np.testing.assert_array_equal(np.asarray(a[lvl]), np.asarray(b[lvl]))


def test_backbone_nested_in_a_network_survives_save_load(tmp_path):
    bb = create_backbone("vgg16", (32, 32, 3), model_name="backbone")
    inputs = keras.Input((32, 32, 3), name="image")
    net = keras.Model(inputs, {"p": keras.layers.GlobalAveragePooling2D()(bb(inputs)["P5"])})
    path = tmp_path / "net.keras"
    net.save(path)
    sub = keras.models.load_model(path).get_layer("backbone")
    assert isinstance(sub, Backbone) and sub.architecture == "vgg16" and sub.stage_of("block3_conv1") == "block3"
    assert as_backbone(sub) is sub


def test_plain_functional_backbone_of_older_checkpoints_gets_a_view(tmp_path):
    """Networks saved before Backbone was a Keras model hold a plain functional ``backbone``:
    as_backbone gives a view that shares its layers (freezing the view freezes the network)."""
    bb = create_backbone("vgg16", (32, 32, 3))
    plain = keras.Model(bb.input, bb.output, name="backbone")
    inputs = keras.Input((32, 32, 3), name="image")
    net = keras.Model(inputs, {"p": keras.layers.GlobalAveragePooling2D()(plain(inputs)["P5"])})
    path = tmp_path / "old.keras"
    net.save(path)
    sub = keras.models.load_model(path).get_layer("backbone")
    assert not isinstance(sub, Backbone)
    with pytest.raises(ValueError, match="architecture"):
        as_backbone(sub)
    view = as_backbone(sub, "vgg16")
    assert view.levels == bb.levels and view.layer_stages == bb.layer_stages
    set_trainable(view, {"from_stage": "block5"})
    assert {v.path.split("/")[-2] for v in sub.trainable_weights} == {"block5_conv1", "block5_conv2", "block5_conv3"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'resnet152'.*resnet50"):
        create_backbone("resnet152")
    with pytest.raises(ValueError, match="at least 32"):
        create_backbone("vgg16", (16, 16, 3))
    with pytest.raises(ValueError, match="3 input channels"):
        create_backbone("vgg16", (64, 64, 1), weights="imagenet")
    with pytest.raises(FileNotFoundError, match="/no/such/file.weights.h5"):
        create_backbone("vgg16", (64, 64, 3), weights="/no/such/file.weights.h5")


def test_trainable_argument(built):
    frozen = create_backbone("vgg16", (32, 32, 3), trainable=False)
    assert frozen.trainable_weights == []
    part = create_backbone("vgg16", (32, 32, 3), trainable={"from_stage": "block5"})
    names = {v.path.split("/")[-2] for v in part.trainable_weights}
    assert names == {"block5_conv1", "block5_conv2", "block5_conv3"}


# ----------------------------------------------------------------------------- weights: path
def test_weights_path_round_trip(tmp_path):
    a = create_backbone("mobilenet_v3_small", (SIZE, SIZE, 3))
    path = tmp_path / "a.weights.h5"
    a.save_weights(str(path))
    b = create_backbone("mobilenet_v3_small", (SIZE, SIZE, 3), weights=str(path))
    c = create_backbone("mobilenet_v3_small", (SIZE, SIZE, 3))
    x = np.random.default_rng(2).random((2, SIZE, SIZE, 3), dtype=np.float32)
    pa, pb, pc = a(x), b(x), c(x)
    for lvl in pa:
        np.testing.assert_array_equal(np.asarray(pa[lvl]), np.asarray(pb[lvl]))
    a5, c5 = np.asarray(pa["P5"]), np.asarray(pc["P5"])
    assert np.abs(a5 - c5).max() > 1e-3 * np.abs(a5).max()  # a fresh random backbone differs
    assert b.weights_source == str(path) and b.get_config()["weights_source"] == str(path)


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_path_mismatch_names_the_file(built, tmp_path):
    v = built("vgg16")
    path = tmp_path / "vgg.weights.h5"
    v.save_weights(str(path))
    with pytest.raises(WeightsMismatchError) as e:
        create_backbone("resnet50", (SIZE, SIZE, 3), weights=str(path))
    msg = str(e.value)
    assert str(path) in msg and "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg


# ----------------------------------------------------------------------------- weights: imagenet
def _legacy_h5(model: keras.Model, path: Path) -> str:
    """Write weights in the legacy layout of the Keras ImageNet files; return the md5."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return hashlib.md5(path.read_bytes()).hexdigest()


@contextmanager
def _serve(directory: Path):
    requests: list[tuple[str, str]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(directory), **k)

        def log_message(self, *a):
            pass

        def do_GET(self):
            requests.append(("GET", self.path))
            super().do_GET()

        def do_HEAD(self):
            requests.append(("HEAD", self.path))
            super().do_HEAD()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/", requests
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def v3_small_file(tmp_path_factory):
    """A random MobileNetV3Small (no top) saved like the Keras ImageNet file; (dir, fname, md5, app)."""
    d = tmp_path_factory.mktemp("served")
    wf = imagenet_weights_file("mobilenet_v3_small", (SIZE, SIZE, 3))
    app = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    md5 = _legacy_h5(app, d / wf.fname)
    return d, wf.fname, md5, app


def test_imagenet_downloads_verifies_caches_and_loads(tmp_path, monkeypatch, no_proxy, v3_small_file):
    from keras.src.applications import mobilenet_v3

    served, fname, md5, app = v3_small_file
    key = "small_224_1.0_float"
    monkeypatch.setitem(mobilenet_v3.WEIGHTS_HASHES, key, (mobilenet_v3.WEIGHTS_HASHES[key][0], md5))
    cache = tmp_path / "keras_home"
    x = np.random.default_rng(3).random((2, SIZE, SIZE, 3), dtype=np.float32)
    with _serve(served) as (url, requests):
        monkeypatch.setattr(mobilenet_v3, "BASE_WEIGHT_PATH", url)
        bb = create_backbone("mobilenet_v3_small", (SIZE, SIZE, 3), weights="imagenet", cache_dir=str(cache))
        assert ("GET", f"/{fname}") in requests
        assert [r for r in requests if r[0] == "GET"] == [("GET", f"/{fname}")]
    cached = cache / "models" / fname
    assert cached.is_file() and hashlib.md5(cached.read_bytes()).hexdigest() == md5
    # the backbone is exactly the keras application with these weights (both fed [0, 255] pixels)
    np.testing.assert_allclose(np.asarray(bb(x * 255.0)["P5"]), np.asarray(app(x * 255.0)), rtol=1e-5, atol=1e-5)
    assert bb.weights_source == "imagenet"
    # server gone: the cached file is used without any network access
    again = create_backbone("mobilenet_v3_small", (SIZE, SIZE, 3), weights="imagenet", cache_dir=str(cache))
    np.testing.assert_array_equal(np.asarray(again(x)["P5"]), np.asarray(bb(x)["P5"]))


def test_imagenet_hash_mismatch_is_an_error_and_not_cached(tmp_path, monkeypatch, no_proxy, v3_small_file):
    from keras.src.applications import mobilenet_v3

    served, fname, _, _ = v3_small_file
    key = "small_224_1.0_float"
    monkeypatch.setitem(mobilenet_v3.WEIGHTS_HASHES, key, (mobilenet_v3.WEIGHTS_HASHES[key][0], "0" * 32))
    cache = tmp_path / "keras_home"
    with _serve(served) as (url, _):
        monkeypatch.setattr(mobilenet_v3, "BASE_WEIGHT_PATH", url)
        with pytest.raises(WeightsUnavailableError, match="hash") as e:
            create_backbone("mobilenet_v3_small", (SIZE, SIZE, 3), weights="imagenet", cache_dir=str(cache))
    assert "model.weights=null" in str(e.value)
    assert not (cache / "models" / fname).exists()


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet101"])
def test_imagenet_offline_fails_fast_naming_both_alternatives(tmp_path, monkeypatch, no_proxy, name):
    from keras.src.applications import mobilenet_v3, resnet

    base = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setattr(mobilenet_v3, "BASE_WEIGHT_PATH", base)
    monkeypatch.setattr(resnet, "BASE_WEIGHTS_PATH", base)
    cache = tmp_path / "keras_home"
    fname = imagenet_weights_file(name, (SIZE, SIZE, 3)).fname
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as e:
        create_backbone(name, (SIZE, SIZE, 3), weights="imagenet", cache_dir=str(cache), download_timeout=5)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "model.weights=null" in msg
    assert f"model.weights=/path/to/{fname}" in msg
    assert "~/.keras/models/" in msg and str(cache / "models" / fname) in msg
    assert base in msg
    if name == "resnet101":
        assert fname == "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert not (cache / "models" / fname).exists()


class _Captured(Exception):
    pass


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
@pytest.mark.parametrize("name", NAMES)
def test_imagenet_file_is_what_keras_requests(monkeypatch, name):
    """Our (file name, URL, hash) equals what keras.applications itself asks get_file for."""
    from keras.src.utils import file_utils

    seen = {}

    def fake_get_file(fname=None, origin=None, *args, file_hash=None, **kwargs):
        seen.update(fname=fname, origin=origin, file_hash=file_hash, cache_subdir=kwargs.get("cache_subdir"))
        raise _Captured

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    shape = (96, 96, 3) if name == "mobilenet_v2" else (SIZE, SIZE, 3)
    with pytest.raises(_Captured):
        getattr(keras.applications, SPECS[name].app)(include_top=False, weights="imagenet", input_shape=shape)
    wf = imagenet_weights_file(name, shape)
    assert (seen["fname"], seen["origin"], seen["file_hash"]) == (wf.fname, wf.origin, wf.file_hash)
    assert seen["cache_subdir"] == "models"
    if name == "mobilenet_v2":  # keras picks the file by input size, 224 when not a trained size
        assert wf.fname.endswith("_1.0_96_no_top.h5")
        assert imagenet_weights_file(name, (SIZE, SIZE, 3)).fname.endswith("_1.0_224_no_top.h5")


def test_efficientnet_equals_keras_imagenet_graph(built, tmp_path, monkeypatch):
    """Keras adds a std rescaling to EfficientNet only for weights='imagenet'; ours always has it."""
    from keras.src.applications import efficientnet
    from keras.src.backend import config as kconfig

    shape = (SIZE, SIZE, 3)
    bb = built("efficientnet_b0")
    assert any(lyr.name == "imagenet_stddev_rescaling" for lyr in bb.layers)
    wf = imagenet_weights_file("efficientnet_b0", shape)
    assert wf.fname == "efficientnetb0_notop.h5"
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    md5 = _legacy_h5(bb, home / "models" / wf.fname)  # the backbone's weights, keras' file layout
    # keras' own imagenet build finds the file in its (redirected) cache: no network
    monkeypatch.setattr(kconfig, "_KERAS_DIR", str(home))
    monkeypatch.setitem(efficientnet.WEIGHTS_HASHES, "b0", (efficientnet.WEIGHTS_HASHES["b0"][0], md5))
    ref = keras.applications.EfficientNetB0(include_top=False, weights="imagenet", input_shape=shape)
    x = np.random.default_rng(4).random((2, *shape), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(bb(x * 255.0)["P5"]), np.asarray(ref(x * 255.0)), rtol=1e-4, atol=1e-4)
