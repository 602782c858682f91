"""Triton-specific tests of ``pyunlearn._triton``: launch configurations, block boundaries, strided
inputs, unwritten outputs, multi-tensor tables and in-kernel noise, all against the reference.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (slow interpreter: sizes are small and blocks
are shrunk through the private launchers so that small tensors still cross block boundaries).
"""
from __future__ import annotations

import math

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton backend is not tested")

import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyunlearn._triton as ptriton  # noqa: E402
from pyunlearn.ops import reference as ref  # noqa: E402
from pyunlearn.ops.rng import gaussian_noise  # noqa: E402

_REASON = ptriton.unavailable_reason()
if _REASON is not None:
    pytest.skip(f"Triton kernels cannot run here: {_REASON}", allow_module_level=True)

from pyunlearn._triton import clip_noise_step as cns  # noqa: E402
from pyunlearn._triton import masked_cross_entropy as mce  # noqa: E402

DEVICE = torch.device("cpu" if ptriton.interpreting() else "cuda")
NAN = float("nan")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Masked cross-entropy
# --------------------------------------------------------------------------------------------------
def _logits(B: int, K: int, N: int, layout: str, scale: float, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(B, K, N) logits with the requested memory layout (values drawn on CPU, then moved)."""
    if layout == "contiguous":
        x = torch.randn(B, K, N, generator=g)
    elif layout == "transposed":  # pixels-last storage: stride along N is K
        x = torch.randn(B, N, K, generator=g).transpose(1, 2)
    else:  # "sliced": every other class, every other pixel, nonzero storage offset
        x = torch.randn(B, 2 * K, 2 * N + 3, generator=g)[:, ::2, 3::2]
    x = (x * scale).to(dtype)
    return x.to(DEVICE)


@st.composite
def ce_cases(draw: st.DrawFn) -> dict:
    K = draw(st.sampled_from([1, 2, 3, 5]))
    return dict(
        B=draw(st.integers(1, 3)),
        K=K,
        N=draw(st.integers(1, 37)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        scale=draw(st.sampled_from([1.0, 5.0, 40.0])),
        mask_kind=draw(st.sampled_from(["random", "random", "empty", "full"])),
        weighted=draw(st.booleans()),
        target_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])),
        block_n=draw(st.sampled_from([None, 8, 16])),
        block_k=draw(st.sampled_from([None, 2])) if K > 2 else None,
        grad_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _ce_inputs(case: dict, dtype: torch.dtype = torch.float32):
    g = _gen(case["seed"])
    B, K, N = case["B"], case["K"], case["N"]
    logits = _logits(B, K, N, case["layout"], case["scale"], dtype, g)
    target = torch.randint(0, max(K, 2), (B, N), generator=g).to(case["target_dtype"]).to(DEVICE)
    if case["mask_kind"] == "empty":
        mask = torch.zeros(B, N, dtype=torch.bool)
    elif case["mask_kind"] == "full":
        mask = torch.ones(B, N, dtype=torch.bool)
    else:
        mask = torch.rand(B, N, generator=g) < 0.5
        mask[0, 0] = False  # at least one hole, and (below) a fully empty sample when B > 1
        if B > 1:
            mask[-1] = False
    weight = (torch.randn(B, generator=g) * 2).to(DEVICE) if case["weighted"] else None  # negatives too
    return logits, target, mask.to(DEVICE), weight


def _poisoned_grad(like: torch.Tensor, layout: str) -> torch.Tensor:
    B, K, N = like.shape
    if layout == "transposed":
        return torch.full((B, N, K), NAN, dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.full((B, K, N), NAN, dtype=like.dtype, device=like.device)


@given(case=ce_cases())
def test_masked_cross_entropy_matches_reference(case: dict) -> None:
    logits, target, mask, weight = _ce_inputs(case)
    grad_out = _poisoned_grad(logits, case["grad_layout"])
    loss, grad = mce._masked_cross_entropy_fwd_bwd(
        logits, target, mask, weight, block_n=case["block_n"], block_k=case["block_k"], grad_out=grad_out)
    loss_ref, grad_ref = ref.masked_cross_entropy_fwd_bwd(logits, target, mask, weight)
    assert grad is grad_out
    assert not torch.isnan(grad).any(), "some gradient elements were never written"
    assert loss.dtype == torch.float32 and loss.shape == (case["B"],)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=2e-5, atol=2e-7)
    empty = ~mask.any(dim=1)
    assert torch.all(loss[empty] == 0) and torch.all(grad[empty] == 0)
    assert torch.all(grad.transpose(1, 2)[~mask] == 0), "unmasked pixels must get a zero gradient"


@pytest.mark.parametrize("K", [1, 2, 5])
def test_masked_cross_entropy_public_launcher_default_config(K: int) -> None:
    """Public signature, default launch configuration, B=1 and an odd N spanning several blocks."""
    g = _gen(K)
    N = 1031 if ptriton.interpreting() else 100_003
    logits = (torch.randn(1, K, N, generator=g) * 3).to(DEVICE)
    target = torch.randint(0, max(K, 2), (1, N), generator=g).to(DEVICE)
    mask = (torch.rand(1, N, generator=g) < 0.7).to(DEVICE)
    loss, grad = ptriton.masked_cross_entropy_fwd_bwd(logits, target, mask, None)
    loss_ref, grad_ref = ref.masked_cross_entropy_fwd_bwd(logits, target, mask)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-8)


def test_masked_cross_entropy_many_classes_chunked_default() -> None:
    """K above the single-tile limit takes the online-softmax path with the default chunk."""
    K = mce._MAX_SINGLE_TILE_K + 7
    g = _gen(3)
    logits = (torch.randn(2, 9, K, generator=g) * 4).transpose(1, 2).to(DEVICE)  # strided, read in place
    target = torch.randint(0, K, (2, 9), generator=g).to(DEVICE)
    target[0, :3] = K - 1  # targets in the last, partial chunk
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    weight = torch.tensor([0.5, -1.5], device=DEVICE)
    grad_out = _poisoned_grad(logits, "contiguous")
    loss, grad = mce._masked_cross_entropy_fwd_bwd(logits, target, mask, weight, grad_out=grad_out)
    loss_ref, grad_ref = ref.masked_cross_entropy_fwd_bwd(logits, target, mask, weight)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    _, grad_fresh = ptriton.masked_cross_entropy_fwd_bwd(logits, target, mask, weight)
    assert grad_fresh.is_contiguous() and torch.equal(grad_fresh, grad)


@pytest.mark.parametrize("K", [1, 3])
def test_masked_cross_entropy_float64(K: int) -> None:
    g = _gen(11)
    logits = (torch.randn(2, K, 13, generator=g, dtype=torch.float64) * 6).to(DEVICE)
    target = torch.randint(0, max(K, 2), (2, 13), generator=g).to(DEVICE)
    mask = (torch.rand(2, 13, generator=g) < 0.6).to(DEVICE)
    weight = torch.tensor([1.25, -0.5], dtype=torch.float64, device=DEVICE)
    loss, grad = mce._masked_cross_entropy_fwd_bwd(logits, target, mask, weight, block_n=8)
    loss_ref, grad_ref = ref.masked_cross_entropy_fwd_bwd(logits, target, mask, weight)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 4])
def test_masked_cross_entropy_half_logits(dtype: torch.dtype, K: int) -> None:
    g = _gen(5)
    logits = (torch.randn(2, K, 19, generator=g) * 3).to(dtype).to(DEVICE)
    target = torch.randint(0, max(K, 2), (2, 19), generator=g).to(DEVICE)
    mask = (torch.rand(2, 19, generator=g) < 0.6).to(DEVICE)
    loss, grad = mce._masked_cross_entropy_fwd_bwd(logits, target, mask, None, block_n=8)
    loss_ref, grad_ref = ref.masked_cross_entropy_fwd_bwd(logits, target, mask)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)  # float32 accumulation of the same inputs
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=1e-2, atol=1e-4)


def test_masked_cross_entropy_deterministic_and_block_invariant() -> None:
    g = _gen(21)
    logits = torch.randn(3, 5, 45, generator=g).to(DEVICE)
    target = torch.randint(0, 5, (3, 45), generator=g).to(DEVICE)
    mask = (torch.rand(3, 45, generator=g) < 0.5).to(DEVICE)
    weight = torch.randn(3, generator=g).to(DEVICE)
    first = mce._masked_cross_entropy_fwd_bwd(logits, target, mask, weight, block_n=8)
    second = mce._masked_cross_entropy_fwd_bwd(logits, target, mask, weight, block_n=8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    other = mce._masked_cross_entropy_fwd_bwd(logits, target, mask, weight, block_n=64, block_k=2)
    torch.testing.assert_close(other[0], first[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(other[1], first[1], rtol=1e-6, atol=1e-8)


def test_masked_cross_entropy_degenerate_shapes() -> None:
    logits = torch.randn(0, 3, 5, device=DEVICE)
    loss, grad = ptriton.masked_cross_entropy_fwd_bwd(
        logits, torch.zeros(0, 5, dtype=torch.long, device=DEVICE), torch.zeros(0, 5, dtype=torch.bool, device=DEVICE))
    assert loss.shape == (0,) and grad.shape == (0, 3, 5)
    logits = torch.randn(2, 3, 0, device=DEVICE)
    loss, grad = ptriton.masked_cross_entropy_fwd_bwd(
        logits, torch.zeros(2, 0, dtype=torch.long, device=DEVICE), torch.zeros(2, 0, dtype=torch.bool, device=DEVICE))
    assert torch.equal(loss, torch.zeros(2, device=DEVICE)) and grad.shape == (2, 3, 0)


def test_masked_cross_entropy_triton_op_autograd() -> None:
    g = _gen(13)
    logits = _logits(2, 3, 17, "contiguous", 2.0, torch.float32, g).requires_grad_(True)
    target = torch.randint(0, 3, (2, 17), generator=g).to(DEVICE)
    mask = (torch.rand(2, 17, generator=g) < 0.7).to(DEVICE)
    loss, grad = mce.masked_cross_entropy_op(logits, target, mask, None)
    v = torch.tensor([0.5, -2.0], device=DEVICE)
    (got,) = torch.autograd.grad(loss, logits, v)
    torch.testing.assert_close(got, v[:, None, None] * grad.detach(), rtol=0, atol=0)


@pytest.mark.skipif(ptriton.interpreting(), reason="interpreted kernels cannot run on fake tensors")
def test_masked_cross_entropy_triton_op_opcheck() -> None:
    g = _gen(12)
    for K, weighted in ((3, True), (1, False)):
        logits = _logits(2, K, 29, "contiguous", 2.0, torch.float32, g)
        target = torch.randint(0, max(K, 2), (2, 29), generator=g).to(DEVICE)
        mask = (torch.rand(2, 29, generator=g) < 0.5).to(DEVICE)
        weight = torch.randn(2, generator=g).to(DEVICE) if weighted else None
        torch.library.opcheck(mce.masked_cross_entropy_op, (logits, target, mask, weight))
        torch.library.opcheck(mce.masked_cross_entropy_op,
                              (logits.clone().requires_grad_(True), target, mask, weight))


def test_masked_cross_entropy_rejects_bad_inputs() -> None:
    logits = torch.randn(2, 3, 4, device=DEVICE)
    target = torch.zeros(2, 4, dtype=torch.long, device=DEVICE)
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    f = ptriton.masked_cross_entropy_fwd_bwd
    with pytest.raises(ValueError, match="logits must have shape"):
        f(logits[0], target, mask)
    with pytest.raises(ValueError, match="target must have shape"):
        f(logits, target[:, :3], mask)
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        f(logits, target, mask.to(torch.uint8))
    with pytest.raises(ValueError, match="weight must have shape"):
        f(logits, target, mask, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        mce._masked_cross_entropy_fwd_bwd(logits, target, mask, block_n=12)


# --------------------------------------------------------------------------------------------------
# Clip + noise + update
# --------------------------------------------------------------------------------------------------
@st.composite
def param_lists(draw: st.DrawFn) -> dict:
    """Shapes with odd sizes (offsets not multiples of 4), maybe an empty tensor, and usually one
    tensor that crosses a block boundary."""
    block = draw(st.sampled_from([16, 32]))
    shapes = draw(st.lists(
        st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=6))
    if draw(st.booleans()):
        shapes.insert(draw(st.integers(0, len(shapes))), (0,))
    if draw(st.integers(0, 3)):
        shapes.insert(draw(st.integers(0, len(shapes))), (block + draw(st.integers(1, block - 1)),))
    return dict(shapes=shapes, block=block, seed=draw(st.integers(0, 2**16)))


def _tensors(shapes, seed: int, grad_dtype: torch.dtype = torch.float32, scale: float = 1.0):
    g = _gen(seed)
    params = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    grads = [(torch.randn(s, generator=g) * scale).to(grad_dtype).to(DEVICE) for s in shapes]
    return params, grads


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_lists_close(actual, expected, **tol) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


_TIGHT = dict(rtol=2e-6, atol=1e-7)  # norms differ only by summation order
_NOISY = dict(rtol=2e-6, atol=2e-6)  # plus last-place differences of log/cos/sin (sigma <= 1)
_SEEDS = st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32, 2**63 - 1))


@given(lists=param_lists(), sigma=st.sampled_from([0.0, 0.0, 0.3, 1.0]), clip=st.sampled_from([0.3, 1e6]),
       seed=_SEEDS, step=st.integers(0, 2**32 - 1))
def test_gradient_clipping_matches_reference(lists: dict, sigma: float, clip: float, seed: int, step: int) -> None:
    params, grads = _tensors(lists["shapes"], lists["seed"])
    expected = _clone(params)
    hyper = dict(lr=0.1, max_grad_norm=clip, weight_decay=0.01, sigma=sigma, seed=seed, step=step)
    norm = cns._gradient_clipping_step(params, grads, block=lists["block"], **hyper)
    norm_ref = ref.gradient_clipping_step_(expected, _clone(grads), **hyper)
    assert norm.dtype == torch.float32 and norm.shape == () and norm.device == DEVICE
    torch.testing.assert_close(norm, norm_ref, **_TIGHT)
    _assert_lists_close(params, expected, **(_TIGHT if sigma == 0.0 else _NOISY))


@given(lists=param_lists(), sigma=st.sampled_from([0.0, 0.0, 0.3, 1.0]), clip=st.sampled_from([0.5, 1e6]),
       seed=_SEEDS, step=st.integers(0, 2**32 - 1))
def test_model_clipping_matches_reference(lists: dict, sigma: float, clip: float, seed: int, step: int) -> None:
    params, grads = _tensors(lists["shapes"], lists["seed"])
    expected = _clone(params)
    hyper = dict(lr=0.1, max_model_norm=clip, weight_decay=0.01, sigma=sigma, seed=seed, step=step)
    norm = cns._model_clipping_step(params, grads, block=lists["block"], **hyper)
    norm_ref = ref.model_clipping_step_(expected, _clone(grads), **hyper)
    torch.testing.assert_close(norm, norm_ref, **_TIGHT)
    _assert_lists_close(params, expected, **(_TIGHT if sigma == 0.0 else _NOISY))


@given(lists=param_lists(), noise_multiplier=st.sampled_from([0.0, 0.0, 0.5, -1.0]), seed=_SEEDS,
       step=st.integers(0, 2**32 - 1))
def test_dpsgd_matches_reference(lists: dict, noise_multiplier: float, seed: int, step: int) -> None:
    params, grads = _tensors(lists["shapes"], lists["seed"], scale=3.0)
    expected = _clone(params)
    hyper = dict(lr=0.1, noise_multiplier=noise_multiplier, max_grad_norm=1.5, expected_batch_size=7.0,
                 weight_decay=0.01, seed=seed, step=step)
    assert cns._dpsgd_step(params, grads, block=lists["block"], **hyper) is None
    ref.dpsgd_step_(expected, _clone(grads), **hyper)
    _assert_lists_close(params, expected, **(_TIGHT if noise_multiplier <= 0.0 else _NOISY))


_ODD_SHAPES = [(3,), (5,), (1,), (0,), (2, 7), (37,)]  # offsets 0, 3, 8, 9, 9, 23


@pytest.mark.parametrize("op", ["gradient", "model", "dpsgd"])
def test_noise_is_the_reference_noise_of_the_concatenation(op: str) -> None:
    """Zero params and gradients, unit noise: params become the reference noise at the tensors'
    offsets in the concatenation (offsets not multiples of 4, blocks of 16 elements)."""
    seed, step = 2**40 + 123, 77
    params = [torch.zeros(s, device=DEVICE) for s in _ODD_SHAPES]
    grads = [torch.zeros(s, device=DEVICE) for s in _ODD_SHAPES]
    if op == "gradient":
        cns._gradient_clipping_step(params, grads, lr=0.1, max_grad_norm=1.0, weight_decay=0.0, sigma=1.0,
                                    seed=seed, step=step, block=16)
    elif op == "model":
        cns._model_clipping_step(params, grads, lr=0.1, max_model_norm=1.0, weight_decay=0.0, sigma=1.0,
                                 seed=seed, step=step, block=16)
    else:  # p - lr * (noise * C * z / E[B]) with lr = -1, C = z = E[B] = 1
        cns._dpsgd_step(params, grads, lr=-1.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                        weight_decay=0.0, seed=seed, step=step, block=16)
    total = sum(math.prod(s) for s in _ODD_SHAPES)
    noise = gaussian_noise(total, seed=seed, step=step, device=DEVICE)
    torch.testing.assert_close(torch.cat([p.flatten() for p in params]), noise, rtol=2e-6, atol=2e-6)


def test_noise_depends_on_seed_and_step_only() -> None:
    def run(seed: int, step: int, block: int) -> torch.Tensor:
        params, grads = _tensors(_ODD_SHAPES, 0)
        cns._gradient_clipping_step(params, grads, lr=0.1, max_grad_norm=1.0, weight_decay=0.01, sigma=0.5,
                                    seed=seed, step=step, block=block)
        return torch.cat([p.flatten() for p in params])

    base = run(9, 4, 16)
    assert torch.equal(base, run(9, 4, 16)), "same (seed, step) must give bit-identical parameters"
    assert torch.equal(base, run(9, 4, 64)), "noise must not depend on the block size"
    assert not torch.allclose(base, run(10, 4, 16))
    assert not torch.allclose(base, run(9, 5, 16))
    assert not torch.allclose(base, run(9 + 2**32, 4, 16)), "the high word of the seed must matter"


class _CountingKernel:
    """Wraps a Triton kernel and counts its launches."""

    def __init__(self, kernel, counter: list) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("op, launches", [("gradient", 3), ("model", 3), ("dpsgd", 1)])
def test_many_tiny_tensors_fixed_launch_count(monkeypatch: pytest.MonkeyPatch, op: str, launches: int) -> None:
    """40 tiny tensors and one crossing two block boundaries: a fixed number of launches, correct results."""
    block = 16
    shapes = [((i % 3) + 1,) for i in range(40)] + [(2 * block + 3,)]
    counter: list = []
    for name in ("_grad_sumsq_kernel", "_sqrt_sum_kernel", "_gradient_clipping_update_kernel",
                 "_model_clipping_descent_kernel", "_model_clipping_project_kernel", "_dpsgd_kernel"):
        monkeypatch.setattr(cns, name, _CountingKernel(getattr(cns, name), counter))
    params, grads = _tensors(shapes, 1)
    expected = _clone(params)
    if op == "gradient":
        hyper = dict(lr=0.2, max_grad_norm=1.0, weight_decay=0.1, sigma=0.5, seed=3, step=2)
        cns._gradient_clipping_step(params, grads, block=block, **hyper)
        ref.gradient_clipping_step_(expected, grads, **hyper)
    elif op == "model":
        hyper = dict(lr=0.2, max_model_norm=1.0, weight_decay=0.1, sigma=0.5, seed=3, step=2)
        cns._model_clipping_step(params, grads, block=block, **hyper)
        ref.model_clipping_step_(expected, grads, **hyper)
    else:
        hyper = dict(lr=0.2, noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=4.0, weight_decay=0.1,
                     seed=3, step=2)
        cns._dpsgd_step(params, grads, block=block, **hyper)
        ref.dpsgd_step_(expected, grads, **hyper)
    assert len(counter) == launches
    _assert_lists_close(params, expected, **_NOISY)


def test_repeated_steps_reuse_the_block_table() -> None:
    """Two steps on the same tensors (the second hits the cached table) equal two reference steps."""
    cns._clear_table_cache()
    params, grads = _tensors(_ODD_SHAPES, 4)
    expected = _clone(params)
    for step in (0, 1):
        hyper = dict(lr=0.1, max_grad_norm=0.5, weight_decay=0.01, sigma=0.2, seed=8, step=step)
        cns._gradient_clipping_step(params, grads, block=16, **hyper)
        ref.gradient_clipping_step_(expected, grads, **hyper)
    assert len(cns._table_cache) == 1
    _assert_lists_close(params, expected, **_NOISY)


@pytest.mark.parametrize("grad_dtypes", [(torch.float16,) * 3, (torch.bfloat16,) * 3,
                                         (torch.float32, torch.float16, torch.bfloat16)])
def test_half_precision_gradients(grad_dtypes) -> None:
    shapes = [(5, 3), (17,), (2,)]
    g = _gen(6)
    params = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dt).to(DEVICE) for s, dt in zip(shapes, grad_dtypes)]
    expected = _clone(params)
    hyper = dict(lr=0.1, max_grad_norm=0.7, weight_decay=0.01, sigma=0.0, seed=0, step=0)
    norm = cns._gradient_clipping_step(params, grads, block=16, **hyper)
    norm_ref = ref.gradient_clipping_step_(expected, grads, **hyper)
    torch.testing.assert_close(norm, norm_ref, **_TIGHT)
    _assert_lists_close(params, expected, **_TIGHT)
    assert all(gr.dtype == dt for gr, dt in zip(grads, grad_dtypes)), "gradients must not be modified"


def test_non_contiguous_params_and_grads() -> None:
    g = _gen(7)
    base = torch.randn(7, 5, generator=g).to(DEVICE)
    params = [base.t(), torch.randn(9, generator=g).to(DEVICE)]  # (5, 7) transposed view
    grads = [torch.randn(5, 14, generator=g).to(DEVICE)[:, ::2], torch.randn(9, generator=g).to(DEVICE)]
    expected = _clone(params)
    hyper = dict(lr=0.3, max_model_norm=2.0, weight_decay=0.05, sigma=0.7, seed=5, step=9)
    norm = cns._model_clipping_step(params, grads, block=16, **hyper)
    norm_ref = ref.model_clipping_step_(expected, grads, **hyper)
    torch.testing.assert_close(norm, norm_ref, **_TIGHT)
    _assert_lists_close(params, expected, **_NOISY)
    torch.testing.assert_close(base.t(), params[0], rtol=0, atol=0)  # updated in place through the view


def test_public_step_launchers_default_block() -> None:
    shapes = [(3, 3, 3, 3), (1500,), (5,)]
    params, grads = _tensors(shapes, 8)
    expected = _clone(params)
    hyper = dict(lr=0.1, max_grad_norm=1.0, weight_decay=0.01, sigma=0.1, seed=1, step=1)
    norm = ptriton.gradient_clipping_step_(params, grads, **hyper)
    norm_ref = ref.gradient_clipping_step_(expected, grads, **hyper)
    torch.testing.assert_close(norm, norm_ref, **_TIGHT)
    _assert_lists_close(params, expected, **_NOISY)


def test_empty_parameter_lists() -> None:
    norm = ptriton.gradient_clipping_step_([], [], lr=0.1, max_grad_norm=1.0, weight_decay=0.0, sigma=1.0,
                                           seed=0, step=0)
    assert float(norm) == 0.0
    params = [torch.zeros(0, device=DEVICE)]
    norm = ptriton.model_clipping_step_(params, [torch.zeros(0, device=DEVICE)], lr=0.1, max_model_norm=1.0,
                                        weight_decay=0.0, sigma=1.0, seed=0, step=0)
    assert float(norm) == 0.0 and params[0].shape == (0,)


def test_step_launchers_reject_bad_inputs() -> None:
    p = [torch.zeros(3, device=DEVICE)]
    hyper = dict(lr=0.1, max_grad_norm=1.0, weight_decay=0.0, sigma=0.0, seed=0, step=0)
    with pytest.raises(TypeError, match=r"params\[0\] is torch.float16"):
        ptriton.gradient_clipping_step_([p[0].half()], p, **hyper)
    with pytest.raises(TypeError, match=r"grads\[0\] must be float32, float16 or bfloat16"):
        ptriton.gradient_clipping_step_(p, [p[0].double()], **hyper)
    with pytest.raises(ValueError, match="same length"):
        ptriton.gradient_clipping_step_(p, p + p, **hyper)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        ptriton.gradient_clipping_step_(p, [torch.zeros(4, device=DEVICE)], **hyper)
    with pytest.raises(ValueError, match="seed must be in"):
        ptriton.gradient_clipping_step_(p, p, **{**hyper, "sigma": 1.0, "seed": -1})
    with pytest.raises(ValueError, match="block must be a power of two"):
        cns._dpsgd_step(p, p, lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0,
                        weight_decay=0.0, seed=0, step=0, block=24)
