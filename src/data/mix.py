"""Several datasets as one: ``data.sources`` (``data=mix``).

Each source is a small data config of its own: ``name``, ``reader``, ``root``, ``options``,
a sampling ``weight`` and, optionally, its own ``group_regex``, ``duplicates``, ``split``,
``manifest`` and ``on_error`` (the mix's values otherwise). Every source is read by
:func:`src.data.dataset.load_data` (its reader, groups, within-source duplicates, masks),
with **one class map** for all (``data.classes`` / ``data.aliases`` of the mix). Every record
remembers its source (``Record.source`` = the source's name) and its group id is prefixed
with the source's name (``figshare:block:3``), so groups of different sources never merge by
accident.

Cross-dataset split hygiene (``data.hygiene``)
---------------------------------------------
Copies of one image in several sources (1,171 Kaggle Training images are figshare slices)
would leak between splits. Every image of the mix is hashed (the duplicate index of
:mod:`src.data.dedup`, cached per file) and the copies *across* sources (exact, or near
within ``data.duplicates_hamming`` bits; mirrored with ``data.duplicates_flips``) are joined
into cross-source groups (union-find). Then:

``group`` (default)  each cross-source group, together with the records' own groups it
                     touches (a figshare patient block), is one split unit. Every source is
                     split by its own rules (:func:`src.data.splits.assign_splits`: its own
                     folders kept, validation carved from its training part), a unit's
                     members of one source as one group; then every unit that landed in
                     several splits goes to one: the split of its most held-out copy that a
                     dataset fixed (its own val/test folder), else the split its *owner*
                     chose (the first of its sources in ``data.sources`` order: list first
                     the source whose splits should win, e.g. figshare, so its patient-block
                     validation and test splits keep their size). Members elsewhere move
                     there, except copies in a dataset's own val/test folder, which cannot
                     move and are dropped (``cross_split_copy``).
``drop``             one source keeps its copies (the first in ``data.sources`` order that
                     has one: list the source you trust most first, e.g. figshare, whose
                     copies carry masks), the copies in the other sources are dropped
                     (``cross_source_copy``); groups whose labels disagree (``no_tumor``
                     against a tumour, or two different subtypes; the generic ``tumor``
                     agrees with any subtype) are dropped whole (``conflict``).
``off``              nothing is done. A mix whose sources share images then refuses to start
                     (:class:`~src.data.records.DataError`, one line) unless
                     ``data.allow_overlap=true``.

What was done is ``hygiene`` in the bundle summary (``data_summary.json``): pairs and groups
by kind and by source pair, conflicts, dropped / moved records, and ``cross_splits_after``
(cross-source groups still in several splits: 0 unless hygiene is off).

Validation during training (``data.val_sources``)
-------------------------------------------------
The splits are made on every source (above), and ``src.evaluate`` reports each source's
part of a split on its own. The validation set that *training* watches (``val_loss``, the
validation metrics, ``best.keras``, early stopping, LR on plateau) is
:func:`validation_records`:

``trained`` (default)  only the validation records of the sources that train (weight > 0):
                       a figshare-only baseline (the other weights 0) selects its epoch on
                       figshare, not on Kaggle / Br35H images it never learns from.
``all``                the whole validation split, every source.

The decision (mode, the sources that validate and their validation records, the ones left
out) is logged and kept as ``val_sources`` in ``data_summary.json``.
"""
from __future__ import annotations

import collections
import difflib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .base import SkipLog
from .dedup.cache import hash_files_cached
from .dedup.edges import KINDS, find_edges, split_key, split_name, split_pair_name
from .dedup.hashing import raise_or_drop
from .dedup.resolve import HASH_SIZE, HELD_OUT, DuplicateSettings
from .dedup.search import UnionFind
from .records import NO_TUMOR, TUMOR, DataError, Record, pseudo_counts
from .splits import assign_splits, split_summary

log = logging.getLogger(__name__)

