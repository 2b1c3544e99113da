"""``phantom``: the embedded default dataset, MRI-like axial T1 post-contrast slices.

A deterministic generator (numpy + OpenCV only) so that training and the tests run on a
fresh machine with no download. Each synthetic *patient* has one head geometry and one
class (glioma, meningioma, pituitary or no_tumor) and 2-6 neighbouring slices; every
slice comes with the exact binary tumour mask and its tight box.

Anatomy (per slice): a head ellipse (random size, position, rotation, aspect, egg shape
and a wavy outline) with scalp skin, bright subcutaneous fat, dark outer table, bright-ish
diploe (bone marrow), dark inner table and a thin CSF rim; a brain with grey/white matter
(smooth random fields: a cortical ribbon and sulci that follow the zero level set of a
band-limited noise field), deep grey nuclei, two lateral ventricles (dark crescents
``)(`` near the centre) at high slice levels, a suprasellar cistern and a faint normal
pituitary gland at low levels, an interhemispheric fissure with the falx; bright vessel
dots, cortical veins and choroid plexus as distractors; then a smooth multiplicative bias
field, a slight blur and Rician noise. Saved as 8-bit grey PNG (or JPEG, ``fmt="jpg"``).

Class cues (each with overlapping sizes, a random contrast, jittered positions):

* **meningioma**: extra-axial, a smooth round/lentiform mass sitting on the inner skull
  boundary (broad dural base, clipped flat by the inner table), homogeneous bright, with
  an optional dark CSF cleft towards the brain;
* **glioma**: intra-axial, inside a hemisphere away from the skull (sometimes close to
  the cortex), lobulated irregular outline, heterogeneous: an irregular enhancing rim
  around a dark necrotic core (a third have no necrosis, only patchy enhancement), in a
  darker oedema halo;
* **pituitary**: small, on the midline at the sella, which this phantom puts in the
  lower-central part of the brain (image coordinates, head frame ``v > 0``); bright;
* **no_tumor**: no tumour (distractors only).

**The mask is the tumour only: enhancing part + necrotic core. Oedema is NOT in the
mask** (nor the CSF cleft). The box is the tight box of the mask, in pixel-edge
coordinates: pixels ``x0..x1`` give ``x_min = x0 / W``, ``x_max = (x1 + 1) / W``.

On disk (the YOLO layout that :mod:`src.data.readers.yolo` reads)::

    <root>/data.yaml                    names: {0: glioma, 1: meningioma, 2: pituitary}
    <root>/images/<split>/p0003_s01.png 8-bit grey slice
    <root>/labels/<split>/p0003_s01.txt "cls xc yc w h" (normalised); empty for no_tumor
    <root>/masks/<split>/p0003_s01.png  0/255 (all zero for no_tumor)
    <root>/phantom.json                 version, parameters, counts, patients
    <root>/README.md

Splits are by patient (no patient in two splits), stratified by class. Output is
byte-identical for a seed (with the same numpy/OpenCV versions), whatever the number of
workers: each patient draws from its own ``numpy.random.SeedSequence(seed, spawn_key=(i,))``.
Generation writes a temporary sibling folder and renames it into place (``phantom.json``
is written last), under a lock file ``.<name>.lock`` beside the root, so a killed run
never leaves a half dataset that looks complete and two processes never generate at
once. The defaults (200 patients, 2-6 slices, 256 px) give ~800 images in ~6 s on 2 cores.

Synthetic, not patients: use it to check that code runs and learns, never to report
clinical accuracy.

CLI: ``python -m src.data.phantom --out DIR [--n-patients N] [--size S] [--seed K]
[--grid grid.png]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from .records import DataError

PHANTOM_VERSION = 1
CLASSES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
YOLO_NAMES: tuple[str, ...] = ("glioma", "meningioma", "pituitary")  # YOLO class ids 0, 1, 2
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULTS: dict[str, Any] = {
    "n_patients": 200,          # x 4 slices on average = ~800 images
    "image_size": 256,
    "slices": (2, 6),
    "class_probs": None,        # None = uniform over CLASSES
    "splits": (0.7, 0.15, 0.15),
    "seed": 0,
    "fmt": "png",
}
META_FILE = "phantom.json"
_PAR_MIN_PATIENTS = 24          # fewer patients: no process pool (start-up costs more)


# ----------------------------------------------------------------------------- parameters
def normalise_params(n_patients: int = DEFAULTS["n_patients"], image_size: int = DEFAULTS["image_size"],
                     slices: Any = DEFAULTS["slices"], class_probs: Any = None,
                     splits: Any = DEFAULTS["splits"], seed: int = DEFAULTS["seed"],
                     fmt: str = DEFAULTS["fmt"]) -> dict:
    """The generation parameters as a JSON-ready dict (what ``phantom.json`` records).

    ``slices``: ``(min, max)`` slices per patient (inclusive) or one int; ``class_probs``:
    ``None`` (uniform), a sequence over :data:`CLASSES` or a ``{class: p}`` mapping;
    ``splits``: ``(train, val, test)`` fractions or a ``{split: fraction}`` mapping.
    Raises :class:`DataError` for an invalid value.
    """
    try:
        n_patients = int(n_patients)
        image_size = int(image_size)
        seed = int(seed)
    except (TypeError, ValueError) as e:
        raise DataError(f"phantom: n_patients, image_size and seed must be integers ({e})") from e
    if n_patients < 1:
        raise DataError(f"phantom: n_patients must be >= 1, got {n_patients}")
    if not 32 <= image_size <= 2048:
        raise DataError(f"phantom: image_size must be in [32, 2048], got {image_size}")
    if seed < 0:
        raise DataError(f"phantom: seed must be >= 0, got {seed}")
    if isinstance(slices, (int, np.integer)):
        slices = (int(slices), int(slices))
    try:
        lo, hi = (int(v) for v in slices)
    except (TypeError, ValueError) as e:
        raise DataError(f"phantom: slices must be an int or [min, max], got {slices!r}") from e
    if not 1 <= lo <= hi <= 99:
        raise DataError(f"phantom: slices must satisfy 1 <= min <= max <= 99, got {[lo, hi]}")
    if class_probs is None:
        probs = [1.0] * len(CLASSES)
    elif isinstance(class_probs, Mapping) or hasattr(class_probs, "items"):
        unknown = sorted(set(map(str, class_probs)) - set(CLASSES))
        if unknown:
            raise DataError(f"phantom: class_probs has unknown classes {unknown}; classes: {list(CLASSES)}")
        probs = [float(class_probs.get(c, 0.0)) for c in CLASSES]
    else:
        probs = [float(p) for p in class_probs]
        if len(probs) != len(CLASSES):
            raise DataError(f"phantom: class_probs needs {len(CLASSES)} values ({list(CLASSES)}), got {probs}")
    if any(p < 0 or not math.isfinite(p) for p in probs) or sum(probs) <= 0:
        raise DataError(f"phantom: class_probs must be >= 0 with a positive sum, got {probs}")
    probs = [round(p / sum(probs), 6) for p in probs]
    if isinstance(splits, Mapping) or hasattr(splits, "items"):
        unknown = sorted(set(map(str, splits)) - set(SPLITS))
        if unknown:
            raise DataError(f"phantom: splits has unknown names {unknown}; splits: {list(SPLITS)}")
        fr = [float(splits.get(s, 0.0)) for s in SPLITS]
    else:
        fr = [float(f) for f in splits]
        if len(fr) != len(SPLITS):
            raise DataError(f"phantom: splits needs 3 fractions (train, val, test), got {fr}")
    if any(f < 0 or not math.isfinite(f) for f in fr) or sum(fr) <= 0:
        raise DataError(f"phantom: split fractions must be >= 0 with a positive sum, got {fr}")
    fr = [round(f / sum(fr), 6) for f in fr]
    fmt = str(fmt).lower().lstrip(".")
    fmt = {"jpeg": "jpg"}.get(fmt, fmt)
    if fmt not in ("png", "jpg"):
        raise DataError(f"phantom: fmt must be 'png' or 'jpg', got {fmt!r}")
    return {
        "n_patients": n_patients, "image_size": image_size, "slices": [lo, hi],
        "class_probs": dict(zip(CLASSES, probs)), "splits": dict(zip(SPLITS, fr)),
        "seed": seed, "fmt": fmt,
    }


def _largest_remainder(total: int, fractions: Sequence[float], rng: np.random.Generator) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``fractions`` (random tie-break)."""
    exact = np.asarray(fractions, np.float64) * total
    counts = np.floor(exact + 1e-9).astype(int)
    rest = total - counts.sum()
    if rest > 0:
        frac = exact - counts
        order = sorted(range(len(frac)), key=lambda i: (-round(frac[i], 9), rng.random()))
        for i in order[:rest]:
            counts[i] += 1
    return counts.tolist()


