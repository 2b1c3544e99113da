"""MLflow/TensorBoard tracking: nested runs, Keras callbacks, secrets kept out of the store,
failures (flattening and redaction: tests/test_redaction.py)."""
from __future__ import annotations

import http.server
import json
import logging
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from src import tracking
from src.redaction import REDACTED
from src.tracking import Tracker

SECRET = "rf_SECRET_k3y_0123456789"
EXPERIMENT = "braintumor-mtl-test"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """An initialised sqlite store (creating the tables takes seconds: once per module)."""
    folder = tmp_path_factory.mktemp("template")
    handler = _Collect()
    watched = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    for lg in watched:
        lg.addHandler(handler)
    try:
        t = Tracker({"enabled": True, "tracking_uri": f"sqlite:///{folder}/db/mlflow.db",
                     "experiment_name": "template"}, folder)
        with t.start("init"):
            pass
    finally:
        for lg in watched:
            lg.removeHandler(handler)
    assert not t.failed
    return folder / "db" / "mlflow.db", [r for r in handler.records if r.levelno < logging.WARNING]


@pytest.fixture
def store(template_db, tmp_path, monkeypatch):
    """A fresh copy of the template store in tmp_path/store; returns the tracking config."""
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(template_db[0], db)
    return {"enabled": True, "tracking_uri": f"sqlite:///{db}", "experiment_name": EXPERIMENT,
            "run_name": None, "tensorboard": False}


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg["tracking_uri"])


def tiny_fit(callbacks, epochs=2):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    return model.fit(x, x[:, :1], validation_data=(x, x[:, :1]), epochs=epochs, batch_size=4, verbose=0,
                     callbacks=callbacks)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- names
def test_display_uri_hides_the_password():
    assert tracking._display_uri("https://me:pw@host:5000") == "https://me:***@host:5000"


# --------------------------------------------------------------------------- disabled
def test_disabled_tracker_is_a_no_op(tmp_path):
    t = Tracker({"enabled": False, "tracking_uri": None, "tensorboard": False}, tmp_path)
    with t.start("x", params={"a": 1}, tags={"b": 2}) as tr:
        assert tr is t and t.run_id is None and not t.active
        with t.start_child("phase1"):
            t.log_metrics({"loss": 1.0}, step=0)
            t.log_params({"a": 1})
            t.set_tags({"a": "b"})
            t.log_artifact(tmp_path / "missing.txt")
            t.log_artifacts(tmp_path)
        assert t.keras_callbacks("phase1/") == []
    t.end()
    assert list(tmp_path.iterdir()) == []
    assert Tracker(None).enabled is False


def test_tensorboard_missing_package_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    t = Tracker({"enabled": False, "tensorboard": True}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="src.tracking"):
        assert t.keras_callbacks("a/") == [] and t.keras_callbacks("b/") == []
    assert sum("pip install tensorboard" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not tracking.tensorboard_available(), reason="the tensorboard package is not installed")
def test_tensorboard_without_mlflow(tmp_path):
    import keras

    t = Tracker(OmegaConf.create({"enabled": False, "tensorboard": True}), tmp_path)
    cbs = t.keras_callbacks(prefix="phase3/")
    assert [type(c) for c in cbs] == [keras.callbacks.TensorBoard]
    tiny_fit(cbs, epochs=1)
    events = list((tmp_path / "tensorboard" / "phase3").rglob("events.out.tfevents.*"))
    assert events, list(tmp_path.rglob("*"))


def test_uri_forms(tmp_path):
    t = Tracker({"enabled": True, "tracking_uri": str(tmp_path / "x" / "runs.db")}, tmp_path)
    assert t.tracking_uri == f"sqlite:///{(tmp_path / 'x' / 'runs.db').resolve()}"
    t = Tracker({"enabled": True, "tracking_uri": None}, tmp_path)
    assert t.tracking_uri.startswith("sqlite:///") or t.tracking_uri == tracking.os.environ.get("MLFLOW_TRACKING_URI")
    t = Tracker({"enabled": True, "tracking_uri": "http://127.0.0.1:5000"}, tmp_path)
    assert t.tracking_uri == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- sqlite flow
def test_fresh_store_did_not_spam_info_logs(template_db):
    noisy = [f"{r.name}: {r.getMessage()}" for r in template_db[1]]
    assert noisy == []


