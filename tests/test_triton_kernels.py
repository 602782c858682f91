"""Triton-specific tests of ``pyunlearn._triton``: launch configurations, block boundaries, strided
inputs, unwritten outputs, multi-tensor tables and in-kernel noise, all against the reference.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (slow interpreter: sizes are small and blocks
are shrunk through the private launchers so that small tensors still cross block boundaries). The
noise, fingerprint and step launchers are checked bit for bit against the reference; their PTX for
Hopper is checked for the rounding contract (no FMA, IEEE float64 sqrt and division) without a GPU.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton backend is not tested")

import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyunlearn._triton as ptriton  # noqa: E402
from pyunlearn.ops import reference as ref  # noqa: E402
from pyunlearn.ops import rng  # noqa: E402

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
# Noise, fingerprint, clip + noise + update: bit-identical to the reference
# --------------------------------------------------------------------------------------------------
# The interpreter spends ~0.3 s per program drawing noise (one ChaCha20 block per 4 elements, ~3000
# interpreted ops): sizes and examples are small, blocks shrunk only where a test crosses boundaries.
_FEW = settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate], deadline=None)
_KEY = rng.key_from_seed(7, "triton-tests")
_FP_KEY = [0x9E3779B9, 12345]
_KEYS = st.lists(st.integers(0, 2**32 - 1), min_size=8, max_size=8)
_FP_KEYS = st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2)


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_lists_close(actual, expected, **tol) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


def _fp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Fingerprints of the same values agree up to the reduction order (reference.FP_RTOL)."""
    assert ref.fingerprint_matches(actual.tolist(), expected.tolist()), (actual.tolist(), expected.tolist())


def _assert_result(res: torch.Tensor, res_ref: torch.Tensor, exact_norm: bool, new_params=None,
                   fp_key=_FP_KEY) -> None:
    """Result against the reference's; ``new_params``: the launcher's parameters when they may differ
    from the reference's in the last place (the new fingerprint is then checked against theirs)."""
    assert res.dtype == torch.float64 and res.shape == (6,) and res.device == DEVICE
    assert res[0].item() == res_ref[0].item(), "status"
    if exact_norm:
        assert res[1].item() == res_ref[1].item(), "norm"
    else:
        torch.testing.assert_close(res[1], res_ref[1], rtol=2e-6, atol=1e-7)
    _fp_close(res[2:4], res_ref[2:4])
    _fp_close(res[4:6], res_ref[4:6] if new_params is None else ref.fingerprint(new_params, fp_key))


def _assert_lists_equal(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and torch.equal(a, e), (a, e)


@pytest.mark.parametrize("numel, offset, step, stream, block", [
    (1, 0, 0, 0, 16),
    (7, 3, 5, rng.STREAM_INIT, 16),
    (1031, 6, 2**32 - 1, 7, 1024),  # several programs, offset not a multiple of 4
    (9, 2**34 + 1, 9, 0, 16),  # block index above 2^32: nonce word (b >> 32)
])
def test_gaussian_noise_is_the_reference_bit_for_bit(numel, offset, step, stream, block) -> None:
    got = cns._gaussian_noise(numel, key=_KEY, step=step, offset=offset, stream=stream, device=DEVICE, block=block)
    want = rng.gaussian_noise(numel, key=_KEY, step=step, offset=offset, stream=stream)
    assert got.dtype == torch.float64 and got.device == DEVICE
    assert torch.equal(got.cpu(), want)


def test_gaussian_noise_public_launcher_and_empty() -> None:
    key = list(range(1, 9))
    got = ptriton.gaussian_noise(13, key=key, step=2, offset=1, stream=0, device=DEVICE)
    assert torch.equal(got.cpu(), rng.gaussian_noise(13, key=key, step=2, offset=1))
    assert ptriton.gaussian_noise(0, key=key, step=0, device=DEVICE).shape == (0,)


@st.composite
def step_cases(draw: st.DrawFn) -> dict:
    """Shapes with odd sizes (offsets not multiples of 4), maybe an empty tensor, usually one tensor that
    crosses a block boundary; values either dyadic (every sum of squares exact in float32, so the norm
    and hence the clip factor is the reference's bit for bit, clipping or not) or random."""
    block = draw(st.sampled_from([16, 32]))
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple), min_size=1, max_size=4))
    if draw(st.booleans()):
        shapes.insert(draw(st.integers(0, len(shapes))), (0,))
    if draw(st.integers(0, 2)):
        shapes.insert(draw(st.integers(0, len(shapes))), (block + draw(st.integers(1, block - 1)),))
    return dict(shapes=shapes, block=block, seed=draw(st.integers(0, 2**16)), dyadic=draw(st.booleans()),
                key=draw(_KEYS), fp_key=draw(_FP_KEYS), step=draw(st.integers(0, 2**32 - 1)))


