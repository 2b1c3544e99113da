"""The training run folder: its layout, its ``run_info.json``, and resolving ``checkpoint=``.

One module owns the folder the training engine writes, so every command reads it the same
way::

    <run>/
      run_info.json        what the run was (model, data, classes, image size, precision, phases)
      config.yaml          the resolved Hydra config of the run
      data_summary.json    the dataset summary (splits, classes, duplicates)
      metrics.json         {"phases": {<phase>: metrics}, "final": metrics of the last phase}
      phase<N>/
        checkpoints/best.keras, last.keras
        state.json  history.csv  metrics.json  budget.json

**Resolving** ``checkpoint=PATH`` (:func:`resolve_checkpoint`; the same rules for
``src.evaluate``, ``src.predict``, ``src.explain`` and ``src.export``):

1. a file: it must be a ``.keras`` file, and is used as it is;
2. a folder: the first that exists of ``checkpoints/best.keras``, ``best.keras``,
   ``checkpoints/last.keras``, ``last.keras`` (a phase folder or a ``checkpoints``
   folder), else the last phase that holds one (phase order as the engine runs them,
   :func:`phase_order`), its ``checkpoints/best.keras`` or else its ``last.keras``
   (a training run folder);
3. anything else stops with one line (:class:`CheckpointError`): the path is missing,
   not a ``.keras`` file, or a folder without a checkpoint (:func:`no_checkpoint_message`).

The checkpoint's **run folder** (:func:`find_run_dir`) is the nearest of the three folders
above the checkpoint file (``checkpoints/``, ``phase<N>/``, ``<run>/``) that holds
``run_info.json`` or ``config.yaml``; a checkpoint outside a run has none.

:func:`find_phase_checkpoint` and :func:`find_resume_run` search ``paths.output_root`` for
the runs of a model on a dataset (the engine's phase chaining and ``trainer.resume``).

Nothing here imports TensorFlow or anything above it in the package.
"""
from __future__ import annotations

import json
import re
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

RUN_INFO = "run_info.json"
CONFIG = "config.yaml"
DATA_SUMMARY = "data_summary.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
BEST = "best.keras"
LAST = "last.keras"
STATE = "state.json"
HISTORY = "history.csv"
BUDGET = "budget.json"
PHASE_PREFIX = "phase"
#: files whose presence makes a folder a training run folder
RUN_MARKERS = (RUN_INFO, CONFIG)
#: how far above a checkpoint file its run folder may be (<run>/phase<N>/checkpoints/best.keras)
RUN_DEPTH = 3

WHAT_CHECKPOINT = "a training run folder, a phase folder, its checkpoints folder or a .keras file"
CHECKPOINT_REQUIRED = f"checkpoint=PATH is required: {WHAT_CHECKPOINT}"


class CheckpointError(ValueError):
    """``checkpoint=`` names nothing usable: the one-line message says what and why."""


# ---------------------------------------------------------------------------------------
# the layout
# ---------------------------------------------------------------------------------------
def phase_order(name: str) -> tuple:
    """Sort key of phase names, the order the engine runs them in (``phase=all``):
    shorter names first, so ``"2" < "10"``."""
    return len(str(name)), str(name)


def _in_folder(*parts: str) -> property:
    """A path of the layout under the folder's ``path``."""
    return property(lambda self: self.path.joinpath(*parts), doc="``" + "/".join(parts) + "``")


@dataclass(frozen=True)
class PhaseFolder:
    """``<run>/phase<name>/`` and the files the engine writes in it."""

    path: Path
    checkpoints = _in_folder(CHECKPOINTS)
    best = _in_folder(CHECKPOINTS, BEST)
    last = _in_folder(CHECKPOINTS, LAST)
    state = _in_folder(STATE)
    history = _in_folder(HISTORY)
    metrics = _in_folder(METRICS)
    budget = _in_folder(BUDGET)

    @property
    def name(self) -> str:
        return self.path.name[len(PHASE_PREFIX):]

    def checkpoint(self) -> Optional[Path]:
        """``best.keras``, else ``last.keras`` (an interrupted phase), else None."""
        return next((p for p in (self.best, self.last) if p.is_file()), None)


