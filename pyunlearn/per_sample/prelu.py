"""Per-sample rule of ``nn.PReLU`` (MONAI's default activation): ``y = max(0, x) + w · min(0, x)``.

The gradient of a sample's loss with respect to ``w`` is ``Σ g · min(x, 0)`` over the sample's elements
(``num_parameters == 1``), or over the elements of each channel (dim 1) for ``num_parameters == C``: a
``(B, num_parameters)`` per-sample gradient, so norms and clipped sums are formed from it directly.
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import _Rule, _acc, _pair, _sq, register_rule

__all__: list[str] = []


@register_rule({nn.PReLU: None})
class _PReLURule(_Rule):
    @staticmethod
    def _per_sample(layer: nn.PReLU, calls) -> torch.Tensor:
        """(B, num_parameters), summed over the layer's calls; accumulated in float32 (float64 for float64)."""
        total = None
        for call in calls:
            a, g = _pair(call.a, call.g)
            acc = _acc(a.dtype)
            term = g.to(acc) * a.to(acc).clamp(max=0)
            b = term.shape[0]
            part = (term.reshape(b, -1).sum(dim=1, keepdim=True) if layer.num_parameters == 1
                    else term.reshape(b, term.shape[1], -1).sum(dim=2))
            total = part if total is None else total + part
        return total

    def samples(self, layer, calls):
        return {"weight": self._per_sample(layer, calls)} if "weight" in calls[-1].names else {}

    def sq_norms(self, layer, calls, method, budget):  # (B, num_parameters): tiny
        return _sq(self._per_sample(layer, calls))

    def clipped(self, layer, calls, c):
        if "weight" not in calls[-1].names:
            return {}
        per_sample = self._per_sample(layer, calls)
        return {"weight": torch.tensordot(c.to(per_sample.dtype), per_sample, dims=1)}
