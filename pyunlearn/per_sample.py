"""Per-sample gradients of a batch in one backward pass ("book-keeping", Bu et al. 2023).

:class:`PerSampleGradients` hooks every layer of a module that has trainable parameters. During the
forward pass it keeps each layer's input ``a`` (an alias of what autograd saves anyway); during the
backward pass a hook on the layer's output keeps the output gradient ``g``. From ``(a, g)``:

* :meth:`~PerSampleGradients.per_sample_norms` gives the global L2 norm of every sample's gradient over
  all trainable parameters. For a layer whose per-sample gradient is ``g_iᵀ a_i`` with ``T`` positions
  (tokens, pixels), ``p`` outputs and ``d`` inputs, the *ghost norm*
  ``‖g_iᵀ a_i‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` is used when ``2T² ≤ p·d`` (no per-sample weight);
  otherwise, on a GPU and when the batch's per-sample gradients exceed ``chunk_bytes``, the fused kernel
  :func:`pyunlearn.ops.per_sample_sq_norms` (CUDA or Triton) reduces each sample's weight gradient to
  its norm in registers (Linear, Conv1d and Conv2d with one group; no per-sample gradient is written), and
  elsewhere that layer's per-sample gradients are formed a few samples at a time (``chunk_bytes``) and
  reduced to norms. A convolution whose whole batch fit in one chunk keeps them until
  :meth:`~PerSampleGradients.clipped_sum_`, which then sums them instead of redoing the weight gradient. For convolutions the per-sample
  gradients come from one grouped weight-gradient convolution (the batch folded into the groups, the
  channels of a group zero-padded to a multiple of 8 for mkldnn's fast kernels); a 1x1 convolution
  without stride or padding is a batched matrix product over pixels.
* :meth:`~PerSampleGradients.clipped_sum_` writes ``Σ_i clip(g_i, C)`` into ``p.grad`` with Opacus'
  factor ``min(1, C / (‖g_i‖ + 1e-6))``, as one weight-gradient product per layer on per-sample scaled
  output gradients (``Σ_i c_i g_iᵀ a_i``), or as ``Σ_i c_i G_i`` over the per-sample gradients the norm
  pass already formed (see above); it forms no new ``(B, *weight.shape)`` tensor.
* :meth:`~PerSampleGradients.grad_samples` materialises the per-sample gradients (tests, debugging).

While a wrapped layer runs forward with gradients enabled, its trainable parameters are detached
from the graph (``requires_grad`` is switched off for the duration of its ``forward``), so
``loss.backward()`` does **not** compute or touch ``p.grad`` of wrapped parameters: that would be the
wasted non-private gradient. ``p.grad`` is written by :meth:`clipped_sum_` only.

**Loss reduction.** The per-sample gradient of sample ``i`` is that of its own loss ``ℓ_i``. With
``loss_reduction="sum"`` (default) call ``backward`` on ``Σ_i ℓ_i``; with ``loss_reduction="mean"``
on ``(1/B) Σ_i ℓ_i`` (the output gradients are then multiplied by the batch size ``B``, as Opacus does).

Supported layers (exact types): ``Linear`` (any leading dims after the batch), ``Conv1d/2d/3d`` (any
stride, padding incl. strings and padding modes, dilation, groups), ``ConvTranspose1d/2d/3d``,
``GroupNorm``, ``LayerNorm``, ``RMSNorm``, ``InstanceNorm1d/2d/3d`` (affine). Any other module with a
trainable parameter raises ``TypeError`` naming it; batch normalisation with batch statistics (in
training mode or without running statistics, frozen or not) raises ``ValueError`` at forward time,
because it mixes the samples of a batch. Frozen parameters (``requires_grad=False``) are skipped.
The batch dimension is the first. A layer called several times in one forward pass (weight sharing)
is supported: the per-sample gradient is the sum over its calls; one parameter shared by two layers
(tied weights) is refused. Not supported: activation checkpointing (recomputed forwards).

**One pass, one clipped sum.** A forward pass of the wrapped module with gradients enabled, its backward
pass, then :meth:`~PerSampleGradients.clipped_sum_`. Refused with an error, because the per-sample
gradients would be wrong or samples would silently count twice or not at all: a second forward pass
before the backward of the first (its rows would merge with the first's), a forward pass after a backward
whose gradients were not summed (they would be dropped; :meth:`~PerSampleGradients.clear` discards them
explicitly), a second ``clipped_sum_`` or a second backward on a pass already summed. Micro-batches of one
logical batch: one pass each, ``clipped_sum_(C, accumulate=True)`` from the second on. The written
gradients are one :class:`ClippedSum` record, fingerprinted, that :class:`pyunlearn.optim.DPSGD` checks
and uses once. An empty (Poisson) batch: :meth:`~PerSampleGradients.empty_batch_` writes zero sums without
a forward pass (a pass over zero rows also gives zero sums).

Example::

    with PerSampleGradients(decoder) as psg:
        loss = per_sample_loss(decoder(features), target).sum()
        loss.backward()
        psg.clipped_sum_(max_grad_norm=1.0)   # p.grad = sum of clipped per-sample gradients
        optimizer.step()                      # e.g. pyunlearn.optim.DPSGD
        optimizer.zero_grad()
"""
from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._validation import positive
from .ops.reference import fingerprint_matches

