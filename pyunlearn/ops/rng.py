"""Counter-mode cryptographic Gaussian noise: the reference every backend reproduces bit for bit.

Element ``i`` of the noise drawn with ``key`` at ``(step, stream)`` is a pure function of those values, so
noise is reproducible for a given key, independent of how tensors are split into launches, and identical
on every backend and every rank of a distributed run.

Generator: the ChaCha20 block function of RFC 8439 (20 rounds), keyed with 256 bits. Element ``i`` lies in
block ``b = i div 4``; the block's input is

    state = constants(4) | key(8) | b mod 2^32 | b div 2^32 | step | stream

i.e. RFC 8439 with block counter ``b mod 2^32`` and nonce words ``(b div 2^32, step, stream)``. The 16 output
words ``w[0..15]`` make two Box-Muller pairs: pair ``p`` takes its radius uniform from ``w[8p..8p+3]`` and its
angle from ``w[8p+4..8p+7]`` (128 bits each, little-endian words), and gives elements ``4b + 2p`` (cosine)
and ``4b + 2p + 1`` (sine).

Sampling (all in float64, with only IEEE-rounded +, -, *, / and sqrt, evaluated in one fixed order, so every
backend rounds identically; no library log/sin/cos, whose last bits differ between platforms):

    u     = (K + 1/2) 2^-128          K = the radius words as a 128-bit integer  -> u in (0, 1]
    r     = sqrt(-2 log u)            log: exponent split + atanh series (``_log``)
    angle = 2 pi (A + 1/2) 2^-128     A = the angle words; top two bits pick the quadrant, the next the
                                      octant half, so sin/cos are only evaluated on (0, pi/4] of an
                                      argument formed exactly from the remaining 125 bits
    z     = r cos(angle), r sin(angle)

Why 128-bit uniforms: the smallest radius uniform is 2^-129, so the sampler reaches |z| = 13.4 (the ideal
Gaussian's mass beyond that is 2^-129), and near every zero of sin/cos the angle has an absolute
resolution of 2^-125. The noise therefore has no sparse support at float32 (or float64-centre) resolution:
every float32 value near ``centre`` is reachable as ``round(centre + sigma z)``, which the backends form
in float64 and round once to the parameter dtype (within 2^-7 sigma of 0, where float32 is finer than the
float64 sum, on the grid of ``release_grid``). ``noise_tv_bound`` gives the residual accounted in the
certificate's delta.
"""
from __future__ import annotations

import hashlib
import math
import secrets
from typing import Sequence

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
KEY_WORDS = 8
#: "expand 32-byte k", the ChaCha20 constants.
CHACHA_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)

#: Noise streams: the update noise of every step, and the one-off initial noise (model clipping).
STREAM_UPDATE = 0
STREAM_INIT = 1

#: Normals per ChaCha20 block.
NORMALS_PER_BLOCK = 4
#: Largest |z| the sampler can produce: sqrt(-2 log 2^-129).
Z_MAX = math.sqrt(2.0 * 129.0 * math.log(2.0))

_TWO_M32 = 2.0 ** -32
_PI_4 = 0.78539816339744830962  # float64(pi / 4)
_LN2_HI = 6.93147180369123816490e-01  # fdlibm split of log(2): e * _LN2_HI is exact for |e| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_SQRT2 = 1.4142135623730951
# atanh(s) / s = sum_k s^(2k) / (2k + 1), k <= 11; |s| <= 0.1716 leaves a remainder below 2e-19.
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(12))
# sin(a) = a + a^3 * S(a^2), cos(a) = 1 + a^2 * C(a^2) on (0, pi/4]: Taylor terms through a^17 / a^18
# (remainders below 1e-19).
_SIN = tuple((-1.0) ** (k + 1) / math.factorial(2 * k + 3) for k in range(8))
_COS = tuple((-1.0) ** (k + 1) / math.factorial(2 * k + 2) for k in range(9))


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------
def check_key(key: Sequence[int], where: str = "key") -> list[int]:
    """The key as a list of 8 ints in [0, 2^32); raises ``ValueError``/``TypeError`` otherwise."""
    try:
        words = list(key)
    except TypeError:
        raise TypeError(f"{where} must be a sequence of {KEY_WORDS} 32-bit words, got {type(key).__name__}") from None
    if len(words) != KEY_WORDS or any(isinstance(w, bool) or not isinstance(w, int) for w in words):
        raise TypeError(f"{where} must be {KEY_WORDS} ints (a 256-bit ChaCha20 key), got {key!r}")
    if any(not 0 <= w <= MASK32 for w in words):
        raise ValueError(f"{where} words must be in [0, 2**32), got {key!r}")
    return words


