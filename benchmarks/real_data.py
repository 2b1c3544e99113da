"""Real-data results of the recipes, and ablations of the training switches.

Every number comes from a fresh ``python -m src.train experiment=<recipe>`` process (the
start-up and the budget are what a user gets), evaluated with ``python -m src.evaluate`` on
the **test** split, which no step of training or checkpoint selection has seen (the
checkpoint is chosen on the validation split; the validation figures are recorded too and
labelled as such). Splits are group-aware (figshare: contiguous index blocks of 16
slices, no patient ids in that layout; Kaggle: duplicate groups, exact + near, kept inside
one split).

    # the results table (JSON + markdown; --readme writes it into README.md)
    .venv/bin/python benchmarks/real_data.py table [--recipes figshare_joint figshare_detector:15m ...] [--budget 25m]
    # ablations: the recipe, then one switch changed at a time, same budget
    .venv/bin/python benchmarks/real_data.py ablate --recipe figshare_joint --budget 10m
    # re-read finished runs instead of training again
    .venv/bin/python benchmarks/real_data.py table --runs figshare_joint=outputs/real/figshare_joint/<time>

Outputs: ``benchmarks/results/real_data.json`` / ``.md`` and ``ablations.json`` / ``.md``.
Runs go to ``outputs/real/`` (``--output-root``). Each row records the machine (CPU, its
bf16 support, the load average before and after) and the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.runtime import machine_info  # noqa: E402  (never imports TensorFlow)

RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable

#: recipe -> what the table calls it; extra overrides make the variants of one recipe
RECIPES = {
    "figshare_joint": ("figshare", "EfficientMTNet (class + mask; boxes from the mask)", []),
    # the same recipe under the longer budget: a row of its own (`table --recipes figshare_joint_2h:2h`)
    "figshare_joint_2h": ("figshare", "EfficientMTNet (class + mask; boxes from the mask)", ["experiment=figshare_joint"]),
    "figshare_detector": ("figshare", "small_cnn detector (class + dense boxes)", []),
    "figshare_unet": ("figshare", "multi-task U-Net (tumour/subtype + recon + mask)", []),
    "figshare_resnet101": ("figshare", "ResNet101 detector, no pretrained weights, 128 px",
                           ["experiment=figshare_detector", "model=resnet101_detector", "model.weights=null",
                            "data.batch_size=16"]),
    "kaggle_classifier": ("kaggle-4class", "EfficientMTNet (class head only)", []),
    "kaggle_small_cnn": ("kaggle-4class", "small_cnn (class head only)",
                         ["experiment=kaggle_classifier", "model=small_cnn", "model.heads=[class]",
                          "data.image_size=128"]),
}
PROTOCOL = {
    "figshare": "figshare-cheng, group-aware split by contiguous 16-slice index blocks (70/15/15); "
                "checkpoint chosen on val, reported on test",
    "kaggle-4class": "kaggle-brain-mri-224 Training, duplicate groups (exact + near, Hamming <= 12 of 256) kept "
                     "inside one split, 70/15/15; checkpoint chosen on val, reported on test",
}
#: ablation switches: name -> (overrides that turn the recipe's setting the other way, what it is)
SWITCHES = {
    "no_ema": (["trainer.ema_weights=false"], "weight EMA off"),
    "no_warmup": (["trainer.warmup_epochs=0"], "learning-rate warm-up off"),
    # the recipe samples classes balanced since the 2026-12-07 ablation (its "balanced" arm, against the
    # natural baseline then shipped): the switch now turns it back to natural frequencies
    "natural": (["data.sampling=natural"], "natural sampling (class frequencies of the data)"),
    # the 2026-12-07 table's arm, against its natural-sampling baseline (--overrides data.sampling=natural)
    "balanced": (["data.sampling=balanced"], "class-balanced sampling"),
    "label_smoothing": (["model.losses.class.label_smoothing=0.1"], "label smoothing 0.1"),
    "strong_aug": (["data.augment.rotate_deg=20", "data.augment.scale=0.2", "data.augment.shift=0.1",
                    "data.augment.brightness=0.2", "data.augment.contrast=0.2"], "stronger augmentation"),
    # EfficientMTNet decides its mask at /8; these refine it with the early features (model docstring)
    "detail4": (["model.detail_strides=[4]"], "mask decoder refined at /4"),
    "detail42": (["model.detail_strides=[4,2]"], "mask decoder refined at /4 and /2"),
    "mask_guided": (["model.mask_guided_class=true"], "class head also pools inside the predicted mask"),
}


def _run(cmd: list, log: Path) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
    f_out = log.with_suffix(".out")
    f_out.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return proc.stdout


def train(recipe: str, overrides: list, budget: str, output_root: Path, tag: str) -> Path:
    exp = [o for o in overrides if o.startswith("experiment=")] or [f"experiment={recipe}"]
    rest = [o for o in overrides if not o.startswith("experiment=")]
    out = _run([PY, "-m", "src.train", *exp, *rest, f"trainer.max_time={budget}", "tracking=none",
                f"paths.output_root={output_root}", "trainer.verbose=2"], output_root / "logs" / f"{tag}.log")
    start = out.rfind('{\n  "run_dir"')
    return Path(json.loads(out[start:])["run_dir"])


def evaluate(run: Path, split: str, extra=()) -> dict:
    out_dir = run / ("eval_" + split + "".join("_" + e.replace("=", "-") for e in extra))
    done = out_dir / "metrics.json"
    if done.is_file() and done.stat().st_mtime > max(p.stat().st_mtime for p in run.rglob("*.keras")):
        return json.loads(done.read_text())  # evaluated already (a re-read of a finished run)
    _run([PY, "-m", "src.evaluate", f"checkpoint={run}", f"split={split}", f"out={out_dir}", "tracking=none",
          *extra], run / f"evaluate_{split}.log")
    return json.loads((out_dir / "metrics.json").read_text())


def inference_rate(run: Path, batch: int = 16, repeats: int = 5) -> float:
    """Images/s of the exported inference network (no aux heads) at ``batch`` on this CPU."""
    code = f"""
