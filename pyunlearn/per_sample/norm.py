"""Per-sample rule of the affine normalisations ``GroupNorm``, ``LayerNorm``, ``RMSNorm`` and ``InstanceNorm1d/2d/3d``
(``y = x̂ ⊙ weight + bias``, with x̂ recomputed from the kept input)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import _Call, _Rule, _bcast, _pair, _sq, register_rule

__all__: list[str] = []

_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_TRAILING_NORM = (nn.LayerNorm, nn.RMSNorm)


@register_rule({nn.GroupNorm: None, nn.LayerNorm: None, nn.RMSNorm: None, nn.InstanceNorm1d: (3,),
                nn.InstanceNorm2d: (4,), nn.InstanceNorm3d: (5,)})
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

    def on_forward(self, layer, call):
        if isinstance(layer, _INSTANCE):  # which statistics the forward used
            call.extra["use_input_stats"] = layer.training or not layer.track_running_stats

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

