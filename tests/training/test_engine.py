"""The training engine end to end on tiny phantom data: phases, chaining, resume."""
import csv
import json
from pathlib import Path

import pytest

from src.config import compose
from src.models.task import load_checkpoint
from src.training import metrics as _metrics, optim as _optim  # noqa: F401  (what compile=True loads)
from src.training.engine import train


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return tmp_path_factory.mktemp("phantom") / "phantom"


def cfg_for(phantom_root, out, *extra):
    return compose([
        "data=phantom", f"data.root={phantom_root}", "data.options.n_patients=16", "data.options.image_size=64",
        "data.image_size=32", "data.batch_size=8", "model=small_cnn", "model.widths=[8,16]",
        "trainer.max_epochs=1", "trainer.steps_per_epoch=2", "trainer.validation_steps=1", "trainer.verbose=0",
        "trainer.precision=float32", "tracking=none", f"paths.output_root={out}", *extra])


def run(cfg, out, name):
    run_dir = Path(out) / name
    return train(cfg, run_dir), run_dir


def test_phase_chain_all(phantom_root, tmp_path):
    final, run_dir = run(cfg_for(phantom_root, tmp_path, "phase=all"), tmp_path, "all")
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert list(summary["phases"]) == ["1", "2", "3"]
    for p in ("1", "2", "3"):
        assert (run_dir / f"phase{p}" / "checkpoints" / "best.keras").is_file()
        assert (run_dir / f"phase{p}" / "checkpoints" / "last.keras").is_file()
        png = run_dir / f"phase{p}" / "learning_curves.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # phase 1 learns boxes only: its metrics have no class loss; phase 3 has both
    assert "boxes_loss" in summary["phases"]["1"]["val"] and "class_loss" not in summary["phases"]["1"]["val"]
    assert {"class_loss", "boxes_loss", "class_acc"} <= set(final["val"])
    model = load_checkpoint(run_dir / "phase3" / "checkpoints" / "best.keras")
    assert set(model.network.output) == {"class", "boxes", "boxes_aux1"}  # dense box maps: training only
    assert set(model.inference_model().output) == {"class", "boxes"}


def test_single_phase_starts_from_previous_phase_checkpoint(phantom_root, tmp_path, capsys):
    _, r1 = run(cfg_for(phantom_root, tmp_path, "phase=1"), tmp_path, "r1")
    _, r2 = run(cfg_for(phantom_root, tmp_path, "phase=2"), tmp_path, "r2")
    info2 = json.loads((r2 / "run_info.json").read_text())
    assert info2["initial_checkpoint"] == str(r1 / "phase1" / "checkpoints" / "best.keras")
    _, r3 = run(cfg_for(phantom_root, tmp_path, "phase=3"), tmp_path, "r3")
    info3 = json.loads((r3 / "run_info.json").read_text())
    assert info3["initial_checkpoint"] == str(r2 / "phase2" / "checkpoints" / "best.keras")
    assert "starting from the phase-2 checkpoint" in capsys.readouterr().out
    # another data set never provides the checkpoint
    other = tmp_path / "other"
    _, r4 = run(cfg_for(phantom_root, other, "phase=3"), other, "r4")
    assert json.loads((r4 / "run_info.json").read_text())["initial_checkpoint"] is None


def test_phase_without_previous_checkpoint_warns(phantom_root, tmp_path, capsys):
    _, r = run(cfg_for(phantom_root, tmp_path, "phase=3"), tmp_path, "lone")
    assert "no phase-2 checkpoint" in capsys.readouterr().out
    assert (r / "phase3" / "metrics.json").is_file()


def test_unknown_phase_is_a_clear_error(phantom_root, tmp_path):
    with pytest.raises(ValueError, match="phase=7 is not defined"):
        run(cfg_for(phantom_root, tmp_path, "phase=7"), tmp_path, "bad")


def test_resume_continues_from_saved_epoch(phantom_root, tmp_path, capsys):
    _, r = run(cfg_for(phantom_root, tmp_path, "phase=1", "trainer.max_epochs=1"), tmp_path, "killed")
    # what a kill after the first epoch leaves on disk: checkpoints and state, no final metrics
    (r / "phase1" / "metrics.json").unlink()
    (r / "metrics.json").unlink()
    iters_before = int(load_checkpoint(r / "phase1" / "checkpoints" / "last.keras",
                                    compile=True).optimizer.iterations.numpy())
    run(cfg_for(phantom_root, tmp_path, "phase=1", "trainer.max_epochs=3", "trainer.resume=true"),
        tmp_path, "new-run-dir")
    out = capsys.readouterr().out
    assert f"resuming run {r}" in out and "resuming from" in out  # into the killed run's folder
    assert not (tmp_path / "new-run-dir").exists()
    epochs = [int(row["epoch"]) for row in csv.DictReader(open(r / "phase1" / "history.csv"))]
    assert epochs == [0, 1, 2]
    state = json.loads((r / "phase1" / "state.json").read_text())
    assert state["epoch"] == 3
    iters_after = int(load_checkpoint(r / "phase1" / "checkpoints" / "last.keras",
                                    compile=True).optimizer.iterations.numpy())
    assert iters_after == iters_before + 2 * 2  # two more epochs of two steps: the optimizer continued


def test_resume_without_earlier_run_is_a_clear_error(phantom_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no earlier run"):
        run(cfg_for(phantom_root, tmp_path / "empty", "trainer.resume=true"), tmp_path / "empty", "x")


def test_heads_without_any_positive_target_are_dropped(capsys):
    import numpy as np

    from src.data.records import Record
    from src.training.engine import drop_unlearnable_heads

    healthy = Record("h.png", label="no_tumor", known={"label": True, "boxes": True, "mask": True})
    tumour = Record("t.png", label="glioma", known={"label": True, "boxes": False, "mask": False})
    cfg = {"name": "mtl_unet", "heads": ["tumor", "subtype", "recon", "mask", "mask_aux1"]}
    # a folder dataset: labels only; healthy slices have known-*empty* masks, which alone
    # would teach a segmentation head to draw nothing
    out = drop_unlearnable_heads(cfg, [healthy, tumour])
    assert out["heads"] == ["tumor", "subtype", "recon"]
    assert "head 'mask' dropped" in capsys.readouterr().out
    with_mask = Record("m.png", label="glioma", mask="m_mask.png", known={"label": True, "boxes": True, "mask": True},
                       boxes=np.array([[.1, .1, .3, .3]], np.float32), box_classes=("glioma",))
    assert drop_unlearnable_heads(cfg, [healthy, with_mask])["heads"] == cfg["heads"]
    with pytest.raises(ValueError, match="none of the heads"):
        drop_unlearnable_heads({"heads": ["boxes"]}, [healthy, tumour])
