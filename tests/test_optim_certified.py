"""Tests of the certified optimizers pyunlearn.optim.GradientClipping and ModelClipping."""
from __future__ import annotations

import copy
import functools
import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from backends import BACKENDS, device_of, forced
from pyunlearn import certify
from pyunlearn.certify import CertificateError
from pyunlearn.ops import rng
from pyunlearn.ops.rng import STREAM_UPDATE, gaussian_noise, key_from_seed
from pyunlearn.optim import GradientClipping, ModelClipping, _certified

# sigma = 1 keeps the certificates' epsilon moderate (~5.8 / ~5.4): at a large epsilon the sampler's share of
# delta, (1 + e^eps) T d 2^-62, exceeds 10% of delta and the certificate is refused.
GC_KW = dict(lr=0.1, c0=1.0, c1=0.5, delta=1e-5, steps=4, sigma=1.0, seed=7)
MC_KW = dict(lr=0.1, c2=1.5, delta=1e-5, steps=4, sigma=1.0, seed=7)
OPTIMIZERS = [(GradientClipping, GC_KW), (ModelClipping, MC_KW)]
IDS = ["gradient_clipping", "model_clipping"]
#: Clip bounds so large that nothing is clipped or projected: a step with zero gradients adds the noise alone.
NO_CLIP = {GradientClipping: {"c0": 1e9, "c1": 1e9}, ModelClipping: {"c2": 1e9}}


def make_params(seed: int = 0, *, dtype=torch.float64, scale: float = 1.0, device="cpu") -> list[torch.nn.Parameter]:
    """Three tensors of different shapes (the norms must be global over all of them)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((scale * torch.randn(shape, generator=gen, dtype=dtype)).to(device))
            for shape in ((3, 4), (5,), (2, 1, 3))]


def zero_grads(params) -> None:
    """Explicit zero gradients: a step then adds the noise alone (a step without any gradient is refused)."""
    for p in params:
        p.grad = torch.zeros_like(p)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (so that -0.0 != 0.0 and NaN payloads count)."""
    return t.detach().cpu().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def assert_bits_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(bits(x), bits(y))


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


def random_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)


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
    if factor == 1.0:  # sigma = 0 without clipping is exact: x - lr (g + wd x) in float64, no noise term at all
        assert_bits_equal(params, [xi - lr * (g + weight_decay * xi) for xi, g in zip(x, grads)])


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


def test_mc_sigma0_zero_step_inside_ball_is_exact():
    lr, c2, weight_decay = 0.2, 40.0, 0.3
    params = make_params(5)
    opt = ModelClipping(params, lr=lr, c2=c2, delta=1e-5, steps=1, sigma=0.0, weight_decay=weight_decay, seed=0)
    x = params_of_list(params)
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert opt.last_model_norm < c2  # sigma = 0 inside the ball is exact: x - lr (g + wd x) in float64, no noise
    assert_bits_equal(params, [xi - lr * (g + weight_decay * xi) for xi, g in zip(x, grads)])


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


