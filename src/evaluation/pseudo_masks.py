"""Segmentation from class labels alone: CAM pseudo masks (``src.explain what=pseudo_masks``).

A classifier that knows *which* tumour a slice shows also knows, roughly, *where*: its
Grad-CAM (or Grad-CAM++) map for the slice's class. :func:`write_pseudo_masks` turns
that map into a mask for every image of the chosen splits and writes a manifest in which
those masks are marked *pseudo* (``Record.pseudo["mask"]``), so any command trains a
segmentation head on them with ``data.manifest=<out>/manifest.jsonl``.

Per image:

1. the class: the true label where it is known (``label: truth``, the default), else the
   classifier's prediction (``label: predicted`` always uses the prediction). Images whose
   class is ``no_tumor`` get no CAM: a known-empty mask (and no box);
2. the CAM of that class (the head's logit; a generic ``tumor`` label explains the most
   probable tumour class), at the model's input size, in ``[0, 1]`` (ReLU'd, min-max
   normalised per image, :class:`src.evaluation.gradcam.GradCAM`);
3. :func:`refine_mask`: threshold (a fraction of the normalised map, or ``otsu``), then
   morphology: opening (removes specks), closing (joins nearby parts), hole filling, the
   largest 8-connected component, and a minimum area below which the image gets *no*
   mask (unknown, weight 0: a map that says nothing is not "no tumour");
4. the mask goes back to the image's original size (the letterbox padding removed) and is
   written as ``masks/<index>_<stem>.png`` (0/255).

The manifest holds every record of the data (every split, in order): records of the
chosen splits get the pseudo mask (``known["mask"]``, ``pseudo["mask"]`` true) and, with
``boxes: true``, the mask's tight box as a pseudo box (their annotated boxes and masks are
replaced: nothing of the truth is left in them); records of the other splits keep their
annotations (``others: keep``) or are left out (``others: drop``). A known-empty mask from
a *true* ``no_tumor`` label is not pseudo (the label says it); from a *predicted* one it is.
Where the data has true masks, the pseudo masks' Dice against them (at the model's input
size; images with a non-empty true mask; an image without a pseudo mask scores 0) is in
the summary: mean, median and per class.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..data.records import NO_TUMOR, TUMOR, Record, pseudo_counts, save_manifest

log = logging.getLogger(__name__)

LABEL_POLICIES = ("truth", "predicted")
OTHERS = ("keep", "drop")


@dataclasses.dataclass
class PseudoSettings:
    """The ``pseudo`` block of ``conf/explain.yaml``."""

    method: str = "gradcam"              # gradcam | gradcam++
    head: Optional[str] = None           # head explained (None: the default class head)
    layer: Optional[str] = None          # feature layer (None: auto)
    threshold: Union[float, str] = 0.5   # fraction of the normalised CAM, or "otsu"
    open: float = 0.0                    # opening element diameter, fraction of the shorter side (0 = off)
    close: float = 0.0                   # closing element diameter, fraction of the shorter side (0 = off)
    fill_holes: bool = True
    largest_component: bool = True
    min_area: float = 0.0                # fraction of the image: smaller masks -> no mask (unknown)
    label: str = "truth"                 # truth (the true label where known, else predicted) | predicted
    boxes: bool = True                   # the mask's box as a pseudo box
    others: str = "keep"                 # records of the other splits: keep | drop
    overlays: int = 8                    # overlay PNGs written (image | CAM with the pseudo-mask outline)

    def __post_init__(self):
        from .gradcam import METHODS

        if self.method not in METHODS:
            raise ValueError(f"pseudo.method must be one of {list(METHODS)}, got {self.method!r}")
        if isinstance(self.threshold, str):
            if self.threshold.lower() != "otsu":
                raise ValueError(f"pseudo.threshold must be a number in [0, 1] or otsu, got {self.threshold!r}")
            self.threshold = "otsu"
        elif not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"pseudo.threshold must be a number in [0, 1] or otsu, got {self.threshold!r}")
        for k in ("open", "close", "min_area"):
            if not 0.0 <= float(getattr(self, k)) < 1.0:
                raise ValueError(f"pseudo.{k} must be a fraction in [0, 1), got {getattr(self, k)!r}")
        if self.label not in LABEL_POLICIES:
            raise ValueError(f"pseudo.label must be one of {list(LABEL_POLICIES)}, got {self.label!r}")
        if self.others not in OTHERS:
            raise ValueError(f"pseudo.others must be one of {list(OTHERS)}, got {self.others!r}")

    @classmethod
    def from_cfg(cls, cfg) -> "PseudoSettings":
        d = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown pseudo setting(s) {bad}; known: {sorted(names)}")
        thr = d.get("threshold", 0.5)
        if thr is not None and not isinstance(thr, str):
            d["threshold"] = float(thr)
        return cls(**d)


# ---------------------------------------------------------------------------------------
# CAM -> mask
# ---------------------------------------------------------------------------------------
def _disk(frac: float, shape) -> Optional[np.ndarray]:
    """An elliptic structuring element ``frac`` x the shorter side across, of odd size (an
    even one shifts the mask by a pixel in OpenCV's opening / closing); None when off."""
    import cv2

    d = int(round(float(frac) * min(shape)))
    if frac <= 0 or d < 2:
        return None
    d += 1 - d % 2
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def refine_mask(cam: np.ndarray, threshold: Union[float, str] = 0.5, open: float = 0.0, close: float = 0.0,
                fill_holes: bool = True, largest_component: bool = True, min_area: float = 0.0) -> np.ndarray:
    """A CAM in ``[0, 1]`` (``[H, W]``) -> uint8 0/1 mask: threshold (a number or
    ``"otsu"``), opening, closing (elliptic elements of ``open`` / ``close`` x the shorter
    side), hole filling, the largest 8-connected component; all zeros when what is left
    covers less than ``min_area`` of the image."""
    import cv2
    from scipy import ndimage

    from .gradcam import cam_to_mask

    m = cam_to_mask(cam, threshold, largest_component=False)
    for frac, op in ((open, cv2.MORPH_OPEN), (close, cv2.MORPH_CLOSE)):
        k = _disk(frac, m.shape)
        if k is not None and m.any():
            m = cv2.morphologyEx(m, op, k)
    if fill_holes and m.any():
        m = ndimage.binary_fill_holes(m).astype(np.uint8)
    if largest_component and m.any():
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n > 2:
            m = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    if m.sum() < float(min_area) * m.size or not m.any():
        return np.zeros(m.shape, np.uint8)
    return m


def mask_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Normalised xyxy tight box of a 0/1 mask (None when empty)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], np.float32)


