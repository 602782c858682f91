"""Privacy accounting of the certified unlearning operators (DESIGN.md, "Certified operators").

Every function here returns a guarantee that is *at least as weak* as the one the analysis
proves: epsilons and deltas are never rounded down, noise scales never rounded down. Where a
quantity is a minimum over Rényi orders, any order gives a valid bound, so numerical error in the
minimiser can only make the result larger; the floating-point error of evaluating the bound at the
chosen order is added back explicitly.

* Gradient clipping: shifted Rényi divergence, ``D_alpha <= alpha * rho`` (:func:`rho_gradient_clipping`),
  converted to ``(epsilon, delta)`` with the improved RDP conversion (:func:`rdp_to_dp`).
* Model clipping: contraction of the hockey-stick divergence (:func:`delta_model_clipping`).
* Output perturbation: the exact analytic Gaussian mechanism (Balle & Wang, 2018) for every epsilon,
  rounded up to float32 with the kernels' clip slack (:func:`sigma_output_perturbation`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_ndtr

from ._precision import CLIP_SLACK, FLOAT32_MAX, float32_up

__all__ = [
    "Certificate",
    "CertificateError",
    "delta_model_clipping",
    "epsilon_dpsgd",
    "epsilon_gradient_clipping",
    "epsilon_zcdp_closed_form",
    "hockey_stick_gaussian",
    "noise_multiplier_dpsgd",
    "rdp_to_dp",
    "rho_gradient_clipping",
    "sigma_gradient_clipping",
    "sigma_model_clipping",
    "sigma_output_perturbation",
]

_ULP = float(np.finfo(np.float64).eps)
_LOG_FLOAT32_MAX = math.log(FLOAT32_MAX)
# Rényi orders are searched as alpha = 1 + exp(s): s in [-30, 690] covers alpha - 1 from 1e-13 to
# 1e299, i.e. every optimum reachable for rho in [1e-290, 1e24] and delta >= 1e-300.
_S_LO, _S_HI, _S_GRID = -30.0, 690.0, 2049
_S = np.linspace(_S_LO, _S_HI, _S_GRID)
_S_STEP = float(_S[1] - _S[0])


class CertificateError(RuntimeError):
    """Raised when an operator refuses to issue a certificate (its assumptions do not hold)."""


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------
def _real(name: str, value: Any, *, lo: float = -math.inf, lo_open: bool = False,
          hi: float = math.inf, hi_open: bool = False) -> float:
    """``value`` as a finite float in the given interval, else TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must lie in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def _steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"steps must be an integer >= 1, got {type(value).__name__} {value!r}")
    if not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {value!r}")
    return int(value)


def _epsilon(value: Any) -> float:
    return _real("epsilon", value, lo=0.0, lo_open=True)


def _delta(value: Any) -> float:
    return _real("delta", value, lo=0.0, lo_open=True, hi=1.0, hi_open=True)


def _softplus(s: np.ndarray | float) -> np.ndarray | float:
    """log(1 + e^s), stable for all s."""
    return np.logaddexp(0.0, s)


def _log1mexp(x: float) -> float:
    """log(1 - e^x) for x <= 0 (−inf at x = 0), stable (Mächler 2012)."""
    if x >= 0.0:
        return -math.inf
    return math.log(-math.expm1(x)) if x > -0.6931471805599453 else math.log1p(-math.exp(x))


# --------------------------------------------------------------------------------------------
# RDP -> (epsilon, delta)
# --------------------------------------------------------------------------------------------
def _conversion_terms(s, rho: float, log_delta: float):
    """Improved conversion at alpha = 1 + e^s: the three terms of
    ``alpha*rho + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)`` (stable in s)."""
    with np.errstate(over="ignore", invalid="ignore"):
        log_alpha = _softplus(s)
        t1 = rho * (1.0 + np.exp(s))                # alpha * rho
        t2 = s - log_alpha                          # log((alpha-1)/alpha)
        t3 = -(log_delta + log_alpha) * np.exp(-s)  # -(log delta + log alpha)/(alpha-1)
    return t1, t2, t3


def _bound_with_error(s: float, rho: float, log_delta: float) -> float:
    """The conversion bound at one order, rounded up by a bound on its floating-point error."""
    t1, t2, t3 = (float(t) for t in _conversion_terms(s, rho, log_delta))
    value = t1 + t2 + t3
    if not math.isfinite(value):
        return math.inf
    return value + 16.0 * _ULP * (abs(t1) + abs(t2) + abs(t3) + abs(log_delta) + 1.0)


def _optimise_over_s(fun: Callable[[np.ndarray | float], np.ndarray | float],
                     extra: tuple[float, ...] = ()) -> float:
    """argmin over s of ``fun`` (vectorised): a coarse grid seeds a bounded Brent refinement."""
    with np.errstate(all="ignore"):
        vals = np.asarray(fun(_S), dtype=np.float64)
    vals = np.where(np.isnan(vals), np.inf, vals)
    i = int(np.argmin(vals))
    candidates = [float(_S[i])] + [float(x) for x in extra if math.isfinite(x)]
    lo, hi = max(_S_LO, _S[i] - _S_STEP), min(_S_HI, _S[i] + _S_STEP)
    with np.errstate(all="ignore"):
        if hi > lo:
            res = minimize_scalar(lambda x: float(fun(x)), bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-11})
            candidates.append(float(res.x))
        cvals = [float(fun(c)) for c in candidates]
    cvals = [math.inf if math.isnan(v) else v for v in cvals]
    return candidates[int(np.argmin(cvals))]


