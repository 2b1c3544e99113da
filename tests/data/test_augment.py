"""Augmentation maths (src/data/augment.py) and mask helpers (src/data/masks.py)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import tensorflow as tf

from src.data import augment as A
from src.data.masks import (mask_cache_name, mask_to_box, materialise_masks, pack_mask,
                            rasterise_polygons, resize_nearest, unpack_mask)
from src.data.records import DataError, Record

H = W = 64


def ellipse_mask(h=H, w=W, centre=(20, 24), axes=(10, 6), angle=30) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, centre, axes, angle, 0, 360, 1, -1)
    return m


def matrices(hflip=False, vflip=False, deg=0.0, scale=1.0, shift=(0.0, 0.0), size=(H, W)):
    return A.affine_from_params(tf.constant([hflip]), tf.constant([vflip]), tf.constant([math.radians(deg)]),
                                tf.constant([scale], tf.float32), tf.constant([shift], tf.float32), size)


def pixels_inside(mask: np.ndarray, box: np.ndarray) -> bool:
    """Every mask pixel centre lies inside the normalised box."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = (xs + 0.5) / w, (ys + 0.5) / h
    eps = 1e-6
    return bool(np.all(cx >= box[0] - eps) and np.all(cx <= box[2] + eps)
                and np.all(cy >= box[1] - eps) and np.all(cy <= box[3] + eps))


# ---------------------------------------------------------------------------------------
# the key property: boxes follow images and masks
# ---------------------------------------------------------------------------------------
CASES = {
    "hflip": dict(hflip=True),
    "vflip": dict(vflip=True),
    "hvflip": dict(hflip=True, vflip=True),
    "rot15": dict(deg=15),
    "rot-25_scale_shift": dict(deg=-25, scale=1.15, shift=(0.06, -0.04)),
    "hflip_rot10_zoom_out": dict(hflip=True, deg=10, scale=0.85),
}


@pytest.mark.parametrize("impl", ["xla", "tf", "cv2"])
@pytest.mark.parametrize("case", list(CASES))
def test_transformed_box_encloses_transformed_mask(case, impl):
    m = ellipse_mask()
    box = mask_to_box(m)
    M = matrices(**CASES[case])
    img = (m * 200)[None, ..., None].astype(np.uint8)
    _, mo = A.apply_affine(img, m[None, ..., None], M, impl=impl)
    mo = mo.numpy()[0, ..., 0]
    nb, inside = A.transform_boxes(box[None, None], M)
    nb = nb.numpy()[0, 0]
    assert bool(inside.numpy()[0, 0])
    assert mo.sum() > 0.5 * m.sum()
    assert pixels_inside(mo, nb), (nb * W, mask_to_box(mo) * W)
    tight = mask_to_box(mo)
    if CASES[case].keys() <= {"hflip", "vflip"}:
        # flips are exact: the box is the mask's own tight box
        np.testing.assert_allclose(nb, tight, atol=1e-5)
    else:
        # a rotated box is larger than the tight box, but by no more than rotation expansion
        deg = abs(CASES[case].get("deg", 0))
        s = CASES[case].get("scale", 1.0)
        bw, bh = (box[2] - box[0]) * s, (box[3] - box[1]) * s
        c, si = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        assert (nb[2] - nb[0]) <= bw * c + bh * si + 2 / W
        assert (nb[3] - nb[1]) <= bw * si + bh * c + 2 / H
        assert (nb[2] - nb[0]) >= (tight[2] - tight[0]) - 1e-6


def test_flips_are_exact_and_match_matrix_path():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, H, W, 3), np.uint8)
    m = rng.integers(0, 2, (3, H, W, 1), np.uint8)
    hf = tf.constant([True, False, True])
    vf = tf.constant([False, True, True])
    fi, fm = A.apply_flips(img, m, hf, vf)
    expect = np.stack([img[0, :, ::-1], img[1, ::-1], img[2, ::-1, ::-1]])
    np.testing.assert_array_equal(fi.numpy(), expect)
    M = A.flip_matrices(hf, vf, (H, W))
    for impl in ("xla", "tf", "cv2"):
        wi, wm = A.apply_affine(img, m, M, impl=impl)
        np.testing.assert_allclose(wi.numpy(), expect.astype(np.float32), atol=0.51)
        np.testing.assert_array_equal(wm.numpy(), fm.numpy())


