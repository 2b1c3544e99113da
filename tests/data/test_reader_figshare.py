"""figshare reader: extracted layout and original .mat files (synthetic), plus the real copy."""
from __future__ import annotations

import collections
import csv
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from src.data.base import get_reader
from src.data.readers import figshare as fs
from src.data.records import DataError
from tests.conftest import need_dataset
from tests.data.fixtures_mat import MATLAB_HEADER, slice_arrays, write_mat5, write_mat73

W, H = 48, 32  # non-square on purpose: catches x/y swaps and untransposed MATLAB arrays


def reader(root, **kw):
    return get_reader("figshare")(root, **kw)


# --------------------------------------------------------------------------------------
# extracted layout (images/ masks/ labels/ metadata.csv)
# --------------------------------------------------------------------------------------
def _rect(i):
    """Tumour rectangle (row0, col0, row1, col1) inclusive, different per index."""
    return (2 + i % 5, 3 + i % 7, 10 + i % 9, 20 + i % 11)


def make_extracted(root: Path, labels: list[int], label_names: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "labels").mkdir()
    yolo = {1: 1, 2: 2, 3: 0}  # publisher label -> data.yaml class id
    (root / "data.yaml").write_text("names:\n  0: pituitary\n  1: meningioma\n  2: glioma\n")
    rows = []
    for i, lab in enumerate(labels, 1):
        img = np.full((H, W), 40, np.uint8)
        r0, c0, r1, c1 = _rect(i)
        mask = np.zeros((H, W), np.uint8)
        mask[r0:r1 + 1, c0:c1 + 1] = 255
        img[mask > 0] = 200
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), img)
        cv2.imwrite(str(root / "masks" / f"{i}.png"), mask)
        # a slightly loose third-party box
        x0, y0, x1, y1 = (c0 - 1) / W, (r0 - 1) / H, (c1 + 2) / W, (r1 + 2) / H
        (root / "labels" / f"{i}.txt").write_text(
            f"{yolo.get(lab, 0)} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}\n")
        rows.append([i, lab, fs.LABELS.get(lab, "")] if label_names else [i, lab])
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "label_name", "tumor_border"] if label_names else ["index", "label"])
        for r in rows:
            w.writerow(r + ["[[1.0, 2.0]]"] if label_names else r)
    return root


@pytest.fixture
def extracted(tmp_path):
    return make_extracted(tmp_path / "figshare", [1] * 20 + [2] * 5 + [3] * 15)


def test_extracted_records_boxes_from_masks(extracted):
    r = reader(extracted)
    recs = r.read()
    assert r.layout == "extracted"
    assert len(recs) == 40
    assert collections.Counter(x.label for x in recs) == {"meningioma": 20, "glioma": 5, "pituitary": 15}
    for rec in recs:
        i = rec.meta["index"]
        r0, c0, r1, c1 = _rect(i)
        # pixel-edge convention: x_max = (last_col + 1) / W
        np.testing.assert_allclose(rec.boxes, [[c0 / W, r0 / H, (c1 + 1) / W, (r1 + 1) / H]], atol=1e-6)
        assert rec.box_classes == (rec.label,)
        assert rec.mask == str(extracted / "masks" / f"{i}.png")
        assert rec.image == str(extracted / "images" / f"{i}.jpg")
        assert rec.known == {"label": True, "boxes": True, "mask": True}
        assert (rec.width, rec.height) == (W, H)
        assert rec.source == "figshare"


def test_mask_box_convention_one_pixel():
    m = np.zeros((10, 20), np.uint8)
    m[3, 7] = 255
    np.testing.assert_allclose(fs.mask_box(m), [7 / 20, 3 / 10, 8 / 20, 4 / 10])
    m[:, :] = 1
    np.testing.assert_allclose(fs.mask_box(m), [0, 0, 1, 1])
    assert fs.mask_box(np.zeros((4, 4), np.uint8)) is None


