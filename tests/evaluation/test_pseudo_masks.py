"""CAM pseudo masks (`src.explain what=pseudo_masks`): segmentation from class labels alone.

The end-to-end tests use a hand-built "classifier" whose Grad-CAM is known: its feature
map is the image's brightness and every tumour class's logit grows with its mean, so the
CAM of a tumour class is the image itself and the pseudo mask of a bright blob on a dark
slice is that blob. The data is a tiny synthetic manifest (non-square slices, true masks,
one image of each kind: tumour classes, no_tumor, an unlabelled tumour, a test image).
"""
import json

import cv2
import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from src.config import compose
from src.data.dataset import load_data
from src.data.describe import describe
from src.data.records import DataError, Record, load_manifest, save_manifest
from src.evaluation.metrics import dice_iou
from src.evaluation.pseudo_masks import PseudoSettings, choose_label, foreground, refine_mask
from src.explain import main

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]
H, W = 40, 48  # original slices (the model sees 32 x 32: masks go back through a resize)


def blob(cy, cx, ry, rx, shape=(H, W)):
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (cx, cy), (rx, ry), 0, 0, 360, 1, -1)
    return m


# ---- thresholding and morphology ----------------------------------------------------
def test_a_cam_with_a_blob_gives_that_blob():
    truth = blob(20, 30, 8, 10)
    cam = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 1.0)
    cam = cam / cam.max()
    rng = np.random.default_rng(0)
    noisy = cam.copy()
    noisy[rng.random(cam.shape) > 0.985] = 1.0  # isolated hot pixels outside the blob
    noisy[2:5, 2:5] = 1.0                       # and a small hot patch
    m = refine_mask(noisy, 0.5, open=0.0, close=0.0, largest_component=True)
    assert dice_iou(m, truth)[0] > 0.9 and m[3, 3] == 0  # the patch is not the largest component
    m2 = refine_mask(noisy, 0.5, open=0.1, largest_component=False)  # opening removes specks alone
    assert dice_iou(m2, truth)[0] > 0.85 and m2[3, 3] == 0
    assert refine_mask(noisy, 0.5, largest_component=False)[3, 3] == 1  # without either, it stays
    ring = truth - blob(20, 30, 3, 4)  # a hole in the middle: filled (or closed)
    assert refine_mask(ring.astype(np.float32), 0.5, fill_holes=True)[20, 30] == 1
    assert refine_mask(ring.astype(np.float32), 0.5, fill_holes=False)[20, 30] == 0
    assert refine_mask(ring.astype(np.float32), 0.5, fill_holes=False, close=0.3)[20, 30] == 1
    otsu = refine_mask(0.2 + 0.6 * cam, "otsu")
    assert dice_iou(otsu, truth)[0] > 0.85
    assert not refine_mask(cam, 0.5, min_area=0.5).any()  # too small a mask: none
    # a CAM hotter outside the head than on the tumour: inside the head only, the tumour wins
    head = blob(20, 24, 16, 20)
    image = 0.1 + 0.4 * head + 0.4 * truth
    image[18:23, 8:12] = 0.05                       # a dark hole inside the head stays inside
    outside = cam * 0.6
    outside[0:4, :] = outside[:, 0:3] = outside[37:, :] = 1.0  # a frame bigger than the tumour
    assert dice_iou(refine_mask(outside, 0.5), truth)[0] < 0.5
    fg = foreground(image, 0.3)
    assert fg[20, 10] == 1 and fg[1, 1] == 0
    assert dice_iou(refine_mask(outside, 0.5, within=fg), truth)[0] > 0.9
    assert not refine_mask(np.zeros((8, 8), np.float32), 0.5).any()


def test_settings_are_checked_and_the_label_policy():
    with pytest.raises(ValueError, match="pseudo.threshold"):
        PseudoSettings(threshold="mean")
    with pytest.raises(ValueError, match="pseudo.label"):
        PseudoSettings(label="true")
    with pytest.raises(ValueError, match="unknown pseudo setting"):
        PseudoSettings.from_cfg({"treshold": 0.4})
    labelled = Record("a.png", label="glioma", known={"label": True})
    unlabelled = Record("b.png")
    assert choose_label(labelled, "pituitary", "truth") == ("glioma", "true")
    assert choose_label(labelled, "pituitary", "predicted") == ("pituitary", "predicted")
    assert choose_label(unlabelled, "pituitary", "truth") == ("pituitary", "predicted")
    assert choose_label(unlabelled, None, "truth") == (None, None)


