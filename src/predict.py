"""`python -m src.predict checkpoint=PATH input=FILE_OR_DIR output=DIR [threshold=0.5] [batch_size=16]`

Predicts every image of ``input`` (a file, or a folder searched recursively) with a
trained model and writes to ``output``:

* ``predictions.csv`` -- one row per image: ``path``, original ``width`` / ``height``,
  ``predicted`` class and its ``confidence``, ``p_<class>`` for every class, the box of
  the predicted class in **pixel coordinates of the original image** (``box_x0, box_y0,
  box_x1, box_y1``; empty for ``no_tumor``), every box slot (``box_<class>_x0`` ...),
  the predicted mask area in pixels, the files written for the image and ``tta``
  (``none``, or ``flip``: every output is the mean of the model's outputs on the image and
  on its horizontal mirror, :func:`src.inference.predict_with_tta`). A model with a
  ``mask`` head and no ``boxes`` head gets its boxes from the mask at the original size
  (``boxes_from_mask=largest``, the default: the tight box of the largest connected
  component in ``box_x0 .. box_y1``, empty for an empty mask, with ``box_source=mask`` and
  ``mask_components``; ``components``: ``box_*`` hold the union box and ``boxes`` lists
  every component's box as ``x0 y0 x1 y1;...``, largest first; components under
  ``boxes_min_area`` pixels are ignored; ``false``: no boxes);
* ``masks/<name>_mask.png`` -- the predicted mask (0/255) at the original size, when the
  model has a ``mask`` head;
* ``overlays/<name>_overlay.png`` -- the image with the box (or the mask's boxes), the mask
  outline and the label;
* ``skipped.csv`` -- images that could not be read and why (empty file, not an image,
  unsupported format, corrupt data). A bad file never stops the batch; each is also
  reported as a warning.

``checkpoint`` is a ``.keras`` file or a run folder (its last phase's
``checkpoints/best.keras``). The model's input size is read from the model; the class
names and the resize mode (``stretch`` / ``letterbox``) from the run's ``run_info.json``
/ ``config.yaml`` when the checkpoint sits in a run folder (else ``class_0..N-1`` with a
warning, and ``stretch``). Training-only auxiliary heads are dropped.

How the class is decided, by the heads the model has: ``tumor`` + ``subtype`` (the
hierarchical U-Net) -> ``no_tumor`` if ``p(tumour) < threshold`` else the subtype argmax,
with ``P(no_tumor) = 1 - p`` and ``P(k) = p * P(subtype k)``; else ``class`` (softmax)
-> argmax; ``multilabel`` (sigmoid per class) -> argmax, and ``labels`` lists every class
with ``p >= threshold``; ``tumor`` alone -> tumour / no_tumor by ``threshold``.

Images are decoded like the training pipeline (3 channels; grey broadcast), resized
bilinearly with antialiasing to the model's input size and scaled to ``[0, 1]``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("src.predict")

NO_TUMOR = "no_tumor"
RUN_INFO = "run_info.json"
_CV2_ONLY = (".tif", ".tiff", ".webp")


class PredictError(RuntimeError):
    """A problem that stops prediction as a whole (bad checkpoint, no input)."""


# ---------------------------------------------------------------------------------------
# checkpoints and run metadata (also used by src.export and src.explain)
# ---------------------------------------------------------------------------------------
def _phase_key(p: Path):
    s = p.name[len("phase"):]
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def resolve_checkpoint(path) -> Path:
    """A ``.keras`` file as given, or the newest-phase ``checkpoints/best.keras`` of a run
    folder (``last.keras`` when a phase has no best)."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        if p.suffix != ".keras":
            raise PredictError(f"checkpoint {p} is not a .keras file")
        return p
    if not p.is_dir():
        raise PredictError(f"checkpoint {p} does not exist (give a .keras file or a run folder)")
    for cand in (p / "checkpoints" / "best.keras", p / "best.keras", p / "checkpoints" / "last.keras",
                 p / "last.keras"):
        if cand.is_file():
            return cand
    phases = sorted((d for d in p.glob("phase*") if d.is_dir()), key=_phase_key, reverse=True)
    for d in phases:
        for name in ("best.keras", "last.keras"):
            if (d / "checkpoints" / name).is_file():
                return d / "checkpoints" / name
    raise PredictError(f"no checkpoint in {p}: expected phase<N>/checkpoints/best.keras (a run folder) "
                       "or a .keras file")


