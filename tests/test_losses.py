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


# ================================================================== soft Dice, Dice + CE, focal, get_loss
import functools  # noqa: E402
import math  # noqa: E402

from pyunlearn import losses  # noqa: E402
from pyunlearn.losses import get_loss, masked_dice_ce, masked_focal, masked_soft_dice  # noqa: E402


def _fg_onehot(logits, target):
    """``(prob, onehot)`` of the foreground classes, ``(B, C, *spatial)`` each (C = 1 for K == 1)."""
    k = logits.shape[1]
    if k == 1:
        return torch.sigmoid(logits), target.long().unsqueeze(1).to(logits.dtype)
    onehot = F.one_hot(target.long(), k).movedim(-1, 1).to(logits.dtype)
    return torch.softmax(logits, dim=1)[:, 1:], onehot[:, 1:]


def plain_soft_dice(logits, target, mask, smooth=1e-5):
    """Per-sample soft Dice loss, one explicit sum per (sample, foreground class)."""
    prob, onehot = _fg_onehot(logits, target)
    m = mask.to(logits.dtype)
    per_sample = []
    for i in range(logits.shape[0]):
        scores = []
        for c in range(prob.shape[1]):
            p, y = prob[i, c] * m[i], onehot[i, c] * m[i]
            scores.append((2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth))
        per_sample.append(1 - torch.stack(scores).mean())
    return torch.stack(per_sample)


def plain_focal(logits, target, mask, gamma=2.0, alpha=None):
    """Per-sample focal loss: torchvision's ``sigmoid_focal_loss`` for K == 1, the textbook softmax form else."""
    b, k = logits.shape[:2]
    if k == 1:  # torchvision.ops.sigmoid_focal_loss, transcribed
        x, t = logits[:, 0], target.to(logits.dtype)
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        pixel = ce * (1 - p_t) ** gamma
        if alpha is not None and not isinstance(alpha, (list, tuple)):
            pixel = (alpha * t + (1 - alpha) * (1 - t)) * pixel
    else:
        onehot = F.one_hot(target.long(), k).movedim(-1, 1).to(logits.dtype)
        log_pt = (onehot * F.log_softmax(logits, dim=1)).sum(dim=1)
        pixel = -(1 - log_pt.exp()) ** gamma * log_pt
        if alpha is not None and not isinstance(alpha, (list, tuple)):
            fg = (target != 0).to(logits.dtype)
            pixel = (alpha * fg + (1 - alpha) * (1 - fg)) * pixel
    if isinstance(alpha, (list, tuple)):
        pixel = torch.tensor(alpha, dtype=logits.dtype)[target.long()] * pixel
    m = mask.to(logits.dtype).reshape(b, -1)
    return (pixel.reshape(b, -1) * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def plain_loss(name, logits, target, mask, options):
    if name == "dice":
        return plain_soft_dice(logits, target, mask, **options)
    if name == "focal":
        return plain_focal(logits, target, mask, **options)
    if name == "dice_ce":
        opts = dict(options)
        ld, lc = opts.pop("lambda_dice", 1.0), opts.pop("lambda_ce", 1.0)
        return ld * plain_soft_dice(logits, target, mask, **opts) + lc * plain_masked_ce(
            logits, target, mask, reduction="none")
    return plain_masked_ce(logits, target, mask, reduction="none")


def reduce_plain(per_sample, weight, reduction):
    if weight is not None:
        per_sample = per_sample * weight
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.sum() / per_sample.shape[0]


OURS = {"dice": masked_soft_dice, "dice_ce": masked_dice_ce, "focal": masked_focal, "ce": masked_cross_entropy}

loss_options = st.one_of(
    st.tuples(st.just("dice"), st.sampled_from([{}, {"smooth": 1.0}, {"smooth": 1e-3}])),
    st.tuples(st.just("dice_ce"), st.sampled_from([{}, {"lambda_dice": 0.3, "lambda_ce": 2.0},
                                                   {"smooth": 0.5, "lambda_ce": 0.0}])),
    st.tuples(st.just("focal"), st.sampled_from([{}, {"gamma": 0.0}, {"gamma": 0.5, "alpha": 0.25},
                                                 {"gamma": 3.0, "alpha": 0.9}, {"alpha": "per-class"}])),
)

seg_shapes = st.tuples(
    st.integers(1, 3),                                                # B
    st.sampled_from([1, 2, 4]),                                       # K
    st.sampled_from([(), (3, 5), (7, 1), (1, 4), (2, 3, 3), (3, 1, 5)]),  # none, 2-D, 3-D; odd sizes
)


def _resolve(options, k):
    if options.get("alpha") == "per-class":
        return {**options, "alpha": [0.5 + 0.25 * c for c in range(max(k, 2))]}
    return options


@given(seg_shapes, loss_options, st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3, 1.0]), st.booleans(),
       st.sampled_from(["none", "sum", "mean"]), st.booleans())