def _noise_step(cls, kw, params, *, sigma: float, seed, steps: int = 2):
    """An optimizer over ``params`` whose steps (with zero gradients, nothing clipped) add the noise alone."""
    return cls(params, **{**kw, **NO_CLIP[cls], "lr": 0.1, "weight_decay": 0.0, "sigma": sigma, "seed": seed,
                          "steps": steps})


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().cpu().reshape(-1) for p in params])


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_noise_moments_and_counter_based_stream(cls, kw):
    n, seed = 20_000, 123
    params = [torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(5, 3))]
    opt = _noise_step(cls, kw, params, sigma=0.37, seed=seed)
    sigma = opt.hyper["sigma"]  # 0.37 rounded up to float32
    assert sigma == float(np.float32(sigma)) >= 0.37
    total = n + 15
    zero_grads(params)
    opt.step()
    diff = _flat(params).double()
    assert abs(float(diff.mean())) < 5 * sigma / math.sqrt(total)
    assert float(diff.std()) == pytest.approx(sigma, rel=0.02)
    # Element i is round(0 + sigma * z_i) with z the float64 ChaCha20 normals of (the operator's key, step 0)
    # over the concatenated params: exactly, since the centre is exact (zero gradients, nothing clipped);
    # values within 2^-7 sigma of 0 on the release grid (rng.snap).
    key = key_from_seed(seed, cls.operator)
    z0 = gaussian_noise(total, key=key, step=0, stream=STREAM_UPDATE)
    assert z0.dtype == torch.float64
    assert torch.equal(_flat(params), rng.snap(0.0 + sigma * z0, sigma, torch.float32))
    # The next step draws fresh noise (step 1), again added to the centre in float64 and rounded once.
    centre = _flat(params).double()
    zero_grads(params)
    opt.step()
    z1 = gaussian_noise(total, key=key, step=1)
    assert torch.equal(_flat(params), rng.snap(centre + sigma * z1, sigma, torch.float32))
    assert float((z1 - z0).abs().max()) > 1.0


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_zero_gradient_noise_is_seed_deterministic(cls, kw):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        params = [torch.nn.Parameter(torch.zeros(2000))]
        opt = _noise_step(cls, kw, params, sigma=0.5, seed=seed)
        for _ in range(2):
            zero_grads(params)
            opt.step()
        runs[name] = _flat(params)
    assert torch.equal(runs["a"], runs["b"])
    assert (runs["a"] != runs["c"]).float().mean() > 0.99


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_centre_plus_sigma_z_rounded_once_on_every_backend(backend, cls, kw):
    """float32 parameters: x <- fl32(float64(centre) + sigma * z), z identical on every backend."""
    device, seed = device_of(backend), 99
    interpreted = backend == "triton" and device.type == "cpu"  # ~1 s a step: small and one step
    with forced(backend):
        params = make_params(3, dtype=torch.float32, device=device)
        if not interpreted:
            params.append(torch.nn.Parameter(torch.randn(1031, generator=torch.Generator().manual_seed(4)).to(device)))
        opt = _noise_step(cls, kw, params, sigma=0.3, seed=seed)
        sigma, key, total = opt.hyper["sigma"], key_from_seed(seed, cls.operator), sum(p.numel() for p in params)
        for step in range(1 if interpreted else 2):
            centre = _flat(params).double()  # zero gradients, no weight decay, nothing clipped: the centre is x
            zero_grads(params)
            opt.step()
            z = gaussian_noise(total, key=key, step=step)
            assert torch.equal(bits(_flat(params)), bits(rng.snap(centre + sigma * z, sigma, torch.float32))), step


def test_operators_from_one_seed_use_different_keys():
    n, seed = 4096, 5
    noise = {}
    for cls, kw in OPTIMIZERS:
        params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))]
        opt = _noise_step(cls, kw, params, sigma=1.0, seed=seed)
        zero_grads(params)
        opt.step()
        noise[cls] = _flat(params)
        z = gaussian_noise(n, key=key_from_seed(seed, cls.operator), step=0)
        assert torch.equal(noise[cls], rng.snap(0.0 + 1.0 * z, 1.0, torch.float64))  # float64 release grid
    a, b = noise[GradientClipping], noise[ModelClipping]
    assert (a != b).double().mean() > 0.99
    assert abs(float(np.corrcoef(a.numpy(), b.numpy())[0, 1])) < 5 / math.sqrt(n)  # unrelated, not shifted


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_secure_seed_differs_between_optimizers(cls, kw):
    outs = []
    for _ in range(2):
        params = [torch.nn.Parameter(torch.zeros(64))]
        opt = cls(params, **{**kw, "seed": None, "sigma": 2.0, "steps": 1})
        zero_grads(params)
        opt.step()
        outs.append(params[0].detach().clone())
        assert opt.seeded is False and opt.seed is None
        cert = opt.certificate()
        assert cert.seeded is False and cert.secret is True and cert.hyperparameters["seed"] is None
        assert "256-bit noise key drawn from the operating system's entropy" in " ".join(cert.assumptions)
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="not both"):
        cls([torch.nn.Parameter(torch.zeros(3))], **{**kw, "seed": 1, "secure_rng": True})


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_certificate_first_line_says_whether_the_noise_is_secret(cls, kw):
    lines = {}
    for seed in (3, None):
        model = tiny_model(0)
        opt = cls(model.parameters(), **{**kw, "seed": seed})
        for t in range(kw["steps"]):
            train_step(model, opt, t)
        cert = opt.certificate()
        lines[seed] = str(cert).splitlines()[0]
        assert cert.secret is (seed is None)
    assert lines[3] == "secret: false"
    assert lines[None] == "secret: true"


