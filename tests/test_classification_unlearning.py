"""Classification baselines and model composition (pyunlearn.unlearn.classification)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from pyunlearn.models_classify import DigitsCNN, LinearClassifier, as_xy
from pyunlearn.unlearn.classification import (
    compose,
    finetune,
    neggrad_plus,
    retrain,
    scrub,
    train_classifier,
)


def _seeded(factory, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


class MLP(nn.Module):
    def __init__(self, d: int, k: int, hidden: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, k)

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.features(x))


class NoHead(nn.Module):
    def features(self, x):
        return x


def _blobs(n_per: int, k: int, seed: int, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 2.0
    x = centres.repeat_interleave(n_per, 0) + 0.3 * torch.randn(k * n_per, dim, generator=g)
    return x, torch.arange(k).repeat_interleave(n_per)


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on 4 blobs; class 1 is the forget set."""
    x, y = _blobs(25, 4, seed=0)
    model = _seeded(lambda: MLP(5, 4), 0)
    train_classifier(model, (x, y), epochs=12, lr=3e-2, batch_size=16, seed=0)
    f = y == 1
    return model, (x[f], y[f]), (x[~f], y[~f])


def _acc(model, data):
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, model) -> bool:
    return all(torch.equal(a[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------
# Every method: contract
# --------------------------------------------------------------------------------------------------
METHODS = {
    "finetune": lambda m, f, r, **kw: finetune(m, f, r, steps=5, **kw),
    "neggrad_plus": lambda m, f, r, **kw: neggrad_plus(m, f, r, steps=5, **kw),
    "scrub": lambda m, f, r, **kw: scrub(m, f, r, epochs=1, max_epochs=1, **kw),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_copy_the_model_and_return_a_record(trained, name):
    model, forget, remain = trained
    before = _state(model)
    out, rec = METHODS[name](model, forget, remain, seed=1)
    assert out is not model and _same(before, model)
    assert not _same(before, out)
    assert rec["method"] == name and rec["wall_s"] >= 0 and rec["seed"] == 1
    assert rec["n_forget"] == forget[0].shape[0] and rec["n_remain"] == remain[0].shape[0]
    assert not out.training
    again, _ = METHODS[name](model, forget, remain, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(out.parameters(), again.parameters()))  # deterministic


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_inplace(trained, name):
    model, forget, remain = trained
    clone = _seeded(lambda: MLP(5, 4), 0)
    clone.load_state_dict(model.state_dict())
    out, _ = METHODS[name](clone, forget, remain, inplace=True)
    assert out is clone


@pytest.mark.parametrize("name", sorted(METHODS) + ["retrain"])
def test_methods_accept_tensor_datasets(trained, name):
    model, forget, remain = trained
    fn = METHODS.get(name, lambda m, f, r, **kw: retrain(m, f, r, epochs=1, **kw))
    a, _ = fn(model, TensorDataset(*forget), TensorDataset(*remain), seed=0)
    b, _ = fn(model, forget, remain, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_neggrad_plus_with_beta_one_is_finetune(trained):
    model, forget, remain = trained
    a, _ = neggrad_plus(model, forget, remain, beta=1.0, steps=9, lr=1e-2, seed=3)
    b, _ = finetune(model, forget, remain, steps=9, lr=1e-2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_neggrad_plus_and_scrub_forget_the_class(trained):
    model, forget, remain = trained
    assert _acc(model, forget) == 1.0
    ng, _ = neggrad_plus(model, forget, remain, beta=0.9, steps=60, lr=5e-3, batch_size=16, seed=0)
    assert _acc(ng, forget) <= 0.2 and _acc(ng, remain) >= 0.9
    sc, rec = scrub(model, forget, remain, epochs=8, max_epochs=4, lr=1e-2, temperature=1.0, batch_size=16,
                    forget_batch_size=8, seed=0)
    assert rec["max_steps"] == 4 * 4 and rec["min_steps"] == 8 * 5
    assert _acc(sc, forget) <= 0.2 and _acc(sc, remain) >= 0.9


def test_retrain_starts_from_scratch_and_never_sees_the_forget_set(trained):
    model, forget, remain = trained
    out, rec = retrain(model, forget, remain, epochs=40, lr=1e-2, batch_size=16, seed=0)
    assert rec["init"] == "reset"
    assert _acc(out, remain) >= 0.95
    assert _acc(out, forget) == 0.0  # class 1 is never seen, so never predicted
    # the fresh initialisation is seeded and differs from the trained weights
    zero_epochs, _ = retrain(model, forget, remain, epochs=0, seed=5)
    zero_again, _ = retrain(model, forget, remain, epochs=0, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(zero_epochs.parameters(), zero_again.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(zero_epochs.parameters(), model.parameters()))
    fac, rec_f = retrain(model, forget, remain, epochs=0, model_factory=lambda: MLP(5, 4))
    assert rec_f["init"] == "factory" and isinstance(fac, MLP)


def test_retrain_does_not_touch_the_global_rng(trained):
    model, forget, remain = trained
    state = torch.random.get_rng_state()
    retrain(model, forget, remain, epochs=0, seed=9)
    assert torch.equal(state, torch.random.get_rng_state())


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------
@given(hidden=st.integers(1, 9), k=st.integers(2, 5), seed_a=st.integers(0, 100), seed_b=st.integers(101, 200))
def test_compose_swaps_exactly_the_head(hidden, k, seed_a, seed_b):
    a = _seeded(lambda: MLP(3, k, hidden), seed_a)
    b = _seeded(lambda: MLP(3, k, hidden), seed_b)
    before_a, before_b = _state(a), _state(b)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(seed_a))
    y = torch.arange(7) % k
    out, rec = compose(a, b, (x, y), steps=0)
    assert _same(before_a, a) and _same(before_b, b)
    for name, p in out.backbone.state_dict().items():
        assert torch.equal(p, a.backbone.state_dict()[name])
    for name, p in out.head.state_dict().items():
        assert torch.equal(p, b.head.state_dict()[name])
    assert out.head is not b.head
    with torch.no_grad():
        torch.testing.assert_close(out(x), b.head(a.features(x)))
    assert rec["steps"] == 0


def test_compose_head_finetuning_leaves_the_features_bit_identical():
    a = _seeded(lambda: DigitsCNN(4, width=3, feature_dim=5), 0)
    b = _seeded(lambda: DigitsCNN(4, width=3, feature_dim=5), 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(11, 1, 8, 8, generator=g), torch.randint(0, 4, (11,), generator=g)
    out, rec = compose(a, b, (x, y), train="head", steps=4, lr=1e-2, batch_size=4)
    assert all(torch.equal(p, q) for p, q in zip(out.backbone.parameters(), a.backbone.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(out.head.parameters(), b.head.parameters()))
    assert all(p.requires_grad for p in out.parameters())  # flags given back
    full, _ = compose(a, b, (x, y), train="all", steps=4, lr=1e-2, batch_size=4)
    assert not all(torch.equal(p, q) for p, q in zip(full.backbone.parameters(), a.backbone.parameters()))


def test_compose_errors():
    a = _seeded(lambda: MLP(3, 4, hidden=6), 0)
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.arange(5) % 4
    with pytest.raises(ValueError, match="does not accept the features"):
        compose(a, MLP(3, 4, hidden=7), (x, y))
    with pytest.raises(ValueError, match="same classes"):
        compose(a, MLP(3, 5, hidden=6), (x, y))
    with pytest.raises(TypeError, match="features"):
        compose(nn.Linear(3, 4), a, (x, y))
    with pytest.raises(TypeError, match="forget_model must expose `head`"):
        compose(a, NoHead(), (x, y))
    with pytest.raises(TypeError, match="forget_model must be a torch.nn.Module"):
        compose(a, LinearClassifier(3, 4).features, (x, y))
    with pytest.raises(ValueError, match="train must be"):
        compose(a, a, (x, y), train="features")
    with pytest.raises(ValueError, match="remain_data is empty"):
        compose(a, a, (x[:0], y[:0]))


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [finetune, neggrad_plus, scrub, retrain])
def test_bad_inputs_give_clear_errors(fn):
    model = _seeded(lambda: MLP(5, 4), 0)
    x, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 4
    with pytest.raises(ValueError, match="forget is empty"):
        fn(model, (x[:0], y[:0]), (x, y))
    with pytest.raises(ValueError, match=r"forget: labels must be in \[0, 3\] .* found range \[1, 4\]"):
        fn(model, (x, y + 1), (x, y))
    with pytest.raises(ValueError, match="remain: labels"):
        fn(model, (x, y), (x, y - 1))
    with pytest.raises(ValueError, match="remain: x has 6 samples but y has 5"):
        fn(model, (x, y), (x, y[:5]))
    with pytest.raises(ValueError, match="remain is on meta but the model is on cpu"):
        fn(model, (x, y), (x.to("meta"), y.to("meta")))
    with pytest.raises(TypeError, match="remain: y must hold integer class indices"):
        fn(model, (x, y), (x, y.float()))


def test_as_xy_checks():
    x, y = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    assert as_xy(TensorDataset(x, y), "d")[0] is x
    with pytest.raises(TypeError, match="d must be an"):
        as_xy(x, "d")
    with pytest.raises(ValueError, match=r"d: y must have shape \(N,\)"):
        as_xy((x, y[:, None]), "d")
    with pytest.raises(TypeError, match="d: x must be floating point"):
        as_xy((y, y), "d")
    with pytest.raises(ValueError, match="non-finite"):
        as_xy((x / 0, y), "d")
    with pytest.raises(ValueError, match="pair"):
        as_xy((x, y, y), "d")
    assert as_xy((x[:0], y[:0]), "d", allow_empty=True)[0].shape == (0, 2)


def test_hyperparameter_errors(trained):
    model, forget, remain = trained
    with pytest.raises(ValueError, match="beta"):
        neggrad_plus(model, forget, remain, beta=1.5)
    with pytest.raises(ValueError, match="steps"):
        finetune(model, forget, remain, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        scrub(model, forget, remain, lr=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(model, forget, remain, optimizer="lbfgs")
    frozen = _seeded(lambda: MLP(5, 4), 0)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        finetune(frozen, forget, remain, steps=1)
