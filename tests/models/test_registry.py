"""Every registered model: builds tiny, fits one step, and save -> load gives identical outputs;
the strict builder contract (unknown config keys stop with their name)."""
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import keras
from omegaconf import OmegaConf

from src.config import compose
from src.heads import target_key
from src.models import ModelConfigError, builder_keys, create_model, list_models, register_model
from src.models.task import MultiTaskModel, load_checkpoint, split_model_config

CONF = Path(__file__).resolve().parents[2] / "conf"

# one loss per target; auxiliary heads (``mask_aux1``) use their target's loss
LOSSES = {"class": "ce", "multilabel": "bce", "boxes": "giou", "mask": "dice_focal", "tumor": "bce",
          "subtype": "ce", "x": "mse"}
HEAD_LOSSES = {"boxes_aux1": "dense_box"}  # the dense box head's training maps
# architectures over a backbone run over a light one here (the fit / save / load round trip
# is about the heads, the wrapper and serialisation); the real ResNet101 detector is built
# and checked in test_resnet101_detector_builds_on_resnet101 below, and ResNet101's stages,
# weights files and save/load in tests/models/test_backbones.py
TINY = {"small_cnn": {"widths": (4, 8)}, "detector": {"backbone": "mobilenet_v3_small"},
        "resnet101_detector": {"backbone": "mobilenet_v3_small"},
        "classifier": {"backbone": "mobilenet_v2"},
        "unet": {"backbone": "resnet18", "heads": ("mask", "class"), "decoder_channels": (8, 8, 8, 4, 4)},
        "efficient_mtnet": {"ltd_channels": (8, 8, 8), "widths": (8, 12, 16), "blocks": (1, 1, 1), "expansion": 2,
                            "neck_channels": 16, "decoder_channels": (16, 8), "ham_channels": 8, "ham_rank": 4,
                            "class_hidden": 8}}
NUM_CLASSES = 3


def tiny_batch(outputs, n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 3), dtype=np.float32)
    y, w = {}, {}
    if "class" in outputs:
        y["class"] = rng.integers(0, NUM_CLASSES, n).astype("int32")
        w["class"] = np.ones(n, "float32")
    if "multilabel" in outputs:
        y["multilabel"] = rng.integers(0, 2, (n, NUM_CLASSES)).astype("float32")
        w["multilabel"] = np.ones(n, "float32")
    if "boxes" in outputs:
        lo = rng.uniform(0, .5, (n, NUM_CLASSES, 2)).astype("float32")
        y["boxes"] = np.concatenate([lo, lo + .3], -1)
        w["boxes"] = np.ones((n, NUM_CLASSES), "float32")
    if any(target_key(h) == "mask" for h in outputs):
        m = np.zeros((n, size, size, 1), "float32")
        m[:, size // 4: size // 2, size // 4: size // 2] = 1.0
        y["mask"], w["mask"] = m, np.ones(n, "float32")
    if "tumor" in outputs:
        y["tumor"] = rng.integers(0, 2, n).astype("float32")
        w["tumor"] = np.ones(n, "float32")
    if "subtype" in outputs:
        y["subtype"] = rng.integers(0, 3, n).astype("int32")
        w["subtype"] = y["tumor"] if "tumor" in y else np.ones(n, "float32")
    return x, y, w


def test_registry_lists_the_architectures():
    assert {"small_cnn", "detector", "resnet101_detector", "classifier", "tumornet", "unet"} <= set(list_models())
    with pytest.raises(ValueError, match="registered models"):
        create_model("nope")


# resnet101_detector and tumornet are the detector / classifier builders with another default
# backbone: the round trips over `detector` and `classifier` cover them (the ResNet101 build is
# checked below, ResNet18's in tests/models/test_own_backbones.py)
@pytest.mark.parametrize("name", [m for m in list_models() if m not in ("resnet101_detector", "tumornet")])
def test_one_step_fit_and_save_load_identical(name, tmp_path):
    keras.utils.set_random_seed(0)
    weights = {"weights": None} if "weights" in builder_keys(name) else {}
    net = create_model(name, num_classes=NUM_CLASSES, image_size=32, **weights, **TINY.get(name, {}))
    outputs = list(net.output)
    model = MultiTaskModel(net, {h: HEAD_LOSSES.get(h, LOSSES[target_key(h)]) for h in outputs})
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = tiny_batch(outputs)
    hist = model.fit(tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4), epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    # eager calls: a traced predict function per model would double the test's time
    p1 = {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=False).items()}
    if "boxes" in outputs:
        b = p1["boxes"]
        assert np.all(b[..., 2] > b[..., 0]) and np.all(b[..., 3] > b[..., 1])  # valid by construction
    path = tmp_path / f"{name}.keras"
    model.save(path)
    back = load_checkpoint(path)
    p2 = {k: keras.ops.convert_to_numpy(v) for k, v in back(x, training=False).items()}
    assert set(p1) == set(p2) == set(outputs)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------