# ------------------------------------------------------------------ calibration and certificate
@pytest.mark.parametrize("epsilon", [0.3, 1.0, 2.9])
def test_gc_epsilon_calibration(epsilon):
    params = make_params(0)
    opt = GradientClipping(params, lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=5, epsilon=epsilon, seed=0)
    # Calibrated with the clip bounds inflated by the float32 slack, at delta minus the sampler's share
    # (23 coordinates, 5 draws), then rounded up to a float32 value (what the fused kernels use exactly).
    slack = _certified.CLIP_SLACK
    share = rng.noise_tv_bound(coordinates=23, steps=5, epsilon=epsilon)
    calibrated = certify.sigma_gradient_clipping(epsilon=epsilon, delta=1e-5 - share, steps=5, lr=0.1, c0=slack,
                                                 c1=slack)
    assert opt.hyper["sigma"] == _certified.float32_up(calibrated)
    assert opt.hyper["sigma"] == float(np.float32(opt.hyper["sigma"])) >= calibrated
    for t in range(5):
        random_grads(params, t)
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
    for t in range(5):
        random_grads(params, t)
        opt.step()
    cert = opt.certificate()
    assert cert.epsilon <= epsilon
    assert cert.epsilon >= 0.99 * epsilon
    slack = _certified.CLIP_SLACK
    assert 0 < cert.noise_delta == rng.noise_tv_bound(coordinates=23, steps=5, epsilon=cert.epsilon)
    assert certify.delta_model_clipping(epsilon=cert.epsilon, sigma=opt.hyper["sigma"], sigma0=0.0, steps=5,
                                        c0=slack, c2=slack) + cert.noise_delta <= 1e-5


def test_mc_initial_noise_alone_certifies():
    params = make_params(0)
    opt = ModelClipping(params, lr=0.1, c2=1.0, delta=1e-5, steps=3, epsilon=1.0, sigma0=100.0, seed=0)
    assert opt.hyper["sigma"] == 0.0
    for t in range(3):
        random_grads(params, t)
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
    model2 = tiny_model(0)
    opt2 = cls(model2.parameters(), **{**kw, "steps": 1})
    train_step(model2, opt2, 0)
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gradient_refused_before_the_first_write(backend, cls, kw, bad):
    """float32 parameters on each backend's device: the fused step's norm pass sees the bad value before it
    writes anything; the error names the parameter and the parameters keep their exact bits."""
    device = device_of(backend)
    with forced(backend):
        params = make_params(0, dtype=torch.float32, device=device)
        opt = cls(list(zip(["enc", "dec.weight", "dec.bias"], params)), **{**kw, "sigma": 0.5})
        before = params_of_list(params)
        for p in params:
            p.grad = torch.ones_like(p)
        params[1].grad[3] = bad
        with pytest.raises(ValueError, match="'dec.weight' contains NaN or Inf.*parameters are unchanged"):
            opt.step()
        assert_bits_equal(params, before)
        assert opt.step_count == 0
        with pytest.raises(CertificateError, match="only 0 of the 4"):
            opt.certificate()


