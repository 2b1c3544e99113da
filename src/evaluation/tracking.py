"""An evaluation report folder into MLflow: the training run's record when there is one.

:func:`log_to_mlflow` logs the folder (artifacts under ``eval_<split>/``) and its headline
numbers (metrics ``eval_<split>/...``) to the MLflow run the training engine tagged with
the run folder (``run_dir``); without one it creates a run tagged with the same
``run_dir``. ``tracking.enabled: false`` skips it with a message, before MLflow is imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional


def find_mlflow_run(tracker, run_dir: Path) -> Optional[str]:
    """Id of the newest top-level MLflow run tagged ``run_dir`` = this run folder."""
    return tracker.find_run({"run_dir": str(Path(run_dir).resolve())})


def log_to_mlflow(tracking_cfg: Mapping, run_dir: Optional[Path], out_dir: Path, split: str, scalars: Mapping,
                  tags: Mapping) -> Optional[dict]:
    """Log the report folder to the run's MLflow record (or a new linked run); None when off."""
    if not (tracking_cfg or {}).get("enabled"):  # before importing MLflow (seconds)
        print("tracking is off (tracking=none): the report is not logged to MLflow")
        return None
    from ..tracking import Tracker

    tracker = Tracker(tracking_cfg, run_dir or out_dir)
    existing = find_mlflow_run(tracker, run_dir) if run_dir is not None else None
    name = f"eval-{tags.get('model', 'model')}-{tags.get('data', 'data')}-{split}"
    with tracker.start(name, run_id=existing, tags=tags):
        rid = tracker.run_id
        if rid is None:
            return None
        tracker.log_artifacts(out_dir, artifact_path=f"eval_{split}")
        tracker.log_metrics(dict(scalars), prefix=f"eval_{split}/")
    if tracker.failed:
        return None
    how = "logged to the training run" if existing else "logged to a new MLflow run linked by the run_dir tag"
    print(f"MLflow: {how} {rid} ({tracker.experiment_name})")
    return {"run_id": rid, "existing": bool(existing), "experiment": tracker.experiment_name}
