"""Inference: a checkpoint's answers for images, in pixels of the original image.

Shared by :mod:`src.predict`, :mod:`src.explain`, :mod:`src.export` and
:mod:`src.evaluate` (and, below them, :mod:`src.evaluation`), from the checkpoint to the
picture:

* **load** -- :func:`load_for_inference`: resolve ``checkpoint=`` (:mod:`src.runs`), load
  it, drop the training-only auxiliary heads (:func:`inference_of`) and read the run's
  metadata (class names, resize mode, threshold): an :class:`InferenceModel`;
* **read and preprocess** -- :func:`read_image` (RGB uint8, or :class:`ImageReadError`
  saying why not), :func:`frame_for` / :func:`prepare` (stretch or letterbox into the
  model's input, ``[0, 1]`` float as the training pipeline makes it);
* **predict** -- :func:`predict_with_tta` (``tta: flip``: the mean of the image's and its
  horizontal mirror's outputs, the mirror's spatial outputs flipped back first);
* **postprocess** -- :func:`decide` (the class decision of whatever class heads a model
  has), :func:`boxes_to_pixels` / :func:`mask_to_original` (back to the original image),
  :func:`~src.boxes_from_mask.mask_boxes` / :func:`~src.boxes_from_mask.slot_boxes_from_masks`
  (:mod:`src.boxes_from_mask`: boxes read off a predicted mask, so a model with a mask head
  and no box head still reports boxes);
* **draw** -- :func:`draw_overlay` (box, mask outline, label), :func:`fit_text_scale`;
* :class:`Predictor` -- all of it for a list of image files, one :class:`ImagePrediction`
  (or :class:`Skipped`) per file, as ``src.predict`` writes them.

Imports point down only: :mod:`src.runs`, the model loader, the data readers' header
probe, :mod:`src.boxes_from_mask`; nothing of the evaluation or of the entry points.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .boxes_from_mask import (BOX_MODES, _off, mask_boxes, resolve_box_mode,  # noqa: F401 (re-exported)
                              slot_boxes_from_masks, union_box)
from .data.records import NO_TUMOR
from .runs import CheckpointError, RunMeta, resolve_checkpoint, run_metadata

log = logging.getLogger(__name__)

_CV2_ONLY = (".tif", ".tiff", ".webp")
TTA_MODES = ("none", "flip")

# outputs averaged as they are (probabilities / scores); every other output of rank 4
# ([B, H, W, C]: mask, recon, ...) is spatial and flipped back along the width first
from .heads import CLASS_HEADS as CLASS_TYPE  # noqa: E402  (the class-type heads)


class InferenceError(ValueError):
    """A model or setting that inference cannot use (the message says why)."""


# ---------------------------------------------------------------------------------------
# loading a checkpoint for inference
# ---------------------------------------------------------------------------------------
def output_heads(model) -> list:
    """The head names of a model whose outputs are a dict ([] for any other output)."""
    out = getattr(model, "output", None)
    return list(out) if isinstance(out, dict) else []


def inference_of(model):
    """The inference network of a loaded model: a MultiTaskModel's
    :meth:`~src.models.task.MultiTaskModel.inference_model`, or a functional
    model without its ``*_aux*`` heads."""
    import keras

    from .heads import is_aux_head
    from .models.task import MultiTaskModel

    if isinstance(model, MultiTaskModel):
        return model.inference_model()
    if isinstance(model, keras.Model) and isinstance(getattr(model, "output", None), dict):
        names = list(model.output)
        keep = [h for h in names if not is_aux_head(h)]
        if len(keep) < len(names):
            return keras.Model(model.input, {h: model.output[h] for h in keep}, name=f"{model.name}_inference")
    return model


def load_model_file(checkpoint):
    """``load_checkpoint`` of a ``.keras`` file, with one clear line
    (:class:`~src.runs.CheckpointError`) for a file that is not a model of this library
    (truncated, foreign, from another version)."""
    from .models.task import CheckpointLoadError, load_checkpoint

    try:
        return load_checkpoint(checkpoint)
    except CheckpointLoadError as e:  # already one line naming the file
        raise CheckpointError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - report any deserialisation problem in one line
        msg = " ".join(str(e).split())
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {type(e).__name__}: {msg}") from e


def class_names_for(network, meta: RunMeta) -> list:
    """Class names of the network's class outputs: the run's when their number fits, else
    ``class_0..`` (``subtype_0..`` + ``no_tumor`` for a tumour + subtype model) with a warning."""
    outs = {k: tuple(v.shape) for k, v in network.output.items()} if isinstance(network.output, dict) else {}
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
            pos = int(getattr(network.get_layer("class"), "no_position", pos))
        except ValueError:
            pass
        names = [f"subtype_{i}" for i in range(n - 1)]
        names.insert(min(max(pos, 0), n - 1), NO_TUMOR)
    else:
        names = [f"class_{i}" for i in range(n)]
    log.warning("class names unknown (%s): using %s", why, names)
    return names


@dataclass
class InferenceModel:
    """A checkpoint loaded for inference (:func:`load_for_inference`)."""

    checkpoint: Path      # the resolved .keras file
    run: RunMeta          # the run it belongs to (run_dir None outside a run)
    model: object         # what the file holds (a MultiTaskModel, or a plain Keras model)
    network: object       # the inference network: outputs keyed by head, no auxiliary heads

    @property
    def run_dir(self) -> Optional[Path]:
        return self.run.run_dir

    @property
    def heads(self) -> list:
        return output_heads(self.network)

    @property
    def dropped_heads(self) -> list:
        """Training-only heads the inference network leaves out."""
        return [h for h in output_heads(getattr(self.model, "network", self.model)) if h not in self.heads]

    def input_size(self) -> tuple:
        """``(H, W)`` of the network's input; :class:`InferenceError` when not fixed."""
        shape = self.network.inputs[0].shape
        if shape[1] is None or shape[2] is None:
            raise InferenceError(f"model input has no fixed size ({tuple(shape)})")
        return int(shape[1]), int(shape[2])

    def class_names(self) -> list:
        return class_names_for(self.network, self.run)