# the builder contract: exactly the documented keys
# ---------------------------------------------------------------------------------------
def test_unknown_key_names_it_the_closest_key_and_the_allowed_ones():
    with pytest.raises(ModelConfigError) as e:
        create_model("small_cnn", dropuot=0.5)
    msg = str(e.value)
    assert msg.startswith("model.dropuot (did you mean dropout?): unknown key for model small_cnn; allowed: ")
    assert "dropout, heads, hidden" in msg and "\n" not in msg
    with pytest.raises(ModelConfigError, match=r"model\.weights: unknown key for model mtl_unet"):
        create_model("mtl_unet", weights=None)
    # the data keys reach only the builders that take them
    net = create_model("small_cnn", num_classes=2, image_size=32, class_names=["a", "b"], widths=(4, 8))
    assert tuple(net.output["class"].shape) == (None, 2)
    # the task's keys are not the builder's, and a misspelt one is caught too
    create_model("small_cnn", image_size=32, widths=(4, 8), losses={"class": "ce"}, threshold=0.5)
    with pytest.raises(ModelConfigError, match=r"model\.los_weights \(did you mean loss_weights\?\)"):
        create_model("small_cnn", los_weights={})


def test_builders_with_kwargs_are_refused():
    with pytest.raises(TypeError, match="exactly its documented keys"):
        register_model("loose")(lambda num_classes=4, **kw: None)


@pytest.mark.parametrize("config", sorted([f"model={p.stem}" for p in (CONF / "model").glob("*.yaml")]
                                          + [f"experiment={p.stem}" for p in (CONF / "experiment").glob("*.yaml")]))
def test_every_shipped_config_has_only_builder_and_task_keys(config):
    model_cfg = OmegaConf.to_container(compose([config]).model, resolve=True)
    name, builder, _ = split_model_config(model_cfg)
    assert set(builder) <= set(builder_keys(name)), sorted(set(builder) - set(builder_keys(name)))


@pytest.mark.parametrize("how", ["yaml", "command line"])
def test_a_misspelt_model_key_stops_the_engine(how, tmp_path):
    from src.data.records import ClassMap
    from src.training.engine import build_model

    if how == "yaml":  # a model config file of the user's with a typo
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "my_cnn.yaml").write_text("defaults:\n  - small_cnn\n  - _self_\ndropuot: 0.5\n")
        cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "model=my_cnn"])
    else:
        cfg = compose(["+model.dropuot=0.5"])
    with pytest.raises(ModelConfigError, match=r"model\.dropuot .*small_cnn"):
        build_model(OmegaConf.to_container(cfg.model, resolve=True), ClassMap(), 32)


def test_resnet101_detector_builds_on_resnet101():
    net = create_model("resnet101_detector", num_classes=NUM_CLASSES, image_size=64, weights=None)
    backbone = net.get_layer("backbone")
    names = {l.name for l in backbone.layers}
    assert {"conv4_block23_out", "conv5_block3_out"} <= names  # ResNet101: 23 blocks in conv4
    assert tuple(net.output["class"].shape) == (None, NUM_CLASSES)
    assert tuple(net.output["boxes"].shape) == (None, NUM_CLASSES, 4)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    out = net(x, training=False)
    b = keras.ops.convert_to_numpy(out["boxes"])
    assert np.all(b[..., 2] > b[..., 0]) and np.all(b[..., 3] > b[..., 1])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["class"]).sum(-1), 1.0, atol=1e-5)


def test_box_head_never_inverts_even_for_extreme_logits():
    from src.models.heads import BoxFromCentreSize

    logits = np.array([[[-50, -50, -50, -50], [50, 50, 50, 50], [50, -50, -50, 50], [0, 0, -30, -30]]], "float32")
    boxes = keras.ops.convert_to_numpy(BoxFromCentreSize()(logits))
    assert np.all(boxes[..., 2] > boxes[..., 0]) and np.all(boxes[..., 3] > boxes[..., 1])
    assert np.all((boxes >= 0) & (boxes <= 1))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step_is_finite_with_float32_outputs(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        net = create_model("small_cnn", num_classes=NUM_CLASSES, image_size=32, widths=(4, 8))
        model = MultiTaskModel(net, {"class": "ce", "boxes": "ciou"})
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x, y, w = tiny_batch(["class", "boxes"])
        w["boxes"][:] = 0.0  # an empty box batch must stay 0, not NaN, in low precision too
        hist = model.fit(tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4), epochs=1, verbose=0)
        assert np.isfinite(hist.history["loss"][0]) and hist.history["boxes_loss"][0] == 0.0
        out = model.predict(x, verbose=0)
        assert all(v.dtype == np.float32 for v in out.values())
    finally:
        keras.mixed_precision.set_global_policy("float32")