def find_run_dir(checkpoint: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (holds ``run_info.json`` or ``config.yaml``)."""
    for d in list(Path(checkpoint).resolve().parents)[:4]:
        if (d / RUN_INFO).is_file() or (d / "config.yaml").is_file():
            return d
    return None


@dataclass
class RunMeta:
    run_dir: Optional[Path] = None
    classes: Optional[list] = None
    resize: str = "stretch"
    threshold: Optional[float] = None
    config: Optional[object] = None      # the run's OmegaConf config, when found
    info: dict = field(default_factory=dict)


def run_metadata(checkpoint: Path) -> RunMeta:
    """Class names, resize mode and threshold of the run a checkpoint came from."""
    meta = RunMeta(run_dir=find_run_dir(checkpoint))
    if meta.run_dir is None:
        return meta
    info_p = meta.run_dir / RUN_INFO
    if info_p.is_file():
        try:
            meta.info = json.loads(info_p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s unreadable (%s)", info_p, e)
    cfg_p = meta.run_dir / "config.yaml"
    if cfg_p.is_file():
        from omegaconf import OmegaConf

        try:
            meta.config = OmegaConf.load(cfg_p)
        except Exception as e:  # noqa: BLE001 - a broken config only loses metadata
            log.warning("%s unreadable (%s)", cfg_p, e)
    classes = meta.info.get("classes")
    data = meta.config.get("data") if meta.config is not None else None
    if not classes and data is not None and data.get("classes"):
        classes = list(data.get("classes"))
    meta.classes = list(classes) if classes else None
    if data is not None and data.get("resize"):
        meta.resize = str(data.get("resize"))
    model = meta.config.get("model") if meta.config is not None else None
    if model is not None and model.get("threshold") is not None:
        meta.threshold = float(model.get("threshold"))
    return meta


def load_model_file(checkpoint):
    """``load_checkpoint`` with a clear error for a file that is not a model of this library."""
    from .training.multitask import load_checkpoint

    try:
        return load_checkpoint(checkpoint)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - report any deserialisation problem clearly
        raise PredictError(f"cannot load checkpoint {checkpoint}: {type(e).__name__}: {e}") from e


def load_inference_model(checkpoint):
    """Load a checkpoint and return its inference network (no auxiliary heads)."""
    return inference_of(load_model_file(checkpoint))


def inference_of(model):
    """The inference network of a loaded model: a MultiTaskModel's
    :meth:`~src.training.multitask.MultiTaskModel.inference_model`, or a functional
    model without its ``*_aux*`` heads."""
    import keras

    from .training.multitask import MultiTaskModel, is_aux_head

    if isinstance(model, MultiTaskModel):
        return model.inference_model()
    if isinstance(model, keras.Model) and isinstance(getattr(model, "output", None), dict):
        names = list(model.output)
        keep = [h for h in names if not is_aux_head(h)]
        if len(keep) < len(names):
            return keras.Model(model.input, {h: model.output[h] for h in keep}, name=f"{model.name}_inference")
    return model


def input_size(model) -> tuple:
    shape = model.inputs[0].shape
    if shape[1] is None or shape[2] is None:
        raise PredictError(f"model input has no fixed size ({tuple(shape)})")
    return int(shape[1]), int(shape[2])


def class_names_for(model, meta: RunMeta) -> list:
    """Class names of the model's class outputs, from the run metadata when they fit."""
    outs = {k: tuple(v.shape) for k, v in model.output.items()} if isinstance(model.output, dict) else {}
    hierarchical = "tumor" in outs and "subtype" in outs
    n = outs["subtype"][-1] + 1 if hierarchical else None
    for h in ("class", "multilabel"):
        if n is None and h in outs:
            n = outs[h][-1]
    if n is None and "boxes" in outs:
        n = outs["boxes"][1]
    if n is None:
        return list(meta.classes or [])
    if meta.classes and len(meta.classes) == n:
        return list(meta.classes)
    why = "no run_info.json / config.yaml beside the checkpoint" if not meta.classes else \
        f"the run lists {len(meta.classes)} classes, the model predicts {n}"
    if hierarchical:
        # no_tumor where the model's composed class head puts it (ComposeFourClass), else last
        pos = n - 1
        try:
            pos = int(getattr(model.get_layer("class"), "no_position", pos))
        except ValueError:
            pass
        names = [f"subtype_{i}" for i in range(n - 1)]
        names.insert(min(max(pos, 0), n - 1), NO_TUMOR)
    else:
        names = [f"class_{i}" for i in range(n)]
    log.warning("class names unknown (%s): using %s", why, names)
    return names


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
class ImageReadError(ValueError):
    """An image that cannot be used; the message is the reason."""


def read_image(path) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` (grey broadcast); :class:`ImageReadError` says why not."""
    import tensorflow as tf

    from .data.pipeline import probe_header
    from .data.records import DataError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageReadError(f"unreadable file ({e.strerror or e})") from e
    if size == 0:
        raise ImageReadError("empty file (0 bytes)")
    try:
        probe_header(p)
    except DataError as e:
        msg = str(e)
        if msg.startswith(str(p)):
            msg = msg[len(str(p)):].lstrip(": ")
        if p.suffix.lower() in _CV2_ONLY:
            return _read_cv2(p, msg)
        raise ImageReadError(msg) from e
    try:
        img = tf.io.decode_image(tf.io.read_file(str(p)), channels=3, dtype=tf.uint8, expand_animations=False).numpy()
    except (tf.errors.OpError, ValueError) as e:
        raise ImageReadError(f"corrupt image data ({_tf_message(e)})") from e
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageReadError(f"corrupt image (decoded shape {img.shape})")
    return img


def _tf_message(e: Exception) -> str:
    """A TensorFlow error without its op / device decorations."""
    import re

    msg = str(getattr(e, "message", e)).strip()
    msg = re.sub(r"\{\{[^}]*\}\}\s*", "", msg)
    msg = re.sub(r"\s*\[Op:[^\]]*\].*$", "", msg, flags=re.S)
    return (msg.splitlines() or [type(e).__name__])[0].strip() or type(e).__name__


def _read_cv2(p: Path, why: str) -> np.ndarray:
    import cv2

    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(why or "unsupported or corrupt image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@dataclass
class Frame:
    """Where an ``h x w`` image sits in the model's ``H x W`` input."""

    h: int
    w: int
    H: int
    W: int
    nh: int
    nw: int
    top: int
    left: int


def frame_for(h: int, w: int, size, resize: str = "stretch") -> Frame:
    H, W = size
    if resize == "stretch":
        return Frame(h, w, H, W, H, W, 0, 0)
    if resize != "letterbox":
        raise PredictError(f"resize must be stretch or letterbox, got {resize!r}")
    s = min(H / h, W / w)
    nh, nw = min(H, max(1, int(round(h * s)))), min(W, max(1, int(round(w * s))))
    return Frame(h, w, H, W, nh, nw, (H - nh) // 2, (W - nw) // 2)


def prepare(img: np.ndarray, frame: Frame) -> np.ndarray:
    """uint8 RGB -> float32 ``[H, W, 3]`` in ``[0, 1]`` as the training pipeline makes it."""
    import tensorflow as tf

    x = img
    if (frame.nh, frame.nw) != (frame.h, frame.w):
        r = tf.image.resize(img, (frame.nh, frame.nw), method="bilinear", antialias=True)
        x = tf.cast(tf.clip_by_value(tf.round(r), 0, 255), tf.uint8).numpy()
    if (frame.nh, frame.nw) != (frame.H, frame.W):
        out = np.zeros((frame.H, frame.W, 3), np.uint8)
        out[frame.top:frame.top + frame.nh, frame.left:frame.left + frame.nw] = x
        x = out
    return x.astype(np.float32) / 255.0


def boxes_to_pixels(boxes: np.ndarray, frame: Frame) -> np.ndarray:
    """Normalised xyxy boxes in the model frame -> pixel xyxy in the original image
    (clipped to it)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x = (b[:, [0, 2]] * frame.W - frame.left) / frame.nw * frame.w
    y = (b[:, [1, 3]] * frame.H - frame.top) / frame.nh * frame.h
    out = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, frame.w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, frame.h)
    return out.reshape(np.shape(boxes))


def mask_to_original(prob: np.ndarray, frame: Frame, threshold: float = 0.5) -> np.ndarray:
    """A ``[H, W]`` (or ``[H, W, 1]``) probability map in the model frame -> uint8 0/1 mask
    at the original size."""
    import cv2

    p = np.asarray(prob, np.float32)
    if p.ndim == 3:
        p = p[..., 0]
    p = p[frame.top:frame.top + frame.nh, frame.left:frame.left + frame.nw]
    p = cv2.resize(p, (frame.w, frame.h), interpolation=cv2.INTER_LINEAR)
    return (p >= threshold).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------
def decide(outputs: dict, classes: Sequence[str], threshold: float = 0.5) -> dict:
    """Per-batch class decision from the model outputs: ``probs`` [B, C] (or None),
    ``pred`` [B] class index (-1 when the model has no class output), ``labels`` (lists,
    multilabel only) and ``p_tumor`` [B] where a tumour head exists."""
    classes = list(classes)
    out = {"probs": None, "pred": None, "labels": None, "p_tumor": None}
    tumor = outputs.get("tumor")
    if tumor is not None:
        out["p_tumor"] = np.asarray(tumor, np.float32).reshape(len(tumor), -1)[:, 0]
    if tumor is not None and "subtype" in outputs and NO_TUMOR in classes:
        pt = out["p_tumor"]
        sub = np.asarray(outputs["subtype"], np.float32)
        no = classes.index(NO_TUMOR)
        tumour_ids = [i for i in range(len(classes)) if i != no]
        probs = np.zeros((len(pt), len(classes)), np.float32)
        probs[:, no] = 1.0 - pt
        probs[:, tumour_ids] = pt[:, None] * sub
        pred = np.where(pt < threshold, no, np.asarray(tumour_ids)[np.argmax(sub, axis=1)])
        out.update(probs=probs, pred=pred.astype(int))
    elif "class" in outputs:
        probs = np.asarray(outputs["class"], np.float32)
        out.update(probs=probs, pred=np.argmax(probs, axis=1))
    elif "multilabel" in outputs:
        probs = np.asarray(outputs["multilabel"], np.float32)
        out.update(probs=probs, pred=np.argmax(probs, axis=1),
                   labels=[[classes[j] for j in np.flatnonzero(r >= threshold)] for r in probs])
    elif tumor is not None:
        pt = out["p_tumor"]
        out.update(probs=np.stack([1.0 - pt, pt], axis=1), pred=(pt >= threshold).astype(int))
    return out


# ---------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------
def draw_overlay(img: np.ndarray, box: Optional[np.ndarray], mask: Optional[np.ndarray], label: str) -> np.ndarray:
    """RGB uint8 image with the box (red; ``[4]`` or several ``[K, 4]``, pixel xyxy), mask
    outline (green) and label."""
    import cv2

    out = np.ascontiguousarray(img.copy())
    h, w = out.shape[:2]
    t = max(1, int(round(min(h, w) / 200)))
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), t)
    for b in (np.asarray(box, np.float64).reshape(-1, 4) if box is not None else ()):
        if np.all(np.isfinite(b)):
            x0, y0, x1, y1 = np.round(b).astype(int)
            cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 0, 0), t)
    if label:
        from .evaluation.gradcam import fit_text_scale

        scale = fit_text_scale(label, w, preferred=max(0.4, min(h, w) / 600))
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(out, (0, 0), (min(w, tw + 6), th + base + 6), (0, 0, 0), -1)
        cv2.putText(out, label, (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return out


def _write_png(path: Path, rgb_or_grey: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    img = rgb_or_grey if rgb_or_grey.ndim == 2 else cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def list_inputs(path, exclude=None) -> list:
    """The files to predict: ``path`` itself, or every file under a folder (recursive,
    sorted; hidden files and folders, and anything under ``exclude`` -- the output
    folder -- left out)."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise PredictError(f"input {p} does not exist")
    skip = Path(exclude).expanduser().resolve() if exclude is not None else None
    files = [f for f in sorted(p.rglob("*")) if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(p).parts)
             and not (skip is not None and skip in f.resolve().parents)]
    if not files:
        raise PredictError(f"input folder {p} holds no files")
    return files


def _out_name(f: Path, root: Path) -> str:
    rel = f.relative_to(root) if root.is_dir() else Path(f.name)
    stem = "__".join(rel.with_suffix("").parts)
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in stem)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


@dataclass
class PredictResult:
    output: Path
    rows: list
    skipped: list
    classes: list
    checkpoint: Path
    tta: str = "none"
    boxes_from_mask: Optional[str] = None   # the mode, when the boxes were read off the mask

    def summary(self) -> dict:
        return {"output": str(self.output), "checkpoint": str(self.checkpoint), "predicted": len(self.rows),
                "skipped": len(self.skipped), "classes": self.classes, "tta": self.tta,
                "boxes_from_mask": self.boxes_from_mask,
                "predictions_csv": str(self.output / "predictions.csv"),
                "skipped_csv": str(self.output / "skipped.csv")}


def predict(checkpoint, inputs, output, threshold: Optional[float] = None, batch_size: int = 16,
            mask_threshold: float = 0.5, save_masks: bool = True, save_overlays: bool = True,
            resize: Optional[str] = None, progress: Optional[bool] = None, tta=None,
            boxes_from_mask="largest", boxes_min_area: int = 0) -> PredictResult:
    """Predict every image of ``inputs`` (file or folder); see the module docstring.

    ``tta``: ``none`` / ``False`` or ``flip`` (:func:`src.inference.predict_with_tta`).
    ``boxes_from_mask``: ``largest`` | ``components`` | ``False``: boxes of a model with a
    mask head and no box head, read off the mask at the original size
    (:func:`src.inference.mask_boxes`; components under ``boxes_min_area`` pixels ignored).
    """
    from tqdm.auto import tqdm

    from .inference import predict_with_tta, resolve_box_mode, resolve_tta

    try:
        tta = resolve_tta(tta)
        box_mode = resolve_box_mode(boxes_from_mask)
    except ValueError as e:
        raise PredictError(str(e)) from e
    ckpt = resolve_checkpoint(checkpoint)
    meta = run_metadata(ckpt)
    model = load_inference_model(ckpt)
    size = input_size(model)
    heads = list(model.output) if isinstance(model.output, dict) else ["class"]
    classes = class_names_for(model, meta)
    thr = float(threshold if threshold is not None else (meta.threshold if meta.threshold is not None else 0.5))
    mode = resize or meta.resize or "stretch"
    root = Path(str(inputs)).expanduser()
    out = Path(str(output)).expanduser()
    files = list_inputs(root, exclude=out)
    out.mkdir(parents=True, exist_ok=True)
    has_boxes = "boxes" in heads
    has_mask = "mask" in heads
    mask_boxes = box_mode if has_mask and not has_boxes else None   # boxes read off the mask
    n_slots = int(model.output["boxes"].shape[1]) if has_boxes else 0
    slot_names = [classes[k] if k < len(classes) else f"slot_{k}" for k in range(n_slots)]
    binary_only = "tumor" in heads and not any(h in heads for h in ("class", "multilabel", "subtype"))
    prob_names = ([NO_TUMOR, "tumor"] if binary_only else classes)
    log.info("predicting %d files with %s (input %dx%d, %s, classes %s, threshold %.3g)", len(files), ckpt,
             size[0], size[1], mode, classes, thr)

    import tensorflow as tf

    rows, skipped = [], []
    batch: list = []
    bs = max(1, int(batch_size))
    # traced once: every batch is padded to bs
    forward = tf.function(lambda x: predict_with_tta(model, x, tta))

    def flush():
        if not batch:
            return
        x = np.zeros((bs, size[0], size[1], 3), np.float32)
        x[:len(batch)] = np.stack([b["x"] for b in batch])
        raw = forward(tf.constant(x))
        raw = raw if isinstance(raw, dict) else {heads[0]: raw}
        outs = {k: np.asarray(v)[:len(batch)] for k, v in raw.items()}
        dec = decide(outs, classes if not binary_only else prob_names, thr)
        for i, item in enumerate(batch):
            row = _row(item, i, outs, dec, prob_names, slot_names, out, thr, mask_threshold, save_masks,
                       save_overlays, binary_only, mask_boxes, int(boxes_min_area or 0))
            row["tta"] = tta
            rows.append(row)
        batch.clear()

    disable = None if progress is None else not progress   # None: a bar only on a terminal
    with tqdm(total=len(files), unit="img", desc="predict", disable=disable) as bar:
        for f in files:
            try:
                img = read_image(f)
            except ImageReadError as e:
                skipped.append({"path": str(f), "reason": str(e)})
                log.warning("skipped %s: %s", f, e)
                bar.update(1)
                continue
            frame = frame_for(img.shape[0], img.shape[1], size, mode)
            batch.append({"path": f, "name": _out_name(f, root), "img": img, "frame": frame, "x": prepare(img, frame)})
            if len(batch) >= bs:
                flush()
            bar.update(1)
        flush()

    cols = ["path", "width", "height", "predicted", "confidence"]
    cols += [f"p_{c}" for c in prob_names] if prob_names else []
    if "tumor" in heads and not binary_only:
        cols.append("p_tumor")
    if "multilabel" in heads:
        cols.append("labels")
    if has_boxes:
        cols += ["box_x0", "box_y0", "box_x1", "box_y1"]
        cols += [f"box_{c}_{k}" for c in slot_names for k in ("x0", "y0", "x1", "y1")]
    if mask_boxes:
        cols += ["box_x0", "box_y0", "box_x1", "box_y1", "box_source", "mask_components"]
        cols += ["boxes"] if mask_boxes == "components" else []
    if has_mask:
        cols += ["mask_area_px", "mask_path"]
    cols += ["overlay_path", "tta"]
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in cols})
    with open(out / "skipped.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "reason"])
        w.writeheader()
        w.writerows(skipped)
    if skipped:
        log.warning("%d of %d files skipped (see %s)", len(skipped), len(files), out / "skipped.csv")
    return PredictResult(output=out, rows=rows, skipped=skipped, classes=classes, checkpoint=ckpt, tta=tta,
                         boxes_from_mask=mask_boxes)


def _row(item, i, outs, dec, prob_names, slot_names, out: Path, thr, mask_thr, save_masks, save_overlays,
         binary_only, mask_boxes: Optional[str] = None, min_area: int = 0) -> dict:
    frame: Frame = item["frame"]
    row = {"path": str(item["path"]), "width": frame.w, "height": frame.h}
    label = ""
    pred_name = None
    if dec["pred"] is not None:
        k = int(dec["pred"][i])
        pred_name = prob_names[k] if k < len(prob_names) else f"class_{k}"
        conf = float(dec["probs"][i, k])
        row.update(predicted=pred_name, confidence=conf)
        for j, c in enumerate(prob_names):
            row[f"p_{c}"] = float(dec["probs"][i, j])
        label = f"{pred_name} {conf:.2f}"
    if dec["p_tumor"] is not None and not binary_only:
        row["p_tumor"] = float(dec["p_tumor"][i])
    if dec["labels"] is not None:
        row["labels"] = ";".join(dec["labels"][i])
    box = None
    if "boxes" in outs:
        px = boxes_to_pixels(outs["boxes"][i], frame)
        for s, c in enumerate(slot_names):
            for j, k in enumerate(("x0", "y0", "x1", "y1")):
                row[f"box_{c}_{k}"] = float(px[s, j])
        if pred_name is not None and pred_name != NO_TUMOR and pred_name in slot_names:
            box = px[slot_names.index(pred_name)]
            row.update(box_x0=float(box[0]), box_y0=float(box[1]), box_x1=float(box[2]), box_y1=float(box[3]))
    mask = None
    if "mask" in outs:
        mask = mask_to_original(outs["mask"][i], frame, mask_thr)
        row["mask_area_px"] = int(mask.sum())
        if mask_boxes:  # no box head: boxes of the mask's components, in original pixels
            from .inference import mask_boxes as boxes_of, union_box

            comps = boxes_of(mask, 0.5, "components", min_area)
            row.update(box_source="mask", mask_components=len(comps))
            chosen = comps[:1] if mask_boxes == "largest" else comps
            b = union_box(chosen)
            if b is not None:
                row.update(box_x0=float(b[0]), box_y0=float(b[1]), box_x1=float(b[2]), box_y1=float(b[3]))
                box = chosen
            if mask_boxes == "components":
                row["boxes"] = ";".join(" ".join(f"{v:g}" for v in c) for c in comps)
        if save_masks:
            mp = out / "masks" / f"{item['name']}_mask.png"
            _write_png(mp, mask * 255)
            row["mask_path"] = str(mp)
    if save_overlays:
        op = out / "overlays" / f"{item['name']}_overlay.png"
        _write_png(op, draw_overlay(item["img"], box, mask, label))
        row["overlay_path"] = str(op)
    return row


def run(cfg) -> dict:
    if not cfg.get("checkpoint"):
        raise PredictError("checkpoint=PATH is required (a .keras file or a run folder)")
    if not cfg.get("input"):
        raise PredictError("input=FILE_OR_DIR is required")
    output = cfg.get("output") or str(Path(cfg.paths.output_root) / "predict" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    res = predict(cfg.checkpoint, cfg.input, output, threshold=cfg.get("threshold"),
                  batch_size=int(cfg.get("batch_size") or 16), mask_threshold=float(cfg.get("mask_threshold", 0.5)),
                  save_masks=bool(cfg.get("save_masks", True)), save_overlays=bool(cfg.get("save_overlays", True)),
                  resize=cfg.get("resize"), tta=cfg.get("tta", False),
                  boxes_from_mask=cfg.get("boxes_from_mask", "largest"),
                  boxes_min_area=int(cfg.get("boxes_min_area") or 0))
    return res.summary()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import cli_main

    return cli_main(__doc__, "predict", lambda cfg, args: run(cfg), argv, errors=(PredictError,))

if __name__ == "__main__":
    sys.exit(main())