def test_record_pseudo_flag_round_trip_and_validation(tmp_path):
    r = Record("a.png", label="glioma", mask="m.png", known={"label": True, "mask": True},
               pseudo={"mask": True})
    old = Record.from_json({k: v for k, v in Record("c.png").to_json().items() if k != "pseudo"})  # older manifests
    save_manifest([r, Record("b.png"), old], tmp_path / "m.jsonl")
    back = load_manifest(tmp_path / "m.jsonl")
    assert back[0].pseudo == {"label": False, "boxes": False, "mask": True} and back[0].is_pseudo("mask")
    assert not back[1].is_pseudo("mask") and not back[2].is_pseudo("mask")
    with pytest.raises(DataError, match="pseudo target"):
        Record("d.png", pseudo={"mask": True}).validate()  # pseudo but unknown


# ---- end to end -----------------------------------------------------------------------
def bright_model():
    """A 'classifier' whose CAM for every tumour class is the image's brightness."""
    x = keras.Input((32, 32, 3))
    f = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(1 / 3),
                            name="feat")(x)
    p = keras.layers.GlobalAveragePooling2D()(f)
    logits = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant([[4.0, 3.0, 2.0, -4.0]]),
                                bias_initializer=keras.initializers.Constant([0.0, 0.0, 0.0, 1.0]))(p)
    return keras.Model(x, {"class": keras.layers.Activation("softmax", name="class")(logits)})


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pseudo")
    recs = []
    kinds = [("glioma", "train", (12, 14)), ("meningioma", "train", (26, 32)), ("pituitary", "val", (20, 24)),
             ("no_tumor", "train", None), (None, "train", (14, 34)), ("glioma", "test", (24, 16))]
    for i, (label, split, at) in enumerate(kinds):
        truth = blob(at[0], at[1], 7, 9) if at else np.zeros((H, W), np.uint8)
        img = (40 + 200 * truth).astype(np.uint8)
        cv2.imwrite(str(tmp / f"s{i}.png"), img)
        mask = None
        if at:
            mask = str(tmp / f"s{i}_mask.png")
            cv2.imwrite(mask, truth * 255)
        recs.append(Record(str(tmp / f"s{i}.png"), label=label, mask=mask, split=split, group=f"g{i}",
                           known={"label": label is not None, "mask": label is not None, "boxes": False}))
    save_manifest(recs, tmp / "data.jsonl")
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    bright_model().save(run / "checkpoints" / "best.keras")
    (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
    data = ["data=phantom", f"data.manifest={tmp / 'data.jsonl'}", "data.image_size=32", f"paths.data_dir={tmp}"]
    OmegaConf.save(compose(data), run / "config.yaml", resolve=True)
    return tmp, run, data


@pytest.fixture(scope="module")
def written(made):
    tmp, run, _ = made
    out = tmp / "out"
    rc = main([f"checkpoint={run}", "what=pseudo_masks", f"out={out}", "pseudo.layer=feat", "pseudo.open=0.05",
               "pseudo.close=0.05", "progress=false"])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text())


