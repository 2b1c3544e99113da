"""Grouped convolutions on a CPU: Keras' ``Conv2D(groups=g)`` against :class:`GroupedConv2D`.

ResNeXt50's 3 x 3 convolutions have 32 groups. TensorFlow's CPU kernels for them are so slow
that the transfer table's ResNeXt50 row finished no epoch in 24 minutes;
``src.models.layers.GroupedConv2D`` (same weights) runs them as ``g`` ordinary convolutions
on a CPU. This times one training step (forward and backward, input and weight gradients)
of a single layer at each of ResNeXt50's four stage shapes (batch 32; a 64 px input, the
CPU transfer table's size, by default), and checks the two give the same outputs.

    .venv/bin/python benchmarks/bench_grouped_conv.py     # -> benchmarks/results/grouped_conv.json

Not a test: numbers depend on the machine and its load; compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.runtime import machine_info, quiet_tensorflow  # noqa: E402

#: (feature-map side, channels) of ResNeXt50 32x4d's grouped 3 x 3 convolutions at 224 px, stages conv2..conv5
SHAPES = [(56, 128), (28, 256), (14, 512), (7, 1024)]


def step_seconds(layer_cls, side: int, channels: int, batch: int, groups: int, steps: int) -> float:
    import tensorflow as tf

    x = tf.random.stateless_normal((batch, side, side, channels), seed=(0, 1))
    layer = layer_cls(channels, 3, padding="same", groups=groups, use_bias=False)
    layer.build(x.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, *layer.trainable_weights])

    step(x)  # trace
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64, help="the network's input side (224: ImageNet size)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grouped_conv.json"))
    a = p.parse_args(argv)
    quiet_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    from src.models.layers import GroupedConv2D

    x = tf.random.stateless_normal((2, 8, 8, 64), seed=(2, 3))
    ref = keras.layers.Conv2D(64, 3, padding="same", groups=a.groups, use_bias=False)
    ours = GroupedConv2D(64, 3, padding="same", groups=a.groups, use_bias=False)
    ref.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(ref.get_weights())
    max_diff = float(np.max(np.abs(ref(x).numpy() - ours(x).numpy())))

    rows = []
    for side, ch in SHAPES:
        side = max(1, round(side * a.image_size / 224))
        native = step_seconds(keras.layers.Conv2D, side, ch, a.batch, a.groups, a.steps)
        split = step_seconds(GroupedConv2D, side, ch, a.batch, a.groups, a.steps)
        rows.append({"side": side, "channels": ch, "native_ms": round(native * 1e3, 1),
                     "grouped_conv2d_ms": round(split * 1e3, 1), "speed_up": round(native / split, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
           "protocol": f"one training step (forward + backward) of one 3x3 layer, batch {a.batch}, "
                       f"{a.groups} groups, {a.image_size} px input, mean of {a.steps} steps after a tracing step",
           "max_abs_output_difference": max_diff, "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
