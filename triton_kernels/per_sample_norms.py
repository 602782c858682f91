"""Triton per-sample gradient norms of a convolution (or a linear layer), reduced in registers.

For sample ``b`` of a 2-d convolution with input ``a`` (B, C, H, W), output gradient ``g``
(B, P, OH, OW) and weight (P, C, KH, KW) (groups 1), the per-sample weight gradient is

    G_b[p, (c, kh, kw)] = sum_{oh, ow} g[b, p, oh, ow] * a[b, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]

(zero outside the input). ``_per_sample_sq_norm_kernel`` computes ``||G_b||_F^2`` without writing any
``G_b`` to memory: each program owns one (P-tile x D-tile) block of ``G_b``, accumulates it over all
output positions with ``tl.dot`` on an implicit im2col tile of ``a`` (loaded straight from ``a`` with
the convolution's index arithmetic; no unfold buffer), squares it and writes one partial sum. The
partials of a sample are summed in a fixed order: deterministic, no atomics. A linear layer is the
1x1 case (positions = tokens).

NOTE: the products run in IEEE float32 (``input_precision="ieee"``), not TF32: the norms decide the
clip factors of DP-SGD, whose guarantee needs ``||c_b G_b|| <= C`` up to float32 rounding (TF32 would
be off by ~1e-3 relative).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _check_launch_device

_BLOCK_P = 32
_BLOCK_D = 32
_BLOCK_T = 32


@triton.jit
def _per_sample_sq_norm_kernel(
    a_ptr, g_ptr, partial_ptr,
    C, H, W, P, OW, T, KH, KW,
    stride_ab, stride_ac, stride_ah, stride_aw,
    stride_gb, stride_gp, stride_gh, stride_gw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    n_tiles, n_tiles_d,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    tile = pid % n_tiles
    offs_p = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_p = offs_p < P
    in_d = offs_d < C * KH * KW
    c = offs_d // (KH * KW)
    kh = (offs_d % (KH * KW)) // KW
    kw = offs_d % KW
    a_base = a_ptr + b * stride_ab
    g_base = g_ptr + b * stride_gb
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < T
        oh = offs_t // OW
        ow = offs_t % OW
        g_tile = tl.load(g_base + offs_p[:, None] * stride_gp + oh[None, :] * stride_gh + ow[None, :] * stride_gw,
                         mask=in_p[:, None] & in_t[None, :], other=0.0).to(tl.float32)  # (P, T)
        ih = oh[:, None] * conv_sh - pad_h + kh[None, :] * dil_h  # (T, D)
        iw = ow[:, None] * conv_sw - pad_w + kw[None, :] * dil_w
        inside = in_t[:, None] & in_d[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_tile = tl.load(a_base + c[None, :] * stride_ac + ih * stride_ah + iw * stride_aw,
                         mask=inside, other=0.0).to(tl.float32)  # (T, D)
        acc += tl.dot(g_tile, a_tile, input_precision="ieee")
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton_op("pyunlearn::per_sample_sq_norms_triton", mutates_args=())
def per_sample_sq_norms(a: torch.Tensor, g: torch.Tensor, kernel_size: list[int], stride: list[int],
                        padding: list[int], dilation: list[int]) -> torch.Tensor:
    """``||G_b||_F^2`` per sample (float32, (B,)) for ``a`` (B, C, H, W) and ``g`` (B, P, OH, OW); see the
    module docstring. Any strides; float32, float16 or bfloat16 inputs."""
    _check_launch_device(a.device, "per_sample_sq_norms")
    B, C, H, W = a.shape
    _, P, OH, OW = g.shape
    KH, KW = kernel_size
    n_tiles_p = triton.cdiv(P, _BLOCK_P)
    n_tiles_d = triton.cdiv(C * KH * KW, _BLOCK_D)
    n_tiles = n_tiles_p * n_tiles_d
    partial = torch.empty((B, n_tiles), dtype=torch.float32, device=a.device)
    if B == 0 or n_tiles == 0:
        return partial.sum(dim=1)
    # One flat grid axis: axes 1 and 2 are limited to 65535 programs.
    wrap_triton(_per_sample_sq_norm_kernel)[(B * n_tiles,)](
        a, g, partial,
        C, H, W, P, OW, OH * OW, KH, KW,
        a.stride(0), a.stride(1), a.stride(2), a.stride(3),
        g.stride(0), g.stride(1), g.stride(2), g.stride(3),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        n_tiles, n_tiles_d,
        BLOCK_P=_BLOCK_P, BLOCK_D=_BLOCK_D, BLOCK_T=_BLOCK_T,
    )
    return partial.sum(dim=1)


__all__ = ["per_sample_sq_norms"]