def plan_patients(params: Mapping) -> list[dict]:
    """Class, split and slice count of each patient (cheap; no images)."""
    n = params["n_patients"]
    master = np.random.default_rng(np.random.SeedSequence([params["seed"], 0x5EED]))
    probs = [params["class_probs"][c] for c in CLASSES]
    class_counts = _largest_remainder(n, probs, master)
    classes = np.repeat(np.arange(len(CLASSES)), class_counts)
    master.shuffle(classes)
    fr = [params["splits"][s] for s in SPLITS]
    split_of = np.zeros(n, int)
    for c in range(len(CLASSES)):
        ids = np.flatnonzero(classes == c)
        master.shuffle(ids)
        counts = _largest_remainder(len(ids), fr, master)
        split_of[ids] = np.repeat(np.arange(len(SPLITS)), counts)
    # every split asked for gets at least one patient when there are enough patients
    wanted = [i for i, f in enumerate(fr) if f > 0]
    if n >= len(wanted):
        for s in wanted:
            if not np.any(split_of == s):
                big = int(np.argmax(np.bincount(split_of, minlength=len(SPLITS))))
                cand = np.flatnonzero(split_of == big)
                # take from the class with most patients in the big split
                cls_counts = np.bincount(classes[cand], minlength=len(CLASSES))
                pick = cand[classes[cand] == int(np.argmax(cls_counts))][-1]
                split_of[pick] = s
    lo, hi = params["slices"]
    plan = []
    for i in range(n):
        srng = np.random.default_rng(np.random.SeedSequence([params["seed"], 0x511CE, i]))
        plan.append({"id": f"p{i:04d}", "index": i, "class": CLASSES[classes[i]],
                     "split": SPLITS[split_of[i]], "slices": int(srng.integers(lo, hi + 1))})
    return plan


# ----------------------------------------------------------------------------- fields
_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRID_CACHE[size] = (xx, yy)
    return _GRID_CACHE[size]


def _texture(rng: np.random.Generator, res: int) -> np.ndarray:
    """A low-resolution smooth noise texture (unit std), sampled later in head coordinates."""
    t = rng.standard_normal((res, res)).astype(np.float32)
    t = cv2.GaussianBlur(t, (0, 0), 0.9, borderType=cv2.BORDER_REFLECT101)
    return t / (t.std() + 1e-6)


def _polar_texture(rng: np.random.Generator, n_theta: int = 110, n_depth: int = 16) -> np.ndarray:
    """Smooth noise, periodic along the angle (x), for sulci running inwards from the surface."""
    t = rng.standard_normal((n_depth, n_theta)).astype(np.float32)
    t = cv2.GaussianBlur(np.hstack([t, t, t]), (0, 0), sigmaX=1.0, sigmaY=0.8,
                         borderType=cv2.BORDER_REFLECT101)[:, n_theta:2 * n_theta]
    return np.ascontiguousarray(t / (t.std() + 1e-6))


def _sample_polar(tex: np.ndarray, theta: np.ndarray, depth: np.ndarray, depth_cell: float) -> np.ndarray:
    h, w = tex.shape
    mx = ((theta + np.pi) * (w / (2 * np.pi))).astype(np.float32)
    my = (depth / depth_cell).astype(np.float32)
    return cv2.remap(tex, mx, my, interpolation=cv2.INTER_CUBIC, borderMode=cv2.BORDER_WRAP)


def _sample(tex: np.ndarray, un: np.ndarray, vn: np.ndarray, extent: float = 1.3) -> np.ndarray:
    """Sample a texture at normalised head coordinates (cubic); the field follows the head."""
    k = (tex.shape[0] - 1) / (2 * extent)
    mx = ((un + extent) * k).astype(np.float32)
    my = ((vn + extent) * k).astype(np.float32)
    return cv2.remap(tex, mx, my, interpolation=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)


def _soft_ellipse(u, v, cu, cv_, au, av, angle=0.0, edge=1.0):
    """Alpha in [0, 1] of an ellipse (all in px), with a ~``edge`` px soft border."""
    du, dv = u - cu, v - cv_
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    q = np.sqrt((du / au) ** 2 + (dv / av) ** 2)
    return np.clip((1.0 - q) * min(au, av) / edge + 0.5, 0.0, 1.0)


def _blend(img: np.ndarray, alpha: np.ndarray, value) -> np.ndarray:
    return img + alpha * (value - img)


def _radial_polygon(rng: np.random.Generator, n_harm: int, amp: float, decay: float) -> dict:
    """Random star-shaped outline r(t) = 1 + sum_k a_k cos(k t + p_k), k = 2..n_harm+1."""
    k = np.arange(2, 2 + n_harm)
    return {"k": k.tolist(), "a": (amp * rng.uniform(0.2, 1.0, n_harm) / k ** decay).tolist(),
            "p": rng.uniform(0, 2 * np.pi, n_harm).tolist()}


