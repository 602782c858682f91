"""The :class:`PerSampleGradients` wrapper and its clipped-sum records (see :mod:`pyunlearn.per_sample`)."""
from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
from torch import nn

from .. import ops
from .._validation import positive
from ..ops.reference import fingerprint_matches
from ._base import _INPUT_DIMS, _RULES, _Call, _Rule, _acc, supported_layers

__all__ = ["ClippedSum", "PerSampleGradients", "wrap", "clip_factor", "clipped_sum_info", "inspect_clipped_sum"]

LossReduction = Literal["sum", "mean"]
NormMethod = Literal["auto", "ghost", "per_sample"]

#: Opacus' stabiliser in the clip factor min(1, C / (norm + 1e-6)).
CLIP_EPS = 1e-6
_TAG = "_pyunlearn_clipped_sum"
#: Key of the fingerprints of written clipped sums: per process, never stored (see :class:`ClippedSum`).
_FP_KEY = [secrets.randbits(32), secrets.randbits(32)]
_SERIAL = itertools.count(1)


def clip_factor(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factor ``min(1, C / (norm + 1e-6))``."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


@dataclass(eq=False)
class ClippedSum:
    """What one :meth:`PerSampleGradients.clipped_sum_` (or :meth:`~PerSampleGradients.empty_batch_`) wrote:
    one logical batch of clipped per-sample gradients, for one optimizer step.

    ``wrapper`` is the serial number of the :class:`PerSampleGradients` that wrote it, ``covered`` maps
    ``id(param)`` to the name of every trainable parameter it wrote (all of that wrapper's), ``samples`` is
    the number of per-sample gradients summed (0 for an empty batch), ``used`` is set by the optimizer step
    that consumed it (a clipped sum is used once). Each written ``p.grad`` carries its version counter and
    a float64 fingerprint ``[keyed projection, sum of squares]`` (:func:`pyunlearn.ops.fingerprint`, with a
    per-process key that is never stored), so an in-place change, also through ``p.grad.data``, is seen."""

    wrapper: int
    max_grad_norm: float
    covered: dict = field(default_factory=dict)
    samples: int = 0
    used: bool = False


@torch.compiler.disable  # a host read-back: runs eagerly inside compiled training steps
def _fingerprint(grad: torch.Tensor) -> list[float]:
    return ops.fingerprint([grad], _FP_KEY).tolist()


def inspect_clipped_sum(grad: Optional[torch.Tensor]) -> tuple[Optional[ClippedSum], str, Optional[str]]:
    """``(record, parameter name, problem)`` for a gradient written by ``clipped_sum_``: ``problem`` is
    ``None`` if the values are exactly the ones written, else what changed. ``(None, "", None)`` for a
    gradient ``clipped_sum_`` did not write (or a copy of one)."""
    tag = getattr(grad, _TAG, None) if grad is not None else None
    if tag is None:
        return None, "", None
    version, record, name, fp = tag
    if version != grad._version:
        return record, name, "modified in place after clipped_sum_ wrote it"
    if not fingerprint_matches(_fingerprint(grad), fp):
        return record, name, "modified after clipped_sum_ wrote it (its values changed, e.g. through .data)"
    return record, name, None


def clipped_sum_info(grad: Optional[torch.Tensor], *, check_version: bool = True) -> Optional[tuple[float, str]]:
    """``(max_grad_norm, parameter name)`` if ``grad`` was written by :meth:`PerSampleGradients.clipped_sum_`
    and not modified since (tracked by the tensor's version counter; ``check_version=False`` skips that
    check, e.g. to name a parameter in an error message); else ``None``. :func:`inspect_clipped_sum` also
    checks the values (fingerprint) and gives the :class:`ClippedSum` record."""
    tag = getattr(grad, _TAG, None) if grad is not None else None
    if tag is None or (check_version and tag[0] != grad._version):
        return None
    return tag[1].max_grad_norm, tag[2]


def _mark(grad: torch.Tensor, record: ClippedSum, name: str) -> None:
    setattr(grad, _TAG, (grad._version, record, name, _fingerprint(grad)))


def _display(qualname: str) -> str:
    return repr(qualname) if qualname else "<root module>"


class _Anchor(torch.autograd.Function):
    """Identity that makes a layer output require grad when neither its input nor (detached) parameters
    do, so the output-gradient hook fires; returns an alias (no copy) and no gradient for the anchor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: _Rule
    calls: list[_Call] = field(default_factory=list)
    detached: list[list[nn.Parameter]] = field(default_factory=list)


# ==================================================================================================
class PerSampleGradients:
    """Per-sample gradient book-keeping for ``module`` (see the module docstring).

    Args:
        module: the model (or the trainable part of it, e.g. a decoder behind a frozen encoder).
        loss_reduction: ``"sum"`` if ``backward`` is called on the sum of per-sample losses,
            ``"mean"`` if on their mean over the batch (output gradients are then scaled by ``B``).
        norm_method: ``"auto"`` (ghost norm where ``2T² ≤ p·d``, per-sample otherwise), ``"ghost"``
            (ghost norm wherever implemented: Linear, Conv1d/Conv2d with groups=1 and one call per
            pass) or ``"per_sample"`` (never the ghost norm).
        chunk_bytes: memory bound of the per-sample weight gradients formed at a time for one layer
            while computing norms (at least one sample at a time).

    Use as a context manager, or call :meth:`remove` to take the hooks off.
    """

    def __init__(self, module: nn.Module, *, loss_reduction: LossReduction = "sum",
                 norm_method: NormMethod = "auto", chunk_bytes: int = 64 * 2**20):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        if norm_method not in ("auto", "ghost", "per_sample"):
            raise ValueError(f"norm_method must be 'auto', 'ghost' or 'per_sample', got {norm_method!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.module = module
        self.loss_reduction = loss_reduction
        self.norm_method = norm_method
        self.chunk_bytes = chunk_bytes
        self._layers: dict[str, _Layer] = {}
        self._handles: list = []
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._backward_seen = False
        self._pass_summed = False  # the recorded pass went into a clipped sum
        self._root_stack: list[bool] = []
        self._norms: Optional[torch.Tensor] = None
        self._serial = next(_SERIAL)
        self._record: Optional[ClippedSum] = None  # the last clipped sum written
        self._check_supported()
        try:
            self._handles.append(module.register_forward_pre_hook(self._root_pre_hook))
            self._handles.append(module.register_forward_hook(self._root_post_hook, always_call=True))
            for name, m in module.named_modules():
                if type(m) in _RULES:
                    layer = _Layer(name, m, _RULES[type(m)])
                    self._layers[name] = layer
                    self._handles.append(m.register_forward_pre_hook(self._make_pre_hook(layer)))
                    self._handles.append(m.register_forward_hook(self._make_post_hook(layer), always_call=True))
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    self._handles.append(m.register_forward_pre_hook(self._make_batchnorm_guard(name)))
        except Exception:
            self.remove()
            raise

    # ------------------------------------------------------------------------------- set-up
    def _check_supported(self) -> None:
        """TypeError for any module with a trainable parameter and no per-sample rule, or a trainable
        parameter shared by two layers (tied weights: its per-sample gradient is the sum over the layers,
        whose norm the per-layer rules do not compute)."""
        owner: dict[int, tuple[int, str]] = {}
        for name, m in self.module.named_modules(remove_duplicate=False):
            for local, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                here = f"{name}.{local}" if name else local
                if owner.setdefault(id(p), (id(m), here))[0] != id(m):  # one module under two names is fine
                    raise TypeError(f"PerSampleGradients: trainable parameter {owner[id(p)][1]!r} is also {here!r} (tied "
                                    "weights shared by two layers are not supported: the per-sample norms would be "
                                    "wrong). Untie or freeze them.")
        for name, m in self.module.named_modules():
            trainable = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not trainable:
                continue
            kind = type(m)
            if kind in _RULES:
                extra = [n for n in trainable if n not in ("weight", "bias")]
                if not extra:
                    continue
                why = f"it has extra trainable parameters {extra} beyond weight/bias"
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                why = ("batch normalisation mixes the samples of a batch, so per-sample gradients are undefined; "
                       "replace it with GroupNorm, or freeze it (requires_grad_(False)) and put it in eval() mode")
            elif isinstance(m, supported_layers()):
                why = (f"it is a subclass of {next(t.__name__ for t in supported_layers() if isinstance(m, t))} "
                       "whose forward may differ; only the exact torch.nn types are supported")
            else:
                why = ("no per-sample gradient rule exists for this layer type; supported: "
                       + ", ".join(t.__name__ for t in supported_layers()))
            raise TypeError(f"PerSampleGradients: layer {_display(name)} ({kind.__module__}.{kind.__qualname__}) "
                            f"has trainable parameters {trainable}: {why}. Freeze it or replace it.")

    def _has_records(self) -> bool:
        return any(layer.calls for layer in self._layers.values())

    def _begin_pass(self) -> None:
        """A forward pass with gradients starts: refuse to merge or drop recorded samples."""
        if self._backward_seen and not self._pass_summed:
            raise RuntimeError(
                "PerSampleGradients: a new forward pass started, but the output gradients of the previous "
                "backward pass were not used by clipped_sum_ (they would be dropped silently). Call "
                "clipped_sum_ (accumulate=True to add micro-batches) before the next forward pass, or clear() "
                "to discard them.")
        if self._backward_seen:
            self.clear()
        elif self._has_records():
            raise RuntimeError(
                "PerSampleGradients: a second forward pass started before the backward pass of the first; the "
                "samples of both would be merged into one per-sample gradient (row i of each pass). Call "
                "backward (and clipped_sum_) after each forward pass, concatenate the batches into one forward "
                "pass, run auxiliary forwards under torch.no_grad(), or clear() to discard the first pass.")

    def _root_pre_hook(self, m: nn.Module, args) -> None:
        counted = torch.is_grad_enabled() and not self._root_stack
        if counted:
            self._begin_pass()
        self._root_stack.append(counted)

    def _root_post_hook(self, m: nn.Module, args, output) -> None:
        if not self._root_stack:  # the pre-hook raised
            return None
        counted = self._root_stack.pop()
        if counted and output is None and not self._backward_seen:  # the forward raised: drop its records
            self.clear()
        return None

    def _make_batchnorm_guard(self, name: str) -> Callable:
        def guard(m: nn.Module, args) -> None:
            if torch.is_grad_enabled() and (m.training or not m.track_running_stats):
                raise ValueError(
                    f"PerSampleGradients: layer {_display(name)} ({type(m).__name__}) normalises with batch "
                    "statistics (training mode or track_running_stats=False), which mixes the samples of a batch "
                    "and breaks per-sample gradients; call .eval() on it (with running statistics) or replace it "
                    "with GroupNorm")
        return guard

    def _make_pre_hook(self, layer: _Layer) -> Callable:
        def pre_hook(m: nn.Module, args) -> None:
            if not torch.is_grad_enabled():
                return
            params = [p for _, p in m.named_parameters(recurse=False) if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            layer.detached.append(params)
        return pre_hook

    def _make_post_hook(self, layer: _Layer) -> Callable:
        def post_hook(m: nn.Module, args, output):
            if not layer.detached:  # the forward ran without gradients
                return None
            params = layer.detached.pop()
            for p in params:
                p.requires_grad_(True)
            if not params or output is None or not torch.is_grad_enabled():  # frozen, or forward raised
                return None
            if self._backward_seen:  # first forward after a backward (outside the root module's forward)
                self._begin_pass()
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TypeError(f"PerSampleGradients: layer {_display(layer.name)} must take and return a tensor")
            a = args[0]
            dims = _INPUT_DIMS.get(type(m))
            if a.dim() < 2 or (dims is not None and a.dim() not in dims):
                raise ValueError(f"PerSampleGradients: layer {_display(layer.name)} ({type(m).__name__}) got an input "
                                 f"of shape {tuple(a.shape)}: a leading batch dimension is required")
            names = tuple(n for n, q in m.named_parameters(recurse=False) if any(q is p for p in params))
            call = _Call(a=a.detach(), names=names, out_shape=output.shape)
            layer.rule.on_forward(m, call)
            layer.calls.append(call)
            if not output.requires_grad:
                anchor = self._anchors.get(output.device)
                if anchor is None:
                    anchor = self._anchors[output.device] = torch.zeros((), device=output.device, requires_grad=True)
                output = _Anchor.apply(output, anchor)
            output.register_hook(self._make_grad_hook(call))
            return output
        return post_hook

    def _make_grad_hook(self, call: _Call) -> Callable:
        def grad_hook(grad: torch.Tensor) -> None:
            if self._pass_summed:
                raise RuntimeError(
                    "PerSampleGradients: a backward pass reached a forward pass whose per-sample gradients are "
                    "already in a clipped sum (clipped_sum_ was called); its samples would count twice. Run a "
                    "new forward pass.")
            call.g = grad.detach() if call.g is None else call.g + grad.detach()
            call.extra.pop("per_sample", None)
            self._backward_seen = True
            self._norms = None
        return grad_hook

    # ------------------------------------------------------------------------------- life cycle
    def clear(self) -> None:
        """Drop the recorded inputs and output gradients (also done by the first forward after a backward)."""
        for layer in self._layers.values():
            layer.calls.clear()
        self._backward_seen = False
        self._pass_summed = False
        self._norms = None

    def remove(self) -> None:
        """Take all hooks off the module and drop the records."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "PerSampleGradients":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------------------- records
    def _recorded(self) -> tuple[list[tuple[_Layer, list[_Call]]], int]:
        """Layers with output gradients, their calls and the batch size; validates the state."""
        self._check_supported()  # a parameter unfrozen after wrapping
        for layer in self._layers.values():
            if layer.detached:
                raise RuntimeError(f"PerSampleGradients: layer {_display(layer.name)} is inside its forward")
        out, sizes = [], {}
        for layer in self._layers.values():
            calls = [c for c in layer.calls if c.g is not None and c.names]
            if calls:
                out.append((layer, calls))
                for c in calls:
                    sizes.setdefault(c.a.shape[0], layer.name)
        if not out:
            raise ValueError("PerSampleGradients: no output gradients recorded; run the forward pass (with "
                             "gradients enabled) and loss.backward() first")
        if len(sizes) > 1:
            listing = ", ".join(f"{b} at {_display(n)}" for b, n in sizes.items())
            raise ValueError(f"PerSampleGradients: layers saw different batch sizes ({listing})")
        return out, next(iter(sizes))

    def _scale(self, batch: int) -> float:
        return float(batch) if self.loss_reduction == "mean" else 1.0

    def _trainable(self, layer: _Layer) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in layer.module.named_parameters(recurse=False) if p.requires_grad]

    @staticmethod
    def _qualified(layer: _Layer, local: str) -> str:
        return f"{layer.name}.{local}" if layer.name else local

    # ------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def per_sample_norms(self) -> torch.Tensor:
        """(B,) global L2 norm of each sample's gradient over all trainable parameters (float32, or
        float64 for float64 models). Cached until the next backward pass."""
        if self._norms is not None:
            return self._norms
        recorded, batch = self._recorded()
        if batch == 0:
            return torch.zeros(0, dtype=_acc(recorded[0][1][0].a.dtype), device=recorded[0][1][0].a.device)
        sq = None
        for layer, calls in recorded:
            part = layer.rule.sq_norms(layer.module, calls, self.norm_method, self.chunk_bytes)
            if sq is None:
                sq = part
            else:
                dtype = torch.promote_types(sq.dtype, part.dtype)
                sq = sq.to(dtype) + part.to(dtype)
        self._norms = sq.sqrt() * self._scale(batch)
        return self._norms

    def _covered(self) -> list[tuple[nn.Parameter, str]]:
        """Every trainable parameter of the wrapped layers, once, with its qualified name."""
        out, seen = [], set()
        for layer in self._layers.values():
            for local, p in self._trainable(layer):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, self._qualified(layer, local)))
        return out

    def _target_record(self, c_value: float, accumulate: bool, where: str) -> ClippedSum:
        """The record a write goes to: a new one, or (``accumulate``) the intact, unused one of this wrapper
        that every covered ``p.grad`` carries."""
        covered = self._covered()
        fresh = ClippedSum(wrapper=self._serial, max_grad_norm=c_value,
                           covered={id(p): name for p, name in covered})
        if not accumulate or all(p.grad is None for p, _ in covered):
            return fresh
        record = None
        for p, name in covered:
            found, _, problem = inspect_clipped_sum(p.grad)
            why = ("it has no gradient while others do" if p.grad is None else
                   "it was not written by clipped_sum_" if found is None else
                   f"it was {problem}" if problem else
                   "it was written by another PerSampleGradients" if found.wrapper != self._serial else
                   "it was already used by an optimizer step (call zero_grad first)" if found.used else
                   f"it was written with max_grad_norm={found.max_grad_norm}, not max_grad_norm={c_value}"
                   if not math.isclose(found.max_grad_norm, c_value, rel_tol=1e-12) else
                   "it belongs to another clipped sum than the other parameters' gradients"
                   if record is not None and found is not record else None)
            if why:
                raise ValueError(f"{where}(accumulate=True): cannot add to p.grad of {name!r}: {why}")
            record = found
        if record.covered != fresh.covered:
            raise ValueError(f"{where}(accumulate=True): the trainable parameters changed since the clipped sum "
                             "being added to was written")
        return record

    def _write(self, writes: list[tuple[nn.Parameter, torch.Tensor, str]], record: ClippedSum, accumulate: bool,
               samples: int) -> None:
        for p, value, name in writes:
            value = value.to(p.dtype).reshape(p.shape)
            if accumulate and p.grad is not None:
                p.grad.add_(value)
            else:
                p.grad = value
            _mark(p.grad, record, name)
        record.samples += samples
        self._record = record
        self._pass_summed = True

    @torch.no_grad()
    def clipped_sum_(self, max_grad_norm: float, *, accumulate: bool = False) -> torch.Tensor:
        """Write ``Σ_i clip(g_i, C)`` into ``p.grad`` of every trainable parameter; return the (B,) norms.

        Opacus' factor ``c_i = min(1, C / (‖g_i‖ + 1e-6))``; each layer's sum is one weight-gradient
        product ``Σ_i c_i g_iᵀ a_i`` (or ``Σ_i c_i G_i`` where the norm pass kept the ``G_i``). Parameters of
        layers that got no output gradient get zeros; a recorded batch of 0 samples writes zeros everywhere.
        ``accumulate=True`` adds to gradients written earlier by this method with the same ``C``
        (micro-batches of one logical batch); otherwise ``p.grad`` is replaced.

        The written gradients form one :class:`ClippedSum`, which :class:`~pyunlearn.optim.DPSGD` checks
        (intact, written by one wrapper covering all its parameters) and uses for one step. The recorded
        pass can go into one clipped sum only: a second call, or a backward pass reaching it again, raises.
        """
        c_value = positive(max_grad_norm, "max_grad_norm")
        if self._pass_summed:
            raise RuntimeError("PerSampleGradients.clipped_sum_: the recorded per-sample gradients are already in a "
                               "clipped sum; run a new forward and backward pass (each sample counts once)")
        recorded, batch = self._recorded()
        record = self._target_record(c_value, accumulate, "clipped_sum_")
        if batch == 0:
            covered = self._covered()
            norms = torch.zeros(0, dtype=_acc(covered[0][0].dtype) if covered else torch.float32)
            self._write([(p, torch.zeros_like(p), name) for p, name in covered], record, accumulate, 0)
            return norms
        norms = self.per_sample_norms()
        factor = clip_factor(norms, c_value) * self._scale(batch)
        writes: list[tuple[nn.Parameter, torch.Tensor, str]] = []
        done = set()
        for layer, calls in recorded:
            sums = layer.rule.clipped(layer.module, calls, factor.to(calls[0].g.device))
            for local, value in sums.items():
                p = getattr(layer.module, local)
                writes.append((p, value, self._qualified(layer, local)))
                done.add(id(p))
        writes += [(p, torch.zeros_like(p), name) for p, name in self._covered() if id(p) not in done]
        self._write(writes, record, accumulate, batch)
        return norms

    @torch.no_grad()
    def empty_batch_(self, max_grad_norm: float) -> torch.Tensor:
        """An empty (Poisson) batch: write zero clipped sums into ``p.grad`` of every trainable parameter,
        without a forward pass, so that ``DPSGD.step()`` takes the noise-only step the accountant counts.
        Refused while a forward or backward pass is recorded and not yet summed (those samples would be
        dropped). Returns the (0,) norms."""
        c_value = positive(max_grad_norm, "max_grad_norm")
        if self._has_records() and not self._pass_summed:
            raise RuntimeError("PerSampleGradients.empty_batch_: a forward pass is recorded and not summed; call "
                               "clipped_sum_ for it, or clear() to discard it")
        self.clear()
        self._check_supported()
        record = self._target_record(c_value, False, "empty_batch_")
        covered = self._covered()
        self._write([(p, torch.zeros_like(p), name) for p, name in covered], record, False, 0)
        self._pass_summed = False  # nothing recorded: the next forward pass starts afresh
        return torch.zeros(0, dtype=_acc(covered[0][0].dtype) if covered else torch.float32)

    @torch.no_grad()
    def grad_samples(self) -> dict[str, torch.Tensor]:
        """{qualified parameter name: (B, *param.shape)} per-sample gradients (materialised: for tests and
        debugging). Layers that got no output gradient give zeros."""
        recorded, batch = self._recorded()
        scale = self._scale(batch)
        out: dict[str, torch.Tensor] = {}
        for layer, calls in recorded if batch else ():
            for local, value in layer.rule.samples(layer.module, calls).items():
                p = getattr(layer.module, local)
                out[self._qualified(layer, local)] = (value * scale).to(p.dtype).reshape(batch, *p.shape)
        for layer in self._layers.values():
            for local, p in self._trainable(layer):
                out.setdefault(self._qualified(layer, local), p.new_zeros((batch, *p.shape)))
        return out


def wrap(module: nn.Module, **kwargs) -> PerSampleGradients:
    """``PerSampleGradients(module, **kwargs)``."""
    return PerSampleGradients(module, **kwargs)
