"""Hot-path ops: fused masked cross-entropy, multi-tensor clip + noise + update steps, per-sample norms.

Every op has a pure-PyTorch reference (:mod:`pyunlearn.ops.reference`, the oracle); the functions here
run it through the ``pyunlearn::*`` torch.library ops, which dispatch to the fastest live backend
(C++ on CPU, CUDA/Triton on GPU; see :mod:`pyunlearn.ops._registry`). ``PYUNLEARN_BACKEND`` forces
one; :func:`backends` says which are live. All noise is the ChaCha20 counter-mode noise of
:mod:`pyunlearn.ops.rng`, bit-identical on every backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference  # noqa: F401
from ._registry import (  # noqa: F401
    BACKENDS,
    add_noise_op,
    backends,
    dpsgd_op,
    fingerprint,
    forced_backend,
    gaussian_noise,
    global_norm,
    gradient_clipping_op,
    masked_cross_entropy_op,
    model_clipping_op,
    per_sample_norms_backend,
    per_sample_sq_norms_op,
    select_backend,
)
from .rng import STREAM_INIT, STREAM_UPDATE  # noqa: F401

__all__ = [
    "BACKENDS",
    "STREAM_INIT",
    "STREAM_UPDATE",
    "add_noise_",
    "backends",
    "dpsgd_step_",
    "fingerprint",
    "forced_backend",
    "gaussian_noise",
    "global_norm",
    "gradient_clipping_step_",
    "masked_cross_entropy",
    "masked_cross_entropy_fwd_bwd",
    "model_clipping_step_",
    "per_sample_norms_backend",
    "per_sample_sq_norms",
    "per_sample_sq_norms_op",
    "select_backend",
]

_LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Validation (cheap: shapes, dtypes, devices; no device synchronisation)
# --------------------------------------------------------------------------------------------------
def _check_masked_ce(logits: Tensor, target: Tensor, mask: Tensor, weight: Optional[Tensor]) -> None:
    for name, t in (("logits", logits), ("target", target), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, K, N), got {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    b, k, n = logits.shape
    if k < 1:
        raise ValueError(f"logits must have K >= 1 classes, got shape {tuple(logits.shape)}")
    if tuple(target.shape) != (b, n):
        raise ValueError(f"target must have shape {(b, n)} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"mask must have shape {(b, n)} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if tuple(weight.shape) != (b,):
            raise ValueError(f"weight must have shape ({b},), got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
    for name, t in (("target", target), ("mask", mask), ("weight", weight)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")


def _check_words(where: str, name: str, words, count: int) -> list[int]:
    try:
        values = list(words)
    except TypeError:
        raise TypeError(f"{where}: {name} must be a sequence of {count} ints, got {type(words).__name__}") from None
    if len(values) != count or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"{where}: {name} must be {count} ints, got {words!r}")
    if any(not 0 <= v < 2**32 for v in values):
        raise ValueError(f"{where}: {name} words must be in [0, 2**32), got {words!r}")
    return values


def _check_step(where: str, params: Sequence[Tensor], grads: Optional[Sequence[Tensor]], grads_name: str,
                key: Sequence[int], step: int, stream: int = STREAM_UPDATE) -> tuple[list[Tensor], list[Tensor], list[int]]:
    params = list(params)
    grads_list = list(grads) if grads is not None else []
    if grads is not None and len(grads_list) != len(params):
        raise ValueError(f"{where}: got {len(params)} params but {len(grads_list)} {grads_name}")
    device = params[0].device if params else None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"{where}: params[{i}] must be a floating-point tensor, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        if p.device != device:
            raise ValueError(f"{where}: params[{i}] is on {p.device} but params[0] is on {device}")
        if grads is not None:
            g = grads_list[i]
            if not isinstance(g, Tensor) or not g.is_floating_point():
                raise TypeError(f"{where}: {grads_name}[{i}] must be a floating-point tensor, got "
                                f"{getattr(g, 'dtype', type(g).__name__)}")
            if g.shape != p.shape:
                raise ValueError(f"{where}: {grads_name}[{i}] has shape {tuple(g.shape)} but params[{i}] has "
                                 f"{tuple(p.shape)}")
            if g.device != device:
                raise ValueError(f"{where}: {grads_name}[{i}] is on {g.device} but params are on {device}")
    key = _check_words(where, "key", key, 8)
    for name, value, hi in (("step", step, 2**32), ("stream", stream, 2**32)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
        if not 0 <= value < hi:
            raise ValueError(f"{where}: {name} must be in [0, {hi}), got {value}")
    return params, grads_list, key


def _check_fp(where: str, fp_key: Sequence[int], expected_fp: Sequence[float]) -> tuple[list[int], list[float]]:
    fp_key = _check_words(where, "fp_key", fp_key, 2)
    expected = [float(v) for v in expected_fp]
    if len(expected) not in (0, 2):
        raise ValueError(f"{where}: expected_fp must be empty or [projection, sum of squares], got {expected_fp!r}")
    return fp_key, expected


# --------------------------------------------------------------------------------------------------
# Op 1: masked cross-entropy
# --------------------------------------------------------------------------------------------------
def masked_cross_entropy_fwd_bwd(logits: Tensor, target: Tensor, mask: Tensor,
                                 weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-sample masked cross-entropy ``(B,)`` and its gradient w.r.t. ``logits`` ``(B, K, N)``, fused.

    Same contract as :func:`pyunlearn.ops.reference.masked_cross_entropy_fwd_bwd`: K == 1 is sigmoid BCE,
    K >= 2 softmax CE; accumulation float32 (float64 for float64 logits); the gradient has the dtype of
    ``logits`` and is contiguous.

    Targets must lie in ``[0, K)`` for K >= 2 and in {0, 1} for K == 1; :func:`pyunlearn.losses.masked_cross_entropy`
    checks them, this function does not. For K >= 2 an out-of-range target makes the C++ kernel raise
    ``IndexError``, and the GPU kernels (CUDA, Triton), which cannot raise without a device
    synchronisation, return NaN as the loss of its sample. For K == 1 no backend detects one.
    """
    _check_masked_ce(logits, target, mask, weight)
    return masked_cross_entropy_op(logits, target, mask, weight)


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Per-sample masked cross-entropy ``(B,)``, differentiable w.r.t. ``logits`` (the gradient comes from
    the same fused pass; ``weight`` is treated as a constant)."""
    _check_masked_ce(logits, target, mask, weight)
    return masked_cross_entropy_op(logits, target, mask, weight)[0]


# --------------------------------------------------------------------------------------------------
# Op 2: multi-tensor clip + noise + update (in place on params)
# --------------------------------------------------------------------------------------------------
def gradient_clipping_step_(params: Sequence[Tensor], grads: Sequence[Tensor], *, lr: float, max_grad_norm: float,
                            weight_decay: float, sigma: float, key: Sequence[int], step: int,
                            fp_key: Sequence[int] = (0, 0), expected_fp: Sequence[float] = ()) -> Tensor:
    """``x <- round(x - lr (clip(g, C1) + wd x) + sigma noise(key, step))`` in place on all ``params`` together.

    Returns float64 ``[status, grad_norm, old_fp (2), new_fp (2)]``; the parameters are written only if the
    gradient norm is finite and their fingerprint matches ``expected_fp`` (status 0; see
    :func:`pyunlearn.ops.reference.gradient_clipping_step_`)."""
    ps, gs, key = _check_step("gradient_clipping_step_", params, grads, "grads", key, step)
    fp_key, expected = _check_fp("gradient_clipping_step_", fp_key, expected_fp)
    kw = dict(lr=float(lr), max_grad_norm=float(max_grad_norm), weight_decay=float(weight_decay),
              sigma=float(sigma), key=key, step=step, fp_key=fp_key, expected_fp=expected)
    with torch.no_grad():
        if not ps:
            return reference.gradient_clipping_step_(ps, gs, **kw)
        return gradient_clipping_op(ps, gs, **kw)


def model_clipping_step_(params: Sequence[Tensor], grads: Sequence[Tensor], *, lr: float, max_model_norm: float,
                         weight_decay: float, sigma: float, key: Sequence[int], step: int,
                         fp_key: Sequence[int] = (0, 0), expected_fp: Sequence[float] = ()) -> Tensor:
    """``y = x - lr (g + wd x); x <- round(clip(y, C2) + sigma noise(key, step))`` in place; returns float64
    ``[status, |y|, old_fp, new_fp]``. See :func:`pyunlearn.ops.reference.model_clipping_step_`."""
    ps, gs, key = _check_step("model_clipping_step_", params, grads, "grads", key, step)
    fp_key, expected = _check_fp("model_clipping_step_", fp_key, expected_fp)
    kw = dict(lr=float(lr), max_model_norm=float(max_model_norm), weight_decay=float(weight_decay),
              sigma=float(sigma), key=key, step=step, fp_key=fp_key, expected_fp=expected)
    with torch.no_grad():
        if not ps:
            return reference.model_clipping_step_(ps, gs, **kw)
        return model_clipping_op(ps, gs, **kw)


def dpsgd_step_(params: Sequence[Tensor], summed_clipped_grads: Sequence[Tensor], *, lr: float,
                noise_multiplier: float, max_grad_norm: float, expected_batch_size: float, weight_decay: float,
                key: Sequence[int], step: int) -> None:
    """DP-SGD update from summed per-sample clipped gradients, in place (Opacus' arithmetic, in float64 and
    rounded once). See :func:`pyunlearn.ops.reference.dpsgd_step_`."""
    ps, gs, key = _check_step("dpsgd_step_", params, summed_clipped_grads, "summed_clipped_grads", key, step)
    if not ps:
        return
    with torch.no_grad():
        dpsgd_op(ps, gs, lr=float(lr), noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
                 expected_batch_size=float(expected_batch_size), weight_decay=float(weight_decay), key=key,
                 step=step)


def add_noise_(params: Sequence[Tensor], *, sigma: float, key: Sequence[int], step: int,
               stream: int = STREAM_UPDATE) -> None:
    """``params[j] <- round(params[j] + sigma * noise)`` (float64 sum, one rounding), element indices running
    over the concatenation of ``params``."""
    ps, _, key = _check_step("add_noise_", params, None, "", key, step, stream)
    if not ps or float(sigma) == 0.0:
        return
    with torch.no_grad():
        add_noise_op(ps, sigma=float(sigma), key=key, step=step, stream=stream)


# --------------------------------------------------------------------------------------------------
# Op 3: per-sample weight-gradient norms of a convolution
# --------------------------------------------------------------------------------------------------
def _pair_of(value, name: str, minimum: int) -> list[int]:
    try:
        pair = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a pair of ints, got {value!r}") from None
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{name} must be two ints >= {minimum}, got {value!r}")
    return pair


def per_sample_sq_norms(a: Tensor, g: Tensor, *, kernel_size: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``(B,)`` squared Frobenius norms of the per-sample weight gradients of a 2-d convolution (groups 1)
    with input ``a`` ``(B, C, H, W)`` and output gradient ``g`` ``(B, P, OH, OW)``; a linear layer is the
    1x1 case. On a GPU a fused kernel (CUDA or Triton) reduces each sample's gradient in registers;
    see :func:`pyunlearn.ops.reference.per_sample_sq_norms` for the contract."""
    for name, t in (("a", a), ("g", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"per_sample_sq_norms: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"per_sample_sq_norms: {name} must be a 4-d floating-point tensor, got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
    if g.device != a.device:
        raise ValueError(f"per_sample_sq_norms: g is on {g.device} but a is on {a.device}")
    if g.shape[0] != a.shape[0]:
        raise ValueError(f"per_sample_sq_norms: a has {a.shape[0]} samples but g has {g.shape[0]}")
    conv = dict(kernel_size=_pair_of(kernel_size, "kernel_size", 1), stride=_pair_of(stride, "stride", 1),
                padding=_pair_of(padding, "padding", 0), dilation=_pair_of(dilation, "dilation", 1))
    out = tuple((a.shape[2 + i] + 2 * conv["padding"][i] - conv["dilation"][i] * (conv["kernel_size"][i] - 1) - 1)
                // conv["stride"][i] + 1 for i in range(2))
    if tuple(g.shape[2:]) != out:
        raise ValueError(f"per_sample_sq_norms: this convolution maps a's {tuple(a.shape[2:])} positions to {out}, "
                         f"but g has {tuple(g.shape[2:])}")
    return per_sample_sq_norms_op(a, g, **conv)
