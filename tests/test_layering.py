"""Every import points down (DESIGN.md, Layout): the head vocabulary imports nothing of the
package; losses and models import nothing from training, evaluation, inference, the run
folder, tracking or an entry point, not even inside a function. (src/data has its own,
stricter check in tests/data/test_duplicates.py.)"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ABOVE_MODELS = {"training", "evaluation", "inference", "runs", "tracking", "curate", "cli", "config", "train",
                "evaluate", "predict", "explain", "export"}
RULES = {  # files -> the top-level modules of src they must not import
    "heads.py": None,  # None: nothing of src at all
    "losses": ABOVE_MODELS | {"models", "data"},
    "models": ABOVE_MODELS,
}


def _imports(path: Path) -> list[str]:
    package = ["src", *path.relative_to(SRC).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mods = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        out += [m for m in mods if m.split(".")[0] == "src" and len(m.split(".")) > 1]
    return out


@pytest.mark.parametrize("where", sorted(RULES))
def test_no_upward_import(where):
    root = SRC / where
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    bad = []
    for path in files:
        for mod in _imports(path):
            top = mod.split(".")[1]
            if RULES[where] is None or top in RULES[where]:
                bad.append(f"{path.relative_to(SRC)}: {mod}")
    assert bad == []
