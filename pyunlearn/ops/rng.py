"""Counter-based Gaussian noise: the reference every backend reproduces.

Element ``i`` of the noise drawn at ``(seed, step, stream)`` is a pure function of those four numbers,
so noise is reproducible, independent of how tensors are split into launches, and identical on every
rank of a distributed run. The generator is Philox4x32-10 (Salmon et al., SC'11), the one Triton,
cuRAND and JAX use, followed by the Box-Muller transform:

    key      = (seed mod 2^32, seed div 2^32)
    counter  = (q mod 2^32, q div 2^32, step mod 2^32, stream),   q = i div 4
    r0..r3   = philox4x32_10(counter, key)
    u_a      = r_a * 2^-32 + 2^-33            (in (0, 1), computed in float32)
    z0, z1   = sqrt(-2 log u0) * (cos, sin)(2 pi u1)
    z2, z3   = sqrt(-2 log u2) * (cos, sin)(2 pi u3)
    noise[i] = z_(i mod 4)

All arithmetic after the integer rounds is float32; backends agree with this reference up to the
last-place differences of their ``log``/``cos``/``sin``.
"""
from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

#: Noise streams: the update noise of every step, and the one-off initial noise (model clipping).
STREAM_UPDATE = 0
STREAM_INIT = 1

_TWO_POW_M32 = 2.3283064365386963e-10  # 2^-32, exact in float32
_TWO_POW_M33 = 1.1641532182693481e-10  # 2^-33, exact in float32
_TWO_PI = 6.2831854820251465  # float32(2 pi)


def _mulhilo(m: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``m * b`` for a 32-bit constant ``m`` and uint32 values in int64."""
    lo16 = b & 0xFFFF
    hi16 = b >> 16
    prod_hi = m * hi16  # < 2^48
    low_sum = m * lo16 + ((prod_hi & 0xFFFF) << 16)  # < 2^49
    return (prod_hi >> 16) + (low_sum >> 32), low_sum & MASK32


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Ten Philox rounds on int64 tensors holding uint32 values."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _check_seed(seed: int, step: int, stream: int) -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")


def gaussian_noise(
    numel: int,
    *,
    seed: int,
    step: int,
    offset: int = 0,
    stream: int = STREAM_UPDATE,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal float32 noise for global element indices ``offset .. offset + numel - 1``."""
    _check_seed(seed, step, stream)
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    q = idx >> 2
    zero = torch.zeros_like(q)
    counter = (q & MASK32, q >> 32, zero + (step & MASK32), zero + stream)
    r = philox4x32_10(counter, (seed & MASK32, (seed >> 32) & MASK32))
    u = [x.to(torch.float32) * _TWO_POW_M32 + _TWO_POW_M33 for x in r]
    radius_a = torch.sqrt(-2.0 * torch.log(u[0]))
    radius_b = torch.sqrt(-2.0 * torch.log(u[2]))
    angle_a = _TWO_PI * u[1]
    angle_b = _TWO_PI * u[3]
    z = torch.stack(
        [radius_a * torch.cos(angle_a), radius_a * torch.sin(angle_a),
         radius_b * torch.cos(angle_b), radius_b * torch.sin(angle_b)]
    )
    lane = idx & 3
    return z.gather(0, lane.unsqueeze(0)).squeeze(0)