def test_nested_runs_params_metrics_and_artifacts(store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"acc": 0.5}')
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "a.txt").write_text("hello")
    cfg = OmegaConf.create({"model": {"name": "small_cnn", "widths": [4, 8]}, "seed": 42})
    t = Tracker(store, run_dir)
    with t.start("parent", params=cfg, tags={"phase": "all"}):
        parent = t.run_id
        assert parent and t.parent_run_id == parent
        with t.start_child("phase1", params={"phase": 1}):
            child = t.run_id
            assert child != parent
            hist = tiny_fit(t.keras_callbacks(prefix="phase1/"))
            t.log_metrics({"test_acc": 0.75, "skip": "not a number", "arr": np.float32(2.0)}, step=None)
            t.log_artifact(run_dir / "metrics.json")
            t.log_artifacts(run_dir / "plots", artifact_path="plots")
            t.log_dict({"a": [1, 2]}, "summary/summary.json")
        assert t.run_id == parent
        t.log_metrics({"overall": 1.0})
    assert t.run_id is None

    c = client_for(store)
    p, ch = c.get_run(parent), c.get_run(child)
    assert p.info.status == ch.info.status == "FINISHED"
    assert p.info.run_name == "parent" and ch.info.run_name == "phase1"
    assert ch.data.tags["mlflow.parentRunId"] == parent
    assert p.data.params["model.name"] == "small_cnn" and json.loads(p.data.params["model.widths"]) == [4, 8]
    assert p.data.tags["phase"] == "all" and ch.data.params["phase"] == "1"
    assert p.data.metrics == {"overall": 1.0}
    hist_loss = c.get_metric_history(child, "phase1/loss")
    assert [m.step for m in hist_loss] == [0, 1]
    np.testing.assert_allclose([m.value for m in hist_loss], hist.history["loss"], rtol=1e-6)
    assert [m.step for m in c.get_metric_history(child, "phase1/val_mae")] == [0, 1]
    assert ch.data.metrics["test_acc"] == 0.75 and ch.data.metrics["arr"] == 2.0 and "skip" not in ch.data.metrics
    arts = {a.path for a in c.list_artifacts(child)}
    assert {"metrics.json", "plots", "summary"} <= arts
    assert [a.path for a in c.list_artifacts(child, "plots")] == ["plots/a.txt"]
    # artifacts live next to the sqlite database, not in the working directory
    assert (Path(store["tracking_uri"][len("sqlite:///"):]).parent / "mlartifacts").is_dir()


def test_secrets_never_reach_the_store(store, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOFLOW_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    (run_dir / "hydra").mkdir(parents=True)
    (run_dir / "hydra" / "config.yaml").write_text(f"data:\n  api_key: {SECRET}\n  name: roboflow\n")
    (run_dir / "hydra" / "overrides.yaml").write_text(f"- data.url=https://x?api_key={SECRET}\n")
    (run_dir / "notes.txt").write_text(f"the key is {SECRET}\n")
    (run_dir / "weights.bin").write_bytes(b"\x00\x01binary")
    t = Tracker(store, run_dir)
    with t.start(f"run-{SECRET}", params={"data": {"api_key": SECRET, "token": "abc", "url": f"u?k={SECRET}"},
                                          "password": "hunter2"},
                 tags={"note": f"key {SECRET}", "client_secret": "s3"}):
        t.log_metrics({"api_key_len": 3.0, f"m_{SECRET}": 1.0, "loss": 0.5}, step=1)
        t.set_tags({"token": "tok123"})
        t.log_artifact(run_dir / "notes.txt")
        t.log_artifact(run_dir / "weights.bin")
        t.log_artifacts(run_dir / "hydra", artifact_path=".hydra")
        t.log_text(f"api_key: {SECRET}\n", "config/resolved.yaml")
        rid = t.run_id
    run = client_for(store).get_run(rid)
    assert run.data.params["data.api_key"] == REDACTED and run.data.params["password"] == REDACTED
    assert run.data.params["data.token"] == REDACTED and run.data.params["data.url"] == f"u?k={REDACTED}"
    assert run.data.tags["client_secret"] == REDACTED and run.data.tags["token"] == REDACTED
    assert set(run.data.metrics) == {"loss"}
    # nothing anywhere in the store (database bytes and artifact files) holds the secret
    root = Path(store["tracking_uri"][len("sqlite:///"):]).parent
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "resolved.yaml" for p in files)
    for p in files:
        data = p.read_bytes()
        for bad in (SECRET, b"hunter2", b"tok123", b"s3\x00"):
            bad = bad.encode() if isinstance(bad, str) else bad
            assert bad not in data, p
    art = next(p for p in files if p.name == "config.yaml").read_text()
    assert "api_key: ***" in art and "name: roboflow" in art
    assert next(p for p in files if p.name == "weights.bin").read_bytes() == b"\x00\x01binary"
    # the user's own files are untouched
    assert SECRET in (run_dir / "hydra" / "config.yaml").read_text()


