"""Pure-PyTorch reference of every fused op: the CPU fallback, the test oracle, the benchmark baseline.

Each compiled or Triton kernel computes exactly these functions (up to floating-point rounding).
Inputs here are already validated by the public API (``pyunlearn.losses``, ``pyunlearn.optim``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .rng import MASK32, STREAM_UPDATE, gaussian_noise, noisy, snap


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
#: Step status codes (first entry of a step's result): the step ran; the gradient (or, for model
#: clipping, the updated model) has a non-finite norm; the parameters do not match ``expected_fp``.
#: On any status but STATUS_OK the parameters are left unchanged.
STATUS_OK, STATUS_NONFINITE, STATUS_TAMPERED = 0, 1, 2
#: Relative tolerance of the fingerprint comparison (reductions may round differently across backends).
FP_RTOL = 1e-12


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


def _mul_lo32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for uint32 values in int64 without overflowing int64."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser."""
    h = h ^ (h >> 16)
    h = _mul_lo32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul_lo32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def fingerprint_weights(numel: int, first: int, fp_key: Sequence[int], device=None) -> torch.Tensor:
    """Keyed pseudo-random weights in [-1, 1) of global elements ``first .. first + numel - 1`` (float64):

        h_i = fmix32(fmix32(lo32(i) ^ k0) ^ hi32(i) ^ k1),   w_i = (int32(h_i) >> 8) * 2^-23

    24-bit weights, so ``w_i * x_i`` is exact in float64 for float32 ``x_i``."""
    i = torch.arange(first, first + numel, dtype=torch.int64, device=device)
    h = _fmix32(_fmix32((i & MASK32) ^ int(fp_key[0])) ^ (i >> 32) ^ int(fp_key[1]))
    signed = h - ((h >> 31) << 32)
    return (signed >> 8).double() * 2.0 ** -23


def fingerprint(params: Sequence[torch.Tensor], fp_key: Sequence[int]) -> torch.Tensor:
    """``[sum_i w_i x_i, sum_i x_i^2]`` in float64 over the concatenation of ``params`` (``w``: keyed
    weights of ``fingerprint_weights``). A keyed random projection: any edit of the values moves it,
    permutations included, unless it is orthogonal to weights the editor does not know."""
    device = params[0].device if params else None
    proj = torch.zeros((), dtype=torch.float64, device=device)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    offset = 0
    for p in params:
        x = p.detach().reshape(-1).double()
        proj = proj + (x * fingerprint_weights(x.numel(), offset, fp_key, device=x.device)).sum()
        sq = sq + (x * x).sum()
        offset += x.numel()
    return torch.stack([proj, sq])


def fingerprint_matches(current: Sequence[float], expected: Sequence[float]) -> bool:
    """Whether two fingerprints agree up to ``FP_RTOL`` (the comparison every backend makes)."""
    return len(current) == len(expected) and all(
        abs(a - b) <= FP_RTOL * max(abs(a), abs(b)) + 1e-300 for a, b in zip(current, expected))


def _status(norm: torch.Tensor, old_fp: torch.Tensor, expected_fp: Sequence[float]) -> int:
    if not bool(torch.isfinite(norm)):
        return STATUS_NONFINITE
    if expected_fp and not fingerprint_matches(old_fp.tolist(), list(expected_fp)):
        return STATUS_TAMPERED
    return STATUS_OK


def _result(status: int, norm: torch.Tensor, old_fp: torch.Tensor, new_fp: torch.Tensor) -> torch.Tensor:
    """The step's result: float64 ``[status, norm, old_proj, old_sq, new_proj, new_sq]``."""
    head = torch.tensor([float(status)], dtype=torch.float64, device=norm.device)
    return torch.cat([head, norm.double().reshape(1), old_fp, new_fp])


def add_noise_(params: Sequence[torch.Tensor], *, sigma: float, key: Sequence[int], step: int,
               stream: int = STREAM_UPDATE) -> None:
    """params[j] <- round(params[j] + sigma * noise) (float64 sum, one rounding), element indices running
    over the concatenation of ``params``."""
    if sigma == 0.0:
        return
    offset = 0
    for p in params:
        noise = gaussian_noise(p.numel(), key=key, step=step, offset=offset, stream=stream, device=p.device)
        p.copy_(noisy(p, noise.view_as(p), sigma))
        offset += p.numel()


