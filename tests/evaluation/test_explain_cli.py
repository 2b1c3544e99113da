"""`python -m src.explain` in-process on a tiny folder dataset and a small_cnn run folder."""
import csv
import json

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from src.config import compose
from src.explain import main

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from src.models import create_model
    from src.models.task import MultiTaskModel

    tmp = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in CLASSES:
            for i in range(n):
                p = tmp / "data" / split / c / f"{c}_{split}_{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(p), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    run = tmp / "run"
    (run / "phase1" / "checkpoints").mkdir(parents=True)
    net = create_model("small_cnn", num_classes=4, image_size=32, widths=(4, 8))
    model = MultiTaskModel(net, {"class": "ce", "boxes": "giou"}, name="small_cnn")
    model(np.zeros((1, 32, 32, 3), np.float32))
    model.save(run / "phase1" / "checkpoints" / "best.keras")
    (run / "run_info.json").write_text(json.dumps({"classes": CLASSES}))
    cfg = compose(["data=folder", f"data.root={tmp / 'data'}", "data.image_size=32",
                   f"paths.data_dir={tmp / 'cache'}"])
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    return run


def test_gradcam_cli_uses_the_runs_data(run, tmp_path, capsys):
    rc = main([f"checkpoint={run}", "what=gradcam", "n=4", f"out={tmp_path / 'e'}", "gradcam.method=gradcam++"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["images"] == 4 and summary["layer"] == "stage2_relu2" and summary["method"] == "gradcam++"
    with open(tmp_path / "e" / "gradcam.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["label"] for r in rows) == sorted(CLASSES)  # spread over the classes
    for r in rows:
        img = cv2.imread(r["overlay"])  # image | overlay, enlarged x8 to 256 rows, a title band above
        assert img.shape[1] == 512 and 256 < img.shape[0] < 300 and r["predicted"] in CLASSES


def test_umap_cli_and_errors(run, tmp_path, capsys):
    rc = main([f"checkpoint={run}", "what=umap", "umap.method=pca", f"out={tmp_path / 'u'}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    with open(tmp_path / "u" / "pca.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["split"] for r in rows} == {"train", "test"} and (tmp_path / "u" / "pca.png").is_file()
    assert main([f"checkpoint={run}", "what=nope"]) == 2
    assert "gradcam, umap or pseudo_masks" in capsys.readouterr().err
    assert main([f"checkpoint={tmp_path / 'missing'}"]) == 2
