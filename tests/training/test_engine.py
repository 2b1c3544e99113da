"""The training engine end to end on tiny phantom data: phases, chaining, resume."""
import csv
import json
from pathlib import Path

import numpy as np
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


def test_init_from_scratch_or_a_named_checkpoint(phantom_root, tmp_path, capsys):
    _, r1 = run(cfg_for(phantom_root, tmp_path, "phase=1"), tmp_path, "p1")
    # a phase-1 checkpoint exists, but the run asks for the initial weights
    _, r2 = run(cfg_for(phantom_root, tmp_path, "phase=2", "trainer.init_from=scratch"), tmp_path, "p2")
    assert json.loads((r2 / "run_info.json").read_text())["initial_checkpoint"] is None
    assert "trainer.init_from=scratch" in capsys.readouterr().out
    ck = r1 / "phase1" / "checkpoints" / "best.keras"
    _, r3 = run(cfg_for(phantom_root, tmp_path, "phase=3", f"trainer.init_from={ck}"), tmp_path, "p3")
    assert json.loads((r3 / "run_info.json").read_text())["initial_checkpoint"] == str(ck)
    with pytest.raises(FileNotFoundError, match="trainer.init_from"):
        run(cfg_for(phantom_root, tmp_path, "phase=3", f"trainer.init_from={tmp_path / 'nope.keras'}"), tmp_path, "p4")


def test_divergence_stops_with_a_clear_message_and_keeps_the_good_checkpoints(phantom_root, tmp_path):
    import re

    from src.training.engine import TrainingDiverged

    # a first good epoch
    _, r = run(cfg_for(phantom_root, tmp_path, "phase=1", "trainer.max_epochs=1"), tmp_path, "good")
    (r / "phase1" / "metrics.json").unlink()  # the phase is not finished: resume continues it
    # an absurd learning rate from the next epoch on
    with pytest.raises(TrainingDiverged) as err:
        run(cfg_for(phantom_root, tmp_path, "phase=1", "trainer.max_epochs=8", "trainer.resume=true",
                    f"trainer.resume_dir={r}", "trainer.learning_rate=1e12", "trainer.clip_norm=null"), tmp_path, "x")
    msg = str(err.value)
    m = re.search(r"phase 1 diverged at epoch (\d+)(, step \d+: the loss of .+|: NaN or infinity in the weights of .+)",
                  msg)
    assert m and "boxes" in m.group(2) and "trainer.resume=true" in msg, msg
    bad = int(m.group(1))
    assert bad >= 2
    # nothing of the diverged epoch was written: state and last.keras hold the epoch before
    assert json.loads((r / "phase1" / "state.json").read_text())["epoch"] == bad - 1
    last = load_checkpoint(r / "phase1" / "checkpoints" / "last.keras")
    assert all(np.all(np.isfinite(w)) for w in last.get_weights())
    # resumed with a sane rate it finishes, with one history row per epoch
    run(cfg_for(phantom_root, tmp_path, "phase=1", f"trainer.max_epochs={bad + 1}", "trainer.resume=true",
                f"trainer.resume_dir={r}", "trainer.learning_rate=1e-3"), tmp_path, "y")
    rows = list(csv.DictReader((r / "phase1" / "history.csv").open()))
    epochs = [int(row["epoch"]) for row in rows]
    assert epochs[-1] == bad and sorted(set(epochs)) == list(range(bad + 1))
    assert np.isfinite(float(rows[-1]["loss"]))


def test_final_metrics_are_what_evaluating_best_keras_gives(phantom_root, tmp_path):
    """The phase's metrics.json takes the best epoch's validation logs instead of evaluating
    best.keras again: they must be the same numbers."""
    import dataclasses

    from src.runs import RunFolder
    from src.training.engine import evaluate_best, plan_phase, start_session

    cfg = cfg_for(phantom_root, tmp_path, "phase=3", "trainer.max_epochs=2")
    final, r = run(cfg, tmp_path, "run")
    assert final["best_epoch"] in (1, 2)
    s = start_session(cfg, tmp_path / "again")                # same data, same validation order
    p = dataclasses.replace(plan_phase(s, "3", None), folder=RunFolder(r).phase("3"))
    again = evaluate_best(s, p)                               # no recorded logs: load and evaluate
    assert set(again["val"]) == set(final["val"])
    for k, v in final["val"].items():
        assert v == pytest.approx(again["val"][k], rel=1e-4, abs=1e-5), k


def test_resume_from_a_truncated_checkpoint_is_one_clear_error(phantom_root, tmp_path):
    from src.models.task import CheckpointLoadError

    _, r = run(cfg_for(phantom_root, tmp_path, "phase=1", "trainer.max_epochs=1"), tmp_path, "cut")
    (r / "phase1" / "metrics.json").unlink()
    last = r / "phase1" / "checkpoints" / "last.keras"
    last.write_bytes(last.read_bytes()[:3000])              # what a full disk leaves
    with pytest.raises(CheckpointLoadError, match=f"{last} is not a Keras checkpoint"):
        run(cfg_for(phantom_root, tmp_path, "phase=1", "trainer.max_epochs=2", "trainer.resume=true",
                    f"trainer.resume_dir={r}"), tmp_path, "again")
