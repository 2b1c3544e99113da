"""Training speed of ``src.train`` against a bare ``model.fit`` of the same network; start-up.

For each model, on real figshare slices at its recipe size and batch:

* ``engine``: the training engine end to end (:func:`src.training.engine.train`: the
  tf.data pipeline with augmentation, the multi-task wrapper, per-head losses and
  metrics, checkpoints and the other callbacks), two epochs of ``--steps`` steps; the
  steady rate is the median step of the second epoch (``metrics.json`` ``timing``), the
  start-up the time to the end of the first step.
* ``bare``: the same network (``create_model``) compiled by Keras with the same losses
  and loss weights (a reconstruction head learns the input image, as in the engine), plain
  Keras AdamW, no metrics, no callbacks, fed ``--steps`` batches that the same pipeline
  produced beforehand and that sit in memory; the same timing.
* optional variants of the engine (``--variants``): ``full_metrics``
  (``trainer.train_metrics=full``, every validation metric on the training batches too), or
  ``NAME=override[,override]`` (e.g. ``static=model.balancing=static``).

Writes ``benchmarks/results/overhead.json`` with the machine (CPU flags, load) and prints
a table. Not a test: numbers depend on the machine and its load; compare rows measured
in the same run.

    .venv/bin/python benchmarks/bench_overhead.py [--models small_cnn efficient_mtnet mtl_unet] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.runtime import machine_info  # noqa: E402

#: the recipes' sizes (conf/experiment/figshare_*.yaml)
RECIPES = {"small_cnn": (128, 32), "efficient_mtnet": (256, 16), "mtl_unet": (128, 32),
           "resnet101_detector": (128, 16)}


def _overrides(name: str, size: int, batch: int, steps: int, out: str, extra=()) -> list:
    over = [f"model={name}", "data=figshare", f"data.image_size={size}", f"data.batch_size={batch}", "phase=3",
            "trainer.max_epochs=2", f"trainer.steps_per_epoch={steps}", "trainer.validation_steps=2",
            "trainer.verbose=0", "trainer.precision=float32", "tracking=none", f"paths.output_root={out}",
            "trainer.early_stopping_patience=null"]
    if name == "resnet101_detector":
        over.append("model.weights=null")
    return over + list(extra)


def engine_rate(name: str, size: int, batch: int, steps: int, extra=()) -> dict:
    from src.config import compose
    from src.training.engine import train

    with tempfile.TemporaryDirectory() as out:
        final = train(compose(_overrides(name, size, batch, steps, out, extra)), Path(out) / "run")
    return final["timing"]


def bare_rate(name: str, size: int, batch: int, steps: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf
    from omegaconf import OmegaConf

    from src.config import compose
    from src.data.dataset import load_data
    from src.data.pipeline import build_dataset
    from src.heads import RECON_HEADS, target_key
    from src.losses import get_loss
    from src.models import create_model
    from src.models.task import split_model_config
    from src.training.callbacks import StepTimer

    keras.mixed_precision.set_global_policy("float32")
    cfg = compose(_overrides(name, size, batch, steps, "/tmp"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
    records = bundle.split("train")
    registry_name, kw, _ = split_model_config(model_cfg)
    net = create_model(registry_name, num_classes=bundle.class_map.num_classes, image_size=size,
                       class_names=list(bundle.class_map.classes), **kw)
    heads = [h for h in net.output if h in model_cfg["losses"]]
    data_cfg = {**OmegaConf.to_container(cfg.data, resolve=True), "seed": 0, "repeat": True}
    ds = build_dataset(records, bundle.class_map, data_cfg, training=True, heads=heads)
    batches = list(ds.take(steps).as_numpy_iterator())

    def spec(spec_):
        spec_ = dict(spec_) if isinstance(spec_, dict) else {"name": spec_}
        return get_loss(spec_.pop("name"), **spec_)

    phase_w = (model_cfg.get("phases") or {}).get("3", {}).get("loss_weights") or model_cfg.get("loss_weights") or {}
    # every head the engine trains, reconstruction included: its target is the input image
    # (leaving it out once pruned the U-Net's reconstruction decoder from the bare graph and
    # made the engine look 36 % slower than a model.fit of a smaller network)
    losses = {h: spec(model_cfg["losses"][h]) for h in heads}
    weights = {h: float(phase_w.get(h, model_cfg.get("loss_weights", {}).get(h, 1.0))) for h in losses}
    outputs = {h: net.output[h] for h in losses}
    model = keras.Model(net.input, outputs)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, global_clipnorm=1.0), loss=losses, loss_weights=weights)

    xs = np.stack([b[0] for b in batches])
    ys = {h: xs if h in RECON_HEADS else np.stack([b[1][target_key(h)] for b in batches]) for h in losses}
    ws = {h: np.ones(xs.shape[:2], "float32") if h in RECON_HEADS else np.stack([b[2][target_key(h)] for b in batches])
          for h in losses}
    mem = tf.data.Dataset.from_tensor_slices((xs, ys, ws)).repeat()
    timer = StepTimer(batch)
    model.fit(mem, steps_per_epoch=steps, epochs=1, verbose=0)           # trace + warm-up
    model.fit(mem, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    out = timer.summary()
    out["first_step_s"] = None  # the first fit above traced; not comparable
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn", "efficient_mtnet", "mtl_unet"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", nargs="*", default=[],
                    help="engine variants: full_metrics, or NAME=override[,override...] (e.g. "
                         "static=model.balancing=static no_aug=data.augment=null)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    rows = []
    for name in args.models:
        size, batch = RECIPES[name]
        row = {"model": name, "image_size": size, "batch": batch, "steps": args.steps, "load_before": os.getloadavg()}
        row["engine"] = engine_rate(name, size, batch, args.steps)
        row["bare"] = bare_rate(name, size, batch, args.steps)
        for v in args.variants:
            tag, over = ("full_metrics", "trainer.train_metrics=full") if v == "full_metrics" else v.split("=", 1)
            row[f"engine_{tag}"] = engine_rate(name, size, batch, args.steps, over.split(","))
        e, b = row["engine"]["train_img_per_s"], row["bare"]["train_img_per_s"]
        row["engine_vs_bare"] = round(e / b, 3) if e and b else None
        row["load_after"] = os.getloadavg()
        rows.append(row)
        print(json.dumps(row))
    out = {"what": "src.train steady img/s vs a bare model.fit of the same network, losses and batches (in memory)",
           "when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'model':<18}{'engine img/s':>14}{'bare img/s':>12}{'ratio':>8}{'first step s':>14}")
    for r in rows:
        print(f"{r['model']:<18}{r['engine']['train_img_per_s'] or 0:>14}{r['bare']['train_img_per_s'] or 0:>12}"
              f"{r['engine_vs_bare'] or 0:>8}{r['engine']['first_step_s'] or 0:>14}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