def key_from_bytes(raw: bytes) -> list[int]:
    """A key from 32 bytes, read as little-endian 32-bit words (as RFC 8439 reads its key)."""
    if len(raw) != 4 * KEY_WORDS:
        raise ValueError(f"a ChaCha20 key has 32 bytes, got {len(raw)}")
    return [int.from_bytes(raw[4 * j:4 * j + 4], "little") for j in range(KEY_WORDS)]


def key_from_seed(seed: int, label: str = "") -> list[int]:
    """A reproducible key for tests and reproducibility (NOT secret): SHA-256 of the seed and a label.

    Different labels (one per operator of a job) give unrelated keys, so two runs from one seed never
    share noise vectors."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    digest = hashlib.sha256(b"pyunlearn/noise-key/v1\0" + label.encode() + b"\0" + str(seed).encode()).digest()
    return key_from_bytes(digest)


def secret_key() -> list[int]:
    """256 bits from the operating system's entropy, the same on every rank of a ``torch.distributed`` job
    (drawn on rank 0 and broadcast). Never written anywhere by pyunlearn."""
    raw = secrets.token_bytes(4 * KEY_WORDS)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [raw]  # an object broadcast works on every backend (NCCL included)
        torch.distributed.broadcast_object_list(holder, src=0)
        raw = bytes(holder[0])
    return key_from_bytes(raw)


def _check_counter(step: int, stream: int) -> None:
    if not 0 <= step <= MASK32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    if not 0 <= stream <= MASK32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")


# --------------------------------------------------------------------------------------------------
# ChaCha20 (RFC 8439) on int64 tensors holding uint32 words
# --------------------------------------------------------------------------------------------------
def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x << n) & MASK32) | (x >> (32 - n))


def _quarter_round(x: list, a: int, b: int, c: int, d: int) -> None:
    x[a] = (x[a] + x[b]) & MASK32
    x[d] = _rotl(x[d] ^ x[a], 16)
    x[c] = (x[c] + x[d]) & MASK32
    x[b] = _rotl(x[b] ^ x[c], 12)
    x[a] = (x[a] + x[b]) & MASK32
    x[d] = _rotl(x[d] ^ x[a], 8)
    x[c] = (x[c] + x[d]) & MASK32
    x[b] = _rotl(x[b] ^ x[c], 7)


def chacha20_block(key: Sequence[int], counter: torch.Tensor, nonce: Sequence) -> list[torch.Tensor]:
    """The 16 output words of the RFC 8439 block function for each block counter in ``counter``
    (int64 tensor of 32-bit values); ``nonce`` holds three words (ints or tensors broadcastable to it)."""
    zero = torch.zeros_like(counter)
    init = [zero + c for c in CHACHA_CONSTANTS] + [zero + k for k in key] + [counter] + [zero + n for n in nonce]
    x = list(init)
    for _ in range(10):  # 20 rounds: a column round and a diagonal round each time
        _quarter_round(x, 0, 4, 8, 12)
        _quarter_round(x, 1, 5, 9, 13)
        _quarter_round(x, 2, 6, 10, 14)
        _quarter_round(x, 3, 7, 11, 15)
        _quarter_round(x, 0, 5, 10, 15)
        _quarter_round(x, 1, 6, 11, 12)
        _quarter_round(x, 2, 7, 8, 13)
        _quarter_round(x, 3, 4, 9, 14)
    return [(x[j] + init[j]) & MASK32 for j in range(16)]


# --------------------------------------------------------------------------------------------------
# Box-Muller in float64 from 128-bit uniforms
# --------------------------------------------------------------------------------------------------
def _unit(w0, w1, w2, w3_scaled, top_scale: float) -> torch.Tensor:
    """((((w0 + 1/2) 2^-32 + w1) 2^-32 + w2) 2^-32 + w3) * top_scale in float64, in this order."""
    v = (w0.double() + 0.5) * _TWO_M32
    v = (v + w1.double()) * _TWO_M32
    v = (v + w2.double()) * _TWO_M32
    return (v + w3_scaled.double()) * top_scale


def _log(u: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float64 values: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
    log u = e log 2 + 2 atanh((m - 1) / (m + 1))."""
    bits = u.view(torch.int64)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(torch.float64)  # [1, 2)
    big = m > _SQRT2
    m = torch.where(big, m * 0.5, m)
    e = (e + big.long()).double()
    f = m - 1.0  # exact (Sterbenz)
    s = f / (2.0 + f)
    s2 = s * s
    p = torch.full_like(s, _ATANH[-1])
    for c in reversed(_ATANH[:-1]):
        p = p * s2 + c
    return (2.0 * s * p + e * _LN2_LO) + e * _LN2_HI


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float64 square root. NOTE: torch's CPU kernel (SLEEF) is off by one ulp for ~0.7%
    of inputs; numpy's is IEEE, as are CUDA's, C++'s and Triton's ``sqrt_rn``."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.numpy()))
    return torch.sqrt(x)


