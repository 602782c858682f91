"""Triton multi-tensor clip + noise + update (gradient clipping, model clipping, DP-SGD), noise and
fingerprints.

Computes exactly the functions of ``pyunlearn.ops.reference`` (``gradient_clipping_step_``,
``model_clipping_step_``, ``dpsgd_step_``, ``add_noise_``, ``fingerprint``) and
``pyunlearn.ops.rng.gaussian_noise``, in place on float32 parameters, with a fixed number of launches
for any number of tensors:

* gradient clipping: pass 1 (read only: squares of the gradients and fingerprint of the parameters,
  per block) -> one-program finalize (norm, old fingerprint, status) -> pass 2 (update, noise, new
  fingerprint per block) -> one-program finalize (new fingerprint): 4 launches;
* model clipping: the same 4, pass 1 forming ``y = x - lr (g + wd x)`` for ``|y|`` without writing it
  and pass 2 forming it again;
* DP-SGD, noise: 1 launch; fingerprint: 2 launches; gaussian_noise: 1 launch.

Status and sync. NOTE: nothing is synchronised with the host. The finalize program writes the step's
result ``[status, norm, old_fp (2), new_fp (2)]`` (float64, on the device) and pass 2 reads the status
and the norm from it: with a status other than 0 every program of pass 2 returns at once (the
parameters are not written) and the second finalize copies the old fingerprint into the new one. This keeps the
launch count fixed, costs no host round trip per step (the step stays asynchronous and capturable),
and reads the clip factor's input where the norm was formed.

Multi-tensor layout. NOTE: parameters of a model are separate allocations, so there is no flat buffer
to view them as. Each launch walks a device-side block table built once per (device, block size, data
pointers, sizes) and cached: one int64 row per block of ``BLOCK`` elements, ``(param address, grad
address, g0, offset, numel)``, where ``offset`` is the tensor's start in the concatenation of all
tensors (the noise and fingerprint element index, as in the reference) and ``g0`` the first global
element index of the block. Kernels cast the addresses to typed pointers (``int64 ->
tl.pointer_type``), the pattern of Triton's grouped-GEMM tutorial. Blocks are aligned on *global*
indices (``g0`` is a multiple of 4, the first block of a tensor starts at ``offset & ~3``), so a
program draws the noise of its ``BLOCK`` elements from ``BLOCK / 4`` ChaCha20 blocks, one per group of
4 consecutive elements (the 4 normals of one block). The table only holds addresses and sizes, so a
cache hit is always correct, even after the tensors it was built for were freed.

Noise (``pyunlearn.ops.rng``): ChaCha20 (RFC 8439) on uint32 tensors (wrapping adds, rotations by
shifts), Box-Muller in float64 from 128-bit uniforms with the reference's log/sin/cos polynomials, in
the reference's order. NOTE on the 4 lanes: each program works on a ``(BLOCK / 4, 4)`` tile, row ``q``
holding the elements ``g0 + 4 q .. g0 + 4 q + 3``; the 4 normals of ChaCha block ``q`` are broadcast
along the rows and selected by the column (``tl.where``), so no join/reshape (no cross-thread shuffle
on the GPU) is needed, the loads of a row stay contiguous, and the interpreter runs the same code.

Bit-exactness: every kernel is launched with ``enable_fp_fusion=False`` (no FMA contraction); float64
square roots use ``tl.sqrt`` (``tl.math.sqrt_rn`` accepts float32 only in this Triton; ``tl.sqrt`` of
float64 lowers to ``llvm.sqrt.f64``, i.e. ``sqrt.rn.f64`` on NVIDIA, and to ``np.sqrt`` in the
interpreter: correctly rounded on both); float64 divisions use ``/`` (``div.rn.f64``); float32
division and square root use ``div_rn`` / ``sqrt_rn`` as before. Scalars that must stay float64
(sigma, the DP-SGD hyper-parameters, the expected fingerprint) are annotated ``tl.float64`` (Triton
passes a plain Python float as float32) and are only ever combined with float64 tensors; float32
scalars (lr, weight decay, clip bounds of the float32 updates) are passed as plain floats, which
rounds them to float32 exactly as PyTorch does for a float32 tensor. Key words, step and stream are
``tl.uint32`` and never specialised.

Requirements: float32 parameters; gradients float32, float16 or bfloat16 (a gradient list of mixed
dtypes is upcast to float32 first). Non-contiguous gradients are made contiguous; a non-contiguous
parameter is updated through a contiguous copy that is copied back (2 extra copies for it; on a
status other than 0 the copy-back writes the unchanged values). The tensors must not overlap in memory.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import triton
import triton.language as tl

from pyunlearn.ops import reference as _ref
from pyunlearn.ops.rng import STREAM_UPDATE, _check_counter, check_key, release_grid

from . import _check_launch_device

_BLOCK = 1024
_NUM_WARPS = 4
_RBLOCK = 1024
_TABLE_COLS = 5  # param address, grad address, g0, offset, numel
_TABLE_CACHE_SIZE = 16
_table_cache: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Pass-1 kinds of _pass1_kernel.
_FP_ONLY, _GRAD_CLIP, _MODEL_CLIP = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Device code: ChaCha20, Box-Muller, fingerprint weights
# --------------------------------------------------------------------------------------------------
@triton.jit
def _unit128(w0, w1, w2, w3, top: tl.constexpr):
    """((((w0 + 1/2) 2^-32 + w1) 2^-32 + w2) 2^-32 + w3) * top in float64, in this order."""
    v = (w0.to(tl.float64) + 0.5) * 2.3283064365386963e-10
    v = (v + w1.to(tl.float64)) * 2.3283064365386963e-10
    v = (v + w2.to(tl.float64)) * 2.3283064365386963e-10
    return (v + w3.to(tl.float64)) * top


@triton.jit
def _log_positive(u):
    """log u for positive normal float64 u (rng._log): exponent split, atanh series, ln 2 in two parts."""
    bits = u.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)  # [1, 2)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    ed = (e + big.to(tl.int64)).to(tl.float64)
    f = m - 1.0
    s = f / (2.0 + f)
    s2 = s * s
    p = tl.zeros_like(s2) + 0.043478260869565216  # 1/23
    p = p * s2 + 0.047619047619047616
    p = p * s2 + 0.05263157894736842
    p = p * s2 + 0.058823529411764705
    p = p * s2 + 0.06666666666666667
    p = p * s2 + 0.07692307692307693
    p = p * s2 + 0.09090909090909091
    p = p * s2 + 0.1111111111111111
    p = p * s2 + 0.14285714285714285
    p = p * s2 + 0.2
    p = p * s2 + 0.3333333333333333
    p = p * s2 + 1.0
    return (2.0 * s * p + ed * 1.9082149292705877e-10) + ed * 0.6931471803691238


@triton.jit
def _sincos_octant(a):
    """sin and cos on (0, pi/4] by the reference's Taylor polynomials (Horner from the top)."""
    a2 = a * a
    sp = tl.zeros_like(a2) + 2.8114572543455206e-15
    sp = sp * a2 + -7.647163731819816e-13
    sp = sp * a2 + 1.6059043836821613e-10
    sp = sp * a2 + -2.505210838544172e-08
    sp = sp * a2 + 2.7557319223985893e-06
    sp = sp * a2 + -0.0001984126984126984
    sp = sp * a2 + 0.008333333333333333
    sp = sp * a2 + -0.16666666666666666
    cp = tl.zeros_like(a2) + -1.5619206968586225e-16
    cp = cp * a2 + 4.779477332387385e-14
    cp = cp * a2 + -1.1470745597729725e-11
    cp = cp * a2 + 2.08767569878681e-09
    cp = cp * a2 + -2.755731922398589e-07
    cp = cp * a2 + 2.48015873015873e-05
    cp = cp * a2 + -0.001388888888888889
    cp = cp * a2 + 0.041666666666666664
    cp = cp * a2 + -0.5
    return a + a * a2 * sp, 1.0 + a2 * cp