def _step_tensors(shapes, seed: int, dyadic: bool, grad_scale: float = 1.0, grad_dtype=torch.float32):
    """(params, grads) on DEVICE. Dyadic: multiples of 1/4 in [-2, 2] (params) and [-3, 3] * grad_scale."""
    g = _gen(seed)
    if dyadic:
        params = [(torch.randint(-8, 9, s, generator=g) * 0.25).float() for s in shapes]
        grads = [(torch.randint(-12, 13, s, generator=g) * 0.25 * grad_scale).float() for s in shapes]
    else:
        params = [torch.randn(s, generator=g) for s in shapes]
        grads = [torch.randn(s, generator=g) * grad_scale for s in shapes]
    return [p.to(DEVICE) for p in params], [gr.to(grad_dtype).to(DEVICE) for gr in grads]


@_FEW
@given(case=step_cases(), sigma=st.sampled_from([0.0, 0.7]), clip=st.sampled_from([0.5, 1e6]))
def test_gradient_clipping_is_the_reference_bit_for_bit(case: dict, sigma: float, clip: float) -> None:
    params, grads = _step_tensors(case["shapes"], case["seed"], case["dyadic"])
    expected = _clone(params)
    hyper = dict(lr=0.1, max_grad_norm=clip, weight_decay=0.01, sigma=sigma, key=case["key"], step=case["step"],
                 fp_key=case["fp_key"])
    res = cns._gradient_clipping_step(params, grads, block=case["block"], **hyper)
    res_ref = ref.gradient_clipping_step_(expected, _clone(grads), **hyper)
    exact = case["dyadic"] or clip == 1e6  # the same clip factor (1 when the norm is below the bound)
    _assert_result(res, res_ref, exact_norm=case["dyadic"], new_params=None if exact else params,
                   fp_key=case["fp_key"])
    if exact:
        _assert_lists_equal(params, expected)
    else:
        _assert_lists_close(params, expected, rtol=2e-6, atol=1e-6)
    # The new fingerprint is the one the same launcher finds on the new parameters.
    assert torch.equal(res[4:6], cns._fingerprint(params, case["fp_key"], block=case["block"]))


@_FEW
@given(case=step_cases(), sigma=st.sampled_from([0.0, 0.7]), clip=st.sampled_from([0.5, 1e6]))
def test_model_clipping_is_the_reference_bit_for_bit(case: dict, sigma: float, clip: float) -> None:
    params, grads = _step_tensors(case["shapes"], case["seed"], case["dyadic"])
    expected = _clone(params)
    # lr = 1/2 and no weight decay keep y = x - lr g dyadic for dyadic x and g.
    hyper = dict(lr=0.5, max_model_norm=clip, weight_decay=0.0 if case["dyadic"] else 0.01, sigma=sigma,
                 key=case["key"], step=case["step"], fp_key=case["fp_key"])
    res = cns._model_clipping_step(params, grads, block=case["block"], **hyper)
    res_ref = ref.model_clipping_step_(expected, _clone(grads), **hyper)
    exact = case["dyadic"] or clip == 1e6
    _assert_result(res, res_ref, exact_norm=case["dyadic"], new_params=None if exact else params,
                   fp_key=case["fp_key"])
    if exact:
        _assert_lists_equal(params, expected)
    else:
        _assert_lists_close(params, expected, rtol=2e-6, atol=1e-6)
    assert torch.equal(res[4:6], cns._fingerprint(params, case["fp_key"], block=case["block"]))


