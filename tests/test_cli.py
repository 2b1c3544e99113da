"""The command-line entry points as a user runs them (subprocesses, tiny settings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_module(args, tmp_path, timeout=600, env_extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", KERAS_HOME=str(tmp_path / "keras"),
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, [f"data.root={root / 'phantom'}", "data.options.n_patients=12", "data.options.image_size=64",
                  f"paths.output_root={root / 'out'}", f"paths.data_dir={root / 'data'}"]


def test_describe_prints_json_summary_and_grid(tiny, tmp_path):
    root, common = tiny
    grid = tmp_path / "grid.png"
    p = run_module(["src.data.describe", *common, f"grid={grid}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert summary["name"] == "phantom" and summary["images"] > 0
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert summary["groups"]["count"] == 12
    assert grid.is_file() and grid.stat().st_size > 1000


def test_describe_bad_root_is_a_clear_error(tmp_path):
    p = run_module(["src.data.describe", "data=folder", f"data.root={tmp_path / 'nope'}"], tmp_path)
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_train_phase3_end_to_end_with_mlflow(tiny, tmp_path):
    """One CLI run: phase 3 from the initial weights (and it says so), checkpoints, JSON on
    stdout, an MLflow record without the secret from the environment, TensorBoard events."""
    root, common = tiny
    p = run_module(["src.train", "phase=3", *common, "data.image_size=32", "model.widths=[8,16]",
                    "trainer.max_epochs=1", "trainer.verbose=0", "tracking.tensorboard=true"], tmp_path,
                   env_extra={"ROBOFLOW_API_KEY": "sekrit-key-123"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    run_dir = Path(out["run_dir"])
    assert (run_dir / "phase3" / "checkpoints" / "best.keras").is_file()
    assert "class_acc" in out["val_metrics"]["val"]
    assert "no phase-2 checkpoint" in p.stdout
    db = root / "out" / "mlflow.db"
    assert db.is_file()
    assert b"sekrit-key-123" not in db.read_bytes()
    import mlflow
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("braintumor-mtl")
    runs = client.search_runs([exp.experiment_id])
    assert runs and any(k.startswith("phase3/") for k in runs[0].data.metrics)
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents*"))


def test_offline_imagenet_weights_fail_fast_with_both_alternatives(tiny, tmp_path):
    root, common = tiny
    p = run_module(["src.train", "model=resnet101_detector", "model.weights=imagenet", *common,
                    "data.image_size=32", "tracking=none"], tmp_path, timeout=300)
    if p.returncode == 0:
        pytest.skip("this machine reached the ImageNet weights server (online)")
    assert p.returncode == 2, p.stderr[-3000:]
    said = p.stdout + p.stderr  # Hydra's job logging prints to the console (stdout)
    assert "model.weights=null" in said and "model.weights=/path/to/" in said
    assert "Traceback" not in said


def test_unwritable_output_root_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = run_module(["src.train", f"paths.output_root={blocker / 'out'}", "trainer.max_epochs=1"], tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"error: paths.output_root={blocker / 'out'} cannot be written" in res.stderr
