"""Box and mask mAP against pycocotools used the documented way (a COCO ground-truth dict,
``loadRes`` of a results list, ``COCOeval.summarize``), built here from the raw arrays,
and our slot IoU / VOC AP against hand computation."""
import contextlib
import io
import math

import numpy as np
import pytest

from src.evaluation import detection as D
from src.evaluation import metrics as M

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

NAMES = ["a", "b", "c", "no_tumor"]


def coco_reference(hw, n_images, n_cats, gts, results, iou_type):
    """``COCOeval`` after the usual recipe. ``gts``: (image, category, bbox or RLE), 0-based."""
    h, w = hw
    anns = []
    for j, (i, k, g) in enumerate(gts):
        a = {"id": j + 1, "image_id": i + 1, "category_id": k + 1, "iscrowd": 0}
        if iou_type == "bbox":
            a.update(bbox=list(g), area=g[2] * g[3])
        else:
            a.update(segmentation=g, area=float(mask_utils.area(g)))
        anns.append(a)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "height": h, "width": w} for i in range(n_images)],
                      "categories": [{"id": k + 1, "name": str(k)} for k in range(n_cats)], "annotations": anns}
        gt.createIndex()
        dt = gt.loadRes([{"image_id": i + 1, "category_id": k + 1, iou_type if iou_type == "bbox" else
                          "segmentation": g, "score": float(s)} for i, k, g, s in results])
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _ref_ap(ev, k, t=None):
    p = ev.eval["precision"][:, :, k, 0, -1] if t is None else ev.eval["precision"][t, :, k, 0, -1]
    return float(p[p > -1].mean()) if (p > -1).any() else float("nan")