def _outline(shape: dict, ru: float, rv: float, angle: float, drift: float = 0.0, n: int = 96) -> np.ndarray:
    """(n, 2) outline points in head-frame px (relative to the shape centre)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(t)
    for k, a, p in zip(shape["k"], shape["a"], shape["p"]):
        r += a * np.cos(k * t + p + drift * k)
    r = np.maximum(r, 0.35)
    x, y = ru * r * np.cos(t), rv * r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * x - s * y, s * x + c * y], 1)


# ----------------------------------------------------------------------------- one patient
def _sample_patient(rng: np.random.Generator, cls: str, size: int, n_slices: int) -> dict:
    S = float(size)
    sc = S / 256.0
    ry = S * rng.uniform(0.36, 0.43)
    rx = ry * rng.uniform(0.74, 0.88)
    jit = 0.46 * S - ry * 1.05
    geo = {
        "cx": S / 2 + rng.uniform(-1, 1) * max(jit, 0) * 0.6,
        "cy": S / 2 + rng.uniform(-1, 1) * max(jit, 0) * 0.6,
        "angle": math.radians(rng.uniform(-12, 12)),
        "rx": rx, "ry": ry, "egg": rng.uniform(0.0, 0.08),
        "harm": [(k, rng.normal(0, 0.009), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)],
        # layer thicknesses, canonical px (256-px image): skin, fat, outer table, diploe, inner table, CSF
        "layers": [rng.uniform(1.2, 2.0), rng.uniform(2.5, 5.5), rng.uniform(1.2, 2.2),
                   rng.uniform(1.0, 2.4), rng.uniform(0.8, 1.4), rng.uniform(0.7, 1.5)],
        "fat": rng.uniform(0.78, 0.95), "diploe": rng.uniform(0.38, 0.55), "skin": rng.uniform(0.32, 0.48),
        "wm": rng.uniform(0.36, 0.44), "gm_ratio": rng.uniform(0.72, 0.84), "csf": rng.uniform(0.05, 0.11),
        "cortex": rng.uniform(2.2, 3.4), "sulc_depth": rng.uniform(12.0, 22.0),
        "sulc_w": rng.uniform(0.08, 0.14), "gm_w": rng.uniform(0.45, 0.7),
        "vent": rng.uniform(0.7, 1.3), "sella_v": rng.uniform(0.10, 0.24),
        "tex_thick": _texture(rng, 10), "tex_sulc": _polar_texture(rng), "tex_iso": _texture(rng, 40),
        "tex_depth": _texture(rng, 14), "tex_wm": _texture(rng, 12),
        "gain": rng.uniform(0.8, 1.0), "noise": rng.uniform(0.008, 0.03), "blur": rng.uniform(0.35, 0.8),
    }
    # slice levels: 0 = sella level (no lateral ventricles), 1 = ventricle bodies
    step = rng.uniform(0.05, 0.1)
    top = 1.0 - step * (n_slices - 1)
    z0 = rng.uniform(0.0, 0.3 if cls == "pituitary" else max(top, 0.0))
    if cls == "pituitary":
        z0 = min(z0, max(0.0, 0.35 - step * (n_slices - 1)))
    levels = [z0 + step * k for k in range(n_slices)]
    # tumour cross-section: sphere-like, each slice cuts it at t in [-a, a]
    a = rng.uniform(0.15, 0.7)
    ts = np.linspace(-a, a, n_slices) if n_slices > 1 else np.array([rng.uniform(-a, a)])
    ts = ts + rng.uniform(-0.1, 0.1)
    slices = []
    for k in range(n_slices):
        slices.append({
            "z": float(levels[k]), "t": float(ts[k]),
            "dx": rng.normal(0, 0.6) * sc, "dy": rng.normal(0, 0.6) * sc,
            "dangle": math.radians(rng.normal(0, 0.8)), "dscale": rng.normal(0, 0.008),
            "mix": min(1.2, 0.35 * k),
        })
    tumour = _sample_tumour(rng, cls, geo, S)
    return {"class": cls, "size": size, "geo": geo, "slices": slices, "tumour": tumour}


def _head_distance(u: np.ndarray, v: np.ndarray, geo: dict, scale: float = 1.0) -> np.ndarray:
    """Distance (px, along the ray from the centre) inside the outer head outline; < 0 outside."""
    rx, ry = geo["rx"] * scale, geo["ry"] * scale
    vn = v / ry
    ue = u / (1.0 + geo["egg"] * np.clip(vn, -1.2, 1.2))
    un = ue / rx
    rr = np.sqrt(un * un + vn * vn)
    th = np.arctan2(vn, un)
    b = np.ones_like(rr)
    for k, a, p in geo["harm"]:
        b += a * np.cos(k * th + p)
    pix = np.where(rr > 1e-4, np.sqrt(ue * ue + v * v) / np.maximum(rr, 1e-4), rx)
    return (b - rr) * pix


def _intracranial_depth(geo: dict, S: float) -> float:
    """Canonical-px depth of the inner skull surface (where the CSF rim begins)."""
    return float(sum(geo["layers"][:5]))


def _ref_distance_map(geo: dict, S: int) -> tuple[np.ndarray, float]:
    """Reference (no per-slice jitter) distance to the inner skull in px, and the px scale."""
    xx, yy = _grid(S)
    c, s = math.cos(geo["angle"]), math.sin(geo["angle"])
    dx, dy = xx - geo["cx"], yy - geo["cy"]
    u, v = c * dx + s * dy, -s * dx + c * dy
    sc = S / 256.0
    d = _head_distance(u, v, geo) / sc  # canonical px
    ic = (d > _intracranial_depth(geo, S) + geo["layers"][5]).astype(np.uint8)  # brain proper
    dist = cv2.distanceTransform(ic, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist, sc


def _to_head(geo: dict, x: float, y: float) -> tuple[float, float]:
    c, s = math.cos(geo["angle"]), math.sin(geo["angle"])
    dx, dy = x - geo["cx"], y - geo["cy"]
    return c * dx + s * dy, -s * dx + c * dy


def _to_image(frame: dict, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(frame["angle"]), math.sin(frame["angle"])
    u, v = u * frame["scale"], v * frame["scale"]
    return frame["cx"] + c * u - s * v, frame["cy"] + s * u + c * v


def _sample_tumour(rng: np.random.Generator, cls: str, geo: dict, S: float) -> Optional[dict]:
    if cls == "no_tumor":
        return None
    size = int(S)
    if cls == "pituitary":
        r = S * rng.uniform(0.02, 0.05)
        return {"cls": cls, "cu": rng.normal(0, 0.006) * S, "cv": geo["sella_v"] * geo["ry"] + rng.normal(0, 0.01) * S,
                "ru": r * rng.uniform(0.9, 1.2), "rv": r * rng.uniform(0.8, 1.1), "angle": rng.normal(0, 0.15),
                "shape": _radial_polygon(rng, 3, 0.10, 1.0), "delta": rng.uniform(0.12, 0.36),
                "het": rng.uniform(0.0, 0.04),
                "cistern": rng.uniform(0.15, 0.6) if rng.random() < 0.5 else 0.0}
    dist, sc = _ref_distance_map(geo, size)
    if cls == "meningioma":
        r = S * rng.uniform(0.035, 0.11)
        rt, rn = r * rng.uniform(1.0, 1.4), r * rng.uniform(0.65, 1.0)   # tangential, normal half-axes
        # a point on the inner skull boundary along a random ray from the head centre
        for _ in range(50):
            phi = rng.uniform(0, 2 * np.pi)
            ts = np.arange(0, 0.6 * S, 0.5)
            cu, cv_ = np.cos(phi) * ts * geo["rx"] / geo["ry"], np.sin(phi) * ts
            c, s = math.cos(geo["angle"]), math.sin(geo["angle"])
            xs, ys = geo["cx"] + c * cu - s * cv_, geo["cy"] + s * cu + c * cv_
            ok = (xs >= 0) & (xs < S - 1) & (ys >= 0) & (ys < S - 1)
            vals = np.zeros_like(xs)
            vals[ok] = dist[ys[ok].round().astype(int), xs[ok].round().astype(int)]
            inside = np.flatnonzero(vals > 0)
            if len(inside) == 0:
                continue
            j = inside[-1]
            bx, by = xs[j], ys[j]
            # outward normal from the distance map gradient
            xi, yi = int(round(bx)), int(round(by))
            gx = dist[yi, min(xi + 2, size - 1)] - dist[yi, max(xi - 2, 0)]
            gy = dist[min(yi + 2, size - 1), xi] - dist[max(yi - 2, 0), xi]
            g = math.hypot(gx, gy)
            if g < 1e-6:
                continue
            nx, ny = -gx / g, -gy / g                        # outward, image coords
            depth = rn * rng.uniform(0.15, 0.6)
            tx, ty = bx - nx * depth, by - ny * depth       # centre, slightly inside the brain
            if not (dist[int(round(ty)), int(round(tx))] > 0):
                continue
            hu, hv = _to_head(geo, tx, ty)
            nu, nv = _to_head(geo, geo["cx"] + nx, geo["cy"] + ny)
            return {"cls": cls, "cu": hu, "cv": hv, "ru": rn, "rv": rt,
                    "angle": math.atan2(nv, nu), "shape": _radial_polygon(rng, 3, 0.12, 1.2),
                    "delta": rng.uniform(0.12, 0.42), "het": rng.uniform(0.0, 0.04),
                    "cleft": rng.uniform(0.0, 0.7) if rng.random() < 0.5 else 0.0}
        raise RuntimeError("phantom: could not place a meningioma")  # pragma: no cover
    # glioma: inside a hemisphere, away from the inner skull by a random margin
    r = S * rng.uniform(0.035, 0.11)
    shape = _radial_polygon(rng, 7, rng.uniform(0.25, 0.5), 0.7)
    for attempt in range(200):
        rr = r * (0.985 ** attempt)
        ru, rv = rr * rng.uniform(0.85, 1.15), rr * rng.uniform(0.85, 1.15)
        rmax = float(np.hypot(*_outline(shape, ru, rv, 0.0).T).max()) * 1.05
        margin = sc * (rng.uniform(1.0, 12.0) if rng.random() < 0.7 else rng.uniform(0.0, 1.5))
        side = rng.choice([-1.0, 1.0])
        hu = side * rng.uniform(0.12, 0.65) * geo["rx"]
        hv = rng.uniform(-0.6, 0.6) * geo["ry"]
        c, s = math.cos(geo["angle"]), math.sin(geo["angle"])
        x, y = geo["cx"] + c * hu - s * hv, geo["cy"] + s * hu + c * hv
        if not (0 <= x < S and 0 <= y < S):
            continue
        if dist[int(y), int(x)] >= rmax + margin + 1.0:
            return {"cls": cls, "cu": hu, "cv": hv, "ru": ru, "rv": rv, "angle": rng.uniform(0, np.pi),
                    "shape": shape, "delta": rng.uniform(0.12, 0.40), "het": rng.uniform(0.05, 0.14),
                    "necrotic": bool(rng.random() < 0.68), "core": rng.uniform(0.35, 0.75),
                    "rim": rng.uniform(0.3, 0.6), "oedema": rng.uniform(1.35, 2.2),
                    "oedema_dark": rng.uniform(0.05, 0.16), "oedema_shape": _radial_polygon(rng, 6, 0.45, 0.6),
                    "tex_het": _texture(rng, 20)}
    raise RuntimeError("phantom: could not place a glioma")  # pragma: no cover


def _fill(frame: dict, pts_head: np.ndarray, size: int) -> np.ndarray:
    """Rasterise a head-frame polygon (px) into a uint8 0/1 mask (sub-pixel accurate)."""
    x, y = _to_image(frame, pts_head[:, 0], pts_head[:, 1])
    pts = np.round(np.stack([x, y], 1) * 16).astype(np.int32)
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return m


def _frame_uv(S: int, frame: dict, f: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Head-frame coordinates (px of the reference geometry) of a grid ``f`` times coarser."""
    if f == 1:
        xx, yy = _grid(S)
    else:
        g = np.arange(-(-S // f), dtype=np.float32) * f + (f - 1) / 2.0
        xx, yy = np.meshgrid(g, g)
    c, s = math.cos(frame["angle"]), math.sin(frame["angle"])
    dx, dy = xx - frame["cx"], yy - frame["cy"]
    return (c * dx + s * dy) / frame["scale"], (-s * dx + c * dy) / frame["scale"]


def _up(a: np.ndarray, f: int, S: int) -> np.ndarray:
    """Bilinear upsampling of a ``_frame_uv(.., f)`` field to the full ``S x S`` grid."""
    if f == 1:
        return a
    n = a.shape[0] * f
    return cv2.resize(a, (n, n), interpolation=cv2.INTER_LINEAR)[:S, :S]


def _roi(frame: dict, S: int, cu: float, cv_: float, r: float):
    """Slices of the image around the head-frame point (cu, cv) with radius r (px), or None."""
    x, y = _to_image(frame, np.asarray(cu), np.asarray(cv_))
    r = r * frame["scale"] + 3.0
    x0, x1 = max(0, int(x - r)), min(S, int(x + r) + 2)
    y0, y1 = max(0, int(y - r)), min(S, int(y + r) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _ellipse_into(img, u, v, frame, S, cu, cv_, au, av, angle, edge, weight, value, gate=None):
    """Blend ``value`` into ``img`` inside a soft ellipse (head frame), working on its box only."""
    roi = _roi(frame, S, cu, cv_, max(au, av) + 2 * edge)
    if roi is None:
        return
    a = _soft_ellipse(u[roi], v[roi], cu, cv_, au, av, angle, edge) * weight
    if gate is not None:
        a = a * gate[roi]
    img[roi] = _blend(img[roi], a, value)


def render_slice(patient: dict, k: int, rng: np.random.Generator,  # long on purpose: the slice is drawn
                 return_depth: bool = False) -> tuple[np.ndarray, ...]:  # layer by layer in occlusion order
    """Slice ``k`` of a patient: (uint8 grey image, uint8 0/1 tumour mask).

    With ``return_depth``, also the depth below the outer head outline (float32 map, in
    px of a 256-px image); the inner skull surface and the brain surface lie at depths
    ``inner_skull_depth(patient)`` and ``brain_depth(patient)``.
    """
    S = patient["size"]
    sc = S / 256.0
    geo, sl, tum = patient["geo"], patient["slices"][k], patient["tumour"]
    rx, ry = geo["rx"], geo["ry"]
    frame = {"cx": geo["cx"] + sl["dx"], "cy": geo["cy"] + sl["dy"], "angle": geo["angle"] + sl["dangle"],
             "scale": 1.0 + sl["dscale"]}
    u, v = _frame_uv(S, frame)
    z = sl["z"]
    f2 = 2 if S >= 96 else 1

    # --- smooth fields on a coarser grid (depth below the head outline, sulcal field ...)
    u2, v2 = _frame_uv(S, frame, f2)
    un2, vn2 = u2 / rx, v2 / ry
    thick = 1.0 + 0.12 * _sample(geo["tex_thick"], un2, vn2)
    d2 = _head_distance(u2, v2, geo) * frame["scale"] / sc / thick      # canonical px
    L = geo["layers"]
    t_brain = float(sum(L))
    mix = sl["mix"]
    polar = geo["tex_sulc"]
    polar = math.cos(mix) * polar + math.sin(mix) * _polar_texture(rng, polar.shape[1], polar.shape[0])
    F2 = (_sample_polar(polar, np.arctan2(vn2, un2), np.maximum(d2 - t_brain, 0.0), 4.0)
          + 0.35 * _sample(geo["tex_iso"], un2, vn2))
    depth2 = geo["sulc_depth"] * (1.0 + 0.35 * _sample(geo["tex_depth"], un2, vn2))
    wm2 = 1.0 + 0.04 * _sample(geo["tex_wm"], un2, vn2)
    d = _up(d2, f2, S)
    F = _up(F2, f2, S)
    depth = _up(depth2, f2, S)
    wmv = geo["wm"] * _up(wm2, f2, S)

    # --- skull and scalp: piecewise-linear profile of the depth below the outline
    e = 0.5  # half-width of a transition
    b = np.cumsum([0.0] + L)
    knots = [-1.0, 0.3, b[1] - e, b[1] + e, b[2] - e, b[2] + e, b[3] - e, b[3] + e, b[4] - e, b[4] + e,
             b[5] - e, b[5] + e, b[6] - e]
    vals = [0.0, geo["skin"], geo["skin"] * 1.1, geo["fat"], geo["fat"], 0.07, 0.06, geo["diploe"],
            geo["diploe"] * 0.9, 0.07, 0.06, geo["csf"], geo["csf"]]
    img = np.interp(d, knots, vals).astype(np.float32)
    db = d - t_brain                                   # canonical px inside the brain
    a_brain = np.clip(db + 0.5, 0.0, 1.0)

    # --- brain: white matter, cortical ribbon, sulci (the zero set of a smooth field that
    # varies fast along the surface and slowly inwards, so sulci run inwards)
    wm, gmv, csf = geo["wm"], geo["wm"] * geo["gm_ratio"], geo["csf"]
    FF = F * F
    near = np.clip((depth - db) / 3.0, 0.0, 1.0)
    fade_in = np.clip(1.0 - db / (depth + 1e-3), 0.0, 1.0)
    sulcus = np.exp(-FF / geo["sulc_w"] ** 2) * near * (0.35 + 0.45 * fade_in)
    gm = np.maximum(np.clip(geo["cortex"] - db + 0.5, 0.0, 1.0),
                    np.exp(-FF / geo["gm_w"] ** 2) * np.clip((depth + geo["cortex"] - db) / 3.0, 0.0, 1.0))
    brain = wmv + (gmv - wmv) * gm
    # deep grey nuclei (lentiform, thalamus), a little darker than white matter
    for side in (-1.0, 1.0):
        _ellipse_into(brain, u, v, frame, S, side * 0.30 * rx, -0.02 * ry, 0.07 * rx, 0.17 * ry, side * 0.25,
                      3 * sc, 0.55, gmv)
        if z > 0.3:
            _ellipse_into(brain, u, v, frame, S, side * 0.11 * rx, 0.16 * ry, 0.08 * rx, 0.10 * ry, 0.0,
                          3 * sc, 0.45, gmv)
    brain = _blend(brain, sulcus, csf)
    fine = cv2.GaussianBlur(rng.standard_normal((S, S), dtype=np.float32), (0, 0), max(0.8 * sc, 0.5))
    brain += (0.05 * wm) * fine
    img = _blend(img, a_brain, brain)

    # --- lateral ventricles (")(" crescents), high slice levels
    vis = float(np.clip((z - 0.3) / 0.3, 0.0, 1.0))
    vsz = geo["vent"] * (0.55 + 0.55 * z)
    if vis > 0:
        for side in (-1.0, 1.0):
            au, av = 0.075 * vsz * rx, 0.30 * vsz * ry
            cu0, cv0 = side * (0.035 * rx + au), -0.05 * ry
            roi = _roi(frame, S, cu0, cv0, av + 2 * sc)
            if roi is None:
                continue
            A = _soft_ellipse(u[roi], v[roi], cu0, cv0, au, av, side * 0.12, sc)
            B = _soft_ellipse(u[roi], v[roi], cu0 + side * 0.6 * au, cv0, au * 0.92, av * 0.92, side * 0.12, sc)
            img[roi] = _blend(img[roi], vis * A * (1.0 - B) * a_brain[roi], csf)
    # third ventricle slit, mid levels
    tv = float(np.clip(1.0 - abs(z - 0.45) / 0.2, 0.0, 1.0))
    if tv > 0:
        _ellipse_into(img, u, v, frame, S, 0.0, 0.05 * ry, 1.2 * sc + 0.01 * rx, 0.09 * ry, 0.0, 0.7 * sc,
                      tv * 0.8, csf, a_brain)
    # suprasellar cistern and a faint normal gland, low levels
    vs = float(np.clip((0.35 - z) / 0.2, 0.0, 1.0))
    sella_v = geo["sella_v"] * ry
    if vs > 0:
        _ellipse_into(img, u, v, frame, S, 0.0, sella_v - 0.02 * ry, 0.09 * rx, 0.07 * ry, 0.0, 1.5 * sc,
                      vs * 0.8, csf * 2.5, a_brain)
        _ellipse_into(img, u, v, frame, S, 0.0, sella_v, 0.022 * rx, 0.018 * ry, 0.0, 0.7 * sc, vs, wm * 1.08)
    # interhemispheric fissure with the falx, away from the ventricles and the sella
    xs, _ = _to_image(frame, np.zeros(2), np.array([-ry, ry]))
    band = slice(max(0, int(xs.min()) - 6), min(S, int(xs.max()) + 7))
    ub, vb = u[:, band], v[:, band] / ry
    fade = np.clip((np.abs(vb + 0.02) - 0.32) / 0.1, 0.0, 1.0) * a_brain[:, band]
    um = ub - 1.2 * sc * np.sin(3.0 * vb + geo["sella_v"] * 20)
    sub = _blend(img[:, band], 0.6 * fade * np.exp(-(um / (0.9 * sc + 0.3)) ** 2), csf)
    img[:, band] = _blend(sub, 0.4 * fade * np.exp(-(um / (0.4 * sc + 0.2)) ** 2), wm * 1.2)

    # --- distractors: vessel dots, cortical veins, choroid plexus (never in the mask)
    over = np.zeros((S, S), np.uint8)
    for _ in range(int(rng.poisson(2.5))):
        rr_, ph = 0.8 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        x, y = _to_image(frame, np.array(rr_ * math.cos(ph) * rx), np.array(rr_ * math.sin(ph) * ry))
        rad = max(1.0, rng.uniform(0.6, 1.6) * sc)
        cv2.circle(over, (int(x * 16), int(y * 16)), int(rad * 16), int(rng.uniform(150, 255)),
                   -1, cv2.LINE_AA, 4)
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 3))):
            ph0, span = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.4)
            rf = rng.uniform(0.72, 0.86)
            ph = np.linspace(ph0, ph0 + span, 12)
            x, y = _to_image(frame, rf * np.cos(ph) * rx, rf * np.sin(ph) * ry)
            pts = np.round(np.stack([x, y], 1) * 16).astype(np.int32)
            cv2.polylines(over, [pts], False, int(rng.uniform(120, 230)), max(1, int(round(sc))), cv2.LINE_AA, 4)
    if vis > 0.3 and rng.random() < 0.6:
        for side in (-1.0, 1.0):
            x, y = _to_image(frame, np.array(side * 0.09 * vsz * rx), np.array(0.15 * vsz * ry))
            cv2.circle(over, (int(x * 16), int(y * 16)), int(max(1.0, 1.8 * sc) * 16),
                       int(rng.uniform(120, 220)), -1, cv2.LINE_AA, 4)
    if over.any():
        img = _blend(img, over.astype(np.float32) * (1.0 / 255.0) * a_brain, 0.9)

    # --- tumour
    mask = np.zeros((S, S), np.uint8)
    if tum is not None:
        mask = _render_tumour(img, tum, sl, frame, u, v, d, db, a_brain, geo, S, rng)

    # --- acquisition: gain, bias field, blur, Rician noise
    f4 = 4 if S >= 64 else 1
    u4, v4 = _frame_uv(S, frame, f4)
    un4, vn4 = u4 / rx, v4 / ry
    bias4 = np.exp(0.10 * _sample(_texture(rng, 4), un4, vn4) + 0.08 * (rng.normal() * un4 + rng.normal() * vn4))
    img *= _up((geo["gain"] * bias4).astype(np.float32), f4, S)
    sigma = geo["blur"] * sc * 1.6
    img = cv2.GaussianBlur(img, (0, 0), max(sigma, 0.3))
    n = geo["noise"]
    n1 = rng.standard_normal((S, S), dtype=np.float32)
    n2 = rng.standard_normal((S, S), dtype=np.float32)
    img += n * n1
    n2 *= n
    img = np.sqrt(img * img + n2 * n2)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return (out, mask, d) if return_depth else (out, mask)