def test_groups_are_label_pure_contiguous_blocks(extracted):
    recs = reader(extracted).read()
    groups = [r.group for r in recs]
    assert collections.Counter(groups) == {"blk0000": 16, "blk0001": 4, "blk0002": 5, "blk0003": 15}
    assert groups == sorted(groups)  # contiguous
    recs8 = reader(extracted, group_block=8).read()
    sizes = collections.Counter(r.group for r in recs8)
    assert max(sizes.values()) == 8
    for g in sizes:
        assert len({r.label for r in recs8 if r.group == g}) == 1


def test_block_groups_helper():
    assert fs.block_groups(["a", "a", "a", "b", "b", "a"], 2) == [
        "blk0000", "blk0000", "blk0001", "blk0002", "blk0002", "blk0003"]


def test_box_source_labels(extracted):
    recs = reader(extracted, box_source="labels").read()
    for rec in recs:
        r0, c0, r1, c1 = _rect(rec.meta["index"])
        np.testing.assert_allclose(rec.boxes[0], [(c0 - 1) / W, (r0 - 1) / H, (c1 + 2) / W, (r1 + 2) / H],
                                   atol=1e-5)
        assert rec.mask is not None and rec.known["boxes"]


def test_box_source_labels_class_disagreement(extracted):
    (extracted / "labels" / "3.txt").write_text("2 0.5 0.5 0.2 0.2\n")  # glioma on a meningioma slice
    with pytest.raises(DataError, match=r"labels/3\.txt.*disagrees"):
        reader(extracted, box_source="labels").read()


def test_metadata_without_label_name(tmp_path):
    root = make_extracted(tmp_path / "f", [2, 2, 3], label_names=False)
    assert [r.label for r in reader(root).read()] == ["glioma", "glioma", "pituitary"]


def _break_missing_image(root):
    (root / "images" / "5.jpg").unlink()
    return r"images/5\.jpg"


def _break_mask_size(root):
    cv2.imwrite(str(root / "masks" / "5.png"), np.full((H + 2, W), 255, np.uint8))
    return r"masks/5\.png.*differs from image size"


def _break_empty_mask(root):
    cv2.imwrite(str(root / "masks" / "5.png"), np.zeros((H, W), np.uint8))
    return r"masks/5\.png.*empty mask"


def _break_missing_mask(root):
    (root / "masks" / "5.png").unlink()
    return r"masks/5\.png.*not found"


