"""Shared layers: the Preprocess layer against keras.applications' preprocess_input, for
every mode of the one preprocessing vocabulary."""
from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest

from src.models.layers import PREPROCESS_MODES, Preprocess

# a keras.applications module whose preprocess_input each mode reproduces (on 0..255 pixels)
KERAS_MODULE = {"raw255": "efficientnet", "caffe": "resnet", "tf": "mobilenet_v2", "torch": "densenet"}


@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_preprocess_matches_keras_preprocess_input(mode, tmp_path):
    x01 = np.random.default_rng(0).random((2, 5, 7, 3), dtype=np.float32)
    got = np.asarray(Preprocess(mode)(x01))
    if mode == "none":
        want = x01
    else:
        mod = importlib.import_module(f"keras.src.applications.{KERAS_MODULE[mode]}")
        want = np.asarray(mod.preprocess_input(x01 * 255.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # serialisable: the mode travels with the model
    inputs = keras.Input((5, 7, 3))
    model = keras.Model(inputs, Preprocess(mode, name="preprocess")(inputs))
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    assert back.get_layer("preprocess").mode == mode


def test_unknown_mode_names_the_vocabulary():
    with pytest.raises(ValueError, match="raw255"):
        Preprocess("imagenet")