import time, numpy as np, keras
from src.inference import load_for_inference
import json
m = load_for_inference({str(run)!r}).network
shape = tuple(m.input.shape[1:])
x = np.random.default_rng(0).random(({batch},) + shape, dtype=np.float32)
f = keras.Model(m.input, m.output)
f.predict_on_batch(x)
t = time.perf_counter()
for _ in range({repeats}): f.predict_on_batch(x)
print(json.dumps({{"img_per_s": {batch} * {repeats} / (time.perf_counter() - t)}}))
"""
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True)
    try:
        return round(json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"], 1)
    except (ValueError, IndexError, KeyError):
        print(out.stderr[-2000:], file=sys.stderr)
        return float("nan")


def _g(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def row_from(recipe: str, run: Path, budget: str, load: tuple) -> dict:
    dataset, what, _ = RECIPES.get(recipe, ("?", recipe, []))
    info = json.loads((run / "run_info.json").read_text())
    final = json.loads((run / "metrics.json").read_text())["final"]
    test, val = evaluate(run, "test"), evaluate(run, "val")
    row = {"recipe": recipe, "model": what, "dataset": dataset, "protocol": PROTOCOL.get(dataset, ""),
           "run": str(run), "image_size": info.get("image_size"), "precision": info.get("precision"),
           "budget": budget, "epochs": _g(final, "budget", "epochs_done"), "train_seconds": final.get("seconds"),
           "train_img_per_s": _g(final, "timing", "train_img_per_s"),
           "first_step_s": _g(final, "timing", "first_step_s"),
           "inference_img_per_s": inference_rate(run), "params": None, "load_before": load,
           "load_after": os.getloadavg(), "machine": machine_info(), "splits": {}}
    for name, m in (("test", test), ("val", val)):
        heads = m.get("heads", m)
        cls = _g(heads, "class") or {}
        s = {"n": _g(m, "n_images") or _g(m, "meta", "n_images"),
             "accuracy": _g(cls, "accuracy"), "balanced_accuracy": _g(cls, "balanced_accuracy"),
             "macro_f1": _g(cls, "macro", "f1"),
             "recall": {c: _g(v, "recall") for c, v in (_g(cls, "per_class") or {}).items()},
             "dice": _g(heads, "mask", "dice_mean_tumor_only") or _g(heads, "mask", "dice_mean"),
             "box_iou": _g(heads, "boxes", "slot_iou_mean"), "box_map50": _g(heads, "boxes", "map50"),
             "headline": m.get("headline")}
        row["splits"][name] = s
    row["params"] = _g(final, "params") or _params(run)
    return row


def _params(run: Path):
    code = ("from src.inference import load_for_inference; "
            f"print(load_for_inference({str(run)!r}).network.count_params())")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _pct(v):
    return "–" if v is None else f"{v:.3f}"


def markdown(rows: list) -> str:
    head = ("| dataset | model | params | size | budget (epochs) | accuracy | balanced acc. | recall per class | "
            "Dice (tumour) | box IoU / mAP@0.5 | train img/s | infer img/s |\n"
            "|---|---|---:|---:|---|---:|---:|---|---:|---|---:|---:|\n")
    lines = []
    for r in rows:
        t = r["splits"]["test"]
        rec = ", ".join(f"{c[:4]} {v:.2f}" for c, v in (t.get("recall") or {}).items() if v is not None)
        box = "–" if t.get("box_iou") is None else f"{t['box_iou']:.3f} / {_pct(t.get('box_map50'))}"
        params = f"{r['params'] / 1e6:.2f} M" if r.get("params") else "–"
        lines.append(f"| {r['dataset']} | {r['model']} | {params} | {r['image_size']} | {r['budget']} "
                     f"({r.get('epochs') or '–'}) | {_pct(t.get('accuracy'))} | {_pct(t.get('balanced_accuracy'))} | "
                     f"{rec or '–'} | {_pct(t.get('dice'))} | {box} | {r.get('train_img_per_s') or '–'} | "
                     f"{r.get('inference_img_per_s') or '–'} |")
    m = rows[0]["machine"] if rows else machine_info()
    foot = (f"\nTest split (never used for training or checkpoint selection); "
            f"{'; '.join(sorted({PROTOCOL[r['dataset']] for r in rows if r['dataset'] in PROTOCOL}))}. "
            f"Machine: {m['cpu']}, {m['cores']} cores, no GPU"
            f"{', AVX512-BF16' if m.get('avx512_bf16') else ''}; load average before/after each run in the JSON.\n")
    return head + "\n".join(lines) + "\n" + foot


def write_readme(md: str, marker: str = "results") -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text:
        print(f"README.md has no {start} marker; not written", file=sys.stderr)
        return
    pre, rest = text.split(start, 1)
    post = rest.split(end, 1)[1]
    readme.write_text(f"{pre}{start}\n{md}{end}{post}")


def cmd_table(args) -> None:
    runs = dict(r.split("=", 1) for r in args.runs)
    asked = [item.partition(":")[0] for item in args.recipes]
    kept = _kept_rows("real_data", asked) if args.keep else []
    rows = []
    for item in args.recipes:
        recipe, _, budget = item.partition(":")  # recipe[:budget], e.g. figshare_unet:15m
        budget = budget or args.budget
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        load = os.getloadavg()
        run = Path(runs[recipe]) if recipe in runs else train(recipe, RECIPES[recipe][2], budget,
                                                              Path(args.output_root), recipe)
        rows.append(row_from(recipe, run, budget, load))
        _save(_ordered(kept + rows), "real_data")
    rows = _ordered(kept + rows)
    md = markdown(rows)
    (RESULTS / "real_data.md").write_text(md)
    print(md)
    if args.readme:
        write_readme(md)


def cmd_ablate(args) -> None:
    runs = dict(r.split("=", 1) for r in args.runs)
    base_over = [*RECIPES.get(args.recipe, ("", "", []))[2], *args.overrides]
    rows = []
    base_name = "baseline (the recipe" + (" with --overrides)" if args.overrides else ")")
    arms = [("recipe", [], base_name)] + [(k, v[0], v[1]) for k, v in SWITCHES.items()
                                                          if k in args.switches]
    if args.append:  # add arms to the committed table: its baseline and other arms are kept as they are
        rows = [r for r in json.loads((RESULTS / "ablations.json").read_text())["rows"]
                if r["arm"] not in args.switches]
        arms = [a for a in arms if a[0] in args.switches]
    for name, over, what in arms:
        load = os.getloadavg()
        run = Path(runs[name]) if name in runs else train(args.recipe, [*base_over, *over], args.budget,
                                                          Path(args.output_root) / "ablate", f"{args.recipe}-{name}")
        row = row_from(args.recipe, run, args.budget, load)
        row.update(arm=name, change=what, overrides=over, base_overrides=list(args.overrides))
        rows.append(row)
        if name == "recipe":  # test-time augmentation needs no training: the recipe's run, flipped
            tta = dict(row, arm="tta_flip", change="test-time flip (evaluation only)", overrides=["tta=flip"],
                       splits={s: _split_summary(evaluate(run, s, ["tta=flip"])) for s in ("test", "val")})
            rows.append(tta)
        _save(rows, "ablations")
    md = ablation_markdown(rows)
    (RESULTS / "ablations.md").write_text(md)
    print(md)
    if args.readme:
        write_readme(md, "ablations")


def _kept_rows(name: str, replaced: list) -> list:
    """Rows of an earlier ``name``.json whose recipe is not re-run now (``--keep``)."""
    f = RESULTS / f"{name}.json"
    if not f.is_file():
        return []
    return [r for r in json.loads(f.read_text()).get("rows", []) if r.get("recipe") not in replaced]


def _ordered(rows: list) -> list:
    order = list(RECIPES)
    return sorted(rows, key=lambda r: order.index(r["recipe"]) if r.get("recipe") in order else len(order))


def _split_summary(m: dict) -> dict:
    heads = m.get("heads", m)
    cls = _g(heads, "class") or {}
    return {"accuracy": _g(cls, "accuracy"), "balanced_accuracy": _g(cls, "balanced_accuracy"),
            "recall": {c: _g(v, "recall") for c, v in (_g(cls, "per_class") or {}).items()},
            "dice": _g(heads, "mask", "dice_mean_tumor_only") or _g(heads, "mask", "dice_mean"),
            "box_iou": _g(heads, "boxes", "slot_iou_mean"), "box_map50": _g(heads, "boxes", "map50")}


def ablation_markdown(rows: list) -> str:
    out = ("| change | val accuracy | val min recall | val Dice | test accuracy | test min recall | test Dice | "
           "epochs |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        v, t = r["splits"]["val"], r["splits"]["test"]
        mr = lambda s: min([x for x in (s.get("recall") or {}).values() if x is not None], default=None)  # noqa
        out += (f"| {r['change']} | {_pct(v.get('accuracy'))} | {_pct(mr(v))} | {_pct(v.get('dice'))} | "
                f"{_pct(t.get('accuracy'))} | {_pct(mr(t))} | {_pct(t.get('dice'))} | {r.get('epochs') or '–'} |\n")
    return out


def _save(rows: list, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
                                                     "rows": rows}, indent=2, default=str))


def _curve(run: Path) -> dict:
    """A run's validation curves against wall-clock minutes (the epochs spread evenly over
    the phase's training time, ``budget.json``; the first, tracing epoch is a bit longer)."""
    import csv

    phase = sorted(run.glob("phase*/history.csv"))[-1].parent
    rows = list(csv.DictReader((phase / "history.csv").open()))
    budget = json.loads((phase / "budget.json").read_text()) if (phase / "budget.json").is_file() else {}
    n = len(rows)
    minutes = [(i + 1) / n * float(budget.get("elapsed_s", n * 60)) / 60 for i in range(n)]
    cols = {k: [float(r[k]) if r.get(k) not in (None, "") else None for r in rows] for k in rows[0]}
    return {"minutes": minutes, **cols}


