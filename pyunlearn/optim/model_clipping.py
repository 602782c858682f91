"""Noisy fine-tuning with model clipping (projected noisy GD; hockey-stick contraction accounting)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .. import _validation, certify, ops
from .._validation import positive
from ..ops.rng import STREAM_INIT
from ._certified import CLIP_SLACK, CertifiedOptimizer, float32_up, project_


def epsilon_model_clipping(*, delta: float, sigma: float, sigma0: float, steps: int, c0: float, c2: float,
                           target: Optional[float] = None, tolerance: float = 1e-4) -> float:
    """Smallest epsilon (up to ``tolerance``, rounded up) with ``delta_T(epsilon) <= delta``.

    ``sigma = 0`` makes the steps post-processing of the initial perturbation, so only ``sigma0`` counts.
    If ``target`` is certified it is returned whenever the search would give more.
    """
    def certified(eps: float) -> bool:
        if sigma == 0:
            return sigma0 > 0 and certify.hockey_stick_gaussian(eps, 2.0 * c0 / sigma0) <= delta
        return certify.delta_model_clipping(epsilon=eps, sigma=sigma, sigma0=sigma0, steps=steps,
                                            c0=c0, c2=c2) <= delta

    hi = 1.0
    while not certified(hi):
        hi *= 2.0
        if hi > 1e6:
            return float("inf")
    lo = 0.0
    while hi - lo > tolerance * max(hi, 1e-3):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if certified(mid) else (mid, hi)
    if target is not None and target < hi and certified(target):
        return float(target)
    return hi


class ModelClipping(CertifiedOptimizer):
    r"""Certified unlearning by projected noisy gradient descent on retain data.

    At construction: :math:`x_0 = \mathrm{clip}(\hat x, c_0) + \mathcal N(0, \sigma_0^2 I)` (``sigma0=0``
    allowed; the clip makes ``c0`` a true bound on the trained model's norm). Each ``step()``:

    .. math:: x \leftarrow \mathrm{clip}(x - \mathrm{lr}(\nabla L_r(x) + \lambda x), c_2) + \mathcal N(0, \sigma^2 I)

    ``epsilon`` and ``delta`` are the target; give ``sigma=`` to fix the noise (the certificate then
    reports the smallest epsilon the run achieves at ``delta``) or leave it out to calibrate it.
    """

    operator = "model_clipping"
    _identity_keys = ("lr", "c0", "c2", "weight_decay", "sigma", "sigma0")

    def __init__(self, params: Iterable, *, lr: float, c2: float, delta: float, steps: int,
                 epsilon: Optional[float] = None, sigma: Optional[float] = None, sigma0: float = 0.0,
                 c0: Optional[float] = None, weight_decay: float = 0.0, seed: Optional[int] = None,
                 secure_rng: Optional[bool] = None):
        lr = positive(lr, "lr")
        c2 = positive(c2, "c2")
        sigma0 = float32_up(positive(sigma0, "sigma0", allow_zero=True))
        c0 = c2 if c0 is None else positive(c0, "c0")
        weight_decay = positive(weight_decay, "weight_decay", allow_zero=True)
        if not lr * weight_decay < 1:
            raise ValueError(f"lr * weight_decay must be < 1, got {lr * weight_decay!r}")
        _validation.count(steps, "steps")
        _validation.probability(delta, "delta")
        if (sigma is None) == (epsilon is None):
            raise ValueError("pass exactly one of sigma= (noise level) or epsilon= (to calibrate sigma)")
        if sigma is None:
            epsilon = positive(epsilon, "epsilon")
        else:
            sigma = positive(sigma, "sigma", allow_zero=True)
        self.target_epsilon = epsilon
        defaults = dict(lr=lr, c0=c0, c2=c2, weight_decay=weight_decay, sigma=0.0 if sigma is None else sigma,
                        sigma0=sigma0)
        super().__init__(params, defaults, delta=delta, steps=steps, seed=seed, secure_rng=secure_rng)
        if sigma is None:
            sigma = certify.sigma_model_clipping(epsilon=epsilon, delta=self._calibration_delta(epsilon),
                                                 sigma0=sigma0, steps=steps, c0=c0 * CLIP_SLACK, c2=c2 * CLIP_SLACK)
        dict.__setitem__(self.hyper, "sigma", float32_up(sigma))
        self._frozen["sigma"] = self.hyper["sigma"]
        with torch.no_grad():
            project_(self.params, c0)
            ops.add_noise_(self.params, sigma=sigma0, key=self._key, step=0, stream=STREAM_INIT)
        self._start()

    def _noise_draws(self) -> int:
        return self.steps + (1 if self._frozen["sigma0"] > 0 else 0)

    def _apply(self, grads: list[torch.Tensor]) -> None:
        h = self._frozen
        result = ops.model_clipping_step_(
            self.params, grads, lr=h["lr"], max_model_norm=h["c2"], weight_decay=h["weight_decay"],
            sigma=h["sigma"], key=self._key, step=self.step_count, fp_key=self._fp_key,
            expected_fp=self._fingerprint)
        self.last_model_norm = self._finish_step(result, grads, "updated model's norm")

    def epsilon(self, delta: Optional[float] = None) -> float:
        h = self._frozen
        return epsilon_model_clipping(delta=self.delta if delta is None else delta, sigma=h["sigma"],
                                      sigma0=h["sigma0"], steps=self.steps, c0=h["c0"] * CLIP_SLACK,
                                      c2=h["c2"] * CLIP_SLACK, target=self.target_epsilon)
