"""`src.runs`: one set of rules for `checkpoint=` in every command, the run folder layout,
and the engine's searches of `paths.output_root`."""
import json
import os

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from src import runs
from src.config import compose

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A run folder as the engine writes it (phases 1 and 3, a tiny folder dataset in its
    config.yaml), a folder without a checkpoint, a truncated and a foreign file."""
    from src.models import create_model
    from src.models.task import MultiTaskModel

    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            p = root / "data" / split / c / f"{c}_{split}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    run = root / "out" / "train" / "2024-01-01_00-00-00"
    net = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    model = MultiTaskModel(net, {"class": "ce", "boxes": "giou"}, name="small_cnn")
    model(np.zeros((1, 32, 32, 3), np.float32))
    for phase in ("1", "3"):
        ph = runs.RunFolder(run).phase(phase)
        ph.checkpoints.mkdir(parents=True)
        model.save(ph.best)
        ph.metrics.write_text("{}")
    runs.RunFolder(run).write_info({"model": "small_cnn", "data": "folder", "classes": CLASSES})
    cfg = compose(["data=folder", f"data.root={root / 'data'}", "data.image_size=32",
                   f"paths.data_dir={root / 'cache'}", f"paths.output_root={root / 'out'}"])
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    (root / "empty").mkdir()
    good = run / "phase3" / "checkpoints" / "best.keras"
    (root / "truncated.keras").write_bytes(good.read_bytes()[:2000])
    (root / "notes.txt").write_text("not a model")
    return root, run


def _cases(root, run):
    """``(checkpoint=, the file it resolves to or None)``."""
    return [(run, run / "phase3" / "checkpoints" / "best.keras"),
            (run / "phase1", run / "phase1" / "checkpoints" / "best.keras"),
            (run / "phase1" / "checkpoints", run / "phase1" / "checkpoints" / "best.keras"),
            (run / "phase3" / "checkpoints" / "best.keras", run / "phase3" / "checkpoints" / "best.keras"),
            (root / "empty", None), (root / "notes.txt", None), (root / "missing", None)]


def _commands(root):
    """Every command that takes `checkpoint=`, with what else it needs."""
    from src import evaluate, explain, export, predict

    return {"evaluate": (evaluate.main, ["tracking=none", "progress=false", f"out={root / 'eval'}"]),
            "predict": (predict.main, [f"input={root / 'data' / 'test'}", f"output={root / 'pred'}"]),
            "explain": (explain.main, ["what=gradcam", "n=1", f"out={root / 'explain'}"]),
            "export": (export.main, [f"output={root / 'export'}"])}


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_every_command_resolves_the_same_folders_the_same_way(tree, capsys, monkeypatch):
    """The same checkpoint= gives the same file (or the same one-line error) in evaluate,
    predict, explain and export; the loader is stubbed to say what it would load."""
    root, run = tree
    monkeypatch.setenv("BTMTL_OUTPUT_ROOT", str(root / "out"))

    def would_load(path):
        raise runs.CheckpointError(f"would load {path}")

    monkeypatch.setattr("src.inference.load_model_file", would_load)
    for given, expected in _cases(root, run):
        try:
            want = f"error: would load {runs.resolve_checkpoint(given)}"
        except runs.CheckpointError as e:
            want = f"error: {e}"
        if expected is not None:
            assert want == f"error: would load {expected.resolve()}", given
            assert runs.find_run_dir(expected) == run.resolve()
        for name, (main, extra) in _commands(root).items():
            assert main([f"checkpoint={given}", *extra]) == 2, (name, given)
            assert _error_line(capsys.readouterr().err) == want, (name, given)


def test_a_folder_without_checkpoint_and_bad_files_are_one_line_each(tree, capsys, monkeypatch):
    """Real loading: a truncated .keras file and a missing checkpoint= say the same line everywhere."""
    root, _ = tree
    monkeypatch.setenv("BTMTL_OUTPUT_ROOT", str(root / "out"))
    said = {}
    for given in (root / "truncated.keras", root / "empty", None):
        for name, (main, extra) in _commands(root).items():
            args = ([f"checkpoint={given}"] if given is not None else []) + extra
            assert main(args) == 2, (name, given)
            err = capsys.readouterr().err
            assert "Traceback" not in err
            said.setdefault(str(given), set()).add(_error_line(err))
    (truncated,) = said[str(root / "truncated.keras")]   # one line, the same in all four
    assert truncated == (f"error: {(root / 'truncated.keras').resolve()} is not a Keras checkpoint: a .keras file is a "
                         "zip archive and these 2,000 bytes are not one (cut short by a kill or a full disk, or another format)")
    assert said[str(root / "empty")] == {f"error: {runs.no_checkpoint_message(root / 'empty')}"}
    assert said["None"] == {f"error: {runs.CHECKPOINT_REQUIRED}"}


def test_resolution_rules(tmp_path):
    def touch(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        return p.resolve()

    run = tmp_path / "run"
    touch(run / "phase1" / "checkpoints" / "best.keras")
    last2 = touch(run / "phase2" / "checkpoints" / "last.keras")        # interrupted phase: its last.keras
    assert runs.resolve_checkpoint(run) == last2
    best10 = touch(run / "phase10" / "checkpoints" / "best.keras")      # phase order as the engine's: 2 < 10
    assert runs.resolve_checkpoint(run) == best10
    own = touch(run / "checkpoints" / "last.keras")                      # the folder's own checkpoint wins
    assert runs.resolve_checkpoint(run) == own
    assert runs.resolve_checkpoint(run / "phase2") == last2
    with pytest.raises(runs.CheckpointError, match="is not a .keras file"):
        runs.resolve_checkpoint(touch(tmp_path / "model.h5"))
    with pytest.raises(runs.CheckpointError, match="checkpoint=PATH is required"):
        runs.resolve_checkpoint("???")
    assert runs.find_run_dir(last2) is None                               # no run_info.json / config.yaml
    runs.RunFolder(run).write_info({"classes": CLASSES})
    assert runs.find_run_dir(last2) == run.resolve()
    assert runs.find_run_dir(touch(run / "a" / "b" / "c" / "deep.keras")) is None   # deeper than the layout
    assert [p.name for p in runs.RunFolder(run).phases()] == ["1", "2", "10"]


def test_run_metadata_and_settings(tree):
    root, run = tree
    meta = runs.run_metadata(runs.resolve_checkpoint(run))
    assert meta.run_dir == run.resolve() and meta.classes == CLASSES and meta.resize == "stretch"
    assert meta.info["model"] == "small_cnn" and meta.config.data.name == "folder"
    cfg = compose(["data.root=elsewhere"], config_name="evaluate")
    s = runs.settings_from_run(cfg, ["data.image_size=48"], run)
    assert s["data"]["name"] == "folder" and s["data"]["image_size"] == 48
    assert s["data_source"].endswith("config.yaml + command-line data.* overrides")
    s = runs.settings_from_run(cfg, ["data=phantom"], run)
    assert s["data"]["name"] == "phantom" and s["data_source"] == "command line / defaults"
    assert runs.run_metadata(root / "truncated.keras").run_dir is None


def test_train_resume_searches_find_the_same_run(tree, tmp_path):
    """The engine's searches (copied into src.runs) give what resolving the run folder gives."""
    from src.training import engine

    root, run = tree
    out = root / "out"
    assert runs.find_phase_checkpoint(out, "small_cnn", "folder", "3") == run / "phase3" / "checkpoints" / "best.keras"
    assert runs.find_phase_checkpoint(out, "small_cnn", "folder", "3").resolve() == runs.resolve_checkpoint(run)
    assert runs.find_phase_checkpoint(out, "small_cnn", "folder", "2") is None
    assert runs.find_phase_checkpoint(out, "small_cnn", "folder", "3", exclude=run) is None
    assert runs.find_resume_run(out, "small_cnn", "folder", exclude=tmp_path) == run
    assert runs.find_resume_run(out, "small_cnn", "folder", exclude=run) is None
    assert runs.find_resume_run(out, "other", "folder", exclude=tmp_path) is None
    # the engine uses these very functions (one set of rules)
    assert engine.find_phase_checkpoint is runs.find_phase_checkpoint
    assert engine.find_resume_run is runs.find_resume_run
    assert os.path.samefile(runs.RunFolder(run).info_path, run / runs.RUN_INFO)
