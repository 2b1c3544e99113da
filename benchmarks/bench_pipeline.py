"""Throughput of the tf.data training pipeline on the figshare (Cheng 2015) slices.

512 px grey JPEGs -> 256 px batches of 32 with masks and boxes, beside a naive PIL loop
doing the same per-image work and a bare full-size JPEG decode. Not a test: it prints the
numbers and writes them to ``benchmarks/results/pipeline.json``.

    .venv/bin/python benchmarks/bench_pipeline.py [--quick] [--data DIR] [--out FILE]

Records are built straight from ``images/``, ``labels/`` and ``masks/`` (boxes from the
YOLO labels), so the benchmark does not depend on the figshare reader.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from src.data.pipeline import plan_pipeline  # noqa: E402
from src.data.records import ClassMap, Record  # noqa: E402
from src.runtime import machine_info  # noqa: E402

NAMES = {0: "pituitary", 1: "meningioma", 2: "glioma"}  # data.yaml
HEADLINE = ("train_full_aug_default", "train_full_aug", "train_flip_photometric", "train_no_aug")  # timed over 2 epochs, others 1


def figshare_records(root: Path, limit: int | None = None) -> list[Record]:
    recs = []
    for f in sorted(glob.glob(str(root / "images" / "*.jpg")))[:limit]:
        stem = Path(f).stem
        lab = root / "labels" / f"{stem}.txt"
        c, xc, yc, w, h = open(lab).read().split()[:5]
        xc, yc, w, h = map(float, (xc, yc, w, h))
        box = np.clip([[xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2]], 0, 1)
        name = NAMES[int(c)]
        recs.append(Record(image=f, label=name, boxes=box, box_classes=[name], mask=str(root / "masks" / f"{stem}.png"),
                           known={"label": True, "boxes": True, "mask": True}, width=512, height=512,
                           source="figshare"))
    return recs


def time_dataset(ds, epochs: int = 2) -> dict:
    """Images/s (wall clock) and CPU ms per image over ``epochs`` passes, after one
    warm-up pass (XLA compilation, autotuning). CPU time is the whole process's, so it
    is robust to other load on the machine; ``cpu_capacity_img_per_s`` = what the
    machine's cores could deliver at that cost if nothing else ran."""
    t0 = time.perf_counter()
    for _ in ds:
        pass
    warm = time.perf_counter() - t0
    rates, cpu = [], []
    for _ in range(epochs):
        c, t = time.process_time(), time.perf_counter()
        count = 0
        for el in ds:
            x = el[0] if isinstance(el, tuple) else el
            count += int(x.shape[0])
        rates.append(count / (time.perf_counter() - t))
        cpu.append((time.process_time() - c) / count * 1e3)
    ms = float(np.median(cpu))
    return {"img_per_s": round(float(np.median(rates)), 1), "runs": [round(r, 1) for r in rates],
            "cpu_ms_per_img": round(ms, 3), "cpu_capacity_img_per_s": round((os.cpu_count() or 1) * 1e3 / ms, 1),
            "first_epoch_s": round(warm, 2), "images": count}