def inner_skull_depth(patient: dict) -> float:
    """Depth (px of a 256-px image) of the inner skull surface below the head outline."""
    return _intracranial_depth(patient["geo"], patient["size"])


def brain_depth(patient: dict) -> float:
    """Depth (px of a 256-px image) of the brain surface below the head outline."""
    return float(sum(patient["geo"]["layers"]))


def patient_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of patient ``index`` (independent of the other patients)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def render_patient(params: Mapping, entry: Mapping, return_depth: bool = False):
    """Yield ``(stem, image, mask[, depth])`` for every slice of a planned patient
    (an entry of :func:`plan_patients`), exactly as :func:`generate_phantom` writes them."""
    rng = patient_rng(params["seed"], entry["index"])
    patient = _sample_patient(rng, entry["class"], params["image_size"], entry["slices"])
    for k in range(entry["slices"]):
        out = render_slice(patient, k, rng, return_depth=return_depth)
        yield (f"{entry['id']}_s{k:02d}",) + tuple(out) + ((patient,) if return_depth else ())


def _render_tumour(img, tum, sl, frame, u, v, d, db, a_brain, geo, S, rng) -> np.ndarray:
    """Draw the tumour into ``img`` (in place); returns its uint8 0/1 mask."""
    sc = S / 256.0
    cls = tum["cls"]
    t = sl["t"]
    f = math.sqrt(max(1.0 - t * t, 0.0)) if cls != "pituitary" else math.sqrt(max(1.0 - 0.6 * t * t, 0.0))
    f = max(f, 0.45)
    wm = geo["wm"]
    centre = np.array([tum["cu"], tum["cv"]])
    pts = _outline(tum["shape"], tum["ru"] * f, tum["rv"] * f, tum["angle"], drift=0.08 * t) + centre
    mask = _fill(frame, pts, S)
    if cls == "meningioma":
        # extra-axial: everything inside the inner skull surface, nothing in the bone
        mask &= (d >= _intracranial_depth(geo, S) - 0.25).astype(np.uint8)
    else:
        mask &= (a_brain > 0.5).astype(np.uint8)
    if not mask.any():  # degenerate tiny cross-section: keep the centre pixel
        x, y = _to_image(frame, np.array(tum["cu"]), np.array(tum["cv"]))
        mask[int(np.clip(round(float(y)), 0, S - 1)), int(np.clip(round(float(x)), 0, S - 1))] = 1
    reach = np.abs(pts - centre).max()
    if cls == "glioma":
        reach *= tum["oedema"] * (1 + sum(tum["oedema_shape"]["a"]))
    elif cls == "pituitary":
        reach = reach * 1.7 + 2 * sc
    roi = _roi(frame, S, tum["cu"], tum["cv"], reach + 8 * sc + 4)
    ys, xs = np.nonzero(mask)  # the ROI always holds the whole mask
    roi = (slice(min(roi[0].start, ys.min()), max(roi[0].stop, ys.max() + 1)),
           slice(min(roi[1].start, xs.min()), max(roi[1].stop, xs.max() + 1)))
    im, mk, ab = img[roi], mask[roi], a_brain[roi]
    ur, vr = u[roi], v[roi]
    m = mk.astype(np.float32)
    alpha = cv2.GaussianBlur(m, (0, 0), 0.6 * max(sc, 0.5))
    alpha = np.maximum(alpha, m * 0.85)
    fine = cv2.GaussianBlur(rng.standard_normal(m.shape, dtype=np.float32), (0, 0), max(1.2 * sc, 0.6))
    fine /= fine.std() + 1e-6
    if cls == "meningioma":
        if tum["cleft"] > 0:
            k = max(3, int(round(3 * sc)) | 1)
            ring = cv2.dilate(mk, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))) - mk
            ring = cv2.GaussianBlur(ring.astype(np.float32), (0, 0), 0.6) * ab
            im = _blend(im, tum["cleft"] * ring, geo["csf"])
        im = _blend(im, alpha, wm + tum["delta"] + tum["het"] * fine)
    elif cls == "pituitary":
        if tum["cistern"] > 0:
            cist = _soft_ellipse(ur, vr, tum["cu"], tum["cv"], tum["ru"] * f * 1.7 + 2 * sc,
                                 tum["rv"] * f * 1.5 + 2 * sc, 0.0, 1.5 * sc)
            im = _blend(im, tum["cistern"] * cist * ab, geo["csf"] * 1.4)
        im = _blend(im, alpha, wm + tum["delta"] + tum["het"] * fine)
    else:  # glioma
        opts = _outline(tum["oedema_shape"], tum["ru"] * f * tum["oedema"], tum["rv"] * f * tum["oedema"],
                        tum["angle"], drift=0.05 * t) + centre
        oed = cv2.GaussianBlur(_fill(frame, opts, S)[roi].astype(np.float32), (0, 0), 2.0 * max(sc, 0.5))
        im = im - tum["oedema_dark"] * oed * ab * (0.5 + 0.5 * np.clip(db[roi] / 6.0, 0, 1))
        het = _sample(tum["tex_het"], ur / geo["rx"], vr / geo["ry"])
        if tum["necrotic"]:
            dt = cv2.distanceTransform(mk, cv2.DIST_L2, 3)
            rim = max(1.0, tum["rim"] * min(tum["ru"], tum["rv"]) * f) * (1.0 + 0.35 * het)
            core = np.clip((dt - rim) / max(1.0, 1.5 * sc) + 0.5, 0.0, 1.0)
            val = wm + tum["delta"] * (1.0 + 0.4 * het) + tum["het"] * fine
            val = val + core * (tum["core"] * wm * (1.0 + 0.15 * fine) - val)
        else:
            patch = np.clip(0.55 + 0.45 * het, 0.0, 1.3)
            val = wm + tum["delta"] * patch + tum["het"] * fine
        im = _blend(im, alpha, val)
    img[roi] = im
    return mask


