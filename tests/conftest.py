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


@pytest.fixture(scope="session", autouse=True)
def cpu_graph_options():
    """The graph options the training engine uses on a machine without a GPU (they cut
    the tracing time of every test's first step the same way)."""
    from src.runtime import tune_graph_optimizer

    tune_graph_optimizer()


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
