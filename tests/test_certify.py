"""Tests of the privacy accountants in pyunlearn.certify."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.stats import norm

from pyunlearn._precision import CLIP_SLACK
from pyunlearn.certify import (
    Certificate,
    CertificateError,
    delta_model_clipping,
    epsilon_gradient_clipping,
    epsilon_zcdp_closed_form,
    hockey_stick_gaussian,
    rdp_to_dp,
    rho_gradient_clipping,
    sigma_gradient_clipping,
    sigma_model_clipping,
    sigma_output_perturbation,
)


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


rhos = log_uniform(1e-8, 1e6)
deltas = log_uniform(1e-12, 0.5)
sigmas = log_uniform(0.05, 50.0)
lrs = log_uniform(1e-3, 1.0)
cs = log_uniform(1e-2, 10.0)
steps_st = st.integers(1, 300)


def brute_force_epsilon(rho: float, delta: float) -> float:
    """Improved conversion minimised over a dense grid of alpha = 1 + e^s."""
    s = np.linspace(-25.0, 40.0, 200_001)
    alpha = 1.0 + np.exp(s)
    vals = alpha * rho + np.log((alpha - 1) / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)
    return float(np.min(vals))


# ------------------------------------------------------------------ RDP -> DP
def test_pitfall_rho2_gives_about_10_7():
    # DESIGN's known pitfall: sigma^2 = Delta^2/(4 rho T) with rho target 1 means actual rho = 2; the
    # analysis then gives epsilon = 10.7248... at delta = 1e-5 (not ~1). Computed value: 10.724824112939.
    eps = rdp_to_dp(2.0, 1e-5)
    assert eps > 10.0
    assert 10.7248 <= eps <= 10.7249
    # The same through the operator: sigma chosen by the faulty formula for rho target 1.
    T, lr, c0, c1 = 20, 0.05, 1.0, 2.0
    sens = 2 * c0 + 2 * lr * c1 * T
    sigma_faulty = sens / math.sqrt(4.0 * 1.0 * T)
    assert rho_gradient_clipping(sigma=sigma_faulty, steps=T, lr=lr, c0=c0, c1=c1) == pytest.approx(2.0)
    assert epsilon_gradient_clipping(sigma=sigma_faulty, delta=1e-5, steps=T, lr=lr, c0=c0,
                                     c1=c1) == pytest.approx(10.7248241, rel=1e-7)


def test_closed_form_value():
    assert epsilon_zcdp_closed_form(2.0, 1e-5) == pytest.approx(2 + 2 * math.sqrt(2 * math.log(1e5)))
    assert epsilon_zcdp_closed_form(0.0, 1e-5) == 0.0
    assert rdp_to_dp(0.0, 1e-5) == 0.0


@given(rho=rhos, delta=deltas)
def test_rdp_to_dp_below_closed_form(rho, delta):
    eps = rdp_to_dp(rho, delta)
    assert 0.0 <= eps <= epsilon_zcdp_closed_form(rho, delta)


@given(rho=log_uniform(1e-6, 1e5), delta=deltas)
def test_rdp_to_dp_matches_brute_force_min(rho, delta):
    eps = rdp_to_dp(rho, delta)
    brute = max(0.0, brute_force_epsilon(rho, delta))
    # Accurate: at least as good as a dense grid search ...
    assert eps <= brute + 1e-12 * (1.0 + brute)
    # ... and sound: not below it by more than the grid's own discretisation error.
    assert eps >= brute - 1e-6 * (1.0 + brute)


@given(rho=rhos, factor=st.floats(1.0, 10.0), delta=deltas)
def test_rdp_to_dp_monotone(rho, factor, delta):
    assert rdp_to_dp(rho, delta) <= rdp_to_dp(rho * factor, delta) * (1 + 1e-12) + 1e-15
    assert rdp_to_dp(rho, delta) <= rdp_to_dp(rho, delta / factor) * (1 + 1e-12) + 1e-15


def test_rdp_to_dp_never_below_any_order():
    # Every alpha gives a valid bound; the minimum reported must not beat the exact value at the
    # optimum computed in high precision by a fine local search.
    rho, delta = 0.37, 3e-7
    eps = rdp_to_dp(rho, delta)
    a = np.linspace(1.0001, 50.0, 2_000_001)
    exact = np.min(a * rho + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1))
    assert exact - 1e-9 <= eps <= exact + 1e-12


# ------------------------------------------------------------------ gradient clipping
def test_rho_hand_computation_no_weight_decay():
    # (2*1 + 2*0.1*3*10)^2 / (2 * 2^2 * 10) = 64 / 80
    rho = rho_gradient_clipping(sigma=2.0, steps=10, lr=0.1, c0=1.0, c1=3.0)
    assert rho == pytest.approx(0.8, rel=1e-12)


def test_rho_hand_computation_weight_decay():
    # T=3, gamma=0.5, lambda=0.4 -> c=0.8; A = 2*1*0.8^3 + 2*0.5*1*(1+0.8+0.64) = 3.464;
    # S2 = 1 + 0.64 + 0.4096 = 2.0496; rho = A^2 / (2 * 1 * S2)
    rho = rho_gradient_clipping(sigma=1.0, steps=3, lr=0.5, c0=1.0, c1=1.0, weight_decay=0.4)
    assert rho == pytest.approx(3.464**2 / (2 * 2.0496), rel=1e-12)


@given(sigma=sigmas, T=steps_st, lr=lrs, c0=cs, c1=cs, wd=log_uniform(1e-3, 0.9))
def test_rho_weight_decay_matches_explicit_sums(sigma, T, lr, c0, c1, wd):
    assume(lr * wd < 0.95)
    c = 1 - lr * wd
    a = 2 * c0 * c**T + 2 * lr * c1 * sum(c**k for k in range(T))
    s2 = sum(c ** (2 * k) for k in range(T))
    rho = rho_gradient_clipping(sigma=sigma, steps=T, lr=lr, c0=c0, c1=c1, weight_decay=wd)
    assert rho == pytest.approx(a * a / (2 * sigma**2 * s2), rel=1e-10)


@given(sigma=sigmas, T=steps_st, lr=lrs, c0=cs, c1=cs)
def test_weight_decay_limit_is_no_weight_decay(sigma, T, lr, c0, c1):
    kw = dict(sigma=sigma, steps=T, lr=lr, c0=c0, c1=c1)
    rho0 = rho_gradient_clipping(**kw)
    assert rho_gradient_clipping(weight_decay=1e-12, **kw) == pytest.approx(rho0, rel=1e-8)
    assert rho_gradient_clipping(weight_decay=1e-7, **kw) == pytest.approx(rho0, rel=1e-3)
    # Weight decay contracts: it never hurts.
    assert rho_gradient_clipping(weight_decay=0.5 / lr * 0.5, **kw) <= rho0 * (1 + 1e-12)


@given(sigma=sigmas, f=st.floats(1.01, 5.0), T=steps_st, lr=lrs, c0=cs, c1=cs,
       wd=st.sampled_from([0.0, 0.01, 0.3]))
def test_epsilon_monotone(sigma, f, T, lr, c0, c1, wd):
    kw = dict(delta=1e-5, steps=T, lr=lr, c0=c0, c1=c1, weight_decay=wd)
    e = epsilon_gradient_clipping(sigma=sigma, **kw)
    assert epsilon_gradient_clipping(**{**kw, "sigma": sigma * f}) <= e
    assert epsilon_gradient_clipping(**{**kw, "sigma": sigma, "c0": c0 * f}) >= e
    assert epsilon_gradient_clipping(**{**kw, "sigma": sigma, "c1": c1 * f}) >= e
    if wd == 0.0:  # with weight decay, lr also changes the contraction: not monotone in general
        assert epsilon_gradient_clipping(**{**kw, "sigma": sigma, "lr": lr * f}) >= e


@given(eps=log_uniform(0.05, 30.0), delta=deltas, T=steps_st, lr=lrs, c0=cs, c1=cs,
       wd=st.sampled_from([0.0, 1e-4, 0.2]))
def test_sigma_epsilon_round_trip(eps, delta, T, lr, c0, c1, wd):
    kw = dict(delta=delta, steps=T, lr=lr, c0=c0, c1=c1, weight_decay=wd)
    sigma = sigma_gradient_clipping(epsilon=eps, **kw)
    got = epsilon_gradient_clipping(sigma=sigma, **kw)
    assert got <= eps
    assert got >= eps * (1 - 1e-3)
    # Smallest: noticeably less noise no longer certifies.
    assert epsilon_gradient_clipping(sigma=sigma * (1 - 1e-5), **kw) > eps


# ------------------------------------------------------------------ hockey stick
@given(eps=st.floats(0.0, 5.0), r=st.floats(0.1, 6.0))
def test_hockey_stick_matches_direct_formula(eps, r):
    direct = norm.sf(eps / r - r / 2) - math.exp(eps) * norm.sf(eps / r + r / 2)
    assume(direct > 1e-4)  # away from cancellation in the direct formula
    assert hockey_stick_gaussian(eps, r) == pytest.approx(direct, rel=1e-9)


def test_hockey_stick_special_values():
    assert hockey_stick_gaussian(1.0, 0.0) == 0.0
    # eps = 0: total variation of N(r,1) and N(0,1) = erf(r / (2 sqrt 2))
    assert hockey_stick_gaussian(0.0, 1.3) == pytest.approx(math.erf(1.3 / (2 * math.sqrt(2))), rel=1e-12)
    assert hockey_stick_gaussian(1.0, 1e4) == pytest.approx(1.0)
    assert 0.0 <= hockey_stick_gaussian(800.0, 3.0) < 1e-300  # e^eps overflows in the direct formula


@given(eps=st.floats(0.0, 50.0), r=log_uniform(1e-3, 100.0), f=st.floats(1.01, 3.0))
def test_hockey_stick_range_and_monotone(eps, r, f):
    h = hockey_stick_gaussian(eps, r)
    assert 0.0 <= h <= 1.0
    assert hockey_stick_gaussian(eps * f + 0.01, r) <= h * (1 + 1e-9)
    assert hockey_stick_gaussian(eps, r * f) >= h * (1 - 1e-9)


# ------------------------------------------------------------------ model clipping
def test_delta_model_clipping_hand_computation():
    eps, sigma, c2 = 0.7, 1.5, 1.2
    r = 2 * c2 / sigma
    d1 = hockey_stick_gaussian(eps, r)  # delta_0 = 1 (sigma0 = 0) => eps_0 = eps
    eps1 = math.log(1 + math.expm1(eps) / d1)
    d2 = d1 * hockey_stick_gaussian(eps1, r)
    kw = dict(epsilon=eps, sigma=sigma, sigma0=0.0, c0=5.0, c2=c2)
    assert delta_model_clipping(steps=1, **kw) == pytest.approx(d1, rel=1e-9)
    assert delta_model_clipping(steps=2, **kw) == pytest.approx(d2, rel=1e-9)
    # With initial noise: delta_0 = theta_eps(2 c0 / sigma0).
    d0 = hockey_stick_gaussian(eps, 2 * 0.5 / 0.8)
    want = d0 * hockey_stick_gaussian(math.log(1 + math.expm1(eps) / d0), r)
    got = delta_model_clipping(epsilon=eps, sigma=sigma, sigma0=0.8, steps=1, c0=0.5, c2=c2)
    assert got == pytest.approx(want, rel=1e-9)


@given(eps=log_uniform(0.05, 10.0), sigma=log_uniform(0.1, 10.0), sigma0=st.sampled_from([0.0, 0.5, 3.0]),
       T=st.integers(1, 60), c0=cs, c2=cs, f=st.floats(1.05, 3.0))
def test_delta_model_clipping_monotone(eps, sigma, sigma0, T, c0, c2, f):
    kw = dict(epsilon=eps, sigma=sigma, sigma0=sigma0, steps=T, c0=c0, c2=c2)
    d = delta_model_clipping(**kw)
    assert 0.0 <= d <= 1.0
    tol = 1e-12
    assert delta_model_clipping(**{**kw, "steps": T + 1}) <= d * (1 + tol)
    assert delta_model_clipping(**{**kw, "sigma": sigma * f}) <= d * (1 + tol)
    assert delta_model_clipping(**{**kw, "c2": c2 * f}) >= d * (1 - tol)
    assert delta_model_clipping(**{**kw, "epsilon": eps * f}) <= d * (1 + tol)
    assert delta_model_clipping(**{**kw, "sigma0": sigma0 * f + 0.1}) <= d * (1 + tol)


@given(eps=log_uniform(0.1, 10.0), delta=log_uniform(1e-10, 1e-2), sigma0=st.sampled_from([0.0, 1.0]),
       T=st.integers(1, 40), c0=cs, c2=cs)
def test_sigma_model_clipping_certifies_and_is_smallest(eps, delta, sigma0, T, c0, c2):
    kw = dict(epsilon=eps, sigma0=sigma0, steps=T, c0=c0, c2=c2)
    sigma = sigma_model_clipping(delta=delta, **kw)
    if sigma == 0.0:
        assert sigma0 > 0 and hockey_stick_gaussian(eps, 2 * c0 / sigma0) <= delta
        return
    assert delta_model_clipping(sigma=sigma, **kw) <= delta
    assert delta_model_clipping(sigma=sigma * (1 - 1e-6), **kw) > delta


def test_sigma_model_clipping_zero_when_initial_noise_suffices():
    assert sigma_model_clipping(epsilon=1.0, delta=1e-5, sigma0=100.0, steps=5, c0=1.0, c2=1.0) == 0.0


def test_model_clipping_needs_few_steps():
    # O(log 1/delta) steps: the noise needed at fixed (eps, delta) decreases with T.
    s = [sigma_model_clipping(epsilon=1.0, delta=1e-5, sigma0=0.0, steps=T, c0=1.0, c2=1.0)
         for T in (1, 3, 10, 30)]
    assert all(a > b for a, b in zip(s, s[1:]))


# ------------------------------------------------------------------ certificates
json_scalars = st.none() | st.booleans() | st.integers(-10**9, 10**9) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) |
                           st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@given(eps=st.floats(0.0, 1e6) | st.just(math.inf), delta=st.floats(0.0, 1.0),
       op=st.text(min_size=1, max_size=20), hp=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       params=st.lists(st.text(max_size=10), max_size=5),
       assumptions=st.lists(st.text(max_size=30), max_size=3), seeded=st.booleans())
def test_certificate_json_round_trip(eps, delta, op, hp, params, assumptions, seeded):
    cert = Certificate(epsilon=eps, delta=delta, operator=op, hyperparameters=hp, parameters=params,
                       assumptions=assumptions, seeded=seeded)
    assert Certificate.from_json(cert.to_json()) == cert
    assert Certificate.from_dict(cert.to_dict()) == cert
    d = cert.to_dict()
    d["parameters"].append("mutated")
    assert cert.parameters == params  # to_dict is a copy


def test_certificate_numpy_values_and_str():
    cert = Certificate(epsilon=np.float64(1.5), delta=1e-5, operator="gradient_clipping",
                       hyperparameters={"lr": np.float32(0.5), "steps": np.int64(7)},
                       parameters=["decoder.w", "decoder.b"], assumptions=["encoder is public"], seeded=True)
    back = Certificate.from_json(cert.to_json())
    assert back.hyperparameters == {"lr": 0.5, "steps": 7}
    text = str(cert)
    assert "gradient_clipping" in text and "1.5" in text and "2 parameters" in text
    assert "encoder is public" in text and "seed" in text
    assert "seed" not in str(Certificate(1.0, 1e-5, "model_clipping"))


@pytest.mark.parametrize("kwargs, exc", [
    (dict(epsilon=-1.0, delta=1e-5, operator="x"), ValueError),
    (dict(epsilon=1.0, delta=1.5, operator="x"), ValueError),
    (dict(epsilon=1.0, delta=1e-5, operator=""), ValueError),
    (dict(epsilon=1.0, delta=1e-5, operator="x", parameters="abc"), TypeError),
    (dict(epsilon=1.0, delta=1e-5, operator="x", hyperparameters={1: 2}), TypeError),
])
def test_certificate_validation(kwargs, exc):
    with pytest.raises(exc):
        Certificate(**kwargs)


def test_certificate_from_dict_rejects_unknown_and_missing_keys():
    d = Certificate(1.0, 1e-5, "x").to_dict()
    with pytest.raises(ValueError, match="unknown"):
        Certificate.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="missing"):
        Certificate.from_dict({k: v for k, v in d.items() if k != "delta"})


def test_certificate_error_is_runtime_error():
    assert issubclass(CertificateError, RuntimeError)


# ------------------------------------------------------------------ argument validation
GC = dict(sigma=1.0, delta=1e-5, steps=10, lr=0.1, c0=1.0, c1=1.0, weight_decay=0.0)
GS = {**{k: v for k, v in GC.items() if k != "sigma"}, "epsilon": 1.0}
RHO = {k: v for k, v in GC.items() if k != "delta"}
MC = dict(epsilon=1.0, sigma=1.0, sigma0=0.0, steps=10, c0=1.0, c2=1.0)
MS = {**{k: v for k, v in MC.items() if k != "sigma"}, "delta": 1e-5}
OP = dict(epsilon=1.0, delta=1e-5, c0=1.0)


@pytest.mark.parametrize("fn, base, name, bad", [
    (epsilon_gradient_clipping, GC, "sigma", 0.0),
    (epsilon_gradient_clipping, GC, "sigma", -1.0),
    (epsilon_gradient_clipping, GC, "sigma", math.inf),
    (epsilon_gradient_clipping, GC, "delta", 0.0),
    (epsilon_gradient_clipping, GC, "delta", 1.0),
    (epsilon_gradient_clipping, GC, "delta", math.nan),
    (epsilon_gradient_clipping, GC, "steps", 0),
    (epsilon_gradient_clipping, GC, "steps", 2.5),
    (epsilon_gradient_clipping, GC, "lr", 0.0),
    (epsilon_gradient_clipping, GC, "c0", -0.1),
    (epsilon_gradient_clipping, GC, "c1", 0.0),
    (epsilon_gradient_clipping, GC, "weight_decay", -1.0),
    (epsilon_gradient_clipping, GC, "weight_decay", 10.0),  # lr * weight_decay = 1
    (rho_gradient_clipping, RHO, "sigma", 0.0),
    (rho_gradient_clipping, RHO, "c1", math.nan),
    (sigma_gradient_clipping, GS, "epsilon", 0.0),
    (sigma_gradient_clipping, GS, "epsilon", math.inf),
    (sigma_gradient_clipping, GS, "delta", 2.0),
    (sigma_gradient_clipping, GS, "lr", -0.1),
    (delta_model_clipping, MC, "epsilon", 0.0),
    (delta_model_clipping, MC, "sigma", 0.0),
    (delta_model_clipping, MC, "sigma0", -1.0),
    (delta_model_clipping, MC, "steps", 0),
    (delta_model_clipping, MC, "c0", -1.0),
    (delta_model_clipping, MC, "c2", 0.0),
    (sigma_model_clipping, MS, "delta", 1.0),
    (sigma_model_clipping, MS, "epsilon", -1.0),
    (sigma_model_clipping, MS, "c2", -1.0),
    (sigma_output_perturbation, OP, "epsilon", -1.0),
    (sigma_output_perturbation, OP, "delta", 0.0),
    (sigma_output_perturbation, OP, "c0", -1.0),
])
def test_invalid_arguments_raise_value_error(fn, base, name, bad):
    with pytest.raises(ValueError, match=name):
        fn(**{**base, name: bad})
    fn(**base)  # the base arguments themselves are valid


@pytest.mark.parametrize("fn, args, name", [
    (rdp_to_dp, (-1.0, 1e-5), "rho"),
    (rdp_to_dp, (1.0, 0.0), "delta"),
    (epsilon_zcdp_closed_form, (math.inf, 1e-5), "rho"),
    (hockey_stick_gaussian, (-0.1, 1.0), "epsilon"),
    (hockey_stick_gaussian, (1.0, -1.0), "r"),
])
def test_invalid_positional_arguments(fn, args, name):
    with pytest.raises(ValueError, match=name):
        fn(*args)


def test_non_numbers_raise_type_error():
    with pytest.raises(TypeError, match="sigma"):
        epsilon_gradient_clipping(**{**GC, "sigma": "1.0"})
    with pytest.raises(TypeError, match="steps"):
        delta_model_clipping(**{**MC, "steps": True})


# ------------------------------------------------------------------ output perturbation
def op_sensitivity(c0: float) -> float:
    """The sensitivity the accounting uses: 2 c0, inflated by the float32 kernels' clip slack."""
    return 2.0 * c0 * CLIP_SLACK


