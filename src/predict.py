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

**Volumes.** A NIfTI file (``.nii``, ``.nii.gz``) or DICOM files among the inputs (a DICOM
folder: files grouped into series and ordered as ``data=dicom`` does) are sliced as the
``nifti`` / ``dicom`` readers slice them, with the window / axis options of the run that
trained the model: one row per slice, with ``volume`` (the NIfTI path, or the series'
hashed id) and ``slice`` (its index along the axis), masks and overlays named
``<volume>__slice<k>``. For a NIfTI volume and a model with a mask head the predicted
masks are also written as one volume, ``volumes/<name>_mask.nii.gz`` (uint8 0/1, the
input's shape, affine and voxel order: it overlays the input in any viewer), named in the
``mask_volume`` column. A series with a missing slice or an unreadable volume is one row
of ``skipped.csv``.

``checkpoint`` is a training run folder (its last phase's ``checkpoints/best.keras``), a
phase folder, a ``checkpoints`` folder or a ``.keras`` file (:func:`src.runs.resolve_checkpoint`:
the same rules in every command). The model's input size is read from the model; the
class names and the resize mode (``stretch`` / ``letterbox``) from the run's
``run_info.json`` / ``config.yaml`` when the checkpoint sits in a run folder (else
``class_0..N-1`` with a warning, and ``stretch``). Training-only auxiliary heads are dropped.

How the class is decided, by the heads the model has: ``tumor`` + ``subtype`` (the
hierarchical U-Net) -> ``no_tumor`` if ``p(tumour) < threshold`` else the subtype argmax,
with ``P(no_tumor) = 1 - p`` and ``P(k) = p * P(subtype k)``; else ``class`` (softmax)
-> argmax; ``multilabel`` (sigmoid per class) -> argmax, and ``labels`` lists every class
with ``p >= threshold``; ``tumor`` alone -> tumour / no_tumor by ``threshold``.

Images are decoded like the training pipeline (3 channels; grey broadcast), resized
bilinearly with antialiasing to the model's input size and scaled to ``[0, 1]``.

The work is :class:`src.inference.Predictor` (load, read, preprocess, predict, back to
original pixels, overlays); this module writes its answers as files.
"""
from __future__ import annotations

import csv
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("src.predict")

BOX_KEYS = ("x0", "y0", "x1", "y1")


class PredictError(RuntimeError):
    """A problem that stops prediction as a whole (no input, a bad setting)."""


@dataclass
class PredictResult:
    output: Path
    rows: list
    skipped: list
    classes: list
    checkpoint: Path
    tta: str = "none"
    boxes_from_mask: Optional[str] = None   # the mode, when the boxes were read off the mask
    volumes: int = 0                        # NIfTI volumes and DICOM series among the inputs
    mask_volumes: list = field(default_factory=list)   # predicted mask volumes written (NIfTI)

    def summary(self) -> dict:
        return {"output": str(self.output), "checkpoint": str(self.checkpoint), "predicted": len(self.rows),
                "skipped": len(self.skipped), "classes": self.classes, "tta": self.tta,
                "boxes_from_mask": self.boxes_from_mask, "volumes": self.volumes, "mask_volumes": self.mask_volumes,
                "predictions_csv": str(self.output / "predictions.csv"),
                "skipped_csv": str(self.output / "skipped.csv")}


def predict(checkpoint, inputs, output, threshold: Optional[float] = None, batch_size: int = 16,
            mask_threshold: float = 0.5, save_masks: bool = True, save_overlays: bool = True,
            resize: Optional[str] = None, progress: Optional[bool] = None, tta=None,
            boxes_from_mask="largest", boxes_min_area: int = 0) -> PredictResult:
    """Predict every image of ``inputs`` (file or folder) into ``output``; see the module
    docstring and :class:`src.inference.Predictor` for the settings."""
    from .data.records import DataError
    from .data.volumes import find_volumes, load_stacks
    from .inference import Predictor, Skipped, list_images
    from .runs import CheckpointError

    try:
        pr = Predictor(checkpoint, threshold=threshold, resize=resize, tta=tta, mask_threshold=mask_threshold,
                       boxes_from_mask=boxes_from_mask, boxes_min_area=boxes_min_area)
        root, out = Path(str(inputs)).expanduser(), Path(str(output)).expanduser()
        files = list_images(root, exclude=out)
    except CheckpointError:
        raise   # the same line in every command
    except ValueError as e:   # a bad setting (tta, boxes_from_mask, resize) or input
        raise PredictError(str(e)) from e
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []

    def skip(path, reason):
        reason = reason[len(str(path)):].lstrip(": ") if reason.startswith(str(path)) else reason
        log.warning("skipped %s: %s", path, reason)
        skipped.append({"path": str(path), "reason": reason})

    try:
        files, volumes = find_volumes(files, _slice_options(pr), skip)
    except DataError as e:
        raise PredictError(str(e)) from e
    log.info("predicting %d files%s with %s (input %dx%d, %s, classes %s, threshold %.3g)", len(files),
             f" and {len(volumes)} volumes" if volumes else "", pr.checkpoint, pr.size[0], pr.size[1], pr.resize,
             pr.classes, pr.threshold)
    for r in pr.predict_files(files, batch_size=batch_size, progress=progress):
        if isinstance(r, Skipped):
            skipped.append({"path": str(r.path), "reason": r.reason})
        else:
            rows.append(_row(r, pr, out, _out_name(r.path, root), save_masks, save_overlays))
    mask_volumes = []
    for stack in load_stacks(volumes, skip):
        vrows, written = _predict_stack(stack, pr, out, root, batch_size, save_masks, save_overlays)
        rows += vrows
        mask_volumes += [str(written)] if written else []
    cols = _columns(pr) + (["volume", "slice"] + (["mask_volume"] if mask_volumes else []) if volumes else [])
    _write_csv(out / "predictions.csv", cols, rows)
    _write_csv(out / "skipped.csv", ["path", "reason"], skipped, fmt=False)
    if skipped:
        log.warning("%d inputs skipped (see %s)", len(skipped), out / "skipped.csv")
    return PredictResult(output=out, rows=rows, skipped=skipped, classes=pr.classes, checkpoint=pr.checkpoint,
                         tta=pr.tta, boxes_from_mask=pr.mask_boxes, volumes=len(volumes), mask_volumes=mask_volumes)


def _slice_options(pr) -> dict:
    """The run's ``dicom`` / ``nifti`` reader options that shape slices (window, axis ...),
    so a volume is sliced for prediction as the training data was; {} for other runs."""
    cfg = pr.loaded.run.config
    data = cfg.get("data") if cfg is not None else None
    if data is None or str(data.get("reader")) not in ("dicom", "nifti"):
        return {}
    from omegaconf import OmegaConf

    opts = data.get("options")
    return dict(OmegaConf.to_container(opts, resolve=True) if opts is not None else {})


def _predict_stack(stack, pr, out: Path, root: Path, batch_size: int, save_masks: bool, save_overlays: bool):
    """Rows of one volume's slices; for a NIfTI volume and a model with a mask head, the
    predicted mask volume ``volumes/<name>_mask.nii.gz`` with the input's affine."""
    from .data.readers.nifti import nifti_stem
    from .data.volumes import as_rgb
    from .inference import ArrayImage

    if stack.kind == "nifti":
        p = stack.path.with_name(nifti_stem(stack.path))
        rel = p.relative_to(root) if root.is_dir() else Path(p.name)
    else:   # the series' folder and its hashed id: several series may share a folder
        rel = (stack.path.parent.relative_to(root) if root.is_dir() else Path()) / stack.name
    base = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in "__".join(rel.parts))
    items = [ArrayImage(Path(f), as_rgb(s)) for f, s in zip(stack.files, stack.slices)]
    rows, masks = [], {}
    for k, r in enumerate(pr.predict_files(items, batch_size=batch_size, progress=False)):
        row = _row(r, pr, out, f"{base}__slice{k:04d}", save_masks, save_overlays)
        row.update(volume=stack.name, slice=k)
        rows.append(row)
        if r.mask is not None:
            masks[k] = r.mask
    written = None
    if stack.geometry is not None and masks:
        import nibabel as nib

        written = out / "volumes" / f"{base}_mask.nii.gz"
        written.parent.mkdir(parents=True, exist_ok=True)
        nib.save(stack.geometry.mask_volume(masks), str(written))
        for row in rows:
            row["mask_volume"] = str(written)
    return rows, written


def _columns(pr) -> list:
    """The columns of ``predictions.csv`` for the heads this model has."""
    heads = pr.heads
    cols = ["path", "width", "height", "predicted", "confidence", *[f"p_{c}" for c in pr.prob_names]]
    cols += ["p_tumor"] if "tumor" in heads and not pr.binary_only else []
    cols += ["labels"] if "multilabel" in heads else []
    if "boxes" in heads:
        cols += [f"box_{k}" for k in BOX_KEYS] + [f"box_{c}_{k}" for c in pr.slot_names for k in BOX_KEYS]
    if pr.mask_boxes:
        cols += [f"box_{k}" for k in BOX_KEYS] + ["box_source", "mask_components"]
        cols += ["boxes"] if pr.mask_boxes == "components" else []
    cols += ["mask_area_px", "mask_path"] if "mask" in heads else []
    return cols + ["overlay_path", "tta"]


def _row(r, pr, out: Path, name: str, save_masks: bool, save_overlays: bool) -> dict:
    """One ``predictions.csv`` row of an :class:`~src.inference.ImagePrediction`; writes
    its mask and overlay PNGs."""
    from .inference import write_png

    row = {"path": str(r.path), "width": r.frame.w, "height": r.frame.h}
    if r.predicted is not None:
        row.update(predicted=r.predicted, confidence=r.confidence, **{f"p_{c}": p for c, p in r.probs.items()})
    if r.p_tumor is not None and not pr.binary_only:
        row["p_tumor"] = r.p_tumor
    if r.labels is not None:
        row["labels"] = ";".join(r.labels)
    if r.slot_boxes is not None:
        row.update({f"box_{c}_{k}": float(r.slot_boxes[s, j]) for s, c in enumerate(pr.slot_names)
                    for j, k in enumerate(BOX_KEYS)})
    if r.mask is not None:
        row["mask_area_px"] = int(r.mask.sum())
    if r.mask_boxes is not None:
        row.update(box_source="mask", mask_components=len(r.mask_boxes))
        if pr.mask_boxes == "components":
            row["boxes"] = ";".join(" ".join(f"{v:g}" for v in c) for c in r.mask_boxes)
    if r.box is not None:
        row.update({f"box_{k}": float(v) for k, v in zip(BOX_KEYS, r.box)})
    if r.mask is not None and save_masks:
        row["mask_path"] = str(write_png(out / "masks" / f"{name}_mask.png", r.mask * 255))
    if save_overlays:
        row["overlay_path"] = str(write_png(out / "overlays" / f"{name}_overlay.png", r.overlay()))
    row["tta"] = pr.tta
    return row


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


def _write_csv(path: Path, cols: list, rows: list, fmt: bool = True) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in cols} if fmt else r)


def run(cfg) -> dict:
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
    from .runs import CHECKPOINT_REQUIRED

    return cli_main(__doc__, "predict", lambda cfg, args: run(cfg), argv, errors=(PredictError,),
                    required=[("checkpoint", CHECKPOINT_REQUIRED)])


if __name__ == "__main__":
    sys.exit(main())