@triton.jit
def _box_muller(r0, r1, r2, r3, a0, a1, a2, a3):
    """Two float64 normals (cosine, sine) from radius words r0..r3 and angle words a0..a3 (uint32)."""
    u = _unit128(r0, r1, r2, r3, 2.3283064365386963e-10)  # (K + 1/2) 2^-128 in (0, 1]
    radius = tl.sqrt(-2.0 * _log_positive(u))  # float64: sqrt.rn.f64 (see the module docstring)
    quadrant = a3 >> 30
    upper = ((a3 >> 29) & 1) != 0
    g0 = tl.where(upper, a0 ^ 0xFFFFFFFF, a0)
    g1 = tl.where(upper, a1 ^ 0xFFFFFFFF, a1)
    g2 = tl.where(upper, a2 ^ 0xFFFFFFFF, a2)
    g3 = tl.where(upper, a3 ^ 0xFFFFFFFF, a3) & 0x1FFFFFFF
    t = _unit128(g0, g1, g2, g3, 1.862645149230957e-09)  # (G + 1/2) 2^-125 in (0, 1)
    s, c = _sincos_octant(t * 0.7853981633974483)
    ci = tl.where(upper, s, c)
    si = tl.where(upper, c, s)
    # s, c > 0, so 0 - v is the exact negation.
    cos_v = tl.where(quadrant == 0, ci, tl.where(quadrant == 1, -si, tl.where(quadrant == 2, -ci, si)))
    sin_v = tl.where(quadrant == 0, si, tl.where(quadrant == 1, ci, tl.where(quadrant == 2, -si, -ci)))
    return radius * cos_v, radius * sin_v


