"""From a ``data`` config to split records: the one entry every command uses.

``load_data(cfg.data)`` reads the dataset with its reader (or a cleaned manifest),
assigns groups from ``group_regex``, handles duplicate images (``data.duplicates: keep |
group | drop``, :mod:`src.data.dedup.resolve`), rasterises polygon masks once, assigns
group-aware splits and returns a :class:`DataBundle`. A config with ``data.sources`` is a
mix of several datasets (:mod:`src.data.mix`): each source is read like this, then the
cross-source split hygiene joins them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .base import SkipLog, get_reader
from .dedup.resolve import DuplicateSettings, resolve_duplicates
from .records import NO_TUMOR, ClassMap, DataError, Record, load_manifest, pseudo_counts
from .splits import assign_splits, split_summary

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    name: str
    records: list[Record]
    class_map: ClassMap
    skipped: SkipLog = field(default_factory=SkipLog)
    root: Optional[str] = None
    duplicates: Optional[dict] = None  # what data.duplicates did (None with keep)
    sources: Optional[dict] = None  # a mix (data.sources): per source its reader, root, weight, counts
    hygiene: Optional[dict] = None  # a mix: what the cross-source split hygiene did (src.data.mix)
    val_sources: Optional[dict] = None  # a mix in training: the sources training validates on (data.val_sources)

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def summary(self) -> dict:
        out = {"name": self.name, "root": self.root, "classes": list(self.class_map.classes),
               "splits": split_summary(self.records), "skipped": self.skipped.summary()}
        if self.duplicates is not None:
            out["duplicates"] = self.duplicates
        pseudo = pseudo_counts(self.records)
        if pseudo:
            out["pseudo"] = pseudo  # model-made targets (e.g. CAM pseudo masks), counted apart
        if self.sources is not None:
            out["sources"] = self.sources
            out["hygiene"] = self.hygiene
        if self.val_sources is not None:
            out["val_sources"] = self.val_sources
        return out

    def source_names(self) -> list[str]:
        """The sources of a mix in ``data.sources`` order (one name for a single dataset)."""
        if self.sources:
            return list(self.sources)
        return sorted({r.source for r in self.records})


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if not hasattr(cfg, "get") else cfg.get(key, default)


def _plain(obj):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


def reader_options(reader_cls) -> set:
    """Option names a reader class accepts (its ``OPTIONS`` or its module's)."""
    import sys

    return set(getattr(reader_cls, "OPTIONS", ()) or getattr(sys.modules[reader_cls.__module__], "OPTIONS", ()))


def make_class_map(data_cfg) -> ClassMap:
    classes = _plain(_get(data_cfg, "classes")) or None
    aliases = _plain(_get(data_cfg, "aliases")) or {}
    return ClassMap(classes, aliases) if classes else ClassMap(aliases=aliases)


def apply_group_regex(records: list[Record], pattern: Optional[str]) -> None:
    if not pattern:
        return
    rx = re.compile(pattern)
    for r in records:
        if r.group is None:
            m = rx.search(Path(r.image).stem)
            if m:
                r.group = m.group(1) if m.groups() else m.group(0)


def mark_healthy_known_empty(records: list[Record]) -> int:
    """A slice *labelled* tumour-free has no box and an empty mask: mark both known.

    That gives box and segmentation heads true negatives (weight 1, empty target)
    instead of ignoring healthy slices. Unlabelled images are left unknown.
    Returns how many records changed.
    """
    n = 0
    for r in records:
        if r.known.get("label") and r.label == NO_TUMOR and not len(r.boxes):
            if not (r.known.get("boxes") and r.known.get("mask")):
                n += 1
            r.known["boxes"] = True
            r.known["mask"] = True
    return n


def duplicate_settings(data_cfg) -> DuplicateSettings:
    """``data.duplicates`` (keep | group | drop), ``duplicates_hamming``, ``duplicates_flips``."""
    return DuplicateSettings(mode=_get(data_cfg, "duplicates", "keep"),
                             hamming=_get(data_cfg, "duplicates_hamming", 12),
                             flips=bool(_get(data_cfg, "duplicates_flips", False)))


def split_options(data_cfg) -> dict:
    """Keyword arguments of :func:`assign_splits` from ``data.split``."""
    split_cfg = _plain(_get(data_cfg, "split")) or {}
    return {"val_fraction": float(split_cfg.get("val_fraction", 0.15)),
            "test_fraction": float(split_cfg.get("test_fraction", 0.15)),
            "seed": int(split_cfg.get("seed", _get(data_cfg, "seed", 42) or 42)),
            "use_existing": bool(split_cfg.get("use_existing", True)),
            "carve_test": split_cfg.get("carve_test")}


def load_data(data_cfg, cache_dir: Optional[str] = None, assign: bool = True) -> DataBundle:
    """Read, group, deduplicate, rasterise and split a dataset described by a ``data`` config.

    ``cache_dir`` holds rasterised masks, converted files and image hashes
    (``<cache_dir>/duplicates``: with ``data.duplicates`` group/drop a second run hashes nothing).
    """
    from .mix import is_mix, load_mix

    if is_mix(data_cfg):
        return load_mix(data_cfg, cache_dir=cache_dir, assign=assign)
    class_map = make_class_map(data_cfg)
    dup_settings = duplicate_settings(data_cfg)  # a bad value fails before any reading
    name = str(_get(data_cfg, "name", _get(data_cfg, "reader", "data")))
    on_error = _get(data_cfg, "on_error", "raise")
    manifest = _get(data_cfg, "manifest")
    skipped = SkipLog()
    if manifest:
        records = load_manifest(manifest)
        for r in records:
            if r.label is not None:
                r.label = class_map.canonical(r.label, where=str(manifest))
        root = str(manifest)
        pseudo = pseudo_counts(records)
        if pseudo:
            log.info("%s: pseudo (model-made) targets: %s", manifest,
                     ", ".join(f"{t} {c['total']}" for t, c in pseudo.items()))
    else:
        reader_name = _get(data_cfg, "reader")
        if not reader_name:
            raise DataError("data.reader is not set (e.g. data=phantom, data=figshare, data=folder)")
        root = _get(data_cfg, "root")
        if root in (None, "", "???"):
            raise DataError(f"data.root is not set for reader {reader_name!r}: pass data.root=/path/to/dataset")
        options = dict(_plain(_get(data_cfg, "options")) or {})
        options.setdefault("source", name)
        reader_cls = get_reader(reader_name)
        if cache_dir and "cache_dir" in reader_options(reader_cls):
            options.setdefault("cache_dir", str(Path(cache_dir) / name))
        reader = reader_cls(root, class_map=class_map, on_error=on_error, **options)
        records = reader.read()
        skipped = reader.skipped
    apply_group_regex(records, _get(data_cfg, "group_regex"))
    split_kw = split_options(data_cfg)
    dups = None
    if dup_settings.mode != "keep":
        dups = resolve_duplicates(
            records, dup_settings, fixed_splits=split_kw["use_existing"] and any(r.split for r in records),
            cache_dir=str(Path(cache_dir) / "duplicates") if cache_dir else None, on_error=on_error,
            skipped=skipped, assign=(lambda recs: assign_splits(recs, **split_kw)) if assign else None, name=name)
        records = dups.records
    mark_healthy_known_empty(records)
    if any(r.polygons and not r.mask for r in records):
        from .masks import materialise_masks
        materialise_masks(records, Path(cache_dir or Path(root).parent / ".btmtl_cache") / name / "masks")
    if assign:
        assign_splits(records, **split_kw)
        if dups is not None:
            dups.finish()
    bundle = DataBundle(name=name, records=records, class_map=class_map, skipped=skipped, root=str(root),
                        duplicates=dups.summary if dups is not None else None)
    if len(skipped):
        log.warning("%s: skipped %d files (%s)", name, len(skipped), skipped.summary(3)["by_reason"])
    return bundle