__all__ = ["ClippedSum", "PerSampleGradients", "wrap", "SUPPORTED_LAYERS", "clip_factor", "clipped_sum_info",
           "inspect_clipped_sum"]

LossReduction = Literal["sum", "mean"]
NormMethod = Literal["auto", "ghost", "per_sample"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_TRAILING_NORM = (nn.LayerNorm, nn.RMSNorm)
SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear, *_CONV, *_CONV_T, nn.GroupNorm, *_TRAILING_NORM, *_INSTANCE)

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


# ==================================================================================================
# Per-layer rules. Each takes the layer, its recorded calls (input a, output gradient g) and returns
# squared per-sample norms (B,), book-kept clipped sums {local name: tensor}, or per-sample gradients.
# ==================================================================================================
@dataclass
class _Call:
    """One forward call of a wrapped layer."""

    a: torch.Tensor
    names: tuple[str, ...]  # trainable parameters at forward time
    out_shape: torch.Size
    extra: dict = field(default_factory=dict)
    g: Optional[torch.Tensor] = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row block: (b, ...) -> (b,)."""
    flat = t.reshape(t.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=_acc(t.dtype)).square()


def _pair(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, g.dtype)
    return a.to(dtype), g.to(dtype)


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _fused_norms(a: torch.Tensor, g: torch.Tensor, bytes_per_sample: int, budget: int) -> bool:
    """Whether the per-sample weight-gradient norms of a layer with input ``a`` and output gradient ``g``
    come from a fused kernel (``pyunlearn.ops.per_sample_sq_norms`` on CUDA or Triton: no per-sample
    gradient is written) rather than from per-sample gradients formed a chunk of samples at a time.

    NOTE: only when the batch's per-sample gradients exceed one chunk (``chunk_bytes``). Below that,
    forming them is one grouped convolution whose result ``clipped_sum_`` reuses, and the fused kernels
    (one program per sample and weight tile, positions walked serially) have little parallelism.
    Not tuned on a GPU (none was available)."""
    return a.shape[0] * bytes_per_sample > budget and ops.per_sample_norms_backend(a, g) != "reference"


def _chunks(batch: int, bytes_per_sample: int, budget: int) -> Iterator[slice]:
    step = max(1, budget // max(1, bytes_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


class _Rule:
    """Interface of a layer rule; ``calls`` all have output gradients and one batch size."""

    def sq_norms(self, layer: nn.Module, calls: list[_Call], method: str, budget: int) -> torch.Tensor:
        raise NotImplementedError

    def clipped(self, layer: nn.Module, calls: list[_Call], c: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def samples(self, layer: nn.Module, calls: list[_Call]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- Linear
class _LinearRule(_Rule):
    @staticmethod
    def _flat(layer: nn.Linear, calls: list[_Call]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, T, d) and output gradients (B, T, p), the calls concatenated along T."""
        pairs = [_pair(c.a, c.g) for c in calls]
        b = calls[0].a.shape[0]
        a = torch.cat([x.reshape(b, -1, layer.in_features) for x, _ in pairs], dim=1)
        g = torch.cat([y.reshape(b, -1, layer.out_features) for _, y in pairs], dim=1)
        return a, g

    def sq_norms(self, layer, calls, method, budget):
        a, g = self._flat(layer, calls)
        names = calls[-1].names
        b, t, d = a.shape
        p = g.shape[2]
        acc = _acc(a.dtype)
        total = torch.zeros(b, dtype=acc, device=a.device)
        if "weight" in names:
            ghost = method == "ghost" or (method == "auto" and 2 * t * t <= p * d)
            if ghost and t == 1:  # rank one: ‖g aᵀ‖ = ‖g‖ ‖a‖
                total += _sq(a) * _sq(g)
            elif ghost:
                aa = torch.bmm(a, a.transpose(1, 2))
                gg = torch.bmm(g, g.transpose(1, 2))
                total += (aa * gg).sum(dim=(1, 2), dtype=acc)
            elif _fused_norms(a, g, p * d * a.element_size(), budget):  # 1x1 conv over tokens: (B, d, 1, T), (B, p, 1, T)
                total += ops.per_sample_sq_norms(a.transpose(1, 2).unsqueeze(2), g.transpose(1, 2).unsqueeze(2),
                                                 kernel_size=(1, 1), stride=(1, 1), padding=(0, 0),
                                                 dilation=(1, 1)).to(acc)
            else:
                for s in _chunks(b, p * d * a.element_size(), budget):
                    total[s] += _sq(torch.bmm(g[s].transpose(1, 2), a[s]))
        if "bias" in names:
            total += _sq(g.sum(dim=1))
        return total

    def clipped(self, layer, calls, c):
        a, g = self._flat(layer, calls)
        names = calls[-1].names
        gc = g * _bcast(c, g)
        out = {}
        if "weight" in names:
            out["weight"] = gc.reshape(-1, gc.shape[2]).t() @ a.reshape(-1, a.shape[2])
        if "bias" in names:
            out["bias"] = gc.sum(dim=(0, 1))
        return out

    def samples(self, layer, calls):
        a, g = self._flat(layer, calls)
        names = calls[-1].names
        out = {}
        if "weight" in names:
            out["weight"] = torch.bmm(g.transpose(1, 2), a)
        if "bias" in names:
            out["bias"] = g.sum(dim=1)
        return out


