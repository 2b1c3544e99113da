"""Which copy of a duplicate group is kept (shared by ``load_data`` and :mod:`src.curate`)."""
from __future__ import annotations

from typing import Optional, Sequence

from ..records import DataError, Record
from .edges import split_name

KEEP = ("prefer_train", "first")
DROP_REASONS = ("duplicate", "cross_split_copy", "conflict")
SPLIT_RANK = {"train": 0, "none": 1, "val": 2, "test": 3}  # which copy ``prefer_train`` keeps


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
