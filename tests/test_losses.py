"""Tests of pyunlearn.losses.masked_cross_entropy against a plain PyTorch formulation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from pyunlearn.losses import masked_cross_entropy


def plain_masked_ce(logits, target, mask, weight=None, reduction="mean"):
    """The same loss written with F.cross_entropy / F.binary_cross_entropy_with_logits (float64 oracle)."""
    b, k = logits.shape[:2]
    if k == 1:
        pixel = F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype), reduction="none")
    else:
        pixel = F.cross_entropy(logits, target.long(), reduction="none")
    m = mask.to(logits.dtype).reshape(b, -1)
    per_sample = (pixel.reshape(b, -1) * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.sum() / b


def make_inputs(seed: int, b: int, k: int, spatial: tuple[int, ...], *, dtype=torch.float64, density=0.5,
                scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn((b, k) + spatial, generator=gen, dtype=torch.float64)
    target = torch.randint(0, max(k, 2), (b,) + spatial, generator=gen)
    mask = torch.rand((b,) + spatial, generator=gen) < density
    weight = torch.randn(b, generator=gen, dtype=torch.float64)
    return logits.to(dtype), target, mask, weight


shapes = st.tuples(
    st.integers(1, 3),                      # B
    st.sampled_from([1, 2, 5]),             # K
    st.sampled_from([(), (1,), (3, 5), (7, 1), (5, 3, 3)]),  # spatial dims, odd sizes
)


@given(shapes, st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from(["none", "sum", "mean"]),
       st.sampled_from([0.0, 0.3, 1.0]))
def test_forward_and_gradient_match_plain_pytorch(shape, seed, use_weight, reduction, density):
    b, k, spatial = shape
    logits, target, mask, weight = make_inputs(seed, b, k, spatial, density=density)
    weight = weight if use_weight else None
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = masked_cross_entropy(ours_in, target, mask, weight=weight, reduction=reduction)
    ref = plain_masked_ce(ref_in, target, mask, weight, reduction)
    assert ours.dtype == torch.float64
    assert ours.shape == ref.shape == ((b,) if reduction == "none" else ())
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # A non-trivial upstream gradient (per-sample for "none").
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, ours_in, upstream)
    (g_ref,) = torch.autograd.grad(ref, ref_in, upstream)
    assert g_ours.shape == logits.shape and g_ours.dtype == logits.dtype
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_batch_of_one_with_negative_weight(k):
    logits, target, mask, _ = make_inputs(7, 1, k, (5, 3))
    weight = torch.tensor([-0.7], dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    loss = masked_cross_entropy(x, target, mask, weight=weight)
    y = logits.clone().requires_grad_(True)
    ref = plain_masked_ce(y, target, mask, weight)
    assert float(loss.detach()) < 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-12)
    unweighted = masked_cross_entropy(logits, target, mask)
    torch.testing.assert_close(loss, -0.7 * unweighted, rtol=1e-12, atol=0.0)


def test_reductions_are_consistent():
    logits, target, mask, weight = make_inputs(3, 3, 5, (3, 5))
    none = masked_cross_entropy(logits, target, mask, weight=weight, reduction="none")
    assert none.shape == (3,)
    torch.testing.assert_close(masked_cross_entropy(logits, target, mask, weight=weight, reduction="sum"),
                               none.sum())
    torch.testing.assert_close(masked_cross_entropy(logits, target, mask, weight=weight), none.sum() / 3)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_empty_mask_gives_zero_and_zero_gradient(k):
    logits, target, mask, _ = make_inputs(11, 3, k, (3, 5))
    mask[1] = False
    logits[1] = 1e4  # extreme logits on the empty sample must not leak NaN
    x = logits.clone().requires_grad_(True)
    per_sample = masked_cross_entropy(x, target, mask, reduction="none")
    assert torch.isfinite(per_sample).all()
    assert float(per_sample[1].detach()) == 0.0
    per_sample.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    # All masks empty: zero loss, zero gradient, no NaN (also through the mean over B).
    z = logits.clone().requires_grad_(True)
    loss = masked_cross_entropy(z, target, torch.zeros_like(mask))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("k", [1, 3])
def test_non_contiguous_logits(k):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 3, 5, k, generator=gen, dtype=torch.float64)  # (B, W, H, K) storage
    _, target, mask, weight = make_inputs(5, 2, k, (5, 3))
    view = base.clone().requires_grad_(True)
    logits = view.permute(0, 3, 2, 1)
    assert not logits.is_contiguous()
    contiguous = logits.detach().contiguous().requires_grad_(True)
    a = masked_cross_entropy(logits, target, mask, weight=weight, reduction="none")
    b = masked_cross_entropy(contiguous, target, mask, weight=weight, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(a.sum(), view)
    (gb,) = torch.autograd.grad(b.sum(), contiguous)
    torch.testing.assert_close(ga.permute(0, 3, 2, 1), gb, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_logits_without_spatial_dims(k):
    logits, target, mask, weight = make_inputs(13, 3, k, ())
    mask[0] = True
    x = logits.clone().requires_grad_(True)
    loss = masked_cross_entropy(x, target, mask, weight=weight, reduction="none")
    ref = plain_masked_ce(logits, target, mask, weight, "none")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    if k > 1:  # one pixel per sample: the per-sample loss is F.cross_entropy itself
        direct = F.cross_entropy(logits, target, reduction="none") * weight * mask
        torch.testing.assert_close(loss, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.float32, torch.float64, torch.int32, torch.uint8])
def test_binary_target_dtypes(target_dtype):
    logits, target, mask, _ = make_inputs(17, 2, 1, (3, 5))
    ref = masked_cross_entropy(logits, target, mask)
    torch.testing.assert_close(masked_cross_entropy(logits, target.to(target_dtype), mask), ref)
    torch.testing.assert_close(masked_cross_entropy(logits, target, mask.to(torch.float32)), ref)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_bf16_close_to_fp64_within_pytorch_bf16_error(k):
    b, spatial = 3, (9, 7)
    logits64, target, mask, weight = make_inputs(19, b, k, spatial, density=0.6)
    weight = weight.abs() + 0.5
    lb = logits64.to(torch.bfloat16)
    exact_in = lb.to(torch.float64).requires_grad_(True)  # the bf16 logits, evaluated exactly
    exact = plain_masked_ce(exact_in, target, mask, weight, "none")
    (g_exact,) = torch.autograd.grad(exact.sum(), exact_in)

    x = lb.clone().requires_grad_(True)
    ours = masked_cross_entropy(x, target, mask, weight=weight, reduction="none")
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    assert g_ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()

    # PyTorch's own bf16 computation of the same quantity sets the scale of acceptable error.
    xt = lb.clone().requires_grad_(True)
    torch_bf16 = plain_masked_ce(xt, target, mask.to(torch.bfloat16), weight.to(torch.bfloat16), "none")
    (g_torch,) = torch.autograd.grad(torch_bf16.sum(), xt)
    exact, torch_bf16, ours = exact.detach(), torch_bf16.detach(), ours.detach()
    bf16_eps = torch.finfo(torch.bfloat16).eps
    loss_tol = max(float((torch_bf16.double() - exact).abs().max()), bf16_eps * float(exact.abs().max()))
    grad_tol = max(float((g_torch.double() - g_exact).abs().max()), bf16_eps * float(g_exact.abs().max()))
    assert float((ours.double() - exact).abs().max()) <= loss_tol
    assert float((g_ours.double() - g_exact).abs().max()) <= grad_tol


# ------------------------------------------------------------------ errors
def test_mismatched_shapes_name_both():
    logits, target, mask, _ = make_inputs(0, 2, 3, (5, 3))
    with pytest.raises(ValueError, match=r"target.*\(2, 5, 3\).*\(2, 3, 5, 3\).*\(2, 3, 5\)"):
        masked_cross_entropy(logits, target.transpose(1, 2), mask)
    with pytest.raises(ValueError, match=r"mask.*\(2, 5, 3\).*\(2, 3, 5, 3\).*\(2, 5\)"):
        masked_cross_entropy(logits, target, mask[:, :, 0])
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K, \.\.\.\)"):
        masked_cross_entropy(torch.randn(3), target, mask)


def test_target_errors():
    logits, target, mask, _ = make_inputs(0, 2, 5, (3, 3))
    with pytest.raises(TypeError, match="integer class indices.*K=5"):
        masked_cross_entropy(logits, target.float(), mask)
    with pytest.raises(TypeError, match="integer class indices"):
        masked_cross_entropy(logits, target.bool(), mask)
    with pytest.raises(ValueError, match=r"\[0, 4\].*K=5.*\[5, 5\]"):
        masked_cross_entropy(logits, torch.full_like(target, 5), mask)
    with pytest.raises(ValueError, match=r"found range \[-1"):
        masked_cross_entropy(logits, target - 1, mask)
    binary, t1, m1, _ = make_inputs(0, 2, 1, (3, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\].*K=1"):
        masked_cross_entropy(binary, t1 + 1, m1)
    with pytest.raises(ValueError, match="target must be binary"):
        masked_cross_entropy(binary, t1.float() * 0.5 + 0.25, m1)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        masked_cross_entropy(t1[:, None], t1, m1)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        masked_cross_entropy(binary, t1.tolist(), m1)


def test_mask_and_weight_errors():
    logits, target, mask, weight = make_inputs(0, 2, 2, (3, 3))
    with pytest.raises(ValueError, match="mask must be binary.*0.5"):
        masked_cross_entropy(logits, target, mask.double() * 0.5)
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\).*\(2, 1\)"):
        masked_cross_entropy(logits, target, mask, weight=weight[:, None])
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\).*\(3,\)"):
        masked_cross_entropy(logits, target, mask, weight=torch.ones(3))
    with pytest.raises(TypeError, match="weight must be floating point"):
        masked_cross_entropy(logits, target, mask, weight=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        masked_cross_entropy(logits, target, mask, reduction="avg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch():
    logits, target, mask, _ = make_inputs(0, 2, 2, (3, 3))
    with pytest.raises(ValueError, match="same device.*mask on cuda"):
        masked_cross_entropy(logits, target, mask.cuda())
