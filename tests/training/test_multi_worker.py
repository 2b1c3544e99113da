"""Two real worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy, TF_CONFIG) train a tiny
run to the end; the chief writes the run folder, the other worker its own ``_worker1``
folder; the chief's weights equal a one-process run with the same global batch split
over two replicas (MirroredStrategy on two logical CPUs: the same per-replica batches, so
the same BatchNorm statistics)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _overrides(phantom, out, strategy):
    return ["data=phantom", f"data.root={phantom}", "data.options.n_patients=16", "data.options.image_size=64",
            "data.image_size=32", "data.batch_size=8", "model=small_cnn", "model.widths=[8,16]", "phase=3",
            "trainer.max_epochs=1", "trainer.steps_per_epoch=3", "trainer.validation_steps=1", "trainer.verbose=0",
            "trainer.precision=float32", "tracking=mlflow", f"paths.output_root={out}", f"trainer.strategy={strategy}"]


def test_two_workers_train_to_the_end_like_one_process(tmp_path):
    phantom, out, ref = tmp_path / "phantom", tmp_path / "out", tmp_path / "ref"
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    # the reference first (it also generates the phantom data both workers then read)
    ref_script = textwrap.dedent(f"""
        import sys
        from src.training.strategy import configure_logical_cpus
        configure_logical_cpus(2)
        from pathlib import Path
        from src.config import compose
        from src.training.engine import train
        train(compose({_overrides(phantom, ref, 'mirrored')!r}), Path({str(ref / 'run')!r}))
    """)
    done = subprocess.run([sys.executable, "-c", ref_script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ports = _free_ports(2)
    workers = []
    for i in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "src.train", *_overrides(phantom, out, "multi_worker")], cwd=ROOT,
            env={**env, "TF_CONFIG": json.dumps(tf_config)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, results):
        assert w.returncode == 0, err[-3000:]

    runs = sorted(p.parent for p in out.rglob("run_info.json"))
    chief = [r for r in runs if not r.name.endswith("_worker1")]
    other = [r for r in runs if r.name.endswith("_worker1")]
    assert len(chief) == 1 and len(other) == 1 and chief[0].parent == other[0].parent
    assert (chief[0] / "metrics.json").is_file() and (chief[0] / "phase3" / "checkpoints" / "best.keras").is_file()
    # only the chief tracks: one MLflow run
    import sqlite3

    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1

    from src.models.task import load_checkpoint

    a = load_checkpoint(chief[0] / "phase3" / "checkpoints" / "last.keras")
    b = load_checkpoint(ref / "run" / "phase3" / "checkpoints" / "last.keras")
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-5, atol=1e-6, err_msg=va.path)
    w1 = load_checkpoint(other[0] / "phase3" / "checkpoints" / "last.keras")
    for va, vw in zip(a.trainable_weights, w1.trainable_weights):   # BatchNorm statistics stay per worker
        np.testing.assert_allclose(va.numpy(), vw.numpy(), rtol=1e-6, atol=1e-7, err_msg=va.path)
