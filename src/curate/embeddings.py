"""Optional embedding neighbours: image features from a backbone or a trained checkpoint.

``curate.embeddings`` is

* ``null`` - no embedding pass (the default: hashing finds copies; embeddings find
  *similar* images, which are candidates to review, not proof of a copy);
* a backbone name of :func:`src.models.backbones.list_backbones` (``mobilenet_v3_small``,
  ``efficientnet_b0``, ``resnet50`` ...): its deepest feature map (P5), global-average
  pooled, with ``curate.embedding_weights``: ``imagenet`` (downloaded once into
  ``~/.keras/models``; offline this fails in seconds with a message naming the
  alternatives), ``null`` (random weights: only a smoke test, the features mean little),
  or a local weights file;
* the path of a ``.keras`` checkpoint of this library (``src.train`` writes
  ``phase<N>/checkpoints/best.keras``): the output of its last global pooling layer (or,
  without one, its deepest feature map, pooled), at the checkpoint's own input size.

Images are read with OpenCV, converted to RGB, resized (area) to the network input and
scaled to ``[0, 1]``; a backbone's own preprocessing is applied on top (checkpoints
normalise inside the network).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.dedup.hashing import Progress, default_workers, parallel_imap
from ..data.records import DataError

log = logging.getLogger(__name__)


def _read_rgb01(path: str, size: tuple[int, int]) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: unreadable image")
    img = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return img.astype(np.float32) / 255.0


def _is_checkpoint(spec: str) -> bool:
    return spec.endswith(".keras") or os.path.isfile(os.path.expanduser(spec))


def _checkpoint_extractor(path: str):
    import keras

    from ..models.task import load_checkpoint

    model = load_checkpoint(os.path.expanduser(path))
    net = getattr(model, "network", model)
    pools = [l for l in net.layers if isinstance(l, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))]
    if pools:
        layer = pools[-1]
        feats = keras.Model(net.inputs[0] if len(net.inputs) == 1 else net.inputs, layer.output)
        where = f"{layer.name} (pooled features)"
    else:
        maps = []
        for i, l in enumerate(net.layers):
            out = l.output
            if not isinstance(out, (list, tuple, dict)) and len(out.shape) == 4 and out.shape[1] and out.shape[2]:
                maps.append((out.shape[1] * out.shape[2], -i, l))
        if not maps:
            raise DataError(f"checkpoint {path}: no pooling layer and no 4-D feature map to take embeddings from")
        _, _, layer = min(maps, key=lambda t: (t[0], t[1]))
        inp = net.inputs[0] if len(net.inputs) == 1 else net.inputs
        feats = keras.Sequential([keras.Model(inp, layer.output), keras.layers.GlobalAveragePooling2D()])
        where = f"{layer.name} (global-average pooled)"
    shape = tuple(net.inputs[0].shape[1:3])
    log.info("embeddings from checkpoint %s: layer %s, input %s", path, where, shape)
    return (lambda x: feats(x, training=False)), shape, f"checkpoint {path}: {where}"


def _backbone_extractor(name: str, weights, size: int, cache_dir: Optional[str]):
    import keras

    from ..models.backbones import create_backbone
    from ..models.layers import Preprocess
    from ..models.weights import WeightsUnavailableError

    if isinstance(weights, str) and weights.strip().lower() in ("", "none", "null"):
        weights = None
    try:
        bb = create_backbone(name, (size, size, 3), weights=weights, trainable=False, cache_dir=cache_dir)
    except WeightsUnavailableError as e:
        msg = str(e).replace("train from scratch: model.weights=null",
                             "random features (a smoke test only): curate.embedding_weights=null")
        msg = msg.replace("model.weights", "curate.embedding_weights")
        raise WeightsUnavailableError(
            msg + "\n  - or embed with a trained checkpoint: curate.embeddings=/path/to/best.keras") from None
    deepest = sorted(bb.output)[-1]  # P5
    pool = keras.layers.GlobalAveragePooling2D()
    scale = Preprocess(bb.preprocessing)

    def fn(x):
        return pool(bb(scale(x), training=False)[deepest])

    if weights is None:
        log.warning("embeddings from %s with random weights (curate.embedding_weights=null): a smoke test, "
                    "the neighbours it finds mean little", name)
    return fn, (size, size), f"backbone {name} ({deepest}, weights {weights or 'random'})"


def check_spec(spec: str) -> None:
    """Fail fast (before hashing) on a missing checkpoint or an unknown backbone name."""
    spec = str(spec)
    if _is_checkpoint(spec):
        if not Path(os.path.expanduser(spec)).is_file():
            raise FileNotFoundError(f"checkpoint {spec} does not exist (curate.embeddings: a backbone name or "
                                    "a .keras checkpoint)")
        return
    from ..models.backbones import list_backbones

    if spec not in list_backbones():
        raise DataError(f"curate.embeddings={spec!r} is neither an existing checkpoint file nor a backbone name "
                        f"({list_backbones()})")


def make_extractor(spec: str, weights=None, size: int = 224, cache_dir: Optional[str] = None):
    """``(fn, (height, width), description)``: ``fn`` maps a ``[B, H, W, 3]`` batch in ``[0, 1]``
    to ``[B, D]`` features. Built before any hashing, so a missing download fails first."""
    spec = str(spec)
    check_spec(spec)
    if _is_checkpoint(spec):
        return _checkpoint_extractor(spec)
    return _backbone_extractor(spec, weights, int(size), cache_dir)


def embed_images(paths: Sequence[str], spec, weights=None, size: int = 224, batch: int = 32,
                 workers: Optional[int] = None, cache_dir: Optional[str] = None,
                 progress: bool = True) -> tuple[np.ndarray, str]:
    """``(features (n, d) float32, description)`` for ``paths``; ``spec`` is a backbone name,
    a checkpoint path or an extractor from :func:`make_extractor`."""
    fn, shape, desc = spec if isinstance(spec, tuple) else make_extractor(spec, weights, size, cache_dir)
    paths = list(paths)
    w = default_workers(workers)
    bar = Progress(len(paths), "embedding", enabled=progress)
    out, buf = [], []
    try:
        for img in parallel_imap(lambda p: _read_rgb01(p, shape), paths, w, chunk=8):
            buf.append(img)
            if len(buf) == batch:
                out.append(np.asarray(fn(np.stack(buf))))
                bar.update(len(buf))
                buf = []
        if buf:
            out.append(np.asarray(fn(np.stack(buf))))
            bar.update(len(buf))
    finally:
        bar.close()
    feats = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1), np.float32)
    return feats.reshape(len(feats), -1), desc