def test_invalid_value_is_skipped_not_fatal(store, tmp_path, caplog):
    t = Tracker(store, tmp_path)
    with t.start("p", params={"a": 1}):
        with caplog.at_level(logging.WARNING, logger="src.tracking"):
            t.log_params({"a": 2})  # MLflow refuses to change a logged param
        t.log_metrics({"loss": 1.0}, step=0)
        assert not t.failed and t.active
        rid = t.run_id
    assert any("skipped" in r.getMessage() for r in caplog.records)
    assert client_for(store).get_run(rid).data.metrics == {"loss": 1.0}


def test_resume_existing_run(store, tmp_path):
    t = Tracker(store, tmp_path)
    with t.start("p", params={"a": 1, "b": 2}):
        t.log_metrics({"loss": 1.0}, step=0)
        rid = t.run_id
    t2 = Tracker(store, tmp_path)
    with t2.start(run_id=rid, params={"a": 1, "b": 3, "c": 4}):
        assert t2.run_id == rid
        t2.log_metrics({"loss": 0.5}, step=1)
    run = client_for(store).get_run(rid)
    assert run.data.params == {"a": "1", "b": "2", "c": "4"} and run.info.status == "FINISHED"
    assert [m.step for m in client_for(store).get_metric_history(rid, "loss")] == [0, 1]


def test_failed_block_marks_run_failed(store, tmp_path):
    t = Tracker(store, tmp_path)
    with pytest.raises(RuntimeError):
        with t.start("p"):
            rid = t.run_id
            raise RuntimeError("boom")
    assert client_for(store).get_run(rid).info.status == "FAILED"


def test_file_store_path(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "x")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # restored (unset) after the test
    cfg = {"enabled": True, "tracking_uri": str(tmp_path / "mlruns"), "experiment_name": "e"}
    t = Tracker(cfg, tmp_path)
    with t.start("p", params={"a": 1}):
        t.log_metrics({"loss": 1.0}, step=0)
        rid = t.run_id
    assert not t.failed and rid
    assert (tmp_path / "mlruns").is_dir()


# --------------------------------------------------------------------------- failures
def test_unreachable_server_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = {"enabled": True, "tracking_uri": f"http://127.0.0.1:{closed_port()}", "experiment_name": "e",
           "tensorboard": False}
    t = Tracker(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="src.tracking"):
        with t.start("p", params={"a": 1}):
            with t.start_child("phase1"):
                hist = tiny_fit(t.keras_callbacks("phase1/"))
                t.log_metrics({"x": 1.0})
                t.log_artifact(__file__)
    assert len(hist.history["loss"]) == 2
    assert t.failed and t.run_id is None
    warnings_ = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings_) == 1 and "continues without MLflow" in warnings_[0].getMessage()


class _Broken(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *a):
        pass


def test_server_that_answers_errors_is_survived(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = {"enabled": True, "tracking_uri": f"http://127.0.0.1:{server.server_address[1]}",
               "experiment_name": "e"}
        t = Tracker(cfg, tmp_path)
        with caplog.at_level(logging.WARNING, logger="src.tracking"):
            with t.start("p"):
                t.log_metrics({"x": 1.0})
    finally:
        server.shutdown()
        server.server_close()
    assert t.failed
    assert sum("continues without MLflow" in r.getMessage() for r in caplog.records) == 1


def test_backend_dying_mid_run_disables_tracking_once(store, tmp_path, caplog):
    t = Tracker(store, tmp_path)
    with t.start("p"):
        rid = t.run_id
        t.log_metrics({"loss": 1.0}, step=0)

        def down(*a, **k):
            raise ConnectionError("database went away")

        t._client.log_batch = down
        with caplog.at_level(logging.WARNING, logger="src.tracking"):
            hist = tiny_fit(t.keras_callbacks("p/"))
            t.log_metrics({"loss": 0.5}, step=1)
    assert len(hist.history["loss"]) == 2 and t.failed
    assert sum("continues without MLflow" in r.getMessage() for r in caplog.records) == 1
    assert client_for(store).get_run(rid).data.metrics == {"loss": 1.0}
