"""Triton multi-tensor clip + noise + update (gradient clipping, model clipping, DP-SGD).

Computes exactly the functions of ``pyunlearn.ops.reference`` (``gradient_clipping_step_``,
``model_clipping_step_``, ``dpsgd_step_``), in place on float32 parameters, with a fixed number of
launches for any number of tensors:

* gradient clipping: squares of the gradients per block -> one-program deterministic reduction
  (norm) -> update ``x - lr (g min(1, C/|g|) + wd x) + sigma noise``: 3 launches;
* model clipping: descent ``y = x - lr (g + wd x)`` fused with the squares of ``y`` per block ->
  reduction (norm) -> projection ``y min(1, C/|y|) + sigma noise``: 3 launches;
* DP-SGD: 1 launch.

The clip factor is computed on the device from the norm (no host synchronisation).

Multi-tensor layout. NOTE: parameters of a model are separate allocations, so there is no flat
buffer to view them as. Each launch instead walks a device-side block table built once per
(device, block size, data pointers, sizes) and cached: one int64 row per block of ``BLOCK``
elements, ``(param address, grad address, g0, offset, numel)``, where ``offset`` is the tensor's
start in the concatenation of all tensors (the noise element index, as in the reference) and
``g0`` the first global element index of the block. Kernels cast the addresses to typed pointers
(``int64 -> tl.pointer_type``), the pattern of Triton's grouped-GEMM tutorial. Blocks are aligned
on *global* indices (``g0`` is a multiple of 4, the first block of a tensor starts at
``offset & ~3``) so each program draws its noise with one Philox call per 4 elements (the four
Box-Muller outputs of one counter), at the price of unaligned (not vectorised) loads when a
tensor's offset is not a multiple of 4. The table only holds addresses and sizes, so a cache hit
is always correct, even after the tensors it was built for were freed.

Noise is Philox4x32-10 keyed by ``seed`` with counter ``(q mod 2^32, q div 2^32, step, stream)``
for ``q = i div 4`` and the Box-Muller transform in float32, as in ``pyunlearn.ops.rng`` (bit-equal
integers; floats equal up to the last place of log/cos/sin). Floating-point contraction (FMA) is
disabled in these kernels so that, noise aside, results are rounded exactly like the reference.

Requirements: float32 parameters; gradients float32, float16 or bfloat16 (a gradient list of mixed
dtypes is upcast to float32 first). Non-contiguous gradients are made contiguous; a non-contiguous
parameter is updated through a contiguous copy that is copied back (2 extra copies for it). The
tensors must not overlap in memory.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

from pyunlearn.ops.rng import STREAM_UPDATE, _check_seed

from . import _check_launch_device

_BLOCK = 1024
_NUM_WARPS = 4
_RBLOCK = 1024
_TABLE_COLS = 5  # param address, grad address, g0, offset, numel
_TABLE_CACHE_SIZE = 16
_table_cache: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gaussian_block(seed, step, stream, g0, BLOCK: tl.constexpr):
    """Standard normal float32 noise for global element indices g0 .. g0 + BLOCK - 1 (g0 % 4 == 0)."""
    QB: tl.constexpr = BLOCK // 4
    q = (g0 >> 2) + tl.arange(0, QB).to(tl.int64)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    zero = tl.zeros((QB,), dtype=tl.int64)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + stream).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    u0 = r0.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    u1 = r1.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    u2 = r2.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    u3 = r3.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    radius_a = tl.math.sqrt_rn(-2.0 * tl.log(u0))
    radius_b = tl.math.sqrt_rn(-2.0 * tl.log(u2))
    angle_a = 6.2831854820251465 * u1
    angle_b = 6.2831854820251465 * u3
    # Element 4 q + j is z_j: interleave (z0, z1, z2, z3) of each counter.
    z = tl.join(tl.join(radius_a * tl.cos(angle_a), radius_b * tl.cos(angle_b)),
                tl.join(radius_a * tl.sin(angle_a), radius_b * tl.sin(angle_b)))
    return tl.reshape(z, (BLOCK,))


@triton.jit
def _block_row(table_ptr, BLOCK: tl.constexpr):
    """This program's table row: (param address, grad address, g0, local indices, in-bounds mask)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 5
    p_addr = tl.load(row)
    g_addr = tl.load(row + 1)
    g0 = tl.load(row + 2)
    idx = g0 - tl.load(row + 3) + tl.arange(0, BLOCK)
    inb = (idx >= 0) & (idx < tl.load(row + 4))
    return p_addr, g_addr, g0, idx, inb


