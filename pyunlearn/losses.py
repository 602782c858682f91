"""Masked pixel losses: the loss of a pixel set (retain, forget) without touching the others."""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._validation import check_binary_mask, check_same_device, check_tensor

__all__ = ["masked_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(logits, target, mask, weight) -> None:
    check_tensor(logits, "logits")
    check_tensor(target, "target")
    check_tensor(mask, "mask")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (B, K, ...), got {tuple(logits.shape)}")
    b, k = logits.shape[:2]
    expected = (b,) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(mask.shape)}")
    check_binary_mask(mask, "mask")
    if weight is not None:
        check_tensor(weight, "weight")
        if tuple(weight.shape) != (b,):
            raise ValueError(f"weight must have shape ({b},) (one value per sample), got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
        if weight.requires_grad:
            raise ValueError("weight is a constant of the loss (no gradient flows to it); pass weight.detach()")
    check_same_device({"logits": logits, "target": target, "mask": mask, "weight": weight})
    if target.is_floating_point() or target.dtype == torch.bool:
        if k != 1:
            raise TypeError(f"target must hold integer class indices for K={k} classes, got dtype {target.dtype}")
        check_binary_mask(target, "target")
    elif target.numel():
        lo, hi = int(target.min()), int(target.max())
        limit = 2 if k == 1 else k
        if lo < 0 or hi >= limit:
            raise ValueError(f"target values must be in [0, {limit - 1}] for logits with K={k}, "
                             f"found range [{lo}, {hi}]")


def masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the pixels selected by ``mask``, averaged per sample.

    Args:
        logits: ``(B, K, H, W)`` (any number of trailing spatial dims, including none). ``K == 1`` is a
            binary model scored with the sigmoid; ``K >= 2`` uses the softmax.
        target: ``(B, H, W)`` integer class indices (``0/1`` for ``K == 1``; bool or 0/1 floats accepted).
        mask: ``(B, H, W)`` binary; the pixels that enter the loss.
        weight: optional ``(B,)`` per-sample weight, a constant (no gradient); may be negative (the
            forget term of NegGrad).
        reduction: ``"none"`` gives the ``(B,)`` per-sample losses
            ``weight[b] * mean_{p in mask[b]} ce(p)``; ``"sum"`` their sum; ``"mean"`` their sum over B.
            A sample with an empty mask contributes 0 (never NaN).

    Forward and backward are one fused op (``pyunlearn.ops``); accumulation is float32 for
    low-precision logits.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_inputs(logits, target, mask, weight)
    b, k = logits.shape[:2]
    flat_logits = logits.reshape(b, k, -1)
    flat_target = target.reshape(b, -1)
    if flat_target.is_floating_point() or flat_target.dtype == torch.bool:
        flat_target = flat_target.to(torch.int64)
    per_sample = ops.masked_cross_entropy(flat_logits, flat_target, mask.reshape(b, -1).bool(), weight)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total if reduction == "sum" else total / max(b, 1)
