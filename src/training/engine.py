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
``metrics.json`` (validation metrics of the best checkpoint per head, timing, budget) and
TensorBoard logs; the layout is :mod:`src.runs`'. ``<run_dir>/metrics.json`` holds the last
phase's metrics, ``run_info.json`` what the run was. ``trainer.resume=true`` continues the newest (or ``trainer.resume_dir``) run of the
same model and data: finished phases are skipped, the interrupted one continues from its
``last.keras`` at the saved epoch.

Validation (``val_loss``, ``best.keras``, early stopping, LR on plateau) is the ``val`` split;
of a mix, only the sources that train (``data.val_sources=trained``, the default:
:func:`src.data.mix.validation_records`; ``all`` for every source), as ``data_summary.json``
(``val_sources``) and the log say.

The run is a few small steps: :func:`start_session` (settings, runtime, data, the first
model, datasets), :func:`initial_checkpoint`, then per phase :func:`plan_phase`,
:func:`phase_model`, :func:`phase_callbacks`, ``fit``, :func:`evaluate_best` and
:func:`record_phase`. Building and compiling models is :mod:`src.training.build`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..runs import RunFolder, find_phase_checkpoint, find_resume_run
from .build import (apply_unfreeze, build_model, compile_model, drop_unlearnable_heads,  # noqa: F401 (re-exported)
                    weights_for)

log = logging.getLogger(__name__)


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
    from .callbacks import resolve_mode

    return resolve_mode(monitor)  # min for any loss (val_loss, val_loss_fixed), max for accuracy/Dice/IoU-like


@dataclass
class Session:
    """What the phases of one training run share: settings, data, datasets, tracking."""

    cfg: DictConfig
    trainer: dict
    model_cfg: dict
    data_cfg: dict
    table: dict
    phases: list
    run: RunFolder
    info: dict
    bundle: Any = None
    train_recs: list = field(default_factory=list)
    val_recs: list = field(default_factory=list)
    strategy: Any = None
    jit: bool = False
    probe: Any = None
    heads: list = field(default_factory=list)
    train_ds: Any = None
    val_ds: Any = None
    tracker: Any = None
    steps: int = 1
    val_steps: int = 1

    @property
    def names(self) -> tuple:
        return self.model_cfg["name"], self.data_cfg["name"]

    def fit_kwargs(self) -> dict:
        t = self.trainer
        return {"steps_per_epoch": self.steps if t.get("steps_per_epoch") else None,
                "validation_steps": self.val_steps if t.get("validation_steps") else None}

    def save_info(self) -> None:
        self.run.write_info(self.info)


def _resume_target(cfg, trainer: dict, run_dir: Path, names: tuple) -> Path:
    """The run folder to write to: ``run_dir``, or with ``trainer.resume`` the run to continue."""
    if not trainer.get("resume"):
        return run_dir
    output_root = Path(cfg.paths.output_root)
    target = Path(trainer["resume_dir"]) if trainer.get("resume_dir") else \
        find_resume_run(output_root, *names, exclude=run_dir)
    if target is None or not RunFolder(target).info_path.is_file():
        raise FileNotFoundError(f"trainer.resume=true but no earlier run of model={names[0]} data={names[1]} "
                                f"under {output_root} (or set trainer.resume_dir=<run dir>)")
    log.info("resuming run %s", target)
    print(f"resuming run {target}")
    return target


