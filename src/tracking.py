"""Experiment tracking: a small MLflow wrapper (+ TensorBoard) that never kills training.

Usage (the training engine)::

    tracker = Tracker(cfg.tracking, run_dir)
    with tracker.start(run_name, params=cfg, tags={"phase": "all"}):        # parent run
        with tracker.start_child("phase3", params={"phase": 3}):             # nested run
            model.fit(..., callbacks=[*make_callbacks(...), *tracker.keras_callbacks("phase3/")])
            tracker.log_metrics({"test_acc": 0.9})
            tracker.log_artifact(run_dir / "metrics.json")

``cfg`` keys (``conf/tracking/*.yaml``): ``enabled`` (MLflow on/off), ``tracking_uri``,
``experiment_name``, ``run_name``, ``tensorboard`` (TensorBoard logs under
``<run_dir>/tensorboard/<prefix>``; independent of ``enabled``; needs the ``tensorboard``
package, which TensorFlow >= 2.21 no longer installs: without it, one warning and no
TensorBoard logs), and optionally
``artifact_location`` (where a *new* experiment keeps its artifacts; default
``<folder of the sqlite db>/mlartifacts/<experiment>``).

Tracking URIs:

* ``sqlite:///path/mlflow.db`` (default): the folder is created; the first use of a new
  database creates its tables (a few seconds, once);
* a path ending in ``.db``/``.sqlite``: the same, as ``sqlite:///<absolute path>``;
* ``http(s)://host:port``: an MLflow server; reachability is checked with a quick TCP
  connect before anything else, so a server that is down costs seconds, not MLflow's
  minutes of retries;
* any other path or ``file:`` URI: MLflow's file store (in maintenance mode in MLflow 3;
  allowed here because the user asked for it explicitly).

Failures: any error of the tracking backend (server down, locked or read-only database,
...) logs **one** warning and tracking continues as a no-op; training is never stopped.
Invalid values (e.g. a param logged twice with another value) log a warning and are skipped.

Secrets are never logged: keys matching :data:`SECRET_KEY_PATTERN` (api_key, apikey,
token, secret, password; any case) have their values replaced by ``***`` in params and
tags and are dropped from metrics; the value of ``ROBOFLOW_API_KEY`` (environment or
``.env``) and of other ``*_API_KEY``/``*_TOKEN``/``*_SECRET``/``*_PASSWORD`` environment
variables is replaced by ``***`` wherever it appears (params, tags, run names, metric
names, and text artifacts, which are uploaded as redacted copies). The rules, names and
params: :mod:`src.redaction`.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

from .redaction import (REDACTED, SECRET_KEY_PATTERN, _needs_redaction, _param_value,  # noqa: F401 (re-exported)
                        _scrub, _to_container, flatten_config, is_secret_key, redact_text, sanitize_name,
                        secret_values)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # the limits of the installed MLflow
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH
except Exception:  # pragma: no cover - mlflow missing or reorganised
    MAX_TAG_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH = 8000, 100, 1000

_QUIET_LOGGERS = ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils",
                  "mlflow.store.tracking.sqlalchemy_store", "mlflow.tracking._tracking_service.client")


# --------------------------------------------------------------------------- helpers
def _as_dict(cfg: Any) -> dict:
    cfg = _to_container(cfg)
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"tracking config must be a mapping, got {type(cfg).__name__}")


def _quiet_mlflow_logs() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _no_library_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        yield


def _git_commit() -> Optional[str]:
    """The checked-out commit of this repository, read from ``.git`` (no subprocess)."""
    git = REPO_ROOT / ".git"
    try:
        if git.is_file():  # worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, git.parent.parent if git.parent.name == "worktrees" else git):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = git / "packed-refs"
        common = git / "commondir"
        if common.is_file():
            packed = (git / common.read_text().strip() / "packed-refs").resolve()
            if (packed.parent / ref).is_file():
                return (packed.parent / ref).read_text().strip()
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except Exception:  # noqa: BLE001 - no git checkout
        return None
    return None


# --------------------------------------------------------------------------- the tracker
class _RunContext:
    """Returned by :meth:`Tracker.start`: ends the run it opened on exit."""

    def __init__(self, tracker: "Tracker", depth: Optional[int]):
        self.tracker, self.depth = tracker, depth

    def __enter__(self):
        return self.tracker

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        if self.depth is not None:
            self.tracker._end_to(self.depth, status)
        return False


class Tracker:
    """MLflow (+ TensorBoard) tracking for one training invocation. See the module doc.

    Args:
        cfg: the ``tracking`` config (mapping or ``DictConfig``); ``None`` = disabled.
        run_dir: this run's output folder (TensorBoard logs, default sqlite store).
    """

    def __init__(self, cfg: Any = None, run_dir: Any = None):
        c = _as_dict(cfg)
        self.enabled = bool(c.get("enabled", False))
        self.tensorboard = bool(c.get("tensorboard", False))
        self.run_dir = Path(run_dir) if run_dir is not None else Path.cwd()
        self.experiment_name = str(c.get("experiment_name") or "Default")
        self.run_name = c.get("run_name")
        self.artifact_location = c.get("artifact_location")
        self.tracking_uri = self._normalise_uri(c.get("tracking_uri")) if self.enabled else None
        self._client = None
        self._experiment_id: Optional[str] = None
        self._runs: list = []
        self._failed = False
        self._secrets = secret_values()
        self._tb_warned = False
        if self.enabled:
            _quiet_mlflow_logs()

    # ---- state ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """MLflow is on, working, and a run is open."""
        return self.enabled and not self._failed and bool(self._runs)

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def run_id(self) -> Optional[str]:
        """Id of the innermost open run (``None`` when tracking is off or failed)."""
        return self._runs[-1] if self._runs and self.enabled and not self._failed else None

    @property
    def parent_run_id(self) -> Optional[str]:
        return self._runs[0] if self._runs and self.enabled and not self._failed else None

    # ---- backend -------------------------------------------------------------------
    def _normalise_uri(self, uri: Optional[str]) -> str:
        if not uri:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        uri = str(uri)
        scheme = urlparse(uri).scheme.lower()
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):  # a path (or C:\...)
            path = Path(urlparse(uri).path if scheme == "file" else uri).expanduser().resolve()
            if path.suffix.lower() in (".db", ".sqlite", ".sqlite3"):
                return f"sqlite:///{path}"
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # explicit choice of the user
            return path.as_uri()
        return uri

    def _sqlite_path(self) -> Optional[Path]:
        if self.tracking_uri and self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri[len("sqlite:///"):])
        return None

    def _fail(self, what: str, err: BaseException) -> None:
        if not self._failed:
            self._failed = True
            log.warning("MLflow tracking failed while %s (%s: %s); training continues without MLflow tracking "
                        "(tracking_uri=%s)", what, type(err).__name__, _scrub(str(err), self._secrets)[:500],
                        _display_uri(self.tracking_uri))

    def _call(self, what: str, fn, *args, **kwargs):
        """Run a backend call; backend errors disable tracking, invalid values are skipped."""
        if self._failed or not self.enabled:
            return None
        try:
            with _no_library_warnings():
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            code = getattr(e, "error_code", None)
            if code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"):
                log.warning("MLflow: %s skipped: %s", what, _scrub(str(e), self._secrets)[:500])
                return None
            self._fail(what, e)
            return None

    def _check_reachable(self) -> None:
        parsed = urlparse(self.tracking_uri or "")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        timeout = float(os.environ.get("BTMTL_TRACKING_CONNECT_TIMEOUT", "5"))
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass

    def _ensure_client(self) -> bool:
        if self._client is not None:
            return True
        if self._failed or not self.enabled:
            return False

        def make():
            self._check_reachable()
            db = self._sqlite_path()
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                location = self.artifact_location
                if location is None and db is not None:
                    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.experiment_name)
                    location = (db.parent / "mlartifacts" / safe).resolve().as_uri()
                exp_id = client.create_experiment(self.experiment_name, artifact_location=location and str(location))
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    log.warning("MLflow experiment %r was deleted; restoring it", self.experiment_name)
                    client.restore_experiment(exp_id)
            return client, exp_id

        res = self._call(f"connecting to {self.tracking_uri}", make)
        if res is None:
            return False
        self._client, self._experiment_id = res
        return True

    # ---- runs ----------------------------------------------------------------------
    def find_run(self, tags: Mapping[str, str]) -> Optional[str]:
        """Id of the newest top-level run of this experiment whose tags equal ``tags``
        (None when there is none, tracking is off or the store cannot be reached)."""
        if not tags or not self._ensure_client():
            return None
        if any("'" in str(v) for v in tags.values()):
            return None
        filt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())

        def search():
            runs = self._client.search_runs([self._experiment_id], filter_string=filt,
                                            order_by=["attributes.start_time DESC"], max_results=50)
            top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            return (top or runs)[0].info.run_id if runs else None

        return self._call("searching runs", search)

    def start(self, run_name: Optional[str] = None, params: Any = None, tags: Optional[Mapping] = None,
              run_id: Optional[str] = None, description: Optional[str] = None) -> _RunContext:
        """Open a run (nested under the current one if a run is open); use as a context manager.

        Args:
            run_name: run name (default: ``cfg.run_name``).
            params: flat or nested mapping / ``DictConfig`` (flattened, secrets redacted).
            tags: run tags (secrets redacted).
            run_id: resume this existing run instead of creating one (e.g. after a kill);
                params already logged with the same value are skipped.
            description: run description (``mlflow.note.content``).

        Without MLflow (disabled or failed) this opens nothing and the context is a no-op.
        """
        if not self._ensure_client():
            return _RunContext(self, None)
        depth = len(self._runs)
        name = _scrub(str(run_name or self.run_name or ""), self._secrets) or None
        all_tags = {"mlflow.user": _safe_user(), "mlflow.source.name": _scrub(sys.argv[0] or "python", self._secrets),
                    "mlflow.source.type": "LOCAL", "run_dir": str(self.run_dir.resolve())}
        commit = _git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        if self._runs:
            all_tags["mlflow.parentRunId"] = self._runs[-1]
        if description:
            all_tags["mlflow.note.content"] = description
        all_tags.update({str(k): v for k, v in (tags or {}).items()})
        all_tags = self._clean_tags(all_tags)

        def create():
            from mlflow.entities import RunTag

            if run_id:
                self._client.update_run(run_id, status="RUNNING")
                self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()
                                                     if not k.startswith("mlflow.parentRunId")])
                return run_id
            run = self._client.create_run(self._experiment_id, tags=all_tags, run_name=name)
            return run.info.run_id

        rid = self._call("starting a run", create)
        if rid is None:
            return _RunContext(self, None)
        self._runs.append(rid)
        if params is not None:
            self.log_params(params, _resume=bool(run_id))
        return _RunContext(self, depth)

    def start_child(self, run_name: str, params: Any = None, tags: Optional[Mapping] = None,
                    run_id: Optional[str] = None) -> _RunContext:
        """A run nested in the current one (e.g. one per training phase)."""
        return self.start(run_name, params=params, tags=tags, run_id=run_id)

    def _end_to(self, depth: int, status: str = "FINISHED") -> None:
        while len(self._runs) > depth:
            rid = self._runs.pop()
            if self._client is not None and not self._failed:
                self._call("ending a run", self._client.set_terminated, rid, status)

    def end(self, status: str = "FINISHED") -> None:
        """End every open run (innermost first)."""
        self._end_to(0, status)

    # ---- logging -------------------------------------------------------------------
    def _clean_tags(self, tags: Mapping) -> dict:
        out = {}
        for k, v in tags.items():
            key = str(k)
            if not key.startswith("mlflow."):
                key = sanitize_name(_scrub(key, self._secrets))
            value = REDACTED if is_secret_key(k) else _scrub(_param_value(v), self._secrets)
            out[key] = value[:MAX_TAG_VAL_LENGTH]
        return out

    def log_params(self, params: Any, _resume: bool = False) -> None:
        """Log params (flat or nested; flattened with :func:`flatten_config`, secrets redacted)."""
        if not self.active:
            return
        flat = flatten_config(params, secrets=self._secrets)
        rid = self.run_id
        if _resume:
            run = self._call("reading the resumed run", self._client.get_run, rid)
            existing = dict(run.data.params) if run is not None else {}
            changed = sorted(k for k in flat if k in existing and existing[k] != flat[k])
            if changed:
                log.warning("MLflow: resumed run %s keeps its logged values for changed params %s", rid, changed)
            flat = {k: v for k, v in flat.items() if k not in existing}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._call("logging params", self._client.log_batch, rid, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def set_tags(self, tags: Mapping) -> None:
        """Set tags on the current run (secret-looking keys redacted)."""
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._call("setting tags", self._client.log_batch, self.run_id,
                       tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping, step: Optional[int] = None, prefix: str = "") -> None:
        """Log numeric metrics (names sanitised; non-numeric values and secret-like names dropped)."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(step) if step is not None else 0
        items = {}
        for k, v in metrics.items():
            name = f"{prefix}{k}"
            if is_secret_key(name) or _scrub(name, self._secrets) != name:
                continue
            try:
                value = float(v)
            except (TypeError, ValueError):
                try:  # 0-d arrays / tensors
                    import numpy as np

                    value = float(np.asarray(v).reshape(()))
                except Exception:  # noqa: BLE001 - not a number: not a metric
                    continue
            items[sanitize_name(name)] = Metric(sanitize_name(name), value, ts, step)
        batch = list(items.values())
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._call("logging metrics", self._client.log_batch, self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: Any, artifact_path: Optional[str] = None) -> None:
        """Upload one file (text files holding secrets are uploaded as redacted copies)."""
        if not self.active:
            return
        path = Path(path)
        if not path.is_file():
            log.warning("MLflow: artifact %s not found; skipped", path)
            return
        if _needs_redaction(path, self._secrets):
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / path.name
                copy.write_text(redact_text(path.read_text(encoding="utf-8"), self._secrets), encoding="utf-8")
                self._call(f"logging artifact {path.name}", self._client.log_artifact, self.run_id, str(copy),
                           artifact_path)
            return
        self._call(f"logging artifact {path.name}", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Any, artifact_path: Optional[str] = None) -> None:
        """Upload a folder's content (redacted copies of text files that hold secrets)."""
        if not self.active:
            return
        directory = Path(directory)
        if not directory.is_dir():
            log.warning("MLflow: artifact folder %s not found; skipped", directory)
            return
        dirty = [p for p in directory.rglob("*") if p.is_file() and _needs_redaction(p, self._secrets)]
        if not dirty:
            self._call(f"logging artifacts {directory.name}", self._client.log_artifacts, self.run_id,
                       str(directory), artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / directory.name
            shutil.copytree(directory, copy, symlinks=False)
            for p in dirty:
                q = copy / p.relative_to(directory)
                q.write_text(redact_text(p.read_text(encoding="utf-8"), self._secrets), encoding="utf-8")
            self._call(f"logging artifacts {directory.name}", self._client.log_artifacts, self.run_id, str(copy),
                       artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (redacted) as the artifact ``artifact_file`` (e.g. ``"config.yaml"``)."""
        if not self.active:
            return
        rel = Path(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / rel.name
            p.write_text(redact_text(text, self._secrets), encoding="utf-8")
            parent = str(rel.parent) if str(rel.parent) not in ("", ".") else None
            self._call(f"logging {artifact_file}", self._client.log_artifact, self.run_id, str(p), parent)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as JSON (``.json``) or YAML (other suffixes), redacted, as an artifact."""
        obj = _to_container(obj)
        if artifact_file.endswith(".json"):
            text = json.dumps(obj, indent=2, default=str)
        else:
            import yaml

            text = yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False)
        self.log_text(text, artifact_file)

    # ---- Keras ---------------------------------------------------------------------
    def keras_callbacks(self, prefix: str = "") -> list:
        """Callbacks for ``fit``: per-epoch MLflow metrics (``<prefix><name>``, step = epoch)
        when MLflow is on, and TensorBoard under ``<run_dir>/tensorboard/<prefix>`` when
        ``tensorboard`` is on. Put them *after* callbacks that add to the logs."""
        cbs: list = []
        if self.enabled and not self._failed:
            cbs.append(_metrics_callback_class()(self, prefix))
        if self.tensorboard and not tensorboard_available():
            if not self._tb_warned:
                self._tb_warned = True
                log.warning("tracking.tensorboard is true but the 'tensorboard' package is not installed "
                            "(TensorFlow >= 2.21 no longer installs it): pip install tensorboard. "
                            "No TensorBoard logs are written.")
        elif self.tensorboard:
            import keras

            sub = sanitize_name(prefix) if prefix.strip("/") else ""
            log_dir = self.run_dir / "tensorboard" / sub if sub else self.run_dir / "tensorboard"
            cbs.append(keras.callbacks.TensorBoard(log_dir=str(log_dir), update_freq="epoch", profile_batch=0))
        return cbs

    def __repr__(self) -> str:
        return (f"Tracker(enabled={self.enabled}, tensorboard={self.tensorboard}, uri={_display_uri(self.tracking_uri)!r}, "
                f"experiment={self.experiment_name!r}, run_id={self.run_id!r}, failed={self._failed})")


def _display_uri(uri: Optional[str]) -> Optional[str]:
    """``uri`` without a password (``http://user:***@host``)."""
    if not uri:
        return uri
    parsed = urlparse(uri)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", f":{REDACTED}@")
        return parsed._replace(netloc=netloc).geturl()
    return uri


def tensorboard_available() -> bool:
    """The ``tensorboard`` package (needed by ``keras.callbacks.TensorBoard``) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database (containers)
        return "unknown"


_CALLBACK_CLS = None


def _metrics_callback_class():
    """The Keras callback class (built lazily so importing this module does not import Keras)."""
    global _CALLBACK_CLS
    if _CALLBACK_CLS is None:
        import keras

        class MlflowMetricsCallback(keras.callbacks.Callback):
            """Logs every epoch's ``logs`` as MLflow metrics ``<prefix><name>`` at step = epoch."""

            def __init__(self, tracker: Tracker, prefix: str = ""):
                super().__init__()
                self.tracker, self.prefix = tracker, prefix

            def on_epoch_end(self, epoch, logs=None):
                self.tracker.log_metrics(dict(logs or {}), step=epoch, prefix=self.prefix)

        _CALLBACK_CLS = MlflowMetricsCallback
    return _CALLBACK_CLS


__all__ = ["Tracker", "flatten_config", "tensorboard_available", "sanitize_name", "redact_text", "is_secret_key", "secret_values",
           "REDACTED", "SECRET_KEY_PATTERN"]
