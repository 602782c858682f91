#!/usr/bin/env python
"""C++ CPU noise and step kernels (pyunlearn._C, called directly) against the unfused PyTorch sequence.

At about 4.5M float32 parameters in 46 tensors (``--quick``: about 195K), default 2 threads:

* ``gaussian_noise``  ChaCha20 + float64 Box-Muller noise into a fresh float64 tensor (includes the
  allocation and first touch of the output);
* ``add_noise_``      the same noise added in place to the parameters (read, round once, write);
* ``<step>_``         the bare fused steps of pyunlearn._C (no Python layer), sigma > 0;
* ``GradientClipping.step``: the public optimizer around the same kernel (validation, fingerprint and
  status handling of the Python layer included);
* ``torch_foreach``   / ``torch_unfused``: the natural PyTorch gradient-clipping step with ``torch.randn``
  noise (benchmarks/bench_clip_noise_step.py), the baseline a user would write.

Timing rounds are interleaved across providers; wall-clock (perf_counter) and process CPU time are both
reported (medians, ms). Nothing is saved.

    python benchmarks/bench_cpu_noise.py [--quick] [--threads N] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clip_noise_step import make_shapes, torch_providers  # noqa: E402

from pyunlearn.ops import rng  # noqa: E402
from pyunlearn.ops._extension import load  # noqa: E402

LR, WD, CLIP, SIGMA = 0.01, 1e-4, 1.0, 1e-3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    C = load()
    if C is None:
        raise SystemExit("pyunlearn._C is not built")
    shapes = make_shapes(150_000 if args.quick else 4_194_304)
    repeats = args.repeats or (3 if args.quick else 15)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) * 0.01 for s in shapes]
    base = [torch.randn(s, generator=g) * 0.05 for s in shapes]
    n = sum(t.numel() for t in base)
    key, fp_key = rng.key_from_seed(1234, "bench"), [1, 2]

    def fresh():
        return [t.clone() for t in base]

    pa, pg, pm, pd = fresh(), fresh(), fresh(), fresh()
    providers = {
        "gaussian_noise": lambda: C.gaussian_noise(n, key, 0, 0, 0),
        "add_noise_": lambda: C.add_noise_(pa, SIGMA, key, 0, 0),
        "gradient_clipping_step_": lambda: C.gradient_clipping_step_(pg, grads, LR, CLIP, WD, SIGMA, key, 0, fp_key,
                                                                     []),
        "model_clipping_step_": lambda: C.model_clipping_step_(pm, grads, LR, 100 * CLIP, WD, SIGMA, key, 0, fp_key,
                                                               []),
        "dpsgd_step_": lambda: C.dpsgd_step_(pd, grads, LR, 1.1 * CLIP, 64.0, WD, key, 0),
        "fingerprint": lambda: C.fingerprint(pg, fp_key),
    }
    try:
        from pyunlearn.optim import GradientClipping

        weights = [torch.nn.Parameter(t) for t in fresh()]
        opt = GradientClipping(weights, lr=LR, c0=1e6, c1=CLIP, weight_decay=WD, delta=1e-5, steps=10**6,
                               sigma=SIGMA, seed=0)

        def public_step():
            for w, gr in zip(weights, grads):  # the step consumes the gradients
                w.grad = gr
            opt.step()

        providers["GradientClipping.step"] = public_step
    except Exception as exc:  # the Python layer may be mid-rewrite; the kernels are still measured
        print(f"GradientClipping.step not measured: {type(exc).__name__}: {exc}")
    providers.update(torch_providers("gradient_clipping_step_", fresh(), grads))
    wall = {k: [] for k in providers}
    cpu = {k: [] for k in providers}
    for fn in providers.values():
        fn()
    for _ in range(repeats):
        for name, fn in providers.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} params in {len(shapes)} tensors, {torch.get_num_threads()} threads, load average {load_avg:.2f}")
    med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    for name in providers:
        extra = ""
        if name in ("gaussian_noise", "add_noise_"):
            extra = f"  {n * 8 / (med[name] * 1e-3) / 1e9:5.2f} GB/s of float64 noise, {med[name] * 1e6 / n:.2f} ns/value"
        print(f"{name:24s} wall {med[name]:8.2f} ms (min {min(wall[name]) * 1e3:8.2f})  "
              f"cpu {statistics.median(cpu[name]) * 1e3:8.2f} ms{extra}")
    bare = med["gradient_clipping_step_"]
    best_torch = min(med["torch_foreach"], med["torch_unfused"])
    print(f"fastest torch sequence / bare gradient_clipping_step_: {best_torch / bare:.2f}x")
    if "GradientClipping.step" in med:
        print(f"GradientClipping.step / bare gradient_clipping_step_: {med['GradientClipping.step'] / bare:.2f}x; "
              f"fastest torch sequence / GradientClipping.step: {best_torch / med['GradientClipping.step']:.2f}x")


if __name__ == "__main__":
    main()
