"""Batched, seeded augmentation for the tf.data pipeline.

Geometry
--------
Geometric augmentation is one *affine* transform per image, applied to the image, its
mask and its boxes together, after batching. A transform is a ``[B, 3, 3]`` float32
matrix in **normalised continuous coordinates**: ``(u, v) = (x / W, y / H)`` where pixel
column ``i`` covers ``[i / W, (i + 1) / W]`` -- the convention of the boxes
(``x_max = (last_col + 1) / W``). The matrix maps an **output** point to the **input**
point it samples (the "inverse map" that warps use); boxes are moved by its inverse.

* :func:`random_affine_matrices` draws flips, rotation, isotropic scale and shift about
  the image centre from a stateless seed (same seed -> same matrices).
* :func:`apply_affine` warps images (bilinear) and masks (nearest) with the same
  matrices; ``impl`` picks the kernel (see :data:`WARP_IMPLS`).
* :func:`apply_flips` is the exact, much cheaper path when the only geometric
  augmentation is flipping.
* :func:`transform_boxes` maps the 4 corners of each box, takes min/max and clips to
  the image; a box that leaves the image entirely is reported as not inside.

Photometric
-----------
:func:`photometric_layers` builds Keras 3 preprocessing layers (``RandomBrightness``,
``RandomContrast``, ``RandomSaturation``, ``RandomHue``, ``RandomGaussianBlur``) from the
``augment`` config, and :func:`apply_photometric` runs them on a float batch in
``[0, 1]`` inside tf.data. The layers' own random state is a ``tf.Variable`` (a
``SeedGenerator``) that parallel tf.data calls would race on, so each batch draws its
transformation through the layers' public ``get_random_transformation(seed=...)`` with a
seed derived from the batch's stateless seed: seeded, reproducible, race-free. Gaussian
noise uses ``keras.random.normal`` with the same seeding.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

#: Gentle defaults of ``data.augment`` (all zero -> identity).
AUGMENT_DEFAULTS: dict[str, Any] = {
    "hflip": 0.5,         # probability of a horizontal flip
    "vflip": 0.0,         # probability of a vertical flip
    "rotate_deg": 10.0,   # rotation uniform in [-rotate_deg, rotate_deg] degrees
    "scale": 0.1,         # isotropic zoom uniform in [1 - scale, 1 + scale]
    "shift": 0.05,        # translation uniform in [-shift, shift] of the width / height
    "affine_prob": 1.0,   # probability that rotate/scale/shift are applied to an image
    "brightness": 0.1,    # keras RandomBrightness factor (fraction of the [0, 1] range)
    "contrast": 0.1,      # keras RandomContrast factor (contrast x [1 - c, 1 + c])
    "saturation": 0.0,    # saturation x [1 - s, 1 + s] (keras RandomSaturation); RGB only
    "hue": 0.0,           # keras RandomHue factor; RGB only
    "noise_std": 0.0,     # Gaussian noise std on the [0, 1] scale
    "blur_prob": 0.0,     # probability of a Gaussian blur (keras RandomGaussianBlur)
    "blur_sigma": [0.1, 1.0],
    "blur_kernel": 3,
    "brightness_prob": 1.0,
    "contrast_prob": 1.0,
    "saturation_prob": 1.0,
    "hue_prob": 1.0,
    "noise_prob": 1.0,
    "warp": "auto",       # affine kernel: auto | xla | tf | cv2 (see WARP_IMPLS)
}

#: ``cv2``: OpenCV ``warpAffine`` (SIMD, fixed-point bilinear) per image through
#: ``tf.numpy_function`` -- the fastest on CPU by far, but Python runs inside the graph
#: (single host; not for tf.data service); ``xla``: pure TF, one XLA-compiled kernel
#: samples image (bilinear) and mask (nearest) from the same coordinates; ``tf``:
#: ``ImageProjectiveTransformV3`` (stock op, no compiler, slowest). ``auto`` = ``cv2``.
WARP_IMPLS = ("auto", "xla", "tf", "cv2")

GEOMETRIC_KEYS = ("hflip", "vflip", "rotate_deg", "scale", "shift")
PHOTOMETRIC_KEYS = ("brightness", "contrast", "saturation", "hue", "noise_std", "blur_prob")


def augment_config(cfg: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Defaults merged with ``cfg``; raises ``ValueError`` on unknown keys or bad values."""
    out = dict(AUGMENT_DEFAULTS)
    for k, v in dict(cfg or {}).items():
        if k not in AUGMENT_DEFAULTS:
            raise ValueError(f"unknown data.augment key {k!r}; known keys: {sorted(AUGMENT_DEFAULTS)}")
        out[k] = v
    for k in ("hflip", "vflip", "affine_prob", "blur_prob") + tuple(k for k in out if k.endswith("_prob")):
        if not 0.0 <= float(out[k]) <= 1.0:
            raise ValueError(f"data.augment.{k} is a probability in [0, 1], got {out[k]}")
    for k in ("rotate_deg", "scale", "shift", "brightness", "contrast", "saturation", "hue", "noise_std"):
        if float(out[k]) < 0:
            raise ValueError(f"data.augment.{k} must be >= 0, got {out[k]}")
    if float(out["scale"]) >= 1:
        raise ValueError(f"data.augment.scale must be < 1 (zoom in [1 - scale, 1 + scale]), got {out['scale']}")
    if out["warp"] not in WARP_IMPLS:
        raise ValueError(f"data.augment.warp must be one of {WARP_IMPLS}, got {out['warp']!r}")
    return out