def gradient_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_grad_norm: float,
    weight_decay: float,
    sigma: float,
    key: Sequence[int],
    step: int,
    fp_key: Sequence[int],
    expected_fp: Sequence[float] = (),
) -> torch.Tensor:
    """One step of the gradient-clipping operator, in place on ``params``:

        c = x - lr * (clip(g, C1) + weight_decay * x)        (parameter dtype; clip by the global norm)
        x <- round(c + sigma * noise(key, step))              (float64 sum, one rounding)

    Pass 1 (read only) takes the gradient norm and the fingerprint of ``params``; the parameters are
    written only if the norm is finite and the fingerprint matches ``expected_fp`` (empty: not checked).
    Returns float64 ``[status, grad_norm, old_fp (2), new_fp (2)]``.
    """
    norm = global_norm(grads)
    old_fp = fingerprint(params, fp_key)
    status = _status(norm, old_fp, expected_fp)
    if status != STATUS_OK:
        return _result(status, norm, old_fp, old_fp)
    factor = clip_factor(norm, max_grad_norm)
    for p, g in zip(params, grads):
        update = g.to(norm.dtype) * factor + weight_decay * p.to(norm.dtype)
        p.sub_((lr * update).to(p.dtype))
    add_noise_(params, sigma=sigma, key=key, step=step)
    return _result(status, norm, old_fp, fingerprint(params, fp_key))


def model_clipping_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    max_model_norm: float,
    weight_decay: float,
    sigma: float,
    key: Sequence[int],
    step: int,
    fp_key: Sequence[int],
    expected_fp: Sequence[float] = (),
) -> torch.Tensor:
    """One step of the model-clipping operator, in place:

        y = x - lr * (g + weight_decay * x);   c = clip(y, C2);   x <- round(c + sigma * noise(key, step))

    Pass 1 (read only) takes ``|y|`` and the fingerprint of ``params``; as for gradient clipping the
    parameters are written only if both are valid. Returns float64 ``[status, |y|, old_fp, new_fp]``.
    """
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    ys = []
    for p, g in zip(params, grads):
        update = g.to(acc) + weight_decay * p.to(acc)
        ys.append(p - (lr * update).to(p.dtype))
    norm = global_norm(ys)
    old_fp = fingerprint(params, fp_key)
    status = _status(norm, old_fp, expected_fp)
    if status != STATUS_OK:
        return _result(status, norm, old_fp, old_fp)
    factor = clip_factor(norm, max_model_norm)
    for p, y in zip(params, ys):
        p.copy_(y * factor.to(p.dtype))
    add_noise_(params, sigma=sigma, key=key, step=step)
    return _result(status, norm, old_fp, fingerprint(params, fp_key))


def dpsgd_step_(
    params: Sequence[torch.Tensor],
    summed_clipped_grads: Sequence[torch.Tensor],
    *,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    weight_decay: float,
    key: Sequence[int],
    step: int,
) -> None:
    """DP-SGD update from the sum of per-sample clipped gradients (Opacus' arithmetic), in float64 and
    rounded once to the parameter dtype:

        g = (sum_i clip(g_i, C) + noise_multiplier * C * noise(key, step)) / expected_batch_size
        x <- round(x - lr * (g + weight_decay * x))

    rounded on the release grid of noise scale ``lr * noise_multiplier * C / expected_batch_size`` near 0
    (``rng.snap``).
    """
    std = noise_multiplier * max_grad_norm
    offset = 0
    for p, g in zip(params, summed_clipped_grads):
        noisy_sum = g.double()
        if std > 0.0:
            noisy_sum = noisy_sum + std * gaussian_noise(p.numel(), key=key, step=step, offset=offset,
                                                         device=p.device).view_as(p)
        x = p.double()
        p.copy_(snap(x - lr * (noisy_sum / expected_batch_size + weight_decay * x),
                     lr * std / expected_batch_size, p.dtype))
        offset += p.numel()