def rdp_to_dp(rho: float, delta: float) -> float:
    """Smallest epsilon such that ``D_alpha <= alpha * rho`` for all alpha > 1 implies (epsilon, delta)-DP.

    Uses the improved conversion (Balle et al. 2020; Canonne, Kamath & Steinke 2020)
    ``epsilon = min_{alpha > 1} [alpha rho + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)]``,
    which is valid for every alpha > 1 and never exceeds :func:`epsilon_zcdp_closed_form` (beyond the
    latter's rounding).
    The returned value is the bound at the order found, rounded up for floating-point error, and
    clamped at 0 (an (epsilon < 0, delta) guarantee implies (0, delta)).
    """
    rho = _real("rho", rho, lo=0.0)
    delta = _delta(delta)
    if rho == 0.0:
        return 0.0
    log_delta = math.log(delta)

    def fun(s):
        t1, t2, t3 = _conversion_terms(s, rho, log_delta)
        return t1 + t2 + t3

    s_closed_form = 0.5 * (math.log(-log_delta) - math.log(rho))  # alpha - 1 = sqrt(log(1/delta)/rho)
    s_best = _optimise_over_s(fun, extra=(s_closed_form,))
    # The closed form is also a valid bound (it only matters at rho > 1e12, where the rounding margin
    # exceeds the gap between the two); each is rounded up for its own floating-point error.
    closed_form = (rho + 2.0 * math.sqrt(rho * -log_delta)) * (1.0 + 8.0 * _ULP)
    return max(0.0, min(_bound_with_error(s_best, rho, log_delta), closed_form))


def _max_rho_for_epsilon(epsilon: float, delta: float) -> float:
    """Largest rho whose conversion certifies (epsilon, delta): ``max_alpha (epsilon - g(alpha)) / alpha``,
    g the rho-free part of the conversion; any alpha gives a valid (smaller) rho."""
    log_delta = math.log(delta)

    def neg(s):
        _, t2, t3 = _conversion_terms(s, 0.0, log_delta)
        with np.errstate(over="ignore", invalid="ignore"):
            return -(epsilon - (t2 + t3)) / (1.0 + np.exp(s))

    s_best = _optimise_over_s(neg)
    return max(0.0, -float(neg(s_best)))


def epsilon_zcdp_closed_form(rho: float, delta: float) -> float:
    """The classical closed-form conversion ``rho + 2 sqrt(rho log(1/delta))`` (looser, always valid)."""
    rho = _real("rho", rho, lo=0.0)
    delta = _delta(delta)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------
def _gradient_clipping_geometry(*, steps: Any, lr: Any, c0: Any, c1: Any, weight_decay: Any
                                ) -> tuple[float, float]:
    """(A, S2) with ``rho = A^2 / (2 sigma^2 S2)``: A the total shift budget, S2 = sum_{k<T} c^{2k}."""
    T = _steps(steps)
    gamma = _real("lr", lr, lo=0.0, lo_open=True)
    c0 = _real("c0", c0, lo=0.0)
    c1 = _real("c1", c1, lo=0.0, lo_open=True)
    lam = _real("weight_decay", weight_decay, lo=0.0)
    x = gamma * lam
    if not x < 1.0:
        raise ValueError(f"lr * weight_decay must be < 1 (contraction c = 1 - lr*weight_decay > 0), "
                         f"got lr={lr!r}, weight_decay={weight_decay!r} (product {x!r})")
    if x == 0.0:
        return 2.0 * c0 + 2.0 * gamma * c1 * T, float(T)
    log_c = math.log1p(-x)
    c_pow_T = math.exp(T * log_c)
    s1 = -math.expm1(T * log_c) / x                    # sum_{k<T} c^k = (1 - c^T) / (1 - c)
    s2 = -math.expm1(2.0 * T * log_c) / (x * (2.0 - x))  # sum_{k<T} c^2k = (1 - c^2T) / (1 - c^2)
    return 2.0 * c0 * c_pow_T + 2.0 * gamma * c1 * s1, s2


