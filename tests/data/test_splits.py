"""Splits: group-aware, stratified, seeded; own splits kept; val never from test."""
import collections

import numpy as np
import pytest

from src.data.records import DataError, Record
from src.data.splits import assign_splits, check_no_group_leak, split_groups, split_summary

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]


def make_records(n_groups=60, seed=0, split=None, sizes=(1, 8)):
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        label = CLASSES[g % 4]
        for s in range(int(rng.integers(*sizes))):
            out.append(Record(image=f"/x/p{g:03d}_s{s}.png", label=label, group=f"p{g:03d}",
                              split=split, known={"label": True, "boxes": False, "mask": False}))
    return out


def test_no_group_crosses_splits_and_fractions_tracked():
    recs = assign_splits(make_records(), val_fraction=0.2, test_fraction=0.2, seed=1)
    where = collections.defaultdict(set)
    for r in recs:
        where[r.group].add(r.split)
    assert all(len(s) == 1 for s in where.values())
    counts = collections.Counter(r.split for r in recs)
    n = len(recs)
    for name, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(counts[name] / n - frac) < 0.08, counts


def test_stratified_every_class_in_every_split():
    recs = assign_splits(make_records(n_groups=80), val_fraction=0.15, test_fraction=0.15, seed=3)
    summary = split_summary(recs)
    for name in ("train", "val", "test"):
        assert set(summary[name]["classes"]) == set(CLASSES), summary


def test_seeded_deterministic_and_seed_matters():
    a = [r.split for r in assign_splits(make_records(), seed=5)]
    b = [r.split for r in assign_splits(make_records(), seed=5)]
    c = [r.split for r in assign_splits(make_records(), seed=6)]
    assert a == b
    assert a != c


def test_existing_splits_kept_val_carved_from_train_only():
    train = make_records(40, seed=1, split="train")
    test = make_records(10, seed=2, split="test")
    for r in test:
        r.group = "T" + r.group
    recs = assign_splits(train + test, val_fraction=0.2, seed=0)
    assert all(r.split == "test" for r in recs[len(train):])
    assert {r.split for r in recs[:len(train)]} == {"train", "val"}
    # no test carved when the dataset has its own test split
    assert sum(r.split == "test" for r in recs) == len(test)


def test_dataset_with_train_and_val_gets_no_test_by_default():
    recs = make_records(20, split="train") + [
        Record(image=f"/v/{i}.png", label="glioma", split="val", known={"label": True}) for i in range(5)]
    assign_splits(recs)
    assert collections.Counter(r.split for r in recs) == {"train": len(recs) - 5, "val": 5}


def test_ungrouped_records_are_their_own_group():
    recs = [Record(image=f"/x/{i}.png", label=CLASSES[i % 4], known={"label": True}) for i in range(100)]
    out = split_groups(recs, {"train": 0.7, "val": 0.3}, seed=0)
    assert abs(collections.Counter(out)["val"] - 30) <= 2


def test_leak_detected_in_given_splits():
    recs = [Record(image="/a.png", group="p1", split="train"), Record(image="/b.png", group="p1", split="test")]
    with pytest.raises(DataError, match="more than one split"):
        check_no_group_leak(recs)
    with pytest.raises(DataError, match="more than one split"):
        assign_splits(recs)


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions_raise(val, test):
    with pytest.raises(DataError):
        assign_splits(make_records(5), val_fraction=val, test_fraction=test)


def test_empty_dataset_raises():
    with pytest.raises(DataError, match="empty"):
        assign_splits([])
