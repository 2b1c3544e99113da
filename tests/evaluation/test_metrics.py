"""Classification, mask and reconstruction metrics against scikit-learn, brute force and their
definitions (boxes and COCO mAP: test_detection.py)."""
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
@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")
@pytest.mark.parametrize("seed", [0, 1])
def test_classification_report_matches_sklearn(seed):
    y, p = _probs(240, 4, seed)
    p = p.astype(np.float32).astype(np.float64)  # a float32 softmax: rows sum to 1 only up to round-off
    pred = p.argmax(1)
    rep = M.classification_report(y, p, CLASSES)
    labels = list(range(4))
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for k, name in enumerate(CLASSES):
        pc = rep["per_class"][name]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((pr[k], rc[k], f1[k], sup[k]),
                                                                                         abs=1e-12)
        assert pc["roc_auc"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=1e-12)
    for avg in ("macro", "micro", "weighted"):
        ref = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)[:3]
        assert tuple(rep[avg][k] for k in ("precision", "recall", "f1")) == pytest.approx(ref, abs=1e-12)
    assert rep["micro"]["f1"] == pytest.approx(rep["accuracy"])
    assert rep["roc_auc"]["macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert rep["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert np.allclose(np.sum(rep["confusion_matrix_normalized"], axis=1), 1.0)
    # the multiclass Brier score, [0, 2]: checked against its definition and scikit-learn
    assert rep["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(4)[y]) ** 2, 1)), abs=1e-12)
    assert rep["brier"] == pytest.approx(skm.brier_score_loss(y, p, labels=labels, scale_by_half=False), abs=1e-12)
    worst = min(CLASSES, key=lambda c: rep["per_class"][c]["recall"])
    assert rep["worst_class"]["name"] == worst
    assert rep["worst_class"]["gap_to_macro_recall"] == pytest.approx(rep["per_class"][worst]["recall"]
                                                                      - rep["balanced_accuracy"])
    assert "scikit-learn" in rep["implementations"]["precision/recall/f1"]
    assert "ours" in rep["implementations"]["ece"]


def _absent_case():
    """class 3 (no_tumor) never occurs in y_true but is predicted once; class 2 is never predicted."""
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    pred = np.array([0, 1, 1, 1, 0, 3, 0, 0])
    p = np.full((8, 4), 0.05)
    p[np.arange(8), pred] = 0.85
    return y, p, pred


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_is_undefined_and_left_out_of_the_averages():
    y, p, pred = _absent_case()
    rep = M.classification_report(y, p, CLASSES)
    present = [0, 1, 2]
    # the averages are scikit-learn's over the classes present in y_true
    for avg in ("macro", "weighted"):
        ref = skm.precision_recall_fscore_support(y, pred, labels=present, average=avg, zero_division=0)[:3]
        assert tuple(rep[avg][k] for k in ("precision", "recall", "f1")) == pytest.approx(ref, abs=1e-12)
    all_labels = skm.f1_score(y, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)
    assert rep["macro"]["f1"] > all_labels  # an absent class counted as 0 would drag the mean down
    assert rep["micro"]["f1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(rep["macro"]["recall"])
    # per class: present classes are scikit-learn's; the absent class is undefined, not 0
    pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=present, zero_division=0)
    for k in present:
        pc = rep["per_class"][CLASSES[k]]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((pr[k], rc[k], f1[k]), abs=1e-12)
    assert rep["per_class"]["pituitary"]["precision"] == 0.0  # present, never predicted: zero_division=0
    nt = rep["per_class"]["no_tumor"]
    assert nt["support"] == 0 and nt["precision"] == 0.0  # predicted once, wrongly: a false positive
    assert math.isnan(nt["recall"]) and math.isnan(nt["f1"]) and math.isnan(nt["roc_auc"])
    assert rep["classes_present"] == CLASSES[:3] and rep["worst_class"]["name"] != "no_tumor"
    defined = [skm.roc_auc_score(y == k, p[:, k]) for k in range(3)]
    assert rep["roc_auc"]["macro"] == pytest.approx(np.mean(defined))
    js = M.to_jsonable(rep)["per_class"]["no_tumor"]
    assert js["recall"] is None and js["f1"] is None and js["roc_auc"] is None and js["precision"] == 0.0


def test_absent_class_never_predicted_has_undefined_precision():
    y, p, _ = _absent_case()
    p[:, 3] = 0.0  # no_tumor is never the argmax now
    rep = M.classification_report(y, p, CLASSES)
    assert math.isnan(rep["per_class"]["no_tumor"]["precision"])
    pred = p.argmax(1)
    assert rep["macro"]["f1"] == pytest.approx(skm.f1_score(y, pred, labels=[0, 1, 2], average="macro",
                                                             zero_division=0))


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
    assert rep["brier"] == pytest.approx(skm.brier_score_loss(y, p)) and rep["brier"] == pytest.approx(
        np.mean((p - y) ** 2))
    assert rep["calibration"]["kind"] == "binary"
    # a split with tumour slices only (figshare): no_tumor is undefined, the averages are over "tumor"
    only = M.binary_report(np.ones(6, int), np.array([.9, .8, .2, .7, .6, .95]), names=("no_tumor", "tumor"))
    assert math.isnan(only["per_class"]["no_tumor"]["recall"]) and only["per_class"]["no_tumor"]["precision"] == 0
    assert only["macro"]["f1"] == pytest.approx(skm.f1_score(np.ones(6), [1, 1, 0, 1, 1, 1]))


def test_multilabel_report_matches_sklearn():
    rng = np.random.default_rng(5)
    y = (rng.uniform(size=(80, 4)) < 0.35).astype(float)
    y[:, 3] = 0  # a class without positives
    p = np.clip(0.4 * y + rng.uniform(0, 0.6, (80, 4)), 0, 1)
    rep = M.multilabel_report(y, p, CLASSES, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    for k, name in enumerate(CLASSES[:3]):
        assert rep["per_class"][name]["f1"] == pytest.approx(f1[k], abs=1e-12)
        assert rep["per_class"][name]["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, k], p[:, k]), abs=1e-12)
    nt = rep["per_class"]["no_tumor"]
    assert math.isnan(nt["recall"]) and math.isnan(nt["f1"]) and nt["precision"] == 0.0 and nt["support"] == 0
    for avg in ("macro", "weighted"):
        ref = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2], average=avg, zero_division=0)[:3]
        assert tuple(rep[avg][k] for k in ("precision", "recall", "f1")) == pytest.approx(ref, abs=1e-12)
    ref = skm.precision_recall_fscore_support(y, pred, average="micro", zero_division=0)[:3]
    assert tuple(rep["micro"][k] for k in ("precision", "recall", "f1")) == pytest.approx(ref, abs=1e-12)
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


def test_dice_iou_refuses_masks_of_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice_iou(np.ones((4, 4)), np.ones((4, 4, 1)))  # would broadcast to [4, 4, 4] silently


def _brute_hd95(a, b, spacing=(1.0, 1.0), q=95):
    """MONAI's definition, computed independently: surface = mask minus its erosion with the
    4-connected cross (a pixel on the image border is surface), all pairwise distances
    between the surface point sets in mm, the q-th percentile of the nearest-surface
    distances in each direction, the larger of the two."""
    from scipy.spatial.distance import cdist

    def surf(m):
        pad = np.pad(m, 1)
        inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return m & ~inner

    pa = np.argwhere(surf(a)) * np.asarray(spacing)
    pb = np.argwhere(surf(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(1), q), np.percentile(d.min(0), q))


def _blobs():
    yy, xx = np.mgrid[:48, :40]
    a = ((yy - 20) ** 2 + (xx - 22) ** 2 < 100) | ((yy >= 15) & (yy < 30) & (xx >= 25) & (xx < 40))  # touches border
    b = ((yy - 24) / 12.0) ** 2 + ((xx - 20) / 7.0) ** 2 < 1
    return a, b


@pytest.mark.parametrize("spacing", [None, (0.5, 1.25)])
def test_hd95_against_brute_force_surface_distances(spacing):
    a, b = _blobs()
    ref = _brute_hd95(a, b, spacing or (1.0, 1.0))
    assert M.hd95(a, b, spacing=spacing) == pytest.approx(ref, abs=1e-9)
    assert M.hd95(b, a, spacing=spacing) == pytest.approx(ref, abs=1e-9)  # symmetric
    tiny = np.zeros_like(a)
    tiny[40, 5] = True  # a one-pixel mask is its own surface
    assert M.hd95(tiny, b, spacing=spacing) == pytest.approx(_brute_hd95(tiny, b, spacing or (1.0, 1.0)), abs=1e-9)
    s = M.mask_scores(np.stack([a, tiny]), np.stack([b, b]), spacing=spacing)
    assert s["hd95"].tolist() == pytest.approx([ref, _brute_hd95(tiny, b, spacing or (1.0, 1.0))], abs=1e-9)


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
    assert rep["hd95_unit"] == "px" and "MONAI" in rep["implementations"]["hd95"]
    mm = M.mask_report(s, (64, 64), spacing=(0.5, 2.0))
    assert mm["hd95_unit"] == "mm" and mm["hd95_penalty"] == pytest.approx(math.hypot(32, 128))


# ---------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------
def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (2, 16, 16, 3))
    noisy = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    ref = 10 * np.log10(1.0 / ((noisy - x) ** 2).reshape(2, -1).mean(1))
    assert M.psnr(noisy, x).tolist() == pytest.approx(ref.tolist(), abs=1e-4)  # tf.image.psnr in float32
    assert M.psnr(255 * noisy, 255 * x, data_range=255.0).tolist() == pytest.approx(ref.tolist(), abs=1e-4)
    assert M.psnr(x, x).tolist() == [M.PSNR_CAP, M.PSNR_CAP]
    s = M.ssim(x, x)
    assert s.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (M.ssim(np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1), x) < 0.9).all()
    rep = M.recon_report(M.psnr(noisy, x), s)
    assert rep["psnr_mean"] == pytest.approx(ref.mean(), abs=1e-4) and rep["ssim"]["n"] == 2
    assert "tf.image.psnr" in rep["implementations"]["psnr"]
