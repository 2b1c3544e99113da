"""Duplicate pairs (edges) of four kinds, their groups, and what the groups say.

Kinds, strongest first (a pair found by several passes keeps the strongest kind):

``exact``      same canonical pixels (:mod:`src.curate.hashing`), distance 0
``near``       perceptual-hash Hamming distance ``<= hamming`` (re-encoded, resized,
               slightly edited copies); distance = Hamming distance in bits
``flip``       the mirrored image of one is within ``hamming`` of the other (only with
               ``include_flips``); distance = that Hamming distance
``embedding``  cosine similarity of network features ``>= threshold`` (only with
               ``embeddings``); distance = ``1 - cosine``

Groups are the connected components of all edges (union-find): ``a~b`` and ``b~c`` put
``a, b, c`` in one group even when ``a`` and ``c`` differ more than the threshold. A
group *crosses splits* (leakage) when its members are in more than one split, and is a
*conflict* when its members carry more than one known label.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .hashing import ImageHashes
from .search import UnionFind, cosine_pairs, hamming_cross, hamming_pairs, stack_bits

KINDS: tuple[str, ...] = ("exact", "near", "flip", "embedding")
SPLIT_ORDER = ("train", "val", "test", "none")


@dataclass
class Edges:
    """Pairs ``i < j`` of duplicate images with their kind (index in :data:`KINDS`) and distance."""

    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int8))
    distance: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float64))

    def __len__(self) -> int:
        return len(self.pairs)

    def of_kinds(self, kinds: Sequence[str]) -> "Edges":
        ids = [KINDS.index(k) for k in kinds]
        m = np.isin(self.kinds, ids)
        return Edges(self.pairs[m], self.kinds[m], self.distance[m])

    def count(self, kind: str) -> int:
        return int((self.kinds == KINDS.index(kind)).sum())


def exact_ids(hashes: Sequence[ImageHashes]) -> np.ndarray:
    """Integer id per image: equal ids = equal exact hashes."""
    _, inv = np.unique(np.array([h.exact for h in hashes], dtype=object).astype(str), return_inverse=True)
    return inv.astype(np.int64)


def phash_matrix(hashes: Sequence[ImageHashes], attr: str = "phash") -> np.ndarray:
    rows = [getattr(h, attr) for h in hashes]
    nbytes = max((len(r) for r in rows if r is not None), default=8)
    return stack_bits(rows, nbytes)


def find_edges(hashes: Sequence[ImageHashes], hamming: Optional[int], include_flips: bool = False,
               features: Optional[np.ndarray] = None, cosine: float = 0.97, block: int = 2048) -> Edges:
    """Every duplicate pair among ``hashes`` (all hashed, no errors), strongest kind first.

    ``hamming=None`` skips the perceptual passes (exact duplicates, and embeddings if given)."""
    n = len(hashes)
    if n < 2:
        return Edges()
    ex = exact_ids(hashes)
    parts_pairs, parts_kind, parts_dist = [], [], []

    # exact: a star per bucket of equal pixels
    order = np.argsort(ex, kind="stable")
    s = ex[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    first = np.repeat(order[starts], np.diff(np.r_[starts, n]))
    m = first != order
    if m.any():
        p = np.sort(np.stack([first[m], order[m]], axis=1), axis=1)
        parts_pairs.append(p)
        parts_kind.append(np.full(len(p), 0, np.int8))
        parts_dist.append(np.zeros(len(p)))

    if hamming is not None:
        bits = phash_matrix(hashes)
        near = hamming_pairs(bits, hamming, block=block)
        near = near[ex[near[:, 0]] != ex[near[:, 1]]]
        if len(near):
            parts_pairs.append(near[:, :2])
            parts_kind.append(np.full(len(near), 1, np.int8))
            parts_dist.append(near[:, 2].astype(np.float64))

    if include_flips and hamming is not None:
        fl = hamming_cross(phash_matrix(hashes, "flip"), bits, hamming, block=block)
        fl = fl[(fl[:, 0] != fl[:, 1]) & (ex[fl[:, 0]] != ex[fl[:, 1]])]
        if len(fl):
            fl = fl[np.argsort(fl[:, 2], kind="stable")]
            parts_pairs.append(np.sort(fl[:, :2], axis=1))
            parts_kind.append(np.full(len(fl), 2, np.int8))
            parts_dist.append(fl[:, 2].astype(np.float64))

    if features is not None:
        pe, sim = cosine_pairs(features, cosine, block=block)
        keep = ex[pe[:, 0]] != ex[pe[:, 1]]
        pe, sim = pe[keep], sim[keep]
        if len(pe):
            o = np.argsort(-sim, kind="stable")
            parts_pairs.append(pe[o])
            parts_kind.append(np.full(len(pe), 3, np.int8))
            parts_dist.append(np.round(1.0 - sim[o].astype(np.float64), 6))

    if not parts_pairs:
        return Edges()
    pairs = np.concatenate(parts_pairs)
    kinds = np.concatenate(parts_kind)
    dist = np.concatenate(parts_dist)
    # one edge per pair: the first occurrence = the strongest kind (then the smallest distance)
    _, first_idx = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    first_idx = np.sort(first_idx)
    return Edges(pairs[first_idx], kinds[first_idx], dist[first_idx])


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


def split_name(s: Optional[str]) -> str:
    return s if s else "none"


def _split_key(s: str):
    return (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s)


def split_pair_name(a: str, b: str) -> str:
    a, b = sorted((a, b), key=_split_key)
    return f"{a}/{b}"


def _roots(n: int, edges: Edges) -> np.ndarray:
    uf = UnionFind(n)
    uf.union_pairs(edges.pairs)
    return np.array([uf.find(i) for i in range(n)], np.int64)


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
    searched = {KINDS.index(k) for k in kinds} | {int(k) for k in edges.kinds}
    levels: dict = {}
    level_roots: dict[int, np.ndarray] = {}
    for k in range(len(KINDS)):
        sub = Edges(edges.pairs[edges.kinds <= k], edges.kinds[edges.kinds <= k], edges.distance[edges.kinds <= k])
        if k not in searched:
            continue
        roots = _roots(n, sub) if len(sub) else np.arange(n)
        level_roots[k] = roots
        counts = collections.Counter(roots.tolist())
        sizes = [c for c in counts.values() if c > 1]
        levels[KINDS[k]] = {"pairs": edges.count(KINDS[k]), "groups": len(sizes), "images": int(sum(sizes)),
                            "extra_copies": int(sum(sizes) - len(sizes))}
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
            splits=sorted({splits[i] for i in members}, key=_split_key),
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
        "within_split": dict(sorted(within.items(), key=lambda kv: _split_key(kv[0]))),
        "cross_split": {"groups": len(cross), "images": int(sum(g.size for g in cross)),
                        "by_split_pair": dict(sorted(cross_pairs.items()))},
        "conflicts": {"groups": len(conflicts), "images": int(sum(g.size for g in conflicts)),
                      "cross_split": sum(1 for g in conflicts if g.cross_split),
                      "label_sets": dict(collections.Counter("|".join(g.labels) for g in conflicts).most_common())},
    }
