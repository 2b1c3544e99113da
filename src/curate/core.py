"""Curation in process: hash, pair, group, apply the policy, check another dataset, write.

``curate_records(records, settings)`` does the work on records (no files written);
``write_outputs(result, out_dir)`` writes ``duplicates.csv``, ``summary.json``,
``gallery.png``, ``embeddings.png`` (with embeddings), ``cross_dataset.csv`` (with
``against``) and the cleaned ``manifest.jsonl``. ``run(cfg)`` (the CLI) loads the data
from the Hydra config and does both.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..data.records import DataError, Record, save_manifest
from ..data.dedup.edges import KINDS, Edges, find_edges, phash_matrix, split_name
from ..data.dedup.hashing import ImageHashes, hash_files, raise_or_drop
from ..data.dedup.search import hamming_cross
from .groups import Group, build_groups, group_stats
from .manifest import Policy, apply_policy

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """What to look for (``curate:`` in ``conf/curate.yaml``; see there for each key)."""

    hash_size: int = 16
    hamming: int = 12
    near: bool = True
    include_flips: bool = False
    embeddings: Optional[str] = None
    embedding_weights: Any = "imagenet"
    embedding_size: int = 224
    embedding_threshold: float = 0.97
    embedding_batch: int = 32
    projection: str = "umap"
    workers: int = 0
    block: int = 2048
    progress: bool = True
    gallery_groups: int = 8
    gallery_members: int = 6
    seed: int = 42
    cache_dir: Optional[str] = None
    policy: Policy = field(default_factory=Policy)

    def __post_init__(self):
        if self.include_flips and not self.near:
            raise DataError("curate.include_flips needs the perceptual pass (curate.near=true)")
        if int(self.hash_size) < 2:
            raise DataError(f"curate.hash_size must be >= 2, got {self.hash_size}")
        if not 0 <= int(self.hamming) < int(self.hash_size) ** 2:
            raise DataError(f"curate.hamming must be in [0, hash_size**2 = {int(self.hash_size) ** 2}), got {self.hamming}")
        if self.projection not in ("umap", "pca"):
            raise DataError(f"curate.projection must be umap or pca, got {self.projection!r}")
        if isinstance(self.embeddings, str) and self.embeddings.strip().lower() in ("", "none", "null", "false"):
            self.embeddings = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds searched for."""
        return tuple(k for k, on in zip(KINDS, (True, self.near, self.include_flips, self.embeddings is not None)) if on)

    @classmethod
    def from_cfg(cls, c, seed: int = 42, cache_dir: Optional[str] = None) -> "Settings":
        g = (lambda k, d: c.get(k, d)) if hasattr(c, "get") else (lambda k, d: getattr(c, k, d))
        return cls(hash_size=int(g("hash_size", 16)), hamming=int(g("hamming", 12)),
                   near=bool(g("near", True)),
                   include_flips=bool(g("include_flips", False)), embeddings=g("embeddings", None),
                   embedding_weights=g("embedding_weights", "imagenet"), embedding_size=int(g("embedding_size", 224)),
                   embedding_threshold=float(g("embedding_threshold", 0.97)),
                   embedding_batch=int(g("embedding_batch", 32)), projection=str(g("projection", "umap")),
                   workers=int(g("workers", 0) or 0), block=int(g("block", 2048)), progress=bool(g("progress", True)),
                   gallery_groups=int(g("gallery_groups", 8)), gallery_members=int(g("gallery_members", 6)),
                   seed=int(seed), cache_dir=cache_dir, policy=Policy.from_cfg(g("policy", None)))


@dataclass
class Result:
    records: list[Record]  # the hashed records (unreadable ones removed)
    hashes: list[ImageHashes]
    edges: Edges
    groups: list[Group]
    levels: dict
    kept: list[int]
    dropped: dict[int, str]
    manifest_stats: dict
    timing: dict
    settings: Settings
    unreadable: list[str] = field(default_factory=list)
    features: Optional[np.ndarray] = None
    embedding_source: Optional[str] = None
    against: Optional[dict] = None  # stats of the cross-dataset check
    against_rows: list[dict] = field(default_factory=list)

    def group_of(self, path: str) -> Optional[Group]:
        for g in self.groups:
            if any(self.records[i].image == path for i in g.members):
                return g
        return None

    @property
    def kept_records(self) -> list[Record]:
        return [self.records[i] for i in self.kept]


