"""DICOM series and NIfTI volumes (src/data/readers/dicom.py, nifti.py, clinical.py) on
data the tests write themselves with pydicom and nibabel."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from src.data.base import get_reader  # noqa: E402
from src.data.dataset import load_data  # noqa: E402
from src.data.records import DataError, save_manifest  # noqa: E402
from src.data.readers import clinical, dicom, nifti  # noqa: E402
from tests.data.fixtures_clinical import (ras_affine, ras_labels, ras_volume, slice_pixels, write_dicom,  # noqa: E402
                                          write_nifti, write_series, write_subject)


def _png(path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _read(name, root, tmp_path, **kw):
    return get_reader(name)(root, cache_dir=str(tmp_path / f"cache_{name}"), **kw)


def _disc_means(records) -> list:
    out = []
    for r in sorted(records, key=lambda r: r.meta["slice"]):
        img = _png(r.image)
        out.append(float(img[img > 0].mean()) if (img > 0).any() else 0.0)
    return out


# --------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------
def test_dicom_slice_order_by_position_not_name(tmp_path):
    # names run against the positions; a sagittal series orders along its own normal
    write_series(tmp_path / "d" / "ax", 5, series="1.1", window=(150, 400))
    write_series(tmp_path / "d" / "sag", 4, series="1.2", orientation=(0, 1, 0, 0, 0, -1), window=(150, 400))
    recs = _read("dicom", tmp_path / "d", tmp_path).read()
    by_series: dict = {}
    for r in recs:
        by_series.setdefault(r.meta["series"], []).append(r)
    assert sorted(len(v) for v in by_series.values()) == [4, 5]
    for v in by_series.values():
        means = _disc_means(v)
        assert all(b > a + 5 for a, b in zip(means, means[1:])), means   # value grows with position
        files = [r.meta["file"] for r in sorted(v, key=lambda r: r.meta["slice"])]
        assert files == sorted(files, reverse=True)   # IM0005 (first position) ... IM0001


def test_dicom_rescale_and_header_window(tmp_path):
    px = np.zeros((16, 16), np.uint16)
    px[:, :4], px[:, 4:8], px[:, 8:12], px[:, 12:] = 50, 100, 150, 400
    # real = 2 * stored - 100 -> 0, 100, 200, 700; window c=100 w=201 -> [0, 200] on 0..255
    write_dicom(tmp_path / "d" / "a.dcm", px, slope=2.0, intercept=-100.0, window=(100.5, 201))
    (rec,) = _read("dicom", tmp_path / "d", tmp_path, min_foreground=0).read()
    img = _png(rec.image)
    assert img[0, 0] == 0 and img[0, 15] == 255
    assert abs(int(img[0, 5]) - 128) <= 1 and img[0, 9] == 255
    # a fixed window given in the config wins over the header: [350, 700] -> [0, 699]
    (rec,) = _read("dicom", tmp_path / "d", tmp_path, min_foreground=0, window=[350, 700]).read()
    img = _png(rec.image)
    assert img[0, 0] == 0 and 36 <= img[0, 5] <= 37 and 72 <= img[0, 9] <= 73 and img[0, 15] == 255
    # MONOCHROME1 is inverted
    write_dicom(tmp_path / "m" / "a.dcm", px, window=(200, 400), photometric="MONOCHROME1")
    (rec,) = _read("dicom", tmp_path / "m", tmp_path, min_foreground=0).read()
    img = _png(rec.image)
    assert img[0, 15] == 0 and img[0, 0] > 200


def test_dicom_percentile_window_is_one_scale_per_series(tmp_path):
    write_series(tmp_path / "d", 4, series="1.1")   # no header window
    recs = _read("dicom", tmp_path / "d", tmp_path, min_foreground=0, intensity_range=[0, 100]).read()
    means = _disc_means(recs)
    assert means[-1] == 255 and means[1] < means[2] < 255   # the brightest slice sets the top of the scale


def test_dicom_missing_slice_is_one_line_naming_the_file(tmp_path):
    write_series(tmp_path / "d", 6, series="1.1", skip=(3,), window=(150, 400))
    with pytest.raises(DataError, match=r"IM0002\.dcm: series has a missing slice between .*IM0004\.dcm"):
        _read("dicom", tmp_path / "d", tmp_path).read()
    # without positions the instance numbers tell
    for k in (0, 1, 3):
        write_dicom(tmp_path / "i" / f"x{k}.dcm", slice_pixels(k), series="2.2", instance=k + 1, position=None,
                    orientation=None, window=(150, 400))
    with pytest.raises(DataError, match="missing slice.*InstanceNumber"):
        _read("dicom", tmp_path / "i", tmp_path).read()


def test_dicom_non_dicom_file_and_skip_counts(tmp_path):
    write_series(tmp_path / "d" / "s1", 3, series="1.1", window=(150, 400))
    write_series(tmp_path / "d" / "s2", 4, series="1.2", skip=(1,), window=(150, 400))
    (tmp_path / "d" / "s1" / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "d" / "notes.txt").write_text("ignored by default")
    with pytest.raises(DataError) as e:
        _read("dicom", tmp_path / "d", tmp_path).read()
    msg = str(e.value)
    assert "scan.png: not a DICOM file" in msg and "\n" not in msg and "data.on_error=skip" in msg
    r = _read("dicom", tmp_path / "d", tmp_path, )
    r.on_error = "skip"
    recs = r.read()
    assert len(recs) == 3 and len(r.skipped) == 2
    reasons = sorted(r.skipped.summary()["by_reason"])
    assert reasons[0] == "not a DICOM file" and reasons[1].startswith("series has a missing slice"), reasons


def test_dicom_mixed_series_in_one_folder(tmp_path):
    d = tmp_path / "d"
    for k in range(3):   # two series interleaved in one folder, names sorted across both
        write_dicom(d / f"a{k}.dcm", slice_pixels(k), patient="P1", series="1.1", instance=k + 1,
                    position=(0, 0, 2.0 * k), window=(150, 400))
        write_dicom(d / f"b{k}.dcm", slice_pixels(k, 24, 24), patient="P2", study="9.9", series="1.2",
                    instance=k + 1, position=(0, 0, 5.0 * k), window=(150, 400))
    recs = _read("dicom", d, tmp_path).read()
    series = {r.meta["series"]: set() for r in recs}
    for r in recs:
        series[r.meta["series"]].add((r.width, r.group))
    assert sorted(len(v) for v in series.values()) == [1, 1]
    assert {next(iter(v))[0] for v in series.values()} == {24, 32}
    assert len({r.group for r in recs}) == 2


def test_dicom_compressed_series(tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    write_series(tmp_path / "d" / "rle", 3, series="1.1", window=(150, 400), compress=RLELossless)
    try:
        write_series(tmp_path / "d" / "j2k", 3, series="1.2", window=(150, 400), compress=JPEG2000Lossless)
    except Exception as e:  # noqa: BLE001 - the encoder plugin (pylibjpeg-openjpeg) is optional
        pytest.skip(f"no JPEG 2000 encoder: {e}")
    recs = _read("dicom", tmp_path / "d", tmp_path).read()
    assert len(recs) == 6
    by = {}
    for r in recs:
        by.setdefault(r.meta["series"], []).append(r)
    a, b = (_disc_means(v) for v in by.values())
    assert a == b   # lossless: the same pixels


def test_dicom_labels_csv_by_patient_series_path(tmp_path):
    d = tmp_path / "d"
    write_series(d / "p1", 3, patient="P1", series="1.1", window=(150, 400))
    write_series(d / "p2", 3, patient="P2", series="1.2", study="2.2", window=(150, 400))
    write_series(d / "p3", 3, patient="P3", series="1.3", study="3.3", window=(150, 400))
    (d / "labels.csv").write_text("PatientID,label\nP1,glioma\nP2,no_tumor\nP9,pituitary\n")
    recs = _read("dicom", d, tmp_path, labels=str(d / "labels.csv"), label="meningioma").read()
    by_file = {r.meta["file"].split("/")[0]: r for r in recs}
    assert by_file["p1"].label == "glioma" and by_file["p2"].label == "no_tumor"
    assert by_file["p3"].label == "meningioma"     # no row: the fixed label
    assert not by_file["p1"].known["mask"] and by_file["p1"].known["label"]
    (tmp_path / "series.csv").write_text("series,label\n1.3,pituitary\n")
    recs = _read("dicom", d, tmp_path, labels=str(tmp_path / "series.csv")).read()
    assert sorted({str(r.label) for r in recs}) == ["None", "pituitary"]
    (tmp_path / "path.csv").write_text("path,label\np2,glioma\np2/IM0001.dcm,meningioma\n")
    recs = _read("dicom", d, tmp_path, labels=str(tmp_path / "path.csv")).read()
    got = {r.meta["file"]: r.label for r in recs}
    assert got["p2/IM0001.dcm"] == "meningioma" and got["p2/IM0002.dcm"] == "glioma" and got["p1/IM0001.dcm"] is None
    (tmp_path / "bad.csv").write_text("PatientID,label\nP1,astrocytoma\n")
    with pytest.raises(DataError, match="bad.csv:2.*astrocytoma"):
        _read("dicom", d, tmp_path, labels=str(tmp_path / "bad.csv")).read()


def test_dicom_ids_hashed_everywhere_and_patient_level_split(tmp_path, caplog):
    d = tmp_path / "d"
    rows = ["PatientID,label"]
    for p in range(12):
        pid = f"SECRET{p:03d}"
        write_series(d / f"case{p}", 3, patient=pid, series=f"1.{p}.1", study=f"2.{p}", window=(150, 400))
        if p % 3 == 0:   # a second study of the same patient
            write_series(d / f"case{p}" / "followup", 2, patient=pid, series=f"1.{p}.2", study=f"3.{p}",
                         window=(150, 400))
        rows.append(f"{pid},{['glioma', 'meningioma', 'pituitary'][p % 3]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (d / "case0" / "junk.bin").write_bytes(b"not dicom")
    cfg = {"name": "dicom", "reader": "dicom", "root": str(d), "on_error": "skip",
           "options": {"labels": str(tmp_path / "labels.csv")},
           "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 1}}
    with caplog.at_level(logging.DEBUG):
        bundle = load_data(cfg, cache_dir=str(tmp_path / "cache"))
    recs = bundle.records
    assert len(recs) == 12 * 3 + 4 * 2 and len(bundle.skipped) == 1
    splits_of: dict = {}
    for r in recs:
        splits_of.setdefault(r.group, set()).add(r.split)
    assert len(splits_of) == 12 and all(len(s) == 1 for s in splits_of.values())   # a patient, one split
    assert {s for v in splits_of.values() for s in v} == {"train", "val", "test"}
    assert all(g.startswith("pt-") for g in splits_of)
    # nothing written or logged holds an id in clear
    save_manifest(recs, tmp_path / "cache" / "manifest.jsonl")
    (tmp_path / "cache" / "summary.json").write_text(json.dumps(bundle.summary()))
    written = "".join(p.read_text(errors="ignore") for p in (tmp_path / "cache").rglob("*.json*"))
    written += " ".join(str(p) for p in (tmp_path / "cache").rglob("*"))
    assert "SECRET" not in written and "1.3.1" not in json.dumps([r.meta for r in recs])
    assert "SECRET" not in caplog.text


def test_dicom_cache_reused_while_newer_than_source(tmp_path, monkeypatch):
    files = write_series(tmp_path / "d", 3, series="1.1", window=(150, 400))
    _read("dicom", tmp_path / "d", tmp_path).read()
    opened = []
    real = dicom.read_header
    monkeypatch.setattr(dicom, "read_header", lambda p: opened.append(p) or real(p))
    monkeypatch.setattr(dicom, "series_images", lambda *a, **k: pytest.fail("converted again"))
    recs = _read("dicom", tmp_path / "d", tmp_path).read()
    assert len(recs) == 3 and opened == []                         # no file opened
    monkeypatch.undo()
    before = _disc_means(recs)
    write_dicom(files[0], slice_pixels(0) * 0 + slice_pixels(9), series="1.1", instance=1, position=(10, 10, 10),
                window=(150, 400))
    t = time.time() + 5
    os.utime(files[0], (t, t))
    recs = _read("dicom", tmp_path / "d", tmp_path).read()
    assert _disc_means(recs) != before                             # the changed file was converted again


# --------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------
def test_nifti_orientation_canonical_and_display(tmp_path):
    write_subject(tmp_path / "n", "S1")                 # stored RAS
    write_subject(tmp_path / "n", "S2", axcodes="PLI")  # the same volume, permuted and flipped
    recs = _read("nifti", tmp_path / "n", tmp_path, min_foreground=0).read()
    by = {}
    for r in recs:
        by.setdefault(r.meta["volume"].split("/")[-1], []).append(r)
    a = sorted(by["S1_t1ce.nii.gz"], key=lambda r: r.meta["slice"])
    b = sorted(by["S2_t1ce.nii.gz"], key=lambda r: r.meta["slice"])
    assert len(a) == len(b) == 10
    for ra, rb in zip(a, b):
        assert np.array_equal(_png(ra.image), _png(rb.image))
        assert np.allclose(ra.boxes, rb.boxes) and ra.label == rb.label
    img = _png(a[0].image)
    assert img.shape == (24, 20)                          # rows = anterior-posterior, cols = right-left
    assert img[1:3, 1:3].min() == 255                     # the right-anterior marker: top left on screen
    centre = [float(_png(r.image)[10:14, 8:12].mean()) for r in a]
    assert all(y > x for x, y in zip(centre, centre[1:])), centre   # inferior -> superior
    coronal = _read("nifti", tmp_path / "n", tmp_path, min_foreground=0, axis="coronal").read()
    assert {(r.width, r.height) for r in coronal} == {(20, 10)}


def test_nifti_labels_mapped_and_empty_slices(tmp_path):
    write_subject(tmp_path / "n", "S1", seg_slices=(3, 4, 5))
    recs = _read("nifti", tmp_path / "n", tmp_path, min_foreground=0, label="glioma").read()
    tumour = [r for r in recs if len(r.boxes)]
    assert [r.meta["slice"] for r in tumour] == [3, 4, 5] and {r.label for r in tumour} == {"glioma"}
    empty = [r for r in recs if not len(r.boxes)]
    assert len(empty) == 7 and all(r.label == "no_tumor" and r.known["mask"] and r.mask is None for r in empty)
    m = _png(tumour[0].mask)
    assert (m > 0).sum() == 16                            # labels 1, 2 and 4: the 4x4 oedema square
    core = _read("nifti", tmp_path / "n", tmp_path, min_foreground=0, tumor_labels=[1, 4],
                 empty_slices="drop").read()
    assert len(core) == 3 and (_png(core[0].mask) > 0).sum() == 4   # core + enhancing only
    assert {r.label for r in core} == {"tumor"}          # no class given: generic tumour
    (tmp_path / "subjects.csv").write_text("subject,label\nS1,meningioma\n")
    recs = _read("nifti", tmp_path / "n", tmp_path, labels=str(tmp_path / "subjects.csv")).read()
    assert {r.label for r in recs if len(r.boxes)} == {"meningioma"}


def test_nifti_mismatched_label_volume_and_skip(tmp_path):
    write_subject(tmp_path / "n", "S1")
    d = tmp_path / "n" / "S2"
    write_nifti(d / "S2_t1ce.nii.gz", ras_volume(), ras_affine())
    write_nifti(d / "S2_seg.nii.gz", ras_labels((20, 24, 9)), ras_affine())   # one slice short
    with pytest.raises(DataError) as e:
        _read("nifti", tmp_path / "n", tmp_path).read()
    assert "S2_seg.nii.gz: label volume shape" in str(e.value) and "\n" not in str(e.value)
    d3 = tmp_path / "n" / "S3"
    write_nifti(d3 / "S3_t1ce.nii.gz", ras_volume(), ras_affine())
    write_nifti(d3 / "S3_seg.nii.gz", ras_labels(), ras_affine((1.0, 1.0, 3.0)))   # another grid
    (tmp_path / "n" / "S4").mkdir()
    (tmp_path / "n" / "S4" / "S4_t1ce.nii.gz").write_bytes(b"not a volume")
    (tmp_path / "n" / "S4" / "S4_seg.nii.gz").write_bytes(b"not a volume")
    r = _read("nifti", tmp_path / "n", tmp_path, on_error="skip")
    recs = r.read()
    assert {x.meta["volume"].split("/")[-2] for x in recs} == {"S1"}
    kinds = r.skipped.summary()["by_reason"]
    assert len(r.skipped) == 3 and "label volume affine does not match image " in "".join(kinds), kinds
    assert any("not a readable NIfTI volume" in k for k in kinds)


def test_nifti_missing_label_volume_and_folders_pairing(tmp_path):
    write_nifti(tmp_path / "n" / "S1" / "S1_t1ce.nii.gz", ras_volume(), ras_affine())
    with pytest.raises(DataError, match=r"S1_t1ce.nii.gz: no label volume \(expected .*S1_seg.nii.gz\)"):
        _read("nifti", tmp_path / "n", tmp_path).read()
    recs = _read("nifti", tmp_path / "n", tmp_path, require_labels=False, min_foreground=0).read()
    assert len(recs) == 10 and not any(r.known["mask"] for r in recs)
    f = tmp_path / "msd"
    write_nifti(f / "imagesTr" / "case_001.nii.gz", ras_volume(), ras_affine())
    write_nifti(f / "labelsTr" / "case_001.nii.gz", ras_labels(), ras_affine())
    recs = _read("nifti", f, tmp_path, pairing="folders", min_foreground=0).read()
    assert len(recs) == 10 and sum(bool(len(r.boxes)) for r in recs) == 3


def test_nifti_cache_reused_and_mask_volume_round_trip(tmp_path, monkeypatch):
    img, seg = write_subject(tmp_path / "n", "S1", axcodes="PLI")
    _read("nifti", tmp_path / "n", tmp_path).read()
    monkeypatch.setattr(nifti, "volume_slices", lambda *a, **k: pytest.fail("converted again"))
    assert len(_read("nifti", tmp_path / "n", tmp_path).read()) == 10
    monkeypatch.undo()
    # changing a setting converts again; so does a label volume newer than the cache
    assert len(_read("nifti", tmp_path / "n", tmp_path, every=2).read()) == 5
    _read("nifti", tmp_path / "n", tmp_path).read()
    t = time.time() + 5
    os.utime(seg, (t, t))
    calls = []
    real = nifti.volume_slices
    monkeypatch.setattr(nifti, "volume_slices", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert len(_read("nifti", tmp_path / "n", tmp_path).read()) == 10 and len(calls) == 1
    monkeypatch.undo()
    # the display masks written back as a volume land on the label volume's voxels
    import nibabel as nib

    images, geom = nifti.volume_slices(img, axis=2)
    masks = nifti.label_slices(seg, img, geom, None)
    out = geom.mask_volume({k: m for k, m in enumerate(masks)})
    ref = nib.load(str(seg))
    assert np.allclose(out.affine, ref.affine) and out.shape == ref.shape
    assert np.array_equal(np.asarray(out.dataobj) > 0, np.asarray(ref.dataobj) > 0)


def test_hash_id_salted_and_stable(monkeypatch):
    a = clinical.hash_id("PAT1")
    assert a == clinical.hash_id(" PAT1 ") and a.startswith("pt-") and "PAT1" not in a
    monkeypatch.setenv(clinical.ID_SALT_ENV, "s3cret")
    assert clinical.hash_id("PAT1") != a


def test_bad_options_are_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="window must be"):
        _read("dicom", tmp_path / "d", tmp_path, window="auto")
    with pytest.raises(DataError, match="axis must be"):
        _read("nifti", tmp_path / "d", tmp_path, axis="oblique")
    with pytest.raises(DataError, match="empty_slices must be"):
        _read("nifti", tmp_path / "d", tmp_path, empty_slices="maybe")
    with pytest.raises(DataError, match="unknown option"):
        _read("dicom", tmp_path / "d", tmp_path, windw="header")


# --------------------------------------------------------------------------------------
# DICOM of other people's making: the files pydicom ships
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_dicom_pydicom_example_files_decode_like_the_uncompressed_one(tmp_path, name):
    import shutil

    from pydicom.data import get_testdata_file

    ref, other = get_testdata_file("MR_small.dcm"), get_testdata_file(name)
    if other is None or ref is None:
        pytest.skip(f"pydicom's example file {name} is not installed")
    out = []
    for k, f in enumerate((ref, other)):
        (tmp_path / f"d{k}").mkdir()
        shutil.copy(f, tmp_path / f"d{k}" / Path(f).name)
        try:
            (rec,) = _read("dicom", tmp_path / f"d{k}", tmp_path / f"c{k}").read()
        except DataError as e:
            if "needs its decoder" in str(e):
                pytest.skip(f"no decoder plugin for {name}: {e}")
            raise
        out.append(_png(rec.image))
        assert rec.group.startswith("pt-") and rec.width == 64
    assert np.array_equal(out[0], out[1])


def test_dicom_truncated_example_file_is_one_line(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    f = get_testdata_file("MR_truncated.dcm")
    if f is None:
        pytest.skip("pydicom's MR_truncated.dcm is not installed")
    (tmp_path / "d").mkdir()
    shutil.copy(f, tmp_path / "d" / "MR_truncated.dcm")
    with pytest.raises(DataError) as e:
        _read("dicom", tmp_path / "d", tmp_path).read()
    assert "MR_truncated.dcm: cannot decode the pixel data" in str(e.value) and "\n" not in str(e.value)


def test_dicom_multiframe_colour_file_is_a_series_of_frames(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    f = get_testdata_file("SC_rgb_rle_2frame.dcm")
    if f is None:
        pytest.skip("pydicom's SC_rgb_rle_2frame.dcm is not installed")
    (tmp_path / "d").mkdir()
    shutil.copy(f, tmp_path / "d")
    recs = _read("dicom", tmp_path / "d", tmp_path, min_foreground=0).read()
    assert [r.meta["slice"] for r in recs] == [0, 1] and {r.meta["file"] for r in recs} == {Path(f).name}
    assert {(r.width, r.height) for r in recs} == {(100, 100)} and _png(recs[0].image).ndim == 2


def test_nifti_nibabel_example_files_with_pairing_none(tmp_path):
    import shutil

    import nibabel

    data = Path(nibabel.__file__).parent / "tests" / "data"
    if not (data / "anatomical.nii").is_file() or not (data / "example4d.nii.gz").is_file():
        pytest.skip("nibabel's example volumes are not installed")
    d = tmp_path / "n"
    d.mkdir()
    for f in ("anatomical.nii", "example4d.nii.gz"):
        shutil.copy(data / f, d / f)
    with pytest.raises(DataError, match=r"example4d.nii.gz: a 4-D volume .*data.options.channel"):
        _read("nifti", d, tmp_path, pairing="none", label="glioma").read()
    recs = _read("nifti", d, tmp_path, pairing="none", label="glioma", channel=0, min_foreground=0).read()
    vols = {r.meta["volume"].split("/")[-1] for r in recs}
    assert vols == {"anatomical.nii", "example4d.nii.gz"}
    assert all(r.label == "glioma" and not r.known["mask"] for r in recs)
    assert len({r.group for r in recs}) == 2


def test_dicom_without_preamble_or_series_uid_is_still_read(tmp_path, caplog):
    """Files of other people's making: a dataset written without preamble and file meta is
    read (forced parse, checked for a SOP class); an image without SeriesInstanceUID is a
    series of its own (warned); a text file that a forced parse would accept stays "not a
    DICOM file"."""
    import pydicom
    from pydicom.data import get_testdata_file

    f = get_testdata_file("MR_small.dcm")
    if f is None:
        pytest.skip("pydicom's MR_small.dcm is not installed")
    d = tmp_path / "d"
    d.mkdir()
    raw = pydicom.dcmread(f)
    raw.preamble = None
    del raw.file_meta
    raw.save_as(d / "raw.dcm", enforce_file_format=False)
    assert not (d / "raw.dcm").read_bytes()[128:132] == b"DICM"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(d / "raw.dcm")              # a plain read refuses it
    lone = pydicom.dcmread(f)
    del lone.SeriesInstanceUID
    lone.PatientID = "someone-else"
    lone.save_as(d / "lone.dcm")
    (d / "notes.dat").write_text("not an image\n" * 20)
    with caplog.at_level(logging.WARNING):
        recs = _read("dicom", d, tmp_path, on_error="skip", min_foreground=0).read()
    assert sorted(r.meta["file"] for r in recs) == ["lone.dcm", "raw.dcm"]
    assert len({r.group for r in recs}) == 2 and all(r.group.startswith("pt-") for r in recs)
    assert np.array_equal(*[_png(r.image) for r in recs])
    assert "1 image file(s) without SeriesInstanceUID" in caplog.text and "someone-else" not in caplog.text
    with pytest.raises(DataError, match=r"notes.dat: not a DICOM file"):
        _read("dicom", d, tmp_path / "again").read()