@_FEW
@given(case=step_cases(), noise_multiplier=st.sampled_from([0.0, 0.5, -1.0]))
def test_dpsgd_is_the_reference_bit_for_bit(case: dict, noise_multiplier: float) -> None:
    params, grads = _step_tensors(case["shapes"], case["seed"], case["dyadic"], grad_scale=3.0)
    expected = _clone(params)
    hyper = dict(lr=0.1, noise_multiplier=noise_multiplier, max_grad_norm=1.5, expected_batch_size=7.0,
                 weight_decay=0.01, key=case["key"], step=case["step"])
    assert cns._dpsgd_step(params, grads, block=case["block"], **hyper) is None
    ref.dpsgd_step_(expected, _clone(grads), **hyper)
    _assert_lists_equal(params, expected)


@pytest.mark.parametrize("stream", [rng.STREAM_UPDATE, rng.STREAM_INIT])
def test_add_noise_is_the_reference_bit_for_bit(stream: int) -> None:
    params, _ = _step_tensors([(3,), (2, 7), (1,), (0,), (21,)], 3, dyadic=False)
    expected = _clone(params)
    cns._add_noise(params, sigma=0.3, key=_KEY, step=11, stream=stream, block=16)
    ref.add_noise_(expected, sigma=0.3, key=_KEY, step=11, stream=stream)
    _assert_lists_equal(params, expected)
    before = _clone(params)
    ptriton.add_noise_(params, sigma=0.0, key=_KEY, step=11)  # sigma = 0: untouched
    _assert_lists_equal(params, before)


_ODD_SHAPES = [(3,), (5,), (1,), (0,), (2, 7), (37,)]  # offsets 0, 3, 8, 9, 9, 23


@pytest.mark.parametrize("op", ["gradient", "model", "dpsgd", "noise"])
def test_noise_is_the_reference_noise_of_the_concatenation(op: str) -> None:
    """Zero params and gradients, unit noise: params become the reference noise at the tensors' offsets
    in the concatenation (offsets not multiples of 4, blocks of 16 elements), rounded once."""
    key, step = list(range(100, 108)), 77
    params = [torch.zeros(s, device=DEVICE) for s in _ODD_SHAPES]
    grads = [torch.zeros(s, device=DEVICE) for s in _ODD_SHAPES]
    if op == "gradient":
        cns._gradient_clipping_step(params, grads, lr=0.1, max_grad_norm=1.0, weight_decay=0.0, sigma=1.0, key=key,
                                    step=step, fp_key=_FP_KEY, block=16)
    elif op == "model":
        cns._model_clipping_step(params, grads, lr=0.1, max_model_norm=1.0, weight_decay=0.0, sigma=1.0, key=key,
                                 step=step, fp_key=_FP_KEY, block=16)
    elif op == "dpsgd":  # x - lr (C z / E[B]) with lr = -1, C = E[B] = 1
        cns._dpsgd_step(params, grads, lr=-1.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                        weight_decay=0.0, key=key, step=step, block=16)
    else:
        cns._add_noise(params, sigma=1.0, key=key, step=step, block=16)
    total = sum(math.prod(s) for s in _ODD_SHAPES)
    noise = rng.gaussian_noise(total, key=key, step=step)
    assert torch.equal(torch.cat([p.flatten() for p in params]).cpu(), noise.float())


