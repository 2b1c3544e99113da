"""Duplicate groups and what they say: within a split, across splits, label conflicts.

The pairs (edges) and their kinds come from :mod:`src.data.dedup.edges` (``exact``,
``near``, ``flip``, ``embedding``, strongest first). Groups are the connected components
of all edges (union-find). A group *crosses splits* (leakage) when its members are in
more than one split, and is a *conflict* when its members carry more than one known label.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..data.dedup.edges import (KINDS, SPLIT_ORDER, Edges, exact_ids, find_edges, level_counts,  # noqa: F401
                                phash_matrix, split_key, split_name, split_pair_name)
from ..data.dedup.search import UnionFind


@dataclass
class Group:
    """One connected component of duplicate edges (indices into the image list)."""

    id: int
    members: list[int]
    kind: str  # the weakest kind needed to connect the whole group
    splits: list[str]  # sorted distinct splits of its members
    labels: list[str]  # sorted distinct known labels of its members
    member_kind: dict[int, str] = field(default_factory=dict)  # strongest link of each member
    member_distance: dict[int, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def cross_split(self) -> bool:
        return len(self.splits) > 1

    @property
    def conflict(self) -> bool:
        return len(self.labels) > 1


def build_groups(n: int, edges: Edges, splits: Sequence[Optional[str]], labels: Sequence[Optional[str]],
                 kinds: Sequence[str] = ("exact", "near")) -> tuple[list[Group], dict]:
    """Groups (largest first, ids from 1) and cumulative counts per searched kind (``kinds``).

    The counts are cumulative, strongest kind first: ``levels["near"]`` counts the groups
    formed by exact *and* near edges. ``extra_copies`` = images in groups - groups: how
    many images would go if one per group were kept.
    """
    splits = [split_name(s) for s in splits]
    uf = UnionFind(n)
    uf.union_pairs(edges.pairs)
    comps = uf.components()
    levels, level_roots = level_counts(n, edges, kinds)
    # strongest link per member
    best_kind = np.full(n, 99, np.int64)
    best_dist = np.full(n, np.inf)
    if len(edges):
        o = np.lexsort((edges.distance, edges.kinds))
        for col in (0, 1):
            idx = edges.pairs[o, col]
            _, first = np.unique(idx, return_index=True)
            for i, kk, dd in zip(idx[first], edges.kinds[o][first], edges.distance[o][first]):
                if (kk, dd) < (best_kind[i], best_dist[i]):
                    best_kind[i], best_dist[i] = kk, dd
    groups = []
    for gid, members in enumerate(comps, 1):
        kind = KINDS[-1]
        for k in sorted(level_roots):
            r = level_roots[k][members]
            if (r == r[0]).all():
                kind = KINDS[k]
                break
        groups.append(Group(
            id=gid, members=members, kind=kind,
            splits=sorted({splits[i] for i in members}, key=split_key),
            labels=sorted({labels[i] for i in members if labels[i] is not None}),
            member_kind={i: KINDS[int(best_kind[i])] for i in members},
            member_distance={i: float(best_dist[i]) for i in members}))
    return groups, levels


def group_stats(groups: Sequence[Group]) -> dict:
    """Counts for ``summary.json``: within a split, crossing splits (per split pair), conflicts."""
    within = collections.Counter()
    cross_pairs = collections.Counter()
    by_kind: dict = {}
    for g in groups:
        k = by_kind.setdefault(g.kind, {"groups": 0, "images": 0})
        k["groups"] += 1
        k["images"] += g.size
        if g.cross_split:
            for a_i, a in enumerate(g.splits):
                for b in g.splits[a_i + 1:]:
                    cross_pairs[split_pair_name(a, b)] += 1
        else:
            within[g.splits[0]] += 1
    cross = [g for g in groups if g.cross_split]
    conflicts = [g for g in groups if g.conflict]
    return {
        "count": len(groups),
        "images": int(sum(g.size for g in groups)),
        "extra_copies": int(sum(g.size - 1 for g in groups)),
        "largest": max((g.size for g in groups), default=0),
        "by_kind": {k: by_kind[k] for k in KINDS if k in by_kind},
        "within_split": dict(sorted(within.items(), key=lambda kv: split_key(kv[0]))),
        "cross_split": {"groups": len(cross), "images": int(sum(g.size for g in cross)),
                        "by_split_pair": dict(sorted(cross_pairs.items()))},
        "conflicts": {"groups": len(conflicts), "images": int(sum(g.size for g in conflicts)),
                      "cross_split": sum(1 for g in conflicts if g.cross_split),
                      "label_sets": dict(collections.Counter("|".join(g.labels) for g in conflicts).most_common())},
    }
