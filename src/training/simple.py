"""A plain Keras training run: data -> pipeline -> model -> fit -> checkpoints + metrics.

This is the end-to-end path of the foundation; the phased multi-task engine
(``src/training/engine``) builds on the same pieces.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _box_l1(y_true, y_pred):
    """Mean absolute corner error per slot: [B, C, 4] -> [B, C] (weighted per slot)."""
    from keras import ops

    return ops.mean(ops.abs(ops.cast(y_true, "float32") - ops.cast(y_pred, "float32")), axis=-1)


def train_simple(cfg: DictConfig, run_dir: Path) -> dict:
    import keras

    from ..data.dataset import load_data
    from ..data.pipeline import build_dataset
    from ..models import create_model
    from .precision import resolve_jit, set_precision

    run_dir = Path(run_dir)
    keras.utils.set_random_seed(int(cfg.seed))
    set_precision(cfg.trainer.precision)
    bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
    (run_dir / "data_summary.json").write_text(json.dumps(bundle.summary(), indent=2))
    train_recs, val_recs = bundle.split("train"), bundle.split("val")
    if not val_recs:
        raise ValueError("no validation split: set data.split.val_fraction > 0")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    heads = tuple(model_cfg.get("heads", ("class",)))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if data_cfg.get("preprocessing", "auto") == "auto":
        data_cfg["preprocessing"] = model_cfg.get("preprocessing", "none")
    data_cfg["seed"] = int(cfg.seed)
    train_ds = build_dataset(train_recs, bundle.class_map, data_cfg, training=True, heads=heads)
    val_ds = build_dataset(val_recs, bundle.class_map, data_cfg, training=False, heads=heads)

    model = create_model(model_cfg.pop("name"), num_classes=bundle.class_map.num_classes,
                         image_size=data_cfg["image_size"], **model_cfg)
    losses, metrics = {}, {}
    if "class" in heads:
        losses["class"] = keras.losses.SparseCategoricalCrossentropy()
        metrics["class"] = [keras.metrics.SparseCategoricalAccuracy(name="acc")]
    if "boxes" in heads:
        losses["boxes"] = _box_l1
    weights = {k: float(v) for k, v in (model_cfg.get("loss_weights") or {}).items() if k in losses}
    t = cfg.trainer
    steps = int(t.steps_per_epoch) if t.steps_per_epoch else None
    n_steps = (steps or max(1, int(np.ceil(len(train_recs) / int(data_cfg["batch_size"]))))) * int(t.max_epochs)
    lr = keras.optimizers.schedules.CosineDecay(float(t.learning_rate), n_steps) if t.schedule == "cosine" else float(t.learning_rate)
    opt_cls = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}[t.optimizer]
    opt_kw = {"learning_rate": lr}
    if t.clip_norm:
        opt_kw["global_clipnorm"] = float(t.clip_norm)
    if t.optimizer in ("adamw", "sgd") and t.weight_decay:
        opt_kw["weight_decay"] = float(t.weight_decay)
    model.compile(optimizer=opt_cls(**opt_kw), loss=losses, loss_weights=weights or None,
                  metrics=metrics, jit_compile=resolve_jit(t.jit_compile))

    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(ckpt / "best.keras"), monitor=t.monitor, save_best_only=True),
        keras.callbacks.ModelCheckpoint(str(ckpt / "last.keras")),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
    ]
    if t.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=t.monitor, patience=int(t.early_stopping_patience),
                                                       restore_best_weights=True))
    model.fit(train_ds, validation_data=val_ds, epochs=int(t.max_epochs), steps_per_epoch=steps,
              validation_steps=int(t.validation_steps) if t.validation_steps else None,
              callbacks=callbacks, verbose=int(t.verbose))
    results = model.evaluate(val_ds, return_dict=True, verbose=0)
    out = {k: float(v) for k, v in results.items()}
    if "class" in heads:
        out["chance_accuracy"] = float(1.0 / bundle.class_map.num_classes)
    (run_dir / "metrics.json").write_text(json.dumps({"val": out}, indent=2))
    return out