def test_warp_implementations_agree():
    rng = np.random.default_rng(1)
    base = cv2.resize(rng.integers(0, 255, (8, 8), np.uint8), (W, H), interpolation=cv2.INTER_LINEAR)
    img = np.stack([np.dstack([base, 255 - base, base // 2])] * 2)
    m = np.stack([ellipse_mask()[..., None]] * 2)
    M = tf.concat([matrices(deg=12, scale=1.1, shift=(0.03, 0.02)), matrices(hflip=True, deg=-7)], 0)
    outs = {impl: A.apply_affine(img, m, M, impl=impl) for impl in ("xla", "tf", "cv2")}
    ref_i, ref_m = outs["tf"]
    for impl in ("xla", "cv2"):
        i, mm = outs[impl]
        assert i.dtype == tf.float32
        diff = np.abs(i.numpy() - ref_i.numpy())[:, 2:-2, 2:-2]
        assert diff.mean() < 0.5 and np.percentile(diff, 99) < 3.0, (impl, diff.max())
        # nearest-neighbour masks may differ only on a few boundary pixels
        assert np.mean(mm.numpy() != ref_m.numpy()) < 0.005


def test_identity_matrices_change_nothing():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (2, H, W, 1), np.uint8)
    m = rng.integers(0, 2, (2, H, W, 1), np.uint8)
    M = A.random_affine_matrices(2, A.augment_config({k: 0 for k in A.GEOMETRIC_KEYS}), tf.constant([1, 2]), (H, W))
    np.testing.assert_allclose(M.numpy(), np.tile(np.eye(3, dtype=np.float32), (2, 1, 1)), atol=1e-6)
    for impl in ("xla", "tf", "cv2"):
        wi, wm = A.apply_affine(img, m, M, impl=impl)
        np.testing.assert_allclose(wi.numpy(), img.astype(np.float32), atol=0.51)
        np.testing.assert_array_equal(wm.numpy(), m)


def test_random_matrices_seeded_and_within_ranges():
    cfg = A.augment_config({"hflip": 0.5, "vflip": 0.5, "rotate_deg": 20, "scale": 0.2, "shift": 0.1})
    a = A.random_affine_matrices(64, cfg, tf.constant([3, 4]), (H, W)).numpy()
    b = A.random_affine_matrices(64, cfg, tf.constant([3, 4]), (H, W)).numpy()
    c = A.random_affine_matrices(64, cfg, tf.constant([3, 5]), (H, W)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    lin = a[:, :2, :2]
    det = np.linalg.det(lin)
    # inverse maps: |det| = 1 / scale^2 in [1/1.2^2, 1/0.8^2]; both flip signs occur
    assert np.all(np.abs(det) >= 1 / 1.2 ** 2 - 1e-4) and np.all(np.abs(det) <= 1 / 0.8 ** 2 + 1e-4)
    assert (det < 0).any() and (det > 0).any()


def test_box_leaving_the_image_is_not_inside():
    box = np.array([[[0.0, 0.0, 0.1, 0.1], [0.4, 0.4, 0.6, 0.6]]], np.float32)
    M = matrices(shift=(0.5, 0.5))  # content moves right/down by half the image
    nb, inside = A.transform_boxes(box, M)
    assert inside.numpy().tolist() == [[True, True]]
    np.testing.assert_allclose(nb.numpy()[0, 1], [0.9, 0.9, 1.0, 1.0], atol=1e-5)  # clipped
    nb, inside = A.transform_boxes(np.array([[[0.6, 0.6, 0.9, 0.9]]], np.float32), M)
    assert inside.numpy().tolist() == [[False]]
    np.testing.assert_array_equal(nb.numpy(), np.zeros((1, 1, 4)))
    nb, inside = A.transform_boxes(box, M, valid=np.array([[True, False]]))
    assert inside.numpy().tolist() == [[True, False]]


def test_non_square_rotation_keeps_box_around_mask():
    h, w = 48, 80
    m = ellipse_mask(h, w, centre=(50, 20), axes=(12, 7), angle=10)
    box = mask_to_box(m)
    M = matrices(deg=20, hflip=True, size=(h, w))
    _, mo = A.apply_affine(m[None, ..., None] * 255, m[None, ..., None], M, impl="xla")
    nb, _ = A.transform_boxes(box[None, None], M)
    assert pixels_inside(mo.numpy()[0, ..., 0], nb.numpy()[0, 0])


# ---------------------------------------------------------------------------------------
# photometric
# ---------------------------------------------------------------------------------------
def test_photometric_layers_built_from_config():
    assert A.photometric_layers(A.augment_config({"brightness": 0, "contrast": 0})) == []
    cfg = A.augment_config({"brightness": 0.2, "contrast": 0.2, "saturation": 0.3, "hue": 0.1, "blur_prob": 0.5})
    names = [k for k, _, _ in A.photometric_layers(cfg, channels=3)]
    assert names == ["brightness", "contrast", "saturation", "hue", "blur"]
    grey = [k for k, _, _ in A.photometric_layers(cfg, channels=1)]
    assert grey == ["brightness", "contrast", "blur"]  # saturation / hue are no-ops on grey


def test_photometric_seeded_in_tf_data():
    cfg = A.augment_config({"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05,
                            "noise_std": 0.05, "blur_prob": 0.5})
    layers = A.photometric_layers(cfg, channels=3)
    x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[0, 0])

    def run(seed):
        ds = tf.data.Dataset.from_tensors(x).map(
            lambda im: A.apply_photometric(im, layers, tf.constant([seed, 9], tf.int64), noise_std=0.05),
            num_parallel_calls=2)
        return next(iter(ds)).numpy()

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.allclose(a, x.numpy())


def test_photometric_probability_zero_is_identity():
    cfg = A.augment_config({"brightness": 0.5, "brightness_prob": 0.0, "contrast": 0.0})
    layers = A.photometric_layers(cfg, channels=1)
    x = tf.random.stateless_uniform([3, 8, 8, 1], seed=[1, 1])
    out = A.apply_photometric(x, layers, tf.constant([1, 2], tf.int64))
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-7)


@pytest.mark.parametrize("bad", [{"hflip": 1.5}, {"rotate_deg": -1}, {"scale": 1.0}, {"warp": "gpu"}, {"hfip": 0.5}])
def test_augment_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        A.augment_config(bad)


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def test_mask_to_box_convention():
    m = np.zeros((10, 20), np.uint8)
    m[2:5, 3:8] = 255
    np.testing.assert_allclose(mask_to_box(m), [3 / 20, 2 / 10, 8 / 20, 5 / 10])
    np.testing.assert_allclose(mask_to_box(m[..., None]), [3 / 20, 2 / 10, 8 / 20, 5 / 10])
    assert mask_to_box(np.zeros((4, 4))) is None


def test_rasterised_polygon_matches_its_box():
    poly = np.array([[0.25, 0.25], [0.75, 0.25], [0.75, 0.5], [0.25, 0.5]])
    m = rasterise_polygons([poly], 40, 20)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    np.testing.assert_allclose(mask_to_box(m), [0.25, 0.25, 0.75, 0.5], atol=1 / 40 + 1e-6)
    two = rasterise_polygons([poly, poly * 0.2], 40, 20)
    assert (two > 0).sum() > (m > 0).sum()


def test_materialise_masks_writes_reuses_and_invalidates(tmp_path):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((30, 50), np.uint8))
    poly = [np.array([[0.1, 0.1], [0.5, 0.1], [0.3, 0.6]], np.float32)]
    recs = [Record(image=str(img), polygons=poly, known={"label": False, "boxes": True, "mask": True}),
            Record(image=str(img), polygons=[], known={"label": False, "boxes": True, "mask": True}),
            Record(image=str(img))]
    out = materialise_masks(recs, tmp_path / "cache")
    assert len(out) == 3 and out[0].mask is not None and out[1].mask is None and out[2].mask is None
    m = cv2.imread(out[0].mask, cv2.IMREAD_UNCHANGED)
    assert m.shape == (30, 50) and m.max() == 255
    first = out[0].mask
    again = materialise_masks([Record(image=str(img), polygons=poly)], tmp_path / "cache")
    assert again[0].mask == first  # reused
    moved = [np.array([[0.2, 0.1], [0.5, 0.1], [0.3, 0.6]], np.float32)]
    changed = materialise_masks([Record(image=str(img), polygons=moved)], tmp_path / "cache")
    assert changed[0].mask != first  # a different annotation, a different file
    assert mask_cache_name(str(img), poly, 50, 30) != mask_cache_name(str(img), poly, 60, 30)


def test_materialise_masks_errors_name_the_file(tmp_path):
    bad = Record(image=str(tmp_path / "missing.png"), polygons=[np.array([[0.1, 0.1], [0.5, 0.1], [0.3, 0.6]])])
    with pytest.raises(DataError, match="missing.png"):
        materialise_masks([bad], tmp_path / "cache")
    from src.data.base import SkipLog

    log = SkipLog()
    assert materialise_masks([bad], tmp_path / "cache", on_error="skip", skipped=log) == []
    assert len(log) == 1


def test_pack_unpack_and_nearest_resize():
    m = ellipse_mask(37, 53).astype(bool)
    box, bits = pack_mask(m)
    assert bits.nbytes < m.size // 8
    np.testing.assert_array_equal(unpack_mask(box, bits, m.shape), m)
    box, bits = pack_mask(np.zeros((5, 5)))
    assert bits.size == 0 and not unpack_mask(box, bits, (5, 5)).any()
    r = resize_nearest(m, 20, 30)
    ref = tf.image.resize(m[..., None].astype(np.uint8), [20, 30], method="nearest").numpy()[..., 0]
    np.testing.assert_array_equal(r, ref.astype(bool))


def _packed_batch(masks):
    boxes, bits = zip(*(pack_mask(m) for m in masks))
    lengths = [len(b) for b in bits]
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.stack(boxes).astype(np.int32), np.concatenate(bits).astype(np.uint8), splits


def test_packed_mask_warp_matches_full_frame_warp():
    """The ROI warp straight from packed crops gives the full-frame OpenCV warp: empty
    masks, masks on the border, masks pushed out of the frame and strong transforms
    included (differences only at fixed-point rounding ties)."""
    rng = np.random.default_rng(5)
    n, h, w = 24, 48, 72
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n - 3):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        bh, bw = rng.integers(1, min(30, h - y0) + 1), rng.integers(1, min(40, w - x0) + 1)
        masks[i, y0:y0 + bh, x0:x0 + bw] = rng.random((bh, bw)) < 0.7
    masks[n - 3, :, :5] = 1   # touching the left edge
    masks[n - 2, h - 2:, :] = 1   # the bottom rows
    # masks[n - 1] stays empty
    cfg = A.augment_config({"hflip": 0.5, "vflip": 0.5, "rotate_deg": 40, "scale": 0.4, "shift": 0.3})
    mats = A.random_affine_matrices(n, cfg, tf.constant([3, 4], tf.int64), (h, w))
    coef = A.index_transforms(mats, (h, w)).numpy()
    boxes, bits, splits = _packed_batch(masks)
    rows = np.arange(n)[::-1].copy()  # records are picked by index, in any order
    got = A._warp_packed_np(coef, rows, boxes, bits, splits, h, w)[..., 0]
    imgs = np.zeros((n, h, w, 1), np.uint8)
    full = A._warp_cv2_np(imgs, masks[rows][..., None], coef)[1][..., 0]
    assert got.shape == (n, h, w) and got.dtype == np.uint8
    assert full.sum() > 1000 and got[0].sum() == 0  # rows[0] is the empty mask
    assert np.sum(got != full) <= 0.002 * full.sum(), np.sum(got != full)
    np.testing.assert_array_equal(A._unpack_packed_np(rows, boxes, bits, splits, h, w)[..., 0], masks[rows])


def test_packed_rois_hold_every_reachable_pixel():
    rng = np.random.default_rng(9)
    for _ in range(20):
        cfg = A.augment_config({"rotate_deg": 45, "scale": 0.5, "shift": 0.4, "hflip": 0.5})
        mats = A.random_affine_matrices(1, cfg, tf.constant(rng.integers(0, 1000, 2), tf.int64), (40, 40))
        coef = A.index_transforms(mats, (40, 40)).numpy()
        m = np.zeros((40, 40), np.uint8)
        y0, x0 = rng.integers(0, 30, 2)
        m[y0:y0 + 8, x0:x0 + 6] = 1
        full = A._warp_cv2_np(np.zeros((1, 40, 40, 1), np.uint8), m[None, ..., None], coef)[1][0, ..., 0]
        ry0, ry1, rx0, rx1 = A.packed_rois(coef, [[y0, x0, 8, 6]], 40, 40)[0]
        outside = full.copy()
        outside[ry0:ry1, rx0:rx1] = 0
        assert outside.sum() == 0
