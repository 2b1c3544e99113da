"""Generate the numbered notebooks from this one file (reproducible, diffable).

    .venv/bin/python notebooks/make_notebooks.py          # (re)write notebooks/0*.ipynb
    .venv/bin/python notebooks/make_notebooks.py --check  # exit 1 when a stored notebook differs

Edit the cells here, not in Jupyter, then run it and commit the ``.ipynb`` files. Every
notebook is written without outputs, with ``execution_count`` null and deterministic
cell ids, and has exactly one parameters cell (tagged ``parameters``, the papermill
convention) near the top: data config, data root, image size, epochs, steps, output dir
and a ``TINY`` flag. The defaults run on the embedded phantom data on a CPU in minutes;
a real dataset is one edit of that cell. The cells only call the library (Hydra compose
with the same overrides as the command line, and the commands' own ``run`` functions);
``tests/test_notebooks.py`` executes them all on tiny phantom data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


# ---------------------------------------------------------------------------------------
# shared cells
# ---------------------------------------------------------------------------------------
PARAMS_HEAD = '''\
# Parameters: the only cell to edit (tagged "parameters": papermill / nbclient can inject values).
# Defaults: the embedded synthetic phantom data (generated on first use) and small CPU settings.
# A real dataset, e.g.: DATA = "figshare"; DATA_ROOT = "../shared/data/figshare-cheng"; IMAGE_SIZE = 128
# (relative paths are relative to the checkout, as on the command line).
DATA = "phantom"        # data config: conf/data/<DATA>.yaml (phantom | figshare | folder | coco | yolo | roboflow_csv | roboflow)
DATA_ROOT = None        # dataset folder (None = the config's data.root; phantom: <DATA_DIR>/phantom)
DATA_DIR = None         # generated data and caches (None = paths.data_dir: data/ in the checkout)
IMAGE_SIZE = 64         # model input in pixels (data.image_size)
EPOCHS = {epochs}          # epochs per phase (trainer.max_epochs caps every phase)
STEPS = None            # training steps per epoch (None = the whole training split)
OUTPUT_DIR = None       # run folders (None = paths.output_root: outputs/ in the checkout)
TINY = False            # True: the smallest data and models, a smoke test in seconds (what the tests run)
EXTRA_OVERRIDES = []    # any other Hydra overrides, e.g. ["data.batch_size=16", "trainer.precision=float32"]'''

SETUP = '''\
# Setup: find the checkout (the folder above notebooks/), put it on sys.path, import the library.
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path.cwd().resolve()
while not ((ROOT / "conf" / "config.yaml").is_file() and (ROOT / "src" / "config.py").is_file()):
    if ROOT == ROOT.parent:
        raise RuntimeError("start this notebook inside the BrainTumorMTL checkout (its notebooks/ folder)")
    ROOT = ROOT.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image, display
from omegaconf import OmegaConf

from src.config import compose  # Hydra compose: the same configs and overrides as the command line

NOTEBOOK = "{name}"
# TINY: the smallest models (config overrides only; the architectures are the library's;
# EfficientMTNet without its auxiliary deep-supervision heads)
TINY_MODEL = {{
    "small_cnn": ["model.widths=[8,16]"],
    "mtl_unet": ["model.widths=[4,4,8,8,8]", "model.latent_dim=8"],
    "efficient_mtnet": ["model.ltd_channels=[8,8,8]", "model.widths=[8,12,16]", "model.blocks=[1,1,1]",
                        "model.expansion=2", "model.neck_channels=16", "model.decoder_channels=[16,8]",
                        "model.ham_channels=8", "model.ham_rank=4", "model.class_hidden=8", "model.aux=false"],
    "resnet101_detector": ["model.backbone=mobilenet_v3_small", "model.weights=null", "model.hidden=16"],
    "classifier": ["model.backbone=mobilenet_v3_small", "model.weights=null"],
}}


def _abs(p):
    """A path of the parameters cell; relative paths are relative to the checkout (like the CLI)."""
    if p in (None, ""):
        return None
    p = Path(str(p)).expanduser()
    return str(p if p.is_absolute() else (ROOT / p).resolve())


def common_overrides():
    """Paths and tracking, shared by every command (train, describe, curate, evaluate, explain, predict)."""
    o = [f"paths.output_root={{_abs(OUTPUT_DIR)}}"] if OUTPUT_DIR else []
    if DATA_DIR:
        o.append(f"paths.data_dir={{_abs(DATA_DIR)}}")
    if TINY:
        o.append("tracking=none")
    return o


def overrides(*extra, model=None):
    """The Hydra overrides of the parameters cell: what you would type after `python -m src.train`."""
    o = [f"data={{DATA}}", f"data.image_size={{IMAGE_SIZE}}", f"trainer.max_epochs={{EPOCHS}}",
         f"trainer.verbose={{0 if TINY else 2}}", *common_overrides()]
    if DATA_ROOT:
        o.append(f"data.root={{_abs(DATA_ROOT)}}")
    if STEPS:
        o.append(f"trainer.steps_per_epoch={{STEPS}}")
    if model:
        o.append(f"model={{model}}")
    if TINY:
        if DATA == "phantom":
            o += ["data.options.n_patients=12", "data.options.image_size=64"]
        o += ["trainer.validation_steps=1", *TINY_MODEL.get(model or "small_cnn", [])]
    return o + list(EXTRA_OVERRIDES) + list(extra)


CFG = compose(overrides())
OUT = Path(CFG.paths.output_root)
FIG_DIR = OUT / "notebooks" / NOTEBOOK  # this notebook's figures and reports
FIG_DIR.mkdir(parents=True, exist_ok=True)
print(f"checkout {{ROOT}}\\ndata {{CFG.data.name}} at {{CFG.data.root}}\\noutputs {{OUT}}\\nfigures {{FIG_DIR}}")


def show(fig, name):
    """Save a matplotlib figure under FIG_DIR and display it (whatever the matplotlib backend)."""
    path = FIG_DIR / f"{{name}}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))
    return path


def show_png(path, width=None):
    """Display a PNG the library wrote."""
    if path and Path(path).is_file():
        display(Image(filename=str(path), width=width))
    else:
        print(f"(no image at {{path}})")'''

TRAIN_HELPERS = '''\
def train(train_overrides, tag):
    """`python -m src.train <overrides>` in process: Hydra compose + the CLI's own `run(cfg, run_dir)`,
    in a run folder like the CLI's (<output_root>/train/<time>_<tag>). Returns (run folder, final metrics)."""
    from src.train import run

    cfg = compose(train_overrides)
    run_dir = Path(cfg.paths.output_root) / str(cfg.task_name) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{tag}"
    print("python -m src.train " + " ".join(train_overrides))
    final = run(cfg, run_dir)
    print(f"run folder: {run_dir}")
    return run_dir, final