def naive_pil(records, size=256, limit=400, masks=True) -> dict:
    """Open, to RGB, resize, random flip + rotation, to float array, one image at a time
    (and the same for the mask, nearest-neighbour, when ``masks``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for r in records[:limit]:
        flip, a = rng.random() < 0.5, rng.uniform(-10, 10)
        with Image.open(r.image) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            x = np.asarray(im.rotate(a, Image.BILINEAR), np.float32) / 255.0
        if masks:
            with Image.open(r.mask) as m:
                m = m.convert("L").resize((size, size), Image.NEAREST)
                if flip:
                    m = m.transpose(Image.FLIP_LEFT_RIGHT)
                y = (np.asarray(m.rotate(a, Image.NEAREST)) > 0).astype(np.float32)
            assert y.shape == (size, size)
        n += 1
    assert x.shape == (size, size, 3)
    ms = (time.process_time() - c) / n * 1e3
    return {"img_per_s": round(n / (time.perf_counter() - t), 1), "images": n, "cpu_ms_per_img": round(ms, 3),
            "note": "one process, one core"}


def decode_only(records, ratio: int = 1, channels: int = 1) -> dict:
    paths = [r.image for r in records]
    ds = (tf.data.Dataset.from_tensor_slices(paths)
          .map(lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=channels, ratio=ratio),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
          .batch(32).prefetch(tf.data.AUTOTUNE))
    return time_dataset(ds)


def report(name: str, r: dict, extra: str = "") -> None:
    cap = f"{r['cpu_capacity_img_per_s']:7.0f}" if "cpu_capacity_img_per_s" in r else "      -"
    print(f"{name:32s} {r['img_per_s']:7.0f} img/s  cpu {r['cpu_ms_per_img']:.3f} ms/img  capacity {cap} img/s"
          + (f"  ({extra})" if extra else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("BTMTL_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
    ap.add_argument("--quick", action="store_true", help="fewer images and variants (a smoke run)")
    ap.add_argument("--only", nargs="*", help="run only these variants (names as in the output)")
    args = ap.parse_args(argv)
    root = Path(args.data) / "figshare-cheng"
    if not (root / "images").is_dir():
        print(f"figshare-cheng not found under {args.data} (set BTMTL_SHARED_DATA)", file=sys.stderr)
        return 2
    records = figshare_records(root, 640 if args.quick else None)
    cm = ClassMap(["glioma", "meningioma", "pituitary"])
    base = {"image_size": 256, "batch_size": 32, "seed": 0, "deterministic": False,
            "mask_cache_dir": None, "cache": False}
    default_aug = {"hflip": 0.5, "rotate_deg": 10, "scale": 0.1, "shift": 0.05, "brightness": 0.1, "contrast": 0.1}
    no_affine = {**default_aug, "rotate_deg": 0, "scale": 0, "shift": 0}
    variants = {
        # name: (cfg overrides, heads); masks + boxes + every target unless heads says otherwise.
        # "default": the shipped settings, where cache auto keeps the decoded uint8 images in
        # memory after the first epoch; the others decode every JPEG every epoch (cache off).
        "train_full_aug_default": ({"augment": default_aug, "cache": "auto"}, None),
        "train_full_aug": ({"augment": default_aug}, None),  # warp auto = cv2
        "train_full_aug_warp_xla": ({"augment": {**default_aug, "warp": "xla"}}, None),
        "train_full_aug_warp_tf_op": ({"augment": {**default_aug, "warp": "tf"}}, None),
        "train_flip_photometric": ({"augment": no_affine}, None),
        "train_no_aug": ({"augment": None}, None),
        "train_full_aug_mask_png": ({"augment": default_aug, "mask_format": "png"}, None),
        "train_full_aug_deterministic": ({"augment": default_aug, "deterministic": True}, None),
        "train_full_aug_no_dct_scaling": ({"augment": default_aug, "dct_scaling": False}, None),
        "train_full_aug_no_xla": ({"augment": default_aug, "xla": False}, None),
        "train_full_aug_cache_memory": ({"augment": default_aug, "cache": "memory"}, None),
        "classifier_flip_photometric": ({"augment": no_affine}, ["class"]),
    }
    if args.quick:
        variants = {k: v for k, v in variants.items() if k in ("train_full_aug_default", "train_full_aug")}
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    results = {"machine": machine_info(), "dataset": {"name": "figshare-cheng", "images": len(records),
                                                  "source_size": "512x512 grey JPEG", "masks": "512x512 PNG"},
               "settings": {"common": base, "default_augment": default_aug}, "variants": {}}
    t_all = time.perf_counter()
    mask_cache = tempfile.TemporaryDirectory(prefix="bench-masks-")  # packed masks built once, reused
    base["mask_cache_dir"] = mask_cache.name
    for name, (over, heads) in variants.items():
        cfg = {**base, **over}
        t = time.perf_counter()
        plan = plan_pipeline(records, cm, cfg, training=True, heads=heads)
        plan_s = time.perf_counter() - t
        ds = plan.dataset()
        r = time_dataset(ds, epochs=2 if name in HEADLINE else 1)
        r.update({"plan_s": round(plan_s, 2), "cfg": {k: v for k, v in over.items()}, "heads": heads or "all",
                  "plan": plan.summary(), "loadavg_1min_after": os.getloadavg()[0]})
        results["variants"][name] = r
        report(name, r, f"first epoch {r['first_epoch_s']} s, plan {r['plan_s']} s")
    if not args.only:
        r = decode_only(records, 1, 1)
        results["variants"]["decode_only_full_size_grey"] = r
        report("decode_only_full_size_grey", r)
        r = decode_only(records, 2, 1)
        results["variants"]["decode_only_ratio2_grey"] = r
        report("decode_only_ratio2_grey", r)
        r = naive_pil(records)
        results["variants"]["naive_pil_loop"] = r
        report("naive_pil_loop", r)
        r = naive_pil(records, masks=False)
        results["variants"]["naive_pil_loop_images_only"] = r
        report("naive_pil_loop_images_only", r)
    mask_cache.cleanup()
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({results['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
