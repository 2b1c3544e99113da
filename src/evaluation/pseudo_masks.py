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
   normalised per image, :class:`src.evaluation.gradcam.GradCAM`). With ``score: tumor``
   the CAM explains the tumour-vs-healthy decision instead, the log-odds of any tumour
   class against ``no_tumor`` (a classifier trained with healthy slices, e.g. on the
   Kaggle 4-class set): what makes a slice a tumour slice is the lesion, while a subtype
   can also be told from where in the head the slice is, which its own CAM then shows;
3. :func:`refine_mask`: optionally only inside the head (``foreground``: the CAM outside
   the largest region at least that bright is zeroed, the rest rescaled), threshold (a
   fraction of the normalised map, or ``otsu``), then
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

from ..data.masks import mask_to_box
from ..data.records import NO_TUMOR, TUMOR, Record, pseudo_counts, save_manifest

log = logging.getLogger(__name__)

LABEL_POLICIES = ("truth", "predicted")
OTHERS = ("keep", "drop")
SCORES = ("label", "tumor")


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
    foreground: float = 0.0              # CAM kept inside the head only: image intensity level (0 = off)
    label: str = "truth"                 # truth (the true label where known, else predicted) | predicted
    score: str = "label"                 # label (the class's logit) | tumor (tumour-vs-healthy log-odds)
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
        for k in ("open", "close", "min_area", "foreground"):
            if not 0.0 <= float(getattr(self, k)) < 1.0:
                raise ValueError(f"pseudo.{k} must be a fraction in [0, 1), got {getattr(self, k)!r}")
        if self.label not in LABEL_POLICIES:
            raise ValueError(f"pseudo.label must be one of {list(LABEL_POLICIES)}, got {self.label!r}")
        if self.score not in SCORES:
            raise ValueError(f"pseudo.score must be one of {list(SCORES)}, got {self.score!r}")
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


def foreground(image: np.ndarray, level: float) -> np.ndarray:
    """The head in a slice: the largest region of pixels at least ``level`` bright (grey
    ``[0, 1]`` intensity), holes filled (dark tumour cores and ventricles are inside)."""
    import cv2
    from scipy import ndimage

    g = np.asarray(image, np.float32)
    g = g.mean(axis=-1) if g.ndim == 3 else g
    m = (g >= float(level)).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 2:
        m = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    return ndimage.binary_fill_holes(m).astype(np.uint8)


def refine_mask(cam: np.ndarray, threshold: Union[float, str] = 0.5, open: float = 0.0, close: float = 0.0,
                fill_holes: bool = True, largest_component: bool = True, min_area: float = 0.0,
                within: Optional[np.ndarray] = None) -> np.ndarray:
    """A CAM in ``[0, 1]`` (``[H, W]``) -> uint8 0/1 mask: (the CAM outside ``within``
    zeroed and the rest rescaled to a maximum of 1), threshold (a number or ``"otsu"``),
    opening, closing (elliptic elements of ``open`` / ``close`` x the shorter side), hole
    filling, the largest 8-connected component; all zeros when what is left covers less
    than ``min_area`` of the image."""
    import cv2
    from scipy import ndimage

    from .gradcam import cam_to_mask

    if within is not None:
        cam = np.asarray(cam, np.float32) * (np.asarray(within) > 0)
        top = float(cam.max())
        cam = cam / top if top > 0 else cam
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