@triton.jit
def _clip_factor(norm_ptr, max_norm):
    """min(1, C / norm) (1 for a zero norm), from the norm on the device, rounded as the reference
    (torch evaluates ``C / tensor`` as ``tensor.reciprocal() * C``)."""
    norm = tl.load(norm_ptr)
    inverse = tl.math.div_rn(tl.zeros_like(norm) + 1.0, tl.maximum(norm, 1e-30))
    return tl.where(norm > max_norm, inverse * max_norm, 1.0)


@triton.jit
def _grad_sumsq_kernel(table_ptr, partial_ptr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    _, g_addr, _, idx, inb = _block_row(table_ptr, BLOCK)
    g = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@triton.jit
def _sqrt_sum_kernel(partial_ptr, out_ptr, n, RBLOCK: tl.constexpr):
    """out = sqrt(sum(partial)) by one program, in a fixed order."""
    acc = tl.zeros((RBLOCK,), tl.float32)
    for start in range(0, n, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.math.sqrt_rn(tl.sum(acc, axis=0)))


@triton.jit(do_not_specialize=["seed", "step"])
def _gradient_clipping_update_kernel(
    table_ptr, norm_ptr, lr, max_norm, weight_decay, sigma, seed, step, stream,
    G_DTYPE: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    p_addr, g_addr, g0, idx, inb = _block_row(table_ptr, BLOCK)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    p = tl.load(p_ptrs, mask=inb, other=0.0)
    g = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32)
    factor = _clip_factor(norm_ptr, max_norm)
    p = p - lr * (g * factor + weight_decay * p)
    if HAS_NOISE:
        p = p + sigma * _gaussian_block(seed, step, stream, g0, BLOCK)
    tl.store(p_ptrs, p, mask=inb)


@triton.jit
def _model_clipping_descent_kernel(
    table_ptr, partial_ptr, lr, weight_decay, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    p_addr, g_addr, _, idx, inb = _block_row(table_ptr, BLOCK)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    p = tl.load(p_ptrs, mask=inb, other=0.0)
    g = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32)
    y = p - lr * (g + weight_decay * p)
    tl.store(p_ptrs, y, mask=inb)
    y = tl.where(inb, y, 0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(y * y, axis=0))


@triton.jit(do_not_specialize=["seed", "step"])
def _model_clipping_project_kernel(
    table_ptr, norm_ptr, max_norm, sigma, seed, step, stream,
    HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    p_addr, _, g0, idx, inb = _block_row(table_ptr, BLOCK)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    p = tl.load(p_ptrs, mask=inb, other=0.0) * _clip_factor(norm_ptr, max_norm)
    if HAS_NOISE:
        p = p + sigma * _gaussian_block(seed, step, stream, g0, BLOCK)
    tl.store(p_ptrs, p, mask=inb)


@triton.jit(do_not_specialize=["seed", "step"])
def _dpsgd_kernel(
    table_ptr, lr, std, expected_batch_size, weight_decay, seed, step, stream,
    G_DTYPE: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    p_addr, g_addr, g0, idx, inb = _block_row(table_ptr, BLOCK)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    p = tl.load(p_ptrs, mask=inb, other=0.0)
    noisy = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32)
    if HAS_NOISE:
        noisy = noisy + std * _gaussian_block(seed, step, stream, g0, BLOCK)
    update = tl.math.div_rn(noisy, tl.zeros_like(noisy) + expected_batch_size) + weight_decay * p
    tl.store(p_ptrs, p - lr * update, mask=inb)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
class _Plan:
    """Validated tensors of one call: block table, gradient element type, write-back list."""

    def __init__(self, where: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 grads_name: str, block: int) -> None:
        params, grads = list(params), list(grads)
        if block < 4 or block & (block - 1):
            raise ValueError(f"{where}: block must be a power of two >= 4, got {block}")
        if len(params) != len(grads):
            raise ValueError(f"{where}: params and {grads_name} must have the same length, "
                             f"got {len(params)} and {len(grads)}")
        device = params[0].device if params else torch.device("cpu")
        for i, (p, g) in enumerate(zip(params, grads)):
            if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
                raise TypeError(f"{where}: params[{i}] and {grads_name}[{i}] must be torch.Tensors, "
                                f"got {type(p).__name__} and {type(g).__name__}")
            if p.dtype != torch.float32:
                raise TypeError(f"{where}: the Triton backend needs float32 params, params[{i}] is {p.dtype}")
            if g.dtype not in _TL_DTYPE:
                raise TypeError(f"{where}: {grads_name}[{i}] must be float32, float16 or bfloat16, got {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{where}: {grads_name}[{i}] has shape {tuple(g.shape)} but params[{i}] "
                                 f"has shape {tuple(p.shape)}")
            if p.device != device or g.device != device:
                raise ValueError(f"{where}: all tensors must be on one device; params[0] is on {device}, "
                                 f"params[{i}] on {p.device}, {grads_name}[{i}] on {g.device}")
        if params:
            _check_launch_device(device, where)
        self.device = device
        # Gradient element type: the common dtype, or float32 (upcast copies) for a mixed list.
        dtypes = {g.dtype for g in grads}
        g_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.grads = [(g if g.dtype == g_dtype else g.to(g_dtype)).contiguous() for g in grads]
        self.g_dtype = _TL_DTYPE[g_dtype]
        # NOTE: non-contiguous params are updated through contiguous copies (see ``finish``).
        self.params = [p if p.is_contiguous() else p.contiguous() for p in params]
        self._write_back = [(p, w) for p, w in zip(params, self.params) if w is not p]
        self.block = block
        self.table, self.n_blocks = _block_table(self.params, self.grads, block, device)

    def finish(self) -> None:
        for p, work in self._write_back:
            p.copy_(work)


def _block_table(params: list[torch.Tensor], grads: list[torch.Tensor], block: int,
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """The cached (n_blocks, 5) int64 block table on ``device`` (see the module docstring)."""
    key = (str(device), block, tuple((p.data_ptr(), g.data_ptr(), p.numel()) for p, g in zip(params, grads)))
    hit = _table_cache.get(key)
    if hit is not None:
        _table_cache.move_to_end(key)
        return hit
    chunks = []
    offset = 0
    for p, g in zip(params, grads):
        n = p.numel()
        if n:
            start = offset & ~3
            nb = triton.cdiv(offset + n - start, block)
            rows = torch.empty((nb, _TABLE_COLS), dtype=torch.int64)
            rows[:, 0] = p.data_ptr()
            rows[:, 1] = g.data_ptr()
            rows[:, 2] = torch.arange(nb, dtype=torch.int64) * block + start
            rows[:, 3] = offset
            rows[:, 4] = n
            chunks.append(rows)
        offset += n
    if chunks:
        table = torch.cat(chunks).to(device)
    else:
        table = torch.empty((0, _TABLE_COLS), dtype=torch.int64, device=device)
    entry = (table, table.shape[0])
    _table_cache[key] = entry
    while len(_table_cache) > _TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return entry


def _norm(plan: _Plan, partial: torch.Tensor) -> torch.Tensor:
    norm = torch.empty((), dtype=torch.float32, device=plan.device)
    _sqrt_sum_kernel[(1,)](partial, norm, plan.n_blocks, RBLOCK=_RBLOCK, num_warps=4)
    return norm


def gradient_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_grad_norm: float,
    weight_decay: float,
    sigma: float,
    seed: int,
    step: int,
) -> torch.Tensor:
    """``x <- x - lr (clip(g, C1) + wd x) + sigma noise(seed, step)`` in place; returns the global
    gradient norm (float32, on the device). Same contract as the reference."""
    return _gradient_clipping_step(params, grads, lr=lr, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                                   sigma=sigma, seed=seed, step=step)


def _gradient_clipping_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, lr: float,
                            max_grad_norm: float, weight_decay: float, sigma: float, seed: int, step: int,
                            block: int = _BLOCK) -> torch.Tensor:
    plan = _Plan("gradient_clipping_step_", params, grads, "grads", block)
    has_noise = sigma != 0.0
    if has_noise:
        _check_seed(seed, step, STREAM_UPDATE)
    if plan.n_blocks == 0:
        return torch.zeros((), dtype=torch.float32, device=plan.device)
    partial = torch.empty(plan.n_blocks, dtype=torch.float32, device=plan.device)
    _grad_sumsq_kernel[(plan.n_blocks,)](plan.table, partial, G_DTYPE=plan.g_dtype, BLOCK=block,
                                         num_warps=_NUM_WARPS, enable_fp_fusion=False)
    norm = _norm(plan, partial)
    _gradient_clipping_update_kernel[(plan.n_blocks,)](
        plan.table, norm, float(lr), float(max_grad_norm), float(weight_decay), float(sigma),
        int(seed), int(step), STREAM_UPDATE,
        G_DTYPE=plan.g_dtype, HAS_NOISE=has_noise, BLOCK=block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    plan.finish()
    return norm


def model_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_model_norm: float,
    weight_decay: float,
    sigma: float,
    seed: int,
    step: int,
) -> torch.Tensor:
    """``y = x - lr (g + wd x); x <- clip(y, C2) + sigma noise(seed, step)`` in place; returns the
    pre-projection model norm ``|y|`` (float32, on the device). Same contract as the reference."""
    return _model_clipping_step(params, grads, lr=lr, max_model_norm=max_model_norm, weight_decay=weight_decay,
                                sigma=sigma, seed=seed, step=step)


def _model_clipping_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, lr: float,
                         max_model_norm: float, weight_decay: float, sigma: float, seed: int, step: int,
                         block: int = _BLOCK) -> torch.Tensor:
    plan = _Plan("model_clipping_step_", params, grads, "grads", block)
    has_noise = sigma != 0.0
    if has_noise:
        _check_seed(seed, step, STREAM_UPDATE)
    if plan.n_blocks == 0:
        return torch.zeros((), dtype=torch.float32, device=plan.device)
    partial = torch.empty(plan.n_blocks, dtype=torch.float32, device=plan.device)
    _model_clipping_descent_kernel[(plan.n_blocks,)](
        plan.table, partial, float(lr), float(weight_decay),
        G_DTYPE=plan.g_dtype, BLOCK=block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    norm = _norm(plan, partial)
    _model_clipping_project_kernel[(plan.n_blocks,)](
        plan.table, norm, float(max_model_norm), float(sigma), int(seed), int(step), STREAM_UPDATE,
        HAS_NOISE=has_noise, BLOCK=block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    plan.finish()
    return norm


def dpsgd_step_(
    params: Sequence[torch.Tensor],
    summed_clipped_grads: Sequence[torch.Tensor],
    *,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    weight_decay: float,
    seed: int,
    step: int,
) -> None:
    """DP-SGD update ``x <- x - lr ((sum_i clip(g_i) + z C noise) / E[B] + wd x)`` in place, one launch.
    Same contract as the reference."""
    _dpsgd_step(params, summed_clipped_grads, lr=lr, noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                weight_decay=weight_decay, seed=seed, step=step)


def _dpsgd_step(params: Sequence[torch.Tensor], summed_clipped_grads: Sequence[torch.Tensor], *, lr: float,
                noise_multiplier: float, max_grad_norm: float, expected_batch_size: float, weight_decay: float,
                seed: int, step: int, block: int = _BLOCK) -> None:
    plan = _Plan("dpsgd_step_", params, summed_clipped_grads, "summed_clipped_grads", block)
    std = noise_multiplier * max_grad_norm
    has_noise = std > 0.0
    if has_noise:
        _check_seed(seed, step, STREAM_UPDATE)
    if plan.n_blocks == 0:
        return
    _dpsgd_kernel[(plan.n_blocks,)](
        plan.table, float(lr), float(std), float(expected_batch_size), float(weight_decay),
        int(seed), int(step), STREAM_UPDATE,
        G_DTYPE=plan.g_dtype, HAS_NOISE=has_noise, BLOCK=block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    plan.finish()


def _clear_table_cache() -> None:
    """Drop the cached block tables (tests; or to release their device memory)."""
    _table_cache.clear()


__all__ = ["dpsgd_step_", "gradient_clipping_step_", "model_clipping_step_"]