# ----------------------------------------------------------------------------- writing
def _write_image(path: Path, img: np.ndarray, fmt: str) -> None:
    if fmt == "jpg":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    else:
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover
        raise DataError(f"{path}: could not encode the image")
    path.write_bytes(buf.tobytes())


def mask_box(mask: np.ndarray) -> Optional[tuple[float, float, float, float]]:
    """Tight box of a binary mask, normalised xyxy (pixel edges), or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape[:2]
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


def _make_patient(job: tuple) -> list[dict]:
    """Generate and write every slice of one patient; returns per-slice metadata."""
    cv2.setNumThreads(1)
    entry, params, out = job
    out = Path(out)
    fmt = params["fmt"]
    split, cls = entry["split"], entry["class"]
    rows = []
    for stem, img, mask in render_patient(params, entry):
        _write_image(out / "images" / split / f"{stem}.{fmt}", img, fmt)
        _write_image(out / "masks" / split / f"{stem}.png", mask * np.uint8(255), "png")
        box = mask_box(mask) if cls != "no_tumor" else None
        line = ""
        if box is not None:
            x0, y0, x1, y1 = box
            line = (f"{YOLO_NAMES.index(cls)} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} "
                    f"{x1 - x0:.6f} {y1 - y0:.6f}\n")
        (out / "labels" / split / f"{stem}.txt").write_text(line)
        rows.append({"stem": stem, "split": split, "class": cls, "mask_pixels": int(mask.sum())})
    return rows


def _readme(params: dict, summary: dict) -> str:
    counts = summary["images_per_split_class"]
    table = "\n".join(f"| {s} | " + " | ".join(str(counts[s][c]) for c in CLASSES)
                      + f" | {summary['images_per_split'][s]} |" for s in SPLITS)
    return f"""# phantom: synthetic MRI-like brain slices (generated, version {PHANTOM_VERSION})

