"""PSG — perturbed sign-gradient boundary unlearning (Nahass et al. 2025; DESIGN.md "PSG").

Bilevel method. **Inner problem** (per forget sample, on the frozen *original* model ``f``): move the
input to the nearest decision boundary inside an L∞ ball of radius ``epsilon`` (intersected with the
valid pixel range) with perturbed sign-gradient steps

    d_t      = sign( ∇_x CE(f(x_t), y) / s  +  lam·(x_t − x)  +  gamma·z_t ),   z_t ~ N(0, I)
    x_{t+1}  = Proj_{‖x' − x‖∞ ≤ ε, x' ∈ [lo, hi]} (x_t + α_t·d_t),              x_0 = x,

with ``α_t = ε/(t + 1)`` (``inner_steps = 1`` is the published one-step form: one step of size ε).
``s`` is the per-sample RMS of the gradient (``grad_scale="rms"``), which makes ``gamma`` and ``lam``
scale-free — a confidently classified sample has a tiny gradient that any fixed noise level would
drown; ``grad_scale="none"`` is the literal published arithmetic (``s = 1``). With ``kappa > 0`` a
sample stops once its true-class probability ``p_y(x_t) ≤ kappa`` (the convergent multi-step form).
The new label is ``y' = argmax f(x')``: the nearest wrong class, or the true class when the ball
holds no boundary (counted as ``relabel_stayed_true``; ``stayed_true="runner_up"`` takes the
second class of ``f(x')`` instead).

**Outer problem**: fine-tune a copy of the model on the *clean* forget samples with the new labels
plus weighted remain supervision, ``CE(f_θ(x_f), y') + remain_weight · CE(f_θ(x_r), y_r)``
(``soft_labels=True``: the remain targets are the original model's softmax at ``temperature``).
With ``gamma > 0`` the inner problem is solved afresh at every visit of a forget mini-batch (fresh
noise); with ``gamma = 0`` it is deterministic and solved once per sample.

``gamma = lam = 0`` (one step) is Boundary Shrink (Chen et al. 2023), :func:`boundary_shrink`,
which is implemented separately (a plain FGSM neighbour search) and must agree with it exactly.

:func:`psg_segmentation` is the pixel-level form for segmentation models: forget pixels are
relabelled to the original model's prediction at the boundary point (the nearest wrong class).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import count, positive
from ..models_classify import as_xy, model_device, num_classes
from .classification import (
    _batches,
    _copy_model,
    _finish,
    _generator,
    _make_optimizer,
    _seed_check,
    _soft_cross_entropy,
    _train_mode,
    _trainable,
)

__all__ = ["psg", "boundary_shrink", "psg_segmentation", "perturbed_sign_step", "boundary_points"]

_STAYED = ("keep", "runner_up")
_GRAD_SCALES = ("rms", "none")


# --------------------------------------------------------------------------------------------------
# Inner problem
# --------------------------------------------------------------------------------------------------
def _check_range(clip_range: Optional[Sequence[float]]) -> Optional[tuple[float, float]]:
    if clip_range is None:
        return None
    try:
        lo, hi = (float(v) for v in clip_range)
    except (TypeError, ValueError):
        raise TypeError(f"clip_range must be a (low, high) pair of numbers or None, got {clip_range!r}") from None
    if not lo < hi:
        raise ValueError(f"clip_range must have low < high, got {clip_range!r}")
    return lo, hi


def _check_inner(epsilon, gamma, lam, inner_steps, kappa, grad_scale, stayed_true, clip_range):
    epsilon = positive(epsilon, "epsilon")
    gamma = positive(gamma, "gamma", allow_zero=True)
    lam = positive(lam, "lam", allow_zero=True)
    count(inner_steps, "inner_steps")
    kappa = positive(kappa, "kappa", allow_zero=True)
    if kappa >= 1:
        raise ValueError(f"kappa must be in [0, 1), got {kappa!r}")
    if grad_scale not in _GRAD_SCALES:
        raise ValueError(f"grad_scale must be one of {_GRAD_SCALES}, got {grad_scale!r}")
    if stayed_true not in _STAYED:
        raise ValueError(f"stayed_true must be one of {_STAYED}, got {stayed_true!r}")
    return epsilon, gamma, lam, kappa, _check_range(clip_range)


def perturbed_sign_step(
    grad: Tensor,
    x_t: Tensor,
    x: Tensor,
    *,
    step: float,
    epsilon: float,
    gamma: float = 0.0,
    lam: float = 0.0,
    noise: Optional[Tensor] = None,
    grad_scale: str = "rms",
    clip_range: Optional[Sequence[float]] = (0.0, 1.0),
) -> Tensor:
    """One PSG step ``Proj(x_t + step·sign(grad/s + lam·(x_t − x) + gamma·noise))`` (module docstring).

    ``grad``, ``x_t``, ``x``, ``noise``: ``(B, ...)``. The projection is onto the L∞ ball of radius
    ``epsilon`` around ``x`` intersected with ``clip_range`` (``None``: no pixel range).
    """
    if grad_scale not in _GRAD_SCALES:
        raise ValueError(f"grad_scale must be one of {_GRAD_SCALES}, got {grad_scale!r}")
    if gamma == 0.0 and lam == 0.0:
        direction = grad.sign()  # the scale s > 0 cannot change the sign: skip it (exact Boundary Shrink)
    else:
        g = grad
        if grad_scale == "rms":
            rms = grad.flatten(1).square().mean(dim=1).sqrt().clamp_min(1e-30)
            g = grad / rms.reshape((-1,) + (1,) * (grad.dim() - 1))
        v = g
        if lam != 0.0:
            v = v + lam * (x_t - x)
        if gamma != 0.0:
            if noise is None:
                raise ValueError("noise is required when gamma > 0")
            v = v + gamma * noise
        direction = v.sign()
    out = torch.minimum(torch.maximum(x_t + step * direction, x - epsilon), x + epsilon)
    if clip_range is not None:
        out = out.clamp(clip_range[0], clip_range[1])
    return out


def _relabel(logits: Tensor, y: Tensor, stayed_true: str) -> Tensor:
    """argmax of ``logits`` over dim 1, or (``runner_up``) the second class where the argmax is ``y``.

    ``logits`` ``(B, K, ...)``; ``K == 1`` is a sigmoid binary model (label = logit > 0; the runner-up
    of class c is 1 − c).
    """
    if logits.shape[1] == 1:
        new = (logits[:, 0] > 0).long()
        if stayed_true == "runner_up":
            new = torch.where(new == y, 1 - y, new)
        return new
    new = logits.argmax(dim=1)
    if stayed_true == "runner_up":
        second = logits.topk(2, dim=1).indices[:, 1]
        new = torch.where(new == y, second, new)
    return new


def boundary_points(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float,
    gamma: float = 0.0,
    lam: float = 0.0,
    inner_steps: int = 1,
    kappa: float = 0.0,
    grad_scale: str = "rms",
    clip_range: Optional[Sequence[float]] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Solve the PSG inner problem for a batch of a classifier: ``(x', steps taken per sample)``.

    ``model`` is used as is (put it in eval mode and freeze it); its parameter gradients are not
    touched. ``generator`` drives the noise ``z`` (needed when ``gamma > 0``).
    """
    epsilon, gamma, lam, kappa, rng = _check_inner(epsilon, gamma, lam, inner_steps, kappa, grad_scale,
                                                   "keep", clip_range)
    if gamma > 0 and generator is None:
        raise ValueError("a generator is required when gamma > 0 (it draws the noise z)")
    x = x.detach()
    x_t = x.clone()
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    taken = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for t in range(inner_steps):
        x_req = x_t.detach().requires_grad_(True)
        logits = model(x_req)
        if kappa > 0:
            with torch.no_grad():
                p_true = torch.softmax(logits.detach().float(), dim=1).gather(1, y[:, None])[:, 0]
            active = active & (p_true > kappa)
            if not bool(active.any()):
                break
        loss = F.cross_entropy(logits, y, reduction="sum")  # sum: each sample's gradient is its own
        (grad,) = torch.autograd.grad(loss, x_req)
        noise = None
        if gamma > 0:
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        x_new = perturbed_sign_step(grad, x_t, x, step=epsilon / (t + 1), epsilon=epsilon, gamma=gamma, lam=lam,
                                    noise=noise, grad_scale=grad_scale, clip_range=rng)
        keep = active.reshape((-1,) + (1,) * (x.dim() - 1))
        x_t = torch.where(keep, x_new, x_t).detach()
        taken += active.long()
    return x_t, taken


