"""Data mixes (``data.sources``, :mod:`src.data.mix`): per-source records and summaries,
cross-source split hygiene (refused overlap, one split per copy group, dropped copies),
sampling by source weight (proportions, seeded repeats) and the generic-tumour targets."""
from __future__ import annotations

import collections
import csv
import json
import shutil

import numpy as np
import pytest

from src.data.dataset import load_data
from src.data.describe import describe
from src.data.mix import validation_records
from src.data.records import ClassMap, DataError, Record, save_manifest
from tests.conftest import need_dataset
from tests.data.fixtures_images import save, slice_image


# ---- two small folder sources that share images ------------------------------------------
def _sources(tmp_path, shared: int = 8):
    """``a``: Training/{glioma, no_tumor} (its own train split); ``b``: {meningioma, no_tumor}
    without splits, whose first ``shared`` no_tumor images are byte copies of ``a``'s."""
    a, b = tmp_path / "a", tmp_path / "b"
    for k in range(12):
        save(a / "Training" / "glioma" / f"g{k:02d}.png", slice_image(100 + k))
        save(a / "Training" / "no_tumor" / f"n{k:02d}.png", slice_image(200 + k))
        save(b / "meningioma" / f"m{k:02d}.png", slice_image(300 + k))
    for k in range(12):
        dst = b / "no_tumor" / f"bn{k:02d}.png"
        if k < shared:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(a / "Training" / "no_tumor" / f"n{k:02d}.png", dst)
        else:
            save(dst, slice_image(400 + k))
    return a, b


def _cfg(a, b, **kw) -> dict:
    cfg = {"name": "mix", "duplicates_hamming": None, "split": {"seed": 3},
           "sources": [{"name": "a", "reader": "folder", "root": str(a), "weight": 3.0},
                       {"name": "b", "reader": "folder", "root": str(b), "weight": 1.0}]}
    cfg.update(kw)
    return cfg


def _copy_splits(bundle) -> list[set]:
    """The splits of each shared image's copies (a's n<k> and b's bn<k>)."""
    by_name = collections.defaultdict(set)
    for r in bundle.records:
        stem = r.image.rsplit("/", 1)[-1].replace("bn", "n")
        if "no_tumor" in r.image and stem[1:3].isdigit() and int(stem[1:3]) < 8:
            by_name[stem].add(r.split)
    return list(by_name.values())


def test_overlap_refused_with_hygiene_off(tmp_path):
    a, b = _sources(tmp_path)
    with pytest.raises(DataError, match=r"data.sources overlap \(8 duplicate image pairs across sources: a / b: 8\).*"
                                        r"data.allow_overlap=true"):
        load_data(_cfg(a, b, hygiene="off"), cache_dir=str(tmp_path / "cache"))
    # allowed: the copies fall where each source's splitter puts them (some apart), and it says so
    mixed = load_data(_cfg(a, b, hygiene="off", allow_overlap=True), cache_dir=str(tmp_path / "cache"))
    assert any(len(s) > 1 for s in _copy_splits(mixed))
    assert mixed.hygiene["cross_splits_after"]["groups"] > 0


def test_hygiene_group_puts_copies_in_one_split(tmp_path):
    a, b = _sources(tmp_path)
    bundle = load_data(_cfg(a, b, hygiene="group"), cache_dir=str(tmp_path / "cache"))
    splits = _copy_splits(bundle)
    assert len(splits) == 8 and all(len(s) == 1 for s in splits)
    h = bundle.hygiene
    assert h["pairs"] == 8 and h["by_source_pair"] == {"a / b": 8} and h["by_kind"] == {"exact": 8}
    assert h["would_cross_splits"]["groups"] > 0 and h["cross_splits_after"]["groups"] == 0
    assert h["dropped"]["images"] == 0 and h["moved"] > 0
    # every record remembers its source; a's own train split is kept (val carved), b is carved three ways
    assert collections.Counter(r.source for r in bundle.records) == {"a": 24, "b": 24}
    assert {r.split for r in bundle.records if r.source == "a"} <= {"train", "val", "test"}
    assert all(r.group.startswith(r.source + ":") for r in bundle.records if r.group)
    summary = json.loads(json.dumps(bundle.summary()))
    assert summary["sources"]["a"]["weight"] == 3.0 and summary["sources"]["b"]["images"] == 24
    assert sum(s["images"] for s in summary["sources"]["b"]["splits"].values()) == 24
    d = describe(bundle)
    assert d["per_source"]["a"]["images"] == 24 and d["hygiene"]["pairs"] == 8
    # b's copies follow a (the first source) wherever a's splitter put them
    a_split = {r.image.rsplit("/", 1)[-1]: r.split for r in bundle.records if r.source == "a"}
    for r in bundle.records:
        name = r.image.rsplit("/", 1)[-1]
        if r.source == "b" and name.startswith("bn") and int(name[2:4]) < 8:
            assert r.split == a_split[name[1:]]


