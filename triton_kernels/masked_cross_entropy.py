"""Triton masked pixel cross-entropy, forward and backward in one pass over the logits.

Computes exactly ``pyunlearn.ops.reference.masked_cross_entropy_fwd_bwd`` (up to rounding):

1. ``count[b] = sum_n mask[b, n]``: one small torch reduction of the mask (the gradient needs the
   per-sample scale ``weight[b] / max(count[b], 1)`` before anything is written);
2. ``_masked_cross_entropy_kernel``: grid over (sample, block of pixels); each program reads its
   ``K x BLOCK_N`` logits once, computes softmax / log-sum-exp over ``K`` in registers (K <= 64 by
   default; larger K streams over class chunks with an online softmax and re-reads the chunk for the
   gradient), writes the gradient of every pixel of the block (zero where the mask is off) and one
   partial sum of the scaled pixel losses into a ``(B, n_blocks)`` buffer;
3. ``_masked_cross_entropy_loss_kernel``: one program per sample sums its partials in a fixed order.

No atomics: results are bit-for-bit deterministic for a given launch configuration. Accumulation is
float32 (float64 for float64 logits); the gradient has the dtype of the logits.

The launcher is registered as ``pyunlearn::masked_cross_entropy_triton`` with
``torch.library.triton_op`` and launches through ``wrap_triton``, so ``torch.compile`` traces it down
to the two kernels (``pyunlearn::masked_cross_entropy`` is decomposed into it when the Triton backend
is the one selected; see ``pyunlearn.ops._registry``). Eager calls launch the kernels directly.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pyunlearn.ops._registry import masked_cross_entropy_backward, masked_cross_entropy_setup_context

from . import _check_launch_device

_MAX_SINGLE_TILE_K = 64  # K up to this is held in registers in one tile
_MULTI_TILE_BLOCK_K = 32  # class chunk for larger K
_TILE_ELEMENTS = 4096  # BLOCK_K * BLOCK_N target
_MAX_BLOCK_N = 1024
_MAX_RBLOCK = 1024


@triton.jit
def _masked_cross_entropy_kernel(
    logits_ptr, target_ptr, mask_ptr, count_ptr, weight_ptr, grad_ptr, partial_ptr,
    K, N, n_blocks,
    stride_lb, stride_lk, stride_ln,
    stride_tb, stride_tn,
    stride_mb, stride_mn,
    stride_w,
    stride_gb, stride_gk, stride_gn,
    HAS_WEIGHT: tl.constexpr, BINARY: tl.constexpr, SINGLE_TILE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    nb = (pid % n_blocks).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N

    tgt = tl.load(target_ptr + b * stride_tb + offs_n * stride_tn, mask=in_n, other=0)
    sel = tl.load(mask_ptr + b * stride_mb + offs_n * stride_mn, mask=in_n, other=0) != 0
    count = tl.load(count_ptr + b).to(ACC)
    # Reference: scale = mask / max(count, 1) * weight (zero where the mask is off).
    scale = (tl.zeros_like(count) + 1.0) / tl.maximum(count, 1.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + b * stride_w).to(ACC)
    pix_scale = tl.where(sel, scale, 0.0)

    lrow = logits_ptr + b * stride_lb
    grow = grad_ptr + b * stride_gb
    if BINARY:
        # Sigmoid BCE: max(z, 0) - z y + log1p(exp(-|z|)), gradient sigmoid(z) - y.
        z = tl.load(lrow + offs_n * stride_ln, mask=in_n, other=0.0).to(ACC)
        y = tgt.to(ACC)
        e = tl.exp(-tl.abs(z))
        w = 1.0 + e
        # log1p(e) without a log1p primitive (Goldberg's trick: exact to a few ulp for small e).
        log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
        pixel_loss = tl.maximum(z, 0.0) - z * y + log1p_e
        r = 1.0 / w
        sig = tl.where(z >= 0.0, r, e * r)
        grad = (sig - y) * pix_scale
        tl.store(grow + offs_n * stride_gn, grad.to(grad_ptr.dtype.element_ty), mask=in_n)
    else:
        tgt = tgt.to(tl.int32)
        offs_k = tl.arange(0, BLOCK_K)
        if SINGLE_TILE:
            in_k = offs_k < K
            tile_mask = in_k[:, None] & in_n[None, :]
            x = tl.load(lrow + offs_k[:, None] * stride_lk + offs_n[None, :] * stride_ln,
                        mask=tile_mask, other=0.0).to(ACC)
            x = tl.where(in_k[:, None], x, float("-inf"))
            mx = tl.max(x, axis=0)
            e = tl.exp(x - mx[None, :])
            s = tl.sum(e, axis=0)
            lse = mx + tl.log(s)
            is_t = offs_k[:, None] == tgt[None, :]
            x_t = tl.sum(tl.where(is_t, x, 0.0), axis=0)
            grad = (e / s[None, :] - is_t.to(ACC)) * pix_scale[None, :]
            tl.store(grow + offs_k[:, None] * stride_gk + offs_n[None, :] * stride_gn,
                     grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)
        else:
            # Online softmax over class chunks, then a second sweep for the gradient.
            mx = tl.full((BLOCK_N,), float("-inf"), ACC)
            s = tl.zeros((BLOCK_N,), ACC)
            x_t = tl.zeros((BLOCK_N,), ACC)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                in_k = ks < K
                x = tl.load(lrow + ks[:, None] * stride_lk + offs_n[None, :] * stride_ln,
                            mask=in_k[:, None] & in_n[None, :], other=0.0).to(ACC)
                x = tl.where(in_k[:, None], x, float("-inf"))
                new_mx = tl.maximum(mx, tl.max(x, axis=0))
                s = s * tl.exp(mx - new_mx) + tl.sum(tl.exp(x - new_mx[None, :]), axis=0)
                mx = new_mx
                x_t += tl.sum(tl.where(ks[:, None] == tgt[None, :], x, 0.0), axis=0)
            lse = mx + tl.log(s)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                tile_mask = (ks < K)[:, None] & in_n[None, :]
                x = tl.load(lrow + ks[:, None] * stride_lk + offs_n[None, :] * stride_ln,
                            mask=tile_mask, other=0.0).to(ACC)
                is_t = ks[:, None] == tgt[None, :]
                grad = (tl.exp(x - lse[None, :]) - is_t.to(ACC)) * pix_scale[None, :]
                tl.store(grow + ks[:, None] * stride_gk + offs_n[None, :] * stride_gn,
                         grad.to(grad_ptr.dtype.element_ty), mask=tile_mask)
        # A target outside [0, K) cannot raise without a device synchronisation: it makes the loss of
        # its sample NaN (as the CUDA kernel; pyunlearn.losses validates targets first).
        pixel_loss = tl.where((tgt >= 0) & (tgt < K), lse - x_t, float("nan"))
    # Pixels past N were loaded as finite zeros (target 0) and have pix_scale == 0.
    tl.store(partial_ptr + pid, tl.sum(pixel_loss * pix_scale, axis=0))


@triton.jit
def _masked_cross_entropy_loss_kernel(partial_ptr, loss_ptr, n_blocks, RBLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((RBLOCK,), partial_ptr.dtype.element_ty)
    for start in range(0, n_blocks, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc += tl.load(partial_ptr + b * n_blocks + offs, mask=offs < n_blocks, other=0.0)
    tl.store(loss_ptr + b, tl.sum(acc, axis=0))


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _validate(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              weight: Optional[torch.Tensor]) -> None:
    where = "masked_cross_entropy_fwd_bwd"
    for name, t in (("logits", logits), ("target", target), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{where}: logits must have shape (B, K, N), got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{where}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    B, K, N = logits.shape
    if K < 1:
        raise ValueError(f"{where}: logits need at least one class (K >= 1), got shape {tuple(logits.shape)}")
    if tuple(target.shape) != (B, N):
        raise ValueError(f"{where}: target must have shape {(B, N)}, got {tuple(target.shape)}")
    if target.dtype.is_complex:
        raise TypeError(f"{where}: target must hold integer class indices, got {target.dtype}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"{where}: mask must have shape {(B, N)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must be torch.bool, got {mask.dtype}")
    tensors = [("target", target), ("mask", mask)]
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{where}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if tuple(weight.shape) != (B,):
            raise ValueError(f"{where}: weight must have shape {(B,)}, got {tuple(weight.shape)}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{where}: weight must be a floating-point tensor, got {weight.dtype}")
        tensors.append(("weight", weight))
    for name, t in tensors:
        if t.device != logits.device:
            raise ValueError(f"{where}: {name} is on {t.device} but logits are on {logits.device}")
    _check_launch_device(logits.device, where)


def masked_cross_entropy_fwd_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample masked cross-entropy ``(B,)`` and its gradient w.r.t. ``logits`` (Triton).

    Same contract as ``pyunlearn.ops.reference.masked_cross_entropy_fwd_bwd``: logits (B, K, N)
    (K == 1: sigmoid BCE), target (B, N) integer, mask (B, N) bool, weight (B,) or None. Strided
    inputs are read in place (no copies); the gradient is contiguous.
    """
    _validate(logits, target, mask, weight)
    return masked_cross_entropy_op(logits, target, mask, weight)


