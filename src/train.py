"""`python -m src.train [phase=3] [data=...] [model=...] [trainer.max_epochs=...]`

Trains the configured model on the configured data, phase by phase (see
:mod:`src.training.engine`), and writes under the Hydra run directory, per phase,
``phase<N>/checkpoints/best.keras`` and ``last.keras``, ``metrics.json``, ``history.csv``
and TensorBoard logs, plus an MLflow run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # noqa: F401  (registers the ${project_root:} resolver)
from .data.records import DataError

log = logging.getLogger("src.train")


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    from .training.engine import train

    return train(cfg, Path(run_dir))


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .runtime import quiet_tensorflow

    quiet_tensorflow()  # no CUDA-probe noise on a CPU-only machine
    run_dir = HydraConfig.get().runtime.output_dir
    log.info("run dir: %s", run_dir)
    from .models.weights import WeightsMismatchError, WeightsUnavailableError
    from .training.callbacks import CheckpointWriteError

    try:
        metrics = run(cfg, run_dir)
    except (DataError, WeightsUnavailableError, WeightsMismatchError, FileNotFoundError, ValueError,
            CheckpointWriteError, PermissionError) as e:
        # a clear one-paragraph error instead of a stack trace (BTMTL_DEBUG=1 shows it)
        log.debug("traceback", exc_info=True)
        log.error("%s: %s", type(e).__name__, e)
        if os.environ.get("BTMTL_DEBUG"):
            raise
        sys.exit(2)
    print(json.dumps({"run_dir": str(run_dir), "val_metrics": metrics}, indent=2))


def check_output_root(argv) -> None:
    """Stop with one line when ``paths.output_root=`` names a folder that cannot be made or
    written (Hydra would otherwise fail with a stack trace while creating the run folder)."""
    import tempfile

    for arg in argv:
        if arg.startswith(("paths.output_root=", "++paths.output_root=", "+paths.output_root=")):
            root = Path(arg.split("=", 1)[1]).expanduser()
            try:
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=root):
                    pass
            except OSError as e:
                print(f"error: paths.output_root={root} cannot be written ({e.strerror or e}); "
                      f"choose a folder you can write to", file=sys.stderr)
                sys.exit(2)


if __name__ == "__main__":
    OmegaConf.register_new_resolver("project_root", lambda: str(_config.PROJECT_ROOT), replace=True)
    check_output_root(sys.argv[1:])
    main()
