"""Multi-tensor clip + noise + update ops on every live backend against the PyTorch reference, the
noise properties the certificates rely on, and the torch.library registration (opcheck).

Noise is the ChaCha20 noise of :mod:`pyunlearn.ops.rng`, bit-identical on every backend, and a release is
``round(centre + sigma z)`` formed in float64 and rounded once (on the release grid near 0). So every
backend matches the reference bit for bit, except that with active clipping of random values the norm (a
float32 reduction) may round differently, and with it the clip factor; the reference run with the
backend's own norm is then matched bit for bit, the plain reference up to that one-ulp factor.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyunlearn.ops as ops
from backends import BACKENDS, device_of, examples, forced, to_backend
from pyunlearn.ops import reference as ref
from pyunlearn.ops import rng
from pyunlearn.ops.rng import STREAM_INIT


needs_cpp = pytest.mark.skipif(not ops.backends()["cpp"], reason="pyunlearn._C is not built")


SHAPES = st.lists(st.sampled_from([(1,), (7,), (3, 5), (129,), (2, 3, 11), (0,), (1031,)]), min_size=1, max_size=4)
KEYS = st.one_of(st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=8),
                 st.sampled_from([[0] * 8, [2**32 - 1] * 8]))
FP_KEY = [0x9E3779B9, 0x7F4A7C15]
CLIP_STEPS = ["gradient_clipping_step_", "model_clipping_step_"]
STEPS = CLIP_STEPS + ["dpsgd_step_"]
EBS = 7.0  # expected batch size of the DP-SGD calls


def _key(seed: int) -> list[int]:
    return rng.key_from_seed(seed, "test_clip_noise_step")


def _tensors(shapes, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _step(name: str, backend, params, grads, **kw):
    """The step on ``backend``'s device: params are updated in place (through device copies that are
    copied back, for a GPU backend); the result ([status, norm, old_fp, new_fp]) comes back on the CPU."""
    on_device = to_backend(backend, params)
    with forced(backend):
        result = getattr(ops, name)(on_device, to_backend(backend, grads), **kw)
    for p, d in zip(params, on_device):
        if d is not p:
            p.copy_(d)
    return None if result is None else result.cpu()


def _kw(name: str, *, lr: float, wd: float, clip: float, sigma: float, key, step: int, **extra) -> dict:
    extra.setdefault("fp_key", FP_KEY)
    if name == "gradient_clipping_step_":
        return dict(lr=lr, max_grad_norm=clip, weight_decay=wd, sigma=sigma, key=key, step=step, **extra)
    if name == "model_clipping_step_":
        return dict(lr=lr, max_model_norm=clip, weight_decay=wd, sigma=sigma, key=key, step=step, **extra)
    return dict(lr=lr, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=EBS, weight_decay=wd,
                key=key, step=step)


def _reference(name: str, params, grads, *, norm=None, **kw):
    """The reference step on CPU copies (in place on ``params``); with ``norm``, the norm it clips by is that
    one (a backend's), so that its clip factor is the backend's."""
    if name != "dpsgd_step_":
        kw.setdefault("fp_key", FP_KEY)
    if norm is None:
        return getattr(ref, name)(params, grads, **kw)
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    with mock.patch.object(ref, "global_norm", lambda ts: torch.tensor(norm, dtype=acc)):
        return getattr(ref, name)(params, grads, **kw)


def _check_against_reference(name: str, params, grads, got, result, **kw) -> None:
    """``got``/``result`` (a backend's step from ``params``) against the reference: bit for bit with the
    backend's clip factor; against the plain reference bit for bit when the clip factor is the same (no
    clipping, or the same norm), else up to a one-ulp clip factor."""
    expected = _clone(params)
    ref_result = _reference(name, expected, grads, **kw)
    for p in got:
        assert torch.isfinite(p).all()
    if name == "dpsgd_step_":  # no clip factor: always bit-identical
        assert result is None and ref_result is None
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, expected))
        return
    assert result.dtype == torch.float64 and result.shape == (6,)
    assert result[0].item() == ref_result[0].item() == ref.STATUS_OK
    norm, ref_norm = result[1].item(), ref_result[1].item()
    assert math.isclose(norm, ref_norm, rel_tol=2e-6, abs_tol=1e-6)
    clip = kw["max_grad_norm" if name == "gradient_clipping_step_" else "max_model_norm"]
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    factor, ref_factor = (ref.clip_factor(torch.tensor(v, dtype=acc), clip) for v in (norm, ref_norm))
    torch.testing.assert_close(result[2:4], ref_result[2:4], rtol=ref.FP_RTOL, atol=1e-12)
    if torch.equal(factor, ref_factor):  # the same clip factor (the same norm, or no clipping)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, expected))
        torch.testing.assert_close(result[4:6], ref_result[4:6], rtol=ref.FP_RTOL, atol=1e-12)
    else:  # the factor may differ by an ulp
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        same_factor = _clone(params)
        _reference(name, same_factor, grads, norm=norm, **kw)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, same_factor))


# ------------------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, name):
    @examples(backend)
    @given(shapes=SHAPES, key=KEYS, step=st.integers(0, 2**32 - 1),
           lr=st.sampled_from([0.0, 0.05, 0.5]), wd=st.sampled_from([0.0, 1e-3, 0.3]),
           clip=st.sampled_from([1e-3, 1.0, 5.0, 1e30]), sigma=st.sampled_from([0.0, 0.01, 0.7]),
           data_seed=st.integers(0, 1000))
    def check(shapes, key, step, lr, wd, clip, sigma, data_seed):
        params, grads = _tensors(shapes, data_seed), _tensors(shapes, data_seed + 1, scale=2.0)
        kw = _kw(name, lr=lr, wd=wd, clip=clip, sigma=sigma, key=key, step=step)
        got = _clone(params)
        ids = [id(p) for p in got]
        result = _step(name, backend, got, grads, **kw)
        assert [id(p) for p in got] == ids  # in place
        _check_against_reference(name, params, grads, got, result, **kw)

    check()


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_active_clipping_is_bit_exact(backend, name):
    # No FMA contraction, the reference's operation order and the same noise: identical whenever the clip
    # factor is 1, with noise or without.
    shapes = [(33,), (4, 9), (1031,)]
    params, grads = _tensors(shapes, 1), _tensors(shapes, 2)
    for sigma in (0.0, 0.3):
        kw = _kw(name, lr=0.3, wd=0.01, clip=1e30, sigma=sigma, key=_key(1), step=1)
        expected, got = _clone(params), _clone(params)
        ref_result = _reference(name, expected, grads, **kw)
        result = _step(name, backend, got, grads, **kw)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, expected)), sigma
        if result is not None:
            assert result[0].item() == ref_result[0].item() == ref.STATUS_OK
            torch.testing.assert_close(result[1], ref_result[1], rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", CLIP_STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_active_clipping_is_bit_exact_when_the_norm_is(backend, name):
    # Values whose squares sum exactly in float32 in any order, so every backend gets the same norm; the
    # clip factor must then round exactly as the reference's (torch: reciprocal of the norm, times C), with
    # the noise on top bit-identical too.
    shapes = [(33,), (4, 9), (1031,)]
    g = torch.Generator().manual_seed(3)
    exact = [torch.tensor([0.5, -0.25, 1.0, 0.125])[torch.randint(0, 4, s, generator=g)] for s in shapes]
    for clip, sigma in ((0.7, 0.0), (1e-3, 0.0), (0.3, 0.25), (2.9, 0.01)):
        if name == "gradient_clipping_step_":  # the clipped quantity: the gradients
            params, grads, lr = _tensors(shapes, 1), exact, 0.3
        else:  # the model itself (lr = 0: y = x)
            params, grads, lr = exact, _tensors(shapes, 2), 0.0
        kw = _kw(name, lr=lr, wd=0.01, clip=clip, sigma=sigma, key=_key(1), step=1)
        expected, got = _clone(params), _clone(params)
        ref_result = _reference(name, expected, grads, **kw)
        result = _step(name, backend, got, grads, **kw)
        assert result[1].item() == ref_result[1].item() > clip
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, expected)), (clip, sigma)


# ------------------------------------------------------------------------------------ statuses
def _poisoned(shapes, seed: int, value: float) -> list[torch.Tensor]:
    grads = _tensors(shapes, seed)
    grads[-1].view(-1)[17] = value
    return grads


@pytest.mark.parametrize("name", CLIP_STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_steps_leave_params_bit_identical(backend, name):
    """Status 1 (non-finite norm) and 2 (parameters not matching ``expected_fp``): nothing is written, on
    every backend, and the result says why, as the reference's does."""
    shapes = [(3, 5), (129,)]
    params = _tensors(shapes, 0)
    fp = ref.fingerprint(params, FP_KEY).tolist()
    cases = {
        "nan grad": (_poisoned(shapes, 1, float("nan")), (), ref.STATUS_NONFINITE),
        "inf grad": (_poisoned(shapes, 1, float("inf")), fp, ref.STATUS_NONFINITE),
        "wrong projection": (_tensors(shapes, 1), [fp[0] * (1 + 1e-9) + 1e-9, fp[1]], ref.STATUS_TAMPERED),
        "wrong sum of squares": (_tensors(shapes, 1), [fp[0], fp[1] + 1e-3], ref.STATUS_TAMPERED),
        "nan expected": (_tensors(shapes, 1), [float("nan"), fp[1]], ref.STATUS_TAMPERED),
        "nan grad and wrong fp": (_poisoned(shapes, 1, float("nan")), [fp[0] + 1.0, fp[1]], ref.STATUS_NONFINITE),
    }
    for case, (grads, expected_fp, status) in cases.items():
        kw = _kw(name, lr=0.1, wd=0.01, clip=1.0, sigma=0.5, key=_key(4), step=1, fp_key=FP_KEY,
                 expected_fp=expected_fp)
        ref_result = _reference(name, _clone(params), grads, **kw)
        got = _clone(params)
        result = _step(name, backend, got, grads, **kw)
        assert result[0].item() == ref_result[0].item() == status, case
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, params)), case
        torch.testing.assert_close(result[2:4], torch.tensor(fp, dtype=torch.float64), rtol=ref.FP_RTOL, atol=0)
        assert torch.equal(result[4:6], result[2:4]), case  # the new fingerprint is the old one
        if status == ref.STATUS_NONFINITE:
            assert not math.isfinite(result[1].item())
    # Control: the right fingerprint (the backend's own) lets the step run, and chains.
    grads, got = _tensors(shapes, 1), _clone(params)
    with forced(backend):
        expected_fp = ops.fingerprint(to_backend(backend, got), FP_KEY).cpu().tolist()
    for step in range(2):
        result = _step(name, backend, got, grads, **_kw(name, lr=0.1, wd=0.01, clip=1.0, sigma=0.5, key=_key(4),
                                                        step=step, fp_key=FP_KEY, expected_fp=expected_fp))
        assert result[0].item() == ref.STATUS_OK
        expected_fp = result[4:6].tolist()
    assert not torch.equal(got[1], params[1])
    torch.testing.assert_close(result[4:6], ref.fingerprint(got, FP_KEY), rtol=ref.FP_RTOL, atol=0)