Generated by `src/data/phantom.py` (`generate_phantom`); regenerate with
`python -m src.data.phantom --out <dir>`. Deterministic: the same parameters give the
same bytes. Not real patients: use it to check that code runs and learns, never to
report clinical accuracy.

Parameters: `{json.dumps(params, sort_keys=True)}`

## Layout (YOLO)
- `data.yaml`: `names: {{0: glioma, 1: meningioma, 2: pituitary}}`
- `images/<split>/pPPPP_sSS.{params['fmt']}`: 8-bit grey axial slices, {params['image_size']} px;
  `pPPPP` is the patient (group id), `sSS` the slice
- `labels/<split>/<stem>.txt`: one line `cls xc yc w h` (normalised) per tumour; an
  **empty** file for a `no_tumor` slice (a known negative)
- `masks/<split>/<stem>.png`: 0/255 tumour mask; all zero for `no_tumor`
- `phantom.json`: version, parameters, counts and the patient list

Splits are by patient (no patient in two splits), stratified by class.

## What the classes look like
- meningioma: extra-axial, on the inner skull surface (broad dural base), smooth,
  homogeneous bright;
- glioma: inside a hemisphere, lobulated, enhancing rim around a dark necrotic core
  (sometimes only patchy enhancement), in a darker oedema halo;
