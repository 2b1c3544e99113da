"""`python -m src.curate data=<name> [data.root=...] [curate.out=DIR] [curate.against=<data>] ...`

Finds exact duplicates (same decoded pixels), near duplicates (perceptual hash within a
Hamming distance), optionally mirrored copies and embedding neighbours; groups them,
reports groups within a split, groups crossing splits (leakage) and groups whose labels
disagree; writes duplicates.csv, summary.json, gallery.png, embeddings.png (with
embeddings), cross_dataset.csv (with curate.against) and a cleaned manifest.jsonl that
every command reads with `data.manifest=<out>/manifest.jsonl`. Settings: conf/curate.yaml.
Prints summary.json; exit code 2 with a one-line error for bad data or config.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from ..data.dataset import load_data
from ..data.records import DataError

log = logging.getLogger("src.curate")

SPLIT_MODES = ("assigned", "dataset")


def load_against(cfg, name: str, root: Optional[str] = None):
    """The ``data`` config of another dataset (``conf/data/<name>.yaml``), with this run's paths."""
    from ..config import compose

    other = compose([f"data={name}"], config_name="config")
    OmegaConf.set_struct(other, False)
    other.paths = OmegaConf.to_container(cfg.paths, resolve=True)
    other.seed = cfg.seed
    if root not in (None, ""):
        other.data.root = str(root)
    return other


def run(cfg) -> dict:
    from .core import Settings, curate_records, write_outputs

    c = cfg.curate
    mode = str(c.get("splits", "assigned"))
    if mode not in SPLIT_MODES:
        raise DataError(f"curate.splits must be one of {list(SPLIT_MODES)}, got {mode!r}")
    out_dir = Path(str(c.out)).expanduser()
    settings = Settings.from_cfg(c, seed=int(cfg.seed))
    bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir, assign=mode == "assigned")
    against, against_name = None, None
    # `data.against=<config>` (the spelling of the issue) and `curate.against=` are the same
    against_cfg = c.get("against") or cfg.data.get("against")
    if against_cfg:
        against_name = str(against_cfg)
        other = load_against(cfg, against_name, c.get("against_root") or cfg.data.get("against_root"))
        against = load_data(other.data, cache_dir=other.paths.cache_dir, assign=False).records
        against_name = f"{against_name} ({other.data.root})"
    res = curate_records(bundle.records, settings, on_error=str(cfg.data.get("on_error", "raise")),
                         against=against, against_name=against_name)
    summary = write_outputs(res, out_dir, data_name=bundle.name, root=bundle.root)
    summary["splits_from"] = mode
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    g = summary["groups"]
    log.warning("curate %s: %d images, %d duplicate groups (%d extra copies), %d cross splits, %d label conflicts; "
                "manifest keeps %d -> %s", bundle.name, summary["images"], g["count"], g["extra_copies"],
                g["cross_split"]["groups"], g["conflicts"]["groups"], summary["manifest"]["kept"],
                summary["files"]["manifest"])
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import cli_main

    return cli_main(__doc__, "curate", lambda cfg, args: run(cfg), argv)
