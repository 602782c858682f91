"""Noisy fine-tuning with gradient clipping (Koloskova et al., ICML 2025)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .. import _validation, certify, ops
from .._validation import positive
from ._certified import CLIP_SLACK, CertifiedOptimizer, float32_up, project_


class GradientClipping(CertifiedOptimizer):
    r"""Certified unlearning by noisy fine-tuning on retain data with a clipped mini-batch gradient.

    At construction the parameters are projected onto the ball of radius ``c0`` (before any forward
    pass, so every gradient is taken at a clipped model). Each ``step()`` then applies, with global
    L2 norms over all parameters together,

    .. math:: x \leftarrow x - \mathrm{lr}\,(\mathrm{clip}(\nabla L_r(x), c_1) + \lambda x) + \mathcal N(0, \sigma^2 I)

    Give either ``sigma=`` or ``epsilon=`` (then ``sigma`` is calibrated for ``(epsilon, delta)`` over
    ``steps`` steps). ``delta`` and ``steps`` are always required: the certificate is issued after
    exactly ``steps`` steps. ``seed=`` derives the noise key from the seed (reproducible, NOT secret);
    without it the 256-bit ChaCha20 key comes from the operating system's entropy and is never stored.
    Hyper-parameters are frozen after construction (an LR scheduler or an edit of ``param_groups`` raises).
    """

    operator = "gradient_clipping"
    _identity_keys = ("lr", "c0", "c1", "weight_decay", "sigma")

    def __init__(self, params: Iterable, *, lr: float, c0: float, c1: float, delta: float, steps: int,
                 sigma: Optional[float] = None, epsilon: Optional[float] = None, weight_decay: float = 0.0,
                 seed: Optional[int] = None, secure_rng: Optional[bool] = None):
        lr = positive(lr, "lr")
        c0 = positive(c0, "c0")
        c1 = positive(c1, "c1")
        weight_decay = positive(weight_decay, "weight_decay", allow_zero=True)
        if not lr * weight_decay < 1:
            raise ValueError(f"lr * weight_decay must be < 1 (a contraction), got {lr * weight_decay!r}")
        _validation.count(steps, "steps")
        _validation.probability(delta, "delta")
        if (sigma is None) == (epsilon is None):
            raise ValueError("pass exactly one of sigma= (noise level) or epsilon= (to calibrate sigma)")
        if sigma is None:
            epsilon = positive(epsilon, "epsilon")
        else:
            sigma = positive(sigma, "sigma", allow_zero=True)
        # sigma is calibrated after the base class knows the parameter count (the sampler's share of delta).
        defaults = dict(lr=lr, c0=c0, c1=c1, weight_decay=weight_decay, sigma=0.0 if sigma is None else sigma)
        super().__init__(params, defaults, delta=delta, steps=steps, seed=seed, secure_rng=secure_rng)
        if sigma is None:
            sigma = certify.sigma_gradient_clipping(epsilon=epsilon, delta=self._calibration_delta(epsilon),
                                                    **self._accounting())
        dict.__setitem__(self.hyper, "sigma", float32_up(sigma))
        self._frozen["sigma"] = self.hyper["sigma"]
        project_(self.params, c0)
        self._start()

    def _accounting(self) -> dict:
        h = self._frozen
        return dict(steps=self.steps, lr=h["lr"], c0=h["c0"] * CLIP_SLACK, c1=h["c1"] * CLIP_SLACK,
                    weight_decay=h["weight_decay"])

    def _apply(self, grads: list[torch.Tensor]) -> None:
        h = self._frozen
        result = ops.gradient_clipping_step_(
            self.params, grads, lr=h["lr"], max_grad_norm=h["c1"], weight_decay=h["weight_decay"],
            sigma=h["sigma"], key=self._key, step=self.step_count, fp_key=self._fp_key,
            expected_fp=self._fingerprint)
        self.last_grad_norm = self._finish_step(result, grads, "gradient norm")

    def epsilon(self, delta: Optional[float] = None) -> float:
        sigma = self._frozen["sigma"]
        if sigma == 0:
            return float("inf")
        return certify.epsilon_gradient_clipping(sigma=sigma, delta=self.delta if delta is None else delta,
                                                 **self._accounting())