@triton.jit
def _normals(b, k0, k1, k2, k3, k4, k5, k6, k7, step, stream):
    """The 4 float64 normals of each ChaCha20 block index in ``b`` (int64 tensor)."""
    ctr = (b & 0xFFFFFFFF).to(tl.uint32)
    n0 = (b >> 32).to(tl.uint32)
    zero = tl.zeros_like(ctr)
    i4 = zero + k0.to(tl.uint32)
    i5 = zero + k1.to(tl.uint32)
    i6 = zero + k2.to(tl.uint32)
    i7 = zero + k3.to(tl.uint32)
    i8 = zero + k4.to(tl.uint32)
    i9 = zero + k5.to(tl.uint32)
    i10 = zero + k6.to(tl.uint32)
    i11 = zero + k7.to(tl.uint32)
    i14 = zero + step.to(tl.uint32)
    i15 = zero + stream.to(tl.uint32)
    x0 = zero + 0x61707865
    x1 = zero + 0x3320646E
    x2 = zero + 0x79622D32
    x3 = zero + 0x6B206574
    x4, x5, x6, x7, x8, x9, x10, x11 = i4, i5, i6, i7, i8, i9, i10, i11
    x12, x13, x14, x15 = ctr, n0, i14, i15
    # 20 rounds: a column round and a diagonal round each time. NOTE: written out (no nested jit calls:
    # the interpreter re-patches the language on every call of a jit function, ~1 ms each).
    for _ in tl.static_range(10):
        # quarter round (0, 4, 8, 12)
        x0 = x0 + x4
        x12 = x12 ^ x0
        x12 = (x12 << 16) | (x12 >> 16)
        x8 = x8 + x12
        x4 = x4 ^ x8
        x4 = (x4 << 12) | (x4 >> 20)
        x0 = x0 + x4
        x12 = x12 ^ x0
        x12 = (x12 << 8) | (x12 >> 24)
        x8 = x8 + x12
        x4 = x4 ^ x8
        x4 = (x4 << 7) | (x4 >> 25)
        # quarter round (1, 5, 9, 13)
        x1 = x1 + x5
        x13 = x13 ^ x1
        x13 = (x13 << 16) | (x13 >> 16)
        x9 = x9 + x13
        x5 = x5 ^ x9
        x5 = (x5 << 12) | (x5 >> 20)
        x1 = x1 + x5
        x13 = x13 ^ x1
        x13 = (x13 << 8) | (x13 >> 24)
        x9 = x9 + x13
        x5 = x5 ^ x9
        x5 = (x5 << 7) | (x5 >> 25)
        # quarter round (2, 6, 10, 14)
        x2 = x2 + x6
        x14 = x14 ^ x2
        x14 = (x14 << 16) | (x14 >> 16)
        x10 = x10 + x14
        x6 = x6 ^ x10
        x6 = (x6 << 12) | (x6 >> 20)
        x2 = x2 + x6
        x14 = x14 ^ x2
        x14 = (x14 << 8) | (x14 >> 24)
        x10 = x10 + x14
        x6 = x6 ^ x10
        x6 = (x6 << 7) | (x6 >> 25)
        # quarter round (3, 7, 11, 15)
        x3 = x3 + x7
        x15 = x15 ^ x3
        x15 = (x15 << 16) | (x15 >> 16)
        x11 = x11 + x15
        x7 = x7 ^ x11
        x7 = (x7 << 12) | (x7 >> 20)
        x3 = x3 + x7
        x15 = x15 ^ x3
        x15 = (x15 << 8) | (x15 >> 24)
        x11 = x11 + x15
        x7 = x7 ^ x11
        x7 = (x7 << 7) | (x7 >> 25)
        # quarter round (0, 5, 10, 15)
        x0 = x0 + x5
        x15 = x15 ^ x0
        x15 = (x15 << 16) | (x15 >> 16)
        x10 = x10 + x15
        x5 = x5 ^ x10
        x5 = (x5 << 12) | (x5 >> 20)
        x0 = x0 + x5
        x15 = x15 ^ x0
        x15 = (x15 << 8) | (x15 >> 24)
        x10 = x10 + x15
        x5 = x5 ^ x10
        x5 = (x5 << 7) | (x5 >> 25)
        # quarter round (1, 6, 11, 12)
        x1 = x1 + x6
        x12 = x12 ^ x1
        x12 = (x12 << 16) | (x12 >> 16)
        x11 = x11 + x12
        x6 = x6 ^ x11
        x6 = (x6 << 12) | (x6 >> 20)
        x1 = x1 + x6
        x12 = x12 ^ x1
        x12 = (x12 << 8) | (x12 >> 24)
        x11 = x11 + x12
        x6 = x6 ^ x11
        x6 = (x6 << 7) | (x6 >> 25)
        # quarter round (2, 7, 8, 13)
        x2 = x2 + x7
        x13 = x13 ^ x2
        x13 = (x13 << 16) | (x13 >> 16)
        x8 = x8 + x13
        x7 = x7 ^ x8
        x7 = (x7 << 12) | (x7 >> 20)
        x2 = x2 + x7
        x13 = x13 ^ x2
        x13 = (x13 << 8) | (x13 >> 24)
        x8 = x8 + x13
        x7 = x7 ^ x8
        x7 = (x7 << 7) | (x7 >> 25)
        # quarter round (3, 4, 9, 14)
        x3 = x3 + x4
        x14 = x14 ^ x3
        x14 = (x14 << 16) | (x14 >> 16)
        x9 = x9 + x14
        x4 = x4 ^ x9
        x4 = (x4 << 12) | (x4 >> 20)
        x3 = x3 + x4
        x14 = x14 ^ x3
        x14 = (x14 << 8) | (x14 >> 24)
        x9 = x9 + x14
        x4 = x4 ^ x9
        x4 = (x4 << 7) | (x4 >> 25)
    z0, z1 = _box_muller(x0 + 0x61707865, x1 + 0x3320646E, x2 + 0x79622D32, x3 + 0x6B206574,
                         x4 + i4, x5 + i5, x6 + i6, x7 + i7)
    z2, z3 = _box_muller(x8 + i8, x9 + i9, x10 + i10, x11 + i11,
                         x12 + ctr, x13 + n0, x14 + i14, x15 + i15)
    return z0, z1, z2, z3


@triton.jit
def _noise_tile(g0, k0, k1, k2, k3, k4, k5, k6, k7, step, stream, QB: tl.constexpr):
    """(QB, 4) float64 noise of global elements g0 + 4 q + l (g0 a multiple of 4)."""
    b = (g0 >> 2) + tl.arange(0, QB).to(tl.int64)
    z0, z1, z2, z3 = _normals(b, k0, k1, k2, k3, k4, k5, k6, k7, step, stream)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, z0[:, None],
                    tl.where(lane == 1, z1[:, None], tl.where(lane == 2, z2[:, None], z3[:, None])))


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _fp_weights(gidx, fk0, fk1):
    """Keyed fingerprint weights (reference.fingerprint_weights) of global indices ``gidx`` (int64)."""
    lo = (gidx & 0xFFFFFFFF).to(tl.uint32)
    hi = (gidx >> 32).to(tl.uint32)
    h = _fmix32(_fmix32(lo ^ fk0.to(tl.uint32)) ^ hi ^ fk1.to(tl.uint32))
    return (h.to(tl.int32, bitcast=True) >> 8).to(tl.float64) * 1.1920928955078125e-07