def test_pseudo_masks_are_written_and_match_the_blobs(made, written):
    tmp, _, _ = made
    out, summary = written
    assert summary["splits"] == ["train", "val"] and summary["images"] == 5  # the test image is not touched
    assert summary["status"] == {"empty": 1, "mask": 4}
    assert summary["dice"]["images"] == 3 and summary["dice"]["mean"] > 0.8  # the unlabelled one has no truth
    assert set(summary["dice"]["per_class"]) == {"glioma", "meningioma", "pituitary"}
    by_image = {r.image: r for r in load_manifest(out / "manifest.jsonl")}
    for i in (0, 1, 2, 4):
        r = by_image[str(tmp / f"s{i}.png")]
        m = cv2.imread(r.mask, cv2.IMREAD_GRAYSCALE)
        assert m.shape == (H, W) and set(np.unique(m)) == {0, 255}  # at the original size
        assert r.is_pseudo("mask") and r.is_pseudo("boxes") and len(r.boxes) == 1
        if i != 4:
            truth = cv2.imread(str(tmp / f"s{i}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
            assert dice_iou(m > 0, truth)[0] > 0.8
    unlabelled = by_image[str(tmp / "s4.png")]
    assert unlabelled.meta["pseudo_mask"]["label_source"] == "predicted"
    assert unlabelled.meta["pseudo_mask"]["class"] == "glioma" and unlabelled.label is None  # the label stays unknown
    assert len(list((out / "overlays").glob("*.png"))) == 4


def test_no_tumor_gets_a_known_empty_mask_and_other_splits_keep_their_truth(made, written):
    tmp, _, _ = made
    out, _ = written
    by_image = {r.image: r for r in load_manifest(out / "manifest.jsonl")}
    healthy = by_image[str(tmp / "s3.png")]
    assert healthy.mask is None and healthy.known["mask"] and healthy.known["boxes"] and len(healthy.boxes) == 0
    assert not healthy.is_pseudo("mask")  # the true label says it: not a model's guess
    test = by_image[str(tmp / "s5.png")]
    assert test.mask == str(tmp / "s5_mask.png") and not test.is_pseudo("mask")
    assert len(by_image) == 6


def test_manifest_round_trip_counts_pseudo_masks(made, written):
    out, _ = written
    _, _, data = made
    bundle = load_data(compose([*data, f"data.manifest={out / 'manifest.jsonl'}"]).data)
    assert bundle.summary()["pseudo"]["mask"] == {"total": 4, "empty": 0, "by_split": {"train": 3, "val": 1}}
    d = describe(bundle)
    assert d["splits"]["train"]["pseudo_masks"] == 3 and d["splits"]["train"]["masks"] == 0
    assert d["splits"]["test"]["masks"] == 1 and d["splits"]["test"]["pseudo_masks"] == 0


def test_one_training_step_on_the_pseudo_manifest(made, written):
    import tensorflow as tf

    from src.data.pipeline import build_dataset
    from src.models.task import MultiTaskModel

    out, _ = written
    _, _, data = made
    cfg = compose([*data, f"data.manifest={out / 'manifest.jsonl'}", "data.batch_size=8", "data.pseudo_weight=0.5",
                   "data.cache=false"]).data
    bundle = load_data(cfg)
    train = bundle.split("train")
    x, y, w = next(iter(build_dataset(train, bundle.class_map, OmegaConf.to_container(cfg, resolve=True),
                                      training=True, heads=["class", "mask"])))
    pseudo = np.array([r.is_pseudo("mask") for r in train])
    assert pseudo.sum() == 3 and float(tf.reduce_sum(y["mask"])) > 0
    assert sorted(w["mask"].numpy().tolist()) == [0.5, 0.5, 0.5, 1.0]  # pseudo masks weigh data.pseudo_weight
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    logits = keras.layers.Conv2D(1, 1)(keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp))
    net = keras.Model(inp, {"mask": keras.layers.Activation("sigmoid", name="mask")(logits)})  # a tiny segmenter
    model = MultiTaskModel(net, {"mask": "dice_focal"})
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    y = {"mask": y["mask"]}
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True), {"mask": w["mask"]})
    grads = tape.gradient(loss, model.trainable_weights)
    model.optimizer.apply(grads, model.trainable_weights)
    assert np.isfinite(float(loss)) and float(loss) > 0 and all(np.any(g.numpy()) for g in grads)


def test_predicted_labels_other_splits_dropped_and_errors(made, capsys):
    tmp, run, _ = made
    out = tmp / "predicted"
    rc = main([f"checkpoint={run}", "what=pseudo_masks", f"out={out}", "pseudo.layer=feat", "pseudo.label=predicted",
               "pseudo.others=drop", "split=train", "progress=false"])
    assert rc == 0, capsys.readouterr().err
    recs = {r.image: r for r in load_manifest(out / "manifest.jsonl")}
    assert {r.split for r in recs.values()} == {"train"} and len(recs) == 4  # val and test left out
    meningioma = recs[str(tmp / "s1.png")]  # the model calls every bright slice glioma
    made_by = meningioma.meta["pseudo_mask"]
    assert made_by["class"] == "glioma" and made_by["label_source"] == "predicted"
    assert meningioma.label == "meningioma" and meningioma.is_pseudo("mask")
    healthy = recs[str(tmp / "s3.png")]  # predicted a tumour, but a flat CAM localises nothing: unknown
    assert not healthy.known["mask"] and healthy.mask is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == {"mask": 3, "no_response": 1}
    assert main([f"checkpoint={run}", "what=pseudo_masks", f"out={out}", "split=holdout"]) == 2
    assert "no image of data 'phantom' is in split(s) ['holdout']" in capsys.readouterr().err
    assert main([f"checkpoint={run}", "what=pseudo_masks", "pseudo.threshold=2"]) == 2
    assert "pseudo.threshold must be" in capsys.readouterr().err


