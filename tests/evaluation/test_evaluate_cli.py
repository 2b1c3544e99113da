"""`python -m src.evaluate` end to end on a tiny trained model, its clear errors, and the
evaluation of heads the tiny model lacks (tumour, subtype, mask, reconstruction) on
constructed predictions."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.data.records import ClassMap
from src.evaluate import main
from src.evaluation import detection as D
from src.evaluation.collect import Collector, EvaluationError, check_compatible, dataset_targets, output_shapes
from src.evaluation.compute import compute_metrics, headline, prediction_rows, write_csv
from src.evaluation.plots import make_plots
from src.evaluation import metrics as M
from src.evaluation.report import write_report

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("glioma", "meningioma", "pituitary", "no_tumor")


def run_module(args, tmp_path, timeout=600, env_extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", KERAS_HOME=str(tmp_path / "keras"),
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the default small_cnn on a 12-patient phantom, trained as a user does."""
    root = tmp_path_factory.mktemp("evalcli")
    env = {"BTMTL_OUTPUT_ROOT": str(root / "out")}
    p = run_module(["src.train", "phase=3", f"data.root={root / 'phantom'}", "data.options.n_patients=12",
                    "data.options.image_size=64", "data.image_size=32", "model.widths=[8,16]",
                    "trainer.max_epochs=1", "tracking=none", "trainer.verbose=0", f"paths.data_dir={root / 'data'}"],
                   root, env_extra=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run_dir = Path(json.loads(p.stdout[p.stdout.index("{"):])["run_dir"])
    return root, run_dir, env


def test_evaluate_run_folder_writes_the_report_and_logs_it(trained, monkeypatch):
    root, run_dir, env = trained
    # an MLflow file store: the same logging code, without the seconds a new sqlite store costs
    store = root / "mlruns"
    p = run_module(["src.evaluate", f"checkpoint={run_dir}", "split=test", f"tracking.tracking_uri={store}"], root,
                   env_extra=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout[p.stdout.index("\n{") + 1:])
    out = run_dir / "eval_test"
    assert Path(summary["out"]) == out and summary["heads"] == ["class", "boxes"]
    assert "phase3/checkpoints/best.keras" in summary["checkpoint"]

    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["n_images"] > 0 and m["classes"] == list(CLASSES)
    cls = m["heads"]["class"]
    for key in ("accuracy", "balanced_accuracy", "per_class", "macro", "micro", "weighted", "roc_auc",
                "confusion_matrix", "calibration", "worst_class"):
        assert key in cls, key
    assert set(cls["per_class"]) == set(CLASSES)
    assert set(cls["per_class"]["glioma"]) >= {"precision", "recall", "f1", "support"}
    assert sum(map(sum, cls["confusion_matrix"])) == cls["n"] == m["n_images"]
    assert 0.0 <= cls["calibration"]["ece"] <= 1.0
    boxes = m["heads"]["boxes"]
    for key in ("slot_iou_mean", "slot_iou_histogram", "slot_iou_ge_0.5", "slot_iou_ge_0.75", "map50", "map50_95",
                "voc_map50", "per_class", "coco"):
        assert key in boxes, key
    assert sum(boxes["slot_iou_histogram"]["counts"]) == boxes["n_boxes"] > 0
    assert boxes["coco"]["image_size"] == m["image_size"]
    assert "pycocotools" in boxes["implementations"]["map50/map50_95/map75/mar100"]
    assert "scikit-learn" in cls["implementations"]["precision/recall/f1"]

    pngs = ["confusion_class.png", "roc_class.png", "reliability_class.png", "iou_hist.png", "gallery.png"]
    for name in pngs:
        assert (out / name).stat().st_size > 1000, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert "Lowest recall" in page and "COCO mAP@0.5" in page and "How each number is computed" in page
    assert "pycocotools" in page and "scikit-learn" in page

    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n_images"]
    assert {"path", "true_label", "pred_label", "p_glioma", "p_no_tumor", "box_iou"} <= set(rows[0])
    assert all(Path(r["path"]).is_file() for r in rows)

    # the run trained without MLflow: a new run linked by the run_dir tag holds the report
    assert summary["mlflow"] and summary["mlflow"]["existing"] is False
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert "eval_test/class/accuracy" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval_test")}
    assert "eval_test/report.html" in names and "eval_test/metrics.json" in names


def test_evaluate_errors_are_clear(trained, capsys, monkeypatch):
    root, run_dir, env = trained
    monkeypatch.setenv("BTMTL_OUTPUT_ROOT", env["BTMTL_OUTPUT_ROOT"])
    cases = [
        ([f"checkpoint={root / 'nope.keras'}"], "does not exist"),
        ([], "checkpoint=PATH is required"),
        ([f"checkpoint={root}"], "no checkpoint in"),
        ([f"checkpoint={run_dir}", "split=holdout"], "choose one of train | val | test | all"),
        ([f"checkpoint={run_dir}", "data.classes=[glioma,meningioma,pituitary]"], "class mismatch"),
    ]
    for args, message in cases:
        assert main([*args, "tracking=none", "progress=false"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_split_all_evaluates_every_image_of_a_folder(trained, tmp_path, monkeypatch):
    """An external test set is one folder: split=all scores every image, whatever the split."""
    import cv2

    from src.config import compose
    from src.data.dataset import load_data

    root, run_dir, env = trained
    monkeypatch.setenv("BTMTL_OUTPUT_ROOT", env["BTMTL_OUTPUT_ROOT"])
    ext = tmp_path / "external"
    phantom = compose(["data=phantom", f"data.root={root / 'phantom'}", "data.options.n_patients=12",
                       "data.options.image_size=64"]).data
    by_label = {}
    for r in load_data(phantom).records:                       # the phantom's images as class folders
        if r.label:
            by_label.setdefault(r.label, []).append(r.image)
    n = 0
    for label, paths in by_label.items():
        (ext / label).mkdir(parents=True)
        for p in paths[:3]:
            cv2.imwrite(str(ext / label / Path(p).name), cv2.imread(p))
            n += 1
    out = tmp_path / "report"
    assert main([f"checkpoint={run_dir}", "data=folder", f"data.root={ext}", "split=all", f"out={out}",
                 "tracking=none", "progress=false"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "all" and m["n_images"] == n


def test_report_goes_to_the_training_runs_mlflow_record(tmp_path, monkeypatch):
    """A run the engine tracked (tag run_dir) receives the report; no second run is made."""
    from mlflow.tracking import MlflowClient

    from src.evaluation.tracking import log_to_mlflow
    from src.tracking import Tracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = {"enabled": True, "tracking_uri": str(tmp_path / "mlruns"), "experiment_name": "btmtl-test"}
    run_dir = tmp_path / "run"
    out = run_dir / "eval_test"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "report.html").write_text("<html></html>")
    tracker = Tracker(cfg, run_dir)
    with tracker.start("small_cnn-phantom-phase3", tags={"model": "small_cnn"}):  # as the training engine
        train_id = tracker.run_id
    info = log_to_mlflow(cfg, run_dir, out, "test", {"class/accuracy": 0.75}, {"evaluated_split": "test"})
    assert info == {"run_id": train_id, "existing": True, "experiment": "btmtl-test"}
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(train_id)
    assert run.data.metrics["eval_test/class/accuracy"] == 0.75 and run.data.tags["evaluated_split"] == "test"
    assert {a.path for a in client.list_artifacts(train_id, "eval_test")} == {"eval_test/metrics.json",
                                                                             "eval_test/report.html"}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert log_to_mlflow({"enabled": False}, run_dir, out, "test", {}, {}) is None


# ---------------------------------------------------------------------------------------
# heads on constructed predictions
# ---------------------------------------------------------------------------------------
def _square_masks(b, size, rng):
    m = np.zeros((b, size, size, 1), np.float32)
    for i in range(b):
        t, l = rng.integers(2, size // 2, 2)
        m[i, t:t + 8, l:l + 8] = 1.0
    return m


def test_unet_like_heads_on_constructed_predictions(tmp_path):
    """tumor + subtype (composed to 4 classes), mask and recon heads, no class head."""
    rng = np.random.default_rng(0)
    cm = ClassMap(CLASSES)
    col = Collector(["tumor", "subtype", "mask", "recon"], mask_threshold=0.5, data_range=1.0)
    all_y, all_pt, all_ps, all_pm, all_tm, dices = [], [], [], [], [], []
    for b in (5, 3):
        x = rng.uniform(0, 1, (b, 32, 32, 3)).astype(np.float32)
        label = rng.integers(0, 4, b)
        label[0] = 3  # at least one healthy slice per batch
        tumor = (label != 3).astype(np.float32)
        true_mask = _square_masks(b, 32, rng) * tumor[:, None, None, None]
        pred_mask = np.roll(true_mask, 1, axis=2) * 0.9
        pt = np.clip(tumor * 0.7 + rng.uniform(0, 0.3, b), 0, 1).astype(np.float32)
        ps = rng.dirichlet(np.ones(3), b).astype(np.float32)
        y = {"class": label.astype(np.int32), "tumor": tumor, "subtype": np.where(label < 3, label, 0).astype(np.int32),
             "mask": true_mask}
        w = {"class": np.ones(b, np.float32), "tumor": np.ones(b, np.float32), "subtype": tumor.copy(),
             "mask": np.ones(b, np.float32)}
        w["mask"][-1] = 0.0  # an unknown mask is left out
        out = {"tumor": pt[:, None], "subtype": ps, "mask": pred_mask, "recon": np.clip(x + 0.05, 0, 1)}
        col.add(x, y, w, out)
        all_y.append(label), all_pt.append(pt), all_ps.append(ps), all_pm.append(pred_mask[..., 0])
        all_tm.append(true_mask[..., 0])
        dices += [M.dice_iou(pred_mask[i, ..., 0] >= 0.5, true_mask[i, ..., 0] > 0.5)[0] for i in range(b - 1)]
    arrays = col.arrays()
    y, pt, ps = np.concatenate(all_y), np.concatenate(all_pt), np.concatenate(all_ps)
    res = compute_metrics(arrays, cm, threshold=0.6)
    h = res["heads"]
    assert set(h) == {"class", "tumor", "subtype", "mask", "recon"}
    probs, pred = M.compose_tumor_subtype(pt, ps, CLASSES, CLASSES[:3], 0.6)
    assert h["class"]["composed_from"] == ["tumor", "subtype"]
    assert h["class"]["accuracy"] == pytest.approx(np.mean(pred == y))
    assert h["tumor"]["accuracy"] == pytest.approx(np.mean((pt >= 0.6) == (y != 3)))
    assert h["subtype"]["n"] == int((y != 3).sum())
    assert h["mask"]["n"] == 6 and h["mask"]["dice_mean"] == pytest.approx(np.mean(dices))
    # mask mAP: the collector's RLEs of the known masks, class-aware with the composed probabilities
    from src.evaluation.detection import encode_masks, mask_map

    known = np.r_[np.arange(4), 5 + np.arange(2)]
    pm = np.concatenate(all_pm)[known] >= 0.5
    tm = np.concatenate(all_tm)[known] > 0.5
    ref = mask_map(encode_masks(pm), encode_masks(tm), probs=probs[known], y_class=y[known], class_names=CLASSES,
                   p_tumor=pt[known])
    assert h["mask"]["mask_map_kind"] == "class-aware"
    assert h["mask"]["map50_95"] == pytest.approx(ref["map50_95"], nan_ok=True)
    assert h["mask"]["agnostic"]["map50"] == pytest.approx(ref["agnostic"]["map50"], nan_ok=True)
    assert h["mask"]["coco"]["n_images"] == 6 and "hd95" in h["mask"]["implementations"]
    assert h["recon"]["psnr_mean"] == pytest.approx(10 * np.log10(1 / 0.05 ** 2), abs=1.0)
    assert {"class/accuracy", "mask/dice_mean", "mask/map50", "recon/psnr"} <= set(headline(M.to_jsonable(res)))

    plots = make_plots(arrays, res, cm, tmp_path, threshold=0.6, gallery=2)
    assert set(plots) >= {"class", "tumor", "subtype", "mask", "gallery"}
    assert plots["gallery_score"].startswith("Dice")
    rows = prediction_rows(arrays, cm, 0.6, [{"path": f"img{i}.png"} for i in range(8)])
    assert len(rows) == 8 and {"p_tumor", "subtype_pred", "dice", "psnr", "pred_label"} <= set(rows[0])
    assert rows[-1].get("dice", "") == ""  # mask unknown: no score
    write_csv(tmp_path / "predictions.csv", rows)
    page = write_report(tmp_path / "report.html", M.to_jsonable(res), plots, meta={"split": "constructed"})
    text = page.read_text()
    assert "Composed from the heads tumor + subtype" in text and "Reconstruction" in text and "Masks" in text
    assert "COCO mask mAP" in text and "tf.image.ssim" in text
    assert text.count("data:image/png;base64,") == 3 * 3 + 2  # 3 classification heads, Dice hist, gallery


def test_small_cnn_outputs_through_the_evaluation(tmp_path):
    """The real heads of a tiny small_cnn (class + boxes) through collector, metrics, plots."""
    from src.models import create_model

    net = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    cm = ClassMap(CLASSES)
    shapes = output_shapes(net)
    assert check_compatible(shapes, cm) == ["class", "boxes"]
    assert dataset_targets(["class", "boxes"], cm) == ["class", "boxes", "boxes_all"]
    with pytest.raises(EvaluationError, match="class mismatch"):
        check_compatible(shapes, ClassMap(CLASSES[:3]))
    with pytest.raises(EvaluationError, match="trained on classes"):
        check_compatible(shapes, cm, trained_classes=CLASSES[::-1])

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (6, 32, 32, 3)).astype(np.float32)
    out = {k: np.asarray(v) for k, v in net(x, training=False).items()}
    label = np.array([0, 1, 2, 3, 0, 1], np.int32)
    boxes = np.zeros((6, 4, 4), np.float32)
    bw = np.zeros((6, 4), np.float32)
    ba = np.zeros((6, 1, 4), np.float32)
    bc = np.full((6, 1), -1, np.int32)
    for i, k in enumerate(label):
        if k < 3:
            boxes[i, k] = ba[i, 0] = [0.3, 0.3, 0.6, 0.6]
            bw[i, k], bc[i, 0] = 1.0, k
    y = {"class": label, "boxes": boxes, "boxes_all": ba, "boxes_all_classes": bc,
         "boxes_all_count": (bc[:, 0] >= 0).astype(np.int32)}
    w = {"class": np.ones(6, np.float32), "boxes": bw, "boxes_all": np.zeros(6), "boxes_all_classes": np.zeros(6),
         "boxes_all_count": np.zeros(6)}
    col = Collector(["class", "boxes"])
    col.add(x, y, w, out)
    arrays = col.arrays()
    res = compute_metrics(arrays, cm, boxes_known=np.ones(6, bool))
    assert res["heads"]["class"]["accuracy"] == pytest.approx(np.mean(out["class"].argmax(1) == label))
    ious = D.box_iou_np(out["boxes"][np.arange(6), np.minimum(label, 3)], boxes[np.arange(6), np.minimum(label, 3)])
    assert res["heads"]["boxes"]["slot_iou_mean"] == pytest.approx(ious[label < 3].mean(), abs=1e-6)
    assert res["heads"]["boxes"]["coco"]["n_images"] == 6 and res["heads"]["boxes"]["coco"]["image_size"] == [32, 32]
    plots = make_plots(arrays, res, cm, tmp_path, threshold=0.5, gallery=2)
    assert plots["gallery_score"] == "box IoU" and Path(plots["gallery"]).stat().st_size > 1000


def test_multilabel_head_on_constructed_predictions(tmp_path):
    """A sigmoid-per-class head: its own report; its argmax ranks the gallery and scores the boxes."""
    rng = np.random.default_rng(2)
    cm = ClassMap(CLASSES)
    label = np.array([0, 1, 2, 3, 0, 3], np.int32)
    mh = np.eye(4, dtype=np.float32)[label]
    p = np.clip(0.6 * mh + rng.uniform(0, 0.4, (6, 4)), 0, 1).astype(np.float32)
    col = Collector(["multilabel"])
    w = np.ones(6, np.float32)
    w[5] = 0.0  # unknown label
    col.add(rng.uniform(0, 1, (6, 16, 16, 3)), {"multilabel": mh, "class": label}, {"multilabel": w, "class": w},
            {"multilabel": p})
    arrays = col.arrays()
    res = compute_metrics(arrays, cm)
    assert set(res["heads"]) == {"multilabel"} and res["heads"]["multilabel"]["n"] == 5
    exact = np.all((p >= 0.5) == (mh > 0), axis=1)[:5]
    assert res["heads"]["multilabel"]["subset_accuracy"] == pytest.approx(np.mean(exact))
    rows = prediction_rows(arrays, cm, 0.5, [])
    assert rows[0]["true_labels"] == "glioma" and rows[5]["true_labels"] == "" and rows[5]["true_label"] == ""
    plots = make_plots(arrays, res, cm, tmp_path, threshold=0.5, gallery=2)
    assert plots["gallery_score"] == "p(true class)"


# ---------------------------------------------------------------------------------------
# boxes read off the masks of a model without a box head; test-time augmentation
# ---------------------------------------------------------------------------------------
def _box_targets(boxes_per_image, C=4):
    """Detector-style box targets (slot per class, weights, boxes_all) from ``[(class, box) or None]``."""
    n = len(boxes_per_image)
    boxes, bw = np.zeros((n, C, 4), np.float32), np.zeros((n, C), np.float32)
    ba, bc = np.zeros((n, 1, 4), np.float32), np.full((n, 1), -1, np.int32)
    for i, cb in enumerate(boxes_per_image):
        if cb is not None:
            k, b = cb
            boxes[i, k] = ba[i, 0] = b
            bw[i, k], bc[i, 0] = 1.0, k
    y = {"boxes": boxes, "boxes_all": ba, "boxes_all_classes": bc, "boxes_all_count": (bc[:, 0] >= 0).astype(np.int32)}
    w = {"boxes": bw, "boxes_all": np.zeros(n), "boxes_all_classes": np.zeros(n), "boxes_all_count": np.zeros(n)}
    return y, w


def test_boxes_from_masks_are_scored_like_a_detectors(tmp_path):
    """class + mask outputs, no box head: the collector reads a box off each predicted mask,
    box_report scores it; an empty predicted mask is a zero box (IoU 0), mAP still computes."""
    cm = ClassMap(CLASSES)
    pm = np.zeros((4, 32, 32, 1), np.float32)
    pm[0, 8:16, 4:12] = 0.9                        # exactly the true box of image 0
    pm[1, 8:16, 4:12] = 0.9
    pm[1, 20:22, 20:22] = 0.8                      # + a 4-px speck: largest ignores it, components not
    # image 2: a tumour with an empty predicted mask; image 3: healthy (box unknown)
    true = [(0, [4 / 32, 8 / 32, 12 / 32, 16 / 32]), (1, [4 / 32, 8 / 32, 12 / 32, 16 / 32]),
            (2, [0.5, 0.5, 0.75, 0.75]), None]
    y, w = _box_targets(true)
    label = np.array([0, 1, 2, 3], np.int32)
    probs = np.eye(4, dtype=np.float32)[label] * 0.7 + 0.075
    y.update({"class": label, "mask": (pm > 0.5).astype(np.float32)})
    w.update({"class": np.ones(4, np.float32), "mask": np.ones(4, np.float32)})
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)

    res = {}
    for mode in ("largest", "components"):
        col = Collector(["class", "mask"], boxes_from_mask=mode)
        col.add(x, y, w, {"class": probs, "mask": pm})
        arrays = col.arrays()
        assert arrays["pred"]["boxes"].shape == (4, 4, 4) and arrays["pred"]["boxes_from_mask"].tolist() == [1, 2, 0, 0]
        res[mode] = compute_metrics(arrays, cm, boxes_known=np.array([True, True, True, False]))
        b = res[mode]["heads"]["boxes"]
        assert b["source"] == "mask" and b["images_without_box"] == 1 and b["n_boxes"] == 3
        assert np.isfinite(b["map50"]) and "mask" in res[mode]["heads"] and "class" in res[mode]["heads"]
    union = M.box_iou_np([4 / 32, 8 / 32, 22 / 32, 22 / 32], true[1][1])
    np.testing.assert_allclose(M.slot_ious(arrays["pred"]["boxes"], y["boxes"], w["boxes"])[:3, :3].diagonal(),
                               [1.0, union, 0.0], atol=1e-6)
    for mode, ious in (("largest", [1.0, 1.0, 0.0]), ("components", [1.0, union, 0.0])):
        b = res[mode]["heads"]["boxes"]
        mean = b.get("mean_iou", b.get("slot_iou_mean"))
        assert mean == pytest.approx(np.mean(ious), abs=1e-6), mode
    assert res["largest"]["heads"]["boxes"]["map50"] == pytest.approx(2 / 3, abs=1e-6)  # 2 of 3 tumour classes hit

    # predictions.csv: the mask's box, no box for the empty mask; gallery and report label it
    rows = prediction_rows(arrays, cm, 0.5, [])
    assert rows[0]["mask_components"] == 1 and rows[0]["pred_box"] == "0.1250 0.2500 0.3750 0.5000"
    assert rows[2]["mask_components"] == 0 and rows[2]["pred_box"] == "" and "iou_glioma" in rows[0]
    plots = make_plots(arrays, res["components"], cm, tmp_path, threshold=0.5, gallery=2)
    assert plots["gallery_score"].startswith("Dice") and "boxes" in plots
    page = write_report(tmp_path / "report.html", M.to_jsonable(res["components"]), plots).read_text()
    assert "Boxes (from mask)" in page and "union of its connected components" not in page  # mode set by run()

    # a model with a box head keeps its own boxes; off: no boxes
    col = Collector(["class", "mask"], boxes_from_mask=False)
    col.add(x, y, w, {"class": probs, "mask": pm})
    assert "boxes" not in col.arrays()["pred"] and "boxes" not in compute_metrics(col.arrays(), cm)["heads"]


@pytest.fixture(scope="module")
def trained_mask_model(tmp_path_factory):
    """A tiny efficient_mtnet (class + mask, no box head) trained 2 steps on a phantom."""
    root = tmp_path_factory.mktemp("evalmask")
    env = {"BTMTL_OUTPUT_ROOT": str(root / "out")}
    tiny = ["model.ltd_channels=[8,8,8]", "model.widths=[8,12,16]", "model.blocks=[1,1,1]", "model.expansion=2",
            "model.neck_channels=16", "model.decoder_channels=[16,8]", "model.ham_channels=8", "model.ham_rank=4",
            "model.class_hidden=8", "model.aux=false"]
    p = run_module(["src.train", "model=efficient_mtnet", "phase=3", f"data.root={root / 'phantom'}",
                    "data.options.n_patients=12", "data.options.image_size=64", "data.image_size=64", *tiny,
                    "trainer.max_epochs=1", "trainer.steps_per_epoch=2", "data.batch_size=8", "tracking=none",
                    "trainer.verbose=0", f"paths.data_dir={root / 'data'}"], root, env_extra=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run_dir = Path(json.loads(p.stdout[p.stdout.index("{"):])["run_dir"])
    return root, run_dir, env


def test_mask_model_reports_boxes_from_its_masks_with_tta(trained_mask_model, capsys, monkeypatch):
    """evaluate (tta=flip, through the CLI) scores the boxes read off efficient_mtnet's masks;
    predict writes them in original pixels."""
    root, run_dir, env = trained_mask_model
    monkeypatch.setenv("BTMTL_OUTPUT_ROOT", env["BTMTL_OUTPUT_ROOT"])
    out = root / "eval_tta"
    assert main([f"checkpoint={run_dir}", "split=test", f"out={out}", "tta=flip", "boxes_from_mask=components",
                 "tracking=none", "progress=false", "gallery=2"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("\n{") + 1:])
    assert summary["heads"] == ["class", "mask", "boxes"] and summary["tta"] == "flip"
    m = json.loads((out / "metrics.json").read_text())
    assert m["tta"] == "flip" and m["boxes_from_mask"] == "components" and m["evaluated_heads"][-1] == "boxes"
    b = m["heads"]["boxes"]
    assert b["source"] == "mask" and b["mode"] == "components" and b["n_boxes"] > 0
    assert {"map50", "map50_95"} <= set(b) and ("iou_ge_0.5" in b or "slot_iou_ge_0.5" in b)
    page = (out / "report.html").read_text()
    assert "Boxes (from mask)" in page and "union of its connected components" in page and "horizontal mirror" in page
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n_images"] and {r["tta"] for r in rows} == {"flip"}
    assert {"box_iou", "mask_components", "dice"} <= set(rows[0])

    from src import predict as pr

    images = sorted((root / "phantom" / "images" / "test").glob("*.png"))[:3]
    res = pr.predict(run_dir, images[0].parent, root / "pred", batch_size=4, save_overlays=True, tta="flip")
    assert res.summary()["boxes_from_mask"] == "largest" and res.summary()["tta"] == "flip"
    with open(root / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"box_x0", "box_y0", "box_x1", "box_y1", "box_source", "mask_components", "tta"} <= set(rows[0])
    for r in rows:
        area = int(r["mask_area_px"])
        assert (r["box_x0"] != "") == (area > 0) and r["box_source"] == "mask" and r["tta"] == "flip"
        if area:
            mask = cv2_read(r["mask_path"]) > 0
            x0, y0, x1, y1 = (int(float(r[f"box_{k}"])) for k in ("x0", "y0", "x1", "y1"))
            assert mask[y0:y1, x0:x1].any() and x1 <= int(r["width"]) and y1 <= int(r["height"])


def cv2_read(path):
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def test_pseudo_masks_are_not_scored_as_ground_truth(trained_mask_model, capsys, monkeypatch, tmp_path):
    """Masks a model made (``record.pseudo``) are left out of the mask and box scores, and
    counted in ``pseudo_left_out``; the class head still scores every image."""
    from src.config import compose
    from src.data.dataset import load_data
    from src.data.records import save_manifest

    root, run_dir, env = trained_mask_model
    monkeypatch.setenv("BTMTL_OUTPUT_ROOT", env["BTMTL_OUTPUT_ROOT"])
    phantom = compose(["data=phantom", f"data.root={root / 'phantom'}", "data.options.n_patients=12",
                       "data.options.image_size=64"]).data
    records = load_data(phantom).records
    test = [r for r in records if r.split == "test" and r.known.get("mask")]
    for r in test[::2]:
        r.pseudo = {"mask": True}
    n_pseudo = len(test[::2])
    manifest = save_manifest(records, tmp_path / "pseudo.jsonl")
    scores = {}
    for name, extra in (("plain", []), ("pseudo", [f"data.manifest={manifest}"])):
        out = tmp_path / name
        assert main([f"checkpoint={run_dir}", "split=test", f"out={out}", *extra, "tracking=none", "progress=false",
                     "gallery=0"]) == 0, capsys.readouterr().err
        scores[name] = json.loads((out / "metrics.json").read_text())
    plain, pseudo = scores["plain"], scores["pseudo"]
    assert n_pseudo > 0 and plain["pseudo_left_out"] == {} and pseudo["pseudo_left_out"] == {"mask": n_pseudo}
    assert pseudo["n_images"] == plain["n_images"] == pseudo["heads"]["class"]["n"]
    assert pseudo["heads"]["mask"]["n"] == plain["heads"]["mask"]["n"] - n_pseudo
    # the phantom's boxes are annotated, not model-made: the boxes read off the masks still score against all
    assert pseudo["heads"]["boxes"]["n_boxes"] == plain["heads"]["boxes"]["n_boxes"] > 0