def test_new_losses_match_plain_pytorch(shape, loss, seed, density, use_weight, reduction, channels_last):
    b, k, spatial = shape
    name, options = loss
    options = _resolve(options, k)
    logits, target, mask, weight = make_inputs(seed, b, k, spatial, density=density)
    weight = weight if use_weight else None
    base = logits.movedim(1, -1).contiguous() if channels_last else logits.clone()
    ours_leaf = base.clone().requires_grad_(True)
    ours_in = ours_leaf.movedim(-1, 1) if channels_last else ours_leaf  # non-contiguous when channels_last
    ref_in = logits.clone().requires_grad_(True)
    ours = OURS[name](ours_in, target, mask, weight=weight, reduction=reduction, **options)
    ref = reduce_plain(plain_loss(name, ref_in, target, mask, options), weight, reduction)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape == ((b,) if reduction == "none" else ())
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (g_ours,) = torch.autograd.grad(ours, ours_leaf, upstream)
    (g_ref,) = torch.autograd.grad(ref, ref_in, upstream)
    if channels_last:
        g_ours = g_ours.movedim(-1, 1)
    assert g_ours.shape == logits.shape
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spatial", [(3, 5), (2, 3, 3)])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("name", ["dice", "dice_ce", "focal"])
def test_empty_mask_zero_loss_zero_gradient_even_with_garbage_logits(name, k, spatial):
    logits, target, mask, _ = make_inputs(23, 3, k, spatial)
    mask[1] = False
    mask[0, 0] = True
    logits[1] = 1e4                        # extreme logits on the empty sample
    logits[2][~mask[2].unsqueeze(0).expand_as(logits[2])] = math.nan  # garbage outside the mask
    x = logits.clone().requires_grad_(True)
    per_sample = OURS[name](x, target, mask, reduction="none")
    assert torch.isfinite(per_sample).all()
    assert float(per_sample[1].detach()) == 0.0
    per_sample.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    outside = ~mask.unsqueeze(1).expand_as(x)
    assert torch.equal(x.grad[outside], torch.zeros_like(x.grad[outside]))
    clean = logits.clone()
    clean[2] = torch.where(torch.isnan(clean[2]), torch.zeros_like(clean[2]), clean[2])
    torch.testing.assert_close(per_sample[2].detach(), OURS[name](clean, target, mask, reduction="none")[2])
    z = logits.clone().requires_grad_(True)  # every mask empty: 0 through the mean over B too
    loss = OURS[name](z, target, torch.zeros_like(mask))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("k", [1, 3])
