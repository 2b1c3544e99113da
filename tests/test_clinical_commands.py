"""DICOM series and NIfTI volumes through every command -- describe, train, evaluate,
curate, predict -- at tiny size (one epoch of small_cnn at 32 px on data the test writes),
and predict's mask volume written back on the input's voxel grid."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from tests.data.fixtures_clinical import write_nifti, write_series, write_subject  # noqa: E402

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]
TINY = ["data.split.val_fraction=0.25", "data.split.test_fraction=0.25", "data.image_size=32", "model.widths=[8,16]",
        "trainer.max_epochs=1", "trainer.verbose=0", "tracking=none", "data.batch_size=8", "data.cache=false"]


def _json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def _train(tmp: Path, overrides: list) -> Path:
    from src.config import compose
    from src.train import run

    cfg = compose([*overrides, *TINY, f"paths.output_root={tmp / 'out'}", f"paths.data_dir={tmp / 'data'}"])
    run_dir = tmp / "out" / "train" / "run"
    run(cfg, run_dir)
    assert (run_dir / "phase3" / "checkpoints" / "best.keras").is_file()
    return run_dir


def _commands(tmp: Path, data: list, run_dir: Path, predict_input: Path, capsys) -> dict:
    """describe, evaluate, curate, predict as a user runs them; their JSON answers."""
    from src.curate.cli import main as curate
    from src.data.describe import main as describe
    from src.evaluate import main as evaluate
    from src.predict import main as predict

    paths = [f"paths.output_root={tmp / 'out'}", f"paths.data_dir={tmp / 'data'}"]
    out = {}
    for name, fn, args in (
            ("describe", describe, [*data, *paths]),
            ("evaluate", evaluate, [f"checkpoint={run_dir}", "split=test", "tracking=none", *paths]),
            ("curate", curate, [*data, *paths, f"curate.out={tmp / 'curate'}", "curate.progress=false"]),
            ("predict", predict, [f"checkpoint={run_dir}", f"input={predict_input}", f"output={tmp / 'pred'}",
                                  *paths])):
        capsys.readouterr()
        rc = fn(args)
        o = capsys.readouterr()
        assert rc == 0, f"{name}: {o.err[-3000:]}"
        out[name] = _json(o.out)
    return out


def _no_patient_in_two_splits(summary_or_manifest: list) -> None:
    splits: dict = {}
    for r in summary_or_manifest:
        splits.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), splits


def test_dicom_through_every_command(tmp_path, capsys):
    d = tmp_path / "dicom"
    rows = ["PatientID,label"]
    for p in range(8):
        pid = f"HOSP-{p:04d}"
        write_series(d / f"study{p}" / "t1c", 6, patient=pid, series=f"1.9.{p}", study=f"2.9.{p}", window=(150, 400),
                     texture=p)
        rows.append(f"{pid},{CLASSES[p % 2]}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    data = ["data=dicom", f"data.root={d}", f"data.options.labels={d / 'labels.csv'}", *TINY[:2]]
    run_dir = _train(tmp_path, data)
    out = _commands(tmp_path, data, run_dir, d / "study3", capsys)

    desc = out["describe"]
    assert desc["images"] == 48 and desc["groups"]["count"] == 8
    assert sum(s["groups"] for s in desc["splits"].values()) == 8   # no patient in two splits
    manifest = [json.loads(line) for line in (tmp_path / "curate" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 48 and all(r["group"].startswith("pt-") for r in manifest)
    _no_patient_in_two_splits(manifest)
    assert out["evaluate"]["heads"] == ["class"]   # no outline in DICOM: the box head is dropped
    assert (run_dir / "eval_test" / "metrics.json").is_file()
    pred = out["predict"]
    assert pred["predicted"] == 6 and pred["volumes"] == 1 and pred["skipped"] == 0
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slice"]) for r in rows] == list(range(6)) and len({r["volume"] for r in rows}) == 1
    assert [Path(r["path"]).name for r in rows] == [f"IM{6 - k:04d}.dcm" for k in range(6)]   # position order
    assert {r["predicted"] for r in rows} <= set(CLASSES)
    # no patient id in clear in anything the commands wrote
    for f in [*(tmp_path / "out").rglob("*.json"), *(tmp_path / "out").rglob("*.yaml"),
              *(tmp_path / "curate").rglob("*.json*"), tmp_path / "pred" / "predictions.csv",
              *(tmp_path / "data").rglob("*.json")]:
        assert "HOSP-" not in f.read_text(errors="ignore"), f


def test_nifti_through_every_command(tmp_path, capsys):
    n = tmp_path / "brats"
    for s in range(6):
        write_subject(n, f"BraTS2021_{s:05d}", axcodes="LPS" if s % 2 else None, seed=s, texture=True,
                      seg_slices=(2 + s % 3, 3 + s % 3, 4 + s % 3))
    data = ["data=nifti", f"data.root={n}", "data.options.label=glioma", *TINY[:2]]
    run_dir = _train(tmp_path, data)
    vol = n / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz"
    out = _commands(tmp_path, data, run_dir, vol, capsys)
    desc = out["describe"]
    assert desc["groups"]["count"] == 6 and sum(s["groups"] for s in desc["splits"].values()) == 6
    assert sum(s["masks"] for s in desc["splits"].values()) == 18           # 3 tumour slices per subject
    manifest = [json.loads(line) for line in (tmp_path / "curate" / "manifest.jsonl").read_text().splitlines()]
    _no_patient_in_two_splits(manifest)
    assert (run_dir / "eval_test" / "metrics.json").is_file()
    pred = out["predict"]
    assert pred["predicted"] == 10 and pred["volumes"] == 1 and pred["mask_volumes"] == []   # small_cnn: no mask head
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slice"]) for r in rows] == list(range(10)) and {r["volume"] for r in rows} == {str(vol)}
    assert {(r["width"], r["height"]) for r in rows} == {("20", "24")}


def _marker_mask_model(h: int, w: int):
    """mask = the brightest pixels (> ~0.9): the volume's right-anterior marker."""
    import keras

    x_in = keras.Input((h, w, 3), name="image")
    logits = keras.layers.Conv2D(1, 1, name="mask_logits")(x_in)
    mask = keras.layers.Activation("sigmoid", name="mask")(logits)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x_in)
    cls = keras.layers.Dense(4, activation="softmax", name="class")(pooled)
    m = keras.Model(x_in, {"class": cls, "mask": mask}, name="toy_mask")
    m.get_layer("mask_logits").set_weights([np.array([40.0, 0, 0], np.float32).reshape(1, 1, 3, 1),
                                            np.array([-36.0], np.float32)])
    return m


