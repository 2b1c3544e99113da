"""Duplicates in :func:`src.data.dataset.load_data`: ``data.duplicates: keep | group | drop``.

Run on the records *before* splits are assigned, over a list of records from one or
several sources (only image paths, labels, group ids and splits are read):

1. every image is hashed (:mod:`.hashing`; cached on disk per file, :mod:`.cache`);
2. duplicate pairs are found (:func:`.edges.find_edges`: exact, near within
   ``duplicates_hamming`` bits, mirrored with ``duplicates_flips``) and joined into
   duplicate groups (union-find: copies of copies are one group);
3. the mode is applied.

``keep``   nothing happens (the default; nothing is even hashed).
``group``  every duplicate group becomes one split group, so the group-aware splitter puts
           all copies in one split. The union is taken with the records' own groups
           (patients, contiguous blocks): a patient group and a duplicate group that share
           an image end up as one group (union-find over both). A group keeps its existing
           id when it had exactly one; groups that merge several get ``dup:<smallest id>``,
           groups of ungrouped copies ``dup:<first image path>``. Label conflicts (copies
           with different labels) are kept and counted.
``drop``   one record per duplicate group is kept: the training copy when the dataset has
           its own splits (then one without a split, then val, then test; then a
           labelled one, the largest, the first path), otherwise the first by path. Groups
           whose copies disagree on the label are dropped whole (``conflict``).

Fixed splits. A record that carries a split from its dataset (its own train/val/test
folders, kept with ``data.split.use_existing``) cannot move. With ``group``, when a
duplicate group spans several fixed splits, the copies in the *less held-out* splits are
dropped (order train < val < test; reason ``cross_split_copy``) and the held-out copies
stay: the published test set stays whole and comparable, and no test image keeps a
copy in training (nor a val image, nor a test image in val). This is warned about with
counts and is in the summary. Records without a split in a group with fixed members take
that split (``pinned``): an image from a source without splits goes where its copies are.
With ``drop`` the rule above keeps the training copy, so the test set loses its copies
of training images (as :mod:`src.curate`'s cleaned manifest does).

:func:`resolve_duplicates` returns the kept records and a summary (``DataBundle.summary()``,
``data_summary.json`` of every run): hashing (cached / hashed / seconds), duplicate groups
by kind, conflicts, groups merged with existing groups, groups spanning fixed splits,
records dropped by reason, and, when an ``assign`` function is given, how many duplicate
groups the same splitter would have put in several splits without this step
(``would_cross_splits``: the leaks prevented); :meth:`Resolved.finish` adds how many do
after the real assignment (``cross_splits_after``: 0).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..records import DataError, Record
from .cache import hash_files_cached
from .edges import Edges, find_edges, level_counts, split_key, split_name, split_pair_name
from .hashing import raise_or_drop
from .search import UnionFind

log = logging.getLogger(__name__)

MODES = ("keep", "group", "drop")
HASH_SIZE = 16  # 256-bit perceptual hashes (64 bits put different MRI slices at distance 0)
KEEP = ("prefer_train", "first")
DROP_REASONS = ("duplicate", "cross_split_copy", "conflict")
SPLIT_RANK = {"train": 0, "none": 1, "val": 2, "test": 3}  # which copy ``prefer_train`` keeps
HELD_OUT = {"train": 0, "val": 1, "test": 2}  # which fixed split wins when copies span several (group)


# ---- which copy is kept (shared with src.curate's cleaned manifest) -------------------
def keep_rank(r: Record, pixels: int = 0, keep: str = "prefer_train") -> tuple:
    """Sort key: the smallest member of a group is the one kept."""
    if keep == "first":
        return (r.image,)
    return (SPLIT_RANK.get(split_name(r.split), 4), 0 if r.label is not None else 1, -pixels, r.image)


def plan_drops(records: Sequence[Record], groups: Sequence[Sequence[int]], keep: str = "prefer_train",
               drop_conflicts: bool = True, pixels: Optional[Sequence[int]] = None) -> dict[int, str]:
    """``{index: reason}`` of the records to drop so that one per group remains.

    A group whose members carry more than one label is dropped whole (``conflict``) when
    ``drop_conflicts``; otherwise the member with the smallest :func:`keep_rank` stays and
    the others go: ``cross_split_copy`` when in another split than the kept one, else
    ``duplicate``. No record is changed.
    """
    if keep not in KEEP:
        raise DataError(f"keep must be one of {list(KEEP)}, got {keep!r}")
    px = list(pixels) if pixels is not None else [0] * len(records)
    dropped: dict[int, str] = {}
    for members in groups:
        if drop_conflicts and len({records[i].label for i in members if records[i].label is not None}) > 1:
            dropped.update((i, "conflict") for i in members)
            continue
        best = min(members, key=lambda i: keep_rank(records[i], px[i], keep))
        kept_split = split_name(records[best].split)
        for i in members:
            if i != best:
                dropped[i] = "cross_split_copy" if split_name(records[i].split) != kept_split else "duplicate"
    return dropped


# ---- settings ---------------------------------------------------------------------------
@dataclass
class DuplicateSettings:
    """``data.duplicates``, ``data.duplicates_hamming``, ``data.duplicates_flips`` (conf/data/_pipeline.yaml)."""

    mode: str = "keep"
    hamming: Optional[int] = 12  # None: exact copies only
    flips: bool = False
    workers: int = 0  # hashing threads (0 = one per CPU core)
    progress: Optional[bool] = None  # None: a bar when many files need hashing

    def __post_init__(self):
        if self.mode in (None, False):
            self.mode = "keep"
        self.mode = str(self.mode).strip().lower()
        if self.mode not in MODES:
            raise DataError(f"data.duplicates must be one of {list(MODES)}, got {self.mode!r}")
        if self.hamming is not None:
            if not 0 <= int(self.hamming) < HASH_SIZE ** 2:
                raise DataError(f"data.duplicates_hamming must be in [0, {HASH_SIZE ** 2}) bits or null, "
                                f"got {self.hamming}")
            self.hamming = int(self.hamming)
        if self.flips and self.hamming is None:
            raise DataError("data.duplicates_flips needs the perceptual pass (data.duplicates_hamming is null)")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("exact",) + (("near",) if self.hamming is not None else ()) + (("flip",) if self.flips else ())


# ---- result -----------------------------------------------------------------------------
@dataclass
class Resolved:
    """The kept records, the duplicate groups among them and what was done (``summary``)."""

    records: list[Record]
    groups: list[list[Record]] = field(default_factory=list)  # kept members of each duplicate group
    summary: dict = field(default_factory=dict)

    def finish(self) -> dict:
        """After splits are assigned: count duplicate groups still in several splits (0 with ``group``
        and ``drop``: a nonzero count is a bug or a dataset whose own splits could not be honoured)."""
        stats = _split_stats([[r.split for r in g] for g in self.groups])
        self.summary["cross_splits_after"] = stats["groups"]
        if stats["groups"]:
            log.warning("%d duplicate groups are still in more than one split: %s", stats["groups"],
                        stats["by_split_pair"])
        return self.summary


def _split_stats(group_splits: Sequence[Sequence[Optional[str]]]) -> dict:
    """Groups whose members are in several splits; ``records_apart`` = members outside the group's
    most common split (the records that would sit in another split than their copies)."""
    n_groups = images = apart = 0
    pairs: collections.Counter = collections.Counter()
    for splits in group_splits:
        c = collections.Counter(split_name(s) for s in splits)
        if len(c) < 2:
            continue
        n_groups += 1
        images += len(splits)
        apart += len(splits) - c.most_common(1)[0][1]
        names = sorted(c, key=split_key)
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                pairs[split_pair_name(a, b)] += 1
    return {"groups": n_groups, "images": images, "records_apart": apart, "by_split_pair": dict(sorted(pairs.items()))}


# ---- group mode -------------------------------------------------------------------------
def _union(records: Sequence[Record], pairs: np.ndarray, alive: np.ndarray) -> UnionFind:
    """Union-find over duplicate pairs and the records' own group ids (alive records only)."""
    uf = UnionFind(len(records))
    uf.union_pairs(pairs)
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if alive[i] and r.group is not None:
            uf.union(first.setdefault(r.group, i), i)
    return uf


