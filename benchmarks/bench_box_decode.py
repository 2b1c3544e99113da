"""Where a dense box head's error comes from: the heat's aim or the cells' boxes.

For a trained detector run (``box_head: dense``), on one split, without retraining: the
mean IoU of the true class's slot box (against the true box) when the slot box is read
off the dense maps in different ways:

* ``soft``: the model's own decoding (softmax of the heat over the cells weights the
  cells' boxes, :class:`src.models.heads.DenseBoxDecode`);
* ``T2`` / ``T4`` / ``T8``: the same with the heat logits multiplied by T (sharper);
* ``hard``: the box of the cell with the highest heat;
* ``top3x3``: the soft average over the 3 x 3 cells around that cell;
* ``centre``: the box of the cell that holds the true box's centre (a perfect aim);
* ``oracle``: the best cell's box (a perfect choice among the boxes the cells predict).

``centre`` and ``oracle`` need the truth, so they are bounds, not decoders: the gap from
``soft`` to ``centre`` is what the heat's aim costs; from ``centre`` down to 1, what the
boxes the cells regress cost.

    .venv/bin/python benchmarks/bench_box_decode.py outputs/real/figshare_detector/<run> [--split val]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _iou(a, b) -> float:
    import numpy as np

    x1, y1 = np.maximum(a[0], b[0]), np.maximum(a[1], b[1])
    x2, y2 = np.minimum(a[2], b[2]), np.minimum(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def decode_ious(run: Path, split: str) -> dict:
    import keras
    import numpy as np
    from omegaconf import OmegaConf

    from src.data.dataset import load_data
    from src.data.pipeline import build_dataset
    from src.evaluation.collect import dataset_targets
    from src.inference import load_for_inference
    from src.losses.box import dense_boxes

    cfg = OmegaConf.load(run / "config.yaml")
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    net = load_for_inference(run).model.network
    if "boxes_aux1" not in net.output:
        raise SystemExit(f"{run}: the model has no dense box maps (box_head: dense)")
    maps = keras.Model(net.input, net.output["boxes_aux1"])
    bundle = load_data(cfg.data, cache_dir=cfg.paths.cache_dir)
    cm = bundle.class_map
    ds = build_dataset(bundle.split(split), cm, {**data_cfg, "augment": None, "repeat": False, "cache": False,
                                                 "xla": False}, training=False, heads=dataset_targets(["class", "boxes"], cm))
    out = {k: [] for k in ("soft", "T2", "T4", "T8", "hard", "top3x3", "centre", "oracle")}
    for x, y, w in ds:
        m = np.asarray(maps(x, training=False))
        heat, boxes = m[..., 0], np.clip(np.asarray(dense_boxes(m[..., 1:])), 0, 1)
        b, h, wd = heat.shape
        true = y["boxes"].numpy()
        known = w["boxes"].numpy()
        label = y["class"].numpy().reshape(-1)
        for i in range(b):
            k = int(label[i])
            if known[i, k] <= 0:
                continue
            t = true[i, k]
            hb, bb = heat[i].reshape(-1), boxes[i].reshape(-1, 4)
            for name, temp in (("soft", 1.0), ("T2", 2.0), ("T4", 4.0), ("T8", 8.0)):
                p = np.exp(temp * (hb - hb.max()))
                out[name].append(_iou(np.clip(p @ bb / p.sum(), 0, 1), t))
            j = int(hb.argmax())
            out["hard"].append(_iou(bb[j], t))
            r, c = divmod(j, wd)
            rr, cc = slice(max(0, r - 1), r + 2), slice(max(0, c - 1), c + 2)
            p = np.exp(heat[i][rr, cc] - hb.max()).reshape(-1)
            out["top3x3"].append(_iou(np.clip(p @ boxes[i][rr, cc].reshape(-1, 4) / p.sum(), 0, 1), t))
            cr = min(h - 1, int((t[1] + t[3]) / 2 * h))
            cc_ = min(wd - 1, int((t[0] + t[2]) / 2 * wd))
            out["centre"].append(_iou(boxes[i][cr, cc_], t))
            out["oracle"].append(max(_iou(v, t) for v in bb))
    return {k: {"mean_iou": round(float(np.mean(v)), 4), "iou_ge_0.5": round(float(np.mean(np.array(v) >= 0.5)), 4),
                "n": len(v)} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "box_decode.json"))
    args = ap.parse_args()
    res = decode_ious(args.run.resolve(), args.split)
    run = args.run.resolve()
    doc = {"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run), "split": args.split,
           "when": time.strftime("%Y-%m-%d %H:%M"), "results": res}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    for k, v in res.items():
        print(f"{k:<8} mean IoU {v['mean_iou']:.3f}   IoU >= 0.5 {v['iou_ge_0.5']:.3f}   n {v['n']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
