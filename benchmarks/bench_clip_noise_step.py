#!/usr/bin/env python
"""Multi-tensor clip + noise + update steps, providers side by side.

Ops: ``gradient_clipping_step_``, ``model_clipping_step_``, ``dpsgd_step_`` on a conv-net-like list of
float32 parameters (default about 4.5M elements in 46 tensors; ``--quick``: about 195K). Providers:

* ``reference``      the pure-PyTorch reference (``pyunlearn.ops.reference``, ChaCha20 noise);
* ``cpp``            the fused C++ kernel through the public op (``PYUNLEARN_BACKEND=cpp``);
* ``optimizer_step`` what users call: ``GradientClipping.step()`` / ``ModelClipping.step()`` on the same
  parameters (validation, frozen hyper-parameters, fingerprint check and bookkeeping included), with the
  fastest live backend;
* ``cuda``           the CUDA C++ kernel (GPU, when built);
* ``triton``         the Triton kernel (GPU);
* ``torch_unfused``  the natural PyTorch sequence: per-tensor norms, clip, update, ``torch.randn_like``
  noise (a different RNG: the honest baseline a user would write);
* ``torch_foreach``  the same with ``torch._foreach_*`` multi-tensor ops.

Timing rounds are interleaved across providers. Reported: median and IQR (ms), the minimal bytes the
op must move (gradient clipping 16 B/param: read g, then read x, g and write x; model clipping 20 B:
the update pass writes y, the projection pass reads and writes it; DP-SGD 12 B), the achieved GB/s
and its fraction of the measured device-to-device copy bandwidth, the speed-up over the reference, and
``vs_op`` (a provider's time over the fastest compiled op's: ``optimizer_step`` should be close to 1) and
``vs_foreach`` (the ``torch_foreach`` time over the provider's: > 1 is faster than the PyTorch sequence).
A ``noise`` row times ``ops.gaussian_noise`` alone (float64 normals; GB/s of 8-byte outputs).
Results: ``benchmarks/results/bench_clip_noise_step-*``.

    python benchmarks/bench_clip_noise_step.py [--quick] [--threads N]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import pyunlearn.ops as ops  # noqa: E402
from pyunlearn import optim  # noqa: E402
from pyunlearn.ops import reference as ref  # noqa: E402
from pyunlearn.ops import rng  # noqa: E402

LR, WD, CLIP, SIGMA, SEED = 0.01, 1e-4, 1.0, 1e-3, 1234
KEY, FP_KEY = rng.key_from_seed(SEED, "bench"), [12345, 67890]
NOISE_MULTIPLIER, EXPECTED_BATCH = 1.1, 64.0
BYTES_PER_PARAM = {"gradient_clipping_step_": 16, "model_clipping_step_": 20, "dpsgd_step_": 12}


def make_shapes(total: int) -> list[tuple[int, ...]]:
    """Conv weights (c, c, 3, 3) and biases (c,) of a small encoder-decoder until ``total`` elements."""
    shapes: list[tuple[int, ...]] = [(32, 3, 3, 3), (32,)]
    channels = [32, 64, 128, 256, 256, 128, 64, 32]
    i, n = 0, sum(torch.Size(s).numel() for s in shapes)
    while n < total:
        c = channels[i % len(channels)]
        shapes += [(c, c, 3, 3), (c,)]
        n += c * c * 9 + c
        i += 1
    return shapes + [(2, 32, 1, 1), (2,)]


def torch_providers(op: str, ps: list[torch.Tensor], gs: list[torch.Tensor]) -> dict:
    def total_norm(ts):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))

    def foreach_norm(ts):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)))

    if op == "gradient_clipping_step_":
        def unfused():
            factor = torch.clamp(CLIP / total_norm(gs).clamp_min(1e-30), max=1.0)
            for p, g in zip(ps, gs):
                p.mul_(1 - LR * WD).add_(g * factor, alpha=-LR).add_(torch.randn_like(p), alpha=SIGMA)

        def foreach():
            factor = torch.clamp(CLIP / foreach_norm(gs).clamp_min(1e-30), max=1.0)
            torch._foreach_mul_(ps, 1 - LR * WD)
            torch._foreach_add_(ps, torch._foreach_mul(gs, factor), alpha=-LR)
            torch._foreach_add_(ps, [torch.randn_like(p) for p in ps], alpha=SIGMA)
    elif op == "model_clipping_step_":
        def unfused():
            for p, g in zip(ps, gs):
                p.mul_(1 - LR * WD).add_(g, alpha=-LR)
            factor = torch.clamp(CLIP * 100 / total_norm(ps).clamp_min(1e-30), max=1.0)
            for p in ps:
                p.mul_(factor).add_(torch.randn_like(p), alpha=SIGMA)

        def foreach():
            torch._foreach_mul_(ps, 1 - LR * WD)
            torch._foreach_add_(ps, gs, alpha=-LR)
            factor = torch.clamp(CLIP * 100 / foreach_norm(ps).clamp_min(1e-30), max=1.0)
            torch._foreach_mul_(ps, factor)
            torch._foreach_add_(ps, [torch.randn_like(p) for p in ps], alpha=SIGMA)
    else:
        std = NOISE_MULTIPLIER * CLIP

        def unfused():  # Opacus' arithmetic followed by SGD with weight decay
            for p, g in zip(ps, gs):
                noisy = (g + std * torch.randn_like(g)) / EXPECTED_BATCH
                p.add_(noisy + WD * p, alpha=-LR)

        def foreach():
            noisy = torch._foreach_add(gs, [torch.randn_like(g) for g in gs], alpha=std)
            torch._foreach_div_(noisy, EXPECTED_BATCH)
            torch._foreach_add_(noisy, ps, alpha=WD)
            torch._foreach_add_(ps, noisy, alpha=-LR)
    return {"torch_unfused": unfused, "torch_foreach": foreach}


def op_kwargs(op: str, step: int) -> dict:
    if op == "gradient_clipping_step_":
        return dict(lr=LR, max_grad_norm=CLIP, weight_decay=WD, sigma=SIGMA, key=KEY, step=step, fp_key=FP_KEY)
    if op == "model_clipping_step_":
        return dict(lr=LR, max_model_norm=CLIP * 100, weight_decay=WD, sigma=SIGMA, key=KEY, step=step,
                    fp_key=FP_KEY)
    return dict(lr=LR, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP, expected_batch_size=EXPECTED_BATCH,
                weight_decay=WD, key=KEY, step=step)


def optimizer_provider(op: str, ps: list[torch.Tensor], gs: list[torch.Tensor], steps: int):
    """``step()`` of the certified optimizer over ``ps`` with gradients ``gs`` (None for DP-SGD, whose step
    needs per-sample gradients: see bench_dpsgd_step.py)."""
    params = [torch.nn.Parameter(p) for p in ps]
    if op == "gradient_clipping_step_":
        opt = optim.GradientClipping(params, lr=LR, c0=1e9, c1=CLIP, weight_decay=WD, sigma=SIGMA, delta=1e-5,
                                     steps=steps, seed=SEED)
    elif op == "model_clipping_step_":
        opt = optim.ModelClipping(params, lr=LR, c2=CLIP * 100, c0=1e9, weight_decay=WD, sigma=SIGMA, delta=1e-5,
                                  steps=steps, seed=SEED)
    else:
        return None

    def step():
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return step


def main() -> None:
    args, device, repeats = _common.setup(__doc__, repeats=15)
    total = 150_000 if args.quick else 4_194_304
    shapes = make_shapes(total)
    numel = sum(torch.Size(s).numel() for s in shapes)
    copy_gbps = _common.copy_bandwidth(device, nbytes=(1 << 25) if args.quick else (1 << 28))
    g = torch.Generator().manual_seed(0)
    rows = []
    for op in ("gradient_clipping_step_", "model_clipping_step_", "dpsgd_step_"):
        # Every provider updates its own copy of the parameters; the gradients are shared (read-only).
        grads = [(torch.randn(s, generator=g) * 0.01).to(device) for s in shapes]
        base = [(torch.randn(s, generator=g) * 0.05).to(device) for s in shapes]
        copies: dict[str, list[torch.Tensor]] = {}
        providers = {}

        def public(name: str):
            ps = copies.setdefault(name, [p.clone() for p in base])
            return lambda: getattr(ops, op)(ps, grads, **op_kwargs(op, 0))

        ref_ps = copies.setdefault("reference", [p.clone() for p in base])
        providers["reference"] = lambda: getattr(ref, op)(ref_ps, grads, **op_kwargs(op, 0))
        for backend in _common.kernel_backends(device):
            providers[backend] = _common.forced(backend, public(backend))
        step_fn = optimizer_provider(op, [p.clone() for p in base], grads, steps=10 * (repeats + 10))
        if step_fn is not None:
            providers["optimizer_step"] = step_fn
        torch_ps = [p.clone() for p in base]
        for name, fn in torch_providers(op, torch_ps, grads).items():
            providers[name] = fn
        times = _common.time_interleaved(providers, device=device, repeats=repeats)
        medians = {name: _common.summarize(seconds)["median_ms"] for name, seconds in times.items()}
        compiled = [medians[b] for b in _common.kernel_backends(device) if b in medians]
        fastest_op = min(compiled) if compiled else medians["reference"]
        for name, seconds in times.items():
            s = _common.summarize(seconds)
            nbytes = BYTES_PER_PARAM[op] * numel
            rows.append({"op": op, "provider": name, "params": numel, "tensors": len(shapes), **s,
                         "bytes": nbytes, "gb_per_s": nbytes / (s["median_ms"] * 1e-3) / 1e9,
                         "fraction_of_copy_bw": nbytes / (s["median_ms"] * 1e-3) / 1e9 / copy_gbps,
                         "speedup_vs_reference": medians["reference"] / s["median_ms"],
                         "vs_op": s["median_ms"] / fastest_op,
                         "vs_foreach": medians["torch_foreach"] / s["median_ms"]})
    noise_times = _common.time_interleaved(
        {"noise": lambda: ops.gaussian_noise(numel, key=KEY, step=0, device=device)}, device=device,
        repeats=repeats)
    s = _common.summarize(noise_times["noise"])
    rows.append({"op": "gaussian_noise", "provider": "noise", "params": numel, "tensors": 1, **s,
                 "bytes": 8 * numel, "gb_per_s": 8 * numel / (s["median_ms"] * 1e-3) / 1e9,
                 "normals_per_s": numel / (s["median_ms"] * 1e-3)})
    meta = {"environment": _common.environment(device), "quick": args.quick, "repeats": repeats,
            "copy_gb_per_s": copy_gbps, "hyperparameters": dict(lr=LR, weight_decay=WD, clip=CLIP, sigma=SIGMA,
                                    noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=EXPECTED_BATCH)}
    _common.print_table(rows, ["op", "provider", "params", "median_ms", "iqr_ms", "gb_per_s",
                               "fraction_of_copy_bw", "speedup_vs_reference", "vs_op", "vs_foreach"])
    if not args.no_save:
        paths = _common.write_results("bench_clip_noise_step", device, rows, meta, threads=args.threads)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
