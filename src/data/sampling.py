"""Training-set sampling of the pipeline (``data.sampling``: ``natural``, ``balanced`` or
``weights``; :mod:`src.data.pipeline`): a mix's source weights and streams, the class
distributions of balanced sampling and the rejection sampler that draws them, and the
seed of each stream."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from .records import DataError, Record

log = logging.getLogger(__name__)


SAMPLING = ("natural", "balanced", "weights")


def _source_weights(sources) -> Optional[dict]:
    """``data.sources`` (a list of ``{name, weight, ...}``) -> ``{name: weight}`` (None: no mix)."""
    if not sources:
        return None
    if isinstance(sources, dict):
        return {str(k): float(v) for k, v in sources.items()}
    out = {}
    for s in sources:
        s = dict(s)
        out[str(s.get("name") or s.get("reader"))] = float(s.get("weight", 1.0))
    return out


def _plan_mix(records: Sequence[Record], cfg: dict, stats: dict) -> Optional[dict]:
    """Training streams of a mix (``sampling: weights | balanced``): the record indices of
    each source with a weight > 0 and records, and the probability of drawing from it."""
    weights = cfg["sources"]
    names = [r.source for r in records]
    unknown = sorted(set(names) - set(weights))
    if unknown:
        raise DataError(f"records of source(s) {unknown} but data.sources lists {sorted(weights)}")
    kept, info = [], {}
    for name, w in weights.items():
        idx = np.flatnonzero(np.array(names, dtype=object) == name)
        info[name] = {"records": int(len(idx)), "weight": float(w)}
        if len(idx) and w > 0:
            kept.append((name, idx, float(w)))
        elif len(idx):
            log.warning("data sampling: source %s has weight 0: its %d training records are never drawn", name,
                        len(idx))
    if not kept:
        raise DataError("data sampling: no source has both training records and a weight > 0")
    total = sum(w for _, _, w in kept)
    probs = [w / total for _, _, w in kept]
    for (name, _, _), p in zip(kept, probs):
        info[name]["share"] = round(p, 6)
    stats["sampling"] = {"mode": cfg["sampling"], "sources": info}
    log.info("data sampling: %s by source weight (%s)%s", cfg["sampling"],
             ", ".join(f"{n} {p:.0%}" for (n, _, _), p in zip(kept, probs)),
             "; classes balanced within each source" if cfg["sampling"] == "balanced" else "")
    return {"names": [n for n, _, _ in kept], "indices": [i for _, i, _ in kept], "probs": probs}


def _accept_probabilities(dist: dict) -> np.ndarray:
    """Keep probability per class bucket of the rejection sampler: ``target / initial``,
    scaled so the rarest class is always kept."""
    initial, target = np.asarray(dist["initial"]), np.asarray(dist["target"])
    ratio = np.divide(target, initial, out=np.zeros_like(target), where=initial > 0)
    return (ratio / max(ratio.max(), 1e-12)).astype(np.float32)


def sampling_distributions(sample_class: np.ndarray, num_classes: int) -> dict:
    """``data.sampling=balanced``: the records' class distribution and the one sampled.

    Every class that has records gets the same share; records with an unknown label
    (bucket ``num_classes``) keep their natural share. Returns ``{"initial", "target"}``
    as lists over the ``num_classes + 1`` buckets.
    """
    counts = np.bincount(sample_class, minlength=num_classes + 1).astype(np.float64)
    initial = counts / max(1.0, counts.sum())
    target = np.zeros_like(initial)
    present = counts[:num_classes] > 0
    unknown = initial[num_classes]
    if present.any():
        target[:num_classes][present] = (1.0 - unknown) / present.sum()
    target[num_classes] = unknown
    return {"initial": initial.round(6).tolist(), "target": target.round(6).tolist()}


def _sub_seed(seed, k: int):
    """The seed of stream ``k`` (0: the whole data, as before mixes existed; None stays None)."""
    return None if seed is None else (int(seed) if k == 0 else int(seed) + 1009 * k)


def _resample_classes(d: tf.data.Dataset, accept: np.ndarray, seed) -> tf.data.Dataset:
    """An endless stream in which every class is equally likely: rejection sampling of
    the shuffled stream, each element kept with probability ``accept`` of its record
    (``target/initial`` of its class, scaled so the rarest class is always kept:
    :func:`_accept_probabilities`; frequent classes are skipped more often, no image is
    repeated within a pass more than the shuffle would)."""
    table = tf.constant(accept, tf.float32)
    rnd = tf.data.Dataset.random(seed=None if seed is None else int(seed) + 7919, rerandomize_each_iteration=True)

    def keep(el, r):
        u = tf.cast(r % (1 << 24), tf.float32) / float(1 << 24)
        return u < tf.gather(table, el["meta"][0])

    return tf.data.Dataset.zip((d, rnd)).filter(keep).map(lambda el, _r: el)
