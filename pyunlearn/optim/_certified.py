"""Shared machinery of the certified unlearning optimizers.

A certified optimizer owns a fixed set of parameters (the *certified* parameters), runs a planned
number of noisy steps with counter-based noise keyed by ``(seed, step)``, and issues a
:class:`~pyunlearn.certify.Certificate` only if the run satisfied the analysis' assumptions: every
planned step taken, and the parameters changed by nothing but this optimizer.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from typing import Any, Iterable, Optional

import torch

from .. import certify, ops
from .._precision import CLIP_SLACK, float32_up  # noqa: F401 (re-exported to the optimizers)
from .._validation import count, probability
from ..ops import rng
from ..ops.reference import STATUS_NONFINITE, STATUS_OK, STATUS_TAMPERED, fingerprint_matches

_GLOBAL_KEY = "certified"
#: Largest share of ``delta`` the sampler's distance to the ideal Gaussian may take (else: refused).
MAX_NOISE_DELTA_SHARE = 0.1


def draw_secure_seed() -> int:
    """A 63-bit seed from the operating system's entropy, the same on every rank of a DDP job (for batch
    orders and other non-secret randomness; noise keys come from :func:`pyunlearn.ops.rng.secret_key`)."""
    seed = secrets.randbits(63)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [seed]  # an object broadcast works on every backend (NCCL included)
        torch.distributed.broadcast_object_list(holder, src=0)
        seed = int(holder[0])
    return seed


def noise_key(seed: Optional[int], label: str) -> list[int]:
    """The noise key of an operator: derived from ``(seed, label)`` when seeded (reproducible, NOT secret),
    else 256 fresh bits from the operating system."""
    return rng.key_from_seed(seed, label) if seed is not None else rng.secret_key()


@torch.no_grad()
def project_(params: list[torch.Tensor], radius: float) -> None:
    """Scale ``params`` in place onto the L2 ball of ``radius`` (global norm; no-op inside the ball)."""
    norm = ops.global_norm(params)
    factor = torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)
    for p in params:
        p.mul_(factor.to(p.dtype))


def noise_delta(*, coordinates: int, draws: int, epsilon: float, delta: float, where: str) -> float:
    """The sampler's share of ``delta`` (:func:`pyunlearn.ops.rng.noise_tv_bound`); raises
    :class:`~pyunlearn.certify.CertificateError` past ``MAX_NOISE_DELTA_SHARE * delta``."""
    share = rng.noise_tv_bound(coordinates=coordinates, steps=draws, epsilon=epsilon)
    if share > MAX_NOISE_DELTA_SHARE * delta:
        raise certify.CertificateError(
            f"{where}: the noise sampler's distance to the ideal Gaussian over {draws} draws of {coordinates} "
            f"coordinates adds {share:.3g} to delta, more than {MAX_NOISE_DELTA_SHARE:.0%} of delta = {delta:.3g}; "
            "ask for a larger delta or fewer noisy steps")
    return share


class FrozenGroup(dict):
    """A parameter group whose hyper-parameters cannot change: the certificate is the analysis of the
    values fixed at construction. Writes raise ``RuntimeError`` naming the key (an LR scheduler's
    ``initial_lr`` included)."""

    def _refuse(self, key: Any) -> None:
        hint = (" (an LR scheduler: certified optimizers fix their learning rate, since the certificate is "
                "computed for it)" if key in ("initial_lr", "lr") else "")
        raise RuntimeError(f"the hyper-parameters of a certified optimizer are fixed at construction; refusing "
                           f"to set {key!r}{hint}. Build a new optimizer with the values you want.")

    def __setitem__(self, key, value):
        self._refuse(key)

    def __delitem__(self, key):
        self._refuse(key)

    def setdefault(self, key, default=None):
        if key in self:
            return self[key]
        self._refuse(key)

    def update(self, *args, **kwargs):
        self._refuse(next(iter(dict(*args, **kwargs)), "?"))

    def pop(self, key, *default):
        self._refuse(key)

    def popitem(self):
        self._refuse("?")

    def clear(self):
        self._refuse("?")

    def __ior__(self, other):
        self._refuse(next(iter(other), "?"))


def _hyper_of(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


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
        self.seed = seed
        self._key = noise_key(seed, self.operator)
        self._fp_key = [secrets.randbits(32), secrets.randbits(32)]
        self.step_count = 0
        self.coordinates = sum(p.numel() for p in group["params"])
        # Frozen: every hyper-parameter and the parameter list itself (ids) are fixed from here on.
        self.param_groups[0] = FrozenGroup(group)
        self._frozen = _hyper_of(group)
        self._param_ids = [id(p) for p in group["params"]]
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
        self._fingerprint = ops.fingerprint(self.params, self._fp_key).tolist()

    def _tampered(self, where: str) -> certify.CertificateError:
        return certify.CertificateError(
            f"{where}: the certified parameters were changed outside {type(self).__name__} since its last step "
            "(another optimizer, load_state_dict, or a manual edit); the run no longer matches the analysis. "
            "Start a new optimizer from the current model.")

    def _check_untouched(self, where: str, expected: Optional[list[float]] = None) -> None:
        """The keyed fingerprint of the parameters equals ``expected`` (default: the last step's).
        NOTE: a relative tolerance (reference.FP_RTOL), because float64 reductions may round differently
        across backends; any edit of the values, permutations included, moves the keyed projection more."""
        expected = self._fingerprint if expected is None else expected
        if not fingerprint_matches(ops.fingerprint(self.params, self._fp_key).tolist(), list(expected)):
            raise self._tampered(where)

    def _check_frozen(self, where: str) -> None:
        group = self.param_groups[0] if len(self.param_groups) == 1 else None
        if group is None or [id(p) for p in group["params"]] != self._param_ids:
            raise RuntimeError(f"{where}: the parameter list of {type(self).__name__} was changed after "
                               "construction; the certificate covers a fixed parameter set")
        current = _hyper_of(group)
        changed = sorted(k for k in set(current) | set(self._frozen)
                         if k not in current or k not in self._frozen or current[k] != self._frozen[k])
        if changed:
            raise RuntimeError(f"{where}: hyper-parameter(s) {changed} of {type(self).__name__} changed after "
                               "construction (an LR scheduler or a manual edit); the certificate is the analysis "
                               "of the values fixed at construction, so the step was not taken")

    def _gradients(self) -> list[torch.Tensor]:
        """Dense gradients (zeros for parameters that got none, but at least one must have one); raises
        before anything changes. Finiteness is checked by the fused step itself (its norm pass)."""
        if all(p.grad is None for p in self.params):
            raise certify.CertificateError(
                f"{type(self).__name__}: no certified parameter received a gradient in step {self.step_count}. "
                "Were the model's parameters replaced (e.g. load_state_dict(..., assign=True)) after the optimizer "
                "was built? The optimizer steps the tensors it was given; build it from the current model.")
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
        return grads

    def _nonfinite(self, grads: list[torch.Tensor], what: str) -> ValueError:
        """The error for a non-finite norm (slow path: names the first offending parameter)."""
        for i, g in enumerate(grads):
            if not bool(torch.isfinite(g).all()):
                return ValueError(f"gradient of parameter {self._name(i)} contains NaN or Inf; the step was not "
                                  "taken and the parameters are unchanged")
        return ValueError(f"the {what} is not finite (it overflows); the step was not taken and the parameters "
                          "are unchanged")

    def _finish_step(self, result: torch.Tensor, grads: list[torch.Tensor], what: str) -> float:
        """Reads a fused step's result ``[status, norm, old_fp, new_fp]``; raises on a refused step (the
        parameters are then unchanged) and records the new fingerprint. Returns the norm."""
        values = result.tolist()
        status = int(values[0])
        # A tampered model can also have a non-finite norm (NaN written into it): name the tampering.
        if status == STATUS_TAMPERED or not fingerprint_matches(values[2:4], self._fingerprint):
            raise self._tampered(f"step {self.step_count}")
        if status == STATUS_NONFINITE:
            raise self._nonfinite(grads, what)
        if status != STATUS_OK:  # pragma: no cover - kernel contract
            raise RuntimeError(f"unexpected step status {status}")
        self._fingerprint = values[4:6]
        return values[1]

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
        self._check_frozen(f"step {self.step_count}")
        grads = self._gradients()
        self._apply(grads)  # the fused kernel checks the fingerprint before writing anything
        self.step_count += 1
        return loss

    def _apply(self, grads: list[torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def epsilon(self, delta: Optional[float] = None) -> float:  # pragma: no cover - abstract
        """The analysis' epsilon at ``delta`` (default: the run's delta, the sampler's share not removed)."""
        raise NotImplementedError

    def _assumptions(self) -> list[str]:
        noise = ("noise key derived from a user seed: reproducible, NOT secret; for testing and reproducibility only"
                 if self.seeded else "256-bit noise key drawn from the operating system's entropy, never stored")
        return [
            "the certified parameters are exactly the listed ones; every other parameter of the model never saw "
            "the private training data (e.g. a frozen public encoder)",
            "every gradient was computed on retain data only (no forget pixels)",
            f"all {self.steps} planned steps were taken by this optimizer and nothing else changed the parameters",
            "any later training uses retain data only (post-processing)",
            "only the final parameters are released (not intermediate models, losses or gradient norms)",
            "the model has no floating-point buffers in the certified modules (they would escape the noise)",
            noise,
            "noise: ChaCha20 (RFC 8439) counter mode, float64 Box-Muller from 128-bit uniforms, centre + noise "
            "rounded once; delta includes the sampler's total-variation distance to the Gaussian (noise_delta), "
            "float64 evaluation error not counted",
        ]

    def certificate(self) -> certify.Certificate:
        """The (epsilon, delta) certificate of the completed run; refuses when assumptions fail."""
        if self.step_count < self.steps:
            raise certify.CertificateError(
                f"{type(self).__name__}: only {self.step_count} of the {self.steps} planned steps were taken; "
                "no certificate for an incomplete run")
        self._check_frozen("certificate")
        self._check_untouched("certificate")
        eps, share = self._certified_epsilon()
        hyper = _hyper_of(self.hyper)
        hyper.update(steps=self.steps, seed=self.seed if self.seeded else None)
        return certify.Certificate(epsilon=eps, delta=self.delta, operator=self.operator, hyperparameters=hyper,
                                   parameters=self.param_names(), assumptions=self._assumptions(),
                                   seeded=self.seeded, noise_delta=share)

    # Accounting with the sampler's share of delta ------------------------------------------------
    def _noise_draws(self) -> int:
        """Number of noise vectors the run adds to the certified parameters."""
        return self.steps

    def _calibration_delta(self, epsilon: float) -> float:
        """The delta the analysis may use when calibrating sigma for a target ``epsilon``."""
        share = noise_delta(coordinates=self.coordinates, draws=self._noise_draws(), epsilon=epsilon,
                            delta=self.delta, where=type(self).__name__)
        return self.delta - share

    def _certified_epsilon(self) -> tuple[float, float]:
        """(epsilon, noise share) with ``analysis delta + noise share <= delta``."""
        eps = self.epsilon(self.delta)
        if not math.isfinite(eps):
            raise certify.CertificateError(f"{type(self).__name__}: the analysis gives no finite epsilon")
        # The share grows with epsilon: analyse at delta minus the share at a slightly larger epsilon (the
        # share is ~1e-16 of delta, so the analysis' epsilon barely moves), then check it stayed below.
        margin = 1e-9 + 1e-6 * eps
        while True:
            cap = eps + margin
            share_cap = noise_delta(coordinates=self.coordinates, draws=self._noise_draws(), epsilon=cap,
                                    delta=self.delta, where=type(self).__name__)
            analysed = self.epsilon(self.delta - share_cap)
            if analysed <= cap:
                return analysed, noise_delta(coordinates=self.coordinates, draws=self._noise_draws(),
                                             epsilon=analysed, delta=self.delta, where=type(self).__name__)
            margin *= 4.0

    # State ---------------------------------------------------------------------------------------
    def _run_identity(self) -> dict[str, Any]:
        # A copy of the frozen snapshot: an edit of a returned state_dict must not reach this optimizer.
        return {"operator": self.operator, "steps": self.steps, "delta": self.delta, "seeded": self.seeded,
                "seed": self.seed if self.seeded else None, "hyper": dict(self._frozen),
                "param_shapes": [list(p.shape) for p in self.params]}

    @staticmethod
    def _tag(body: dict[str, Any]) -> str:
        """Integrity tag of a saved state. NOTE: keyed with the state's own fingerprint key, so it catches
        edits and truncation, not a forger who runs this code; checkpoints on disk are authenticated with a
        key kept outside them (pyunlearn.checkpoint)."""
        key = b"pyunlearn/optimizer-state/v1" + b"".join(int(k).to_bytes(4, "little") for k in body["fp_key"])
        message = json.dumps(body, sort_keys=True, default=float).encode()
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The run's state: the step count, the identity of the run (hyper-parameters, seeding) and the
        fingerprint of the parameters as this optimizer left them, under an integrity tag. A secret noise
        key never leaves the process."""
        body = {"identity": self._run_identity(), "step_count": self.step_count,
                "fingerprint": list(self._fingerprint), "fp_key": list(self._fp_key)}
        return {"state": {}, "param_groups": [dict(_hyper_of(self.hyper), params=list(range(len(self.params))))],
                _GLOBAL_KEY: dict(body, tag=self._tag(body))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume a run: refused unless the state is intact, comes from the same run (operator, steps, delta,
        every hyper-parameter, the same seed or likewise secret noise) and the model's parameters are the
        ones the saved optimizer left. With secret noise the remaining steps use this optimizer's fresh
        secret key (the analysis allows it: the earlier noise is already in the parameters)."""
        if not isinstance(state_dict, dict) or _GLOBAL_KEY not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state_dict: missing the '{_GLOBAL_KEY}' entry")
        saved = dict(state_dict[_GLOBAL_KEY])
        tag = saved.pop("tag", None)
        try:
            intact = tag is not None and hmac.compare_digest(str(tag), self._tag(saved))
        except (KeyError, TypeError, ValueError):
            intact = False
        if not intact:
            raise ValueError("state_dict was modified or truncated (its integrity tag does not match); refusing it")
        if state_dict.get("state"):
            raise ValueError(f"{type(self).__name__} keeps no per-parameter state, but the state_dict has some")
        identity, mine = saved["identity"], json.loads(json.dumps(self._run_identity(), default=float))
        if identity.get("operator") != self.operator:
            raise ValueError(f"state_dict is for operator {identity.get('operator')!r}, this is {self.operator!r}")
        if identity["seeded"] != self.seeded or identity["seed"] != mine["seed"]:
            saved_kind = f"seed {identity['seed']}" if identity["seeded"] else "secret noise"
            this_kind = f"seed {self.seed}" if self.seeded else "secret noise"
            raise ValueError(f"state_dict comes from a run with {saved_kind}; this optimizer has {this_kind}. "
                             "Resume with the same seed (noise_seed= in the operators), or again without one.")
        differing = sorted(k for k in set(identity) | set(mine) if identity.get(k) != mine.get(k))
        if differing:
            detail = [f"{k}: saved {identity.get(k)!r}, here {mine.get(k)!r}" for k in differing]
            raise ValueError(f"state_dict comes from another run: {'; '.join(detail)}")
        step_count = saved["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, int) or not 0 <= step_count <= self.steps:
            raise ValueError(f"state_dict step_count must be an int in [0, {self.steps}], got {step_count!r}")
        fp_key = [int(k) for k in saved["fp_key"]]
        if not fingerprint_matches(ops.fingerprint(self.params, fp_key).tolist(), list(saved["fingerprint"])):
            raise self._tampered("load_state_dict (the model's parameters do not match the checkpoint)")
        self.step_count = step_count
        self._fp_key = fp_key
        self._fingerprint = list(saved["fingerprint"])