# ------------------------------------------------------------------------------------ noise
def _noise_of(name: str, backend: str, n: int, sigma: float, key, step: int) -> torch.Tensor:
    """The step from x = 0 with g = 0 (so the update is exactly the noise release)."""
    params, grads = [torch.zeros(n)], [torch.zeros(n)]
    _step(name, backend, params, grads, **_kw(name, lr=0.1, wd=0.0, clip=1.0, sigma=sigma, key=key, step=step))
    return params[0]


def _expected_noise(name: str, n: int, sigma: float, key, step: int) -> torch.Tensor:
    """What ``_noise_of`` must release, from the reference noise: round(0 + scale z) on the release grid."""
    z = rng.gaussian_noise(n, key=key, step=step)
    if name == "dpsgd_step_":  # x - lr ((0 + std z) / E[B] + 0), std = noise_multiplier * C (C = 1)
        scale = 0.1 * sigma / EBS
        return rng.snap(0.0 - 0.1 * ((0.0 + sigma * z) / EBS + 0.0), scale, torch.float32)
    return rng.noisy(torch.zeros(n), z, sigma)


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_noise_statistics(backend, name):
    # noise = (after the noisy step) - (after the same step with sigma = 0), on random params and grads.
    n, sigma = 60_000, 0.37
    shapes = [(n // 3,), (n - n // 3,)]
    params, grads = _tensors(shapes, 31), _tensors(shapes, 32)
    noisy, clean = _clone(params), _clone(params)
    _step(name, backend, noisy, grads, **_kw(name, lr=0.1, wd=0.01, clip=2.0, sigma=sigma, key=_key(123), step=9))
    _step(name, backend, clean, grads, **_kw(name, lr=0.1, wd=0.01, clip=2.0, sigma=0.0, key=_key(123), step=9))
    noise = (torch.cat(noisy) - torch.cat(clean)).double()
    if name == "dpsgd_step_":  # x -= lr * (std z) / ebs with std = noise_multiplier * C
        noise = noise / (-0.1 * sigma * 2.0 / EBS) * sigma
    assert abs(noise.mean().item()) < 5 * sigma / n**0.5
    assert abs(noise.var().item() / sigma**2 - 1.0) < 5 * (2 / n) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_key_same_noise_and_different_key_or_step_different(backend):
    name, key = "gradient_clipping_step_", _key(5)
    a = _noise_of(name, backend, 1000, 0.5, key=key, step=2)
    assert torch.equal(_bits(a), _bits(_noise_of(name, backend, 1000, 0.5, key=list(key), step=2)))
    flip_first = [key[0] ^ 1] + key[1:]
    flip_last = key[:7] + [key[7] ^ 0x80000000]
    for other_key, step in [(_key(6), 2), (key, 3), (flip_first, 2), (flip_last, 2), (key, 2 + 2**31)]:
        other = _noise_of(name, backend, 1000, 0.5, key=other_key, step=step)
        assert (other != a).float().mean().item() > 0.99


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_does_not_depend_on_how_params_are_split(backend, name):
    n, key = 1000, _key(77)
    whole = _noise_of(name, backend, n, 0.5, key=key, step=4)
    parts = [torch.zeros(s) for s in (1, 3, 250, 0, 746)]
    _step(name, backend, parts, [torch.zeros_like(p) for p in parts],
          **_kw(name, lr=0.1, wd=0.0, clip=1.0, sigma=0.5, key=key, step=4))
    assert torch.equal(_bits(torch.cat(parts)), _bits(whole))


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_matches_reference_values(backend, name):
    key = [0xFFFFFFFF, 1, 2, 3, 4, 5, 6, 0x80000000]
    got = _noise_of(name, backend, 4099, 1.0, key=key, step=11)
    assert torch.equal(_bits(got), _bits(_expected_noise(name, 4099, 1.0, key=key, step=11)))


# ------------------------------------------------------------------------------------ release grid
def _grid_centre(n: int, scale: float, key, step: int, sign: float = 1.0) -> torch.Tensor:
    """float32 centres c with c + sign * scale z(key, step) within 2^-8 scale of 0 (plus c's own rounding)."""
    z = rng.gaussian_noise(n, key=key, step=step)
    t = (torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 2 - 1) * 2.0 ** -8 * scale
    return (t - sign * scale * z).float()


def _assert_on_grid(out: torch.Tensor, unsnapped: torch.Tensor, scale: float) -> None:
    h, region = rng.release_grid(scale, torch.float32)
    assert h == 2.0 ** (math.floor(math.log2(scale)) - 30) and region == 2.0**23 * h
    v = out.double()
    assert bool((v.abs() < region).all())
    assert torch.equal(torch.round(v / h) * h, v)  # on the grid h Z
    # ... which is coarser than float32 there: without the snap most of these values would be off it.
    assert bool((torch.round(unsnapped.double() / h) * h != unsnapped.double()).float().mean() > 0.3)
    assert bool((out != unsnapped).float().mean() > 0.3)


@pytest.mark.parametrize("name", CLIP_STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_releases_near_zero_are_on_the_release_grid(backend, name):
    """centre + sigma z within 2^-7 sigma of 0: the release is on the grid h = release_grid(sigma)[0] on every
    backend, bit-identical to the reference. (x = centre, g = 0, no weight decay, nothing clipped: the
    centre of the step is x itself.)"""
    n = 1000
    for sigma, step in ((0.7, 3), (3.0, 4)):
        key = _key(step)
        centre = _grid_centre(n, sigma, key, step)
        kw = _kw(name, lr=0.1, wd=0.0, clip=1e30, sigma=sigma, key=key, step=step)
        expected, got = [centre.clone()], [centre.clone()]
        _reference(name, expected, [torch.zeros(n)], **kw)
        result = _step(name, backend, got, [torch.zeros(n)], **kw)
        assert result[0].item() == ref.STATUS_OK
        z = rng.gaussian_noise(n, key=key, step=step)
        assert torch.equal(_bits(expected[0]), _bits(rng.snap(centre.double() + sigma * z, sigma, torch.float32)))
        assert torch.equal(_bits(got[0]), _bits(expected[0])), sigma
        _assert_on_grid(got[0], (centre.double() + sigma * z).float(), sigma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpsgd_releases_near_zero_are_on_the_release_grid_of_its_noise_scale(backend):
    """DP-SGD: noise scale lr * std / E[B] with std = noise_multiplier * C."""
    n, lr, nm, clip = 1000, 0.1, 1.1, 0.8
    for step in (5, 6):
        key, scale = _key(step), lr * (nm * clip) / EBS  # the reference's order
        centre = _grid_centre(n, scale, key, step, sign=-1.0)  # x - lr (std z / E[B]) within 2^-8 scale of 0
        kw = dict(lr=lr, noise_multiplier=nm, max_grad_norm=clip, expected_batch_size=EBS, weight_decay=0.0,
                  key=key, step=step)
        expected, got = [centre.clone()], [centre.clone()]
        ref.dpsgd_step_(expected, [torch.zeros(n)], **kw)
        assert _step("dpsgd_step_", backend, got, [torch.zeros(n)], **kw) is None
        z = rng.gaussian_noise(n, key=key, step=step)
        x = centre.double()
        exact = x - lr * ((0.0 + (nm * clip) * z) / EBS + 0.0 * x)
        assert torch.equal(_bits(expected[0]), _bits(rng.snap(exact, scale, torch.float32)))
        assert torch.equal(_bits(got[0]), _bits(expected[0])), step
        _assert_on_grid(got[0], exact.float(), scale)


# ------------------------------------------------------------------------------- layout, dtype, threads
@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params_are_updated_in_place(backend, name):
    base = torch.randn(9, 14)
    view = base.t()  # non-contiguous (14, 9)
    other = torch.randn(5)
    grads = [torch.randn(14, 9).t().contiguous().t(), torch.randn(5)]  # a non-contiguous gradient too
    kw = _kw(name, lr=0.2, wd=0.01, clip=0.5, sigma=0.1, key=_key(3), step=1)
    before = [view.clone(), other.clone()]
    if device_of(backend).type == "cpu":
        params = [view, other]
        result = _step(name, backend, params, grads, **kw)
    else:  # a device copy of the view: updated through the op, then read back into the CPU view
        on_device = to_backend(backend, base).t()
        params = [on_device, to_backend(backend, other)]
        with forced(backend):
            result = getattr(ops, name)(params, to_backend(backend, grads), **kw)
        result = None if result is None else result.cpu()
        view.copy_(on_device.cpu())
        other.copy_(params[1].cpu())
    _check_against_reference(name, before, grads, [base.t(), other], result, **kw)


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_float64_params_use_the_reference_exactly(backend, name):
    shapes = [(17,), (3, 4)]
    params = [t.double() for t in _tensors(shapes, 4)]
    grads = [t.double() for t in _tensors(shapes, 5)]
    kw = _kw(name, lr=0.1, wd=0.01, clip=0.5, sigma=0.2, key=_key(8), step=2)
    got = _clone(params)
    result = _step(name, backend, got, grads, **kw)
    if device_of(backend).type == "cpu":  # the reference itself
        expected = _clone(params)
        ref_result = _reference(name, expected, grads, **kw)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, expected))
        assert result is None or torch.equal(result, ref_result)
    else:  # the reference on the GPU: the same noise, a float64 norm reduced in another order
        _check_against_reference(name, params, grads, got, result, **kw)


def test_float64_dpsgd_step_computes_in_float64():
    g = torch.Generator().manual_seed(6)
    x, grad = torch.randn(101, dtype=torch.float64, generator=g), torch.randn(101, dtype=torch.float64, generator=g)
    got = [x.clone()]
    ops.dpsgd_step_(got, [grad], lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=7.0,
                    weight_decay=0.01, key=_key(0), step=0)
    assert torch.equal(got[0], x - 0.1 * (grad / 7.0 + 0.01 * x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_dpsgd_step_computes_in_float64_and_rounds_once(backend):
    g = torch.Generator().manual_seed(7)
    x, grad = torch.randn(101, generator=g), torch.randn(101, generator=g) * 3
    key, got = _key(9), [x.clone()]
    _step("dpsgd_step_", backend, got, [grad], lr=0.1, noise_multiplier=1.3, max_grad_norm=0.5,
          expected_batch_size=EBS, weight_decay=0.01, key=key, step=4)
    xd, std = x.double(), 1.3 * 0.5
    exact = xd - 0.1 * ((grad.double() + std * rng.gaussian_noise(101, key=key, step=4)) / EBS + 0.01 * xd)
    assert torch.equal(_bits(got[0]), _bits(rng.snap(exact, 0.1 * std / EBS, torch.float32)))


@needs_cpp
@pytest.mark.parametrize("name", STEPS)
def test_cpp_is_bit_identical_across_thread_counts(name):
    shapes = [(70_001,), (3, 33_333), (5,)]  # several 32K-element blocks per tensor
    params, grads = _tensors(shapes, 6), _tensors(shapes, 7)
    kw = _kw(name, lr=0.1, wd=0.01, clip=2.0, sigma=0.3, key=_key(9), step=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            ps = _clone(params)
            result = _step(name, "cpp", ps, grads, **kw)
            results.append((ps, result))
    finally:
        torch.set_num_threads(threads)
    (a, ra), (b, rb) = results
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    assert (ra is None and rb is None) or torch.equal(ra, rb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_noise_noise_fingerprint_and_global_norm_match_reference(backend):
    params = _tensors([(100,), (3, 7)], 12)
    key = _key(4)
    expected, got = _clone(params), to_backend(backend, _clone(params))
    ref.add_noise_(expected, sigma=0.3, key=key, step=0, stream=STREAM_INIT)
    with forced(backend):
        ops.add_noise_(got, sigma=0.3, key=key, step=0, stream=STREAM_INIT)
        norm = ops.global_norm(to_backend(backend, params)).cpu()
        fp = ops.fingerprint(to_backend(backend, params), FP_KEY).cpu()
        noise = ops.gaussian_noise(1001, key=key, step=3, offset=7, stream=STREAM_INIT, device=got[0].device).cpu()
    assert noise.dtype == torch.float64
    assert torch.equal(_bits(noise), _bits(rng.gaussian_noise(1001, key=key, step=3, offset=7, stream=STREAM_INIT)))
    for a, b in zip((t.cpu() for t in got), expected):
        assert torch.equal(_bits(a), _bits(b))
    torch.testing.assert_close(norm, ref.global_norm(params), rtol=2e-6, atol=0)
    torch.testing.assert_close(fp, ref.fingerprint(params, FP_KEY), rtol=ref.FP_RTOL, atol=0)


def test_empty_param_list():
    zeros = torch.zeros(6, dtype=torch.float64)
    for name in CLIP_STEPS:
        result = getattr(ops, name)([], [], **_kw(name, lr=0.1, wd=0, clip=1, sigma=1, key=_key(0), step=0))
        assert torch.equal(result, zeros)  # status 0, norm 0, fingerprints 0
    assert ops.dpsgd_step_([], [], **_kw("dpsgd_step_", lr=0.1, wd=0, clip=1, sigma=1, key=_key(0), step=0)) is None
    assert ops.add_noise_([], sigma=1.0, key=_key(0), step=0) is None


@pytest.mark.parametrize("bad,error", [
    (dict(grads=[torch.zeros(3)]), ValueError),
    (dict(grads=[torch.zeros(3), torch.zeros(5)]), ValueError),
    (dict(grads=[torch.zeros(3), torch.zeros(4, dtype=torch.long)]), TypeError),
    (dict(params=[torch.zeros(3, dtype=torch.long), torch.zeros(4)]), TypeError),
    (dict(key=[0] * 7), TypeError),
    (dict(key=5), TypeError),
    (dict(key=[0] * 7 + [1.5]), TypeError),
    (dict(key=[0] * 7 + [-1]), ValueError),
    (dict(key=[0] * 7 + [2**32]), ValueError),
    (dict(step=2**32), ValueError),
    (dict(step=-1), ValueError),
    (dict(step=1.5), TypeError),
    (dict(fp_key=[1]), TypeError),
    (dict(fp_key=[1, 2**32]), ValueError),
    (dict(expected_fp=[1.0]), ValueError),
])
def test_validation_errors(bad, error):
    args = dict(params=[torch.zeros(3), torch.zeros(4)], grads=[torch.zeros(3), torch.zeros(4)], lr=0.1,
                max_grad_norm=1.0, weight_decay=0.0, sigma=0.1, key=[0] * 8, step=0)
    args.update(bad)
    params, grads = args.pop("params"), args.pop("grads")
    before = _clone(params)
    with pytest.raises(error):
        ops.gradient_clipping_step_(params, grads, **args)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


# ------------------------------------------------------------------------------------- opcheck
def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    grads = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    return params, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_step_ops(backend):
    params, grads = to_backend(backend, _opcheck_args())
    key = _key(1)
    fp = ref.fingerprint(_opcheck_args()[0], FP_KEY).tolist()
    with forced(backend):
        for expected_fp in ([], fp) if backend != "triton" else (fp,):  # the interpreter is slow: one of them
            torch.library.opcheck(ops.gradient_clipping_op, (params, grads),
                                  dict(lr=0.1, max_grad_norm=1.0, weight_decay=0.01, sigma=0.1, key=key, step=2,
                                       fp_key=FP_KEY, expected_fp=expected_fp))
            torch.library.opcheck(ops.model_clipping_op, (params, grads),
                                  dict(lr=0.1, max_model_norm=1.0, weight_decay=0.01, sigma=0.1, key=key, step=2,
                                       fp_key=FP_KEY, expected_fp=expected_fp))
        torch.library.opcheck(ops.dpsgd_op, (params, grads),
                              dict(lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
                                   weight_decay=0.01, key=key, step=2))
        torch.library.opcheck(ops.add_noise_op, (params,), dict(sigma=0.1, key=key, step=2, stream=1))
