"""Hydra/OmegaConf helpers shared by every entry point, notebook and test."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def worker_suffix() -> str:
    """``""`` for a single process or the chief of a multi-worker cluster (``TF_CONFIG``),
    ``_worker<k>`` for the others: their run folders never collide with the chief's."""
    import json
    import os

    try:
        conf = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        return ""
    task, cluster = conf.get("task") or {}, conf.get("cluster") or {}
    kind, index = task.get("type"), task.get("index", 0)
    if not kind or kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief")):
        return ""
    return f"_{kind}{index}"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("worker_suffix"):
        OmegaConf.register_new_resolver("worker_suffix", worker_suffix)


_register_resolvers()


def compose(overrides: Optional[Sequence[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose the project config outside a Hydra app (tests, notebooks)."""
    from hydra import compose as _compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides or []))


def to_dict(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})
