"""Tests of pyunlearn.optim.dpsgd.DPSGD: arithmetic, noise, checkpoints, accounting, Opacus equality."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pyunlearn.ops import gaussian_noise
from pyunlearn.optim.dpsgd import DPSGD, RDP_ORDERS, group_privacy
from pyunlearn.per_sample import PerSampleGradients, clip_factor

DT = torch.float64


def small_model(seed: int = 0, dtype=DT) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).to(dtype)


def batch(seed: int, n: int = 5, dtype=DT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_sum(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def dp_step(model, psg, opt, x, y, c):
    opt.zero_grad()
    loss_sum(model, x, y).backward()
    psg.clipped_sum_(c)
    opt.step()


def hand_clipped_sum(model, x, y, c) -> dict[str, torch.Tensor]:
    """Σ_i clip(g_i, C) from a one-sample loop, Opacus' factor."""
    names = [n for n, _ in model.named_parameters()]
    rows = [torch.autograd.grad(loss_sum(model, x[i:i + 1], y[i:i + 1]), list(model.parameters()))
            for i in range(x.shape[0])]
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in r)) for r in rows])
    factor = clip_factor(norms, c)
    return {n: sum(factor[i] * rows[i][k] for i in range(len(rows))) for k, n in enumerate(names)}


# ------------------------------------------------------------------------------------- arithmetic
@given(st.integers(0, 1000), st.floats(0.05, 2.0), st.floats(0.0, 0.5), st.sampled_from([1, 4, 7]),
       st.floats(0.01, 5.0))
def test_noiseless_step_equals_hand_written_update(seed, lr, wd, n, c):
    model = small_model(seed)
    x, y = batch(seed, n)
    clipped = hand_clipped_sum(model, x, y, c)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ebs = n + 2.5
    with PerSampleGradients(model) as psg:
        opt = DPSGD(model.parameters(), lr=lr, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=ebs,
                    weight_decay=wd, seed=seed)
        dp_step(model, psg, opt, x, y, c)
    for k, p in model.named_parameters():
        want = before[k] - lr * (clipped[k] / ebs + wd * before[k])
        # the update op accumulates in float32 (also for float64 parameters)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    assert opt.steps_taken == 1