# ---------------------------------------------------------------------------------------
# which class, which CAM index
# ---------------------------------------------------------------------------------------
def choose_label(record: Record, predicted: Optional[str], policy: str = "truth") -> tuple:
    """``(class, source)``: the true label (``"true"``) when ``policy`` is ``truth`` and it is
    known, else the prediction (``"predicted"``); ``(None, None)`` when neither exists."""
    if policy == "truth" and record.known.get("label") and record.label is not None:
        return record.label, "true"
    if predicted is None:
        return None, None
    return predicted, "predicted"


def head_classes(classes: Sequence[str], width: int) -> Optional[list]:
    """The class names of a head with ``width`` outputs: the classes themselves, or the
    tumour classes (a ``subtype`` head: every class but ``no_tumor``)."""
    classes = list(classes)
    if width == len(classes):
        return classes
    tumour = [c for c in classes if c != NO_TUMOR]
    if width == len(tumour):
        return tumour
    return None


def cam_index(label: str, names: Sequence[str], probs: Optional[np.ndarray], classes: Sequence[str]) -> Optional[int]:
    """The head output to explain for ``label``: its own position in ``names``; for the
    generic ``tumor`` the most probable tumour class (``probs`` over ``classes``)."""
    names = list(names)
    if label in names:
        return names.index(label)
    if label == TUMOR and probs is not None:
        tumour = [i for i, c in enumerate(classes) if c != NO_TUMOR and c in names]
        if tumour:
            return names.index(classes[max(tumour, key=lambda i: probs[i])])
    return None


# ---------------------------------------------------------------------------------------
# the pass over the data
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Done:
    record: Record          # the manifest record
    row: dict               # the CSV row


