"""Duplicate pairs (edges) of four kinds, and how many groups they form.

Kinds, strongest first (a pair found by several passes keeps the strongest kind):

``exact``      same canonical pixels (:mod:`.hashing`), distance 0
``near``       perceptual-hash Hamming distance ``<= hamming`` (re-encoded, resized,
               slightly edited copies); distance = Hamming distance in bits
``flip``       the mirrored image of one is within ``hamming`` of the other (only with
               ``include_flips``); distance = that Hamming distance
``embedding``  cosine similarity of network features ``>= threshold`` (only when features
               are given; :mod:`src.curate.embeddings` makes them); distance = ``1 - cosine``

Groups are the connected components of the edges (union-find): ``a~b`` and ``b~c`` put
``a, b, c`` in one group even when ``a`` and ``c`` differ more than the threshold.
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


def split_name(s: Optional[str]) -> str:
    """A record's split for reports: its name, or ``none``."""
    return s if s else "none"


def split_key(s: str):
    """Sort key of split names: train, val, test, none, then the rest by name."""
    return (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s)


def split_pair_name(a: str, b: str) -> str:
    a, b = sorted((a, b), key=split_key)
    return f"{a}/{b}"


@dataclass
class Edges:
    """Pairs ``i < j`` of duplicate images with their kind (index in :data:`KINDS`) and distance."""

    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int8))
    distance: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float64))

    def __len__(self) -> int:
        return len(self.pairs)

    def where(self, m: np.ndarray) -> "Edges":
        return Edges(self.pairs[m], self.kinds[m], self.distance[m])

    def of_kinds(self, kinds: Sequence[str]) -> "Edges":
        return self.where(np.isin(self.kinds, [KINDS.index(k) for k in kinds]))

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


def component_roots(n: int, pairs) -> np.ndarray:
    """The union-find root of each of ``0..n-1`` after joining ``pairs``."""
    uf = UnionFind(n)
    uf.union_pairs(pairs)
    return np.array([uf.find(i) for i in range(n)], np.int64)


def level_counts(n: int, edges: Edges, kinds: Sequence[str] = ("exact", "near")) -> tuple[dict, dict[int, np.ndarray]]:
    """Groups formed by each searched kind *and the stronger ones* (cumulative, strongest first).

    Returns ``(levels, roots)``: ``levels[kind]`` = ``{pairs, groups, images, extra_copies}``
    (``extra_copies`` = images in groups - groups: how many images would go if one per
    group were kept) and ``roots[k]`` = the component root of every image at level ``k``.
    A kind is counted when it is in ``kinds`` or has edges.
    """
    searched = {KINDS.index(k) for k in kinds} | {int(k) for k in edges.kinds}
    levels: dict = {}
    roots: dict[int, np.ndarray] = {}
    for k in range(len(KINDS)):
        if k not in searched:
            continue
        sub = edges.where(edges.kinds <= k)
        r = component_roots(n, sub.pairs) if len(sub) else np.arange(n)
        roots[k] = r
        sizes = [c for c in collections.Counter(r.tolist()).values() if c > 1]
        levels[KINDS[k]] = {"pairs": edges.count(KINDS[k]), "groups": len(sizes), "images": int(sum(sizes)),
                            "extra_copies": int(sum(sizes) - len(sizes))}
    return levels, roots
