"""`python -m src.evaluate checkpoint=PATH [data=...] [data.root=...] [split=test] [out=DIR] [threshold=0.5]`

Evaluates a trained model on one split and writes a report folder:

* ``metrics.json``: per head (see :mod:`src.evaluation.metrics` and
  :mod:`src.evaluation.detection` for every definition; each head's ``implementations``
  block names the library and convention behind each number):
  ``class`` (or the 4 classes composed from ``tumor`` + ``subtype``), ``multilabel``,
  ``tumor``, ``subtype`` (scikit-learn): accuracy, balanced accuracy, per-class
  precision / recall / F1 / support (a class absent from the split is ``null``),
  macro / weighted averages over the classes present, micro average, confusion matrix,
  ROC-AUC one-vs-rest, Brier score, calibration (ECE + reliability bins), the class with
  the lowest recall; ``boxes``: COCO mAP@0.5, mAP@0.5:0.95, mAP@0.75 (pycocotools), our
  slot IoU statistics and VOC AP@0.5; ``mask``: Dice / IoU (per image and mean), HD95 in
  pixels, COCO mask mAP (pycocotools, segm); ``recon``: PSNR / SSIM (tf.image).
* PNG plots (confusion matrices, ROC curves, reliability diagrams, IoU / Dice
  histograms, a gallery of the worst and best cases), ``predictions.csv`` (one row per
  image) and ``report.html`` (one self-contained page with all of it).

``checkpoint`` is a ``.keras`` file or a training run folder (then the last phase's
``phase<N>/checkpoints/best.keras``). For a run folder (or a checkpoint inside one) the
run's saved ``config.yaml`` gives the data settings unless ``data=...`` is passed;
``data.<key>=...`` overrides still apply on top of it. The model's input size wins over
``data.image_size``. Samples whose target is unknown (sample weight 0) are left out of
that head's metrics. The pipeline runs with ``training=False`` (no augmentation, no
shuffling). The folder goes to ``<run>/eval_<split>`` (or
``<output_root>/evaluate/<timestamp>`` for a bare checkpoint) unless ``out=DIR``.

``tta=flip`` (test-time augmentation, :func:`src.inference.predict_with_tta`) scores the
mean of the model's outputs on each image and on its horizontal mirror (masks and
reconstructions flipped back, mirrored boxes un-flipped); ``metrics.json`` (``tta``), the
report and every row of ``predictions.csv`` say which was used.

Boxes from masks: a model with a ``mask`` head and no ``boxes`` head gets box metrics too
when the data has boxes (``boxes_from_mask=largest`` by default, ``components``, or
``false``): the tight box of the largest connected component of each thresholded predicted
mask (``components``: the union box of all components of at least ``boxes_min_area``
pixels) fills every class slot, an empty mask gives a zero box (IoU 0), the class
probabilities are the detection scores, and the ``boxes`` head of ``metrics.json`` is
scored as a detector's with ``"source": "mask"`` ("Boxes (from mask)" in the report).

MLflow: the report folder is logged (artifacts under ``eval_<split>/``, headline numbers
as metrics ``eval_<split>/...``) to the training run's MLflow record, found by the
``run_dir`` tag the training engine sets; when there is none, a new run tagged with the
same ``run_dir`` is created. The tracking store is the training run's when it tracked,
else this command's ``tracking`` config; ``tracking=none`` skips it with a message.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from . import config as _config  # noqa: F401  (registers the ${project_root:} resolver)
from .data.records import NO_TUMOR

log = logging.getLogger("src.evaluate")

CLASS_HEADS = ("class", "multilabel", "tumor", "subtype")
RECON_HEADS = ("recon", "reconstruction")
_SUPPORTED = set(CLASS_HEADS) | {"boxes", "mask"} | set(RECON_HEADS)
TTA_NOTE = {"none": "none", "flip": "flip (mean of the image and its horizontal mirror, spatial outputs flipped back)"}


class EvaluationError(Exception):
    """A problem the user can fix (bad checkpoint, empty split, model/data mismatch)."""


# ---------------------------------------------------------------------------------------
# checkpoint and configuration
# ---------------------------------------------------------------------------------------
def _phase_key(p: Path):
    m = re.fullmatch(r"phase(\d+)", p.name)
    return (0, int(m.group(1))) if m else (1, p.name)


def find_run_dir(path: Path) -> Optional[Path]:
    """The training run folder holding ``path`` (the nearest parent with ``run_info.json``)."""
    path = Path(path).resolve()
    for p in [path, *path.parents][:5]:
        if (p / "run_info.json").is_file():
            return p
    return None


def resolve_checkpoint(path) -> tuple[Path, Optional[Path]]:
    """``(checkpoint file, run folder or None)`` for a ``.keras`` file, a run folder or a
    phase folder; a run folder gives its last phase's ``best.keras`` (``last.keras`` when
    no best was written)."""
    if path in (None, "", "???"):
        raise EvaluationError("checkpoint=PATH is required: a .keras file or a training run folder")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise EvaluationError(f"checkpoint {p} does not exist (pass a .keras file or a training run folder)")
    if p.is_file():
        if p.suffix != ".keras":
            raise EvaluationError(f"checkpoint {p} is not a .keras file")
        return p.resolve(), find_run_dir(p)
    for name in ("best.keras", "last.keras"):
        for cand in (p / "checkpoints" / name, p / name):
            if cand.is_file():
                return cand.resolve(), find_run_dir(p)
    phases = sorted((d for d in p.glob("phase*") if d.is_dir()), key=_phase_key)
    for d in reversed(phases):
        for name in ("best.keras", "last.keras"):
            if (d / "checkpoints" / name).is_file():
                return (d / "checkpoints" / name).resolve(), find_run_dir(d)
    raise EvaluationError(f"no checkpoint in {p}: expected phase<N>/checkpoints/best.keras (a training run folder) "
                          "or a .keras file")


def _overrides(args: Sequence[str], prefix: str) -> list[str]:
    """``prefix.key=value`` overrides from the command line, without the prefix."""
    out = []
    for a in args:
        a = a.lstrip("+")
        if a.startswith(prefix + "."):
            out.append(a[len(prefix) + 1:])
    return out


def _group_overridden(args: Sequence[str], group: str) -> bool:
    return any(a.lstrip("+").startswith(group + "=") for a in args)


def evaluation_settings(cfg, args: Sequence[str], run_dir: Optional[Path]) -> dict:
    """Data config, cache dir, tracking config and model config to use, and where they came from."""
    from omegaconf import OmegaConf

    run_cfg = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        run_cfg = OmegaConf.load(run_dir / "config.yaml")
    to = lambda c: OmegaConf.to_container(c, resolve=True)  # noqa: E731
    if run_cfg is not None and "data" in run_cfg and not _group_overridden(args, "data"):
        data = OmegaConf.merge(run_cfg.data, OmegaConf.from_dotlist(_overrides(args, "data")))
        data_src = str(run_dir / "config.yaml")
        if _overrides(args, "data"):
            data_src += " + command-line data.* overrides"
        paths = run_cfg.get("paths") if not any(a.lstrip("+").startswith("paths") for a in args) else None
        cache_dir = (paths or {}).get("cache_dir") or cfg.paths.cache_dir
    else:
        data, data_src, cache_dir = cfg.data, "command line / defaults", cfg.paths.cache_dir
    tracking = cfg.tracking
    tracking_src = "command line / defaults"
    explicit = _group_overridden(args, "tracking") or bool(_overrides(args, "tracking"))
    if run_cfg is not None and "tracking" in run_cfg and not explicit and run_cfg.tracking.get("enabled"):
        tracking, tracking_src = run_cfg.tracking, f"{run_dir / 'config.yaml'}"
    model = to(run_cfg.model) if run_cfg is not None and "model" in run_cfg else {}
    return {"data": to(data), "data_source": data_src, "cache_dir": str(cache_dir), "tracking": to(tracking),
            "tracking_source": tracking_src, "model": model}


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
def inference_network(model):
    """The functional network without auxiliary heads, outputs keyed by head name."""
    if hasattr(model, "inference_model"):
        return model.inference_model()
    return model


def output_shapes(network) -> dict:
    out = network.output
    if isinstance(out, Mapping):
        return {k: tuple(v.shape) for k, v in out.items()}
    names = list(getattr(network, "output_names", []) or [])
    outs = out if isinstance(out, (list, tuple)) else [out]
    if len(names) != len(outs):
        raise EvaluationError("the model's outputs are not named by head; expected a dict output "
                              "{class, boxes, mask, tumor, subtype, recon, ...}")
    return {n: tuple(o.shape) for n, o in zip(names, outs)}


def check_compatible(shapes: Mapping[str, tuple], class_map, trained_classes: Optional[Sequence[str]] = None) -> list:
    """Raise :class:`EvaluationError` when the model's heads do not fit the data's classes;
    returns the evaluated heads."""
    classes = list(class_map.classes)
    if trained_classes is not None and list(trained_classes) != classes:
        raise EvaluationError(f"model/data class mismatch: the model was trained on classes {list(trained_classes)} "
                              f"but the data gives {classes}; pass data.classes={list(trained_classes)} "
                              "(or the data the model was trained on)")
    C, S = len(classes), len(class_map.tumor_classes)
    expected = {"class": C, "multilabel": C, "subtype": S}
    for head, n in expected.items():
        if head in shapes and shapes[head][-1] != n:
            what = (f"{S} tumour classes {list(class_map.tumor_classes)}" if head == "subtype"
                    else f"{C} classes {classes}")
            raise EvaluationError(f"model/data class mismatch: head {head!r} predicts {shapes[head][-1]} values but "
                                  f"the data has {what}; pass data.classes=[...] matching the model")
    if "boxes" in shapes and shapes["boxes"][1] != C:
        raise EvaluationError(f"model/data class mismatch: the box head has {shapes['boxes'][1]} class slots but the "
                              f"data has {C} classes {classes}")
    heads = [h for h in shapes if h in _SUPPORTED]
    if not heads:
        raise EvaluationError(f"the model outputs {sorted(shapes)}: none of them is an evaluated head "
                              f"({sorted(_SUPPORTED)})")
    return heads


def dataset_targets(heads: Sequence[str], class_map) -> list:
    """Pipeline targets an evaluation of ``heads`` needs (``class`` for a composed
    tumour + subtype model, ``boxes_all`` for mAP)."""
    t = [h for h in heads if h in ("class", "multilabel", "tumor", "subtype", "boxes", "mask")]
    composed = "tumor" in heads and "subtype" in heads and NO_TUMOR in class_map.classes
    if (composed or "multilabel" in heads) and "class" not in t:
        t.append("class")
    if "boxes" in heads:
        t.append("boxes_all")
    return t


# ---------------------------------------------------------------------------------------
# collecting predictions
# ---------------------------------------------------------------------------------------
def _to_uint8_image(x: np.ndarray, unit: bool) -> np.ndarray:
    """Display copy of one image: ``[0, 1]`` -> uint8, else min-max scaled."""
    x = np.asarray(x, np.float32)
    if not unit:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    import cv2

    if img.shape[:2] == tuple(size):
        return img
    out = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    return out.reshape(*size, *img.shape[2:]) if img.ndim == 3 and out.ndim == 2 else out


class Collector:
    """Accumulates one split's predictions, targets and weights batch by batch.

    Keeps per image: class-type probabilities, boxes, targets and weights; for masks and
    reconstructions only per-image scores (computed per batch) and small display copies
    (``thumb`` px at most) for the gallery, so memory stays small on large splits.

    Args:
        heads: the model's evaluated heads.
        mask_threshold: probability above which a mask pixel is foreground.
        data_range: value range of ``x`` for PSNR/SSIM (None = per batch max - min).
        thumb: longest side of the gallery copies.
        boxes_from_mask: ``largest`` | ``components`` | None. When the outputs have a
            ``mask`` but no ``boxes`` and the targets have ``boxes``, the predicted boxes
            are read off the mask (:func:`src.inference.slot_boxes_from_masks`: every class
            slot holds the mask's box; an empty mask gives a zero box) and
            ``pred["boxes_from_mask"]`` counts the mask's components per image (0 = no box).
        boxes_min_area: components with fewer pixels (of the model's mask) are ignored.
    """

    def __init__(self, heads: Sequence[str], mask_threshold: float = 0.5, data_range: Optional[float] = 1.0,
                 thumb: int = 128, boxes_from_mask: Optional[str] = None, boxes_min_area: int = 0):
        from .inference import resolve_box_mode

        self.heads = list(heads)
        self.boxes_from_mask = resolve_box_mode(boxes_from_mask)
        self.boxes_min_area = int(boxes_min_area or 0)
        self.mask_threshold = float(mask_threshold)
        self.data_range = data_range
        self.thumb = int(thumb)
        self.pred: dict[str, list] = {}
        self.y: dict[str, list] = {}
        self.w: dict[str, list] = {}
        self.scores: dict[str, list] = {}
        self.thumbs: dict[str, list] = {"image": []}
        self.pooled = {"inter": 0.0, "pred": 0.0, "true": 0.0}
        self.rles: dict[str, list] = {}
        self.image_shape: Optional[tuple] = None
        self.n = 0

    def _put(self, store: dict, key: str, value) -> None:
        store.setdefault(key, []).append(np.asarray(value))

    def add(self, x, y: Mapping, w: Mapping, out: Mapping) -> None:
        x = np.asarray(x, np.float32)
        B, H, W = x.shape[:3]
        self.image_shape = (H, W)
        unit = self.data_range == 1.0 and x.min() >= -1e-3 and x.max() <= 1 + 1e-3
        ts = (H, W) if max(H, W) <= self.thumb else (max(1, round(H * self.thumb / max(H, W))),
                                                     max(1, round(W * self.thumb / max(H, W))))
        self.thumbs["image"].append(np.stack([_resize(_to_uint8_image(x[i], unit), ts) for i in range(B)]))
        out = {k: np.asarray(v, np.float32) for k, v in out.items()}
        for k, v in y.items():
            self._put(self.y, k, v)
        for k, v in w.items():
            self._put(self.w, k, v)
        for h in ("class", "multilabel", "subtype"):
            if h in out and h in self.heads:
                self._put(self.pred, h, out[h].reshape(B, -1))
        if "tumor" in out and "tumor" in self.heads:
            self._put(self.pred, "tumor", out["tumor"].reshape(B))
        if "boxes" in out and "boxes" in self.heads:
            self._put(self.pred, "boxes", out["boxes"].reshape(B, -1, 4))
        elif self.boxes_from_mask and "mask" in out and "boxes" in y:
            self._add_mask_boxes(out["mask"], np.asarray(y["boxes"]).shape[1])
        if "mask" in out and "mask" in self.heads and "mask" in y:
            self._add_mask(out["mask"], np.asarray(y["mask"]), np.asarray(w.get("mask", np.ones(B))), ts)
        for h in RECON_HEADS:
            if h in out and h in self.heads:
                self._add_recon(h, out[h], x, ts, unit)
        self.n += B

    def _add_mask(self, pm: np.ndarray, tm: np.ndarray, wm: np.ndarray, ts) -> None:
        from .evaluation.detection import encode_masks
        from .evaluation.metrics import mask_scores

        B = len(tm)
        H, W = tm.shape[1:3]
        pm = pm.reshape(B, *pm.shape[1:3])
        if pm.shape[1:] != (H, W):
            pm = np.stack([_resize(pm[i], (H, W)) for i in range(B)]) if B else pm
        pb = pm >= self.mask_threshold
        tb = tm.reshape(B, H, W) > 0.5
        known = wm.reshape(B) > 0
        sc = {k: np.full(B, np.nan) for k in ("dice", "iou", "hd95", "pred_area", "true_area")}
        if known.any():
            s = mask_scores(pb[known], tb[known])
            for k in sc:
                sc[k][known] = s[k]
            self.pooled["inter"] += float(np.logical_and(pb[known], tb[known]).sum())
            self.pooled["pred"] += float(pb[known].sum())
            self.pooled["true"] += float(tb[known].sum())
        enc = {"pred": iter(encode_masks(pb[known])), "true": iter(encode_masks(tb[known]))}
        for key, it in enc.items():  # COCO RLEs for the mask mAP, None where the mask is unknown
            self.rles.setdefault(key, []).extend(next(it) if kn else None for kn in known)
        for k, v in sc.items():
            self._put(self.scores, f"mask_{k}", v)
        self._put(self.thumbs, "mask_pred", np.stack([_resize((pm[i] * 255).astype(np.uint8), ts) for i in range(B)]))
        self._put(self.thumbs, "mask_true", np.stack([_resize(tb[i].astype(np.uint8), ts, nearest=True)
                                                      for i in range(B)]))

    def _add_mask_boxes(self, pm: np.ndarray, num_slots: int) -> None:
        from .inference import slot_boxes_from_masks

        boxes, counts = slot_boxes_from_masks(pm.reshape(len(pm), *pm.shape[1:3]), num_slots, self.mask_threshold,
                                              self.boxes_from_mask, self.boxes_min_area)
        self._put(self.pred, "boxes", boxes)
        self._put(self.pred, "boxes_from_mask", counts)

    def _add_recon(self, head: str, r: np.ndarray, x: np.ndarray, ts, unit: bool) -> None:
        from .evaluation.metrics import psnr, ssim

        r = r.reshape(x.shape) if r.size == x.size else np.stack([_resize(ri, x.shape[1:3]) for ri in r])
        rng = self.data_range if self.data_range else float(x.max() - x.min()) or 1.0
        self._put(self.scores, f"{head}_psnr", psnr(r, x, rng))
        self._put(self.scores, f"{head}_ssim", ssim(r, x, rng))
        self._put(self.thumbs, head, np.stack([_resize(_to_uint8_image(ri, unit), ts) for ri in r]))

    def arrays(self) -> dict:
        """Everything concatenated: ``{"pred", "y", "w", "scores", "thumbs", "pooled", "rles", "n",
        "image_shape"}``."""
        cat = lambda d: {k: np.concatenate(v) for k, v in d.items() if v}  # noqa: E731
        return {"pred": cat(self.pred), "y": cat(self.y), "w": cat(self.w), "scores": cat(self.scores),
                "thumbs": cat(self.thumbs), "pooled": dict(self.pooled), "rles": dict(self.rles), "n": self.n,
                "image_shape": self.image_shape}


# ---------------------------------------------------------------------------------------
# metrics from collected arrays
# ---------------------------------------------------------------------------------------
def _known(col: Mapping, key: str) -> np.ndarray:
    w = col["w"].get(key)
    if w is None:
        return np.zeros(col["n"], bool)
    w = np.asarray(w)
    return (w.reshape(len(w), -1) > 0).any(axis=1)


def class_scores(col: Mapping, class_map, threshold: float) -> tuple[Optional[np.ndarray], Optional[np.ndarray], list]:
    """``(probs [N, C], pred [N], source heads)`` of the 4-class reading of the model:
    its ``class`` head, or ``tumor`` + ``subtype`` composed (the threshold rule decides
    the prediction whenever both exist), or the ``multilabel`` head (argmax)."""
    from .evaluation.metrics import compose_tumor_subtype

    pred = col["pred"]
    classes, tumor_classes = list(class_map.classes), list(class_map.tumor_classes)
    composable = "tumor" in pred and "subtype" in pred and NO_TUMOR in classes
    if composable:
        probs, hard = compose_tumor_subtype(pred["tumor"], pred["subtype"], classes, tumor_classes, threshold)
        if "class" in pred:
            probs = pred["class"]
        return probs, hard, ["tumor", "subtype"]
    if "class" in pred:
        return pred["class"], pred["class"].argmax(axis=1), ["class"]
    if "multilabel" in pred:
        return pred["multilabel"], pred["multilabel"].argmax(axis=1), ["multilabel"]
    return None, None, []


def compute_metrics(col: Mapping, class_map, threshold: float = 0.5, n_bins: int = 15,
                    boxes_known: Optional[np.ndarray] = None) -> dict:
    """Per-head metrics (``{"heads": {...}, "notes": [...]}``) from :meth:`Collector.arrays`.

    ``boxes_known [N]``: images whose boxes are known (the records' flags); default: every
    image with a known box slot.
    """
    from .evaluation import detection as D
    from .evaluation import metrics as M

    pred, y = col["pred"], col["y"]
    classes, tumor_classes = list(class_map.classes), list(class_map.tumor_classes)
    heads: dict = {}
    notes: list = []

    def skipped(head, why):
        notes.append(f"head {head!r}: {why}; not evaluated")

    probs, hard, source = class_scores(col, class_map, threshold)
    if probs is not None and source != ["multilabel"]:
        sel = _known(col, "class")
        if sel.any():
            rep = M.classification_report(y["class"][sel], probs[sel], classes, y_pred=hard[sel], n_bins=n_bins)
            if source == ["tumor", "subtype"]:
                rep["composed_from"] = source
                rep["threshold"] = float(threshold)
            heads["class"] = rep
        else:
            skipped("class", "no image of this split has a known class label")
    if "multilabel" in pred:
        sel = _known(col, "multilabel")
        if sel.any():
            heads["multilabel"] = M.multilabel_report(y["multilabel"][sel], pred["multilabel"][sel], classes,
                                                      threshold=threshold, n_bins=n_bins)
        else:
            skipped("multilabel", "no known labels")
    if "tumor" in pred:
        sel = _known(col, "tumor")
        if sel.any():
            heads["tumor"] = M.binary_report(y["tumor"][sel], pred["tumor"][sel], threshold,
                                             names=(NO_TUMOR, "tumor"), n_bins=n_bins)
        else:
            skipped("tumor", "no known tumour / healthy labels")
    if "subtype" in pred:
        sel = _known(col, "subtype")
        if sel.any():
            heads["subtype"] = M.classification_report(y["subtype"][sel], pred["subtype"][sel], tumor_classes,
                                                       n_bins=n_bins)
            heads["subtype"]["note"] = "tumour images with a known subtype only"
        else:
            skipped("subtype", "no tumour image with a known subtype")
    if "boxes" in pred:
        known_slots = np.asarray(col["w"]["boxes"]) > 0
        if known_slots.any():
            bk = known_slots.any(axis=1) if boxes_known is None else np.asarray(boxes_known, bool)
            heads["boxes"] = D.box_report(pred["boxes"], y["boxes"], col["w"]["boxes"], classes,
                                          boxes_all=y.get("boxes_all"), boxes_all_classes=y.get("boxes_all_classes"),
                                          boxes_all_count=y.get("boxes_all_count"), scores=probs, known=bk,
                                          image_size=col.get("image_shape"))
        else:
            skipped("boxes", "no known boxes")
    if "boxes_from_mask" in pred and "boxes" in heads:
        # no box head: the boxes were read off the predicted masks (Collector(boxes_from_mask=...))
        comps = np.asarray(pred["boxes_from_mask"])
        bk = (np.asarray(col["w"]["boxes"]) > 0).any(axis=1) if boxes_known is None else np.asarray(boxes_known, bool)
        heads["boxes"].update(source="mask", images_without_box=int((comps[bk] == 0).sum()),
                              note="boxes read off the predicted mask (no box head): every class slot holds the "
                                   "mask's box, an empty mask a zero box (IoU 0); detection confidence = the "
                                   "image's class probability")
    sc = col["scores"]
    if "mask_dice" in sc:
        sel = np.isfinite(sc["mask_dice"])
        if sel.any():
            heads["mask"] = M.mask_report({k: sc[f"mask_{k}"][sel] for k in ("dice", "iou", "hd95", "pred_area",
                                                                             "true_area")},
                                          col["image_shape"], pooled=col.get("pooled"))
            rles = col.get("rles") or {}
            if rles.get("pred"):
                idx = np.flatnonzero(sel)
                yc = np.where(_known(col, "class"), y["class"], -1)[idx] if "class" in y else None
                mm = D.mask_map([rles["pred"][i] for i in idx], [rles["true"][i] for i in idx],
                                probs=None if probs is None else probs[idx], y_class=yc, class_names=classes,
                                p_tumor=pred["tumor"][idx] if "tumor" in pred else None)
                impl = {**heads["mask"].pop("implementations"), **mm.pop("implementations")}
                heads["mask"].update(mm, implementations=impl)
                if mm.get("note"):
                    notes.append(f"head 'mask': {mm['note']}")
        else:
            skipped("mask", "no known masks")
    for h in RECON_HEADS:
        if f"{h}_psnr" in sc:
            heads[h] = M.recon_report(sc[f"{h}_psnr"], sc[f"{h}_ssim"])
    return {"heads": heads, "notes": notes}


def headline(metrics: Mapping) -> dict:
    """Flat scalar metrics (for MLflow and the console)."""
    h = metrics.get("heads", {})
    out = {}
    for key in ("class", "tumor", "subtype"):
        if key in h:
            m = h[key]
            out.update({f"{key}/accuracy": m["accuracy"], f"{key}/balanced_accuracy": m["balanced_accuracy"],
                        f"{key}/macro_f1": m["macro"]["f1"], f"{key}/roc_auc_macro": m["roc_auc"]["macro"],
                        f"{key}/ece": m["calibration"]["ece"]})
            for name, pc in m["per_class"].items():
                out[f"{key}/recall_{name}"] = pc["recall"]
                out[f"{key}/f1_{name}"] = pc["f1"]
    if "multilabel" in h:
        m = h["multilabel"]
        out.update({"multilabel/subset_accuracy": m["subset_accuracy"], "multilabel/macro_f1": m["macro"]["f1"],
                    "multilabel/roc_auc_macro": m["roc_auc"]["macro"]})
    if "boxes" in h:
        m = h["boxes"]
        out.update({f"boxes/{k}": m.get(k) for k in ("slot_iou_mean", "slot_iou_ge_0.5", "slot_iou_ge_0.75", "map50",
                                                    "map50_95", "map75", "voc_map50")})
    if "mask" in h:
        m = h["mask"]
        out.update({f"mask/{k}": m.get(k) for k in ("dice_mean", "dice_mean_tumor_only", "iou_mean", "hd95_mean",
                                                   "dice_global", "map50", "map50_95")})
    for key in RECON_HEADS:
        if key in h:
            out.update({f"{key}/psnr": h[key]["psnr_mean"], f"{key}/ssim": h[key]["ssim_mean"]})
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and v is not None and math.isfinite(v)}


# ---------------------------------------------------------------------------------------
# per-image table, gallery, plots
# ---------------------------------------------------------------------------------------
def _fmt_box(b) -> str:
    return " ".join(f"{float(v):.4f}" for v in b)


def prediction_rows(col: Mapping, class_map, threshold: float, meta: Sequence[Mapping]) -> list[dict]:
    """One dict per image for ``predictions.csv``."""
    from .evaluation.detection import slot_ious

    pred, y = col["pred"], col["y"]
    classes, tumor_classes = list(class_map.classes), list(class_map.tumor_classes)
    probs, hard, _ = class_scores(col, class_map, threshold)
    ious = slot_ious(pred["boxes"], y["boxes"], col["w"]["boxes"]) if "boxes" in pred else None
    known = {k: _known(col, k) for k in ("class", "tumor", "subtype", "multilabel")}
    rows = []
    for i in range(col["n"]):
        r: dict = {"index": i, **(meta[i] if i < len(meta) else {})}
        if probs is not None:
            r["true_label"] = classes[int(y["class"][i])] if "class" in y and known["class"][i] else ""
            r["pred_label"] = classes[int(hard[i])]
            r["correct"] = int(hard[i] == y["class"][i]) if "class" in y and known["class"][i] else ""
            r["confidence"] = round(float(probs[i, hard[i]]), 6)
            r.update({f"p_{c}": round(float(probs[i, k]), 6) for k, c in enumerate(classes)})
        if "tumor" in pred:
            r["tumor_true"] = int(y["tumor"][i]) if known["tumor"][i] else ""
            r["p_tumor"] = round(float(pred["tumor"][i]), 6)
        if "subtype" in pred:
            r["subtype_true"] = tumor_classes[int(y["subtype"][i])] if known["subtype"][i] else ""
            r["subtype_pred"] = tumor_classes[int(pred["subtype"][i].argmax())]
            r.update({f"p_subtype_{c}": round(float(pred["subtype"][i, k]), 6) for k, c in enumerate(tumor_classes)})
        if "multilabel" in pred:
            r["true_labels"] = ";".join(c for k, c in enumerate(classes) if y["multilabel"][i, k] > 0.5) \
                if known["multilabel"][i] else ""
            r["pred_labels"] = ";".join(c for k, c in enumerate(classes) if pred["multilabel"][i, k] >= threshold)
        if ious is not None:
            row = ious[i]
            r["box_iou"] = round(float(np.nanmean(row)), 6) if np.isfinite(row).any() else ""
            for k, c in enumerate(classes):
                if np.isfinite(row[k]):
                    r[f"iou_{c}"] = round(float(row[k]), 6)
            if hard is not None and classes[int(hard[i])] != NO_TUMOR:
                r["pred_box_class"] = classes[int(hard[i])]
                r["pred_box"] = _fmt_box(pred["boxes"][i, int(hard[i])])
            if "boxes_from_mask" in pred:  # read off the mask: its box whatever the class, none when empty
                r["mask_components"] = int(pred["boxes_from_mask"][i])
                r.pop("pred_box_class", None)
                r["pred_box"] = _fmt_box(pred["boxes"][i, 0]) if r["mask_components"] else ""
        sc = col["scores"]
        if "mask_dice" in sc and np.isfinite(sc["mask_dice"][i]):
            for k, name in (("dice", "dice"), ("iou", "mask_iou"), ("hd95", "hd95"), ("pred_area", "mask_pred_area"),
                            ("true_area", "mask_true_area")):
                v = float(sc[f"mask_{k}"][i])
                r[name] = round(v, 6) if math.isfinite(v) else ""
        for h in RECON_HEADS:
            if f"{h}_psnr" in sc:
                r["psnr"] = round(float(sc[f"{h}_psnr"][i]), 4)
                r["ssim"] = round(float(sc[f"{h}_ssim"][i]), 6)
        rows.append(r)
    return rows


def write_csv(path, rows: Sequence[Mapping]) -> Path:
    cols: list = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=cols, restval="")
        wr.writeheader()
        wr.writerows(rows)
    return path


def gallery_ranking(col: Mapping, class_map, threshold: float) -> tuple[Optional[np.ndarray], np.ndarray, str]:
    """``(score per image (NaN = not ranked), candidate mask, what the score is)``: Dice on
    tumour images when masks exist, else the mean box IoU, else p(true class), else SSIM."""
    from .evaluation.detection import slot_ious

    sc, pred, y = col["scores"], col["pred"], col["y"]
    n = col["n"]
    if "mask_dice" in sc and np.isfinite(sc["mask_dice"]).any():
        s = sc["mask_dice"]
        tumor = np.nan_to_num(sc["mask_true_area"]) > 0
        cand = np.isfinite(s) & tumor if (np.isfinite(s) & tumor).any() else np.isfinite(s)
        return s, cand, "Dice (tumour images)" if (np.isfinite(s) & tumor).any() else "Dice"
    if "boxes" in pred and (np.asarray(col["w"]["boxes"]) > 0).any():
        ious = slot_ious(pred["boxes"], y["boxes"], col["w"]["boxes"])
        ok = np.isfinite(ious).any(axis=1)
        s = np.full(n, np.nan)
        s[ok] = np.nanmean(ious[ok], axis=1)
        return s, ok, "box IoU"
    probs, hard, _ = class_scores(col, class_map, threshold)
    if probs is not None and "class" in y:
        ok = _known(col, "class")
        s = np.full(n, np.nan)
        s[ok] = probs[ok, y["class"][ok].astype(int)]
        return s, ok, "p(true class)"
    if "tumor" in pred and "tumor" in y:
        ok = _known(col, "tumor")
        p = pred["tumor"]
        s = np.where(ok, np.where(y["tumor"] > 0.5, p, 1 - p), np.nan)
        return s, ok, "p(true tumour label)"
    for h in RECON_HEADS:
        if f"{h}_ssim" in sc:
            s = sc[f"{h}_ssim"]
            return s, np.isfinite(s), "SSIM"
    return None, np.zeros(n, bool), "none"


def gallery_cases(col: Mapping, class_map, threshold: float, k: int = 6, meta: Sequence[Mapping] = ()):
    """``([(row title, [case dicts])], score name)`` of the ``k`` worst and ``k`` best images."""
    score, cand, what = gallery_ranking(col, class_map, threshold)
    if score is None or not cand.any():
        return [], what
    idx = np.flatnonzero(cand)
    order = idx[np.argsort(score[idx], kind="mergesort")]
    k = int(min(k, max(1, len(order) // 2))) if len(order) > 1 else 1
    groups = [(meta[i].get("group") if meta and i < len(meta) else None) or i for i in range(col["n"])]

    def pick(seq, exclude=(), per_group: int = 2):
        """The first ``k`` of ``seq`` with at most ``per_group`` per group (patient: its
        neighbouring slices look alike), filled up from the rest when groups run out."""
        seq = [i for i in seq if i not in exclude]
        first, count = [], {}
        for i in seq:
            if count.get(groups[i], 0) < per_group:
                count[groups[i]] = count.get(groups[i], 0) + 1
                first.append(i)
        taken = set(first[:k])
        taken |= set([i for i in seq if i not in taken][:k - len(taken)])
        return [i for i in seq if i in taken]

    worst = pick(list(order))
    best = pick(list(order[::-1]), exclude=set(worst))
    pred, y, th = col["pred"], col["y"], col["thumbs"]
    classes = list(class_map.classes)
    probs, hard, _ = class_scores(col, class_map, threshold)

    def case(i):
        c: dict = {"image": th["image"][i]}
        lines = []
        if probs is not None:
            t = classes[int(y["class"][i])] if "class" in y and _known(col, "class")[i] else "?"
            lines.append(f"true {t} / pred {classes[int(hard[i])]} {probs[i, hard[i]]:.2f}")
        elif "tumor" in pred:
            lines.append(f"p(tumour) {pred['tumor'][i]:.2f}")
        lines.append(f"{what} {score[i]:.3f}")
        if meta and i < len(meta) and meta[i].get("path"):
            lines.append(Path(str(meta[i]["path"])).name[:28])
        c["title"] = "\n".join(lines)
        if "boxes" in pred:
            if "boxes_all" in y:
                cnt = int(y["boxes_all_count"][i])
                c["true_boxes"] = [(y["boxes_all"][i, j], None) for j in range(cnt)
                                   if y["boxes_all_classes"][i, j] >= 0]
            slots = set(np.flatnonzero(np.asarray(col["w"]["boxes"][i]) > 0).tolist())
            if hard is not None and classes[int(hard[i])] != NO_TUMOR:
                slots.add(int(hard[i]))
            c["pred_boxes"] = [(pred["boxes"][i, s], classes[s]) for s in sorted(slots)]
            if "boxes_from_mask" in pred:  # one box read off the mask (every slot holds it), none when empty
                c["pred_boxes"] = [(pred["boxes"][i, 0], "mask")] if pred["boxes_from_mask"][i] > 0 else []
        if "mask_true" in th and np.isfinite(col["scores"]["mask_dice"][i]):
            c["true_mask"] = th["mask_true"][i]
            c["pred_mask"] = th["mask_pred"][i].astype(np.float32) / 255.0 >= 0.5
        for h in RECON_HEADS:
            if h in th:
                c["recon"] = th[h][i]
        return c

    return [(f"worst {len(worst)}", [case(i) for i in worst]), (f"best {len(best)}", [case(i) for i in best])], what


def make_plots(col: Mapping, metrics: Mapping, class_map, out_dir, threshold: float, gallery: int = 6,
               meta: Sequence[Mapping] = ()) -> dict:
    """Every PNG of the report; returns ``{head: {kind: path}, "gallery": path}``."""
    from .evaluation import plots as P

    out_dir = Path(out_dir)
    h = metrics["heads"]
    y = col["y"]
    res: dict = {}
    probs, hard, _ = class_scores(col, class_map, threshold)
    specs = []
    if "class" in h:
        sel = _known(col, "class")
        specs.append(("class", y["class"][sel], probs[sel], list(class_map.classes), False))
    if "tumor" in h:
        sel = _known(col, "tumor")
        p = col["pred"]["tumor"][sel]
        specs.append(("tumor", y["tumor"][sel].astype(int), np.stack([1 - p, p], 1), [NO_TUMOR, "tumor"], True))
    if "subtype" in h:
        sel = _known(col, "subtype")
        specs.append(("subtype", y["subtype"][sel], col["pred"]["subtype"][sel], list(class_map.tumor_classes), False))
    for key, yt, pr, names, binary in specs:
        m = h[key]
        title = {"class": "class", "tumor": "tumour", "subtype": "subtype"}[key]
        res[key] = {
            "confusion": P.confusion_matrix_plot(m["confusion_matrix"], names, out_dir / f"confusion_{key}.png",
                                                 title=f"Confusion, {title}"),
            "roc": P.roc_plot(yt, pr, names, out_dir / f"roc_{key}.png", title=f"ROC ({title})", positive_only=binary),
            "reliability": P.reliability_plot(m["calibration"], out_dir / f"reliability_{key}.png",
                                              title=f"Reliability ({title})"),
        }
    if "boxes" in h:
        res["boxes"] = {"iou_hist": P.histogram_plot(h["boxes"]["slot_iou_histogram"], out_dir / "iou_hist.png",
                                                     "Box IoU (known slots)", "IoU", marks=(0.5, 0.75))}
    if "mask" in h:
        res["mask"] = {"dice_hist": P.histogram_plot(h["mask"]["dice_histogram"], out_dir / "dice_hist.png",
                                                     "Mask Dice per image", "Dice")}
    rows, what = gallery_cases(col, class_map, threshold, k=gallery, meta=meta)
    if rows:
        res["gallery"] = P.gallery_plot(rows, out_dir / "gallery.png", title=f"Worst and best by {what}")
        res["gallery_score"] = what
    return res


# ---------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------
def find_mlflow_run(tracker, run_dir: Path) -> Optional[str]:
    """Id of the newest top-level MLflow run tagged ``run_dir`` = this run folder."""
    return tracker.find_run({"run_dir": str(Path(run_dir).resolve())})


def log_to_mlflow(tracking_cfg: Mapping, run_dir: Optional[Path], out_dir: Path, split: str, scalars: Mapping,
                  tags: Mapping) -> Optional[dict]:
    """Log the report folder to the run's MLflow record (or a new linked run); None when off."""
    if not (tracking_cfg or {}).get("enabled"):  # before importing MLflow (seconds)
        print("tracking is off (tracking=none): the report is not logged to MLflow")
        return None
    from .tracking import Tracker

    tracker = Tracker(tracking_cfg, run_dir or out_dir)
    existing = find_mlflow_run(tracker, run_dir) if run_dir is not None else None
    name = f"eval-{tags.get('model', 'model')}-{tags.get('data', 'data')}-{split}"
    with tracker.start(name, run_id=existing, tags=tags):
        rid = tracker.run_id
        if rid is None:
            return None
        tracker.log_artifacts(out_dir, artifact_path=f"eval_{split}")
        tracker.log_metrics(dict(scalars), prefix=f"eval_{split}/")
    if tracker.failed:
        return None
    how = "logged to the training run" if existing else "logged to a new MLflow run linked by the run_dir tag"
    print(f"MLflow: {how} {rid} ({tracker.experiment_name})")
    return {"run_id": rid, "existing": bool(existing), "experiment": tracker.experiment_name}


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------
def _data_range(mode: str) -> Optional[float]:
    return {"none": 1.0, "raw255": 255.0, "tf": 2.0}.get(mode)


def run(cfg, args: Sequence[str] = ()) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; returns a summary dict."""
    from .data.dataset import load_data
    from .inference import resolve_box_mode, resolve_tta

    t0 = time.time()
    tta = resolve_tta(cfg.get("tta", False))
    box_mode = resolve_box_mode(cfg.get("boxes_from_mask", "largest"))
    ckpt, run_dir = resolve_checkpoint(cfg.get("checkpoint"))
    settings = evaluation_settings(cfg, args, run_dir)
    data_cfg = settings["data"]
    split = str(cfg.split)
    info = {}
    if run_dir is not None and (run_dir / "run_info.json").is_file():
        info = json.loads((run_dir / "run_info.json").read_text())
    print(f"checkpoint: {ckpt}\ndata: {data_cfg.get('name')} ({settings['data_source']}), split {split}")

    bundle = load_data(data_cfg, cache_dir=settings["cache_dir"])
    records = bundle.split(split)
    if cfg.get("max_images"):
        records = records[:int(cfg.max_images)]
    if not records:
        counts = {s: len(bundle.split(s)) for s in ("train", "val", "test")}
        raise EvaluationError(f"split {split!r} of data {bundle.name!r} has no images (images per split: {counts}); "
                              "pass split=train|val|test or other data")
    class_map = bundle.class_map

    import keras
    import tensorflow as tf

    from .data.pipeline import build_dataset, resolve_preprocessing
    from .evaluation.metrics import to_jsonable
    from .evaluation.report import write_report
    from .inference import predict_with_tta
    from .training.multitask import load_checkpoint

    model = load_checkpoint(ckpt)
    net = inference_network(model)
    shapes = output_shapes(net)
    heads = check_compatible(shapes, class_map, info.get("classes"))
    in_shape = tuple(net.input.shape[1:3]) if not isinstance(net.input, (list, dict)) else (None, None)
    if all(isinstance(v, int) for v in in_shape):
        size = data_cfg.get("image_size")
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        if size != in_shape:
            print(f"data.image_size {list(size) or None} -> {list(in_shape)} (the model's input size)")
        data_cfg["image_size"] = list(in_shape)
    data_cfg["preprocessing"] = "none" if data_cfg.get("preprocessing", "auto") == "auto" else data_cfg["preprocessing"]
    if cfg.get("batch_size"):
        data_cfg["batch_size"] = int(cfg.batch_size)
    threshold = cfg.get("threshold")
    if threshold is None:
        threshold = settings["model"].get("threshold", 0.5) or 0.5
    threshold = float(threshold)
    mode = resolve_preprocessing(data_cfg["preprocessing"], data_cfg.get("backbone"))
    mask_threshold = float(cfg.get("mask_threshold", 0.5))
    # a mask model without a box head: boxes read off its masks are scored like a detector's
    mask_boxes = box_mode is not None and "mask" in heads and "boxes" not in heads
    eval_heads = heads + ["boxes"] if mask_boxes else heads

    targets = dataset_targets(eval_heads, class_map)
    # one pass, in order: no augmentation, no shuffling, no repeat, no cache (a training cache
    # file holds other records), no XLA (without augmentation the per-batch image work is a
    # cast and a scale: compiling it per batch shape costs more than it saves in one pass)
    ds = build_dataset(records, class_map, {**data_cfg, "augment": None, "repeat": False, "cache": False,
                                            "xla": False}, training=False, heads=targets)
    bs = int(data_cfg.get("batch_size", 32))
    steps = int(math.ceil(len(records) / bs))

    @tf.function(reduce_retracing=True)
    def forward(x):
        return predict_with_tta(net, x, tta)

    col = Collector(heads, mask_threshold=mask_threshold, data_range=_data_range(mode),
                    thumb=int(cfg.get("thumb_size", 128)), boxes_from_mask=box_mode if mask_boxes else None,
                    boxes_min_area=int(cfg.get("boxes_min_area") or 0))
    from tqdm import tqdm

    with tqdm(total=steps, desc=f"evaluate {split}", unit="batch", file=sys.stderr,
              disable=not cfg.get("progress", True)) as bar:
        for x, y, w in ds:
            out = forward(x)
            col.add(x.numpy(), {k: v.numpy() for k, v in y.items()}, {k: v.numpy() for k, v in w.items()},
                    {k: keras.ops.convert_to_numpy(v) for k, v in out.items() if k in heads})
            bar.update(1)
    arrays = col.arrays()
    if arrays["n"] != len(records):
        raise EvaluationError(f"the pipeline gave {arrays['n']} images for {len(records)} records")

    meta = [{"path": r.image, "group": r.group if r.group is not None else "", "split": r.split, "tta": tta}
            for r in records]
    boxes_known = np.array([bool(r.known.get("boxes")) for r in records]) if "boxes" in eval_heads else None
    metrics = compute_metrics(arrays, class_map, threshold, n_bins=int(cfg.get("calibration_bins", 15)),
                              boxes_known=boxes_known)
    if mask_boxes and "boxes" in metrics["heads"]:
        metrics["heads"]["boxes"].update(mode=box_mode, min_area=int(cfg.get("boxes_min_area") or 0),
                                         mask_threshold=mask_threshold)
    elif mask_boxes:  # the data has no known box: nothing to score the mask's boxes against
        mask_boxes, eval_heads = False, heads
        metrics["notes"] = [n if not n.startswith("head 'boxes'") else
                            "boxes from the mask: no image of this split has a known box; not evaluated"
                            for n in metrics["notes"]]

    out_dir = Path(cfg.out) if cfg.get("out") else (
        run_dir / f"eval_{split}" if run_dir is not None else
        Path(cfg.paths.output_root) / "evaluate" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    doc = {"checkpoint": str(ckpt), "run_dir": str(run_dir) if run_dir else None,
           "model": info.get("model", model.name),
           "data": bundle.name, "data_root": bundle.root, "split": split, "n_images": len(records),
           "classes": list(class_map.classes), "evaluated_heads": eval_heads, "threshold": threshold,
           "mask_threshold": mask_threshold, "image_size": data_cfg["image_size"], "tta": tta,
           "boxes_from_mask": box_mode if mask_boxes else None, "created": created, **metrics}
    (out_dir / "metrics.json").write_text(json.dumps(to_jsonable(doc), indent=2))
    write_csv(out_dir / "predictions.csv", prediction_rows(arrays, class_map, threshold, meta))
    plots = make_plots(arrays, metrics, class_map, out_dir, threshold, gallery=int(cfg.get("gallery", 6)), meta=meta)
    report_meta = {"created": created, "checkpoint": str(ckpt), "model": doc["model"],
                   "data": f"{bundle.name} ({bundle.root})", "split": f"{split}: {len(records)} images",
                   "heads": ", ".join(h + (" (from mask)" if h == "boxes" and doc["boxes_from_mask"] else "")
                                      for h in eval_heads), "image size": data_cfg["image_size"],
                   "threshold": threshold, "test-time augmentation": TTA_NOTE[tta],
                   "gallery_score": plots.get("gallery_score", "score")}
    write_report(out_dir / "report.html", to_jsonable(doc), plots, meta=report_meta)
    scalars = headline(to_jsonable(doc))
    tags = {"model": doc["model"], "data": bundle.name, "evaluated_split": split, "evaluated_checkpoint": str(ckpt)}
    mlflow_info = log_to_mlflow(settings["tracking"], run_dir, out_dir, split, scalars, tags)
    summary = {"out": str(out_dir), "report": str(out_dir / "report.html"), "checkpoint": str(ckpt), "split": split,
               "n_images": len(records), "heads": eval_heads, "tta": tta, "headline": scalars, "mlflow": mlflow_info,
               "notes": metrics["notes"], "seconds": round(time.time() - t0, 1)}
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import cli_main

    return cli_main(__doc__, "evaluate", run, argv, errors=(EvaluationError, ValueError),
                    required=[("checkpoint", "checkpoint=PATH is required: a .keras file or a training run folder")])


if __name__ == "__main__":
    sys.exit(main())