@triton_op("pyunlearn::masked_cross_entropy_triton", mutates_args=())
def masked_cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                            weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher as a torch.library op (traceable by ``torch.compile`` down to the kernels)."""
    return _masked_cross_entropy_fwd_bwd(logits, target, mask, weight)


# The autograd formula of pyunlearn::masked_cross_entropy (the gradient output is its own saved output).
masked_cross_entropy_op.register_autograd(masked_cross_entropy_backward, setup_context=masked_cross_entropy_setup_context)


def _masked_cross_entropy_fwd_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
    grad_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher with tunable launch configuration (tests use small blocks to cross block edges).

    ``block_k`` below ``K`` forces the chunked (online-softmax) path; ``grad_out`` is an optional
    preallocated gradient buffer of the shape and dtype of ``logits`` (any strides).
    """
    _validate(logits, target, mask, weight)
    B, K, N = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if grad_out is None:
        grad = torch.empty((B, K, N), dtype=logits.dtype, device=logits.device)  # contiguous, like the reference
    else:
        if grad_out.shape != logits.shape or grad_out.dtype != logits.dtype or grad_out.device != logits.device:
            raise ValueError(f"grad_out must match logits ({tuple(logits.shape)}, {logits.dtype}, "
                             f"{logits.device}), got ({tuple(grad_out.shape)}, {grad_out.dtype}, {grad_out.device})")
        grad = grad_out
    loss = torch.empty(B, dtype=acc, device=logits.device)
    if B == 0:
        return loss, grad
    if N == 0:
        return loss.zero_(), grad

    binary = K == 1
    if block_k is None:
        block_k = 1 if binary else (triton.next_power_of_2(K) if K <= _MAX_SINGLE_TILE_K else _MULTI_TILE_BLOCK_K)
    if not _is_pow2(block_k):
        raise ValueError(f"block_k must be a power of two, got {block_k}")
    single_tile = K <= block_k
    if block_n is None:
        block_n = max(16, min(_MAX_BLOCK_N, _TILE_ELEMENTS // block_k, triton.next_power_of_2(N)))
    if not _is_pow2(block_n):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    n_blocks = triton.cdiv(N, block_n)

    count = mask.sum(dim=1)  # int64, exact
    partial = torch.empty((B, n_blocks), dtype=acc, device=logits.device)
    # bool loads are done as bytes (same storage, same strides).
    mask_u8 = mask.view(torch.uint8)
    target_in = target.view(torch.uint8) if target.dtype == torch.bool else target
    w = weight if weight is not None else count  # dummy pointer when there is no weight
    num_warps = 4 if block_k * block_n <= 2048 else 8
    wrap_triton(_masked_cross_entropy_kernel)[(B * n_blocks,)](
        logits, target_in, mask_u8, count, w, grad, partial,
        K, N, n_blocks,
        logits.stride(0), logits.stride(1), logits.stride(2),
        target_in.stride(0), target_in.stride(1),
        mask_u8.stride(0), mask_u8.stride(1),
        w.stride(0),
        grad.stride(0), grad.stride(1), grad.stride(2),
        HAS_WEIGHT=weight is not None, BINARY=binary, SINGLE_TILE=single_tile,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps,
    )
    rblock = max(16, min(_MAX_RBLOCK, triton.next_power_of_2(n_blocks)))
    wrap_triton(_masked_cross_entropy_loss_kernel)[(B,)](partial, loss, n_blocks, RBLOCK=rblock, num_warps=4)
    return loss, grad
