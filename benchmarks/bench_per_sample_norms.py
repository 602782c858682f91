#!/usr/bin/env python
"""Per-sample weight-gradient norms of a 3x3 convolution (op 3), providers side by side.

Providers:

* ``reference``      ``pyunlearn.ops.reference.per_sample_sq_norms``: unfold + batched matmul (forms the
  im2col buffer and every per-sample gradient);
* ``grouped_conv``   what ``PerSampleGradients`` does on the CPU, and on a GPU while the batch's per-sample
  gradients fit in one chunk: per-sample gradients from one grouped weight-gradient convolution (batch
  folded into the groups), then their norms;
* ``cuda``, ``triton``  the fused kernels, per-sample gradients reduced in registers (GPU);
* ``weight_grad``    one ordinary (non-private) weight-gradient convolution of the batch: the cost floor.

Timing rounds are interleaved across providers. Reported: median and IQR (ms) and the ratio to
``weight_grad``. Results: ``benchmarks/results/bench_per_sample_norms-*``.

    python benchmarks/bench_per_sample_norms.py [--quick] [--threads N]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import pyunlearn.ops as ops  # noqa: E402
from pyunlearn.ops import reference as ref  # noqa: E402
from pyunlearn.per_sample import _conv_args, _conv_per_sample, _conv_weight_grad, _sq  # noqa: E402

# (name, B, C_in, C_out, H=W): the demo decoder's convolutions, and a wider one.
CASES = [("decoder-32ch-64px", 16, 32, 32, 64), ("wide-64ch-32px", 32, 64, 64, 32)]
QUICK_CASES = [("decoder-8ch-16px", 4, 8, 8, 16)]
CONV = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))


def main() -> None:
    args, device, repeats = _common.setup(__doc__, repeats=15)
    rows = []
    for name, b, cin, cout, size in (QUICK_CASES if args.quick else CASES):
        g = torch.Generator().manual_seed(0)
        layer = nn.Conv2d(cin, cout, 3, padding=1).to(device)
        a = torch.randn(b, cin, size, size, generator=g).to(device)
        grad = torch.randn(b, cout, size, size, generator=g).to(device)
        a_padded, conv_args = _conv_args(layer, a, grad.shape)
        providers = {
            "reference": lambda: ref.per_sample_sq_norms(a, grad, **CONV),
            "grouped_conv": lambda: _sq(_conv_per_sample(layer, a_padded, grad, conv_args, weight=True,
                                                         bias=False)[0]),
            "weight_grad": lambda: _conv_weight_grad(a_padded, grad, tuple(layer.weight.shape), 1, conv_args,
                                                     bias=False),
        }
        fused = lambda: ops.per_sample_sq_norms(a, grad, **CONV)  # noqa: E731
        for backend in (b for b in _common.kernel_backends(device) if b != "cpp"):
            providers[backend] = _common.forced(backend, fused)
        times = _common.time_interleaved(providers, device=device, repeats=repeats)
        floor = _common.summarize(times["weight_grad"])["median_ms"]
        for provider, seconds in times.items():
            s = _common.summarize(seconds)
            rows.append({"case": name, "provider": provider, "B": b, "C_in": cin, "C_out": cout, "size": size, **s,
                         "ratio_to_weight_grad": s["median_ms"] / floor})
    meta = {"environment": _common.environment(device), "quick": args.quick, "repeats": repeats}
    _common.print_table(rows, ["case", "provider", "median_ms", "iqr_ms", "ratio_to_weight_grad"])
    if not args.no_save:
        paths = _common.write_results("bench_per_sample_norms", device, rows, meta, threads=args.threads)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
