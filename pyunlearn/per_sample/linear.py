"""Per-sample rule of ``nn.Linear`` (any leading dims after the batch): ghost norm or per-sample products."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._base import _Rule, _acc, _bcast, _chunks, _fused_norms, _pair, _sq, register_rule

__all__: list[str] = []


@register_rule({nn.Linear: None})
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