def history(run_dir, phase):
    """The phase's learning curves as Keras' CSVLogger wrote them."""
    return pd.read_csv(Path(run_dir) / f"phase{phase}" / "history.csv")


def plot_curves(hist, keys, title, name):
    """Training (o-) and validation (s--) curves of the history columns `keys`."""
    keys = [k for k in keys if k in hist.columns]
    if not keys:
        print(f"none of the columns {keys} in the history: {list(hist.columns)}")
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    epochs = hist["epoch"] + 1
    for ax, k in zip(axes[0], keys):
        ax.plot(epochs, hist[k], "o-", ms=4, label="train")
        if f"val_{k}" in hist.columns:
            ax.plot(epochs, hist[f"val_{k}"], "s--", ms=4, label="val")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    show(fig, name)'''

EVAL_HELPER = '''\
def evaluate(run_dir, split, *extra):
    """`python -m src.evaluate checkpoint=<run> split=<split>` in process (the CLI's `run`).
    Returns (summary, the report's metrics.json)."""
    from src import evaluate as ev

    args = [f"checkpoint={run_dir}", f"split={split}", "progress=false", *common_overrides(), *extra]
    summary = ev.run(compose(args, config_name="evaluate"), args)
    print(f"report: {summary['report']}")
    for note in summary["notes"]:
        print("note:", note)
    return summary, json.loads((Path(summary["out"]) / "metrics.json").read_text())'''


def md(text: str):
    return new_markdown_cell(dedent(text).strip("\n"))


def code(text: str, tags=None):
    cell = new_code_cell(dedent(text).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(epochs: int, extra: str = "") -> object:
    src = PARAMS_HEAD.format(epochs=epochs)
    if extra:
        src += "\n" + dedent(extra).strip("\n")
    return code(src, tags=["parameters"])


def setup(name: str, *helpers: str):
    return code("\n\n\n".join([SETUP.format(name=name), *helpers]))


# ---------------------------------------------------------------------------------------
# 01: EDA
# ---------------------------------------------------------------------------------------
def nb_01():
    name = "01_eda"
    return [
        md("""
        # 01 · Exploratory data analysis

        The dataset as the project reads it: the same reader, records and splits that
        `python -m src.data.describe` and training use. Summary per split, class balance,
        image sizes and box sizes, a sample grid with the tumour boxes (red) and mask outlines
        (green), and the duplicate / leakage check of `src.curate` (run it before trusting any
        number: duplicated images across splits inflate published accuracies).

        Runs on the synthetic **phantom** data by default (generated on first use, no download).
        For a real dataset change the parameters cell only, e.g. `DATA = "folder"`,
        `DATA_ROOT = "../shared/data/kaggle-brain-mri-224"`.
        """),
        params(1),
        setup(name),
        md("""
        ## Summary (`python -m src.data.describe`)

        `load_data` reads, groups and splits the records (group-aware, so no patient is in two
        splits); `describe` is the function behind the command's JSON. *Unknown* targets are
        not negatives: an image without box annotation gets box weight 0 in training.
        """),
        code("""
        from src.data.dataset import load_data
        from src.data.describe import describe, sample_grid

        cfg = compose(overrides(), config_name="describe")  # = python -m src.data.describe <overrides>
        bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
        summary = describe(bundle)
        print(f"{summary['name']}: {summary['images']} images, classes {summary['classes']}")
        print("groups:", json.dumps(summary["groups"]))
        print("skipped files:", json.dumps(summary["skipped"]))
        splits = sorted(summary["splits"], key=lambda s: {"train": 0, "val": 1, "test": 2}.get(s, 3))
        pd.DataFrame({split: {"images": s["images"], "groups": s["groups"], "boxes": s["boxes"],
                              "images with boxes": s["images_with_boxes"], "masks": s["masks"],
                              **{f"unknown {k}": v for k, v in s["unknown"].items()}}
                      for split, s in ((k, summary["splits"][k]) for k in splits)})
        """),
        md("## Class balance"),
        code("""
        counts = pd.DataFrame({split: summary["splits"][split]["classes"] for split in splits}).fillna(0).astype(int)
        counts = counts.reindex([c for c in [*summary["classes"], "unknown"] if c in counts.index])
        fig, ax = plt.subplots(figsize=(7, 3.4))
        counts.plot.bar(ax=ax, rot=0)
        ax.set_ylabel("images")
        ax.set_title(f"{summary['name']}: images per class and split")
        show(fig, "class_balance")
        counts.assign(total=counts.sum(axis=1), share=(counts.sum(axis=1) / max(1, counts.values.sum())).round(3))
        """),
        md("""
        ## Image sizes and tumour sizes

        Sizes of the files on disk (the pipeline resizes them to `data.image_size`), and the
        area of the tumour boxes as a share of the image, per class.
        """),
        code("""
        rows = []
        for r in bundle.records:
            areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in r.boxes]
            rows.append({"split": r.split, "label": r.label if r.known.get("label") else "unknown",
                         "width": r.width, "height": r.height, "boxes": len(r.boxes),
                         "box_area": float(np.mean(areas)) if areas else np.nan})
        table = pd.DataFrame(rows)
        print("most common sizes (WxH):", summary["image_sizes"], "| distinct:", summary["distinct_image_sizes"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        wh = table[["width", "height"]].apply(pd.to_numeric, errors="coerce").dropna()
        if len(wh):
            axes[0].scatter(wh["width"], wh["height"], s=12, alpha=0.5)
        axes[0].set(xlabel="width (px)", ylabel="height (px)", title="image sizes")
        for label, g in table.dropna(subset=["box_area"]).groupby("label"):
            axes[1].hist(g["box_area"], bins=15, range=(0, max(0.05, table["box_area"].max())), alpha=0.5, label=label)
        axes[1].set(xlabel="box area / image area", ylabel="images", title="tumour box size per class")
        if table["box_area"].notna().any():
            axes[1].legend(fontsize=7)
        show(fig, "sizes")
        table.groupby("label")[["boxes", "box_area"]].agg(["mean", "max"]).round(4)
        """),
        md("## Sample grid: boxes (red) and mask outlines (green)"),
        code("""
        show_png(sample_grid(bundle, FIG_DIR / "sample_grid.png", per_class=4, size=160, seed=int(cfg.seed)))
        """),
        md("""
        ## Duplicates and leakage (`python -m src.curate`)

        Exact duplicates (same decoded pixels) and near duplicates (256-bit perceptual hash
        within `curate.hamming` bits), grouped; groups that cross splits are leakage. The
        command also writes a cleaned `manifest.jsonl` that every command reads with
        `data.manifest=...`. (The phantom has no planted duplicates: expect few or none.)
        """),
        code("""
        from src.curate.cli import run as curate

        ccfg = compose(overrides(f"curate.out={FIG_DIR / 'curate'}", "curate.progress=false"), config_name="curate")
        cur = curate(ccfg)  # = python -m src.curate <overrides>
        g = cur["groups"]
        print(f"{cur['images']} images: {g['count']} duplicate groups ({g['extra_copies']} extra copies), "
              f"{g['cross_split']['groups']} crossing splits, {g['conflicts']['groups']} with conflicting labels")
        print("cleaned manifest:", cur["files"]["manifest"], f"({cur['manifest']})")
        if cur["files"].get("gallery"):
            show_png(cur["files"]["gallery"])  # the largest cross-split groups
        else:
            print("no duplicate groups: no gallery")
        pd.read_csv(cur["files"]["duplicates"]).head(20)
        """),
    ]


# ---------------------------------------------------------------------------------------
# 02: class head (phase 2)
# ---------------------------------------------------------------------------------------
def nb_02():
    name = "02_classifier_head"
    return [
        md("""
        # 02 · The class head alone (phase 2)

        Models are trained in phases defined in their config (`conf/model/<model>.yaml`):
        for the detectors 1 = box head, 2 = class head, 3 = both. **Phase 2 trains the class
        head alone**: the box head's loss weight is 0 and its layers are frozen. With
        `MODEL = "resnet101_detector"` the backbone is frozen too (`unfreeze: {mode: none}`:
        only the heads learn on the pretrained features; give it `model.weights=imagenet`
        online, or a weights file, in `EXTRA_OVERRIDES`). The default `small_cnn` has no
        pretrained backbone, so its trunk learns with the class head.

        A single `phase=2` starts from the newest phase-1 checkpoint of the same model and
        data under the output folder when there is one (03_box_head makes one), and says so.
        Then: learning curves from the run's `history.csv` and the confusion matrix of the
        validation split (`src.evaluate`; the test split is for 05_evaluation).
        """),
        params(4, '''
        MODEL = "small_cnn"     # model config: small_cnn | resnet101_detector (conf/model/)
        SPLIT = "val"           # split evaluated here (never select a model on test)'''),
        setup(name, TRAIN_HELPERS, EVAL_HELPER),
        md("## The phase as the model config defines it"),
        code("""
        train_overrides = overrides("phase=2", model=MODEL)
        print(OmegaConf.to_yaml(compose(train_overrides).model.phases))
        """),
        md("## Train phase 2 (`python -m src.train phase=2 ...`)"),
        code("""
        run_dir, final = train(train_overrides, "phase2")
        print("backbone:", json.dumps(final.get("unfreeze")) if final.get("unfreeze") else "none to freeze (every layer of the trunk trains)")
        pd.Series(final["val"]).round(4).to_frame("validation (best checkpoint)")
        """),
        md("## Learning curves (`phase2/history.csv`)"),
        code("""
        hist = history(run_dir, 2)
        plot_curves(hist, ["loss", "class_loss", "class_acc", "class_auc", "class_f1"], f"{MODEL}, phase 2", "learning_curves")
        hist.round(4)
        """),
        md("""
        ## Confusion matrix (`src.evaluate` on the validation split)

        The report folder also holds ROC curves, the reliability diagram, a worst/best
        gallery, `predictions.csv` and `report.html`.
        """),
        code("""
        from src.evaluation.plots import confusion_matrix_plot

        ev, metrics = evaluate(run_dir, SPLIT)
        cls = metrics["heads"].get("class")
        if cls is None:
            print("no class metrics:", metrics.get("notes"))
        else:
            print(f"{SPLIT}: accuracy {cls['accuracy']:.3f}, balanced accuracy {cls['balanced_accuracy']:.3f}, "
                  f"macro F1 {cls['macro']['f1']:.3f}, ROC-AUC {cls['roc_auc']['macro']:.3f} "
                  f"(chance {1 / len(cls['classes']):.2f}, {cls['n']} images)")
            if "worst_class" in cls:
                print("lowest recall:", json.dumps(cls["worst_class"]))
            show_png(confusion_matrix_plot(cls["confusion_matrix"], cls["classes"], FIG_DIR / "confusion.png",
                                           title=f"{MODEL} phase 2, {SPLIT}"))
            display(pd.DataFrame(cls["per_class"]).T.round(3))
        """),
    ]


