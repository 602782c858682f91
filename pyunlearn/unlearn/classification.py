"""Classification unlearning baselines and model composition (DESIGN.md "Not certified, but practical").

* :func:`finetune` — fine-tune on the remain set only (forgetting by catastrophic interference).
* :func:`neggrad_plus` — NegGrad+ (Kurmanji et al. 2023): ``beta·CE(remain) − (1 − beta)·CE(forget)``.
* :func:`scrub` — SCRUB (Kurmanji et al. 2023): a student initialised from the original model
  alternates *max* steps (push its outputs away from the frozen teacher on the forget set) and
  *min* steps (stay close to the teacher on the remain set, plus remain cross-entropy).
* :func:`retrain` — train from scratch on the remain set (the exact-unlearning reference).
* :func:`compose` — feature extractor of one run + classifier head of another, briefly fine-tuned.
* :func:`train_classifier` — the plain supervised training loop (used for the original model).
* :func:`train_classifier_dpsgd` — DP-SGD training (certified by training): Poisson batches, per-sample
  clipping, noise; forgetting ``k`` samples later is covered by the group guarantee in its record.

Data are ``(x, y)`` pairs or ``TensorDataset``s; models follow the contract of
:mod:`pyunlearn.models_classify` (``compose`` needs ``features``/``head``). Every method returns
``(model, record)``; the input model is deep-copied unless ``inplace=True``, and the returned model
is in eval mode. Parameters with ``requires_grad=False`` are never updated (a frozen backbone stays
frozen, and its batch-norm statistics too).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import count, positive
from ..models_classify import as_xy, check_classifier_contract

__all__ = ["train_classifier", "train_classifier_dpsgd", "finetune", "neggrad_plus", "scrub", "retrain", "compose"]

_OPTIMIZERS = ("adam", "sgd")


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by pyunlearn.unlearn.psg)
# --------------------------------------------------------------------------------------------------
def _copy_model(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    return params


def _make_optimizer(params, *, optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")


def _train_mode(model: nn.Module) -> None:
    """``model.train()``, except batch-norm layers whose parameters are all frozen stay in eval mode."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled mini-batch indices (reshuffled every pass; the last short batch is kept)."""
    while True:
        perm = torch.randperm(n, generator=gen, device=gen.device)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def _seed_check(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed


def _distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) at temperature T, scaled by T² (Hinton et al.), batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _finish(model: nn.Module, record: dict, start: float) -> tuple[nn.Module, dict]:
    model.eval()
    record["wall_s"] = time.perf_counter() - start
    return model, record