def test_noise_depends_on_key_and_step_only() -> None:
    def run(key, step: int, block: int) -> torch.Tensor:
        params, grads = _step_tensors([(3,), (6,)], 0, dyadic=False)
        cns._gradient_clipping_step(params, grads, lr=0.1, max_grad_norm=1e6, weight_decay=0.01, sigma=0.5, key=key,
                                    step=step, fp_key=_FP_KEY, block=block)
        return torch.cat([p.flatten() for p in params])

    key = list(_KEY)
    base = run(key, 4, 16)
    assert torch.equal(base, run(key, 4, 64)), "noise must not depend on the block size"
    assert not torch.allclose(base, run(key, 5, 16))
    assert not torch.allclose(base, run(key[:7] + [key[7] ^ 1], 4, 16)), "the last key word must matter"


@pytest.mark.parametrize("block", [16, 1024])
def test_fingerprint_standalone_and_in_step(block: int) -> None:
    """The standalone fingerprint equals a step's old fingerprint bit for bit (same blocks and reduction)
    and the reference's up to FP_RTOL."""
    params, grads = _step_tensors([(5, 3), (17,), (2,), (0,), (40,)], 5, dyadic=False)
    fp = cns._fingerprint(params, _FP_KEY, block=block)
    assert fp.dtype == torch.float64 and fp.shape == (2,) and fp.device == DEVICE
    _fp_close(fp, ref.fingerprint(params, _FP_KEY))
    res = cns._gradient_clipping_step(params, grads, lr=0.1, max_grad_norm=1.0, weight_decay=0.0, sigma=0.0,
                                      key=_KEY, step=0, fp_key=_FP_KEY, block=block)
    assert torch.equal(res[2:4], fp)
    assert torch.equal(ptriton.fingerprint([p.clone() for p in params], _FP_KEY),
                       cns._fingerprint(params, _FP_KEY)), "public launcher: default block"
    assert not torch.equal(cns._fingerprint(params, [1, 2], block=block)[0:1], res[4:5])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf * 0 in masked lanes
@pytest.mark.parametrize("op", ["gradient", "model"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 3e38])
def test_nonfinite_norm_leaves_params_unchanged(op: str, bad: float) -> None:
    params, grads = _step_tensors([(3,), (19,), (6,)], 9, dyadic=False)
    grads[1][4] = bad  # 3e38: finite, but its square overflows the float32 norm (|y| for model clipping)
    original = _clone(params)
    expected = _clone(params)
    hyper = dict(weight_decay=0.01, sigma=0.5, key=_KEY, step=3, fp_key=_FP_KEY)
    if op == "gradient":
        res = cns._gradient_clipping_step(params, grads, lr=0.1, max_grad_norm=1.0, block=16, **hyper)
        res_ref = ref.gradient_clipping_step_(expected, grads, lr=0.1, max_grad_norm=1.0, **hyper)
    else:
        res = cns._model_clipping_step(params, grads, lr=1.0, max_model_norm=1.0, block=16, **hyper)
        res_ref = ref.model_clipping_step_(expected, grads, lr=1.0, max_model_norm=1.0, **hyper)
    assert res[0].item() == ref.STATUS_NONFINITE == res_ref[0].item()
    assert not math.isfinite(res[1].item())
    assert torch.equal(res[4:6], res[2:4]), "new fingerprint = old one when nothing was written"
    _assert_lists_equal(params, original)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf * 0 in masked lanes
