"""A real SIGKILL in the middle of an epoch, then ``trainer.resume=true``: the phase finishes
its planned epochs with one history row per epoch, losing at most the epoch in flight."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigkill_mid_epoch_then_resume_finishes_with_a_continuous_history(tmp_path):
    out, phantom = tmp_path / "out", tmp_path / "phantom"
    args = [sys.executable, "-m", "src.train", "data=phantom", f"data.root={phantom}", "data.options.n_patients=16",
            "data.options.image_size=64", "data.image_size=32", "data.batch_size=8", "model=small_cnn",
            "model.widths=[8,16]", "phase=1", "trainer.max_epochs=4", "trainer.steps_per_epoch=25",
            "trainer.validation_steps=1", "trainer.verbose=0", "trainer.precision=float32", "tracking=none",
            f"paths.output_root={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, done = time.monotonic() + 300, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            states = list(out.rglob("phase1/state.json"))
            if states:
                try:
                    done = json.loads(states[0].read_text())["epoch"]
                except (ValueError, KeyError):
                    done = 0
                if done >= 1:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
        time.sleep(0.4)                                  # into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    run_dir = next(out.rglob("run_info.json")).parent
    killed_at = json.loads((run_dir / "phase1" / "state.json").read_text())["epoch"]
    assert 1 <= killed_at < 4 and not (run_dir / "phase1" / "metrics.json").exists()

    resumed = subprocess.run(args + ["trainer.resume=true"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'phase1' / 'checkpoints' / 'last.keras'} at epoch {killed_at}" in resumed.stdout
    rows = list(csv.DictReader((run_dir / "phase1" / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(4))  # small_cnn phase 1: 4 epochs
    assert json.loads((run_dir / "phase1" / "state.json").read_text())["epoch"] == 4
    assert (run_dir / "phase1" / "metrics.json").is_file()