# ------------------------------------------------------------------ frozen hyper-parameters
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_lr_scheduler_is_refused(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    with pytest.raises(RuntimeError, match="fixed at construction; refusing to set 'initial_lr'.*LR scheduler"):
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    assert "initial_lr" not in opt.param_groups[0] and opt.param_groups[0]["lr"] == kw["lr"]
    train_step(model, opt, 0)  # the optimizer is intact
    assert opt.step_count == 1


WRITES = {
    "setitem": lambda g: g.__setitem__("sigma", 0),
    "update": lambda g: g.update(sigma=0),
    "setdefault new key": lambda g: g.setdefault("momentum", 0.9),
    "delitem": lambda g: g.__delitem__("sigma"),
    "pop": lambda g: g.pop("sigma"),
    "ior": lambda g: g.__ior__({"sigma": 0}),
    "params": lambda g: g.__setitem__("params", []),
}


@pytest.mark.parametrize("how", list(WRITES), ids=list(WRITES))
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_param_group_writes_are_refused(cls, kw, how):
    opt = cls(make_params(0), **kw)
    group = opt.param_groups[0]
    hyper = dict(group)
    key = {"setdefault new key": "momentum", "params": "params"}.get(how, "sigma")
    with pytest.raises(RuntimeError, match=f"fixed at construction; refusing to set '{key}'"):
        WRITES[how](group)
    assert dict(group) == hyper


BYPASSES = {
    "dict.__setitem__ lr": ("lr", lambda opt: dict.__setitem__(opt.param_groups[0], "lr", 0.5)),
    "dict.__setitem__ sigma": ("sigma", lambda opt: dict.__setitem__(opt.param_groups[0], "sigma", 0.0)),
    "dict.__setitem__ initial_lr": ("initial_lr",
                                    lambda opt: dict.__setitem__(opt.param_groups[0], "initial_lr", 0.1)),
    "group replaced": ("lr", lambda opt: opt.param_groups.__setitem__(0, {**opt.param_groups[0], "lr": 0.5})),
}


@pytest.mark.parametrize("how", list(BYPASSES), ids=list(BYPASSES))
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_write_bypassing_the_frozen_group_is_caught_at_the_next_step(cls, kw, how):
    key, bypass = BYPASSES[how]
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    bypass(opt)
    snapshot = params_of(opt)
    with pytest.raises(RuntimeError, match=f"step 1: hyper-parameter\\(s\\) \\['{key}'\\]"):
        train_step(model, opt, 1)
    assert_bits_equal(params_of(opt), snapshot)
    assert opt.step_count == 1


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_write_bypassing_the_frozen_group_refuses_the_certificate(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **{**kw, "steps": 1})
    train_step(model, opt, 0)
    dict.__setitem__(opt.param_groups[0], "sigma", 100.0)  # would claim a far smaller epsilon
    with pytest.raises(RuntimeError, match=r"certificate: hyper-parameter\(s\) \['sigma'\]"):
        opt.certificate()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_changed_parameter_list_is_refused(cls, kw):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(3)))  # the list itself, in place
    with pytest.raises(RuntimeError, match="parameter list .* was changed after construction"):
        train_step(model, opt, 1)
    assert opt.step_count == 1


# ------------------------------------------------------------------ replaced or tampered parameters
@pytest.mark.parametrize("storage", ["copied", "shared"])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_parameters_replaced_by_assign_are_refused(cls, kw, storage):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    state = model.state_dict()
    if storage == "copied":  # e.g. a checkpoint read from disk
        state = {k: v.clone() for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    assert all(p is not q for p, q in zip(model.parameters(), opt.params))
    before, held = params_of_list(model.parameters()), params_of(opt)
    with pytest.raises(CertificateError, match="no certified parameter received a gradient in step 1.*assign=True"):
        train_step(model, opt, 1)  # zero_grad, forward, backward (into the new tensors), step
    assert_bits_equal(params_of_list(model.parameters()), before)
    assert_bits_equal(params_of(opt), held)
    assert opt.step_count == 1


def _flip(p: torch.Tensor) -> None:
    p.data.copy_(p.data.flip(0))


def _permute(p: torch.Tensor) -> None:
    flat = p.data.view(-1)
    flat.copy_(flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))])


def _one_ulp(p: torch.Tensor) -> None:
    flat = p.data.view(-1)
    i = int(flat.abs().argmax())
    flat[i] = torch.nextafter(flat[i], torch.tensor(math.inf, dtype=flat.dtype))


TAMPERS = {"flip": _flip, "permutation": _permute, "one ulp": _one_ulp}


@pytest.mark.parametrize("how", list(TAMPERS), ids=list(TAMPERS))
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_permutation_or_one_ulp_is_detected_at_the_next_step(cls, kw, how):
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    weight = model[0].weight  # (5, 3) float32
    old = weight.detach().clone()
    TAMPERS[how](weight)
    assert not torch.equal(weight, old)
    if how != "one ulp":  # the same multiset of values: the sum and the norm did not move
        assert torch.equal(weight.detach().reshape(-1).sort().values, old.reshape(-1).sort().values)
    snapshot = params_of(opt)
    with pytest.raises(CertificateError, match="step 1: the certified parameters were changed outside"):
        train_step(model, opt, 1)
    assert_bits_equal(params_of(opt), snapshot)
    assert opt.step_count == 1


@pytest.mark.parametrize("how", list(TAMPERS), ids=list(TAMPERS))
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_permutation_or_one_ulp_is_detected_at_certificate(cls, kw, how):
    model = tiny_model(0)
    opt = cls(model.parameters(), **{**kw, "steps": 1})
    train_step(model, opt, 0)
    TAMPERS[how](model[2].weight)  # (2, 5)
    with pytest.raises(CertificateError, match="certificate: the certified parameters were changed outside"):
        opt.certificate()