@pytest.mark.parametrize("op", ["gradient", "model"])
def test_fingerprint_mismatch_leaves_params_unchanged(op: str) -> None:
    params, grads = _step_tensors([(3,), (19,), (6,)], 10, dyadic=True)
    fp = ref.fingerprint(params, _FP_KEY).tolist()
    hyper = dict(weight_decay=0.0, sigma=0.5, key=_KEY, step=3, fp_key=_FP_KEY)
    run = (partial(cns._gradient_clipping_step, lr=0.1, max_grad_norm=1.0, **hyper) if op == "gradient" else
           partial(cns._model_clipping_step, lr=0.5, max_model_norm=1.0, **hyper))
    run_ref = (partial(ref.gradient_clipping_step_, lr=0.1, max_grad_norm=1.0, **hyper) if op == "gradient" else
               partial(ref.model_clipping_step_, lr=0.5, max_model_norm=1.0, **hyper))
    original = _clone(params)
    for tampered in ([fp[0] * (1 + 1e-9), fp[1]], [fp[0], fp[1] + 1e-6], [float("nan"), fp[1]]):
        res = run(params, grads, expected_fp=tampered, block=16)
        assert res[0].item() == ref.STATUS_TAMPERED, tampered
        assert torch.equal(res[4:6], res[2:4])
        _assert_lists_equal(params, original)
    # A matching fingerprint (the reference's: equal up to the reduction order) lets the step run.
    expected = _clone(params)
    res = run(params, grads, expected_fp=fp, block=16)
    res_ref = run_ref(expected, grads, expected_fp=fp)
    _assert_result(res, res_ref, exact_norm=True)
    _assert_lists_equal(params, expected)
    # The non-finite norm takes precedence over the fingerprint.
    grads[0][0] = float("inf")
    res = run(params, grads, expected_fp=[0.0, 0.0], block=16)
    assert res[0].item() == ref.STATUS_NONFINITE


class _CountingKernel:
    """Wraps a Triton kernel and counts its launches."""

    def __init__(self, kernel, counter: list) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.append(grid)
        return self.kernel[grid]


_KERNELS = ("_pass1_kernel", "_finalize_kernel", "_pass2_kernel", "_finalize_new_kernel", "_dpsgd_kernel",
            "_add_noise_kernel", "_gaussian_noise_kernel")


@pytest.mark.parametrize("op, launches", [("gradient", 4), ("model", 4), ("dpsgd", 1), ("noise", 1),
                                          ("fingerprint", 2)])
def test_many_tiny_tensors_fixed_launch_count(monkeypatch: pytest.MonkeyPatch, op: str, launches: int) -> None:
    """40 tiny tensors and one crossing two block boundaries: a fixed number of launches, exact results
    (noiseless steps: the noise draws are what the interpreter is slow at, and are tested above)."""
    block = 32
    shapes = [((i % 3) + 1,) for i in range(8 if op == "noise" else 40)] + [(2 * block + 3,)]
    counter: list = []
    for name in _KERNELS:
        monkeypatch.setattr(cns, name, _CountingKernel(getattr(cns, name), counter))
    params, grads = _step_tensors(shapes, 1, dyadic=True)
    expected = _clone(params)
    if op == "gradient":
        hyper = dict(lr=0.25, max_grad_norm=1.0, weight_decay=0.0, sigma=0.0, key=_KEY, step=2, fp_key=_FP_KEY)
        cns._gradient_clipping_step(params, grads, block=block, **hyper)
        ref.gradient_clipping_step_(expected, grads, **hyper)
    elif op == "model":
        hyper = dict(lr=0.5, max_model_norm=1.0, weight_decay=0.0, sigma=0.0, key=_KEY, step=2, fp_key=_FP_KEY)
        cns._model_clipping_step(params, grads, block=block, **hyper)
        ref.model_clipping_step_(expected, grads, **hyper)
    elif op == "dpsgd":
        hyper = dict(lr=0.2, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4.0, weight_decay=0.1,
                     key=_KEY, step=2)
        cns._dpsgd_step(params, grads, block=block, **hyper)
        ref.dpsgd_step_(expected, grads, **hyper)
    elif op == "noise":
        cns._add_noise(params, sigma=0.5, key=_KEY, step=2, block=block)
        ref.add_noise_(expected, sigma=0.5, key=_KEY, step=2)
    else:
        _fp_close(cns._fingerprint(params, _FP_KEY, block=block), ref.fingerprint(params, _FP_KEY))
    assert len(counter) == launches
    _assert_lists_equal(params, expected)


