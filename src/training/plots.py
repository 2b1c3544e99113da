"""Learning-curve plots of a training phase (logged to MLflow beside the checkpoint)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional


def plot_history(history_csv, out_png, title: Optional[str] = None) -> Optional[Path]:
    """One panel per quantity in Keras' ``history.csv`` (``x`` and ``val_x`` together).

    Losses share a log scale when positive. Returns the PNG path, or None when the
    history has no rows (e.g. a phase that was skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history_csv, out_png = Path(history_csv), Path(out_png)
    if not history_csv.is_file():
        return None
    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return None
    epochs = [int(float(r["epoch"])) + 1 for r in rows]
    keys = [k for k in rows[0] if k not in ("epoch", "learning_rate") and not k.startswith("val_")]
    # validation-only metrics (training batches report losses and accuracy only by default)
    keys += [k[4:] for k in rows[0] if k.startswith("val_") and k[4:] not in keys]
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        def series(name):
            return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]
        train = series(k) if k in rows[0] else []
        if train:
            ax.plot(epochs, train, "o-", ms=3, label="train")
        if f"val_{k}" in rows[0]:
            ax.plot(epochs, series(f"val_{k}"), "s--", ms=3, label="val")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        if k.endswith("loss") and all(v > 0 for v in train if v == v):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
