"""The training engine: phases, checkpoints, resume, tracking.

``train(cfg, run_dir)`` runs the phases that ``cfg.phase`` names (``1``, ``2``, ``3`` or
``all``) from the model config's ``phases`` table. Each phase sets which heads learn
(loss weights), what of the backbone is trainable, the learning rate and the epochs, and
starts from the previous phase's best checkpoint. A single later phase (``phase=3``)
starts from the newest checkpoint of the phase before it under ``paths.output_root`` for
the same model and data, and says which; without one it starts from the initial weights
with a warning.

Per phase, under ``<run_dir>/phase<N>/``: ``checkpoints/best.keras`` and ``last.keras``
(optimizer state included), ``state.json`` (completed epochs, best value), ``history.csv``,
``metrics.json`` (validation metrics of the best checkpoint per head) and TensorBoard logs.
``<run_dir>/metrics.json`` holds the last phase's metrics, ``run_info.json`` what the run
was. ``trainer.resume=true`` continues the newest (or ``trainer.resume_dir``) run of the
same model and data: finished phases are skipped, the interrupted one continues from its
``last.keras`` at the saved epoch.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..data.records import NO_TUMOR

log = logging.getLogger(__name__)

from ..runs import RUN_INFO, find_phase_checkpoint, find_resume_run  # noqa: F401  (re-exported)


class TrainingDiverged(ValueError):
    """A loss became NaN or infinite: the phase stopped, the last good checkpoints stay."""

    def __init__(self, phase: str, info: dict, ckdir: Path, lr: float):
        self.phase, self.info = phase, info
        kept = [p.name for p in (ckdir / "best.keras", ckdir / "last.keras") if p.is_file()]
        heads = ", ".join(info["heads"])
        where = f"epoch {info['epoch']}, step {info['step']}" if info.get("step") else f"epoch {info['epoch']}"
        what = f"the loss of {heads} became NaN or infinite" if info.get("step") else f"NaN or infinity in the {heads}"
        msg = f"phase {phase} diverged at {where}: {what} (learning rate {lr:g}). "
        if kept:
            msg += (f"Kept {' and '.join(kept)} of the last good epoch in {ckdir}; continue from it with a lower rate: "
                    f"python -m src.train <same overrides> trainer.resume=true trainer.learning_rate={lr / 10:g}")
        else:
            msg += f"Nothing was saved (it diverged in the first epoch): start again with trainer.learning_rate={lr / 10:g}"
        super().__init__(msg)


# ---------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------
def phase_table(model_cfg: dict) -> dict:
    phases = model_cfg.get("phases") or {"1": {}}
    return {str(k): dict(v or {}) for k, v in phases.items()}


def phases_to_run(phase, table: dict) -> list:
    names = sorted(table, key=lambda s: (len(s), s))
    if str(phase).lower() == "all":
        return names
    if str(phase) not in table:
        raise ValueError(f"phase={phase!r} is not defined for this model; phases: {names} or 'all'")
    return [str(phase)]


def previous_phase(phase: str, table: dict) -> Optional[str]:
    names = sorted(table, key=lambda s: (len(s), s))
    i = names.index(phase)
    return names[i - 1] if i > 0 else None


# ---------------------------------------------------------------------------------------
# model building
# ---------------------------------------------------------------------------------------
def multi_hot_matrix(records, class_map):
    """[N, C] multi-hot labels of ``records`` ({label} + box classes) and a [N] known mask."""
    mh = np.zeros((len(records), class_map.num_classes), np.float32)
    known = np.zeros(len(records), bool)
    for i, r in enumerate(records):
        if not r.known.get("label"):
            continue
        for name in {r.label, *r.box_classes}:
            j = class_map.index(name)
            if j >= 0:
                mh[i, j] = 1.0
        known[i] = True
    return mh, known


#: which ``Record.known`` flag makes a head's target known ("always": the input image)
_KNOWN_FLAG = {"class": "label", "multilabel": "label", "tumor": "label", "subtype": "label",
               "boxes": "boxes", "mask": "mask", "recon": "always", "reconstruction": "always"}


def tumour_values(records) -> set:
    """The tumour-vs-healthy answers the records know (``{True}``, ``{False}``, both, none)."""
    out = set()
    for r in records:
        if r.known.get("label") and r.label is not None:
            out.add(r.label != NO_TUMOR)
        elif r.known.get("boxes") and len(r.boxes):
            out.add(True)
    return out


def drop_unlearnable_heads(model_cfg: dict, train_records) -> dict:
    """Remove from ``model_cfg["heads"]`` the heads whose target no training record has.

    E.g. a segmentation head on a dataset without tumour masks would only ever see
    unknown or known-empty (healthy) masks: it is dropped with a warning instead of
    learning to predict nothing. A tumour-vs-healthy head on data with one answer only
    (figshare has no healthy slices) is dropped too.
    """
    from .multitask import target_key

    heads = model_cfg.get("heads")
    if not heads:
        return model_cfg
    def positive(r, flag):  # a known target that is not only "nothing here"
        if flag == "mask":
            return bool(r.known.get("mask") and (r.mask or r.polygons))
        if flag == "boxes":
            return bool(r.known.get("boxes") and len(r.boxes))
        return bool(r.known.get(flag))

    keep = []
    for h in heads:
        flag = _KNOWN_FLAG.get(target_key(h), "always")
        if flag != "always" and not any(positive(r, flag) for r in train_records):
            why = f"no training record has a known {flag} target"
        elif target_key(h) == "tumor" and len(tumour_values(train_records)) == 1:
            # one answer for every slice (figshare: all tumours) teaches nothing, and under
            # EMA balancing its vanishing loss would be scaled up without end
            only = "a tumour" if tumour_values(train_records) == {True} else "no tumour"
            why = f"every training slice has {only}: nothing to tell apart"
        else:
            keep.append(h)
            continue
        log.warning("head %r dropped: %s", h, why)
        print(f"warning: head {h!r} dropped: {why}")
    if not keep:
        raise ValueError(f"none of the heads {list(heads)} has a known target in the training data")
    return {**model_cfg, "heads": keep}


def weights_for(weights, heads, defaults: Optional[dict] = None) -> Optional[dict]:
    """Loss weights restricted to the model's heads (a config may name heads it dropped).

    An auxiliary head (``<head>_aux<k>``) that ``weights`` does not name follows its head:
    its default weight (``defaults``) while the head learns, 0 when the head is off.
    """
    from .multitask import is_aux_head, target_key

    if not weights:
        return None
    out = {h: float(w) for h, w in dict(weights).items() if h in heads}
    for h in heads:
        base = target_key(h)
        if is_aux_head(h) and h not in out and base in out:
            out[h] = float((defaults or {}).get(h, 1.0)) if out[base] != 0.0 else 0.0
    return out


def metric_heads(model) -> list:
    """Heads that get compiled metrics: the active ones, plus loss-less outputs that
    have a dataset target of their own (e.g. the U-Net's composed 4-class ``class``)."""
    from .multitask import RECON_HEADS, is_aux_head

    outs = model.output_names_of(model.network)
    extra = [h for h in outs if h not in model.heads and not is_aux_head(h) and h not in RECON_HEADS]
    return list(model.active_heads) + extra


def compile_model(model, optimizer, num_classes: int, jit) -> None:
    """Compile with the per-head metrics as *weighted* metrics: Keras' plain ``metrics=``
    ignore sample weights, so unknown targets (unlabelled images, empty box slots, unknown
    masks) would count as zeros."""
    from .metrics import head_metrics

    kw = {"optimizer": optimizer} if optimizer is not None else {}
    model.compile(weighted_metrics=head_metrics(metric_heads(model), num_classes), jit_compile=jit, **kw)


def build_model(model_cfg: dict, class_map, image_size, train_records=None):
    """Network from the registry wrapped in a :class:`MultiTaskModel` with its losses."""
    from ..losses import class_weights_from_labels
    from ..models import create_model
    from .multitask import MultiTaskModel

    cfg = dict(model_cfg)
    name = cfg.pop("name")
    losses = dict(cfg.pop("losses", None) or {})
    for key in ("phases", "balancing", "ema_beta", "loss_weights", "preprocessing", "class_weighting"):
        cfg.pop(key, None)
    network = create_model(name, num_classes=class_map.num_classes, image_size=image_size,
                           class_names=list(class_map.classes), **cfg)
    outputs = list(network.output)
    head_losses = {}
    for head in outputs:
        spec = losses.get(head)
        if spec is None:
            continue
        spec = dict(spec) if isinstance(spec, dict) else {"name": spec}
        if spec.get("name") == "weighted_bce" and spec.get("pos_weights") is None and train_records is not None:
            mh, known = multi_hot_matrix(train_records, class_map)
            pos, neg = class_weights_from_labels(mh, mode=model_cfg.get("class_weighting", "balanced"), mask=known)
            spec.update(pos_weights=pos, neg_weights=neg)
            log.info("weighted BCE from %d training labels: pos=%s neg=%s", int(known.sum()),
                     np.round(pos, 3).tolist(), np.round(neg, 3).tolist())
        head_losses[head] = spec
    if not head_losses:
        raise ValueError(f"model {name!r}: no losses configured for its outputs {outputs}")
    return MultiTaskModel(network, head_losses, loss_weights=weights_for(model_cfg.get("loss_weights"), head_losses),
                          balancing=model_cfg.get("balancing", "static"),
                          ema_beta=float(model_cfg.get("ema_beta", 0.99)),
                          name=f"{name}")


def backbone_of(model, model_cfg: dict):
    """The :class:`Backbone` view of a model's nested backbone, or None."""
    from ..models.backbones import Backbone

    try:
        sub = model.network.get_layer("backbone")
    except ValueError:
        return None
    name = model_cfg.get("backbone")
    if not name:
        return None
    return Backbone(name, sub, input_shape=tuple(sub.input.shape[1:]))


def apply_unfreeze(model, model_cfg: dict, spec) -> Optional[dict]:
    from .unfreeze import set_trainable

    if not spec:
        return None
    bb = backbone_of(model, model_cfg)
    if bb is None:
        log.info("unfreeze: model has no backbone; every layer trains")
        return None
    summary = set_trainable(bb, OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec))
    log.info("unfreeze %s: %d/%d backbone layers trainable, %s trainable params (first: %s)", dict(spec),
             summary["trainable_layers"], summary["total_layers"], f"{summary['trainable_params']:,}",
             summary.get("first_trainable_layer"))
    return summary


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def phase_learning_rate(trainer: dict, pcfg: dict) -> float:
    """``trainer.learning_rate`` when set (a command-line override wins), else the phase's
    own ``learning_rate``, else 1e-3."""
    if trainer.get("learning_rate") is not None:
        return float(trainer["learning_rate"])
    return float(pcfg.get("learning_rate") or 1e-3)