def test_param_groups_with_their_own_lr_and_weight_decay():
    model = small_model(1)
    x, y = batch(1)
    clipped = hand_clipped_sum(model, x, y, 1.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    head = list(model[5].parameters())
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    with PerSampleGradients(model) as psg:
        opt = DPSGD([{"params": body}, {"params": head, "lr": 0.01, "weight_decay": 0.3}], lr=0.2,
                    noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=5, seed=0)
        dp_step(model, psg, opt, x, y, 1.0)
    for k, p in model.named_parameters():
        lr, wd = (0.01, 0.3) if k.startswith("5.") else (0.2, 0.0)
        torch.testing.assert_close(p.detach(), before[k] - lr * (clipped[k] / 5 + wd * before[k]))


def test_equals_opacus_dp_optimizer():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    ours = small_model(2, torch.float32)
    theirs = copy.deepcopy(ours)
    x, y = batch(2, 7, torch.float32)
    lr, wd, c, ebs = 0.5, 0.1, 0.3, 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(theirs, loss_reduction="mean")
        opacus_opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=lr, weight_decay=wd), noise_multiplier=0.0,
                                 max_grad_norm=c, expected_batch_size=ebs, loss_reduction="mean")
        for _ in range(2):
            opacus_opt.zero_grad()
            nn.functional.cross_entropy(gsm(x), y).backward()
            opacus_opt.step()
    with PerSampleGradients(ours, loss_reduction="mean") as psg:
        opt = DPSGD(ours.parameters(), lr=lr, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=ebs,
                    weight_decay=wd, seed=0)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(ours(x), y).backward()
            psg.clipped_sum_(c)
            opt.step()
    for (k, a), (_, b) in zip(ours.named_parameters(), gsm._module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------------------- noise
def noise_only_step(n: int, *, seed, sigma=1.0, c=2.0, ebs=4.0, lr=0.5, secure_rng=False, steps=1):
    p = nn.Parameter(torch.zeros(n))
    opt = DPSGD([p], lr=lr, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=ebs, seed=seed,
                secure_rng=secure_rng, check_clipped=False)
    for _ in range(steps):
        p.grad = torch.zeros(n)
        opt.step()
    return p.detach().clone(), opt


def test_seeded_noise_is_the_counter_based_noise():
    sigma, c, ebs, lr = 1.3, 2.0, 4.0, 0.5
    first, _ = noise_only_step(1001, seed=123, sigma=sigma, c=c, ebs=ebs, lr=lr, steps=1)
    second, opt = noise_only_step(1001, seed=123, sigma=sigma, c=c, ebs=ebs, lr=lr, steps=2)
    z0 = gaussian_noise(1001, seed=123, step=0)
    z1 = gaussian_noise(1001, seed=123, step=1)
    torch.testing.assert_close(first, -lr * sigma * c * z0 / ebs)
    torch.testing.assert_close(second, -lr * sigma * c * (z0 + z1) / ebs)
    assert opt.reproducible and opt.seed == 123
    again, _ = noise_only_step(1001, seed=123, sigma=sigma, c=c, ebs=ebs, lr=lr, steps=2)
    assert torch.equal(again, second)
    other, _ = noise_only_step(1001, seed=124, sigma=sigma, c=c, ebs=ebs, lr=lr, steps=2)
    assert not torch.allclose(other, second)


@pytest.mark.parametrize("secure_rng", [False, True])
def test_noise_moments(secure_rng):
    n = 60_000
    sigma, c, ebs, lr = 0.7, 3.0, 2.0, 1.0
    seed = None if secure_rng else 7
    p, opt = noise_only_step(n, seed=seed, sigma=sigma, c=c, ebs=ebs, lr=lr, secure_rng=secure_rng)
    z = (-p * ebs / (lr * sigma * c)).double()  # standard normal
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    assert not opt.reproducible or not secure_rng


def test_unseeded_optimizer_draws_a_secret_seed():
    p = nn.Parameter(torch.zeros(3))
    a = DPSGD([p], lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1)
    b = DPSGD([p], lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1)
    assert not a.reproducible and 0 <= a.seed < 2**63 and a.seed != b.seed


def test_parameter_groups_get_distinct_noise():
    p, q = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(64))
    opt = DPSGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0,
                expected_batch_size=1.0, seed=5, check_clipped=False)
    p.grad, q.grad = torch.zeros(64), torch.zeros(64)
    opt.step()
    torch.testing.assert_close(p.detach(), -gaussian_noise(64, seed=5, step=0))
    assert not torch.allclose(2 * q.detach(), p.detach())


# ---------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_continues_identically():
    x, y = batch(3, 6)
    kwargs = dict(lr=0.1, noise_multiplier=0.8, max_grad_norm=0.5, expected_batch_size=6, sample_rate=0.1,
                  delta=1e-5, weight_decay=0.01, seed=99)

    def train(model, opt, psg, steps):
        for _ in range(steps):
            dp_step(model, psg, opt, x, y, 0.5)

    straight = small_model(3)
    with PerSampleGradients(straight) as psg:
        opt = DPSGD(straight.parameters(), **kwargs)
        train(straight, opt, psg, 5)
        eps_straight = opt.epsilon()

    interrupted = small_model(3)
    with PerSampleGradients(interrupted) as psg:
        opt = DPSGD(interrupted.parameters(), **kwargs)
        train(interrupted, opt, psg, 3)
        model_state, opt_state = copy.deepcopy(interrupted.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = small_model(42)  # different initial weights, overwritten by the checkpoint
    resumed.load_state_dict(model_state)
    with PerSampleGradients(resumed) as psg:
        opt2 = DPSGD(resumed.parameters(), **{**kwargs, "seed": 1, "noise_multiplier": 2.0})
        opt2.load_state_dict(opt_state)
        assert opt2.steps_taken == 3 and opt2.seed == 99 and opt2.noise_multiplier == 0.8
        train(resumed, opt2, psg, 2)
    for (k, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), k
    assert opt2.epsilon() == eps_straight
    assert opt2.state_dict()["dpsgd"]["history"] == [[0.8, 0.1, 5]]
    with pytest.raises(ValueError, match="not a DPSGD state_dict"):
        opt2.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=0.1).state_dict())