def test_hygiene_drop_keeps_the_first_sources_copy(tmp_path):
    a, b = _sources(tmp_path)
    bundle = load_data(_cfg(a, b, hygiene="drop"), cache_dir=str(tmp_path / "cache"))
    assert collections.Counter(r.source for r in bundle.records) == {"a": 24, "b": 16}
    assert bundle.hygiene["dropped"] == {"images": 8, "by_reason": {"cross_source_copy": 8}, "by_source": {"b": 8}}


def test_bad_source_entries_are_one_line(tmp_path):
    a, b = _sources(tmp_path, shared=0)
    bad = _cfg(a, b)
    bad["sources"][1]["wieght"] = 2
    with pytest.raises(DataError, match=r"data.sources\[1\] has unknown key 'wieght' \(did you mean 'weight'\?\)"):
        load_data(bad)
    bad = _cfg(a, b)
    bad["sources"][1]["name"] = "a"
    with pytest.raises(DataError, match="the name 'a' is used twice"):
        load_data(bad)
    with pytest.raises(DataError, match="data.hygiene must be one of"):
        load_data(_cfg(a, b, hygiene="sometimes"))


# ---- validation during training follows the sources that train (data.val_sources) ----------------
def test_a_source_that_re_splits_does_not_hold_its_old_splits(tmp_path):
    """A source with ``split.use_existing: false`` is split afresh: its folder's old
    Testing split no longer pins its images (or their copies elsewhere) to test, and none of
    its own images is dropped as a cross-split copy."""
    a, b = tmp_path / "a", tmp_path / "b"
    for k in range(16):
        save(a / "Training" / "glioma" / f"g{k:02d}.png", slice_image(500 + k))
        save(b / "meningioma" / f"m{k:02d}.png", slice_image(600 + k))
    for k in range(8):
        save(a / "Testing" / "glioma" / f"t{k:02d}.png", slice_image(700 + k))
        (b / "glioma").mkdir(parents=True, exist_ok=True)
        shutil.copy(a / "Testing" / "glioma" / f"t{k:02d}.png", b / "glioma" / f"bt{k:02d}.png")
    cfg = _cfg(a, b, hygiene="group")
    cfg["sources"][0]["split"] = {"use_existing": False}
    bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    h = bundle.hygiene
    assert h["pairs"] == 8 and h["dropped"]["images"] == 0
    assert collections.Counter(r.source for r in bundle.records) == {"a": 24, "b": 24}
    old_test = {r.split for r in bundle.records if r.source == "a" and "/Testing/" in r.image}
    assert "train" in old_test  # re-split: the old test images are spread like the rest
    by_name = collections.defaultdict(set)
    for r in bundle.records:
        name = r.image.rsplit("/", 1)[-1]
        if name.startswith(("t", "bt")):
            by_name[name.lstrip("b")].add(r.split)
    assert len(by_name) == 8 and all(len(v) == 1 for v in by_name.values())


def _a_only(a, b, **kw) -> dict:
    """The mix of ``a`` and ``b`` with ``b``'s weight 0: an ``a``-only baseline."""
    cfg = _cfg(a, b, **kw)
    cfg["sources"][1]["weight"] = 0.0
    return cfg


def test_training_validates_only_on_sources_that_train(tmp_path):
    a, b = _sources(tmp_path, shared=0)
    cfg = _a_only(a, b)
    bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    whole = bundle.split("val")
    n_b = sum(r.source == "b" for r in whole)
    assert n_b > 0 and sum(r.source == "a" for r in whole) > 0  # the splits are made on every source
    val = validation_records(bundle, cfg)
    assert val == [r for r in whole if r.source == "a"]  # no record of the weight-0 source
    assert bundle.split("val") == whole  # the split itself is untouched (src.evaluate reports b)
    summary = json.loads(json.dumps(bundle.summary()))
    assert summary["val_sources"] == {"mode": "trained", "sources": ["a"], "val_records": {"a": len(val)},
                                      "left_out": {"b": n_b}}


def test_val_sources_all_keeps_every_source(tmp_path):
    a, b = _sources(tmp_path, shared=0)
    cfg = _a_only(a, b, val_sources="all")
    bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    val = validation_records(bundle, cfg)
    assert val == bundle.split("val") and {r.source for r in val} == {"a", "b"}
    assert bundle.summary()["val_sources"]["sources"] == ["a", "b"] and bundle.summary()["val_sources"]["left_out"] == {}


