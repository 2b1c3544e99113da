"""Data curation (src.curate): duplicates that must be found, or not, as documented.

Constructed 64 px slices (smooth random blobs inside an asymmetric 'skull'):
* a PNG written from a JPEG's decoded pixels -> exact duplicate of the JPEG;
* a JPEG decoded and encoded again as JPEG -> *not* exact (pixels change), near;
* a resized copy -> near;
* a left-right mirrored copy -> not a duplicate by default; kind 'flip' with include_flips;
* a byte copy under another class -> exact, and a label conflict;
* a copy in Testing of a Training image -> a group crossing train/test (leakage).
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.curate import (KINDS, Edges, Policy, Settings, UnionFind, apply_policy, curate_records, hamming_cross,
                        hamming_pairs, hash_file)
from src.data.dataset import load_data
from src.data.records import DataError, Record, load_manifest
from tests.conftest import need_dataset
from tests.data.fixtures_images import decoded, save, slice_image

REPO = Path(__file__).resolve().parents[2]


# ---- constructed images ------------------------------------------------------------------
def build_dataset(root: Path) -> dict:
    """Training/Testing folder dataset with the planted copies; returns the planted paths."""
    tr, te = root / "Training", root / "Testing"
    seeds = iter(range(1000, 2000))
    for cls in ("glioma", "meningioma", "no_tumor"):  # distinct fillers
        for k in range(4):
            save(tr / cls / f"fill_{k}.jpg", slice_image(next(seeds), rgb=(k == 0)))
        save(te / cls / "fill_t.jpg", slice_image(next(seeds)))
    p = {}
    p["a"] = save(tr / "glioma" / "a.jpg", slice_image(1))
    p["a_png"] = save(tr / "glioma" / "a_pixels.png", decoded(p["a"]))  # same pixels, other container
    p["b"] = save(tr / "glioma" / "b.jpg", slice_image(2))
    p["b_reenc"] = save(tr / "glioma" / "b_reencoded.jpg", decoded(p["b"]), quality=80)  # JPEG again
    p["c"] = save(tr / "meningioma" / "c.png", slice_image(3))
    from PIL import Image
    p["c_small"] = save(tr / "meningioma" / "c_small.png",
                        np.asarray(Image.fromarray(slice_image(3)).resize((48, 48), Image.LANCZOS)))
    p["d"] = save(tr / "no_tumor" / "d.png", slice_image(4))
    p["d_flip"] = save(tr / "no_tumor" / "d_flipped.png", slice_image(4)[:, ::-1].copy())
    p["e"] = save(tr / "glioma" / "e.jpg", slice_image(5))
    p["e_conflict"] = tr / "meningioma" / "e_copy.jpg"
    shutil.copyfile(p["e"], p["e_conflict"])
    p["f"] = save(tr / "no_tumor" / "f.jpg", slice_image(6, rgb=True))
    p["f_test"] = te / "no_tumor" / "f_leaked.jpg"
    shutil.copyfile(p["f"], p["f_test"])
    return {k: str(v) for k, v in p.items()}


DATA_CFG = {"name": "constructed", "reader": "folder", "split": {"val_fraction": 0.0, "test_fraction": 0.0}}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate_data")
    paths = build_dataset(root)
    records = load_data({**DATA_CFG, "root": str(root)}).records
    return root, paths, records


@pytest.fixture(scope="module")
def result(planted):
    _, _, records = planted
    return curate_records(records, Settings(progress=False, workers=2))


@pytest.fixture(scope="module")
def result_flips(planted):
    _, _, records = planted
    return curate_records(records, Settings(progress=False, include_flips=True, workers=2))


def group_paths(res) -> list[set]:
    return [{res.records[i].image for i in g.members} for g in res.groups]


def kinds_of(res, path) -> str:
    g = res.group_of(path)
    return None if g is None else g.member_kind[[i for i in g.members if res.records[i].image == path][0]]


# ---- hashing -----------------------------------------------------------------------------
def test_exact_hash_is_of_decoded_pixels_not_bytes(planted, tmp_path):
    _, p, _ = planted
    a, a_png = hash_file(p["a"]), hash_file(p["a_png"])
    assert Path(p["a"]).read_bytes() != Path(p["a_png"]).read_bytes()
    assert a.exact == a_png.exact  # a PNG of the JPEG's decoded pixels is an exact duplicate
    b, b_re = hash_file(p["b"]), hash_file(p["b_reenc"])
    assert b.exact != b_re.exact  # JPEG -> decode -> JPEG changes pixels: not exact (the near pass finds it)
    # grey pixels stored as RGB (three equal channels) are the same canonical grey image
    g = slice_image(9)
    h1 = hash_file(str(save(tmp_path / "grey.png", g)))
    h3 = hash_file(str(save(tmp_path / "grey_rgb.png", np.stack([g] * 3, -1))))
    assert h1.shape == (64, 64) and h1.exact == h3.exact
    assert hash_file(str(save(tmp_path / "colour.png", slice_image(9, rgb=True)))).shape == (64, 64, 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    assert hash_file(str(bad)).error and str(bad) in hash_file(str(bad)).error


def test_union_find_groups_transitively():
    uf = UnionFind(8)
    uf.union_pairs([(0, 1), (1, 2), (5, 6)])
    assert uf.components() == [[0, 1, 2], [5, 6]]
    assert uf.find(2) == uf.find(0) != uf.find(5)
    assert uf.components(min_size=1)[-1] in ([3], [4], [7]) and len(uf.components(min_size=1)) == 5


def test_hamming_search_matches_brute_force():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, (300, 32), np.uint8)  # 256-bit hashes
    bits[7] = bits[3]
    bits[11] = bits[3] ^ np.eye(32, dtype=np.uint8)[0]  # one bit away
    unpacked = np.unpackbits(bits, axis=1)
    dist = (unpacked[:, None] != unpacked[None]).sum(-1)
    for thr in (0, 1, 120):
        got = hamming_pairs(bits, thr, block=64)
        want = {(i, j) for i, j in zip(*np.nonzero(dist <= thr)) if i < j}
        assert {(i, j) for i, j, _ in got} == want
        assert all(dist[i, j] == d for i, j, d in got)
    for thr in (0, 1, 120):
        cross = hamming_cross(bits[:50], bits[40:], thr, block=16)
        want = set(zip(*np.nonzero(dist[:50, 40:] <= thr)))  # (row of a, row of b)
        assert {(i, j) for i, j, _ in cross} == want
    assert {(i, j) for i, j, _ in hamming_cross(bits[:10], bits[:10], 0)} == {(i, i) for i in range(10)} | {(3, 7), (7, 3)}


# ---- what is found -----------------------------------------------------------------------
def test_planted_duplicates_are_found_as_documented(planted, result):
    _, p, records = planted
    groups = group_paths(result)
    assert {p["a"], p["a_png"]} in groups and kinds_of(result, p["a_png"]) == "exact"
    assert {p["b"], p["b_reenc"]} in groups and kinds_of(result, p["b_reenc"]) == "near"
    assert {p["c"], p["c_small"]} in groups and kinds_of(result, p["c_small"]) == "near"
    assert result.group_of(p["d_flip"]) is None  # a mirrored copy is not a duplicate by default
    assert {p["e"], p["e_conflict"]} in groups and result.group_of(p["e"]).conflict
    g = result.group_of(p["f"])
    assert {p["f"], p["f_test"]} == {result.records[i].image for i in g.members}
    assert g.cross_split and g.splits == ["train", "test"] and not g.conflict
    assert len(groups) == 5  # nothing else: the fillers are distinct
    assert all(not g.cross_split for g in result.groups if g is not result.group_of(p["f"]))
    assert result.levels["exact"] == {"pairs": 3, "groups": 3, "images": 6, "extra_copies": 3}
    assert result.levels["near"]["groups"] == 5 and "flip" not in result.levels


def test_flipped_copy_found_with_the_option(planted, result_flips):
    _, p, _ = planted
    g = result_flips.group_of(p["d_flip"])
    assert g is not None and {result_flips.records[i].image for i in g.members} == {p["d"], p["d_flip"]}
    assert g.kind == "flip" and kinds_of(result_flips, p["d_flip"]) == "flip"
    assert len(result_flips.groups) == 6 and result_flips.levels["flip"]["groups"] == 6


def test_manifest_policy_on_planted_data(planted, result):
    _, p, records = planted
    kept = {r.image for r in result.kept_records}
    dropped = {result.records[i].image: why for i, why in result.dropped.items()}
    assert p["f"] in kept and dropped[p["f_test"]] == "cross_split_copy"  # test no longer holds the train copy
    assert p["e"] not in kept and dropped[p["e_conflict"]] == "conflict"  # labels disagree: both go
    assert len({p["a"], p["a_png"]} & kept) == 1 and len({p["b"], p["b_reenc"]} & kept) == 1
    assert {p["c"], p["c_small"]} & kept == {p["c"]}  # the larger image is kept
    assert result.manifest_stats["by_reason"] == {"duplicate": 3, "cross_split_copy": 1, "conflict": 2,
                                                  "in_against": 0}
    before = {r.image: r.split for r in records}
    assert all(before[r.image] == r.split for r in result.kept_records)  # no split changed


def test_cross_dataset_check_and_drop_against(planted, tmp_path):
    _, p, records = planted
    other = [Record(image=str(save(tmp_path / "o" / "b_copy.png", decoded(Path(p["b"])))), label="glioma"),
             Record(image=str(save(tmp_path / "o" / "c_mirror.png", slice_image(3)[:, ::-1].copy())), label="glioma"),
             Record(image=str(save(tmp_path / "o" / "new.png", slice_image(777))), label="glioma")]
    res = curate_records(records, Settings(progress=False, policy=Policy(drop_against=True)), against=other,
                         against_name="other")
    matched = {Path(r["path"]).name: (r["kind"], Path(r["other_path"]).name) for r in res.against_rows}
    assert matched == {"b.jpg": ("exact", "b_copy.png"), "b_reencoded.jpg": ("near", "b_copy.png")}
    assert res.against["matched_images"] == 2 and res.against["other_images_matched"] == 1
    assert res.manifest_stats["by_reason"]["in_against"] == 1  # b_reencoded is already a dropped duplicate
    assert not {p["b"], p["b_reenc"]} & {r.image for r in res.kept_records}
    flips = curate_records(records, Settings(progress=False, include_flips=True), against=other)
    assert {Path(r["path"]).name: r["kind"] for r in flips.against_rows}.get("c.png") == "flip"


def _rec(name, split, label="glioma", w=64):
    return Record(image=f"/x/{name}.png", label=label, split=split, known={"label": True}, width=w, height=w)


def test_policy_prefers_train_drops_conflicts_never_moves_splits():
    recs = [_rec("t0", "test"), _rec("v0", "val"), _rec("r0", "train", w=32),  # group 1: keep the train copy
            _rec("t1", "test"), _rec("t2", "test", w=128),  # group 2: only test copies: keep one, in test
            _rec("c0", "train"), _rec("c1", "test", label="meningioma"),  # group 3: conflict
            _rec("n0", "train"), _rec("e0", "train")]  # group 4: an embedding-only pair
    edges = Edges(np.array([[0, 1], [1, 2], [3, 4], [5, 6], [7, 8]]), np.array([1, 0, 0, 1, 3], np.int8),
                  np.array([4.0, 0, 0, 2, 0.01]))
    kept, dropped, stats = apply_policy(recs, edges, Policy())
    names = {recs[i].image.split("/")[-1][:-4] for i in kept}
    assert names == {"r0", "t2", "n0", "e0"}  # embedding neighbours are kept unless policy.kinds lists them
    assert dropped == {0: "cross_split_copy", 1: "cross_split_copy", 3: "duplicate", 5: "conflict", 6: "conflict"}
    assert stats["kept_by_split"] == {"test": 1, "train": 3}
    kept2, dropped2, _ = apply_policy(recs, edges, Policy(drop_conflicts=False, kinds=KINDS))
    assert 5 in kept2 and dropped2[6] == "cross_split_copy" and dropped2[7] == "duplicate"  # e0 < n0 by path
    kept3, _, _ = apply_policy(recs, edges, Policy(keep="first"))
    assert 0 not in kept3 or 2 not in kept3
    with pytest.raises(DataError, match="policy.keep"):
        Policy(keep="newest")
    with pytest.raises(DataError, match="unknown kind"):
        Policy(kinds=("exact", "similar"))


# ---- files, CLI, training on the cleaned manifest ----------------------------------------
def run_module(args, tmp_path, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", KERAS_HOME=str(tmp_path / "keras"))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_writes_every_file(planted, tmp_path):
    """CLI end to end on the constructed folder dataset, with every option that adds a file:
    flips, random-weight embeddings (PCA plot: UMAP's JIT costs ~20 s) and a cross-dataset check."""
    root, p, _ = planted
    other = tmp_path / "other"
    save(other / "glioma" / "copy_of_b.png", decoded(Path(p["b"])))  # exact copy of b
    save(other / "glioma" / "unrelated.png", slice_image(4242))
    out = tmp_path / "out"
    proc = run_module(["src.curate", "data=folder", f"data.root={root}", "data.split.val_fraction=0",
                       f"curate.out={out}", "curate.include_flips=true", "curate.embeddings=mobilenet_v3_small",
                       "curate.embedding_weights=null", "curate.embedding_size=32", "curate.embedding_threshold=1.01",
                       "curate.projection=pca", "data.against=folder", f"data.against_root={other}",
                       f"paths.output_root={tmp_path / 'o'}", f"paths.data_dir={tmp_path / 'd'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("duplicates.csv", "summary.json", "gallery.png", "embeddings.png", "cross_dataset.csv",
              "manifest.jsonl"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout)["groups"] == summary["groups"]
    assert summary["groups"]["count"] == 6 and summary["groups"]["cross_split"]["by_split_pair"] == {"train/test": 1}
    assert summary["groups"]["conflicts"]["groups"] == 1
    assert summary["kinds"]["exact"]["extra_copies"] == 3 and "embedding" in summary["kinds"]
    assert summary["against"]["matched_images"] == 2  # b (exact) and its re-encoded copy (near)
    assert summary["against"]["matched_by_kind"]["exact"] == 1
    assert summary["notes"]["embeddings_plot"] == "pca" and summary["timing"]["images_per_s"] > 0
    rows = list(csv.DictReader(open(out / "duplicates.csv")))
    assert {"group", "path", "split", "label", "kind", "hash", "distance"} <= set(rows[0])
    assert collections.Counter(r["kind"] for r in rows)["flip"] == 2
    cross = list(csv.DictReader(open(out / "cross_dataset.csv")))
    assert {Path(r["path"]).name for r in cross} == {"b.jpg", "b_reencoded.jpg"}
    kept = load_manifest(out / "manifest.jsonl")
    assert len(kept) == summary["manifest"]["kept"] == summary["images"] - summary["manifest"]["dropped"]
    assert {r["path"] for r in rows if r["kept"] == "0"}.isdisjoint({r.image for r in kept})


def test_cli_errors_are_clear(planted, tmp_path, capsys):
    from src.curate.cli import main

    root = planted[0]
    assert main(["data=folder", f"data.root={tmp_path / 'nope'}", f"curate.out={tmp_path / 'o'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad, says in (("curate.hamming=300", "curate.hamming"), ("curate.policy.keep=newest", "policy.keep"),
                      ("curate.splits=random", "curate.splits"), ("curate.against=nonexistent", "nonexistent"),
                      ("curate.embeddings=/no/such/best.keras", "does not exist")):
        assert main(["data=folder", f"data.root={root}", bad, f"curate.out={tmp_path / 'o'}",
                     "curate.progress=false"]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error:") and says in err and "Traceback" not in err, (bad, err)


def test_cleaned_manifest_reads_back_and_trains(tmp_path):
    """Curate the phantom set, read the manifest back with data.manifest, train one epoch on it."""
    from src.config import compose
    from src.curate.cli import run

    common = [f"data.root={tmp_path / 'phantom'}", "data.options.n_patients=12", "data.options.image_size=64",
              f"paths.output_root={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"]
    cfg = compose(["data=phantom", *common, f"curate.out={tmp_path / 'cur'}", "curate.progress=false",
                   "curate.hamming=30"], config_name="curate")  # loose: neighbouring phantom slices pair up
    summary = run(cfg)
    manifest = Path(summary["files"]["manifest"])
    assert summary["manifest"]["dropped"] >= 1 and summary["groups"]["cross_split"]["groups"] == 0
    original = {r.image: r.split for r in load_data(cfg.data, cache_dir=cfg.paths.cache_dir).records}
    cfg2 = compose(["data=phantom", *common, f"data.manifest={manifest}"])
    back = load_data(cfg2.data, cache_dir=cfg2.paths.cache_dir).records
    assert len(back) == summary["manifest"]["kept"] > 0
    assert all(original[r.image] == r.split for r in back)  # every image keeps its split
    assert {r.split for r in back} == {"train", "val", "test"}
    proc = run_module(["src.train", "phase=3", *common, f"data.manifest={manifest}", "data.image_size=32",
                       "model.widths=[8,16]", "trainer.max_epochs=1", "tracking=none", "trainer.verbose=0"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    best = Path(out["run_dir"]) / "phase3" / "checkpoints" / "best.keras"
    assert best.is_file()
    # the trained checkpoint as the embedding network (its last global pooling layer)
    from src.curate.embeddings import embed_images

    paths = [r.image for r in back[:5]] + [back[0].image]
    feats, desc = embed_images(paths, str(best), batch=4, progress=False)
    assert feats.shape[0] == 6 and feats.shape[1] == 16 and np.isfinite(feats).all()  # widths [8, 16]
    assert "pool" in desc and np.allclose(feats[0], feats[-1], atol=1e-5)


# ---- real data ---------------------------------------------------------------------------
def test_kaggle_training_byte_identical_copies_are_exact_groups(shared_data):
    """The Kaggle Training set holds 207 byte-identical repeat copies (155 groups by md5 of
    the file bytes); decoded-pixel hashing finds exactly those (no more) as exact groups."""
    root = need_dataset(shared_data, "kaggle-brain-mri-224") / "Training"
    records = load_data({"name": "kaggle", "reader": "folder", "root": str(root)}).records
    by_md5 = collections.defaultdict(list)
    for r in records:
        by_md5[hashlib.md5(Path(r.image).read_bytes()).hexdigest()].append(r.image)
    byte_groups = [set(v) for v in by_md5.values() if len(v) > 1]
    assert sum(len(g) - 1 for g in byte_groups) == 207 and len(byte_groups) == 155
    res = curate_records(records, Settings(near=False, progress=False))  # exact pass only: fast
    assert res.levels["exact"] == {"pairs": 207, "groups": 155, "images": 362, "extra_copies": 207}
    exact_groups = [{res.records[i].image for i in g.members} for g in res.groups if g.kind == "exact"]
    for bg in byte_groups:
        assert any(bg <= eg for eg in exact_groups)
    assert not any(g.conflict for g in res.groups)  # the byte copies stay within their class
    assert res.manifest_stats["dropped"] == 207 and res.manifest_stats["kept"] == len(records) - 207