def _sincos(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos on (0, pi/4] by Taylor polynomials in float64."""
    a2 = a * a
    sp = torch.full_like(a, _SIN[-1])
    for c in reversed(_SIN[:-1]):
        sp = sp * a2 + c
    cp = torch.full_like(a, _COS[-1])
    for c in reversed(_COS[:-1]):
        cp = cp * a2 + c
    return a + a * a2 * sp, 1.0 + a2 * cp


def box_muller(radius_words: Sequence[torch.Tensor], angle_words: Sequence[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 normals from 4 + 4 words (int64 tensors of uint32 values), as in the module docstring."""
    r0, r1, r2, r3 = radius_words
    u = _unit(r0, r1, r2, r3, _TWO_M32)  # (K + 1/2) 2^-128 in (0, 1]
    radius = _sqrt(-2.0 * _log(u))
    a0, a1, a2, a3 = angle_words
    quadrant = a3 >> 30
    upper = ((a3 >> 29) & 1).bool()  # second half of the quadrant: measure from its far end instead
    low29 = 0x1FFFFFFF
    g0 = torch.where(upper, a0 ^ MASK32, a0)
    g1 = torch.where(upper, a1 ^ MASK32, a1)
    g2 = torch.where(upper, a2 ^ MASK32, a2)
    g3 = torch.where(upper, (a3 ^ MASK32) & low29, a3 & low29)
    t = _unit(g0, g1, g2, g3, 2.0 ** -29)  # (G + 1/2) 2^-125 in (0, 1)
    s, c = _sincos(t * _PI_4)
    cos_in, sin_in = torch.where(upper, s, c), torch.where(upper, c, s)  # angle within the quadrant
    cos_v = torch.where(quadrant == 0, cos_in, torch.where(quadrant == 1, -sin_in,
                                                           torch.where(quadrant == 2, -cos_in, sin_in)))
    sin_v = torch.where(quadrant == 0, sin_in, torch.where(quadrant == 1, cos_in,
                                                           torch.where(quadrant == 2, -sin_in, -cos_in)))
    return radius * cos_v, radius * sin_v


def normals_of_blocks(key: Sequence[int], blocks: torch.Tensor, *, step: int, stream: int) -> torch.Tensor:
    """(len(blocks), 4) float64 normals of the given block indices (int64 tensor)."""
    w = chacha20_block(key, blocks & MASK32, (blocks >> 32, step, stream))
    z0, z1 = box_muller(w[0:4], w[4:8])
    z2, z3 = box_muller(w[8:12], w[12:16])
    return torch.stack([z0, z1, z2, z3], dim=1)


def gaussian_noise(
    numel: int,
    *,
    key: Sequence[int],
    step: int,
    offset: int = 0,
    stream: int = STREAM_UPDATE,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal float64 noise for global element indices ``offset .. offset + numel - 1``."""
    key = check_key(key)
    _check_counter(step, stream)
    if numel < 0 or offset < 0:
        raise ValueError(f"gaussian_noise: numel and offset must be >= 0, got numel={numel}, offset={offset}")
    if numel == 0:
        return torch.empty(0, dtype=torch.float64, device=device)
    first, last = offset // NORMALS_PER_BLOCK, (offset + numel - 1) // NORMALS_PER_BLOCK
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    z = normals_of_blocks(key, blocks, step=step, stream=stream).reshape(-1)
    start = offset - first * NORMALS_PER_BLOCK
    return z[start:start + numel].contiguous()


#: 1.5 * 2^52: (v + M) - M rounds |v| < 2^51 to the nearest integer (ties to even) in float64.
_ROUND_MAGIC = 6755399441055744.0


def release_grid(scale: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(h, region)`` of a noisy release with noise scale ``scale > 0``: values with ``|v| < region`` are
    released on the grid ``h Z``, the others as ``dtype`` values. With E = floor(log2 scale):

        float32: h = 2^(E - 30), region = 2^23 h       float64: h = 2^(E - 40), region = 2^52 h

    so the release cells never get finer than ``h`` (the dtype's own spacing at ``region``).

    Why: ``centre + sigma z`` is formed in float64, on the grid of float64 spacings of values up to
    ~16 sigma (< 2^-48 sigma). Near 0 (centre and noise cancelling) the float32 spacing becomes finer than
    that grid, so without the snap the releases there would have sparse support, which an adversary
    who knows both worlds' centres could test. ``h`` is 2^17 (float32) resp. 2^8 (float64) times that
    grid, and it depends only on the public noise scale, so the snap is post-processing."""
    _, e = math.frexp(scale)  # scale = m 2^e, m in [0.5, 1)
    exponent = e - 1
    if dtype == torch.float64:
        return math.ldexp(1.0, exponent - 40), math.ldexp(1.0, exponent + 12)
    return math.ldexp(1.0, exponent - 30), math.ldexp(1.0, exponent - 7)


def snap(v: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The release of the float64 values ``v`` (noise scale ``scale``) as ``dtype``: see ``release_grid``."""
    if scale == 0.0:
        return v.to(dtype)
    h, region = release_grid(scale, dtype)
    on_grid = ((v * (1.0 / h) + _ROUND_MAGIC) - _ROUND_MAGIC) * h
    return torch.where(v.abs() < region, on_grid, v).to(dtype)


def noisy(centre: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``round(centre + sigma * noise)``: formed in float64, rounded once to ``centre.dtype`` (on the
    release grid near 0, ``snap``)."""
    return snap(centre.double() + float(sigma) * noise.double(), float(sigma), centre.dtype)


# --------------------------------------------------------------------------------------------------
# What the accounting adds for the implemented sampler
# --------------------------------------------------------------------------------------------------
#: Per-coordinate total-variation bound between the implemented noise and the ideal Gaussian (see
#: ``noise_tv_bound``).
TV_PER_COORDINATE = 2.0 ** -62


def noise_tv_bound(*, coordinates: int, steps: int, epsilon: float) -> float:
    """The delta the implemented sampler adds to an (epsilon, delta) Gaussian analysis:
    ``(1 + e^epsilon) * steps * coordinates * eta`` with ``eta = TV_PER_COORDINATE = 2^-62``.

    Coupling argument, per Box-Muller pair and step: draw continuous uniforms (U, V) and let the sampler use
    their 128-bit grid points. The released values can differ from the ideal ``round(centre + sigma z(U, V))``
    only if
      (a) U lies within 2^-64 of 0 or 1 (probability 2^-63), where the grid is coarse relative to the radius;
          this event contains the truncation at ``Z_MAX``; or
      (b) the angle lies within 2^-73 of a zero of sin or cos (probability below 2^-69), where the grid is
          coarse relative to the sine.
    Otherwise the grid moves each z by less than 2^-60 |z|, below its own float64 rounding. So each
    coordinate's released value is within total variation 2^-63 + 2^-69 < 2^-62 of the ideal one, and the
    run is (epsilon, delta + this bound) by the coupling bound of DESIGN.md.
    Not counted: the float64 evaluation of Box-Muller (relative error below 2^-50, the same on every
    backend), like the rest of the step's floating-point arithmetic. It moves the noise by 2^-26 of a
    float32 spacing and cannot make any float32 value near the centre unreachable.
    """
    if coordinates < 0 or steps < 0:
        raise ValueError(f"coordinates and steps must be >= 0, got {coordinates}, {steps}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return (1.0 + math.exp(min(epsilon, 700.0))) * float(steps) * float(coordinates) * TV_PER_COORDINATE