# --------------------------------------------------------------------------------------------------
# Device code: kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile(table_ptr, QB: tl.constexpr):
    """This program's table row: param and grad addresses, g0, local and global indices of its
    (QB, 4) tile and the in-bounds mask."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 5
    p_addr = tl.load(row)
    g_addr = tl.load(row + 1)
    g0 = tl.load(row + 2)
    rel = 4 * tl.arange(0, QB)[:, None].to(tl.int64) + tl.arange(0, 4)[None, :]
    idx = g0 - tl.load(row + 3) + rel
    inb = (idx >= 0) & (idx < tl.load(row + 4))
    return p_addr, g_addr, g0, idx, g0 + rel, inb


@triton.jit
def _store_fp_partials(fp_ptr, n_blocks, x, gidx, fk0, fk1):
    """Fingerprint partials of this block: sum w x and sum x^2 in float64 (x zero outside the tensor)."""
    x64 = x.to(tl.float64)
    pid = tl.program_id(0)
    tl.store(fp_ptr + pid, tl.sum(tl.sum(_fp_weights(gidx, fk0, fk1) * x64, axis=1), axis=0))
    tl.store(fp_ptr + n_blocks + pid, tl.sum(tl.sum(x64 * x64, axis=1), axis=0))


@triton.jit
def _clip_factor(norm, max_norm):
    """min(1, C / norm) (1 for a zero norm) in float32, rounded as the reference (torch evaluates
    ``C / tensor`` as ``tensor.reciprocal() * C``)."""
    inverse = tl.math.div_rn(tl.zeros_like(norm) + 1.0, tl.maximum(norm, 1e-30))
    return tl.where(norm > max_norm, inverse * max_norm, 1.0)


@triton.jit(do_not_specialize=["n_blocks", "fk0", "fk1"])
def _pass1_kernel(table_ptr, sq_ptr, fp_ptr, n_blocks, lr, weight_decay, fk0: tl.uint32, fk1: tl.uint32,
                  KIND: tl.constexpr, G_DTYPE: tl.constexpr, QB: tl.constexpr):
    """Read only. KIND 0: fingerprint partials of the params; 1: + squares of the gradients; 2: + squares
    of y = x - lr (g + wd x)."""
    p_addr, g_addr, _, idx, gidx, inb = _tile(table_ptr, QB)
    x = tl.load(p_addr.to(tl.pointer_type(tl.float32)) + idx, mask=inb, other=0.0)
    if KIND != 0:
        g = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32)
        if KIND == 1:
            v = g
        else:
            v = tl.where(inb, x - lr * (g + weight_decay * x), 0.0)
        tl.store(sq_ptr + tl.program_id(0), tl.sum(tl.sum(v * v, axis=1), axis=0))
    _store_fp_partials(fp_ptr, n_blocks, x, gidx, fk0, fk1)


@triton.jit
def _finalize_kernel(sq_ptr, fp_ptr, n_blocks, res_ptr, e0: tl.float64, e1: tl.float64,
                     HAS_NORM: tl.constexpr, HAS_EXPECTED: tl.constexpr, RBLOCK: tl.constexpr):
    """One program, fixed order. With HAS_NORM: res[0..3] = [status, norm, proj, sq] (norm =
    sqrt(sum sq) in float32, status as reference._status); else res[0..1] = [proj, sq]."""
    acc_p = tl.zeros((RBLOCK,), tl.float64)
    acc_s = tl.zeros((RBLOCK,), tl.float64)
    for start in range(0, n_blocks, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc_p += tl.load(fp_ptr + offs, mask=offs < n_blocks, other=0.0)
        acc_s += tl.load(fp_ptr + n_blocks + offs, mask=offs < n_blocks, other=0.0)
    proj = tl.sum(acc_p, axis=0)
    sq = tl.sum(acc_s, axis=0)
    if HAS_NORM:
        acc = tl.zeros((RBLOCK,), tl.float32)
        for start in range(0, n_blocks, RBLOCK):
            offs = start + tl.arange(0, RBLOCK)
            acc += tl.load(sq_ptr + offs, mask=offs < n_blocks, other=0.0)
        norm = tl.math.sqrt_rn(tl.sum(acc, axis=0))
        finite = tl.abs(norm) <= 3.4028234663852886e38  # false for inf and nan
        status = tl.where(finite, 0.0, 1.0)
        if HAS_EXPECTED:
            # reference.fingerprint_matches: |a - b| <= FP_RTOL max(|a|, |b|) + 1e-300, in float64
            ep = tl.zeros_like(proj) + e0
            es = tl.zeros_like(sq) + e1
            ok_p = tl.abs(proj - ep) <= 1e-12 * tl.maximum(tl.abs(proj), tl.abs(ep)) + 1e-300
            ok_s = tl.abs(sq - es) <= 1e-12 * tl.maximum(tl.abs(sq), tl.abs(es)) + 1e-300
            status = tl.where(finite, tl.where(ok_p, tl.where(ok_s, 0.0, 2.0), 2.0), 1.0)
        tl.store(res_ptr, status.to(tl.float64))
        tl.store(res_ptr + 1, norm.to(tl.float64))
        tl.store(res_ptr + 2, proj)
        tl.store(res_ptr + 3, sq)
    else:
        tl.store(res_ptr, proj)
        tl.store(res_ptr + 1, sq)


@triton.jit
def _finalize_new_kernel(fp_ptr, n_blocks, res_ptr, RBLOCK: tl.constexpr):
    """res[4..5] = the new fingerprint (same reduction as _finalize_kernel), or the old one when
    res[0] (status) is not 0 (the parameters were not written)."""
    acc_p = tl.zeros((RBLOCK,), tl.float64)
    acc_s = tl.zeros((RBLOCK,), tl.float64)
    for start in range(0, n_blocks, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc_p += tl.load(fp_ptr + offs, mask=offs < n_blocks, other=0.0)
        acc_s += tl.load(fp_ptr + n_blocks + offs, mask=offs < n_blocks, other=0.0)
    ok = tl.load(res_ptr) == 0.0
    tl.store(res_ptr + 4, tl.where(ok, tl.sum(acc_p, axis=0), tl.load(res_ptr + 2)))
    tl.store(res_ptr + 5, tl.where(ok, tl.sum(acc_s, axis=0), tl.load(res_ptr + 3)))


@triton.jit
def _release32(v, snap_h, snap_inv_h, snap_region):
    """The float32 release of float64 ``v`` (``pyunlearn.ops.rng.snap``): on the grid ``snap_h`` where
    ``|v| < snap_region`` (round half to even with 1.5 * 2^52), else rounded once."""
    on_grid = ((v * snap_inv_h + 6755399441055744.0) - 6755399441055744.0) * snap_h
    return tl.where(tl.abs(v) < snap_region, on_grid, v).to(tl.float32)


@triton.jit(do_not_specialize=["n_blocks", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "step", "stream",
                               "fk0", "fk1"])
def _pass2_kernel(
    table_ptr, res_ptr, fp_ptr, n_blocks, lr, max_norm, weight_decay, sigma: tl.float64,
    snap_h: tl.float64, snap_inv_h: tl.float64, snap_region: tl.float64,
    k0: tl.uint32, k1: tl.uint32, k2: tl.uint32, k3: tl.uint32, k4: tl.uint32, k5: tl.uint32, k6: tl.uint32,
    k7: tl.uint32, step: tl.uint32, stream: tl.uint32, fk0: tl.uint32, fk1: tl.uint32,
    MODEL: tl.constexpr, HAS_NOISE: tl.constexpr, G_DTYPE: tl.constexpr, QB: tl.constexpr,
):
    """Gradient clipping (MODEL False): c = x - lr (g f + wd x); model clipping: c = (x - lr (g + wd x)) f;
    then x <- round(c + sigma z) (float64 sum), stored only when res[0] (status) is 0; new fingerprint."""
    if tl.load(res_ptr) != 0.0:  # the same for every program: nothing is written
        return
    p_addr, g_addr, g0, idx, gidx, inb = _tile(table_ptr, QB)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    x = tl.load(p_ptrs, mask=inb, other=0.0)
    g = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32)
    factor = _clip_factor(tl.load(res_ptr + 1).to(tl.float32), max_norm)
    if MODEL:
        c = (x - lr * (g + weight_decay * x)) * factor
    else:
        c = x - lr * (g * factor + weight_decay * x)
    if HAS_NOISE:
        z = _noise_tile(g0, k0, k1, k2, k3, k4, k5, k6, k7, step, stream, QB)
        c = _release32(c.to(tl.float64) + sigma * z, snap_h, snap_inv_h, snap_region)
    tl.store(p_ptrs, c, mask=inb)
    _store_fp_partials(fp_ptr, n_blocks, tl.where(inb, c, 0.0), gidx, fk0, fk1)


@triton.jit(do_not_specialize=["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "step", "stream"])
def _dpsgd_kernel(
    table_ptr, lr: tl.float64, std: tl.float64, expected_batch_size: tl.float64, weight_decay: tl.float64,
    snap_h: tl.float64, snap_inv_h: tl.float64, snap_region: tl.float64,
    k0: tl.uint32, k1: tl.uint32, k2: tl.uint32, k3: tl.uint32, k4: tl.uint32, k5: tl.uint32, k6: tl.uint32,
    k7: tl.uint32, step: tl.uint32, stream: tl.uint32,
    G_DTYPE: tl.constexpr, HAS_NOISE: tl.constexpr, QB: tl.constexpr,
):
    """x <- round(x - lr (nd / E[B] + wd x)) in float64, nd = g + std z (g without noise)."""
    p_addr, g_addr, g0, idx, _, inb = _tile(table_ptr, QB)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    x = tl.load(p_ptrs, mask=inb, other=0.0).to(tl.float64)
    nd = tl.load(g_addr.to(tl.pointer_type(G_DTYPE)) + idx, mask=inb, other=0.0).to(tl.float32).to(tl.float64)
    if HAS_NOISE:
        nd = nd + std * _noise_tile(g0, k0, k1, k2, k3, k4, k5, k6, k7, step, stream, QB)
    tl.store(p_ptrs, _release32(x - lr * (nd / expected_batch_size + weight_decay * x), snap_h, snap_inv_h,
                                snap_region), mask=inb)


@triton.jit(do_not_specialize=["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "step", "stream"])
def _add_noise_kernel(
    table_ptr, sigma: tl.float64, snap_h: tl.float64, snap_inv_h: tl.float64, snap_region: tl.float64,
    k0: tl.uint32, k1: tl.uint32, k2: tl.uint32, k3: tl.uint32, k4: tl.uint32, k5: tl.uint32, k6: tl.uint32,
    k7: tl.uint32, step: tl.uint32, stream: tl.uint32, QB: tl.constexpr,
):
    """x <- round(x + sigma z) (float64 sum, one rounding)."""
    p_addr, _, g0, idx, _, inb = _tile(table_ptr, QB)
    p_ptrs = p_addr.to(tl.pointer_type(tl.float32)) + idx
    x = tl.load(p_ptrs, mask=inb, other=0.0).to(tl.float64)
    z = _noise_tile(g0, k0, k1, k2, k3, k4, k5, k6, k7, step, stream, QB)
    tl.store(p_ptrs, _release32(x + sigma * z, snap_h, snap_inv_h, snap_region), mask=inb)


@triton.jit(do_not_specialize=["numel", "offset", "first", "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7",
                               "step", "stream"])
def _gaussian_noise_kernel(
    out_ptr, numel, offset, first,
    k0: tl.uint32, k1: tl.uint32, k2: tl.uint32, k3: tl.uint32, k4: tl.uint32, k5: tl.uint32, k6: tl.uint32,
    k7: tl.uint32, step: tl.uint32, stream: tl.uint32, QB: tl.constexpr,
):
    """out[e - offset] = z_e for global elements e in [offset, offset + numel); program j covers
    first + j QB 4 .. (first a multiple of 4)."""
    g0 = first.to(tl.int64) + tl.program_id(0).to(tl.int64) * (4 * QB)
    rel = 4 * tl.arange(0, QB)[:, None].to(tl.int64) + tl.arange(0, 4)[None, :]
    idx = g0 + rel - offset
    z = _noise_tile(g0, k0, k1, k2, k3, k4, k5, k6, k7, step, stream, QB)
    tl.store(out_ptr + idx, z, mask=(idx >= 0) & (idx < numel))


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _check_block(where: str, block: int) -> None:
    if block < 4 or block & (block - 1):
        raise ValueError(f"{where}: block must be a power of two >= 4, got {block}")


class _Plan:
    """Validated tensors of one call: block table, gradient element type, write-back list.
    ``grads=None``: a parameter-only launch (noise, fingerprint); the table's grad column repeats the
    parameter addresses."""

    def __init__(self, where: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None,
                 grads_name: str, block: int) -> None:
        params = list(params)
        _check_block(where, block)
        if grads is not None:
            grads = list(grads)
            if len(params) != len(grads):
                raise ValueError(f"{where}: params and {grads_name} must have the same length, "
                                 f"got {len(params)} and {len(grads)}")
        device = params[0].device if params else torch.device("cpu")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if p.dtype != torch.float32:
                raise TypeError(f"{where}: the Triton backend needs float32 params, params[{i}] is {p.dtype}")
            if p.device != device:
                raise ValueError(f"{where}: all tensors must be on one device; params[0] is on {device}, "
                                 f"params[{i}] on {p.device}")
        for i, g in enumerate(grads or ()):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{where}: {grads_name}[{i}] must be a torch.Tensor, got {type(g).__name__}")
            if g.dtype not in _TL_DTYPE:
                raise TypeError(f"{where}: {grads_name}[{i}] must be float32, float16 or bfloat16, got {g.dtype}")
            if g.shape != params[i].shape:
                raise ValueError(f"{where}: {grads_name}[{i}] has shape {tuple(g.shape)} but params[{i}] "
                                 f"has shape {tuple(params[i].shape)}")
            if g.device != device:
                raise ValueError(f"{where}: all tensors must be on one device; params[0] is on {device}, "
                                 f"{grads_name}[{i}] on {g.device}")
        if params:
            _check_launch_device(device, where)
        self.device = device
        # NOTE: non-contiguous params are updated through contiguous copies (see ``finish``).
        self.params = [p if p.is_contiguous() else p.contiguous() for p in params]
        self._write_back = [(p, w) for p, w in zip(params, self.params) if w is not p]
        if grads is None:
            self.grads, self.g_dtype = self.params, tl.float32
        else:
            # Gradient element type: the common dtype, or float32 (upcast copies) for a mixed list.
            dtypes = {g.dtype for g in grads}
            g_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            self.grads = [(g if g.dtype == g_dtype else g.to(g_dtype)).contiguous() for g in grads]
            self.g_dtype = _TL_DTYPE[g_dtype]
        self.block = block
        self.qb = block // 4
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


def _noise_words(key: Sequence[int], step: int, stream: int) -> tuple[int, ...]:
    """The 10 uint32 launch arguments of the noise: key (8), step, stream (validated)."""
    words = check_key(key)
    _check_counter(int(step), int(stream))
    return (*words, int(step), int(stream))


def _fp_words(fp_key: Sequence[int]) -> tuple[int, int]:
    try:
        words = [int(w) for w in fp_key]
    except TypeError:
        raise TypeError(f"fp_key must be 2 32-bit words, got {fp_key!r}") from None
    if len(words) != 2 or any(not 0 <= w <= 0xFFFFFFFF for w in words):
        raise ValueError(f"fp_key must be 2 words in [0, 2**32), got {fp_key!r}")
    return words[0], words[1]


def _expected(expected_fp: Sequence[float]) -> tuple[bool, float, float]:
    values = [float(v) for v in expected_fp]
    if len(values) not in (0, 2):
        raise ValueError(f"expected_fp must be empty or [proj, sq], got {len(values)} values")
    return (True, values[0], values[1]) if values else (False, 0.0, 0.0)


def _partials(plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block float32 squares and (2, n_blocks) float64 fingerprint partials."""
    return (torch.empty(plan.n_blocks, dtype=torch.float32, device=plan.device),
            torch.empty(2 * plan.n_blocks, dtype=torch.float64, device=plan.device))