def brute_force_sigma_op(eps: float, delta: float, sens: float) -> float:
    """The analytic Gaussian mechanism by plain bisection on sigma with scipy.stats.norm (direct formula)."""
    def delta_at(sigma):
        a, b = sens / (2 * sigma), eps * sigma / sens
        return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)

    lo, hi = 1e-6 * sens, 1e6 * sens
    assert delta_at(lo) > delta >= delta_at(hi)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def assert_float32(x: float) -> None:
    assert float(np.float32(x)) == x


@given(eps=log_uniform(0.01, 50.0), delta=deltas, c0=cs)
def test_output_perturbation_analytic_is_exact(eps, delta, c0):
    sigma = sigma_output_perturbation(epsilon=eps, delta=delta, c0=c0)
    assert_float32(sigma)
    sens = op_sensitivity(c0)
    assert hockey_stick_gaussian(eps, sens / sigma) <= delta
    assert hockey_stick_gaussian(eps, sens / (sigma * (1 - 1e-6))) > delta
    assert sigma_output_perturbation(epsilon=eps, delta=delta, c0=0.0) == 0.0


@pytest.mark.parametrize("eps", [0.05, 0.5, 1.0, 2.0, 8.0, 30.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_output_perturbation_matches_brute_force(eps, delta):
    c0 = 0.7
    sigma = sigma_output_perturbation(epsilon=eps, delta=delta, c0=c0)
    exact = brute_force_sigma_op(eps, delta, op_sensitivity(c0))
    assert_float32(sigma)
    assert sigma >= exact * (1 - 1e-12)      # never less noise than the exact mechanism needs ...
    assert sigma <= exact * (1 + 2 ** -23)   # ... and at most one float32 rounding more


@pytest.mark.parametrize("eps, percent", [(0.5, 27), (1.0, 23)])
def test_output_perturbation_below_classical(eps, percent):
    delta, c0 = 1e-5, 1.0
    classical = 2 * c0 * math.sqrt(2 * math.log(1.25 / delta)) / eps
    sigma = sigma_output_perturbation(epsilon=eps, delta=delta, c0=c0)
    saving = 1 - sigma / classical
    assert round(100 * saving) == percent and 0.225 <= saving <= 0.31
    # The classical formula certified too (it is valid at eps <= 1), only with more noise.
    assert hockey_stick_gaussian(eps, op_sensitivity(c0) / classical) < delta


def test_output_perturbation_extreme_but_valid_inputs():
    base = dict(epsilon=1.0, delta=1e-5, c0=1.0)
    # epsilon -> 0: the needed noise tends to that of (0, delta), sens / (delta sqrt(2 pi)), not to infinity.
    sigma = sigma_output_perturbation(**{**base, "epsilon": 1e-300})
    assert sigma == pytest.approx(op_sensitivity(1.0) / (1e-5 * math.sqrt(2 * math.pi)), rel=1e-4)
    for kw in (dict(delta=1e-300), dict(delta=5e-324), dict(c0=1e-300), dict(epsilon=1e300), dict(c0=1e30)):
        args = {**base, **kw}
        sigma = sigma_output_perturbation(**args)
        assert_float32(sigma)
        assert 0.0 < sigma < math.inf
        assert hockey_stick_gaussian(args["epsilon"], op_sensitivity(args["c0"]) / sigma) <= args["delta"]


@pytest.mark.parametrize("kw, name", [
    (dict(c0=1e300), "c0"),
    (dict(c0=1e308), "c0"),
    (dict(c0=math.inf), "c0"),
    (dict(c0=math.nan), "c0"),
    (dict(epsilon=1e-300, delta=1e-300), "epsilon"),  # sigma0 beyond float32
    (dict(epsilon=math.inf), "epsilon"),
    (dict(epsilon=math.nan), "epsilon"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(delta=math.nan), "delta"),
    (dict(delta=1.0), "delta"),
])
def test_output_perturbation_extreme_inputs_raise_value_error(kw, name):
    with pytest.raises(ValueError, match=name):
        sigma_output_perturbation(**{**dict(epsilon=1.0, delta=1e-5, c0=1.0), **kw})


@pytest.mark.parametrize("kw, name", [(dict(c0=1e300), "c0"), (dict(c0=math.nan), "c0"),
                                      (dict(epsilon=1e-300, delta=1e-300), "delta = 1e-300"),
                                      (dict(delta=0.0), "delta")])
def test_output_perturbation_operator_extreme_inputs(kw, name):
    """Refused by name before the model changes: a ValueError, or (delta too small for the sampler's share
    of delta) a CertificateError."""
    import torch

    from pyunlearn.data import SyntheticShortcuts
    from pyunlearn.models import EncoderDecoder
    from pyunlearn.unlearn import SegmentationUnlearningData, output_perturbation

    ds = SyntheticShortcuts(4, image_size=16, fine_fraction=1.0, seed=0)
    data = SegmentationUnlearningData.from_masks(ds.images, ds.coarse, ds.fine, ds.has_fine)
    model = EncoderDecoder(width=4).freeze_encoder()
    before = [p.detach().clone() for p in model.parameters()]
    from pyunlearn.certify import CertificateError

    with pytest.raises((ValueError, CertificateError), match=name):
        output_perturbation(model, data, finetune_steps=0, noise_seed=0, inplace=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any change


def test_float32_helpers_shared_with_the_optimizers():
    from pyunlearn import _precision
    from pyunlearn.optim import _certified

    assert _certified.CLIP_SLACK == _precision.CLIP_SLACK
    for x in (0.0, 1e-300, 0.1, 1.0, 3.3, 1e30, float(np.float32(7.25))):
        assert _precision.float32_up(x) == _certified.float32_up(x) >= x
        assert_float32(_precision.float32_up(x))
    assert _precision.float32_up(1e300) == math.inf


# ------------------------------------------------------------------ sigma at the edge of the float range
@pytest.mark.parametrize("fn, base, kw, name", [
    (rho_gradient_clipping, "RHO", dict(sigma=1e-300), "sigma"),
    (rho_gradient_clipping, "RHO", dict(sigma=5e-324), "sigma"),
    (epsilon_gradient_clipping, "GC", dict(sigma=1e-300), "sigma"),
    (epsilon_gradient_clipping, "GC", dict(sigma=math.nan), "sigma"),
    (epsilon_gradient_clipping, "GC", dict(c0=1e300), "c0"),
    (epsilon_gradient_clipping, "GC", dict(lr=1e300), "lr"),
    (sigma_gradient_clipping, "GS", dict(epsilon=1e308), "epsilon"),
    (sigma_gradient_clipping, "GS", dict(c1=1e300), "c1"),
    (sigma_model_clipping, "MS", dict(c2=5e-324), "c2"),
    (sigma_model_clipping, "MS", dict(c2=1e308), "c2"),
])
def test_float_range_edges_raise_value_error(fn, base, kw, name):
    base = {"RHO": RHO, "GC": GC, "GS": GS, "MS": MS}[base]
    with pytest.raises(ValueError, match=name):
        fn(**{**base, **kw})


def test_huge_sigma_still_gives_zero():
    assert rho_gradient_clipping(**{**RHO, "sigma": 1e308}) == 0.0
    assert epsilon_gradient_clipping(**{**GC, "sigma": 1e308}) == 0.0
    assert delta_model_clipping(**{**MC, "sigma": 1e308, "sigma0": 1e308}) == 0.0
