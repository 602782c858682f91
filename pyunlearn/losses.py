"""Masked pixel losses: the loss of a pixel set (retain, forget) without touching the others.

Every loss here has the calling convention of :func:`masked_cross_entropy`::

    loss(logits, target, mask, *, weight=None, reduction="mean")

with ``logits`` ``(B, K, *spatial)`` (``K == 1``: binary, sigmoid; ``K >= 2``: softmax), integer ``target``
``(B, *spatial)``, binary ``mask`` ``(B, *spatial)`` of the pixels that count, and per-sample losses
``(B,)`` for ``reduction="none"``. A sample whose mask is empty has loss 0 and gradient 0 (never NaN),
and logits outside the mask (even NaN/Inf ones) neither enter the loss nor receive a gradient.
:func:`get_loss` maps the names ``"ce"``, ``"dice"``, ``"dice_ce"`` and ``"focal"`` to these functions.
"""
from __future__ import annotations

import inspect
import math
import types
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import ops
from ._validation import check_binary_mask, check_same_device, check_tensor

__all__ = ["masked_cross_entropy", "masked_soft_dice", "masked_dice_ce", "masked_focal", "get_loss", "LOSSES"]

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


# --------------------------------------------------------------------------------------------------
# Dice, Dice + CE, focal: plain PyTorch autograd on the flattened (B, K, N) logits
# --------------------------------------------------------------------------------------------------
def _nonnegative(value, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _prepare(logits, target, mask, weight, reduction):
    """Validate; return float32/float64 logits ``(B, K, N)`` zeroed outside the mask, int64 target ``(B, N)``
    (0 outside the mask), the bool mask ``(B, N)`` and its per-sample pixel counts."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_inputs(logits, target, mask, weight)
    b, k = logits.shape[:2]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    m = mask.reshape(b, -1).bool()
    # torch.where (not a product): masked-out logits, however extreme or non-finite, give finite values and
    # an exactly zero gradient.
    x = torch.where(m.unsqueeze(1), logits.reshape(b, k, -1).to(acc), 0.0)
    t = torch.where(m, target.reshape(b, -1).to(torch.int64), 0)
    return x, t, m, m.sum(dim=1)


def _finish(per_pixel_or_sample: torch.Tensor, count: torch.Tensor, weight, reduction) -> torch.Tensor:
    per_sample = torch.where(count > 0, per_pixel_or_sample, 0.0)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total if reduction == "sum" else total / max(per_sample.shape[0], 1)


def masked_soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    smooth: float = 1e-5,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft Dice loss over the pixels selected by ``mask``, per sample, on the foreground classes.

    With ``p`` the predicted probabilities (softmax over K, or the sigmoid for ``K == 1``) and ``y`` the
    one-hot target, for each sample ``b`` and foreground class ``c`` (classes ``1..K-1``; the single
    channel for ``K == 1``), sums running over the masked pixels of ``b`` only::

        dice[b, c] = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth)
        loss[b]    = weight[b] * (1 - mean_c dice[b, c])

    Args:
        logits, target, mask, weight, reduction: as in :func:`masked_cross_entropy`; works for any number of
            spatial dims, e.g. ``(B, K, H, W)`` and ``(B, K, D, H, W)``.
        smooth: added to numerator and denominator (MONAI's ``DiceLoss`` default, ``1e-5``); must be > 0.
            It makes a class absent from both the target and the prediction score ``dice ~ 1`` (loss ~ 0)
            instead of 0/0; a class absent from the target but predicted with probability mass ``P`` over
            the masked pixels scores ``smooth / (P + smooth)``. A sample with an empty mask has loss
            exactly 0 and zero gradient.

    Accumulation is float32 (float64 for float64 logits); the result has that dtype.
    """
    smooth = _nonnegative(smooth, "smooth", positive=True)
    x, t, m, count = _prepare(logits, target, mask, weight, reduction)
    k = x.shape[1]
    if k == 1:
        p = torch.sigmoid(x)                                                    # (B, 1, N)
        y = t.unsqueeze(1) == 1
    else:
        p = torch.softmax(x, dim=1)[:, 1:]                                      # (B, K-1, N)
        y = t.unsqueeze(1) == torch.arange(1, k, device=t.device).view(1, -1, 1)
    mf = m.unsqueeze(1).to(p.dtype)
    yf = y.to(p.dtype) * mf
    pm = p * mf
    inter = (pm * yf).sum(dim=2)
    denom = pm.sum(dim=2) + yf.sum(dim=2)
    dice = (2.0 * inter + smooth) / (denom + smooth)                           # (B, C)
    return _finish(1.0 - dice.mean(dim=1), count, weight, reduction)


def masked_dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    smooth: float = 1e-5,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``lambda_dice * masked_soft_dice + lambda_ce * masked_cross_entropy`` per sample (MONAI's ``DiceCELoss``
    on the masked pixels), then ``weight`` and ``reduction`` as in :func:`masked_cross_entropy`.

    The cross-entropy term is the fused :func:`masked_cross_entropy`; ``smooth`` is that of
    :func:`masked_soft_dice`. An empty mask gives 0 and a zero gradient.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    lambda_dice = _nonnegative(lambda_dice, "lambda_dice")
    lambda_ce = _nonnegative(lambda_ce, "lambda_ce")
    dice = masked_soft_dice(logits, target, mask, smooth=smooth, weight=weight, reduction="none")
    # Zero the logits outside the mask so that non-finite values there cannot reach the fused op.
    inside = torch.where(mask.bool().unsqueeze(1), logits, 0.0)
    ce = masked_cross_entropy(inside, target, mask, weight=weight, reduction="none")
    per_sample = lambda_dice * dice + lambda_ce * ce.to(dice.dtype)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total if reduction == "sum" else total / max(per_sample.shape[0], 1)


def _class_weights(alpha, k: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The focal ``alpha`` as one weight per class index (``2`` indices for ``K == 1``)."""
    if alpha is None:
        return None
    n = max(k, 2)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the weight of the foreground classes), got {alpha!r}")
        return torch.tensor([1.0 - a] + [a] * (n - 1), dtype=like.dtype, device=like.device)
    if isinstance(alpha, torch.Tensor):
        w = alpha.detach()
    elif isinstance(alpha, Sequence) and not isinstance(alpha, str):
        try:
            w = torch.tensor([float(v) for v in alpha])
        except (TypeError, ValueError):
            raise TypeError(f"alpha must be None, a float or a sequence of {n} per-class weights, got {alpha!r}") \
                from None
    else:
        raise TypeError(f"alpha must be None, a float or a sequence of {n} per-class weights, got "
                        f"{type(alpha).__name__}")
    if tuple(w.shape) != (n,) or w.is_complex():
        raise ValueError(f"alpha must hold {n} per-class weights for logits with K={k}, got shape {tuple(w.shape)}")
    w = w.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"alpha weights must be finite and >= 0, got {w.tolist()}")
    return w


def masked_focal(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: Union[None, float, Sequence[float], torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss, averaged over the pixels selected by ``mask``, per sample.

    Per pixel, with ``p_t`` the predicted probability of the target class::

        focal = -alpha_t * (1 - p_t) ** gamma * log(p_t)
        loss[b] = weight[b] * mean_{pixels in mask[b]} focal

    ``K == 1`` is torchvision's ``sigmoid_focal_loss`` (``p = sigmoid(logit)``); ``K >= 2`` the usual
    softmax form (``p_t = softmax(logits)[target]``); ``gamma = 0`` without ``alpha`` is the cross-entropy.

    Args:
        logits, target, mask, weight, reduction: as in :func:`masked_cross_entropy`.
        gamma: focusing exponent, finite and >= 0 (default 2).
        alpha: ``None`` (no class weighting, the default), a float ``a`` in ``[0, 1]``, the weight of the
            foreground classes (class 0 gets ``1 - a``; for ``K == 1`` exactly torchvision's ``alpha``), or
            one non-negative weight per class (``K`` of them, 2 for ``K == 1``).

    ``log p_t`` and ``log(1 - p_t)`` come from log-sum-exps, so the loss and its gradient stay finite for
    saturated logits and any ``gamma >= 0``. Accumulation is float32 (float64 for float64 logits).
    """
    gamma = _nonnegative(gamma, "gamma")
    x, t, m, count = _prepare(logits, target, mask, weight, reduction)
    k = x.shape[1]
    w = _class_weights(alpha, k, x)
    if k == 1:
        z = torch.where(t == 1, x[:, 0], -x[:, 0])           # logit of the target class
        log_pt = F.logsigmoid(z)
        log_not_pt = F.logsigmoid(-z)
    else:
        lse = torch.logsumexp(x, dim=1)                       # (B, N)
        log_pt = x.gather(1, t.unsqueeze(1)).squeeze(1) - lse
        is_target = t.unsqueeze(1) == torch.arange(k, device=t.device).view(1, -1, 1)
        log_not_pt = torch.logsumexp(torch.where(is_target, -math.inf, x), dim=1) - lse
    focal = -torch.exp(gamma * log_not_pt) * log_pt if gamma else -log_pt
    if w is not None:
        focal = focal * w[t]
    focal = torch.where(m, focal, 0.0)
    per_sample = focal.sum(dim=1) / count.clamp_min(1).to(focal.dtype)
    return _finish(per_sample, count, weight, reduction)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
LossFn = Callable[..., torch.Tensor]

LOSSES = types.MappingProxyType({
    "ce": masked_cross_entropy,
    "dice": masked_soft_dice,
    "dice_ce": masked_dice_ce,
    "focal": masked_focal,
})
"""The losses :func:`get_loss` knows by name (read-only)."""


def get_loss(loss: Union[str, LossFn]) -> LossFn:
    """The loss named ``loss`` (one of ``"ce"``, ``"dice"``, ``"dice_ce"``, ``"focal"``), or ``loss`` itself
    if it is a callable with the calling convention of :func:`masked_cross_entropy`::

        loss(logits, target, mask, *, weight=None, reduction="mean") -> Tensor  # (B,) for reduction="none"

    Options of the named losses go through :func:`functools.partial`, e.g.
    ``get_loss(functools.partial(masked_focal, gamma=3.0, alpha=0.25))``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        TypeError: neither a string nor a callable, or a callable that cannot be called as above.
    """
    if isinstance(loss, str):
        try:
            return LOSSES[loss]
        except KeyError:
            raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(repr(n) for n in LOSSES)} "
                             f"(or pass a callable)") from None
    if not callable(loss):
        raise TypeError(f"loss must be a name ({', '.join(repr(n) for n in LOSSES)}) or a callable, "
                        f"got {type(loss).__name__}")
    try:
        signature = inspect.signature(loss)
    except (TypeError, ValueError):  # some builtins and C callables have no signature to check
        return loss
    try:
        signature.bind(None, None, None, weight=None, reduction="none")
    except TypeError as err:
        name = getattr(loss, "__qualname__", None) or getattr(getattr(loss, "func", None), "__qualname__", None) \
            or type(loss).__name__
        raise TypeError(f"loss callable {name}{signature} must accept (logits, target, mask, *, weight=None, "
                        f"reduction='mean') like pyunlearn.losses.masked_cross_entropy: {err}") from None
    return loss