def _drop_lower_fixed(comps: Sequence[Sequence[int]], fixed: Sequence[Optional[str]], droppable: np.ndarray) -> dict:
    """In each component whose fixed splits differ, the droppable members in a less held-out split."""
    out = {}
    for c in comps:
        splits = {fixed[i] for i in c if fixed[i]}
        if len(splits) > 1:
            top = max(splits, key=lambda s: HELD_OUT.get(s, -1))
            out.update((i, "cross_split_copy") for i in c if fixed[i] and fixed[i] != top and droppable[i])
    return out


def _group(records: list[Record], edges: Edges, fixed: Sequence[Optional[str]]) -> tuple[dict[int, str], dict]:
    """Merge duplicate groups with the records' own groups (ids and, for records without a fixed
    split, the split); returns ``({dropped index: reason}, counts)``."""
    n = len(records)
    alive = np.ones(n, bool)
    dropped: dict[int, str] = {}
    pairs = edges.pairs
    while True:
        live = pairs[alive[pairs[:, 0]] & alive[pairs[:, 1]]] if len(pairs) else pairs
        in_dup = np.zeros(n, bool)
        in_dup[live.reshape(-1)] = True
        # copies of one image in different fixed splits; then chains through other records' groups
        dup_uf = UnionFind(n)
        dup_uf.union_pairs(live)
        new = _drop_lower_fixed(dup_uf.components(), fixed, in_dup)
        if not new:
            new = _drop_lower_fixed(_union(records, live, alive).components(), fixed, in_dup)
        if not new:
            break
        dropped.update(new)
        alive[list(new)] = False
    uf = _union(records, live, alive)
    counts = {"touching_existing_groups": 0, "existing_groups_merged": 0, "pinned": 0}
    for c in uf.components():
        c = [i for i in c if alive[i]]
        if not in_dup[c].any():
            continue  # one existing group, no duplicates in it: untouched
        ids = sorted({records[i].group for i in c if records[i].group is not None})
        counts["touching_existing_groups"] += bool(ids)
        counts["existing_groups_merged"] += len(ids) if len(ids) > 1 else 0
        gid = ids[0] if len(ids) == 1 else f"dup:{ids[0]}" if ids else f"dup:{min(records[i].image for i in c)}"
        splits = {fixed[i] for i in c if fixed[i]}
        for i in c:
            records[i].group = gid
            if len(splits) == 1 and not fixed[i]:
                records[i].split = next(iter(splits))
                counts["pinned"] += 1
    return dropped, counts