# ---- score: tumor ------------------------------------------------------------------------
def context_model(classes=4):
    """A classifier that tells the subtype from *context* (the green band) and tumour from
    healthy by the *lesion* (the red blob): glioma's logit is 4 x mean(green), no_tumor's
    is -8 x mean(red) + 1. The CAM of glioma is the band; the tumour-vs-healthy CAM is the blob."""
    x = keras.Input((32, 32, 3))
    f = keras.layers.Conv2D(2, 1, use_bias=False, name="feat",
                            kernel_initializer=keras.initializers.Constant([[[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]]))(x)
    p = keras.layers.GlobalAveragePooling2D()(f)
    kernel = [row[:classes] for row in ([0.0, 0.0, 0.0, -8.0], [4.0, 0.0, 0.0, 0.0])]   # rows: red, green
    logits = keras.layers.Dense(classes, kernel_initializer=keras.initializers.Constant(kernel),
                                bias_initializer=keras.initializers.Constant([0.0, 0.0, 0.0, 1.0][:classes]))(p)
    return keras.Model(x, {"class": keras.layers.Activation("softmax", name="class")(logits)})


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("context")
    recs = []
    for i, (label, at) in enumerate([("glioma", (26, 14)), ("glioma", (24, 34)), ("no_tumor", None)]):
        truth = blob(at[0], at[1], 6, 7) if at else np.zeros((H, W), np.uint8)
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 2] = 200 * truth          # red (cv2 writes BGR): the lesion
        img[2:8, :, 1] = 255               # green: a band across the top, the "context"
        cv2.imwrite(str(tmp / f"c{i}.png"), img)
        mask = None
        if at:
            mask = str(tmp / f"c{i}_mask.png")
            cv2.imwrite(mask, truth * 255)
        recs.append(Record(str(tmp / f"c{i}.png"), label=label, mask=mask, split="train", group=f"g{i}",
                           known={"label": True, "mask": True, "boxes": False}))
    save_manifest(recs, tmp / "data.jsonl")
    runs = {}
    for name, width in (("four", 4), ("subtype", 3)):
        run = tmp / name
        (run / "checkpoints").mkdir(parents=True)
        context_model(width).save(run / "checkpoints" / "best.keras")
        (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
        data = ["data=phantom", f"data.manifest={tmp / 'data.jsonl'}", "data.image_size=32", f"paths.data_dir={tmp}",
                "data.channels=3"]
        OmegaConf.save(compose(data), run / "config.yaml", resolve=True)
        runs[name] = run
    return tmp, runs


def test_score_tumor_outlines_the_lesion_where_the_class_cam_shows_the_context(context_run, capsys):
    tmp, runs = context_run
    dice = {}
    for score in ("label", "tumor"):
        out = tmp / f"out_{score}"
        rc = main([f"checkpoint={runs['four']}", "what=pseudo_masks", f"out={out}", "pseudo.layer=feat",
                   f"pseudo.score={score}", "split=train", "progress=false"])
        assert rc == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["score"] == score and summary["status"] == {"empty": 1, "mask": 2}
        dice[score] = summary["dice"]["mean"]
        made_by = {r.image: r for r in load_manifest(out / "manifest.jsonl")}[str(tmp / "c0.png")].meta["pseudo_mask"]
        assert made_by["score"] == score
    assert dice["label"] < 0.1 and dice["tumor"] > 0.8, dice
    # a head without a no_tumor output (a subtype head) cannot explain tumour against healthy
    rc = main([f"checkpoint={runs['subtype']}", "what=pseudo_masks", f"out={tmp / 'bad'}", "pseudo.layer=feat",
               "pseudo.score=tumor", "split=train", "progress=false"])
    assert rc == 2 and "has no no_tumor output" in capsys.readouterr().err
    assert main([f"checkpoint={runs['four']}", "what=pseudo_masks", "pseudo.score=lesion"]) == 2
    assert "pseudo.score must be one of" in capsys.readouterr().err