@dataclass(frozen=True)
class RunFolder:
    """A training run folder (see the module docstring for its layout)."""

    path: Path
    info_path = _in_folder(RUN_INFO)
    config_path = _in_folder(CONFIG)
    data_summary = _in_folder(DATA_SUMMARY)
    metrics = _in_folder(METRICS)

    def is_run(self) -> bool:
        return any((self.path / m).is_file() for m in RUN_MARKERS)

    def phase(self, name) -> PhaseFolder:
        return PhaseFolder(self.path / f"{PHASE_PREFIX}{name}")

    def phases(self) -> list[PhaseFolder]:
        """The ``phase<N>`` folders there are, in the engine's phase order."""
        found = [PhaseFolder(d) for d in self.path.glob(f"{PHASE_PREFIX}*") if d.is_dir()]
        return sorted(found, key=lambda p: phase_order(p.name))

    def read_info(self) -> dict:
        """``run_info.json`` ({} when missing; unreadable: {} with a warning)."""
        return read_json(self.info_path)

    def write_info(self, info: dict) -> Path:
        self.info_path.write_text(json.dumps(info, indent=2))
        return self.info_path

    def load_config(self):
        """The run's ``config.yaml`` as an OmegaConf config (None when missing or unreadable)."""
        if not self.config_path.is_file():
            return None
        from omegaconf import OmegaConf

        try:
            return OmegaConf.load(self.config_path)
        except Exception as e:  # noqa: BLE001 - a broken config only loses metadata
            log.warning("%s unreadable (%s)", self.config_path, e)
            return None


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s unreadable (%s)", path, e)
        return {}


# ---------------------------------------------------------------------------------------
# checkpoint= of every command
# ---------------------------------------------------------------------------------------
def no_checkpoint_message(folder) -> str:
    """The one line for a folder that holds no checkpoint (every command says this)."""
    return (f"no checkpoint in {folder}: looked for checkpoints/{{best,last}}.keras, {{best,last}}.keras and "
            f"phase<N>/checkpoints/{{best,last}}.keras; pass {WHAT_CHECKPOINT}")


def checkpoint_in(folder: Path) -> Optional[Path]:
    """The checkpoint a folder stands for (rule 2 of the module docstring), or None."""
    folder = Path(folder)
    own = PhaseFolder(folder)
    for cand in (own.best, folder / BEST, own.last, folder / LAST):
        if cand.is_file():
            return cand
    for phase in reversed(RunFolder(folder).phases()):
        ckpt = phase.checkpoint()
        if ckpt is not None:
            return ckpt
    return None


def resolve_checkpoint(path) -> Path:
    """The ``.keras`` file that ``checkpoint=path`` means (absolute), by the rules of the
    module docstring; :class:`CheckpointError` otherwise."""
    if path is None or str(path) in ("", "???"):
        raise CheckpointError(CHECKPOINT_REQUIRED)
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist (pass {WHAT_CHECKPOINT})")
    if p.is_file():
        if p.suffix != ".keras":
            raise CheckpointError(f"checkpoint {p} is not a .keras file (pass {WHAT_CHECKPOINT})")
        return p.resolve()
    found = checkpoint_in(p)
    if found is None:
        raise CheckpointError(no_checkpoint_message(p))
    return found.resolve()


def find_run_dir(checkpoint) -> Optional[Path]:
    """The run folder of a checkpoint file (see the module docstring), or None."""
    for d in list(Path(checkpoint).resolve().parents)[:RUN_DEPTH]:
        if RunFolder(d).is_run():
            return d
    return None


@dataclass
class RunMeta:
    """What a later command needs to know about the run a checkpoint came from."""

    checkpoint: Optional[Path] = None
    run_dir: Optional[Path] = None
    classes: Optional[list] = None       # run_info.json's classes, else the config's data.classes
    resize: str = "stretch"              # the config's data.resize
    threshold: Optional[float] = None    # the config's model.threshold
    config: Optional[object] = None      # the run's OmegaConf config, when found
    info: dict = field(default_factory=dict)


def run_metadata(checkpoint) -> RunMeta:
    """Class names, resize mode, threshold, ``run_info.json`` and config of the run a
    checkpoint file belongs to (defaults when it belongs to none)."""
    meta = RunMeta(checkpoint=Path(checkpoint), run_dir=find_run_dir(checkpoint))
    if meta.run_dir is None:
        return meta
    run = RunFolder(meta.run_dir)
    meta.info = run.read_info()
    meta.config = run.load_config()
    data = meta.config.get("data") if meta.config is not None else None
    classes = meta.info.get("classes")
    if not classes and data is not None and data.get("classes"):
        classes = list(data.get("classes"))
    meta.classes = list(classes) if classes else None
    if data is not None and data.get("resize"):
        meta.resize = str(data.get("resize"))
    model = meta.config.get("model") if meta.config is not None else None
    if model is not None and model.get("threshold") is not None:
        meta.threshold = float(model.get("threshold"))
    return meta