def rho_gradient_clipping(*, sigma: float, steps: int, lr: float, c0: float, c1: float,
                          weight_decay: float = 0.0) -> float:
    """rho with ``D_alpha <= alpha * rho`` for the gradient-clipping operator.

    lambda = 0: ``(2 c0 + 2 lr c1 T)^2 / (2 sigma^2 T)``; lambda > 0, c = 1 - lr*lambda:
    ``(2 c0 c^T + 2 lr c1 sum_{k<T} c^k)^2 / (2 sigma^2 sum_{k<T} c^{2k})``. Rounded up by a few ulps.
    """
    sigma = _real("sigma", sigma, lo=0.0, lo_open=True)
    a, s2 = _gradient_clipping_geometry(steps=steps, lr=lr, c0=c0, c1=c1, weight_decay=weight_decay)
    denominator = 2.0 * sigma * sigma * s2
    if denominator == 0.0:
        raise ValueError(f"sigma={sigma!r} is too small for the accounting: sigma^2 underflows (no finite rho)")
    rho = (a * a) / denominator * (1.0 + 64.0 * _ULP)
    if not math.isfinite(rho):
        raise ValueError(f"rho overflows: sigma={sigma!r} is too small for lr={lr!r}, c0={c0!r}, c1={c1!r}, "
                         f"steps={steps!r} (no finite guarantee)")
    return rho


def epsilon_gradient_clipping(*, sigma: float, delta: float, steps: int, lr: float, c0: float,
                              c1: float, weight_decay: float = 0.0) -> float:
    """epsilon certified by the gradient-clipping operator at noise ``sigma`` (see :func:`rdp_to_dp`)."""
    delta = _delta(delta)
    rho = rho_gradient_clipping(sigma=sigma, steps=steps, lr=lr, c0=c0, c1=c1,
                                weight_decay=weight_decay)
    return rdp_to_dp(rho, delta)


def sigma_gradient_clipping(*, epsilon: float, delta: float, steps: int, lr: float, c0: float,
                            c1: float, weight_decay: float = 0.0) -> float:
    """Noise std for which the gradient-clipping operator certifies (epsilon, delta).

    The largest admissible rho is found directly (a one-dimensional maximisation over alpha), then
    sigma is rounded up until ``epsilon_gradient_clipping(sigma=result, ...) <= epsilon`` holds.
    """
    epsilon = _epsilon(epsilon)
    delta = _delta(delta)
    a, s2 = _gradient_clipping_geometry(steps=steps, lr=lr, c0=c0, c1=c1, weight_decay=weight_decay)
    rho = _max_rho_for_epsilon(epsilon, delta) * (1.0 - 1e-10)
    if not rho > 0.0:
        raise ValueError(f"epsilon={epsilon!r} is too small to certify at delta={delta!r}")
    sigma = a / math.sqrt(2.0 * s2 * rho)
    if not 0.0 < sigma < math.inf:
        raise ValueError(f"the noise certifying epsilon={epsilon!r}, delta={delta!r} with lr={lr!r}, c0={c0!r}, "
                         f"c1={c1!r}, steps={steps!r} is sigma = {sigma!r}, outside the floating-point range")
    kw = dict(delta=delta, steps=steps, lr=lr, c0=c0, c1=c1, weight_decay=weight_decay)
    bump = 1e-12
    while epsilon_gradient_clipping(sigma=sigma, **kw) > epsilon:
        sigma *= 1.0 + bump
        bump *= 4.0
        if bump > 1.0:  # pragma: no cover - the maximiser is never this far off
            raise RuntimeError("sigma_gradient_clipping failed to find a certifying sigma")
    return sigma


# --------------------------------------------------------------------------------------------
# Hockey-stick divergence of Gaussians and model clipping
# --------------------------------------------------------------------------------------------
def _hockey_stick_logs(eps: float, r: float) -> tuple[float, float]:
    """(log Q(eps/r - r/2), eps + log Q(eps/r + r/2)) for r > 0."""
    a = eps / r - 0.5 * r
    b = eps / r + 0.5 * r
    return float(log_ndtr(-a)), eps + float(log_ndtr(-b))


def hockey_stick_gaussian(epsilon: float, r: float) -> float:
    """theta_eps(r) = Q(eps/r - r/2) - e^eps Q(eps/r + r/2): the hockey-stick divergence
    E_{e^eps}(N(r, 1) || N(0, 1)), i.e. the delta of a Gaussian mechanism with sensitivity/std = r.

    Computed in log space (``log_ndtr``, ``-expm1``) and clamped to [0, 1]; r = 0 gives 0.
    """
    epsilon = _real("epsilon", epsilon, lo=0.0)
    r = _real("r", r, lo=0.0)
    if r == 0.0:
        return 0.0
    la, lb = _hockey_stick_logs(epsilon, r)
    if la == -math.inf:
        return 0.0
    value = math.exp(la) * -math.expm1(min(lb - la, 0.0))
    return min(1.0, max(0.0, value))


def _log_hockey_stick_upper(eps: float, r: float) -> float:
    """log of an upper bound on theta_eps(r): the log-space value rounded up by its error bound."""
    if r == 0.0 or eps == math.inf:
        return -math.inf
    la, lb = _hockey_stick_logs(eps, r)
    if la == -math.inf:
        return -math.inf
    err = 32.0 * _ULP * (abs(la) + abs(lb) + abs(eps) + 1.0)
    diff = min(lb - la, 0.0) - err
    return min(0.0, la + err + _log1mexp(diff))


