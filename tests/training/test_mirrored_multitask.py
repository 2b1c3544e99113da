"""MultiTaskModel under MirroredStrategy on two logical CPUs == one device, same batch.

Runs in a subprocess: logical CPU devices must be configured before TensorFlow starts.
The network has no BatchNormalization (whose per-replica batch statistics legitimately
differ); weights are spread evenly over the replicas, where the per-replica masked means
and the global masked mean coincide.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r'''
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from src.training.strategy import configure_logical_cpus, get_strategy
    configure_logical_cpus(2)
    import numpy as np, tensorflow as tf, keras
    from keras import layers
    from src.models.heads import box_head, class_head
    from src.models.task import MultiTaskModel

    def network():
        keras.utils.set_random_seed(3)
        inp = keras.Input((8, 8, 3))
        h = layers.Conv2D(4, 3, activation="relu")(inp)
        h = layers.GlobalAveragePooling2D()(h)
        return keras.Model(inp, {"class": class_head(h, 3), "boxes": box_head(h, 3, hidden=8)})

    rng = np.random.default_rng(0)
    x = rng.random((8, 8, 8, 3), dtype=np.float32)
    lo = rng.uniform(0, .4, (8, 3, 2)).astype("float32")
    y = {"class": rng.integers(0, 3, 8).astype("int32"), "boxes": np.concatenate([lo, lo + .3], -1)}
    # even weights per replica half (rows 0-3 and 4-7): 2 known labels, 4 known box slots each
    wc = np.array([1, 0, 1, 0, 1, 0, 1, 0], "float32")
    wb = np.zeros((8, 3), "float32"); wb[[0, 1, 4, 5], 0] = 1; wb[[2, 3, 6, 7], 1] = 1
    w = {"class": wc, "boxes": wb}
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    out = {}
    for name in ("default", "mirrored"):
        strategy = get_strategy(name)
        with strategy.scope():
            m = MultiTaskModel(network(), {"class": "ce", "boxes": "giou"}, balancing="ema", ema_beta=0.9)
            m.compile(optimizer=keras.optimizers.SGD(0.1))
        ev = m.evaluate(ds, return_dict=True, verbose=0)
        h = m.fit(ds, epochs=1, verbose=0).history
        out[name] = {"eval": ev, "train_loss": h["loss"][0], "class_loss": h["class_loss"][0],
                     "boxes_loss": h["boxes_loss"][0],
                     "ema": keras.ops.convert_to_numpy(m.balancer.ema).tolist(),
                     "kernel": float(np.abs(m.network.layers[1].kernel.numpy()).sum()),
                     "replicas": int(strategy.num_replicas_in_sync)}
    print("RESULT" + json.dumps(out))
''')


def test_mirrored_multitask_matches_single_device():
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(line[0][len("RESULT"):])
    one, two = res["default"], res["mirrored"]
    assert two["replicas"] == 2 and one["replicas"] == 1
    for k in ("loss", "class_loss", "boxes_loss"):
        assert abs(one["eval"][k] - two["eval"][k]) < 1e-5, (k, one["eval"], two["eval"])
    for k in ("train_loss", "class_loss", "boxes_loss"):
        assert abs(one[k] - two[k]) < 1e-5, (k, one, two)
    # the EMA sees unscaled per-head losses on both (not 1/R of them under mirrored)
    assert max(abs(a - b) for a, b in zip(one["ema"], two["ema"])) < 1e-5, (one["ema"], two["ema"])
    # and one SGD step moves the weights the same way
    assert abs(one["kernel"] - two["kernel"]) < 1e-4