# ------------------------------------------------------------------ the sampler's share of delta
@given(coordinates=st.integers(0, 10**9), steps=st.integers(0, 10**6), epsilon=st.floats(0.0, 60.0),
       more=st.integers(1, 10**6))
def test_noise_tv_bound_is_monotone(coordinates, steps, epsilon, more):
    bound = rng.noise_tv_bound(coordinates=coordinates, steps=steps, epsilon=epsilon)
    assert bound == pytest.approx((1 + math.exp(epsilon)) * steps * coordinates * 2.0 ** -62, rel=1e-12)
    wider = rng.noise_tv_bound(coordinates=coordinates + more, steps=steps, epsilon=epsilon)
    longer = rng.noise_tv_bound(coordinates=coordinates, steps=steps + more, epsilon=epsilon)
    looser = rng.noise_tv_bound(coordinates=coordinates, steps=steps, epsilon=epsilon + 1.0)
    assert wider >= bound and longer >= bound and looser >= bound
    if steps > 0:
        assert wider > bound
    if coordinates > 0:
        assert longer > bound
    if steps > 0 and coordinates > 0:
        assert looser > bound


def test_gc_refused_at_construction_when_the_sampler_takes_over_a_tenth_of_delta():
    d, steps, delta = 10_000, 100, 1e-24
    # At the target epsilon = 1 the share is (1 + e) * 100 * 10^4 * 2^-62 = 8.06e-13 (even at epsilon = 0 it
    # is 4.3e-13), far above 10% of delta = 1e-25.
    share = rng.noise_tv_bound(coordinates=d, steps=steps, epsilon=1.0)
    assert share == pytest.approx((1 + math.e) * 1e6 * 2.0 ** -62) and share > 1e11 * delta
    params = [torch.nn.Parameter(torch.full((d,), 0.02))]  # norm 2 > c0: construction would project
    before = params_of_list(params)
    for cls, extra in ((GradientClipping, dict(c0=1.0, c1=1.0)), (ModelClipping, dict(c2=1.0))):
        with pytest.raises(CertificateError, match=re.escape(f"adds {share:.3g} to delta, more than 10% of delta "
                                                             "= 1e-24")):
            cls(params, lr=0.1, delta=delta, steps=steps, epsilon=1.0, seed=0, **extra)
        assert_bits_equal(params, before)  # refused before the projection


def test_gc_share_limit_is_ten_percent_exactly():
    d, steps, epsilon = 1000, 10, 1.0
    share = rng.noise_tv_bound(coordinates=d, steps=steps, epsilon=epsilon)
    kw = dict(lr=0.1, c0=1.0, c1=1.0, steps=steps, epsilon=epsilon, seed=0)
    GradientClipping([torch.nn.Parameter(torch.zeros(d))], delta=10 * share * (1 + 1e-9), **kw)
    with pytest.raises(CertificateError, match="more than 10% of delta"):
        GradientClipping([torch.nn.Parameter(torch.zeros(d))], delta=10 * share * (1 - 1e-9), **kw)


def test_gc_with_fixed_sigma_refuses_the_certificate_when_the_share_is_too_large():
    params = [torch.nn.Parameter(torch.zeros(1000))]
    opt = GradientClipping(params, lr=0.1, c0=1.0, c1=1.0, delta=1e-24, steps=3, sigma=2.0, seed=0)
    for _ in range(3):
        zero_grads(params)
        opt.step()
    with pytest.raises(CertificateError, match="more than 10% of delta"):
        opt.certificate()


@pytest.mark.parametrize("calibrate", [True, False], ids=["epsilon", "sigma"])
def test_gc_certificate_accounts_the_sampler_share(calibrate):
    lr, c0, c1, wd, delta, steps = 0.1, 1.0, 0.7, 0.2, 1e-5, 5
    params = make_params(1)
    noise = dict(epsilon=1.5) if calibrate else dict(sigma=1.2)
    opt = GradientClipping(params, lr=lr, c0=c0, c1=c1, weight_decay=wd, delta=delta, steps=steps, seed=0, **noise)
    for t in range(steps):
        random_grads(params, t)
        opt.step()
    cert = opt.certificate()
    assert 0.0 < cert.noise_delta <= 0.1 * delta and cert.delta == delta
    assert cert.noise_delta == rng.noise_tv_bound(coordinates=23, steps=steps, epsilon=cert.epsilon)
    # The analysis at delta - noise_delta (clip bounds with the float32 slack) proves the certified epsilon.
    slack = _certified.CLIP_SLACK
    analysed = certify.epsilon_gradient_clipping(sigma=opt.hyper["sigma"], delta=delta - cert.noise_delta,
                                                 steps=steps, lr=lr, c0=c0 * slack, c1=c1 * slack, weight_decay=wd)
    assert analysed <= cert.epsilon <= analysed * (1 + 1e-9)
    if calibrate:
        assert cert.epsilon <= 1.5
    assert "delta includes" in str(cert)


