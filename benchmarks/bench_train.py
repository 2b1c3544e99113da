"""Training throughput (images/s) per model and precision; writes benchmarks/results/train.json.

Synthetic in-memory batches (the input pipeline is measured by bench_pipeline.py), the
library's MultiTaskModel with each model's configured losses, a few warm-up steps, then
timed steps. Not a test: numbers depend on the machine; compare like with like.

    .venv/bin/python benchmarks/bench_train.py [--models small_cnn resnet101_detector] \
        [--precisions float32 mixed_bfloat16] [--steps 5] [--batch 8] [--size 128] \
        [--set preset=published] [--tag published]

``--set k=v`` overrides a ``model.`` key (e.g. the U-Net's ``preset=published``);
``--tag`` names such a variant in the results (entries are keyed by model, tag, precision).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"small_cnn": 128, "resnet101_detector": 224, "classifier": 224, "detector": 224, "mtl_unet": 128,
         "efficient_mtnet": 256}


def bench(name: str, precision: str, steps: int, batch: int, size: int, overrides=(), tag: str = "") -> dict:
    import numpy as np
    import keras
    import tensorflow as tf

    from src.config import compose
    from src.data.records import ClassMap
    from src.training.engine import build_model
    from src.training.precision import resolve_jit

    keras.mixed_precision.set_global_policy(precision)
    from src.config import CONFIG_DIR

    group = name if (CONFIG_DIR / "model" / f"{name}.yaml").is_file() else "small_cnn"
    cfg = compose([f"model={group}", *(f"model.{o}" for o in overrides)])
    from omegaconf import OmegaConf
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["weights"] = None
    cm = ClassMap()
    model = build_model(model_cfg, cm, size)
    heads = list(model.network.output)
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y, w = {}, {}
    if "class" in heads:
        y["class"], w["class"] = rng.integers(0, 4, batch).astype("int32"), np.ones(batch, "float32")
    if "boxes" in heads:
        lo = rng.uniform(0, .5, (batch, 4, 2)).astype("float32")
        y["boxes"], w["boxes"] = np.concatenate([lo, lo + .3], -1), np.ones((batch, 4), "float32")
    if "tumor" in heads:
        y["tumor"], w["tumor"] = rng.integers(0, 2, batch).astype("float32"), np.ones(batch, "float32")
    if "subtype" in heads:
        y["subtype"], w["subtype"] = rng.integers(0, 3, batch).astype("int32"), np.ones(batch, "float32")
    if any(h == "mask" or h.startswith("mask_aux") for h in heads):
        m = np.zeros((batch, size, size, 1), "float32")
        m[:, size // 4: size // 2, size // 3: size // 2] = 1.0
        y["mask"], w["mask"] = m, np.ones(batch, "float32")
    ds = tf.data.Dataset.from_tensors((x, y, w)).repeat()
    model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=resolve_jit("auto"))
    model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)  # warm-up / trace
    t = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    dt = time.perf_counter() - t
    keras.mixed_precision.set_global_policy("float32")
    return {"model": name, "tag": tag, "overrides": list(overrides), "precision": precision, "image_size": size,
            "batch": batch, "steps": steps,
            "img_per_s": round(steps * batch / dt, 2), "params": int(model.count_params())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn", "resnet101_detector"])
    ap.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="image size (default: per model)")
    ap.add_argument("--set", nargs="*", default=[], help="model config overrides, e.g. preset=published")
    ap.add_argument("--tag", default="", help="name of this variant in the results")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = ap.parse_args()
    out_path = Path(args.out)
    # merge with earlier entries (same model + precision are replaced), writing after each
    results = json.loads(out_path.read_text()).get("results", []) if out_path.is_file() else []
    for m in args.models:
        for p in args.precisions:
            r = bench(m, p, args.steps, args.batch, args.size or SIZES.get(m, 224), args.set, args.tag)
            print(json.dumps(r))
            results = [e for e in results
                       if (e["model"], e.get("tag", ""), e["precision"]) != (m, args.tag, p)] + [r]
            _write(out_path, results)
    print(f"wrote {out_path}")


def _write(out_path: Path, results: list) -> None:
    from src.runtime import machine_info

    out = {"machine": machine_info(),
           "when": time.strftime("%Y-%m-%d %H:%M"), "results": results}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