def load_for_inference(checkpoint) -> InferenceModel:
    """Resolve ``checkpoint`` (a run, phase or checkpoints folder, or a ``.keras`` file:
    :func:`src.runs.resolve_checkpoint`), load it and return its inference network with
    the run's metadata."""
    ckpt = resolve_checkpoint(checkpoint)
    model = load_model_file(ckpt)
    return InferenceModel(checkpoint=ckpt, run=run_metadata(ckpt), model=model, network=inference_of(model))


# ---------------------------------------------------------------------------------------
# test-time augmentation
# ---------------------------------------------------------------------------------------
def resolve_tta(mode) -> str:
    """``"none"`` or ``"flip"`` from a config value (``false`` / ``null`` / ``none`` = off);
    ``ValueError`` for anything else."""
    if _off(mode):
        return "none"
    if isinstance(mode, str) and mode.strip().lower() == "flip":
        return "flip"
    raise ValueError(f"tta must be false or flip, got {mode!r}")


def unflip_boxes(boxes):
    """Normalised xyxy boxes predicted on a horizontally flipped image -> boxes of the
    original image: ``x' = 1 - x`` with ``x_min`` / ``x_max`` swapped (any leading shape)."""
    from keras import ops

    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    return ops.stack([1.0 - x1, y0, 1.0 - x0, y1], axis=-1)


def merge_flip(out: Mapping, out_flipped: Mapping) -> dict:
    """Average the outputs of an image (``out``) and of its horizontal mirror
    (``out_flipped``), key by key: ``boxes`` are un-flipped (:func:`unflip_boxes`),
    spatial outputs (rank 4: masks, reconstructions) flipped back along the width, then
    everything is averaged; class-type heads are averaged as they are."""
    from keras import ops

    merged = {}
    for k, a in out.items():
        b = out_flipped[k]
        if k.startswith("boxes"):
            b = unflip_boxes(b)
        elif k not in CLASS_TYPE and len(a.shape) == 4:
            b = ops.flip(b, axis=2)
        merged[k] = (a + ops.cast(b, a.dtype)) * ops.cast(0.5, a.dtype)
    return merged


def predict_with_tta(model, x, mode="none"):
    """``model(x, training=False)`` with test-time augmentation ``mode``
    (:func:`resolve_tta`): ``none`` = one pass; ``flip`` = the mean of the pass on ``x`` and
    on ``x`` flipped along the width, see :func:`merge_flip`. Returns what the model returns
    (a dict keyed by head, as a copy; a single tensor for a single-output model). Works
    eagerly and inside ``tf.function``; ``x`` is ``[B, H, W, C]``."""
    from keras import ops

    mode = resolve_tta(mode)
    out = model(x, training=False)
    single = not isinstance(out, Mapping)
    if mode == "none":
        return out if single else dict(out)
    flipped = model(ops.flip(x, axis=2), training=False)
    if single:
        return merge_flip({"output": out}, {"output": flipped})["output"]
    return merge_flip(out, flipped)


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
class ImageReadError(ValueError):
    """An image that cannot be used; the message is the reason."""


