"""The backbone-encoder U-Net: a mask (and class) over a CNN pyramid, trained one step,
saved and loaded, encoder unfrozen by stage; a backbone without P2 is refused."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from src.models import create_model
from src.models.unfreeze import set_trainable

SIZE = 32


@pytest.fixture(scope="module")
def net():
    keras.utils.set_random_seed(0)
    return create_model("unet", backbone="resnet18", image_size=SIZE, num_classes=3, heads=["mask", "class"],
                        decoder_channels=[32, 16, 16, 8, 8])


def test_outputs_at_the_input_size(net):
    out = net(np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32))
    assert tuple(out["mask"].shape) == (2, SIZE, SIZE, 1) and tuple(out["class"].shape) == (2, 3)
    m = np.asarray(out["mask"])
    assert m.dtype == np.float32 and (m > 0).all() and (m < 1).all()
    # the decoder reads every level: its first block concatenates P5 upsampled with P4
    assert net.get_layer("decoder1_cat").output.shape[-1] == 512 + 256
    assert net.get_layer("decoder3_cat").output.shape[1:] == (SIZE // 4, SIZE // 4, 16 + 64)  # decoder2 (16) + P2 (64)


def test_one_step_with_a_frozen_encoder_then_round_trip(net, tmp_path):
    bb = net.get_layer("backbone")
    set_trainable(bb, {"from_stage": "conv5"})
    frozen = bb.get_layer("conv1_conv").kernel
    before = np.asarray(frozen).copy()
    dec = net.get_layer("decoder5_conv1").kernel
    dec_before = np.asarray(dec).copy()
    net.compile(optimizer=keras.optimizers.SGD(0.1),
                loss={"mask": "binary_crossentropy", "class": "sparse_categorical_crossentropy"}, run_eagerly=True)
    x = np.random.default_rng(1).random((2, SIZE, SIZE, 3), dtype=np.float32)
    y = {"mask": (x[..., :1] > 0.5).astype(np.float32), "class": np.array([0, 2])}
    logs = net.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    np.testing.assert_array_equal(np.asarray(frozen), before)       # conv1 frozen
    assert np.abs(np.asarray(dec) - dec_before).max() > 0           # the decoder learnt
    path = tmp_path / "unet.keras"
    net.save(path)
    loaded = keras.models.load_model(path)
    a, b = net(x), loaded(x)
    for k in ("mask", "class"):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_bad_configs():
    with pytest.raises(ValueError, match="needs levels P2-P5"):
        create_model("unet", backbone="vit_tiny", image_size=SIZE)
    with pytest.raises(ValueError, match="mask and class"):
        create_model("unet", backbone="resnet18", image_size=SIZE, heads=["boxes"])
    with pytest.raises(ValueError, match="5 values"):
        create_model("unet", backbone="resnet18", image_size=SIZE, decoder_channels=[8, 8])


@pytest.mark.parametrize("backbone, p4, p2", [("resnet34", 256, 64), ("resnext50", 1024, 256), ("swin_tiny", 384, 96)])
def test_the_other_pyramids_as_encoders(backbone, p4, p2):
    """Every backbone with levels P2-P5 is an encoder: the decoder reads each of its levels and
    one eager step trains the decoder and the encoder's last stage."""
    keras.utils.set_random_seed(0)
    net = create_model("unet", backbone=backbone, image_size=SIZE, num_classes=3, heads=["mask"],
                       decoder_channels=[16, 8, 8, 8, 8])
    assert net.get_layer("decoder1_cat").output.shape[-1] == net.get_layer("backbone").feature_channels["P5"] + p4
    assert net.get_layer("decoder3_cat").output.shape[1:] == (SIZE // 4, SIZE // 4, 8 + p2)
    bb = net.get_layer("backbone")
    set_trainable(bb, {"from_stage": bb.stage_names[-1]})
    dec = net.get_layer("decoder5_conv1").kernel
    dec_before = np.asarray(dec).copy()
    net.compile(optimizer=keras.optimizers.SGD(0.1), loss={"mask": "binary_crossentropy"}, run_eagerly=True)
    x = np.random.default_rng(1).random((2, SIZE, SIZE, 3), dtype=np.float32)
    logs = net.train_on_batch(x, {"mask": (x[..., :1] > 0.5).astype(np.float32)}, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert np.abs(np.asarray(dec) - dec_before).max() > 0
