"""Embeddings from a chosen layer, UMAP to 2-D, PNG + CSV."""
import csv

import numpy as np

from src.evaluation.embeddings import default_embedding_target, embedding_projection, extract_embeddings


def test_umap_on_constructed_embeddings_writes_png_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    centres = {"glioma": np.full(8, 0.0), "meningioma": np.full(8, 6.0), "pituitary": np.r_[np.full(4, 6.0),
                                                                                             np.zeros(4)]}
    emb, labels, splits, paths = [], [], [], []
    for c, mu in centres.items():
        for i in range(10):
            emb.append(mu + rng.normal(0, 0.3, 8))
            labels.append(c)
            splits.append("train" if i < 7 else "test")
            paths.append(f"/data/{c}/{i}.png")
    emb = np.asarray(emb, np.float32)
    res = embedding_projection(emb, paths, splits, labels, tmp_path / "proj", method="umap", n_neighbors=8, seed=0)
    png, csv_path = tmp_path / "proj" / "umap.png", tmp_path / "proj" / "umap.csv"
    assert res["png"] == str(png) and png.stat().st_size > 5000
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and list(rows[0]) == ["path", "split", "label", "x", "y"]
    assert {r["split"] for r in rows} == {"train", "test"} and rows[0]["path"] == "/data/glioma/0.png"
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    lab = np.array([r["label"] for r in rows])
    # well-separated clusters stay separated: every point's nearest neighbour has its class
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(30) * 1e9
    assert (lab[d.argmin(axis=1)] == lab).mean() > 0.95


def test_embeddings_from_default_and_nested_layers():
    from src.models import create_model

    m = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    assert default_embedding_target(m).name == "pool"
    x = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    emb, outs = extract_embeddings(m, x, batch_size=2, return_outputs=True)
    assert emb.shape == (5, 8) and outs["class"].shape == (5, 4)
    # a 4-D layer is pooled; a dense layer is taken as is
    assert extract_embeddings(m, x, layer="stage1_relu2").shape == (5, 4)
    assert extract_embeddings(m, x, layer="shared_dense").shape[0] == 5
