"""The tf.data pipeline: records -> ``(x, targets, sample_weights)`` batches.

Usage::

    ds = build_dataset(records, class_map, cfg, training=True)
    for x, targets, weights in ds: ...

This module holds the config, the plan and :func:`build_dataset`; the pieces live in
:mod:`src.data.image_header` (headers, frames, decoders), :mod:`src.data.targets`
(targets and weights), :mod:`src.data.packed_masks`, :mod:`src.data.sampling`
(``sampling`` and mixes) and :mod:`src.data.pipeline_graph` (the tf.data graph).

What happens, in order
----------------------
1. **Once, in Python, when the dataset is built** (:func:`plan_pipeline`): every image
   header is read (format from the file signature, size, grey or colour); the JPEG DCT
   scale (``ratio`` 2/4/8) that reaches the target size without upsampling is chosen per
   image; every target and its sample weight is computed per record (boxes already moved
   into the resized / letterboxed frame); masks are read, resized (nearest) to the target
   frame and kept as a bit-packed crop of their bounding box (``mask_format: packed``,
   the default; a few hundred bytes a mask) or left as files that the graph decodes
   every time (``mask_format: png``). Polygons without a mask file are rasterised by
   :func:`src.data.masks.materialise_masks` into ``mask_cache_dir``.
2. **Decode, per batch of records** (one tf.data call a batch, ``num_parallel_calls``
   batches at once: tf.data's per-element overhead is ~0.1 ms an image): read each file,
   check its signature (an assert that names the file), decode (``decode_jpeg`` with the
   chosen ``ratio`` / ``decode_png``; grey decoded as 1 channel when *every* image is
   grey, else as 3), resize (only if the decoded size is not the target: bilinear with
   antialiasing) and letterbox-pad; everything stays ``uint8``. With ``cache`` (``auto``:
   in memory for a training set that fits) the decoded images are instead produced per
   element once, kept, and shuffled and batched from the cache in later epochs.
3. **Per batch**: geometric augmentation (one affine matrix per image applied to image
   (bilinear), mask (nearest) and boxes; flips alone take an exact cheap path; packed
   masks are warped straight from their crops, only where they can land:
   :class:`~src.data.packed_masks.PackedMasks`), conversion to float ``[0, 1]``, photometric augmentation
   (Keras layers), grey broadcast to 3 channels,
   targets and weights (gathered from per-record tables by record index).

Targets and sample weights (dicts with the same keys; ``B`` batch, ``C`` =
``class_map.num_classes``, ``M`` = ``max_boxes``):

=====================  =========================  ===========  ==================================
key                    target                     weight       weight is 1 when
=====================  =========================  ===========  ==================================
``class``              int32 ``[B]`` id in        ``[B]``      label known and in ``classes``
                       ``classes`` (0 if unknown)
``multilabel``         float32 ``[B, C]`` multi-  ``[B]``      label known, unless it is the
                       hot of {label} + box                    generic ``tumor`` and ``tumor`` is
                       classes (``no_tumor`` set               not a class (subtype unknown); a
                       only for negatives)                     known label outside ``classes``
                                                               is a true all-zero row
``tumor``              float32 ``[B]`` 1 tumour,  ``[B]``      label known (generic ``tumor``
                       0 healthy                               included), or label unknown but
                                                               known boxes exist (-> 1)
``subtype``            int32 ``[B]`` id in        ``[B]``      label is one of the tumour
                       ``tumor_classes``                       classes (healthy / generic: 0)
``class_set``          float32 ``[B, C]`` multi-  ``[B]``      (with ``class``) the label is the
                       hot of the classes the                  generic ``tumor``, ``tumor`` is not
                       label may be (every                     a class and ``no_tumor`` is: the
                       tumour class)                           class head learns tumour vs healthy
                                                               (``-log sum p(set)``), no subtype
``boxes``              float32 ``[B, C, 4]``      ``[B, C]``   boxes known and slot ``k`` has a
                       xyxy: slot ``k`` = box                  box (still inside the image after
                       enclosing all boxes of                  augmentation)
                       class ``k``
``boxes_all``          float32 ``[B, M, 4]``      ``[B]`` = 0  (evaluation only)
``boxes_all_classes``  int32 ``[B, M]``, -1 for   ``[B]`` = 0  (evaluation only)
                       padding, for a class that
                       is not in ``classes`` and
                       for a box augmented out
``boxes_all_count``    int32 ``[B]`` boxes        ``[B]`` = 0  (evaluation only)
                       listed before padding
``mask``               float32 ``[B, H, W, 1]``   ``[B]``      mask known (a known-empty mask of a
                       0/1 (zeros if unknown)                  negative counts)
=====================  =========================  ===========  ==================================

A known box or mask target that a model made (``record.pseudo``: CAM pseudo masks from
``src.explain what=pseudo_masks``) gets weight ``pseudo_weight`` instead of 1.

An unknown target is never a negative: it gets weight 0. ``x`` is float32
``[B, H, W, 3]`` in ``[0, 1]``, whatever the model: a network scales its own inputs (its
``Preprocess`` layer, :data:`src.models.layers.PREPROCESS_MODES`), so there is no
``data.preprocessing``. A reconstruction head uses ``x`` itself (no ``image`` target).

Config keys (``cfg``: a dict or an OmegaConf node; other keys are ignored)
-------------------------------------------------------------------------
``image_size`` (256)           int or ``[height, width]`` of ``x``.
``resize`` (``stretch``)       ``stretch`` to the size, or ``letterbox`` (keep the aspect
                               ratio, pad with zeros, centred; boxes/masks follow).
``batch_size`` (32)
``shuffle_buffer`` (None)      training only: None = the whole dataset (records are
                               shuffled before decoding, so this costs little), 0 = off.
                               With ``cache`` the decoded elements are shuffled instead.
``cache`` (``auto``)           ``auto`` | False | ``"memory"`` | a file path prefix: keep the
                               decoded, resized ``uint8`` images (before augmentation) so
                               later epochs skip reading and decoding. ``auto``: in memory
                               for a training dataset whose decoded images fit in
                               :data:`CACHE_AUTO_FRACTION` of the available memory (its
                               estimate and the decision are in ``plan.summary()``), else
                               off; evaluation datasets are not cached by ``auto``.
``augment`` ({})               training only; keys and gentle defaults in
                               :data:`src.data.augment.AUGMENT_DEFAULTS` (``hflip``,
                               ``vflip``, ``rotate_deg``, ``scale``, ``shift``,
                               ``affine_prob``, ``brightness``, ``contrast``,
                               ``saturation``, ``hue``, ``noise_std``, ``blur_prob``,
                               ``blur_sigma``, ``blur_kernel``, ``*_prob``, ``warp``).
                               ``augment: null`` or every strength 0 = no augmentation.
                               ``warp``: ``auto`` (= ``cv2``: OpenCV inside
                               ``tf.numpy_function``, fastest; single host), ``xla``
                               (pure TF graph) or ``tf`` (``ImageProjectiveTransformV3``).
                               With ``xla`` / ``tf`` packed masks are also expanded by TF
                               ops (no Python in the graph at all; slower), in training
                               and evaluation datasets alike.
``max_boxes`` (None)           padding of ``boxes_all``; None = most boxes on one record.
``seed`` (None)                shuffling and augmentation seed (None: random).
``sampling`` (``natural``)     training only: ``natural`` (every record once a pass,
                               shuffled), ``balanced`` (every class equally likely:
                               rejection sampling; a mix: within each source, sources by
                               weight) or ``weights`` (a mix: each record drawn from a
                               source with probability proportional to its weight, one
                               shuffled endless stream per source, each cached on its own,
                               mixed by ``sample_from_datasets``, seeded). An epoch is one
                               pass' worth of records in every mode.
``sources`` (None)             a mix's ``data.sources`` (``[{name, weight, ...}]``; only
                               ``name`` and ``weight`` are read): records are matched to a
                               source by ``Record.source``.
``drop_remainder`` (False)
``num_parallel_calls`` (auto)  ``auto`` (tf.data AUTOTUNE) or an int.
``repeat`` (False)             False | True (forever) | number of epochs.
``deterministic`` (True)       element order fixed (needed for seeded reproducibility);
                               False lets tf.data hand out whichever element is ready.
``mask_format`` (``packed``)   ``packed``: masks are read once when the dataset is built
                               and kept, at the target size, as a bit-packed crop of
                               their bounding box (a few hundred bytes a mask), expanded
                               in the graph; ``png``: the graph decodes the mask file
                               every time (costs more than the image: ~0.9 ms per
                               512x512 PNG per core on the benchmark machine).
``pseudo_weight`` (1.0)        sample weight of pseudo (model-made) box and mask targets.
``mask_cache_dir`` (None)      where polygons are rasterised to PNGs and packed masks are
                               cached between runs; required when records have polygons
                               but no mask file.
``channels`` (``auto``)        decode channels: ``auto`` = 1 when every image is grey
                               (then broadcast to 3 at the end: cheaper), else 3.
``dct_scaling`` (True)         decode JPEGs at 1/2, 1/4, 1/8 scale when that is still at
                               least the target size.
``xla`` (True)                 compile the per-batch image work (flips, float conversion,
                               photometric augmentation, grey -> 3
                               channels) with XLA: one fused kernel instead of many memory
                               passes (2-5x cheaper on CPU; ~1-2 s of compilation per
                               batch shape, shared by datasets with the same settings).

Errors
------
Readers probe every image, so an unreadable file should never get here. When the
dataset is built, files whose header cannot be read or whose format is unsupported raise
:class:`~src.data.records.DataError` naming the file. In the graph, each image's
signature (and a JPEG's end-of-image marker, when it had one at build time) is checked
before decoding: a file changed or truncated since raises ``InvalidArgumentError`` whose
message names the file. A file corrupt *inside* the compressed data fails in TensorFlow's
decoder, whose message cannot name the file: :func:`check_decodable` decodes every image
and mask eagerly and names the culprits.
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf

from ..heads import CLASS_SET, target_key
from . import augment as aug
from .image_header import _FMT_IDS, _dct_ratio, _decoder, _fit, probe_header
from .packed_masks import _mask_sources, encode_packed_masks
from .pipeline_graph import _make_dataset
from .records import ClassMap, DataError, Record
from .sampling import SAMPLING, _accept_probabilities, _plan_mix, _source_weights, sampling_distributions
from .targets import _BOXES_ALL, TARGET_KEYS, encode_targets

log = logging.getLogger(__name__)

PIPELINE_DEFAULTS: dict[str, Any] = {
    "image_size": 256,
    "resize": "stretch",
    "batch_size": 32,
    "shuffle_buffer": None,
    "cache": "auto",
    "augment": {},
    "max_boxes": None,
    "seed": None,
    "drop_remainder": False,
    "num_parallel_calls": "auto",
    "repeat": False,
    "deterministic": True,
    "mask_format": "packed",
    "mask_cache_dir": None,
    "channels": "auto",
    "dct_scaling": True,
    "xla": True,
    "sampling": "natural",
    "pseudo_weight": 1.0,
    "sources": None,
}

_IGNORED_HEADS = ("image", "reconstruction")
#: ``cache: auto`` keeps a training set's decoded images in memory when they fit in this
#: fraction of the memory available when the dataset is built.
CACHE_AUTO_FRACTION = 0.25


# ---------------------------------------------------------------------------------------
# images are [0, 1]: the model scales them (no data.preprocessing)
# ---------------------------------------------------------------------------------------
_NO_PREPROCESSING = ("auto", "none")


def _check_no_preprocessing(value) -> None:
    """``data.preprocessing`` is gone: the pipeline always yields [0, 1] RGB images and the
    network scales them itself (its ``Preprocess`` layer: the backbone's mode in
    ``src.models.backbones.SPECS``, ``model.input_scaling`` for efficient_mtnet). ``auto`` and
    ``none`` (which mean exactly that) are accepted: saved run configs still hold them."""
    if value in (None, False) or str(value).strip().lower() in _NO_PREPROCESSING:
        return
    raise ValueError(f"data.preprocessing={value!r} is no longer a data setting: the pipeline always yields [0, 1] "
                     "images and the model scales its own inputs (the backbone's preprocessing in "
                     "src/models/backbones.py, or model.input_scaling for efficient_mtnet); remove data.preprocessing")


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
def _to_plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def pipeline_config(cfg) -> dict:
    """Defaults merged with ``cfg`` (a dict or OmegaConf node), validated."""
    user = _to_plain(cfg)
    _check_no_preprocessing(user.pop("preprocessing", None))
    out = dict(PIPELINE_DEFAULTS)
    for k, v in user.items():
        if k in PIPELINE_DEFAULTS:
            out[k] = v
        else:
            close = difflib.get_close_matches(k, PIPELINE_DEFAULTS, n=1, cutoff=0.8)
            if close:
                log.warning("data config key %r is not a pipeline key; did you mean %r?", k, close[0])
    size = out["image_size"]
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    else:
        size = tuple(int(v) for v in size)
        if len(size) != 2:
            raise ValueError(f"data.image_size must be an int or [height, width], got {out['image_size']}")
    if min(size) < 1:
        raise ValueError(f"data.image_size must be positive, got {out['image_size']}")
    out["image_size"] = size
    if out["resize"] not in ("stretch", "letterbox"):
        raise ValueError(f"data.resize must be 'stretch' or 'letterbox', got {out['resize']!r}")
    if int(out["batch_size"]) < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {out['batch_size']}")
    if out["mask_format"] not in ("packed", "png"):
        raise ValueError(f"data.mask_format must be 'packed' or 'png', got {out['mask_format']!r}")
    if out["channels"] not in ("auto", 1, 3):
        raise ValueError(f"data.channels must be auto, 1 or 3, got {out['channels']!r}")
    if out["cache"] not in (False, None, "memory", "auto") and not isinstance(out["cache"], (str, os.PathLike)):
        raise ValueError(f"data.cache must be auto, false, 'memory' or a file path, got {out['cache']!r}")
    if out["cache"] == "":
        out["cache"] = False
    if not 0.0 <= float(out["pseudo_weight"]) <= 1.0:
        raise ValueError(f"data.pseudo_weight must be in [0, 1], got {out['pseudo_weight']!r}")
    if out["sampling"] not in SAMPLING:
        raise ValueError(f"data.sampling must be one of {' | '.join(SAMPLING)}, got {out['sampling']!r}")
    out["sources"] = _source_weights(out["sources"])
    if out["sampling"] == "weights" and not out["sources"]:
        raise ValueError("data.sampling=weights draws the sources of a mix by their weights (data.sources); this data "
                         "has no sources: use natural or balanced, or data=mix")
    npc = out["num_parallel_calls"]
    out["num_parallel_calls"] = tf.data.AUTOTUNE if npc in ("auto", None, -1, "AUTOTUNE") else int(npc)
    out["augment"] = aug.augment_config(out["augment"] or {}) if out["augment"] is not None else None
    return out


# ---------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------
def _resolve_heads(heads) -> set:
    if heads is None:
        return set(TARGET_KEYS)
    if isinstance(heads, str):
        heads = [heads]
    out = set()
    for h in heads:
        h = target_key(h)  # mask_aux1 -> mask; recon -> x (the input itself)
        if h in _IGNORED_HEADS or h == "x":
            continue
        if h not in TARGET_KEYS:
            raise ValueError(f"unknown target/head {h!r}; targets are {list(TARGET_KEYS)} "
                             f"({list(_IGNORED_HEADS)} use x itself)")
        out.add(h)
        if h in _BOXES_ALL:
            out.update(_BOXES_ALL)
    return out


@dataclass
class PipelinePlan:
    """Everything decided in Python before the graph runs (see :func:`plan_pipeline`)."""

    cfg: dict
    training: bool
    heads: set
    n: int
    channels: int
    codecs: list                  # [(fmt, ratio)] in codec-index order
    table: dict                   # per-record arrays fed to from_tensor_slices
    targets: dict                 # per-record targets / weights, gathered per batch by index
    any_resize: bool
    any_pad: bool
    mask_bytes: int = 0
    stats: dict = field(default_factory=dict)
    sample_class: Optional[np.ndarray] = None  # [N] class id, num_classes for an unknown label
    accept: Optional[np.ndarray] = None  # [N] keep probability of each record (sampling=balanced)
    mix: Optional[dict] = None  # training a mix by source weights: {"names", "indices", "probs"}

    def summary(self) -> dict:
        return {"records": self.n, "channels_decoded": self.channels, "codecs": [f"{f}/{r}" for f, r in self.codecs],
                "heads": sorted(self.heads), "mask_format": self.cfg["mask_format"],
                "mask_memory_bytes": self.mask_bytes, **self.stats}

    def dataset(self) -> tf.data.Dataset:
        return _make_dataset(self)


def _frames_and_codecs(records, infos, size, cfg):
    """Per record: the frame in the target size (resized + letterbox offsets), the decoder
    (format and JPEG DCT ratio, as an index into the distinct ``codecs``) and whether the
    decoded image still needs a resize."""
    geometry, codec_of, codecs, need_resize = [], [], [], []
    for r, info in zip(records, infos):
        if r.width and r.height and (r.width, r.height) != (info.width, info.height):
            log.debug("%s: record size %sx%s differs from header %sx%s; using the header",
                      r.image, r.width, r.height, info.width, info.height)
        g = _fit(info.height, info.width, size, cfg["resize"])
        geometry.append(g)
        ratio = _dct_ratio(info.height, info.width, g[0], g[1]) if (info.fmt == "jpeg" and cfg["dct_scaling"]) else 1
        key = (info.fmt, ratio)
        if key not in codecs:
            codecs.append(key)
        codec_of.append(codecs.index(key))
        dh, dw = math.ceil(info.height / ratio), math.ceil(info.width / ratio)
        need_resize.append((dh, dw) != (g[0], g[1]))
    return geometry, codec_of, codecs, need_resize


def plan_pipeline(records: Sequence[Record], class_map: ClassMap, cfg, training: bool,
                  heads: Optional[Iterable[str]] = None) -> PipelinePlan:
    """Probe headers, choose decoders, compute targets and masks (see module docstring)."""
    cfg = pipeline_config(cfg)
    records = list(records)
    if not records:
        raise DataError("build_dataset: no records")
    heads_set = _resolve_heads(heads)
    size = cfg["image_size"]
    H, W = size
    if "mask" in heads_set and any(r.mask is None and r.polygons and r.known.get("mask") for r in records):
        if cfg["mask_cache_dir"] is None:
            _mask_sources(records, heads_set)  # raises with the file named
        from .masks import materialise_masks

        records = [copy.copy(r) for r in records]  # the caller's records keep mask=None
        materialise_masks(records, Path(cfg["mask_cache_dir"]) / "polygons")

    infos = [probe_header(r.image) for r in records]
    channels = cfg["channels"]
    if channels == "auto":
        channels = 1 if all(i.channels == 1 for i in infos) else 3
    geometry, codec_of, codecs, need_resize = _frames_and_codecs(records, infos, size, cfg)
    max_boxes = cfg["max_boxes"]
    if max_boxes is None:
        max_boxes = max([1] + [len(r.boxes) for r in records])
    targets = encode_targets(records, class_map, geometry, size, int(max_boxes), float(cfg["pseudo_weight"]))

    geo = np.array(geometry, np.int32).reshape(-1, 4)
    mask_box = np.zeros((len(records), 4), np.int32)
    table = {"path": np.array([r.image for r in records], dtype=object)}
    tgt = {}
    for k, v in targets.items():
        base = k[:-2] if k.endswith("_w") else k
        # class_set only where some record needs it (a dataset without generic tumours is unchanged)
        with_set = base == CLASS_SET and "class" in heads_set and bool(targets[CLASS_SET + "_w"].any())
        if base in heads_set or (k == "mask_w" and "mask" in heads_set) or with_set:
            tgt[k] = v
    mask_bytes = 0
    if "mask" in heads_set:
        sources = _mask_sources(records, heads_set)
        if cfg["mask_format"] == "packed":
            mask_box, bits, lengths = encode_packed_masks(sources, geometry, size, cfg["mask_cache_dir"])
            table["mask_bits"] = (bits, lengths)
            mask_bytes = int(mask_box.nbytes + bits.nbytes + lengths.nbytes)
        else:
            table["mask_path"] = np.array([p or "" for p in sources], dtype=object)
            mask_box[:, 0] = [p is not None for p in sources]
    # one small int vector per record (fewer tf.data components = less per-element work)
    table["meta"] = np.concatenate([
        np.arange(len(records), dtype=np.int32)[:, None],
        np.array([_FMT_IDS[i.fmt] for i in infos], np.int32)[:, None],
        np.array(codec_of, np.int32)[:, None],
        np.array([i.clean_end for i in infos], np.int32)[:, None],
        np.array(need_resize, np.int32)[:, None],
        geo, mask_box], axis=1).astype(np.int32)
    cache, cache_note = _resolve_cache(cfg["cache"], bool(training), len(records), size, channels,
                                       "mask" in heads_set and cfg["mask_format"] == "png")
    cfg = {**cfg, "cache": cache}
    if training and cache_note != "set in config":
        log.info("data cache: %s (%s)", cache if cache else "off", cache_note)
    stats = {
        "cache": cache if cache else "off",
        "cache_decision": cache_note,
        "dct_ratio_counts": {f"{f}/{r}": int(np.sum(np.array(codec_of) == i)) for i, (f, r) in enumerate(codecs)},
        "resized_after_decode": int(np.sum(need_resize)),
        "image_size": list(size),
    }
    sample_class = np.where(targets["class_w"] > 0, targets["class"], class_map.num_classes).astype(np.int32)
    mix = _plan_mix(records, cfg, stats) if training and cfg["sources"] and cfg["sampling"] != "natural" else None
    accept = None
    if training and cfg["sampling"] == "balanced":
        groups = mix["indices"] if mix else [np.arange(len(records))]
        accept = np.zeros(len(records), np.float32)
        for k, idx in enumerate(groups):  # every class equally likely within each stream (the data, or a source)
            dist = sampling_distributions(sample_class[idx], class_map.num_classes)
            accept[idx] = _accept_probabilities(dist)[sample_class[idx]]
            if mix:
                stats["sampling"]["sources"][mix["names"][k]].update(dist)
            else:
                stats["sampling"] = {"mode": "balanced", **dist}
                log.info("data sampling: balanced (class shares %s -> %s; last entry: unknown label)",
                         dist["initial"], dist["target"])
    return PipelinePlan(cfg=cfg, training=bool(training), heads=heads_set, n=len(records), channels=channels,
                        codecs=codecs, table=table, targets=tgt, any_resize=any(need_resize),
                        any_pad=any(g[2] or g[3] or g[0] != H or g[1] != W for g in geometry),
                        mask_bytes=mask_bytes, stats=stats, sample_class=sample_class, accept=accept, mix=mix)


def available_memory() -> Optional[int]:
    """Bytes of memory available to new work (``MemAvailable``; None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _resolve_cache(cache, training: bool, n: int, size, channels: int, png_masks: bool):
    """``cache`` config -> (False | "memory" | path, why). See the ``cache`` key."""
    if cache != "auto":
        return (cache or False), "set in config"
    if not training:
        return False, "auto: evaluation datasets are read once per pass, not cached"
    need = n * size[0] * size[1] * (channels + (1 if png_masks else 0))
    avail = available_memory()
    mb = f"{need / 2**20:,.0f} MB"
    if avail is None:
        return False, f"auto: decoded images need {mb}; available memory unknown, not cached"
    budget = CACHE_AUTO_FRACTION * avail
    if need <= budget:
        return "memory", f"auto: decoded images need {mb} <= {CACHE_AUTO_FRACTION:.0%} of {avail / 2**30:.1f} GB available"
    return False, (f"auto: decoded images need {mb} > {CACHE_AUTO_FRACTION:.0%} of {avail / 2**30:.1f} GB available; "
                   "decoding every epoch (set data.cache=memory or a file path to force a cache)")


# ---------------------------------------------------------------------------------------
# the dataset (its graph: src.data.pipeline_graph)
# ---------------------------------------------------------------------------------------
def build_dataset(records: Sequence[Record], class_map: ClassMap, cfg, training: bool,
                  heads: Optional[Iterable[str]] = None) -> tf.data.Dataset:
    """``tf.data.Dataset`` of ``(x, targets, sample_weights)`` batches (module docstring).

    ``heads`` restricts the targets emitted (and the work done: no mask decoding without
    ``mask``, no box transforms without ``boxes``); ``image`` / ``reconstruction`` are
    accepted and ignored (they use ``x``). ``None`` = every target.
    """
    return plan_pipeline(records, class_map, cfg, training, heads).dataset()


# ---------------------------------------------------------------------------------------
# debugging helpers
# ---------------------------------------------------------------------------------------
def describe_batch(batch) -> str:
    """Readable summary of one ``(x, targets, weights)`` batch: shapes, dtypes, ranges and
    how many samples of each target carry weight."""
    x, y, w = batch
    x = np.asarray(x)
    lines = [f"x: {x.dtype} {list(x.shape)} range [{x.min():.3f}, {x.max():.3f}] mean {x.mean():.3f}"]
    for k in y:
        t = np.asarray(y[k])
        wk = np.asarray(w[k]) if k in w else None
        extra = ""
        if wk is not None:
            extra = f"; weight {list(wk.shape)} sum {wk.sum():.0f}"
        if t.dtype.kind == "f":
            extra = f" range [{t.min():.3f}, {t.max():.3f}]" + extra
        lines.append(f"{k}: {t.dtype} {list(t.shape)}{extra}")
    return "\n".join(lines)


def check_decodable(records: Iterable[Record], include_masks: bool = True) -> list[tuple[str, str]]:
    """Decode every image (and mask file) eagerly with TensorFlow's decoders and return
    ``[(path, error)]`` for those that fail: the way to name a file that breaks the
    pipeline inside the decoder."""
    bad = []
    seen = set()
    for r in records:
        paths = [r.image] + ([r.mask] if include_masks and r.mask else [])
        for p in paths:
            if p in seen:
                continue
            seen.add(p)
            try:
                info = probe_header(p)
                _decoder(info.fmt, 1, 3)(tf.io.read_file(p))
            except (DataError, tf.errors.OpError) as e:
                bad.append((p, str(getattr(e, "message", e)).splitlines()[0]))
    return bad
