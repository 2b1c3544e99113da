"""Structure of the Dockerfile, .dockerignore and .devcontainer/devcontainer.json (no Docker needed).

They must agree with each other, with setup.cfg and with the README's "Devcontainer / Docker"
section: the same package and extras installed, the referenced files present, data,
outputs and secrets kept out of the image.
"""
from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DEVCONTAINER = REPO / ".devcontainer" / "devcontainer.json"
# `pip install [-e] ".[dev]"`: the package from this checkout's setup.cfg with its extras
INSTALL = re.compile(r"pip3?\s+install\s+(?:--?[\w-]+\s+)*?(-e\s+)?[\"']?(\.\[[\w,\s-]+\])[\"']?")


def strip_jsonc(text: str) -> str:
    """JSON with // and /* */ comments (VS Code's JSONC) -> JSON; strings are left alone."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        else:
            out.append(c)
            i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))  # JSONC allows trailing commas


def test_strip_jsonc_keeps_strings():
    assert json.loads(strip_jsonc('{"a": "http://x//y", // c\n "b": [1, /* d */ 2,],}')) == \
        {"a": "http://x//y", "b": [1, 2]}


@pytest.fixture(scope="module")
def devcontainer() -> dict:
    assert DEVCONTAINER.is_file()
    return json.loads(strip_jsonc(DEVCONTAINER.read_text()))


@pytest.fixture(scope="module")
def dockerfile() -> str:
    assert DOCKERFILE.is_file()
    # join continuation lines: one instruction per line
    return re.sub(r"\\\s*\n", " ", DOCKERFILE.read_text())


def instructions(dockerfile: str, keyword: str) -> list[str]:
    return [line.strip()[len(keyword):].strip() for line in dockerfile.splitlines()
            if line.strip().upper().startswith(keyword + " ")]


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f'README has no "## {title}" section'
    return m.group(1)


def setup_cfg() -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    return cp


def extras(spec: str) -> set:
    return {e.strip() for e in spec[spec.index("[") + 1:spec.index("]")].split(",")}


# --------------------------------------------------------------------------- devcontainer
def test_devcontainer_builds_the_dockerfile(devcontainer):
    here = DEVCONTAINER.parent
    build = devcontainer["build"]
    assert (here / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert (here / build.get("context", ".")).resolve() == REPO.resolve()


def test_devcontainer_gpu_extensions_mounts(devcontainer, dockerfile):
    args = " ".join(devcontainer.get("runArgs", []))
    assert re.search(r"--gpus(\s+|=)all", args), "runArgs must give GPU access (--gpus all)"
    ext = {e.lower() for e in devcontainer["customizations"]["vscode"]["extensions"]}
    assert {"ms-python.python", "ms-toolsai.jupyter"} <= ext
    targets = set()
    for m in devcontainer.get("mounts", []):
        spec = m if isinstance(m, str) else ",".join(f"{k}={v}" for k, v in m.items())
        fields = dict(f.split("=", 1) for f in spec.split(",") if "=" in f)
        targets.add(fields.get("target") or fields.get("destination") or fields.get("dst"))
    workdir = instructions(dockerfile, "WORKDIR")[-1]
    assert devcontainer.get("workspaceFolder", workdir) == workdir
    assert {f"{workdir}/data", f"{workdir}/outputs"} <= targets
    # the mount sources must exist before the container starts
    assert "data" in devcontainer.get("initializeCommand", "") and "outputs" in devcontainer["initializeCommand"]
    user = devcontainer.get("remoteUser")
    assert user and user != "root"
    assert f"USERNAME={user}" in dockerfile


def test_devcontainer_installs_the_dev_extras(devcontainer):
    cmd = devcontainer["postCreateCommand"]
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    m = INSTALL.search(cmd)
    assert m and "dev" in extras(m.group(2)), f"postCreateCommand must install the dev extras: {cmd!r}"


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_user_workdir_cmd(dockerfile):
    args = dict(a.split("=", 1) for a in instructions(dockerfile, "ARG") if "=" in a)
    base = instructions(dockerfile, "FROM")[0]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    assert re.fullmatch(r"tensorflow/tensorflow:[\w.]+-gpu|nvidia/cuda:[\w.-]+", base), base
    if base.startswith("tensorflow/"):
        # the base image's TensorFlow is the one setup.cfg asks for (pip does not replace it)
        req = next(r for r in setup_cfg()["options"]["install_requires"].split("\n") if r.startswith("tensorflow>"))
        major_minor = re.search(r">=(\d+\.\d+)", req).group(1)
        assert base.split(":")[1].startswith(major_minor + "."), f"{base} vs {req}"
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert instructions(dockerfile, "WORKDIR")
    cmd = instructions(dockerfile, "CMD")[-1]
    cmd = " ".join(json.loads(cmd)) if cmd.startswith("[") else cmd
    assert "-m src.train" in cmd, cmd
    # the install step sees the package metadata before it runs
    assert any("setup.cfg" in c for c in instructions(dockerfile, "COPY"))


def test_dockerfile_installs_the_package_and_extras_of_the_readme(dockerfile):
    runs = [r for r in instructions(dockerfile, "RUN") if INSTALL.search(r)]
    assert runs, "no `pip install .[extras]` step in the Dockerfile"
    installed = {(bool(m.group(1)), m.group(2).replace(" ", "")) for r in runs for m in INSTALL.finditer(r)}
    section = readme_section("Devcontainer / Docker")
    documented = {(bool(m.group(1)), m.group(2).replace(" ", "")) for m in INSTALL.finditer(section)}
    assert documented, 'the README "Devcontainer / Docker" section names no `pip install ".[...]"`'
    assert installed <= documented, f"Dockerfile installs {installed}, README documents {documented}"
    declared = {k.strip() for k in setup_cfg()["options.extras_require"]}
    assert "dev" in declared
    for _, spec in installed:
        assert extras(spec) <= declared, f"{spec}: extras not in setup.cfg {declared}"
    dev = setup_cfg()["options.extras_require"]["dev"]
    for pkg in ("pytest", "nbclient", "nbformat", "ipykernel"):
        assert re.search(rf"^\s*{pkg}\b", dev, re.M), f"{pkg} missing from the dev extras"


def test_readme_documents_the_commands():
    section = readme_section("Devcontainer / Docker")
    assert re.search(r"docker build\b.*\s-t\s+\S+", section)
    assert re.search(r"docker run\b[^\n]*--gpus(\s+|=)all", section)
    assert "python -m src.train" in section
    assert "Reopen in Container" in section
    notebooks = readme_section("Notebooks")
    assert "jupyter lab" in notebooks
    for p in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert p.name in notebooks, f"{p.name} not listed in the README's Notebooks section"


def test_dockerignore_keeps_data_outputs_and_secrets_out():
    path = REPO / ".dockerignore"
    assert path.is_file()
    entries = {line.strip().strip("/") for line in path.read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")}
    assert {".env", "data", "outputs"} <= entries
    assert {".venv", "mlruns"} <= entries
    # nothing the build needs is excluded
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "src", "conf"):
        assert needed not in entries
