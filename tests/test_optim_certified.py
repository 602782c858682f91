"""Tests of the certified optimizers pyunlearn.optim.GradientClipping and ModelClipping."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyunlearn import certify
from pyunlearn.certify import CertificateError
from pyunlearn.ops.rng import STREAM_UPDATE, gaussian_noise
from pyunlearn.optim import GradientClipping, ModelClipping, _certified

GC_KW = dict(lr=0.1, c0=1.0, c1=0.5, delta=1e-5, steps=4, sigma=0.05, seed=7)
MC_KW = dict(lr=0.1, c2=1.5, delta=1e-5, steps=4, sigma=0.05, seed=7)
OPTIMIZERS = [(GradientClipping, GC_KW), (ModelClipping, MC_KW)]
IDS = ["gradient_clipping", "model_clipping"]


def make_params(seed: int = 0, *, dtype=torch.float64, scale: float = 1.0) -> list[torch.nn.Parameter]:
    """Three tensors of different shapes (the norms must be global over all of them)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(scale * torch.randn(shape, generator=gen, dtype=dtype))
            for shape in ((3, 4), (5,), (2, 1, 3))]


def global_norm64(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def tiny_model(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(7, 3, generator=gen)
    y = torch.randint(0, 2, (7,), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def params_of_list(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def params_of(opt) -> list[torch.Tensor]:
    return params_of_list(opt.params)


def assert_params_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ construction clip
@given(st.floats(0.05, 20.0), st.integers(0, 1000))
def test_gc_construction_clips_to_c0(c0, seed):
    params = make_params(seed, dtype=torch.float32, scale=2.0)
    before = global_norm64(params)
    GradientClipping(params, lr=0.1, c0=c0, c1=1.0, delta=1e-5, steps=1, sigma=0.0, seed=0)
    after = global_norm64(params)
    assert after <= c0 * (1 + 1e-6)
    if before > c0:
        assert after == pytest.approx(c0, rel=1e-6)


def test_gc_construction_leaves_params_inside_ball_unchanged():
    params = make_params(1, dtype=torch.float32)
    before = params_of_list(params)
    GradientClipping(params, lr=0.1, c0=global_norm64(params) * 1.01, c1=1.0, delta=1e-5, steps=1, sigma=0.0,
                     seed=0)
    assert_params_equal(params_of_list(params), before)


def test_mc_construction_clips_to_c0_default_c2():
    params = make_params(2, scale=3.0)
    ModelClipping(params, lr=0.1, c2=0.7, delta=1e-5, steps=1, sigma=0.0, seed=0)
    assert global_norm64(params) == pytest.approx(0.7, rel=1e-12)
    params = make_params(2, scale=3.0)
    ModelClipping(params, lr=0.1, c2=0.7, c0=2.0, delta=1e-5, steps=1, sigma=0.0, seed=0)
    assert global_norm64(params) == pytest.approx(2.0, rel=1e-12)


# ------------------------------------------------------------------ sigma = 0: the DESIGN formulas by hand
@pytest.mark.parametrize("grad_scale", [0.01, 10.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_gc_step_matches_design_formula(grad_scale, weight_decay):
    lr, c0, c1 = 0.2, 50.0, 1.3
    params = make_params(3)
    opt = GradientClipping(params, lr=lr, c0=c0, c1=c1, delta=1e-5, steps=2, sigma=0.0,
                           weight_decay=weight_decay, seed=0)
    x = params_of_list(params)
    gen = torch.Generator().manual_seed(4)
    grads = [grad_scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    grads[1] *= 5.0  # per-tensor norms differ a lot: per-tensor clipping would give another answer
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    factor = min(1.0, c1 / norm)
    assert (factor < 1.0) == (grad_scale > 1.0)
    expected = [xi - lr * (factor * g + weight_decay * xi) for xi, g in zip(x, grads)]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-12)
    assert opt.step_count == 1


def _mc_by_hand(x, grads, lr, weight_decay, c2):
    y = [xi - lr * (g + weight_decay * xi) for xi, g in zip(x, grads)]
    norm = math.sqrt(sum(float((t * t).sum()) for t in y))
    factor = min(1.0, c2 / norm)
    return [t * factor for t in y], norm


@pytest.mark.parametrize("grad_scale", [0.01, 10.0], ids=["inside", "projected"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_mc_step_matches_design_formula_float32(grad_scale, weight_decay):
    lr, c2 = 0.2, 4.0
    params = make_params(5, dtype=torch.float32)
    opt = ModelClipping(params, lr=lr, c2=c2, delta=1e-5, steps=2, sigma=0.0, weight_decay=weight_decay, seed=0)
    x = [p.detach().double() for p in params]
    gen = torch.Generator().manual_seed(6)
    grads = [grad_scale * torch.randn(p.shape, generator=gen) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    expected, norm = _mc_by_hand(x, [g.double() for g in grads], lr, weight_decay, c2)
    assert (norm > c2) == (grad_scale > 1.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
    assert opt.last_model_norm == pytest.approx(norm, rel=1e-5)


def test_mc_step_matches_design_formula_float64():
    lr, c2, weight_decay = 0.2, 4.0, 0.3
    params = make_params(5)
    opt = ModelClipping(params, lr=lr, c2=c2, delta=1e-5, steps=2, sigma=0.0, weight_decay=weight_decay, seed=0)
    x = params_of_list(params)
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    expected, _ = _mc_by_hand(x, grads, lr, weight_decay, c2)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_missing_grad_is_zero(cls, kw):
    a, b = make_params(8), make_params(8)
    opt_a = cls(a, **{**kw, "sigma": 0.0})
    opt_b = cls(b, **{**kw, "sigma": 0.0})
    gen = torch.Generator().manual_seed(9)
    a[0].grad = torch.randn(a[0].shape, generator=gen, dtype=torch.float64)
    b[0].grad = a[0].grad.clone()
    b[1].grad = torch.zeros_like(b[1])
    b[2].grad = torch.zeros_like(b[2])  # a[1], a[2] have grad None
    opt_a.step()
    opt_b.step()
    assert_params_equal(params_of(opt_a), params_of(opt_b))


# ------------------------------------------------------------------ noise
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_same_seed_same_params_different_seed_differs(cls, kw):
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        model = tiny_model(0)
        opt = cls(model.parameters(), **{**kw, "seed": seed, "sigma": 0.1})
        for t in range(kw["steps"]):
            train_step(model, opt, t)
        runs[name] = params_of(opt)
    assert_params_equal(runs["a"], runs["b"])
    assert not all(torch.equal(x, y) for x, y in zip(runs["a"], runs["c"]))


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_noise_moments_and_counter_based_stream(cls, kw):
    n, sigma = 100_003, 0.37
    big = {"c0": 1e9, "c1": 1e9} if cls is GradientClipping else {"c2": 1e9}
    params = [torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(5, 3))]
    opt = cls(params, **{**kw, **big, "lr": 1e-9, "sigma": sigma, "seed": 123})
    before = params_of_list(params)
    opt.step()  # every grad is None: the change is the noise alone
    diff = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).double()
    total = n + 15
    assert abs(float(diff.mean())) < 5 * sigma / math.sqrt(total)
    assert float(diff.std()) == pytest.approx(sigma, rel=0.02)
    # Element i of the noise is the counter-based normal of (seed, step 0), over the concatenated params.
    expected = sigma * gaussian_noise(total, seed=123, step=0, stream=STREAM_UPDATE).double()
    torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-6)
    # The next step draws fresh noise (step 1).
    before = params_of_list(params)
    opt.step()
    diff2 = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).double()
    expected2 = sigma * gaussian_noise(total, seed=123, step=1).double()
    torch.testing.assert_close(diff2, expected2, rtol=1e-5, atol=1e-6)
    assert float((diff2 - diff).abs().max()) > sigma


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_secure_seed_differs_between_optimizers(cls, kw):
    outs = []
    for _ in range(2):
        params = [torch.nn.Parameter(torch.zeros(64))]
        opt = cls(params, **{**kw, "seed": None, "sigma": 0.5, "steps": 1})
        opt.step()
        outs.append(params[0].detach().clone())
        assert opt.seeded is False
        cert = opt.certificate()
        assert cert.seeded is False and cert.hyperparameters["seed"] is None
        assert "secret" in " ".join(cert.assumptions)
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="not both"):
        cls([torch.nn.Parameter(torch.zeros(3))], **{**kw, "seed": 1, "secure_rng": True})


# ------------------------------------------------------------------ calibration and certificate
@pytest.mark.parametrize("epsilon", [0.3, 1.0, 2.9])
def test_gc_epsilon_calibration(epsilon):
    params = make_params(0)
    opt = GradientClipping(params, lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=5, epsilon=epsilon, seed=0)
    # Calibrated with the clip bounds inflated by the float32 slack, then rounded up to a float32 value
    # (what the fused kernels use exactly).
    slack = _certified.CLIP_SLACK
    calibrated = certify.sigma_gradient_clipping(epsilon=epsilon, delta=1e-5, steps=5, lr=0.1, c0=slack, c1=slack)
    assert opt.hyper["sigma"] == _certified.float32_up(calibrated)
    assert opt.hyper["sigma"] == float(np.float32(opt.hyper["sigma"])) >= calibrated
    for _ in range(5):
        opt.step()
    cert = opt.certificate()
    assert cert.epsilon <= epsilon
    assert cert.epsilon >= 0.999 * epsilon  # calibration is tight, not merely safe
    assert cert.delta == 1e-5 and cert.operator == "gradient_clipping"


@pytest.mark.parametrize("epsilon", [
    1.0,
    0.7,
    2.9,
])
def test_mc_epsilon_calibration(epsilon):
    params = make_params(0)
    opt = ModelClipping(params, lr=0.1, c2=1.0, delta=1e-5, steps=5, epsilon=epsilon, seed=0)
    for _ in range(5):
        opt.step()
    cert = opt.certificate()
    assert cert.epsilon <= epsilon
    assert cert.epsilon >= 0.99 * epsilon
    assert certify.delta_model_clipping(epsilon=epsilon, sigma=opt.hyper["sigma"], sigma0=0.0, steps=5, c0=1.0,
                                        c2=1.0) <= 1e-5


def test_mc_initial_noise_alone_certifies():
    params = make_params(0)
    opt = ModelClipping(params, lr=0.1, c2=1.0, delta=1e-5, steps=3, epsilon=1.0, sigma0=100.0, seed=0)
    assert opt.hyper["sigma"] == 0.0
    for _ in range(3):
        opt.step()
    assert opt.certificate().epsilon <= 1.0


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_certificate_json_round_trip_with_param_names(cls, kw):
    model = tiny_model(0)
    opt = cls(model.named_parameters(), **kw)
    for t in range(kw["steps"]):
        train_step(model, opt, t)
    cert = opt.certificate()
    assert cert.parameters == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert cert.seeded is True and cert.hyperparameters["seed"] == 7
    assert cert.hyperparameters["steps"] == kw["steps"] and cert.hyperparameters["lr"] == kw["lr"]
    assert math.isfinite(cert.epsilon) and cert.epsilon > 0
    text = cert.to_json()
    json.loads(text)
    back = certify.Certificate.from_json(text)
    assert back == cert
    # Without names: positional placeholders.
    opt2 = cls(tiny_model(0).parameters(), **{**kw, "steps": 1})
    opt2.step()
    assert opt2.certificate().parameters == ["param0", "param1", "param2", "param3"]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_certificate_refused_before_all_steps(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    with pytest.raises(CertificateError, match=f"only 0 of the {kw['steps']}"):
        opt.certificate()
    for t in range(kw["steps"] - 1):
        train_step(model, opt, t)
    with pytest.raises(CertificateError, match="only 3 of the 4"):
        opt.certificate()
    train_step(model, opt, kw["steps"] - 1)
    opt.certificate()
    with pytest.raises(RuntimeError, match="all 4 planned steps are done"):
        train_step(model, opt, kw["steps"])
    assert opt.step_count == kw["steps"]


@pytest.mark.parametrize("how", ["data", "no_grad"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_certificate_refused_after_outside_edit(cls, kw, how):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    for t in range(kw["steps"]):
        train_step(model, opt, t)
    p = model[0].weight
    if how == "data":
        p.data.add_(0.1)
    else:
        with torch.no_grad():
            p.add_(0.1)
    with pytest.raises(CertificateError, match="changed outside"):
        opt.certificate()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_step_refused_after_outside_edit_leaves_params(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    with torch.no_grad():
        model[2].bias.add_(0.1)
    snapshot = params_of(opt)
    with pytest.raises(CertificateError, match="step 1.*changed outside"):
        train_step(model, opt, 1)
    assert_params_equal(params_of(opt), snapshot)
    assert opt.step_count == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_non_finite_gradient_rejected(cls, kw, bad):
    params = make_params(0)
    opt = cls(params, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[2] = bad
    snapshot = params_of(opt)
    with pytest.raises(ValueError, match="#1.*NaN or Inf"):
        opt.step()
    assert_params_equal(params_of(opt), snapshot)
    assert opt.step_count == 0
    params[1].grad[2] = 0.0
    opt.step()  # the optimizer is still usable
    assert opt.step_count == 1


def test_non_finite_gradient_names_parameter():
    model = tiny_model(0)
    opt = GradientClipping(model.named_parameters(), **GC_KW)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2.weight'"):
        opt.step()


# ------------------------------------------------------------------ validation
GC_BAD = [
    ({"lr": 0.0}, "lr"), ({"lr": -0.1}, "lr"), ({"c0": 0.0}, "c0"), ({"c0": -1.0}, "c0"),
    ({"c1": 0.0}, "c1"), ({"c1": -2.0}, "c1"), ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"),
    ({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"sigma": -0.1}, "sigma"),
    ({"sigma": None, "epsilon": 0.0}, "epsilon"), ({"sigma": None, "epsilon": -1.0}, "epsilon"),
    ({"epsilon": 1.0}, "exactly one of sigma"), ({"sigma": None}, "exactly one of sigma"),
    ({"weight_decay": 10.0}, "lr \\* weight_decay"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": 1.5}, "seed"),
]
MC_BAD = [
    ({"lr": 0.0}, "lr"), ({"lr": -0.1}, "lr"), ({"c2": 0.0}, "c2"), ({"c0": 0.0}, "c0"),
    ({"c0": -1.0}, "c0"), ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"steps": 0}, "steps"),
    ({"sigma": -0.1}, "sigma"), ({"sigma0": -0.1}, "sigma0"),
    ({"sigma": None, "epsilon": 0.0}, "epsilon"), ({"sigma": None, "epsilon": -1.0}, "epsilon"),
    ({"sigma": None}, "sigma= .* or epsilon="), ({"weight_decay": 10.0}, "lr \\* weight_decay"),
    ({"seed": -1}, "seed"),
]


@pytest.mark.parametrize("override,match", GC_BAD)
def test_gc_invalid_hyperparameters(override, match):
    with pytest.raises(ValueError, match=match):
        GradientClipping(make_params(0), **{**GC_KW, **override})


@pytest.mark.parametrize("override,match", MC_BAD)
def test_mc_invalid_hyperparameters(override, match):
    with pytest.raises(ValueError, match=match):
        ModelClipping(make_params(0), **{**MC_KW, **override})


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_invalid_parameter_sets(cls, kw):
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([], **kw)
    with pytest.raises(TypeError, match="floating point"):
        cls([torch.zeros(3, dtype=torch.int64)], **kw)
    a, b = make_params(0)[:2]
    with pytest.raises(ValueError, match="one parameter group"):
        cls([{"params": [a]}, {"params": [b]}], **kw)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_add_param_group_after_construction_raises(cls, kw):
    params = make_params(0)
    opt = cls(params[:2], **kw)
    with pytest.raises(RuntimeError, match="cannot take new parameters"):
        opt.add_param_group({"params": [params[2]]})
    assert len(opt.param_groups) == 1 and len(opt.params) == 2


# ------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_state_dict_resume_is_bit_identical(cls, kw, k):
    kw = {**kw, "steps": 5, "sigma0": 0.02} if cls is ModelClipping else {**kw, "steps": 5}
    # Uninterrupted run.
    ref_model = tiny_model(0)
    ref_opt = cls(ref_model.named_parameters(), **kw)
    for t in range(5):
        train_step(ref_model, ref_opt, t)
    ref_cert = ref_opt.certificate()

    # Interrupted after k steps: checkpoint the model and the optimizer.
    model = tiny_model(0)
    opt = cls(model.named_parameters(), **kw)
    for t in range(k):
        train_step(model, opt, t)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    del model, opt

    # Resume into a NEW model (different init). Order matters: (1) construct the optimizer (its
    # construction clips / perturbs the fresh parameters), (2) load the model state, overwriting them,
    # (3) load the optimizer state, which checks the parameters match the checkpoint's fingerprint.
    new_model = tiny_model(1)
    new_opt = cls(new_model.named_parameters(), **kw)
    new_model.load_state_dict(model_state)
    new_opt.load_state_dict(opt_state)
    assert new_opt.step_count == k
    for t in range(k, 5):
        train_step(new_model, new_opt, t)
    for (n, p), (n_ref, p_ref) in zip(new_model.named_parameters(), ref_model.named_parameters()):
        assert n == n_ref
        assert torch.equal(p, p_ref), n
    cert = new_opt.certificate()
    assert cert.epsilon == ref_cert.epsilon
    assert cert.to_dict() == ref_cert.to_dict()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_load_state_dict_restores_seed(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    model_state = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    new_model = tiny_model(1)
    other = cls(new_model.parameters(), **{**kw, "seed": None})
    assert other.seeded is False
    new_model.load_state_dict(model_state)
    other.load_state_dict(state)
    assert other.seed == kw["seed"] and other.seeded is True and other.step_count == 1


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_load_state_dict_mismatches(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    state = copy.deepcopy(opt.state_dict())
    model_state = copy.deepcopy(model.state_dict())

    def fresh(**override):
        m = tiny_model(0)
        o = cls(m.parameters(), **{**kw, **override})
        m.load_state_dict(model_state)
        return o

    with pytest.raises(ValueError, match="differ.*lr"):
        fresh(lr=kw["lr"] * 2).load_state_dict(state)
    with pytest.raises(ValueError, match="differ.*sigma"):
        fresh(sigma=kw["sigma"] * 2).load_state_dict(state)
    with pytest.raises(ValueError, match="differ.*steps/delta"):
        fresh(steps=kw["steps"] + 1).load_state_dict(state)
    other_cls, other_kw = OPTIMIZERS[1] if cls is GradientClipping else OPTIMIZERS[0]
    with pytest.raises(ValueError, match="operator"):
        other_cls(tiny_model(0).parameters(), **other_kw).load_state_dict(state)
    with pytest.raises(ValueError, match="missing the 'certified' entry"):
        fresh().load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    # Optimizer state loaded before the model state: the parameters do not match the checkpoint.
    m = tiny_model(3)
    o = cls(m.parameters(), **kw)
    with pytest.raises(CertificateError, match="load_state_dict"):
        o.load_state_dict(state)
    # A matching one loads.
    o = fresh()
    o.load_state_dict(state)
    assert o.step_count == 1


def test_secret_seed_never_leaves_the_process():
    params = make_params(0)
    opt = GradientClipping(params, lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=3, sigma=0.5)  # OS-entropy seed
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    assert state["certified"]["seed"] is None and state["certified"]["seeded"] is False
    assert str(opt.seed) not in json.dumps(state, default=str)
    saved = [p.detach().clone() for p in params]
    fresh = GradientClipping(params, lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=3, sigma=0.5)
    with torch.no_grad():  # the documented order: optimizer, then model state, then optimizer state
        for p, v in zip(params, saved):
            p.copy_(v)
    fresh.load_state_dict(state)
    assert fresh.step_count == 1 and not fresh.seeded and fresh.seed != opt.seed  # fresh secret noise


def test_gradients_from_before_construction_are_dropped():
    params = make_params(0)
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # taken at the unprojected model
    GradientClipping(params, lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=1, sigma=0.0, seed=0)
    assert all(p.grad is None for p in params)


def test_duplicate_parameters_are_refused():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
        GradientClipping([p, p], lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=1, sigma=0.0, seed=0)