def _safe(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def _pseudo_record(r: Record, label: Optional[str], source: Optional[str], mask_path: Optional[Path],
                   box: Optional[np.ndarray], s: PseudoSettings, info: dict) -> Record:
    """``r`` with its mask (and boxes) replaced by the pseudo ones (see the module docstring)."""
    n = copy.deepcopy(r)
    n.polygons = None
    n.mask = None
    n.boxes = np.zeros((0, 4), np.float32)
    n.box_classes = ()
    made_by_model = source == "predicted"
    if label == NO_TUMOR:
        n.known.update(mask=True, boxes=True)
        n.pseudo.update(mask=made_by_model, boxes=made_by_model)
    elif mask_path is not None:
        n.mask = str(mask_path)
        n.known["mask"] = True
        n.pseudo["mask"] = True
        n.known["boxes"] = bool(s.boxes)
        n.pseudo["boxes"] = bool(s.boxes)
        if s.boxes and box is not None:
            n.boxes = box.reshape(1, 4)
            n.box_classes = (label,)
    else:  # no class, or a CAM that localises nothing: unknown, never "no tumour"
        n.known.update(mask=False, boxes=False)
        n.pseudo.update(mask=False, boxes=False)
    n.meta = {**(r.meta or {}), "pseudo_mask": info}
    return n


def _predictions(network, x, outputs, classes, threshold):
    """``(probs [B, C] or None, predicted names [B] or Nones)`` from ``outputs`` (computed
    when None)."""
    from ..inference import decide

    if outputs is None:
        outputs = {k: np.asarray(v) for k, v in network(x, training=False).items()}
    dec = decide(outputs, classes, threshold)
    if dec["pred"] is None:
        return None, [None] * len(x)
    names = [classes[k] if 0 <= k < len(classes) else None for k in dec["pred"]]
    return dec["probs"], names


def write_pseudo_masks(loaded, bundle, classes: Sequence[str], data_cfg: dict, size, out, splits: Sequence[str],
                       settings: PseudoSettings, batch_size: int = 16, progress: bool = True) -> dict:
    """Pseudo masks of every record of ``splits`` (see the module docstring) into ``out``:
    ``masks/*.png``, ``manifest.jsonl``, ``pseudo_masks.csv``, ``overlays/`` and
    ``summary.json``; returns the summary."""
    import tensorflow as tf
    from tqdm import tqdm

    from ..data.pipeline import build_dataset, probe_header
    from ..inference import frame_for, mask_to_original, write_png
    from .gradcam import GradCAM, default_head, output_dict, save_overlay
    from .metrics import dice_iou

    s = settings
    out = Path(out)
    mdir = out / "masks"
    mdir.mkdir(parents=True, exist_ok=True)
    chosen = [i for i, r in enumerate(bundle.records) if r.split in set(splits)]
    if not chosen:
        raise ValueError(f"no image of data {bundle.name!r} is in split(s) {list(splits)}; splits: "
                         f"{sorted({r.split for r in bundle.records if r.split})}")
    records = [bundle.records[i] for i in chosen]
    want_truth = any(r.known.get("mask") and (r.mask or r.polygons) for r in records)
    cfg = {**data_cfg, "image_size": list(size), "batch_size": int(batch_size), "augment": None, "repeat": False,
           "shuffle_buffer": 0, "cache": False, "drop_remainder": False, "xla": False}
    ds = build_dataset(records, bundle.class_map, cfg, training=False, heads=["mask"] if want_truth else ["class"])
    cam = GradCAM(loaded.network, layer=s.layer, graph=len(records) > 4 * int(batch_size))
    heads = output_dict(cam.network)
    head_name = s.head or default_head(cam.network)
    if head_name not in heads:
        raise ValueError(f"pseudo.head: the model has no head {head_name!r}; heads: {sorted(heads)}")
    shape = tuple(heads[head_name].shape)
    width = int(shape[-1]) if len(shape) == 2 else 1
    if len(shape) > 2:
        raise ValueError(f"pseudo.head: {head_name!r} is not a class head (output shape {shape}); "
                         "use class, multilabel, subtype or tumor")
    names = head_classes(classes, width) if width > 1 else None
    if width > 1 and names is None:
        raise ValueError(f"head {head_name!r} has {width} outputs, which match neither the classes {list(classes)} "
                         "nor their tumour classes")
    meta_thr = float(loaded.run.threshold if loaded.run.threshold is not None else 0.5)
    resize = str(data_cfg.get("resize", "stretch"))
    done: list[_Done] = []
    dices: list[tuple[str, float]] = []
    ovdir = out / "overlays"
    bar = tqdm(total=len(records), desc="pseudo masks", unit="img", file=sys.stderr, disable=not progress)
    i = n_overlays = 0
    try:
        for x, targets, weights in ds:
            xb = x.numpy()
            b = len(xb)
            batch = records[i:i + b]
            need_pred = s.label == "predicted" or any(not (r.known.get("label") and r.label is not None)
                                                      for r in batch)
            probs, pred = _predictions(cam.network, tf.convert_to_tensor(xb), None, classes, meta_thr) \
                if need_pred else (None, [None] * b)
            chosen_labels = [choose_label(r, p, s.label) for r, p in zip(batch, pred)]
            idx = np.zeros(b, np.int32)
            explain = np.zeros(b, bool)
            for j, (lab, _) in enumerate(chosen_labels):
                if lab is None or lab == NO_TUMOR:
                    continue
                k = 1 if names is None else cam_index(lab, names, None if probs is None else probs[j], classes)
                if k is None and names is not None:
                    if probs is None:  # a generic label needs the prediction
                        probs, pred = _predictions(cam.network, tf.convert_to_tensor(xb), None, classes, meta_thr)
                    k = cam_index(lab, names, probs[j], classes)
                if k is not None:
                    idx[j], explain[j] = k, True
            res = cam(xb, head=head_name, class_index=idx, method=s.method) if explain.any() else None
            if res is not None and probs is None:
                probs, pred = _predictions(cam.network, xb, res.outputs, classes, meta_thr)
            for j, r in enumerate(batch):
                n_done = i + j
                lab, src = chosen_labels[j]
                row = {"path": r.image, "split": r.split, "label": r.label if r.known.get("label") else None,
                       "class": lab, "label_source": src, "predicted": pred[j],
                       "probability": float(probs[j].max()) if probs is not None else None}
                mask_path, box, m = None, None, None
                if explain[j]:
                    m = refine_mask(res.cams[j], s.threshold, s.open, s.close, s.fill_holes, s.largest_component,
                                    s.min_area)
                    if m.any():
                        info = probe_header(r.image)
                        frame = frame_for(info.height, info.width, tuple(size), resize)
                        full = mask_to_original(m.astype(np.float32), frame, 0.5)
                        if full.any():
                            mask_path = write_png(mdir / f"{chosen[n_done]:06d}_{_safe(Path(r.image).stem)}.png",
                                                  (full * 255).astype(np.uint8))
                            box = mask_box(full)
                            row["area"] = round(float(full.mean()), 5)
                row["mask"] = str(mask_path) if mask_path else None
                row["status"] = ("empty" if lab == NO_TUMOR else "mask" if mask_path else
                                 "no_class" if lab is None else "no_response")
                if want_truth and float(weights["mask"][j]) > 0:
                    truth = targets["mask"][j].numpy()[..., 0] > 0
                    if truth.any():  # no pseudo mask (tumour-free, or no response) misses it: Dice 0
                        pm = m if m is not None else np.zeros(truth.shape, np.uint8)
                        row["dice"] = round(dice_iou(pm, truth)[0], 5)
                        dices.append((r.label if r.known.get("label") else str(lab), row["dice"]))
                info_meta = {"class": lab, "label_source": src, "method": s.method, "layer": res.layer if res else None,
                             "checkpoint": str(loaded.checkpoint)}
                done.append(_Done(_pseudo_record(r, lab, src, mask_path, box, s, info_meta), row))
                if mask_path is not None and n_overlays < s.overlays:
                    n_overlays += 1
                    title = f"{lab} ({src})" + (f" dice {row['dice']:.2f}" if "dice" in row else "")
                    save_overlay(ovdir / f"{chosen[n_done]:06d}_{_safe(Path(r.image).stem)}.png", xb[j],
                                 res.cams[j], mask=m, title=title, min_height=256)
            i += b
            bar.update(b)
    finally:
        bar.close()
    return _finish(bundle, chosen, done, dices, out, splits, s, loaded, head_name, size)


def _dice_summary(dices: list) -> dict:
    if not dices:
        return {"images": 0, "mean": None, "median": None, "per_class": {}}
    vals = np.array([d for _, d in dices], np.float64)
    per: dict = {}
    for c, d in dices:
        per.setdefault(c, []).append(d)
    return {"images": len(vals), "mean": round(float(vals.mean()), 4), "median": round(float(np.median(vals)), 4),
            "per_class": {c: {"images": len(v), "mean": round(float(np.mean(v)), 4)} for c, v in sorted(per.items())}}


def _finish(bundle, chosen, done, dices, out, splits, s, loaded, head_name, size) -> dict:
    """Manifest, CSV and summary of a finished pass."""
    by_index = dict(zip(chosen, done))
    manifest_records = []
    for i, r in enumerate(bundle.records):
        if i in by_index:
            manifest_records.append(by_index[i].record)
        elif s.others == "keep":
            manifest_records.append(r)
    manifest = save_manifest(manifest_records, out / "manifest.jsonl")
    rows = [d.row for d in done]
    cols = ["path", "split", "label", "class", "label_source", "predicted", "probability", "status", "area", "dice",
            "mask"]
    with open(out / "pseudo_masks.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    status: dict = {}
    for row in rows:
        status[row["status"]] = status.get(row["status"], 0) + 1
    summary = {"what": "pseudo_masks", "checkpoint": str(loaded.checkpoint), "data": bundle.name,
               "splits": list(splits), "images": len(rows), "input_size": list(size), "head": head_name,
               "settings": dataclasses.asdict(s), "status": dict(sorted(status.items())),
               "pseudo": pseudo_counts(manifest_records), "dice": _dice_summary(dices),
               "manifest": str(manifest), "masks": str(out / "masks"), "csv": str(out / "pseudo_masks.csv"),
               "out": str(out), "use": f"data.manifest={manifest}"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