# ---------------------------------------------------------------------------------------
# a later command's settings from the run's own config
# ---------------------------------------------------------------------------------------
def group_overrides(args, group: str) -> list[str]:
    """``group.key=value`` overrides among the command-line ``args``, without the prefix."""
    out = []
    for a in args:
        a = a.lstrip("+")
        if a.startswith(group + "."):
            out.append(a[len(group) + 1:])
    return out


def group_chosen(args, group: str) -> bool:
    """Whether the command line picks the config group itself (``data=folder``)."""
    return any(a.lstrip("+").startswith(group + "=") for a in args)


def settings_from_run(cfg, args, run_dir: Optional[Path]) -> dict:
    """The data, cache dir, tracking and model settings of a command that reads a run:
    the run's own ``config.yaml`` (``data``, ``paths.cache_dir``, an enabled ``tracking``,
    ``model``) unless the command line picks another (``data=...``, ``tracking=...``);
    ``data.*`` overrides apply on top of the run's data. Returns plain dicts and where
    each came from (``data_source``, ``tracking_source``)."""
    from omegaconf import OmegaConf

    run_cfg = RunFolder(run_dir).load_config() if run_dir is not None else None
    to = lambda c: OmegaConf.to_container(c, resolve=True)  # noqa: E731
    if run_cfg is not None and "data" in run_cfg and not group_chosen(args, "data"):
        data = OmegaConf.merge(run_cfg.data, OmegaConf.from_dotlist(group_overrides(args, "data")))
        data_src = str(Path(run_dir) / CONFIG)
        if group_overrides(args, "data"):
            data_src += " + command-line data.* overrides"
        paths = run_cfg.get("paths") if not any(a.lstrip("+").startswith("paths") for a in args) else None
        cache_dir = (paths or {}).get("cache_dir") or cfg.paths.cache_dir
    else:
        data, data_src, cache_dir = cfg.data, "command line / defaults", cfg.paths.cache_dir
    tracking = cfg.tracking
    tracking_src = "command line / defaults"
    explicit = group_chosen(args, "tracking") or bool(group_overrides(args, "tracking"))
    if run_cfg is not None and "tracking" in run_cfg and not explicit and run_cfg.tracking.get("enabled"):
        tracking, tracking_src = run_cfg.tracking, str(Path(run_dir) / CONFIG)
    model = to(run_cfg.model) if run_cfg is not None and "model" in run_cfg else {}
    return {"data": to(data), "data_source": data_src, "cache_dir": str(cache_dir), "tracking": to(tracking),
            "tracking_source": tracking_src, "model": model}


# ---------------------------------------------------------------------------------------
# searching paths.output_root (the engine's phase chaining and trainer.resume)
# ---------------------------------------------------------------------------------------
def same_role(run: Path) -> bool:
    """A run folder of this process' role: the chief / a single process never picks up a
    multi-worker cluster's ``<time>_worker<k>`` folders, and worker ``k`` only its own."""
    from .config import worker_suffix

    suffix = worker_suffix()
    return run.name.endswith(suffix) if suffix else not re.search(r"_(worker|ps|evaluator)\d+$", run.name)


def runs_of(output_root, model_name: str, data_name: str, exclude=None) -> Iterator[tuple[RunFolder, Path]]:
    """``(run, its run_info.json)`` of every run under ``output_root`` of ``model_name`` on
    ``data_name`` (unreadable ``run_info.json`` files skipped), except ``exclude``."""
    skip = Path(exclude).resolve() if exclude is not None else None
    for info_path in Path(output_root).rglob(RUN_INFO):
        if skip is not None and info_path.parent.resolve() == skip or not same_role(info_path.parent):
            continue
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("model") == model_name and info.get("data") == data_name:
            yield RunFolder(info_path.parent), info_path


def find_phase_checkpoint(output_root: Path, model_name: str, data_name: str, phase: str,
                          exclude: Optional[Path] = None) -> Optional[Path]:
    """Newest ``best.keras`` of a finished ``phase`` (its ``metrics.json`` written) under
    ``output_root`` for the same model and data."""
    best, best_t = None, -1.0
    for run, _ in runs_of(output_root, model_name, data_name, exclude):
        ph = run.phase(phase)
        if ph.best.is_file() and ph.metrics.is_file() and ph.best.stat().st_mtime > best_t:
            best, best_t = ph.best, ph.best.stat().st_mtime
    return best


def find_resume_run(output_root: Path, model_name: str, data_name: str, exclude: Path) -> Optional[Path]:
    """The run of the same model and data under ``output_root`` whose ``run_info.json`` is
    newest (the run ``trainer.resume=true`` continues)."""
    runs = [(info_path.stat().st_mtime, run.path) for run, info_path in runs_of(output_root, model_name, data_name,
                                                                                 exclude)]
    return max(runs)[1] if runs else None
