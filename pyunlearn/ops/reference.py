"""Pure-PyTorch reference of every fused op: the CPU fallback, the test oracle, the benchmark baseline.

Each compiled or Triton kernel computes exactly these functions (up to floating-point rounding).
Inputs here are already validated by the public API (``pyunlearn.losses``, ``pyunlearn.optim``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .rng import STREAM_UPDATE, gaussian_noise


# --------------------------------------------------------------------------------------------------
# Op 1: masked pixel cross-entropy, forward and backward together
# --------------------------------------------------------------------------------------------------
def masked_cross_entropy_fwd_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample masked cross-entropy and its gradient with respect to the logits.

    logits: (B, K, N) with K >= 2 (softmax cross-entropy) or K == 1 (sigmoid binary cross-entropy);
    target: (B, N) integer class indices (0/1 when K == 1); mask: (B, N) bool; weight: (B,) or None.

        loss[b]       = weight[b] * sum_n mask[b, n] * ce(logits[b, :, n], target[b, n]) / max(m_b, 1)
        grad[b, :, n] = d loss[b] / d logits[b, :, n]

    with m_b = sum_n mask[b, n], so an empty mask gives a loss of 0 and a zero gradient.
    Accumulation is float32 (float64 for float64 logits); ``grad`` has the dtype of ``logits``.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    maskf = mask.to(acc)
    count = maskf.sum(dim=1).clamp_min(1.0)  # (B,)
    scale = maskf / count[:, None]  # (B, N)
    if weight is not None:
        scale = scale * weight.to(acc)[:, None]
    if x.shape[1] == 1:
        z = x[:, 0]
        y = target.to(acc)
        # Stable BCE with logits: max(z, 0) - z y + log(1 + exp(-|z|)).
        pixel_loss = z.clamp_min(0) - z * y + torch.log1p(torch.exp(-z.abs()))
        grad = (torch.sigmoid(z) - y) * scale
        grad = grad[:, None]
    else:
        logp = torch.log_softmax(x, dim=1)
        tgt = target.long()[:, None]
        pixel_loss = -logp.gather(1, tgt)[:, 0]
        grad = torch.exp(logp)
        grad.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=acc))
        grad = grad * scale[:, None]
    loss = (pixel_loss * scale).sum(dim=1)
    return loss.to(torch.float32) if acc == torch.float32 else loss, grad.to(logits.dtype)


# --------------------------------------------------------------------------------------------------
# Op 3: per-sample gradient norms of a convolution / linear layer
# --------------------------------------------------------------------------------------------------
def per_sample_sq_norms(a: torch.Tensor, g: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Squared Frobenius norm of each sample's weight gradient of a 2-d convolution (groups 1):

        G_b = g_b (P, OH*OW) @ unfold(a_b)^T (OH*OW, C*KH*KW),   returns ||G_b||^2 for b < B

    with ``a`` (B, C, H, W) the layer input and ``g`` (B, P, OH, OW) the output gradient (a linear
    layer is the 1x1 case). float32 accumulation (float64 for float64 inputs). Forms every ``G_b``:
    this is the oracle, the Triton kernel reduces them in registers instead.
    """
    acc = torch.float64 if torch.float64 in (a.dtype, g.dtype) else torch.float32
    columns = torch.nn.functional.unfold(a.to(acc), tuple(kernel_size), dilation=tuple(dilation),
                                         padding=tuple(padding), stride=tuple(stride))  # (B, D, T)
    per_sample = torch.bmm(g.to(acc).reshape(g.shape[0], g.shape[1], -1), columns.transpose(1, 2))
    return per_sample.square().sum(dim=(1, 2))


# --------------------------------------------------------------------------------------------------
# Op 2: multi-tensor clip + noise + update
# --------------------------------------------------------------------------------------------------
def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors together, accumulated in float32 (float64 if any input is)."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if not tensors:
        return torch.zeros((), dtype=acc)
    return torch.sqrt(sum((t.to(acc).square().sum() for t in tensors), torch.zeros((), dtype=acc,
                                                                                   device=tensors[0].device)))


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / norm), equal to 1 for a zero norm."""
    return torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-30), torch.ones_like(norm))


def add_noise_(params: Sequence[torch.Tensor], *, sigma: float, seed: int, step: int,
               stream: int = STREAM_UPDATE) -> None:
    """params[j] += sigma * noise, element indices running over the concatenation of ``params``."""
    if sigma == 0.0:
        return
    offset = 0
    for p in params:
        noise = gaussian_noise(p.numel(), seed=seed, step=step, offset=offset, stream=stream, device=p.device)
        p.add_((sigma * noise).view_as(p).to(p.dtype))
        offset += p.numel()


def gradient_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_grad_norm: float,
    weight_decay: float,
    sigma: float,
    seed: int,
    step: int,
) -> torch.Tensor:
    """One step of the gradient-clipping operator, in place on ``params``; returns the gradient norm.

        x <- x - lr * (clip(g, C1) + weight_decay * x) + sigma * noise(seed, step)

    clip uses the global norm of all ``grads`` together.
    """
    norm = global_norm(grads)
    factor = clip_factor(norm, max_grad_norm)
    for p, g in zip(params, grads):
        update = g.to(norm.dtype) * factor + weight_decay * p.to(norm.dtype)
        p.sub_((lr * update).to(p.dtype))
    add_noise_(params, sigma=sigma, seed=seed, step=step)
    return norm


def model_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_model_norm: float,
    weight_decay: float,
    sigma: float,
    seed: int,
    step: int,
) -> torch.Tensor:
    """One step of the model-clipping operator, in place; returns the pre-projection model norm.

        y = x - lr * (g + weight_decay * x);   x <- clip(y, C2) + sigma * noise(seed, step)
    """
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    for p, g in zip(params, grads):
        update = g.to(acc) + weight_decay * p.to(acc)
        p.sub_((lr * update).to(p.dtype))
    norm = global_norm(params)
    factor = clip_factor(norm, max_model_norm)
    for p in params:
        p.mul_(factor.to(p.dtype))
    add_noise_(params, sigma=sigma, seed=seed, step=step)
    return norm


def dpsgd_step_(
    params: Sequence[torch.Tensor],
    summed_clipped_grads: Sequence[torch.Tensor],
    *,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    weight_decay: float,
    seed: int,
    step: int,
) -> None:
    """DP-SGD update from the sum of per-sample clipped gradients (Opacus' arithmetic):

        g = (sum_i clip(g_i, C) + noise_multiplier * C * noise(seed, step)) / expected_batch_size
        x <- x - lr * (g + weight_decay * x)

    computed in float32, or float64 for float64 parameters (the noise itself is float32).
    """
    std = noise_multiplier * max_grad_norm
    offset = 0
    for p, g in zip(params, summed_clipped_grads):
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        noisy = g.to(acc)
        if std > 0.0:
            noisy = noisy + std * gaussian_noise(p.numel(), seed=seed, step=step, offset=offset,
                                                 device=p.device).view_as(p).to(acc)
        update = noisy / expected_batch_size + weight_decay * p.to(acc)
        p.sub_((lr * update).to(p.dtype))
        offset += p.numel()
