"""src.evaluate on a mix: each source's report (compute.per_source) is the report of that
source's images alone; images whose only label is a generic tumour are scored on tumour vs
healthy from the class head."""
from __future__ import annotations

import json

import numpy as np
import pytest

from src.data.records import ClassMap
from src.evaluation.collect import Collector
from src.evaluation.compute import compute_metrics, headline, per_source
from src.evaluation.metrics import to_jsonable


def _batch(rng, n, labels, class_known, masks_known):
    """Random class probabilities and square masks (predicted one pixel off)."""
    x = rng.uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), n).astype(np.float32)
    tm = np.zeros((n, 16, 16, 1), np.float32)
    for i in range(n):
        if labels[i] != 3:
            a = rng.integers(2, 8)
            tm[i, a:a + 6, a:a + 5] = 1
    pm = np.roll(tm, 1, axis=1) * 0.9
    y = {"class": np.asarray(labels, np.int32), "mask": tm, "tumor": (np.asarray(labels) != 3).astype(np.float32)}
    w = {"class": np.asarray(class_known, np.float32), "mask": np.asarray(masks_known, np.float32),
         "tumor": np.ones(n, np.float32)}
    return x, y, w, {"class": probs, "mask": pm}


def _metrics(batches):
    col = Collector(["class", "mask"])
    for b in batches:
        col.add(*b)
    return col.arrays()


def test_each_source_report_equals_its_images_alone():
    rng = np.random.default_rng(0)
    cm = ClassMap()
    fig = _batch(rng, 6, [0, 1, 2, 0, 1, 2], np.ones(6), np.ones(6))          # classes + masks
    kag = _batch(rng, 5, [0, 3, 1, 3, 2], np.ones(5), [0, 1, 0, 1, 0])          # classes, healthy masks empty
    br = _batch(rng, 4, [0, 0, 0, 0], np.zeros(4), [1, 1, 1, 0])                # generic tumours: no class
    mixed = _metrics([fig, kag, br])
    sources = ["figshare"] * 6 + ["kaggle"] * 5 + ["br35h"] * 4
    rep = per_source(mixed, sources, ["figshare", "kaggle", "br35h"], cm)
    assert list(rep) == ["figshare", "kaggle", "br35h"] and rep["kaggle"]["n_images"] == 5
    for name, b in (("figshare", fig), ("kaggle", kag), ("br35h", br)):
        alone = compute_metrics(_metrics([b]), cm)
        got = json.loads(json.dumps(to_jsonable(rep[name]["heads"])))
        want = json.loads(json.dumps(to_jsonable(alone["heads"])))
        assert got == want, name
    assert rep["figshare"]["heads"]["mask"]["dice_global"] == pytest.approx(
        compute_metrics(_metrics([fig]), cm)["heads"]["mask"]["dice_global"])
    assert "class" not in rep["br35h"]["heads"]
    # the generic tumours: tumour vs healthy read off the class head (1 - p(no_tumor))
    t = rep["br35h"]["heads"]["tumor_from_class"]
    p_tumor = 1 - br[3]["class"][:, 3]
    assert t["per_class"]["tumor"]["recall"] == pytest.approx(np.mean(p_tumor >= 0.5))
    scalars = headline(to_jsonable(rep["br35h"]))
    assert "tumor_from_class/recall_tumor" in scalars
    # a single dataset without generic tumours gets no such section (as before)
    assert "tumor_from_class" not in compute_metrics(_metrics([fig, kag]), cm)["heads"]


def test_report_has_a_per_source_table(tmp_path):
    from src.evaluation.report import write_report

    rng = np.random.default_rng(1)
    cm = ClassMap()
    batches = [_batch(rng, 4, [0, 1, 2, 0], np.ones(4), np.ones(4)), _batch(rng, 3, [0, 0, 0], np.zeros(3), np.ones(3))]
    mixed = _metrics(batches)
    doc = to_jsonable({**compute_metrics(mixed, cm), "sources": per_source(mixed, ["f"] * 4 + ["b"] * 3, ["f", "b"], cm)})
    page = write_report(tmp_path / "r.html", doc, {}).read_text()
    assert "Per source" in page and "<td>f</td>" in page and "<td>b</td>" in page and "tumour recall" in page


def test_generic_tumour_boxes_get_a_class_agnostic_box_map():
    """Br35H-like images: boxes of a generic tumour (no class slot); a mask model's boxes
    (read off its masks) are scored class-agnostic, 1 - p(no_tumor) as the confidence."""
    n = 3
    x = np.zeros((n, 16, 16, 3), np.float32)
    tm = np.zeros((n, 16, 16, 1), np.float32)
    boxes_all = np.zeros((n, 1, 4), np.float32)
    for i, (a, b) in enumerate([(2, 8), (4, 12), (6, 14)]):
        tm[i, a:b, a:b] = 1
        boxes_all[i, 0] = [a / 16, a / 16, b / 16, b / 16]
    pm = tm.copy()
    pm[2] = 0  # the third tumour is missed
    probs = np.tile(np.array([[0.5, 0.2, 0.2, 0.1]], np.float32), (n, 1))
    y = {"class": np.zeros(n, np.int32), "mask": tm, "boxes": np.zeros((n, 4, 4), np.float32), "boxes_all": boxes_all,
         "boxes_all_classes": np.full((n, 1), -1, np.int32), "boxes_all_count": np.ones(n, np.int32)}
    w = {"class": np.zeros(n, np.float32), "mask": np.ones(n, np.float32), "boxes": np.zeros((n, 4), np.float32)}
    col = Collector(["class", "mask"], boxes_from_mask="largest")
    col.add(x, y, w, {"class": probs, "mask": pm})
    rep = compute_metrics(col.arrays(), ClassMap(), boxes_known=np.ones(n, bool))
    ag = rep["heads"]["boxes_agnostic"]
    assert ag["n_gt"] == 3 and ag["n_detections"] == 3
    assert ag["map50"] == pytest.approx(2 / 3, abs=0.02)  # 2 of 3 found (101-point interpolation)
    assert "boxes" not in rep["heads"]  # no class slot is known
