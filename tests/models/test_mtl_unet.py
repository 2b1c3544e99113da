"""The multi-task U-Net: heads, masked subtype loss, 4-class composition, EMA through resume."""
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from src.config import compose
from src.losses import get_loss
from src.models import create_model
from src.models.mtl_unet import ComposeFourClass, four_class_prediction
from src.training.engine import train
from src.models.task import MultiTaskModel, load_checkpoint

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]
TINY = dict(num_classes=4, image_size=32, widths=[4, 4, 8, 8, 8], latent_dim=8, class_names=CLASSES)


def _layers_named(model, prefix):
    return [l for l in model.layers if l.name.startswith(prefix)]


def test_heads_shapes_and_recon_skips_option():
    no_skip = create_model("mtl_unet", heads=["tumor", "subtype", "recon", "mask"], **TINY)
    out = no_skip.output
    assert tuple(out["tumor"].shape) == (None,) and tuple(out["subtype"].shape) == (None, 3)
    assert tuple(out["class"].shape) == (None, 4)
    assert tuple(out["recon"].shape) == (None, 32, 32, 3) and tuple(out["mask"].shape) == (None, 32, 32, 1)
    # default: the reconstruction decoder has no skips (it cannot copy the image past the
    # bottleneck); the segmentation decoder always has them
    assert not _layers_named(no_skip, "recon_cat") and len(_layers_named(no_skip, "mask_cat")) == 4
    skip = create_model("mtl_unet", heads=["recon"], recon_skips=True, **TINY)
    assert len(_layers_named(skip, "recon_cat")) == 4
    with pytest.raises(ValueError, match="divisible by 16"):
        create_model("mtl_unet", **{**TINY, "image_size": 40})
    with pytest.raises(ValueError, match="unknown heads"):
        create_model("mtl_unet", heads=["boxes"], **TINY)


def test_composed_four_class_is_a_distribution_and_the_threshold_rule():
    p = np.array([0.1, 0.9, 0.6, 0.45], "float32")
    s = np.array([[.2, .5, .3], [.7, .2, .1], [.1, .1, .8], [.9, .05, .05]], "float32")
    q = keras.ops.convert_to_numpy(ComposeFourClass(no_position=3)(p, s))
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(q[:, 3], 1 - p, atol=1e-6)
    np.testing.assert_allclose(q[:, :3], p[:, None] * s, atol=1e-6)
    np.testing.assert_array_equal(four_class_prediction(p, s, CLASSES, 0.5), [3, 0, 2, 3])
    np.testing.assert_array_equal(four_class_prediction(p, s, CLASSES, 0.4), [3, 0, 2, 0])
    with pytest.raises(ValueError, match="no_tumor"):
        four_class_prediction(p, s, ["a", "b", "c", "d"])


def test_subtype_loss_is_cross_entropy_over_tumour_rows_only():
    keras.utils.set_random_seed(0)
    net = create_model("mtl_unet", heads=["tumor", "subtype"], **TINY)
    x = np.random.default_rng(0).random((6, 32, 32, 3)).astype("float32")
    probs = keras.ops.convert_to_numpy(net(x, training=False)["subtype"])
    subtype = np.array([0, 2, 1, 0, 0, 1], "int32")
    tumour = np.array([1, 1, 0, 1, 0, 0], "float32")  # healthy rows have subtype weight 0
    loss = float(get_loss("ce")(subtype, probs, sample_weight=tumour))
    rows = tumour == 1
    ref = -np.mean(np.log(probs[rows, subtype[rows]]))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_all_healthy_batch_gives_zero_subtype_loss_and_finite_gradients():
    keras.utils.set_random_seed(0)
    net = create_model("mtl_unet", heads=["tumor", "subtype", "recon"], **TINY)
    model = MultiTaskModel(net, {"tumor": "bce", "subtype": "ce", "recon": "mse"}, balancing="ema")
    x = np.random.default_rng(1).random((4, 32, 32, 3)).astype("float32")
    y = {"tumor": np.zeros(4, "float32"), "subtype": np.zeros(4, "int32")}
    w = {"tumor": np.ones(4, "float32"), "subtype": np.zeros(4, "float32")}
    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        total = model.compute_loss(x, y, pred, w)
    grads = tape.gradient(total, model.trainable_variables)
    assert np.isfinite(float(total))
    assert float(model.head_loss_trackers["subtype"].result()) == 0.0
    paths = [v.path for v in model.trainable_variables]
    assert [p for p, g in zip(paths, grads) if g is None] == []  # every variable is on a loss path
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    # the masked subtype head gets exactly 0; the encoder, tumour and reconstruction heads learn
    zero = {p for p, g in zip(paths, grads) if not np.any(g.numpy())}
    assert zero == {p for p in paths if p.startswith("subtype_")}, sorted(zero)
    # the reconstruction head learns the input itself
    assert float(model.head_loss_trackers["recon"].result()) > 0.0