def start_session(cfg: DictConfig, run_dir: Path) -> Session:
    """Settings, runtime (seed, precision, strategy), data, the first model and the datasets."""
    import keras

    from ..data.dataset import load_data
    from ..data.mix import validation_records
    from ..runtime import tune_graph_optimizer
    from .precision import auto_depends_on_size, resolve_jit, set_precision
    from .strategy import describe_strategy, get_strategy

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    table = phase_table(model_cfg)
    phases = phases_to_run(cfg.phase, table)
    run = RunFolder(_resume_target(cfg, trainer, Path(run_dir), (model_cfg["name"], data_cfg["name"])))
    run.path.mkdir(parents=True, exist_ok=True)
    s = Session(cfg=cfg, trainer=trainer, model_cfg=model_cfg, data_cfg=data_cfg, table=table, phases=phases, run=run,
                info={})

    keras.utils.set_random_seed(int(cfg.seed))
    tune_graph_optimizer()  # CPU: skip grappler passes that only cost start-up time there
    precision = trainer.get("precision", "auto")
    sized = auto_depends_on_size(precision)  # decided once the network's size is known
    policy = set_precision("float32" if sized else precision)
    s.jit = resolve_jit(trainer.get("jit_compile", "auto"))
    s.strategy = get_strategy(trainer.get("strategy", "auto"))
    log.info("precision=%s jit_compile=%s strategy=%s", policy, s.jit, describe_strategy(s.strategy))

    s.bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
    # a mix validates on the sources that train (data.val_sources), the decision in data_summary.json
    s.train_recs, val_recs = s.bundle.split("train"), validation_records(s.bundle, data_cfg)
    if not s.train_recs or not val_recs:
        raise ValueError(f"need train and val splits, got {len(s.train_recs)} train / {len(val_recs)} val records")
    # a fixed shuffle of validation, so a capped trainer.validation_steps sees every class,
    # not the first few groups of the (sorted) split
    s.val_recs = [val_recs[i] for i in np.random.default_rng(int(cfg.seed)).permutation(len(val_recs))]
    run.data_summary.write_text(json.dumps(s.bundle.summary(), indent=2))
    s.info = {"model": model_cfg["name"], "data": data_cfg["name"], "phases": phases,
              "classes": list(s.bundle.class_map.classes), "image_size": data_cfg["image_size"], "precision": policy,
              "sampling": data_cfg.get("sampling", "natural"), "max_time": trainer.get("max_time"),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    s.save_info()
    OmegaConf.save(cfg, run.config_path, resolve=True)
    _first_model(s, sized)
    _datasets(s)
    return s


def _first_model(s: Session, sized: bool) -> None:
    """Drop heads the data cannot teach, build the first model; decide ``precision=auto``
    on a bf16 CPU from its size (and build again in bfloat16 when that wins)."""
    from .precision import CPU_BF16_MIN_PARAMS, set_precision

    s.model_cfg = drop_unlearnable_heads(s.model_cfg, s.train_recs)
    build = lambda: build_model(s.model_cfg, s.bundle.class_map, s.data_cfg["image_size"],  # noqa: E731
                                train_records=s.train_recs)
    with s.strategy.scope():
        s.probe = build()
    if sized:
        n_params = int(s.probe.network.count_params())
        policy = set_precision("auto", n_params)
        log.info("precision auto: %s (%s parameters; bfloat16 on this CPU from %s)", policy, f"{n_params:,}",
                 f"{CPU_BF16_MIN_PARAMS:,}")
        if policy != "float32":
            with s.strategy.scope():
                s.probe = build()
        s.info["precision"] = policy
        s.save_info()
    s.heads = list(s.probe.network.output)


def _datasets(s: Session) -> None:
    from ..data.pipeline import build_dataset

    data_cfg = {**s.data_cfg, "seed": int(s.cfg.seed)}
    batch = int(data_cfg["batch_size"])
    s.steps = _steps(len(s.train_recs), batch, s.trainer.get("steps_per_epoch"))
    s.val_steps = _steps(len(s.val_recs), batch, s.trainer.get("validation_steps"))
    # a capped epoch (steps_per_epoch) walks a repeated stream instead of running dry
    s.train_ds = build_dataset(s.train_recs, s.bundle.class_map,
                               {**data_cfg, "repeat": bool(s.trainer.get("steps_per_epoch"))},
                               training=True, heads=s.heads)
    s.val_ds = build_dataset(s.val_recs, s.bundle.class_map, data_cfg, training=False, heads=s.heads)


def initial_checkpoint(s: Session) -> Optional[Path]:
    """Where the first phase starts (``trainer.init_from``): a named checkpoint, the newest
    checkpoint of the phase before it (same model and data), or the initial weights."""
    first = s.phases[0]
    prev = previous_phase(first, s.table)
    init_from = str(s.trainer.get("init_from") or "previous")
    ckpt: Optional[Path] = None
    if init_from not in ("previous", "scratch"):
        ckpt = Path(init_from).expanduser()
        if not ckpt.is_file():
            raise FileNotFoundError(f"trainer.init_from={init_from}: no such checkpoint file")
        msg = f"phase {first}: starting from {ckpt} (trainer.init_from)"
    elif init_from == "scratch" or prev is None or str(s.cfg.phase).lower() == "all":
        msg = f"phase {first}: starting from the initial weights" + (
            " (trainer.init_from=scratch)" if init_from == "scratch" and prev else "")
    else:
        output_root = Path(s.cfg.paths.output_root)
        ckpt = find_phase_checkpoint(output_root, *s.names, prev, exclude=s.run.path)
        if ckpt is not None:
            msg = f"phase {first}: starting from the phase-{prev} checkpoint {ckpt}"
        else:
            msg = (f"phase {first}: no phase-{prev} checkpoint of model={s.names[0]} data={s.names[1]} under "
                   f"{output_root}; starting from the initial weights (run phase={prev} or phase=all first, "
                   f"or set trainer.init_from=scratch to mean it)")
            log.warning(msg)
    log.info(msg)
    if prev is not None or ckpt is not None:
        print(msg)
    s.info["initial_checkpoint"] = str(ckpt) if ckpt else None
    s.save_info()
    return ckpt


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the phases ``cfg.phase`` names; returns the last phase's ``metrics.json`` content."""
    from ..config import worker_suffix
    from ..redaction import flatten_config
    from ..tracking import Tracker
    from .budget import fmt_seconds, parse_duration, phase_budgets

    s = start_session(cfg, run_dir)
    init_ckpt = initial_checkpoint(s)
    budgets = phase_budgets(parse_duration(s.trainer.get("max_time")), s.phases, s.table,
                            int(s.trainer["max_epochs"]))
    if any(budgets.values()):
        print("time budget: " + ", ".join(f"phase {p} {fmt_seconds(b)}" for p, b in budgets.items() if b))
    # in a multi-worker cluster only the chief tracks (the others train in step with it and
    # write their own <time>_worker<k> folder)
    s.tracker = Tracker(cfg.tracking if not worker_suffix() else {"enabled": False}, s.run.path)
    model_name, data_name = s.names
    run_name = (cfg.tracking.get("run_name") if "tracking" in cfg else None) or \
        f"{model_name}-{data_name}-phase{cfg.phase}"
    all_metrics: dict = {}
    with s.tracker.start(run_name, params=flatten_config(OmegaConf.to_container(cfg, resolve=True)),
                         tags={"model": model_name, "data": data_name, "phase": str(cfg.phase)}):
        for phase in s.phases:
            ph = s.run.phase(phase)
            if ph.metrics.is_file() and s.trainer.get("resume"):
                log.info("phase %s already finished in %s: skipped", phase, ph.path)
                all_metrics[phase] = json.loads(ph.metrics.read_text())
                init_ckpt = ph.best
                continue
            all_metrics[phase] = run_phase(s, phase, init_ckpt, budgets.get(phase))
            init_ckpt = Path(all_metrics[phase]["checkpoint"])
    final = all_metrics[s.phases[-1]]
    s.run.metrics.write_text(json.dumps({"phases": all_metrics, "final": final}, indent=2))
    return final


@dataclass
class Phase:
    """One phase's plan: what it is, where it writes, how long it runs, where it resumes."""

    name: str
    cfg: dict
    folder: Any
    start: float
    epochs: int
    fit_epochs: int
    budget: Optional[float]
    lr: float
    state: Optional[dict]
    resume_from: Optional[Path]

    @property
    def initial_epoch(self) -> int:
        return int(self.state["epoch"]) if self.resume_from is not None else 0


def plan_phase(s: Session, phase: str, budget: Optional[float]) -> Phase:
    from .callbacks import load_epoch_state

    pcfg = s.table[phase]
    ph = s.run.phase(phase)
    ph.path.mkdir(parents=True, exist_ok=True)
    # a phase's own epochs, capped by trainer.max_epochs (so a CLI override always limits);
    # with a time budget the budget decides, up to trainer.max_epochs
    epochs = min(int(pcfg.get("epochs") or s.trainer["max_epochs"]), int(s.trainer["max_epochs"]))
    state = load_epoch_state(ph.state) if s.trainer.get("resume") else None
    return Phase(name=phase, cfg=pcfg, folder=ph, start=time.monotonic(), epochs=epochs,
                 fit_epochs=int(s.trainer["max_epochs"]) if budget else epochs, budget=budget,
                 lr=phase_learning_rate(s.trainer, pcfg), state=state,
                 resume_from=ph.last if state and ph.last.is_file() else None)


def run_phase(s: Session, phase: str, init_ckpt: Optional[Path], budget: Optional[float]) -> dict:
    """Train one phase (fresh, from ``init_ckpt`` or resumed) and evaluate its best checkpoint."""
    from .budget import fmt_seconds
    from .optim import uses_ema

    p = plan_phase(s, phase, budget)
    model, unfreeze = phase_model(s, p, init_ckpt)
    n_train = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    plan = (f"a {fmt_seconds(budget)} budget (epochs planned after the first, at most {p.fit_epochs})"
            if budget else f"{p.epochs} epochs")
    print(f"phase {phase}: heads {model.active_heads}, {n_train:,} trainable params, lr {p.lr:g}, {plan} x "
          f"{s.steps} steps" + (", weight EMA" if uses_ema(model.optimizer) else ""))
    cbs = phase_callbacks(s, p, model)
    if p.initial_epoch < p.fit_epochs:
        model.fit(s.train_ds, validation_data=s.val_ds, epochs=p.fit_epochs, initial_epoch=p.initial_epoch,
                  shuffle=False,  # the pipeline shuffles; Keras' flag only warns for tf.data
                  callbacks=cbs.all, verbose=int(s.trainer.get("verbose", 1)), **s.fit_kwargs())
    if cbs.divergence.diverged:
        raise TrainingDiverged(phase, cbs.divergence.diverged, p.folder.checkpoints, p.lr)
    metrics = evaluate_best(s, p, cbs.checkpoint)
    metrics.update(unfreeze=unfreeze, seconds=round(time.monotonic() - p.start, 1), timing=cbs.timing.summary())
    if cbs.budget is not None:
        metrics["budget"] = cbs.budget.summary(cbs.budget.epochs_run + p.initial_epoch)
        metrics["budget"]["elapsed_s"] = round(cbs.budget.elapsed(), 1)
    if "class" in s.heads:
        metrics["chance_accuracy"] = 1.0 / s.bundle.class_map.num_classes
    record_phase(s, p, metrics)
    return metrics


def phase_model(s: Session, p: Phase, init_ckpt: Optional[Path]):
    """The phase's model, compiled: resumed (optimizer state kept, a changed learning rate
    applied), from ``init_ckpt``, or new; loss weights, unfreezing and frozen heads set."""
    from ..models.task import load_checkpoint
    from . import metrics as _metrics  # noqa: F401  (the compiled metrics a resumed checkpoint holds)
    from .optim import make_optimizer, set_peak_learning_rate

    with s.strategy.scope():
        if p.resume_from is not None:
            model = load_checkpoint(p.resume_from, compile=True)  # with its optimizer state
            log.info("phase %s: resuming from %s at epoch %d", p.name, p.resume_from, p.state["epoch"])
            print(f"phase {p.name}: resuming from {p.resume_from} at epoch {p.state['epoch']}")
            if set_peak_learning_rate(model.optimizer, p.lr):
                print(f"phase {p.name}: learning rate changed to {p.lr:g} for the rest of the schedule")
        elif init_ckpt is not None:
            model = load_checkpoint(init_ckpt)
        else:
            model = s.probe if p.name == s.phases[0] else build_model(s.model_cfg, s.bundle.class_map,
                                                                      s.data_cfg["image_size"], s.train_recs)
        if p.cfg.get("loss_weights"):
            model.set_loss_weights(weights_for(p.cfg["loss_weights"], model.heads,
                                               s.model_cfg.get("loss_weights")) or {})
        model.train_metrics = str(s.trainer.get("train_metrics") or "light")
        if model.train_metrics not in ("full", "light", "loss"):
            raise ValueError(f"trainer.train_metrics must be full | light | loss, got {model.train_metrics!r}")
        unfreeze = apply_unfreeze(model, s.model_cfg, p.cfg.get("unfreeze"))
        model.freeze_inactive_heads()
        num_classes = s.bundle.class_map.num_classes
        if p.resume_from is None:
            compile_model(model, make_optimizer(s.trainer, p.lr, s.steps * p.epochs, steps_per_epoch=s.steps),
                          num_classes, s.jit)
            # optimizer slots created now, not inside the first traced step (which would
            # then be traced twice)
            model.optimizer.build(model.trainable_variables)
        else:
            # keep the restored optimizer (its state and step count) but refresh the
            # trainable set and metrics for this phase
            compile_model(model, model.optimizer, num_classes, s.jit)
    return model, unfreeze


@dataclass
class PhaseCallbacks:
    all: list
    divergence: Any
    timing: Any
    checkpoint: Any = None
    budget: Any = None


def phase_callbacks(s: Session, p: Phase, model) -> PhaseCallbacks:
    """The phase's callbacks in the order their ``on_epoch_end`` must run (see
    :mod:`src.training.callbacks`): divergence first, checkpoints before the state file,
    the CSV and trackers after everything that adds to the logs, the budget last."""
    import keras

    from ..runtime import process_started
    from .budget import TimeBudget, load_budget_state
    from .callbacks import (BestAndLastCheckpoint, EpochStateCheckpoint, FixedWeightValLoss, LogBalancerState,
                            LogLearningRate, StepTimer, StopOnDivergence, repair_history)
    from .optim import EMAValidation, schedule_of, uses_ema

    monitor = s.trainer.get("monitor", "val_loss")
    fixed = monitor == "val_loss" and model.balancer.mode != "static"
    if fixed:  # val_loss moves with the balancer's state: choose epochs by a sum that does not
        monitor = FixedWeightValLoss.key
        log.info("phase %s: %s balancing weights val_loss by its running state; the best epoch is chosen by %s "
                 "(the heads' validation losses with the phase's fixed weights)", p.name, model.balancer.mode,
                 monitor)
    ph, resumed = p.folder, p.resume_from is not None
    out = PhaseCallbacks(all=[], divergence=StopOnDivergence(),
                         timing=StepTimer(int(s.data_cfg["batch_size"]),
                                          since=process_started() if p.name == s.phases[0] else p.start),
                         checkpoint=BestAndLastCheckpoint(
                             ph.checkpoints, monitor=monitor, mode=_monitor_mode(monitor),
                             initial_best=p.state.get("best") if resumed else None,
                             initial_best_logs=p.state.get("best_logs") if resumed else None,
                             initial_best_balancer=p.state.get("best_balancer") if resumed else None))
    out.all = [
        out.divergence,
        out.timing,
        *([EMAValidation()] if uses_ema(model.optimizer) else []),
        *([FixedWeightValLoss(), LogBalancerState()] if model.balancer.mode != "static" else []),
        LogLearningRate(),
        out.checkpoint,
        EpochStateCheckpoint(ph.state, phase=p.name, checkpoint=out.checkpoint),
        keras.callbacks.CSVLogger(str(ph.history), append=resumed and repair_history(ph.history, p.state) > 0),
        *s.tracker.keras_callbacks(prefix=f"phase{p.name}/"),
    ]
    patience = s.trainer.get("early_stopping_patience")
    if patience and p.budget:
        print(f"phase {p.name}: early stopping is off under a time budget (the schedule runs to its planned end; "
              f"the best epoch is still kept by {monitor})")
    elif patience:
        out.all.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=_monitor_mode(monitor),
                                                     patience=int(patience)))
    if s.trainer.get("schedule") == "plateau":
        out.all.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=_monitor_mode(monitor), factor=0.3,
                                                         patience=2))
    if p.budget:
        spent = float(load_budget_state(ph.budget).get("elapsed_s") or 0.0) if resumed else 0.0
        out.budget = TimeBudget(p.budget, s.steps, p.fit_epochs, schedule=schedule_of(model.optimizer),
                                start=p.start, spent=spent, state_path=ph.budget, say=print)
        out.all.append(out.budget)  # last: its epoch time includes the checkpoints
    return out


