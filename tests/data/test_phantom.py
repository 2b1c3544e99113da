"""The embedded synthetic dataset: determinism, labels, anatomy cues, splits, the reader."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from src.data import phantom as ph
from src.data import phantom_render as render
from src.data.records import DataError

SMALL = dict(n_patients=12, image_size=64, seed=0)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _stems(root: Path, sub: str) -> dict[str, Path]:
    return {p.stem: p for p in (root / sub).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "small"
    ph.generate_phantom(root, workers=1, **SMALL)
    return root


@pytest.fixture(scope="module")
def meta(small) -> dict:
    return json.loads((small / "phantom.json").read_text())


# ---- determinism ----------------------------------------------------------------------
def test_same_seed_same_bytes_and_other_seed_differs(small, tmp_path):
    again = tmp_path / "again"
    ph.generate_phantom(again, workers=2, **SMALL)  # also: the worker count changes nothing
    assert _hashes(again) == _hashes(small)
    other = tmp_path / "other"
    ph.generate_phantom(other, workers=1, **{**SMALL, "seed": 1})
    a, b = _hashes(small), _hashes(other)
    images = [k for k in a if k.startswith("images")]
    assert images and sum(a[k] != b.get(k) for k in images) == len(images)


# ---- layout and labels ----------------------------------------------------------------
def test_layout_and_metadata(small, meta):
    assert (small / "README.md").is_file()
    data = (small / "data.yaml").read_text()
    assert "0: glioma" in data and "1: meningioma" in data and "2: pituitary" in data
    assert meta["version"] == ph.PHANTOM_VERSION
    assert meta["params"] == ph.normalise_params(**SMALL)
    images = _stems(small, "images")
    assert set(images) == set(_stems(small, "labels")) == set(_stems(small, "masks"))
    assert len(images) == meta["counts"]["n_images"]
    assert all(p.suffix == ".png" for p in images.values())
    stems = sorted(images)
    assert all(len(s) == 9 and s[0] == "p" and s[5:7] == "_s" for s in stems), stems[:3]
    per_patient = Counter(s.split("_")[0] for s in stems)
    assert len(per_patient) == SMALL["n_patients"]
    assert all(2 <= n <= 6 for n in per_patient.values())
    im = cv2.imread(str(next(iter(images.values()))), cv2.IMREAD_UNCHANGED)
    assert im.dtype == np.uint8 and im.shape == (64, 64)


def test_masks_and_boxes(small, meta):
    cls_of = {p["id"]: p["class"] for p in meta["patients"]}
    labels = _stems(small, "labels")
    for stem, mpath in _stems(small, "masks").items():
        cls = cls_of[stem.split("_")[0]]
        mask = cv2.imread(str(mpath), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask)) <= {0, 255}, stem
        lines = labels[stem].read_text().split("\n")
        lines = [ln for ln in lines if ln.strip()]
        if cls == "no_tumor":
            assert not mask.any() and lines == [], stem
            continue
        assert mask.any(), f"{stem}: empty mask for {cls}"
        assert len(lines) == 1, stem
        c, xc, yc, w, h = (float(v) for v in lines[0].split())
        assert int(c) == ph.YOLO_NAMES.index(cls)
        ys, xs = np.nonzero(mask)
        H, W = mask.shape
        got = np.array([(xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H])
        tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(got - tight).max() <= 1.0, (stem, got, tight)


def test_patients_never_cross_splits_and_classes_follow_probs(small, meta, tmp_path):
    split_of: dict[str, set] = {}
    for p in (small / "images").rglob("*.png"):
        split_of.setdefault(p.stem.split("_")[0], set()).add(p.parent.name)
    assert all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test"}
    # counts: exact quotas of the class probabilities, splits stratified per class
    params = ph.normalise_params(n_patients=200, class_probs={"glioma": 0.4, "meningioma": 0.3,
                                                              "pituitary": 0.2, "no_tumor": 0.1})
    plan = ph.plan_patients(params)
    assert Counter(e["class"] for e in plan) == {"glioma": 80, "meningioma": 60, "pituitary": 40, "no_tumor": 20}
    for cls, n in (("glioma", 80), ("no_tumor", 20)):
        per = Counter(e["split"] for e in plan if e["class"] == cls)
        assert abs(per["train"] - 0.7 * n) <= 1 and abs(per["val"] - 0.15 * n) <= 1, per
    assert all(2 <= e["slices"] <= 6 for e in plan)


# ---- anatomy cues ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered():
    """One slice per patient at 128 px with the depth map below the head outline."""
    params = ph.normalise_params(n_patients=36, image_size=128, seed=3, slices=1,
                                 class_probs=[1, 1, 1, 0])
    out = []
    for e in ph.plan_patients(params):
        for stem, img, mask, depth, patient in render.render_patient(params, e, return_depth=True):
            out.append((e["class"], img, mask, depth, patient))
    return out


def test_meningioma_sits_on_the_inner_skull_glioma_inside_the_brain(rendered):
    px = 256 / 128  # depth unit (px of a 256-px image) per pixel here
    seen = Counter()
    for cls, img, mask, depth, patient in rendered:
        d = depth[mask > 0]
        if cls == "meningioma":
            # touches the inner skull surface (within a pixel), never reaches into the bone
            assert d.min() <= render.inner_skull_depth(patient) + px, (d.min(), render.inner_skull_depth(patient))
            assert d.min() >= render.inner_skull_depth(patient) - 0.5
        elif cls == "glioma":
            # intra-axial: inside the brain surface, never in the CSF rim or the bone
            assert d.min() >= render.brain_depth(patient) - 0.5, (d.min(), render.brain_depth(patient))
        seen[cls] += 1
    assert seen["meningioma"] >= 5 and seen["glioma"] >= 5


def test_tumour_sites_from_the_images(rendered):
    """From pixels alone: pituitary central-low on the midline, meningioma at the skull."""
    gaps = {"glioma": [], "meningioma": []}
    for cls, img, mask, depth, patient in rendered:
        head = (img > 25).astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(head)
        head = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        cnts, _ = cv2.findContours(head, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        filled = cv2.drawContours(np.zeros_like(head), cnts, -1, 1, -1)
        ys, xs = np.nonzero(filled)
        cy, cx, size = ys.mean(), xs.mean(), img.shape[0]
        my, mx = np.nonzero(mask)
        if cls == "pituitary":
            assert abs(mx.mean() - cx) < 0.06 * size, (mx.mean(), cx)
            assert 0.0 < my.mean() - cy < 0.16 * size, (my.mean(), cy)
            assert mask.sum() < 0.02 * size * size
        if cls in gaps:
            dist = cv2.distanceTransform(filled, cv2.DIST_L2, 5)
            gaps[cls].append(dist[mask > 0].min())
    assert max(gaps["meningioma"]) < 0.09 * 128
    assert np.median(gaps["glioma"]) > np.median(gaps["meningioma"]) + 3


# ---- regeneration, atomicity, the reader ------------------------------------------------
def test_ensure_regenerates_only_when_params_change(tmp_path):
    root = tmp_path / "ph"
    first = ph.ensure_phantom(root, workers=1, n_patients=4, image_size=48, slices=(2, 2))
    assert first["generated"] and not list(tmp_path.glob(".ph.tmp-*"))
    assert not ph.ensure_phantom(root, workers=1, n_patients=4, image_size=48, slices=(2, 2))["generated"]
    again = ph.ensure_phantom(root, workers=1, n_patients=5, image_size=48, slices=(2, 2))
    assert again["generated"] and again["counts"]["n_images"] == 10
    assert len(list((root / "images").rglob("*.png"))) == 10
    # an older generator version is replaced too
    meta = json.loads((root / "phantom.json").read_text())
    meta["version"] = -1
    (root / "phantom.json").write_text(json.dumps(meta))
    assert ph.ensure_phantom(root, workers=1, n_patients=5, image_size=48, slices=(2, 2))["generated"]


def test_a_failed_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "ph"
    ph.generate_phantom(root, workers=1, n_patients=3, image_size=48, slices=(1, 1))
    before = _hashes(root)
    real = ph._generate_into

    def dies(out, params, workers):
        real(out, params, workers)
        raise KeyboardInterrupt  # killed after writing everything but before the swap

    monkeypatch.setattr(ph, "_generate_into", dies)
    with pytest.raises(KeyboardInterrupt):
        ph.ensure_phantom(root, workers=1, n_patients=4, image_size=48, slices=(1, 1))
    assert _hashes(root) == before  # the old complete dataset is untouched
    assert not list(tmp_path.glob(".ph.tmp-*"))
    monkeypatch.undo()
    (tmp_path / ".ph.tmp-leftover").mkdir()  # as left by a SIGKILL
    assert ph.ensure_phantom(root, workers=1, n_patients=4, image_size=48, slices=(1, 1))["generated"]
    assert not list(tmp_path.glob(".ph.tmp-*")) and not list(tmp_path.glob(".ph.old-*"))


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="refusing"):
        ph.generate_phantom(tmp_path / "mine", n_patients=2, image_size=48)
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_bad_params_fail_clearly():
    with pytest.raises(DataError, match="fmt"):
        ph.normalise_params(fmt="gif")
    with pytest.raises(DataError, match="class_probs"):
        ph.normalise_params(class_probs={"astrocytoma": 1})
    with pytest.raises(DataError, match="slices"):
        ph.normalise_params(slices=(3, 2))


def _ensure_in_child(args):
    root, kw = args
    return ph.ensure_phantom(root, workers=1, **kw)["generated"]


def test_two_processes_generate_once(tmp_path):
    kw = dict(n_patients=6, image_size=48, slices=(2, 2))
    with mp.get_context("spawn").Pool(2) as pool:
        flags = pool.map(_ensure_in_child, [(str(tmp_path / "ph"), kw)] * 2)
    assert sorted(flags) == [False, True]
    assert len(list((tmp_path / "ph" / "images").rglob("*.png"))) == 12


def test_jpg_option(tmp_path):
    ph.generate_phantom(tmp_path / "j", n_patients=2, image_size=48, fmt="jpg", workers=1)
    imgs = [p for p in (tmp_path / "j" / "images").rglob("*") if p.is_file()]
    assert imgs and all(p.suffix == ".jpg" for p in imgs)
    assert all(p.suffix == ".png" for p in (tmp_path / "j" / "masks").rglob("*") if p.is_file())


def test_reader_generates_then_reads(tmp_path):
    from src.data.base import get_reader

    try:
        reader_cls = get_reader("yolo")
    except DataError:
        pytest.skip("the yolo reader is not available")
    del reader_cls
    root = tmp_path / "data" / "phantom"  # does not exist yet
    reader = get_reader("phantom")(root, n_patients=8, image_size=48, seed=2, slices=[2, 3],
                                   splits={"train": 0.5, "val": 0.25, "test": 0.25})
    records = reader.read()
    assert (root / "phantom.json").is_file()
    assert len(records) == json.loads((root / "phantom.json").read_text())["counts"]["n_images"]
    for r in records:
        assert r.source == "phantom"
        assert r.group == Path(r.image).stem.split("_")[0] and r.group.startswith("p")
        assert r.split in ("train", "val", "test")
        assert r.known == {"label": True, "boxes": True, "mask": True}
        assert r.mask and Path(r.mask).is_file()
        if r.label == "no_tumor":
            assert len(r.boxes) == 0
        else:
            assert len(r.boxes) == 1 and r.box_classes == (r.label,)
    assert {r.label for r in records} == {"glioma", "meningioma", "pituitary", "no_tumor"}
    groups: dict[str, set] = {}
    for r in records:
        groups.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in groups.values())
    # same options: nothing regenerated; other options: regenerated
    mtime = (root / "phantom.json").stat().st_mtime_ns
    get_reader("phantom")(root, n_patients=8, image_size=48, seed=2, slices=[2, 3],
                          splits={"train": 0.5, "val": 0.25, "test": 0.25}).read()
    assert (root / "phantom.json").stat().st_mtime_ns == mtime
    assert len(get_reader("phantom")(root, n_patients=4, image_size=48, seed=2, slices=[2, 3]).read()) < len(records)


def test_reader_rejects_unknown_options(tmp_path):
    from src.data.base import get_reader

    with pytest.raises(DataError, match="n_patient"):
        get_reader("phantom")(tmp_path / "x", n_patient=3)