def _launch_fingerprint_pass(plan: _Plan, fk: tuple[int, int], kind: int, lr: float = 0.0,
                             weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    sq, fp = _partials(plan)
    if plan.n_blocks:
        _pass1_kernel[(plan.n_blocks,)](
            plan.table, sq, fp, plan.n_blocks, float(lr), float(weight_decay), *fk,
            KIND=kind, G_DTYPE=plan.g_dtype, QB=plan.qb, num_warps=_NUM_WARPS, enable_fp_fusion=False)
    return sq, fp


def _clipping_step(where: str, model: bool, params, grads, *, lr: float, max_norm: float, weight_decay: float,
                   sigma: float, key: Sequence[int], step: int, fp_key: Sequence[int],
                   expected_fp: Sequence[float], block: int) -> torch.Tensor:
    words = _noise_words(key, step, STREAM_UPDATE)
    fk = _fp_words(fp_key)
    has_expected, e0, e1 = _expected(expected_fp)
    plan = _Plan(where, params, grads, "grads", block)
    res = torch.empty(6, dtype=torch.float64, device=plan.device)
    sq, fp = _launch_fingerprint_pass(plan, fk, _MODEL_CLIP if model else _GRAD_CLIP, lr, weight_decay)
    _finalize_kernel[(1,)](sq, fp, plan.n_blocks, res, e0, e1, HAS_NORM=True, HAS_EXPECTED=has_expected,
                           RBLOCK=_RBLOCK, num_warps=4, enable_fp_fusion=False)
    if plan.n_blocks:
        _pass2_kernel[(plan.n_blocks,)](
            plan.table, res, fp, plan.n_blocks, float(lr), float(max_norm), float(weight_decay), float(sigma),
            *_snap_args(float(sigma)), *words, *fk, MODEL=model, HAS_NOISE=sigma != 0.0, G_DTYPE=plan.g_dtype, QB=plan.qb,
            num_warps=_NUM_WARPS, enable_fp_fusion=False)
    _finalize_new_kernel[(1,)](fp, plan.n_blocks, res, RBLOCK=_RBLOCK, num_warps=4, enable_fp_fusion=False)
    plan.finish()
    return res


def gradient_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_grad_norm: float,
    weight_decay: float,
    sigma: float,
    key: Sequence[int],
    step: int,
    fp_key: Sequence[int],
    expected_fp: Sequence[float] = (),
) -> torch.Tensor:
    """``x <- round(x - lr (clip(g, C1) + wd x) + sigma noise(key, step))`` in place, written only when
    the gradient norm is finite and the fingerprint matches ``expected_fp``; returns float64
    ``[status, grad_norm, old_fp (2), new_fp (2)]`` on the device. Same contract as the reference."""
    return _gradient_clipping_step(params, grads, lr=lr, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                                   sigma=sigma, key=key, step=step, fp_key=fp_key, expected_fp=expected_fp)


