"""DP-SGD (Abadi et al. 2016) with Opacus' arithmetic, counter-based noise and group privacy.

Each ``step()`` takes ``p.grad`` as the **sum of clipped per-sample gradients** (written by
:meth:`pyunlearn.per_sample.PerSampleGradients.clipped_sum_`) and applies, through
:func:`pyunlearn.ops.dpsgd_step_`,

    g = (Σ_i clip(g_i, C) + N(0, (noise_multiplier · C)² I)) / expected_batch_size
    x ← x − lr · (g + weight_decay · x)

which is exactly what Opacus' ``DPOptimizer`` (``loss_reduction="mean"``) followed by ``torch.optim.SGD``
computes. The noise is the project's counter-based Philox noise keyed by ``(seed, step)``.
Privacy is accounted with Opacus' RDP accountant of the subsampled Gaussian mechanism.

Under ``torch.distributed`` (torchrun) each rank clips its own samples, ``step()`` sums the clipped
sums over all ranks, and every rank adds the same seeded noise, so the parameters stay identical;
``expected_batch_size`` and ``sample_rate`` then describe the *global* batch. Do not wrap the model in
DDP for DP-SGD: its gradients bypass autograd's reducer (``PerSampleGradients`` writes them).
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Optional

import numpy as np
import torch

from .. import ops
from .._validation import count, positive, probability
from ..per_sample import clipped_sum_info
from ._certified import draw_secure_seed

__all__ = ["DPSGD", "group_privacy"]

_KEY = "dpsgd"
#: odd 64-bit constant: parameter group g > 0 draws its noise with key seed + g * _GROUP_STRIDE (mod 2^63).
_GROUP_STRIDE = 0x9E3779B97F4A7C15
#: RDP orders: Opacus' defaults (1.1 .. 63) extended to 1024, so small-noise runs are not stuck at the
#: largest default order (any set of orders gives a valid bound; more orders give a tighter one).
RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256)) + [320, 384, 512, 768, 1024]


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    r"""(ε, δ)-DP for single samples ⇒ (kε, k·e^{(k−1)ε}·δ)-DP for groups of ``k`` samples.

    Vadhan, "The Complexity of Differential Privacy" (2017), Lemma 2.2 (group privacy); see also
    Dwork & Roth (2014), Theorem 2.2, for the pure case. δ is capped at 1 (a vacuous guarantee).
    """
    k = count(k, "k")
    if not epsilon >= 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    delta = positive(delta, "delta", allow_zero=True)
    if k == 1:
        return float(epsilon), delta
    if math.isinf(epsilon):
        return math.inf, 1.0 if delta > 0 else 0.0
    if delta == 0:
        return k * epsilon, 0.0
    log_delta_k = math.log(k) + (k - 1) * epsilon + math.log(delta)
    return k * epsilon, 1.0 if log_delta_k >= 0 else math.exp(log_delta_k)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _secure_gaussian(numel: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise from the OS CSPRNG, hardened against floating-point attacks as Opacus'
    ``secure_mode``: the sum of 4 independent normals divided by 2 (Holohan et al., arXiv:2107.10138)."""
    raw = np.frombuffer(os.urandom(8 * 4 * numel), dtype=np.uint64).reshape(4, numel) >> np.uint64(11)
    u = (raw.astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    r0, r1 = np.sqrt(-2.0 * np.log(u[0])), np.sqrt(-2.0 * np.log(u[2]))
    z = (r0 * np.cos(2 * np.pi * u[1]) + r0 * np.sin(2 * np.pi * u[1])
         + r1 * np.cos(2 * np.pi * u[3]) + r1 * np.sin(2 * np.pi * u[3])) / 2.0
    return torch.from_numpy(z.astype(np.float32)).to(device)


class DPSGD(torch.optim.Optimizer):
    r"""Differentially private SGD on sums of clipped per-sample gradients.

    Args (keyword-only, except ``params``):
        lr: learning rate (> 0). weight_decay: L2 coefficient λ (≥ 0), applied as ``lr·λ·x``.
        noise_multiplier: σ ≥ 0; the noise std on the gradient sum is σ·C. Or leave it ``None`` and give
            ``epsilon``, ``delta``, ``steps`` and ``sample_rate`` to calibrate σ with
            ``opacus.accountants.utils.get_noise_multiplier`` (RDP accountant).
        max_grad_norm: the per-sample clipping norm C (> 0); must equal the ``C`` given to ``clipped_sum_``.
        expected_batch_size: divisor of the noisy sum (> 0), e.g. ``sample_rate · N`` under Poisson sampling.
        sample_rate: Poisson sampling rate q in (0, 1], needed for accounting (:meth:`epsilon`).
        epsilon, delta, steps: target budget for calibration; ``delta`` (in (0, 1)) is also the default of
            :meth:`epsilon`. Accounting uses the RDP orders :data:`RDP_ORDERS`.
        seed: int in [0, 2**63) for reproducible noise (``reproducible=True``; the seed is then *not*
            secret). ``None`` draws a secret seed from the OS entropy (``secrets.randbits(63)``).
        secure_rng: draw the noise from the OS CSPRNG with Opacus' floating-point hardening instead of
            the counter-based generator (not reproducible; excludes ``seed``).
        check_clipped: refuse gradients not written by ``PerSampleGradients.clipped_sum_`` with this
            ``max_grad_norm`` (a plain ``backward()`` gradient would make the step non-private).

    Parameter groups may have their own ``lr`` and ``weight_decay``; σ, C and the batch size are
    global. With one group (the usual case) all parameters go through one ``dpsgd_step_`` call and
    noise element ``j`` of the concatenated parameters is ``gaussian_noise(seed, step)[j]``; with
    several groups ``dpsgd_step_`` is called once per group and group ``g > 0`` keys its noise with
    the derived seed ``(seed + g·0x9E3779B97F4A7C15) mod 2^63`` so no two groups share noise.
    Parameters with ``requires_grad=False`` are skipped; a trainable parameter without ``p.grad`` is
    treated as a zero clipped sum (it still receives noise and weight decay). A NaN/Inf gradient
    raises ``ValueError`` naming the parameter before anything changes.

    ``state_dict()`` holds the step counter and the accountant history, and the noise seed only when
    it was given (reproducible noise); a secret seed is never written, and a resumed run continues
    with fresh secret noise.
    """

    def __init__(self, params: Iterable, *, lr: float, max_grad_norm: float, expected_batch_size: float,
                 noise_multiplier: Optional[float] = None, sample_rate: Optional[float] = None,
                 epsilon: Optional[float] = None, delta: Optional[float] = None, steps: Optional[int] = None,
                 weight_decay: float = 0.0, seed: Optional[int] = None, secure_rng: bool = False,
                 check_clipped: bool = True):
        lr = positive(lr, "lr")
        weight_decay = positive(weight_decay, "weight_decay", allow_zero=True)
        self.max_grad_norm = positive(max_grad_norm, "max_grad_norm")
        self.expected_batch_size = positive(expected_batch_size, "expected_batch_size")
        if sample_rate is not None:
            sample_rate = positive(sample_rate, "sample_rate")
            if sample_rate > 1:
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.sample_rate = sample_rate
        self.delta = probability(delta, "delta") if delta is not None else None
        if steps is not None:
            steps = count(steps, "steps")
        if noise_multiplier is not None and epsilon is not None:
            raise ValueError("pass either noise_multiplier= or epsilon= (to calibrate it), not both")
        self.target: Optional[dict] = None
        if noise_multiplier is None:
            if epsilon is None:
                raise ValueError("pass noise_multiplier=, or epsilon=, delta=, steps= and sample_rate= to calibrate it")
            epsilon = positive(epsilon, "epsilon")
            missing = [n for n, v in (("delta", self.delta), ("steps", steps), ("sample_rate", sample_rate))
                       if v is None]
            if missing:
                raise ValueError(f"calibrating noise_multiplier for epsilon={epsilon} needs {', '.join(missing)}")
            from opacus.accountants.utils import get_noise_multiplier

            noise_multiplier = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=self.delta,
                                                          sample_rate=sample_rate, steps=steps, accountant="rdp",
                                                          alphas=RDP_ORDERS))
            self.target = dict(epsilon=epsilon, delta=self.delta, steps=steps, sample_rate=sample_rate)
        self.noise_multiplier = positive(noise_multiplier, "noise_multiplier", allow_zero=True)
        if not isinstance(secure_rng, bool):
            raise TypeError(f"secure_rng must be a bool, got {secure_rng!r}")
        if secure_rng and seed is not None:
            raise ValueError("pass either seed= (reproducible noise) or secure_rng=True, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.secure_rng = secure_rng
        self.reproducible = seed is not None
        self.seed = seed if seed is not None else draw_secure_seed()
        self.check_clipped = bool(check_clipped)
        self.steps_taken = 0
        self._history: list[list] = []  # [noise_multiplier, sample_rate, n_steps], as Opacus' accountant
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        for key in ("lr", "weight_decay"):
            if key in param_group:
                positive(param_group[key], f"param group {key}", allow_zero=key == "weight_decay")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_floating_point():
                raise TypeError(f"DPSGD parameters must be floating point, got {p.dtype}")

    # ------------------------------------------------------------------------------------ step
    @staticmethod
    def _name(group: dict, gi: int, j: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names:
            return repr(names[j])
        info = clipped_sum_info(p.grad, check_version=False)
        return repr(info[1]) if info else f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)})"

    def _collect(self) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
        """Per group: trainable parameters and their gradients, validated before anything changes."""
        out, any_grad = [], False
        for gi, group in enumerate(self.param_groups):
            ps, gs = [], []
            for j, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                g = p.grad
                if g is None:
                    g = torch.zeros_like(p)
                else:
                    any_grad = True
                    name = self._name(group, gi, j, p)
                    if g.is_sparse:
                        raise TypeError(f"gradient of {name} is sparse; DPSGD needs dense gradients")
                    if g.shape != p.shape:
                        raise ValueError(f"gradient of {name} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")
                    if self.check_clipped:
                        info = clipped_sum_info(g)
                        if info is None:
                            raise ValueError(
                                f"gradient of {name} was not written by PerSampleGradients.clipped_sum_ (or was "
                                "modified since): DP-SGD needs the sum of clipped per-sample gradients. Pass "
                                "check_clipped=False if you computed that sum yourself.")
                        if not math.isclose(info[0], self.max_grad_norm, rel_tol=1e-12):
                            raise ValueError(f"gradient of {name} was clipped with max_grad_norm={info[0]} but "
                                             f"the optimizer uses max_grad_norm={self.max_grad_norm}")
                ps.append(p)
                gs.append(g)
            out.append((group, ps, gs))
        if not any_grad:
            raise ValueError("DPSGD.step(): no parameter has a gradient; call PerSampleGradients.clipped_sum_ "
                             "after loss.backward()")
        flat = [g for _, _, gs in out for g in gs]
        finite = torch.stack([torch.isfinite(g).all() for g in flat]).cpu() if flat else torch.ones(0, dtype=bool)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            for gi, group in enumerate(self.param_groups):
                for j, p in enumerate(group["params"]):
                    if p.requires_grad:
                        if bad == 0:
                            raise ValueError(f"gradient of {self._name(group, gi, j, p)} contains NaN or Inf; "
                                             "the step was not taken and the parameters are unchanged")
                        bad -= 1
        return out

    def _group_seed(self, gi: int) -> int:
        return (self.seed + gi * _GROUP_STRIDE) % 2**63

    # NOTE: torch.compile (2.13) drops the write to ``steps_taken`` when a graph break follows it in the
    # same frame, so a compiled step would reuse the previous step's noise; the step always runs eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One DP-SGD update of every parameter group; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.steps_taken >= 2**32:
            raise RuntimeError("DPSGD: the counter-based noise supports at most 2**32 steps per seed")
        work = self._collect()
        std = self.noise_multiplier * self.max_grad_norm
        world = _world_size()
        for gi, (group, ps, gs) in enumerate(work):
            if not ps:
                continue
            if world > 1:  # clip per sample on each rank, then sum the clipped sums over the global batch
                gs = [g.clone() for g in gs]
                for g in gs:
                    torch.distributed.all_reduce(g)
            sigma = self.noise_multiplier
            if self.secure_rng and std > 0:
                gs = [g.to(torch.promote_types(g.dtype, torch.float32))
                      + std * _secure_gaussian(g.numel(), g.device).view_as(g) for g in gs]
                for g in gs if world > 1 else ():  # one draw of OS noise, shared by every rank
                    torch.distributed.broadcast(g, src=0)
                sigma = 0.0
            ops.dpsgd_step_(ps, gs, lr=float(group["lr"]), noise_multiplier=sigma,
                            max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected_batch_size,
                            weight_decay=float(group["weight_decay"]), seed=self._group_seed(gi),
                            step=self.steps_taken)
        self.steps_taken += 1
        last = self._history[-1] if self._history else None
        if last is not None and last[0] == self.noise_multiplier and last[1] == self.sample_rate:
            last[2] += 1
        else:
            self._history.append([self.noise_multiplier, self.sample_rate, 1])
        return loss

    # ------------------------------------------------------------------------------ accounting
    def _delta(self, delta: Optional[float]) -> float:
        if delta is None:
            if self.delta is None:
                raise ValueError("pass delta= (or give delta= to the constructor)")
            return self.delta
        return probability(delta, "delta")

    def epsilon(self, delta: Optional[float] = None) -> float:
        """ε spent so far at ``delta`` (RDP accountant over the steps actually taken; inf without noise)."""
        delta = self._delta(delta)
        if not self._history:
            return 0.0
        if any(q is None for _, q, _ in self._history):
            raise ValueError("DPSGD.epsilon(): sample_rate was not given, so the privacy spent cannot be accounted")
        if any(s == 0 for s, _, _ in self._history):
            return math.inf
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in self._history]
        return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))

    def group_epsilon(self, k: int, delta: Optional[float] = None, *,
                      substitution: bool = False) -> tuple[float, float]:
        """(ε_k, δ_k) for deleting (adding) ``k`` samples: ``(k·ε, k·e^{(k−1)ε}·δ)`` with ε =
        :meth:`epsilon` at ``delta`` (group privacy, Vadhan 2017, Lemma 2.2); δ_k is capped at 1.

        The accountant's neighbours differ by one added or removed sample, so *changing* a sample (a
        coarse mask refined to a fine one) is a removal plus an addition: ``substitution=True`` uses a
        group of ``2k``."""
        delta = self._delta(delta)
        k = count(k, "k")
        return group_privacy(self.epsilon(delta), delta, 2 * k if substitution else k)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_KEY] = dict(
            # A secret seed never leaves the process: with it the noise could be regenerated.
            steps_taken=self.steps_taken, seed=self.seed if self.reproducible else None,
            reproducible=self.reproducible,
            secure_rng=self.secure_rng, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, sample_rate=self.sample_rate, delta=self.delta,
            history=[list(h) for h in self._history], target=dict(self.target) if self.target else None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _KEY not in state_dict:
            raise ValueError(f"not a DPSGD state_dict: missing the '{_KEY}' entry")
        saved = state_dict[_KEY]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _KEY})
        self.steps_taken = int(saved["steps_taken"])
        self.reproducible = bool(saved["reproducible"])
        # Secret noise continues from a fresh secret seed (independent noise for the remaining steps).
        self.seed = int(saved["seed"]) if self.reproducible else draw_secure_seed()
        self.secure_rng = bool(saved["secure_rng"])
        self.noise_multiplier = float(saved["noise_multiplier"])
        self.max_grad_norm = float(saved["max_grad_norm"])
        self.expected_batch_size = float(saved["expected_batch_size"])
        self.sample_rate = saved["sample_rate"]
        self.delta = saved["delta"]
        self._history = [list(h) for h in saved["history"]]
        self.target = dict(saved["target"]) if saved.get("target") else None
