"""The transfer-learning table: every backbone as a 4-class classifier on the Kaggle folders.

For each backbone: ``python -m src.train experiment=kaggle_transfer model.backbone=<name>``
(duplicate groups kept inside one split, the classifier's two phases), then
``python -m src.evaluate split=test`` on the run, then the parameter count and the
inference speed (img/s, batch 32, after a warm-up, this machine) of the best checkpoint.
Writes ``<out>/transfer_table.csv`` and ``transfer_table.md`` (default ``benchmarks/results``):
accuracy, macro F1, glioma recall (test split), parameters, img/s, the settings used.

    .venv/bin/python benchmarks/transfer_table.py                               # every backbone
    .venv/bin/python benchmarks/transfer_table.py --backbones resnet18 swin_tiny \\
        --weights-dir ~/.keras/models    # <name>_imagenet_notop.weights.h5 / the Keras files there

Weights: ``--weights imagenet`` (the default when there is a GPU: Keras files are downloaded,
the networks written here need a file converted by ``python -m src.models.convert``),
``--weights null`` (random init). **On a CPU without weights** (the default there) the
table is run small and short (``--size 64 --epochs 2``, one phase training everything),
and the markdown says so at the top: those numbers compare nothing with the paper, they
show the command works end to end. ``--size``/``--epochs``/``--max-images`` override.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.runtime import machine_info, quiet_tensorflow  # noqa: E402

#: the paper's table (Swin, ViT, ResNeXt50, VGG16, MobileNetV2, MobileNetV3) + TumorNet's ResNet18 and ResNet50
BACKBONES = ["swin_tiny", "vit_b16", "resnext50", "vgg16", "mobilenet_v2", "mobilenet_v3_large", "resnet18",
             "resnet50"]
COLUMNS = ["backbone", "accuracy", "macro_f1", "glioma_recall", "params", "img_per_s", "test_images", "image_size",
           "epochs", "weights", "train_s", "run"]


def has_gpu() -> bool:
    quiet_tensorflow()  # no CUDA-probing lines on a CPU-only machine
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{cmd[2]} failed (exit {rc}); log {log}:\n" + "\n".join(tail))


def _newest_run(root: Path) -> Path:
    runs = sorted((p for p in root.glob("*") if (p / "run_info.json").is_file()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"no run folder under {root}")
    return runs[-1]


def speed_and_params(run: Path, size: int, batch: int = 32, reps: int = 5) -> tuple[int, float]:
    """Parameters of the best checkpoint's network and its inference img/s on this machine."""
    import numpy as np

    from src.inference import load_for_inference
    from src.models.unfreeze import count_params

    net = load_for_inference(str(run)).network
    x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    fn = net.predict_on_batch if hasattr(net, "predict_on_batch") else net
    fn(x)  # warm-up (tracing)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return count_params(net)["total"], batch * reps / (time.perf_counter() - t0)


def weights_for(name: str, weights: str, weights_dir: str | None) -> str:
    if weights_dir:
        from src.models.backbones import imagenet_weights_file

        p = Path(weights_dir).expanduser() / imagenet_weights_file(name).fname
        if p.is_file():
            return str(p)
    return weights


def row(name: str, a, out_root: Path, log: Path) -> dict:
    w = weights_for(name, a.weights, a.weights_dir)
    task = f"kaggle_transfer_{name}"
    cmd = [sys.executable, "-m", "src.train", "experiment=kaggle_transfer", f"model.backbone={name}",
           f"model.weights={w}", f"task_name={task}", f"data.image_size={a.size}", f"trainer.max_epochs={a.epochs}",
           f"paths.output_root={out_root}", f"tracking={a.tracking}", "trainer.verbose=2", *a.set]
    if a.quick:  # random weights: a frozen random backbone teaches nothing, train everything in one phase
        cmd += ["phase=1", "model.phases.1.unfreeze={mode: all}", "~model.phases.2"]
    if a.max_images:
        cmd += [f"trainer.steps_per_epoch={max(1, a.max_images // 32)}"]
    t0 = time.time()
    _run(cmd, log)
    train_s = time.time() - t0
    run = _newest_run(out_root / task)
    ev = run / "eval_test"
    _run([sys.executable, "-m", "src.evaluate", f"checkpoint={run}", "split=test", f"out={ev}", "tracking=none"], log)
    m = json.loads((ev / "metrics.json").read_text())["heads"]["class"]
    params, ips = speed_and_params(run, a.size)
    glioma = (m.get("per_class") or {}).get("glioma") or {}
    return {"backbone": name, "accuracy": m.get("accuracy"), "macro_f1": (m.get("macro") or {}).get("f1"),
            "glioma_recall": glioma.get("recall"), "params": params, "img_per_s": round(ips, 1),
            "test_images": m.get("n"),
            "image_size": a.size, "epochs": a.epochs, "weights": w, "train_s": round(train_s), "run": str(run)}


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int) and v >= 10_000:
        return f"{v / 1e6:.1f} M"
    return str(v)