# ---- the step load_data runs ---------------------------------------------------------------
def resolve_duplicates(records: Sequence[Record], settings: DuplicateSettings, fixed_splits: bool = False,
                       cache_dir: Optional[str] = None, on_error: str = "raise", skipped=None,
                       assign: Optional[Callable[[list[Record]], object]] = None, name: str = "data") -> Resolved:
    """Apply ``settings.mode`` to ``records`` (group ids and splits of kept records may change).

    ``fixed_splits``: the records' ``split`` values are the dataset's own and cannot change
    (``data.split.use_existing`` with a dataset that has splits). ``skipped``: a
    :class:`src.data.base.SkipLog` that counts unreadable images under ``on_error=skip``.
    ``assign``: the split assignment load_data will run, used on copies of the records to
    count the leaks this step prevents.
    """
    records = list(records)
    if settings.mode == "keep" or not records:
        return Resolved(records, [], {"mode": settings.mode})
    hashes, hinfo = hash_files_cached([r.image for r in records], cache_dir, HASH_SIZE, settings.flips,
                                      settings.workers, settings.progress, desc=f"hashing {name}")
    ok = raise_or_drop(hashes, on_error)
    if len(ok) < len(records):
        for h in hashes:
            if not h.ok:
                log.warning("skipping %s", h.error)
                if skipped is not None:
                    skipped.add(h.path, h.error)
        records, hashes = [records[i] for i in ok], [hashes[i] for i in ok]
    t = time.perf_counter()
    n = len(records)
    edges = find_edges(hashes, settings.hamming, settings.flips)
    levels, _ = level_counts(n, edges, settings.kinds)
    uf = UnionFind(n)
    uf.union_pairs(edges.pairs)
    comps = uf.components()
    conflicts = [c for c in comps if len({records[i].label for i in c if records[i].label is not None}) > 1]
    fixed = [r.split if fixed_splits and r.split else None for r in records]
    would = None
    if assign is not None:
        copies = [dataclasses.replace(r) for r in records]
        assign(copies)
        would = _split_stats([[copies[i].split for i in c] for c in comps])
    fixed_stats = _split_stats([[fixed[i] for i in c if fixed[i]] for c in comps])
    counts: dict = {}
    if settings.mode == "drop":
        dropped = plan_drops(records, comps, "prefer_train" if fixed_splits else "first", True,
                             [int(np.prod(h.shape[:2])) for h in hashes])
        if not fixed_splits:  # splits are assigned afterwards: every dropped copy is just a duplicate
            dropped = {i: "duplicate" if why == "cross_split_copy" else why for i, why in dropped.items()}
    else:
        dropped, counts = _group(records, edges, fixed)
    kept = [r for i, r in enumerate(records) if i not in dropped]
    groups = [[records[i] for i in c if i not in dropped] for c in comps]
    by_reason = collections.Counter(dropped.values())
    summary = {
        "mode": settings.mode, "hamming": settings.hamming, "flips": settings.flips, "fixed_splits": fixed_splits,
        "images": n, "kinds": levels,
        "groups": len(comps), "images_in_groups": int(sum(len(c) for c in comps)),
        "copies": int(sum(len(c) - 1 for c in comps)), "largest": max((len(c) for c in comps), default=0),
        "conflicts": {"groups": len(conflicts), "images": int(sum(len(c) for c in conflicts))},
        **counts,
        "fixed_split_groups": {k: fixed_stats[k] for k in ("groups", "images", "by_split_pair")},
        "would_cross_splits": would,
        "dropped": {"images": len(dropped), "by_reason": {k: by_reason.get(k, 0) for k in DROP_REASONS},
                    "by_split": dict(sorted(collections.Counter(split_name(fixed[i]) for i in dropped).items()))},
        "kept": len(kept),
        "hashing": hinfo, "search_s": round(time.perf_counter() - t, 3),
    }
    _log(name, summary)
    return Resolved(kept, [g for g in groups if len(g) > 1], summary)


def _log(name: str, s: dict) -> None:
    log.info("%s: duplicates=%s: %d groups (%d copies) among %d images; %d dropped; hashing %d cached + %d new "
             "in %.1f s", name, s["mode"], s["groups"], s["copies"], s["images"], s["dropped"]["images"],
             s["hashing"]["cached"], s["hashing"]["hashed"], s["hashing"]["seconds"])
    f = s["fixed_split_groups"]
    if f["groups"]:
        what = ("the copies in the less held-out split were dropped (train < val < test): the dataset's own "
                "held-out splits stay whole" if s["mode"] == "group" else
                "one copy was kept per group (the training copy): the held-out splits lost their copies")
        log.warning("%s: %d duplicate groups (%d images) span the dataset's own splits %s, which cannot move: %s; "
                    "%d images dropped as cross-split copies", name, f["groups"], f["images"], f["by_split_pair"],
                    what, s["dropped"]["by_reason"]["cross_split_copy"])
    if s["conflicts"]["groups"]:
        log.warning("%s: %d duplicate groups (%d images) disagree on the label: %s", name, s["conflicts"]["groups"],
                    s["conflicts"]["images"], "dropped" if s["mode"] == "drop" else "kept together in one split")