def _gradient_clipping_step(params, grads, *, lr: float, max_grad_norm: float, weight_decay: float, sigma: float,
                            key: Sequence[int], step: int, fp_key: Sequence[int],
                            expected_fp: Sequence[float] = (), block: int = _BLOCK) -> torch.Tensor:
    if not list(params) and not list(grads):
        return _ref.gradient_clipping_step_([], [], lr=lr, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                                            sigma=sigma, key=check_key(key), step=step, fp_key=fp_key,
                                            expected_fp=expected_fp)
    return _clipping_step("gradient_clipping_step_", False, params, grads, lr=lr, max_norm=max_grad_norm,
                          weight_decay=weight_decay, sigma=sigma, key=key, step=step, fp_key=fp_key,
                          expected_fp=expected_fp, block=block)


def model_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_model_norm: float,
    weight_decay: float,
    sigma: float,
    key: Sequence[int],
    step: int,
    fp_key: Sequence[int],
    expected_fp: Sequence[float] = (),
) -> torch.Tensor:
    """``y = x - lr (g + wd x); x <- round(clip(y, C2) + sigma noise(key, step))`` in place, written only
    when ``|y|`` is finite and the fingerprint matches ``expected_fp``; returns float64
    ``[status, |y|, old_fp (2), new_fp (2)]`` on the device. Same contract as the reference."""
    return _model_clipping_step(params, grads, lr=lr, max_model_norm=max_model_norm, weight_decay=weight_decay,
                                sigma=sigma, key=key, step=step, fp_key=fp_key, expected_fp=expected_fp)


