"""DP-SGD (Abadi et al. 2016) with Opacus' arithmetic, ChaCha20 noise, PLD/RDP accounting and group privacy.

Each ``step()`` takes ``p.grad`` as the **sum of clipped per-sample gradients** (written by
:meth:`pyunlearn.per_sample.PerSampleGradients.clipped_sum_`) and applies, through
:func:`pyunlearn.ops.dpsgd_step_` (float64, rounded once to the parameter dtype),

    g = (Σ_i clip(g_i, C) + N(0, (noise_multiplier · C)² I)) / expected_batch_size
    x ← x − lr · (g + weight_decay · x)

which is exactly what Opacus' ``DPOptimizer`` (``loss_reduction="mean"``) followed by ``torch.optim.SGD``
computes. The noise is the project's ChaCha20 counter-mode noise (:mod:`pyunlearn.ops.rng`), keyed with a
256-bit key from the operating system, or derived from ``seed`` (reproducible, not secret).

**What the accountant assumes, and what is enforced.** The privacy accounting (PLD from ``dp-accounting``,
or Opacus' RDP; :func:`pyunlearn.certify.epsilon_dpsgd`) is that of the subsampled Gaussian mechanism with
**Poisson sampling** at rate ``sample_rate`` for the number of steps taken: draw the batches with
:class:`pyunlearn.data.PoissonBatchSampler` / :func:`pyunlearn.data.poisson_loader`, and take a step for
every batch, an empty one included (``PerSampleGradients.empty_batch_`` then ``step()``: a noise-only
step). Each step refuses, before writing anything:

* gradients not written by one ``PerSampleGradients`` covering exactly the trainable parameters of this
  optimizer with this ``max_grad_norm`` (two wrappers clipping to C each would give per-sample norms up to
  C·√2), or changed since (version counter and keyed fingerprint, so ``p.grad.data.mul_(100)`` is seen),
  or already used by a step;
* a hyper-parameter changed since construction (``lr``, ``weight_decay`` of any group, the noise
  multiplier, C, the batch size or the rate): they are frozen, an LR scheduler is refused;
* non-finite gradients.

Under ``torch.distributed`` (torchrun) each rank clips its own samples, ``step()`` sums the clipped
sums over all ranks, and every rank adds the same noise (the key is shared), so the parameters stay
identical; ``expected_batch_size`` and ``sample_rate`` then describe the *global* batch. Do not wrap the
model in DDP for DP-SGD: its gradients bypass autograd's reducer (``PerSampleGradients`` writes them).

**Group privacy and forgetting.** DP-SGD protects one *sample*: for segmentation, one image with its mask.
Refining the masks of ``k`` images changes ``k`` samples. :meth:`DPSGD.group_epsilon` bounds that with the
sampled-group bound of :func:`pyunlearn.certify.epsilon_dpsgd` (a "super-sample" with rate
``1 − (1 − q)^k`` and noise multiplier ``σ/k``), which is finite where the classical
``(kε, k e^{(k−1)ε} δ)`` (:func:`group_privacy`) is vacuous, but which needs a noise multiplier roughly
``k`` times larger for the same ε. At the demo's k = 60 changed images (600 private images, 10% fine
masks, batch 32, 400 steps) a run with σ = 1 (ε = 7.2 per image) has ε₆₀ ≈ 7·10⁵, and ε₆₀ = 1 needs
σ ≈ 8.6·10³ (noise std 270·C on the mean gradient): **DP-SGD does not certify forgetting 60 changed masks
at any noise level that still trains**; it is a baseline for forgetting a few samples.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable, Optional

import torch

from .. import certify, ops
from .._validation import count, positive, probability
from ..ops import rng
from ..per_sample import clipped_sum_info, inspect_clipped_sum
from ._certified import FrozenGroup, noise_delta

__all__ = ["DPSGD", "RDP_ORDERS", "group_privacy"]

_KEY = "dpsgd"
#: The RDP orders of the accountant (:data:`pyunlearn.certify.DPSGD_RDP_ORDERS`).
RDP_ORDERS: list[float] = certify.DPSGD_RDP_ORDERS
#: The optimizer-wide hyper-parameters (frozen at construction, with each group's lr and weight_decay).
_GLOBAL_HYPER = ("noise_multiplier", "max_grad_norm", "expected_batch_size", "sample_rate")


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    r"""(ε, δ)-DP for single samples ⇒ (kε, k·e^{(k−1)ε}·δ)-DP for groups of ``k`` samples.

    Vadhan, "The Complexity of Differential Privacy" (2017), Lemma 2.2 (group privacy); see also
    Dwork & Roth (2014), Theorem 2.2, for the pure case. δ is capped at 1 (a vacuous guarantee). Valid for
    any (ε, δ)-DP mechanism; for DP-SGD :meth:`DPSGD.group_epsilon` is much tighter.
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