def test_mc_certificate_counts_the_initial_noise_draw():
    params = make_params(1)
    opt = ModelClipping(params, lr=0.1, c2=1.0, delta=1e-5, steps=3, sigma=1.0, sigma0=0.5, seed=0)
    for t in range(3):
        random_grads(params, t)
        opt.step()
    cert = opt.certificate()
    assert 0.0 < cert.noise_delta <= 0.1 * cert.delta
    assert cert.noise_delta == rng.noise_tv_bound(coordinates=23, steps=4, epsilon=cert.epsilon)
    slack = _certified.CLIP_SLACK
    assert certify.delta_model_clipping(epsilon=cert.epsilon, sigma=opt.hyper["sigma"], sigma0=opt.hyper["sigma0"],
                                        steps=3, c0=slack, c2=slack) + cert.noise_delta <= cert.delta


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


@functools.lru_cache(maxsize=None)
def _cached_checkpoint(cls, items: tuple, k: int):
    model = tiny_model(0)
    opt = cls(model.parameters(), **dict(items))
    for t in range(k):
        train_step(model, opt, t)
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _checkpoint(cls, kw, k: int = 1):
    """(model state, optimizer state) of a run interrupted after ``k`` steps (a fresh copy of a cached run:
    seeded runs are deterministic, and a secret-noise run is just one more secret-noise run)."""
    return copy.deepcopy(_cached_checkpoint(cls, tuple(sorted(kw.items())), k))


def _resumer(cls, kw, model_state, **override):
    """A new optimizer over a new model that holds the checkpointed parameters (the documented order:
    optimizer, then model state, then optimizer state)."""
    model = tiny_model(1)
    opt = cls(model.parameters(), **{**kw, **override})
    model.load_state_dict(model_state)
    return model, opt


@pytest.mark.parametrize("saved_seed,resume_seed,match", [
    (7, 8, "run with seed 7; this optimizer has seed 8"),
    (7, None, "run with seed 7; this optimizer has secret noise"),
    (None, 7, "run with secret noise; this optimizer has seed 7"),
])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_load_state_dict_refuses_other_noise(cls, kw, saved_seed, resume_seed, match):
    model_state, state = _checkpoint(cls, {**kw, "seed": saved_seed})
    model, opt = _resumer(cls, kw, model_state, seed=resume_seed)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert opt.step_count == 0 and opt.seed == resume_seed and opt.seeded is (resume_seed is not None)
    # The same noise (same seed, or again secret) loads.
    model, opt = _resumer(cls, kw, model_state, seed=saved_seed)
    opt.load_state_dict(state)
    assert opt.step_count == 1 and opt.seed == saved_seed


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_load_state_dict_mismatches(cls, kw):
    model_state, state = _checkpoint(cls, kw)

    def fresh(**override):
        return _resumer(cls, kw, model_state, **override)[1]

    with pytest.raises(ValueError, match=r"another run: hyper: saved \{'lr': 0.1, .*here \{'lr': 0.2, "):
        fresh(lr=kw["lr"] * 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"another run: hyper: saved .*'sigma': 1.0.*here .*'sigma': 2.0"):
        fresh(sigma=kw["sigma"] * 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"another run: hyper: saved .*'weight_decay': 0.0.*here .*'weight_decay': 0.1"):
        fresh(weight_decay=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="another run: steps: saved 4, here 5"):
        fresh(steps=kw["steps"] + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="another run: delta: saved 1e-05, here 2e-05"):
        fresh(delta=2e-5).load_state_dict(state)
    other_cls, other_kw = OPTIMIZERS[1] if cls is GradientClipping else OPTIMIZERS[0]
    with pytest.raises(ValueError, match="operator"):
        other_cls(tiny_model(0).parameters(), **other_kw).load_state_dict(state)
    with pytest.raises(ValueError, match="missing the 'certified' entry"):
        fresh().load_state_dict(torch.optim.SGD(tiny_model(0).parameters(), lr=0.1).state_dict())
    # Optimizer state loaded before the model state: the parameters do not match the checkpoint.
    m = tiny_model(3)
    o = cls(m.parameters(), **kw)
    with pytest.raises(CertificateError, match="load_state_dict"):
        o.load_state_dict(state)
    assert o.step_count == 0
    # A matching one loads.
    o = fresh()
    o.load_state_dict(state)
    assert o.step_count == 1