class PseudoMaskPass:
    """One pass of a classifier's CAMs over the records of ``splits`` (the module docstring):
    :meth:`run` writes everything and returns the summary."""

    def __init__(self, loaded, bundle, classes: Sequence[str], data_cfg: dict, size, out, splits: Sequence[str],
                 settings: PseudoSettings, batch_size: int = 16):
        from .gradcam import GradCAM

        self.loaded, self.bundle, self.classes, self.size = loaded, bundle, list(classes), tuple(size)
        self.out, self.splits, self.s = Path(out).resolve(), list(splits), settings  # absolute: manifests move
        self.chosen = [i for i, r in enumerate(bundle.records) if r.split in set(self.splits)]
        if not self.chosen:
            raise ValueError(f"no image of data {bundle.name!r} is in split(s) {self.splits}; splits: "
                             f"{sorted({r.split for r in bundle.records if r.split})}")
        self.records = [bundle.records[i] for i in self.chosen]
        self.want_truth = any(r.known.get("mask") and (r.mask or r.polygons) for r in self.records)
        self.data_cfg = {**data_cfg, "image_size": list(size), "batch_size": int(batch_size), "augment": None,
                         "repeat": False, "shuffle_buffer": 0, "cache": False, "drop_remainder": False, "xla": False}
        self.cam = GradCAM(loaded.network, layer=settings.layer, graph=len(self.records) > 4 * int(batch_size))
        self.head, self.names = self._head()
        self.against = self._against()
        self.threshold = float(loaded.run.threshold if loaded.run.threshold is not None else 0.5)
        self.resize = str(data_cfg.get("resize", "stretch"))
        self.done: list[_Done] = []
        self.dices: list[tuple[str, float]] = []
        self.overlays = 0

    def _head(self) -> tuple:
        """The head explained and its class names (None for a one-output tumour head)."""
        from .gradcam import default_head, output_dict

        heads = output_dict(self.cam.network)
        head = self.s.head or default_head(self.cam.network)
        if head not in heads:
            raise ValueError(f"pseudo.head: the model has no head {head!r}; heads: {sorted(heads)}")
        shape = tuple(heads[head].shape)
        if len(shape) > 2:
            raise ValueError(f"pseudo.head: {head!r} is not a class head (output shape {shape}); "
                             "use class, multilabel, subtype or tumor")
        width = int(shape[-1]) if len(shape) == 2 else 1
        names = head_classes(self.classes, width) if width > 1 else None
        if width > 1 and names is None:
            raise ValueError(f"head {head!r} has {width} outputs, which match neither the classes {self.classes} "
                             "nor their tumour classes")
        return head, names

    def _against(self) -> Optional[int]:
        """``score: tumor``: the head output of ``no_tumor`` the CAM explains against (None
        for ``score: label``, and for a one-output tumour head, whose logit already is the
        tumour-vs-healthy decision)."""
        if self.s.score != "tumor" or self.names is None:
            return None
        if NO_TUMOR not in self.names:
            raise ValueError(f"pseudo.score=tumor explains the tumour-vs-healthy decision, but head {self.head!r} has "
                             f"no {NO_TUMOR} output (its classes: {self.names}); use a classifier trained with "
                             "healthy slices (e.g. on the Kaggle 4-class folders) or pseudo.score=label")
        return self.names.index(NO_TUMOR)

    def _predict(self, xb, outputs=None) -> tuple:
        """``(probs [B, C] or None, predicted class names)``; runs the model when
        ``outputs`` is None."""
        from ..inference import decide

        if outputs is None:
            outputs = {k: np.asarray(v) for k, v in self.cam.network(xb, training=False).items()}
        dec = decide(outputs, self.classes, self.threshold)
        if dec["pred"] is None:
            return None, [None] * len(xb)
        return dec["probs"], [self.classes[k] if 0 <= k < len(self.classes) else None for k in dec["pred"]]

    def _explain(self, batch, xb) -> tuple:
        """Per image of a batch: (class, source), the head output to explain and whether
        to explain it, and the prediction where it was needed."""
        need = self.s.label == "predicted" or any(not (r.known.get("label") and r.label is not None) for r in batch)
        generic = self.names is not None and any(r.label == TUMOR for r in batch)
        probs, pred = self._predict(xb) if need or generic else (None, [None] * len(batch))
        labels = [choose_label(r, p, self.s.label) for r, p in zip(batch, pred)]
        idx, explain = np.zeros(len(batch), np.int32), np.zeros(len(batch), bool)
        for j, (lab, _) in enumerate(labels):
            if lab is None or lab == NO_TUMOR:
                continue
            k = 1 if self.names is None else cam_index(lab, self.names, None if probs is None else probs[j],
                                                       self.classes)
            if k is not None:
                idx[j], explain[j] = k, True
        return labels, idx, explain, probs, pred

    def _mask_file(self, n: int, r: Record, m: np.ndarray) -> tuple:
        """The model-frame mask ``m`` at the original size as ``masks/<index>_<stem>.png``:
        ``(path, box, area)``, or Nones when nothing is left."""
        from ..data.image_header import probe_header
        from ..inference import frame_for, mask_to_original, write_png

        info = probe_header(r.image)
        full = mask_to_original(m.astype(np.float32), frame_for(info.height, info.width, self.size, self.resize), 0.5)
        if not full.any():
            return None, None, None
        path = write_png(self.out / "masks" / f"{self.chosen[n]:06d}_{_safe(Path(r.image).stem)}.png",
                         (full * 255).astype(np.uint8))
        return path, mask_to_box(full), round(float(full.mean()), 5)

    def _image(self, n: int, r: Record, label: tuple, cam, image, pred, prob, truth) -> None:
        """One image: its pseudo mask, file, Dice, overlay, CSV row and manifest record."""
        from .gradcam import save_overlay
        from .metrics import dice_iou

        s, (lab, src) = self.s, label
        row = {"path": r.image, "split": r.split, "label": r.label if r.known.get("label") else None, "class": lab,
               "label_source": src, "predicted": pred, "probability": prob}
        m = path = box = None
        if cam is not None:
            within = foreground(image, s.foreground) if s.foreground > 0 else None
            m = refine_mask(cam, s.threshold, s.open, s.close, s.fill_holes, s.largest_component, s.min_area, within)
            if m.any():
                path, box, row["area"] = self._mask_file(n, r, m)
        row["mask"] = str(path) if path else None
        row["status"] = "empty" if lab == NO_TUMOR else "mask" if path else "no_class" if lab is None else \
            "no_response"
        if truth is not None and truth.any():  # no pseudo mask (tumour-free, no response) misses it: Dice 0
            row["dice"] = round(dice_iou(m if m is not None else np.zeros(truth.shape, np.uint8), truth)[0], 5)
            self.dices.append((r.label if r.known.get("label") else str(lab), row["dice"]))
        info = {"class": lab, "label_source": src, "method": s.method, "score": s.score,
                "layer": self.cam.target(self.head).name if cam is not None else None,
                "checkpoint": str(self.loaded.checkpoint)}
        self.done.append(_Done(_pseudo_record(r, lab, src, path, box, s, info), row))
        if path is not None and self.overlays < s.overlays:
            self.overlays += 1
            title = f"{lab} ({src})" + (f" dice {row['dice']:.2f}" if "dice" in row else "")
            save_overlay(self.out / "overlays" / Path(path).name, image, cam, mask=m, title=title, min_height=256)

    def run(self, progress: bool = True) -> dict:
        from tqdm import tqdm

        from ..data.pipeline import build_dataset

        (self.out / "masks").mkdir(parents=True, exist_ok=True)
        ds = build_dataset(self.records, self.bundle.class_map, self.data_cfg, training=False,
                           heads=["mask"] if self.want_truth else ["class"])
        i = 0
        with tqdm(total=len(self.records), desc="pseudo masks", unit="img", file=sys.stderr,
                  disable=not progress) as bar:
            for x, targets, weights in ds:
                xb = x.numpy()
                batch = self.records[i:i + len(xb)]
                labels, idx, explain, probs, pred = self._explain(batch, xb)
                res = (self.cam(xb, head=self.head, class_index=idx, method=self.s.method, against=self.against)
                       if explain.any() else None)
                if res is not None and probs is None:
                    probs, pred = self._predict(xb, res.outputs)
                for j, r in enumerate(batch):
                    truth = None
                    if self.want_truth and float(weights["mask"][j]) > 0:
                        truth = targets["mask"][j].numpy()[..., 0] > 0
                    self._image(i + j, r, labels[j], res.cams[j] if explain[j] else None, xb[j], pred[j],
                                float(probs[j].max()) if probs is not None else None, truth)
                i += len(xb)
                bar.update(len(xb))
        return _finish(self.bundle, self.chosen, self.done, self.dices, self.out, self.splits, self.s, self.loaded,
                       self.head, self.size)


def write_pseudo_masks(loaded, bundle, classes: Sequence[str], data_cfg: dict, size, out, splits: Sequence[str],
                       settings: PseudoSettings, batch_size: int = 16, progress: bool = True) -> dict:
    """Pseudo masks of every record of ``splits`` (see the module docstring) into ``out``:
    ``masks/*.png``, ``manifest.jsonl``, ``pseudo_masks.csv``, ``overlays/`` and
    ``summary.json``; returns the summary."""
    return PseudoMaskPass(loaded, bundle, classes, data_cfg, size, out, splits, settings, batch_size).run(progress)


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
