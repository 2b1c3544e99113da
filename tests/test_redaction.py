"""`src.redaction`: config flattening for MLflow params, secrets redacted from params and text
files, MLflow-safe metric names."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from src.redaction import REDACTED, flatten_config, redact_text, sanitize_name

SECRET = "rf_SECRET_k3y_0123456789"


def test_flatten_config_nested_lists_interpolation_and_limits():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    cfg = OmegaConf.create({"model": {"name": "small_cnn", "widths": [4, 8], "head": {"dropout": 0.1}},
                            "trainer": {"lr": 1e-3, "epochs": "${model.head.dropout}", "flag": True, "none": None},
                            "empty": {}, "long": "x" * (MAX_PARAM_VAL_LENGTH + 50)})
    flat = flatten_config(cfg)
    assert flat["model.name"] == "small_cnn"
    assert json.loads(flat["model.widths"]) == [4, 8]
    assert flat["model.head.dropout"] == "0.1" and flat["trainer.epochs"] == "0.1"  # interpolation resolved
    assert flat["trainer.flag"] == "true" and flat["trainer.none"] == "null" and flat["empty"] == "{}"
    assert len(flat["long"]) == MAX_PARAM_VAL_LENGTH
    assert all(isinstance(v, str) for v in flat.values())
    # a flat dict with dotted keys stays as it is
    assert flatten_config(flat) == flat


def test_flatten_config_redacts_secret_keys_and_values(monkeypatch):
    monkeypatch.setenv("ROBOFLOW_API_KEY", SECRET)
    flat = flatten_config({"data": {"roboflow": {"api_key": "abc", "key": "k", "url": f"https://x/?key={SECRET}",
                                                 "workspace": "ws"}},
                           "ApiKey": "v", "hf_TOKEN": "t", "db_password": "p", "client_secret": "s",
                           "list": [SECRET, 1]})
    for k in ("data.roboflow.api_key", "data.roboflow.key", "ApiKey", "hf_TOKEN", "db_password", "client_secret"):
        assert flat[k] == REDACTED, k
    assert SECRET not in json.dumps(flat)
    assert flat["data.roboflow.url"] == f"https://x/?key={REDACTED}"
    assert flat["data.roboflow.workspace"] == "ws"


@pytest.mark.parametrize("raw, want", [
    ("val_loss", "val_loss"), ("phase3/val_loss", "phase3/val_loss"), ("balance/class/ema", "balance/class/ema"),
    ("acc@1", "acc_1"), ("a:b", "a_b"), ("iou(box)", "iou_box_"), ("/lead//x/", "lead/x"), ("a/../b", "a/_/b"),
    ("", "_"), ("ü", "_"),
])
def test_sanitize_name(raw, want):
    from mlflow.utils.validation import _validate_metric_name

    assert sanitize_name(raw) == want
    _validate_metric_name(sanitize_name(raw))  # MLflow accepts it


def test_redact_text_formats(monkeypatch):
    monkeypatch.setenv("ROBOFLOW_API_KEY", SECRET)
    text = (f"data:\n  api_key: abc\n  token:\n  other: {SECRET}\nROBOFLOW_API_KEY={SECRET}\n"
            '{"password": "hunter2", "n": 1, "apikey": 5}\n')
    out = redact_text(text)
    assert SECRET not in out and "abc" not in out and "hunter2" not in out
    assert "api_key: ***" in out and "  token:\n" in out and '"n": 1' in out and '"apikey": "***"' in out
    assert redact_text("monitor_key: val_loss\nkey: abc\n", secrets=[]) == "monitor_key: val_loss\nkey: ***\n"