# ---------------------------------------------------------------------------------------
# 03: box head (phase 1)
# ---------------------------------------------------------------------------------------
def nb_03():
    name = "03_box_head"
    return [
        md("""
        # 03 · The box head alone (phase 1)

        Phase 1 of the detectors trains the box head only (class loss weight 0). The box head
        predicts one box per class slot (slot k always means class k), valid by construction
        (x_max > x_min), with a GIoU + L1 loss; slots whose box is unknown have weight 0.
        Then: the box learning curves, the IoU histogram of the validation split and box
        overlays (true boxes solid green, predicted dashed red) of the worst and best images.
        """),
        params(4, '''
        MODEL = "small_cnn"     # model config with a box head: small_cnn | resnet101_detector
        SPLIT = "val"           # split evaluated here'''),
        setup(name, TRAIN_HELPERS, EVAL_HELPER),
        md("## Train phase 1 (`python -m src.train phase=1 ...`)"),
        code("""
        train_overrides = overrides("phase=1", model=MODEL)
        print(OmegaConf.to_yaml(compose(train_overrides).model.phases["1"]))
        run_dir, final = train(train_overrides, "phase1")
        pd.Series(final["val"]).round(4).to_frame("validation (best checkpoint)")
        """),
        md("## Learning curves"),
        code("""
        hist = history(run_dir, 1)
        plot_curves(hist, ["loss", "boxes_loss", "boxes_iou"], f"{MODEL}, phase 1 (box head)", "learning_curves")
        hist.round(4)
        """),
        md("""
        ## IoU histogram (`src.evaluate`)

        IoU of every known box slot of the split (healthy slices have no box and count only
        through the class head). The COCO mAP (pycocotools) uses the class probabilities as
        confidence, which are untrained in phase 1.
        """),
        code("""
        from src.evaluation.plots import histogram_plot

        ev, metrics = evaluate(run_dir, SPLIT)
        boxes = metrics["heads"].get("boxes")
        if boxes is None:
            print("no box metrics (does this dataset have boxes?):", metrics.get("notes"))
        else:
            coco_map50 = boxes.get("map50")  # null when no class has a true box
            print(f"{SPLIT}: {boxes['n_boxes']} boxes, slot IoU mean {boxes['slot_iou_mean']:.3f}, "
                  f"median {boxes['slot_iou_median']:.3f}, IoU>=0.5 {boxes['slot_iou_ge_0.5']:.3f}, "
                  f"IoU>=0.75 {boxes['slot_iou_ge_0.75']:.3f}, COCO mAP@0.5 "
                  f"{float('nan') if coco_map50 is None else coco_map50:.3f}")
            show_png(histogram_plot(boxes["slot_iou_histogram"], FIG_DIR / "iou_hist.png", f"Box IoU, {MODEL} phase 1, {SPLIT}",
                                    "IoU", marks=(0.5, 0.75)))
            display(pd.DataFrame(boxes["per_class"]).T.round(3))
        """),
        md("## Box overlays: the worst and best images by IoU (true solid green, predicted dashed red)"),
        code("""
        show_png(Path(ev["out"]) / "gallery.png")
        preds = pd.read_csv(Path(ev["out"]) / "predictions.csv")
        preds.head(10)
        """),
    ]


