"""Speed of duplicate curation (src.curate): images/s of hashing, and the search.

Hashes every image of a folder-per-class dataset (default: the Kaggle 4-class Training
set, 5,708 224 px JPEGs) with 1..N threads: the exact pass alone (decode + BLAKE2b of
the pixels), exact + perceptual (phash, the default run), and with mirrored hashes
(``include_flips``); then times the pair search and grouping, and records what was found.
Not a test: it prints the numbers and writes them to ``benchmarks/results/curate.json``.

    .venv/bin/python benchmarks/bench_curate.py [--root DIR] [--workers 1 2] [--limit N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.curate import Settings, curate_records  # noqa: E402
from src.runtime import machine_info  # noqa: E402
from src.data.dedup import hash_files  # noqa: E402
from src.data.base import IMAGE_EXTENSIONS  # noqa: E402
from src.data.records import Record  # noqa: E402


def folder_records(root: Path, limit: int | None = None) -> list[Record]:
    """One record per image of ``root/<class>/<image>`` (split 'train'), without the reader."""
    recs = [Record(image=str(p), label=p.parent.name, split="train", known={"label": True})
            for p in sorted(root.glob("*/*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return recs[:limit] if limit else recs


def machine() -> dict:
    import imagehash
    import numpy
    import PIL

    return {**machine_info(), "numpy": numpy.__version__, "pillow": PIL.__version__, "imagehash": imagehash.__version__}


def time_hashing(paths, workers: int, **kw) -> dict:
    c = time.process_time()
    _, t = hash_files(paths, workers=workers, progress=False, **kw)
    cpu_ms = (time.process_time() - c) / len(paths) * 1e3
    return {"img_per_s": t["images_per_s"], "seconds": t["seconds"], "cpu_ms_per_img": round(cpu_ms, 3),
            "cpu_capacity_img_per_s": round((os.cpu_count() or 1) * 1e3 / cpu_ms, 1), "loadavg_1min_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    shared = os.environ.get("BTMTL_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(shared) / "kaggle-brain-mri-224" / "Training"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "curate.json"))
    ap.add_argument("--workers", type=int, nargs="*", default=None, help="thread counts (default 1..cpu_count)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--hash-size", type=int, default=16)
    ap.add_argument("--hamming", type=int, default=12)
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"{root} not found (pass --root or set BTMTL_SHARED_DATA)", file=sys.stderr)
        return 2
    records = folder_records(root, args.limit)
    paths = [r.image for r in records]
    workers = args.workers or list(range(1, (os.cpu_count() or 1) + 1))
    hash_files(paths[:64], progress=False)  # warm-up: imports (scipy.fft), file cache
    results = {"machine": machine(), "dataset": {"root": str(root), "images": len(paths)},
               "settings": {"hash_size": args.hash_size, "hamming": args.hamming}, "hashing": {}}
    t_all = time.perf_counter()
    for w in workers:
        for name, kw in (("exact_only", {"perceptual": False}), ("exact_phash", {"hash_size": args.hash_size}),
                         ("exact_phash_flips", {"hash_size": args.hash_size, "flips": True})):
            r = time_hashing(paths, w, **kw)
            results["hashing"][f"{name}_w{w}"] = r
            print(f"{name:18s} workers {w}: {r['img_per_s']:7.0f} img/s  cpu {r['cpu_ms_per_img']:.3f} ms/img  "
                  f"capacity {r['cpu_capacity_img_per_s']:.0f} img/s", flush=True)
    best_w = max(workers)
    s = Settings(hash_size=args.hash_size, hamming=args.hamming, workers=best_w, progress=False)
    t = time.perf_counter()
    res = curate_records(records, s)
    total = time.perf_counter() - t
    g = res.groups
    results["curate_records"] = {
        "workers": best_w, "total_s": round(total, 2), "img_per_s": round(len(paths) / total, 1),
        "timing": res.timing,
        "found": {"kinds": res.levels, "groups": len(g), "extra_copies": sum(x.size - 1 for x in g),
                  "largest_group": max((x.size for x in g), default=0),
                  "conflicts": sum(1 for x in g if x.conflict), "manifest": res.manifest_stats["by_reason"]}}
    print(f"curate_records (exact + near, {best_w} threads): {total:.2f} s = {len(paths) / total:.0f} img/s; "
          f"search + grouping {res.timing['search_s']} s; found {json.dumps(res.levels)}")
    for h in (8, 16):
        res_h = curate_records(records, Settings(hash_size=h, hamming=0, workers=best_w, progress=False))
        results.setdefault("phash_distance_0", {})[f"hash_size_{h}"] = res_h.levels["near"]
    print("pairs at phash distance 0 that are not exact copies:", json.dumps(results["phash_distance_0"]))
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} ({results['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