def read_image(path) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` (grey broadcast); :class:`ImageReadError` says why not."""
    import tensorflow as tf

    from .data.image_header import probe_header
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


def list_images(path, exclude=None) -> list:
    """The files to predict: ``path`` itself, or every file under a folder (recursive,
    sorted; hidden files and folders, and anything under ``exclude`` -- the output
    folder -- left out). :class:`InferenceError` when there is none."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InferenceError(f"input {p} does not exist")
    skip = Path(exclude).expanduser().resolve() if exclude is not None else None
    files = [f for f in sorted(p.rglob("*")) if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(p).parts)
             and not (skip is not None and skip in f.resolve().parents)]
    if not files:
        raise InferenceError(f"input folder {p} holds no files")
    return files


# ---------------------------------------------------------------------------------------
# the model's frame and the original image
# ---------------------------------------------------------------------------------------
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
        raise InferenceError(f"resize must be stretch or letterbox, got {resize!r}")
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
def fit_text_scale(text: str, width: int, preferred: float = 0.5, font=None) -> float:
    """The OpenCV font scale (at most ``preferred``) at which ``text`` fits ``width`` pixels."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX if font is None else font
    (tw, _), _ = cv2.getTextSize(text, font, 1.0, 1)
    return float(min(preferred, max(width - 6, 1) / max(tw, 1)))


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
        scale = fit_text_scale(label, w, preferred=max(0.4, min(h, w) / 600))
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(out, (0, 0), (min(w, tw + 6), th + base + 6), (0, 0, 0), -1)
        cv2.putText(out, label, (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return out


def write_png(path: Path, rgb_or_grey: np.ndarray) -> Path:
    """Write an RGB (or grey) uint8 image as PNG, creating the folder."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = rgb_or_grey if rgb_or_grey.ndim == 2 else cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
    return path


# ---------------------------------------------------------------------------------------
# image files in, answers in original pixels out
# ---------------------------------------------------------------------------------------
@dataclass
class Skipped:
    """A file that could not be read, and why."""

    path: Path
    reason: str


@dataclass
class ImagePrediction:
    """One image's answer in pixels of the original image (:meth:`Predictor.predict_files`)."""

    path: Path
    image: np.ndarray                       # the decoded RGB uint8 image
    frame: Frame
    predicted: Optional[str] = None         # the decided class (None: the model has no class output)
    confidence: Optional[float] = None
    probs: dict = field(default_factory=dict)   # {class name: probability}, in the model's class order
    p_tumor: Optional[float] = None
    labels: Optional[list] = None           # multilabel: every class with p >= threshold
    slot_boxes: Optional[np.ndarray] = None     # [K, 4] pixel xyxy, one per box slot (a box head)
    box: Optional[np.ndarray] = None        # [4] pixel xyxy: the predicted class's box, or the mask's
    mask: Optional[np.ndarray] = None       # uint8 0/1 at the original size (a mask head)
    mask_boxes: Optional[np.ndarray] = None     # [K, 4] every kept mask component's box, largest first
    drawn: Optional[np.ndarray] = None      # the box(es) the overlay draws

    @property
    def label(self) -> str:
        return f"{self.predicted} {self.confidence:.2f}" if self.predicted is not None else ""

    def overlay(self) -> np.ndarray:
        return draw_overlay(self.image, self.drawn, self.mask, self.label)


@dataclass
class ArrayImage:
    """An image already in memory (a slice of a volume): RGB uint8 ``[H, W, 3]`` and the
    path it is reported under."""

    path: Path
    image: np.ndarray


class Predictor:
    """A checkpoint ready to predict image files at their original size.

    Args:
        checkpoint: anything :func:`load_for_inference` takes.
        threshold: p(tumour) / multilabel threshold (None: the run's ``model.threshold``,
            else 0.5).
        resize: ``stretch`` | ``letterbox`` (None: the run's ``data.resize``, else stretch).
        tta: ``none`` / ``False`` or ``flip`` (:func:`predict_with_tta`).
        mask_threshold: foreground threshold of a mask head.
        boxes_from_mask: ``largest`` | ``components`` | ``False``: the boxes of a model with
            a mask head and no box head, read off the mask at the original size
            (:func:`mask_boxes`; components under ``boxes_min_area`` pixels ignored).
    """

    def __init__(self, checkpoint, threshold: Optional[float] = None, resize: Optional[str] = None, tta=None,
                 mask_threshold: float = 0.5, boxes_from_mask="largest", boxes_min_area: int = 0):
        self.tta = resolve_tta(tta)
        box_mode = resolve_box_mode(boxes_from_mask)
        self.loaded = load_for_inference(checkpoint)
        self.network = self.loaded.network
        self.size = self.loaded.input_size()
        self.heads = self.loaded.heads or ["class"]
        self.classes = self.loaded.class_names()
        meta = self.loaded.run
        self.threshold = float(threshold if threshold is not None else
                               (meta.threshold if meta.threshold is not None else 0.5))
        self.resize = resize or meta.resize or "stretch"
        if self.resize not in ("stretch", "letterbox"):
            raise InferenceError(f"resize must be stretch or letterbox, got {self.resize!r}")
        self.mask_threshold = float(mask_threshold)
        self.boxes_min_area = int(boxes_min_area or 0)
        has_boxes = "boxes" in self.heads
        #: the boxes_from_mask mode when the boxes are read off the mask (a mask head, no box head)
        self.mask_boxes = box_mode if "mask" in self.heads and not has_boxes else None
        n_slots = int(self.network.output["boxes"].shape[1]) if has_boxes else 0
        self.slot_names = [self.classes[k] if k < len(self.classes) else f"slot_{k}" for k in range(n_slots)]
        self.binary_only = "tumor" in self.heads and not any(h in self.heads for h in ("class", "multilabel",
                                                                                      "subtype"))
        self.prob_names = [NO_TUMOR, "tumor"] if self.binary_only else self.classes
        self._forward = None

    @property
    def checkpoint(self) -> Path:
        return self.loaded.checkpoint

    def forward(self, x: np.ndarray) -> dict:
        """The network's outputs (``tta`` applied) of a batch ``[B, H, W, 3]``, as numpy."""
        import tensorflow as tf

        if self._forward is None:  # traced once when every batch has the same size
            self._forward = tf.function(lambda t: predict_with_tta(self.network, t, self.tta))
        raw = self._forward(tf.constant(x))
        raw = raw if isinstance(raw, dict) else {self.heads[0]: raw}
        return {k: np.asarray(v) for k, v in raw.items()}

    def predict_files(self, files: Iterable, batch_size: int = 16,
                      progress: Optional[bool] = None) -> Iterator[Union[ImagePrediction, Skipped]]:
        """One :class:`Skipped` per unreadable file (at once, with a warning) and one
        :class:`ImagePrediction` per image (a batch at a time), each in file order.
        ``files`` may hold :class:`ArrayImage` items (slices of a volume)."""
        from tqdm.auto import tqdm

        files = list(files)
        bs = max(1, int(batch_size))
        batch: list = []
        disable = None if progress is None else not progress   # None: a bar only on a terminal
        with tqdm(total=len(files), unit="img", desc="predict", disable=disable) as bar:
            for f in files:
                try:
                    if isinstance(f, ArrayImage):
                        img, f = f.image, f.path
                    else:
                        img = read_image(f)
                except ImageReadError as e:
                    log.warning("skipped %s: %s", f, e)
                    bar.update(1)
                    yield Skipped(Path(f), str(e))
                    continue
                frame = frame_for(img.shape[0], img.shape[1], self.size, self.resize)
                batch.append((Path(f), img, frame, prepare(img, frame)))
                if len(batch) >= bs:
                    yield from self._predict_batch(batch, bs)
                    batch = []
                bar.update(1)
            yield from self._predict_batch(batch, bs)

    def _predict_batch(self, batch: list, bs: int) -> Iterator[ImagePrediction]:
        if not batch:
            return
        x = np.zeros((bs, *self.size, 3), np.float32)   # padded to bs: one traced shape
        x[:len(batch)] = np.stack([b[3] for b in batch])
        outs = {k: v[:len(batch)] for k, v in self.forward(x).items()}
        dec = decide(outs, self.prob_names if self.binary_only else self.classes, self.threshold)
        for i, (path, img, frame, _) in enumerate(batch):
            yield self._to_original(ImagePrediction(path=path, image=img, frame=frame), i, outs, dec)

    def _to_original(self, r: ImagePrediction, i: int, outs: dict, dec: dict) -> ImagePrediction:
        if dec["pred"] is not None:
            k = int(dec["pred"][i])
            r.predicted = self.prob_names[k] if k < len(self.prob_names) else f"class_{k}"
            r.confidence = float(dec["probs"][i, k])
            r.probs = {c: float(dec["probs"][i, j]) for j, c in enumerate(self.prob_names)}
        if dec["p_tumor"] is not None:
            r.p_tumor = float(dec["p_tumor"][i])
        if dec["labels"] is not None:
            r.labels = list(dec["labels"][i])
        if "boxes" in outs:
            r.slot_boxes = boxes_to_pixels(outs["boxes"][i], r.frame)
            if r.predicted is not None and r.predicted != NO_TUMOR and r.predicted in self.slot_names:
                r.box = r.drawn = r.slot_boxes[self.slot_names.index(r.predicted)]
        if "mask" in outs:
            r.mask = mask_to_original(outs["mask"][i], r.frame, self.mask_threshold)
            if self.mask_boxes:  # no box head: boxes of the mask's components, in original pixels
                r.mask_boxes = mask_boxes(r.mask, 0.5, "components", self.boxes_min_area)
                chosen = r.mask_boxes[:1] if self.mask_boxes == "largest" else r.mask_boxes
                r.box = union_box(chosen)
                if r.box is not None:
                    r.drawn = chosen
        return r

