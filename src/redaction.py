"""What may be logged: secrets redacted, names and params made valid for MLflow.

Used by :mod:`src.tracking` (and re-exported there). Keys matching
:data:`SECRET_KEY_PATTERN` (api_key, apikey, token, secret, password, credential; any case)
or exactly ``key`` are secret-looking (:func:`is_secret_key`); :func:`secret_values` are
the values of ``ROBOFLOW_API_KEY`` (environment or ``.env``) and of other
``*_API_KEY``/``*_TOKEN``/``*_SECRET``/``*_PASSWORD`` environment variables;
:func:`redact_text` replaces both by :data:`REDACTED` in text (``_needs_redaction``: a text
file that holds any). :func:`sanitize_name` makes a valid MLflow metric/param name and
:func:`flatten_config` a nested config into redacted ``{"a.b.c": "value"}`` params, within
the limits of the installed MLflow.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # the limits of the installed MLflow
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
except Exception:  # pragma: no cover - mlflow missing or reorganised
    MAX_PARAM_VAL_LENGTH, MAX_ENTITY_KEY_LENGTH = 6000, 250

REDACTED = "***"
SECRET_KEY_PATTERN = re.compile(r"api[_-]?key|token|secret|passw(?:or)?d|credential", re.IGNORECASE)
_BARE_SECRET_KEYS = {"key"}  # e.g. ``data.roboflow.key``
_SECRET_ENV_NAMES = re.compile(r"(?:API_?KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".txt", ".csv", ".log", ".md", ".cfg", ".ini", ".toml", ".env",
                  ".py", ".html", ".tsv", ".xml"}
_MAX_TEXT_SCAN = 20 * 1024 * 1024


# --------------------------------------------------------------------------- secrets
def is_secret_key(name: Any) -> bool:
    """The key looks like it holds a secret (api_key, apikey, token, secret, password, credential, key)."""
    name = str(name)
    return bool(SECRET_KEY_PATTERN.search(name)) or name.strip().lower() in _BARE_SECRET_KEYS


def secret_values() -> list:
    """Secret strings to scrub: ``ROBOFLOW_API_KEY`` (env or ``.env``) and other secret env vars."""
    values = set()
    for name, value in os.environ.items():
        if name == "ROBOFLOW_API_KEY" or _SECRET_ENV_NAMES.search(name):
            value = (value or "").strip()
            if len(value) >= 6 or (name == "ROBOFLOW_API_KEY" and value):
                values.add(value)
    try:
        from dotenv import dotenv_values

        for folder in {Path.cwd().resolve(), REPO_ROOT}:
            env = folder / ".env"
            if env.is_file():
                for name, value in dotenv_values(env).items():
                    value = (value or "").strip()
                    if value and (name == "ROBOFLOW_API_KEY" or _SECRET_ENV_NAMES.search(name)):
                        values.add(value)
    except Exception:  # noqa: BLE001 - python-dotenv missing or unreadable file: env only
        pass
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def redact_text(text: str, secrets: Optional[Iterable[str]] = None) -> str:
    """``text`` with secret values and the values of secret-looking keys replaced by ``***``.

    Handles ``key: value`` / ``key=value`` lines (YAML, .env, INI) and ``"key": "value"``
    JSON pairs whose key matches :data:`SECRET_KEY_PATTERN` (or is exactly ``key``).
    """
    text = str(text)
    for s in (secret_values() if secrets is None else secrets):
        if s:
            text = text.replace(s, REDACTED)
    key = r"(?:[\w.\-]*(?:api[_-]?key|token|secret|passw(?:or)?d|credential)[\w.\-]*|key)"
    text = re.sub(rf'("{key}"\s*:\s*)("(?:[^"\\]|\\.)*"|[^,\}}\]\s]+)', rf'\1"{REDACTED}"', text,
                  flags=re.IGNORECASE)
    text = re.sub(rf"(?m)^(\s*(?:export\s+)?{key}\s*[:=][ \t]*)(?![ \t]*$)(?!\"{re.escape(REDACTED)}\")(.+)$",
                  rf"\g<1>{REDACTED}", text, flags=re.IGNORECASE)
    return text


def _scrub(value: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            value = value.replace(s, REDACTED)
    return value


# --------------------------------------------------------------------------- names and params
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def sanitize_name(name: Any) -> str:
    """A valid MLflow metric/param name: alphanumerics, ``_ - . space /`` (others -> ``_``)."""
    s = _BAD_NAME_CHARS.sub("_", str(name))
    s = re.sub(r"/{2,}", "/", s).strip("/")
    parts = [("_" if p in (".", "..") else p) for p in s.split("/")]
    s = "/".join(parts) or "_"
    s = s[:MAX_ENTITY_KEY_LENGTH].rstrip("/")
    if posixpath.normpath(s) != s:  # pragma: no cover - defensive
        s = s.replace("/", "_")
    return s or "_"


def _to_container(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except Exception:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run
            return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, sort_keys=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def flatten_config(cfg: Any, prefix: str = "", sep: str = ".", secrets: Optional[Iterable[str]] = None) -> dict:
    """Nested dict/``DictConfig`` -> ``{"a.b.c": "value"}`` ready for ``mlflow.log_params``.

    Lists/tuples become JSON; ``None`` -> ``"null"``; booleans -> ``"true"``/``"false"``;
    values are cut to MLflow's limit (``MAX_PARAM_VAL_LENGTH``). Values of secret-looking
    keys become ``***`` and secret values are scrubbed (see the module doc). Keys are
    made valid MLflow names.
    """
    secrets = secret_values() if secrets is None else list(secrets)
    out: dict = {}

    def walk(node, path):
        node = _to_container(node)
        if isinstance(node, Mapping) and (node or not path):
            for k, v in node.items():
                walk(v, f"{path}{sep}{k}" if path else str(k))
            return
        key = sanitize_name(path)
        if any(is_secret_key(part) for part in path.split(sep)):
            out[key] = REDACTED
            return
        out[key] = _scrub(_param_value(node), secrets)[:MAX_PARAM_VAL_LENGTH]

    walk(cfg, prefix)
    return out


# --------------------------------------------------------------------------- text files
def _is_text_file(path: Path) -> bool:
    return path.suffix.lower() in _TEXT_SUFFIXES or path.name.startswith(".env")


def _needs_redaction(path: Path, secrets) -> bool:
    if not _is_text_file(path) or path.stat().st_size > _MAX_TEXT_SCAN:
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return redact_text(text, secrets) != text
