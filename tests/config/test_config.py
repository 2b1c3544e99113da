"""Every data/* and experiment/* config composes; every key carries a comment."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.config import CONFIG_DIR, compose

DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml") if not p.stem.startswith("_"))
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
ALL_YAML = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("name", DATA)
def test_every_data_config_composes(name):
    cfg = compose([f"data={name}"])
    assert cfg.data.reader or cfg.data.sources  # a mix (data.sources) has a reader per source
    assert cfg.data.name
    # everything except mandatory user-supplied values resolves
    c = OmegaConf.to_container(cfg.data, resolve=False)
    assert c["image_size"] and c["batch_size"]
    for key in ("classes", "split", "augment", "on_error"):
        assert key in cfg.data, key
    OmegaConf.to_container(cfg.paths, resolve=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.task_name


def test_data_configs_and_readers_agree():
    from src.data.base import get_reader

    for name in DATA:
        data = compose([f"data={name}"]).data
        for reader in [s.reader for s in data.sources] if data.sources else [data.reader]:
            get_reader(reader)


def test_overrides_apply():
    cfg = compose(["data=figshare", "data.image_size=64", "trainer.max_epochs=1", "phase=all"])
    assert cfg.data.image_size == 64 and cfg.trainer.max_epochs == 1 and cfg.phase == "all"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_key_has_a_comment(path: Path):
    missing = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("- ") or s == "defaults:":
            continue
        if ":" in s and "#" not in s:
            # a key that opens a block (ends with ':') is documented by its children
            if s.endswith(":"):
                continue
            missing.append(f"{path.name}:{i}: {s}")
    assert not missing, "config keys without a one-line comment:\n" + "\n".join(missing)


def test_no_project_file_is_git_ignored():
    """An over-broad .gitignore pattern (``data/``) once kept conf/data out of the repository."""
    import shutil
    import subprocess

    root = CONFIG_DIR.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for d in ("conf", "src", "tests", "benchmarks")
             for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "", "git ignores project files:\n" + out.stdout


MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def _build_tiny(cfg, size=64):
    """The engine's model build (strict keys) of a composed config at a tiny size."""
    from src.data.dataset import make_class_map
    from src.training.build import build_model

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if "weights" in model_cfg:
        model_cfg["weights"] = None  # no download in tests
    return build_model(model_cfg, make_class_map(cfg.data), size)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_with_every_data_config_and_builds(model):
    for data in DATA:
        cfg = compose([f"model={model}", f"data={data}"])
        OmegaConf.to_container(cfg.model, resolve=True)
    net = _build_tiny(compose([f"model={model}"]))
    assert net.heads and all(h in net.network.output for h in net.heads)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_its_model(name):
    net = _build_tiny(compose([f"experiment={name}"]))
    assert net.heads
