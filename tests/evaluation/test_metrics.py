"""Evaluation metrics against scikit-learn and hand-computed references."""
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from src.evaluation import metrics as M

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]


def _probs(n, c, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_classification_report_matches_sklearn(seed):
    y, p = _probs(240, 4, seed)
    pred = p.argmax(1)
    rep = M.classification_report(y, p, CLASSES)
    labels = list(range(4))
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for k, name in enumerate(CLASSES):
        pc = rep["per_class"][name]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((pr[k], rc[k], f1[k], sup[k]))
        assert pc["roc_auc"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))
    for avg in ("macro", "micro", "weighted"):
        ref = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)[:3]
        assert tuple(rep[avg][k] for k in ("precision", "recall", "f1")) == pytest.approx(ref)
    assert rep["roc_auc"]["macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert rep["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert np.allclose(np.sum(rep["confusion_matrix_normalized"], axis=1), 1.0)
    assert rep["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(4)[y]) ** 2, 1)))
    worst = min(CLASSES, key=lambda c: rep["per_class"][c]["recall"])
    assert rep["worst_class"]["name"] == worst
    assert rep["worst_class"]["gap_to_macro_recall"] == pytest.approx(rep["per_class"][worst]["recall"]
                                                                      - rep["balanced_accuracy"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_absent_class_and_never_predicted_class():
    # class 3 never occurs in y_true, class 2 is never predicted
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    p = np.full((8, 4), 0.05)
    pred = np.array([0, 1, 1, 1, 0, 3, 0, 0])
    p[np.arange(8), pred] = 0.85
    rep = M.classification_report(y, p, CLASSES)
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert rep["per_class"]["pituitary"]["precision"] == 0.0  # zero_division=0
    assert rep["per_class"]["no_tumor"]["roc_auc"] is not None and math.isnan(rep["per_class"]["no_tumor"]["roc_auc"])
    defined = [skm.roc_auc_score(y == k, p[:, k]) for k in range(3)]
    assert rep["roc_auc"]["macro"] == pytest.approx(np.mean(defined))
    assert M.to_jsonable(rep)["per_class"]["no_tumor"]["roc_auc"] is None


def test_roc_curve_matches_sklearn_with_ties():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0])
    s = np.array([0.1, 0.4, 0.4, 0.4, 0.8, 0.2, 0.9, 0.3, 0.3, 0.7])
    fpr, tpr, thr = M.roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, f2) and np.allclose(tpr, t2) and np.allclose(thr[1:], th2[1:])
    assert M.roc_auc_binary(y, s) == pytest.approx(skm.roc_auc_score(y, s))


def test_binary_report_threshold():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 100), 0, 1)
    rep = M.binary_report(y, p, threshold=0.3, names=("no_tumor", "tumor"))
    pred = (p >= 0.3).astype(int)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["per_class"]["tumor"]["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert rep["per_class"]["tumor"]["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert rep["roc_auc"]["macro"] == pytest.approx(skm.roc_auc_score(y, p))
    assert rep["calibration"]["kind"] == "binary"


def test_multilabel_report_matches_sklearn():
    rng = np.random.default_rng(5)
    y = (rng.uniform(size=(80, 4)) < 0.35).astype(float)
    p = np.clip(0.4 * y + rng.uniform(0, 0.6, (80, 4)), 0, 1)
    rep = M.multilabel_report(y, p, CLASSES, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    for k, name in enumerate(CLASSES):
        assert rep["per_class"][name]["f1"] == pytest.approx(f1[k])
        assert rep["per_class"][name]["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, k], p[:, k]))
    for avg in ("macro", "micro", "weighted"):
        ref = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)[:3]
        assert tuple(rep[avg][k] for k in ("precision", "recall", "f1")) == pytest.approx(ref)
    assert rep["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))


def test_ece_on_constructed_cases():
    # one bin: confidence 0.8 everywhere, 6 of 10 right -> ECE = |0.6 - 0.8| = 0.2
    cal = M.calibration(np.full(10, 0.8), np.array([1] * 6 + [0] * 4), n_bins=10)
    assert cal["ece"] == pytest.approx(0.2)
    assert [b["count"] for b in cal["bins"]] == [0] * 7 + [10] + [0] * 2  # 0.8 lies in (0.7, 0.8]
    # two bins with gaps 0.05 and 0.2, weighted 4/8 each -> 0.125; MCE 0.2
    conf = np.array([0.95] * 4 + [0.55] * 4)
    corr = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    cal = M.calibration(conf, corr, n_bins=10)
    assert cal["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    conf2 = np.array([0.95] * 4 + [0.7] * 4)
    cal2 = M.calibration(conf2, corr, n_bins=10)
    assert cal2["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.2) and cal2["mce"] == pytest.approx(0.2)
    # through the classification report: top-label confidence and correctness
    p = np.array([[0.8, 0.1, 0.1, 0.0]] * 5)
    rep = M.classification_report(np.array([0, 0, 0, 1, 2]), p, CLASSES, n_bins=10)
    assert rep["calibration"]["ece"] == pytest.approx(abs(0.6 - 0.8))


def test_compose_tumor_subtype():
    p = np.array([0.2, 0.7, 0.5, 0.49])
    q = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    probs, pred = M.compose_tumor_subtype(p, q, CLASSES, CLASSES[:3], threshold=0.5)
    assert pred.tolist() == [3, 0, 2, 3]
    assert np.allclose(probs.sum(1), 1.0)
    assert probs[1].tolist() == pytest.approx([0.35, 0.14, 0.21, 0.3])
    _, pred2 = M.compose_tumor_subtype(p, q, CLASSES, CLASSES[:3], threshold=0.1)
    assert pred2.tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match="no_tumor"):
        M.compose_tumor_subtype(p, q, CLASSES[:3], CLASSES[:3])


# ---------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------
def test_box_iou_np_matches_the_loss_module():
    from src.losses.box import box_iou

    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(size=(50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.uniform(size=(50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    assert np.allclose(M.box_iou_np(a, b), np.asarray(box_iou(a, b)), atol=1e-5)
    assert M.box_iou_np([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_average_precision_all_point():
    # precision envelope: recall 0.5 at precision 1, recall 1.0 at precision 2/3
    assert M.average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 0.5 * 2 / 3)


def _hand_boxes():
    """3 images, 2 class slots (+ no_tumor slot 2 without boxes).

    class 0: img0 true A (pred = A, IoU 1, p .9); img1 true B (pred IoU 0.62, p .7);
             img2 has no class-0 box (pred p .8 -> a false positive at every threshold).
    class 1: img2 true D (pred = D, p .6); img0/img1 predictions with p .1/.2 are false positives
             ranked below it -> AP 1.
    """
    A, B, D = [0, 0, .5, .5], [.5, .5, 1, 1], [.1, .1, .4, .3]
    pred = np.zeros((3, 3, 4))
    pred[:, :] = [.6, .6, .7, .7]
    pred[0, 0], pred[1, 0], pred[2, 0] = A, [.5, .5, 1, .81], [0, .6, .2, .9]
    pred[2, 1] = D
    scores = np.array([[.9, .1, 0], [.7, .2, .1], [.8, .6, .1]])
    boxes_all = np.zeros((3, 2, 4))
    cls = np.full((3, 2), -1)
    boxes_all[0, 0], cls[0, 0] = A, 0
    boxes_all[1, 0], cls[1, 0] = B, 0
    boxes_all[2, 0], cls[2, 0] = D, 1
    count = np.array([1, 1, 1])
    return pred, scores, boxes_all, cls, count


def test_map_on_hand_made_boxes():
    pred, scores, ba, bc, cnt = _hand_boxes()
    m = M.mean_average_precision(pred, scores, ba, bc, cnt, ["a", "b", "no_tumor"])
    # class a at IoU <= 0.62: TP(.9) FP(.8) TP(.7) -> P = 1, 1/2, 2/3 at R = .5, .5, 1 -> AP = .5 + .5 * 2/3
    ap_low = 0.5 + 0.5 * 2 / 3
    # above 0.62 the .7 detection is a false positive -> AP = 0.5
    assert m["ap"]["a"]["0.50"] == pytest.approx(ap_low)
    assert m["ap"]["a"]["0.60"] == pytest.approx(ap_low)
    assert m["ap"]["a"]["0.65"] == pytest.approx(0.5)
    assert m["ap50"]["b"] == pytest.approx(1.0)
    assert math.isnan(m["ap50"]["no_tumor"]) and m["classes_with_boxes"] == ["a", "b"]
    assert m["map50"] == pytest.approx((ap_low + 1.0) / 2)
    ap_a = (3 * ap_low + 7 * 0.5) / 10  # thresholds .50 .55 .60 keep the TP, .65 ... .95 do not
    assert m["map50_95"] == pytest.approx((ap_a + 1.0) / 2)


def test_class_ap_one_detection_cannot_match_two_boxes():
    gt = [np.array([[0, 0, .5, .5], [.5, .5, 1, 1]])]
    r = M.class_ap(np.array([[0, 0, .5, .5]]), np.array([0.9]), gt, 0.5)
    assert r["ap"] == pytest.approx(0.5) and r["tp"] == 1 and r["n_gt"] == 2


def test_box_report_slot_ious_and_histogram():
    pred, scores, ba, bc, cnt = _hand_boxes()
    true = np.zeros_like(pred)
    w = np.zeros((3, 3))
    true[0, 0], w[0, 0] = ba[0, 0], 1
    true[1, 0], w[1, 0] = ba[1, 0], 1
    true[2, 1], w[2, 1] = ba[2, 0], 1
    rep = M.box_report(pred, true, w, ["a", "b", "no_tumor"], ba, bc, cnt, scores=scores)
    assert rep["n_boxes"] == 3
    assert rep["mean_iou"] == pytest.approx((1 + 0.62 + 1) / 3)
    assert rep["iou_ge_0.5"] == 1.0 and rep["iou_ge_0.75"] == pytest.approx(2 / 3)
    assert rep["iou_histogram"]["counts"] == [0] * 6 + [1, 0, 0, 2]
    assert rep["per_class"]["a"]["n"] == 2 and rep["per_class"]["b"]["mean_iou"] == pytest.approx(1.0)
    assert rep["map50"] == pytest.approx((0.5 + 0.5 * 2 / 3 + 1) / 2)
    # images with unknown boxes are left out of the mAP: without img2, class b has no box
    rep2 = M.box_report(pred, true, w, ["a", "b", "no_tumor"], ba, bc, cnt, scores=scores, known=[True, True, False])
    assert rep2["map50"] == pytest.approx(1.0) and rep2["detection"]["n_images"] == 2


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def _square(top, left, side=20, size=64):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_of_offset_squares_is_the_offset(k):
    a, b = _square(10, 10), _square(10, 10 + k)
    assert M.hd95(a, b) == pytest.approx(k)
    d, i = M.dice_iou(a, b)
    inter = 20 * (20 - k)
    assert d == pytest.approx(2 * inter / 800) and i == pytest.approx(inter / (800 - inter))


def test_hd95_against_brute_force_surface_distances():
    from scipy import ndimage

    yy, xx = np.mgrid[:48, :48]
    a = ((yy - 20) ** 2 + (xx - 22) ** 2 < 100) | ((yy >= 15) & (yy < 30) & (xx >= 25) & (xx < 40))
    b = ((yy - 24) / 12.0) ** 2 + ((xx - 20) / 7.0) ** 2 < 1
    sa = a & ~ndimage.binary_erosion(a, ndimage.generate_binary_structure(2, 1))
    sb = b & ~ndimage.binary_erosion(b, ndimage.generate_binary_structure(2, 1))
    pa, pb = np.argwhere(sa), np.argwhere(sb)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    ref = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert M.hd95(a, b) == pytest.approx(ref)


def test_empty_mask_conventions_and_report():
    empty = np.zeros((64, 64), bool)
    sq = _square(5, 5)
    assert M.dice_iou(empty, empty) == (1.0, 1.0) and M.hd95(empty, empty) == 0.0
    assert M.dice_iou(empty, sq) == (0.0, 0.0) and math.isnan(M.hd95(empty, sq))
    pred = np.stack([_square(10, 10), empty, empty, sq])
    true = np.stack([_square(10, 13), empty, sq, empty])
    s = M.mask_scores(pred, true)
    assert s["dice"].tolist() == pytest.approx([2 * 340 / 800, 1.0, 0.0, 0.0])
    assert s["hd95"][0] == pytest.approx(3) and s["hd95"][1] == 0 and np.isnan(s["hd95"][2:]).all()
    rep = M.mask_report(s, (64, 64), pooled={"inter": 340, "pred": 800, "true": 800})
    assert rep["hd95_undefined"] == 2 and rep["hd95_mean"] == pytest.approx(1.5)
    diag = math.hypot(64, 64)
    assert rep["hd95_mean_penalised"] == pytest.approx((3 + 0 + 2 * diag) / 4)
    assert rep["n_tumor"] == 2 and rep["dice_mean_tumor_only"] == pytest.approx((0.85 + 0.0) / 2)
    assert rep["dice_mean"] == pytest.approx((0.85 + 1 + 0 + 0) / 4)
    assert rep["empty_prediction_on_tumor"] == 1 and rep["false_positive_on_healthy"] == 1
    assert rep["dice_global"] == pytest.approx(0.425) and sum(rep["dice_histogram"]["counts"]) == 4


# ---------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------
def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (2, 16, 16, 3))
    assert M.psnr(x + 0.1, x).tolist() == pytest.approx([20.0, 20.0])
    assert M.psnr(x, x).tolist() == [M.PSNR_CAP, M.PSNR_CAP]
    s = M.ssim(x, x)
    assert s.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (M.ssim(np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1), x) < 0.9).all()
    rep = M.recon_report(M.psnr(x + 0.1, x), s)
    assert rep["psnr_mean"] == pytest.approx(20.0) and rep["ssim"]["n"] == 2
