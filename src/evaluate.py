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

``checkpoint`` is a training run folder (then the last phase's
``phase<N>/checkpoints/best.keras``), a phase folder, a ``checkpoints`` folder or a
``.keras`` file (:func:`src.runs.resolve_checkpoint`: the same rules in every command).
For a run folder (or a checkpoint inside one) the run's saved ``config.yaml`` gives the
data settings unless ``data=...`` is passed (:func:`src.runs.settings_from_run`);
``data.<key>=...`` overrides still apply on top of it. The model's input size wins over
``data.image_size``. Samples whose target is unknown (sample weight 0) are left out of
that head's metrics, and so are masks and boxes a model made (``record.pseudo``, e.g. CAM
pseudo masks from ``src.explain what=pseudo_masks``): they are not ground truth
(``pseudo_left_out`` in ``metrics.json`` counts them). The pipeline runs with
``training=False`` (no augmentation, no shuffling). The folder goes to ``<run>/eval_<split>`` (or
``<output_root>/evaluate/<timestamp>`` for a bare checkpoint) unless ``out=DIR``.

A mix (``data=mix``, ``data.sources``): the figures above are those of the whole split,
and ``metrics.json`` ``sources`` holds the same report for each source's images of the
split (the figshare Dice, the Kaggle 4-class accuracy, the Br35H tumour recall and Dice),
``<source>/<head>/<metric>`` in MLflow and the console. Any model can be scored on a mix
this way (a single-dataset model with ``data=mix``, on the mix's splits).

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

The work is in :mod:`src.evaluation`: :mod:`~src.evaluation.collect` (the pass over the
split), :mod:`~src.evaluation.compute` (metrics per head, ``predictions.csv``),
:mod:`~src.evaluation.plots`, :mod:`~src.evaluation.report` (the folder and
``report.html``) and :mod:`~src.evaluation.tracking` (MLflow).

MLflow: the report folder is logged (artifacts under ``eval_<split>/``, headline numbers
as metrics ``eval_<split>/...``) to the training run's MLflow record, found by the
``run_dir`` tag the training engine sets; when there is none, a new run tagged with the
same ``run_dir`` is created. The tracking store is the training run's when it tracked,
else this command's ``tracking`` config; ``tracking=none`` skips it with a message.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import config as _config  # noqa: F401  (registers the ${project_root:} resolver)

log = logging.getLogger("src.evaluate")


SPLITS = ("train", "val", "test", "all")


def _split_records(data_cfg: dict, cache_dir: str, split: str, max_images):
    """``(data bundle, records of split)``; an empty split is an error naming the others."""
    from .data.dataset import load_data
    from .evaluation.collect import EvaluationError

    if split not in SPLITS:
        raise EvaluationError(f"split={split!r}: choose one of {' | '.join(SPLITS)} (all: every image of the data, "
                              "whatever its split: an external test set)")
    bundle = load_data(data_cfg, cache_dir=cache_dir, assign=split != "all")
    records = list(bundle.records) if split == "all" else bundle.split(split)
    if max_images:
        records = records[:int(max_images)]
    if not records:
        counts = {s: len(bundle.split(s)) for s in ("train", "val", "test")}
        raise EvaluationError(f"split {split!r} of data {bundle.name!r} has no images (images per split: {counts}); "
                              "pass split=train|val|test|all or other data")
    return bundle, records


def _use_input_size(data_cfg: dict, network) -> None:
    """The model's fixed input size wins over ``data.image_size`` (said when they differ)."""
    in_shape = tuple(network.input.shape[1:3]) if not isinstance(network.input, (list, dict)) else (None, None)
    if all(isinstance(v, int) for v in in_shape):
        size = data_cfg.get("image_size")
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        if size != in_shape:
            print(f"data.image_size {list(size) or None} -> {list(in_shape)} (the model's input size)")
        data_cfg["image_size"] = list(in_shape)


def _thresholds(cfg, model_cfg) -> tuple[float, float]:
    """``(class threshold, mask threshold)``: the command's, else the run's model config's."""
    threshold = cfg.get("threshold")
    if threshold is None:
        threshold = model_cfg.get("threshold", 0.5) or 0.5
    return float(threshold), float(cfg.get("mask_threshold", 0.5))


def _pseudo_left_out(records) -> dict:
    """Known targets a model made (``record.pseudo``), per target: not scored as ground truth."""
    return {t: n for t in ("mask", "boxes") if (n := sum(r.is_pseudo(t) for r in records))}


def _out_dir(cfg, run_dir, split: str) -> Path:
    """``out=``, else ``<run>/eval_<split>``, else a timestamped folder under the output root."""
    if cfg.get("out"):
        return Path(cfg.out)
    if run_dir is not None:
        return run_dir / f"eval_{split}"
    return Path(cfg.paths.output_root) / "evaluate" / time.strftime("%Y-%m-%d_%H-%M-%S")


def run(cfg, args: Sequence[str] = ()) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; returns a summary dict."""
    from .boxes_from_mask import resolve_box_mode
    from .data.pipeline import build_dataset
    from .data.records import TUMOR
    from .evaluation.collect import EvaluationError, check_compatible, collect, dataset_targets, output_shapes
    from .evaluation.compute import compute_metrics, headline, mark_mask_boxes, per_source
    from .evaluation.metrics import to_jsonable
    from .evaluation.report import save_report
    from .evaluation.tracking import log_to_mlflow
    from .inference import load_for_inference, resolve_tta
    from .runs import find_run_dir, resolve_checkpoint, settings_from_run

    t0 = time.time()
    tta = resolve_tta(cfg.get("tta", False))
    box_mode = resolve_box_mode(cfg.get("boxes_from_mask", "largest"))
    ckpt = resolve_checkpoint(cfg.get("checkpoint"))
    run_dir = find_run_dir(ckpt)
    settings = settings_from_run(cfg, args, run_dir)
    data_cfg, split = settings["data"], str(cfg.split)
    print(f"checkpoint: {ckpt}\ndata: {data_cfg.get('name')} ({settings['data_source']}), split {split}")
    bundle, records = _split_records(data_cfg, settings["cache_dir"], split, cfg.get("max_images"))
    class_map = bundle.class_map

    loaded = load_for_inference(ckpt)
    heads = check_compatible(output_shapes(loaded.network), class_map, loaded.run.info.get("classes"))
    _use_input_size(data_cfg, loaded.network)
    if cfg.get("batch_size"):
        data_cfg["batch_size"] = int(cfg.batch_size)
    threshold, mask_threshold = _thresholds(cfg, settings["model"])
    min_area = int(cfg.get("boxes_min_area") or 0)
    # a mask model without a box head: boxes read off its masks are scored like a detector's
    mask_boxes = box_mode is not None and "mask" in heads and "boxes" not in heads
    eval_heads = heads + ["boxes"] if mask_boxes else heads

    # one pass, in order: no augmentation, no shuffling, no repeat, no cache (a training cache
    # file holds other records), no XLA (without augmentation the per-batch image work is a
    # cast and a scale: compiling it per batch shape costs more than it saves in one pass)
    targets = dataset_targets(eval_heads, class_map)
    if "class" in targets and "tumor" not in targets and any(r.label == TUMOR and r.known.get("label")
                                                              for r in records) and TUMOR not in class_map.classes:
        targets.append("tumor")  # images whose only label is a generic tumour: tumour vs healthy from the class head
    # model-made (pseudo) masks and boxes are not ground truth: weight 0, left out of the scores
    ds = build_dataset(records, class_map, {**data_cfg, "augment": None, "repeat": False, "cache": False,
                                            "xla": False, "pseudo_weight": 0.0}, training=False, heads=targets)
    arrays = collect(loaded.network, ds, heads, tta=tta, desc=f"evaluate {split}", progress=cfg.get("progress", True),
                     steps=int(math.ceil(len(records) / int(data_cfg.get("batch_size", 32)))),
                     mask_threshold=mask_threshold, thumb=int(cfg.get("thumb_size", 128)),
                     data_range=1.0,  # the pipeline's images are [0, 1]; the network scales them itself
                     boxes_from_mask=box_mode if mask_boxes else None, boxes_min_area=min_area)
    if arrays["n"] != len(records):
        raise EvaluationError(f"the pipeline gave {arrays['n']} images for {len(records)} records")

    meta = [{"path": r.image, "group": r.group if r.group is not None else "", "split": r.split, "tta": tta,
             **({"source": r.source} if bundle.sources else {})} for r in records]
    boxes_known = ([bool(r.known.get("boxes")) and not r.is_pseudo("boxes") for r in records]
                   if "boxes" in eval_heads else None)
    metrics = compute_metrics(arrays, class_map, threshold, n_bins=int(cfg.get("calibration_bins", 15)),
                              boxes_known=boxes_known)
    if mask_boxes and not mark_mask_boxes(metrics, box_mode, min_area, mask_threshold):
        mask_boxes, eval_heads = False, heads   # the data has no known box to score them against
    sources = {}
    if bundle.sources:  # a mix: each source's images of the split on their own
        sources = per_source(arrays, [r.source for r in records], bundle.source_names(), class_map, threshold,
                             n_bins=int(cfg.get("calibration_bins", 15)), boxes_known=boxes_known,
                             mask_boxes=(box_mode, min_area, mask_threshold) if mask_boxes else None)

    out_dir = _out_dir(cfg, run_dir, split)
    doc = {"checkpoint": str(ckpt), "run_dir": str(run_dir) if run_dir else None,
           "model": loaded.run.info.get("model", loaded.model.name),
           "data": bundle.name, "data_root": bundle.root, "split": split, "n_images": len(records),
           "classes": list(class_map.classes), "evaluated_heads": eval_heads, "threshold": threshold,
           "mask_threshold": mask_threshold, "image_size": data_cfg["image_size"], "tta": tta,
           "boxes_from_mask": box_mode if mask_boxes else None, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "pseudo_left_out": _pseudo_left_out(records),
           **metrics}
    if sources:
        doc["sources"] = sources
    save_report(out_dir, doc, arrays, class_map, meta=meta, gallery=int(cfg.get("gallery", 6)))
    scalars = headline(to_jsonable(doc))
    for name, m in sources.items():
        scalars.update({f"{name}/{k}": v for k, v in headline(to_jsonable(m)).items()})
    tags = {"model": doc["model"], "data": bundle.name, "evaluated_split": split, "evaluated_checkpoint": str(ckpt)}
    mlflow_info = log_to_mlflow(settings["tracking"], run_dir, out_dir, split, scalars, tags)
    return {"out": str(out_dir), "report": str(out_dir / "report.html"), "checkpoint": str(ckpt), "split": split,
            "n_images": len(records), "heads": eval_heads, "tta": tta, "headline": scalars, "mlflow": mlflow_info,
            "notes": metrics["notes"], "seconds": round(time.time() - t0, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import cli_main
    from .evaluation.collect import EvaluationError
    from .runs import CHECKPOINT_REQUIRED

    return cli_main(__doc__, "evaluate", run, argv, errors=(EvaluationError, ValueError),
                    required=[("checkpoint", CHECKPOINT_REQUIRED)])


if __name__ == "__main__":
    sys.exit(main())
