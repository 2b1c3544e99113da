"""``phantom``: the embedded default dataset, MRI-like axial T1 post-contrast slices.

A deterministic generator (numpy + OpenCV only) so that training and the tests run on a
fresh machine with no download. Each synthetic *patient* has one head geometry and one
class (glioma, meningioma, pituitary or no_tumor) and 2-6 neighbouring slices; every
slice comes with the exact binary tumour mask and its tight box. This module plans the
patients, writes the dataset (in a process pool, under a lock) and has the CLI; the
drawing of a slice is in :mod:`src.data.phantom_render`.

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

from .phantom_render import render_patient
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
