"""Shared machinery of the certified unlearning optimizers.

A certified optimizer owns a fixed set of parameters (the *certified* parameters), runs a planned
number of noisy steps with counter-based noise keyed by ``(seed, step)``, and issues a
:class:`~pyunlearn.certify.Certificate` only if the run satisfied the analysis' assumptions: every
planned step taken, and the parameters changed by nothing but this optimizer.
"""
from __future__ import annotations

import math
import secrets
from typing import Any, Iterable, Optional

import torch

from .. import certify, ops
from .._validation import count, probability

_GLOBAL_KEY = "certified"


def draw_secure_seed() -> int:
    """A 63-bit seed from the operating system's entropy, the same on every rank of a DDP job."""
    seed = secrets.randbits(63)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [seed]  # an object broadcast works on every backend (NCCL included)
        torch.distributed.broadcast_object_list(holder, src=0)
        seed = int(holder[0])
    return seed


#: NOTE: the fused kernels clip in float32; measured clipped norms reach C (1 + 1.5e-7). The accounting
#: therefore uses every clip bound inflated by this factor.
CLIP_SLACK = 1.0 + 1e-6


def float32_up(x: float) -> float:
    """The smallest float32 value >= x: the noise scale the float32 kernels then use exactly."""
    import numpy as np

    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return float(y)


@torch.no_grad()
def project_(params: list[torch.Tensor], radius: float) -> None:
    """Scale ``params`` in place onto the L2 ball of ``radius`` (global norm; no-op inside the ball)."""
    norm = ops.global_norm(params)
    factor = torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)
    for p in params:
        p.mul_(factor.to(p.dtype))


def _fingerprint(params: list[torch.Tensor]) -> list[float]:
    """Sum and L2 norm of each tensor in float64. Any ordinary edit (an optimizer step, a loaded state,
    a manual change) moves them; a mere permutation of elements within one tensor would not."""
    with torch.no_grad():
        values = []
        for p in params:
            values.append(p.sum(dtype=torch.float64))
            values.append(torch.linalg.vector_norm(p, dtype=torch.float64))
        return torch.stack(values).tolist() if values else []