def read_rows(path: Path) -> list[dict]:
    """The rows of an existing ``transfer_table.csv``, numbers as numbers (``[]`` without one)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            for k, v in r.items():
                if k in ("backbone", "weights", "run") or v in (None, ""):
                    r[k] = v or None
                else:
                    f = float(v)
                    r[k] = int(f) if f.is_integer() and k in ("params", "test_images", "image_size", "epochs",
                                                               "train_s") else f
            rows.append(r)
    return rows


def merge_kept(kept: list[dict], new: list[dict], size: int, epochs: int, pretrained: bool) -> list[dict]:
    """``--keep``: the kept rows of other backbones measured at the same size and epochs, both
    pretrained or both not, then the new rows, in the table's backbone order."""
    names = {r["backbone"] for r in new}
    same = [r for r in kept if r["backbone"] not in names and r.get("image_size") == size
            and r.get("epochs") == epochs and (r.get("weights") not in (None, "null")) == pretrained]
    order = {b: i for i, b in enumerate(BACKBONES)}
    return sorted(same + new, key=lambda r: order.get(r["backbone"], len(order)))


def write(rows: list[dict], out: Path, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "transfer_table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Transfer table: Kaggle 4-class, test split\n\n{note}\n",
             "| backbone | accuracy | macro F1 | glioma recall | params | img/s | test images |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backbone']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['backbone']} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} | {_fmt(r['glioma_recall'])} "
                     f"| {_fmt(r['params'])} | {_fmt(r['img_per_s'], 1)} | {r['test_images']} |")
    (out / "transfer_table.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--weights", default=None, help="imagenet | null (default: imagenet with a GPU, null without)")
    p.add_argument("--weights-dir", default=None, help="a folder of <backbone> weights files (Keras or converted)")
    p.add_argument("--size", type=int, default=None, help="image size (default 224; 64 on a CPU without weights)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per phase (default 20; 2 on a CPU without weights)")
    p.add_argument("--max-images", type=int, default=None, help="cap training images per epoch (a smoke run)")
    p.add_argument("--tracking", default="none", help="tracking config group (none | mlflow)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the CSV and markdown go")
    p.add_argument("--output-root", default=str(ROOT / "outputs"), help="where the training runs go")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run (e.g. data.root=...)")
    p.add_argument("--keep", action="store_true",
                   help="keep the other backbones' rows of the existing CSV (same size, epochs and weights)")
    a = p.parse_args(argv)
    gpu = has_gpu()
    cpu = machine_info()
    a.weights = a.weights or ("imagenet" if gpu else "null")
    a.quick = not gpu and a.weights == "null" and not a.weights_dir
    a.size = a.size or (64 if a.quick else 224)
    a.epochs = a.epochs or (2 if a.quick else 20)
    note = (f"Settings: image size {a.size}, at most {a.epochs} epochs per phase, weights `{a.weights}`"
            f"{' (' + a.weights_dir + ')' if a.weights_dir else ''}, duplicate groups inside one split "
            f"(`data.duplicates=group`); img/s = inference, batch 32, on {cpu['cpu']}"
            f" ({'GPU' if gpu else 'CPU only'}, {cpu['cores']} cores"
            f"{', AVX512-BF16' if cpu['avx512_bf16'] and not gpu else ''}).")
    if a.quick:
        note = ("**CPU quick run without pretrained weights: small images, few epochs, one phase training every "
                "layer from random initialisation. These numbers compare nothing with the paper; they show the "
                "table's command runs end to end.** " + note)
    if a.max_images:
        note += f" Training capped at ~{a.max_images} images per epoch."
    out, out_root = Path(a.out).expanduser(), Path(a.output_root).expanduser()
    log = out_root / "transfer_table.log"
    out_root.mkdir(parents=True, exist_ok=True)
    print(note, f"\nlog: {log}", flush=True)
    kept = read_rows(out / "transfer_table.csv") if a.keep else []
    pretrained = a.weights != "null" or bool(a.weights_dir)
    if kept:
        note += " Rows of other backbones come from earlier runs with the same settings (`--keep`; see the CSV)."
    rows = []
    for name in a.backbones:
        try:
            rows.append(row(name, a, out_root, log))
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            rows.append({"backbone": name, "error": str(e).splitlines()[0]})
        # after every row: a long table can be read while it runs
        write(merge_kept(kept, rows, a.size, a.epochs, pretrained), out, note)
        print(json.dumps(rows[-1], default=str), flush=True)
    print(f"wrote {out / 'transfer_table.csv'} and {out / 'transfer_table.md'}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