# ------------------------------------------------------------------------------------ accounting
@pytest.mark.parametrize("epsilon, delta, steps, q", [(1.0, 1e-5, 100, 0.01), (3.0, 1e-6, 40, 0.05)])
def test_calibrated_noise_meets_the_target(epsilon, delta, steps, q):
    p = nn.Parameter(torch.zeros(4))
    opt = DPSGD([p], lr=0.1, max_grad_norm=1.0, expected_batch_size=10, epsilon=epsilon, delta=delta, steps=steps,
                sample_rate=q, seed=0, check_clipped=False)
    assert opt.noise_multiplier > 0 and opt.epsilon() == 0.0
    for _ in range(steps):
        p.grad = torch.zeros(4)
        opt.step()
    spent = opt.epsilon()
    assert spent <= epsilon
    assert spent >= epsilon - 0.05  # calibrated tightly, not just "enough noise"

    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=opt.noise_multiplier, sample_rate=q)
    assert spent == pytest.approx(acc.get_epsilon(delta, alphas=RDP_ORDERS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert spent <= acc.get_epsilon(delta) + 1e-12  # more orders: never looser than Opacus' default


def test_epsilon_grows_and_group_privacy():
    p = nn.Parameter(torch.zeros(2))
    opt = DPSGD([p], lr=0.1, noise_multiplier=1.1, max_grad_norm=1.0, expected_batch_size=10, sample_rate=0.02,
                seed=0, check_clipped=False)
    values = []
    for _ in range(3):
        p.grad = torch.zeros(2)
        opt.step()
        values.append(opt.epsilon(1e-5))
    assert values[0] < values[1] < values[2]
    eps = values[-1]
    assert opt.group_epsilon(1, 1e-5) == (eps, 1e-5)
    e3, d3 = opt.group_epsilon(3, 1e-5)
    assert e3 == pytest.approx(3 * eps) and d3 == pytest.approx(3 * math.exp(2 * eps) * 1e-5)
    assert opt.group_epsilon(10_000, 1e-5)[1] == 1.0  # vacuous, capped
    with pytest.raises(ValueError, match="k must be"):
        opt.group_epsilon(0, 1e-5)
    with pytest.raises(ValueError, match="pass delta"):
        opt.epsilon()


@given(st.floats(0.0, 20.0), st.floats(1e-12, 0.5), st.integers(1, 50))
def test_group_privacy_formula(eps, delta, k):
    ek, dk = group_privacy(eps, delta, k)
    assert ek == pytest.approx(k * eps)
    assert dk == pytest.approx(min(1.0, k * math.exp((k - 1) * eps) * delta), rel=1e-9)


def test_epsilon_edge_cases():
    p = nn.Parameter(torch.zeros(2))
    no_rate = DPSGD([p], lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1, seed=0,
                    check_clipped=False)
    p.grad = torch.zeros(2)
    no_rate.step()
    with pytest.raises(ValueError, match="sample_rate"):
        no_rate.epsilon(1e-5)
    noiseless = DPSGD([p], lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1,
                      sample_rate=0.1, seed=0, check_clipped=False)
    noiseless.step()
    assert noiseless.epsilon(1e-5) == math.inf


# ---------------------------------------------------------------------------------------- safety
def test_nan_gradient_raises_and_leaves_parameters_unchanged():
    model = small_model(4)
    x, y = batch(4)
    before = [p.detach().clone() for p in model.parameters()]
    with PerSampleGradients(model) as psg:
        opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=5,
                    seed=0)
        loss_sum(model, x, y).backward()
        psg.clipped_sum_(1.0)
        model[3].weight.grad[0, 0, 0, 0] = math.nan  # (also voids the clipped-sum tag: check_clipped off)
        opt.check_clipped = False
        with pytest.raises(ValueError, match=r"'3\.weight' contains NaN or Inf"):
            opt.step()
    assert opt.steps_taken == 0 and opt.state_dict()["dpsgd"]["history"] == []
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_inf_gradient_named_by_param_names():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(2))
    opt = DPSGD([("enc.w", p), ("dec.w", q)], lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0,
                expected_batch_size=1, seed=0, check_clipped=False)
    p.grad, q.grad = torch.zeros(3), torch.tensor([0.0, math.inf])
    with pytest.raises(ValueError, match="'dec.w'"):
        opt.step()
    assert torch.equal(q.detach(), torch.ones(2))