def _log_delta_model_clipping(eps: float, sigma: float, sigma0: float, steps: int,
                              c0: float, c2: float, stop_below: float = -math.inf) -> float:
    """log delta_T of the contraction recursion (validated arguments), an upper bound.

    delta_t is non-increasing, so the loop may stop once log delta_t < ``stop_below`` (the value
    returned is then only known to be below it), or when a step leaves delta_t unchanged (a fixed
    point: every later step is the same). Same arithmetic as :func:`_log_hockey_stick_upper`,
    inlined: this loop is the hot path of :func:`sigma_model_clipping`.
    """
    log_delta = 0.0 if sigma0 == 0.0 else _log_hockey_stick_upper(eps, 2.0 * c0 / sigma0)
    log_em1 = eps + _log1mexp(-eps)  # log(e^eps - 1)
    r = 2.0 * c2 / sigma
    half_r, inv_r, ninf = 0.5 * r, 1.0 / r, -math.inf
    exp, log, log1p, expm1, lndtr, ulp = math.exp, math.log, math.log1p, math.expm1, log_ndtr, _ULP
    for _ in range(steps):
        if log_delta < stop_below or log_delta == ninf:
            break
        # eps_t = log(1 + (e^eps - 1)/delta_t) = logaddexp(log delta_t, log(e^eps - 1)) - log delta_t,
        # rounded down (theta is decreasing in eps, so this is sound).
        m, d = (log_delta, log_em1 - log_delta) if log_delta > log_em1 else (log_em1, log_delta - log_em1)
        hi = m + log1p(exp(d))
        eps_t = (hi - log_delta) - 8.0 * ulp * (abs(hi) + abs(log_delta))
        if eps_t < 0.0:
            eps_t = 0.0
        # log theta_{eps_t}(r), rounded up (see _log_hockey_stick_upper).
        if eps_t == math.inf:
            break
        la = float(lndtr(half_r - eps_t * inv_r))
        if la == ninf:
            log_delta = ninf
            break
        lb = eps_t + float(lndtr(-eps_t * inv_r - half_r))
        err = 32.0 * ulp * (abs(la) + abs(lb) + eps_t + 1.0)
        diff = (lb - la if lb < la else 0.0) - err
        log1m = log(-expm1(diff)) if diff > -0.6931471805599453 else log1p(-exp(diff))
        step = la + err + log1m
        if not step < 0.0 or log_delta + step == log_delta:
            break  # theta rounds to 1 or delta_t does not move: a fixed point
        log_delta += step
    return log_delta


def _model_clipping_args(epsilon, sigma0, steps, c0, c2):
    return (_epsilon(epsilon), _real("sigma0", sigma0, lo=0.0), _steps(steps),
            _real("c0", c0, lo=0.0), _real("c2", c2, lo=0.0, lo_open=True))


def delta_model_clipping(*, epsilon: float, sigma: float, sigma0: float, steps: int, c0: float,
                         c2: float) -> float:
    """delta_T of the model-clipping operator at level epsilon (Asoodeh et al. contraction).

    delta_0 = theta_eps(2 c0 / sigma0) (1 if sigma0 = 0); delta_{t+1} = delta_t theta_{eps_t}(2 c2 / sigma)
    with eps_t = log(1 + (e^eps - 1)/delta_t). Tracked in log space and rounded up at each step;
    the result may underflow to 0.0.
    """
    eps, sigma0, T, c0, c2 = _model_clipping_args(epsilon, sigma0, steps, c0, c2)
    sigma = _real("sigma", sigma, lo=0.0, lo_open=True)
    return math.exp(_log_delta_model_clipping(eps, sigma, sigma0, T, c0, c2))


def sigma_model_clipping(*, epsilon: float, delta: float, sigma0: float, steps: int, c0: float,
                         c2: float) -> float:
    """Smallest noise std (rounded up) for which the model-clipping operator certifies (epsilon, delta).

    Returns 0.0 when the initial noise alone already gives delta_0 <= delta (the noisy-free steps are
    then post-processing).
    """
    eps, sigma0, T, c0, c2 = _model_clipping_args(epsilon, sigma0, steps, c0, c2)
    delta = _delta(delta)
    log_target = math.log(delta)
    if sigma0 > 0.0 and _log_hockey_stick_upper(eps, 2.0 * c0 / sigma0) <= log_target:
        return 0.0
    # Root-find in log r (r = 2 c2 / sigma) on log(-log delta_T), which is smooth where log delta_T
    # is steep; stopping once delta_T < delta^1000 keeps it finite and cheap.
    log_neg_target = math.log(-log_target)
    stop = 1000.0 * log_target

    def sigma_of(log_r: float) -> float:
        sigma = 2.0 * c2 / math.exp(log_r)
        if not 0.0 < sigma < math.inf:
            raise ValueError(f"c2={c2!r} is outside the range the model-clipping accounting can represent "
                             f"(the noise 2*c2/r would be {sigma!r})")
        return sigma

    def excess(log_r: float) -> float:  # increasing in r
        sigma = sigma_of(log_r)
        neg_log_delta = -_log_delta_model_clipping(eps, sigma, sigma0, T, c0, c2, stop)
        return log_neg_target - math.log(min(max(neg_log_delta, 1e-300), -stop))

    lo, hi = -2.0, 2.0  # bracket log r: excess(lo) <= 0 < excess(hi)
    f_lo = excess(lo)
    while f_lo > 0.0:
        lo, hi = lo - 4.0, lo
        f_lo = excess(lo)
        if lo < -700.0:  # pragma: no cover - theta -> 0 as r -> 0
            raise RuntimeError("sigma_model_clipping: no certifying sigma found")
    while excess(hi) <= 0.0:
        lo, hi = hi, hi + 4.0
        if hi > 700.0:  # pragma: no cover - would need delta_0 <= delta, handled above
            raise RuntimeError("sigma_model_clipping: no certifying sigma found")
    log_r = brentq(excess, lo, hi, xtol=1e-10, rtol=1e-12)
    sigma = sigma_of(log_r)
    bump = 1e-12
    while _log_delta_model_clipping(eps, sigma, sigma0, T, c0, c2) > log_target:
        sigma *= 1.0 + bump
        bump *= 4.0
    return sigma