def _steps(n_records: int, batch_size: int, cap) -> int:
    n = max(1, int(np.ceil(n_records / batch_size)))
    return min(n, int(cap)) if cap else n


def _monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


def train(cfg: DictConfig, run_dir: Path) -> dict:
    import keras

    from ..data.dataset import load_data
    from ..data.pipeline import build_dataset
    from ..runtime import process_started, tune_graph_optimizer
    from ..tracking import Tracker, flatten_config
    from .budget import TimeBudget, fmt_seconds, load_budget_state, parse_duration, phase_budgets
    from .callbacks import (BestAndLastCheckpoint, EpochStateCheckpoint, LogBalancerState, LogLearningRate,
                            StepTimer, StopOnDivergence, load_epoch_state, repair_history)
    from .multitask import load_checkpoint
    from .optim import EMAValidation, make_optimizer, schedule_of, set_peak_learning_rate, uses_ema
    from .plots import plot_history
    from .precision import CPU_BF16_MIN_PARAMS, auto_depends_on_size, resolve_jit, set_precision
    from .strategy import describe_strategy, get_strategy

    run_dir = Path(run_dir)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    output_root = Path(cfg.paths.output_root)
    model_name, data_name = model_cfg["name"], data_cfg["name"]
    table = phase_table(model_cfg)
    phases = phases_to_run(cfg.phase, table)

    if trainer.get("resume"):
        target = Path(trainer["resume_dir"]) if trainer.get("resume_dir") else \
            find_resume_run(output_root, model_name, data_name, exclude=run_dir)
        if target is None or not (target / RUN_INFO).is_file():
            raise FileNotFoundError(f"trainer.resume=true but no earlier run of model={model_name} data={data_name} "
                                    f"under {output_root} (or set trainer.resume_dir=<run dir>)")
        log.info("resuming run %s", target)
        print(f"resuming run {target}")
        run_dir = target
    run_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(int(cfg.seed))
    tune_graph_optimizer()  # CPU: skip grappler passes that only cost start-up time there
    precision = trainer.get("precision", "auto")
    sized = auto_depends_on_size(precision)  # decided once the network's size is known (below)
    policy = set_precision("float32" if sized else precision)
    jit = resolve_jit(trainer.get("jit_compile", "auto"))
    strategy = get_strategy(trainer.get("strategy", "auto"))
    log.info("precision=%s jit_compile=%s strategy=%s", policy, jit, describe_strategy(strategy))

    bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
    train_recs, val_recs = bundle.split("train"), bundle.split("val")
    # a fixed shuffle of validation, so a capped trainer.validation_steps sees every class,
    # not the first few groups of the (sorted) split
    val_recs = [val_recs[i] for i in np.random.default_rng(int(cfg.seed)).permutation(len(val_recs))]
    if not train_recs or not val_recs:
        raise ValueError(f"need train and val splits, got {len(train_recs)} train / {len(val_recs)} val records")
    (run_dir / "data_summary.json").write_text(json.dumps(bundle.summary(), indent=2))
    info = {"model": model_name, "data": data_name, "phases": phases, "classes": list(bundle.class_map.classes),
            "image_size": data_cfg["image_size"], "precision": policy, "sampling": data_cfg.get("sampling", "natural"),
            "max_time": trainer.get("max_time"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    # the model decides its own preprocessing (inside the network): the pipeline yields [0, 1]
    data_cfg["preprocessing"] = "none" if data_cfg.get("preprocessing", "auto") == "auto" else data_cfg["preprocessing"]
    data_cfg["seed"] = int(cfg.seed)
    batch = int(data_cfg["batch_size"])
    steps = _steps(len(train_recs), batch, trainer.get("steps_per_epoch"))
    val_steps = _steps(len(val_recs), batch, trainer.get("validation_steps"))

    if train_recs:
        model_cfg = drop_unlearnable_heads(model_cfg, train_recs)
    with strategy.scope():
        probe = build_model(model_cfg, bundle.class_map, data_cfg["image_size"], train_records=train_recs)
    if sized:
        n_params = int(probe.network.count_params())
        policy = set_precision("auto", n_params)
        msg = (f"precision auto: {policy} ({n_params:,} parameters; bfloat16 on this CPU from "
               f"{CPU_BF16_MIN_PARAMS:,})")
        log.info(msg)
        if policy != "float32":
            with strategy.scope():
                probe = build_model(model_cfg, bundle.class_map, data_cfg["image_size"], train_records=train_recs)
        info["precision"] = policy
        (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    heads = list(probe.network.output)
    # a capped epoch (steps_per_epoch) walks a repeated stream instead of running dry
    train_ds = build_dataset(train_recs, bundle.class_map, {**data_cfg, "repeat": bool(trainer.get("steps_per_epoch"))},
                             training=True, heads=heads)
    val_ds = build_dataset(val_recs, bundle.class_map, data_cfg, training=False, heads=heads)
    monitor = trainer.get("monitor", "val_loss")

    from ..config import worker_suffix

    # in a multi-worker cluster only the chief tracks (the others train in step with it and
    # write their own <time>_worker<k> folder)
    tracker = Tracker(cfg.tracking if not worker_suffix() else {"enabled": False}, run_dir)
    run_name = (cfg.tracking.get("run_name") if "tracking" in cfg else None) or f"{model_name}-{data_name}-phase{cfg.phase}"
    all_metrics: dict = {}
    init_ckpt: Optional[Path] = None
    first = phases[0]
    prev = previous_phase(first, table)
    init_from = str(trainer.get("init_from") or "previous")
    if init_from not in ("previous", "scratch"):
        init_ckpt = Path(init_from).expanduser()
        if not init_ckpt.is_file():
            raise FileNotFoundError(f"trainer.init_from={init_from}: no such checkpoint file")
        msg = f"phase {first}: starting from {init_ckpt} (trainer.init_from)"
    elif init_from == "scratch" or prev is None or str(cfg.phase).lower() == "all":
        msg = f"phase {first}: starting from the initial weights" + (" (trainer.init_from=scratch)"
                                                                    if init_from == "scratch" and prev else "")
    else:
        init_ckpt = find_phase_checkpoint(output_root, model_name, data_name, prev, exclude=run_dir)
        if init_ckpt is not None:
            msg = f"phase {first}: starting from the phase-{prev} checkpoint {init_ckpt}"
        else:
            msg = (f"phase {first}: no phase-{prev} checkpoint of model={model_name} data={data_name} under "
                   f"{output_root}; starting from the initial weights (run phase={prev} or phase=all first, "
                   f"or set trainer.init_from=scratch to mean it)")
            log.warning(msg)
    log.info(msg)
    if prev is not None or init_ckpt is not None:
        print(msg)
    info["initial_checkpoint"] = str(init_ckpt) if init_ckpt else None
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))

    budgets = phase_budgets(parse_duration(trainer.get("max_time")), phases, table, int(trainer["max_epochs"]))
    if any(budgets.values()):
        print("time budget: " + ", ".join(f"phase {p} {fmt_seconds(b)}" for p, b in budgets.items() if b))

    with tracker.start(run_name, params=flatten_config(OmegaConf.to_container(cfg, resolve=True)),
                       tags={"model": model_name, "data": data_name, "phase": str(cfg.phase)}):
        for phase in phases:
            phase_start = time.monotonic()
            pcfg = table[phase]
            pdir = run_dir / f"phase{phase}"
            ckdir = pdir / "checkpoints"
            if (pdir / "metrics.json").is_file() and trainer.get("resume"):
                log.info("phase %s already finished in %s: skipped", phase, pdir)
                all_metrics[phase] = json.loads((pdir / "metrics.json").read_text())
                init_ckpt = ckdir / "best.keras"
                continue
            pdir.mkdir(parents=True, exist_ok=True)
            # a phase's own epochs, capped by trainer.max_epochs (so a CLI override always limits);
            # with a time budget the budget decides, up to trainer.max_epochs
            budget = budgets.get(phase)
            epochs = min(int(pcfg.get("epochs") or trainer["max_epochs"]), int(trainer["max_epochs"]))
            fit_epochs = int(trainer["max_epochs"]) if budget else epochs
            lr = phase_learning_rate(trainer, pcfg)
            state = load_epoch_state(pdir / "state.json") if trainer.get("resume") else None
            resume_from = ckdir / "last.keras" if state and (ckdir / "last.keras").is_file() else None
            with strategy.scope():
                if resume_from is not None:
                    model = load_checkpoint(resume_from)
                    log.info("phase %s: resuming from %s at epoch %d", phase, resume_from, state["epoch"])
                    print(f"phase {phase}: resuming from {resume_from} at epoch {state['epoch']}")
                    if set_peak_learning_rate(model.optimizer, lr):
                        print(f"phase {phase}: learning rate changed to {lr:g} for the rest of the schedule")
                elif init_ckpt is not None:
                    model = load_checkpoint(init_ckpt)
                else:
                    model = probe if phase == first else build_model(model_cfg, bundle.class_map,
                                                                     data_cfg["image_size"], train_recs)
                if pcfg.get("loss_weights"):
                    model.set_loss_weights(weights_for(pcfg["loss_weights"], model.heads,
                                                       model_cfg.get("loss_weights")) or {})
                model.train_metrics = str(trainer.get("train_metrics") or "light")
                if model.train_metrics not in ("full", "light", "loss"):
                    raise ValueError(f"trainer.train_metrics must be full | light | loss, got {model.train_metrics!r}")
                unfreeze = apply_unfreeze(model, model_cfg, pcfg.get("unfreeze"))
                model.freeze_inactive_heads()
                active = model.active_heads
                if resume_from is None:
                    compile_model(model, make_optimizer(trainer, lr, steps * epochs, steps_per_epoch=steps),
                                  bundle.class_map.num_classes, jit)
                    # optimizer slots created now, not inside the first traced step (which
                    # would then be traced twice)
                    model.optimizer.build(model.trainable_variables)
                else:
                    # keep the restored optimizer (its state and step count) but refresh the
                    # trainable set and metrics for this phase
                    compile_model(model, model.optimizer, bundle.class_map.num_classes, jit)
            n_train = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
            plan = (f"a {fmt_seconds(budget)} budget (epochs planned after the first, at most {fit_epochs})"
                    if budget else f"{epochs} epochs")
            print(f"phase {phase}: heads {active}, {n_train:,} trainable params, lr {lr:g}, {plan} x {steps} steps"
                  + (", weight EMA" if uses_ema(model.optimizer) else ""))
            initial_epoch = int(state["epoch"]) if resume_from is not None else 0
            timing = StepTimer(batch, since=process_started() if phase == first else phase_start)
            divergence = StopOnDivergence()
            callbacks = [
                divergence,
                timing,
                *([EMAValidation()] if uses_ema(model.optimizer) else []),
                *([LogBalancerState()] if model.balancer.mode != "static" else []),
                LogLearningRate(),
                BestAndLastCheckpoint(ckdir, monitor=monitor, mode=_monitor_mode(monitor),
                                      initial_best=state.get("best") if resume_from is not None else None),
                EpochStateCheckpoint(pdir / "state.json", monitor=monitor, phase=phase),
                keras.callbacks.CSVLogger(str(pdir / "history.csv"), append=resume_from is not None and
                                          repair_history(pdir / "history.csv", state) > 0),
                *tracker.keras_callbacks(prefix=f"phase{phase}/"),
            ]
            if trainer.get("early_stopping_patience") and budget:
                print(f"phase {phase}: early stopping is off under a time budget (the schedule runs to its planned "
                      f"end; the best epoch is still kept by {monitor})")
            elif trainer.get("early_stopping_patience"):
                callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=_monitor_mode(monitor),
                                                               patience=int(trainer["early_stopping_patience"])))
            if trainer.get("schedule") == "plateau":
                callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=_monitor_mode(monitor),
                                                                   factor=0.3, patience=2))
            timer = None
            if budget:
                spent = float(load_budget_state(pdir / "budget.json").get("elapsed_s") or 0.0) \
                    if resume_from is not None else 0.0
                timer = TimeBudget(budget, steps, fit_epochs, schedule=schedule_of(model.optimizer),
                                   start=phase_start, spent=spent, state_path=pdir / "budget.json", say=print)
                callbacks.append(timer)  # last: its epoch time includes the checkpoints
            if initial_epoch < fit_epochs:
                model.fit(train_ds, validation_data=val_ds, epochs=fit_epochs, initial_epoch=initial_epoch,
                          shuffle=False,  # the pipeline shuffles; Keras' flag only warns for tf.data
                          steps_per_epoch=steps if trainer.get("steps_per_epoch") else None,
                          validation_steps=val_steps if trainer.get("validation_steps") else None,
                          callbacks=callbacks, verbose=int(trainer.get("verbose", 1)))
            if divergence.diverged:
                raise TrainingDiverged(phase, divergence.diverged, ckdir, lr)
            best_path = ckdir / "best.keras" if (ckdir / "best.keras").is_file() else ckdir / "last.keras"
            best = load_checkpoint(best_path)
            best.set_loss_weights(weights_for(pcfg.get("loss_weights"), best.heads, model_cfg.get("loss_weights")) or {})
            compile_model(best, None, bundle.class_map.num_classes, jit)
            res = best.evaluate(val_ds, return_dict=True, verbose=0,
                                steps=val_steps if trainer.get("validation_steps") else None)
            metrics = {"phase": phase, "checkpoint": str(best_path), "val": {k: float(v) for k, v in res.items()},
                       "unfreeze": unfreeze, "balancer": best.balancer.state(),
                       "seconds": round(time.monotonic() - phase_start, 1), "timing": timing.summary()}
            if timer is not None:
                metrics["budget"] = timer.summary(timer.epochs_run + initial_epoch)
                metrics["budget"]["elapsed_s"] = round(timer.elapsed(), 1)
            if "class" in heads:
                metrics["chance_accuracy"] = 1.0 / bundle.class_map.num_classes
            (pdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            tracker.log_metrics({f"phase{phase}/best_val_{k}": v for k, v in metrics["val"].items()})
            tracker.log_artifact(pdir / "metrics.json", artifact_path=f"phase{phase}")
            tracker.log_artifact(pdir / "history.csv", artifact_path=f"phase{phase}")
            curves = plot_history(pdir / "history.csv", pdir / "learning_curves.png",
                                  title=f"{model_name} on {data_name}, phase {phase}")
            if curves is not None:
                tracker.log_artifact(curves, artifact_path=f"phase{phase}")
            tracker.log_artifact(best_path, artifact_path=f"phase{phase}/checkpoints")
            all_metrics[phase] = metrics
            init_ckpt = best_path
            print(f"phase {phase}: validation " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["val"].items()))
    final = all_metrics[phases[-1]]
    (run_dir / "metrics.json").write_text(json.dumps({"phases": all_metrics, "final": final}, indent=2))
    return final