def test_bad_val_sources_is_refused_naming_the_values(tmp_path):
    a, b = _sources(tmp_path, shared=0)
    with pytest.raises(DataError, match=r"data.val_sources must be one of \['trained', 'all'\], got 'weighted'"):
        load_data(_a_only(a, b, val_sources="weighted"))  # before any reading
    cfg = _a_only(a, b)
    bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="data.val_sources must be one of"):
        validation_records(bundle, {**cfg, "val_sources": "some"})


def test_engine_validates_a_single_source_baseline_on_that_source(tmp_path):
    """The engine's validation dataset (val_loss, best.keras, early stopping) and its
    data_summary.json: the weight-0 source is left out; with val_sources=all it is in."""
    from src.config import compose
    from src.training.engine import start_session

    a, b = _sources(tmp_path, shared=0)
    for mode in ("trained", "all"):
        cfg = compose(["data=mix", "data.image_size=32", "data.batch_size=4", "data.duplicates_hamming=null",
                       "data.split.seed=3", f"data.val_sources={mode}", "model=small_cnn", "model.widths=[4,8]",
                       "trainer.precision=float32", "trainer.verbose=0", "tracking=none",
                       f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"])
        cfg.data.sources = [{"name": "a", "reader": "folder", "root": str(a), "weight": 1.0},
                            {"name": "b", "reader": "folder", "root": str(b), "weight": 0.0}]
        s = start_session(cfg, tmp_path / mode)
        val = s.bundle.split("val")
        want = [r for r in val if r.source == "a"] if mode == "trained" else val
        assert sorted(r.image for r in s.val_recs) == sorted(r.image for r in want)
        n = sum(int(x.shape[0]) for x, _, _ in s.val_ds)
        assert n == len(want) and (n < len(val) if mode == "trained" else n == len(val))
        summary = json.loads(s.run.data_summary.read_text())
        assert summary["val_sources"]["sources"] == (["a"] if mode == "trained" else ["a", "b"])
        assert sum(summary["val_sources"]["val_records"].values()) == n


# ---- a pseudo-mask manifest (src.explain what=pseudo_masks) as a mix source ---------------------
def _pseudo_manifest(tmp_path, n: int = 6):
    """A tiny manifest as ``src.explain what=pseudo_masks`` writes it: ``n`` glioma slices with a
    model-made (pseudo) mask and box, and two healthy slices with a known-empty (true) mask."""
    recs = []
    for k in range(n):
        img = save(tmp_path / "pm" / f"s{k:02d}.png", slice_image(500 + k))
        truth = np.zeros((64, 64), np.uint8)
        truth[10 + k:30 + k, 20:40] = 255
        mask = save(tmp_path / "pm" / "masks" / f"s{k:02d}.png", truth)
        recs.append(Record(str(img), label="glioma", mask=str(mask), boxes=[[20 / 64, (10 + k) / 64, 40 / 64,
                                                                         (30 + k) / 64]], box_classes=["glioma"],
                           split="train", group=f"g{k}", known={"label": True, "boxes": True, "mask": True},
                           pseudo={"mask": True, "boxes": True}))
    for k in range(2):
        img = save(tmp_path / "pm" / f"h{k:02d}.png", slice_image(600 + k))
        recs.append(Record(str(img), label="no_tumor", split="train", group=f"h{k}",
                           known={"label": True, "boxes": True, "mask": True}))
    return save_manifest(recs, tmp_path / "pm" / "manifest.jsonl")


def test_pseudo_mask_manifest_as_a_mix_source(tmp_path):
    from src.data.pipeline import build_dataset

    _, b = _sources(tmp_path, shared=0)
    manifest = _pseudo_manifest(tmp_path)
    cfg = {"name": "mix", "duplicates_hamming": None, "split": {"seed": 3, "val_fraction": 0.25},
           "sources": [{"name": "b", "reader": "folder", "root": str(b), "weight": 1.0},
                       {"name": "kaggle_pseudo", "manifest": str(manifest), "weight": 1.0}]}  # no reader needed
    bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    recs = [r for r in bundle.records if r.source == "kaggle_pseudo"]
    assert len(recs) == 8 and sum(r.is_pseudo("mask") and r.is_pseudo("boxes") for r in recs) == 6
    assert all(r.known["mask"] and (r.mask is not None) == (r.label == "glioma") for r in recs)
    assert not any(r.is_pseudo("mask") for r in bundle.records if r.source == "b")
    assert {r.split for r in recs} <= {"train", "val"}  # the manifest's own splits: train, validation carved
    summary = json.loads(json.dumps(bundle.summary()))
    assert summary["pseudo"]["mask"]["total"] == 6
    assert summary["sources"]["kaggle_pseudo"]["pseudo"]["mask"]["total"] == 6
    assert summary["sources"]["kaggle_pseudo"]["manifest"] == str(manifest) and "pseudo" not in summary["sources"]["b"]
    per_split = describe(bundle)["per_source"]["kaggle_pseudo"]["splits"]
    assert sum(s["pseudo_masks"] for s in per_split.values()) == 6 and sum(s["masks"] for s in per_split.values()) == 0
    # encoded: a pseudo mask weighs data.pseudo_weight, a true (known-empty) one 1, an unknown one 0
    data = {"image_size": 16, "batch_size": 64, "augment": None, "cache": False, "xla": False, "pseudo_weight": 0.3,
            "sources": cfg["sources"]}
    _, _, w = next(iter(build_dataset(bundle.records, bundle.class_map, data, training=False,
                                      heads=["class", "mask"])))
    want = [0.3 if r.is_pseudo("mask") else 1.0 if r.known["mask"] else 0.0 for r in bundle.records]
    np.testing.assert_allclose(w["mask"].numpy(), want, atol=1e-6)
    assert sorted(set(want)) == [0.0, 0.3, 1.0]  # all three kinds are in the batch


# ---- sampling by source weight ----------------------------------------------------------------
def _labelled_records(tmp_path, per_source: dict) -> list[Record]:
    """``per_source``: {source: (label, n)}; small distinct images, one label per source."""
    recs = []
    for s_i, (source, (label, n)) in enumerate(sorted(per_source.items())):
        for k in range(n):
            p = save(tmp_path / source / f"{k:02d}.png", slice_image(1000 * (s_i + 1) + k, size=24))
            recs.append(Record(image=str(p), label=label, source=source, split="train",
                               known={"label": True, "boxes": False, "mask": False}))
    return recs


def _stream_classes(recs, sources, seed, batches=60, sampling="weights"):
    from src.data.pipeline import build_dataset

    cfg = {"image_size": 16, "batch_size": 16, "augment": None, "cache": False, "xla": False, "seed": seed,
           "repeat": True, "sampling": sampling, "sources": sources}
    ds = build_dataset(recs, ClassMap(), cfg, training=True, heads=["class"])
    return np.concatenate([y["class"].numpy() for _, y, _ in ds.take(batches)])


def test_source_weights_give_the_requested_proportions_and_seeded_runs_repeat(tmp_path):
    import keras

    # TF combines an op's seed with the global one: fix both, as the engine does from cfg.seed
    keras.utils.set_random_seed(0)
    recs = _labelled_records(tmp_path, {"f": ("glioma", 7), "k": ("meningioma", 12), "r": ("pituitary", 5)})
    sources = [{"name": "f", "weight": 2.0}, {"name": "k", "weight": 1.0}, {"name": "r", "weight": 1.0}]
    got = _stream_classes(recs, sources, seed=5)  # class id = source: glioma 0 (f), meningioma 1 (k), pituitary 2 (r)
    share = np.bincount(got, minlength=4)[:3] / len(got)
    np.testing.assert_allclose(share, [0.5, 0.25, 0.25], atol=0.05)  # 960 draws: sd ~0.016
    batch_sources = [len(set(got[i:i + 16])) for i in range(0, len(got), 16)]
    assert np.mean(np.array(batch_sources) >= 2) >= 0.95  # batches mix the sources (draws are random)
    again = _stream_classes(recs, sources, seed=5, batches=8)
    np.testing.assert_array_equal(again, got[:len(again)])
    other = _stream_classes(recs, sources, seed=6, batches=8)
    assert not np.array_equal(other, got[:len(other)])


def test_weights_sampling_needs_sources(tmp_path):
    from src.data.pipeline import pipeline_config

    with pytest.raises(ValueError, match="data.sampling=weights draws the sources of a mix"):
        pipeline_config({"sampling": "weights"})


def test_balanced_mix_balances_classes_within_each_source(tmp_path):
    recs = _labelled_records(tmp_path, {"k": ("no_tumor", 12), "f": ("glioma", 3)})
    # source k also gets 3 glioma images: within k, glioma 3 vs no_tumor 12 -> 50/50 when balanced
    recs += [Record(image=r.image, label="glioma", source="k", split="train",
                    known={"label": True, "boxes": False, "mask": False}) for r in recs if r.source == "f"]
    got = _stream_classes(recs, [{"name": "k", "weight": 1.0}, {"name": "f", "weight": 0.0}], seed=1, batches=40,
                          sampling="balanced")
    share = np.bincount(got, minlength=4) / len(got)
    assert abs(share[0] - 0.5) < 0.07 and abs(share[3] - 0.5) < 0.07


# ---- generic tumour (Br35H) targets -----------------------------------------------------------
def test_generic_tumor_trains_tumor_vs_healthy_never_the_subtype(tmp_path):
    from src.data.pipeline import build_dataset

    p = save(tmp_path / "t.png", slice_image(7, size=24))
    known = {"label": True, "boxes": False, "mask": False}
    recs = [Record(image=str(p), label="tumor", source="br35h", known=dict(known)),
            Record(image=str(p), label="glioma", source="figshare", known=dict(known)),
            Record(image=str(p), label="no_tumor", source="kaggle", known=dict(known))]
    cfg = {"image_size": 16, "batch_size": 3, "augment": None, "cache": False, "xla": False}
    _, y, w = next(iter(build_dataset(recs, ClassMap(), cfg, training=False,
                                      heads=["class", "tumor", "subtype"])))
    np.testing.assert_array_equal(w["class"].numpy(), [0, 1, 1])       # the generic tumour has no class...
    np.testing.assert_array_equal(w["class_set"].numpy(), [1, 0, 0])   # ...but a set: any tumour class
    np.testing.assert_array_equal(y["class_set"].numpy()[0], [1, 1, 1, 0])
    np.testing.assert_array_equal(w["tumor"].numpy(), [1, 1, 1])
    np.testing.assert_array_equal(y["tumor"].numpy(), [1, 1, 0])
    np.testing.assert_array_equal(w["subtype"].numpy(), [0, 1, 0])     # never a subtype
    # a dataset without generic tumours has no class_set target at all (unchanged)
    _, y2, _ = next(iter(build_dataset(recs[1:], ClassMap(), cfg, training=False, heads=["class"])))
    assert "class_set" not in y2


# ---- real data: a slice of figshare and the Kaggle images that copy it ---------------------------
def test_real_mix_slice_keeps_figshare_copies_in_one_split(tmp_path, shared_data):
    fig, kag = need_dataset(shared_data, "figshare-cheng"), need_dataset(shared_data, "kaggle-brain-mri-224")
    f_root, k_root = tmp_path / "figshare", tmp_path / "kaggle" / "Training"
    (f_root / "images").mkdir(parents=True)
    (f_root / "masks").mkdir()
    with open(fig / "metadata.csv") as f:
        rows = list(csv.reader(f))
    keep = [r for r in rows[1:] if 1 <= int(r[0]) <= 32]
    with open(f_root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *keep])
    for r in keep:
        (f_root / "images" / f"{r[0]}.jpg").symlink_to(fig / "images" / f"{r[0]}.jpg")
        (f_root / "masks" / f"{r[0]}.png").symlink_to(fig / "masks" / f"{r[0]}.png")
    # Kaggle meningioma Tr-me_0227 .. 0301: copies of figshare slices 2-28; plus a few of each other class
    wanted = [p for p in sorted((kag / "Training" / "meningioma").iterdir()) if "0227" <= p.stem[-4:] <= "0301"]
    for cls in ("glioma", "notumor", "pituitary"):
        wanted += sorted((kag / "Training" / cls).iterdir())[:6]
    for p in wanted:
        (k_root / p.parent.name).mkdir(parents=True, exist_ok=True)
        (k_root / p.parent.name / p.name).symlink_to(p)
    cfg = {"name": "mix", "duplicates": "group", "split": {"seed": 42},
           "sources": [{"name": "figshare", "reader": "figshare", "root": str(f_root), "options": {"group_block": 16}},
                       {"name": "kaggle", "reader": "folder", "root": str(k_root.parent)}]}
    bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    h = bundle.hygiene
    assert h["by_source_pair"].get("figshare / kaggle", 0) >= 20
    assert h["cross_splits_after"]["groups"] == 0
    split_of = {r.image: r.split for r in bundle.records}
    assert len({split_of[str(f_root / "images" / f"{k}.jpg")] for k in range(1, 17)}) == 1  # one block, one split
    assert collections.Counter(r.source for r in bundle.records) == {"figshare": 32, "kaggle": len(wanted)}
    kaggle_healthy = [r for r in bundle.records if r.source == "kaggle" and r.label == "no_tumor"]
    assert kaggle_healthy and all(r.known["mask"] and r.known["boxes"] for r in kaggle_healthy)  # empty by definition