# ---------------------------------------------------------------------------------------
# 04: joint training, multi-task U-Net, EfficientMTNet
# ---------------------------------------------------------------------------------------
BALANCE_HELPER = '''\
def plot_balance(hist, title, name):
    """The loss balancer's state per epoch (history columns balance/<head>/<key>)."""
    cols = [c for c in hist.columns if c.startswith("balance/")]
    if not cols:
        print("no balance/ columns: this run balanced its losses with static weights (model.balancing=static)")
        return None
    heads = sorted({c.split("/")[1] for c in cols})
    kinds = [k for k in ("effective_weight", "ema", "log_var")
             if any(c.endswith("/" + k) for c in cols) and (hist[[f"balance/{h}/{k}" for h in heads]] != 0).any().any()]
    kinds = kinds or ["effective_weight"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.0), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        for h in heads:
            ax.plot(hist["epoch"] + 1, hist[f"balance/{h}/{k}"], "o-", ms=4, label=h)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    show(fig, name)'''


def nb_04():
    name = "04_joint_training"
    return [
        md("""
        # 04 · Joint training and the multi-task models

        1. **Phase 3** of the detector: class and box heads together. A single `phase=3` starts
           from the newest phase-2 checkpoint of the same model and data (02_classifier_head
           writes one) and says which.
        2. The **multi-task U-Net** (`model=mtl_unet`): reconstruction, tumour vs healthy,
           subtype (healthy slices weight 0) and segmentation heads on one encoder, losses
           balanced by their running means (EMA).
        3. **EfficientMTNet** (`model=efficient_mtnet`): joint segmentation + classification
           with deep supervision; here with learned uncertainty weighting (Kendall et al.)
           instead of its published static weights, to compare the balancers.

        Balancing state is logged per epoch as `balance/<head>/<key>` columns of `history.csv`
        (and in MLflow): the weight, the running mean (`ema`), the learned log-variance
        (`log_var`) and the effective weight the loss used.
        """),
        params(6, '''
        MODEL = "small_cnn"               # the detector of part 1: small_cnn | resnet101_detector
        UNET_BALANCING = "ema"            # mtl_unet loss balancing: static | ema | uncertainty
        EFFICIENT_BALANCING = "uncertainty"  # efficient_mtnet loss balancing (its config: static)'''),
        setup(name, TRAIN_HELPERS, BALANCE_HELPER),
        md("## 1. Phase 3: class and box heads together"),
        code("""
        run_dir, final = train(overrides("phase=3", model=MODEL), "phase3")
        print("started from:", json.loads((run_dir / "run_info.json").read_text()).get("initial_checkpoint"))
        runs, finals = {MODEL: run_dir}, {MODEL: final}
        plot_curves(history(run_dir, 3), ["loss", "class_loss", "boxes_loss", "class_acc", "boxes_iou"],
                    f"{MODEL}, phase 3 (joint)", "curves_detector")
        """),
        md("""
        ## 2. Multi-task U-Net (`python -m src.train model=mtl_unet`)

        With EMA balancing each head's loss is divided by its running mean, so heads on very
        different scales (MSE reconstruction, cross-entropy, Dice + focal) pull equally.
        """),
        code("""
        run_dir, final = train(overrides("phase=3", f"model.balancing={UNET_BALANCING}", model="mtl_unet"), "mtl_unet")
        runs["mtl_unet"], finals["mtl_unet"] = run_dir, final
        hist = history(run_dir, 3)
        plot_balance(hist, f"mtl_unet loss balancing ({UNET_BALANCING})", "balance_mtl_unet")
        plot_curves(hist, ["tumor_loss", "subtype_loss", "recon_loss", "mask_loss", "class_acc"], "mtl_unet", "curves_mtl_unet")
        hist.filter(like="balance/").round(4)
        """),
        md("""
        ## 3. EfficientMTNet (`python -m src.train model=efficient_mtnet`)

        The auxiliary mask heads (`mask_aux1`, `mask_aux2`) give deep supervision during
        training and are left out of the exported model.
        """),
        code("""
        run_dir, final = train(overrides("phase=3", f"model.balancing={EFFICIENT_BALANCING}", model="efficient_mtnet"),
                               "efficient_mtnet")
        runs["efficient_mtnet"], finals["efficient_mtnet"] = run_dir, final
        hist = history(run_dir, 3)
        plot_balance(hist, f"efficient_mtnet loss balancing ({EFFICIENT_BALANCING})", "balance_efficient_mtnet")
        plot_curves(hist, ["class_loss", "mask_loss", "mask_aux1_loss", "mask_aux2_loss", "mask_dice"], "efficient_mtnet",
                    "curves_efficient_mtnet")
        hist.filter(like="balance/").round(4)
        """),
        md("""
        ## Side by side (validation, best checkpoint of each run)

        Evaluate any of them in 05_evaluation (`RUN_DIR = <run folder>`) or with
        `python -m src.evaluate checkpoint=<run folder>`.
        """),
        code("""
        keys = ["class_acc", "class_auc", "class_f1", "boxes_iou", "tumor_auc", "mask_dice", "mask_iou", "loss"]
        table = pd.DataFrame({m: {k: f["val"].get(k, np.nan) for k in keys} for m, f in finals.items()}).T
        table["run folder"] = [str(runs[m]) for m in table.index]
        table.round(4)
        """),
    ]