def cmd_curves(args) -> None:
    """Validation accuracy and Dice against training minutes for runs of one recipe under
    different budgets: what more time buys, and where the curves flatten."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = dict(r.split("=", 1) for r in args.runs)
    keys = [("val_class_acc", "validation accuracy"), ("val_mask_dice", "validation Dice (tumour)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), constrained_layout=True)
    for label, run in runs.items():
        c = _curve(Path(run))
        for ax, (k, _) in zip(axes, keys):
            if k in c:
                ax.plot(c["minutes"], c[k], marker=".", lw=1.2, label=label)
    for ax, (_, title) in zip(axes, keys):
        ax.set_xlabel("training minutes (2-core CPU)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("--recipes", nargs="+", default=["figshare_joint", "figshare_detector", "figshare_unet",
                                                     "kaggle_classifier"])
    t.add_argument("--keep", action="store_true",
                   help="keep the rows of the other recipes from the existing real_data.json (re-run only these)")
    a = sub.add_parser("ablate")
    a.add_argument("--recipe", default="figshare_joint")
    a.add_argument("--switches", nargs="+", default=list(SWITCHES))
    a.add_argument("--append", action="store_true",
                   help="train only --switches and add them to the committed ablations.json (same --overrides)")
    a.add_argument("--overrides", nargs="*", default=[],
                   help="overrides every arm gets (e.g. the recipe as it was when the other arms ran)")
    for p in (t, a):
        p.add_argument("--budget", default="25m")
        p.add_argument("--output-root", default=str(ROOT / "outputs" / "real"))
        p.add_argument("--runs", nargs="*", default=[], help="recipe=RUN_DIR pairs to re-read instead of training")
        p.add_argument("--readme", action="store_true", help="write the markdown into README.md between markers")
    c = sub.add_parser("curves", help="validation curves of runs against training minutes (a PNG)")
    c.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_DIR pairs, e.g. 25m=outputs/real/...")
    c.add_argument("--out", default=str(ROOT / "docs" / "img" / "real_figshare_joint_curves.png"))
    args = ap.parse_args()
    {"table": cmd_table, "ablate": cmd_ablate, "curves": cmd_curves}[args.cmd](args)


if __name__ == "__main__":
    main()
