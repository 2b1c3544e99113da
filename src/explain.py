"""`python -m src.explain checkpoint=PATH what=gradcam|umap|pseudo_masks [data=...] [split=...] [n=16] [out=DIR]`

``what=gradcam``: Grad-CAM (or ``gradcam.method=gradcam++``) of ``n`` images of ``split``
(spread over the classes), for ``gradcam.head`` (default the class head) and
``gradcam.layer`` (default: auto, inside a nested backbone when there is one). Writes
``<out>/gradcam/<i>_<name>.png`` (the image and its overlay side by side, the true mask
outlined where known), ``gradcam.csv`` (path, true label, predicted class and
probability, explained class, layer, pseudo-mask Dice where a true mask is known) and
``summary.json`` (mean Dice of the pseudo-masks: weak localisation, measured).

``what=pseudo_masks``: segmentation from class labels alone. For every image of ``split``
(default ``[train, val]``; a name, a list or ``all``) the CAM of its class (the true label
where known, else the prediction: ``pseudo.label``) is thresholded and cleaned
(``pseudo.threshold``, ``open``, ``close``, ``fill_holes``, ``largest_component``,
``min_area``) into a mask PNG at the image's size; ``no_tumor`` images get a known-empty
mask. Writes ``masks/``, ``manifest.jsonl`` (every record of the data; these masks marked
*pseudo*: train on them with ``data.manifest=<out>/manifest.jsonl``), ``pseudo_masks.csv``,
``overlays/`` and ``summary.json`` (counts, and the pseudo masks' Dice against the true
masks where the data has them: mean, median, per class). Default ``out``: ``<run
folder>/explain/pseudo_masks_<data name>``. See :mod:`src.evaluation.pseudo_masks`.

``what=umap``: embeddings (``umap.layer``, default the pooled features before the heads)
of up to ``umap.max_per_split`` images from each of ``umap.splits``, projected with UMAP;
writes ``umap.png`` (colour = class, marker = split: train o, test x) and ``umap.csv``
(path, split, label, x, y).

``checkpoint``: a training run folder, a phase folder, a ``checkpoints`` folder or a
``.keras`` file (:func:`src.runs.resolve_checkpoint`: the same rules in every command).
Data: the run's own ``data`` config (from ``config.yaml`` in the checkpoint's run folder)
unless ``data=...`` / ``data.*`` is given on the command line. Images go through the
same tf.data pipeline as in training (no augmentation), at the model's input size.
Output: ``out`` (default ``<run folder>/explain``). Errors exit with status 2.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("src.explain")


def _pick(records, n: int, seed: int):
    """Up to ``n`` records, round-robin over the classes (a fixed shuffle inside each)."""
    rng = np.random.default_rng(seed)
    by: dict = {}
    for r in records:
        by.setdefault(r.label if r.known.get("label") else None, []).append(r)
    queues = {k: [v[i] for i in rng.permutation(len(v))] for k, v in sorted(by.items(), key=lambda kv: str(kv[0]))}
    out = []
    while len(out) < n and any(queues.values()):
        for k in list(queues):
            if queues[k] and len(out) < n:
                out.append(queues[k].pop(0))
    return out


def _dataset(records, class_map, data_cfg: dict, size, batch_size: int, want_mask: bool):
    from .data.pipeline import build_dataset

    cfg = {**data_cfg, "image_size": list(size), "batch_size": int(batch_size), "augment": None, "repeat": False,
           "shuffle_buffer": 0, "cache": False, "drop_remainder": False,
           "xla": False}  # a few batches: compiling the per-batch image work would cost more than it saves
    return build_dataset(records, class_map, cfg, training=False, heads=["mask"] if want_mask else ["class"])


def _load(cfg, args: Sequence[str]):
    """The checkpoint loaded for inference, the data (the run's own unless the command
    line gives ``data=`` or ``data.*``), class names, input size and output folder."""
    from omegaconf import OmegaConf

    from .data.dataset import load_data
    from .inference import load_for_inference
    from .runs import group_chosen, group_overrides

    loaded = load_for_inference(cfg.get("checkpoint"))
    meta = loaded.run
    data_cfg = cfg.data
    user_data = group_chosen(args, "data") or bool(group_overrides(args, "data"))
    if not user_data and meta.config is not None and meta.config.get("data") is not None:
        data_cfg = meta.config.data
        log.info("data: the run's own config (%s)", meta.run_dir / "config.yaml")
    bundle = load_data(data_cfg, cache_dir=cfg.paths.cache_dir)
    classes = loaded.class_names() or list(bundle.class_map.classes)
    plain = OmegaConf.to_container(data_cfg, resolve=True)
    out = Path(cfg.out) if cfg.get("out") else (meta.run_dir or loaded.checkpoint.parent) / "explain"
    return loaded, bundle, classes, plain, loaded.input_size(), out


def run_gradcam(cfg, args) -> dict:
    from .evaluation.gradcam import GradCAM, cam_to_mask, save_overlay
    from .evaluation.metrics import dice_iou
    from .inference import decide

    loaded, bundle, classes, data_cfg, size, out = _load(cfg, args)
    meta = loaded.run
    g = cfg.gradcam
    split = str(cfg.split or "test")
    records = bundle.split(split)
    if not records:
        raise ValueError(f"split {split!r} of data {bundle.name!r} is empty; splits: "
                         f"{sorted({r.split for r in bundle.records if r.split})}")
    picked = _pick(records, int(cfg.n), int(cfg.seed))
    want_mask = any(r.known.get("mask") for r in picked)
    ds = _dataset(picked, bundle.class_map, data_cfg, size, int(cfg.batch_size), want_mask)
    cam = GradCAM(loaded.network, layer=g.get("layer"))
    head = g.get("head")
    thr = g.get("threshold", 0.5)
    thr = thr if isinstance(thr, str) else float(thr)
    odir = out / "gradcam"
    odir.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    for x, targets, weights in ds:
        res = cam(x.numpy(), head=head, class_index=g.get("class_index"), method=g.get("method", "gradcam"))
        dec = decide(res.outputs, classes, float(meta.threshold if meta.threshold is not None else 0.5))
        for b in range(len(res.cams)):
            r = picked[i]
            true_mask = None
            if want_mask and float(weights["mask"][b]) > 0:
                true_mask = targets["mask"][b].numpy()[..., 0] > 0
            row = {"path": r.image, "label": r.label, "head": res.head, "layer": res.layer, "method": res.method,
                   "explained_class": int(res.class_index[b])}
            if dec["pred"] is not None:
                k = int(dec["pred"][b])
                row.update(predicted=classes[k] if k < len(classes) else k, probability=float(dec["probs"][b, k]))
            if true_mask is not None and true_mask.any():
                pm = cam_to_mask(res.cams[b], thr, largest_component=bool(g.get("largest_component", True)))
                row["dice"] = dice_iou(pm, true_mask)[0]
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(r.image).stem)
            title = f"true {r.label} | pred {row.get('predicted', '-')}"
            if "probability" in row:
                title += f" {row['probability']:.2f}"
            p = save_overlay(odir / f"{i:03d}_{name}.png", x[b].numpy(), res.cams[b], alpha=float(g.get("alpha", 0.4)),
                             mask=true_mask, title=title, min_height=int(g.get("min_height", 256)))
            row["overlay"] = str(p)
            rows.append(row)
            i += 1
    cols = ["path", "label", "predicted", "probability", "head", "explained_class", "layer", "method", "dice",
            "overlay"]
    with open(out / "gradcam.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    dices = [r["dice"] for r in rows if "dice" in r]
    summary = {"what": "gradcam", "checkpoint": str(loaded.checkpoint), "split": split, "images": len(rows),
               "head": rows[0]["head"] if rows else head, "layer": rows[0]["layer"] if rows else None,
               "method": g.get("method", "gradcam"), "pseudo_mask_threshold": thr,
               "dice": {"images": len(dices), "mean": float(np.mean(dices)) if dices else None,
                        "median": float(np.median(dices)) if dices else None},
               "out": str(out), "csv": str(out / "gradcam.csv"), "overlays": str(odir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _splits(value, default: Sequence[str], bundle) -> list:
    """``split=`` as a list: null -> ``default``, ``all`` -> every split of the data."""
    from omegaconf import ListConfig

    if value is None:
        return list(default)
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    if str(value) == "all":
        return sorted({r.split for r in bundle.records if r.split})
    return [s.strip() for s in str(value).split(",") if s.strip()]


def run_pseudo_masks(cfg, args) -> dict:
    from omegaconf import OmegaConf

    from .evaluation.pseudo_masks import PseudoSettings, write_pseudo_masks

    settings = PseudoSettings.from_cfg(OmegaConf.to_container(cfg.pseudo, resolve=True))  # bad settings fail first
    loaded, bundle, classes, data_cfg, size, out = _load(cfg, args)
    if not cfg.get("out"):
        out = out / f"pseudo_masks_{bundle.name}"
    splits = _splits(cfg.get("split"), ("train", "val"), bundle)
    return write_pseudo_masks(loaded, bundle, classes, data_cfg, size, out, splits, settings,
                              batch_size=int(cfg.batch_size), progress=bool(cfg.get("progress", True)))


def run_umap(cfg, args) -> dict:
    from .evaluation.embeddings import embedding_projection, extract_embeddings

    loaded, bundle, classes, data_cfg, size, out = _load(cfg, args)
    u = cfg.umap
    rng = np.random.default_rng(int(cfg.seed))
    recs = []
    for s in u.splits:
        rs = bundle.split(str(s))
        if len(rs) > int(u.max_per_split):
            rs = [rs[i] for i in sorted(rng.choice(len(rs), int(u.max_per_split), replace=False))]
        recs += rs
    if len(recs) < 3:
        raise ValueError(f"need at least 3 images from splits {list(u.splits)}, found {len(recs)}")
    ds = _dataset(recs, bundle.class_map, data_cfg, size, int(cfg.batch_size), False)
    emb = extract_embeddings(loaded.network, ds, layer=u.get("layer"))
    res = embedding_projection(emb, [r.image for r in recs], [r.split for r in recs],
                               [r.label if r.known.get("label") else None for r in recs], out,
                               method=str(u.get("method", "umap")), n_neighbors=int(u.n_neighbors),
                               min_dist=float(u.min_dist), seed=int(cfg.seed), class_order=classes)
    summary = {"what": "umap", "checkpoint": str(loaded.checkpoint), "splits": list(u.splits), "images": len(recs),
               "embedding_dim": int(emb.shape[1]), "out": str(out), **res}
    return summary


def run(cfg, args: Sequence[str] = ()) -> dict:
    what = str(cfg.what).lower()
    if what == "gradcam":
        return run_gradcam(cfg, args)
    if what == "umap":
        return run_umap(cfg, args)
    if what == "pseudo_masks":
        return run_pseudo_masks(cfg, args)
    raise ValueError(f"what must be gradcam, umap or pseudo_masks, got {cfg.what!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import cli_main
    from .evaluation.gradcam import GradCamError
    from .runs import CHECKPOINT_REQUIRED

    t0 = time.time()

    def timed(cfg, args):
        summary = run(cfg, args)
        summary["seconds"] = round(time.time() - t0, 1)
        return summary

    return cli_main(__doc__, "explain", timed, argv, errors=(GradCamError, ValueError),
                    required=[("checkpoint", CHECKPOINT_REQUIRED)])


if __name__ == "__main__":
    sys.exit(main())
