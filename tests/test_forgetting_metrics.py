"""Forgetting metrics (pyunlearn.metrics.forgetting)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from pyunlearn.metrics.forgetting import (
    accuracy,
    evaluate_forgetting,
    forgetting_accuracies,
    membership_inference,
    per_sample_losses,
    predict_logits,
    retrain_gap,
    split,
)
from pyunlearn.models_classify import LinearClassifier
from pyunlearn.unlearn.classification import train_classifier


def _fixed_linear() -> LinearClassifier:
    """2-D inputs, 3 classes: argmax of (x0, x1, 0.5)."""
    m = LinearClassifier(2, 3)
    with torch.no_grad():
        m.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        m.head.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    return m


def test_accuracy_and_losses_on_a_known_model():
    m = _fixed_linear()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.1, 0.2]])
    y = torch.tensor([0, 1, 2, 1, 2])
    assert accuracy(m, (x, y)) == pytest.approx(4 / 5)
    assert accuracy(m, TensorDataset(x, y), batch_size=2) == pytest.approx(4 / 5)
    torch.testing.assert_close(per_sample_losses(m, (x, y), batch_size=3), F.cross_entropy(m(x), y, reduction="none"))
    assert np.isnan(accuracy(m, (x[:0], y[:0])))
    assert per_sample_losses(m, (x[:0], y[:0])).shape == (0,)
    m.train()
    predict_logits(m, x)
    assert m.training  # mode restored


def test_forgetting_accuracies_and_evaluate():
    m = _fixed_linear()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 2, 1])
    acc = forgetting_accuracies(m, forget=(x[:2], y[:2]), remain=(x[2:], y[2:]))
    assert acc["forget_acc"] == 1.0 and acc["remain_acc"] == 0.5 and np.isnan(acc["test_acc"])
    g = torch.Generator().manual_seed(0)
    xf, xh = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    yf, yh = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (30,), generator=g)
    out = evaluate_forgetting(m, forget=(xf, yf), remain=(x, y), test=(x, y), heldout=(xh, yh))
    assert set(out) >= {"forget_acc", "remain_acc", "test_acc", "mia", "mia_auc"}
    assert 0.0 <= out["mia"] <= 1.0
    assert np.isnan(evaluate_forgetting(m, forget=(xf, yf), remain=(x, y))["mia"])


# --------------------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_f,n_h", [(400, 400), (60, 600), (500, 45)])
def test_mia_on_identical_distributions_is_near_half(n_f, n_h):
    rng = np.random.default_rng(0)
    accs = [membership_inference(rng.exponential(size=n_f), rng.exponential(size=n_h), seed=s)["accuracy"]
            for s in range(5)]
    assert abs(float(np.mean(accs)) - 0.5) < 0.05  # balanced: unequal sizes do not push it to the majority rate


def test_mia_on_separated_losses_is_high():
    rng = np.random.default_rng(1)
    members = rng.exponential(scale=0.01, size=80)
    outsiders = 1.0 + rng.exponential(size=30)
    out = membership_inference(members, outsiders, folds=4)
    assert out["accuracy"] > 0.95 and out["auc"] > 0.95
    assert out["scores"].shape == (80,) and out["folds"] == 4
    assert out["n_forget"] == 80 and out["n_heldout"] == 30
    assert float(out["scores"].mean()) > 0.8


def test_mia_on_a_memorising_model_is_much_above_half():
    """An over-parameterised MLP fitted to random labels memorises its training set."""
    g = torch.Generator().manual_seed(0)
    d, k = 10, 4
    x_tr, x_ho = torch.randn(64, d, generator=g), torch.randn(64, d, generator=g)
    y_tr, y_ho = torch.randint(0, k, (64,), generator=g), torch.randint(0, k, (64,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, k))
    train_classifier(model, (x_tr, y_tr), epochs=40, lr=5e-2, batch_size=64, seed=0)
    assert accuracy(model, (x_tr, y_tr)) == 1.0
    out = membership_inference(per_sample_losses(model, (x_tr, y_tr)), per_sample_losses(model, (x_ho, y_ho)))
    # ~1/4 of held-out samples get their random label right by chance, so ~0.875 is the ceiling
    assert out["accuracy"] > 0.75 and out["auc"] > 0.8
    # the same model, held-out vs held-out (both unseen): nothing to find
    x_ho2, y_ho2 = torch.randn(64, d, generator=g), torch.randint(0, k, (64,), generator=g)
    null = membership_inference(per_sample_losses(model, (x_ho2, y_ho2)), per_sample_losses(model, (x_ho, y_ho)))
    assert abs(null["accuracy"] - 0.5) < 0.15


@given(
    f=st.lists(st.floats(0.0, 50.0), min_size=2, max_size=40),
    h=st.lists(st.floats(0.0, 50.0), min_size=2, max_size=40),
    folds=st.integers(2, 6),
    seed=st.integers(0, 10),
    feature=st.sampled_from(["loss", "log_loss"]),
)
def test_mia_outputs_are_well_formed(f, h, folds, seed, feature):
    out = membership_inference(f, h, folds=folds, seed=seed, feature=feature)
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["auc"] <= 1.0
    assert out["scores"].shape == (len(f),)
    assert np.all((out["scores"] >= 0) & (out["scores"] <= 1))
    assert out["folds"] == min(folds, len(f), len(h))
    again = membership_inference(f, h, folds=folds, seed=seed, feature=feature)
    assert again["accuracy"] == out["accuracy"] and np.array_equal(again["scores"], out["scores"])


def test_mia_errors():
    with pytest.raises(ValueError, match="forget_losses needs at least 2"):
        membership_inference([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="heldout_losses contains non-finite"):
        membership_inference([0.1, 0.2], [0.1, float("nan")])
    with pytest.raises(ValueError, match="must be 1-D"):
        membership_inference(np.zeros((3, 2)), [0.1, 0.2])
    with pytest.raises(ValueError, match=">= 0"):
        membership_inference([-0.1, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="folds"):
        membership_inference([0.1, 0.2], [0.1, 0.2], folds=1)
    with pytest.raises(ValueError, match="feature"):
        membership_inference([0.1, 0.2], [0.1, 0.2], feature="entropy")


# --------------------------------------------------------------------------------------------------
# Retrain gap and splits
# --------------------------------------------------------------------------------------------------
def test_retrain_gap():
    a = {"forget_acc": 0.1, "remain_acc": 0.9, "test_acc": 0.8, "mia": 0.55, "wall_s": 3.0}
    r = {"forget_acc": 0.0, "remain_acc": 1.0, "test_acc": 0.8, "mia": 0.5}
    gap = retrain_gap(a, r)
    assert set(gap) == {"forget_acc", "remain_acc", "test_acc", "mia", "mean"}
    assert gap["forget_acc"] == pytest.approx(0.1) and gap["mia"] == pytest.approx(0.05)
    assert gap["mean"] == pytest.approx((0.1 + 0.1 + 0.0 + 0.05) / 4)
    assert retrain_gap(a, r, keys=["test_acc"]) == {"test_acc": 0.0, "mean": 0.0}
    with pytest.raises(KeyError, match="wall_s"):
        retrain_gap(a, r, keys=["wall_s"])
    with pytest.raises(ValueError, match="no metric"):
        retrain_gap({"x": 1.0}, {"y": 1.0})


def test_split_by_metadata():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    device = np.array(["A", "B", "A", "C", "B", "A"])
    forget, remain = split((x, y), device == "A")
    assert forget[1].tolist() == [0, 2, 2] and remain[1].tolist() == [1, 0, 1]
    thickness = torch.tensor([0.1, 2.5, 0.3, 3.1, 0.2, 0.0])  # a measurement threshold
    forget, remain = split(TensorDataset(x, y), thickness > 2.0)
    assert forget[0].shape == (2, 2) and remain[0].shape == (4, 2)
    forget, remain = split((x, y), [0, 0, 0, 0, 0, 1])
    assert forget[0].shape[0] == 1
    with pytest.raises(ValueError, match=r"forget_mask must have shape \(6,\)"):
        split((x, y), device[:5] == "A")
    with pytest.raises(TypeError, match="boolean"):
        split((x, y), thickness)