def _set(path, value):
    def edit(body):
        *head, last = path
        for k in head:
            body = body[k]
        body[last] = value(body[last]) if callable(value) else value
    return edit


STATE_EDITS = {
    "step_count=steps": _set(["step_count"], 4),
    "step_count+1": _set(["step_count"], lambda v: v + 1),
    "step_count=0": _set(["step_count"], 0),
    "identity.hyper.lr": _set(["identity", "hyper", "lr"], 0.5),
    "identity.hyper.sigma": _set(["identity", "hyper", "sigma"], lambda v: v / 2),
    "identity.steps": _set(["identity", "steps"], 100),
    "identity.delta": _set(["identity", "delta"], 1e-3),
    "identity.seed": _set(["identity", "seed"], 8),
    "identity.seeded": _set(["identity", "seeded"], False),
    "identity.param_shapes": _set(["identity", "param_shapes"], lambda v: v[::-1]),
    "fingerprint": _set(["fingerprint"], lambda v: [v[0] * (1 + 1e-9), v[1]]),
    "fp_key": _set(["fp_key"], lambda v: [v[0] ^ 1, v[1]]),
    "tag": _set(["tag"], lambda v: "0" * len(v)),
    "tag removed": lambda body: body.pop("tag"),
    "identity removed": lambda body: body.pop("identity"),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS), ids=list(STATE_EDITS))
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_edited_state_dict_is_refused(cls, kw, edit):
    model_state, state = _checkpoint(cls, kw, k=2)
    STATE_EDITS[edit](state["certified"])
    model, opt = _resumer(cls, kw, model_state)
    with pytest.raises(ValueError, match="modified or truncated"):
        opt.load_state_dict(state)
    assert opt.step_count == 0
    with pytest.raises(CertificateError, match="only 0 of the 4"):
        opt.certificate()


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_state_dict_is_a_snapshot(cls, kw):
    """Editing a returned state_dict changes neither the optimizer nor its later state_dicts."""
    model = tiny_model(0)
    opt = cls(model.parameters(), **kw)
    train_step(model, opt, 0)
    state = opt.state_dict()
    pristine = copy.deepcopy(state)
    state["certified"]["identity"]["hyper"]["lr"] = 0.5
    state["certified"]["identity"]["param_shapes"][0][0] = 99
    state["certified"]["fingerprint"][0] = 0.0
    state["certified"]["fp_key"][0] ^= 1
    state["param_groups"][0]["sigma"] = 0.0
    for t in range(1, kw["steps"]):
        train_step(model, opt, t)
    opt.certificate()
    assert opt.param_groups[0]["lr"] == kw["lr"]
    fresh = cls(tiny_model(0).parameters(), **kw)
    assert fresh.state_dict()["certified"]["identity"] == pristine["certified"]["identity"]


def test_secret_seed_never_leaves_the_process():
    params = make_params(0)
    kw = dict(lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=3, sigma=0.5)  # secret key from the OS
    opt = GradientClipping(params, **kw)
    assert opt.seed is None and opt.seeded is False
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    identity = state["certified"]["identity"]
    assert identity["seed"] is None and identity["seeded"] is False
    text = json.dumps(state, default=str)
    integers = set(re.findall(r"(?<![\d.eE+-])\d+(?![\d.eE])", text))
    assert not integers & {str(w) for w in opt._key}  # no word of the noise key
    saved = params_of_list(params)

    def resumed():
        fresh = GradientClipping(params, **kw)
        with torch.no_grad():  # the documented order: optimizer, then model state, then optimizer state
            for p, v in zip(params, saved):
                p.copy_(v)
        fresh.load_state_dict(state)
        assert fresh.step_count == 1 and not fresh.seeded and fresh.seed is None
        zero_grads(params)
        fresh.step()
        return params_of_list(params)

    # Each resumed run draws its own fresh secret noise: two resumptions from one checkpoint differ.
    first, second = resumed(), resumed()
    assert all((a != b).all() for a, b in zip(first, second))


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