- pituitary: small, bright, on the midline at the sella (lower-central in the image);
- no_tumor: none. Bright vessel dots, cortical veins and choroid plexus are distractors.

**Masks hold the tumour only (enhancing part + necrotic core); oedema is not included.**
Boxes are the tight boxes of the masks.

## Counts
{summary['n_patients']} patients, {summary['n_images']} images.

| split | {' | '.join(CLASSES)} | total |
|---|{'---|' * len(CLASSES)}---|
{table}
"""


def _data_yaml() -> str:
    lines = ["# phantom (src/data/phantom.py): YOLO layout, images/<split>, labels/<split>, masks/<split>",
             "path: .", "train: images/train", "val: images/val", "test: images/test",
             f"nc: {len(YOLO_NAMES)}", "names:"]
    lines += [f"  {i}: {n}" for i, n in enumerate(YOLO_NAMES)]
    return "\n".join(lines) + "\n"


def _default_workers(n_patients: int) -> int:
    if n_patients < _PAR_MIN_PATIENTS:
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _generate_into(out: Path, params: dict, workers: Optional[int]) -> dict:
    plan = plan_patients(params)
    for split in {e["split"] for e in plan}:
        for sub in ("images", "labels", "masks"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
    jobs = [(e, params, str(out)) for e in plan]
    workers = _default_workers(len(plan)) if workers is None else max(1, int(workers))
    if workers > 1 and len(plan) > 1:
        import multiprocessing as mp

        # spawn, not fork: the caller may hold TensorFlow's threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_make_patient, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        results = [_make_patient(j) for j in jobs]
    rows = [r for rs in results for r in rs]
    per_split = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    per_class = {c: sum(r["class"] == c for r in rows) for c in CLASSES}
    per_sc = {s: {c: sum(r["split"] == s and r["class"] == c for r in rows) for c in CLASSES} for s in SPLITS}
    summary = {
        "n_patients": len(plan), "n_images": len(rows),
        "patients_per_class": {c: sum(e["class"] == c for e in plan) for c in CLASSES},
        "patients_per_split": {s: sum(e["split"] == s for e in plan) for s in SPLITS},
        "images_per_class": per_class, "images_per_split": per_split, "images_per_split_class": per_sc,
    }
    meta = {
        "version": PHANTOM_VERSION, "generator": "src.data.phantom", "params": params,
        "mask": "tumour = enhancing part + necrotic core; oedema NOT included",
        "box": "tight box of the mask (pixel edges)", "yolo_names": list(YOLO_NAMES),
        "counts": summary,
        "patients": [{k: e[k] for k in ("id", "class", "split", "slices")} for e in plan],
    }
    (out / "data.yaml").write_text(_data_yaml())
    (out / "README.md").write_text(_readme(params, summary))
    # phantom.json last: its presence marks a complete dataset
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return summary


def read_meta(root: str | Path) -> Optional[dict]:
    """The ``phantom.json`` of a generated dataset, or None when missing/unreadable."""
    p = Path(root) / META_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def is_current(root: str | Path, params: Mapping) -> bool:
    """True when ``root`` holds a complete phantom generated with exactly ``params``."""
    meta = read_meta(root)
    return bool(meta) and meta.get("version") == PHANTOM_VERSION and meta.get("params") == dict(params)


def _check_replaceable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DataError(f"phantom: {root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and read_meta(root) is None:
        raise DataError(f"phantom: {root} is a non-empty folder without {META_FILE}; refusing to replace it "
                        "(point data.root at an empty or phantom folder)")


def generate_phantom(root: str | Path, n_patients: int = DEFAULTS["n_patients"],
                     image_size: int = DEFAULTS["image_size"], slices: Any = DEFAULTS["slices"],
                     class_probs: Any = None, splits: Any = DEFAULTS["splits"], seed: int = DEFAULTS["seed"],
                     fmt: str = DEFAULTS["fmt"], workers: Optional[int] = None) -> dict:
    """Generate the phantom dataset into ``root`` (replacing an older phantom there).

    Writes into a temporary sibling folder and renames it into place, so a killed run
    never leaves a half dataset that looks complete; holds the lock ``.<name>.lock``
    beside ``root`` meanwhile, so two generations never run at once. ``root`` must be
    missing, empty or an earlier phantom (a non-empty folder without ``phantom.json`` is
    refused). ``workers``: processes (None = up to 8 for >= 24 patients; 1 = in this
    process); the output does not depend on it. Returns a summary dict (counts, per split
    and class, ``seconds``, ``params``, ``root``).
    """
    params = normalise_params(n_patients, image_size, slices, class_probs, splits, seed, fmt)
    root = Path(root).expanduser().resolve()
    with _lock(_lock_path(root)):
        return _generate_locked(root, params, workers)


def _lock_path(root: Path) -> Path:
    return root.parent / f".{root.name}.lock"


def _generate_locked(root: Path, params: dict, workers: Optional[int]) -> dict:
    _check_replaceable(root)
    # leftovers of killed generations (every generation holds the lock, so none is running)
    for stale in list(root.parent.glob(f".{root.name}.tmp-*")) + list(root.parent.glob(f".{root.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        summary = _generate_into(tmp, params, workers)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "x")
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.update({"root": str(root), "params": params, "version": PHANTOM_VERSION,
                    "seconds": round(time.perf_counter() - t0, 3)})
    return summary


@contextlib.contextmanager
def _lock(path: Path, timeout: float = 600.0):
    """An exclusive inter-process lock on ``path`` (flock; O_EXCL file where flock is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    t0 = time.monotonic()
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - t0 > timeout:
                        raise DataError(f"phantom: timed out after {timeout:.0f}s waiting for the lock {path} "
                                        "(another process is generating)")
                    time.sleep(0.2)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    while True:  # pragma: no cover - Windows
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            break
        except FileExistsError:
            if time.monotonic() - t0 > timeout:
                raise DataError(f"phantom: timed out waiting for the lock {path}; delete it if no "
                                "generation is running")
            time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def ensure_phantom(root: str | Path, workers: Optional[int] = None, **kwargs) -> dict:
    """Generate the phantom into ``root`` unless an identical one is already there.

    Safe with several processes at once: one generates (under ``<root>.lock`` beside
    ``root``), the others wait and then find it current. Returns ``phantom.json``'s
    content plus ``generated`` (True when this call generated it).
    """
    params = normalise_params(**kwargs)
    root = Path(root).expanduser().resolve()
    if is_current(root, params):
        return {**read_meta(root), "generated": False}
    with _lock(_lock_path(root)):
        if is_current(root, params):
            return {**read_meta(root), "generated": False}
        summary = _generate_locked(root, params, workers)
    meta = read_meta(root)
    if meta is None:  # pragma: no cover
        raise DataError(f"phantom: generation into {root} left no {META_FILE}")
    return {**meta, "generated": True, "seconds": summary["seconds"]}


# ----------------------------------------------------------------------------- grid + CLI
def make_grid(root: str | Path, out: str | Path, per_class: int = 4, split: Optional[str] = None,
              tile: int = 192) -> Path:
    """A PNG grid: ``per_class`` slices per class (rows), mask outline green, box red."""
    root, out = Path(root), Path(out)
    meta = read_meta(root)
    if meta is None:
        raise DataError(f"{root}: no {META_FILE}; generate the phantom first")
    fmt = meta["params"]["fmt"]
    rows = []
    for cls in CLASSES:
        chosen = []
        for p in meta["patients"]:
            if p["class"] != cls or (split and p["split"] != split):
                continue
            k = p["slices"] // 2
            chosen.append((p["split"], f"{p['id']}_s{k:02d}"))
            if len(chosen) == per_class:
                break
        tiles = []
        for sp, stem in chosen:
            img = cv2.imread(str(root / "images" / sp / f"{stem}.{fmt}"), cv2.IMREAD_GRAYSCALE)
            mask = cv2.imread(str(root / "masks" / sp / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
            h, w = img.shape
            fx = tile / w
            rgb = cv2.cvtColor(cv2.resize(img, (tile, tile), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
            mk = cv2.resize(mask, (tile, tile), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours((mk > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, contours, -1, (0, 220, 0), 1)
            lab = (root / "labels" / sp / f"{stem}.txt").read_text().split()
            if lab:
                _, xc, yc, bw, bh = map(float, lab[:5])
                x0, y0 = int(round((xc - bw / 2) * w * fx)), int(round((yc - bh / 2) * h * fx))
                x1, y1 = int(round((xc + bw / 2) * w * fx)) - 1, int(round((yc + bh / 2) * h * fx)) - 1
                cv2.rectangle(rgb, (x0, y0), (x1, y1), (0, 0, 255), 1)
            cv2.putText(rgb, f"{cls} {stem}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 255), 1, cv2.LINE_AA)
            tiles.append(rgb)
        while len(tiles) < per_class:
            tiles.append(np.zeros((tile, tile, 3), np.uint8))
        rows.append(np.hstack(tiles))
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.vstack(rows))
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m src.data.phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="dataset folder to (re)generate")
    ap.add_argument("--n-patients", type=int, default=DEFAULTS["n_patients"])
    ap.add_argument("--size", type=int, default=DEFAULTS["image_size"], help="image size in px")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--slices", type=int, nargs=2, default=list(DEFAULTS["slices"]), metavar=("MIN", "MAX"))
    ap.add_argument("--splits", type=float, nargs=3, default=list(DEFAULTS["splits"]),
                    metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--fmt", choices=("png", "jpg"), default=DEFAULTS["fmt"])
    ap.add_argument("--workers", type=int, default=None, help="processes (default: up to 8)")
    ap.add_argument("--grid", default=None, help="also write a sample grid PNG here")
    ap.add_argument("--per-class", type=int, default=4, help="grid columns per class")
    a = ap.parse_args(argv)
    summary = generate_phantom(a.out, n_patients=a.n_patients, image_size=a.size, slices=a.slices,
                               splits=a.splits, seed=a.seed, fmt=a.fmt, workers=a.workers)
    print(f"phantom: {summary['n_images']} images of {summary['n_patients']} patients in {summary['root']} "
          f"({summary['seconds']:.1f}s)")
    print("images per split:", summary["images_per_split"])
    print("images per class:", summary["images_per_class"])
    if a.grid:
        print("grid:", make_grid(a.out, a.grid, per_class=a.per_class))
    return summary


if __name__ == "__main__":
    main()