HYGIENE = ("group", "drop", "off")
#: ``data.val_sources``: the validation records training selects on (the module docstring)
VAL_SOURCES = ("trained", "all")
#: keys a source entry may set (the rest of a data config is the mix's)
SOURCE_KEYS = ("name", "reader", "root", "options", "weight", "group_regex", "duplicates", "duplicates_hamming",
               "duplicates_flips", "split", "manifest", "on_error")
#: mix keys every source inherits unless it sets them
INHERITED = ("on_error", "duplicates", "duplicates_hamming", "duplicates_flips", "split", "classes", "aliases")


@dataclass
class Source:
    """One entry of ``data.sources``: its name, sampling weight and its own data config."""

    name: str
    weight: float
    cfg: dict


def _plain(obj):
    from .dataset import _plain as plain

    return plain(obj)


def is_mix(data_cfg) -> bool:
    """Whether a data config lists sources (``data.sources`` non-empty)."""
    from .dataset import _get

    return bool(_plain(_get(data_cfg, "sources")))


def parse_sources(data_cfg) -> list[Source]:
    """``data.sources`` checked: a non-empty list of mappings with unique names, a reader and
    a root each (or a ``manifest``, e.g. the CAM pseudo masks of ``src.explain
    what=pseudo_masks``, read instead), known keys only (a misspelt key is named with its
    closest allowed one) and weights >= 0 (at least one > 0)."""
    from .dataset import _get

    raw = _plain(_get(data_cfg, "sources"))
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError("data.sources must be a non-empty list of sources ({name, reader, root, options, weight})")
    out, seen = [], set()
    for k, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise DataError(f"data.sources[{k}] must be a mapping with name, reader, root (got {entry!r})")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], SOURCE_KEYS, n=1)
            raise DataError(f"data.sources[{k}] has unknown key {unknown[0]!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else "") + f"; allowed: {list(SOURCE_KEYS)}")
        name = str(entry.get("name") or entry.get("reader") or "")
        if not name:
            raise DataError(f"data.sources[{k}] needs a name (or a reader)")
        if name in seen:
            raise DataError(f"data.sources: the name {name!r} is used twice; give each source its own name")
        seen.add(name)
        if not entry.get("manifest"):  # a manifest (e.g. CAM pseudo masks) is read instead of a reader
            for key in ("reader", "root"):
                if entry.get(key) in (None, "", "???"):
                    raise DataError(f"data.sources[{k}] ({name}) has no {key} (nor a manifest)")
        try:
            weight = float(entry.get("weight", 1.0))
        except (TypeError, ValueError):
            raise DataError(f"data.sources[{k}] ({name}): weight must be a number, got {entry.get('weight')!r}")
        if not np.isfinite(weight) or weight < 0:
            raise DataError(f"data.sources[{k}] ({name}): weight must be >= 0, got {weight}")
        cfg = {key: _get(data_cfg, key) for key in INHERITED if _get(data_cfg, key) is not None}
        cfg["split"] = {**(_plain(_get(data_cfg, "split")) or {}), **(entry.get("split") or {})}
        cfg.update({key: v for key, v in entry.items() if key not in ("split", "weight")})
        cfg["name"] = name
        cfg["options"] = {**(entry.get("options") or {}), "source": name}
        out.append(Source(name=name, weight=weight, cfg=cfg))
    if not any(s.weight > 0 for s in out):
        raise DataError("data.sources: every weight is 0; give at least one source a weight > 0")
    return out


def source_weights(data_cfg) -> dict[str, float]:
    """``{source name: weight}`` of a mix config (``{}`` for a single dataset)."""
    return {s.name: s.weight for s in parse_sources(data_cfg)} if is_mix(data_cfg) else {}


# ---- hygiene ---------------------------------------------------------------------------------
@dataclass
class HygieneSettings:
    mode: str = "group"
    allow_overlap: bool = False
    hamming: Optional[int] = 12
    flips: bool = False

    @classmethod
    def from_cfg(cls, data_cfg) -> "HygieneSettings":
        from .dataset import _get

        mode = str(_get(data_cfg, "hygiene", "group") or "off").strip().lower()
        if mode in ("false", "none"):
            mode = "off"
        if mode not in HYGIENE:
            raise DataError(f"data.hygiene must be one of {list(HYGIENE)}, got {mode!r}")
        dup = DuplicateSettings(hamming=_get(data_cfg, "duplicates_hamming", 12),
                                flips=bool(_get(data_cfg, "duplicates_flips", False)))
        return cls(mode=mode, allow_overlap=bool(_get(data_cfg, "allow_overlap", False)), hamming=dup.hamming,
                   flips=dup.flips)


def labels_conflict(labels: Sequence[Optional[str]]) -> bool:
    """Whether known labels disagree: ``no_tumor`` with a tumour, or two different subtypes
    (the generic ``tumor`` agrees with every subtype)."""
    known = {lab for lab in labels if lab is not None}
    if NO_TUMOR in known and len(known) > 1:
        return True
    return len(known - {TUMOR, NO_TUMOR}) > 1


def cross_source_pairs(records: Sequence[Record], settings: HygieneSettings, cache_dir: Optional[str],
                       on_error: str = "raise", skipped: Optional[SkipLog] = None):
    """``(records kept (the readable ones), pairs [k, 2], kinds [k], hashing info)``: duplicate
    pairs whose two images come from different sources."""
    hashes, info = hash_files_cached([r.image for r in records], cache_dir, HASH_SIZE, settings.flips,
                                     desc="hashing the mix")
    ok = raise_or_drop(hashes, on_error)
    if len(ok) < len(records):
        for h in hashes:
            if not h.ok and skipped is not None:
                skipped.add(h.path, h.error)
        records, hashes = [records[i] for i in ok], [hashes[i] for i in ok]
    edges = find_edges(hashes, settings.hamming, settings.flips)
    src = np.array([r.source for r in records], dtype=object)
    cross = src[edges.pairs[:, 0]] != src[edges.pairs[:, 1]] if len(edges) else np.zeros(0, bool)
    return list(records), edges.pairs[cross], edges.kinds[cross], info


def _components(n: int, pairs: np.ndarray) -> list[list[int]]:
    uf = UnionFind(n)
    uf.union_pairs(pairs)
    return uf.components()


def _pair_counts(records, pairs, kinds) -> dict:
    by_sources = collections.Counter(" / ".join(sorted({records[i].source, records[j].source})) for i, j in pairs)
    by_kind = collections.Counter(KINDS[k] for k in kinds)
    images = collections.Counter(records[i].source for i in np.unique(pairs.reshape(-1)))
    return {"pairs": int(len(pairs)), "by_kind": dict(sorted(by_kind.items())),
            "by_source_pair": dict(sorted(by_sources.items())), "images_by_source": dict(sorted(images.items()))}


def refuse_overlap(records, pairs, kinds) -> None:
    """The one-line refusal of a mix whose sources overlap with hygiene off."""
    c = _pair_counts(records, pairs, kinds)
    shared = ", ".join(f"{k}: {v}" for k, v in c["by_source_pair"].items())
    raise DataError(f"data.sources overlap ({len(pairs)} duplicate image pairs across sources: {shared}) and "
                    "data.hygiene=off would let copies of one image sit in different splits; set data.hygiene=group "
                    "(copies share a split) or drop (one source keeps them), or data.allow_overlap=true to accept it")


def drop_copies(records: list[Record], comps: list[list[int]], order: Sequence[str]) -> dict[int, str]:
    """``drop``: in each cross-source group the first source (``order``) keeps its copies;
    label conflicts drop the group whole. Returns ``{index: reason}``."""
    rank = {name: k for k, name in enumerate(order)}
    dropped: dict[int, str] = {}
    for c in comps:
        if labels_conflict([records[i].label for i in c]):
            dropped.update((i, "conflict") for i in c)
            continue
        keep = min(rank.get(records[i].source, len(rank)) for i in c)
        dropped.update((i, "cross_source_copy") for i in c if rank.get(records[i].source, len(rank)) != keep)
    return dropped


def unit_components(records: Sequence[Record], pairs: np.ndarray) -> list[list[int]]:
    """Split units of ``group``: cross-source pairs joined with the records' own groups; only
    the components that hold a cross-source pair."""
    n = len(records)
    uf = UnionFind(n)
    uf.union_pairs(pairs)
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.group is not None:
            uf.union(first.setdefault(r.group, i), i)
    in_pair = np.zeros(n, bool)
    in_pair[pairs.reshape(-1)] = True
    return [c for c in uf.components() if in_pair[c].any()]


def join_units(records: Sequence[Record], units: list[list[int]]) -> None:
    """Before each source is split: the members of a unit from one source get one group id
    (``<source>:unit:<k>``), so that source's splitter keeps them together. A unit holds
    whole own groups (patients, blocks, within-source copies), so no group is cut."""
    for k, c in enumerate(units):
        for i in c:
            records[i].group = f"{records[i].source}:unit:{k}"


def reconcile_splits(records: list[Record], units: list[list[int]], fixed: Sequence[Optional[str]],
                     order: Sequence[str]) -> tuple[dict[int, str], dict]:
    """``group`` after each source was split: every unit in several splits goes to one (see the
    module docstring). Returns ``({dropped index: reason}, counts)``; moves records in place."""
    rank = {name: k for k, name in enumerate(order)}
    dropped: dict[int, str] = {}
    moved = collections.Counter()
    for c in units:
        splits = {records[i].split for i in c}
        if len(splits) < 2:
            continue
        held = [fixed[i] for i in c if fixed[i] in ("val", "test")]
        if held:
            target = max(held, key=lambda s: HELD_OUT[s])
        else:
            owner = min(rank.get(records[i].source, len(rank)) for i in c)
            votes = collections.Counter(records[i].split for i in c if rank.get(records[i].source) == owner)
            target = max(votes, key=lambda s: (votes[s], HELD_OUT.get(s, -1)))
        for i in c:
            s = records[i].split
            if s == target:
                continue
            if fixed[i] in ("val", "test"):
                dropped[i] = "cross_split_copy"
            else:
                moved[split_pair_name(split_name(s), target) + f" ({records[i].source})"] += 1
                records[i].split = target
    return dropped, {"moved": int(sum(moved.values())), "moved_by": dict(sorted(moved.items()))}


def cross_split_stats(records: Sequence[Record], units: list[list[int]]) -> dict:
    """Units whose members sit in several splits (``groups``) and the split pairs they span."""
    n_groups, pairs = 0, collections.Counter()
    for c in units:
        names = sorted({split_name(records[i].split) for i in c}, key=split_key)
        if len(names) > 1:
            n_groups += 1
            for a, b in itertools.combinations(names, 2):
                pairs[split_pair_name(a, b)] += 1
    return {"groups": n_groups, "by_split_pair": dict(sorted(pairs.items()))}


# ---- loading ---------------------------------------------------------------------------------
def read_sources(sources: Sequence[Source], cache_dir: Optional[str]) -> tuple[list[Record], dict, SkipLog]:
    """Every source through :func:`~src.data.dataset.load_data` (unsplit): ``(records with
    their source and source-prefixed groups, per-source summaries, skipped files)``."""
    from .dataset import load_data

    skipped = SkipLog()
    records: list[Record] = []
    per_source: dict[str, dict] = {}
    for s in sources:
        b = load_data(s.cfg, cache_dir=cache_dir, assign=False)
        for r in b.records:
            r.source = s.name
            if r.group is not None:
                r.group = f"{s.name}:{r.group}"
        skipped.items.extend(b.skipped.items)
        per_source[s.name] = {"reader": s.cfg.get("reader"), "root": b.root, "weight": s.weight,
                              "read": len(b.records), "own_splits": any(r.split for r in b.records),
                              "skipped": b.skipped.summary(3)}
        if s.cfg.get("manifest"):
            per_source[s.name]["manifest"] = str(s.cfg["manifest"])
        if b.duplicates is not None:
            per_source[s.name]["duplicates"] = b.duplicates
        records.extend(b.records)
    return records, per_source, skipped


def load_mix(data_cfg, cache_dir: Optional[str] = None, assign: bool = True):
    """Read every source, apply the cross-source hygiene, split each source and reconcile:
    one :class:`~src.data.dataset.DataBundle` with ``sources`` and ``hygiene`` summaries."""
    from .dataset import DataBundle, _get, make_class_map, split_options

    class_map = make_class_map(data_cfg)
    sources = parse_sources(data_cfg)
    hyg = HygieneSettings.from_cfg(data_cfg)
    val_sources_mode(data_cfg)  # a bad value fails before any reading
    name = str(_get(data_cfg, "name", "mix"))
    on_error = _get(data_cfg, "on_error", "raise")
    order = [s.name for s in sources]
    records, per_source, skipped = read_sources(sources, cache_dir)
    dup_dir = str(Path(cache_dir) / "duplicates") if cache_dir else None
    records, pairs, kinds, hinfo = cross_source_pairs(records, hyg, dup_dir, on_error, skipped)
    keeps = {s.name: split_options(s.cfg)["use_existing"] for s in sources}
    fixed = [r.split if keeps.get(r.source, True) else None for r in records]  # a source's own splits, if kept
    summary = {"mode": hyg.mode, "allow_overlap": hyg.allow_overlap, "hamming": hyg.hamming, "flips": hyg.flips,
               "order": order, **_pair_counts(records, pairs, kinds),
               "hashing": {k: hinfo[k] for k in ("images", "cached", "hashed", "seconds")}}
    comps = _components(len(records), pairs)
    summary["groups"] = len(comps)
    summary["conflicts"] = sum(labels_conflict([records[i].label for i in c]) for c in comps)
    if len(pairs) and hyg.mode == "off" and not hyg.allow_overlap:
        refuse_overlap(records, pairs, kinds)
    dropped: dict[int, str] = {}
    units: list[list[int]] = []
    if hyg.mode == "drop":
        dropped = drop_copies(records, comps, order)
    elif hyg.mode == "group":
        units = unit_components(records, pairs)
        join_units(records, units)
        summary["units"] = {"count": len(units), "images": int(sum(len(c) for c in units)),
                            "largest": max((len(c) for c in units), default=0)}
    elif len(pairs):
        units = comps
        log.warning("%s: %d duplicate pairs across sources and data.hygiene=off (data.allow_overlap=true): copies "
                    "of one image may sit in different splits", name, len(pairs))
    if assign:
        for s in sources:
            recs = [r for i, r in enumerate(records) if r.source == s.name and i not in dropped]
            if recs:
                assign_splits(recs, **split_options(s.cfg))
        summary["would_cross_splits"] = cross_split_stats(records, [[i for i in c if i not in dropped] for c in units])
        if hyg.mode == "group":
            more, moved = reconcile_splits(records, units, fixed, order)
            dropped.update(more)
            summary.update(moved)
    summary["dropped"] = {"images": len(dropped), "by_reason": dict(collections.Counter(dropped.values())),
                          "by_source": dict(collections.Counter(records[i].source for i in dropped))}
    kept_units = [[i for i in c if i not in dropped] for c in (units or comps)]
    records = [r for i, r in enumerate(records) if i not in dropped]
    if assign:
        summary["cross_splits_after"] = _after(kept_units, dropped, len(fixed), records)
    for s in sources:
        recs = [r for r in records if r.source == s.name]
        per_source[s.name].update(images=len(recs), splits=split_summary(recs) if recs else {})
        pseudo = pseudo_counts(recs)
        if pseudo:
            per_source[s.name]["pseudo"] = pseudo  # model-made targets (a pseudo-mask manifest), counted apart
    _log(name, summary)
    bundle = DataBundle(name=name, records=records, class_map=class_map, skipped=skipped,
                        root="; ".join(f"{k}={v['root']}" for k, v in per_source.items()))
    bundle.sources = per_source
    bundle.hygiene = summary
    return bundle


def _after(units: list[list[int]], dropped: dict, n: int, kept: list[Record]) -> dict:
    """Cross-split statistics of the units after the drops (indices renumbered to ``kept``)."""
    new_index = {}
    j = 0
    for i in range(n):
        if i not in dropped:
            new_index[i] = j
            j += 1
    renum = [[new_index[i] for i in c] for c in units]
    return cross_split_stats(kept, renum)


def _log(name: str, s: dict) -> None:
    log.info("%s: hygiene=%s: %d duplicate pairs across sources (%s) in %d groups; %d dropped, %d moved; hashing "
             "%d cached + %d new in %.1f s", name, s["mode"], s["pairs"], s["by_source_pair"], s["groups"],
             s["dropped"]["images"], s.get("moved", 0), s["hashing"]["cached"], s["hashing"]["hashed"],
             s["hashing"]["seconds"])
    after = s.get("cross_splits_after")
    if after and after["groups"] and s["mode"] != "off":
        log.warning("%s: %d cross-source duplicate groups still in several splits: %s", name, after["groups"],
                    after["by_split_pair"])


# ---- validation during training ----------------------------------------------------------------
def val_sources_mode(data_cfg) -> str:
    """``data.val_sources`` checked: ``trained`` (the default, also for null) or ``all``."""
    from .dataset import _get

    mode = str(_get(data_cfg, "val_sources", "trained") or "trained").strip().lower()
    if mode not in VAL_SOURCES:
        raise DataError(f"data.val_sources must be one of {list(VAL_SOURCES)}, got {mode!r}")
    return mode


def validation_records(bundle, data_cfg) -> list[Record]:
    """The validation records training selects on (see the module docstring): the ``val``
    split, of a mix with ``data.val_sources=trained`` only the records of sources with a
    weight > 0. The decision is logged and kept in ``bundle.val_sources`` (the bundle
    summary: ``data_summary.json``). A mix whose training sources have no validation record
    is refused (:class:`~src.data.records.DataError`), naming ``data.val_sources=all``."""
    mode = val_sources_mode(data_cfg)
    val = bundle.split("val")
    if not bundle.sources:
        return val
    weights = {name: float(info.get("weight", 1.0)) for name, info in bundle.sources.items()}
    chosen = [name for name, w in weights.items() if mode == "all" or w > 0]
    counts = collections.Counter(r.source for r in val)
    kept = [r for r in val if r.source in set(chosen)]
    bundle.val_sources = {"mode": mode, "sources": chosen,
                          "val_records": {name: counts.get(name, 0) for name in chosen},
                          "left_out": {name: counts.get(name, 0) for name in weights if name not in chosen}}
    log.info("%s: validation during training (data.val_sources=%s) on %s; left out: %s", bundle.name, mode,
             ", ".join(f"{n} ({c} val records)" for n, c in bundle.val_sources["val_records"].items()),
             ", ".join(f"{n} (weight 0, {c} val records)" for n, c in bundle.val_sources["left_out"].items())
             or "none")
    if val and not kept:
        raise DataError(f"data.val_sources={mode}: the sources that train ({', '.join(chosen)}) have no validation "
                        f"record; the validation split holds only {dict(counts)}: set data.val_sources=all")
    return kept