class CertifiedOptimizer(torch.optim.Optimizer):
    """Base class: validation, seeding, step bookkeeping, tamper detection, ``state_dict``."""

    operator: str = ""
    #: hyper-parameters that must match for a checkpoint to load.
    _identity_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, *, delta: float, steps: int,
                 seed: Optional[int], secure_rng: Optional[bool]):
        self._ready = False
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes one parameter group (its norms are global over all "
                             f"certified parameters), got {len(self.param_groups)}")
        group = self.param_groups[0]
        if not group["params"]:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"all certified parameters must be on one device, got {sorted(map(str, devices))}")
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise TypeError(f"parameter {self._name(i)} must be floating point, got {p.dtype}")
            if p.dtype not in (torch.float32, torch.float64):
                # Rounding a clipped bf16/fp16 model can exceed the clip norm by ~0.3%: the bound the
                # analysis assumes would not hold.
                raise TypeError(f"parameter {self._name(i)} is {p.dtype}; certified optimizers need float32 or "
                                "float64 parameters (keep them float32 and use torch.autocast for mixed precision)")
            if p.is_sparse:
                raise TypeError(f"parameter {self._name(i)} is sparse; certified optimizers need dense tensors")
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            raise ValueError(f"{type(self).__name__} got the same parameter more than once")
        self.delta = probability(delta, "delta")
        self.steps = count(steps, "steps")
        if secure_rng and seed is not None:
            raise ValueError("pass either seed= (reproducible noise) or secure_rng=True, not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.seeded = seed is not None
        self.seed = seed if seed is not None else draw_secure_seed()
        self.step_count = 0
        self._ready = True

    # ------------------------------------------------------------------ helpers for subclasses
    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @property
    def hyper(self) -> dict:
        return self.param_groups[0]

    def _name(self, index: int) -> str:
        names = self.param_groups[0].get("param_names") if self.param_groups else None
        return repr(names[index]) if names else f"#{index}"

    def param_names(self) -> list[str]:
        names = self.hyper.get("param_names")
        return list(names) if names else [f"param{i}" for i in range(len(self.params))]

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            raise RuntimeError(f"{type(self).__name__} cannot take new parameters after construction: "
                               "the certificate covers a fixed parameter set")
        super().add_param_group(param_group)

    def _start(self) -> None:
        """After the initial projection/perturbation: drop gradients computed before it (every gradient
        must be taken at the projected model) and record the parameters."""
        for p in self.params:
            p.grad = None
        self._seal()

    def _seal(self) -> None:
        """Record the parameters as this optimizer left them."""
        self._fingerprint = _fingerprint(self.params)

    def _check_untouched(self, where: str, expected: Optional[list[float]] = None) -> None:
        expected = self._fingerprint if expected is None else expected
        # NOTE: a relative tolerance, because float64 reductions may round differently across machines
        # or thread counts (a resumed run); any real edit of the parameters moves these far more.
        current = _fingerprint(self.params)
        if len(current) != len(expected) or not all(
                math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-30) for a, b in zip(current, expected)):
            raise certify.CertificateError(
                f"{where}: the certified parameters were changed outside {type(self).__name__} since its last "
                "step (another optimizer, load_state_dict, or a manual edit); the run no longer matches the "
                "analysis. Start a new optimizer from the current model.")

    def _gradients(self) -> list[torch.Tensor]:
        """Dense, finite gradients (zeros for parameters that got none); raises before anything changes."""
        grads = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                g = torch.zeros_like(p)
            elif g.is_sparse:
                raise TypeError(f"parameter {self._name(i)} has a sparse gradient; use dense gradients")
            elif g.shape != p.shape:
                raise ValueError(f"gradient of parameter {self._name(i)} has shape {tuple(g.shape)}, "
                                 f"expected {tuple(p.shape)}")
            elif not g.is_floating_point():
                raise TypeError(f"gradient of parameter {self._name(i)} has dtype {g.dtype}; expected a "
                                "floating-point gradient")
            elif g.device != p.device:
                raise ValueError(f"gradient of parameter {self._name(i)} is on {g.device} but the parameter "
                                 f"is on {p.device}")
            grads.append(g)
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise ValueError(f"gradient of parameter {self._name(bad)} contains NaN or Inf; "
                             "the step was not taken and the parameters are unchanged")
        return grads

    # ------------------------------------------------------------------ public API
    # NOTE: never traced by torch.compile (a call inside a compiled function is a graph break and runs
    # eagerly). Dynamo (torch 2.13) silently drops attribute writes on torch.optim.Optimizer subclasses
    # that are followed by a graph break in the same frame: ``step_count += 1`` was lost, so the next
    # step reused the noise of the previous one. The work is one fused kernel call anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_count >= self.steps:
            raise RuntimeError(
                f"{type(self).__name__}: all {self.steps} planned steps are done. Fine-tune further with a "
                "plain optimizer on retain data only (post-processing keeps the guarantee).")
        self._check_untouched(f"step {self.step_count}")
        grads = self._gradients()
        self._apply(grads)
        self.step_count += 1
        self._seal()
        return loss

    def _apply(self, grads: list[torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def epsilon(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _assumptions(self) -> list[str]:
        noise = ("noise seeded by the user: reproducible, NOT secret; for testing and reproducibility only"
                 if self.seeded else "noise seed drawn from the operating system's entropy and kept secret")
        return [
            "the certified parameters are exactly the listed ones; every other parameter of the model never saw "
            "the private training data (e.g. a frozen public encoder)",
            "every gradient was computed on retain data only (no forget pixels)",
            f"all {self.steps} planned steps were taken by this optimizer and nothing else changed the parameters",
            "any later training uses retain data only (post-processing)",
            "only the final parameters are released (not intermediate models, losses or gradient norms)",
            noise,
        ]

    def certificate(self) -> certify.Certificate:
        """The (epsilon, delta) certificate of the completed run; refuses when assumptions fail."""
        if self.step_count < self.steps:
            raise certify.CertificateError(
                f"{type(self).__name__}: only {self.step_count} of the {self.steps} planned steps were taken; "
                "no certificate for an incomplete run")
        self._check_untouched("certificate")
        eps = self.epsilon()
        if not math.isfinite(eps):
            raise certify.CertificateError(f"{type(self).__name__}: the analysis gives no finite epsilon")
        hyper = {k: v for k, v in self.hyper.items() if k not in ("params", "param_names")}
        hyper.update(steps=self.steps, seed=self.seed if self.seeded else None)
        return certify.Certificate(epsilon=eps, delta=self.delta, operator=self.operator, hyperparameters=hyper,
                                   parameters=self.param_names(), assumptions=self._assumptions(),
                                   seeded=self.seeded)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_GLOBAL_KEY] = {
            "operator": self.operator,
            "step_count": self.step_count,
            "steps": self.steps,
            "delta": self.delta,
            # A secret seed never leaves the process: with it the noise could be regenerated.
            "seed": self.seed if self.seeded else None,
            "seeded": self.seeded,
            "fingerprint": list(self._fingerprint),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _GLOBAL_KEY not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state_dict: missing the '{_GLOBAL_KEY}' entry")
        saved = state_dict[_GLOBAL_KEY]
        if saved.get("operator") != self.operator:
            raise ValueError(f"state_dict is for operator {saved.get('operator')!r}, this is {self.operator!r}")
        mismatched = [k for k in self._identity_keys
                      if not math.isclose(float(state_dict["param_groups"][0][k]), float(self.hyper[k]),
                                          rel_tol=1e-12, abs_tol=0.0)]
        if saved["steps"] != self.steps or not math.isclose(saved["delta"], self.delta, rel_tol=1e-12):
            mismatched.append("steps/delta")
        if mismatched:
            raise ValueError(f"state_dict hyper-parameters differ from this optimizer's: {mismatched}")
        self._check_untouched("load_state_dict (the model's parameters do not match the checkpoint)",
                              expected=list(saved["fingerprint"]))
        plain = {k: v for k, v in state_dict.items() if k != _GLOBAL_KEY}
        super().load_state_dict(plain)
        self.step_count = int(saved["step_count"])
        self.seeded = bool(saved["seeded"])
        # A resumed run with secret noise continues with a fresh secret seed: the remaining steps get
        # independent noise, which the analysis allows (the earlier noise is already in the parameters).
        self.seed = int(saved["seed"]) if self.seeded else draw_secure_seed()
        self._fingerprint = list(saved["fingerprint"])
