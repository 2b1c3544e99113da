"""Train/val/test splits: stratified, group-aware, seeded.

Rules
-----
* A dataset's own split is used when it has one (records already carry ``split``).
* Missing splits are carved **from the training split only**: validation is never taken
  from the test split.
* No group (patient, contiguous block, duplicate cluster) ever appears in two splits.
  Records without a group are their own group.
* Splits are stratified by label (the majority label of each group; unknown labels form
  their own stratum) and deterministic for a seed.
"""
from __future__ import annotations

import collections
from typing import Iterable, Optional, Sequence

import numpy as np

from .records import DataError, Record

SPLITS = ("train", "val", "test")


def group_of(r: Record) -> str:
    return r.group if r.group is not None else f"__image__:{r.image}"


def _group_table(records: Sequence[Record]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        groups[group_of(r)].append(i)
    return groups


def split_groups(records: Sequence[Record], fractions: dict[str, float], seed: int = 42) -> list[str]:
    """Assign every record one of ``fractions``' keys, group-aware and stratified.

    Within each stratum, groups are shuffled (seeded) and each goes to the split whose
    image count is furthest below its target, largest groups first among equals, so the
    realised fractions track the requested ones even with uneven group sizes.
    """
    names = [k for k, v in fractions.items() if v > 0]
    if not names:
        raise DataError("split fractions are all zero")
    total = sum(fractions[k] for k in names)
    frac = {k: fractions[k] / total for k in names}
    groups = _group_table(records)
    strata: dict[str, list[str]] = collections.defaultdict(list)
    for g, idx in groups.items():
        labels = collections.Counter(str(records[i].label) for i in idx)
        strata[labels.most_common(1)[0][0]].append(g)
    rng = np.random.default_rng(seed)
    out = [""] * len(records)
    for stratum in sorted(strata):
        gs = sorted(strata[stratum])
        rng.shuffle(gs)
        n_total = sum(len(groups[g]) for g in gs)
        counts = {k: 0 for k in names}
        for g in gs:
            # largest deficit below target; ties go to the split least filled relative to its target
            k = max(names, key=lambda s: (round(frac[s] * n_total - counts[s], 6),
                                          -counts[s] / (frac[s] * n_total), -names.index(s)))
            counts[k] += len(groups[g])
            for i in groups[g]:
                out[i] = k
    return out


def assign_splits(records: list[Record], val_fraction: float = 0.15, test_fraction: float = 0.15,
                  seed: int = 42, use_existing: bool = True, carve_test: Optional[bool] = None) -> list[Record]:
    """Set ``record.split`` on every record (in place) and return the records.

    * With ``use_existing`` and records that already carry splits, those are kept;
      validation is carved from ``train`` only when the dataset has no ``val`` split,
      and a test split is carved from ``train`` only when ``carve_test`` is true
      (default: only when the dataset has no split at all).
    * Records without a split (when others have one) are treated as training data.
    """
    if not records:
        raise DataError("cannot split an empty dataset")
    for f, n in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if not 0 <= f < 1:
            raise DataError(f"data.split.{n} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise DataError("data.split.val_fraction + test_fraction must be < 1")
    existing = {r.split for r in records if r.split}
    bad = existing - set(SPLITS)
    if bad:
        raise DataError(f"unknown split names {sorted(bad)}; expected {SPLITS}")
    if not use_existing or not existing:
        carve_test = True if carve_test is None else carve_test
        for r in records:
            r.split = "train"
        existing = {"train"}
    for r in records:
        if not r.split:
            r.split = "train"
    train = [r for r in records if r.split == "train"]
    want: dict[str, float] = {}
    if "val" not in existing and val_fraction > 0:
        want["val"] = val_fraction
    if carve_test and "test" not in existing and test_fraction > 0:
        want["test"] = test_fraction
    if want and train:
        want["train"] = 1.0 - sum(want.values())
        for r, s in zip(train, split_groups(train, want, seed)):
            r.split = s
    check_no_group_leak(records)
    return records


def check_no_group_leak(records: Iterable[Record]) -> None:
    """Raise :class:`DataError` when a group appears in more than one split."""
    seen: dict[str, set] = collections.defaultdict(set)
    for r in records:
        if r.group is not None:
            seen[r.group].add(r.split)
    leaks = {g: sorted(s) for g, s in seen.items() if len(s) > 1}
    if leaks:
        ex = dict(list(leaks.items())[:5])
        raise DataError(f"{len(leaks)} groups appear in more than one split (leakage), e.g. {ex}. "
                        "The dataset's own split puts one patient/group in two splits; "
                        "use data.split.use_existing=false to re-split group-aware.")


def split_summary(records: Iterable[Record]) -> dict:
    out: dict = {}
    for r in records:
        s = out.setdefault(r.split or "none", {"images": 0, "groups": set(), "classes": collections.Counter()})
        s["images"] += 1
        s["groups"].add(group_of(r))
        s["classes"][str(r.label) if r.known.get("label") else "unknown"] += 1
    return {k: {"images": v["images"], "groups": len(v["groups"]), "classes": dict(sorted(v["classes"].items()))}
            for k, v in sorted(out.items())}
