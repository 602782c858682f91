#!/usr/bin/env python
"""Masked pixel cross-entropy, forward + gradient w.r.t. the logits, providers side by side.

Providers:

* ``reference``       ``pyunlearn.ops.reference.masked_cross_entropy_fwd_bwd`` (pure PyTorch);
* ``cpp``             the fused C++ kernel through the public op (``PYUNLEARN_BACKEND=cpp``);
* ``cuda``            the CUDA C++ kernel (GPU, when built);
* ``triton``          the Triton kernel (GPU);
* ``torch_autograd``  what a user would write: ``F.cross_entropy`` / ``F.binary_cross_entropy_with_logits``
  per pixel, masked per-sample mean, ``backward()``.

Timing rounds are interleaved across providers. Reported: median and IQR (ms), the bytes the op must
move (read logits, targets and mask, write the gradient and the loss), the achieved GB/s and its
fraction of the measured device-to-device copy bandwidth, and the speed-up over the reference. Results: ``benchmarks/results/bench_masked_cross_entropy-*``.

    python benchmarks/bench_masked_cross_entropy.py [--quick] [--threads N]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import pyunlearn.ops as ops  # noqa: E402
from pyunlearn.ops import reference as ref  # noqa: E402

# (name, B, K, H, W, dtype, layout)
CASES = [
    ("binary-softmax", 8, 2, 256, 256, torch.float32, "contiguous"),
    ("binary-sigmoid", 8, 1, 256, 256, torch.float32, "contiguous"),
    ("21-class", 4, 21, 128, 128, torch.float32, "contiguous"),
    ("binary-softmax-bf16", 8, 2, 256, 256, torch.bfloat16, "contiguous"),
    ("4-class-channels-last", 8, 4, 128, 128, torch.float32, "channels_last"),
]
QUICK_CASES = [
    ("binary-softmax", 2, 2, 64, 64, torch.float32, "contiguous"),
    ("21-class", 2, 21, 32, 32, torch.float32, "contiguous"),
    ("binary-softmax-bf16", 2, 2, 64, 64, torch.bfloat16, "contiguous"),
]


def make_inputs(b, k, h, w, dtype, layout, device):
    g = torch.Generator().manual_seed(0)
    if layout == "channels_last":
        logits = (torch.randn(b, h * w, k, generator=g) * 3).to(dtype).permute(0, 2, 1)
    else:
        logits = (torch.randn(b, k, h * w, generator=g) * 3).to(dtype)
    target = torch.randint(0, max(k, 2), (b, h * w), generator=g)
    mask = torch.rand(b, h * w, generator=g) < 0.5
    return logits.to(device), target.to(device), mask.to(device)


def torch_autograd(logits, target, mask):
    x = logits.detach().requires_grad_(True)
    if x.shape[1] == 1:
        pixel = F.binary_cross_entropy_with_logits(x[:, 0], target.to(x.dtype), reduction="none")
    else:
        pixel = F.cross_entropy(x, target, reduction="none")
    scale = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)
    (pixel * scale).sum(dim=1).sum().backward()
    return x.grad


def main() -> None:
    args, device, repeats = _common.setup(__doc__, repeats=25)
    copy_gbps = _common.copy_bandwidth(device, nbytes=(1 << 25) if args.quick else (1 << 28))
    rows = []
    for name, b, k, h, w, dtype, layout in (QUICK_CASES if args.quick else CASES):
        logits, target, mask = make_inputs(b, k, h, w, dtype, layout, device)
        providers = {"reference": lambda: ref.masked_cross_entropy_fwd_bwd(logits, target, mask)}
        public = lambda: ops.masked_cross_entropy_fwd_bwd(logits, target, mask)  # noqa: E731
        for backend in _common.kernel_backends(device):
            providers[backend] = _common.forced(backend, public)
        providers["torch_autograd"] = lambda: torch_autograd(logits, target, mask)
        times = _common.time_interleaved(providers, device=device, repeats=repeats)
        ref_median = _common.summarize(times["reference"])["median_ms"]
        n = b * h * w
        nbytes = 2 * logits.numel() * logits.element_size() + n * (target.element_size() + 1) + 4 * b
        for provider, seconds in times.items():
            s = _common.summarize(seconds)
            rows.append({"case": name, "provider": provider, "B": b, "K": k, "pixels": h * w, "dtype": str(dtype),
                         "layout": layout, **s, "bytes": nbytes,
                         "gb_per_s": nbytes / (s["median_ms"] * 1e-3) / 1e9,
                         "fraction_of_copy_bw": nbytes / (s["median_ms"] * 1e-3) / 1e9 / copy_gbps,
                         "speedup_vs_reference": ref_median / s["median_ms"]})
    meta = {"environment": _common.environment(device), "quick": args.quick, "repeats": repeats,
            "copy_gb_per_s": copy_gbps}
    _common.print_table(rows, ["case", "provider", "median_ms", "iqr_ms", "gb_per_s", "fraction_of_copy_bw",
                               "speedup_vs_reference"])
    if not args.no_save:
        paths = _common.write_results("bench_masked_cross_entropy", device, rows, meta, threads=args.threads)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