def test_repeated_steps_reuse_the_block_table() -> None:
    """Two steps on the same tensors (the second hits the cached table) equal two reference steps, and
    the second step's expected fingerprint is the first one's new fingerprint."""
    cns._clear_table_cache()
    params, grads = _step_tensors([(3,), (5,), (9,)], 4, dyadic=True)
    expected = _clone(params)
    expected_fp: list = []
    for step in (0, 1):
        hyper = dict(lr=0.25, max_grad_norm=0.5, weight_decay=0.0, sigma=0.2, key=_KEY, step=step, fp_key=_FP_KEY)
        res = cns._gradient_clipping_step(params, grads, block=16, expected_fp=expected_fp, **hyper)
        ref.gradient_clipping_step_(expected, grads, **hyper)
        assert res[0].item() == ref.STATUS_OK
        expected_fp = res[4:6].tolist()
    assert len(cns._table_cache) == 1
    _assert_lists_equal(params, expected)


@pytest.mark.parametrize("grad_dtypes", [(torch.float16,) * 3, (torch.bfloat16,) * 3,
                                         (torch.float32, torch.float16, torch.bfloat16)])
def test_half_precision_gradients(grad_dtypes) -> None:
    shapes = [(5, 3), (17,), (2,)]
    params, grads32 = _step_tensors(shapes, 6, dyadic=True)
    grads = [g.to(dt) for g, dt in zip(grads32, grad_dtypes)]  # dyadic values are exact in fp16 / bf16
    for op in ("gradient", "dpsgd"):
        expected = _clone(params)
        if op == "gradient":
            hyper = dict(lr=0.1, max_grad_norm=0.7, weight_decay=0.01, sigma=0.3, key=_KEY, step=0, fp_key=_FP_KEY)
            res = cns._gradient_clipping_step(params, grads, block=16, **hyper)
            _assert_result(res, ref.gradient_clipping_step_(expected, grads, **hyper), exact_norm=True)
        else:
            hyper = dict(lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=3.0,
                         weight_decay=0.01, key=_KEY, step=0)
            cns._dpsgd_step(params, grads, block=16, **hyper)
            ref.dpsgd_step_(expected, grads, **hyper)
        _assert_lists_equal(params, expected)
    assert all(gr.dtype == dt for gr, dt in zip(grads, grad_dtypes)), "gradients must not be modified"


def test_non_contiguous_params_and_grads() -> None:
    g = _gen(7)
    base = (torch.randint(-8, 9, (7, 5), generator=g) * 0.25).float().to(DEVICE)
    params = [base.t(), (torch.randint(-8, 9, (9,), generator=g) * 0.25).float().to(DEVICE)]  # (5, 7) view
    grads = [(torch.randint(-8, 9, (5, 14), generator=g) * 0.25).float().to(DEVICE)[:, ::2],
             (torch.randint(-8, 9, (9,), generator=g) * 0.25).float().to(DEVICE)]
    expected = _clone(params)
    hyper = dict(lr=0.5, max_model_norm=2.0, weight_decay=0.0, sigma=0.7, key=_KEY, step=9, fp_key=_FP_KEY)
    res = cns._model_clipping_step(params, grads, block=16, **hyper)
    _assert_result(res, ref.model_clipping_step_(expected, grads, **hyper), exact_norm=True)
    _assert_lists_equal(params, expected)
    assert torch.equal(base.t(), params[0])  # updated in place through the view
    _fp_close(cns._fingerprint(params, _FP_KEY, block=16), ref.fingerprint(expected, _FP_KEY))


def test_public_step_launchers_default_block() -> None:
    shapes = [(3, 3, 3, 3), (1500,), (5,)]
    params, grads = _step_tensors(shapes, 8, dyadic=True)
    expected = _clone(params)
    hyper = dict(lr=0.1, max_grad_norm=1.0, weight_decay=0.01, sigma=0.1, key=_KEY, step=1, fp_key=_FP_KEY)
    res = ptriton.gradient_clipping_step_(params, grads, **hyper)
    _assert_result(res, ref.gradient_clipping_step_(expected, grads, **hyper), exact_norm=True)
    _assert_lists_equal(params, expected)