def _hyper_of(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def _accountant(value: Any) -> str:
    if value not in certify.DPSGD_ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {certify.DPSGD_ACCOUNTANTS}, got {value!r}")
    return value


class DPSGD(torch.optim.Optimizer):
    r"""Differentially private SGD on sums of clipped per-sample gradients.

    Args (keyword-only, except ``params``):
        lr: learning rate (> 0). weight_decay: L2 coefficient λ (≥ 0), applied as ``lr·λ·x``.
        noise_multiplier: σ ≥ 0; the noise std on the gradient sum is σ·C. Or leave it ``None`` and give
            ``epsilon``, ``delta``, ``steps`` and ``sample_rate`` to calibrate σ with
            :func:`pyunlearn.certify.noise_multiplier_dpsgd` (with ``accountant``, ``group_size`` and
            ``substitution``: e.g. ``group_size=k, substitution=True`` calibrates for ``k`` changed samples).
        max_grad_norm: the per-sample clipping norm C (> 0); must equal the ``C`` given to ``clipped_sum_``.
        expected_batch_size: divisor of the noisy sum (> 0): ``sample_rate · N`` under Poisson sampling.
        sample_rate: Poisson sampling rate q in (0, 1], needed for accounting (:meth:`epsilon`).
        epsilon, delta, steps: target budget for calibration; ``delta`` (in (0, 1)) is also the default of
            :meth:`epsilon` and :meth:`certificate`.
        accountant: ``"pld"`` (default; privacy loss distributions, ``dp-accounting``) or ``"rdp"`` (Opacus'
            RDP): the default accountant of :meth:`epsilon`, calibration and :meth:`certificate` (which
            reports both).
        seed: int in [0, 2**63) for reproducible noise (keys ``key_from_seed(seed, "dpsgd")``, and
            ``"dpsgd/group{g}"`` for parameter group g > 0; the noise is then *not* secret). ``None``: a
            256-bit secret key per group from the OS entropy, never stored.
        secure_rng: kept for compatibility: ``True`` only asserts that no ``seed`` is given (the noise is
            always ChaCha20 keyed from the OS unless seeded).
        check_clipped: refuse gradients not written by ``PerSampleGradients.clipped_sum_`` (see the module
            docstring). ``False`` only for a clipped sum computed by other means (tests, other libraries);
            then a trainable parameter without ``p.grad`` is a zero sum, but at least one must have one.

    Parameter groups may have their own ``lr`` and ``weight_decay``; σ, C and the batch size are global,
    and all hyper-parameters are frozen at construction (``param_groups`` are read-only: a change raises
    ``RuntimeError`` naming the key; build a new optimizer instead). Parameters with
    ``requires_grad=False`` are skipped. Every refused step leaves the parameters unchanged.

    ``state_dict()`` holds the step counter, the accountant history and the hyper-parameters under an
    integrity hash; the seed only when seeded. :meth:`load_state_dict` refuses a state that was edited, whose
    history disagrees with its step count and hyper-parameters, or that comes from a run with other
    hyper-parameters or other seeding; a secret-key run resumes with this optimizer's fresh secret keys.
    """

    def __init__(self, params: Iterable, *, lr: float, max_grad_norm: float, expected_batch_size: float,
                 noise_multiplier: Optional[float] = None, sample_rate: Optional[float] = None,
                 epsilon: Optional[float] = None, delta: Optional[float] = None, steps: Optional[int] = None,
                 weight_decay: float = 0.0, seed: Optional[int] = None, secure_rng: bool = False,
                 check_clipped: bool = True, accountant: str = "pld", group_size: int = 1,
                 substitution: bool = False):
        self._ready = False
        lr = positive(lr, "lr")
        weight_decay = positive(weight_decay, "weight_decay", allow_zero=True)
        max_grad_norm = positive(max_grad_norm, "max_grad_norm")
        expected_batch_size = positive(expected_batch_size, "expected_batch_size")
        if sample_rate is not None:
            sample_rate = positive(sample_rate, "sample_rate")
            if sample_rate > 1:
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.delta = probability(delta, "delta") if delta is not None else None
        if steps is not None:
            steps = count(steps, "steps")
        self.accountant = _accountant(accountant)
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
            group_size = count(group_size, "group_size")
            noise_multiplier = certify.noise_multiplier_dpsgd(
                epsilon=epsilon, delta=self.delta, sample_rate=sample_rate, steps=steps, accountant=self.accountant,
                group_size=group_size, substitution=bool(substitution))
            self.target = dict(epsilon=epsilon, delta=self.delta, steps=steps, sample_rate=sample_rate,
                               accountant=self.accountant, group_size=group_size, substitution=bool(substitution))
        noise_multiplier = positive(noise_multiplier, "noise_multiplier", allow_zero=True)
        self._hyper = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                           expected_batch_size=expected_batch_size, sample_rate=sample_rate)
        if not isinstance(secure_rng, bool):
            raise TypeError(f"secure_rng must be a bool, got {secure_rng!r}")
        if secure_rng and seed is not None:
            raise ValueError("pass either seed= (reproducible noise) or secure_rng=True, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.secure_rng = secure_rng
        self.reproducible = seed is not None
        self.seed = seed
        self.check_clipped = bool(check_clipped)
        self.steps_taken = 0
        self._history: list[list] = []  # [noise_multiplier, sample_rate, n_steps], as Opacus' accountant
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._keys = [self._group_key(gi) for gi in range(len(self.param_groups))]
        self._frozen = [_hyper_of(g) for g in self.param_groups]
        self._param_ids = [[id(p) for p in g["params"]] for g in self.param_groups]
        self.param_groups[:] = [FrozenGroup(g) for g in self.param_groups]
        self._ready = True

    # ----------------------------------------------------------------------- frozen hyper-parameters
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _GLOBAL_HYPER:
            raise RuntimeError(f"DPSGD: {name} is fixed at construction (the accountant's analysis is of that "
                               "value); build a new optimizer with the values you want")
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in _GLOBAL_HYPER and "_hyper" in self.__dict__:
            return self.__dict__["_hyper"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            raise RuntimeError("DPSGD cannot take new parameters after construction: its hyper-parameters and "
                               "parameter set are fixed")
        for key in ("lr", "weight_decay"):
            if key in param_group:
                positive(param_group[key], f"param group {key}", allow_zero=key == "weight_decay")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_floating_point():
                raise TypeError(f"DPSGD parameters must be floating point, got {p.dtype}")

    def _group_key(self, gi: int) -> list[int]:
        if self.reproducible:
            return rng.key_from_seed(self.seed, "dpsgd" if gi == 0 else f"dpsgd/group{gi}")
        return rng.secret_key()

    def _check_frozen(self, where: str) -> None:
        """Every group's hyper-parameters and parameter list, and the global ones, as at construction;
        every value finite and in range (a NaN lr would turn every weight to NaN)."""
        if len(self.param_groups) != len(self._frozen):
            raise RuntimeError(f"{where}: DPSGD's parameter groups were replaced after construction")
        for gi, group in enumerate(self.param_groups):
            if [id(p) for p in group["params"]] != self._param_ids[gi]:
                raise RuntimeError(f"{where}: the parameter list of DPSGD group {gi} was changed after construction")
            current, frozen = _hyper_of(group), self._frozen[gi]
            changed = sorted(k for k in set(current) | set(frozen)
                             if k not in current or k not in frozen or not (current[k] == frozen[k]))
            if changed:
                raise RuntimeError(f"{where}: hyper-parameter(s) {changed} of DPSGD group {gi} changed after "
                                   "construction (an LR scheduler or a manual edit); the accountant's analysis is "
                                   "of the values fixed at construction, so the step was not taken")
            positive(current["lr"], f"param group {gi} lr")
            positive(current["weight_decay"], f"param group {gi} weight_decay", allow_zero=True)
        hyper = self.__dict__["_hyper"]
        positive(hyper["noise_multiplier"], "noise_multiplier", allow_zero=True)
        positive(hyper["max_grad_norm"], "max_grad_norm")
        positive(hyper["expected_batch_size"], "expected_batch_size")

    # ------------------------------------------------------------------------------------ step
    @staticmethod
    def _name(group: dict, gi: int, j: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names:
            return repr(names[j])
        info = clipped_sum_info(p.grad, check_version=False)
        return repr(info[1]) if info else f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)})"

    def _check_record(self, entries: list[tuple[str, torch.Tensor, Optional[torch.Tensor]]]):
        """The one intact, unused ClippedSum behind every trainable parameter's gradient."""
        record = None
        for name, p, g in entries:
            if g is None:
                raise ValueError(f"DPSGD.step(): {name} has no gradient: every trainable parameter of the optimizer "
                                 "must get a clipped sum from one PerSampleGradients (PerSampleGradients.empty_batch_ "
                                 "for an empty batch)")
            found, _, problem = inspect_clipped_sum(g)
            if found is None:
                raise ValueError(
                    f"gradient of {name} was not written by PerSampleGradients.clipped_sum_ (or is a copy): DP-SGD "
                    "needs the sum of clipped per-sample gradients. Pass check_clipped=False if you computed that "
                    "sum yourself.")
            if problem:
                raise ValueError(f"gradient of {name} was {problem}: not the clipped sum PerSampleGradients wrote "
                                 "(not written by PerSampleGradients.clipped_sum_ as it is now)")
            if not math.isclose(found.max_grad_norm, self.max_grad_norm, rel_tol=1e-12):
                raise ValueError(f"gradient of {name} was clipped with max_grad_norm={found.max_grad_norm} but "
                                 f"the optimizer uses max_grad_norm={self.max_grad_norm}")
            if found.used:
                raise ValueError(f"gradient of {name} is a clipped sum already used by an optimizer step; each "
                                 "batch is one step (run a new forward/backward pass and clipped_sum_)")
            if record is not None and found is not record:
                raise ValueError(
                    f"gradient of {name} comes from another clipped sum than the other parameters' (two "
                    "PerSampleGradients, or two clipped_sum_ calls without accumulate=True): each clipping to C, "
                    "the per-sample norm over all parameters could reach C*sqrt(2) while the accountant assumes C. "
                    "Wrap the whole trainable model in one PerSampleGradients.")
            record = found
        if record is not None:
            mine = {id(p) for _, p, _ in entries}
            extra = sorted(n for i, n in record.covered.items() if i not in mine)
            if extra:
                raise ValueError(
                    f"the PerSampleGradients that wrote these clipped sums also covers parameters this DPSGD does not "
                    f"update ({', '.join(map(repr, extra))}); their clipped sums would be released without noise "
                    "and the per-sample norm the accountant bounds covers them too. Give them to this optimizer, or "
                    "freeze them before wrapping.")
        return record

    def _collect(self) -> tuple[list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]], Any]:
        """Per group: trainable parameters and their gradients, validated before anything changes."""
        out, entries, any_grad = [], [], False
        for gi, group in enumerate(self.param_groups):
            ps, gs = [], []
            for j, p in enumerate(group["params"]):
                if not p.requires_grad:
                    continue
                g = p.grad
                name = self._name(group, gi, j, p)
                entries.append((name, p, g))
                if g is None:
                    g = torch.zeros_like(p)
                else:
                    any_grad = True
                    if g.is_sparse:
                        raise TypeError(f"gradient of {name} is sparse; DPSGD needs dense gradients")
                    if g.shape != p.shape:
                        raise ValueError(f"gradient of {name} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")
                ps.append(p)
                gs.append(g)
            out.append((group, ps, gs))
        record = None
        if self.check_clipped:
            if not any_grad:
                raise ValueError("DPSGD.step(): no parameter has a gradient; call PerSampleGradients.clipped_sum_ "
                                 "after loss.backward() (or PerSampleGradients.empty_batch_ for an empty batch)")
            record = self._check_record(entries)
        elif not any_grad:
            raise ValueError("DPSGD.step(): no parameter has a gradient (with check_clipped=False, give zero "
                             "gradients for a noise-only step)")
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
        return out, record

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
            raise RuntimeError("DPSGD: the counter-based noise supports at most 2**32 steps per key")
        self._check_frozen(f"DPSGD step {self.steps_taken}")
        work, record = self._collect()
        world = _world_size()
        for gi, (group, ps, gs) in enumerate(work):
            if not ps:
                continue
            if world > 1:  # clip per sample on each rank, then sum the clipped sums over the global batch
                gs = [g.clone() for g in gs]
                for g in gs:
                    torch.distributed.all_reduce(g)
            ops.dpsgd_step_(ps, gs, lr=float(group["lr"]), noise_multiplier=self.noise_multiplier,
                            max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected_batch_size,
                            weight_decay=float(group["weight_decay"]), key=self._keys[gi], step=self.steps_taken)
        if record is not None:
            record.used = True
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

    def epsilon(self, delta: Optional[float] = None, *, accountant: Optional[str] = None, group_size: int = 1,
                substitution: bool = False) -> float:
        """ε spent so far at ``delta`` over the steps actually taken (inf without noise), for one sample added
        or removed, or a group (:func:`pyunlearn.certify.epsilon_dpsgd`); ``accountant`` defaults to the
        optimizer's (``"pld"`` unless told otherwise)."""
        delta = self._delta(delta)
        accountant = _accountant(accountant if accountant is not None else self.accountant)
        if not self._history:
            return 0.0
        if any(q is None for _, q, _ in self._history):
            raise ValueError("DPSGD.epsilon(): sample_rate was not given, so the privacy spent cannot be accounted")
        return certify.epsilon_dpsgd(self._history, delta, accountant=accountant, group_size=group_size,
                                     substitution=substitution)

    def group_epsilon(self, k: int, delta: Optional[float] = None, *, substitution: bool = False,
                      accountant: Optional[str] = None, method: str = "sampled") -> tuple[float, float]:
        """(ε_k, δ_k) for deleting (adding) ``k`` samples, or with ``substitution=True`` changing them (a
        coarse mask refined to a fine one changes that image's sample).

        ``method="sampled"`` (default): the sampled-group bound of :func:`pyunlearn.certify.epsilon_dpsgd`
        at ``δ_k = delta`` (finite where the lemma is vacuous, but roughly ``k`` times the noise multiplier
        is needed for the same ε; see the module docstring for the demo's k = 60). ``method="lemma"``: the
        generic ``(kε, k·e^{(k−1)ε}·δ)`` of :func:`group_privacy` (Vadhan 2017, Lemma 2.2) from the
        one-sample ε at ``delta``, with ``2k`` for a substitution; δ_k is capped at 1 (vacuous)."""
        delta = self._delta(delta)
        k = count(k, "k")
        if method == "lemma":
            return group_privacy(self.epsilon(delta, accountant=accountant), delta, 2 * k if substitution else k)
        if method != "sampled":
            raise ValueError(f"method must be 'sampled' or 'lemma', got {method!r}")
        return self.epsilon(delta, accountant=accountant, group_size=k, substitution=substitution), delta

    def param_names(self) -> list[str]:
        names = []
        for gi, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if p.requires_grad:
                    names.append(str(given[j]) if given else f"group{gi}.param{j}")
        return names

    def certificate(self, delta: Optional[float] = None, *, group_size: int = 1,
                    substitution: bool = False) -> certify.Certificate:
        """The (ε, δ) guarantee of the run so far, for one sample (or a group: ``group_size``,
        ``substitution``), as a :class:`~pyunlearn.certify.Certificate` with operator ``"dpsgd"``.

        ε is the optimizer's accountant (PLD by default); ``hyperparameters`` hold ``accountant``,
        ``epsilon_pld`` and ``epsilon_rdp`` (both valid upper bounds, at the same analysis δ), the noise
        multiplier, C, the sampling rate, the steps and the group. δ includes ``noise_delta``, the noise
        sampler's total-variation distance to the Gaussian (refused above 10% of δ)."""
        delta = self._delta(delta)
        k = count(group_size, "group_size")
        self._check_frozen("certificate")
        if self.sample_rate is None:
            raise certify.CertificateError("DPSGD.certificate(): sample_rate was not given; nothing can be accounted")
        if not self._history:
            raise certify.CertificateError("DPSGD.certificate(): no step was taken")
        coordinates = sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad)

        def share(eps: float) -> float:
            return noise_delta(coordinates=coordinates, draws=self.steps_taken, epsilon=eps, delta=delta,
                               where="DPSGD")

        both = {}
        for acc in certify.DPSGD_ACCOUNTANTS:  # analyse at delta minus the sampler's share of a larger epsilon
            eps = self.epsilon(delta, accountant=acc, group_size=k, substitution=substitution)
            if not math.isfinite(eps):
                raise certify.CertificateError("DPSGD.certificate(): the accountant gives no finite epsilon "
                                               "(no noise, or a group too large)")
            cap = eps + 0.05 * max(1.0, eps)  # the share grows like e^epsilon: keep the cap close
            while True:
                eps = self.epsilon(delta - share(cap), accountant=acc, group_size=k, substitution=substitution)
                if eps <= cap:
                    break
                cap = max(eps, 1.2 * cap)
            both[acc] = (eps, cap)
        eps, cap = both[self.accountant]
        analysis_delta = delta - share(max(c for _, c in both.values()))
        hyper = dict(accountant=self.accountant, epsilon_pld=both["pld"][0], epsilon_rdp=both["rdp"][0],
                     analysis_delta=analysis_delta, noise_multiplier=self.noise_multiplier,
                     max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected_batch_size,
                     sample_rate=self.sample_rate, steps=self.steps_taken, group_size=k, substitution=substitution,
                     groups=[dict(lr=g["lr"], weight_decay=g["weight_decay"]) for g in self._frozen],
                     seed=self.seed if self.reproducible else None)
        unit = ("one training sample added or removed" if k == 1 and not substitution else
                f"{k} training sample(s) {'changed' if substitution else 'added or removed'}")
        noise = ("noise key derived from a user seed: reproducible, NOT secret; for testing and reproducibility only"
                 if self.reproducible else "256-bit noise keys drawn from the operating system's entropy, never stored")
        assumptions = [
            f"neighbouring training sets differ in {unit}; a sample is one image with its mask",
            f"Poisson sampling: every sample in every batch independently with probability <= {self.sample_rate} "
            "(pyunlearn.data.PoissonBatchSampler), one step per batch, empty batches included",
            f"per-sample gradients clipped to C = {self.max_grad_norm} over all trainable parameters by one "
            "PerSampleGradients (enforced at every step)",
            "the model's other parameters never saw the private training data",
            "only the final parameters are released (not intermediate models, losses or gradients)",
            noise,
            "noise: ChaCha20 (RFC 8439) counter mode, float64 Box-Muller from 128-bit uniforms, centre + noise "
            "rounded once; delta includes the sampler's total-variation distance to the Gaussian (noise_delta)",
        ]
        return certify.Certificate(epsilon=eps, delta=delta, operator="dpsgd", hyperparameters=hyper,
                                   parameters=self.param_names(), assumptions=assumptions,
                                   seeded=self.reproducible, noise_delta=delta - analysis_delta)

    # ------------------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, Any]:
        return dict(hyper=dict(self.__dict__["_hyper"]), groups=[dict(g) for g in self._frozen],
                    param_counts=[len(ids) for ids in self._param_ids], reproducible=self.reproducible,
                    seed=self.seed if self.reproducible else None)

    @staticmethod
    def _digest(body: dict[str, Any]) -> str:
        """Integrity hash of a saved state. NOTE: unkeyed: catches edits and truncation, not a forger who
        runs this code (checkpoints on disk are authenticated by pyunlearn.checkpoint)."""
        message = json.dumps(body, sort_keys=True, default=float).encode()
        return hashlib.sha256(b"pyunlearn/dpsgd-state/v1\0" + message).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        # A secret key never leaves the process: with it the noise could be regenerated.
        body = dict(identity=self._identity(), steps_taken=self.steps_taken, secure_rng=self.secure_rng,
                    history=[list(h) for h in self._history], target=dict(self.target) if self.target else None)
        body = json.loads(json.dumps(body, default=float))
        groups = [dict(g, params=list(range(sum(map(len, self._param_ids[:gi])),
                                            sum(map(len, self._param_ids[:gi + 1])))))
                  for gi, g in enumerate(self._frozen)]
        return {"state": {}, "param_groups": groups, _KEY: dict(body, digest=self._digest(body))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or _KEY not in state_dict:
            raise ValueError(f"not a DPSGD state_dict: missing the '{_KEY}' entry")
        saved = dict(state_dict[_KEY])
        digest = saved.pop("digest", None)
        try:
            intact = digest is not None and digest == self._digest(saved)
        except (TypeError, ValueError):
            intact = False
        if not intact:
            raise ValueError("DPSGD state_dict was modified or truncated (its integrity hash does not match); "
                             "refusing it: the accountant would report the privacy of another run")
        identity, mine = saved["identity"], json.loads(json.dumps(self._identity(), default=float))
        if identity["reproducible"] != mine["reproducible"] or identity["seed"] != mine["seed"]:
            kind = lambda d: f"seed {d['seed']}" if d["reproducible"] else "secret noise"  # noqa: E731
            raise ValueError(f"DPSGD state_dict comes from a run with {kind(identity)}; this optimizer has "
                             f"{kind(mine)}. Resume with the same seed (or again without one).")
        differing = sorted(k for k in set(identity) | set(mine) if identity.get(k) != mine.get(k))
        if differing:
            detail = "; ".join(f"{k}: saved {identity.get(k)!r}, here {mine.get(k)!r}" for k in differing)
            raise ValueError(f"DPSGD state_dict comes from a run with other hyper-parameters ({detail}); build the "
                             "optimizer with the saved values to resume")
        steps_taken, history = saved["steps_taken"], saved["history"]
        if isinstance(steps_taken, bool) or not isinstance(steps_taken, int) or steps_taken < 0:
            raise ValueError(f"DPSGD state_dict steps_taken must be an int >= 0, got {steps_taken!r}")
        hyper = identity["hyper"]
        rows_ok = all(isinstance(h, list) and len(h) == 3 and h[0] == hyper["noise_multiplier"]
                      and h[1] == hyper["sample_rate"] and isinstance(h[2], int) and h[2] >= 1 for h in history)
        if not rows_ok or sum(h[2] for h in history) != steps_taken or len(history) > 1:
            raise ValueError(
                f"DPSGD state_dict history {history!r} does not agree with its {steps_taken} steps at noise_multiplier="
                f"{hyper['noise_multiplier']} and sample_rate={hyper['sample_rate']}; the accountant would report "
                "the privacy of another run, so it is refused")
        self.steps_taken = steps_taken
        self._history = [list(h) for h in history]
        self.target = dict(saved["target"]) if saved.get("target") else None