def test_dice_without_foreground_in_target_or_prediction(k):
    b, spatial = 2, (4, 5)
    target = torch.zeros((b,) + spatial, dtype=torch.int64)
    mask = torch.ones((b,) + spatial, dtype=torch.bool)
    background = torch.zeros((b, k) + spatial, dtype=torch.float64)
    if k == 1:
        background[:, 0] = -40.0
    else:
        background[:, 0] = 40.0
    x = background.clone().requires_grad_(True)
    loss = masked_soft_dice(x, target, mask, reduction="none")  # nothing predicted, nothing there: ~ perfect
    assert torch.isfinite(loss).all() and float(loss.detach().max()) < 1e-6
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    foreground = -background  # predicted everywhere but absent from the target: loss -> 1
    y = foreground.clone().requires_grad_(True)
    loss = masked_soft_dice(y, target, mask, reduction="none")
    torch.testing.assert_close(loss, torch.ones_like(loss), rtol=0, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(y.grad).all()
    torch.testing.assert_close(loss.detach(), plain_soft_dice(foreground, target, mask), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k, spatial", [(1, (2, 3)), (3, (2, 1, 3))])
@pytest.mark.parametrize("fn, options", [
    (masked_soft_dice, {}), (masked_soft_dice, {"smooth": 1.0}), (masked_focal, {}),
    (masked_focal, {"gamma": 0.5, "alpha": 0.25}), (masked_focal, {"gamma": 1.0, "alpha": "per-class"}),
], ids=["dice", "dice-smooth1", "focal", "focal-g0.5-a", "focal-g1-perclass"])
def test_gradcheck(fn, options, k, spatial):
    logits, target, mask, weight = make_inputs(29, 2, k, spatial, scale=1.5)
    mask[0] = False
    mask[1].view(-1)[:2] = True
    options = _resolve(options, k)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fn(v, target, mask, weight=weight, reduction="none", **options), (x,))


def test_focal_special_cases():
    logits, target, mask, weight = make_inputs(31, 3, 1, (4, 5))
    # K == 2 softmax on logits (0, x) is the sigmoid focal loss of x, alpha included.
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)
    for alpha in (None, 0.25, 0.8):
        torch.testing.assert_close(masked_focal(two, target, mask, alpha=alpha, reduction="none"),
                                   masked_focal(logits, target, mask, alpha=alpha, reduction="none"),
                                   rtol=1e-12, atol=1e-14)
    # gamma = 0 without alpha is the cross-entropy; alpha = [1, 1] is no weighting.
    for k in (1, 4):
        lg, tg, mk, wt = make_inputs(37, 3, k, (3, 3, 2))
        ce = masked_cross_entropy(lg, tg, mk, weight=wt, reduction="none")
        torch.testing.assert_close(masked_focal(lg, tg, mk, gamma=0.0, weight=wt, reduction="none"), ce,
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(masked_focal(lg, tg, mk, alpha=[1.0] * max(k, 2)), masked_focal(lg, tg, mk),
                                   rtol=1e-12, atol=1e-14)
    # Saturated logits: finite loss and gradient for any gamma (log-sum-exp form).
    for k in (1, 3):
        lg, tg, mk, _ = make_inputs(41, 2, k, (3, 3), scale=1e3)
        for gamma in (0.0, 0.5, 2.0):
            x = lg.clone().requires_grad_(True)
            out = masked_focal(x, tg, mk, gamma=gamma)
            out.backward()
            assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def test_dice_ce_is_the_weighted_sum():
    logits, target, mask, weight = make_inputs(43, 3, 3, (5, 3))
    dice = masked_soft_dice(logits, target, mask, weight=weight, reduction="none")
    ce = masked_cross_entropy(logits, target, mask, weight=weight, reduction="none")
    torch.testing.assert_close(masked_dice_ce(logits, target, mask, weight=weight, lambda_dice=0.25, lambda_ce=3.0,
                                              reduction="none"), 0.25 * dice + 3.0 * ce, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(masked_dice_ce(logits, target, mask, lambda_ce=0.0), masked_soft_dice(logits, target,
                                                                                                     mask))


@pytest.mark.parametrize("name", ["dice", "dice_ce", "focal"])
@pytest.mark.parametrize("k", [1, 3])
def test_new_losses_low_precision(name, k):
    logits64, target, mask, weight = make_inputs(47, 2, k, (6, 5), density=0.6)
    lb = logits64.to(torch.bfloat16)
    x = lb.clone().requires_grad_(True)
    ours = OURS[name](x, target, mask, weight=weight, reduction="none")
    assert ours.dtype == torch.float32
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    exact = OURS[name](lb.double(), target, mask, weight=weight, reduction="none")
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dice", "dice_ce", "focal"])
def test_new_losses_validate_like_ce(name):
    fn = OURS[name]
    logits, target, mask, weight = make_inputs(0, 2, 3, (5, 3))
    with pytest.raises(ValueError, match=r"target.*\(2, 5, 3\).*\(2, 3, 5, 3\).*\(2, 3, 5\)"):
        fn(logits, target.transpose(1, 2), mask)
    with pytest.raises(ValueError, match=r"mask.*\(2, 5, 3\)"):
        fn(logits, target, mask[:, :, 0])
    with pytest.raises(ValueError, match="mask must be binary"):
        fn(logits, target, mask.double() * 0.5)
    with pytest.raises(ValueError, match=r"\[0, 2\].*K=3.*\[3, 3\]"):
        fn(logits, torch.full_like(target, 3), mask)
    with pytest.raises(TypeError, match="integer class indices"):
        fn(logits, target.float(), mask)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        fn(target[:, None], target, mask)
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\)"):
        fn(logits, target, mask, weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        fn(logits, target, mask, reduction="avg")
    binary, t1, m1, _ = make_inputs(0, 2, 1, (3, 3))
    with pytest.raises(ValueError, match="target must be binary"):
        fn(binary, t1.float() * 0.5 + 0.25, m1)
    torch.testing.assert_close(fn(binary, t1.bool(), m1.float()), fn(binary, t1, m1))  # like the CE


def test_hyper_parameter_errors():
    logits, target, mask, _ = make_inputs(0, 2, 3, (3, 3))
    with pytest.raises(ValueError, match=r"smooth must be finite and > 0, got 0"):
        masked_soft_dice(logits, target, mask, smooth=0)
    with pytest.raises(ValueError, match=r"smooth must be finite and > 0, got nan"):
        masked_dice_ce(logits, target, mask, smooth=math.nan)
    with pytest.raises(ValueError, match=r"lambda_ce must be finite and >= 0, got -1"):
        masked_dice_ce(logits, target, mask, lambda_ce=-1.0)
    with pytest.raises(TypeError, match="lambda_dice must be a number"):
        masked_dice_ce(logits, target, mask, lambda_dice="1")
    with pytest.raises(ValueError, match=r"gamma must be finite and >= 0, got -0.5"):
        masked_focal(logits, target, mask, gamma=-0.5)
    with pytest.raises(ValueError, match=r"gamma must be finite and >= 0, got inf"):
        masked_focal(logits, target, mask, gamma=math.inf)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        masked_focal(logits, target, mask, alpha=1.5)
    with pytest.raises(ValueError, match=r"alpha must hold 3 per-class weights.*K=3.*\(2,\)"):
        masked_focal(logits, target, mask, alpha=[0.2, 0.8])
    with pytest.raises(ValueError, match=r"alpha must hold 2 per-class weights.*K=1"):
        masked_focal(logits[:, :1], target.clamp_max(1), mask, alpha=torch.ones(3))
    with pytest.raises(ValueError, match="alpha weights must be finite and >= 0"):
        masked_focal(logits, target, mask, alpha=[1.0, -1.0, 1.0])
    with pytest.raises(TypeError, match="alpha must be None, a float or a sequence of 3"):
        masked_focal(logits, target, mask, alpha="balanced")


# ------------------------------------------------------------------ registry
def test_get_loss_names_and_callables():
    assert dict(losses.LOSSES) == {"ce": masked_cross_entropy, "dice": masked_soft_dice, "dice_ce": masked_dice_ce,
                                   "focal": masked_focal}
    for name, fn in losses.LOSSES.items():
        assert get_loss(name) is fn
    partial = functools.partial(masked_focal, gamma=3.0, alpha=0.25)
    assert get_loss(partial) is partial

    def custom(logits, target, mask, *, weight=None, reduction="mean"):
        return masked_focal(logits, target, mask, weight=weight, reduction=reduction)

    assert get_loss(custom) is custom
    assert get_loss(lambda *args, **kwargs: None) is not None
    with pytest.raises(ValueError, match=r"unknown loss 'dicece'.*'ce', 'dice', 'dice_ce', 'focal'"):
        get_loss("dicece")
    with pytest.raises(ValueError, match="unknown loss 'CE'"):
        get_loss("CE")
    with pytest.raises(TypeError, match="loss must be a name.*or a callable, got int"):
        get_loss(3)
    with pytest.raises(TypeError, match=r"must accept \(logits, target, mask, \*, weight=None"):
        get_loss(lambda logits, target: logits.sum())
    with pytest.raises(TypeError, match="must accept"):
        get_loss(lambda logits, target, mask: logits.sum())  # no weight / reduction
    with pytest.raises(TypeError):
        losses.LOSSES["mine"] = custom  # read-only