def _break_corrupt_image(root):
    (root / "images" / "5.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return r"images/5\.jpg.*corrupt"


def _break_label(root):
    text = (root / "metadata.csv").read_text().splitlines()
    text[5] = text[5].replace("5,1,meningioma", "5,7,")
    (root / "metadata.csv").write_text("\n".join(text) + "\n")
    return r"metadata\.csv:6.*unknown label number 7"


def _break_label_name(root):
    text = (root / "metadata.csv").read_text().splitlines()
    text[5] = text[5].replace("5,1,meningioma", "5,1,glioma")
    (root / "metadata.csv").write_text("\n".join(text) + "\n")
    return r"metadata\.csv:6.*disagrees with label_name 'glioma'"


@pytest.mark.parametrize("breaker", [_break_missing_image, _break_mask_size, _break_empty_mask,
                                     _break_missing_mask, _break_corrupt_image, _break_label,
                                     _break_label_name])
def test_extracted_errors_name_the_file_or_skip(extracted, breaker):
    pattern = breaker(extracted)
    with pytest.raises(DataError, match=pattern):
        reader(extracted).read()
    r = reader(extracted, on_error="skip")
    recs = r.read()
    assert len(recs) == 39 and len(r.skipped) == 1
    assert 5 not in {x.meta["index"] for x in recs}
    # groups do not move when a slice is skipped
    full = {i: g for i, g in zip(range(1, 41), fs.block_groups([1] * 20 + [2] * 5 + [3] * 15, 16))}
    assert all(x.group == full[x.meta["index"]] for x in recs)


def test_not_a_figshare_folder(tmp_path):
    (tmp_path / "brainTumorDataPublic_1-766.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="unzip them first"):
        reader(tmp_path).read()
    with pytest.raises(DataError, match="does not exist"):
        reader(tmp_path / "nope").read()


@pytest.mark.parametrize("opts", [{"box_source": "polygons"}, {"group_block": 0}, {"box_sorce": "mask"},
                                  {"intensity_range": [50, 10]}])
def test_bad_options(tmp_path, opts):
    with pytest.raises(DataError):
        reader(tmp_path, **opts)


# --------------------------------------------------------------------------------------
# original .mat files
# --------------------------------------------------------------------------------------
MAT_SLICES = [  # (subfolder, n, label, pid, rect)
    ("brainTumorDataPublic_1-766", 1, 1, "100360", (2, 3, 9, 30)),
    ("brainTumorDataPublic_1-766", 2, 1, "100360", (4, 10, 12, 20)),
    ("brainTumorDataPublic_1-766", 3, 2, "MR029537", (0, 0, 31, 5)),
    ("brainTumorDataPublic_767-1532", 767, 2, "MR029537", (20, 40, 31, 47)),
    ("brainTumorDataPublic_767-1532", 768, 3, "112649", (5, 5, 5, 5)),
    ("brainTumorDataPublic_767-1532", 10, 3, "112649", (1, 2, 3, 4)),
]


@pytest.fixture
def mat_root(tmp_path):
    root = tmp_path / "figshare_mat"
    for k, (sub, n, lab, pid, rect) in enumerate(MAT_SLICES):
        image, mask = slice_arrays(H, W, rect, seed=k)
        write_mat73(root / sub / f"{n}.mat", image, mask, lab, pid)
    # the published cross-validation index file is not a slice
    import h5py
    with h5py.File(root / "cvind.mat", "w", userblock_size=512) as f:
        f.create_dataset("cvind", data=np.ones((1, 10)))
    return root


def test_fixture_is_like_matlab(mat_root):
    import h5py
    p = mat_root / "brainTumorDataPublic_1-766" / "1.mat"
    assert p.read_bytes()[:len(MATLAB_HEADER)] == MATLAB_HEADER
    assert h5py.is_hdf5(str(p))
    with h5py.File(p, "r") as f:
        assert f["cjdata/image"].shape == (W, H)  # column-major like MATLAB


def test_mat_records(mat_root, tmp_path):
    cache = tmp_path / "cache"
    r = reader(mat_root, cache_dir=str(cache))
    recs = r.read()
    assert r.layout == "mat"
    assert len(recs) == len(MAT_SLICES)
    by_n = {Path(x.meta["mat"]).stem: x for x in recs}
    for k, (sub, n, lab, pid, (r0, c0, r1, c1)) in enumerate(MAT_SLICES):
        rec = by_n[str(n)]
        assert rec.label == fs.LABELS[lab]
        assert rec.group == pid and rec.meta["pid"] == pid
        assert rec.known == {"label": True, "boxes": True, "mask": True}
        assert (rec.width, rec.height) == (W, H)
        np.testing.assert_allclose(rec.boxes, [[c0 / W, r0 / H, (c1 + 1) / W, (r1 + 1) / H]], atol=1e-6)
        assert rec.image == str(cache / "images" / sub / f"{n}.png")
        image, mask = slice_arrays(H, W, (r0, c0, r1, c1), seed=k)
        png = cv2.imread(rec.image, cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint8 and png.shape == (H, W)
        np.testing.assert_array_equal(png, fs.to_uint8(image))
        assert png[:, -1].mean() > 240 and png[:, 0][1:].mean() < 15  # ramp survived the hot pixel
        m = cv2.imread(rec.mask, cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(m, mask * 255)
    assert len({x.group for x in recs}) == 3
    # records sorted by folder then slice number
    assert [Path(x.meta["mat"]).stem for x in recs] == ["1", "2", "3", "10", "767", "768"]


def test_mat_conversion_is_reused(mat_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = reader(mat_root, cache_dir=cache).read()
    stamps = {x.image: os.stat(x.image).st_mtime_ns for x in first}

    def boom(path):
        raise AssertionError(f"{path} re-read although its conversion is fresh")

    monkeypatch.setattr(fs, "load_mat", boom)
    second = reader(mat_root, cache_dir=cache).read()
    assert [x.to_json() for x in second] == [x.to_json() for x in first]
    assert stamps == {x.image: os.stat(x.image).st_mtime_ns for x in second}
    monkeypatch.undo()

    # a .mat that changed (newer than its PNGs) is converted again, only that one
    mat = mat_root / "brainTumorDataPublic_1-766" / "2.mat"
    image, mask = slice_arrays(H, W, (0, 0, 1, 1), seed=9)
    write_mat73(mat, image, mask, 3, "999")
    future = os.stat(first[0].image).st_mtime + 10
    os.utime(mat, (future, future))
    calls = []
    real = fs.load_mat
    monkeypatch.setattr(fs, "load_mat", lambda p: calls.append(Path(p).name) or real(p))
    third = reader(mat_root, cache_dir=cache).read()
    assert calls == ["2.mat"]
    rec = next(x for x in third if x.meta["mat"] == str(mat))
    assert rec.label == "pituitary" and rec.group == "999"
    np.testing.assert_allclose(rec.boxes[0], [0, 0, 2 / W, 2 / H], atol=1e-6)


def test_mat_default_cache_dir(mat_root, tmp_path, monkeypatch):
    r = reader(mat_root)
    recs = r.read()
    assert Path(recs[0].image).is_relative_to(mat_root / ".btmtl_cache")
    # a second read does not take the cache's PNGs for slices
    assert len(reader(mat_root).read()) == len(MAT_SLICES)
    # read-only root (the shared folder): the cache goes to ~/.cache/btmtl/figshare/<hash>
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fs, "_dir_writable", lambda p: False)
    recs = reader(mat_root).read()
    base = tmp_path / "home" / ".cache" / "btmtl" / "figshare"
    assert Path(recs[0].image).is_relative_to(base)
    assert len(list(base.iterdir())) == 1


def test_mat_v5_via_scipy(tmp_path):
    image, mask = slice_arrays(H, W, (3, 4, 8, 9))
    write_mat5(tmp_path / "m" / "12.mat", image, mask, 2, "PAT7")
    rec, = reader(tmp_path / "m", cache_dir=tmp_path / "c").read()
    assert rec.label == "glioma" and rec.group == "PAT7"
    np.testing.assert_allclose(rec.boxes[0], [4 / W, 3 / H, 10 / W, 9 / H], atol=1e-6)
    np.testing.assert_array_equal(cv2.imread(rec.mask, cv2.IMREAD_UNCHANGED), mask * 255)


def _bad_not_mat(p):
    p.write_bytes(os.urandom(300))
    return "neither v7.3/HDF5 nor v5"


def _bad_no_cjdata(p):
    import h5py
    p.unlink()
    with h5py.File(p, "w", userblock_size=512) as f:
        f.create_dataset("something", data=np.ones(3))
    return r"no 'cjdata' struct \(variables: \['something'\]\)"


def _bad_label(p):
    image, mask = slice_arrays(H, W, (1, 1, 2, 2))
    write_mat73(p, image, mask, 4, "123")
    return "unknown label number 4"


def _bad_empty_mask(p):
    image, mask = slice_arrays(H, W, (1, 1, 2, 2))
    write_mat73(p, image, mask * 0, 1, "123")
    return "empty tumorMask"


def _bad_no_pid(p):
    image, mask = slice_arrays(H, W, (1, 1, 2, 2))
    write_mat73(p, image, mask, 1, None)
    return "no patient id"


@pytest.mark.parametrize("breaker", [_bad_not_mat, _bad_no_cjdata, _bad_label, _bad_empty_mask, _bad_no_pid])
def test_mat_errors_name_the_file(mat_root, tmp_path, breaker):
    bad = mat_root / "brainTumorDataPublic_1-766" / "2.mat"
    pattern = breaker(bad)
    with pytest.raises(DataError, match=r"1-766/2\.mat.*" + pattern):
        reader(mat_root, cache_dir=tmp_path / "c").read()
    r = reader(mat_root, cache_dir=tmp_path / "c", on_error="skip")
    recs = r.read()
    assert len(recs) == len(MAT_SLICES) - 1 and len(r.skipped) == 1
    assert r.skipped.items[0][0] == str(bad)


def test_box_source_labels_needs_extracted_layout(mat_root, tmp_path):
    with pytest.raises(DataError, match="box_source=labels"):
        reader(mat_root, cache_dir=tmp_path / "c", box_source="labels").read()


def test_to_uint8_edge_cases():
    assert fs.to_uint8(np.full((4, 4), 7)).max() == 0
    out = fs.to_uint8(np.arange(100).reshape(10, 10), 0, 100)
    assert out.min() == 0 and out.max() == 255


# --------------------------------------------------------------------------------------
# real data (../shared/data/figshare-cheng)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(shared_data):
    root = need_dataset(shared_data, "figshare-cheng")
    return root, reader(root).read()


def test_real_counts(real):
    _, recs = real
    assert len(recs) == 2398
    assert collections.Counter(r.label for r in recs) == {"meningioma": 542, "glioma": 1127, "pituitary": 729}
    assert all(r.known == {"label": True, "boxes": True, "mask": True} for r in recs)


def test_real_boxes_valid_and_tight(real):
    _, recs = real
    b = np.concatenate([r.boxes for r in recs])
    assert b.shape == (2398, 4)
    assert np.all((b >= 0) & (b <= 1)) and np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    rng = np.random.default_rng(0)
    for k in rng.choice(len(recs), 100, replace=False):
        rec = recs[k]
        m = cv2.imread(rec.mask, cv2.IMREAD_GRAYSCALE) > 0
        h, w = m.shape
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = rec.boxes[0]
        # every mask pixel (its whole pixel square) lies inside the box ...
        assert xs.min() >= x0 * w - 1e-3 and (xs.max() + 1) <= x1 * w + 1e-3
        assert ys.min() >= y0 * h - 1e-3 and (ys.max() + 1) <= y1 * h + 1e-3
        # ... and the box is tight: each edge touches a mask pixel
        np.testing.assert_allclose([x0 * w, y0 * h, x1 * w, y1 * h],
                                   [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1e-2)


def test_real_groups_never_mix_labels(real):
    _, recs = real
    by_group = collections.defaultdict(set)
    for r in recs:
        by_group[r.group].add(r.label)
    assert all(len(v) == 1 for v in by_group.values())
    sizes = collections.Counter(r.group for r in recs)
    assert max(sizes.values()) <= 16 and len(sizes) >= 2398 // 16


def test_real_third_party_boxes_agree_roughly(real):
    root, recs = real
    third = reader(root, box_source="labels").read()
    a = np.concatenate([r.boxes for r in recs])
    b = np.concatenate([r.boxes for r in third])
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    iou = inter / (area(a) + area(b) - inter)
    assert 0.85 < iou.mean() < 0.97  # README: about 0.92


def test_intensity_range_is_two_ordered_percentiles():
    from src.data.readers.figshare import percentile_range

    assert percentile_range((0.5, 99.5), "figshare") == (0.5, 99.5)
    for bad in ((99, 1), (0, 101), "x", None, (1,)):
        with pytest.raises(DataError, match="figshare reader: intensity_range must be two percentiles"):
            percentile_range(bad, "figshare")