# --------------------------------------------------------------------------------------------
# Output perturbation
# --------------------------------------------------------------------------------------------
def _log_r_analytic_gaussian(eps: float, log_delta: float) -> float:
    """log of (nearly) the largest r = sensitivity / sigma whose hockey-stick bound certifies
    (eps, delta): the root of ``log theta_eps(r) = log delta`` in log r (Balle & Wang 2018, Thm. 8).

    theta_eps increases from 0 (r -> 0) to 1 (r -> inf), so the root exists for every eps > 0 and
    0 < delta < 1; it lies in log r < 356 (theta ~ 1 beyond sqrt(2 eps)) and, when r underflows
    (theta(0) = 0), above -746. Callers check the sigma they derive from it.
    """
    floor = log_delta - 50.0  # keeps the function finite (-inf where theta underflows) for brentq

    def excess(log_r: float) -> float:  # non-decreasing in log r
        return max(_log_hockey_stick_upper(eps, math.exp(log_r)), floor) - log_delta

    lo, hi = -2.0, 2.0
    while excess(lo) > 0.0:
        lo, hi = lo - 4.0, lo
    while excess(hi) <= 0.0:
        lo, hi = hi, hi + 4.0
    return brentq(excess, lo, hi, xtol=1e-12, rtol=1e-12)


def sigma_output_perturbation(*, epsilon: float, delta: float, c0: float) -> float:
    """Noise std sigma0 for output perturbation ``clip(x, c0) + N(0, sigma0^2 I)``, as the float32
    noise kernels then use it.

    The exact analytic Gaussian mechanism (Balle & Wang 2018) for every epsilon: the smallest sigma
    with ``Phi(D/(2 sigma) - epsilon sigma/D) - e^epsilon Phi(-D/(2 sigma) - epsilon sigma/D) <= delta``
    (``hockey_stick_gaussian(epsilon, D / sigma) <= delta``), evaluated in log space and rounded up.
    The sensitivity is ``D = 2 c0 * CLIP_SLACK``: the float32 projection onto the c0 ball can exceed
    c0 by a few ulps. The result is rounded up to float32 (the value the kernels add exactly), so it
    is at least the exact value. The classical ``2 c0 sqrt(2 log(1.25/delta)) / epsilon`` (valid for
    epsilon <= 1 only) needs more noise: at delta = 1e-5, 30% more at epsilon = 1 (this sigma is 23%
    below it) and 38% more at epsilon = 0.5 (27% below), the gap growing as epsilon shrinks.
    c0 = 0 needs no noise (0.0). A sigma beyond the float32 range is a ValueError naming the arguments.
    """
    epsilon = _epsilon(epsilon)
    delta = _delta(delta)
    c0 = _real("c0", c0, lo=0.0)
    if c0 == 0.0:
        return 0.0
    log_delta = math.log(delta)
    log_r = _log_r_analytic_gaussian(epsilon, log_delta)
    log_sens = math.log(2.0 * CLIP_SLACK) + math.log(c0)  # no overflow, even at c0 near the float64 maximum
    log_sigma = log_sens - log_r
    if not log_sigma <= _LOG_FLOAT32_MAX:
        raise ValueError(
            f"output perturbation with c0={c0!r} at epsilon={epsilon!r}, delta={delta!r} needs noise "
            f"sigma0 = 10^{log_sigma / math.log(10.0):.1f}, beyond the float32 range of the noise kernels "
            f"({FLOAT32_MAX:.4g}): lower c0 or raise epsilon/delta")
    sens = 2.0 * c0 * CLIP_SLACK

    def certifies(sigma: float) -> bool:
        return _log_hockey_stick_upper(epsilon, sens / sigma) <= log_delta

    sigma = float32_up(math.exp(log_sigma))
    for _ in range(64):  # the root is accurate to ~1e-12, one float32 step (6e-8) is plenty
        if certifies(sigma):
            break
        sigma = float(np.nextafter(np.float32(sigma), np.float32(np.inf)))
    else:  # pragma: no cover - the root finder is never this far off
        raise RuntimeError("sigma_output_perturbation failed to find a certifying sigma")
    if not sigma <= FLOAT32_MAX:  # pragma: no cover - only within 64 float32 steps of the maximum
        raise ValueError(f"output perturbation with c0={c0!r} at epsilon={epsilon!r}, delta={delta!r} needs "
                         f"noise beyond the float32 range of the noise kernels ({FLOAT32_MAX:.4g})")
    return sigma