def _hash_records(records: Sequence[Record], s: Settings, on_error: str, desc: str):
    hashes, timing = hash_files([r.image for r in records], s.hash_size, s.include_flips, s.workers, s.progress,
                                desc=desc, perceptual=s.near)
    ok = raise_or_drop(hashes, on_error)
    bad = [h.error for h in hashes if not h.ok]
    for e in bad:
        log.warning("skipping %s", e)
    return [records[i] for i in ok], [hashes[i] for i in ok], timing, bad


def cross_dataset(records: Sequence[Record], hashes: Sequence[ImageHashes], other: Sequence[Record],
                  other_hashes: Sequence[ImageHashes], s: Settings) -> tuple[list[dict], dict, set]:
    """Images of ``records`` that also appear in ``other`` (exact, near, and flip with
    ``include_flips``): ``(rows, stats, matched indices)``; one row per matched image,
    with its best match and the number of images of ``other`` it matches."""
    best: dict[int, tuple] = {}
    counts: dict[int, set] = collections.defaultdict(set)

    def add(i, j, kind, d):
        counts[i].add(j)
        key = (KINDS.index(kind), d, other[j].image)
        if i not in best or key < best[i][0]:
            best[i] = (key, j, kind, d)

    by_exact = collections.defaultdict(list)
    for j, h in enumerate(other_hashes):
        by_exact[h.exact].append(j)
    for i, h in enumerate(hashes):
        for j in by_exact.get(h.exact, ()):
            add(i, j, "exact", 0)
    if len(hashes) and len(other_hashes) and s.near:
        ob = phash_matrix(other_hashes)
        for i, j, d in hamming_cross(phash_matrix(hashes), ob, s.hamming, block=s.block):
            add(int(i), int(j), "near", int(d))
        if s.include_flips:
            for i, j, d in hamming_cross(phash_matrix(hashes, "flip"), ob, s.hamming, block=s.block):
                add(int(i), int(j), "flip", int(d))
    rows = []
    for i in sorted(best):
        _, j, kind, d = best[i]
        r, o = records[i], other[j]
        rows.append({"path": r.image, "split": split_name(r.split), "label": r.label or "", "kind": kind,
                     "distance": d, "other_path": o.image, "other_split": split_name(o.split),
                     "other_label": o.label or "", "matches": len(counts[i])})
    by_kind = collections.Counter(row["kind"] for row in rows)
    stats = {"images": len(other), "matched_images": len(rows),
             "matched_by_kind": {k: by_kind.get(k, 0) for k in s.kinds if k != "embedding"},
             "matched_by_split": dict(sorted(collections.Counter(row["split"] for row in rows).items())),
             "matched_by_label": dict(sorted(collections.Counter(row["label"] or "unknown" for row in rows).items())),
             "other_images_matched": len({j for js in counts.values() for j in js}),
             "same_label": sum(1 for row in rows if row["label"] == row["other_label"])}
    return rows, stats, set(best)


