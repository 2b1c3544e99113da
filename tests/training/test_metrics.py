"""Training-time metrics: against scikit-learn, the box mean IoU against hand-computed cases."""
import numpy as np
import pytest
from sklearn import metrics as skm

from src.training.metrics import BoxMeanIoU, SparseMacroF1


@pytest.mark.parametrize("absent", [False, True])
def test_sparse_macro_f1_averages_over_the_classes_present(absent):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3 if absent else 4, 40)  # absent: class 3 never labelled (figshare's no_tumor)
    logits = rng.normal(size=(40, 4))
    logits[np.arange(40), y] += 1.0
    logits[:3, 3] += 5.0  # class 3 is predicted a few times
    w = np.ones(40, np.float32)
    w[-5:] = 0.0  # unknown labels are left out
    m = SparseMacroF1(4)
    m.update_state(y[:20], logits[:20], w[:20])
    m.update_state(y[20:], logits[20:], w[20:])
    keep = w > 0
    present = np.unique(y[keep])
    ref = skm.f1_score(y[keep], logits[keep].argmax(1), labels=present, average="macro", zero_division=0)
    assert float(m.result()) == pytest.approx(ref, abs=1e-5)


def test_box_mean_iou_metric_weighted_and_stateful():
    metric = BoxMeanIoU()
    y_true = np.array([[[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.9, 0.9]]], "float32")
    y_pred = np.array([[[0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5]]], "float32")
    metric.update_state(y_true, y_pred, sample_weight=np.array([[1.0, 0.0]]))
    assert float(metric.result()) == pytest.approx(1.0)
    metric.update_state(y_true, y_pred, sample_weight=np.array([[0.0, 1.0]]))
    assert float(metric.result()) == pytest.approx((1.0 + 0.0625) / 2)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(np.zeros((1, 2, 4)), np.zeros((1, 2, 4)), sample_weight=np.zeros((1, 2)))
    assert float(metric.result()) == 0.0
    restored = BoxMeanIoU.from_config(BoxMeanIoU(mode="giou", name="g").get_config())
    assert restored.mode == "giou" and restored.name == "g"