def evaluate_best(s: Session, p: Phase, checkpoint=None) -> dict:
    """The validation metrics of the phase's best checkpoint (``last.keras`` if none):
    those its epoch was validated with (recorded by the checkpoint callback, also across
    a resume), else from evaluating it again."""
    from ..models.task import load_checkpoint

    best_path = p.folder.best if p.folder.best.is_file() else p.folder.last
    if checkpoint is not None and checkpoint.best_logs and p.folder.best.is_file():
        return {"phase": p.name, "checkpoint": str(best_path), "val": dict(checkpoint.best_logs),
                "balancer": checkpoint.best_balancer, "best_epoch": checkpoint.best_epoch}
    best = load_checkpoint(best_path)
    best.set_loss_weights(weights_for(p.cfg.get("loss_weights"), best.heads, s.model_cfg.get("loss_weights")) or {})
    compile_model(best, None, s.bundle.class_map.num_classes, s.jit)
    res = best.evaluate(s.val_ds, return_dict=True, verbose=0, steps=s.fit_kwargs()["validation_steps"])
    return {"phase": p.name, "checkpoint": str(best_path), "val": {k: float(v) for k, v in res.items()},
            "balancer": best.balancer.state()}


def record_phase(s: Session, p: Phase, metrics: dict) -> None:
    """``metrics.json``, learning curves and the tracker's copies of the phase's files."""
    from .plots import plot_history

    ph, tag = p.folder, f"phase{p.name}"
    ph.metrics.write_text(json.dumps(metrics, indent=2))
    s.tracker.log_metrics({f"{tag}/best_val_{k}": v for k, v in metrics["val"].items()})
    s.tracker.log_artifact(ph.metrics, artifact_path=tag)
    s.tracker.log_artifact(ph.history, artifact_path=tag)
    model_name, data_name = s.names
    curves = plot_history(ph.history, ph.path / "learning_curves.png",
                          title=f"{model_name} on {data_name}, phase {p.name}")
    if curves is not None:
        s.tracker.log_artifact(curves, artifact_path=tag)
    s.tracker.log_artifact(Path(metrics["checkpoint"]), artifact_path=f"{tag}/checkpoints")
    print(f"phase {p.name}: validation " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["val"].items()))
