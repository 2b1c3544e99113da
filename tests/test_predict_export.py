"""`src.predict` and `src.export` on tiny checkpoints (small_cnn and a constructed
tumour/subtype/mask model)."""
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import keras

from src import export as ex
from src import inference as inf
from src import predict as pr
from src import runs

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]


def _small_cnn_with_aux():
    from src.models import create_model

    net = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    aux = keras.layers.Dense(4, activation="softmax", name="class_aux1")(net.get_layer("pool").output)
    return keras.Model(net.input, {**net.output, "class_aux1": aux}, name="small_cnn")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as the engine writes it: run_info.json + phase<N>/checkpoints/best.keras."""
    from src.models.task import MultiTaskModel

    run = tmp_path_factory.mktemp("run")
    model = MultiTaskModel(_small_cnn_with_aux(), {"class": "ce", "boxes": "giou"}, name="small_cnn")
    model(np.zeros((1, 32, 32, 3), np.float32))
    for phase in ("1", "3"):
        (run / f"phase{phase}" / "checkpoints").mkdir(parents=True)
        model.save(run / f"phase{phase}" / "checkpoints" / "best.keras")
    (run / "run_info.json").write_text(json.dumps({"model": "small_cnn", "data": "phantom", "classes": CLASSES}))
    return run


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three good images of different sizes (one grey JPEG) and four bad files."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    red = np.zeros((40, 50, 3), np.uint8)
    red[10:30, 5:25, 0] = 255
    _write(d / "a_red.png", red)
    _write(d / "b_grey.jpg", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    _write(d / "sub" / "c_small.png", rng.integers(0, 255, (45, 30, 3), dtype=np.uint8))
    good = (d / "b_grey.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(good[: len(good) // 2])          # truncated JPEG
    (d / "empty.png").write_bytes(b"")                               # 0 bytes
    (d / "notes.txt").write_text("not an image")                     # not an image
    (d / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 5)  # broken PNG header
    return d


def test_resolve_checkpoint_picks_the_last_phase(run_dir, tmp_path):
    assert runs.resolve_checkpoint(run_dir) == run_dir / "phase3" / "checkpoints" / "best.keras"
    for p in ("phase2", "phase10"):
        (tmp_path / p / "checkpoints").mkdir(parents=True)
        (tmp_path / p / "checkpoints" / "best.keras").write_bytes(b"x")
    assert runs.resolve_checkpoint(tmp_path).parent.parent.name == "phase10"
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(runs.CheckpointError, match="no checkpoint"):
        runs.resolve_checkpoint(tmp_path / "empty_run")
    with pytest.raises(runs.CheckpointError, match="does not exist"):
        runs.resolve_checkpoint(tmp_path / "nope")


def test_predict_folder_with_bad_files(run_dir, images, tmp_path):
    res = pr.predict(run_dir, images, tmp_path / "out", batch_size=2)
    assert res.classes == CLASSES
    got = {r["path"].split("/")[-1] for r in res.rows}
    assert got == {"a_red.png", "b_grey.jpg", "c_small.png"}
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in res.skipped}
    assert set(reasons) == {"corrupt.jpg", "empty.png", "notes.txt", "fake.png"}
    assert "empty" in reasons["empty.png"]
    assert reasons["corrupt.jpg"].startswith("corrupt image data (") and "Op:" not in reasons["corrupt.jpg"]
    assert "not JPEG, PNG" in reasons["notes.txt"]
    assert "PNG" in reasons["fake.png"]
    with open(tmp_path / "out" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "out" / "skipped.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert len(rows) == 3 and "class_aux1" not in "".join(rows[0])
    for r in rows:
        w, h = int(r["width"]), int(r["height"])
        probs = [float(r[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 1e-4 and r["predicted"] == CLASSES[int(np.argmax(probs))]
        for c in CLASSES:
            x0, y0, x1, y1 = (float(r[f"box_{c}_{k}"]) for k in ("x0", "y0", "x1", "y1"))
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if r["predicted"] != "no_tumor":
            assert float(r["box_x0"]) == pytest.approx(float(r[f"box_{r['predicted']}_x0"]), abs=1e-3)
        assert cv2.imread(r["overlay_path"]).shape[:2] == (h, w)
    # the box is the model's normalised slot scaled to the original image (stretch)
    model = inf.load_for_inference(run_dir).network
    img = inf.read_image(images / "a_red.png")
    x = inf.prepare(img, inf.frame_for(40, 50, (32, 32)))
    boxes = np.asarray(model(x[None], training=False)["boxes"])[0]
    row = next(r for r in rows if r["path"].endswith("a_red.png"))
    for k, c in enumerate(CLASSES):
        np.testing.assert_allclose([float(row[f"box_{c}_{q}"]) for q in ("x0", "y0", "x1", "y1")],
                                   boxes[k] * [50, 40, 50, 40], atol=1e-3)


def test_letterbox_frame_maps_back_to_pixels():
    f = inf.frame_for(100, 200, (64, 64), "letterbox")   # content 32 x 64, 16 px bands top and bottom
    assert (f.nh, f.nw, f.top, f.left) == (32, 64, 16, 0)
    b = inf.boxes_to_pixels(np.array([[0.25, 0.25, 0.75, 0.75]]), f)
    np.testing.assert_allclose(b, [[50, 0, 150, 100]])   # y: (16 - 16) / 32 * 100 .. clipped
    b = inf.boxes_to_pixels(np.array([[0.0, 0.5, 1.0, 0.625]]), f)
    np.testing.assert_allclose(b, [[0, 50, 200, 75]])
    m = np.zeros((64, 64), np.float32)
    m[32:48, :32] = 1.0
    back = inf.mask_to_original(m, f)
    assert back.shape == (100, 200) and back[60, 50] == 1 and back[10, 50] == 0 and back[60, 150] == 0


def _tumour_model():
    """tumor [B, 1] from the red area, subtype favouring 'meningioma', mask = red pixels."""
    x_in = keras.Input((32, 32, 3), name="image")
    red = keras.layers.Conv2D(1, 1, name="mask_logits")(x_in)
    mask = keras.layers.Activation("sigmoid", name="mask")(red)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x_in)
    tumor = keras.layers.Dense(1, activation="sigmoid", name="tumor")(pooled)
    subtype = keras.layers.Dense(3, activation="softmax", name="subtype")(pooled)
    m = keras.Model(x_in, {"tumor": tumor, "subtype": subtype, "mask": mask}, name="toy_unet")
    m.get_layer("mask_logits").set_weights([np.array([20.0, 0, 0], np.float32).reshape(1, 1, 3, 1),
                                            np.array([-10.0], np.float32)])
    m.get_layer("tumor").set_weights([np.array([[20.0], [0], [0]], np.float32), np.array([-1.0], np.float32)])
    m.get_layer("subtype").set_weights([np.zeros((3, 3), np.float32), np.array([0.0, 2.0, 0.0], np.float32)])
    return m


def test_predict_tumour_subtype_and_mask(images, tmp_path):
    run = tmp_path / "run"
    (run / "phase1" / "checkpoints").mkdir(parents=True)
    _tumour_model().save(run / "phase1" / "checkpoints" / "best.keras")
    (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
    d = tmp_path / "in"
    red = cv2.imread(str(images / "a_red.png"))
    _write(d / "red.png", cv2.cvtColor(red, cv2.COLOR_BGR2RGB))
    _write(d / "black.png", np.zeros((40, 50, 3), np.uint8))
    res = pr.predict(run, d, tmp_path / "out")
    by = {r["path"].split("/")[-1]: r for r in res.rows}
    assert by["red.png"]["predicted"] == "meningioma" and by["black.png"]["predicted"] == "no_tumor"
    p = by["red.png"]["p_tumor"]
    assert by["red.png"]["p_no_tumor"] == pytest.approx(1 - p, abs=1e-6)
    assert sum(by["red.png"][f"p_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
    mask = cv2.imread(by["red.png"]["mask_path"], cv2.IMREAD_GRAYSCALE)
    truth = np.zeros((40, 50), np.uint8)
    truth[10:30, 5:25] = 1
    assert mask.shape == (40, 50)
    inter = ((mask > 0) & (truth > 0)).sum()
    assert 2 * inter / ((mask > 0).sum() + truth.sum()) > 0.9
    assert by["black.png"]["mask_area_px"] == 0
    # a stricter tumour threshold turns the red image healthy
    res = pr.predict(run, d, tmp_path / "out2", threshold=0.999, save_overlays=False, save_masks=False)
    assert {r["predicted"] for r in res.rows} == {"no_tumor"}


def test_predict_boxes_from_the_mask(tmp_path):
    """A mask model without a box head: boxes of the thresholded mask at the original size,
    in the detectors' columns (largest) or all of them (components), and on the overlay."""
    run = tmp_path / "run"
    (run / "phase1" / "checkpoints").mkdir(parents=True)
    _tumour_model().save(run / "phase1" / "checkpoints" / "best.keras")
    (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
    img = np.zeros((80, 100, 3), np.uint8)
    img[20:60, 10:50] = 255         # 40 x 40 white square (the model's mask is the red channel)
    img[8:24, 70:90] = 255          # 16 x 20 white rectangle
    _write(tmp_path / "in" / "two.png", img)
    _write(tmp_path / "in" / "black.png", np.zeros((40, 50, 3), np.uint8))

    res = pr.predict(run, tmp_path / "in", tmp_path / "out")
    assert res.summary()["boxes_from_mask"] == "largest"
    with open(tmp_path / "out" / "predictions.csv") as fh:
        by = {r["path"].split("/")[-1]: r for r in csv.DictReader(fh)}
    two = by["two.png"]
    assert "boxes" not in two and two["box_source"] == "mask" and two["mask_components"] == "2"
    np.testing.assert_allclose([float(two[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1")], [10, 20, 50, 60], atol=2)
    assert by["black.png"]["box_x0"] == "" and by["black.png"]["mask_components"] == "0"
    overlay = cv2.imread(two["overlay_path"])[..., ::-1]
    ys, xs = np.nonzero((overlay[..., 0] == 255) & (overlay[..., 1] == 0) & (overlay[..., 2] == 0))
    assert len(xs) > 100 and xs.min() >= 8 and xs.max() <= 51 and ys.min() >= 18 and ys.max() <= 61  # the red box

    res = pr.predict(run, tmp_path / "in", tmp_path / "out2", boxes_from_mask="components", save_overlays=False)
    two = next(r for r in res.rows if r["path"].endswith("two.png"))
    boxes = [[float(v) for v in b.split()] for b in two["boxes"].split(";")]
    np.testing.assert_allclose(boxes, [[10, 20, 50, 60], [70, 8, 90, 24]], atol=2)
    np.testing.assert_allclose([two[f"box_{k}"] for k in ("x0", "y0", "x1", "y1")], [10, 8, 90, 60], atol=2)  # union
    res = pr.predict(run, tmp_path / "in", tmp_path / "out3", boxes_from_mask=False, save_overlays=False)
    assert "box_x0" not in res.rows[0] and res.summary()["boxes_from_mask"] is None
    with pytest.raises(pr.PredictError, match="largest, components or false"):
        pr.predict(run, tmp_path / "in", tmp_path / "out4", boxes_from_mask="all")


def test_predict_cli_with_flip_tta(run_dir, images, tmp_path, capsys):
    """tta=flip through the CLI: the mean of the image's and the un-flipped mirror's outputs."""
    rc = pr.main([f"checkpoint={run_dir}", f"input={images / 'a_red.png'}", f"output={tmp_path / 'o'}", "tta=flip"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["tta"] == "flip"
    with open(tmp_path / "o" / "predictions.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["tta"] == "flip"
    model = inf.load_for_inference(run_dir).network
    x = inf.prepare(inf.read_image(images / "a_red.png"), inf.frame_for(40, 50, (32, 32)))
    a = {k: np.asarray(v)[0] for k, v in model(x[None], training=False).items()}
    b = {k: np.asarray(v)[0] for k, v in model(x[None, :, ::-1], training=False).items()}
    probs = (a["class"] + b["class"]) / 2
    np.testing.assert_allclose([float(row[f"p_{c}"]) for c in CLASSES], probs, atol=1e-5)
    bx = (a["boxes"][0] + np.array([1 - b["boxes"][0, 2], b["boxes"][0, 1], 1 - b["boxes"][0, 0],
                                    b["boxes"][0, 3]])) / 2
    np.testing.assert_allclose([float(row[f"box_glioma_{k}"]) for k in ("x0", "y0", "x1", "y1")],
                               bx * [50, 40, 50, 40], atol=1e-3)
    assert pr.main([f"checkpoint={run_dir}", f"input={images}", f"output={tmp_path / 'o2'}", "tta=mirror"]) == 2
    assert "tta must be false or flip" in capsys.readouterr().err


def test_predict_cli(run_dir, images, tmp_path, capsys, caplog):
    rc = pr.main([f"checkpoint={run_dir}", f"input={images}", f"output={tmp_path / 'o'}", "batch_size=4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["predicted"] == 3 and summary["skipped"] == 4
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("skipped" in m and "corrupt" in m for m in warned) >= 1  # each bad file is a warning too
    assert pr.main([f"checkpoint={run_dir}", f"input={tmp_path / 'missing'}", f"output={tmp_path / 'o2'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite", "onnx"])
def test_export_round_trip(run_dir, images, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
    # verified on real images (the folder's readable ones), as prediction prepares them
    rep = ex.export(run_dir, fmt, output=tmp_path / fmt, n_samples=3, samples=images)
    assert sorted(Path(p).name for p in rep["verified_on"]) == ["a_red.png", "b_grey.jpg", "c_small.png"]
    assert rep["passed"] is True, rep["max_abs_diff"]
    assert set(rep["max_abs_diff"]) == {"class", "boxes"} and rep["dropped_heads"] == ["boxes_aux1", "class_aux1"]
    assert all(v <= rep["tolerance"] for v in rep["max_abs_diff"].values())
    on_disk = json.loads((tmp_path / fmt / "export_report.json").read_text())
    assert on_disk["passed"] is True and on_disk["format"] == fmt
    if fmt == "tflite":
        assert (tmp_path / fmt / "model.tflite").stat().st_size > 1000
    elif fmt == "onnx":
        assert (tmp_path / fmt / "model.onnx").stat().st_size > 1000
    else:
        assert (tmp_path / fmt / "saved_model" / "saved_model.pb").is_file()


def test_onnx_without_tf2onnx_is_a_clear_message(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if the onnx extra were not installed: import fails
    rc = ex.main([f"checkpoint={run_dir}", "format=onnx", f"output={tmp_path / 'onnx'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install -e .[onnx]" in err and "Traceback" not in err


def test_mixed_precision_model_is_rebuilt_in_float32():
    from src.models import create_model

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert ex.needs_float32_rebuild(m)
    m32 = ex.to_float32(m)
    assert not ex.needs_float32_rebuild(m32)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    a, b = m(x, training=False), m32(x, training=False)
    for k in ("class", "boxes"):
        assert b[k].dtype == "float32"
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k], np.float32), atol=2e-2)
