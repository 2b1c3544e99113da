"""Drawing the phantom (:mod:`src.data.phantom`): one synthetic patient's geometry and
tumour drawn at random (:func:`_sample_patient`), and each of its slices rendered layer by
layer in occlusion order -- scalp, skull, brain, ventricles, distractors, tumour, then
bias field, blur and Rician noise -- with the exact tumour mask (:func:`render_slice`,
:func:`render_patient`). numpy + OpenCV only; deterministic for a patient's random stream
(:func:`patient_rng`)."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import cv2
import numpy as np


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
    (an entry of :func:`~src.data.phantom.plan_patients`), exactly as
    :func:`~src.data.phantom.generate_phantom` writes them."""
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