# --------------------------------------------------------------------------------------------------
# Plain training
# --------------------------------------------------------------------------------------------------
def train_classifier(
    model: nn.Module,
    data,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model`` **in place** with cross-entropy on ``data`` for ``epochs`` passes; returns a record."""
    start = time.perf_counter()
    x, y = as_xy(data, "data", model=model)
    count(epochs, "epochs", minimum=0)
    count(batch_size, "batch_size")
    positive(lr, "lr")
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    opt = _make_optimizer(_trainable(model), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    gen = _generator(seed, x.device)
    batches = _batches(x.shape[0], batch_size, gen)
    steps = epochs * -(-x.shape[0] // batch_size)
    _train_mode(model)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = next(batches)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return {"method": "train", "epochs": epochs, "steps": steps, "lr": lr, "batch_size": batch_size,
            "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
            "final_loss": float(loss.detach()), "wall_s": time.perf_counter() - start}


def train_classifier_dpsgd(
    model: nn.Module,
    data,
    *,
    steps: int,
    sample_rate: float,
    max_grad_norm: float = 1.0,
    noise_multiplier: Optional[float] = None,
    epsilon: Optional[float] = None,
    delta: float = 1e-5,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    forget_size: int = 1,
    accountant: str = "pld",
    seed: Optional[int] = None,
) -> dict[str, Any]:
    """Train ``model`` **in place** with DP-SGD on ``data`` (cross-entropy); returns a record with the
    certificate (:meth:`pyunlearn.optim.DPSGD.certificate`) for ``forget_size`` removed samples.

    Batches are Poisson samples at ``sample_rate`` (:class:`pyunlearn.data.PoissonBatchSampler`), ``steps``
    of them, empty ones included: an empty batch is a noise-only step (no forward pass). The noise is
    ``noise_multiplier`` or calibrated for ``epsilon`` at ``delta`` *for a group of* ``forget_size``
    samples. ``seed`` makes the batches and the noise reproducible (NOT secret: the certificate says so);
    ``None`` draws both keys from the operating system. Every trainable layer must be supported by
    :class:`pyunlearn.per_sample.PerSampleGradients` (no batch normalisation with batch statistics).
    """
    from ..data.sampling import PoissonBatchSampler
    from ..optim.dpsgd import DPSGD
    from ..per_sample import PerSampleGradients

    start = time.perf_counter()
    x, y = as_xy(data, "data", model=model)
    count(steps, "steps")
    count(forget_size, "forget_size")
    if seed is not None:
        _seed_check(seed)
    sampler = PoissonBatchSampler(x.shape[0], sample_rate, steps, seed=seed)
    params = _trainable(model)
    opt = DPSGD(params, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                expected_batch_size=sampler.expected_batch_size, noise_multiplier=noise_multiplier, epsilon=epsilon,
                delta=delta, steps=steps if epsilon is not None else None, sample_rate=sample_rate,
                accountant=accountant, group_size=forget_size, seed=seed)
    _train_mode(model)
    sizes = []
    with PerSampleGradients(model, loss_reduction="sum") as psg:
        for t in range(steps):
            idx = sampler.batch(t).to(x.device)
            opt.zero_grad(set_to_none=True)
            if idx.numel():
                F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
                psg.clipped_sum_(max_grad_norm)
            else:
                psg.empty_batch_(max_grad_norm)
            opt.step()
            sizes.append(int(idx.numel()))
    model.eval()
    cert = opt.certificate(delta, group_size=forget_size)
    return {"method": "train_dpsgd", "steps": steps, "sample_rate": sample_rate, "lr": lr,
            "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "noise_multiplier": opt.noise_multiplier,
            "forget_size": forget_size, "seed": seed, "empty_batches": sizes.count(0),
            "mean_batch_size": sum(sizes) / len(sizes), "certificate": cert.to_dict(),
            "wall_s": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------
def finetune(
    model: nn.Module,
    forget,
    remain,
    *,
    steps: int = 150,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune on the remain set only, ``steps`` mini-batch steps (``forget`` is validated, not used)."""
    start = time.perf_counter()
    xf, _ = as_xy(forget, "forget", model=model)
    xr, yr = as_xy(remain, "remain", model=model)
    count(steps, "steps", minimum=0)
    count(batch_size, "batch_size")
    positive(lr, "lr")
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    net = _copy_model(model, inplace)
    opt = _make_optimizer(_trainable(net), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    batches = _batches(xr.shape[0], batch_size, _generator(seed, xr.device))
    _train_mode(net)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = next(batches)
        loss = F.cross_entropy(net(xr[idx]), yr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    record = {"method": "finetune", "steps": steps, "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
              "n_forget": int(xf.shape[0]), "n_remain": int(xr.shape[0]), "final_loss": float(loss.detach())}
    return _finish(net, record, start)


def neggrad_plus(
    model: nn.Module,
    forget,
    remain,
    *,
    beta: float = 0.95,
    steps: int = 100,
    lr: float = 2e-4,
    batch_size: int = 64,
    forget_batch_size: Optional[int] = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """NegGrad+: minimise ``beta·CE(remain batch) − (1 − beta)·CE(forget batch)`` for ``steps`` steps.

    ``beta`` in (0, 1]; ``beta = 1`` is :func:`finetune` (same remain batches, same result). The forget term is unbounded below, so
    keep ``steps``/``lr`` modest: the method forgets by ascending the forget loss.
    """
    start = time.perf_counter()
    xf, yf = as_xy(forget, "forget", model=model)
    xr, yr = as_xy(remain, "remain", model=model)
    beta = positive(beta, "beta")
    if beta > 1:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    count(steps, "steps", minimum=0)
    count(batch_size, "batch_size")
    fbs = batch_size if forget_batch_size is None else count(forget_batch_size, "forget_batch_size")
    positive(lr, "lr")
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    net = _copy_model(model, inplace)
    opt = _make_optimizer(_trainable(net), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    rem = _batches(xr.shape[0], batch_size, _generator(seed, xr.device))  # same order as finetune
    fgt = _batches(xf.shape[0], fbs, _generator(seed + 1, xf.device))
    _train_mode(net)
    loss_r = loss_f = torch.zeros(())
    for _ in range(steps):
        ir, i_f = next(rem), next(fgt)
        loss_r = F.cross_entropy(net(xr[ir]), yr[ir])
        loss_f = F.cross_entropy(net(xf[i_f]), yf[i_f])
        loss = beta * loss_r - (1.0 - beta) * loss_f
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    record = {"method": "neggrad_plus", "beta": beta, "steps": steps, "lr": lr, "batch_size": batch_size,
              "forget_batch_size": fbs, "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
              "n_forget": int(xf.shape[0]), "n_remain": int(xr.shape[0]),
              "final_remain_loss": float(loss_r.detach()), "final_forget_loss": float(loss_f.detach())}
    return _finish(net, record, start)


def scrub(
    model: nn.Module,
    forget,
    remain,
    *,
    epochs: int = 6,
    max_epochs: int = 3,
    alpha: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 4.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    forget_batch_size: Optional[int] = 16,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """SCRUB: teacher = the frozen original model, student = a copy of it.

    Each of ``epochs`` epochs runs, while ``epoch < max_epochs``, one pass of *max* steps over the
    forget set (minimise ``−KL_T(teacher‖student)``), then one pass of *min* steps over the remain set
    (minimise ``alpha·KL_T(teacher‖student) + gamma·CE``). ``KL_T`` is the temperature-``T``
    distillation KL scaled by ``T²``.
    """
    start = time.perf_counter()
    xf, _ = as_xy(forget, "forget", model=model)
    xr, yr = as_xy(remain, "remain", model=model)
    count(epochs, "epochs", minimum=0)
    count(max_epochs, "max_epochs", minimum=0)
    alpha = positive(alpha, "alpha", allow_zero=True)
    gamma = positive(gamma, "gamma", allow_zero=True)
    temperature = positive(temperature, "temperature")
    count(batch_size, "batch_size")
    fbs = batch_size if forget_batch_size is None else count(forget_batch_size, "forget_batch_size")
    positive(lr, "lr")
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    net = _copy_model(model, inplace)
    opt = _make_optimizer(_trainable(net), optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    gen = _generator(seed, xr.device)
    max_steps = min_steps = 0
    loss_max = loss_min = torch.zeros(())
    for epoch in range(epochs):
        _train_mode(net)
        if epoch < max_epochs:
            for idx in torch.randperm(xf.shape[0], generator=gen, device=gen.device).split(fbs):
                with torch.no_grad():
                    t_logits = teacher(xf[idx])
                loss_max = -_distill_kl(net(xf[idx]), t_logits, temperature)
                opt.zero_grad(set_to_none=True)
                loss_max.backward()
                opt.step()
                max_steps += 1
        for idx in torch.randperm(xr.shape[0], generator=gen, device=gen.device).split(batch_size):
            with torch.no_grad():
                t_logits = teacher(xr[idx])
            s_logits = net(xr[idx])
            loss_min = alpha * _distill_kl(s_logits, t_logits, temperature) + gamma * F.cross_entropy(s_logits, yr[idx])
            opt.zero_grad(set_to_none=True)
            loss_min.backward()
            opt.step()
            min_steps += 1
    record = {"method": "scrub", "epochs": epochs, "max_epochs": max_epochs, "alpha": alpha, "gamma": gamma,
              "temperature": temperature, "lr": lr, "batch_size": batch_size, "forget_batch_size": fbs,
              "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
              "max_steps": max_steps, "min_steps": min_steps,
              "n_forget": int(xf.shape[0]), "n_remain": int(xr.shape[0]),
              "final_max_loss": float(loss_max.detach()), "final_min_loss": float(loss_min.detach())}
    return _finish(net, record, start)


def _reset_parameters(model: nn.Module, seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters`` (seeded; the global RNG is restored)."""
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()


def retrain(
    model: nn.Module,
    forget,
    remain,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
    model_factory: Optional[Callable[[], nn.Module]] = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train from scratch on the remain set (the exact-unlearning reference).

    The fresh model is ``model_factory()`` if given, else a copy of ``model`` whose submodules are
    re-initialised with ``reset_parameters()`` under ``seed``. ``forget`` is validated, not used.
    """
    start = time.perf_counter()
    xf, _ = as_xy(forget, "forget", model=model)
    as_xy(remain, "remain", model=model)
    _seed_check(seed)
    if model_factory is not None:
        net = model_factory()
        if not isinstance(net, nn.Module):
            raise TypeError(f"model_factory must return an nn.Module, got {type(net).__name__}")
    else:
        net = copy.deepcopy(model)
        _reset_parameters(net, seed)
    rec = train_classifier(net, remain, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                           optimizer=optimizer, seed=seed)
    rec.update(method="retrain", n_forget=int(xf.shape[0]), init="factory" if model_factory else "reset")
    return _finish(net, rec, start)


# --------------------------------------------------------------------------------------------------
# Model composition
# --------------------------------------------------------------------------------------------------
def compose(
    remain_model: nn.Module,
    forget_model: nn.Module,
    remain_data,
    *,
    train: str = "head",
    steps: int = 50,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Feature extractor of ``remain_model`` + classifier head of ``forget_model``, fine-tuned on the remain set.

    The result is a deep copy of ``remain_model`` whose ``head`` is replaced by a deep copy of
    ``forget_model.head``; it is then fine-tuned for ``steps`` steps of cross-entropy on
    ``remain_data``: ``train="head"`` updates only the head (the feature extractor stays bit-identical),
    ``train="all"`` every trainable parameter. ``steps=0`` returns the bare composition.
    """
    start = time.perf_counter()
    check_classifier_contract(remain_model, "remain_model")
    check_classifier_contract(forget_model, "forget_model")
    if train not in ("head", "all"):
        raise ValueError(f"train must be 'head' or 'all', got {train!r}")
    x, y = as_xy(remain_data, "remain_data", model=remain_model)
    count(steps, "steps", minimum=0)
    count(batch_size, "batch_size")
    positive(lr, "lr")
    positive(weight_decay, "weight_decay", allow_zero=True)
    _seed_check(seed)
    net = copy.deepcopy(remain_model)
    net.head = copy.deepcopy(forget_model.head)
    with torch.no_grad():
        try:
            out = net(x[:1])
        except RuntimeError as exc:
            raise ValueError(f"forget_model.head does not accept the features of remain_model: {exc}") from exc
        ref = remain_model(x[:1])
    if out.shape != ref.shape:
        raise ValueError(f"the composed model outputs {tuple(out.shape)} but remain_model outputs {tuple(ref.shape)}; "
                         "the two heads must map the same features to the same classes")
    as_xy(remain_data, "remain_data", model=net)
    if train == "head":
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.head.parameters():
            p.requires_grad_(True)
    params = _trainable(net)
    opt = _make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay)
    batches = _batches(x.shape[0], batch_size, _generator(seed, x.device))
    _train_mode(net)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = next(batches)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if train == "head":  # give back the requires_grad flags of remain_model
        for p_net, p_src in zip(net.parameters(), remain_model.parameters()):
            p_net.requires_grad_(p_src.requires_grad)
        for p_net, p_src in zip(net.head.parameters(), forget_model.head.parameters()):
            p_net.requires_grad_(p_src.requires_grad)
    record = {"method": "compose", "train": train, "steps": steps, "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "optimizer": optimizer, "seed": seed,
              "n_remain": int(x.shape[0]), "final_loss": float(loss.detach())}
    return _finish(net, record, start)
