"""Per-sample rule of the convolutions ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` (any stride, padding incl.
strings and padding modes, dilation, groups): ghost norm, fused norm kernels, or per-sample weight gradients from
one grouped weight-gradient convolution (the batch folded into the groups)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._base import _Rule, _acc, _bcast, _chunks, _fused_norms, _pair, _sq, register_rule

__all__: list[str] = []

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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


@register_rule({nn.Conv1d: (3,), nn.Conv2d: (4,), nn.Conv3d: (5,), nn.ConvTranspose1d: (3,),
                nn.ConvTranspose2d: (4,), nn.ConvTranspose3d: (5,)})
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