# --------------------------------------------------------------------------------------------
# DP-SGD (baseline, certified by training): subsampled Gaussian, RDP and PLD accountants
# --------------------------------------------------------------------------------------------
#: The DP-SGD accountants: privacy loss distributions (Google's ``dp-accounting``, pessimistic
#: discretisation: an upper bound) and Rényi DP (Opacus' sampled-Gaussian RDP, Mironov et al. 2019).
DPSGD_ACCOUNTANTS = ("pld", "rdp")
#: RDP orders of the DP-SGD accountant: Opacus' defaults (1.1 .. 63) extended to 1024, so small-noise
#: runs are not stuck at the largest default order (any set of orders gives a valid bound).
DPSGD_RDP_ORDERS: list[float] = ([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
                                 + [320, 384, 512, 768, 1024])
#: PLD grid step at small epsilon; coarser (still pessimistic) when the RDP epsilon is large.
_PLD_INTERVAL = 1e-3


def _dpsgd_history(history: Any) -> list[tuple[float, float, int]]:
    """Validated ``[(noise_multiplier, sample_rate, steps), ...]``."""
    try:
        rows = [tuple(h) for h in history]
    except TypeError:
        raise TypeError(f"history must be a list of (noise_multiplier, sample_rate, steps), got {history!r}") from None
    out = []
    for row in rows:
        if len(row) != 3:
            raise ValueError(f"history rows are (noise_multiplier, sample_rate, steps), got {row!r}")
        sigma = _real("noise_multiplier", row[0], lo=0.0)
        q = _real("sample_rate", row[1], lo=0.0, lo_open=True, hi=1.0)
        out.append((sigma, q, _steps(row[2])))
    return out


def _group_of(sigma: float, q: float, group_size: int) -> tuple[float, float]:
    """The subsampled Gaussian that dominates a group of ``group_size`` samples (rounded to the safe side).

    The group's summed clipped gradients move the noisy sum by at most ``group_size · C`` and at least one of
    them is in a Poisson batch with probability ``q_k = 1 − (1 − q)^k``. By joint convexity of the hockey-stick
    (and Rényi) divergences over which group members are sampled, the step is dominated by the
    subsampled Gaussian with rate ``q_k`` and noise multiplier ``σ / k`` (one "super-sample"), in both
    directions of add/remove and, for a substitution of the group, by that mechanism's replace-one pair."""
    if group_size == 1:
        return sigma, q
    q_k = min(1.0, float(np.nextafter(-math.expm1(group_size * math.log1p(-q)), 2.0))) if q < 1 else 1.0
    return float(np.nextafter(sigma / group_size, 0.0)), q_k


def _effective(history, group_size: int) -> list[tuple[float, float, int]]:
    # CLIP_SLACK: float32 clipping can exceed C by a few ulps; the sensitivity is C * CLIP_SLACK.
    return [(*_group_of(float(np.nextafter(s / CLIP_SLACK, 0.0)), q, group_size), n) for s, q, n in history]


def _epsilon_rdp(history, delta: float) -> float:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=DPSGD_RDP_ORDERS) for s, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": any order is a valid bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=DPSGD_RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps) if math.isfinite(eps) else math.inf


def _epsilon_pld(history, delta: float, *, replace: bool, interval: float) -> float:
    try:
        from dp_accounting.pld import privacy_loss_distribution as pld_lib
        from dp_accounting import NeighboringRelation
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the PLD accountant needs the 'dp-accounting' package (pip install dp-accounting)") from exc
    relation = NeighboringRelation.REPLACE_ONE if replace else NeighboringRelation.ADD_OR_REMOVE_ONE
    total = None
    for s, q, n in history:
        one = pld_lib.from_gaussian_mechanism(standard_deviation=s, sensitivity=1.0, sampling_prob=q,
                                              pessimistic_estimate=True, value_discretization_interval=interval,
                                              neighboring_relation=relation)
        part = one.self_compose(n)
        total = part if total is None else total.compose(part)
    eps = float(total.get_epsilon_for_delta(delta))
    return eps if math.isfinite(eps) else math.inf


def _two_groups(epsilon_of: Callable[[float], float], delta: float) -> float:
    """Substitution of a group as removal then addition: ``(2 ε_k, (1 + e^{ε_k}) δ_k)``, with ``δ_k`` chosen
    so that this is ``<= delta`` (ε_k at δ_k from ``epsilon_of``)."""
    cap = 1.0
    while cap < 700.0:
        eps = epsilon_of(delta / (1.0 + math.exp(cap)))
        if eps <= cap:
            return 2.0 * eps
        cap = min(700.0, max(2.0 * cap, eps))
    return math.inf


