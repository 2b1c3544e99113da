"""data.duplicates (keep | group | drop) in load_data: copies share a split, or one copy stays.

Constructed 64 px slices (tests/data/fixtures_images.py), written into a folder-per-class
dataset in tmp_path, with planted copies of five kinds: a PNG of a JPEG's decoded pixels
(exact), a byte copy (exact), a JPEG re-encode (near), a slight brightness change (near),
and a byte copy under another class (exact, a label conflict).
"""
from __future__ import annotations

import ast
import collections
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from src.data.dataset import duplicate_settings, load_data
from src.data.dedup import DuplicateSettings, resolve_duplicates
from src.data.dedup import hashing as dedup_hashing
from src.data.records import DataError, Record, save_manifest
from tests.conftest import need_dataset
from tests.data.fixtures_images import decoded, save, slice_image

CLASSES = ("glioma", "meningioma", "pituitary", "no_tumor")
SPLIT = {"val_fraction": 0.3, "test_fraction": 0.3, "seed": 0}


def brighter(a: np.ndarray, by: int = 6) -> np.ndarray:
    return np.clip(a.astype(int) + by, 0, 255).astype(np.uint8)


def build(root: Path, n_fill: int = 6) -> dict[str, list[str]]:
    """Folder dataset (no split folders): distinct fillers plus planted copy groups.

    Returns ``{group name: [paths]}`` of the planted groups (the conflict group included)."""
    seeds = iter(range(5000, 6000))
    for cls in CLASSES:
        for k in range(n_fill):
            save(root / cls / f"fill_{k}.jpg", slice_image(next(seeds)))
    groups: dict[str, list[Path]] = {}
    for g in range(8):  # eight groups of three copies of one slice, each kind of copy
        cls = CLASSES[g % 4]
        orig = save(root / cls / f"g{g}.jpg", slice_image(100 + g))
        png = save(root / cls / f"g{g}_pixels.png", decoded(orig))  # exact: same decoded pixels
        if g % 2:
            near = save(root / cls / f"g{g}_reencoded.jpg", decoded(orig), quality=75)  # near: JPEG again
        else:
            near = save(root / cls / f"g{g}_brighter.png", brighter(decoded(orig)))  # near: brightness + 6
        groups[f"g{g}"] = [orig, png, near]
    orig = save(root / "glioma" / "conflict.jpg", slice_image(999))
    other = root / "meningioma" / "conflict_copy.jpg"  # the same bytes filed under another class
    shutil.copyfile(orig, other)
    groups["conflict"] = [orig, other]
    return {k: [str(p) for p in v] for k, v in groups.items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    return root, build(root)


def cfg(root, mode=None, **extra):
    c = {"name": "dups", "reader": "folder", "root": str(root), "split": dict(SPLIT), **extra}
    if mode is not None:
        c["duplicates"] = mode
    return c


def splits_of(bundle) -> dict[str, str]:
    return {r.image: r.split for r in bundle.records}


# ---- group ------------------------------------------------------------------------------
def test_group_puts_every_copy_in_its_originals_split(planted, tmp_path):
    root, groups = planted
    keep = load_data(cfg(root))
    apart = [g for g, paths in groups.items() if len({splits_of(keep)[p] for p in paths}) > 1]
    assert apart, "the planted copies must land apart without duplicates=group, or this test proves nothing"
    bundle = load_data(cfg(root, "group"), cache_dir=str(tmp_path))
    where = splits_of(bundle)
    assert len(where) == len(keep.records)  # group drops nothing here
    for g, paths in groups.items():
        assert len({where[p] for p in paths}) == 1, (g, {p: where[p] for p in paths})
        assert len({r.group for r in bundle.records if r.image in paths}) == 1
    assert {r.split for r in bundle.records} == {"train", "val", "test"}
    s = bundle.summary()["duplicates"]
    assert s["mode"] == "group" and s["groups"] == 9 and s["copies"] == 8 * 2 + 1
    assert s["kinds"]["exact"] == {"pairs": 9, "groups": 9, "images": 18, "extra_copies": 9}
    assert s["kinds"]["near"]["groups"] == 9 and s["kinds"]["near"]["extra_copies"] == 17
    assert s["conflicts"] == {"groups": 1, "images": 2}  # kept (and counted) with group
    assert s["would_cross_splits"]["groups"] == len(apart) and s["cross_splits_after"] == 0
    assert s["dropped"]["images"] == 0 and s["kept"] == len(keep.records)
    json.dumps(bundle.summary())  # lands in data_summary.json


def test_keep_changes_nothing_and_hashes_nothing(planted, monkeypatch):
    root, _ = planted
    calls = []
    real = dedup_hashing.hash_file
    monkeypatch.setattr(dedup_hashing, "hash_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    plain = load_data(cfg(root))
    kept = load_data(cfg(root, "keep"))
    assert [(r.image, r.split, r.group) for r in plain.records] == [(r.image, r.split, r.group) for r in kept.records]
    assert "duplicates" not in kept.summary() and not calls


def test_drop_keeps_one_copy_per_group_and_drops_conflicts(planted, tmp_path):
    root, groups = planted
    bundle = load_data(cfg(root, "drop"), cache_dir=str(tmp_path))
    images = {r.image for r in bundle.records}
    for g, paths in groups.items():
        if g == "conflict":
            assert not images & set(paths)  # the labels disagree: both copies go
        else:
            assert images & set(paths) == {min(paths)}  # no dataset splits: the first path stays
    s = bundle.summary()["duplicates"]
    assert s["dropped"]["images"] == 8 * 2 + 2
    assert s["dropped"]["by_reason"] == {"duplicate": 16, "cross_split_copy": 0, "conflict": 2}
    assert s["kept"] == len(bundle.records) == len(CLASSES) * 6 + 8
    assert s["cross_splits_after"] == 0


def test_bad_mode_fails_before_reading(tmp_path):
    with pytest.raises(DataError, match="data.duplicates must be one of"):
        load_data(cfg(tmp_path / "nowhere", "dedupe"))
    with pytest.raises(DataError, match="duplicates_hamming"):
        DuplicateSettings("group", hamming=256)


# ---- existing groups (patients) ----------------------------------------------------------
def rec(path, group=None, split=None, label="glioma"):
    return Record(image=str(path), label=label, group=group, split=split, known={"label": True})


def test_patient_groups_and_duplicate_groups_are_one_union(tmp_path):
    """p1 and p2 are different patients sharing one (copied) slice: one group. p3 shares
    nothing: untouched. An ungrouped copy of p3's slice joins p3 and keeps p3's id."""
    img = {k: str(save(tmp_path / f"{k}.png", slice_image(seed))) for k, seed in
           (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("f", 6))}
    b_copy = str(save(tmp_path / "b_copy.jpg", decoded(Path(img["b"])), quality=80))
    f_copy = str(tmp_path / "f_copy.png")
    shutil.copyfile(img["f"], f_copy)
    records = [rec(img["a"], "p1"), rec(img["b"], "p1"), rec(b_copy, "p2"), rec(img["c"], "p2"),
               rec(img["d"], "p3"), rec(img["e"], "p4"), rec(img["f"], "p4"), rec(f_copy)]
    res = resolve_duplicates(records, DuplicateSettings("group"))
    gid = {Path(r.image).stem: r.group for r in res.records}
    assert gid["a"] == gid["b"] == gid["b_copy"] == gid["c"] == "dup:p1"  # p1 and p2 merged
    assert gid["d"] == "p3"
    assert gid["e"] == gid["f"] == gid["f_copy"] == "p4"  # the ungrouped copy joins p4
    assert res.summary["touching_existing_groups"] == 2 and res.summary["existing_groups_merged"] == 2
    # and the splitter keeps each union together, whatever the seed
    from src.data.splits import assign_splits

    for seed in range(5):
        assign_splits(res.records, val_fraction=0.4, test_fraction=0.3, seed=seed)
        assert res.finish()["cross_splits_after"] == 0
        assert len({r.split for r in res.records if r.group == "dup:p1"}) == 1


# ---- fixed splits (the dataset's own folders) ----------------------------------------------
@pytest.fixture(scope="module")
def fixed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed")
    for split in ("Training", "Testing"):
        for cls in CLASSES:
            for k in range(3):
                save(root / split / cls / f"{cls}_{k}.jpg", slice_image(hash((split, cls, k)) % 10_000))
    a = save(root / "Training" / "glioma" / "a.jpg", slice_image(11))
    shutil.copyfile(a, root / "Testing" / "glioma" / "a_in_test.jpg")
    save(root / "Training" / "glioma" / "a_reencoded.jpg", decoded(a), quality=80)  # near copy, also train
    b = save(root / "Training" / "pituitary" / "b.jpg", slice_image(12))
    shutil.copyfile(b, root / "Training" / "pituitary" / "b_again.jpg")  # within training only
    return root


def test_group_with_fixed_splits_drops_the_training_copies_of_test_images(fixed_root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="src.data.dedup"):
        bundle = load_data(cfg(fixed_root, "group", split={"val_fraction": 0.2}), cache_dir=str(tmp_path))
    where = splits_of(bundle)
    test_copy = str(fixed_root / "Testing" / "glioma" / "a_in_test.jpg")
    assert where[test_copy] == "test"  # the published test set stays whole
    assert str(fixed_root / "Training" / "glioma" / "a.jpg") not in where
    assert str(fixed_root / "Training" / "glioma" / "a_reencoded.jpg") not in where  # a copy of a copy
    b = [str(fixed_root / "Training" / "pituitary" / n) for n in ("b.jpg", "b_again.jpg")]
    assert where[b[0]] == where[b[1]] in ("train", "val")  # copies within training: kept together
    s = bundle.summary()["duplicates"]
    assert s["fixed_splits"]
    assert s["fixed_split_groups"] == {"groups": 1, "images": 3, "by_split_pair": {"train/test": 1}}
    assert s["dropped"]["by_reason"]["cross_split_copy"] == 2 and s["dropped"]["by_split"] == {"train": 2}
    assert s["cross_splits_after"] == 0
    assert any("span the dataset's own splits" in m and "train/test" in m for m in caplog.messages)


def test_drop_with_fixed_splits_keeps_the_training_copy(fixed_root, tmp_path):
    bundle = load_data(cfg(fixed_root, "drop", split={"val_fraction": 0.2}), cache_dir=str(tmp_path))
    names = {Path(r.image).name: r.split for r in bundle.records}
    assert "a.jpg" in names and "a_in_test.jpg" not in names and "a_reencoded.jpg" not in names
    assert ("b.jpg" in names) != ("b_again.jpg" in names)
    s = bundle.summary()["duplicates"]
    assert s["dropped"]["by_reason"] == {"duplicate": 2, "cross_split_copy": 1, "conflict": 0}


def test_records_without_a_split_follow_their_fixed_copies(tmp_path):
    """Several sources in one list: a source without splits whose image is a copy of a
    fixed test image goes to test (and its patient with it); train copies of it are dropped."""
    t = str(save(tmp_path / "t.png", slice_image(21)))
    free = str(tmp_path / "free_copy.png")
    shutil.copyfile(t, free)
    mate = str(save(tmp_path / "free_mate.png", slice_image(22)))  # same patient as free_copy, no copy
    train_copy = str(save(tmp_path / "train_copy.jpg", decoded(Path(t)), quality=85))
    other = str(save(tmp_path / "other.png", slice_image(23)))
    records = [rec(t, split="test"), rec(free, "q1"), rec(mate, "q1"), rec(train_copy, split="train"),
               rec(other, split="train")]
    res = resolve_duplicates(records, DuplicateSettings("group"), fixed_splits=True)
    where = {Path(r.image).stem: r.split for r in res.records}
    assert where == {"t": "test", "free_copy": "test", "free_mate": "test", "other": "train"}
    assert res.summary["pinned"] == 2 and res.summary["dropped"]["by_split"] == {"train": 1}


# ---- the hash cache ----------------------------------------------------------------------
def test_second_call_hashes_nothing_and_a_changed_file_again(planted, tmp_path, monkeypatch):
    root, groups = planted
    calls = []
    real = dedup_hashing.hash_file
    monkeypatch.setattr(dedup_hashing, "hash_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = load_data(cfg(root, "group"), cache_dir=str(tmp_path))
    n = len(first.records)
    assert len(calls) == n and first.summary()["duplicates"]["hashing"]["hashed"] == n
    assert (tmp_path / "duplicates" / "hashes-v1.sqlite").is_file()
    calls.clear()
    second = load_data(cfg(root, "group"), cache_dir=str(tmp_path))
    assert calls == [] and second.summary()["duplicates"]["hashing"]["cached"] == n
    assert splits_of(second) == splits_of(first)
    assert second.summary()["duplicates"]["kinds"] == first.summary()["duplicates"]["kinds"]
    touched = groups["g3"][0]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_data(cfg(root, "group"), cache_dir=str(tmp_path))
    assert calls == [os.path.abspath(touched)]  # only the file whose mtime changed


# ---- layering ------------------------------------------------------------------------------
# pre-existing exceptions, not this module's to fix: src.data.describe is itself an entry
# point (python -m src.data.describe)
KNOWN_UPWARD = {"data/describe.py: src.cli"}


def test_data_layer_imports_nothing_above_it():
    """src/data (the dedup core included) never imports curate, training, models, losses,
    evaluation or an entry point, not even inside a function."""
    above = {"curate", "training", "models", "losses", "evaluation", "train", "evaluate", "predict", "explain",
             "export", "inference", "runs", "tracking", "cli"}
    src = Path(__file__).resolve().parents[2] / "src"
    bad = []
    for path in (src / "data").rglob("*.py"):
        package = ["src", *path.relative_to(src).parent.parts]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                mods = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # from .. import x
                    mods = [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            bad += [f"{path.relative_to(src)}: {m}" for m in mods
                    if m.split(".")[0] == "src" and len(m.split(".")) > 1 and m.split(".")[1] in above]
    assert set(bad) <= KNOWN_UPWARD, sorted(set(bad) - KNOWN_UPWARD)


# ---- real data ---------------------------------------------------------------------------
def test_kaggle_slice_copies_share_a_split(shared_data, tmp_path):
    """The first 300 no-tumour files of kaggle-brain-mri-224/Training (39 duplicate groups,
    46 byte-identical pairs among them): with group, byte-identical files (an oracle that
    does not use our hashes: md5 of the bytes) and every found group share a split."""
    folder = need_dataset(shared_data, "kaggle-brain-mri-224") / "Training" / "notumor"
    files = sorted(folder.iterdir())[:300]
    manifest = save_manifest([Record(image=str(p), label="no_tumor", known={"label": True}) for p in files],
                             tmp_path / "slice.jsonl")
    data = {"name": "kaggle_slice", "manifest": str(manifest), "split": {**SPLIT, "seed": 42}}
    plain = load_data(data)
    bundle = load_data({**data, "duplicates": "group"}, cache_dir=str(tmp_path))
    s = bundle.summary()["duplicates"]
    assert s["groups"] == 39 and s["copies"] == 61 and s["kinds"]["exact"]["pairs"] == 46
    by_md5 = collections.defaultdict(list)
    for p in files:
        by_md5[hashlib.md5(p.read_bytes()).hexdigest()].append(str(p))
    where, before = splits_of(bundle), splits_of(plain)
    byte_groups = [v for v in by_md5.values() if len(v) > 1]
    assert byte_groups and all(len({where[p] for p in g}) == 1 for g in byte_groups)
    assert s["would_cross_splits"]["groups"] > 0 and s["cross_splits_after"] == 0
    assert s["would_cross_splits"]["groups"] == sum(
        1 for g in bundle_groups(bundle) if len({before[p] for p in g}) > 1)
    dropped = load_data({**data, "duplicates": "drop"}, cache_dir=str(tmp_path))
    assert len(dropped.records) == 300 - 61


def bundle_groups(bundle) -> list[list[str]]:
    by = collections.defaultdict(list)
    for r in bundle.records:
        by[r.group].append(r.image)
    return [v for g, v in by.items() if g is not None and g.startswith("dup:")]


def test_one_word_override_composes():
    from src.config import compose

    cfg = compose(["data=folder", "data.duplicates=group", "data.duplicates_hamming=8"])
    s = duplicate_settings(cfg.data)
    assert (s.mode, s.hamming, s.flips) == ("group", 8, False)
    assert compose(["data=folder"]).data.duplicates == "keep"  # the default changes nothing
