"""The cleaning policy: which images a cleaned manifest keeps.

For every group of duplicates (connected components of the edges whose kind is in
``policy.kinds``):

* ``drop_conflicts`` and the members carry more than one known label -> every member is
  dropped (reason ``conflict``): nobody knows which label is right;
* otherwise one member is kept and the others are dropped. ``keep: prefer_train`` keeps
  a training copy when there is one (then an image without a split, then val, then
  test); among those, a labelled one, then the largest (pixels), then the first path.
  ``keep: first`` keeps the first path. Dropped copies in another split than the kept
  one have reason ``cross_split_copy`` (so test no longer holds training images), the
  others ``duplicate``.
* ``drop_against``: images found in the ``curate.against`` dataset are dropped too
  (reason ``in_against``).

An image's split is never changed: a kept image keeps its split, and nothing is moved
from one split to another (records are only removed).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from ..data.dedup.edges import KINDS, Edges, split_name
from ..data.dedup.resolve import DROP_REASONS, KEEP, plan_drops
from ..data.dedup.search import UnionFind
from ..data.records import DataError, Record

REASONS = (*DROP_REASONS, "in_against")


@dataclass
class Policy:
    keep: str = "prefer_train"
    drop_conflicts: bool = True
    kinds: tuple = ("exact", "near", "flip")
    drop_against: bool = False

    def __post_init__(self):
        if self.keep not in KEEP:
            raise DataError(f"curate.policy.keep must be one of {list(KEEP)}, got {self.keep!r}")
        self.kinds = tuple(KINDS if self.kinds is None else self.kinds)
        bad = sorted(set(self.kinds) - set(KINDS))
        if bad:
            raise DataError(f"curate.policy.kinds: unknown kind(s) {bad}; use some of {list(KINDS)}")

    @classmethod
    def from_cfg(cls, cfg) -> "Policy":
        cfg = dict(cfg or {})
        kinds = cfg.get("kinds", ("exact", "near", "flip"))
        return cls(keep=str(cfg.get("keep", "prefer_train")), drop_conflicts=bool(cfg.get("drop_conflicts", True)),
                   kinds=None if kinds is None else tuple(kinds), drop_against=bool(cfg.get("drop_against", False)))


def apply_policy(records: Sequence[Record], edges: Edges, policy: Policy, pixels: Optional[Sequence[int]] = None,
                 against: Iterable[int] = ()) -> tuple[list[int], dict[int, str], dict]:
    """``(kept indices, {dropped index: reason}, stats)`` for ``records`` (no record is changed)."""
    n = len(records)
    pixels = list(pixels) if pixels is not None else [(r.width or 0) * (r.height or 0) for r in records]
    uf = UnionFind(n)
    uf.union_pairs(edges.of_kinds(policy.kinds).pairs)
    groups = uf.components()
    dropped = plan_drops(records, groups, policy.keep, policy.drop_conflicts, pixels)
    if policy.drop_against:
        for i in against:
            dropped.setdefault(int(i), "in_against")
    kept = [i for i in range(n) if i not in dropped]
    by_reason = collections.Counter(dropped.values())
    by_split_dropped = collections.Counter(split_name(records[i].split) for i in dropped)
    by_split_kept = collections.Counter(split_name(records[i].split) for i in kept)
    stats = {"images": n, "kept": len(kept), "dropped": len(dropped), "groups": len(groups),
             "by_reason": {k: by_reason.get(k, 0) for k in REASONS},
             "kept_by_split": dict(sorted(by_split_kept.items())),
             "dropped_by_split": dict(sorted(by_split_dropped.items())),
             "policy": {"keep": policy.keep, "drop_conflicts": policy.drop_conflicts, "kinds": list(policy.kinds),
                        "drop_against": policy.drop_against}}
    return kept, dropped, stats