@pytest.mark.parametrize("mode", ["static", "ema", "uncertainty"])
def test_one_step_fit_each_balancing_mode_and_save_load(mode, tmp_path):
    keras.utils.set_random_seed(0)
    net = create_model("mtl_unet", heads=["tumor", "subtype", "recon"], **TINY)
    model = MultiTaskModel(net, {"tumor": "bce", "subtype": "ce", "recon": "l1"}, balancing=mode)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(2)
    x = rng.random((4, 32, 32, 3)).astype("float32")
    y = {"tumor": np.array([1, 0, 1, 1], "float32"), "subtype": np.array([0, 0, 2, 1], "int32")}
    w = {"tumor": np.ones(4, "float32"), "subtype": y["tumor"].copy()}
    hist = model.fit(tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4), epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    model.save(tmp_path / "m.keras")
    back = load_checkpoint(tmp_path / "m.keras")
    p1, p2 = model.predict(x, verbose=0), back.predict(x, verbose=0)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(back.balancer.ema.numpy(), model.balancer.ema.numpy())


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom_unet") / "phantom"


def _cfg(phantom_root, out, *extra):
    return compose([
        "data=phantom", f"data.root={phantom_root}", "data.options.n_patients=16", "data.options.image_size=64",
        "data.image_size=32", "data.batch_size=8", "model=mtl_unet", "model.widths=[4,4,8,8,8]",
        "model.latent_dim=8", "model.heads=[tumor,subtype,recon]", "trainer.steps_per_epoch=2",
        "trainer.validation_steps=1", "trainer.verbose=0", "trainer.precision=float32", "tracking=none",
        f"paths.output_root={out}", *extra])


def test_engine_trains_unet_and_ema_survives_resume(phantom_root, tmp_path):
    run_dir = Path(tmp_path) / "run"
    train(_cfg(phantom_root, tmp_path, "phase=3", "trainer.max_epochs=1"), run_dir)
    metrics = json.loads((run_dir / "phase3" / "metrics.json").read_text())
    # the composed 4-class output is evaluated as `class` although it has no loss of its own
    assert {"tumor_loss", "subtype_loss", "recon_loss", "class_acc", "tumor_auc"} <= set(metrics["val"])
    assert set(metrics["balancer"]) == {"tumor", "subtype", "recon"}
    # EMA balancing moves val_loss's weights: the best epoch is chosen by the fixed-weight sum
    state = json.loads((run_dir / "phase3" / "state.json").read_text())
    assert state["monitor"] == "val_loss_fixed" and state["mode"] == "min"
    assert state["best"] == pytest.approx(metrics["val"]["loss_fixed"])
    first = load_checkpoint(run_dir / "phase3" / "checkpoints" / "last.keras")
    assert float(first.balancer.ema_steps.numpy()) == 2.0
    # a kill after epoch 1, then resume to 2 epochs: the running means continue, not reset
    (run_dir / "phase3" / "metrics.json").unlink()
    (run_dir / "metrics.json").unlink()
    train(_cfg(phantom_root, tmp_path, "phase=3", "trainer.max_epochs=2", "trainer.resume=true"),
          Path(tmp_path) / "unused")
    last = load_checkpoint(run_dir / "phase3" / "checkpoints" / "last.keras")
    assert float(last.balancer.ema_steps.numpy()) == 4.0
    assert np.all(last.balancer.ema.numpy() > 0)


def test_without_a_tumour_head_every_slice_is_a_tumour():
    """Data without healthy slices drops the tumour head; the 4-class output then puts all
    the probability on the subtypes (p(no_tumor) = 0)."""
    net = create_model("mtl_unet", num_classes=4, image_size=32, widths=(4, 4, 8, 8, 8), heads=("subtype", "mask"))
    assert "tumor" not in net.output and "tumor_logit" not in {l.name for l in net.layers}
    x = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    out = net(x, training=False)
    cls = keras.ops.convert_to_numpy(out["class"])
    np.testing.assert_allclose(cls[:, 3], 0.0)                   # no_tumor is the last class
    np.testing.assert_allclose(cls[:, :3], keras.ops.convert_to_numpy(out["subtype"]), rtol=1e-6)


def test_one_answer_tumour_head_is_dropped():
    from src.data.records import Record
    from src.training.engine import drop_unlearnable_heads

    tumours = [Record(image=f"{i}.png", label="glioma", known={"label": True}) for i in range(3)]
    cfg = drop_unlearnable_heads({"heads": ["tumor", "subtype"]}, tumours)
    assert cfg["heads"] == ["subtype"]
    mixed = tumours + [Record(image="h.png", label="no_tumor", known={"label": True})]
    assert drop_unlearnable_heads({"heads": ["tumor", "subtype"]}, mixed)["heads"] == ["tumor", "subtype"]