# ---------------------------------------------------------------------------------- Convolutions
def _conv_args(layer: nn.Module, a: torch.Tensor, out_shape: torch.Size) -> tuple[torch.Tensor, dict]:
    """The (possibly pre-padded) input and the ``aten.convolution_backward`` arguments of a call."""
    nd = a.dim() - 2
    if isinstance(layer, _CONV):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            if layer.padding == "valid":
                padding = (0,) * nd
            else:
                mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
                a = F.pad(a, layer._reversed_padding_repeated_twice, mode=mode)
                padding = (0,) * nd
        else:
            padding = tuple(layer.padding)
        output_padding = (0,) * nd
        transposed = False
    else:  # transposed: output_padding from the actual shapes (forward may have used output_size=)
        padding = tuple(layer.padding)
        output_padding = tuple(
            out_shape[2 + i] - ((a.shape[2 + i] - 1) * layer.stride[i] - 2 * padding[i]
                                + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1)
            for i in range(nd))
        transposed = True
    args = dict(stride=list(layer.stride), padding=list(padding), dilation=list(layer.dilation),
                transposed=transposed, output_padding=list(output_padding))
    return a, args


def _conv_weight_grad(a: torch.Tensor, g: torch.Tensor, weight_shape: tuple[int, ...], groups: int, args: dict,
                      bias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight (and bias) gradient of a convolution with input ``a`` and output gradient ``g``."""
    placeholder = a.new_empty(1).expand(weight_shape)
    _, gw, gb = torch.ops.aten.convolution_backward(
        g, a, placeholder, [g.shape[1]] if bias else None, args["stride"], args["padding"], args["dilation"],
        args["transposed"], args["output_padding"], groups, [False, True, bias])
    return gw, gb


#: mkldnn's grouped weight-gradient kernels are fast when the channels of every group are a multiple of
#: the SIMD block; the per-sample path pads them with zero channels to a multiple of this.
_CHANNEL_BLOCK = 8


def _round_up(n: int) -> int:
    return -(-n // _CHANNEL_BLOCK) * _CHANNEL_BLOCK


def _pad_channels(t: torch.Tensor, groups: int, per_group: int, padded: int) -> torch.Tensor:
    """(b, groups * per_group, *sp) -> (1, b * groups * padded, *sp), zero channels appended per group."""
    b, sp = t.shape[0], t.shape[2:]
    if padded == per_group:
        return t.reshape(1, b * groups * per_group, *sp)
    out = t.new_zeros(b, groups, padded, *sp)
    out[:, :, :per_group] = t.reshape(b, groups, per_group, *sp)
    return out.reshape(1, b * groups * padded, *sp)


def _pointwise(layer: nn.Module, args: dict) -> bool:
    """A 1x1 convolution without stride, padding or groups: a Linear layer over positions."""
    return (not args["transposed"] and layer.groups == 1 and all(k == 1 for k in layer.kernel_size)
            and all(s == 1 for s in args["stride"]) and all(p == 0 for p in args["padding"]))


def _conv_per_sample(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, args: dict, *, weight: bool,
                     bias: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample (b, *weight.shape) and (b, out_channels) gradients of ``b`` samples."""
    b = a.shape[0]
    if not weight:
        return None, g.sum(dim=tuple(range(2, g.dim()))) if bias else None
    w = layer.weight
    if _pointwise(layer, args):
        a3, g3 = a.reshape(b, a.shape[1], -1), g.reshape(b, g.shape[1], -1)
        return torch.bmm(g3, a3.transpose(1, 2)).view(b, *w.shape), g3.sum(dim=2) if bias else None
    # One grouped weight-gradient convolution, the batch folded into the groups.
    groups = layer.groups
    ca, cg = a.shape[1] // groups, g.shape[1] // groups
    ca_p, cg_p = _round_up(ca), _round_up(cg)
    a1 = _pad_channels(a, groups, ca, ca_p)
    g1 = _pad_channels(g, groups, cg, cg_p)
    kernel = tuple(w.shape[2:])
    if args["transposed"]:  # weight (in, out/groups, *k)
        shape, keep = (b * groups * ca_p, cg_p, *kernel), (ca, cg)
    else:  # weight (out, in/groups, *k)
        shape, keep = (b * groups * cg_p, ca_p, *kernel), (cg, ca)
    gw, gb = _conv_weight_grad(a1, g1, shape, groups * b, args, bias=bias)
    gw = gw.view(b, groups, shape[0] // (b * groups), shape[1], *kernel)
    if (ca_p, cg_p) != (ca, cg):
        gw = gw[:, :, :keep[0], :keep[1]]
    gw = gw.reshape(b, *w.shape)
    if gb is not None:
        gb = gb.view(b, groups, cg_p)[:, :, :cg].reshape(b, -1)
    return gw, gb


class _ConvRule(_Rule):
    @staticmethod
    def _prepared(layer, calls):
        out = []
        for call in calls:
            a, g = _pair(call.a, call.g)
            a, args = _conv_args(layer, a, call.out_shape)
            out.append((a, g, args))
        return out

    @staticmethod
    def _ghost_ok(layer, prepared, method) -> bool:
        if (method == "per_sample" or len(prepared) != 1 or type(layer) not in (nn.Conv1d, nn.Conv2d)
                or layer.groups != 1):
            return False
        if method == "ghost":
            return True
        a, g, _ = prepared[0]
        t = math.prod(g.shape[2:])
        d = layer.weight[0].numel()
        return 2 * t * t <= layer.out_channels * d

    @staticmethod
    def _fused_ok(layer, prepared, method, budget) -> bool:
        a, g, _ = prepared[0]
        return (method != "ghost" and len(prepared) == 1 and type(layer) in (nn.Conv1d, nn.Conv2d)
                and layer.groups == 1 and _fused_norms(a, g, layer.weight.numel() * a.element_size(), budget))

    @staticmethod
    def _as_2d(layer, a, g, args):
        """(a, g, kernel, stride, padding, dilation) of a Conv1d/Conv2d call as a 2-d convolution."""
        if a.dim() == 3:  # Conv1d as a 2-d convolution of height 1
            return (a.unsqueeze(2), g.unsqueeze(2), (1, *layer.kernel_size), (1, *args["stride"]),
                    (0, *args["padding"]), (1, *args["dilation"]))
        return a, g, layer.kernel_size, args["stride"], args["padding"], args["dilation"]

    @classmethod
    def _fused_sq(cls, layer, a, g, args) -> torch.Tensor:
        a, g, kernel, stride, padding, dilation = cls._as_2d(layer, a, g, args)
        return ops.per_sample_sq_norms(a, g, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)

    @classmethod
    def _ghost_sq(cls, layer, a, g, args) -> torch.Tensor:
        a, g, kernel, stride, padding, dilation = cls._as_2d(layer, a, g, args)
        u = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, d, T)
        gt = g.reshape(g.shape[0], g.shape[1], -1)  # (B, p, T)
        aa = torch.bmm(u.transpose(1, 2), u)
        gg = torch.bmm(gt.transpose(1, 2), gt)
        return (aa * gg).sum(dim=(1, 2), dtype=_acc(a.dtype))

    @staticmethod
    def _summed(layer, prepared, s: slice, weight: bool, bias: bool):
        """Per-sample gradients of the samples ``s``, summed over the layer's calls."""
        gw_total, gb_total = None, None
        for a, g, args in prepared:
            gw, gb = _conv_per_sample(layer, a[s], g[s], args, weight=weight, bias=bias)
            gw_total = gw if gw_total is None else (gw_total + gw if gw is not None else gw_total)
            gb_total = gb if gb_total is None else (gb_total + gb if gb is not None else gb_total)
        return gw_total, gb_total

    def sq_norms(self, layer, calls, method, budget):
        prepared = self._prepared(layer, calls)
        names = calls[-1].names
        want_w, want_b = "weight" in names, "bias" in names
        b = prepared[0][0].shape[0]
        acc = _acc(prepared[0][0].dtype)
        total = torch.zeros(b, dtype=acc, device=prepared[0][0].device)
        if want_w and self._ghost_ok(layer, prepared, method):
            total += self._ghost_sq(layer, *prepared[0])
            want_w = False
        elif want_w and self._fused_ok(layer, prepared, method, budget):
            total += self._fused_sq(layer, *prepared[0]).to(acc)
            want_w = False
        if not want_w:
            if want_b:
                total += _sq(sum(g.sum(dim=tuple(range(2, g.dim()))) for _, g, _ in prepared))
            return total
        per_sample_bytes = layer.weight.numel() * prepared[0][0].element_size()
        chunks = list(_chunks(b, per_sample_bytes, budget))
        for s in chunks:
            gw, gb = self._summed(layer, prepared, s, want_w, want_b)
            if gw is not None:
                total[s] += _sq(gw)
            if gb is not None:
                total[s] += _sq(gb)
        if len(chunks) == 1 and len(calls) == 1:
            # NOTE: when the whole batch fit in one chunk, the per-sample gradients behind the norms are
            # kept for clipped(): sum_i c_i G_i then replaces a second weight-gradient convolution.
            # Measured on the DP-SGD benchmark decoder (3 convs 32->32, 64x64, B=16, 2 threads).
            calls[0].extra["per_sample"] = (gw, gb)
        return total

    def clipped(self, layer, calls, c):
        names = calls[-1].names
        want_w, want_b = "weight" in names, "bias" in names
        cached = calls[0].extra.get("per_sample") if len(calls) == 1 else None
        if cached is not None and (cached[0] is not None) == want_w and (cached[1] is not None) == want_b:
            return {name: torch.tensordot(c.to(t.dtype), t, dims=1)
                    for name, t in zip(("weight", "bias"), cached) if t is not None}
        gw_total, gb_total = None, None
        for a, g, args in self._prepared(layer, calls):
            gc = g * _bcast(c, g)
            if want_w and _pointwise(layer, args):
                b = a.shape[0]
                gc3 = gc.reshape(b, gc.shape[1], -1)
                gw = torch.einsum("bot,bit->oi", gc3, a.reshape(b, a.shape[1], -1)).view(layer.weight.shape)
                gb = gc3.sum(dim=(0, 2)) if want_b else None
            elif want_w:
                gw, gb = _conv_weight_grad(a, gc, tuple(layer.weight.shape), layer.groups, args, bias=want_b)
            else:
                gw, gb = None, gc.sum(dim=(0, *range(2, gc.dim())))
            gw_total = gw if gw_total is None else (gw_total + gw if gw is not None else gw_total)
            gb_total = gb if gb_total is None else (gb_total + gb if gb is not None else gb_total)
        out = {}
        if want_w:
            out["weight"] = gw_total
        if want_b:
            out["bias"] = gb_total
        return out

    def samples(self, layer, calls):
        prepared = self._prepared(layer, calls)
        names = calls[-1].names
        gw, gb = self._summed(layer, prepared, slice(None), "weight" in names, "bias" in names)
        out = {}
        if gw is not None:
            out["weight"] = gw
        if gb is not None:
            out["bias"] = gb
        return out


# ------------------------------------------------------------------------------ Normalisations
class _NormRule(_Rule):
    """Affine normalisations: y = x̂ ⊙ weight + bias, with x̂ recomputed from the kept input."""

    @staticmethod
    def _param_dims(layer, ndim: int) -> tuple[int, ...]:
        """Dimensions of the input that index the affine parameters."""
        if isinstance(layer, _TRAILING_NORM):
            k = len(layer.normalized_shape)
            return tuple(range(ndim - k, ndim))
        return (1,)

    @staticmethod
    def _normalised(layer, call: _Call, a: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.GroupNorm):
            return F.group_norm(a, layer.num_groups, eps=layer.eps)
        if isinstance(layer, nn.LayerNorm):
            return F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
        if isinstance(layer, nn.RMSNorm):
            return F.rms_norm(a, layer.normalized_shape, eps=layer.eps)
        if call.extra.get("use_input_stats", True):
            return F.instance_norm(a, eps=layer.eps)
        shape = (1, -1) + (1,) * (a.dim() - 2)
        mean = layer.running_mean.to(a.dtype).reshape(shape)
        var = layer.running_var.to(a.dtype).reshape(shape)
        return (a - mean) / torch.sqrt(var + layer.eps)

    def _terms(self, layer, calls):
        for call in calls:
            a, g = _pair(call.a, call.g)
            yield self._normalised(layer, call, a), g

    def samples(self, layer, calls):
        names = calls[-1].names
        out: dict[str, torch.Tensor] = {}
        for xhat, g in self._terms(layer, calls):
            keep = (0,) + self._param_dims(layer, g.dim())
            reduce = tuple(i for i in range(g.dim()) if i not in keep)
            parts = {}
            if "weight" in names:
                parts["weight"] = (xhat * g).sum(dim=reduce) if reduce else xhat * g
            if "bias" in names:
                parts["bias"] = g.sum(dim=reduce) if reduce else g
            for k, v in parts.items():
                out[k] = v if k not in out else out[k] + v
        return out

    def sq_norms(self, layer, calls, method, budget):  # per-sample gradients are (B, C): tiny
        parts = self.samples(layer, calls)
        return sum(_sq(v) for v in parts.values())

    def clipped(self, layer, calls, c):
        names = calls[-1].names
        out: dict[str, torch.Tensor] = {}
        for xhat, g in self._terms(layer, calls):
            gc = g * _bcast(c, g)
            keep = self._param_dims(layer, g.dim())
            reduce = tuple(i for i in range(g.dim()) if i not in keep)
            parts = {}
            if "weight" in names:
                parts["weight"] = (xhat * gc).sum(dim=reduce)
            if "bias" in names:
                parts["bias"] = gc.sum(dim=reduce)
            for k, v in parts.items():
                out[k] = v if k not in out else out[k] + v
        return out


_LINEAR, _CONVS, _NORMS = _LinearRule(), _ConvRule(), _NormRule()
_RULES: dict[type, _Rule] = {nn.Linear: _LINEAR, nn.GroupNorm: _NORMS, nn.LayerNorm: _NORMS, nn.RMSNorm: _NORMS}
_RULES.update({t: _CONVS for t in _CONV + _CONV_T})
_RULES.update({t: _NORMS for t in _INSTANCE})
_INPUT_DIMS: dict[type, tuple[int, ...]] = {
    nn.Conv1d: (3,), nn.Conv2d: (4,), nn.Conv3d: (5,), nn.ConvTranspose1d: (3,), nn.ConvTranspose2d: (4,),
    nn.ConvTranspose3d: (5,), nn.InstanceNorm1d: (3,), nn.InstanceNorm2d: (4,), nn.InstanceNorm3d: (5,),
}


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
            elif isinstance(m, SUPPORTED_LAYERS):
                why = (f"it is a subclass of {next(t.__name__ for t in SUPPORTED_LAYERS if isinstance(m, t))} "
                       "whose forward may differ; only the exact torch.nn types are supported")
            else:
                why = ("no per-sample gradient rule exists for this layer type; supported: "
                       + ", ".join(t.__name__ for t in SUPPORTED_LAYERS))
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
            if isinstance(m, _INSTANCE):
                call.extra["use_input_stats"] = m.training or not m.track_running_stats
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