def curate_records(records: Sequence[Record], settings: Optional[Settings] = None, on_error: str = "raise",
                   against: Optional[Sequence[Record]] = None, against_name: Optional[str] = None) -> Result:
    """Find duplicates among ``records`` (and in ``against``), group them and apply the policy."""
    s = settings or Settings()
    if not records:
        raise DataError("nothing to curate: the dataset has no images")
    extractor = None
    if s.embeddings is not None:
        from .embeddings import make_extractor

        # built first: a typo or an unreachable weights server fails now, not after hashing
        extractor = make_extractor(s.embeddings, s.embedding_weights, s.embedding_size, s.cache_dir)
    t0 = time.perf_counter()
    recs, hashes, timing, bad = _hash_records(records, s, on_error, "hashing")
    features, emb_src, emb_s = None, None, None
    if s.embeddings is not None:
        from .embeddings import embed_images

        t = time.perf_counter()
        features, emb_src = embed_images([r.image for r in recs], extractor, batch=s.embedding_batch,
                                         workers=s.workers, progress=s.progress)
        emb_s = round(time.perf_counter() - t, 3)
    t_search = time.perf_counter()
    edges = find_edges(hashes, s.hamming if s.near else None, s.include_flips, features, s.embedding_threshold,
                       s.block)
    groups, levels = build_groups(len(recs), edges, [r.split for r in recs], [r.label for r in recs], s.kinds)
    search_s = time.perf_counter() - t_search
    a_rows, a_stats, a_matched = [], None, set()
    if against is not None:
        other, other_hashes, other_timing, other_bad = _hash_records(against, s, on_error, "hashing (against)")
        a_rows, a_stats, a_matched = cross_dataset(recs, hashes, other, other_hashes, s)
        a_stats = {"name": against_name, **a_stats, "unreadable": len(other_bad),
                   "hash_images_per_s": other_timing["images_per_s"]}
    pixels = [int(np.prod(h.shape[:2])) for h in hashes]
    kept, dropped, mstats = apply_policy(recs, edges, s.policy, pixels, a_matched)
    total = time.perf_counter() - t0
    timing = {"hash_s": timing["seconds"], "hash_images_per_s": timing["images_per_s"], "workers": timing["workers"],
              "embedding_s": emb_s, "search_s": round(search_s, 3), "total_s": round(total, 3),
              "images_per_s": round(len(records) / total, 1) if total > 0 else None}  # end to end
    return Result(records=recs, hashes=hashes, edges=edges, groups=groups, levels=levels, kept=kept, dropped=dropped,
                  manifest_stats=mstats, timing=timing, settings=s, unreadable=bad, features=features,
                  embedding_source=emb_src, against=a_stats, against_rows=a_rows)


def summarise(res: Result, data_name: str = "", root: Optional[str] = None) -> dict:
    s = res.settings
    return {
        "data": data_name, "root": root,
        "images": len(res.records),
        "unreadable": {"count": len(res.unreadable), "examples": res.unreadable[:10]},
        "splits": dict(sorted(collections.Counter(split_name(r.split) for r in res.records).items())),
        "settings": {"hash": "blake2b-128 of decoded pixels (Pillow; grey when channels are equal, else RGB)",
                     "phash_bits": s.hash_size ** 2 if s.near else None, "hamming": s.hamming if s.near else None, "include_flips": s.include_flips,
                     "embeddings": res.embedding_source, "embedding_threshold": s.embedding_threshold if s.embeddings else None,
                     "kinds": list(s.kinds)},
        "kinds": res.levels,
        "groups": group_stats(res.groups),
        "manifest": res.manifest_stats,
        "against": res.against,
        "timing": res.timing,
    }


def write_outputs(res: Result, out_dir: str | Path, data_name: str = "", root: Optional[str] = None) -> dict:
    """Write every output file into ``out_dir``; returns the summary (also ``summary.json``)."""
    from . import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    kept = set(res.kept)
    files["duplicates"] = str(report.write_duplicates_csv(out / "duplicates.csv", res.groups, res.records,
                                                          res.hashes, kept))
    manifest = save_manifest(res.kept_records, out / "manifest.jsonl")
    files["manifest"] = str(manifest)
    g = report.gallery(out / "gallery.png", res.groups, res.records, res.settings.gallery_groups,
                       res.settings.gallery_members)
    files["gallery"] = g["path"] if g else None
    if g is None:
        log.info("no duplicate groups: no gallery written")
    notes = {}
    if res.features is not None:
        try:
            coords, method = report.project_2d(res.features, res.settings.projection, res.settings.seed)
            cross = [i for gr in res.groups if gr.cross_split for i in gr.members]
            files["embeddings_plot"] = str(report.embedding_plot(out / "embeddings.png", coords, res.records, method,
                                                                 cross))
            notes["embeddings_plot"] = method
        except Exception as e:  # noqa: BLE001 - a plot must not lose the report
            log.warning("embedding plot skipped: %s: %s", type(e).__name__, e)
            files["embeddings_plot"] = None
            notes["embeddings_plot"] = f"skipped ({type(e).__name__}: {e})"
    if res.against is not None:
        files["cross_dataset"] = str(report.write_cross_csv(out / "cross_dataset.csv", res.against_rows))
    summary = summarise(res, data_name, root)
    summary["files"] = files
    if notes:
        summary["notes"] = notes
    summary["gallery_groups"] = g["groups"] if g else []
    files["summary"] = str(out / "summary.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