def _lemma_group(epsilon_of: Callable[[float], float], delta: float, k: int) -> float:
    """The group-privacy lemma at a *fixed* final delta: ``k ε_1`` with ``ε_1`` the one-sample epsilon at
    ``δ_1`` such that ``k e^{(k−1) ε_1} δ_1 <= delta`` (Vadhan 2017, Lemma 2.2); ``inf`` if none is found."""
    cap = epsilon_of(delta)
    for _ in range(60):
        log_share = math.log(k) + (k - 1) * cap
        if not math.isfinite(cap) or log_share > 700.0:
            return math.inf
        eps = epsilon_of(delta * math.exp(-log_share))
        if eps <= cap:
            return k * eps
        cap = 1.02 * eps + 1e-3
    return math.inf


def epsilon_dpsgd(history, delta: float, *, accountant: str = "pld", group_size: int = 1,
                  substitution: bool = False) -> float:
    """ε at ``delta`` of DP-SGD with Poisson sampling (the subsampled Gaussian mechanism) over ``history``, a
    list of ``(noise_multiplier, sample_rate, steps)`` (noise std ``noise_multiplier · C`` on the sum of
    per-sample gradients clipped to ``C``), for datasets that differ in

    * one sample added or removed (``group_size=1``, the usual DP-SGD guarantee), or
    * ``group_size = k`` samples added or removed, or with ``substitution=True`` ``k`` samples **changed**
      (a coarse mask refined to a fine one is a change of that image's sample): the group bound of
      :func:`_group_of` (rate ``1 − (1 − q)^k``, noise multiplier ``σ / k``), far tighter than the generic
      ``(kε, k e^{(k−1)ε} δ)`` of :func:`pyunlearn.optim.dpsgd.group_privacy`, but still growing roughly like
      ``k`` in the noise multiplier: see :meth:`pyunlearn.optim.DPSGD.group_epsilon`. Where the generic
      lemma at the same final ``delta`` (:func:`_lemma_group`, ``2k`` for a substitution) is smaller (few
      steps, small ε), that is returned: both are valid.

    ``accountant="pld"`` (default): privacy loss distributions from ``dp-accounting`` with pessimistic
    discretisation (an upper bound; 8-15% below RDP for typical DP-SGD runs); a substitution uses its
    replace-one relation. ``"rdp"``: Opacus' RDP of the sampled Gaussian over :data:`DPSGD_RDP_ORDERS`
    with the improved RDP conversion; a substitution is a removal then an addition (:func:`_two_groups`).
    Clip bounds carry the float32 slack ``CLIP_SLACK``. A zero noise multiplier gives ``inf``."""
    rows = _dpsgd_history(history)
    delta = _delta(delta)
    if accountant not in DPSGD_ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {DPSGD_ACCOUNTANTS}, got {accountant!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not isinstance(substitution, bool):
        raise TypeError(f"substitution must be a bool, got {substitution!r}")
    if not rows:
        return 0.0
    if any(s == 0.0 for s, _, _ in rows):
        return math.inf
    k = int(group_size)
    sampled = _epsilon_group(rows, delta, accountant, k, substitution)
    if k == 1 and not substitution:
        return sampled
    lemma = _lemma_group(lambda d: _epsilon_group(rows, d, accountant, 1, False), delta,
                         2 * k if substitution else k)
    return min(sampled, lemma)


def _epsilon_group(rows, delta: float, accountant: str, k: int, substitution: bool) -> float:
    """The sampled-group bound of :func:`_group_of` with the chosen accountant."""
    eff = _effective(rows, k)
    if accountant == "rdp":
        if substitution:
            return _two_groups(lambda d: _epsilon_rdp(eff, d), delta)
        return _epsilon_rdp(eff, delta)
    # A grid step proportional to the privacy loss keeps large-epsilon cases fast (coarser is still an
    # upper bound); RDP gives the scale.
    guide = _epsilon_rdp(eff, delta)
    if not math.isfinite(guide):
        return math.inf
    interval = _PLD_INTERVAL * max(1.0, guide / 10.0) * (2.0 if substitution else 1.0)
    return _epsilon_pld(eff, delta, replace=substitution, interval=interval)


def noise_multiplier_dpsgd(*, epsilon: float, delta: float, sample_rate: float, steps: int,
                           accountant: str = "pld", group_size: int = 1, substitution: bool = False,
                           rtol: float = 1e-3) -> float:
    """The noise multiplier σ for which :func:`epsilon_dpsgd` of ``steps`` steps at ``sample_rate`` is at most
    ``epsilon`` (bisection on log σ; the returned σ is checked, within ``rtol`` of the smallest such σ)."""
    epsilon = _epsilon(epsilon)
    delta = _delta(delta)
    q = _real("sample_rate", sample_rate, lo=0.0, lo_open=True, hi=1.0)
    steps = _steps(steps)

    def spent(sigma: float) -> float:
        return epsilon_dpsgd([(sigma, q, steps)], delta, accountant=accountant, group_size=group_size,
                             substitution=substitution)

    lo, hi = 0.0, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e12:
            raise ValueError(f"no noise multiplier below 1e12 gives epsilon={epsilon} at delta={delta}")
    if lo == 0.0:
        lo = hi / 2.0
        while lo > 1e-6 and spent(lo) <= epsilon:
            lo, hi = lo / 2.0, lo
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Certificate: value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


@dataclass
class Certificate:
    """An (epsilon, delta) unlearning certificate and what it covers and assumes."""

    epsilon: float
    delta: float
    operator: str
    hyperparameters: dict = field(default_factory=dict)
    parameters: list[str] = field(default_factory=list)  # names of the covered parameters
    assumptions: list[str] = field(default_factory=list)
    seeded: bool = False  # True when the noise came from a user seed (reproducible, not secret)
    #: What the run released that this certificate does NOT cover (e.g. diagnostics of the noisy phase).
    not_covered: list[str] = field(default_factory=list)
    #: The part of ``delta`` that bounds the implemented sampler's distance to the ideal Gaussian
    #: (``pyunlearn.ops.rng.noise_tv_bound``); the analysis itself used ``delta - noise_delta``.
    noise_delta: float = 0.0
    #: Parameters of the released model that the operator left untouched (frozen): the certificate covers
    #: them only under the assumption that they never saw the private data (they are public). Empty when
    #: the caller did not list them.
    public_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real) \
                or math.isnan(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"Certificate.epsilon must be a real >= 0 (inf allowed), got {self.epsilon!r}")
        if isinstance(self.delta, bool) or not isinstance(self.delta, numbers.Real) \
                or not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"Certificate.delta must lie in [0, 1], got {self.delta!r}")
        if not isinstance(self.operator, str) or not self.operator:
            raise ValueError(f"Certificate.operator must be a non-empty string, got {self.operator!r}")
        if not isinstance(self.hyperparameters, dict) or \
                not all(isinstance(k, str) for k in self.hyperparameters):
            raise TypeError("Certificate.hyperparameters must be a dict with string keys, "
                            f"got {self.hyperparameters!r}")
        for name in ("parameters", "assumptions", "not_covered", "public_parameters"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"Certificate.{name} must be a list of strings, got {value!r}")
            setattr(self, name, list(value))
        if not isinstance(self.seeded, (bool, np.bool_)):
            raise TypeError(f"Certificate.seeded must be a bool, got {self.seeded!r}")
        if isinstance(self.noise_delta, bool) or not isinstance(self.noise_delta, numbers.Real) \
                or not 0.0 <= self.noise_delta <= self.delta:
            raise ValueError(f"Certificate.noise_delta must lie in [0, delta], got {self.noise_delta!r}")
        self.epsilon, self.delta, self.seeded = float(self.epsilon), float(self.delta), bool(self.seeded)
        self.noise_delta = float(self.noise_delta)

    @property
    def secret(self) -> bool:
        """Whether the noise key was secret (drawn from the OS), i.e. the guarantee holds as stated."""
        return not self.seeded

    def to_dict(self) -> dict:
        """A deep copy as a plain dict (field names as keys)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Certificate":
        """Inverse of :meth:`to_dict`; unknown keys are an error, ``seeded`` defaults to False."""
        if not isinstance(d, dict):
            raise TypeError(f"Certificate.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Certificate.from_dict: unknown keys {sorted(unknown)}")
        missing = {"epsilon", "delta", "operator"} - set(d)
        if missing:
            raise ValueError(f"Certificate.from_dict: missing keys {sorted(missing)}")
        return cls(**json.loads(json.dumps(d, default=_jsonable)))

    def to_json(self) -> str:
        """JSON text (infinite epsilon is written as ``Infinity``, as Python's json does)."""
        return json.dumps(self.to_dict(), default=_jsonable, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Certificate":
        return cls.from_dict(json.loads(s))

    def __str__(self) -> str:
        n = len(self.parameters)
        shown = ", ".join(self.parameters[:4]) + (", ..." if n > 4 else "")
        hp = ", ".join(f"{k}={v!r}" for k, v in sorted(self.hyperparameters.items()))
        text = f"secret: {'false' if self.seeded else 'true'}\n"
        text += (f"({self.epsilon:.4g}, {self.delta:.3g})-certified unlearning by operator "
                f"'{self.operator}' covering {n} parameter{'s' if n != 1 else ''}"
                f"{' (' + shown + ')' if n else ''}")
        if hp:
            text += f"; hyperparameters: {hp}"
        if self.noise_delta:
            text += f"; delta includes {self.noise_delta:.3g} for the sampler's distance to the ideal Gaussian"
        if self.public_parameters:
            k = len(self.public_parameters)
            text += f"; {k} frozen parameter{'s' if k != 1 else ''} assumed public"
        if self.assumptions:
            text += "; assumes: " + "; ".join(self.assumptions)
        if self.not_covered:
            text += "; NOT covered: " + "; ".join(self.not_covered)
        if self.seeded:
            text += "; noise drawn from a user seed (reproducible, not secret: the guarantee holds " \
                    "only if the seed is kept from the adversary)"
        return text + "."
