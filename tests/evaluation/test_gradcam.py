"""Grad-CAM / Grad-CAM++ on multi-output models with a nested backbone.

The constructed model has known weights: inside a nested ``backbone`` sub-model, channel
0 of the feature map is the (smoothed) red brightness and channel 1 the green one; the
class head's logits are ``[mean(G) - mean(R), mean(R) - mean(G)]``. An image with a red
square in one corner and a larger green square in another therefore has class 0
predicted, and an honest Grad-CAM must light up the green square for class 0 and the red
square for class 1. A transposed, flipped, wrongly-weighted or wrongly-targeted map fails.
"""
import numpy as np
import pytest

import keras
from keras import layers

from src.evaluation.gradcam import GradCAM, GradCamError, auto_target, cam_to_mask, gradcam, save_overlay
from src.evaluation.metrics import dice_iou
from src.models.heads import box_head
from src.models.layers import Preprocess

S = 32
RED = (slice(2, 10), slice(20, 30))     # rows, cols: 8 x 10 = 80 px
GREEN = (slice(19, 29), slice(3, 12))   # 10 x 9 = 90 px


def _nested_model():
    inner_in = keras.Input((S, S, 3), name="bb_in")
    mix = layers.Conv2D(2, 1, use_bias=False, name="mix")(inner_in)           # ch0 = R, ch1 = G
    smooth = layers.Conv2D(2, 3, strides=2, padding="same", use_bias=False, name="down")(mix)
    feat = layers.Activation("relu", name="feat")(smooth)
    backbone = keras.Model(inner_in, {"P4": feat, "P2": mix}, name="backbone")

    x_in = keras.Input((S, S, 3), name="image")
    x = Preprocess("none", name="preprocess")(x_in)
    feats = backbone(x)
    p = layers.GlobalAveragePooling2D(name="class_pool")(feats["P4"])
    logits = layers.Dense(2, use_bias=False, name="class_logits")(p)
    outputs = {"class": layers.Activation("softmax", dtype="float32", name="class")(logits),
               "boxes": box_head(layers.Flatten(name="boxes_flatten")(feats["P4"]), 2, hidden=8)}
    m = layers.Conv2D(1, 1, name="mask_logits")(feats["P4"])
    m = layers.UpSampling2D(2, name="mask_up")(m)
    outputs["mask"] = layers.Activation("sigmoid", dtype="float32", name="mask")(m)
    model = keras.Model(x_in, outputs, name="nested_toy")

    w_mix = np.zeros((1, 1, 3, 2), np.float32)
    w_mix[0, 0, 0, 0] = 1.0  # R -> ch0
    w_mix[0, 0, 1, 1] = 1.0  # G -> ch1
    backbone.get_layer("mix").set_weights([w_mix])
    w_down = np.zeros((3, 3, 2, 2), np.float32)
    w_down[:, :, 0, 0] = w_down[:, :, 1, 1] = 1.0 / 9.0
    backbone.get_layer("down").set_weights([w_down])
    model.get_layer("class_logits").set_weights([np.array([[-10.0, 10.0], [10.0, -10.0]], np.float32)])
    return model


def _image():
    x = np.zeros((S, S, 3), np.float32)
    x[RED + (0,)] = 1.0
    x[GREEN + (1,)] = 1.0
    return x


def _peak(cam):
    return np.unravel_index(int(np.argmax(cam)), cam.shape)


def _inside(rc, region, margin=1):
    r, c = rc
    return (region[0].start - margin <= r < region[0].stop + margin
            and region[1].start - margin <= c < region[1].stop + margin)


def _region_mask(region):
    m = np.zeros((S, S), np.uint8)
    m[region] = 1
    return m


@pytest.fixture(scope="module")
def model():
    return _nested_model()


def test_auto_layer_is_inside_the_nested_backbone(model):
    assert auto_target(model, "class").name == "backbone/feat"
    assert auto_target(model, "mask").name == "backbone/feat"


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_peak_lies_in_the_region_that_drives_the_class(model, method):
    x = np.stack([_image(), _image()])
    cam = GradCAM(model)
    # default: the predicted class (0 = green: the larger square)
    res = cam(x, head="class", method=method)
    assert res.layer == "backbone/feat" and res.cams.shape == (2, S, S)
    assert res.class_index.tolist() == [0, 0]
    assert float(res.outputs["class"][0, 0]) > 0.5
    assert _inside(_peak(res.cams[0]), GREEN), _peak(res.cams[0])
    # the other class: the red square, and almost nothing on the green one
    res1 = cam(x, head="class", class_index=1, method=method)
    assert _inside(_peak(res1.cams[0]), RED), _peak(res1.cams[0])
    assert res1.cams[0][GREEN].mean() < 0.1 < res1.cams[0][RED].mean()
    # thresholded map vs the true region: weak localisation is measurable
    d_right, _ = dice_iou(cam_to_mask(res1.cams[0], 0.5), _region_mask(RED))
    d_wrong, _ = dice_iou(cam_to_mask(res1.cams[0], 0.5), _region_mask(GREEN))
    assert d_right > 0.6 and d_wrong == 0.0


def test_explicit_nested_layer_and_matching_outputs(model):
    x = _image()[None]
    res = gradcam(model, x, head="class", class_index=1, layer="backbone/mix")
    assert res.layer == "backbone/mix" and res.raw.shape == (1, S, S)
    assert _inside(_peak(res.cams[0]), RED, margin=0)
    # a bare unique name finds the nested layer too
    assert gradcam(model, x, head="class", layer="down").layer == "backbone/down"
    # the walked network gives the model's own outputs
    ref = model(x, training=False)
    for k in ("class", "boxes", "mask"):
        np.testing.assert_allclose(res.outputs[k], np.asarray(ref[k]), atol=1e-6)


