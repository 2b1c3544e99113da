"""Shared test fixtures.

Real-data tests read ``../shared/data`` beside the checkout (or ``$BTMTL_SHARED_DATA``)
and skip with a clear reason where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("BTMTL_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"real-data test: {root} not found (set BTMTL_SHARED_DATA to the shared data folder)")
    return root


def need_dataset(shared: Path, name: str) -> Path:
    p = shared / name
    if not p.is_dir():
        pytest.skip(f"real-data test: dataset {p} not found")
    return p
