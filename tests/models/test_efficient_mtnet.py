"""EfficientMTNet: the Hamburger NMF, the heads, aux heads for training only, precision, config."""
from __future__ import annotations

import numpy as np
import pytest

import keras
import tensorflow as tf

from src.models import create_model
from src.models.efficient_mtnet import (NMF2D, MaskWeightedPool, context_block, nmf, nmf_init_coef,
                                        nmf_reconstruction, nmf_update)
from src.models.task import MultiTaskModel

# a few thousand parameters: builds and steps in about a second on a CPU
TINY = dict(ltd_channels=(8, 8, 8), widths=(8, 12, 16), blocks=(1, 1, 1), expansion=2, neck_channels=16,
            decoder_channels=(16, 8), ham_channels=8, ham_rank=4, attention_channels=4, class_hidden=8)
LOSSES = {"class": "ce", "mask": "dice_focal", "mask_aux1": "dice_focal", "mask_aux2": "dice_focal"}


def tiny(**kw):
    return create_model("efficient_mtnet", num_classes=3, image_size=kw.pop("image_size", 32), **{**TINY, **kw})


def data(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 3), dtype=np.float32)
    m = np.zeros((n, size, size, 1), np.float32)
    m[:, size // 4: size // 2, size // 4: size // 2] = 1.0
    y = {"class": rng.integers(0, 3, n).astype("int32"), "mask": m}
    w = {"class": np.ones(n, np.float32), "mask": np.array([1, 1, 1, 0], np.float32)[:n]}
    return x, y, w


def frob(x, bases, coef):
    return float(tf.norm(x - nmf_reconstruction(bases, coef)))


# ---------------------------------------------------------------- the NMF
def test_nmf_updates_reduce_the_reconstruction_error():
    rng = np.random.default_rng(0)
    # [B, N, C] >= 0: a rank-5 non-negative matrix plus non-negative noise
    x = tf.constant(rng.random((2, 60, 5)) @ rng.random((2, 5, 20)) + 0.05 * rng.random((2, 60, 20)), tf.float32)
    bases = tf.constant(rng.random((1, 20, 5)), tf.float32)
    coef = nmf_init_coef(x, bases)
    errors = [frob(x, tf.broadcast_to(bases, (2, 20, 5)), coef)]
    b = tf.broadcast_to(bases, (2, 20, 5))
    for _ in range(20):
        b, coef = nmf_update(x, b, coef)
        errors.append(frob(x, b, coef))
        assert np.all(b.numpy() >= 0) and np.all(coef.numpy() >= 0)
    assert all(e1 <= e0 * (1 + 1e-5) for e0, e1 in zip(errors, errors[1:])), errors  # monotone (Lee & Seung)
    assert errors[1] < errors[0] and errors[-1] < 0.5 * errors[0], errors
    # nmf() runs the same updates
    b2, c2 = nmf(x, bases, steps=20)
    assert frob(x, b2, c2) == pytest.approx(errors[-1], rel=1e-4)


def test_one_step_gradient_differentiates_only_the_last_update():
    rng = np.random.default_rng(1)
    x = tf.Variable(rng.random((1, 30, 8)), dtype=tf.float32)
    bases = tf.constant(rng.random((1, 8, 3)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        b, c = nmf(x, bases, steps=4, one_step_gradient=True)
        one = tf.reduce_sum(nmf_reconstruction(b, c))
        b_u, c_u = nmf(x, bases, steps=4, one_step_gradient=False)
        unrolled = tf.reduce_sum(nmf_reconstruction(b_u, c_u))
        # by hand: three updates without gradient, the fourth with
        b3, c3 = nmf(tf.stop_gradient(x), bases, steps=3, one_step_gradient=False)
        b4, c4 = nmf_update(x, tf.stop_gradient(b3), tf.stop_gradient(c3))
        manual = tf.reduce_sum(nmf_reconstruction(b4, c4))
    g_one, g_unrolled, g_manual = (tape.gradient(v, x).numpy() for v in (one, unrolled, manual))
    np.testing.assert_allclose(float(one), float(unrolled), rtol=1e-6)  # same forward value
    np.testing.assert_allclose(g_one, g_manual, rtol=1e-5, atol=1e-7)
    assert not np.allclose(g_one, g_unrolled)


def test_ham_block_shape_and_finite_nonzero_gradients():
    inp = keras.Input((8, 8, 16))
    model = keras.Model(inp, context_block(inp, "ham", "ctx", ham_channels=8, ham_rank=4, ham_steps=3,
                                           ham_eval_steps=4))
    x = tf.Variable(np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32"))
    with tf.GradientTape() as tape:
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.square(y))
    assert y.shape == (2, 8, 8, 16)
    grads = tape.gradient(loss, [x, *model.trainable_weights])
    names = ["input"] + [w.path for w in model.trainable_weights]
    for name, g in zip(names, grads):
        assert g is not None, name
        g = g.numpy()
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 0, name
    ham_in = model.get_layer("ctx_ham_in").kernel
    assert any(w is ham_in for w in model.trainable_weights)
    # the bases are fixed (not trained), the NMF runs eval_steps at inference
    nmf_layer = model.get_layer("ctx_nmf")
    assert not nmf_layer.trainable_weights and nmf_layer.eval_steps == 4
    # XLA compiles it
    xla = tf.function(lambda v: model(v, training=False), jit_compile=True)
    np.testing.assert_allclose(xla(x).numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


def test_nmf_layer_config_and_bad_arguments():
    layer = NMF2D(rank=3, steps=2, eval_steps=5, seed=7)
    cfg = layer.get_config()
    assert (cfg["rank"], cfg["steps"], cfg["eval_steps"], cfg["seed"]) == (3, 2, 5, 7)
    with pytest.raises(ValueError):
        NMF2D(rank=0)
    with pytest.raises(ValueError, match="context"):
        tiny(context="linear")


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("context", ["ham", "attention", "none"])
def test_outputs_shapes_dtypes_and_contexts(context):
    net = tiny(context=context, image_size=[32, 48])
    out = net(np.random.default_rng(0).random((2, 32, 48, 3), dtype=np.float32), training=False)
    assert list(out) == ["class", "mask", "mask_aux1", "mask_aux2"]
    assert out["class"].shape == (2, 3) and np.allclose(out["class"].numpy().sum(-1), 1.0, atol=1e-5)
    for h in ("mask", "mask_aux1", "mask_aux2"):
        v = out[h].numpy()
        assert v.shape == (2, 32, 48, 1) and v.dtype == np.float32 and np.all((v >= 0) & (v <= 1)), h
    names = {layer.name for layer in net.layers}
    assert ("neck_context_nmf" in names) == (context == "ham")
    assert ("neck_context_attention" in names) == (context == "attention")


def test_attention_variant_saves_and_loads_identically(tmp_path):
    # (the ham default runs through tests/models/test_registry.py's fit + save/load)
    keras.utils.set_random_seed(0)
    net = tiny(context="attention", image_size=64)  # /32 = 2x2: more than one position to attend to
    x = data(n=2, size=64)[0]
    net.get_layer("neck_context_residual").gamma.assign(0.5)  # published init 0 would hide the attention path
    net.save(tmp_path / "att.keras")
    back = keras.saving.load_model(tmp_path / "att.keras")
    a, b = net(x, training=False), back(x, training=False)
    for h in a:
        np.testing.assert_allclose(a[h].numpy(), b[h].numpy(), atol=1e-6, err_msg=h)


def test_heads_and_aux_switches():
    assert list(tiny(aux=False).output) == ["class", "mask"]
    assert list(tiny(heads=["class"]).output) == ["class"]
    assert list(tiny(heads=["mask"]).output) == ["mask", "mask_aux1", "mask_aux2"]
    with pytest.raises(ValueError, match="unknown heads"):
        tiny(heads=["boxes"])


def train_step(model, x, y, w):
    """One eager optimisation step (``fit`` would spend ~15 s tracing; test_registry does that)."""
    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        loss = model.compute_loss(x, y, pred, w)
    grads = tape.gradient(loss, model.trainable_weights)
    model.optimizer.apply(grads, model.trainable_weights)
    return float(loss), pred, grads


def test_aux_heads_train_but_are_not_exported():
    keras.utils.set_random_seed(0)
    net = tiny()
    model = MultiTaskModel(net, LOSSES, loss_weights={"class": 0.4, "mask": 0.6, "mask_aux1": 0.2, "mask_aux2": 0.2})
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, w = data()
    loss, pred, grads = train_step(model, x, y, w)
    assert np.isfinite(loss) and set(pred) == {"class", "mask", "mask_aux1", "mask_aux2"}
    # the aux heads learn the mask target: their losses are tracked and their layers get gradients
    for h in ("mask_aux1", "mask_aux2"):
        assert float(model.head_loss_trackers[h].result()) > 0, h
    g = dict(zip([v.path for v in model.trainable_weights], grads))
    assert np.abs(g["mask_aux1_logits/kernel"].numpy()).max() > 0
    exported = model.inference_model()
    assert list(exported.output) == ["class", "mask"]
    full, inf = net(x, training=False), exported(x, training=False)
    for h in ("class", "mask"):
        np.testing.assert_allclose(full[h].numpy(), inf[h].numpy(), atol=1e-6)
    assert exported.count_params() < net.count_params()


def test_layers_are_named_by_head_so_phases_freeze_the_right_ones():
    net = tiny()
    model = MultiTaskModel(net, LOSSES)
    model.set_loss_weights({"class": 0.0, "mask": 0.6, "mask_aux1": 0.0, "mask_aux2": 0.0})
    model.freeze_inactive_heads()
    by_name = {layer.name: layer for layer in net.layers}
    assert not by_name["class_logits"].trainable and not by_name["class_context_ham_in"].trainable
    assert not by_name["mask_aux1_logits"].trainable and not by_name["mask_aux2_conv_conv"].trainable
    assert by_name["mask_logits"].trainable and by_name["mask_dec1_pw_conv"].trainable
    assert by_name["gfe_s1_b1_expand_conv"].trainable and by_name["neck_context_ham_in"].trainable
    model.set_loss_weights({"class": 0.4, "mask": 0.0, "mask_aux1": 0.2, "mask_aux2": 0.2})
    model.freeze_inactive_heads()
    assert by_name["class_logits"].trainable and by_name["mask_aux1_logits"].trainable
    assert not by_name["mask_logits"].trainable


def test_mixed_precision_step_is_finite_with_float32_outputs():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = MultiTaskModel(tiny(), LOSSES)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        assert model.network.get_layer("neck_context_nmf").compute_dtype == "bfloat16"
        x, y, w = data()
        w["mask"][:] = 0.0  # no known mask in the batch: mask losses exactly 0, not NaN
        loss, pred, grads = train_step(model, x, y, w)
        assert np.isfinite(loss) and float(model.head_loss_trackers["mask"].result()) == 0.0
        assert all(v.dtype == tf.float32 and np.all(np.isfinite(v.numpy())) for v in pred.values())
        paths = [v.path for v in model.trainable_weights]
        assert [p for p, g in zip(paths, grads) if g is None] == []
        assert all(np.all(np.isfinite(g.numpy().astype("float32"))) for g in grads)
        # no known mask: the mask-only parts (neck, fusion, mask heads) get exactly 0; the
        # encoder (learning-to-downsample, global feature extractor) and the class head learn
        learns = {p for p, g in zip(paths, grads) if np.any(g.numpy())}
        assert learns == {p for p in paths if p.startswith(("ltd_", "gfe_", "class_"))}, sorted(learns)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_config_builds_with_its_losses_and_published_weights():
    from omegaconf import OmegaConf

    from src.config import compose
    from src.data.records import ClassMap
    from src.training.engine import build_model, phase_table

    cfg = OmegaConf.to_container(compose(["model=efficient_mtnet"]).model, resolve=True)
    assert cfg["context"] == "ham" and cfg["published_image_size"] == 640
    cfg.update(TINY)
    model = build_model(cfg, ClassMap(), 32)
    assert sorted(model.heads) == ["class", "mask", "mask_aux1", "mask_aux2"]
    assert model._static_weights == {"class": 0.4, "mask": 0.6, "mask_aux1": 0.2, "mask_aux2": 0.2}
    assert model.head_losses["mask"].get_config()["include_background"] is False
    assert set(phase_table(cfg)) == {"1", "2", "3"}


@pytest.mark.parametrize("strides,logit_size", [((), 4), ((4,), 8), ((2, 4), 16)])
def test_detail_strides_decide_the_mask_at_a_finer_stride(strides, logit_size, tmp_path):
    keras.utils.set_random_seed(0)
    net = tiny(detail_strides=strides)   # 32 px input: /8 = 4, /4 = 8, /2 = 16
    assert tuple(net.get_layer("mask_logits").output.shape[1:3]) == (logit_size, logit_size)
    names = {layer.name for layer in net.layers}
    for s in (4, 2):
        assert (f"mask_detail{s}" + "_pw_conv" in names) == (s in strides)
    if not strides:
        return
    # the detail step reads the early features: their gradient from the mask loss is not zero
    x, y, w = data()
    net.compile(optimizer="adam", loss={k: LOSSES[k] for k in net.output})
    with tf.GradientTape() as tape:
        pred = net(x, training=True)
        loss = tf.reduce_mean(tf.square(pred["mask"] - y["mask"]))
    skip = [v for v in net.trainable_weights if "mask_detail" in v.path]
    grads = tape.gradient(loss, skip)
    assert skip and all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
    net.save(tmp_path / "detail.keras")
    back = keras.saving.load_model(tmp_path / "detail.keras")
    np.testing.assert_allclose(net(x, training=False)["mask"].numpy(), back(x, training=False)["mask"].numpy(),
                               atol=1e-6)


def test_detail_strides_other_than_the_early_ones_are_refused():
    with pytest.raises(ValueError, match="detail_strides takes 4 and/or 2"):
        tiny(detail_strides=[8])


def test_mask_weighted_pool_averages_inside_the_map_without_a_gradient_into_it():
    rng = np.random.default_rng(0)
    f = tf.constant(rng.normal(size=(3, 4, 5, 2)).astype("float32"))
    m = np.zeros((3, 4, 5, 1), np.float32)
    m[0, 1:3, 2:4] = 1.0          # a 4-pixel mask
    m[2] = 0.5                    # a flat half-sure map
    m = tf.constant(m)
    pool = MaskWeightedPool(prior=1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([f, m])
        out = pool([f, m])
    fn = f.numpy()
    inside = fn[0, 1:3, 2:4].sum(axis=(0, 1))
    np.testing.assert_allclose(out[0], (inside + fn[0].mean(axis=(0, 1))) / 5.0, rtol=1e-5)
    np.testing.assert_allclose(out[1], fn[1].mean(axis=(0, 1)), rtol=1e-5)   # empty map: the plain average
    np.testing.assert_allclose(out[2], fn[2].mean(axis=(0, 1)), rtol=1e-5)   # flat map: the average too
    assert tape.gradient(out, m) is None and tape.gradient(out, f) is not None
    assert MaskWeightedPool.from_config(pool.get_config()).prior == 1.0
    with pytest.raises(ValueError, match="prior must be > 0"):
        MaskWeightedPool(prior=0)


def test_mask_guided_class_head_reads_the_predicted_mask(tmp_path):
    keras.utils.set_random_seed(0)
    net = tiny(mask_guided_class=True, detail_strides=[4], dropout=0.0, seg_dropout=0.0)
    names = {layer.name for layer in net.layers}
    assert {"class_mask_prob", "class_mask_pool", "class_mask_resize"} <= names
    x = data()[0]
    # the class output changes when only the mask logits' kernel moves (so the map's shape does;
    # a uniform shift of the map would not: a flat map pools to the plain average)
    # (training=True: batch statistics give the untrained tiny net O(1) features; no dropout)
    before = net(x, training=True)["class"].numpy()
    kernel = net.get_layer("mask_logits").kernel
    kernel.assign(kernel + 5.0 * np.random.default_rng(1).normal(size=kernel.shape).astype("float32"))
    after = net(x, training=True)["class"].numpy()
    assert np.abs(after - before).max() > 1e-4
    net.save(tmp_path / "guided.keras")
    back = keras.saving.load_model(tmp_path / "guided.keras")
    np.testing.assert_allclose(net(x, training=False)["class"].numpy(), back(x, training=False)["class"].numpy(),
                               atol=1e-6)
    with pytest.raises(ValueError, match="mask_guided_class needs the mask head"):
        tiny(mask_guided_class=True, heads=["class"])
