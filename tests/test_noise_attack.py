"""The sparse-support attack on the noise, run as an adversary would (DESIGN.md, "What a certificate must
survive"): the adversary knows both worlds' noise-free centres and the sampler, sees one float32 release
from world A and tries to prove it impossible from world B by showing that no output of the sampler
lands in the release's rounding cells from B's centre.

Against the 128-bit sampler the test constructs, for every Box-Muller pair of every release and on every
backend, an explicit pair of 128-bit uniforms that the *implemented* transform (``rng.box_muller``) maps
into the release's cells from world B: no release is provably impossible. The same search on a sampler
with coarse uniforms (emulated by rounding the witness uniforms to 16 bits) fails, so the test can fail.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyunlearn.ops as ops
from backends import BACKENDS, forced, to_backend
from pyunlearn.ops import rng

MASK128 = (1 << 128) - 1


def _words(value: int) -> list[torch.Tensor]:
    return [torch.tensor([(value >> (32 * j)) & 0xFFFFFFFF], dtype=torch.int64) for j in range(4)]


def _radius_integer(r: float, bits: int) -> int:
    """A grid integer K with (K + 1/2) 2^-128 ~ exp(-r^2/2), on a grid of 2^-bits."""
    half_r2 = 0.5 * r * r
    if half_r2 < 0.5:  # u near 1: work with 1 - u, which float64 resolves
        k = (1 << 128) - int(math.ldexp(-math.expm1(-half_r2), 128)) - 1
    else:
        k = int(math.ldexp(math.exp(-half_r2), 128))
    k = min(max(k, 0), MASK128)
    return (k >> (128 - bits)) << (128 - bits)


def _angle_integer(theta: float, bits: int) -> int:
    """A grid integer A with 2 pi (A + 1/2) 2^-128 ~ theta, on a grid of 2^-bits of a turn."""
    frac = (theta / (2.0 * math.pi)) % 1.0
    a = min(int(math.ldexp(frac, 128)), MASK128)
    return (a >> (128 - bits)) << (128 - bits)


def _witness(target: tuple[float, float], centre: tuple[float, float], sigma: float,
             release: tuple[np.float32, np.float32], bits: int) -> bool:
    """Whether uniforms on a 2^-bits grid near the inverse of ``target`` give the release from ``centre``."""
    r = math.hypot(*target)
    theta = math.atan2(target[1], target[0])
    k0, a0 = _radius_integer(r, bits), _angle_integer(theta, bits)
    step = 1 << (128 - bits)
    for dk in (0, -1, 1, -2, 2):
        for da in (0, -1, 1, -2, 2):
            k, a = (k0 + dk * step) & MASK128, (a0 + da * step) & MASK128
            z = rng.box_muller(_words(k), _words(a))
            got = tuple(np.float32(c + sigma * float(zi)) for c, zi in zip(centre, z))
            if got == tuple(release):
                return True
    return False


def _cell_centre(x: np.float32, centre: float, sigma: float) -> float:
    """The noise value that puts ``centre + sigma z`` at the middle of x's float32 rounding cell."""
    return (float(x) - centre) / sigma


def _release(backend: str, centre: torch.Tensor, sigma: float, key: list[int], step: int) -> torch.Tensor:
    x = to_backend(backend, [centre.clone()])
    with forced(backend):
        ops.add_noise_(x, sigma=sigma, key=key, step=step)
    return x[0].cpu()


def _two_worlds(d: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    world_a = (torch.randn(d, generator=g) * 0.05).float()
    world_b = (world_a.double() + 0.8 * sigma * torch.randn(d, generator=g, dtype=torch.float64)).float()
    return world_a, world_b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [3e-3, 0.4])
def test_no_release_is_provably_impossible_from_the_other_world(backend, sigma):
    d = 256
    world_a, world_b = _two_worlds(d, sigma, seed=int(sigma * 1e4))
    for release_step in range(2):
        key = rng.key_from_seed(1000 + release_step, "attack")
        x = _release(backend, world_a, sigma, key, release_step).numpy()
        b = world_b.double().numpy()
        for base in range(0, d, 2):  # elements 2m, 2m + 1 are one Box-Muller pair
            target = (_cell_centre(x[base], b[base], sigma), _cell_centre(x[base + 1], b[base + 1], sigma))
            assert _witness(target, (b[base], b[base + 1]), sigma, (x[base], x[base + 1]), bits=128), (
                f"{backend}: release pair {base} from world A is unreachable from world B")


def test_the_search_catches_a_coarse_sampler():
    """Control: with 16-bit uniforms the same witness search fails for most pairs, as the float32
    Box-Muller from 32-bit uniforms did for far-out pairs: the test above has power."""
    sigma = 0.4
    world_a, world_b = _two_worlds(128, sigma, seed=7)
    x = _release("reference", world_a, sigma, rng.key_from_seed(3, "attack"), 0).numpy()
    b = world_b.double().numpy()
    found = [_witness((_cell_centre(x[i], b[i], sigma), _cell_centre(x[i + 1], b[i + 1], sigma)),
                      (b[i], b[i + 1]), sigma, (x[i], x[i + 1]), bits=16) for i in range(0, 128, 2)]
    assert sum(found) < len(found) // 2


def test_every_float32_value_near_the_centre_is_reachable():
    """Around a centre, each float32 value within a few sigma has a pair of 128-bit uniforms that the
    implemented transform rounds onto it (no holes in the support at float32 resolution)."""
    sigma = 1e-3
    centre = 0.3
    start = np.float32(centre + 2.0 * sigma)
    values = [start]
    for _ in range(200):
        values.append(np.nextafter(values[-1], np.float32(np.inf)))
    other_centre = -0.7  # the pair's second coordinate, released at noise ~0.3
    other = np.float32(other_centre + sigma * 0.3)
    for x in values:
        target = (_cell_centre(x, centre, sigma), _cell_centre(other, other_centre, sigma))
        assert _witness(target, (centre, other_centre), sigma, (x, other), bits=128), float(x)