def test_refuses_gradients_that_are_not_clipped_sums():
    model = small_model(5)
    x, y = batch(5)
    opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=5, seed=0)
    loss_sum(model, x, y).backward()  # plain autograd: not private
    with pytest.raises(ValueError, match="not written by PerSampleGradients.clipped_sum_"):
        opt.step()
    opt.zero_grad()
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step()
    with PerSampleGradients(model) as psg:
        loss_sum(model, x, y).backward()
        psg.clipped_sum_(2.0)
        with pytest.raises(ValueError, match="max_grad_norm=2.0 but the optimizer uses max_grad_norm=1.0"):
            opt.step()


def test_frozen_parameters_are_skipped():
    model = small_model(6)
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    x, y = batch(6)
    with PerSampleGradients(model) as psg:
        opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=5,
                    seed=0)
        dp_step(model, psg, opt, x, y, 1.0)
    for a, b in zip(frozen, model[0].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(expected_batch_size=0), "expected_batch_size"),
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(delta=1.0), "delta"),
    (dict(delta=0.0), "delta"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(noise_multiplier=None, epsilon=0.0, delta=1e-5, steps=10, sample_rate=0.1), "epsilon"),
    (dict(noise_multiplier=None, epsilon=1.0, delta=1e-5), "steps, sample_rate"),
    (dict(noise_multiplier=None), "noise_multiplier="),
    (dict(epsilon=1.0), "not both"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(seed=1, secure_rng=True), "not both"),
    (dict(steps=0), "steps"),
])
def test_bad_hyper_parameters(kwargs, match):
    base = dict(lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match=match):
        DPSGD([nn.Parameter(torch.zeros(2))], **{**base, **kwargs})


def test_bad_param_group_lr():
    with pytest.raises(ValueError, match="lr"):
        DPSGD([{"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0}], lr=0.1, noise_multiplier=1.0,
              max_grad_norm=1.0, expected_batch_size=4)


def test_group_epsilon_for_changed_samples_counts_twice():
    from pyunlearn.optim.dpsgd import DPSGD, group_privacy

    p = torch.nn.Parameter(torch.zeros(3))
    opt = DPSGD([p], lr=0.1, max_grad_norm=1.0, expected_batch_size=8, noise_multiplier=1.0, sample_rate=0.1,
                seed=0, check_clipped=False)
    p.grad = torch.zeros(3)
    opt.step()
    eps = opt.epsilon(1e-5)
    assert opt.group_epsilon(3, 1e-5) == group_privacy(eps, 1e-5, 3)
    assert opt.group_epsilon(3, 1e-5, substitution=True) == group_privacy(eps, 1e-5, 6)
