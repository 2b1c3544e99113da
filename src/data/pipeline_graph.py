"""The tf.data graph of a planned pipeline (:class:`src.data.pipeline.PipelinePlan`):
records -> decoded images (per batch, or per element into the cache) -> shuffled /
resampled, batched -> augmented batches with their targets. The order and the reasons
are in :mod:`src.data.pipeline`'s docstring; :meth:`~src.data.pipeline.PipelinePlan.dataset`
builds it."""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import tensorflow as tf

from ..heads import CLASS_SET
from . import augment as aug
from .image_header import _decoder, _signature_ok
from .packed_masks import _MAP_FN_PARALLEL, PackedMasks
from .sampling import _resample_classes, _sub_seed
from .targets import _BOXES_ALL


def _to_rgb(x01):
    """Grey ``[..., 1]`` images broadcast to 3 channels (a multiply, cheaper in XLA than TF's
    inner-dimension broadcast); RGB unchanged."""
    if x01.shape[-1] == 3:
        return x01
    return x01 * tf.ones((3,), x01.dtype)


_PHOTO_KEYS = ("brightness", "contrast", "saturation", "hue", "noise_std", "blur_prob", "blur_sigma", "blur_kernel",
               "brightness_prob", "contrast_prob", "saturation_prob", "hue_prob", "noise_prob")


def _hashable(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@functools.lru_cache(maxsize=64)
def _image_function(do_flips: bool, photo_key: tuple, channels: int, xla: bool):
    """The per-batch image work as one (XLA-compiled) function, memoised per settings so
    that datasets built with the same settings share the compiled kernels."""
    photo_cfg = aug.augment_config(dict(photo_key)) if photo_key else None
    layers = aug.photometric_layers(photo_cfg, channels=channels) if photo_cfg else []
    noise_std = float(photo_cfg["noise_std"]) if photo_cfg else 0.0
    noise_prob = float(photo_cfg["noise_prob"]) if photo_cfg else 1.0

    def image_fn(imgs, masks, s, hf, vf):
        """uint8 (or warped) batch -> float32 x [B, H, W, 3] and float32 masks."""
        x = imgs
        if do_flips:
            x, masks = aug.apply_flips(imgs, masks, hf, vf)
        x = tf.cast(x, tf.float32) * (1.0 / 255.0)
        if layers or noise_std > 0:
            x = aug.apply_photometric(x, layers, s, noise_std=noise_std, noise_prob=noise_prob)
        x = _to_rgb(x)
        return x, (None if masks is None else tf.cast(masks, tf.float32))

    return tf.function(image_fn, jit_compile=xla, reduce_retracing=True)


def _make_dataset(plan) -> tf.data.Dataset:
    """The graph of a planned pipeline: records -> decoded images (per batch, or per
    element into the cache) -> shuffled / resampled, batched -> augmented batches with
    their targets (see :mod:`src.data.pipeline`'s docstring for the order and why)."""
    g = _Graph(plan)
    ds = g.batched_records()
    if g.random_needed:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=g.base_seed, rerandomize_each_iteration=True)))
    else:
        ds = ds.map(lambda bt: (bt, tf.constant(0, tf.int64)))
    ds = ds.map(g.finalise, num_parallel_calls=g.npc, deterministic=g.det)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.deterministic = g.det
    opts.experimental_optimization.map_parallelization = True
    return ds.with_options(opts)