def test_predict_nifti_writes_a_mask_volume_on_the_input_grid(tmp_path):
    from src import predict as pr
    from tests.data.fixtures_clinical import ras_affine, ras_volume

    run = tmp_path / "run"
    (run / "phase1" / "checkpoints").mkdir(parents=True)
    _marker_mask_model(24, 20).save(run / "phase1" / "checkpoints" / "best.keras")   # axial slices: 24 x 20
    (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
    vol = write_nifti(tmp_path / "in" / "case_PLI.nii.gz", ras_volume(), ras_affine(), axcodes="PLI")
    write_nifti(tmp_path / "in" / "case_RAS.nii.gz", ras_volume(), ras_affine())
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not gzip")
    res = pr.predict(run, tmp_path / "in", tmp_path / "out", save_overlays=False)
    assert res.volumes == 3 and len(res.rows) == 20 and len(res.skipped) == 1
    assert "broken.nii.gz" in res.skipped[0]["path"] and "not a readable NIfTI" in res.skipped[0]["reason"]
    written = {Path(p).name: p for p in res.mask_volumes}
    assert sorted(written) == ["case_PLI_mask.nii.gz", "case_RAS_mask.nii.gz"]
    src = nib.load(str(vol))
    pred = nib.load(written["case_PLI_mask.nii.gz"])
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert pred.get_data_dtype() == np.uint8
    truth = np.asarray(src.dataobj) >= 1999                  # the marker, in the file's own voxel order
    got = np.asarray(pred.dataobj) > 0
    assert truth.sum() == 90 and np.array_equal(got, truth)
    # the same physical mask from the RAS copy
    ras = nib.load(written["case_RAS_mask.nii.gz"])
    assert np.array_equal(np.asarray(nib.as_closest_canonical(ras).dataobj),
                          np.asarray(nib.as_closest_canonical(pred).dataobj))


def test_predict_dicom_series_with_a_missing_slice_is_one_skipped_row(tmp_path):
    from src import predict as pr
    from tests.test_predict_export import _small_cnn_with_aux  # noqa: F401  (a small model, no training)
    from src.models.task import MultiTaskModel

    run = tmp_path / "run"
    (run / "phase1" / "checkpoints").mkdir(parents=True)
    model = MultiTaskModel(_small_cnn_with_aux(), {"class": "ce", "boxes": "giou"}, name="small_cnn")
    model(np.zeros((1, 32, 32, 3), np.float32))
    model.save(run / "phase1" / "checkpoints" / "best.keras")
    (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
    write_series(tmp_path / "in" / "a", 4, series="1.1", window=(150, 400))
    write_series(tmp_path / "in" / "b", 5, series="1.2", skip=(2,), window=(150, 400))
    res = pr.predict(run, tmp_path / "in", tmp_path / "out", save_overlays=False)
    assert res.volumes == 1 and len(res.rows) == 4 and len(res.skipped) == 1
    assert "missing slice" in res.skipped[0]["reason"] and res.skipped[0]["path"].endswith("IM0002.dcm")