def _model_clipping_step(params, grads, *, lr: float, max_model_norm: float, weight_decay: float, sigma: float,
                         key: Sequence[int], step: int, fp_key: Sequence[int],
                         expected_fp: Sequence[float] = (), block: int = _BLOCK) -> torch.Tensor:
    if not list(params) and not list(grads):
        return _ref.model_clipping_step_([], [], lr=lr, max_model_norm=max_model_norm, weight_decay=weight_decay,
                                         sigma=sigma, key=check_key(key), step=step, fp_key=fp_key,
                                         expected_fp=expected_fp)
    return _clipping_step("model_clipping_step_", True, params, grads, lr=lr, max_norm=max_model_norm,
                          weight_decay=weight_decay, sigma=sigma, key=key, step=step, fp_key=fp_key,
                          expected_fp=expected_fp, block=block)


def dpsgd_step_(
    params: Sequence[torch.Tensor],
    summed_clipped_grads: Sequence[torch.Tensor],
    *,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    weight_decay: float,
    key: Sequence[int],
    step: int,
) -> None:
    """DP-SGD update ``x <- round(x - lr ((sum_i clip(g_i) + z C noise) / E[B] + wd x))`` in place, in
    float64, one launch. Same contract as the reference."""
    _dpsgd_step(params, summed_clipped_grads, lr=lr, noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                weight_decay=weight_decay, key=key, step=step)


