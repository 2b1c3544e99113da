"""``folder`` reader: class folders, optional split folders, ill input."""
from __future__ import annotations

import collections
import time

import pytest

from src.data.base import get_reader
from src.data.readers.folder import FolderReader
from src.data.records import ClassMap, DataError
from tests.conftest import need_dataset
from tests.data.fixtures_readers import write_garbage, write_image, write_truncated_jpeg


def _classes(root, layout: dict):
    """layout: {relative class folder: number of images}."""
    for folder, n in layout.items():
        for i in range(n):
            write_image(root / folder / f"img_{i:02d}.jpg", 24, 16, seed=i)
    return root


def test_registered():
    assert get_reader("folder") is FolderReader


def test_split_folders_and_aliases(tmp_path):
    root = _classes(tmp_path / "ds", {
        "Training/glioma_tumor": 3, "Training/notumor": 2, "Training/meningioma": 1, "Training/pituitary": 1,
        "Testing/glioma_tumor": 1, "Testing/no_tumor": 2,
    })
    recs = FolderReader(root).read()
    assert len(recs) == 10
    counts = collections.Counter((r.split, r.label) for r in recs)
    assert counts == {("train", "glioma"): 3, ("train", "no_tumor"): 2, ("train", "meningioma"): 1,
                      ("train", "pituitary"): 1, ("test", "glioma"): 1, ("test", "no_tumor"): 2}
    for r in recs:
        assert r.known == {"label": True, "boxes": False, "mask": False}
        assert (r.width, r.height) == (24, 16)
        assert r.source == "folder" and len(r.boxes) == 0 and r.mask is None
    assert [r.image for r in recs] == sorted(r.image for r in recs)


def test_train_val_test_names(tmp_path):
    root = _classes(tmp_path / "ds", {"train/glioma": 1, "valid/glioma": 1, "test/pituitary": 1})
    assert sorted(r.split for r in FolderReader(root).read()) == ["test", "train", "val"]


def test_flat_layout_has_no_split(tmp_path):
    root = _classes(tmp_path / "brain", {"yes": 2, "no": 1})
    recs = FolderReader(root, source="br35h-folders").read()
    assert {r.split for r in recs} == {None}
    assert collections.Counter(r.label for r in recs) == {"tumor": 2, "no_tumor": 1}
    assert {r.source for r in recs} == {"br35h-folders"}


def test_root_is_a_split_folder(tmp_path):
    root = _classes(tmp_path / "ds", {"Training/glioma": 2, "Training/pituitary": 1})
    recs = FolderReader(root / "Training").read()
    assert len(recs) == 3 and {r.split for r in recs} == {"train"}


def test_stray_files_ignored(tmp_path):
    root = _classes(tmp_path / "ds", {"glioma": 2})
    (root / "glioma" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "glioma" / "notes.txt").write_text("hello")
    (root / ".ipynb_checkpoints").mkdir()
    reader = FolderReader(root)
    assert len(reader.read()) == 2
    assert len(reader.ignored) == 2 and len(reader.skipped) == 0


def test_custom_alias(tmp_path):
    root = _classes(tmp_path / "ds", {"gliom": 1, "healthy": 1})
    recs = FolderReader(root, class_map=ClassMap(aliases={"gliom": "glioma"})).read()
    assert sorted(r.label for r in recs) == ["glioma", "no_tumor"]


def test_parallel_probe_is_deterministic(tmp_path):
    root = _classes(tmp_path / "ds", {"glioma": 40, "meningioma": 40})
    a = FolderReader(root, workers=4).read()
    b = FolderReader(root, workers=0).read()
    assert [(r.image, r.label, r.width) for r in a] == [(r.image, r.label, r.width) for r in b]


# ---- ill input -------------------------------------------------------------------------
def test_unknown_class_folder(tmp_path):
    root = _classes(tmp_path / "ds", {"glioma": 1, "astrocytoma": 1})
    with pytest.raises(DataError, match="astrocytoma") as e:
        FolderReader(root).read()
    assert str(root / "astrocytoma") in str(e.value)


@pytest.mark.parametrize("writer", [write_garbage, write_truncated_jpeg], ids=["garbage", "truncated"])
def test_corrupt_image_raises_naming_file(tmp_path, writer):
    root = _classes(tmp_path / "ds", {"glioma": 2})
    bad = writer(root / "glioma" / "zz_bad.jpg")
    with pytest.raises(DataError, match="corrupt") as e:
        FolderReader(root).read()
    assert str(bad) in str(e.value)


def test_skip_counts_bad_files(tmp_path):
    root = _classes(tmp_path / "ds", {"glioma": 2, "pituitary": 1})
    write_garbage(root / "glioma" / "bad1.jpg")
    write_truncated_jpeg(root / "pituitary" / "bad2.jpg")
    reader = FolderReader(root, on_error="skip")
    recs = reader.read()
    assert len(recs) == 3
    assert len(reader.skipped) == 2
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in reader.skipped.items) == ["bad1.jpg", "bad2.jpg"]
    assert reader.skipped.summary()["by_reason"] == {"corrupt or unreadable image": 1, "corrupt image": 1}


def test_empty_dataset(tmp_path):
    (tmp_path / "ds" / "glioma").mkdir(parents=True)
    with pytest.raises(DataError, match="empty dataset"):
        FolderReader(tmp_path / "ds").read()


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderReader(tmp_path / "nope").read()


def test_mixed_split_and_class_folders(tmp_path):
    root = _classes(tmp_path / "ds", {"train/glioma": 1, "glioma": 1})
    with pytest.raises(DataError, match="mixes split folders"):
        FolderReader(root).read()


def test_options_checked(tmp_path):
    with pytest.raises(DataError, match="unknown option"):
        FolderReader(tmp_path, clases_from="folder")
    with pytest.raises(DataError, match="classes_from"):
        FolderReader(tmp_path, classes_from="csv")
    FolderReader(tmp_path, classes_from="folder")


# ---- real data -------------------------------------------------------------------------
def test_kaggle_training(shared_data):
    root = need_dataset(shared_data, "kaggle-brain-mri-224") / "Training"
    t = time.perf_counter()
    recs = FolderReader(root).read()
    elapsed = time.perf_counter() - t
    assert len(recs) == 5708
    assert collections.Counter(r.label for r in recs) == {
        "glioma": 1321, "meningioma": 1339, "no_tumor": 1591, "pituitary": 1457}
    assert {r.split for r in recs} == {"train"}
    assert all(r.width and r.height for r in recs)
    print(f"folder reader: {len(recs)} kaggle images in {elapsed:.2f}s")