# ---------------------------------------------------------------------------------------
# 05: evaluation, Grad-CAM, embeddings, prediction
# ---------------------------------------------------------------------------------------
def nb_05():
    name = "05_evaluation"
    return [
        md("""
        # 05 · Evaluation, explanations and predictions

        On one training run (`RUN_DIR`, or the newest phase-3 run of `MODEL` on `DATA` under
        the output folder, which 04_joint_training makes; trained here when there is none):

        * `src.evaluate` on the **test** split: per-head metrics, confusion matrix, calibration,
          worst/best gallery, `report.html` (the command: `python -m src.evaluate checkpoint=<run>`);
        * Grad-CAM overlays with the pseudo-mask Dice against the true masks (`python -m src.explain what=gradcam`);
        * a 2-D map of the learned embeddings, train o / test x (`python -m src.explain what=umap`);
        * predictions on new images, at their original size (`python -m src.predict`).
        """),
        params(6, '''
        MODEL = "small_cnn"     # model config of the run to find (when RUN_DIR is None)
        RUN_DIR = None          # a training run folder (None = the newest phase-3 run of MODEL on DATA)
        SPLIT = "test"          # split of the final report
        EMBEDDING = "umap"      # umap | pca (pca: quick, no UMAP compile)
        NEW_IMAGES = None       # a file or folder of images to predict (None = a few new phantom slices)'''),
        setup(name, TRAIN_HELPERS, EVAL_HELPER),
        md("## The run"),
        code("""
        from src.runs import find_phase_checkpoint

        train_overrides = overrides("phase=3", model=MODEL)
        cfg = compose(train_overrides)
        if RUN_DIR:
            run_dir = Path(_abs(RUN_DIR))
        else:
            ckpt = find_phase_checkpoint(Path(cfg.paths.output_root), cfg.model.name, cfg.data.name, "3")
            if ckpt is None:
                print(f"no phase-3 run of {cfg.model.name} on {cfg.data.name} under {cfg.paths.output_root}: training one")
                run_dir, _ = train(train_overrides, "phase3")
            else:
                run_dir = ckpt.parents[2]  # <run>/phase3/checkpoints/best.keras
        print("run:", run_dir)
        print(json.dumps(json.loads((run_dir / "run_info.json").read_text()), indent=1))
        """),
        md("## Evaluation report (`python -m src.evaluate checkpoint=<run> split=test`)"),
        code("""
        ev, metrics = evaluate(run_dir, SPLIT)
        out = Path(ev["out"])
        show_png(out / "confusion_class.png")
        show_png(out / "gallery.png")
        pd.Series(ev["headline"]).round(4).to_frame(f"{SPLIT} ({ev['n_images']} images)")
        """),
        md("""
        ## Grad-CAM (`python -m src.explain what=gradcam`)

        Where the class head looks. The heat map thresholded into a pseudo-mask is compared
        with the true tumour mask (Dice): weak localisation, measured.
        """),
        code("""
        from src import explain

        args = [f"checkpoint={run_dir}", "what=gradcam", f"split={SPLIT}", f"n={4 if TINY else 16}", *common_overrides()]
        cam = explain.run(compose(args, config_name="explain"), args)
        print(f"{cam['images']} images, head {cam['head']}, layer {cam['layer']}, pseudo-mask Dice {json.dumps(cam['dice'])}")
        cams = pd.read_csv(cam["csv"])
        for p in cams["overlay"].head(4):
            show_png(p, width=480)
        cams.drop(columns=["path", "overlay"]).round(3)
        """),
        md("""
        ## Embeddings (`python -m src.explain what=umap`)

        The pooled features before the heads of train (o) and test (x) images, projected to 2-D.
        Test points that fall in another class's cluster are the confusions to look at.
        """),
        code("""
        args = [f"checkpoint={run_dir}", "what=umap", f"umap.method={EMBEDDING}", *common_overrides()]
        emb = explain.run(compose(args, config_name="explain"), args)
        print(f"{emb['images']} images, {emb['embedding_dim']}-D embeddings -> {emb['png']}")
        show_png(emb["png"], width=560)
        """),
        md("""
        ## Predictions on new images (`python -m src.predict checkpoint=<run> input=<folder> output=<folder>`)

        Any image file or folder: class probabilities, boxes in pixels of the original image,
        masks at the original size, overlays and `predictions.csv`; unreadable files are
        listed in `skipped.csv` and never stop the batch. Without `NEW_IMAGES`, a few slices of
        a phantom generated with another seed (images the model has never seen).
        """),
        code("""
        from src import predict
        from src.data.phantom import ensure_phantom

        if NEW_IMAGES:
            new_images = _abs(NEW_IMAGES)
        else:
            new_root = FIG_DIR / "new_phantom"
            ensure_phantom(new_root, n_patients=2 if TINY else 6, image_size=64 if TINY else 256, seed=2024)
            new_images = new_root / "images"
        args = [f"checkpoint={run_dir}", f"input={new_images}", f"output={FIG_DIR / 'predict'}", *common_overrides()]
        res = predict.run(compose(args, config_name="predict"))
        print(f"{res['predicted']} predicted, {res['skipped']} skipped -> {res['predictions_csv']}")
        preds = pd.read_csv(res["predictions_csv"])
        for p in preds["overlay_path"].dropna().head(4):
            show_png(p, width=256)
        preds.drop(columns=[c for c in preds.columns if c.startswith("box_") and c.count("_") > 1]).head(10)
        """),
        md("""
        ## Next

        * `python -m src.export checkpoint=<run> format=tflite` (or `savedmodel`, `onnx`): the
          inference model without auxiliary heads, checked against Keras.
        * On a real dataset run 01_eda's duplicate check first and train on the cleaned
          manifest (`data.manifest=...`): duplicates across splits make test numbers lie.
        """),
    ]


NOTEBOOKS = {
    "01_eda": nb_01,
    "02_classifier_head": nb_02,
    "03_box_head": nb_03,
    "04_joint_training": nb_04,
    "05_evaluation": nb_05,
}


def build(name: str):
    """The notebook ``name`` as a NotebookNode: no outputs, execution_count null, stable ids."""
    nb = new_notebook(cells=NOTEBOOKS[name](), metadata={
        "kernelspec": dict(KERNELSPEC),
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    })
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.validate(nb)
    return nb


def text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the stored notebooks, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        new = text(name)
        if args.check:
            if not path.is_file() or path.read_text() != new:
                stale.append(path.name)
        elif not path.is_file() or path.read_text() != new:
            path.write_text(new)
            print(f"wrote {path}")
    if stale:
        print("out of date (run notebooks/make_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