def test_other_heads_and_graph_mode(model):
    x = np.stack([_image()])
    eager = GradCAM(model)(x, head="mask")
    traced = GradCAM(model, graph=True)(x, head="mask")
    np.testing.assert_allclose(eager.cams, traced.cams, atol=1e-5)
    boxes = GradCAM(model)(x, head="boxes", method="gradcam++")
    assert boxes.cams.shape == (1, S, S) and np.isfinite(boxes.cams).all()
    assert boxes.class_index.tolist() == [0]   # slot of the predicted class


def test_clear_errors(model):
    with pytest.raises(GradCamError, match="no layer"):
        gradcam(model, _image()[None], layer="backbone/nope")
    with pytest.raises(GradCamError, match="4-D"):
        gradcam(model, _image()[None], layer="class_logits")
    with pytest.raises(GradCamError, match="no head"):
        gradcam(model, _image()[None], head="subtype")


def test_registry_detector_with_nested_backbone():
    from src.models import create_model

    m = create_model("detector", backbone="mobilenet_v3_small", num_classes=3, image_size=64, weights=None)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    res = GradCAM(m)(x, head="class", method="gradcam++")
    assert res.layer.startswith("backbone/") and res.cams.shape == (2, 64, 64)
    assert np.isfinite(res.cams).all() and res.cams.min() >= 0 and res.cams.max() <= 1
    ref = m(x, training=False)
    np.testing.assert_allclose(res.outputs["class"], np.asarray(ref["class"]), atol=1e-5)


def test_small_cnn_auto_layer_dominates_both_paths():
    from src.models import create_model

    m = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    # the last stage feeds both the pooled and the flattened spatial path
    assert auto_target(m, "class").name == "stage2_relu2"


def test_cam_to_mask_and_dice():
    cam = np.zeros((20, 20), np.float32)
    cam[2:6, 2:6] = 0.9      # small blob
    cam[10:18, 10:18] = 1.0  # large blob
    m = cam_to_mask(cam, 0.5, largest_component=True)
    assert m.sum() == 64 and m[12, 12] == 1 and m[3, 3] == 0
    assert cam_to_mask(cam, 0.5, largest_component=False).sum() == 80
    assert cam_to_mask(cam, "otsu").sum() == 64
    assert cam_to_mask(np.zeros((5, 5)), "otsu").sum() == 0
    t = np.zeros((20, 20), np.uint8)
    t[10:18, 10:18] = 1
    assert dice_iou(m, t)[0] == 1.0 and dice_iou(np.zeros_like(t), np.zeros_like(t))[0] == 1.0
    assert dice_iou(np.zeros_like(t), t)[0] == 0.0


def test_overlay_png(tmp_path):
    import cv2

    cam = np.zeros((S, S), np.float32)
    cam[RED] = 1.0
    p = save_overlay(tmp_path / "o.png", _image(), cam, mask=_region_mask(RED), title="class 1")
    img = cv2.imread(str(p))  # BGR: title band, then image | overlay
    band = img.shape[0] - S
    assert img.shape[1] == 2 * S and 0 < band < 30
    ov = img[band:, S:]
    # jet: hot (1) is red, cold (0) is blue
    inner_red = (slice(4, 8), slice(22, 28))  # inside the white outline of the mask
    assert ov[GREEN][..., 0].mean() > ov[inner_red][..., 0].mean() + 40
    assert ov[inner_red][..., 2].mean() > ov[GREEN][..., 2].mean() + 100
    assert cv2.imread(str(save_overlay(tmp_path / "b.png", _image(), cam, min_height=100))).shape == (128, 256, 3)


@pytest.mark.parametrize("graph", [False, True])
def test_against_explains_the_log_odds_of_the_other_classes(graph):
    """``against=k`` explains ``logsumexp(z_j, j != k) - z_k``. With a GAP + dense head the
    Grad-CAM weights have a closed form: ``w_c = (1/N) sum_j W[c, j] d score / d z_j``,
    ``d score / d z_j = softmax over j != k`` for ``j != k`` and ``-1`` for ``k``; the CAM is
    ``relu(sum_c A_c w_c)``, checked here against numpy."""
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 4)).astype("float32")
    x = keras.Input((6, 6, 3))
    feat = layers.Activation("linear", name="feat")(x)
    logits = layers.Dense(4, kernel_initializer=keras.initializers.Constant(kernel))(
        layers.GlobalAveragePooling2D()(feat))
    model = keras.Model(x, {"class": layers.Activation("softmax", name="class")(logits)})
    images = rng.random((2, 6, 6, 3)).astype("float32")
    k = 3
    res = GradCAM(model, layer="feat", graph=graph)(images, against=k)
    assert res.class_index.tolist() == [-1, -1]
    for b in range(2):
        z = images[b].mean(axis=(0, 1)) @ kernel
        others = np.delete(np.arange(4), k)
        d = np.zeros(4)
        d[others] = np.exp(z[others] - z[others].max()) / np.exp(z[others] - z[others].max()).sum()
        d[k] = -1.0
        w = kernel @ d / 36.0
        expected = np.maximum(images[b] @ w, 0.0)
        np.testing.assert_allclose(res.raw[b], expected, rtol=1e-4, atol=1e-6)
    # the class_index path is not the same thing (here: the logit of class 0 alone)
    plain = GradCAM(model, layer="feat")(images, class_index=0)
    assert not np.allclose(plain.raw, res.raw)
    with pytest.raises(GradCamError, match="against=4"):
        GradCAM(model, layer="feat")(images, against=4)