def test_empty_parameter_lists() -> None:
    hyper = dict(weight_decay=0.0, sigma=1.0, key=_KEY, step=0, fp_key=_FP_KEY)
    res = ptriton.gradient_clipping_step_([], [], lr=0.1, max_grad_norm=1.0, **hyper)
    assert res.tolist() == [0.0] * 6
    params = [torch.zeros(0, device=DEVICE)]
    res = ptriton.model_clipping_step_(params, [torch.zeros(0, device=DEVICE)], lr=0.1, max_model_norm=1.0, **hyper)
    assert res.tolist() == [0.0] * 6 and params[0].shape == (0,)
    res = ptriton.gradient_clipping_step_(params, [torch.zeros(0, device=DEVICE)], lr=0.1, max_grad_norm=1.0,
                                          expected_fp=[1.0, 1.0], **hyper)
    assert res[0].item() == ref.STATUS_TAMPERED
    assert ptriton.fingerprint(params, _FP_KEY).tolist() == [0.0, 0.0]


def test_step_launchers_reject_bad_inputs() -> None:
    p = [torch.zeros(3, device=DEVICE)]
    hyper = dict(lr=0.1, max_grad_norm=1.0, weight_decay=0.0, sigma=0.0, key=_KEY, step=0, fp_key=_FP_KEY)
    with pytest.raises(TypeError, match=r"params\[0\] is torch.float16"):
        ptriton.gradient_clipping_step_([p[0].half()], p, **hyper)
    with pytest.raises(TypeError, match=r"grads\[0\] must be float32, float16 or bfloat16"):
        ptriton.gradient_clipping_step_(p, [p[0].double()], **hyper)
    with pytest.raises(ValueError, match="same length"):
        ptriton.gradient_clipping_step_(p, p + p, **hyper)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        ptriton.gradient_clipping_step_(p, [torch.zeros(4, device=DEVICE)], **hyper)
    with pytest.raises(TypeError, match="key must be 8 ints"):
        ptriton.gradient_clipping_step_(p, p, **{**hyper, "key": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"key words must be in \[0, 2\*\*32\)"):
        ptriton.gradient_clipping_step_(p, p, **{**hyper, "key": [2**32] + [0] * 7})
    with pytest.raises(ValueError, match="step must be in"):
        ptriton.gradient_clipping_step_(p, p, **{**hyper, "step": 2**32})
    with pytest.raises(ValueError, match="fp_key must be 2 words"):
        ptriton.gradient_clipping_step_(p, p, **{**hyper, "fp_key": [1, 2, 3]})
    with pytest.raises(ValueError, match="expected_fp must be empty"):
        ptriton.gradient_clipping_step_(p, p, **hyper, expected_fp=[1.0])
    with pytest.raises(ValueError, match="stream must be in"):
        ptriton.add_noise_(p, sigma=1.0, key=_KEY, step=0, stream=-1)
    with pytest.raises(ValueError, match="block must be a power of two"):
        cns._dpsgd_step(p, p, lr=0.1, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0,
                        weight_decay=0.0, key=_KEY, step=0, block=24)
    with pytest.raises(ValueError, match="numel and offset must be >= 0"):
        ptriton.gaussian_noise(-1, key=_KEY, step=0, device=DEVICE)


def test_noise_kernels_compile_for_hopper_without_fma() -> None:
    """The compiled (not interpreted) kernels: PTX for sm_90 without fused multiply-adds, with IEEE float64
    sqrt and division (tests/scripts/triton_noise_ptx.py; no GPU needed)."""
    script = Path(__file__).parent / "scripts" / "triton_noise_ptx.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