class _Graph:
    """The tf.data functions of one :class:`~src.data.pipeline.PipelinePlan` (its settings bound once)."""

    def __init__(self, plan):  # a src.data.pipeline.PipelinePlan
        cfg = plan.cfg
        self.plan, self.cfg = plan, cfg
        self.H, self.W = cfg["image_size"]
        self.C = plan.channels
        self.heads = plan.heads
        self.training = plan.training
        self.npc = cfg["num_parallel_calls"]
        self.det = bool(cfg["deterministic"])
        self.letterbox = plan.any_pad
        self.mask_fmt = cfg["mask_format"] if "mask" in self.heads else None
        self.decoders = [_decoder(f, r, self.C) for f, r in plan.codecs]
        self.packed_masks = None
        if self.mask_fmt == "packed":
            bits, lengths = plan.table["mask_bits"]
            # NumPy / OpenCV inside the graph unless the config asks for a pure-TF warp
            python_masks = aug.resolve_warp((cfg["augment"] or {}).get("warp", "auto")) == "cv2"
            self.packed_masks = PackedMasks(plan.table["meta"][:, 9:13], bits, lengths, (self.H, self.W),
                                            python=python_masks)
        augc = cfg["augment"] if self.training else None
        self.augc = augc
        self.do_affine = bool(augc) and aug.has_affine(augc)
        self.do_flips = bool(augc) and not self.do_affine and aug.has_flips(augc)
        self.impl = aug.resolve_warp(augc["warp"]) if self.do_affine else None
        photo = bool(augc) and aug.has_photometric(augc, self.C)
        noise_std = float(augc["noise_std"]) if augc else 0.0
        self.random_needed = self.do_affine or self.do_flips or bool(photo) or noise_std > 0
        seed = cfg["seed"]
        self.base_seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % (2 ** 31))
        photo_key = tuple((k, _hashable(augc[k])) for k in _PHOTO_KEYS) if (photo or noise_std > 0) else ()
        self.image_fn = _image_function(self.do_flips, photo_key, self.C, bool(cfg["xla"]))
        self.tconst = {k: tf.constant(v) for k, v in plan.targets.items()}
        self.batched_load = None

    # ---- decoding -----------------------------------------------------------------
    def load_image(self, path, meta):
        """One record's image -> uint8 ``[H, W, C]`` in the target frame."""
        H, W, C = self.H, self.W, self.C
        fmt, codec, clean_end, resize = meta[1], meta[2], meta[3] > 0, meta[4] > 0
        nh, nw, top, left = meta[5], meta[6], meta[7], meta[8]
        data = tf.io.read_file(path)
        ok = _signature_ok(data, fmt, clean_end)
        check = tf.debugging.Assert(ok, ["image file is corrupt, truncated or changed since the dataset was built "
                                         "(wrong signature / no JPEG end marker):", path])
        with tf.control_dependencies([check]):
            data = tf.identity(data)
        if len(self.decoders) == 1:
            img = self.decoders[0](data)
        else:
            img = tf.switch_case(codec, [lambda d=d: d(data) for d in self.decoders])
        if self.plan.any_resize:
            def _resize():
                r = tf.image.resize(img, tf.stack([nh, nw]), method="bilinear", antialias=True)
                return tf.cast(tf.clip_by_value(tf.round(r), 0, 255), tf.uint8)
            img = tf.cond(resize, _resize, lambda: img)
        if self.letterbox:
            img = tf.image.pad_to_bounding_box(img, top, left, H, W)
        return tf.ensure_shape(img, [H, W, C])

    def load_png_mask(self, mask_path, meta):
        H, W = self.H, self.W
        nh, nw, top, left = meta[5], meta[6], meta[7], meta[8]

        def _load_mask():
            m = tf.io.decode_png(tf.io.read_file(mask_path), channels=1, dtype=tf.uint8)
            m = tf.cast(m > 0, tf.uint8)
            m = tf.image.resize(m, tf.stack([nh, nw]), method="nearest")
            if self.letterbox:
                m = tf.image.pad_to_bounding_box(m, top, left, H, W)
            return tf.ensure_shape(m, [H, W, 1])
        return tf.cond(meta[9] > 0, _load_mask, lambda: tf.zeros([H, W, 1], tf.uint8))

    def load(self, el):
        """Per element (the ``cache`` path: the cache keeps these). Packed masks are
        not in the elements: they are expanded or warped per batch (:class:`PackedMasks`)."""
        out = {"image": self.load_image(el["path"], el["meta"]), "meta": el["meta"]}
        if self.mask_fmt == "png":
            out["mask"] = self.load_png_mask(el["mask_path"], el["meta"])
        return out

    def load_batch(self, el):
        """Per batch of records: one tf.data call decodes the whole batch (``map_fn``),
        which saves tf.data's per-element overhead (~0.1 ms an image, measured)."""
        img_spec = tf.TensorSpec([self.H, self.W, self.C], tf.uint8)
        if self.mask_fmt == "png":
            imgs, masks = tf.map_fn(lambda a: (self.load_image(a[0], a[1]), self.load_png_mask(a[2], a[1])),
                                    (el["path"], el["meta"], el["mask_path"]), parallel_iterations=_MAP_FN_PARALLEL,
                                    fn_output_signature=(img_spec, tf.TensorSpec([self.H, self.W, 1], tf.uint8)))
            return {"image": imgs, "meta": el["meta"], "mask": masks}
        imgs = tf.map_fn(lambda a: self.load_image(a[0], a[1]), (el["path"], el["meta"]),
                         fn_output_signature=img_spec, parallel_iterations=_MAP_FN_PARALLEL)
        return {"image": imgs, "meta": el["meta"]}

    # ---- order ---------------------------------------------------------------------
    def _epochs(self, d, n: int):
        """An endless resampled stream -> one pass' worth of ``n`` records per epoch (and
        the configured repeats), or left endless with ``repeat: true``."""
        rep = self.cfg["repeat"]
        if rep is True:
            return d
        d = d.take(n)
        reps = int(rep) if rep not in (False, None, 0) else 0
        return d.repeat(reps) if reps > 1 else d

    def _shuffle_repeat(self, d, n: Optional[int] = None, k: int = 0):
        cfg, plan, seed = self.cfg, self.plan, _sub_seed(self.cfg["seed"], k)
        n = plan.n if n is None else n
        buf = n if cfg["shuffle_buffer"] in (None, -1) else int(cfg["shuffle_buffer"] or 0)
        rep = cfg["repeat"]
        reps = None if rep is True else (int(rep) if rep not in (False, None, 0) else 0)
        if self.training and cfg["shuffle_buffer"] != 0 and buf > 1:
            d = d.shuffle(buf, seed=seed, reshuffle_each_iteration=True)
        if self.training and plan.mix is not None:  # one endless stream per source, mixed later
            d = d.repeat()
            return _resample_classes(d, plan.accept, seed) if plan.accept is not None else d
        if self.training and cfg["sampling"] == "balanced":
            return self._epochs(_resample_classes(d.repeat(), plan.accept, seed), n)
        if rep is True:
            d = d.repeat()
        elif reps and reps > 1:
            d = d.repeat(reps)
        return d

    def _records(self, idx=None) -> tf.data.Dataset:
        """Records (all, or those at ``idx``) as tf.data elements ``{meta, path[, mask_path]}``."""
        tab = self.plan.table
        pick = (lambda a: a) if idx is None else (lambda a: a[idx])
        slices = {"meta": pick(tab["meta"]), "path": tf.constant(list(pick(tab["path"])), tf.string)}
        if self.mask_fmt == "png":
            slices["mask_path"] = tf.constant(list(pick(tab["mask_path"])), tf.string)
        return tf.data.Dataset.from_tensor_slices(slices)

    def _decoded(self, d, k: Optional[int] = None):
        """Per element decoded and cached (``cache``: memory, or a file prefix per source)."""
        cache = self.cfg["cache"]
        d = d.map(self.load, num_parallel_calls=self.npc, deterministic=self.det)
        path = "" if cache == "memory" else str(cache) + ("" if k is None else f"_source{k}")
        return d.cache(path)

    def _mixed(self, cached: bool) -> tf.data.Dataset:
        """A mix drawn by source weight: one shuffled endless stream per source (each cached
        on its own), mixed by ``sample_from_datasets`` (seeded), one pass' worth an epoch."""
        mix = self.plan.mix
        streams = []
        for k, idx in enumerate(mix["indices"]):
            d = self._records(idx)
            if cached:
                d = self._decoded(d, k)
            streams.append(self._shuffle_repeat(d, len(idx), k + 1))
        seed = self.cfg["seed"]
        d = tf.data.Dataset.sample_from_datasets(streams, weights=mix["probs"],
                                                 seed=None if seed is None else int(seed) + 104729,
                                                 rerandomize_each_iteration=True)
        return self._epochs(d, self.plan.n)

    def batched_records(self) -> tf.data.Dataset:
        """Batches of records: decoded per batch in :meth:`finalise`, or (with ``cache``)
        decoded per element, cached, then shuffled and batched. A mix drawn by source weight
        (:meth:`_mixed`) gives batches that mix the sources."""
        cfg = self.cfg
        bs, drop = int(cfg["batch_size"]), bool(cfg["drop_remainder"])
        cached = cfg["cache"] not in (False, None)
        if self.training and self.plan.mix is not None:
            ds = self._mixed(cached)
        elif not cached:
            ds = self._shuffle_repeat(self._records())
        else:
            ds = self._shuffle_repeat(self._decoded(self._records()))
        if not cached:
            self.batched_load = self.load_batch
            return ds.batch(bs, drop_remainder=drop)
        return ds.batch(bs, drop_remainder=drop, num_parallel_calls=self.npc, deterministic=self.det)

    # ---- per batch -----------------------------------------------------------------
    def _augment(self, batch, s):
        """Geometric augmentation of the batch's images and masks: ``(images, masks,
        matrices or None, hflip, vflip)`` (masks expanded from their packed crops)."""
        imgs, masks = batch["image"], batch.get("mask")
        b = tf.shape(imgs)[0]
        mats = hf = vf = None
        packed = self.mask_fmt == "packed"
        rows = batch["meta"][:, 0]
        if self.do_affine:
            mats = aug.random_affine_matrices(b, self.augc, s, (self.H, self.W))
            if packed and self.impl == "cv2":  # masks warped straight from their packed crops
                imgs, masks = self.packed_masks.warp_with_images(rows, mats, imgs)
                packed = False
            else:
                if packed:
                    masks, packed = self.packed_masks.unpack(rows), False
                # its own kernel: fused into image_fn, XLA would duplicate the gathers
                imgs, masks = aug.warp(imgs, masks, mats, self.impl)
        elif self.do_flips:
            hf, vf = aug.random_flips(b, self.augc, s)
            mats = aug.flip_matrices(hf, vf, (self.H, self.W))
        if packed:
            masks = self.packed_masks.unpack(rows)
        return imgs, masks, mats, hf, vf

    def finalise(self, batch, rnd):
        if self.batched_load is not None:
            batch = self.batched_load(batch)
        s = tf.stack([tf.constant(self.base_seed, tf.int64), tf.cast(rnd, tf.int64)])
        imgs, masks, mats, hf, vf = self._augment(batch, s)
        with tf.device("/cpu:0"):
            x, mask_f = self.image_fn(imgs, masks, s, hf, vf)
        x = tf.ensure_shape(x, [None, self.H, self.W, 3])
        y, w = self._targets(batch["meta"][:, 0], mats, mask_f, tf.shape(imgs)[0])
        return x, y, w

    def _targets(self, idx, mats, mask_f, b):
        """Targets and weights of the batch's records (boxes moved with the images)."""
        heads = self.heads
        t = {k: tf.gather(v, idx) for k, v in self.tconst.items()}
        y, w = {}, {}
        for k in ("class", "multilabel", "tumor", "subtype"):
            if k in heads:
                y[k], w[k] = t[k], t[k + "_w"]
        if CLASS_SET in t:
            y[CLASS_SET], w[CLASS_SET] = t[CLASS_SET], t[CLASS_SET + "_w"]
        if "boxes" in heads:
            bx, bw = t["boxes"], t["boxes_w"]
            if mats is not None:
                bx, inside = aug.transform_boxes(bx, mats, valid=bw > 0)
                bw = bw * tf.cast(inside, tf.float32)
            y["boxes"], w["boxes"] = bx, bw
        if "boxes_all" in heads:
            ba, bc, cnt = t["boxes_all"], t["boxes_all_classes"], t["boxes_all_count"]
            if mats is not None:
                slot = tf.range(tf.shape(ba)[1])[None, :] < cnt[:, None]
                ba, inside = aug.transform_boxes(ba, mats, valid=slot)
                bc = tf.where(inside, bc, -1)
            y["boxes_all"], y["boxes_all_classes"], y["boxes_all_count"] = ba, bc, cnt
            zeros = tf.zeros([b], tf.float32)
            for k in _BOXES_ALL:
                w[k] = zeros
        if "mask" in heads:
            y["mask"] = tf.ensure_shape(mask_f, [None, self.H, self.W, 1])
            w["mask"] = t["mask_w"]
        return y, w