# --------------------------------------------------------------------------------------------------
# Outer problem (shared by psg and boundary_shrink)
# --------------------------------------------------------------------------------------------------
def _frozen_copy(model: nn.Module) -> nn.Module:
    orig = copy.deepcopy(model).eval()
    for p in orig.parameters():
        p.requires_grad_(False)
    return orig


def _outer_loop(
    net: nn.Module,
    orig: nn.Module,
    xf: Tensor,
    yf: Tensor,
    remain: Optional[tuple[Tensor, Tensor]],
    relabel_fn,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    forget_batch_size: int,
    remain_weight: float,
    soft_labels: bool,
    temperature: float,
    optimizer: str,
    weight_decay: float,
    seed: int,
    precompute: bool,
) -> dict[str, Any]:
    """Fine-tune ``net`` on (clean forget sample, new label) + remain_weight × remain supervision.

    ``relabel_fn(indices) -> (labels, steps_taken)`` solves the inner problem for forget samples.
    Forget and remain batches are drawn from two generators seeded by ``seed`` so that whether remain
    batches are drawn never changes the forget batch order.
    """
    n = xf.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long, device=xf.device)
    taken = torch.zeros(n, dtype=torch.long, device=xf.device)
    visits = stayed_visits = 0
    if precompute:
        for idx in torch.arange(n, device=xf.device).split(max(forget_batch_size, 256)):
            labels[idx], taken[idx] = relabel_fn(idx)
    opt = _make_optimizer(_trainable(net), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    fgt = _batches(n, forget_batch_size, _generator(seed, xf.device))
    use_remain = remain is not None and remain_weight > 0
    if use_remain:
        xr, yr = remain
        rem = _batches(xr.shape[0], batch_size, _generator(seed + 1, xr.device))
    _train_mode(net)
    loss_f = loss_r = torch.zeros(())
    for _ in range(steps):
        idx = next(fgt)
        if precompute:
            y_new = labels[idx]
        else:
            y_new, t_idx = relabel_fn(idx)
            labels[idx], taken[idx] = y_new, t_idx
        visits += idx.numel()
        stayed_visits += int((y_new == yf[idx]).sum())
        loss_f = F.cross_entropy(net(xf[idx]), y_new)
        loss = loss_f
        if use_remain:
            ir = next(rem)
            logits_r = net(xr[ir])
            if soft_labels:
                with torch.no_grad():
                    target = torch.softmax(orig(xr[ir]).float() / temperature, dim=1)
                loss_r = _soft_cross_entropy(logits_r, target)
            else:
                loss_r = F.cross_entropy(logits_r, yr[ir])
            loss = loss_f + remain_weight * loss_r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seen = labels >= 0
    return {
        "relabel_stayed_true": int((labels[seen] == yf[seen]).sum()),
        "relabel_stayed_true_rate": (stayed_visits / visits) if visits else float("nan"),
        "relabel_counts": torch.bincount(labels[seen], minlength=num_classes(orig, xf)).tolist(),
        "inner_steps_taken_mean": float(taken[seen].float().mean()) if bool(seen.any()) else 0.0,
        "inner_steps_taken_max": int(taken[seen].max()) if bool(seen.any()) else 0,
        "n_relabelled": int(seen.sum()),
        "relabel_mode": "once" if precompute else "per_visit",
        "final_forget_loss": float(loss_f.detach()),
        "final_remain_loss": float(loss_r.detach()),
        "new_labels": labels.cpu(),
    }


def _common_checks(steps, lr, batch_size, forget_batch_size, remain_weight, temperature, weight_decay, seed):
    count(steps, "steps", minimum=0)
    positive(lr, "lr")
    count(batch_size, "batch_size")
    fbs = batch_size if forget_batch_size is None else count(forget_batch_size, "forget_batch_size")
    remain_weight = positive(remain_weight, "remain_weight", allow_zero=True)
    temperature = positive(temperature, "temperature")
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    return fbs, remain_weight, temperature


# --------------------------------------------------------------------------------------------------
# Public classification methods
# --------------------------------------------------------------------------------------------------
def _forget_remain(model: nn.Module, forget, remain, remain_weight: float, rng):
    """Validated forget (x, y), optional remain (x, y); forget inputs must lie in ``clip_range``."""
    xf, yf = as_xy(forget, "forget", model=model)
    rem = None
    if remain is not None:
        rem = as_xy(remain, "remain", model=model)
    elif remain_weight > 0:
        raise ValueError("remain is None but remain_weight > 0; pass remain data or set remain_weight=0")
    if rng is not None and (xf.min() < rng[0] or xf.max() > rng[1]):
        raise ValueError(f"forget: x has values in [{float(xf.min()):.4g}, {float(xf.max()):.4g}], outside "
                         f"clip_range {rng}; rescale the inputs or pass the right clip_range (None: no range)")
    return xf, yf, rem


def psg(
    model: nn.Module,
    forget,
    remain=None,
    *,
    epsilon: float = 0.25,
    gamma: float = 0.5,
    lam: float = 0.0,
    remain_weight: float = 1.0,
    inner_steps: int = 10,
    kappa: float = 0.1,
    soft_labels: bool = False,
    temperature: float = 1.0,
    stayed_true: str = "keep",
    grad_scale: str = "rms",
    clip_range: Optional[Sequence[float]] = (0.0, 1.0),
    steps: int = 60,
    lr: float = 1e-3,
    batch_size: int = 64,
    forget_batch_size: Optional[int] = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Perturbed sign-gradient unlearning of the ``forget`` samples of a classifier (module docstring).

    Args:
        model: classifier ``(B, ...) -> (B, K)``; copied unless ``inplace``.
        forget, remain: ``(x, y)`` pairs or ``TensorDataset``s (``remain`` may be ``None`` only with
            ``remain_weight == 0``).
        epsilon: L∞ radius of the boundary search, in input units; ``clip_range`` the valid pixel range.
        gamma, lam: noise scale and closeness term of the perturbed sign gradient.
        inner_steps, kappa: number of inner steps (1 = published one-step form) and the early stop
            ``p_y(x') ≤ kappa`` (0 disables it).
        remain_weight, soft_labels, temperature: weight of the remain term; soft labels use the
            original model's softmax on the remain samples instead of their hard labels.
        stayed_true: what to do when ``argmax f(x') == y`` — ``"keep"`` the label (published), or take
            the ``"runner_up"`` class.
        steps, lr, batch_size, forget_batch_size, weight_decay, optimizer, seed: outer fine-tuning.

    Returns ``(model, record)``; the record holds the hyper-parameters, ``wall_s``,
    ``relabel_stayed_true`` (forget samples whose last relabel is their true class),
    ``relabel_stayed_true_rate`` (over all visits), ``relabel_counts`` (per new class),
    ``inner_steps_taken_mean/max`` and ``new_labels``.
    """
    start = time.perf_counter()
    epsilon, gamma, lam, kappa, rng = _check_inner(epsilon, gamma, lam, inner_steps, kappa, grad_scale,
                                                   stayed_true, clip_range)
    fbs, remain_weight, temperature = _common_checks(steps, lr, batch_size, forget_batch_size, remain_weight,
                                                     temperature, weight_decay, seed)
    xf, yf, rem = _forget_remain(model, forget, remain, remain_weight, rng)
    orig = _frozen_copy(model)
    net = _copy_model(model, inplace)
    noise_gen = _generator(seed + 2, xf.device)

    def relabel(idx: Tensor) -> tuple[Tensor, Tensor]:
        x_adv, taken = boundary_points(orig, xf[idx], yf[idx], epsilon=epsilon, gamma=gamma, lam=lam,
                                       inner_steps=inner_steps, kappa=kappa, grad_scale=grad_scale,
                                       clip_range=rng, generator=noise_gen)
        with torch.no_grad():
            return _relabel(orig(x_adv), yf[idx], stayed_true), taken

    out = _outer_loop(net, orig, xf, yf, rem, relabel, steps=steps, lr=lr, batch_size=batch_size,
                      forget_batch_size=fbs, remain_weight=remain_weight, soft_labels=soft_labels,
                      temperature=temperature, optimizer=optimizer, weight_decay=weight_decay, seed=seed,
                      precompute=gamma == 0.0)
    record = {"method": "psg", "epsilon": epsilon, "gamma": gamma, "lam": lam, "inner_steps": inner_steps,
              "kappa": kappa, "remain_weight": remain_weight, "soft_labels": bool(soft_labels),
              "temperature": temperature, "stayed_true": stayed_true, "grad_scale": grad_scale,
              "clip_range": rng, "steps": steps, "lr": lr, "batch_size": batch_size, "forget_batch_size": fbs,
              "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
              "n_forget": int(xf.shape[0]), "n_remain": int(rem[0].shape[0]) if rem is not None else 0, **out}
    return _finish(net, record, start)


def boundary_shrink(
    model: nn.Module,
    forget,
    remain=None,
    *,
    epsilon: float = 0.25,
    remain_weight: float = 0.0,
    soft_labels: bool = False,
    temperature: float = 1.0,
    clip_range: Optional[Sequence[float]] = (0.0, 1.0),
    steps: int = 60,
    lr: float = 1e-3,
    batch_size: int = 64,
    forget_batch_size: Optional[int] = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Boundary Shrink (Chen et al. 2023): FGSM neighbour search, relabel, fine-tune.

    Each forget sample is moved by one signed-gradient step of size ``epsilon`` on the frozen
    original model (``x' = clip(x + ε·sign ∇_x CE(f(x), y))`` in the pixel range), relabelled
    ``y' = argmax f(x')``, and the model is fine-tuned on ``(x, y')``. The published method uses no
    remain data (``remain_weight = 0``); a positive ``remain_weight`` adds the remain term as in
    :func:`psg`. Equal to ``psg(gamma=0, lam=0, inner_steps=1, kappa=0, stayed_true="keep")`` with the
    same remaining arguments.
    """
    start = time.perf_counter()
    epsilon = positive(epsilon, "epsilon")
    rng = _check_range(clip_range)
    fbs, remain_weight, temperature = _common_checks(steps, lr, batch_size, forget_batch_size, remain_weight,
                                                     temperature, weight_decay, seed)
    xf, yf, rem = _forget_remain(model, forget, remain, remain_weight, rng)
    orig = _frozen_copy(model)
    net = _copy_model(model, inplace)

    def fgsm_relabel(idx: Tensor) -> tuple[Tensor, Tensor]:
        x = xf[idx].detach().clone().requires_grad_(True)
        loss = F.cross_entropy(orig(x), yf[idx], reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        x_adv = x.detach() + epsilon * grad.sign()
        if rng is not None:
            x_adv = x_adv.clamp(rng[0], rng[1])
        with torch.no_grad():
            new = orig(x_adv).argmax(dim=1)
        return new, torch.ones_like(new)

    out = _outer_loop(net, orig, xf, yf, rem, fgsm_relabel, steps=steps, lr=lr, batch_size=batch_size,
                      forget_batch_size=fbs, remain_weight=remain_weight, soft_labels=soft_labels,
                      temperature=temperature, optimizer=optimizer, weight_decay=weight_decay, seed=seed,
                      precompute=True)
    record = {"method": "boundary_shrink", "epsilon": epsilon, "remain_weight": remain_weight,
              "soft_labels": bool(soft_labels), "temperature": temperature, "clip_range": rng, "steps": steps,
              "lr": lr, "batch_size": batch_size, "forget_batch_size": fbs, "weight_decay": weight_decay,
              "optimizer": optimizer, "seed": seed, "n_forget": int(xf.shape[0]),
              "n_remain": int(rem[0].shape[0]) if rem is not None else 0, **out}
    return _finish(net, record, start)


# --------------------------------------------------------------------------------------------------
# Pixel-level PSG for segmentation
# --------------------------------------------------------------------------------------------------
_SEG_FIELDS = ("images", "target", "retain", "forget", "coarse")


def _seg_data(data, model: nn.Module) -> dict[str, Tensor]:
    """Read and check the duck-typed fields of a ``SegmentationUnlearningData``."""
    if type(data).__name__ == "StreamingSegmentationData":
        raise TypeError("psg_segmentation needs in-memory data (it keeps every forget image's new labels): pass a "
                        "SegmentationUnlearningData, e.g. data.batch(indices) of the images to use")
    missing = [f for f in _SEG_FIELDS if not hasattr(data, f)]
    if missing:
        raise TypeError(f"data must have the fields {_SEG_FIELDS} (a SegmentationUnlearningData); "
                        f"{type(data).__name__} lacks {missing}")
    d = {f: getattr(data, f) for f in _SEG_FIELDS}
    for f, t in d.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"data.{f} must be a torch.Tensor, got {type(t).__name__}")
    images = d["images"]
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"data.images must be a float (N, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    n, _, h, w = images.shape
    for f in ("target", "retain", "forget", "coarse"):
        if tuple(d[f].shape) != (n, h, w):
            raise ValueError(f"data.{f} must have shape {(n, h, w)} to match data.images, got {tuple(d[f].shape)}")
    for f in ("retain", "forget"):
        if d[f].dtype != torch.bool:
            raise TypeError(f"data.{f} must be a bool mask, got dtype {d[f].dtype}")
    for f in ("target", "coarse"):
        if d[f].is_floating_point() or d[f].dtype == torch.bool:
            raise TypeError(f"data.{f} must hold integer labels, got dtype {d[f].dtype}")
    if n == 0 or not bool(d["forget"].any()):
        raise ValueError("data.forget is empty: no forget pixel in any image, nothing to unlearn")
    dev = model_device(model)
    for f, t in d.items():
        if dev is not None and t.device != dev:
            raise ValueError(f"data.{f} is on {t.device} but the model is on {dev}")
    if not torch.isfinite(images).all():
        raise ValueError("data.images contains non-finite values")
    return d


def _pixel_prob_of(logits: Tensor, labels: Tensor) -> Tensor:
    """Probability the model gives to ``labels`` per pixel: logits ``(B, K, H, W)``, labels ``(B, H, W)``."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0].float())
        return torch.where(labels == 1, p1, 1 - p1)
    return torch.softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]


def psg_segmentation(
    model: nn.Module,
    data,
    *,
    epsilon: float = 0.03,
    gamma: float = 0.0,
    lam: float = 0.0,
    inner_steps: int = 10,
    kappa: float = 0.1,
    remain_weight: float = 1.0,
    stayed_true: str = "keep",
    grad_scale: str = "rms",
    clip_range: Optional[Sequence[float]] = (0.0, 1.0),
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    inplace: bool = False,
    loss="ce",
) -> tuple[nn.Module, dict[str, Any]]:
    """Pixel-level PSG: relabel forget pixels to the original model's prediction at a boundary point.

    ``model`` maps images ``(B, C, H, W)`` to logits ``(B, K, H, W)`` (``K = 1``: sigmoid binary;
    ``K ≥ 2``: softmax). ``data`` has tensor fields ``images`` (float in the pixel range), ``target``
    (labels of the retain pixels), ``retain``/``forget`` (bool masks) and ``coarse`` (the labels the
    original model was trained on) — a ``pyunlearn.unlearn.data.SegmentationUnlearningData``.

    Inner step, on images with any forget pixel and the frozen original model: the perturbed sign
    gradient of the masked pixel cross-entropy of the forget pixels (coarse labels) w.r.t. the
    image, projected onto the L∞ ball of radius ``epsilon`` and ``clip_range``; with ``kappa > 0`` an
    image stops once the mean coarse-label probability of its forget pixels is ``≤ kappa``. Each
    forget pixel gets the original model's label at ``x'`` (binary: ``sigmoid > 0.5``;
    ``stayed_true="runner_up"``: the other class where it stays on the coarse label — the "Relabel"
    baseline for binary models). Outer loop, ``steps`` mini-batches of ``batch_size`` images:
    ``loss(forget pixels, new labels) + remain_weight · loss(retain pixels, target)`` with ``loss`` a name
    (``"ce"``, the default, ``"dice"``, ``"dice_ce"``, ``"focal"``) or a callable
    (:func:`pyunlearn.losses.get_loss`); the inner attack always ascends the cross-entropy; forget pixels that ``retain`` also holds (a fine-labelled image's retain set is
    every pixel) are left out of the retain term. Parameters with ``requires_grad=False`` (a frozen
    encoder) stay untouched.

    Returns ``(model, record)`` with ``relabel_stayed_true`` (forget pixels whose last new label is
    their coarse label), ``relabel_stayed_true_rate`` (over all pixel visits), ``forget_pixels``,
    ``inner_steps_taken_mean/max`` (per image) and the hyper-parameters and ``wall_s``.
    """
    from ..losses import get_loss, masked_cross_entropy

    start = time.perf_counter()
    outer_loss = get_loss(loss)
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__qualname__", repr(loss))
    epsilon, gamma, lam, kappa, rng = _check_inner(epsilon, gamma, lam, inner_steps, kappa, grad_scale,
                                                   stayed_true, clip_range)
    count(steps, "steps", minimum=0)
    positive(lr, "lr")
    count(batch_size, "batch_size")
    remain_weight = positive(remain_weight, "remain_weight", allow_zero=True)
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    d = _seg_data(data, model)
    images, target, retain, forget, coarse = (d[f] for f in _SEG_FIELDS)
    target, coarse = target.long(), coarse.long()
    retain = retain & ~forget  # forget pixels are supervised by their new labels only
    if rng is not None and (images.min() < rng[0] or images.max() > rng[1]):
        raise ValueError(f"data.images has values in [{float(images.min()):.4g}, {float(images.max()):.4g}], "
                         f"outside clip_range {rng}")
    orig = _frozen_copy(model)
    net = _copy_model(model, inplace)
    with torch.no_grad():
        k = orig(images[:1]).shape[1]
    noise_gen = _generator(seed + 2, images.device)

    def inner(idx: Tensor) -> tuple[Tensor, Tensor]:
        """New labels (B, H, W) for images idx (forget pixels only are meaningful) and steps taken."""
        x = images[idx]
        fmask, lab = forget[idx], coarse[idx]
        active = fmask.flatten(1).any(dim=1)
        x_t = x.clone()
        taken = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for t in range(inner_steps):
            x_req = x_t.detach().requires_grad_(True)
            logits = orig(x_req)
            if kappa > 0:
                with torch.no_grad():
                    p = _pixel_prob_of(logits.detach(), lab)
                    fm = fmask.float()
                    mean_p = (p * fm).flatten(1).sum(1) / fm.flatten(1).sum(1).clamp_min(1.0)
                active = active & (mean_p > kappa)
            if not bool(active.any()):
                break
            loss = masked_cross_entropy(logits, lab, fmask, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_req)
            noise = None
            if gamma > 0:
                noise = torch.randn(x.shape, generator=noise_gen, device=noise_gen.device,
                                    dtype=x.dtype).to(x.device)
            x_new = perturbed_sign_step(grad, x_t, x, step=epsilon / (t + 1), epsilon=epsilon, gamma=gamma,
                                        lam=lam, noise=noise, grad_scale=grad_scale, clip_range=rng)
            x_t = torch.where(active[:, None, None, None], x_new, x_t).detach()
            taken += active.long()
        with torch.no_grad():
            new = _relabel(orig(x_t), lab, stayed_true)
        return new, taken

    n = images.shape[0]
    has_forget = forget.flatten(1).any(dim=1)
    usable = torch.nonzero(has_forget | retain.flatten(1).any(dim=1)).flatten()
    new_labels = torch.full_like(coarse, -1)
    taken_img = torch.zeros(n, dtype=torch.long, device=images.device)
    visits = stayed_visits = 0
    precompute = gamma == 0.0
    fidx = torch.nonzero(has_forget).flatten()
    if precompute:
        for idx in fidx.split(batch_size):
            new_labels[idx], taken_img[idx] = inner(idx)
    opt = _make_optimizer(_trainable(net), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    batches = _batches(usable.numel(), batch_size, _generator(seed, images.device))
    _train_mode(net)
    loss_f = loss_r = torch.zeros(())
    for _ in range(steps):
        idx = usable[next(batches)]
        fmask = forget[idx]
        if precompute:
            lab = new_labels[idx]
        else:
            sub = idx[has_forget[idx]]
            if sub.numel():
                new_labels[sub], taken_img[sub] = inner(sub)
            lab = new_labels[idx]
        visits += int(fmask.sum())
        stayed_visits += int(((lab == coarse[idx]) & fmask).sum())
        tgt = torch.where(fmask, lab.clamp_min(0), target[idx])
        logits = net(images[idx])
        loss_f = outer_loss(logits, tgt, fmask, reduction="mean")
        loss = loss_f
        if remain_weight > 0:
            loss_r = outer_loss(logits, tgt, retain[idx], reduction="mean")
            loss = loss_f + remain_weight * loss_r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seen = (new_labels >= 0) & forget
    seen_img = torch.nonzero(seen.flatten(1).any(dim=1)).flatten()
    record = {"method": "psg_segmentation", "epsilon": epsilon, "gamma": gamma, "lam": lam,
              "inner_steps": inner_steps, "kappa": kappa, "remain_weight": remain_weight,
              "stayed_true": stayed_true, "grad_scale": grad_scale, "clip_range": rng, "steps": steps, "lr": lr,
              "batch_size": batch_size, "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
              "loss": loss_name,
              "num_classes": int(k), "forget_pixels": int(forget.sum()), "forget_images": int(fidx.numel()),
              "relabelled_pixels": int(seen.sum()),
              "relabel_stayed_true": int(((new_labels == coarse) & seen).sum()),
              "relabel_stayed_true_rate": (stayed_visits / visits) if visits else float("nan"),
              "inner_steps_taken_mean": float(taken_img[seen_img].float().mean()) if seen_img.numel() else 0.0,
              "inner_steps_taken_max": int(taken_img[seen_img].max()) if seen_img.numel() else 0,
              "relabel_mode": "once" if precompute else "per_visit",
              "final_forget_loss": float(loss_f.detach()), "final_remain_loss": float(loss_r.detach())}
    return _finish(net, record, start)