def _dpsgd_step(params, summed_clipped_grads, *, lr: float, noise_multiplier: float, max_grad_norm: float,
                expected_batch_size: float, weight_decay: float, key: Sequence[int], step: int,
                block: int = _BLOCK) -> None:
    words = _noise_words(key, step, STREAM_UPDATE)
    plan = _Plan("dpsgd_step_", params, summed_clipped_grads, "summed_clipped_grads", block)
    std = float(noise_multiplier) * float(max_grad_norm)  # in double, as the reference
    if plan.n_blocks == 0:
        return
    _dpsgd_kernel[(plan.n_blocks,)](
        plan.table, float(lr), std, float(expected_batch_size), float(weight_decay),
        *_snap_args(float(lr) * std / float(expected_batch_size) if std > 0.0 else 0.0), *words,
        G_DTYPE=plan.g_dtype, HAS_NOISE=std > 0.0, QB=plan.qb, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    plan.finish()


def add_noise_(params: Sequence[torch.Tensor], *, sigma: float, key: Sequence[int], step: int,
               stream: int = STREAM_UPDATE) -> None:
    """``params <- round(params + sigma noise(key, step, stream))`` in place (float64 sum, one rounding),
    element indices over the concatenation of ``params``. Same contract as the reference."""
    _add_noise(params, sigma=sigma, key=key, step=step, stream=stream)


def _add_noise(params, *, sigma: float, key: Sequence[int], step: int, stream: int = STREAM_UPDATE,
               block: int = _BLOCK) -> None:
    words = _noise_words(key, step, stream)
    plan = _Plan("add_noise_", params, None, "", block)
    if sigma == 0.0 or plan.n_blocks == 0:
        return
    _add_noise_kernel[(plan.n_blocks,)](plan.table, float(sigma), *_snap_args(float(sigma)), *words, QB=plan.qb, num_warps=_NUM_WARPS,
                                        enable_fp_fusion=False)
    plan.finish()


def _snap_args(scale: float) -> tuple[float, float, float]:
    """(h, 1/h, region) of the release grid of noise scale ``scale`` (region 0: no snap)."""
    if scale == 0.0:
        return 1.0, 1.0, 0.0
    h, region = release_grid(scale, torch.float32)
    return h, 1.0 / h, region


def fingerprint(params: Sequence[torch.Tensor], fp_key: Sequence[int]) -> torch.Tensor:
    """float64 ``[sum_i w_i x_i, sum_i x_i^2]`` over the concatenation of ``params`` (on their device):
    the same doubles as the old fingerprint of a step on these params (same blocks, same reduction)."""
    return _fingerprint(params, fp_key)


def _fingerprint(params, fp_key: Sequence[int], block: int = _BLOCK) -> torch.Tensor:
    fk = _fp_words(fp_key)
    params = list(params)
    if not params:
        return _ref.fingerprint([], fk)
    plan = _Plan("fingerprint", params, None, "", block)
    out = torch.empty(2, dtype=torch.float64, device=plan.device)
    sq, fp = _launch_fingerprint_pass(plan, fk, _FP_ONLY)
    _finalize_kernel[(1,)](sq, fp, plan.n_blocks, out, 0.0, 0.0, HAS_NORM=False, HAS_EXPECTED=False,
                           RBLOCK=_RBLOCK, num_warps=4, enable_fp_fusion=False)
    return out


def gaussian_noise(numel: int, *, key: Sequence[int], step: int, offset: int = 0, stream: int = STREAM_UPDATE,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float64 noise of global elements ``offset .. offset + numel - 1`` (bit-identical to
    ``pyunlearn.ops.rng.gaussian_noise``), one launch."""
    return _gaussian_noise(numel, key=key, step=step, offset=offset, stream=stream, device=device)


def _gaussian_noise(numel: int, *, key: Sequence[int], step: int, offset: int = 0, stream: int = STREAM_UPDATE,
                    device: torch.device | str = "cpu", block: int = _BLOCK) -> torch.Tensor:
    _check_block("gaussian_noise", block)
    words = _noise_words(key, step, stream)
    numel, offset = int(numel), int(offset)
    if numel < 0 or offset < 0:
        raise ValueError(f"gaussian_noise: numel and offset must be >= 0, got numel={numel}, offset={offset}")
    device = torch.device(device)
    _check_launch_device(device, "gaussian_noise")
    out = torch.empty(numel, dtype=torch.float64, device=device)
    if numel == 0:
        return out
    first = offset & ~3
    grid = (triton.cdiv(offset + numel - first, block),)
    _gaussian_noise_kernel[grid](out, numel, offset, first, *words, QB=block // 4, num_warps=_NUM_WARPS,
                                 enable_fp_fusion=False)
    return out


def _clear_table_cache() -> None:
    """Drop the cached block tables (tests; or to release their device memory)."""
    _table_cache.clear()


__all__ = ["add_noise_", "dpsgd_step_", "fingerprint", "gaussian_noise", "gradient_clipping_step_",
           "model_clipping_step_"]
