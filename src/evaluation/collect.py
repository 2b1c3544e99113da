"""One pass of a model over a split: which heads to evaluate, and the collected arrays.

* :func:`output_shapes`, :func:`check_compatible`, :func:`dataset_targets` -- the heads a
  model has, whether they fit the data's classes (:class:`EvaluationError` when not) and
  the pipeline targets their evaluation needs.
* :class:`Collector` -- accumulates predictions, targets, weights, per-image mask and
  reconstruction scores and small display copies, batch by batch.
* :func:`collect` -- runs the inference network (with test-time augmentation,
  :func:`src.inference.predict_with_tta`) over a ``tf.data`` split into a Collector.

What is computed from the arrays lives in :mod:`src.evaluation.compute`.
"""
from __future__ import annotations

import sys
from typing import Mapping, Optional, Sequence

import numpy as np

from ..data.records import NO_TUMOR
from ..heads import CLASS_HEADS, RECON_HEADS

#: the heads an evaluation scores
EVALUATED_HEADS = set(CLASS_HEADS) | {"boxes", "mask"} | set(RECON_HEADS)


class EvaluationError(Exception):
    """A problem the user can fix (bad checkpoint, empty split, model/data mismatch)."""


# ---------------------------------------------------------------------------------------
# which heads, which targets
# ---------------------------------------------------------------------------------------
def output_shapes(network) -> dict:
    """``{head: output shape}`` of a network whose outputs are keyed by head."""
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
    heads = [h for h in shapes if h in EVALUATED_HEADS]
    if not heads:
        raise EvaluationError(f"the model outputs {sorted(shapes)}: none of them is an evaluated head "
                              f"({sorted(EVALUATED_HEADS)})")
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
            are read off the mask (:func:`src.boxes_from_mask.slot_boxes_from_masks`: every
            class slot holds the mask's box; an empty mask gives a zero box) and
            ``pred["boxes_from_mask"]`` counts the mask's components per image (0 = no box).
        boxes_min_area: components with fewer pixels (of the model's mask) are ignored.
    """

    def __init__(self, heads: Sequence[str], mask_threshold: float = 0.5, data_range: Optional[float] = 1.0,
                 thumb: int = 128, boxes_from_mask: Optional[str] = None, boxes_min_area: int = 0):
        from ..boxes_from_mask import resolve_box_mode

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
        from .detection import encode_masks
        from .metrics import mask_scores

        B = len(tm)
        H, W = tm.shape[1:3]
        pm = pm.reshape(B, *pm.shape[1:3])
        if pm.shape[1:] != (H, W):
            pm = np.stack([_resize(pm[i], (H, W)) for i in range(B)]) if B else pm
        pb = pm >= self.mask_threshold
        tb = tm.reshape(B, H, W) > 0.5
        known = wm.reshape(B) > 0
        sc = {k: np.full(B, np.nan) for k in ("dice", "iou", "hd95", "pred_area", "true_area", "inter")}
        if known.any():
            s = mask_scores(pb[known], tb[known])
            s["inter"] = np.logical_and(pb[known], tb[known]).reshape(int(known.sum()), -1).sum(axis=1)
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
        from ..boxes_from_mask import slot_boxes_from_masks

        boxes, counts = slot_boxes_from_masks(pm.reshape(len(pm), *pm.shape[1:3]), num_slots, self.mask_threshold,
                                              self.boxes_from_mask, self.boxes_min_area)
        self._put(self.pred, "boxes", boxes)
        self._put(self.pred, "boxes_from_mask", counts)

    def _add_recon(self, head: str, r: np.ndarray, x: np.ndarray, ts, unit: bool) -> None:
        from .metrics import psnr, ssim

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


def collect(network, dataset, heads: Sequence[str], tta: str = "none", steps: Optional[int] = None,
            desc: str = "evaluate", progress: bool = True, **collector) -> dict:
    """Run ``network`` over ``dataset`` (``(x, targets, weights)`` batches, one pass) and
    return :meth:`Collector.arrays`; ``collector``: :class:`Collector` settings."""
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from ..inference import predict_with_tta

    @tf.function(reduce_retracing=True)
    def forward(x):
        return predict_with_tta(network, x, tta)

    col = Collector(heads, **collector)
    with tqdm(total=steps, desc=desc, unit="batch", file=sys.stderr, disable=not progress) as bar:
        for x, y, w in dataset:
            out = forward(x)
            col.add(x.numpy(), {k: v.numpy() for k, v in y.items()}, {k: v.numpy() for k, v in w.items()},
                    {k: keras.ops.convert_to_numpy(v) for k, v in out.items() if k in heads})
            bar.update(1)
    return col.arrays()
