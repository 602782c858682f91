"""Multi-tensor clip + noise + update ops on every live backend against the PyTorch reference, the
noise properties the certificates rely on, and the torch.library registration (opcheck)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyunlearn.ops as ops
from backends import BACKENDS, device_of, examples, forced, to_backend
from pyunlearn.ops import reference as ref
from pyunlearn.ops.rng import STREAM_INIT


needs_cpp = pytest.mark.skipif(not ops.backends()["cpp"], reason="pyunlearn._C is not built")


SHAPES = st.lists(st.sampled_from([(1,), (7,), (3, 5), (129,), (2, 3, 11), (0,), (1031,)]), min_size=1, max_size=4)


def _tensors(shapes, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _step(name: str, backend: str, params, grads, **kw):
    """The step on ``backend``'s device: params are updated in place (through device copies that are
    copied back, for a GPU backend); the norm comes back on the CPU."""
    on_device = to_backend(backend, params)
    with forced(backend):
        norm = getattr(ops, name)(on_device, to_backend(backend, grads), **kw)
    for p, d in zip(params, on_device):
        if d is not p:
            p.copy_(d)
    return None if norm is None else norm.cpu()


def _kw(name: str, *, lr: float, wd: float, clip: float, sigma: float, seed: int, step: int) -> dict:
    if name == "gradient_clipping_step_":
        return dict(lr=lr, max_grad_norm=clip, weight_decay=wd, sigma=sigma, seed=seed, step=step)
    if name == "model_clipping_step_":
        return dict(lr=lr, max_model_norm=clip, weight_decay=wd, sigma=sigma, seed=seed, step=step)
    return dict(lr=lr, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=7.0, weight_decay=wd,
                seed=seed, step=step)


STEPS = ["gradient_clipping_step_", "model_clipping_step_", "dpsgd_step_"]


# ------------------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, name):
    @examples(backend)
    @given(shapes=SHAPES, seed=st.integers(0, 2**63 - 1), step=st.integers(0, 2**32 - 1),
           lr=st.sampled_from([0.0, 0.05, 0.5]), wd=st.sampled_from([0.0, 1e-3, 0.3]),
           clip=st.sampled_from([1e-3, 1.0, 5.0, 1e30]), sigma=st.sampled_from([0.0, 0.01, 0.7]),
           data_seed=st.integers(0, 1000))
    def check(shapes, seed, step, lr, wd, clip, sigma, data_seed):
        params, grads = _tensors(shapes, data_seed), _tensors(shapes, data_seed + 1, scale=2.0)
        kw = _kw(name, lr=lr, wd=wd, clip=clip, sigma=sigma, seed=seed, step=step)
        expected = _clone(params)
        ref_norm = getattr(ref, name)(expected, grads, **kw)
        got = _clone(params)
        ids = [id(p) for p in got]
        norm = _step(name, backend, got, grads, **kw)
        assert [id(p) for p in got] == ids  # in place
        for p, e in zip(got, expected):
            assert torch.isfinite(p).all()
            # Noise agrees to float32 last places (scaled by sigma); the clip factor to one ulp.
            torch.testing.assert_close(p, e, rtol=1e-5, atol=2e-6)
        if name == "dpsgd_step_":
            assert norm is None
        else:
            assert norm.shape == () and norm.dtype == torch.float32
            torch.testing.assert_close(norm, ref_norm, rtol=2e-6, atol=1e-6)

    check()


@needs_cpp
@pytest.mark.parametrize("name", STEPS)
def test_cpp_without_noise_or_clipping_is_bit_exact(name):
    # No FMA contraction and the reference's operation order: identical whenever the clip factor is 1.
    shapes = [(33,), (4, 9), (1031,)]
    params, grads = _tensors(shapes, 1), _tensors(shapes, 2)
    kw = _kw(name, lr=0.3, wd=0.01, clip=1e30, sigma=0.0, seed=1, step=1)
    expected, got = _clone(params), _clone(params)
    getattr(ref, name)(expected, grads, **kw)
    _step(name, "cpp", got, grads, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", ["gradient_clipping_step_", "model_clipping_step_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_active_clipping_without_noise_is_bit_exact_when_the_norm_is(backend, name):
    # Values whose squares sum exactly in float32 in any order, so every backend gets the same norm; the
    # clip factor must then round exactly as the reference's (torch: reciprocal of the norm, times C).
    shapes = [(33,), (4, 9), (1031,)]
    g = torch.Generator().manual_seed(3)
    exact = [torch.tensor([0.5, -0.25, 1.0, 0.125])[torch.randint(0, 4, s, generator=g)] for s in shapes]
    for clip in (0.7, 1e-3, 0.3, 2.9):
        if name == "gradient_clipping_step_":  # the clipped quantity: the gradients
            params, grads, lr = _tensors(shapes, 1), exact, 0.3
        else:  # the model itself (lr = 0: y = x)
            params, grads, lr = exact, _tensors(shapes, 2), 0.0
        kw = _kw(name, lr=lr, wd=0.01, clip=clip, sigma=0.0, seed=1, step=1)
        expected, got = _clone(params), _clone(params)
        ref_norm = getattr(ref, name)(expected, grads, **kw)
        norm = _step(name, backend, got, grads, **kw)
        assert torch.equal(norm, ref_norm)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), clip


# ------------------------------------------------------------------------------------ noise
def _noise_of(name: str, backend: str, n: int, sigma: float, seed: int, step: int) -> torch.Tensor:
    """after - deterministic update, with x = 0, g = 0 (so the update is exactly the noise)."""
    params, grads = [torch.zeros(n)], [torch.zeros(n)]
    _step(name, backend, params, grads, **_kw(name, lr=0.1, wd=0.0, clip=1.0, sigma=sigma, seed=seed, step=step))
    return params[0]


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_noise_statistics(backend, name):
    # noise = (after the noisy step) - (after the same step with sigma = 0), on random params and grads.
    n, sigma = 60_000, 0.37
    shapes = [(n // 3,), (n - n // 3,)]
    params, grads = _tensors(shapes, 31), _tensors(shapes, 32)
    noisy, clean = _clone(params), _clone(params)
    _step(name, backend, noisy, grads, **_kw(name, lr=0.1, wd=0.01, clip=2.0, sigma=sigma, seed=123, step=9))
    _step(name, backend, clean, grads, **_kw(name, lr=0.1, wd=0.01, clip=2.0, sigma=0.0, seed=123, step=9))
    noise = (torch.cat(noisy) - torch.cat(clean)).double()
    if name == "dpsgd_step_":  # x -= lr * (std z) / ebs with std = noise_multiplier * C
        noise = noise / (-0.1 * sigma * 2.0 / 7.0) * sigma
    assert abs(noise.mean().item()) < 5 * sigma / n**0.5
    assert abs(noise.var().item() / sigma**2 - 1.0) < 5 * (2 / n) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_noise_and_different_seed_or_step_different(backend):
    name = "gradient_clipping_step_"
    a = _noise_of(name, backend, 1000, 0.5, seed=5, step=2)
    assert torch.equal(a, _noise_of(name, backend, 1000, 0.5, seed=5, step=2))
    for seed, step in [(6, 2), (5, 3), (5 + 2**32, 2)]:
        other = _noise_of(name, backend, 1000, 0.5, seed=seed, step=step)
        assert (other != a).float().mean().item() > 0.99


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_does_not_depend_on_how_params_are_split(backend, name):
    n = 1000
    whole = _noise_of(name, backend, n, 0.5, seed=77, step=4)
    parts = [torch.zeros(s) for s in (1, 3, 250, 0, 746)]
    _step(name, backend, parts, [torch.zeros_like(p) for p in parts],
          **_kw(name, lr=0.1, wd=0.0, clip=1.0, sigma=0.5, seed=77, step=4))
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_matches_reference_values(backend):
    got = _noise_of("gradient_clipping_step_", backend, 4099, 1.0, seed=2**40 + 3, step=11)
    torch.testing.assert_close(got, ref.gaussian_noise(4099, seed=2**40 + 3, step=11), rtol=4e-6, atol=1e-6)


# ------------------------------------------------------------------------------- layout, dtype, threads
@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_params_are_updated_in_place(backend, name):
    base = torch.randn(9, 14)
    view = base.t()  # non-contiguous (14, 9)
    other = torch.randn(5)
    grads = [torch.randn(14, 9).t().contiguous().t(), torch.randn(5)]  # a non-contiguous gradient too
    kw = _kw(name, lr=0.2, wd=0.01, clip=0.5, sigma=0.1, seed=3, step=1)
    expected = [view.clone(), other.clone()]
    getattr(ref, name)(expected, grads, **kw)
    _step(name, backend, [view, other], grads, **kw)
    torch.testing.assert_close(base.t(), expected[0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(other, expected[1], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_float64_params_use_the_reference_exactly(backend, name):
    shapes = [(17,), (3, 4)]
    params = [t.double() for t in _tensors(shapes, 4)]
    grads = [t.double() for t in _tensors(shapes, 5)]
    kw = _kw(name, lr=0.1, wd=0.01, clip=0.5, sigma=0.2, seed=8, step=2)
    expected, got = _clone(params), _clone(params)
    getattr(ref, name)(expected, grads, **kw)
    _step(name, backend, got, grads, **kw)
    if device_of(backend).type == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    else:  # the reference on the GPU: its noise differs from the CPU's in the last place of log/sin/cos
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_float64_dpsgd_step_computes_in_float64():
    g = torch.Generator().manual_seed(6)
    x, grad = torch.randn(101, dtype=torch.float64, generator=g), torch.randn(101, dtype=torch.float64, generator=g)
    got = [x.clone()]
    ops.dpsgd_step_(got, [grad], lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=7.0,
                    weight_decay=0.01, seed=0, step=0)
    assert torch.equal(got[0], x - 0.1 * (grad / 7.0 + 0.01 * x))


@needs_cpp
@pytest.mark.parametrize("name", STEPS)
def test_cpp_is_bit_identical_across_thread_counts(name):
    shapes = [(70_001,), (3, 33_333), (5,)]  # several 32K-element blocks per tensor
    params, grads = _tensors(shapes, 6), _tensors(shapes, 7)
    kw = _kw(name, lr=0.1, wd=0.01, clip=2.0, sigma=0.3, seed=9, step=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            ps = _clone(params)
            norm = _step(name, "cpp", ps, grads, **kw)
            results.append((ps, norm))
    finally:
        torch.set_num_threads(threads)
    (a, na), (b, nb) = results
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert (na is None and nb is None) or torch.equal(na, nb)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_add_noise_and_global_norm_match_reference(backend):
    params = _tensors([(100,), (3, 7)], 12)
    expected, got = _clone(params), to_backend(backend, _clone(params))
    ref.add_noise_(expected, sigma=0.3, seed=4, step=0, stream=STREAM_INIT)
    with forced(backend):
        ops.add_noise_(got, sigma=0.3, seed=4, step=0, stream=STREAM_INIT)
        norm = ops.global_norm(to_backend(backend, params)).cpu()
        noise = ops.gaussian_noise(1001, seed=4, step=3, offset=7, stream=STREAM_INIT,
                                   device=got[0].device).cpu()
    torch.testing.assert_close(noise, ref.gaussian_noise(1001, seed=4, step=3, offset=7, stream=STREAM_INIT),
                               rtol=4e-6, atol=1e-6)
    for a, b in zip((t.cpu() for t in got), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm, ref.global_norm(params), rtol=2e-6, atol=0)


def test_empty_param_list():
    assert ops.gradient_clipping_step_([], [], **_kw("gradient_clipping_step_", lr=0.1, wd=0, clip=1, sigma=1,
                                                     seed=0, step=0)).item() == 0.0
    assert ops.model_clipping_step_([], [], **_kw("model_clipping_step_", lr=0.1, wd=0, clip=1, sigma=1,
                                                  seed=0, step=0)).item() == 0.0
    assert ops.dpsgd_step_([], [], **_kw("dpsgd_step_", lr=0.1, wd=0, clip=1, sigma=1, seed=0, step=0)) is None


@pytest.mark.parametrize("bad,error", [
    (dict(grads=[torch.zeros(3)]), ValueError),
    (dict(grads=[torch.zeros(3), torch.zeros(5)]), ValueError),
    (dict(grads=[torch.zeros(3), torch.zeros(4, dtype=torch.long)]), TypeError),
    (dict(params=[torch.zeros(3, dtype=torch.long), torch.zeros(4)]), TypeError),
    (dict(seed=-1), ValueError),
    (dict(seed=2**63), ValueError),
    (dict(step=2**32), ValueError),
    (dict(seed=1.5), TypeError),
])
def test_validation_errors(bad, error):
    args = dict(params=[torch.zeros(3), torch.zeros(4)], grads=[torch.zeros(3), torch.zeros(4)], lr=0.1,
                max_grad_norm=1.0, weight_decay=0.0, sigma=0.1, seed=0, step=0)
    args.update(bad)
    params, grads = args.pop("params"), args.pop("grads")
    with pytest.raises(error):
        ops.gradient_clipping_step_(params, grads, **args)


# ------------------------------------------------------------------------------------- opcheck
def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    grads = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    return params, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_step_ops(backend):
    params, grads = to_backend(backend, _opcheck_args())
    with forced(backend):
        torch.library.opcheck(ops.gradient_clipping_op, (params, grads),
                              dict(lr=0.1, max_grad_norm=1.0, weight_decay=0.01, sigma=0.1, seed=1, step=2))
        torch.library.opcheck(ops.model_clipping_op, (params, grads),
                              dict(lr=0.1, max_model_norm=1.0, weight_decay=0.01, sigma=0.1, seed=1, step=2))
        torch.library.opcheck(ops.dpsgd_op, (params, grads),
                              dict(lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
                                   weight_decay=0.01, seed=1, step=2))
        torch.library.opcheck(ops.add_noise_op, (params,), dict(sigma=0.1, seed=1, step=2, stream=1))
