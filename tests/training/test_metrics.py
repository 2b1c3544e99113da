"""Training-time metrics against scikit-learn."""
import numpy as np
import pytest
from sklearn import metrics as skm

from src.training.metrics import SparseMacroF1


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