# ---------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------
def _box_case(seed=0):
    """8 images, 4 class slots. Class c and no_tumor have no true box (absent), image 5 is a
    healthy slice without boxes, image 2 holds a tiny box (1.6 x 1.28 px at 64 x 80) and
    image 6 two boxes of class a."""
    rng = np.random.default_rng(seed)
    N, C = 8, 4
    ba = np.zeros((N, 2, 4))
    bc = np.full((N, 2), -1)
    cnt = np.zeros(N, int)
    true = np.zeros((N, C, 4))
    w = np.zeros((N, C))
    for i in range(N):
        if i == 5:
            continue
        k = int(i % 2)
        x0, y0 = rng.uniform(0.05, 0.5, 2)
        box = [x0, y0, x0 + rng.uniform(0.1, 0.4), y0 + rng.uniform(0.1, 0.4)]
        if i == 2:
            box = [0.5, 0.5, 0.52, 0.52]
        ba[i, 0], bc[i, 0], cnt[i] = box, k, 1
        true[i, k], w[i, k] = box, 1
        if i == 6:
            ba[i, 1], bc[i, 1], cnt[i] = [0.6, 0.6, 0.9, 0.95], 0, 2
    pred = np.clip(true + rng.normal(0, 0.04, true.shape), 0, 1)
    pred[..., 2:] = np.maximum(pred[..., 2:], pred[..., :2] + 0.01)
    pred[2, 0] = [0.501, 0.5, 0.521, 0.521]  # the tiny box, IoU ~0.86
    empty = w == 0
    pred[empty] = np.sort(rng.uniform(0, 1, (int(empty.sum()), 2, 2)), axis=1).transpose(0, 2, 1).reshape(-1, 4)[
        :, [0, 2, 1, 3]]  # valid xyxy
    scores = rng.dirichlet(np.ones(C), N)
    return pred, true, w, ba, bc, cnt, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_map_equals_pycocotools(seed):
    pred, true, w, ba, bc, cnt, scores = _box_case(seed)
    H, W = 64, 80
    rep = D.box_report(pred, true, w, NAMES, ba, bc, cnt, scores=scores, image_size=(H, W))

    def px(b):
        return [b[0] * W, b[1] * H, (b[2] - b[0]) * W, (b[3] - b[1]) * H]

    gts = [(i, int(bc[i, j]), px(ba[i, j])) for i in range(8) for j in range(cnt[i])]
    results = [(i, k, px(pred[i, k]), scores[i, k]) for i in range(8) for k in range(4)]
    ev = coco_reference((H, W), 8, 4, gts, results, "bbox")
    assert rep["map50_95"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert rep["map50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert rep["map75"] == pytest.approx(ev.stats[2], abs=1e-6)
    assert rep["mar100"] == pytest.approx(ev.stats[8], abs=1e-6)
    for k, name in enumerate(NAMES):
        pc = rep["per_class"][name]
        if k < 2:
            assert pc["ap50_95"] == pytest.approx(_ref_ap(ev, k), abs=1e-6)
            assert pc["ap50"] == pytest.approx(_ref_ap(ev, k, 0), abs=1e-6)
        else:  # no true box: COCO's -1, reported as undefined and left out of the mean
            assert math.isnan(pc["ap50"]) and math.isnan(pc["ap50_95"]) and math.isnan(pc["voc_ap50"])
    assert rep["map50_95"] == pytest.approx(np.mean([rep["per_class"][n]["ap50_95"] for n in NAMES[:2]]))
    js = M.to_jsonable(rep)
    assert js["per_class"]["c"]["ap50"] is None and js["coco"]["image_size"] == [64, 80]
    assert "pycocotools" in js["implementations"]["map50/map50_95/map75/mar100"]
    assert "VOC" in js["implementations"]["voc_ap50/voc_map50"]


def test_box_map_is_one_for_perfect_boxes_and_size_free():
    pred, true, w, ba, bc, cnt, scores = _box_case(3)
    cnt[6] = 1  # one box per image and class: a slot can find every box
    perfect = np.where(w[..., None] > 0, true, pred)
    sc = np.where(w > 0, 0.9, 0.1)  # every true positive ranked above the false positives of other slots
    rep = D.box_report(perfect, true, w, NAMES, ba, bc, cnt, scores=sc, image_size=(64, 64))
    assert rep["map50_95"] == pytest.approx(1.0) and rep["map50"] == pytest.approx(1.0)
    assert rep["voc_map50"] == pytest.approx(1.0) and rep["slot_iou_mean"] == pytest.approx(1.0)
    sc[0, 0] = 0.05  # one true positive ranked last: precision 7/8... at recall 1 for class a
    rep = D.box_report(perfect, true, w, NAMES, ba, bc, cnt, scores=sc, image_size=(64, 64))
    assert rep["map50_95"] < 1.0
    # IoU does not depend on the pixel size of the conversion (area ranges are not reported)
    other = D.box_report(perfect, true, w, NAMES, ba, bc, cnt, scores=sc, image_size=(512, 300))
    assert other["map50_95"] == pytest.approx(rep["map50_95"]) and other["map50"] == pytest.approx(rep["map50"])


def test_box_map_without_any_true_box_is_undefined():
    pred, true, w, ba, bc, cnt, scores = _box_case(0)
    rep = D.box_report(pred, true, w, NAMES, ba, np.full_like(bc, -1), np.zeros_like(cnt), scores=scores)
    assert math.isnan(rep["map50"]) and math.isnan(rep["map50_95"]) and math.isnan(rep["voc_map50"])
    assert M.to_jsonable(rep)["map50_95"] is None


def test_xyxy_to_coco():
    assert D.xyxy_to_coco([0.25, 0.5, 0.75, 1.0], (64, 80)).tolist() == [20.0, 32.0, 40.0, 32.0]
    assert D.xyxy_to_coco([0.5, 0.5, 0.4, 0.75], (8, 8)).tolist() == [4.0, 4.0, 0.0, 2.0]  # inverted: width 0


def _hand_boxes():
    """3 images, 2 class slots (+ no_tumor slot 2 without boxes).

    class 0: img0 true A (pred = A, IoU 1, p .9); img1 true B (pred IoU 0.62, p .7);
             img2 has no class-0 box (pred p .8 -> a false positive at every threshold).
    class 1: img2 true D (pred = D, p .6); img0/img1 predictions with p .1/.2 are false positives
             ranked below it -> AP 1.
    """
    A, B, Dd = [0, 0, .5, .5], [.5, .5, 1, 1], [.1, .1, .4, .3]
    pred = np.zeros((3, 3, 4))
    pred[:, :] = [.6, .6, .7, .7]
    pred[0, 0], pred[1, 0], pred[2, 0] = A, [.5, .5, 1, .81], [0, .6, .2, .9]
    pred[2, 1] = Dd
    scores = np.array([[.9, .1, 0], [.7, .2, .1], [.8, .6, .1]])
    boxes_all = np.zeros((3, 2, 4))
    cls = np.full((3, 2), -1)
    boxes_all[0, 0], cls[0, 0] = A, 0
    boxes_all[1, 0], cls[1, 0] = B, 0
    boxes_all[2, 0], cls[2, 0] = Dd, 1
    count = np.array([1, 1, 1])
    return pred, scores, boxes_all, cls, count


def test_voc_ap_and_coco_ap_on_hand_made_boxes():
    pred, scores, ba, bc, cnt = _hand_boxes()
    v = D.voc_map50(pred, scores, ba, bc, cnt, ["a", "b", "no_tumor"])
    # class a at IoU 0.5: TP(.9) FP(.8) TP(.7) -> P = 1, 1/2, 2/3 at R = .5, .5, 1 -> all-point AP = .5 + .5 * 2/3
    assert v["voc_ap50"]["a"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert v["voc_ap50"]["b"] == pytest.approx(1.0) and math.isnan(v["voc_ap50"]["no_tumor"])
    assert v["voc_map50"] == pytest.approx((0.5 + 0.5 * 2 / 3 + 1) / 2)
    # COCO samples the same envelope at 101 recall points: 51 points at precision 1, 50 at 2/3
    rep = D.box_report(pred, np.zeros_like(pred), np.zeros((3, 3)), ["a", "b", "no_tumor"], ba, bc, cnt,
                       scores=scores)
    assert rep["per_class"]["a"]["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    # above IoU 0.62 the .7 detection is a false positive: recall stops at 0.5
    assert rep["coco"]["map_by_threshold"]["0.65"] == pytest.approx((51 / 101 + 1) / 2)


def test_average_precision_all_point_and_one_detection_per_box():
    assert D.average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    gt = [np.array([[0, 0, .5, .5], [.5, .5, 1, 1]])]
    r = D.class_ap(np.array([[0, 0, .5, .5]]), np.array([0.9]), gt, 0.5)
    assert r["ap"] == pytest.approx(0.5) and r["tp"] == 1 and r["n_gt"] == 2


def test_box_iou_np_matches_the_loss_module():
    from src.losses.box import box_iou

    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(size=(50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.uniform(size=(50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    assert np.allclose(D.box_iou_np(a, b), np.asarray(box_iou(a, b)), atol=1e-5)
    assert D.box_iou_np([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_box_report_slot_ious_and_known_images():
    pred, scores, ba, bc, cnt = _hand_boxes()
    true = np.zeros_like(pred)
    w = np.zeros((3, 3))
    true[0, 0], w[0, 0] = ba[0, 0], 1
    true[1, 0], w[1, 0] = ba[1, 0], 1
    true[2, 1], w[2, 1] = ba[2, 0], 1
    rep = D.box_report(pred, true, w, ["a", "b", "no_tumor"], ba, bc, cnt, scores=scores)
    assert rep["n_boxes"] == 3
    assert rep["slot_iou_mean"] == pytest.approx((1 + 0.62 + 1) / 3)
    assert rep["slot_iou_ge_0.5"] == 1.0 and rep["slot_iou_ge_0.75"] == pytest.approx(2 / 3)
    assert rep["slot_iou_histogram"]["counts"] == [0] * 6 + [1, 0, 0, 2]
    assert rep["per_class"]["a"]["n_slots"] == 2 and rep["per_class"]["b"]["slot_iou_mean"] == pytest.approx(1.0)
    # images with unknown boxes are left out of the mAP: without img2, class b has no box
    rep2 = D.box_report(pred, true, w, ["a", "b", "no_tumor"], ba, bc, cnt, scores=scores, known=[True, True, False])
    assert rep2["coco"]["n_images"] == 2 and math.isnan(rep2["per_class"]["b"]["ap50"])
    assert rep2["map50"] == pytest.approx(1.0) and rep2["voc_map50"] == pytest.approx(1.0)
    assert "map50" not in D.box_report(pred, true, w, ["a", "b", "no_tumor"])  # without boxes_all: slot IoU only


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def _sq(t, l, h=8, w=8, size=(32, 40)):
    m = np.zeros(size, bool)
    m[t:t + h, l:l + w] = True
    return m


def _mask_case():
    """0: class a, prediction shifted (IoU 0.6); 1: class b, nothing predicted; 2: healthy, nothing
    predicted (no ground truth, no detection); 3: healthy, a false positive mask whose top
    class is c (a class without ground truth); 4: class a, a tiny 1-pixel tumour found
    exactly; 5: class a, found (IoU 0.78) but classified as b."""
    empty = np.zeros((32, 40), bool)
    tiny = empty.copy()
    tiny[20, 30] = True
    true = np.stack([_sq(4, 4), _sq(10, 20), empty, empty, tiny, _sq(20, 2, 10, 10)])
    pred = np.stack([_sq(6, 4), empty, empty, _sq(2, 30), tiny, _sq(21, 3, 10, 9)])
    y = np.array([0, 1, 3, 3, 0, 0])
    probs = np.array([[.7, .1, .1, .1], [.1, .6, .1, .2], [.05, .05, .1, .8], [.1, .1, .5, .3],
                      [.5, .2, .2, .1], [.3, .5, .1, .1]])
    return pred, true, y, probs


def _rle(m):
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def test_mask_map_equals_pycocotools_class_aware_and_agnostic():
    pred, true, y, probs = _mask_case()
    out = D.mask_map(D.encode_masks(pred), D.encode_masks(true), probs=probs, y_class=y, class_names=NAMES)
    assert out["mask_map_kind"] == "class-aware"
    has_pred = [i for i in range(6) if pred[i].any()]
    gts = [(i, int(y[i]), _rle(true[i])) for i in range(6) if true[i].any()]
    top = probs[:, :3].argmax(1)
    ev = coco_reference((32, 40), 6, 3, gts, [(i, int(top[i]), _rle(pred[i]), probs[i, top[i]]) for i in has_pred],
                        "segm")
    assert out["map50_95"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert out["map50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert out["map75"] == pytest.approx(ev.stats[2], abs=1e-6)
    assert out["coco"]["per_class"]["a"]["ap50_95"] == pytest.approx(_ref_ap(ev, 0), abs=1e-6)
    assert math.isnan(out["coco"]["per_class"]["c"]["ap50"])  # no ground truth of class c
    assert out["coco"]["n_detections"] == 4 and out["coco"]["n_gt"] == 4 and out["coco"]["n_images"] == 6
    # class-agnostic: one category, score p(tumour) = 1 - p(no_tumor)
    ev = coco_reference((32, 40), 6, 1, [(i, 0, g) for i, _, g in gts],
                        [(i, 0, _rle(pred[i]), 1 - probs[i, 3]) for i in has_pred], "segm")
    assert out["agnostic"]["map50_95"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert out["agnostic"]["map50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert out["agnostic"]["score"] == "p(tumour)"
    assert "pycocotools" in out["implementations"]["map50/map50_95/map75"]


def test_mask_map_without_class_output_and_edge_cases():
    pred, true, _, _ = _mask_case()
    pr, tr = D.encode_masks(pred), D.encode_masks(true)
    out = D.mask_map(pr, tr)  # a segmentation-only model: score 1, one category
    has_pred = [i for i in range(6) if pred[i].any()]
    ev = coco_reference((32, 40), 6, 1, [(i, 0, _rle(true[i])) for i in range(6) if true[i].any()],
                        [(i, 0, _rle(pred[i]), 1.0) for i in has_pred], "segm")
    assert out["mask_map_kind"] == "class-agnostic" and out["agnostic"]["score"].startswith("1")
    assert out["map50_95"] == pytest.approx(ev.stats[0], abs=1e-6)
    # a tumour mask without a known tumour class: class-agnostic only, with a note
    out = D.mask_map(pr, tr, probs=_mask_case()[3], y_class=[0, -1, 3, 3, 0, 0], class_names=NAMES)
    assert out["mask_map_kind"] == "class-agnostic" and "no known tumour class" in out["note"]
    # nothing predicted anywhere: AP 0 (ground truth exists); no tumour anywhere: undefined
    none = D.encode_masks(np.zeros_like(pred))
    assert D.mask_map(none, tr)["map50_95"] == 0.0
    assert math.isnan(D.mask_map(pr, none)["map50_95"]) and math.isnan(D.mask_map([], [])["map50"])
    # encode_masks is pycocotools.mask.encode image by image
    assert [r["counts"] for r in pr] == [_rle(m)["counts"] for m in pred]