def has_affine(cfg: Mapping[str, Any]) -> bool:
    """True when rotation, scale or shift are active (a warp is needed)."""
    return float(cfg["affine_prob"]) > 0 and any(float(cfg[k]) > 0 for k in ("rotate_deg", "scale", "shift"))


def has_flips(cfg: Mapping[str, Any]) -> bool:
    return float(cfg["hflip"]) > 0 or float(cfg["vflip"]) > 0


def has_photometric(cfg: Mapping[str, Any], channels: int = 3) -> bool:
    keys = ("brightness", "contrast", "noise_std", "blur_prob") + (("saturation", "hue") if channels == 3 else ())
    return any(float(cfg[k]) > 0 for k in keys)


# ---------------------------------------------------------------------------------------
# random parameters
# ---------------------------------------------------------------------------------------
def _sub_seed(seed, i: int):
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), i)


def _bernoulli(n, p: float, seed) -> tf.Tensor:
    if p >= 1.0:
        return tf.ones([n], tf.bool)
    if p <= 0.0:
        return tf.zeros([n], tf.bool)
    return tf.random.stateless_uniform([n], seed=seed) < p


def random_flips(batch_size, cfg: Mapping[str, Any], seed) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image booleans ``(hflip, vflip)`` drawn from a stateless ``seed`` ([2] ints)."""
    return (_bernoulli(batch_size, float(cfg["hflip"]), _sub_seed(seed, 1)),
            _bernoulli(batch_size, float(cfg["vflip"]), _sub_seed(seed, 2)))


def affine_from_params(hflip, vflip, angle_rad, scale, shift_xy, image_size) -> tf.Tensor:
    """``[B, 3, 3]`` output->input matrices (normalised coords) from per-image parameters.

    The forward map (input -> output) is, in pixels about the centre ``c``:
    ``T(c + shift) . R(angle) . S(scale) . Flip . T(-c)`` with ``shift`` in fractions of the
    width / height and a positive angle turning the image content clockwise on screen
    (y points down). Returned is its inverse, in normalised coordinates.
    """
    h, w = float(image_size[0]), float(image_size[1])
    angle = tf.cast(angle_rad, tf.float32)
    s = tf.cast(scale, tf.float32)
    fx = tf.where(hflip, -1.0, 1.0)
    fy = tf.where(vflip, -1.0, 1.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # forward linear part in pixels: R . S . Flip
    a00, a01 = cos * s * fx, -sin * s * fy
    a10, a11 = sin * s * fx, cos * s * fy
    tx = w / 2 + shift_xy[:, 0] * w
    ty = h / 2 + shift_xy[:, 1] * h
    # forward: p_out = A (p_in - c) + (c + t). inverse: p_in = A^-1 (p_out - c - t) + c
    det = a00 * a11 - a01 * a10
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    b0 = w / 2 - (i00 * tx + i01 * ty)
    b1 = h / 2 - (i10 * tx + i11 * ty)
    # to normalised coordinates: M_n = D^-1 M_px D, D = diag(w, h, 1)
    m = tf.stack([
        tf.stack([i00, i01 * h / w, b0 / w], -1),
        tf.stack([i10 * w / h, i11, b1 / h], -1),
        tf.stack([tf.zeros_like(i00), tf.zeros_like(i00), tf.ones_like(i00)], -1),
    ], axis=1)
    return m


def random_affine_matrices(batch_size, cfg: Mapping[str, Any], seed, image_size) -> tf.Tensor:
    """``[B, 3, 3]`` random output->input matrices (normalised coordinates).

    ``cfg`` holds the ``augment`` keys (see :data:`AUGMENT_DEFAULTS`), ``seed`` a ``[2]``
    integer tensor (stateless: the same seed gives the same matrices), ``image_size``
    ``(height, width)`` of the batch (rotation is done in pixels so that it stays a
    rotation on non-square images).
    """
    cfg = augment_config(cfg) if "warp" not in cfg else cfg
    n = batch_size
    hflip, vflip = random_flips(n, cfg, seed)
    on = _bernoulli(n, float(cfg["affine_prob"]), _sub_seed(seed, 3))
    onf = tf.cast(on, tf.float32)
    rot = math.radians(float(cfg["rotate_deg"]))
    angle = tf.random.stateless_uniform([n], _sub_seed(seed, 4), -rot, rot) * onf if rot > 0 else tf.zeros([n])
    sc = float(cfg["scale"])
    scale = (1.0 + tf.random.stateless_uniform([n], _sub_seed(seed, 5), -sc, sc) * onf) if sc > 0 else tf.ones([n])
    sh = float(cfg["shift"])
    shift = (tf.random.stateless_uniform([n, 2], _sub_seed(seed, 6), -sh, sh) * onf[:, None]
             if sh > 0 else tf.zeros([n, 2]))
    return affine_from_params(hflip, vflip, angle, scale, shift, image_size)


# ---------------------------------------------------------------------------------------
# warps
# ---------------------------------------------------------------------------------------
def index_transforms(matrices, image_size) -> tf.Tensor:
    """Normalised output->input matrices -> ``[B, 6]`` pixel-index affine coefficients.

    Pixel index ``i`` has its centre at continuous ``i + 0.5``:
    ``idx_in = D M D^-1 (idx_out + 0.5) - 0.5``.
    """
    h, w = float(image_size[0]), float(image_size[1])
    m = tf.cast(matrices, tf.float32)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1] * w / h, m[:, 0, 2] * w
    m10, m11, m12 = m[:, 1, 0] * h / w, m[:, 1, 1], m[:, 1, 2] * h
    c0 = m02 + 0.5 * (m00 + m01) - 0.5
    c1 = m12 + 0.5 * (m10 + m11) - 0.5
    return tf.stack([m00, m01, c0, m10, m11, c1], axis=-1)


def warp_xla_core(images, masks, coef):
    """Bilinear (images) + nearest (masks) sampling from the same coordinates, zeros
    outside the input; plain TF ops meant to be compiled by XLA (fused gathers).

    ``coef``: ``[B, 6]`` from :func:`index_transforms`. Returns float32 images and masks
    in their dtype (or None).
    """
    shape = tf.shape(images)
    b, h, w, ch = shape[0], shape[1], shape[2], shape[3]
    c = [coef[:, i][:, None, None] for i in range(6)]
    ys = tf.cast(tf.range(h), tf.float32)[None, :, None]
    xs = tf.cast(tf.range(w), tf.float32)[None, None, :]
    xin = c[0] * xs + c[1] * ys + c[2]
    yin = c[3] * xs + c[4] * ys + c[5]
    x0f, y0f = tf.floor(xin), tf.floor(yin)
    fx, fy = (xin - x0f)[..., None], (yin - y0f)[..., None]
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    base = (tf.range(b) * h * w)[:, None, None]
    flat = tf.reshape(images, [-1, ch])

    def tap(yy, xx):
        ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        idx = base + tf.clip_by_value(yy, 0, h - 1) * w + tf.clip_by_value(xx, 0, w - 1)
        v = tf.cast(tf.gather(flat, idx), tf.float32)
        return v * tf.cast(ok, tf.float32)[..., None]

    v00, v01 = tap(y0, x0), tap(y0, x0 + 1)
    v10, v11 = tap(y0 + 1, x0), tap(y0 + 1, x0 + 1)
    top = v00 + (v01 - v00) * fx
    bot = v10 + (v11 - v10) * fx
    out = top + (bot - top) * fy
    if masks is None:
        return out, None
    xr = tf.cast(tf.floor(xin + 0.5), tf.int32)
    yr = tf.cast(tf.floor(yin + 0.5), tf.int32)
    okm = (xr >= 0) & (xr < w) & (yr >= 0) & (yr < h)
    midx = base + tf.clip_by_value(yr, 0, h - 1) * w + tf.clip_by_value(xr, 0, w - 1)
    mo = tf.gather(tf.reshape(masks, [-1]), midx) * tf.cast(okm, masks.dtype)
    return out, mo[..., None]


@tf.function(jit_compile=True, reduce_retracing=True)
def _warp_xla(images, masks, coef):
    return warp_xla_core(images, masks, coef)


@tf.function(jit_compile=True, reduce_retracing=True)
def _warp_xla_nomask(images, coef):
    return warp_xla_core(images, None, coef)[0]


def _warp_tf(images, masks, coef, image_size):
    t = tf.concat([coef, tf.zeros([tf.shape(coef)[0], 2], tf.float32)], axis=1)
    size = tf.constant(list(image_size), tf.int32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=t, output_shape=size, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    mo = None
    if masks is not None:
        mo = tf.raw_ops.ImageProjectiveTransformV3(
            images=masks, transforms=t, output_shape=size, fill_value=0.0,
            interpolation="NEAREST", fill_mode="CONSTANT")
    return out, mo


def _warp_cv2_np(images, masks, coef):
    import cv2

    cv2.setNumThreads(1)  # tf.data already runs calls in parallel; nested threads only contend
    h, w = images.shape[1:3]
    out = np.empty_like(images)
    mo = np.empty_like(masks)
    lin = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    near = cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    for i in range(images.shape[0]):
        m = coef[i].reshape(2, 3).astype(np.float64)
        if images.shape[-1] == 1:
            out[i, ..., 0] = cv2.warpAffine(images[i, ..., 0], m, (w, h), flags=lin, borderMode=cv2.BORDER_CONSTANT)
        else:
            out[i] = cv2.warpAffine(images[i], m, (w, h), flags=lin, borderMode=cv2.BORDER_CONSTANT)
        if masks.shape[0]:
            mo[i, ..., 0] = cv2.warpAffine(masks[i, ..., 0], m, (w, h), flags=near, borderMode=cv2.BORDER_CONSTANT)
    return out, mo


def _warp_cv2(images, masks, coef):
    """OpenCV ``warpAffine`` per image inside ``tf.numpy_function``; keeps the dtypes."""
    has_mask = masks is not None
    m_in = masks if has_mask else tf.zeros([0, 1, 1, 1], tf.uint8)
    out, mo = tf.numpy_function(_warp_cv2_np, [images, m_in, coef], [images.dtype, m_in.dtype], stateful=False)
    out.set_shape(images.shape)
    if has_mask:
        mo.set_shape(masks.shape)
    return out, (mo if has_mask else None)


def packed_rois(coef, boxes, h: int, w: int) -> np.ndarray:
    """``[B, 4]`` int output pixel rectangles ``(y0, y1, x0, x1)`` (clipped to ``h`` x
    ``w``) holding every output pixel whose sample can land in the input pixel box
    ``boxes[i]`` = ``(y0, x0, height, width)`` under the output->input index map
    ``coef[i]`` ([6], see :func:`index_transforms`): the box grown by a pixel, its corners
    mapped forward, rounded outwards."""
    coef = np.asarray(coef, np.float64).reshape(-1, 6)
    a, b, c, d, e, f = coef.T
    det = a * e - b * d
    det = np.where(det == 0, 1.0, det)
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det  # inverse of the linear part
    y0, x0, bh, bw = (np.asarray(boxes, np.float64).reshape(-1, 4).T)
    xs = np.stack([x0 - 1, x0 + bw, x0 - 1, x0 + bw], 1) - c[:, None]
    ys = np.stack([y0 - 1, y0 - 1, y0 + bh, y0 + bh], 1) - f[:, None]
    ox = ia[:, None] * xs + ib[:, None] * ys
    oy = id_[:, None] * xs + ie[:, None] * ys
    return np.stack([np.maximum(0, np.floor(oy.min(1)) - 1), np.minimum(h, np.ceil(oy.max(1)) + 2),
                     np.maximum(0, np.floor(ox.min(1)) - 1), np.minimum(w, np.ceil(ox.max(1)) + 2)], 1).astype(np.int64)


def _warp_packed_np(coef, rows, boxes, bits, splits, h, w):
    """Nearest warp of bit-packed masks straight into a ``[B, h, w, 1]`` uint8 batch.

    The masks are those of records ``rows`` ([B]) of a whole dataset's packed masks:
    ``boxes`` ``[N, 4]`` (``y0, x0, height, width`` of each mask's bounding box), ``bits``
    (every crop, 8 pixels a byte, rows padded to whole bytes: :func:`src.data.masks.pack_mask`)
    and ``splits`` ``[N + 1]`` (where each record's bytes start). ``coef`` ``[B, 6]``: the
    output->input index maps (:func:`index_transforms`).

    Only the crop is unpacked, and it is warped only into the output rectangle it can
    reach (:func:`packed_rois`); the rest stays zero, as a full-frame warp would leave it.
    A tumour covers a few per cent of a slice, so this costs a few microseconds a mask
    instead of a full-frame warp. Results match a full-frame ``cv2`` warp except where a
    sample falls within OpenCV's fixed-point rounding (1/1024 px) of a pixel boundary.
    """
    import cv2

    cv2.setNumThreads(1)
    h, w = int(h), int(w)
    n = coef.shape[0]
    mo = np.zeros((n, h, w, 1), np.uint8)
    near = cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    bx = boxes[rows]
    rois = packed_rois(coef, bx, h, w)
    # per-mask affine maps from the ROI's output pixels into the crop, all at once
    c = np.asarray(coef, np.float64)
    ms = np.stack([c[:, 0:3], c[:, 3:6]], 1)                        # [B, 2, 3]
    ms[:, 0, 2] += c[:, 0] * rois[:, 2] + c[:, 1] * rois[:, 0] - bx[:, 1]
    ms[:, 1, 2] += c[:, 3] * rois[:, 2] + c[:, 4] * rois[:, 0] - bx[:, 0]
    todo = np.flatnonzero((bx[:, 2] > 0) & (bx[:, 3] > 0) & (rois[:, 1] > rois[:, 0]) & (rois[:, 3] > rois[:, 2]))
    starts, ends = splits[rows].tolist(), splits[rows + 1].tolist()
    for i, (y0, x0, bh, bw), (ry0, ry1, rx0, rx1) in zip(todo.tolist(), bx[todo].tolist(), rois[todo].tolist()):
        crop = np.unpackbits(bits[starts[i]:ends[i]].reshape(bh, -1), axis=1)[:, :bw]
        mo[i, ry0:ry1, rx0:rx1, 0] = cv2.warpAffine(crop, ms[i], (rx1 - rx0, ry1 - ry0), flags=near,
                                                    borderMode=cv2.BORDER_CONSTANT)
    return mo


def _unpack_packed_np(rows, boxes, bits, splits, h, w):
    """Records ``rows`` of packed masks (see :func:`_warp_packed_np`) -> uint8 ``[B, h, w, 1]``."""
    h, w = int(h), int(w)
    mo = np.zeros((len(rows), h, w, 1), np.uint8)
    for i, r in enumerate(rows):
        y0, x0, bh, bw = (int(v) for v in boxes[r])
        if bh > 0 and bw > 0:
            mo[i, y0:y0 + bh, x0:x0 + bw, 0] = np.unpackbits(bits[splits[r]:splits[r + 1]].reshape(bh, -1),
                                                             axis=1)[:, :bw]
    return mo


def resolve_warp(impl: str) -> str:
    """``auto`` -> ``cv2`` (fastest measured on CPU, see benchmarks/README.md)."""
    if impl not in WARP_IMPLS:
        raise ValueError(f"warp impl must be one of {WARP_IMPLS}, got {impl!r}")
    return "cv2" if impl == "auto" else impl


def warp(images, masks, matrices, impl: str = "auto"):
    """Like :func:`apply_affine` but ``cv2`` keeps the input dtype (uint8 stays uint8)."""
    images = tf.convert_to_tensor(images)
    size = (int(images.shape[1]), int(images.shape[2]))
    coef = index_transforms(matrices, size)
    impl = resolve_warp(impl)
    if impl == "tf":
        return _warp_tf(images, masks, coef, size)
    if impl == "cv2":
        return _warp_cv2(images, masks, coef)
    if masks is None:
        out, mo = _warp_xla_nomask(images, coef), None
    else:
        out, mo = _warp_xla(images, masks, coef)
        mo.set_shape(masks.shape)
    out.set_shape(images.shape)
    return out, mo


def apply_affine(images, masks, matrices, impl: str = "auto"):
    """Warp ``images`` (bilinear) and ``masks`` (nearest) with the same ``matrices``.

    ``images``: ``[B, H, W, C]`` uint8 or float; ``masks``: ``[B, H, W, 1]`` (0/1 values,
    any integer or float dtype) or ``None``; ``matrices``: ``[B, 3, 3]`` output->input,
    normalised (see module docstring). Outside the input the result is 0. Returns
    ``(float32 images on the input's value scale, masks in their dtype or None)``.
    ``impl``: one of :data:`WARP_IMPLS`.
    """
    out, mo = warp(images, masks, matrices, impl)
    return tf.cast(out, tf.float32), mo


def apply_flips(images, masks, hflip, vflip):
    """Exact per-image flips (``hflip``/``vflip``: ``[B]`` bool); masks may be ``None``."""
    def flip(x):
        if x is None:
            return None
        x = tf.where(hflip[:, None, None, None], tf.reverse(x, [2]), x)
        return tf.where(vflip[:, None, None, None], tf.reverse(x, [1]), x)
    return flip(images), flip(masks)


def flip_matrices(hflip, vflip, image_size) -> tf.Tensor:
    n = tf.shape(hflip)[0]
    return affine_from_params(hflip, vflip, tf.zeros([n]), tf.ones([n]), tf.zeros([n, 2]), image_size)


def transform_boxes(boxes, matrices, size=None, valid=None):
    """Move normalised xyxy ``boxes`` ``[B, N, 4]`` by the inverse of ``matrices``.

    Maps the 4 corners, takes min/max (the enclosing box of the transformed box) and clips
    to ``[0, 1]``. Returns ``(boxes, inside)`` where ``inside`` ``[B, N]`` is False for a box
    that left the image entirely (or had no area); such boxes are returned as zeros.
    ``size`` is accepted for symmetry with the warps and not needed (the matrices are in
    normalised coordinates, which already account for the aspect ratio). ``valid``
    (``[B, N]`` bool, optional) marks real boxes; padding stays zeros / not inside.
    """
    boxes = tf.cast(boxes, tf.float32)
    fwd = tf.linalg.inv(tf.cast(matrices, tf.float32))  # input -> output
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    xs = tf.stack([x0, x1, x0, x1], -1)  # [B, N, 4]
    ys = tf.stack([y0, y0, y1, y1], -1)
    a = fwd[:, None, None, :, :]
    tx = a[..., 0, 0] * xs + a[..., 0, 1] * ys + a[..., 0, 2]
    ty = a[..., 1, 0] * xs + a[..., 1, 1] * ys + a[..., 1, 2]
    nb = tf.stack([tf.reduce_min(tx, -1), tf.reduce_min(ty, -1),
                   tf.reduce_max(tx, -1), tf.reduce_max(ty, -1)], -1)
    nb = tf.clip_by_value(nb, 0.0, 1.0)
    inside = (nb[..., 2] > nb[..., 0]) & (nb[..., 3] > nb[..., 1])
    if valid is not None:
        inside = inside & tf.cast(valid, tf.bool)
    nb = tf.where(inside[..., None], nb, tf.zeros_like(nb))
    return nb, inside


# ---------------------------------------------------------------------------------------
# photometric
# ---------------------------------------------------------------------------------------
_SEEDS_CLS = None


def _batch_seed(seed):
    """A stand-in for a layer's ``SeedGenerator`` that hands out seeds derived from one
    tensor (stateless: nothing is stored in a variable)."""
    global _SEEDS_CLS
    if _SEEDS_CLS is None:
        from keras.random import SeedGenerator

        class _Seeds(SeedGenerator):  # a subclass, for the isinstance check in keras' draw_seed
            def __init__(self, s):  # no super().__init__: no state variable
                self._seed = tf.cast(s, tf.int64)
                self._n = 0

            def next(self, ordered=True):
                self._n += 1
                return tf.random.experimental.stateless_fold_in(self._seed, self._n)

        _SEEDS_CLS = _Seeds
    return _SEEDS_CLS(seed)


def photometric_layers(cfg: Mapping[str, Any], channels: int = 3, seed: Optional[int] = None) -> list:
    """``[(key, keras_layer, probability)]`` for the active photometric augmentations.

    Images are float in ``[0, 1]`` (``value_range=(0, 1)``). Saturation and hue are
    skipped for single-channel batches (they are no-ops on grey images). The layers are
    float32 whatever the global dtype policy. Noise is not a layer here (see
    :func:`apply_photometric`).
    """
    import keras

    cfg = augment_config(cfg) if "warp" not in cfg else cfg
    L = keras.layers
    out = []
    kw = dict(value_range=(0.0, 1.0), seed=seed, dtype="float32")
    if float(cfg["brightness"]) > 0:
        out.append(("brightness", L.RandomBrightness(float(cfg["brightness"]), **kw), float(cfg["brightness_prob"])))
    if float(cfg["contrast"]) > 0:
        out.append(("contrast", L.RandomContrast(min(float(cfg["contrast"]), 1.0), **kw), float(cfg["contrast_prob"])))
    if channels == 3 and float(cfg["saturation"]) > 0:
        s = min(float(cfg["saturation"]), 0.999)
        fac = ((1 - s) / (2 - s), (1 + s) / (2 + s))
        out.append(("saturation", L.RandomSaturation(fac, **kw), float(cfg["saturation_prob"])))
    if channels == 3 and float(cfg["hue"]) > 0:
        out.append(("hue", L.RandomHue(min(float(cfg["hue"]), 1.0), **kw), float(cfg["hue_prob"])))
    if float(cfg["blur_prob"]) > 0:
        p = float(cfg["blur_prob"])
        sig = cfg["blur_sigma"]
        sig = [float(sig), float(sig)] if isinstance(sig, (int, float)) else [float(v) for v in sig]
        out.append(("blur", L.RandomGaussianBlur(factor=(p, p), kernel_size=int(cfg["blur_kernel"]),
                                                 sigma=sig, **kw), 1.0))
    for _, layer, _ in out:
        layer.backend.set_backend("tensorflow")
    return out


def apply_photometric(images, layers: list, seed, noise_std: float = 0.0, noise_prob: float = 1.0):
    """Apply ``layers`` (from :func:`photometric_layers`) to a float ``[B, H, W, C]`` batch.

    ``seed``: ``[2]`` integer tensor; every draw is stateless, derived from it. Each layer
    is applied to an image with its probability; the result is clipped to ``[0, 1]``.
    """
    n = tf.shape(images)[0]
    for i, (key, layer, prob) in enumerate(layers):
        s = _sub_seed(seed, 100 + i)
        t = layer.get_random_transformation(images, training=True, seed=_batch_seed(s))
        out = layer.transform_images(images, t, training=True)
        if prob < 1.0:
            apply = _bernoulli(n, prob, _sub_seed(s, 7))
            out = tf.where(apply[:, None, None, None], out, images)
        images = out
    if noise_std > 0:
        import keras

        s = _sub_seed(seed, 99)
        noise = keras.random.normal(tf.shape(images), stddev=noise_std, seed=_batch_seed(s))
        if noise_prob < 1.0:
            noise = noise * tf.cast(_bernoulli(n, noise_prob, _sub_seed(s, 7)), tf.float32)[:, None, None, None]
        images = images + noise
    if layers or noise_std > 0:
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images
